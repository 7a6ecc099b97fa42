//! One classifier-free-guidance denoising step (UNet on batch 2, then the
//! guidance mix) of the SD 1.5 architecture (real config and key list, seeded
//! random weights) at 128x128 px (16x16 latents), f32 on CPU: ours against
//! candle-transformers' UNet on the same weights. Each implementation runs in
//! its own child process so its peak memory (VmHWM) is its own.
//!
//! `cargo bench -p selma-diffusion --bench unet_step`
//! Env: `UNET_BENCH_ITERS` (timed steps, default 5), `UNET_BENCH_PX` (image
//! side in pixels, default 128), `UNET_BENCH_ONLY` (`ours` or `theirs`).

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::stable_diffusion::unet_2d as reference;
use selma_diffusion::unet::{UNet2DConditionModel, UNetConfig};
use selma_diffusion::weights::{MemorySource, ShapeOnlySource, TensorSource, Vb};

const GUIDANCE: f64 = 7.5;

// The real SD 1.5 UNet layout, embedded so the binary runs from any directory.
const SD15_KEYS: &str = include_str!("../tests/fixtures/sd-layouts/sd15/unet/keys.txt");
const SD15_CONFIG: &str = include_str!("../tests/fixtures/sd-layouts/sd15/unet/config.json");

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// SplitMix64 stream: uniform f32 in [-1, 1).
fn fill_uniform(out: &mut [f32], seed: u64, scale: f32, offset: f32) {
    let mut r = selma_rng::SplitMix64::new(seed);
    for v in out.iter_mut() {
        *v = offset + scale * ((r.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0);
    }
}

/// Seeded random weights for every key of the SD 1.5 UNet (uniform with the
/// variance of a fan-in init; norms around 1), generated on all cores.
fn random_weights() -> Result<HashMap<String, Tensor>> {
    let src = ShapeOnlySource::parse(SD15_KEYS, "sd15/unet/keys.txt")?;
    let keys = src.keys();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunks: Vec<Vec<(usize, String)>> = (0..threads)
        .map(|t| {
            keys.iter()
                .enumerate()
                .filter(|(i, _)| i % threads == t)
                .map(|(i, k)| (i, k.clone()))
                .collect()
        })
        .collect();
    let mut out = HashMap::new();
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = chunks
            .iter()
            .map(|chunk| {
                let src = &src;
                scope.spawn(move || -> Result<Vec<(String, Tensor)>> {
                    let mut v = Vec::with_capacity(chunk.len());
                    for (i, k) in chunk {
                        let shape = src.shape(k).context("shape")?;
                        let n: usize = shape.iter().product();
                        let mut data = vec![0f32; n];
                        let (scale, offset) = if shape.len() >= 2 {
                            let fan_in: usize = shape[1..].iter().product();
                            ((3.0 / fan_in as f32).sqrt(), 0.0)
                        } else if k.contains("norm") && k.ends_with("weight") {
                            (0.1, 1.0)
                        } else {
                            (0.05, 0.0)
                        };
                        fill_uniform(&mut data, 0x5EED ^ (*i as u64) << 20, scale, offset);
                        v.push((k.clone(), Tensor::from_vec(data, shape, &Device::Cpu)?));
                    }
                    Ok(v)
                })
            })
            .collect();
        for h in handles {
            out.extend(h.join().expect("weight thread panicked")?);
        }
        Ok(())
    })?;
    Ok(out)
}

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn cfg_mix(pred: &Tensor) -> Result<Tensor> {
    let uncond = pred.narrow(0, 0, 1)?;
    let text = pred.narrow(0, 1, 1)?;
    Ok((&uncond + ((text - &uncond)? * GUIDANCE)?)?)
}

fn child(which: &str) -> Result<()> {
    let iters = env_usize("UNET_BENCH_ITERS", 5);
    let px = env_usize("UNET_BENCH_PX", 128);
    let lat = px / 8;
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let weights = random_weights()?;
    let gen_s = t0.elapsed().as_secs_f64();
    let rss_weights = status_kib("VmRSS:");
    let config = UNetConfig::from_json_str(SD15_CONFIG)?;

    // Inputs: one latent duplicated for CFG, uncond + text contexts.
    let mut buf = vec![0f32; 4 * lat * lat];
    fill_uniform(&mut buf, 1, 1.7, 0.0);
    let latent = Tensor::from_vec(buf, (1, 4, lat, lat), &dev)?;
    let sample = Tensor::cat(&[&latent, &latent], 0)?;
    let ctx_dim = config.cross_attention_dim[0];
    let mut buf = vec![0f32; 2 * 77 * ctx_dim];
    fill_uniform(&mut buf, 2, 1.7, 0.0);
    let context = Tensor::from_vec(buf, (2, 77, ctx_dim), &dev)?;
    let t = 500.0;

    let step: Box<dyn Fn() -> Result<Tensor>> = match which {
        "ours" => {
            let vb = Vb::new(
                Arc::new(MemorySource::new(weights, "random")),
                DType::F32,
                &dev,
            );
            let unet = UNet2DConditionModel::load(&vb, &config)?;
            anyhow::ensure!(vb.unused_keys().is_empty(), "unused keys");
            let ts = Tensor::new(&[t as f32, t as f32], &dev)?;
            Box::new(move || cfg_mix(&unet.forward(&sample, &ts, &context, None)?))
        }
        "theirs" => {
            let blocks = config
                .block_out_channels
                .iter()
                .enumerate()
                .map(|(i, &c)| reference::BlockConfig {
                    out_channels: c,
                    use_cross_attn: (config.down_block_types[i]
                        == selma_diffusion::unet::BlockKind::CrossAttn)
                        .then_some(1),
                    attention_head_dim: config.num_attention_heads[i],
                })
                .collect();
            let rcfg = reference::UNet2DConditionModelConfig {
                blocks,
                layers_per_block: config.layers_per_block[0],
                cross_attention_dim: ctx_dim,
                norm_num_groups: config.norm_num_groups,
                norm_eps: config.norm_eps,
                use_linear_projection: config.use_linear_projection,
                ..Default::default()
            };
            let vs = candle_nn::VarBuilder::from_tensors(weights, DType::F32, &dev);
            let unet = reference::UNet2DConditionModel::new(vs, 4, 4, false, rcfg)?;
            Box::new(move || cfg_mix(&unet.forward(&sample, t, &context)?))
        }
        other => anyhow::bail!("unknown implementation {other}"),
    };
    // Warm-up, then timed steps.
    let w = Instant::now();
    let out = step()?;
    let warm_ms = w.elapsed().as_secs_f64() * 1e3;
    let checksum = out.abs()?.mean_all()?.to_scalar::<f32>()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let s = Instant::now();
        let o = step()?;
        o.sum_all()?.to_scalar::<f32>()?;
        times.push(s.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = times[times.len() / 2];
    let min = times[0];
    println!(
        "RESULT {which} median_ms={median:.1} min_ms={min:.1} warmup_ms={warm_ms:.1} \
         rss_weights_mib={} peak_mib={} gen_s={gen_s:.1} mean_abs_out={checksum:.6}",
        rss_weights / 1024,
        status_kib("VmHWM:") / 1024
    );
    Ok(())
}

fn parse(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        return child(args.get(i + 1).map(String::as_str).unwrap_or(""));
    }
    let exe = std::env::current_exe()?;
    let px = env_usize("UNET_BENCH_PX", 128);
    let only = std::env::var("UNET_BENCH_ONLY").ok();
    println!(
        "unet_step: SD 1.5 UNet (random weights), CFG step on batch 2, {px}x{px} px, f32 CPU, {} threads",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let mut results = HashMap::new();
    for which in ["theirs", "ours"] {
        if only.as_deref().is_some_and(|o| o != which) {
            continue;
        }
        let out = Command::new(&exe).args(["--child", which]).output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        anyhow::ensure!(
            out.status.success(),
            "{which} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = text
            .lines()
            .find(|l| l.starts_with("RESULT"))
            .context("no RESULT line")?
            .to_string();
        println!("{line}");
        results.insert(which, line);
    }
    if let (Some(o), Some(t)) = (results.get("ours"), results.get("theirs")) {
        let (om, tm) = (
            parse(o, "median_ms").unwrap(),
            parse(t, "median_ms").unwrap(),
        );
        let (oa, ta) = (
            parse(o, "mean_abs_out").unwrap(),
            parse(t, "mean_abs_out").unwrap(),
        );
        println!(
            "ratio ours/theirs (median step time) = {:.3}  (goal <= 0.9); outputs mean|y| {oa:.6} vs {ta:.6}",
            om / tm
        );
    }
    Ok(())
}
