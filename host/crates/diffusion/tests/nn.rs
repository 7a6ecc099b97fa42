//! Tests of the foundation: weight sources and `Vb`, the differentiable
//! layers (gradients against central finite differences in f64), the fused
//! vs composite paths, and LoRA adapters (zero-up, runtime vs merged, peft vs
//! kohya files, path matching).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use selma_diffusion::lora::{attach_adapters, attach_lora};
use selma_diffusion::nn::{
    adaptable_paths, attention, attention_chunked, causal_mask, frozen_conv2d, frozen_matmul_t,
    gelu_erf, join_path, merge_all_adapters, quick_gelu, silu, softmax_last_dim, Adaptable,
    Adapter, Conv2d, GroupNorm, LayerNorm, Linear, LoraHost,
};
use selma_diffusion::weights::{
    MemorySource, SafetensorsSource, ShapeOnlySource, TensorSource, Vb,
};
use selma_lora::{LoraFile, LoraFormat, LoraLayer};

/// Deterministic pseudo-random values in [-1, 1) (splitmix64).
fn rand_vec(n: usize, seed: u64) -> Vec<f64> {
    let mut r =
        selma_rng::SplitMix64::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1));
    (0..n).map(|_| r.next_f64() * 2.0 - 1.0).collect()
}

fn rand_t(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(rand_vec(n, seed), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Linear(+LoRA) -> quick_gelu -> LayerNorm -> frozen Linear -> causal self-attention (composite
/// softmax) -> gelu_erf -> weighted sum.
fn linear_chain_loss(up: &Tensor, down: &Tensor) -> Result<Tensor> {
    let d = DType::F64;
    let mut lin = Linear::new(rand_t(&[6, 5], 1, d), Some(rand_t(&[6], 2, d)));
    lin.adapters
        .push(Adapter::new(up.clone(), down.clone(), 0.75, 1.3));
    let ln = LayerNorm {
        weight: rand_t(&[6], 3, d),
        bias: Some(rand_t(&[6], 4, d)),
        eps: 1e-5,
    };
    // A frozen linear after the adapted one: its backward is input-only.
    let frozen = Linear::new(rand_t(&[6, 6], 7, d), Some(rand_t(&[6], 8, d)));
    let x = rand_t(&[2, 4, 5], 5, d);
    let h = frozen.forward(&ln.forward(&quick_gelu(&lin.forward(&x)?)?)?)?;
    let mask = causal_mask(4, d, &Device::Cpu)?;
    let a = attention(&h, &h, &h, Some(&mask), 0.4)?;
    let y = gelu_erf(&a)?;
    let c = rand_t(&[2, 4, 6], 6, d);
    Ok((y * c)?.sum_all()?)
}

/// Conv2d 3x3 (+LoCon) -> GroupNorm -> silu -> frozen conv stride 2 -> softmax over W -> weighted sum.
fn conv_chain_loss(up: &Tensor, down: &Tensor) -> Result<Tensor> {
    let d = DType::F64;
    let mut conv = Conv2d::new(
        rand_t(&[4, 3, 3, 3], 11, d),
        Some(rand_t(&[4], 12, d)),
        1,
        1,
    );
    conv.adapters
        .push(Adapter::new(up.clone(), down.clone(), 0.5, 0.8));
    let gn = GroupNorm {
        weight: rand_t(&[4], 13, d),
        bias: rand_t(&[4], 14, d),
        num_groups: 2,
        eps: 1e-6,
    };
    // A frozen strided conv after the adapted one.
    let down2 = Conv2d::new(rand_t(&[4, 4, 3, 3], 17, d), None, 2, 1);
    let x = rand_t(&[2, 3, 5, 5], 15, d);
    let h = silu(&gn.forward(&conv.forward(&x)?)?)?;
    let y = softmax_last_dim(&down2.forward(&h)?)?;
    let c = rand_t(&[2, 4, 3, 3], 16, d);
    Ok((y * c)?.sum_all()?)
}

/// Compares candle's gradient of `loss` w.r.t. `up` and `down` with central
/// finite differences, element by element.
fn check_grads(
    loss: fn(&Tensor, &Tensor) -> Result<Tensor>,
    up_shape: &[usize],
    down_shape: &[usize],
) -> Result<()> {
    let up = Var::from_tensor(&rand_t(up_shape, 21, DType::F64))?;
    let down = Var::from_tensor(&rand_t(down_shape, 22, DType::F64))?;
    let l = loss(up.as_tensor(), down.as_tensor())?;
    let grads = l.backward()?;
    let h = 1e-5;
    for (which, var) in [("up", &up), ("down", &down)] {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reached the adapter's {which}"));
        let g = g.flatten_all()?.to_vec1::<f64>()?;
        let base = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        let mut max_g: f64 = 0.0;
        for (i, gi) in g.iter().enumerate() {
            let eval = |delta: f64| -> Result<f64> {
                let mut v = base.clone();
                v[i] += delta;
                let t = Tensor::from_vec(v, var.as_tensor().dims(), &Device::Cpu)?;
                Ok(if which == "up" {
                    scalar(&loss(&t, down.as_tensor())?)
                } else {
                    scalar(&loss(up.as_tensor(), &t)?)
                })
            };
            let fd = (eval(h)? - eval(-h)?) / (2.0 * h);
            max_g = max_g.max(fd.abs());
            assert!(
                (gi - fd).abs() <= 1e-6 + 1e-5 * fd.abs(),
                "{which}[{i}]: autograd {gi} vs finite difference {fd}"
            );
        }
        assert!(
            max_g > 1e-3,
            "{which}: gradients are all ~0, test is vacuous"
        );
    }
    Ok(())
}

#[test]
fn linear_layernorm_attention_grads_match_finite_differences() -> Result<()> {
    check_grads(linear_chain_loss, &[6, 2], &[2, 5])
}

#[test]
fn locon_groupnorm_grads_match_finite_differences() -> Result<()> {
    check_grads(conv_chain_loss, &[4, 2, 1, 1], &[2, 3, 3, 3])
}

#[test]
fn frozen_weight_ops_give_the_input_gradient_only() -> Result<()> {
    let d = DType::F64;
    // Linear: d/dx sum(c ⊙ x wᵀ) = c w.
    let x = Var::from_tensor(&rand_t(&[5, 4], 101, d))?;
    let w = rand_t(&[3, 4], 102, d);
    let c = rand_t(&[5, 3], 103, d);
    let y = frozen_matmul_t(x.as_tensor(), &w)?;
    assert!(max_abs_diff(&y, &x.as_tensor().matmul(&w.t()?)?) == 0.0);
    let g = (y * &c)?.sum_all()?.backward()?;
    assert!(max_abs_diff(g.get(x.as_tensor()).unwrap(), &c.matmul(&w)?) < 1e-12);
    assert!(
        g.get(&w).is_none(),
        "no gradient computed for the frozen weight"
    );
    // candle's own matmul computes (and stores) one for the rhs `wᵀ`: the work we save.
    let wt = w.t()?;
    let g2 = (x.as_tensor().matmul(&wt)? * &c)?.sum_all()?.backward()?;
    assert_eq!(g2.get(&wt).map(|t| t.dims().to_vec()), Some(vec![4, 3]));

    // Conv: same input gradient as candle's conv backward, for odd and even
    // sizes, strides 1 and 2, kernels 1 and 3.
    for (h, wd, k, stride, pad) in [
        (5, 5, 3, 1, 1),
        (6, 6, 3, 2, 1),
        (7, 7, 3, 2, 1),
        (6, 6, 1, 1, 0),
    ] {
        let x = Var::from_tensor(&rand_t(&[2, 3, h, wd], 104, d))?;
        let w = rand_t(&[4, 3, k, k], 105, d);
        let y = frozen_conv2d(x.as_tensor(), &w, pad, stride)?;
        let y_ref = x.as_tensor().conv2d(&w, pad, stride, 1, 1)?;
        assert!(max_abs_diff(&y, &y_ref) < 1e-12); // im2col GEMM: other summation order
        let c = rand_t(y.dims(), 106, d);
        let g = (y * &c)?.sum_all()?.backward()?;
        let g_ref = (y_ref * &c)?.sum_all()?.backward()?;
        let e = max_abs_diff(
            g.get(x.as_tensor()).unwrap(),
            g_ref.get(x.as_tensor()).unwrap(),
        );
        assert!(e < 1e-12, "conv {h}x{wd} k{k} s{stride}: {e}");
    }
    // Mixed parity (7x6, stride 2) cannot use one output padding (candle's
    // own conv backward fails there): the op falls back to the im2col GEMM
    // made of plain ops, whose input gradient we check by finite differences.
    let x0 = rand_t(&[1, 2, 7, 6], 107, d);
    let w = rand_t(&[3, 2, 3, 3], 108, d);
    let c = rand_t(&[1, 3, 4, 3], 109, d);
    let x = Var::from_tensor(&x0)?;
    let y = frozen_conv2d(x.as_tensor(), &w, 1, 2)?;
    assert!(max_abs_diff(&y, &x0.conv2d(&w, 1, 2, 1, 1)?) < 1e-12);
    let g = (y * &c)?.sum_all()?.backward()?;
    let g = g
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()?
        .to_vec1::<f64>()?;
    let base = x0.flatten_all()?.to_vec1::<f64>()?;
    for (i, gi) in g.iter().enumerate() {
        let f = |delta: f64| -> Result<f64> {
            let mut v = base.clone();
            v[i] += delta;
            let xp = Tensor::from_vec(v, (1, 2, 7, 6), &Device::Cpu)?;
            Ok(scalar(&(xp.conv2d(&w, 1, 2, 1, 1)? * &c)?.sum_all()?))
        };
        let fd = (f(1e-5)? - f(-1e-5)?) / 2e-5;
        assert!((gi - fd).abs() < 1e-7, "x[{i}]: {gi} vs {fd}");
    }
    Ok(())
}

#[test]
fn chunked_attention_equals_one_block() -> Result<()> {
    let d = DType::F64;
    let q = Var::from_tensor(&rand_t(&[6, 10, 4], 121, d))?;
    let k = rand_t(&[6, 10, 4], 122, d);
    let v = rand_t(&[6, 10, 3], 123, d);
    let c = rand_t(&[6, 10, 3], 124, d);
    let mask = causal_mask(10, d, &Device::Cpu)?;
    let full = attention_chunked(q.as_tensor(), &k, &v, Some(&mask), 0.5, usize::MAX)?;
    // Independent check of one row: query 3 of head 0 attends to keys 0..=3.
    let (qr, kr, vr) = (
        q.as_tensor().to_vec3::<f64>()?,
        k.to_vec3::<f64>()?,
        v.to_vec3::<f64>()?,
    );
    let s: Vec<f64> = (0..=3)
        .map(|j| 0.5 * (0..4).map(|t| qr[0][3][t] * kr[0][j][t]).sum::<f64>())
        .collect();
    let z: f64 = s.iter().map(|x| x.exp()).sum();
    let want: f64 = (0..=3).map(|j| s[j].exp() / z * vr[0][j][1]).sum();
    assert!((full.to_vec3::<f64>()?[0][3][1] - want).abs() < 1e-12);
    let g_full = (&full * &c)?.sum_all()?.backward()?;
    // 6 heads x 10 keys = 60 scores per query row: 130 elements -> 2 rows per chunk.
    for max in [60, 130, 599] {
        let part = attention_chunked(q.as_tensor(), &k, &v, Some(&mask), 0.5, max)?;
        assert!(max_abs_diff(&part, &full) < 1e-12, "max {max}");
        let g = (&part * &c)?.sum_all()?.backward()?;
        let e = max_abs_diff(
            g.get(q.as_tensor()).unwrap(),
            g_full.get(q.as_tensor()).unwrap(),
        );
        assert!(e < 1e-12, "grad, max {max}: {e}");
    }
    Ok(())
}

#[test]
fn fused_and_composite_paths_agree() -> Result<()> {
    let x = rand_t(&[3, 7, 16], 31, DType::F32);
    let xv = Var::from_tensor(&x)?; // tracked: composite path
    let fused = softmax_last_dim(&x)?;
    let composite = softmax_last_dim(xv.as_tensor())?;
    assert!(max_abs_diff(&fused, &composite) < 1e-6);
    let ln = LayerNorm {
        weight: rand_t(&[16], 32, DType::F32),
        bias: Some(rand_t(&[16], 33, DType::F32)),
        eps: 1e-5,
    };
    let a = ln.forward(&x)?;
    let b = ln.forward(xv.as_tensor())?;
    assert!(max_abs_diff(&a, &b) < 1e-5);
    // Independent check of the normalisation (weight 1, bias 0): each row has mean 0, variance 1.
    let plain = LayerNorm {
        weight: Tensor::ones(16, DType::F32, &Device::Cpu)?,
        bias: Some(Tensor::zeros(16, DType::F32, &Device::Cpu)?),
        eps: 0.0,
    };
    for y in [plain.forward(&x)?, plain.forward(xv.as_tensor())?] {
        let rows = y.reshape((21, 16))?.to_vec2::<f32>()?;
        for r in rows {
            let m: f32 = r.iter().sum::<f32>() / 16.0;
            let v: f32 = r.iter().map(|a| (a - m) * (a - m)).sum::<f32>() / 16.0;
            assert!(m.abs() < 1e-5 && (v - 1.0).abs() < 1e-4, "mean {m} var {v}");
        }
    }
    Ok(())
}

#[test]
fn quick_gelu_and_gelu_match_formulas() -> Result<()> {
    let xs = [-3.0f64, -1.0, -0.2, 0.0, 0.5, 2.0];
    let x = Tensor::new(&xs, &Device::Cpu)?;
    let q = quick_gelu(&x)?.to_vec1::<f64>()?;
    let g = gelu_erf(&x)?.to_vec1::<f64>()?;
    // erf values from tables: erf(-3/√2)=-0.997300203936740, erf(-1/√2)=-0.682689492137086,
    // erf(-0.2/√2)=-0.158519418878, erf(0.5/√2)=0.382924922548026, erf(2/√2)=0.954499736103642
    let erf = [
        -0.997300203936740,
        -0.682689492137086,
        -0.158519418878146,
        0.0,
        0.382924922548026,
        0.954499736103642,
    ];
    for i in 0..xs.len() {
        let want_q = xs[i] / (1.0 + (-1.702 * xs[i]).exp());
        let want_g = 0.5 * xs[i] * (1.0 + erf[i]);
        assert!((q[i] - want_q).abs() < 1e-12, "quick_gelu({})", xs[i]);
        assert!(
            (g[i] - want_g).abs() < 1e-6,
            "gelu({}) {} vs {}",
            xs[i],
            g[i],
            want_g
        );
    }
    Ok(())
}

#[test]
fn zero_up_changes_nothing_and_merge_matches_runtime() -> Result<()> {
    let d = DType::F32;
    // Linear with two adapters of different weights.
    let base = Linear::new(rand_t(&[8, 6], 41, d), Some(rand_t(&[8], 42, d)));
    let x = rand_t(&[2, 3, 6], 43, d);
    let y0 = base.forward(&x)?;
    let mut zero = base.clone();
    zero.add_adapter(Adapter::new(
        Tensor::zeros((8, 3), d, &Device::Cpu)?,
        rand_t(&[3, 6], 44, d),
        2.0,
        1.0,
    ))?;
    assert_eq!(max_abs_diff(&zero.forward(&x)?, &y0), 0.0);
    let mut lin = base.clone();
    lin.add_adapter(Adapter::new(
        rand_t(&[8, 3], 45, d),
        rand_t(&[3, 6], 46, d),
        0.5,
        0.7,
    ))?;
    lin.add_adapter(Adapter::new(
        rand_t(&[8, 2], 47, d),
        rand_t(&[2, 6], 48, d),
        1.0,
        -0.4,
    ))?;
    let runtime = lin.forward(&x)?;
    // Independent expectation: W' = W + Σ s·w·up·down computed by hand.
    let mut w = base.weight.to_vec2::<f32>()?;
    for a in &lin.adapters {
        let (u, dn) = (a.up.to_vec2::<f32>()?, a.down.to_vec2::<f32>()?);
        for (o, row) in w.iter_mut().enumerate() {
            for (i, wv) in row.iter_mut().enumerate() {
                let s: f32 = (0..a.rank()).map(|r| u[o][r] * dn[r][i]).sum();
                *wv += s * a.scale * a.weight;
            }
        }
    }
    let manual = Linear::new(Tensor::new(w, &Device::Cpu)?, base.bias.clone()).forward(&x)?;
    assert!(max_abs_diff(&runtime, &manual) < 1e-5);
    assert!(max_abs_diff(&runtime, &y0) > 1e-2, "adapters had no effect");
    lin.merge_adapters()?;
    assert!(lin.adapters.is_empty());
    assert!(max_abs_diff(&lin.forward(&x)?, &runtime) < 1e-5);

    // 3x3 LoCon conv and a 1x1 conv fed 2-D factors.
    for (k, pad, down_shape, up_shape) in [
        (3usize, 1usize, vec![2, 4, 3, 3], vec![5, 2, 1, 1]),
        (1, 0, vec![2, 4], vec![5, 2]),
    ] {
        let base = Conv2d::new(
            rand_t(&[5, 4, k, k], 51, d),
            Some(rand_t(&[5], 52, d)),
            1,
            pad,
        );
        let x = rand_t(&[2, 4, 6, 6], 53, d);
        let y0 = base.forward(&x)?;
        let mut zero = base.clone();
        zero.add_adapter(Adapter::new(
            Tensor::zeros(up_shape.as_slice(), d, &Device::Cpu)?,
            rand_t(&down_shape, 54, d),
            1.0,
            1.0,
        ))?;
        assert_eq!(max_abs_diff(&zero.forward(&x)?, &y0), 0.0);
        let mut conv = base.clone();
        conv.add_adapter(Adapter::new(
            rand_t(&up_shape, 55, d),
            rand_t(&down_shape, 56, d),
            0.5,
            1.5,
        ))?;
        let runtime = conv.forward(&x)?;
        assert!(max_abs_diff(&runtime, &y0) > 1e-2);
        conv.merge_adapters()?;
        assert!(max_abs_diff(&conv.forward(&x)?, &runtime) < 1e-4, "k={k}");
    }
    Ok(())
}

/// A two-level toy model with diffusers-like paths.
#[derive(Clone)]
struct Toy {
    to_q: Linear,
    blocks: Vec<Conv2d>,
}

impl Adaptable for Toy {
    fn visit_adaptable(&mut self, p: &str, f: &mut dyn FnMut(&str, &mut dyn LoraHost)) {
        self.to_q.visit_adaptable(&join_path(p, "attn1.to_q"), f);
        self.blocks.visit_adaptable(&join_path(p, "resnets"), f);
    }
}

impl Toy {
    fn new() -> Self {
        let d = DType::F32;
        Self {
            to_q: Linear::new(rand_t(&[6, 4], 61, d), None),
            blocks: vec![
                Conv2d::new(rand_t(&[3, 3, 3, 3], 62, d), None, 1, 1),
                Conv2d::new(rand_t(&[3, 3, 1, 1], 63, d), None, 1, 0),
            ],
        }
    }
    fn forward(&self, x: &Tensor, img: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut h = img.clone();
        for b in &self.blocks {
            h = b.forward(&h)?;
        }
        Ok((self.to_q.forward(x)?, h))
    }
}

#[test]
fn attach_lora_peft_and_kohya_files_agree_with_merge() -> Result<()> {
    let d = DType::F32;
    let mut toy = Toy::new();
    assert_eq!(
        adaptable_paths(&mut toy),
        vec!["attn1.to_q", "resnets.0", "resnets.1"]
    );
    let mut layers = BTreeMap::new();
    layers.insert(
        "unet.attn1.to_q".to_string(),
        LoraLayer::new(rand_t(&[6, 2], 71, d), rand_t(&[2, 4], 72, d), 4.0)?,
    );
    layers.insert(
        "unet.resnets.0".to_string(),
        LoraLayer::new(
            rand_t(&[3, 2, 1, 1], 73, d),
            rand_t(&[2, 3, 3, 3], 74, d),
            1.0,
        )?,
    );
    layers.insert(
        "unet.resnets.1".to_string(),
        LoraLayer::new(
            rand_t(&[3, 1, 1, 1], 75, d),
            rand_t(&[1, 3, 1, 1], 76, d),
            1.0,
        )?,
    );
    let file = LoraFile {
        layers,
        metadata: BTreeMap::new(),
    };
    let dir = tempfile::tempdir()?;
    let x = rand_t(&[2, 4], 77, d);
    let img = rand_t(&[1, 3, 5, 5], 78, d);
    let base = toy.forward(&x, &img)?;
    let mut outs = vec![];
    for fmt in [LoraFormat::Peft, LoraFormat::Kohya] {
        let p = dir.path().join(format!("{fmt:?}.safetensors"));
        file.save(&p, fmt)?;
        let loaded = LoraFile::load(&p, &Device::Cpu)?;
        let mut m = toy.clone();
        assert_eq!(attach_lora(&mut m, &loaded, "unet", 0.6)?, 3);
        assert_eq!(attach_lora(&mut m, &loaded, "text_encoder", 1.0)?, 0);
        outs.push(m.forward(&x, &img)?);
        // merged == runtime
        merge_all_adapters(&mut m)?;
        let merged = m.forward(&x, &img)?;
        let rt = outs.last().unwrap();
        assert!(max_abs_diff(&merged.0, &rt.0) < 1e-5 && max_abs_diff(&merged.1, &rt.1) < 1e-4);
    }
    assert!(max_abs_diff(&outs[0].0, &outs[1].0) < 1e-6);
    assert!(max_abs_diff(&outs[0].1, &outs[1].1) < 1e-6);
    assert!(
        max_abs_diff(&outs[0].0, &base.0) > 1e-3,
        "LoRA had no effect"
    );
    // The linear's expected output: x (W + 0.6·(4/2)·up·down)ᵀ.
    let l = &file.layers["unet.attn1.to_q"];
    let w = (toy.to_q.weight.clone() + (l.delta()? * 0.6)?)?;
    assert!(max_abs_diff(&outs[0].0, &x.matmul(&w.t()?)?) < 1e-5);

    // An unknown path is an error naming it; nothing is attached.
    let mut bad = BTreeMap::new();
    bad.insert(
        "attn1.to_k".to_string(),
        Adapter::new(rand_t(&[6, 1], 79, d), rand_t(&[1, 4], 80, d), 1.0, 1.0),
    );
    let mut m = toy.clone();
    let err = attach_adapters(&mut m, bad).unwrap_err().to_string();
    assert!(err.contains("attn1.to_k"), "{err}");
    assert!(m.to_q.adapters.is_empty());
    // A shape mismatch is an error naming the layer.
    let mut wrong = BTreeMap::new();
    wrong.insert(
        "attn1.to_q".to_string(),
        Adapter::new(rand_t(&[5, 1], 81, d), rand_t(&[1, 4], 82, d), 1.0, 1.0),
    );
    let err = format!("{:#}", attach_adapters(&mut m, wrong).unwrap_err());
    assert!(err.contains("attn1.to_q"), "{err}");
    Ok(())
}

#[test]
fn safetensors_source_converts_and_vb_reports_keys() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let w = rand_t(&[4, 3], 91, DType::F32);
    let b = rand_t(&[4], 92, DType::F32);
    let mut map = std::collections::HashMap::new();
    map.insert("lin.weight".to_string(), w.to_dtype(DType::F16)?);
    map.insert("lin.bias".to_string(), b.to_dtype(DType::F16)?);
    map.insert("extra.weight".to_string(), b.to_dtype(DType::F16)?);
    let path = dir.path().join("diffusion_pytorch_model.fp16.safetensors");
    candle_core::safetensors::save(&map, &path)?;

    let vb = Vb::from_dir(dir.path(), DType::F32, &Device::Cpu)?;
    assert!(vb.contains("lin.weight") && !vb.contains("lin.nope"));
    let lin = Linear::load(&vb.pp("lin"), 3, 4, true)?;
    assert_eq!(lin.weight.dtype(), DType::F32);
    // f16 rounding only.
    assert!(max_abs_diff(&lin.weight, &w) < 1e-3);
    assert_eq!(vb.unused_keys(), vec!["extra.weight".to_string()]);
    let err = vb.check_fully_used().unwrap_err().to_string();
    assert!(err.contains("extra.weight"), "{err}");

    let err = vb.pp("lin").get((3, 4), "weight").unwrap_err().to_string();
    assert!(
        err.contains("lin.weight") && err.contains("fp16.safetensors") && err.contains("[4, 3]"),
        "{err}"
    );
    let err = vb.pp("lin").get(4, "gamma").unwrap_err().to_string();
    assert!(
        err.contains("lin.gamma") && err.contains("missing"),
        "{err}"
    );
    assert_eq!(vb.missing_keys(), vec!["lin.gamma".to_string()]);

    // Sharded weights: an index JSON naming two shards.
    let sharded = tempfile::tempdir()?;
    let mut a = std::collections::HashMap::new();
    a.insert("lin.weight".to_string(), w.clone());
    let mut b2 = std::collections::HashMap::new();
    b2.insert("lin.bias".to_string(), b.clone());
    candle_core::safetensors::save(&a, sharded.path().join("model-00001-of-00002.safetensors"))?;
    candle_core::safetensors::save(&b2, sharded.path().join("model-00002-of-00002.safetensors"))?;
    std::fs::write(
        sharded.path().join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"lin.weight": "model-00001-of-00002.safetensors",
            "lin.bias": "model-00002-of-00002.safetensors"}}"#,
    )?;
    let vb2 = Vb::from_dir(sharded.path(), DType::F32, &Device::Cpu)?;
    let lin2 = Linear::load(&vb2.pp("lin"), 3, 4, true)?;
    assert_eq!(max_abs_diff(&lin2.weight, &w), 0.0);
    assert_eq!(max_abs_diff(lin2.bias.as_ref().unwrap(), &b), 0.0);
    vb2.check_fully_used()?;
    let err = vb2.pp("lin").get((4, 4), "weight").unwrap_err().to_string();
    assert!(err.contains("model-00001-of-00002.safetensors"), "{err}");

    // bf16 requested from f16 data.
    let src = SafetensorsSource::open(&[&path])?;
    assert_eq!(
        src.load("lin.bias", DType::BF16, &Device::Cpu)?.dtype(),
        DType::BF16
    );
    assert_eq!(src.shape("lin.weight"), Some(vec![4, 3]));
    Ok(())
}

#[test]
fn shape_only_source_builds_big_layers_without_allocating() -> Result<()> {
    let src = ShapeOnlySource::parse(
        "emb.weight [49408, 1280]\nproj.weight [1280, 1280]\nproj.bias [1280]\nscalar []\n",
        "keys.txt",
    )?;
    assert_eq!(src.shape("scalar"), Some(vec![]));
    let vb = Vb::new(Arc::new(src), DType::F32, &Device::Cpu);
    let emb = vb.get((49408, 1280), "emb.weight")?;
    assert_eq!(emb.dims(), &[49408, 1280]);
    assert_eq!(
        emb.stride(),
        &[0, 0],
        "must be a broadcast view, not an allocation"
    );
    let lin = Linear::load(&vb.pp("proj"), 1280, 1280, true)?;
    let y = lin.forward(&Tensor::ones((1, 1280), DType::F32, &Device::Cpu)?)?;
    assert_eq!(y.dims(), &[1, 1280]);
    assert_eq!(vb.unused_keys(), vec!["scalar".to_string()]);
    let mem = MemorySource::new([("a".to_string(), emb.narrow(0, 0, 2)?)], "mem");
    assert_eq!(mem.keys(), vec!["a".to_string()]);
    Ok(())
}
