//! A plain native implementation of [`TensorOps`] (row-major f32 matrices),
//! written from the WIT docs, so the strategies can be tested without a host.

use crate::{splitmix64, TensorOps};

/// A dense row-major 2-D matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    /// From nested rows.
    pub fn new(rows: &[&[f32]]) -> Self {
        let cols = rows[0].len();
        assert!(rows.iter().all(|r| r.len() == cols));
        Mat {
            rows: rows.len(),
            cols,
            data: rows.iter().flat_map(|r| r.iter().copied()).collect(),
        }
    }

    fn zeros(rows: usize, cols: usize) -> Self {
        Mat {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.cols + j]
    }

    fn same_shape(&self, o: &Mat) -> Result<(), String> {
        if self.rows == o.rows && self.cols == o.cols {
            Ok(())
        } else {
            Err(format!(
                "shape mismatch [{}, {}] vs [{}, {}]",
                self.rows, self.cols, o.rows, o.cols
            ))
        }
    }
}

/// The reference backend.
pub struct RefOps;

impl TensorOps for RefOps {
    type T = Mat;

    fn shape(&self, t: &Mat) -> Vec<u32> {
        vec![t.rows as u32, t.cols as u32]
    }

    fn scale(&self, t: &Mat, factor: f32) -> Mat {
        Mat {
            rows: t.rows,
            cols: t.cols,
            data: t.data.iter().map(|x| x * factor).collect(),
        }
    }

    fn matmul(&self, a: &Mat, b: &Mat) -> Result<Mat, String> {
        if a.cols != b.rows {
            return Err(format!(
                "matmul [{}, {}] x [{}, {}]",
                a.rows, a.cols, b.rows, b.cols
            ));
        }
        let mut c = Mat::zeros(a.rows, b.cols);
        for i in 0..a.rows {
            for j in 0..b.cols {
                c.data[i * b.cols + j] = (0..a.cols).map(|k| a.at(i, k) * b.at(k, j)).sum();
            }
        }
        Ok(c)
    }

    fn concat(&self, ts: &[&Mat], dim: u32) -> Result<Mat, String> {
        match dim {
            0 => {
                let cols = ts[0].cols;
                if ts.iter().any(|t| t.cols != cols) {
                    return Err("concat rows: column counts differ".into());
                }
                Ok(Mat {
                    rows: ts.iter().map(|t| t.rows).sum(),
                    cols,
                    data: ts.iter().flat_map(|t| t.data.iter().copied()).collect(),
                })
            }
            1 => {
                let rows = ts[0].rows;
                if ts.iter().any(|t| t.rows != rows) {
                    return Err("concat cols: row counts differ".into());
                }
                let cols = ts.iter().map(|t| t.cols).sum();
                let mut data = Vec::with_capacity(rows * cols);
                for i in 0..rows {
                    for t in ts {
                        data.extend_from_slice(&t.data[i * t.cols..(i + 1) * t.cols]);
                    }
                }
                Ok(Mat { rows, cols, data })
            }
            _ => Err(format!("concat dim {dim}")),
        }
    }

    fn weighted_sum(&self, ts: &[&Mat], weights: &[f32]) -> Result<Mat, String> {
        let mut out = Mat::zeros(ts[0].rows, ts[0].cols);
        for (t, w) in ts.iter().zip(weights) {
            out.same_shape(t)?;
            for (o, x) in out.data.iter_mut().zip(&t.data) {
                *o += w * x;
            }
        }
        Ok(out)
    }

    fn magnitude_prune(&self, t: &Mat, density: f32) -> Result<Mat, String> {
        let n = t.data.len();
        let k = (density * n as f32).round() as usize;
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| t.data[b].abs().total_cmp(&t.data[a].abs()));
        let mut out = Mat::zeros(t.rows, t.cols);
        for &i in &order[..k] {
            out.data[i] = t.data[i];
        }
        Ok(out)
    }

    fn random_drop(&self, t: &Mat, rate: f32, seed: u64, rescale: bool) -> Result<Mat, String> {
        let keep_scale = if rescale { 1.0 / (1.0 - rate) } else { 1.0 };
        let data = t
            .data
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let u =
                    (splitmix64(seed ^ splitmix64(i as u64)) >> 11) as f64 / (1u64 << 53) as f64;
                if u < rate as f64 {
                    0.0
                } else {
                    x * keep_scale
                }
            })
            .collect();
        Ok(Mat {
            rows: t.rows,
            cols: t.cols,
            data,
        })
    }

    fn sign_elect_mean(&self, ts: &[&Mat]) -> Result<Mat, String> {
        let mut out = Mat::zeros(ts[0].rows, ts[0].cols);
        for t in ts {
            out.same_shape(t)?;
        }
        for e in 0..out.data.len() {
            let sum: f32 = ts.iter().map(|t| t.data[e]).sum();
            if sum == 0.0 {
                continue; // no elected sign: 0 (the host's convention)
            }
            let positive = sum > 0.0;
            let agree: Vec<f32> = ts
                .iter()
                .map(|t| t.data[e])
                .filter(|&x| x != 0.0 && (x > 0.0) == positive)
                .collect();
            if !agree.is_empty() {
                out.data[e] = agree.iter().sum::<f32>() / agree.len() as f32;
            }
        }
        Ok(out)
    }

    fn svd_factors(&self, t: &Mat, rank: u32) -> Result<(Mat, Mat), String> {
        // One-sided Jacobi on the columns of a copy of t (f64).
        let (m, n) = (t.rows, t.cols);
        let mut a: Vec<f64> = t.data.iter().map(|&x| x as f64).collect();
        let mut v = vec![0.0f64; n * n];
        for i in 0..n {
            v[i * n + i] = 1.0;
        }
        for _sweep in 0..60 {
            let mut off = 0.0f64;
            for p in 0..n {
                for q in p + 1..n {
                    let (mut alpha, mut beta, mut gamma) = (0.0, 0.0, 0.0);
                    for i in 0..m {
                        let (x, y) = (a[i * n + p], a[i * n + q]);
                        alpha += x * x;
                        beta += y * y;
                        gamma += x * y;
                    }
                    if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() || gamma == 0.0 {
                        continue;
                    }
                    off = off.max(gamma.abs() / (alpha * beta).sqrt());
                    let zeta = (beta - alpha) / (2.0 * gamma);
                    let tt = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                    let tt = if zeta == 0.0 { 1.0 } else { tt };
                    let c = 1.0 / (1.0 + tt * tt).sqrt();
                    let s = c * tt;
                    for i in 0..m {
                        let (x, y) = (a[i * n + p], a[i * n + q]);
                        a[i * n + p] = c * x - s * y;
                        a[i * n + q] = s * x + c * y;
                    }
                    for i in 0..n {
                        let (x, y) = (v[i * n + p], v[i * n + q]);
                        v[i * n + p] = c * x - s * y;
                        v[i * n + q] = s * x + c * y;
                    }
                }
            }
            if off < 1e-14 {
                break;
            }
        }
        let sigma: Vec<f64> = (0..n)
            .map(|j| (0..m).map(|i| a[i * n + j].powi(2)).sum::<f64>().sqrt())
            .collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&x, &y| sigma[y].total_cmp(&sigma[x]));
        let r = (rank as usize).min(m).min(n);
        let mut up = Mat::zeros(m, r);
        let mut down = Mat::zeros(r, n);
        for (k, &j) in order[..r].iter().enumerate() {
            let s = sigma[j];
            let root = s.sqrt();
            for i in 0..m {
                // column j of a is u_j * sigma_j
                let u = if s > 0.0 { a[i * n + j] / s } else { 0.0 };
                up.data[i * r + k] = (u * root) as f32;
            }
            for c in 0..n {
                down.data[k * n + c] = (v[c * n + j] * root) as f32;
            }
        }
        Ok((up, down))
    }
}
