//! The LoRA training loop (SELMA's expert training): configuration with the
//! paper's defaults, the diffusion loss (epsilon or v target from the
//! scheduler config, MSE, optional min-SNR-gamma weighting and noise offset),
//! per-sample uniform timesteps, cached VAE posteriors and text embeddings,
//! gradient accumulation, clipping, AdamW, checkpoints and exact resume.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use selma_diffusion::pipeline::{parse_device, parse_dtype, StableDiffusion};
use selma_diffusion::scheduler::config::{NoiseSchedule, PredictionType};
use selma_diffusion::unet::{SdxlAdded, UNet2DConditionModel};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::checkpoint;
use crate::dataset::{choose_variant, load_rgb, prepare, Crop, Dataset, Variant};
use crate::lora::{LoraSet, DEFAULT_TARGETS};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, GradAccumulator, LrSchedule};
use crate::rng::TrainRng;

/// Everything that defines a training run (TOML/JSON; missing keys take SELMA's recipe).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// diffusers model folder (the student).
    pub model: PathBuf,
    /// Dataset folder.
    pub data: PathBuf,
    /// Output LoRA file.
    pub out: PathBuf,
    /// Run folder for checkpoints, logs and caches (default: `<out>.run`).
    pub run_dir: Option<PathBuf>,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha (scale = alpha / rank).
    pub alpha: f64,
    /// Target module names (suffixes of UNet module paths).
    pub targets: Vec<String>,
    /// Optimizer updates.
    pub steps: u64,
    /// Images per micro-batch.
    pub batch: usize,
    /// Micro-batches per update.
    pub grad_accum: usize,
    /// Base learning rate.
    pub lr: f64,
    /// `constant`, `constant_with_warmup` or `cosine`.
    pub lr_schedule: String,
    /// Warm-up updates for the warm-up schedules.
    pub warmup_steps: u64,
    /// Training resolution (square, pixels).
    pub resolution: u32,
    /// Seed of every random choice.
    pub seed: u64,
    /// Checkpoint every N updates (0: only at the end).
    pub save_every: u64,
    /// Checkpoints kept in the run folder (0: all).
    pub keep_checkpoints: usize,
    /// Output layout: `peft` or `kohya`.
    pub format: String,
    /// Crop mode.
    pub crop: Crop,
    /// Random horizontal flips.
    pub random_flip: bool,
    /// Gradient-norm clip.
    pub max_grad_norm: f64,
    /// AdamW hyper-parameters.
    pub adam: AdamWConfig,
    /// min-SNR-gamma loss weighting (None: plain MSE).
    pub min_snr_gamma: Option<f64>,
    /// Noise offset (0: off).
    pub noise_offset: f64,
    /// Skip bad dataset entries with a warning instead of failing.
    pub skip_bad: bool,
    /// Prompts rendered into `<run_dir>/validation/` every `validation_every` updates.
    pub validation_prompts: Vec<String>,
    /// Render the validation prompts every N updates (0: never).
    pub validation_every: u64,
    /// Sampling steps of validation renders (DDIM, guidance 7.5, seed = prompt index).
    pub validation_steps: usize,
    /// Device (`cpu`, `cuda:N`).
    pub device: String,
    /// UNet/text-encoder compute dtype (`f32`, `f16`, `bf16`); LoRA weights and AdamW state stay f32.
    pub dtype: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            data: PathBuf::new(),
            out: PathBuf::from("expert.safetensors"),
            run_dir: None,
            rank: 128,
            alpha: 128.0,
            targets: DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect(),
            steps: 5000,
            batch: 16,
            grad_accum: 4,
            lr: 3e-4,
            lr_schedule: "constant".into(),
            warmup_steps: 0,
            resolution: 512,
            seed: 0,
            save_every: 500,
            keep_checkpoints: 2,
            format: "peft".into(),
            crop: Crop::Center,
            random_flip: true,
            max_grad_norm: 1.0,
            adam: AdamWConfig::default(),
            min_snr_gamma: None,
            noise_offset: 0.0,
            skip_bad: false,
            validation_prompts: vec![],
            validation_every: 0,
            validation_steps: 20,
            device: "cpu".into(),
            dtype: "f32".into(),
        }
    }
}

impl TrainConfig {
    /// Reads a TOML config file (errors name the file and key).
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_toml_str(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Parses a TOML config.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The run folder (checkpoints, loss log, latent cache).
    pub fn run_dir(&self) -> PathBuf {
        self.run_dir.clone().unwrap_or_else(|| {
            let mut s = self.out.clone().into_os_string();
            s.push(".run");
            PathBuf::from(s)
        })
    }

    fn check(&self) -> Result<()> {
        ensure!(self.batch > 0, "--batch must be at least 1");
        ensure!(self.grad_accum > 0, "--grad-accum must be at least 1");
        ensure!(self.rank > 0, "--rank must be at least 1");
        ensure!(
            self.resolution >= 8 && self.resolution.is_multiple_of(8),
            "--resolution {} must be a multiple of 8",
            self.resolution
        );
        ensure!(!self.targets.is_empty(), "--targets is empty");
        LrSchedule::parse(&self.lr_schedule, self.warmup_steps, self.steps)?;
        self.format.parse::<selma_lora::LoraFormat>()?;
        Ok(())
    }
}

/// What a training step reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Update number (1-based) just applied.
    pub step: u64,
    /// Mean loss over the micro-batches.
    pub loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
}

/// The diffusion training loss of one batch.
/// `timesteps[i]` in `0..schedule.len()`; returns a scalar (f32, or f64 for f64 models).
#[allow(clippy::too_many_arguments)]
pub fn diffusion_loss(
    unet: &UNet2DConditionModel,
    schedule: &NoiseSchedule,
    prediction: PredictionType,
    min_snr_gamma: Option<f64>,
    latents: &Tensor,
    noise: &Tensor,
    timesteps: &[usize],
    context: &Tensor,
    added: Option<&SdxlAdded>,
) -> Result<Tensor> {
    let b = latents.dim(0)?;
    ensure!(
        timesteps.len() == b,
        "{} timesteps for a batch of {b}",
        timesteps.len()
    );
    let noisy = schedule.add_noise(latents, noise, timesteps)?;
    let t = Tensor::from_vec(
        timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
        b,
        latents.device(),
    )?;
    let pred = unet.forward(&noisy, &t, context, added)?;
    let target = match prediction {
        PredictionType::Epsilon => noise.clone(),
        PredictionType::VPrediction => schedule.get_velocity(latents, noise, timesteps)?,
        PredictionType::Sample => latents.clone(),
    };
    let loss_dt = match pred.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let diff = (pred.to_dtype(loss_dt)? - target.to_dtype(loss_dt)?)?;
    let per_sample = diff.sqr()?.flatten_from(1)?.mean(1)?;
    let loss = match min_snr_gamma {
        None => per_sample.mean_all()?,
        Some(gamma) => {
            let w: Vec<f64> = timesteps
                .iter()
                .map(|&t| {
                    let a = schedule.alphas_cumprod[t];
                    let snr = a / (1.0 - a);
                    let m = snr.min(gamma);
                    match prediction {
                        PredictionType::VPrediction => m / (snr + 1.0),
                        _ => m / snr,
                    }
                })
                .collect();
            let w = Tensor::from_vec(w, b, latents.device())?.to_dtype(loss_dt)?;
            (per_sample * w)?.mean_all()?
        }
    };
    Ok(loss)
}

/// Loop position saved in checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    /// Updates applied.
    pub step: u64,
    /// The RNG after the last update.
    pub rng: TrainRng,
    /// Current epoch's sample order.
    pub order: Vec<usize>,
    /// Next position in `order`.
    pub cursor: usize,
    /// Completed passes over the data.
    pub epoch: u64,
}

/// `state.json` of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Loop position.
    pub state: LoopState,
    /// AdamW's update count.
    pub adam_step: u64,
    /// The run's configuration.
    pub config: TrainConfig,
    /// LoRA variable names, in optimizer order.
    pub names: Vec<String>,
}

/// A training run in memory.
pub struct Trainer {
    /// The configuration.
    pub cfg: TrainConfig,
    /// The model (UNet with LoRA adapters attached).
    pub sd: StableDiffusion,
    /// The trained adapters.
    pub lora: LoraSet,
    /// The optimizer.
    pub opt: AdamW,
    /// Loop position.
    pub state: LoopState,
    /// The data.
    pub dataset: Dataset,
    schedule: NoiseSchedule,
    lr_schedule: LrSchedule,
    vae_id: String,
    posteriors: HashMap<(usize, Variant), (Tensor, Tensor)>,
    texts: HashMap<String, (Tensor, Option<Tensor>)>,
}

fn vae_identity(model: &Path) -> Result<String> {
    let dir = model.join("vae");
    let mut h = Sha256::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        if name == "config.json" {
            h.update(std::fs::read(&p)?);
        } else if name.ends_with(".safetensors") {
            // Weights are too big to hash each run: name, size and mtime identify them.
            let md = std::fs::metadata(&p)?;
            h.update(name.as_bytes());
            h.update(md.len().to_le_bytes());
            if let Ok(t) = md.modified() {
                if let Ok(d) = t.duration_since(std::time::UNIX_EPOCH) {
                    h.update(d.as_nanos().to_le_bytes());
                }
            }
        }
    }
    Ok(hex::encode(h.finalize()))
}

impl Trainer {
    /// Loads the model and data and attaches fresh adapters (seeded).
    pub fn new(cfg: TrainConfig) -> Result<Self> {
        cfg.check()?;
        let device = parse_device(&cfg.device)?;
        let dtype = parse_dtype(&cfg.dtype)?;
        let mut sd = StableDiffusion::load(&cfg.model, &device, dtype)
            .with_context(|| format!("loading the model {}", cfg.model.display()))?;
        let dataset = Dataset::open(&cfg.data, cfg.skip_bad)?;
        let mut rng = TrainRng::new(cfg.seed);
        let lora = LoraSet::attach(
            &mut sd.unet,
            "unet",
            &cfg.targets,
            cfg.rank,
            cfg.alpha,
            &mut rng,
            &device,
            DType::F32,
        )?;
        let opt = AdamW::new(lora.vars(), cfg.adam)?;
        let order = rng.permutation(dataset.len());
        let schedule = sd.scheduler_config.noise_schedule();
        let lr_schedule = LrSchedule::parse(&cfg.lr_schedule, cfg.warmup_steps, cfg.steps)?;
        let vae_id = vae_identity(&cfg.model)?;
        Ok(Self {
            cfg,
            sd,
            lora,
            opt,
            state: LoopState {
                step: 0,
                rng,
                order,
                cursor: 0,
                epoch: 0,
            },
            dataset,
            schedule,
            lr_schedule,
            vae_id,
            posteriors: HashMap::new(),
            texts: HashMap::new(),
        })
    }

    /// The prediction type from the scheduler config.
    pub fn prediction(&self) -> PredictionType {
        self.sd.scheduler_config.prediction_type
    }

    fn next_index(&mut self) -> usize {
        if self.state.cursor >= self.state.order.len() {
            self.state.order = self.state.rng.permutation(self.dataset.len());
            self.state.cursor = 0;
            self.state.epoch += 1;
        }
        let i = self.state.order[self.state.cursor];
        self.state.cursor += 1;
        i
    }

    /// VAE posterior (mean, std) of sample `idx` in crop/flip `v`: from
    /// memory, the on-disk cache (keyed by image bytes, VAE identity,
    /// resolution and variant), or the VAE.
    fn posterior(&mut self, idx: usize, v: Variant) -> Result<(Tensor, Tensor)> {
        if let Some(p) = self.posteriors.get(&(idx, v)) {
            return Ok(p.clone());
        }
        let path = self.dataset.samples[idx].image.clone();
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut h = Sha256::new();
        h.update(&bytes);
        h.update(self.vae_id.as_bytes());
        h.update(format!(
            "{}:{}:{}:{}:{}",
            self.cfg.resolution, v.x, v.y, v.flip, self.cfg.dtype
        ));
        let key = hex::encode(h.finalize());
        let cache_dir = self.cfg.run_dir().join("latent-cache");
        let file = cache_dir.join(format!("{key}.safetensors"));
        let device = self.sd.device().clone();
        let (mean, std) = if file.is_file() {
            let t = candle_core::safetensors::load(&file, &device)
                .with_context(|| format!("reading cached latents {}", file.display()))?;
            (
                t.get("mean").context("cached latents lack `mean`")?.clone(),
                t.get("std").context("cached latents lack `std`")?.clone(),
            )
        } else {
            let img = load_rgb(&path)?;
            let px = prepare(&img, self.cfg.resolution, v, &device)?
                .unsqueeze(0)?
                .to_dtype(self.sd.vae.dtype())?;
            let post = self
                .sd
                .vae
                .encode(&px)
                .with_context(|| format!("encoding {} with the VAE", path.display()))?;
            let mean = post.mean.to_dtype(DType::F32)?;
            let std = post.std()?.to_dtype(DType::F32)?;
            std::fs::create_dir_all(&cache_dir)
                .with_context(|| format!("creating {}", cache_dir.display()))?;
            let tmp = cache_dir.join(format!(".{key}.tmp-{}", std::process::id()));
            let m: HashMap<String, Tensor> = [
                ("mean".to_string(), mean.to_device(&Device::Cpu)?),
                ("std".to_string(), std.to_device(&Device::Cpu)?),
            ]
            .into();
            candle_core::safetensors::save(&m, &tmp)?;
            std::fs::rename(&tmp, &file).with_context(|| format!("writing {}", file.display()))?;
            (mean, std)
        };
        self.posteriors
            .insert((idx, v), (mean.clone(), std.clone()));
        Ok((mean, std))
    }

    fn text(&mut self, text: &str) -> Result<(Tensor, Option<Tensor>)> {
        if let Some(t) = self.texts.get(text) {
            return Ok(t.clone());
        }
        let t = self
            .sd
            .encode_text(text)
            .with_context(|| format!("encoding caption {text:?}"))?;
        let t = (t.0.detach(), t.1.map(|p| p.detach()));
        self.texts.insert(text.to_string(), t.clone());
        Ok(t)
    }

    /// One micro-batch: loss value and the LoRA gradients (optimizer order).
    pub fn micro_batch(&mut self) -> Result<(f64, Vec<Option<Tensor>>)> {
        let res = self.cfg.resolution;
        let dtype = self.sd.dtype();
        let device = self.sd.device().clone();
        let (mut lat, mut ctx, mut pooled, mut ids) = (vec![], vec![], vec![], vec![]);
        for _ in 0..self.cfg.batch {
            let idx = self.next_index();
            let path = self.dataset.samples[idx].image.clone();
            let (w, h) = image::image_dimensions(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let v = choose_variant(
                w,
                h,
                res,
                self.cfg.crop,
                self.cfg.random_flip,
                &mut self.state.rng,
            );
            let (mean, std) = self.posterior(idx, v)?;
            let z = self
                .state
                .rng
                .randn(mean.shape().clone(), 1.0, &device, DType::F32)?;
            let raw = (mean + (std * z)?)?;
            lat.push(
                self.sd
                    .vae
                    .scale_latents(&raw.to_dtype(self.sd.vae.dtype())?)?,
            );
            let text = self.dataset.samples[idx].text.clone();
            let (c, p) = self.text(&text)?;
            ctx.push(c);
            if let Some(p) = p {
                pooled.push(p);
            }
            ids.push(vec![
                h as f32, w as f32, v.y as f32, v.x as f32, res as f32, res as f32,
            ]);
        }
        let latents = Tensor::cat(&lat, 0)?.to_dtype(dtype)?;
        let context = Tensor::cat(&ctx, 0)?.to_dtype(dtype)?;
        let added = if pooled.is_empty() {
            None
        } else {
            let b = ids.len();
            Some(SdxlAdded {
                text_embeds: Tensor::cat(&pooled, 0)?.to_dtype(dtype)?,
                time_ids: Tensor::from_vec(ids.concat(), (b, 6), &device)?.to_dtype(dtype)?,
            })
        };
        let shape = latents.shape().clone();
        let mut noise = self.state.rng.randn(shape, 1.0, &device, DType::F32)?;
        if self.cfg.noise_offset != 0.0 {
            let (b, c, _, _) = latents.dims4()?;
            let off =
                self.state
                    .rng
                    .randn((b, c, 1, 1), self.cfg.noise_offset, &device, DType::F32)?;
            noise = noise.broadcast_add(&off)?;
        }
        let noise = noise.to_dtype(dtype)?;
        let n = self.schedule.len() as u64;
        let timesteps: Vec<usize> = (0..latents.dim(0)?)
            .map(|_| self.state.rng.below(n) as usize)
            .collect();
        let loss = diffusion_loss(
            &self.sd.unet,
            &self.schedule,
            self.prediction(),
            self.cfg.min_snr_gamma,
            &latents,
            &noise,
            &timesteps,
            &context,
            added.as_ref(),
        )?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        ensure!(
            value.is_finite(),
            "loss is {value} at update {}",
            self.state.step + 1
        );
        let grads = loss.backward()?;
        let g = self
            .lora
            .vars()
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect();
        Ok((value, g))
    }

    /// Validation loss: the mean diffusion loss over every sample (center
    /// crop, no flip, posterior mean) at `draws` fixed (noise, timestep)
    /// pairs per sample from `seed`; no gradients, no effect on the run's RNG.
    pub fn eval_loss(&mut self, seed: u64, draws: usize) -> Result<f64> {
        let mut rng = TrainRng::new(seed);
        let res = self.cfg.resolution;
        let dtype = self.sd.dtype();
        let device = self.sd.device().clone();
        let n = self.schedule.len() as u64;
        let mut total = 0.0;
        let mut count = 0usize;
        for idx in 0..self.dataset.len() {
            let path = self.dataset.samples[idx].image.clone();
            let (w, h) = image::image_dimensions(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let v = choose_variant(w, h, res, Crop::Center, false, &mut rng);
            let (mean, _) = self.posterior(idx, v)?;
            let latents = self
                .sd
                .vae
                .scale_latents(&mean.to_dtype(self.sd.vae.dtype())?)?
                .to_dtype(dtype)?;
            let text = self.dataset.samples[idx].text.clone();
            let (ctx, pooled) = self.text(&text)?;
            let added = match pooled {
                Some(p) => Some(SdxlAdded {
                    text_embeds: p.to_dtype(dtype)?,
                    time_ids: Tensor::from_vec(
                        vec![
                            h as f32, w as f32, v.y as f32, v.x as f32, res as f32, res as f32,
                        ],
                        (1, 6),
                        &device,
                    )?
                    .to_dtype(dtype)?,
                }),
                None => None,
            };
            for _ in 0..draws {
                let noise = rng.randn(latents.shape().clone(), 1.0, &device, DType::F32)?;
                let t = rng.below(n) as usize;
                let loss = diffusion_loss(
                    &self.sd.unet,
                    &self.schedule,
                    self.prediction(),
                    None,
                    &latents,
                    &noise.to_dtype(dtype)?,
                    &[t],
                    &ctx.to_dtype(dtype)?,
                    added.as_ref(),
                )?;
                total += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                count += 1;
            }
        }
        Ok(total / count.max(1) as f64)
    }

    /// One optimizer update (`grad_accum` micro-batches).
    pub fn train_step(&mut self) -> Result<StepStats> {
        let mut acc = GradAccumulator::new();
        let mut loss = 0.0;
        for _ in 0..self.cfg.grad_accum {
            let (l, g) = self.micro_batch()?;
            loss += l;
            acc.add(g)?;
        }
        let mut grads = acc.take()?;
        let grad_norm = clip_grad_norm(&mut grads, self.cfg.max_grad_norm)?;
        if !grad_norm.is_finite() {
            bail!(
                "gradient norm is {grad_norm} at update {}",
                self.state.step + 1
            );
        }
        let lr = self.cfg.lr * self.lr_schedule.factor(self.state.step);
        self.opt.step(&grads, lr)?;
        self.state.step += 1;
        Ok(StepStats {
            step: self.state.step,
            loss: loss / self.cfg.grad_accum as f64,
            grad_norm,
            lr,
        })
    }

    /// Every tensor a checkpoint holds: LoRA factors and AdamW moments.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut m = HashMap::new();
        for (i, name) in self.lora.var_names().iter().enumerate() {
            m.insert(name.clone(), self.opt.params[i].as_tensor().clone());
            m.insert(format!("{name}.exp_avg"), self.opt.m[i].clone());
            m.insert(format!("{name}.exp_avg_sq"), self.opt.v[i].clone());
        }
        m
    }

    /// Writes `checkpoint-<step>/` under the run folder (atomic), then removes
    /// all but the newest `keep_checkpoints`.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let st = CheckpointState {
            state: self.state.clone(),
            adam_step: self.opt.step,
            config: self.cfg.clone(),
            names: self.lora.var_names(),
        };
        let dir = checkpoint::save(
            &self.cfg.run_dir(),
            self.state.step,
            &st,
            &self.state_tensors(),
        )?;
        checkpoint::prune(&self.cfg.run_dir(), self.cfg.keep_checkpoints)?;
        Ok(dir)
    }

    /// Restores adapters, optimizer and loop position from a checkpoint (or the
    /// newest one in a run folder). The run-defining settings must match.
    pub fn resume(&mut self, path: &Path) -> Result<()> {
        let dir = checkpoint::resolve(path)?;
        let (st, tensors): (CheckpointState, _) = checkpoint::load(&dir, self.sd.device())?;
        let a = &st.config;
        let b = &self.cfg;
        let mut diffs = vec![];
        macro_rules! same {
            ($($f:ident),*) => {$(
                if a.$f != b.$f { diffs.push(format!("{} (checkpoint {:?}, now {:?})", stringify!($f), a.$f, b.$f)); }
            )*};
        }
        same!(
            model,
            data,
            rank,
            alpha,
            targets,
            batch,
            grad_accum,
            resolution,
            seed,
            crop,
            random_flip
        );
        ensure!(
            diffs.is_empty(),
            "{}: cannot resume with different settings: {}",
            dir.display(),
            diffs.join(", ")
        );
        let names = self.lora.var_names();
        ensure!(
            st.names == names,
            "{}: the checkpoint's LoRA layers differ from this model's",
            dir.display()
        );
        for (i, name) in names.iter().enumerate() {
            let get = |k: &str| -> Result<Tensor> {
                tensors
                    .get(k)
                    .cloned()
                    .with_context(|| format!("{}: tensor {k} missing", dir.display()))
            };
            let p: &Var = &self.opt.params[i];
            p.set(&get(name)?.to_dtype(p.dtype())?)
                .with_context(|| format!("{}: restoring {name}", dir.display()))?;
            self.opt.m[i] = get(&format!("{name}.exp_avg"))?;
            self.opt.v[i] = get(&format!("{name}.exp_avg_sq"))?;
        }
        self.opt.step = st.adam_step;
        self.state = st.state;
        Ok(())
    }

    /// The trained adapters as a LoRA file with rank/alpha/step metadata.
    pub fn lora_file(&self) -> Result<selma_lora::LoraFile> {
        let mut meta = BTreeMap::new();
        meta.insert("selma_steps".into(), self.state.step.to_string());
        meta.insert("selma_seed".into(), self.cfg.seed.to_string());
        meta.insert(
            "selma_base_model".into(),
            self.cfg.model.display().to_string(),
        );
        self.lora.to_lora_file(&meta)
    }

    /// Saves the LoRA to `cfg.out` in `cfg.format` (atomic).
    pub fn save_lora(&self) -> Result<()> {
        let fmt: selma_lora::LoraFormat = self.cfg.format.parse()?;
        if let Some(p) = self.cfg.out.parent() {
            if !p.as_os_str().is_empty() {
                std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
            }
        }
        self.lora_file()?
            .save(&self.cfg.out, fmt)
            .with_context(|| format!("writing {}", self.cfg.out.display()))
    }

    /// Renders every validation prompt (DDIM, guidance 7.5, seed = prompt
    /// index, training resolution) with the current adapters into
    /// `<run_dir>/validation/step-<N>-<i>.png`; returns the files written.
    pub fn render_validation(&self) -> Result<Vec<PathBuf>> {
        use selma_diffusion::pipeline::{GenerateRequest, InitNoise};
        use selma_diffusion::scheduler::{SamplerOptions, SchedulerKind};
        let dir = self.cfg.run_dir().join("validation");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let res = self.cfg.resolution as usize;
        let mut out = vec![];
        for (i, prompt) in self.cfg.validation_prompts.iter().enumerate() {
            let req = GenerateRequest {
                prompt: prompt.clone(),
                negative: String::new(),
                steps: self.cfg.validation_steps,
                guidance: 7.5,
                scheduler: SchedulerKind::Ddim,
                sampler: SamplerOptions::default(),
                width: res,
                height: res,
                batch: 1,
                init: InitNoise::Seed(i as u64),
                noise_seed: i as u64,
            };
            let img = self
                .sd
                .generate(&req, &mut |_, _| {})
                .with_context(|| format!("rendering validation prompt {prompt:?}"))?
                .remove(0);
            let path = dir.join(format!("step-{}-{i}.png", self.state.step));
            let params = format!(
                "{prompt}\nSteps: {}, Sampler: ddim, CFG scale: 7.5, Seed: {i}, LoRA step: {}",
                self.cfg.validation_steps, self.state.step
            );
            selma_diffusion::image_io::write_png(
                &path,
                img.width,
                img.height,
                &img.pixels,
                &params,
            )?;
            out.push(path);
        }
        Ok(out)
    }

    /// Runs until `cfg.steps`, checkpointing every `save_every` updates and
    /// appending one JSON line per update to `<run_dir>/loss.jsonl`;
    /// `on_step` sees each update (progress bars). Saves the LoRA at the end.
    pub fn run(&mut self, mut on_step: impl FnMut(&StepStats)) -> Result<()> {
        let run_dir = self.cfg.run_dir();
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        let log_path = run_dir.join("loss.jsonl");
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        while self.state.step < self.cfg.steps {
            let s = self.train_step()?;
            writeln!(
                log,
                "{}",
                serde_json::json!({"step": s.step, "loss": s.loss, "grad_norm": s.grad_norm, "lr": s.lr, "epoch": self.state.epoch})
            )
            .with_context(|| format!("writing {}", log_path.display()))?;
            on_step(&s);
            if self.cfg.save_every > 0 && s.step % self.cfg.save_every == 0 {
                self.save_checkpoint()?;
            }
            if self.cfg.validation_every > 0
                && s.step % self.cfg.validation_every == 0
                && !self.cfg.validation_prompts.is_empty()
            {
                self.render_validation()?;
            }
        }
        self.save_checkpoint()?;
        self.save_lora()
    }
}
