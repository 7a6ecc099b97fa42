//! Test-only merge strategy that exercises the `tensor` resource from the
//! guest side. Param `mode`:
//! - "copy" (default): copy every expert's factors into the guest with
//!   `to-list`, compute sum_i w_i s_i up_i @ down_i there and return it as a
//!   new host tensor (checks to-list, the constructor and the maths);
//! - "bad-shape": construct a tensor whose data does not fit its shape;
//! - "wrong-shape": return a 1x1 delta whatever the layer's shape;
//! - "handles": create empty tensors without end, keeping every handle
//!   (no bytes, so only a cap on handles stops it).

use selma_plugin_sdk::{
    params, tensor, ExpertLayer, MergeStrategy, MergedLayer, Metadata, Params, Plugin, PluginKind,
    Tensor,
};

struct Probe;

impl Plugin for Probe {
    fn metadata() -> Metadata {
        Metadata {
            name: "hostile-tensor".into(),
            version: "0.1.0".into(),
            kind: PluginKind::MergeStrategy,
            description: "Exercises the tensor import from the guest (test only).".into(),
            help: String::new(),
            params: vec![params::text(
                "mode",
                "copy",
                "copy, bad-shape, wrong-shape or handles",
            )],
        }
    }
}

fn copy(t: &Tensor) -> Result<(usize, usize, Vec<f32>), String> {
    let (r, c) = tensor::dims2(t, "factor")?;
    Ok((r as usize, c as usize, t.to_list()?))
}

impl MergeStrategy for Probe {
    fn merge_layer(
        _layer: String,
        experts: Vec<ExpertLayer>,
        _rank: Option<u32>,
        params: Params,
    ) -> Result<MergedLayer, String> {
        match params.str("mode")? {
            "bad-shape" => Ok(MergedLayer::Delta(Tensor::new(&[2, 2], &[1.0]))),
            "wrong-shape" => Ok(MergedLayer::Delta(Tensor::new(&[1, 1], &[1.0]))),
            "handles" => {
                let mut kept = Vec::new();
                loop {
                    kept.push(Tensor::new(&[0], &[]));
                }
            }
            _ => {
                let mut acc: Vec<f32> = Vec::new();
                let (mut rows, mut cols) = (0, 0);
                for e in &experts {
                    let (m, r, up) = copy(&e.up)?;
                    let (_, n, down) = copy(&e.down)?;
                    (rows, cols) = (m, n);
                    acc.resize(m * n, 0.0);
                    for i in 0..m {
                        for j in 0..n {
                            let dot: f32 = (0..r).map(|k| up[i * r + k] * down[k * n + j]).sum();
                            acc[i * n + j] += e.weight * e.scale * dot;
                        }
                    }
                }
                Ok(MergedLayer::Delta(Tensor::new(
                    &[rows as u32, cols as u32],
                    &acc,
                )))
            }
        }
    }
}

selma_plugin_sdk::export!(merge_strategy: Probe);
