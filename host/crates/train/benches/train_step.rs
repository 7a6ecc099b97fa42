//! Bench: one LoRA training step (forward + backward of the diffusion loss,
//! batch 1, default targets, f32, CPU) with the frozen-weight fast path on
//! and off, interleaved in one run. Model: the tiny preset (default), the
//! SD 1.5 architecture with random weights (`--preset sd15-random`), or a
//! diffusers folder (`--model DIR`).
//!
//! cargo bench -p selma-train --bench train_step -- [--preset tiny|sd15-random]
//!   [--model DIR (written with --preset if absent)] [--res 128] [--rank 4] [--iters 5] [--mode both|fast|slow]
//!   [--threads N (gemm threads, default: all CPUs)] [--elementwise-threads N (candle's barrier pool, default 1)]
//! Prints wall and process CPU seconds per step (CPU time is steadier on a
//! shared, loaded machine). scripts/bench/compare_train_step.sh runs this
//! and the PyTorch reference (scripts/bench/torch_train_step.py) interleaved.
//! `--conv-micro` times only the conv input-gradient kernels (see below).
//! Peak RSS (VmHWM) is printed at the end: run `--mode fast` and `--mode slow`
//! separately to compare peak memory.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use selma_diffusion::init::{init_model, Preset};
use selma_diffusion::nn::set_frozen_fast_path;
use selma_diffusion::pipeline::StableDiffusion;
use selma_train::lora::{LoraSet, DEFAULT_TARGETS};
use selma_train::rng::TrainRng;
use selma_train::trainer::diffusion_loss;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// User + system CPU seconds of this process (all threads), from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The input gradient of a stride-1 conv as a convolution of the output
/// gradient with the flipped, in/out-swapped kernel (padding k-1-p): the
/// GEMM path, against candle's `conv_transpose2d`.
fn conv_backward_micro() -> Result<()> {
    use selma_diffusion::nn::conv2d_gemm;
    let dev = Device::Cpu;
    let mut rng = TrainRng::new(1);
    for (c, hw) in [(320usize, 16usize), (640, 8), (1280, 4)] {
        let w = rng.randn((c, c, 3, 3), 0.02, &dev, DType::F32)?;
        let g = rng.randn((1, c, hw, hw), 1.0, &dev, DType::F32)?;
        let t0 = Instant::now();
        let a = g.conv_transpose2d(&w, 1, 0, 1, 1)?;
        let t_tr = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let rev = Tensor::from_vec(vec![2u32, 1, 0], 3, &dev)?;
        let wf = w
            .transpose(0, 1)?
            .contiguous()?
            .index_select(&rev, 2)?
            .index_select(&rev, 3)?
            .contiguous()?;
        let b = conv2d_gemm(&g, &wf, 1, 1)?;
        let t_gemm = t0.elapsed().as_secs_f64();
        let err = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        println!(
            "conv input-grad {c}ch {hw}x{hw} 3x3: conv_transpose2d {t_tr:.4} s, flipped conv2d_gemm {t_gemm:.4} s, max |diff| {err:.2e}"
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--conv-micro") {
        return conv_backward_micro();
    }
    let threads: Option<usize> = arg("--threads").map(|s| s.parse()).transpose()?;
    let ew: usize = arg("--elementwise-threads")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1);
    let threads = selma_diffusion::tuning::configure_cpu_threads(threads, Some(ew));
    let preset: Preset = arg("--preset").unwrap_or("tiny".into()).parse()?;
    let res: usize = arg("--res").map(|s| s.parse()).transpose()?.unwrap_or(128);
    let rank: usize = arg("--rank").map(|s| s.parse()).transpose()?.unwrap_or(4);
    let iters: usize = arg("--iters").map(|s| s.parse()).transpose()?.unwrap_or(5);
    let mode = arg("--mode").unwrap_or("both".into());
    let tmp = tempfile::tempdir()?;
    let model = match arg("--model") {
        // An existing diffusers folder, or a new one written with --preset.
        Some(m) => {
            let m = std::path::PathBuf::from(m);
            if !m.join("model_index.json").is_file() {
                init_model(preset, &m, 0)?;
            }
            m
        }
        None => {
            let m = tmp.path().join("model");
            init_model(preset, &m, 0)?;
            m
        }
    };
    let dev = Device::Cpu;
    let mut sd = StableDiffusion::load(&model, &dev, DType::F32)?;
    let mut rng = TrainRng::new(0);
    let targets: Vec<String> = DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect();
    let lora = LoraSet::attach(
        &mut sd.unet,
        "unet",
        &targets,
        rank,
        rank as f64,
        &mut rng,
        &dev,
        DType::F32,
    )?;
    let h = res / sd.vae_scale();
    let c = sd.unet.config().in_channels;
    let latents = rng.randn((1, c, h, h), 1.0, &dev, DType::F32)?;
    let noise = rng.randn((1, c, h, h), 1.0, &dev, DType::F32)?;
    let (context, _) = sd.encode_text("a photo of a cat")?;
    let sched = sd.scheduler_config.noise_schedule();
    let pred = sd.scheduler_config.prediction_type;
    let fwd_times = std::cell::RefCell::new(vec![]);
    let cpu_times = std::cell::RefCell::new(vec![]);
    let step = |fast: bool| -> Result<f64> {
        set_frozen_fast_path(fast);
        let c0 = cpu_seconds();
        let t0 = Instant::now();
        let loss: Tensor = diffusion_loss(
            &sd.unet,
            &sched,
            pred,
            None,
            &latents,
            &noise,
            &[500],
            &context,
            None,
        )?;
        fwd_times
            .borrow_mut()
            .push((fast, t0.elapsed().as_secs_f64()));
        let grads = loss.backward()?;
        let n = lora
            .vars()
            .iter()
            .filter(|v| grads.get(v.as_tensor()).is_some())
            .count();
        anyhow::ensure!(n == lora.vars().len(), "missing LoRA gradients");
        let wall = t0.elapsed().as_secs_f64();
        drop(grads);
        cpu_times.borrow_mut().push((fast, cpu_seconds() - c0));
        println!(
            "step_s {wall:.4} cpu_s {:.2} fast {fast}",
            cpu_seconds() - c0
        );
        Ok(wall)
    };
    println!(
        "model {} | {res}x{res} px, batch 1, rank {rank}, {} LoRA layers, f32 CPU, {iters} iters, \
         {threads} gemm threads, CANDLE_NUM_THREADS={}",
        model.display(),
        lora.layers.len(),
        std::env::var("CANDLE_NUM_THREADS").unwrap_or_default()
    );
    let modes: Vec<bool> = match mode.as_str() {
        "fast" => vec![true],
        "slow" => vec![false],
        _ => vec![true, false],
    };
    for &m in &modes {
        step(m)?; // warm-up
    }
    let mut times: Vec<Vec<f64>> = vec![vec![]; modes.len()];
    for _ in 0..iters {
        for (i, &m) in modes.iter().enumerate() {
            times[i].push(step(m)?);
        }
    }
    for (i, &m) in modes.iter().enumerate() {
        let name = if m {
            "fast path (no frozen-weight grads)"
        } else {
            "plain candle ops"
        };
        println!(
            "{name:38} median {:.4} s  min {:.4} s",
            median(times[i].clone()),
            times[i].iter().cloned().fold(f64::MAX, f64::min)
        );
    }
    for &m in &modes {
        let f: Vec<f64> = fwd_times
            .borrow()
            .iter()
            .filter(|(x, _)| *x == m)
            .map(|(_, t)| *t)
            .collect();
        println!(
            "  forward part ({}): median {:.4} s (the rest is backward)",
            if m { "fast" } else { "plain" },
            median(f)
        );
        let c: Vec<f64> = cpu_times
            .borrow()
            .iter()
            .filter(|(x, _)| *x == m)
            .skip(1) // warm-up
            .map(|(_, t)| *t)
            .collect();
        println!(
            "  process CPU time per step ({}): median {:.2} s",
            if m { "fast" } else { "plain" },
            median(c)
        );
    }
    if modes.len() == 2 {
        println!(
            "speed-up plain/fast: {:.2}x",
            median(times[1].clone()) / median(times[0].clone())
        );
    }
    if let Some(p) = peak_rss_mib() {
        println!("peak RSS {p:.0} MiB");
    }
    Ok(())
}
