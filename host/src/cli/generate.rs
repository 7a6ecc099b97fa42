//! `selma generate`: text-to-image from a diffusers model folder with our
//! own Stable Diffusion (SD 1.x / 2.x / XL), writing PNGs that carry the
//! generation parameters in a `parameters` text chunk.

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use selma_diffusion::image_io::{write_png, GenerationParams};
use selma_diffusion::pipeline::{
    load_latents_file, parse_device, parse_dtype, GenerateRequest, InitNoise, RgbImage,
    StableDiffusion,
};
use selma_diffusion::scheduler::{SamplerOptions, SchedulerKind};
use selma_runtime::{Runtime, RuntimeConfig};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Render images from a diffusers model folder.
///
/// Reads every config of the folder (model_index.json, unet/, vae/,
/// text_encoder/ [text_encoder_2/], tokenizer/ [tokenizer_2/], scheduler/)
/// and fp32/fp16/bf16 safetensors weights. With --seed S, image i of a batch
/// uses seed S+i (our own portable generator: same bytes on every machine).
/// With --latents FILE and --scheduler ddim --eta 0 the image is a
/// deterministic function of weights, prompt, latents, steps and guidance, as
/// in diffusers.
///
/// With --prompts FILE (one prompt per line) --out is a folder that receives
/// NNNNN.png and metadata.jsonl (file_name, text, seed: the dataset layout
/// the trainer and the image filters read); --verify PLUGIN then scores each
/// image against its prompt with an image-filter plugin and prints the pass
/// rate (e.g. --verify shapeworld-verifier).
///
/// Example: selma generate --model ./sd15 --prompt "a red cube" --seed 1 --out cube.png
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Diffusers model folder (holds model_index.json).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// The prompt.
    #[arg(long, short = 'p', required_unless_present = "prompts")]
    pub prompt: Option<String>,
    /// A file of prompts, one per line (blank lines and `#` lines skipped);
    /// --out is then an output folder.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["prompt", "latents"])]
    pub prompts: Option<PathBuf>,
    /// With --prompts: score every image with this image-filter plugin
    /// (bundled name or .wasm path, default parameters) and print the pass rate.
    #[arg(long, value_name = "PLUGIN", requires = "prompts")]
    pub verify: Option<String>,
    /// Negative prompt (the unconditional branch of guidance).
    #[arg(long, default_value = "", value_name = "TEXT")]
    pub negative: String,
    /// Number of denoising steps.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale (1 or less turns guidance off).
    #[arg(long, default_value_t = 7.5, value_name = "G")]
    pub guidance: f64,
    /// Sampler: ddim, euler, euler-a (ancestral) or dpm++2m.
    #[arg(long, default_value = "ddim", value_name = "NAME")]
    pub scheduler: SchedulerKind,
    /// Karras sigmas (euler, dpm++2m).
    #[arg(long)]
    pub karras: bool,
    /// DDIM eta: 0 is deterministic, 1 is DDPM-like.
    #[arg(long, default_value_t = 0.0, value_name = "E")]
    pub eta: f64,
    /// Seed of the initial noise (default: random, printed and stored in the PNG).
    #[arg(long, value_name = "S", conflicts_with = "latents")]
    pub seed: Option<u64>,
    /// Initial noise from a safetensors file with one tensor `latents` [1, 4, h/8, w/8].
    #[arg(long, value_name = "FILE")]
    pub latents: Option<PathBuf>,
    /// Image size (default: the UNet's sample_size times the VAE factor, e.g. 512x512).
    #[arg(long, value_name = "WxH")]
    pub size: Option<String>,
    /// A LoRA file (peft or kohya) with an optional weight, e.g. style.safetensors:0.8 (repeatable).
    #[arg(long = "lora", value_name = "FILE[:W]")]
    pub loras: Vec<String>,
    /// Merge the LoRAs into the base weights (faster) instead of runtime adapters.
    #[arg(long)]
    pub merge_lora: bool,
    /// Number of images (written as OUT-0.png, OUT-1.png, ...).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub batch: usize,
    /// Device: cpu or cuda:N (cuda needs a build with --features cuda).
    #[arg(long, default_value = "cpu", value_name = "DEV")]
    pub device: String,
    /// Precision of the UNet and text encoders: f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_name = "DTYPE")]
    pub dtype: String,
    /// Output PNG path (with --prompts: output folder).
    #[arg(long, short = 'o', value_name = "OUT.png")]
    pub out: PathBuf,
}

/// Read a prompts file: one prompt per line, blank and `#` lines skipped.
fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading prompts file {}", path.display()))?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    ensure!(
        !prompts.is_empty(),
        "prompts file {} has no prompts (one per line)",
        path.display()
    );
    Ok(prompts)
}

/// Parse `WxH`.
fn parse_size(s: &str) -> Result<(usize, usize)> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .with_context(|| format!("--size {s:?}: expected WxH, e.g. 512x512"))?;
    let w: usize = w
        .trim()
        .parse()
        .with_context(|| format!("--size {s:?}: bad width"))?;
    let h: usize = h
        .trim()
        .parse()
        .with_context(|| format!("--size {s:?}: bad height"))?;
    Ok((w, h))
}

/// Parse `FILE[:W]` (a trailing `:number` is the weight).
fn parse_lora(s: &str) -> Result<(PathBuf, f32)> {
    if let Some((path, w)) = s.rsplit_once(':') {
        if let Ok(w) = w.parse::<f32>() {
            ensure!(!path.is_empty(), "--lora {s:?}: missing file");
            return Ok((PathBuf::from(path), w));
        }
    }
    Ok((PathBuf::from(s), 1.0))
}

/// `out.png` for one image, `out-0.png`, `out-1.png`, ... for a batch.
fn out_path(out: &Path, i: usize, batch: usize) -> PathBuf {
    if batch == 1 {
        return out.to_path_buf();
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().to_string())
        .unwrap_or_else(|| "png".into());
    out.with_file_name(format!("{stem}-{i}.{ext}"))
}

/// Run `selma generate`.
pub fn run(a: GenerateArgs) -> Result<()> {
    ensure!(a.steps >= 1, "--steps must be at least 1");
    ensure!(a.batch >= 1, "--batch must be at least 1");
    ensure!(a.eta >= 0.0, "--eta must be >= 0");
    if let Some(parent) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        ensure!(
            parent.is_dir(),
            "output folder {} does not exist",
            parent.display()
        );
    }
    let prompts = a.prompts.as_deref().map(read_prompts).transpose()?;
    let device = parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype)?;
    let loras = a
        .loras
        .iter()
        .map(|s| parse_lora(s))
        .collect::<Result<Vec<_>>>()?;
    let latents = a.latents.as_deref().map(load_latents_file).transpose()?;

    let t0 = Instant::now();
    let mut sd = StableDiffusion::load(&a.model, &device, dtype)
        .with_context(|| format!("loading model folder {}", a.model.display()))?;
    for (path, w) in &loras {
        let file = selma_lora::LoraFile::load(path, &device)
            .with_context(|| format!("reading LoRA {}", path.display()))?;
        let n = sd
            .attach_lora(&file, *w)
            .with_context(|| format!("applying LoRA {}", path.display()))?;
        eprintln!("LoRA {} (weight {w}): {n} layers", path.display());
    }
    if a.merge_lora && !loras.is_empty() {
        sd.merge_adapters()?;
    }
    eprintln!(
        "loaded {:?} model from {} in {:.1}s",
        sd.family,
        a.model.display(),
        t0.elapsed().as_secs_f64()
    );

    let f = sd.vae_scale();
    let (width, height) = match &a.size {
        Some(s) => parse_size(s)?,
        None => {
            let s = sd.unet.config().sample_size.unwrap_or(64) * f;
            (s, s)
        }
    };
    if !width.is_multiple_of(f) || !height.is_multiple_of(f) {
        bail!("--size {width}x{height}: both sides must be multiples of {f}");
    }
    // With --latents, stochastic samplers (euler-a, DDIM eta > 0) draw their
    // fresh noise from seed 0, so the run stays reproducible.
    let seed = match (a.seed, &a.latents) {
        (Some(s), _) => s,
        (None, Some(_)) => 0,
        (None, None) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000_000)
            .unwrap_or(0),
    };
    if let Some(prompts) = prompts {
        let base = GenerateRequest {
            prompt: String::new(),
            negative: a.negative.clone(),
            steps: a.steps,
            guidance: a.guidance,
            scheduler: a.scheduler,
            sampler: SamplerOptions {
                eta: a.eta,
                karras: a.karras.then_some(true),
            },
            width,
            height,
            batch: a.batch,
            init: InitNoise::Seed(seed),
            noise_seed: seed,
        };
        return run_prompts(&a, &sd, &prompts, base, seed);
    }
    let init = match latents {
        Some(t) => InitNoise::Latents(t),
        None => {
            if a.seed.is_none() {
                eprintln!("seed: {seed}");
            }
            InitNoise::Seed(seed)
        }
    };
    let req = GenerateRequest {
        prompt: a.prompt.clone().unwrap_or_default(),
        negative: a.negative.clone(),
        steps: a.steps,
        guidance: a.guidance,
        scheduler: a.scheduler,
        sampler: SamplerOptions {
            eta: a.eta,
            karras: a.karras.then_some(true),
        },
        width,
        height,
        batch: a.batch,
        init,
        noise_seed: seed,
    };

    let bar = ProgressBar::new(a.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{bar:30}] {elapsed_precise} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let t1 = Instant::now();
    let images = sd.generate(&req, &mut |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    let secs = t1.elapsed().as_secs_f64();

    let model_name = model_name(&a.model);
    for (i, img) in images.iter().enumerate() {
        let params = png_params(
            &a,
            &req.prompt,
            a.latents.is_none().then_some(seed + i as u64),
            img,
            &model_name,
        );
        let path = out_path(&a.out, i, images.len());
        write_png(&path, img.width, img.height, &img.pixels, &params.to_text())?;
        println!("{}", path.display());
    }
    eprintln!(
        "{} image(s) {width}x{height}, {} steps, {:.2}s ({:.3}s/step)",
        images.len(),
        a.steps,
        secs,
        secs / a.steps as f64
    );
    Ok(())
}

/// The folder name of the model, for the PNG parameters.
fn model_name(model: &Path) -> String {
    model
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
        .unwrap_or_else(|| model.display().to_string())
}

/// The generation parameters stored in a PNG's `parameters` chunk.
fn png_params(
    a: &GenerateArgs,
    prompt: &str,
    seed: Option<u64>,
    img: &RgbImage,
    model: &str,
) -> GenerationParams {
    let mut extra = vec![];
    if a.scheduler == SchedulerKind::Ddim && a.eta > 0.0 {
        extra.push(("Eta".to_string(), a.eta.to_string()));
    }
    if let Some(p) = &a.latents {
        extra.push(("Latents".to_string(), p.display().to_string()));
    }
    for s in &a.loras {
        if let Ok((p, w)) = parse_lora(s) {
            extra.push(("Lora".to_string(), format!("{}:{w}", p.display())));
        }
    }
    extra.push(("Dtype".to_string(), a.dtype.clone()));
    GenerationParams {
        prompt: prompt.to_string(),
        negative: a.negative.clone(),
        steps: a.steps,
        sampler: if a.karras {
            format!("{} karras", a.scheduler)
        } else {
            a.scheduler.to_string()
        },
        guidance: a.guidance,
        seed,
        size: (img.width, img.height),
        model: model.to_string(),
        extra,
    }
}

/// One line of the `--prompts` mode's metadata.jsonl.
#[derive(Debug, Serialize)]
struct MetaLine {
    file_name: String,
    text: String,
    seed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    score: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keep: Option<bool>,
}

/// `--prompts` mode: prompt `i` uses seeds `seed + i * batch + k`; images
/// `NNNNN.png` and `metadata.jsonl` go into the folder `a.out`.
fn run_prompts(
    a: &GenerateArgs,
    sd: &StableDiffusion,
    prompts: &[String],
    base: GenerateRequest,
    seed: u64,
) -> Result<()> {
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("creating output folder {}", a.out.display()))?;
    let mut verifier = match &a.verify {
        Some(spec) => {
            let rt = Runtime::new(RuntimeConfig {
                log_to_stderr: false,
                ..RuntimeConfig::default()
            })?;
            let p = rt
                .image_filter(spec)
                .with_context(|| format!("loading the --verify plugin {spec:?}"))?;
            let params = p.default_params();
            Some((rt, p, params))
        }
        None => None,
    };
    let model = model_name(&a.model);
    let bar = ProgressBar::new((prompts.len() * a.batch) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} image {pos}/{len} [{bar:30}] {elapsed_precise} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let t0 = Instant::now();
    let mut lines = Vec::with_capacity(prompts.len() * a.batch);
    for (i, prompt) in prompts.iter().enumerate() {
        let s0 = seed + (i * a.batch) as u64;
        let req = GenerateRequest {
            prompt: prompt.clone(),
            init: InitNoise::Seed(s0),
            noise_seed: s0,
            ..base.clone()
        };
        let images = sd
            .generate(&req, &mut |_, _| {})
            .with_context(|| format!("generating {prompt:?}"))?;
        for (k, img) in images.iter().enumerate() {
            let n = i * a.batch + k;
            let file_name = format!("{n:05}.png");
            let s = s0 + k as u64;
            let params = png_params(a, prompt, Some(s), img, &model);
            write_png(
                &a.out.join(&file_name),
                img.width,
                img.height,
                &img.pixels,
                &params.to_text(),
            )?;
            let (score, keep) = match &mut verifier {
                Some((_, p, params)) => {
                    let v = p.check(
                        &selma_runtime::RgbImage {
                            width: img.width as u32,
                            height: img.height as u32,
                            pixels: img.pixels.clone(),
                            non_finite: 0.0,
                        },
                        prompt,
                        params,
                    )?;
                    (Some(v.score), Some(v.keep))
                }
                None => (None, None),
            };
            lines.push(MetaLine {
                file_name,
                text: prompt.clone(),
                seed: s,
                score,
                keep,
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    selma_io::write_jsonl(&a.out.join("metadata.jsonl"), &lines)?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "{} image(s) of {} prompt(s) in {:.1}s ({:.3}s/image) into {}",
        lines.len(),
        prompts.len(),
        secs,
        secs / lines.len() as f64,
        a.out.display()
    );
    if let Some((_, p, _)) = &verifier {
        let kept = lines.iter().filter(|l| l.keep == Some(true)).count();
        let mean = lines
            .iter()
            .filter_map(|l| l.score)
            .map(f64::from)
            .sum::<f64>()
            / lines.len() as f64;
        println!(
            "verified by {}: {kept}/{} passed ({:.3}), mean score {mean:.3}",
            p.name(),
            lines.len(),
            kept as f64 / lines.len() as f64
        );
    }
    Ok(())
}
