//! Loading a diffusers model folder (SD 1.x / 2.x / XL: `model_index.json`,
//! `unet/`, `vae/`, `text_encoder/` [`text_encoder_2/`], `tokenizer/`
//! [`tokenizer_2/`], `scheduler/`; every config read, fp32/fp16/bf16 weights)
//! and the text-to-image sampling loop: prompt encoding, classifier-free
//! guidance with negative prompts, SDXL micro-conditioning, seeded or
//! file-supplied initial noise, any of our schedulers, VAE decoding.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::codec::{codec_class, Vae};
use crate::nn::merge_all_adapters;
use crate::scheduler::{
    self, BatchNoise, GaussianRng, SamplerOptions, SchedulerConfig, SchedulerKind,
};
use crate::tokenizer::ClipTokenizer;
use crate::unet::{SdxlAdded, UNet2DConditionModel, UNetConfig};
use crate::vae::to_rgb8;
use crate::weights::Vb;

/// The model family, from `model_index.json` and the configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Stable Diffusion 1.x (CLIP-L, epsilon).
    Sd1,
    /// Stable Diffusion 2.x (OpenCLIP-H, linear projections, often v-prediction).
    Sd2,
    /// Stable Diffusion XL base (two text encoders, pooled embeds, time ids).
    Sdxl,
}

/// Parse a device name: `cpu` or `cuda:N` (`cuda` = `cuda:0`).
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let idx = s.strip_prefix("cuda:").unwrap_or("0");
            let i: usize = idx
                .parse()
                .with_context(|| format!("bad device {s:?}: use cpu or cuda:N"))?;
            Device::new_cuda(i).with_context(|| {
                format!("cannot open {s}: is this binary built with `--features cuda` and is a GPU present?")
            })
        }
        o => bail!("unknown device {o:?}: use cpu or cuda:N"),
    }
}

/// Parse a dtype name: `f32`, `f16`, `bf16`.
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "f16" | "fp16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        o => bail!("unknown dtype {o:?}: use f32, f16 or bf16"),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// A loaded diffusers pipeline.
pub struct StableDiffusion {
    /// The model folder.
    pub dir: PathBuf,
    /// SD 1.x, 2.x or XL.
    pub family: Family,
    /// The denoiser.
    pub unet: UNet2DConditionModel,
    /// The latent codec (`AutoencoderKL` or pixel-unshuffle).
    pub vae: Vae,
    /// Text encoder 1.
    pub text_encoder: ClipTextModel,
    /// SDXL's second text encoder (with projection).
    pub text_encoder_2: Option<ClipTextModel>,
    /// Tokenizer 1.
    pub tokenizer: ClipTokenizer,
    /// SDXL's second tokenizer.
    pub tokenizer_2: Option<ClipTokenizer>,
    /// `scheduler/scheduler_config.json`.
    pub scheduler_config: SchedulerConfig,
    /// SDXL: an empty negative prompt means zero embeddings.
    pub force_zeros_for_empty_prompt: bool,
    device: Device,
    dtype: DType,
}

/// Where the initial noise comes from.
#[derive(Debug, Clone)]
pub enum InitNoise {
    /// Seeded: batch element `i` uses seed `seed + i`.
    Seed(u64),
    /// From a tensor `[1 or B, C, h, w]` (e.g. `--latents FILE`), scaled by the
    /// scheduler's `init_noise_sigma` as diffusers does.
    Latents(Tensor),
}

/// One text-to-image request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Prompt.
    pub prompt: String,
    /// Negative prompt ("" for none).
    pub negative: String,
    /// Inference steps.
    pub steps: usize,
    /// Classifier-free guidance scale (<= 1 disables guidance).
    pub guidance: f64,
    /// Sampler.
    pub scheduler: SchedulerKind,
    /// eta / Karras overrides.
    pub sampler: SamplerOptions,
    /// Image width in pixels (a multiple of 8).
    pub width: usize,
    /// Image height in pixels (a multiple of 8).
    pub height: usize,
    /// Number of images.
    pub batch: usize,
    /// Initial noise.
    pub init: InitNoise,
    /// Seed of the fresh noise of stochastic samplers (with `InitNoise::Latents`).
    pub noise_seed: u64,
}

/// How a batch of several prompts is sampled: everything of a
/// [`GenerateRequest`] but the prompts and the noise.
#[derive(Debug, Clone)]
pub struct Sampling {
    /// Negative prompt of every image ("" for none).
    pub negative: String,
    /// Inference steps.
    pub steps: usize,
    /// Classifier-free guidance scale (<= 1 disables guidance).
    pub guidance: f64,
    /// Sampler.
    pub scheduler: SchedulerKind,
    /// eta / Karras overrides.
    pub sampler: SamplerOptions,
    /// Image width in pixels (a multiple of the codec's factor).
    pub width: usize,
    /// Image height in pixels (a multiple of the codec's factor).
    pub height: usize,
}

/// A generated image, 8-bit RGB, row-major.
#[derive(Debug, Clone)]
pub struct RgbImage {
    /// Width.
    pub width: usize,
    /// Height.
    pub height: usize,
    /// `width * height * 3` bytes.
    pub pixels: Vec<u8>,
}

/// Prompt conditioning for the UNet (unconditional first when guided).
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `[B or 2B, tokens, cross_attention_dim]`.
    pub context: Tensor,
    /// SDXL pooled text embeds `[B or 2B, dim]`.
    pub pooled: Option<Tensor>,
}

/// Read a `--latents` file: a safetensors file with one tensor `latents`.
pub fn load_latents_file(path: &Path) -> Result<Tensor> {
    let map = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading latents file {}", path.display()))?;
    let t = map.get("latents").with_context(|| {
        format!(
            "{} has no tensor named \"latents\" (found: {})",
            path.display(),
            map.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    ensure!(
        t.rank() == 4,
        "{}: \"latents\" must be [1, C, h/f, w/f] (4 channels and f = 8 for SD), got {:?}",
        path.display(),
        t.dims()
    );
    Ok(t.to_dtype(DType::F32)?)
}

/// `model_index.json`'s `"vae": [library, class]` must agree with
/// `vae/config.json`'s `_class_name` when both name a class.
fn check_codec_entry(dir: &Path, index: &Value, vae_dir: &Path) -> Result<()> {
    let declared = index
        .get("vae")
        .and_then(|v| v.as_array())
        .and_then(|a| a.get(1))
        .and_then(|c| c.as_str());
    let cfg = read_json(&vae_dir.join("config.json"))?;
    let actual = codec_class(&cfg);
    if let Some(d) = declared {
        ensure!(
            d == actual,
            "{}/model_index.json names the vae {d:?} but vae/config.json declares {actual:?}; make them agree",
            dir.display()
        );
    }
    Ok(())
}

fn model_index_class(dir: &Path) -> Result<(String, Value)> {
    let p = dir.join("model_index.json");
    ensure!(
        p.is_file(),
        "{} is not a diffusers model folder: {} is missing",
        dir.display(),
        p.display()
    );
    let v = read_json(&p)?;
    let class = v
        .get("_class_name")
        .and_then(|c| c.as_str())
        .with_context(|| format!("{}: no \"_class_name\"", p.display()))?
        .to_string();
    Ok((class, v))
}

impl StableDiffusion {
    /// Load every part of the diffusers folder `dir` in `dtype` on `device`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let (class, index) = model_index_class(dir)?;
        let sub = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            ensure!(p.is_dir(), "{}: missing the {name}/ folder", dir.display());
            Ok(p)
        };
        let is_xl = class.contains("XL") || dir.join("text_encoder_2").is_dir();
        ensure!(
            class.starts_with("StableDiffusion"),
            "{}/model_index.json: pipeline class {class:?} is not a Stable Diffusion text-to-image pipeline",
            dir.display()
        );

        let unet_dir = sub("unet")?;
        let unet_cfg = UNetConfig::from_file(&unet_dir.join("config.json"))?;
        let unet_vb = Vb::from_dir(&unet_dir, dtype, device)?;
        let unet = UNet2DConditionModel::load(&unet_vb, &unet_cfg)
            .with_context(|| format!("building the UNet from {}", unet_dir.display()))?;
        unet_vb
            .check_fully_used()
            .with_context(|| format!("loading {}", unet_dir.display()))?;

        let vae_dir = sub("vae")?;
        check_codec_entry(dir, &index, &vae_dir)?;
        let vae = Vae::load_dir(&vae_dir, dtype, device)?;
        ensure!(
            vae.latent_channels() == unet_cfg.in_channels,
            "{}: the {} codec makes {} latent channels but unet/config.json has in_channels {}",
            dir.display(),
            vae.class_name(),
            vae.latent_channels(),
            unet_cfg.in_channels
        );

        let load_te = |name: &str| -> Result<ClipTextModel> {
            let d = sub(name)?;
            let cfg = ClipTextConfig::from_file(&d.join("config.json"))?;
            let vb = Vb::from_dir(&d, dtype, device)?;
            let m = ClipTextModel::load(&vb, &cfg)
                .with_context(|| format!("building the text encoder from {}", d.display()))?;
            vb.check_fully_used()
                .with_context(|| format!("loading {}", d.display()))?;
            Ok(m)
        };
        let text_encoder = load_te("text_encoder")?;
        let tokenizer = ClipTokenizer::from_dir(&sub("tokenizer")?)?;
        let (text_encoder_2, tokenizer_2) = if is_xl {
            (
                Some(load_te("text_encoder_2")?),
                Some(ClipTokenizer::from_dir(&sub("tokenizer_2")?)?),
            )
        } else {
            (None, None)
        };
        let scheduler_config =
            SchedulerConfig::from_file(&sub("scheduler")?.join("scheduler_config.json"))?;
        let family = if is_xl {
            Family::Sdxl
        } else if text_encoder.hidden_size() == 1024
            || unet_cfg.cross_attention_dim.first() == Some(&1024)
        {
            Family::Sd2
        } else {
            Family::Sd1
        };
        let force_zeros_for_empty_prompt = index
            .get("force_zeros_for_empty_prompt")
            .and_then(|v| v.as_bool())
            .unwrap_or(is_xl);
        Ok(Self {
            dir: dir.to_path_buf(),
            family,
            unet,
            vae,
            text_encoder,
            text_encoder_2,
            tokenizer,
            tokenizer_2,
            scheduler_config,
            force_zeros_for_empty_prompt,
            device: device.clone(),
            dtype,
        })
    }

    /// The device the model lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the UNet and text encoders.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Spatial factor between pixels and latents.
    pub fn vae_scale(&self) -> usize {
        self.vae.downscale()
    }

    /// Attach a LoRA file as runtime adapters (each layer keeps its own
    /// weight) to the UNet and text encoders; returns the layers adapted.
    /// Errors if the file adapts nothing of this model.
    pub fn attach_lora(&mut self, file: &selma_lora::LoraFile, weight: f32) -> Result<usize> {
        let mut n = crate::lora::attach_lora(&mut self.unet, file, "unet", weight)?;
        n += crate::lora::attach_lora(&mut self.text_encoder, file, "text_encoder", weight)?;
        if let Some(te2) = &mut self.text_encoder_2 {
            n += crate::lora::attach_lora(te2, file, "text_encoder_2", weight)?;
        }
        ensure!(
            n > 0 || file.layers.is_empty(),
            "the LoRA adapts no layer of this model (its modules start with {})",
            file.layers
                .keys()
                .next()
                .map(|k| k.split('.').next().unwrap_or(k).to_string())
                .unwrap_or_default()
        );
        Ok(n)
    }

    /// Fold every attached adapter into its base weight (faster sampling).
    pub fn merge_adapters(&mut self) -> Result<()> {
        merge_all_adapters(&mut self.unet)?;
        merge_all_adapters(&mut self.text_encoder)?;
        if let Some(t) = &mut self.text_encoder_2 {
            merge_all_adapters(t)?;
        }
        Ok(())
    }

    /// Text embeddings of one prompt: `(context [1, L, D], pooled [1, P])`
    /// ([`StableDiffusion::encode_text_batch`] of one caption).
    pub fn encode_text(&self, text: &str) -> Result<(Tensor, Option<Tensor>)> {
        self.encode_text_batch(&[text])
    }

    /// UNet conditioning for `batch` images: `[uncond; cond]` when guided.
    pub fn conditioning(
        &self,
        prompt: &str,
        negative: &str,
        batch: usize,
        guided: bool,
    ) -> Result<Conditioning> {
        let (c, p) = self.encode_text(prompt)?;
        let rep = |t: &Tensor| -> Result<Tensor> { Ok(t.repeat(batch_dims(t.rank(), batch))?) };
        let (mut ctx, mut pooled) = (rep(&c)?, p.as_ref().map(rep).transpose()?);
        if guided {
            let (uc, up) = if negative.is_empty() && self.force_zeros_for_empty_prompt {
                (
                    c.zeros_like()?,
                    p.as_ref().map(|t| t.zeros_like()).transpose()?,
                )
            } else {
                self.encode_text(negative)?
            };
            ctx = Tensor::cat(&[&rep(&uc)?, &ctx], 0)?;
            pooled = match (up, pooled) {
                (Some(u), Some(p)) => Some(Tensor::cat(&[&rep(&u)?, &p], 0)?),
                _ => None,
            };
        }
        Ok(Conditioning {
            context: ctx,
            pooled,
        })
    }

    /// Run the sampler; `on_step(done, total)` is called after each step.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<RgbImage>> {
        let latents = self.sample_latents(req, on_step)?;
        let images = self.vae.decode_latents(&latents)?;
        let (_, _, h, w) = images.dims4()?;
        Ok(to_rgb8(&images)?
            .into_iter()
            .map(|pixels| RgbImage {
                width: w,
                height: h,
                pixels,
            })
            .collect())
    }

    /// The denoised latents `[B, C, h/f, w/f]` (f32) before decoding by the codec.
    pub fn sample_latents(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        ensure!(req.batch >= 1, "batch must be at least 1");
        let (lc, lh, lw) = self.latent_shape(req.width, req.height)?;
        let sched = scheduler::build(
            req.scheduler,
            &self.scheduler_config,
            req.steps,
            req.sampler,
        )?;
        let guided = req.guidance > 1.0;
        let cond = self.conditioning(&req.prompt, &req.negative, req.batch, guided)?;

        let (noise, mut fresh) = match &req.init {
            InitNoise::Seed(seed) => {
                let mut bn = BatchNoise::from_seed(*seed, req.batch);
                let like = Tensor::zeros((req.batch, lc, lh, lw), DType::F32, &Device::Cpu)?;
                let n = scheduler::NoiseSource::noise_like(&mut bn, &like)?;
                (n, bn)
            }
            InitNoise::Latents(t) => {
                let d = t.dims();
                ensure!(
                    d.len() == 4 && (d[0] == 1 || d[0] == req.batch) && d[1..] == [lc, lh, lw],
                    "latents of shape {d:?} do not fit {}x{} (need [1, {lc}, {lh}, {lw}])",
                    req.width,
                    req.height
                );
                let n = if d[0] == req.batch {
                    t.clone()
                } else {
                    t.repeat((req.batch, 1, 1, 1))?
                };
                (
                    n.to_dtype(DType::F32)?,
                    BatchNoise::from_seed(req.noise_seed, req.batch),
                )
            }
        };
        self.denoise(
            sched,
            &cond,
            &noise,
            &mut fresh,
            req.guidance,
            (req.width, req.height),
            on_step,
        )
    }

    /// The denoised latents `[B, C, h/f, w/f]` (f32) of several prompts in one
    /// batch: image `k` shows `prompts[k]` from noise seeded `seeds[k]`,
    /// exactly the noise of a single image `selma generate --seed seeds[k]`
    /// draws, and every step runs the UNet once over the whole batch (twice
    /// its size with classifier-free guidance, all against `s.negative`).
    pub fn sample_prompts(
        &self,
        prompts: &[&str],
        seeds: &[u64],
        s: &Sampling,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        ensure!(
            prompts.len() == seeds.len(),
            "{} prompts but {} seeds: give one seed per prompt",
            prompts.len(),
            seeds.len()
        );
        ensure!(!prompts.is_empty(), "no prompt to sample");
        let b = prompts.len();
        let (lc, lh, lw) = self.latent_shape(s.width, s.height)?;
        let sched = scheduler::build(s.scheduler, &self.scheduler_config, s.steps, s.sampler)?;
        let guided = s.guidance > 1.0;
        let cond = self.prompts_conditioning(prompts, &s.negative, guided)?;
        let mut noise = BatchNoise {
            rngs: seeds.iter().map(|&x| GaussianRng::new(x)).collect(),
        };
        let like = Tensor::zeros((b, lc, lh, lw), DType::F32, &Device::Cpu)?;
        let init = scheduler::NoiseSource::noise_like(&mut noise, &like)?;
        self.denoise(
            sched,
            &cond,
            &init,
            &mut noise,
            s.guidance,
            (s.width, s.height),
            on_step,
        )
    }

    /// UNet conditioning of one image per prompt (`[uncond; cond]` when
    /// guided, the unconditional half from `negative`); each distinct prompt
    /// is encoded once.
    pub fn prompts_conditioning(
        &self,
        prompts: &[&str],
        negative: &str,
        guided: bool,
    ) -> Result<Conditioning> {
        let mut seen: HashMap<&str, (Tensor, Option<Tensor>)> = HashMap::new();
        let mut ctx = Vec::with_capacity(prompts.len());
        let mut pooled = Vec::with_capacity(prompts.len());
        for &p in prompts {
            let (c, q) = match seen.get(p) {
                Some(e) => e.clone(),
                None => {
                    let e = self
                        .encode_text(p)
                        .with_context(|| format!("encoding the prompt {p:?}"))?;
                    seen.insert(p, e.clone());
                    e
                }
            };
            ctx.push(c);
            pooled.extend(q);
        }
        if guided {
            let (uc, up) = if negative.is_empty() && self.force_zeros_for_empty_prompt {
                (
                    ctx[0].zeros_like()?,
                    pooled.first().map(|t| t.zeros_like()).transpose()?,
                )
            } else {
                self.encode_text(negative)?
            };
            let b = prompts.len();
            ctx.splice(0..0, std::iter::repeat_n(uc, b));
            if let Some(u) = up {
                pooled.splice(0..0, std::iter::repeat_n(u, b));
            }
        }
        let pooled = if pooled.is_empty() {
            None
        } else {
            Some(Tensor::cat(&pooled, 0)?)
        };
        Ok(Conditioning {
            context: Tensor::cat(&ctx, 0)?,
            pooled,
        })
    }

    /// Latent `(channels, height, width)` of a `width x height` image.
    fn latent_shape(&self, width: usize, height: usize) -> Result<(usize, usize, usize)> {
        let f = self.vae_scale();
        ensure!(
            width.is_multiple_of(f) && height.is_multiple_of(f) && width > 0 && height > 0,
            "image size {width}x{height} must be a positive multiple of {f}"
        );
        Ok((self.unet.config().in_channels, height / f, width / f))
    }

    /// The sampling loop shared by every path: scales `init` (unit noise,
    /// f32) by the scheduler's initial sigma, then per step one UNet call
    /// over the batch (`[uncond; cond]` when `guidance > 1`), guidance, and
    /// the scheduler step with fresh noise from `fresh`.
    #[allow(clippy::too_many_arguments)]
    fn denoise(
        &self,
        mut sched: Box<dyn scheduler::Scheduler>,
        cond: &Conditioning,
        init: &Tensor,
        fresh: &mut BatchNoise,
        guidance: f64,
        (width, height): (usize, usize),
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let b = init.dim(0)?;
        let guided = guidance > 1.0;
        let mul = if guided { 2 } else { 1 };
        let mut latents = (init.to_device(&self.device)? * sched.init_noise_sigma())?;

        let added = match &cond.pooled {
            Some(pooled) => {
                let ids = [height, width, 0, 0, height, width].map(|v| v as f32);
                let time_ids = Tensor::new(&ids, &self.device)?
                    .unsqueeze(0)?
                    .repeat((b * mul, 1))?;
                Some(SdxlAdded {
                    text_embeds: pooled.clone(),
                    time_ids,
                })
            }
            None => None,
        };
        let timesteps = sched.timesteps().to_vec();
        let n = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let x = sched.scale_model_input(&latents, i)?;
            let x = if guided {
                Tensor::cat(&[&x, &x], 0)?
            } else {
                x
            };
            let ts = Tensor::from_vec(vec![t as f32; b * mul], b * mul, &self.device)?;
            let out = self
                .unet
                .forward(&x.to_dtype(self.dtype)?, &ts, &cond.context, added.as_ref())?
                .to_dtype(DType::F32)?;
            let pred = if guided {
                let u = out.narrow(0, 0, b)?;
                let c = out.narrow(0, b, b)?;
                (&u + ((c - &u)? * guidance)?)?
            } else {
                out
            };
            latents = sched.step(&pred, i, &latents, fresh)?;
            on_step(i + 1, n);
        }
        Ok(latents)
    }
}

fn batch_dims(rank: usize, batch: usize) -> Vec<usize> {
    let mut v = vec![1; rank];
    v[0] = batch;
    v
}
