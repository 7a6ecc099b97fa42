//! Benchmark: merging 5 rank-128 experts over every SD 1.5 UNet attention
//! projection (to_q, to_k, to_v, to_out.0 of all 32 attentions: 128 layers,
//! shapes from benches/data/sd15_unet_attn.txt, copied from the SD 1.5 key
//! list) with `ties` through the bundled WebAssembly plugin vs the same maths
//! natively (`selma_lora::native`), side by side.
//!
//! Run: `cargo bench -p selma --bench merge` (full) or
//!      `cargo bench -p selma --bench merge -- --quick` (16 layers, rank 32).
//! Options: `--layers N`, `--rank R`, `--experts K`, `--density D`,
//! `--no-svd` (skip timing the host's SVD re-factoring step), `--driver`
//! (also time the whole merge driver, `selma::merge::merge`, both ways:
//! strategy plus SVD re-factoring on worker threads).
//!
//! Per layer the two paths run back to back on the same inputs (generated
//! outside the timed region from a seeded RNG); their results are compared.
//! Reported: strategy wall time per path and their ratio (goal <= 1.2), plus
//! the SVD re-factoring to rank R that the merge driver applies to both.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use selma::merge::{native_experts, Input, MergeOptions, NativeMerger, PluginMerger};
use selma_lora::native;
use selma_lora::ops;
use selma_lora::rng::SplitMix64;
use selma_lora::{LoraFile, LoraLayer};
use selma_runtime::{ExpertLayer, MergedLayer, Runtime, RuntimeConfig};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const LAYERS: &str = include_str!("data/sd15_unet_attn.txt");

/// (module, out, in) from "module [out, in]" lines.
fn layers() -> Result<Vec<(String, usize, usize)>> {
    LAYERS
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (name, shape) = l.split_once(' ').context("line without shape")?;
            let dims: Vec<usize> = shape
                .trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .map(|d| d.trim().parse())
                .collect::<Result<_, _>>()?;
            if dims.len() != 2 {
                bail!("{name}: want a 2-D shape, got {shape}");
            }
            Ok((format!("unet.{name}"), dims[0], dims[1]))
        })
        .collect()
}

fn random(rows: usize, cols: usize, std: f64, rng: &mut SplitMix64) -> Result<Tensor> {
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| ((rng.next_f64() * 2.0 - 1.0) * std) as f32)
        .collect();
    Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
}

fn experts(out: usize, inp: usize, rank: usize, k: usize, seed: u64) -> Result<Vec<ExpertLayer>> {
    let mut rng = SplitMix64::new(seed);
    (0..k)
        .map(|_| {
            Ok(ExpertLayer {
                up: random(out, rank, 0.01, &mut rng)?,
                down: random(rank, inp, 0.05, &mut rng)?,
                scale: 1.0,
                weight: 1.0 / k as f32,
            })
        })
        .collect()
}

fn delta(m: &MergedLayer) -> Result<Tensor> {
    Ok(match m {
        MergedLayer::Factors { up, down } => up.matmul(down)?,
        MergedLayer::Delta(d) => d.clone(),
    })
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let opt = |name: &str| -> Option<&str> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|s| s.as_str())
    };
    let all = layers()?;
    let n_layers: usize =
        opt("--layers").map_or(Ok(if quick { 16 } else { all.len() }), str::parse)?;
    let rank: usize = opt("--rank").map_or(Ok(if quick { 32 } else { 128 }), str::parse)?;
    let k: usize = opt("--experts").map_or(Ok(5), str::parse)?;
    let density: f32 = opt("--density").map_or(Ok(0.2), str::parse)?;
    let with_svd = !args.iter().any(|a| a == "--no-svd");
    // Spread a reduced run over all block sizes (every n-th layer).
    let step = (all.len() / n_layers.max(1)).max(1);
    let chosen: Vec<_> = all.iter().step_by(step).take(n_layers).cloned().collect();

    let runtime = Runtime::new(RuntimeConfig {
        call_timeout: Duration::from_secs(600),
        log_to_stderr: false,
        ..RuntimeConfig::default()
    })?;
    let mut plugin = runtime.merge_strategy("ties").context(
        "loading the bundled ties plugin (build with the plugins, not SELMA_SKIP_BUNDLED)",
    )?;
    let params = plugin.params(&[("density".into(), density.to_string())])?;
    let mut strategy = native::Strategy::parse("ties", &[("density".into(), density.to_string())])?;

    // Warm up both paths (instantiation, allocator) on a small layer.
    {
        let ex = experts(64, 64, 8, k, 0)?;
        plugin.merge_layer("warmup", &ex, None, &params)?;
        strategy.merge_layer("warmup", &native_experts(&ex), None)?;
    }

    println!(
        "ties merge: {k} experts, rank {rank}, density {density}, {} layers{}",
        chosen.len(),
        if quick { " (quick mode)" } else { "" }
    );
    let (mut t_plugin, mut t_native, mut t_svd) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut max_diff = 0f32;
    let wall = Instant::now();
    for (i, (name, out, inp)) in chosen.iter().enumerate() {
        let ex = experts(*out, *inp, rank, k, 1000 + i as u64)?;
        // Alternate which path goes first, to cancel cache/turbo effects.
        let (p, n);
        if i % 2 == 0 {
            let t0 = Instant::now();
            p = plugin.merge_layer(name, &ex, None, &params)?;
            t_plugin += t0.elapsed();
            let t0 = Instant::now();
            n = strategy.merge_layer(name, &native_experts(&ex), None)?;
            t_native += t0.elapsed();
        } else {
            let t0 = Instant::now();
            n = strategy.merge_layer(name, &native_experts(&ex), None)?;
            t_native += t0.elapsed();
            let t0 = Instant::now();
            p = plugin.merge_layer(name, &ex, None, &params)?;
            t_plugin += t0.elapsed();
        }
        let dn = n.to_delta()?;
        let diff = (delta(&p)? - &dn)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        max_diff = max_diff.max(diff);
        if with_svd {
            let t0 = Instant::now();
            let _ = ops::svd_factors(&dn, rank)?;
            t_svd += t0.elapsed();
        }
    }
    let total = wall.elapsed();
    let ratio = secs(t_plugin) / secs(t_native);
    println!("  plugin (wasm ties):    {:8.3} s", secs(t_plugin));
    println!("  native (Rust ties):    {:8.3} s", secs(t_native));
    println!("  ratio plugin/native:   {ratio:8.3}  (goal <= 1.2)");
    if with_svd {
        let full = (secs(t_plugin) + secs(t_svd)) / (secs(t_native) + secs(t_svd));
        println!(
            "  SVD re-factor to r={rank}: {:8.3} s (same for both paths)",
            secs(t_svd)
        );
        println!("  ratio incl. re-factor: {full:8.3}");
    }
    println!("  max |plugin - native|: {max_diff:.3e}");
    println!("  wall time:             {:8.3} s", secs(total));
    if max_diff > 1e-4 {
        bail!("plugin and native results differ by {max_diff}");
    }
    if args.iter().any(|a| a == "--driver") {
        driver(&runtime, &chosen, rank, k, density)?;
    }
    Ok(())
}

/// Time `selma::merge::merge` end to end (in-memory inputs), plugin vs native.
fn driver(
    runtime: &Runtime,
    chosen: &[(String, usize, usize)],
    rank: usize,
    k: usize,
    density: f32,
) -> Result<()> {
    let mut inputs: Vec<Input> = (0..k)
        .map(|e| Input {
            path: format!("expert{e}.safetensors").into(),
            file: LoraFile {
                layers: BTreeMap::new(),
                metadata: BTreeMap::new(),
            },
        })
        .collect();
    for (i, (name, out, inp)) in chosen.iter().enumerate() {
        for (e, x) in experts(*out, *inp, rank, k, 1000 + i as u64)?
            .into_iter()
            .enumerate()
        {
            let l = LoraLayer::new(x.up, x.down, rank as f32)?;
            inputs[e].file.layers.insert(name.clone(), l);
        }
    }
    let params = [("density".to_string(), density.to_string())];
    let opts = MergeOptions {
        weights: None,
        rank: Some(rank),
        progress: false,
    };
    let mut plugin = PluginMerger::new(runtime.merge_strategy("ties")?, &params)?;
    let t0 = Instant::now();
    let a = selma::merge::merge(&inputs, &mut plugin, &opts)?;
    let t_plugin = t0.elapsed();
    let mut native = NativeMerger::new("ties", &params)?;
    let t0 = Instant::now();
    let b = selma::merge::merge(&inputs, &mut native, &opts)?;
    let t_native = t0.elapsed();
    let mut max_diff = 0f32;
    for (name, la) in &a.layers {
        let d = (la.delta()? - b.layers[name].delta()?)?;
        max_diff = max_diff.max(d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?);
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    println!("merge driver (ties + SVD to rank {rank} on {threads} worker threads):");
    println!("  plugin:                {:8.3} s", secs(t_plugin));
    println!("  native:                {:8.3} s", secs(t_native));
    println!(
        "  ratio plugin/native:   {:8.3}",
        secs(t_plugin) / secs(t_native)
    );
    println!("  max |plugin - native| of merged deltas: {max_diff:.3e}");
    Ok(())
}
