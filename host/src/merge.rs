//! The merge driver: K LoRA experts in, one merged LoRA out, layer by layer
//! through a merge strategy (a WebAssembly plugin, or a native Rust twin).
//!
//! Rules:
//! - Every input must adapt the same set of layers (canonical module paths)
//!   with the same flattened [out, in] shapes; the error names the file and
//!   the layer.
//! - Ranks may differ between experts and layers: every strategy works per
//!   layer on `scale_i * up_i @ down_i` (delta space), which is well defined
//!   for any ranks.
//! - Weights default to 1/K.
//! - Output rank: a strategy that returns factors keeps their rank unless
//!   `rank` is given and smaller (then the product is re-factored by SVD to
//!   `rank`). A returned dense delta is re-factored by truncated SVD to `rank`,
//!   by default the largest expert rank of that layer. With no `rank`,
//!   `linear` and `cat` return exact factors of rank sum_i r_i (the exact
//!   weighted delta sum); `--rank R` gives the best rank-R approximation of it.
//! - Output alpha = rank (scale 1); conv layers get their 4-D shapes back.

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use selma_lora::native::{self, Expert};
use selma_lora::{ops, LoraFile, LoraLayer};
use selma_runtime::{ExpertLayer, MergePlugin, MergedLayer, Params};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};

/// Something that merges one layer's experts (a plugin or a native strategy).
pub trait LayerMerger {
    /// Name shown in errors and written to the output metadata.
    fn name(&self) -> String;
    /// Merge one layer; `rank` is the user's requested rank, if any.
    fn merge_layer(
        &mut self,
        layer: &str,
        experts: &[ExpertLayer],
        rank: Option<u32>,
    ) -> Result<MergedLayer>;
}

/// A merge-strategy plugin with validated parameters.
pub struct PluginMerger {
    pub plugin: MergePlugin,
    pub params: Params,
}

impl PluginMerger {
    /// Validate `params` (`key=value` strings) against the plugin's schema.
    pub fn new(plugin: MergePlugin, params: &[(String, String)]) -> Result<Self> {
        let params = plugin.params(params)?;
        Ok(Self { plugin, params })
    }
}

impl LayerMerger for PluginMerger {
    fn name(&self) -> String {
        self.plugin.name().to_string()
    }
    fn merge_layer(
        &mut self,
        layer: &str,
        experts: &[ExpertLayer],
        rank: Option<u32>,
    ) -> Result<MergedLayer> {
        self.plugin.merge_layer(layer, experts, rank, &self.params)
    }
}

/// A native strategy from `selma_lora::native`.
pub struct NativeMerger {
    pub name: String,
    pub strategy: native::Strategy,
}

impl NativeMerger {
    /// Parse a native strategy name and its `key=value` parameters.
    pub fn new(name: &str, params: &[(String, String)]) -> Result<Self> {
        Ok(Self {
            name: name.to_string(),
            strategy: native::Strategy::parse(name, params)?,
        })
    }
}

impl LayerMerger for NativeMerger {
    fn name(&self) -> String {
        format!("native {}", self.name)
    }
    fn merge_layer(
        &mut self,
        layer: &str,
        experts: &[ExpertLayer],
        rank: Option<u32>,
    ) -> Result<MergedLayer> {
        let ex = native_experts(experts);
        let m = self
            .strategy
            .merge_layer(layer, &ex, rank.map(|r| r as usize))
            .with_context(|| format!("native {}: layer {layer}", self.name))?;
        Ok(match m {
            native::Merged::Factors { up, down } => MergedLayer::Factors { up, down },
            native::Merged::Delta(d) => MergedLayer::Delta(d),
        })
    }
}

/// Settings of one merge.
#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    /// One weight per input (default 1/K each).
    pub weights: Option<Vec<f32>>,
    /// Output rank (see the module docs for the default).
    pub rank: Option<usize>,
    /// Show a progress bar over layers.
    pub progress: bool,
}

/// One loaded input.
pub struct Input {
    pub path: PathBuf,
    pub file: LoraFile,
}

/// Check that all inputs adapt the same layers with the same shapes; returns
/// the layer list.
pub fn check_inputs(inputs: &[Input]) -> Result<Vec<String>> {
    let Some(first) = inputs.first() else {
        bail!("no LoRA files to merge");
    };
    for inp in &inputs[1..] {
        for layer in first.file.layers.keys() {
            if !inp.file.layers.contains_key(layer) {
                bail!(
                    "layer {layer} is adapted by {} but not by {}: merged experts must adapt the \
                     same layers",
                    first.path.display(),
                    inp.path.display()
                );
            }
        }
        for layer in inp.file.layers.keys() {
            if !first.file.layers.contains_key(layer) {
                bail!(
                    "layer {layer} is adapted by {} but not by {}: merged experts must adapt the \
                     same layers",
                    inp.path.display(),
                    first.path.display()
                );
            }
        }
    }
    for (layer, l0) in &first.file.layers {
        let shape0 = (
            l0.out_features(),
            l0.in_features(),
            l0.down.dims()[1..].to_vec(),
        );
        for inp in &inputs[1..] {
            let l = &inp.file.layers[layer];
            let shape = (
                l.out_features(),
                l.in_features(),
                l.down.dims()[1..].to_vec(),
            );
            if shape != shape0 {
                bail!(
                    "layer {layer}: {} adapts a [{}, {:?}] weight but {} a [{}, {:?}] one \
                     (experts of different base models?)",
                    first.path.display(),
                    shape0.0,
                    shape0.2,
                    inp.path.display(),
                    shape.0,
                    shape.2
                );
            }
        }
    }
    Ok(first.file.layers.keys().cloned().collect())
}

/// The per-input weights: `weights` checked against K, or 1/K each.
pub fn resolve_weights(weights: Option<&[f32]>, k: usize) -> Result<Vec<f32>> {
    match weights {
        None => Ok(vec![1.0 / k as f32; k]),
        Some(w) => {
            ensure!(
                w.len() == k,
                "--weights has {} values for {k} LoRA files; give one weight per file",
                w.len()
            );
            ensure!(
                w.iter().all(|x| x.is_finite()),
                "--weights must be finite numbers"
            );
            Ok(w.to_vec())
        }
    }
}

/// Call the strategy on one layer's experts (factors flattened to 2-D).
pub fn call_strategy(
    merger: &mut dyn LayerMerger,
    layer: &str,
    layers: &[&LoraLayer],
    weights: &[f32],
    rank: Option<usize>,
) -> Result<MergedLayer> {
    let experts: Vec<ExpertLayer> = layers
        .iter()
        .zip(weights)
        .map(|(l, &w)| {
            Ok(ExpertLayer {
                up: l.up_2d()?,
                down: l.down_2d()?,
                scale: l.scale(),
                weight: w,
            })
        })
        .collect::<Result<_>>()?;
    let merged = merger
        .merge_layer(layer, &experts, rank.map(|r| r as u32))
        .with_context(|| format!("merging layer {layer} with {}", merger.name()))?;
    // A strategy's NaN, Inf or overflowing factors would render black: the
    // merge stops here, before anything is written.
    let (what, delta) = match &merged {
        MergedLayer::Delta(d) => ("delta", d.clone()),
        MergedLayer::Factors { up, down } => {
            ensure_finite(up, merger, layer, "up factor")?;
            ensure_finite(down, merger, layer, "down factor")?;
            ("factors' product up @ down", up.matmul(down)?)
        }
    };
    ensure_finite(&delta, merger, layer, what)?;
    Ok(merged)
}

/// An error naming the strategy and the layer unless every value of `t` is finite.
fn ensure_finite(
    t: &candle_core::Tensor,
    merger: &dyn LayerMerger,
    layer: &str,
    what: &str,
) -> Result<()> {
    let values: Vec<f32> = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let bad = values.iter().filter(|x| !x.is_finite()).count();
    ensure!(
        bad == 0,
        "merge strategy {} returned {bad} NaN or infinite value(s) in the {what} of layer {layer} \
         (a merged LoRA must be finite; nothing was written)",
        merger.name()
    );
    Ok(())
}

/// Turn a strategy's result into the output layer: re-factor to the output
/// rank by SVD where needed, restore conv shapes, alpha = rank.
pub fn finish_layer(
    layer: &str,
    merged: MergedLayer,
    layers: &[&LoraLayer],
    rank: Option<usize>,
) -> Result<LoraLayer> {
    let max_rank = layers.iter().map(|l| l.rank()).max().unwrap_or(1);
    let (up, down) = match merged {
        MergedLayer::Delta(d) => ops::svd_factors(&d, rank.unwrap_or(max_rank))
            .with_context(|| format!("layer {layer}: re-factoring the merged delta by SVD"))?,
        MergedLayer::Factors { up, down } => match rank {
            Some(r) if up.dims()[1] > r => ops::svd_factors(&up.matmul(&down)?, r)
                .with_context(|| format!("layer {layer}: re-factoring to rank {r} by SVD"))?,
            _ => (up, down),
        },
    };
    let r = up.dims()[1];
    let first = layers[0];
    let (up, down) = if first.down.rank() == 4 {
        let dd = first.down.dims();
        (
            up.reshape((first.out_features(), r, 1, 1))?,
            down.reshape((r, dd[1], dd[2], dd[3]))?,
        )
    } else {
        (up, down)
    };
    LoraLayer::new(up, down, r as f32).with_context(|| format!("layer {layer}: merged factors"))
}

/// Merge one layer: [`call_strategy`] then [`finish_layer`].
pub fn merge_one_layer(
    merger: &mut dyn LayerMerger,
    layer: &str,
    layers: &[&LoraLayer],
    weights: &[f32],
    rank: Option<usize>,
) -> Result<LoraLayer> {
    let merged = call_strategy(merger, layer, layers, weights, rank)?;
    finish_layer(layer, merged, layers, rank)
}

/// Merge `inputs` with `merger` into one LoRA file (alpha = rank per layer).
///
/// The strategy runs layer by layer on this thread (a plugin instance is
/// single-threaded); the SVD re-factoring, the costly part, runs on worker
/// threads (one per core, at most 8) while the strategy moves on.
pub fn merge(
    inputs: &[Input],
    merger: &mut dyn LayerMerger,
    opts: &MergeOptions,
) -> Result<LoraFile> {
    let layers = check_inputs(inputs)?;
    let weights = resolve_weights(opts.weights.as_deref(), inputs.len())?;
    if opts.rank == Some(0) {
        bail!("--rank must be at least 1");
    }
    let bar = if opts.progress {
        let b = ProgressBar::new(layers.len() as u64);
        b.set_style(
            ProgressStyle::with_template("merging {bar:30} {pos}/{len} layers {elapsed} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let experts_of =
        |layer: &str| -> Vec<&LoraLayer> { inputs.iter().map(|i| &i.file.layers[layer]).collect() };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let mut done: Vec<Option<LoraLayer>> = vec![None; layers.len()];
    std::thread::scope(|scope| -> Result<()> {
        let (job_tx, job_rx) = mpsc::sync_channel::<(usize, MergedLayer)>(2 * threads);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (res_tx, res_rx) = mpsc::channel::<(usize, Result<LoraLayer>)>();
        for _ in 0..threads {
            let (rx, tx) = (job_rx.clone(), res_tx.clone());
            let (layers, experts_of, rank) = (&layers, &experts_of, opts.rank);
            scope.spawn(move || loop {
                let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                let Ok((i, merged)) = job else { break };
                let r = finish_layer(&layers[i], merged, &experts_of(&layers[i]), rank);
                if tx.send((i, r)).is_err() {
                    break;
                }
            });
        }
        drop(res_tx);
        let mut collect = |(i, r): (usize, Result<LoraLayer>)| -> Result<()> {
            done[i] = Some(r?);
            bar.inc(1);
            Ok(())
        };
        for (i, layer) in layers.iter().enumerate() {
            let merged = call_strategy(merger, layer, &experts_of(layer), &weights, opts.rank)?;
            job_tx
                .send((i, merged))
                .map_err(|_| anyhow::anyhow!("the SVD worker threads stopped"))?;
            while let Ok(r) = res_rx.try_recv() {
                collect(r)?;
            }
        }
        drop(job_tx);
        for r in res_rx {
            collect(r)?;
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    let mut out = BTreeMap::new();
    for (layer, l) in layers.iter().zip(done) {
        let l = l.ok_or_else(|| anyhow::anyhow!("layer {layer} was not merged"))?;
        out.insert(layer.clone(), l);
    }
    let mut metadata = BTreeMap::new();
    metadata.insert("selma_merge_strategy".to_string(), merger.name());
    metadata.insert(
        "selma_merge_inputs".to_string(),
        serde_json::to_string(
            &inputs
                .iter()
                .map(|i| {
                    i.path
                        .file_name()
                        .map_or_else(String::new, |n| n.to_string_lossy().to_string())
                })
                .collect::<Vec<_>>(),
        )?,
    );
    metadata.insert(
        "selma_merge_weights".to_string(),
        serde_json::to_string(&weights)?,
    );
    Ok(LoraFile {
        layers: out,
        metadata,
    })
}

/// Load every path (layout auto-detected) as f32 on the CPU.
pub fn load_inputs(paths: &[PathBuf]) -> Result<Vec<Input>> {
    paths
        .iter()
        .map(|p| {
            Ok(Input {
                path: p.clone(),
                file: LoraFile::load(p, &candle_core::Device::Cpu)?,
            })
        })
        .collect()
}

/// Build the experts of one layer as native views (for benchmarks and checks).
pub fn native_experts<'a>(experts: &'a [ExpertLayer]) -> Vec<Expert<'a>> {
    experts
        .iter()
        .map(|e| Expert {
            up: &e.up,
            down: &e.down,
            scale: e.scale,
            weight: e.weight,
        })
        .collect()
}
