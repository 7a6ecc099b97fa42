//! The bundled merge strategies written directly in Rust on [`crate::ops`]:
//! the benchmark baseline for the WebAssembly plugins and an independent
//! check of what they compute. One call merges one layer.
//!
//! Notation: expert i has factors B_i (up [out, r_i]), A_i (down [r_i, in]),
//! scale s_i = alpha_i / r_i and user weight w_i; its delta is
//! tau_i = s_i B_i A_i.
//!
//! - `linear`: sum_i w_i tau_i (exact, in delta space; as factors of rank
//!   sum_i r_i when no output rank is requested, as a dense delta otherwise).
//! - `task-arithmetic`: lambda * sum_i w_i tau_i.
//! - `cat`: factors [w_1 s_1 B_1 | ... | w_K s_K B_K] and [A_1; ...; A_K]:
//!   the same delta as `linear`, exactly, at rank sum_i r_i.
//! - `svd`: the `linear` delta re-factored by truncated SVD to `rank`
//!   (default: the largest expert rank).
//! - `ties`: trim each tau_i to its top-`density` entries by magnitude,
//!   weight it by w_i / mean(w) (1 for the default uniform weights), elect
//!   the per-entry sign of the sum, average the agreeing non-zero entries,
//!   times lambda.
//! - `dare`: drop each entry of tau_i with probability `drop_rate` (rescaling
//!   the kept ones by 1 / (1 - rate); seeds from [`layer_seed`]), then
//!   lambda * sum_i w_i of the results (variant `linear`) or the TIES election
//!   of the relative-weighted results (variant `ties`).
//!
//! These mirror the bundled plugins (plugins/merge-common) operation for
//! operation, so plugin and native results agree to rounding.

use crate::ops;
use crate::rng::SplitMix64;
use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;

/// One expert's factors for the layer being merged (2-D, f32).
#[derive(Debug, Clone, Copy)]
pub struct Expert<'a> {
    /// [out, r]
    pub up: &'a Tensor,
    /// [r, in]
    pub down: &'a Tensor,
    /// alpha / rank
    pub scale: f32,
    /// The user's weight (1/K by default).
    pub weight: f32,
}

impl Expert<'_> {
    /// tau = scale * up @ down, [out, in].
    pub fn delta(&self) -> Result<Tensor> {
        self.task_vector(1.0)
    }

    /// factor * tau, with the factor folded into the small `up` first (the
    /// plugins' order of operations, so both round the same way).
    pub fn task_vector(&self, factor: f32) -> Result<Tensor> {
        Ok((self.up * (factor * self.scale) as f64)?.matmul(self.down)?)
    }
}

/// What a strategy returns for one layer (scale 1).
#[derive(Debug, Clone)]
pub enum Merged {
    /// up [out, r], down [r, in] whose product is the merged delta.
    Factors { up: Tensor, down: Tensor },
    /// The dense merged delta [out, in].
    Delta(Tensor),
}

impl Merged {
    /// The merged delta as a dense [out, in] tensor.
    pub fn to_delta(&self) -> Result<Tensor> {
        match self {
            Merged::Factors { up, down } => Ok(up.matmul(down)?),
            Merged::Delta(d) => Ok(d.clone()),
        }
    }
}

/// sum_i w_i tau_i, as one matmul of the concatenated factors.
pub fn linear(experts: &[Expert]) -> Result<Merged> {
    Ok(Merged::Delta(cat(experts)?.to_delta()?))
}

/// lambda * sum_i w_i tau_i.
pub fn task_arithmetic(experts: &[Expert], lambda: f32) -> Result<Merged> {
    let scaled: Vec<Expert> = experts
        .iter()
        .map(|e| Expert {
            weight: e.weight * lambda,
            ..*e
        })
        .collect();
    linear(&scaled)
}

/// Exact factors of the `linear` delta at rank sum_i r_i.
pub fn cat(experts: &[Expert]) -> Result<Merged> {
    ensure!(!experts.is_empty(), "no experts to merge");
    let ups: Vec<Tensor> = experts
        .iter()
        .map(|e| Ok((e.up * (e.weight * e.scale) as f64)?))
        .collect::<Result<_>>()?;
    let up_refs: Vec<&Tensor> = ups.iter().collect();
    let down_refs: Vec<&Tensor> = experts.iter().map(|e| e.down).collect();
    Ok(Merged::Factors {
        up: ops::concat(&up_refs, 1)?,
        down: ops::concat(&down_refs, 0)?,
    })
}

/// The `linear` delta re-factored to `rank` (default: the largest expert rank).
pub fn svd(experts: &[Expert], rank: Option<usize>) -> Result<Merged> {
    let rank = rank.unwrap_or_else(|| max_rank(experts));
    let Merged::Delta(d) = linear(experts)? else {
        unreachable!("linear returns a delta")
    };
    let (up, down) = ops::svd_factors(&d, rank)?;
    Ok(Merged::Factors { up, down })
}

/// Weights normalised to mean 1 (w_i K / sum w); the sum must be positive.
fn relative_weights(experts: &[Expert]) -> Result<Vec<f32>> {
    let sum: f32 = experts.iter().map(|e| e.weight).sum();
    ensure!(
        sum > 0.0,
        "the expert weights sum to {sum}; sign election needs a positive sum"
    );
    let k = experts.len() as f32;
    Ok(experts.iter().map(|e| e.weight * k / sum).collect())
}

/// Sign election + disjoint mean, then `* lambda`.
fn elect(ts: &[Tensor], lambda: f32) -> Result<Merged> {
    let refs: Vec<&Tensor> = ts.iter().collect();
    let m = ops::sign_elect_mean(&refs)?;
    Ok(Merged::Delta(if lambda == 1.0 {
        m
    } else {
        (m * lambda as f64)?
    }))
}

/// TIES-merging (Yadav et al. 2023) of the experts' deltas.
pub fn ties(experts: &[Expert], density: f32, lambda: f32) -> Result<Merged> {
    ensure!(!experts.is_empty(), "no experts to merge");
    let rel = relative_weights(experts)?;
    let trimmed: Vec<Tensor> = experts
        .iter()
        .zip(&rel)
        .map(|(e, &r)| {
            let tau = e.task_vector(r)?;
            if density < 1.0 {
                ops::magnitude_prune(&tau, density)
            } else {
                Ok(tau)
            }
        })
        .collect::<Result<_>>()?;
    elect(&trimmed, lambda)
}

/// DARE (Yu et al. 2024) drop-and-rescale, then the weighted sum. `seeds`
/// holds one seed per expert.
pub fn dare(experts: &[Expert], rate: f32, seeds: &[u64], rescale: bool) -> Result<Merged> {
    ensure!(
        seeds.len() == experts.len(),
        "dare: {} seeds for {} experts",
        seeds.len(),
        experts.len()
    );
    ensure!(!experts.is_empty(), "no experts to merge");
    let dropped: Vec<Tensor> = experts
        .iter()
        .zip(seeds)
        .map(|(e, &s)| {
            let tau = e.task_vector(1.0)?;
            if rate > 0.0 {
                ops::random_drop(&tau, rate, s, rescale)
            } else {
                Ok(tau)
            }
        })
        .collect::<Result<_>>()?;
    let refs: Vec<&Tensor> = dropped.iter().collect();
    let w: Vec<f32> = experts.iter().map(|e| e.weight).collect();
    Ok(Merged::Delta(ops::weighted_sum(&refs, &w)?))
}

/// DARE-TIES: drop-and-rescale each relative-weighted task vector, then
/// sign election and disjoint mean, times lambda.
pub fn dare_ties(experts: &[Expert], rate: f32, seeds: &[u64], lambda: f32) -> Result<Merged> {
    ensure!(
        seeds.len() == experts.len(),
        "dare: {} seeds for {} experts",
        seeds.len(),
        experts.len()
    );
    ensure!(!experts.is_empty(), "no experts to merge");
    let rel = relative_weights(experts)?;
    let dropped: Vec<Tensor> = experts
        .iter()
        .zip(&rel)
        .zip(seeds)
        .map(|((e, &r), &s)| {
            let tau = e.task_vector(r)?;
            if rate > 0.0 {
                ops::random_drop(&tau, rate, s, true)
            } else {
                Ok(tau)
            }
        })
        .collect::<Result<_>>()?;
    elect(&dropped, lambda)
}

fn max_rank(experts: &[Expert]) -> usize {
    experts.iter().map(|e| e.down.dims()[0]).max().unwrap_or(0)
}

/// Drop seed of expert `i` on `layer` from a base seed: the same derivation
/// as the bundled `dare` plugin (independent of the layer order).
pub fn layer_seed(base: u64, layer: &str, i: usize) -> u64 {
    let fnv = layer.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let x = base ^ fnv ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    SplitMix64::new(x).next_u64()
}

/// A native strategy with its parameters, parsed from the same names and
/// `k=v` parameters as the bundled plugins.
#[derive(Debug, Clone)]
pub enum Strategy {
    /// `linear`; `gain` is 1, or `lambda` for `task-arithmetic`.
    Linear {
        gain: f32,
    },
    Cat,
    Svd {
        rank: usize,
    },
    Ties {
        density: f32,
        lambda: f32,
    },
    Dare {
        rate: f32,
        ties: bool,
        lambda: f32,
        seed: u64,
    },
}

impl Strategy {
    /// Parse `name` (`linear`, `task-arithmetic`, `cat`, `svd`, `ties`,
    /// `dare`) and its parameters: task-arithmetic `lambda` (1); svd `rank`
    /// (0: the requested rank, else the largest expert rank); ties `density`
    /// (0.2), `lambda` (1); dare `drop_rate` (0.5), `variant` (linear|ties),
    /// `lambda` (1), `seed` (0: the base of the per-layer drop seeds).
    pub fn parse(name: &str, params: &[(String, String)]) -> Result<Self> {
        let get = |key: &str| params.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v);
        let num = |key: &str, default: f32| -> Result<f32> {
            get(key).map_or(Ok(default), |v| {
                v.parse::<f32>().with_context(|| {
                    format!("native {name}: parameter {key}={v:?} is not a number")
                })
            })
        };
        let int = |key: &str| -> Result<u64> {
            get(key).map_or(Ok(0), |v| {
                v.parse::<u64>().with_context(|| {
                    format!("native {name}: parameter {key}={v:?} is not a non-negative integer")
                })
            })
        };
        let allowed: &[&str] = match name {
            "linear" | "cat" => &[],
            "task-arithmetic" => &["lambda"],
            "svd" => &["rank"],
            "ties" => &["density", "lambda"],
            "dare" => &["drop_rate", "variant", "lambda", "seed"],
            _ => bail!("unknown native strategy {name:?}: use linear, task-arithmetic, cat, svd, ties or dare"),
        };
        if let Some((k, _)) = params.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            bail!("native {name}: unknown parameter {k:?} (takes: {allowed:?})");
        }
        Ok(match name {
            "linear" => Self::Linear { gain: 1.0 },
            "task-arithmetic" => Self::Linear {
                gain: num("lambda", 1.0)?,
            },
            "cat" => Self::Cat,
            "svd" => Self::Svd {
                rank: int("rank")? as usize,
            },
            "ties" => Self::Ties {
                density: num("density", 0.2)?,
                lambda: num("lambda", 1.0)?,
            },
            _ => Self::Dare {
                rate: num("drop_rate", 0.5)?,
                ties: match get("variant").map(|s| s.as_str()) {
                    None | Some("linear") => false,
                    Some("ties") => true,
                    Some(v) => bail!("native dare: variant {v:?} is not `linear` or `ties`"),
                },
                lambda: num("lambda", 1.0)?,
                seed: int("seed")?,
            },
        })
    }

    /// Merge one layer. `rank` is the requested output rank, if any:
    /// `linear` returns exact factors without one and the dense delta with one.
    pub fn merge_layer(
        &mut self,
        layer: &str,
        experts: &[Expert],
        rank: Option<usize>,
    ) -> Result<Merged> {
        match self {
            Self::Linear { gain } => {
                let scaled: Vec<Expert> = experts
                    .iter()
                    .map(|e| Expert {
                        weight: e.weight * *gain,
                        ..*e
                    })
                    .collect();
                match rank {
                    None => cat(&scaled),
                    Some(_) => linear(&scaled),
                }
            }
            Self::Cat => cat(experts),
            Self::Svd { rank: r } => svd(experts, if *r > 0 { Some(*r) } else { rank }),
            Self::Ties { density, lambda } => ties(experts, *density, *lambda),
            Self::Dare {
                rate,
                ties: use_ties,
                lambda,
                seed,
            } => {
                let seeds: Vec<u64> = (0..experts.len())
                    .map(|i| layer_seed(*seed, layer, i))
                    .collect();
                if *use_ties {
                    dare_ties(experts, *rate, &seeds, *lambda)
                } else {
                    let scaled: Vec<Expert> = experts
                        .iter()
                        .map(|e| Expert {
                            weight: e.weight * *lambda,
                            ..*e
                        })
                        .collect();
                    dare(&scaled, *rate, &seeds, true)
                }
            }
        }
    }
}
