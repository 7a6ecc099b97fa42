//! The SDK side: host tensors as [`TensorOps`], expert conversion, the
//! result variant, and the plugin instance's base random seed.

use std::sync::OnceLock;

use selma_plugin_sdk::{random, tensor, ExpertLayer, MergedLayer, Tensor};

use crate::{Expert, Merged, TensorOps};

/// The host's fused tensor imports.
pub struct HostOps;

impl TensorOps for HostOps {
    type T = Tensor;

    fn shape(&self, t: &Tensor) -> Vec<u32> {
        t.shape()
    }

    fn scale(&self, t: &Tensor, factor: f32) -> Tensor {
        t.scale(factor)
    }

    fn matmul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor, String> {
        a.matmul(b)
    }

    fn concat(&self, ts: &[&Tensor], dim: u32) -> Result<Tensor, String> {
        tensor::concat(ts, dim)
    }

    fn weighted_sum(&self, ts: &[&Tensor], weights: &[f32]) -> Result<Tensor, String> {
        tensor::weighted_sum(ts, weights)
    }

    fn magnitude_prune(&self, t: &Tensor, density: f32) -> Result<Tensor, String> {
        t.magnitude_prune(density)
    }

    fn random_drop(
        &self,
        t: &Tensor,
        rate: f32,
        seed: u64,
        rescale: bool,
    ) -> Result<Tensor, String> {
        t.random_drop(rate, seed, rescale)
    }

    fn sign_elect_mean(&self, ts: &[&Tensor]) -> Result<Tensor, String> {
        tensor::sign_elect_mean(ts)
    }

    fn svd_factors(&self, t: &Tensor, rank: u32) -> Result<(Tensor, Tensor), String> {
        t.svd_factors(rank)
    }
}

/// Borrow the host's expert list as [`Expert`]s.
pub fn experts(list: &[ExpertLayer]) -> Vec<Expert<'_, Tensor>> {
    list.iter()
        .map(|e| Expert {
            up: &e.up,
            down: &e.down,
            scale: e.scale,
            weight: e.weight,
        })
        .collect()
}

/// The WIT result variant of a strategy's result.
pub fn into_layer(m: Merged<Tensor>) -> MergedLayer {
    match m {
        Merged::Factors(up, down) => MergedLayer::Factors((up, down)),
        Merged::Delta(d) => MergedLayer::Delta(d),
    }
}

/// This instance's base seed: its first draw from the host's seeded random
/// source (the host seeds it from the run seed and the plugin name).
pub fn base_seed() -> u64 {
    static BASE: OnceLock<u64> = OnceLock::new();
    *BASE.get_or_init(random::next_u64)
}
