//! The training loop (SELMA's expert training, and full fine-tuning of small
//! base models): per-sample uniform timesteps, caption dropout, gradient
//! accumulation, clipping, AdamW, EMA, checkpoints and exact resume, on the
//! configuration of [`crate::config`], the loss of [`crate::loss`] and the
//! caches of [`crate::cache`]. LoRA mode trains adapters on the UNet and
//! writes a LoRA file (with `objective = "dpo"`, from preference pairs
//! against the frozen base); full mode (`full`) trains every UNet weight (and the
//! text encoders with `train_text_encoder`) and writes a diffusers folder.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor, Var};
use selma_diffusion::pipeline::{parse_device, parse_dtype, StableDiffusion};
use selma_diffusion::scheduler::config::{NoiseSchedule, PredictionType};
use selma_diffusion::unet::SdxlAdded;
use serde::{Deserialize, Serialize};

use crate::cache::{LatentCache, TextCache};
use crate::checkpoint;
use crate::config::Objective;
use crate::dataset::{choose_variant, load_rgb, prepare, Crop, Dataset, Variant};
use crate::ema::{assign, snapshot, Ema};
use crate::full::{self, FullPart};
use crate::lora::{with_adapters_off, LoraSet};
use crate::optim::{clip_grad_norm, AdamW, GradAccumulator, LrSchedule};
use crate::rng::TrainRng;

pub use crate::config::TrainConfig;
pub use crate::loss::{diffusion_loss, dpo_loss, per_sample_loss};

/// Text embeddings of `texts` in one batch, computed in the graph (gradients
/// reach trainable text encoders): [`StableDiffusion::encode_text_batch`].
pub fn encode_batch(sd: &StableDiffusion, texts: &[String]) -> Result<(Tensor, Option<Tensor>)> {
    sd.encode_text_batch(texts)
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
    /// The smallest and largest timestep drawn for this update.
    pub timesteps: (usize, usize),
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
    /// Trained tensor names, in optimizer order.
    pub names: Vec<String>,
    /// EMA updates folded in (0 without EMA).
    #[serde(default)]
    pub ema_updates: u64,
}

/// A training run in memory.
pub struct Trainer {
    /// The configuration.
    pub cfg: TrainConfig,
    /// The model (UNet with LoRA adapters attached).
    pub sd: StableDiffusion,
    /// The trained UNet adapters (no layers in full mode).
    pub lora: LoraSet,
    /// The trained text-encoder adapters (LoRA mode with `train_text_encoder`; else empty).
    pub te_lora: Vec<LoraSet>,
    /// The fully trained parts (full mode; empty with LoRA).
    pub full: Vec<FullPart>,
    /// Names of the trained tensors, in optimizer order.
    pub names: Vec<String>,
    /// The optimizer.
    pub opt: AdamW,
    /// EMA of the trained weights (when `ema_decay > 0`).
    pub ema: Option<Ema>,
    /// Captions run through the text encoder(s) so far (cache misses and in-graph encodings).
    pub text_encoder_calls: u64,
    /// Loop position.
    pub state: LoopState,
    /// The data.
    pub dataset: Dataset,
    schedule: NoiseSchedule,
    lr_schedule: LrSchedule,
    latents: LatentCache,
    texts: TextCache,
    /// Smallest and largest timestep drawn in the current update.
    drawn: (usize, usize),
}

/// Visits every adaptable layer of the UNet and the text encoder(s).
fn for_each_adapted(
    sd: &mut StableDiffusion,
    f: &mut dyn FnMut(&str, &mut dyn selma_diffusion::nn::LoraHost),
) {
    use selma_diffusion::nn::Adaptable;
    sd.unet.visit_adaptable("", f);
    sd.text_encoder.visit_adaptable("", f);
    if let Some(te2) = &mut sd.text_encoder_2 {
        te2.visit_adaptable("", f);
    }
}

impl Trainer {
    /// Loads the model and data and attaches fresh adapters (seeded).
    pub fn new(cfg: TrainConfig) -> Result<Self> {
        cfg.check()?;
        let device = parse_device(&cfg.device)?;
        let dtype = parse_dtype(&cfg.dtype)?;
        let mut sd = StableDiffusion::load(&cfg.model, &device, dtype)
            .with_context(|| format!("loading the model {}", cfg.model.display()))?;
        let dataset = match cfg.objective {
            Objective::Sft => Dataset::open(&cfg.data, cfg.skip_bad)?,
            Objective::Dpo => Dataset::open_pairs(&cfg.data, cfg.skip_bad)?,
        };
        let mut rng = TrainRng::new(cfg.seed);
        let (lora, parts) = if cfg.full {
            let parts = full::make_trainable(&mut sd, &cfg.model, cfg.trains_text_encoder())?;
            let lora = LoraSet {
                component: "unet".into(),
                rank: cfg.rank,
                alpha: cfg.alpha,
                layers: vec![],
            };
            (lora, parts)
        } else {
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
            (lora, vec![])
        };
        let mut te_lora = vec![];
        if !cfg.full && cfg.trains_text_encoder() {
            let mut encoders: Vec<(&str, &mut dyn selma_diffusion::nn::Adaptable)> =
                vec![("text_encoder", &mut sd.text_encoder)];
            if let Some(te2) = &mut sd.text_encoder_2 {
                encoders.push(("text_encoder_2", te2));
            }
            for (component, model) in encoders {
                te_lora.push(LoraSet::attach(
                    model,
                    component,
                    &cfg.text_encoder_targets,
                    cfg.rank,
                    cfg.alpha,
                    &mut rng,
                    &device,
                    DType::F32,
                )?);
            }
        }
        let (vars, names) = if cfg.full {
            (
                parts
                    .iter()
                    .flat_map(|p| p.vars.values().cloned())
                    .collect(),
                parts.iter().flat_map(|p| p.names()).collect(),
            )
        } else {
            // UNet names stay unprefixed (checkpoints of UNet-only runs resume);
            // text-encoder names carry their component.
            let mut vars = lora.vars();
            let mut names = lora.var_names();
            for set in &te_lora {
                vars.extend(set.vars());
                names.extend(
                    set.var_names()
                        .into_iter()
                        .map(|n| format!("{}.{n}", set.component)),
                );
            }
            (vars, names)
        };
        let opt = AdamW::new(vars, cfg.adam)?;
        let ema = if cfg.ema_decay > 0.0 {
            Some(Ema::new(&opt.params, cfg.ema_decay, cfg.ema_warmup)?)
        } else {
            None
        };
        let order = rng.permutation(dataset.units());
        let schedule = sd.scheduler_config.noise_schedule();
        let lr_schedule = LrSchedule::parse(&cfg.lr_schedule, cfg.warmup_steps, cfg.steps)?;
        let latents = LatentCache::new(&cfg.run_dir(), &cfg.model)?;
        let texts = TextCache::new(&cfg.run_dir(), &cfg.model)?;
        let t = Self {
            cfg,
            sd,
            lora,
            te_lora,
            full: parts,
            names,
            opt,
            ema,
            text_encoder_calls: 0,
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
            latents,
            texts,
            drawn: (usize::MAX, 0),
        };
        t.timestep_range()?;
        Ok(t)
    }

    /// The prediction type from the scheduler config.
    pub fn prediction(&self) -> PredictionType {
        self.sd.scheduler_config.prediction_type
    }

    fn next_index(&mut self) -> usize {
        if self.state.cursor >= self.state.order.len() {
            self.state.order = self.state.rng.permutation(self.dataset.units());
            self.state.cursor = 0;
            self.state.epoch += 1;
        }
        let i = self.state.order[self.state.cursor];
        self.state.cursor += 1;
        i
    }

    /// VAE posterior (mean, std) of sample `idx` in crop/flip `v`: from
    /// memory, the on-disk cache ([`LatentCache`]), or the VAE; a weightless codec encodes directly.
    fn posterior(&mut self, idx: usize, v: Variant) -> Result<(Tensor, Tensor)> {
        if let Some(p) = self.latents.remembered(idx, v) {
            return Ok(p);
        }
        let path = self.dataset.samples[idx].image.clone();
        if self.sd.vae.as_kl().is_none() {
            // A weightless codec (pixel-unshuffle) costs less than a cache
            // lookup: encode every time, keep nothing (large pretraining sets).
            let img = load_rgb(&path)?;
            let px = prepare(&img, self.cfg.resolution, v, self.sd.device())?
                .unsqueeze(0)?
                .to_dtype(self.sd.vae.dtype())?;
            let post = self
                .sd
                .vae
                .encode(&px)
                .with_context(|| format!("encoding {}", path.display()))?;
            return Ok((
                post.mean.to_dtype(DType::F32)?,
                post.std()?.to_dtype(DType::F32)?,
            ));
        }
        let file = self
            .latents
            .entry(&path, self.cfg.resolution, v, &self.cfg.dtype)?;
        let device = self.sd.device().clone();
        let (mean, std) = match self.latents.load(&file, &device)? {
            Some(p) => p,
            None => {
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
                self.latents.store(&file, &mean, &std)?;
                (mean, std)
            }
        };
        self.latents.remember(idx, v, mean.clone(), std.clone());
        Ok((mean, std))
    }

    /// Zeroes the embeddings of empty captions when the model's unconditional
    /// input is zeros (SDXL's `force_zeros_for_empty_prompt`), as sampling does.
    fn zero_empty(
        &self,
        texts: &[String],
        ctx: Tensor,
        pooled: Option<Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if !self.sd.force_zeros_for_empty_prompt || texts.iter().all(|t| !t.is_empty()) {
            return Ok((ctx, pooled));
        }
        let keep: Vec<f32> = texts
            .iter()
            .map(|t| if t.is_empty() { 0.0 } else { 1.0 })
            .collect();
        let b = texts.len();
        let m = Tensor::from_vec(keep, b, ctx.device())?.to_dtype(ctx.dtype())?;
        let ctx = ctx.broadcast_mul(&m.reshape((b, 1, 1))?)?;
        let pooled = match pooled {
            Some(p) => Some(p.broadcast_mul(&m.reshape((b, 1))?.to_dtype(p.dtype())?)?),
            None => None,
        };
        Ok((ctx, pooled))
    }

    /// Frozen text encoder: the embeddings of one caption from memory, the
    /// on-disk cache ([`TextCache`]) or the encoder.
    fn text(&mut self, text: &str) -> Result<(Tensor, Option<Tensor>)> {
        if let Some(t) = self.texts.remembered(text) {
            return Ok(t);
        }
        let file = self.texts.entry(text, &self.cfg.dtype);
        let t = match self.texts.load(&file, self.sd.device())? {
            Some(t) => t,
            None => {
                self.text_encoder_calls += 1;
                let t = self
                    .sd
                    .encode_text_batch(&[text])
                    .with_context(|| format!("encoding caption {text:?}"))?;
                let t = (t.0.detach(), t.1.map(|p| p.detach()));
                self.texts.store(&file, &t)?;
                t
            }
        };
        self.texts.remember(text, t.clone());
        Ok(t)
    }

    /// Conditioning for a batch of captions: in the graph when the text
    /// encoder trains, else from the cache; empty captions zeroed where the model wants it.
    fn texts_batch(&mut self, texts: &[String]) -> Result<(Tensor, Option<Tensor>)> {
        let (ctx, pooled) = if self.cfg.trains_text_encoder() {
            self.text_encoder_calls += texts.len() as u64;
            self.sd
                .encode_text_batch(texts)
                .with_context(|| format!("encoding captions {texts:?}"))?
        } else {
            let (mut ctx, mut pooled) = (vec![], vec![]);
            for t in texts {
                let (c, p) = self.text(t)?;
                ctx.push(c);
                if let Some(p) = p {
                    pooled.push(p);
                }
            }
            let pooled = if pooled.is_empty() {
                None
            } else {
                Some(Tensor::cat(&pooled, 0)?)
            };
            (Tensor::cat(&ctx, 0)?, pooled)
        };
        self.zero_empty(texts, ctx, pooled)
    }

    /// The training timesteps `lo..hi` (`min_timestep`, `max_timestep`
    /// within the schedule); the error names the setting.
    pub fn timestep_range(&self) -> Result<(usize, usize)> {
        let n = self.schedule.len();
        let hi = self.cfg.max_timestep.unwrap_or(n);
        ensure!(
            hi <= n,
            "max_timestep {hi} is past the model's {n}-step noise schedule"
        );
        ensure!(
            self.cfg.min_timestep < hi,
            "min_timestep {} must be below max_timestep {hi}",
            self.cfg.min_timestep
        );
        Ok((self.cfg.min_timestep, hi))
    }

    /// `n` training timesteps, uniform in the configured range; the
    /// update's smallest and largest are kept for its [`StepStats`].
    fn draw_timesteps(&mut self, n: usize) -> Result<Vec<usize>> {
        let (lo, hi) = self.timestep_range()?;
        let ts: Vec<usize> = (0..n)
            .map(|_| lo + self.state.rng.below((hi - lo) as u64) as usize)
            .collect();
        for &t in &ts {
            self.drawn = (self.drawn.0.min(t), self.drawn.1.max(t));
        }
        Ok(ts)
    }

    /// The crop/flip of image `idx` for this draw and its SDXL time ids
    /// (original size, crop corner, target size).
    fn choose_crop(&mut self, idx: usize) -> Result<(Variant, Vec<f32>)> {
        let res = self.cfg.resolution;
        let path = &self.dataset.samples[idx].image;
        let (w, h) =
            image::image_dimensions(path).with_context(|| format!("reading {}", path.display()))?;
        let v = choose_variant(
            w,
            h,
            res,
            self.cfg.crop,
            self.cfg.random_flip,
            &mut self.state.rng,
        );
        let ids = vec![
            h as f32, w as f32, v.y as f32, v.x as f32, res as f32, res as f32,
        ];
        Ok((v, ids))
    }

    /// The UNet's conditioning of a batch: the captions' embeddings and, for
    /// SDXL, the pooled embeddings with the time ids (one row per caption).
    fn condition(
        &mut self,
        texts: &[String],
        ids: &[Vec<f32>],
    ) -> Result<(Tensor, Option<SdxlAdded>)> {
        let dtype = self.sd.dtype();
        let device = self.sd.device().clone();
        let (context, pooled) = self.texts_batch(texts)?;
        let added = match pooled {
            None => None,
            Some(pooled) => Some(SdxlAdded {
                text_embeds: pooled.to_dtype(dtype)?,
                time_ids: Tensor::from_vec(ids.concat(), (ids.len(), 6), &device)?
                    .to_dtype(dtype)?,
            }),
        };
        Ok((context.to_dtype(dtype)?, added))
    }

    /// A latent of image `idx` in crop/flip `v`: a draw from its posterior.
    fn draw_latent(&mut self, idx: usize, v: Variant) -> Result<Tensor> {
        let (mean, std) = self.posterior(idx, v)?;
        let device = self.sd.device().clone();
        let z = self
            .state
            .rng
            .randn(mean.shape().clone(), 1.0, &device, DType::F32)?;
        let raw = (mean + (std * z)?)?;
        self.sd
            .vae
            .scale_latents(&raw.to_dtype(self.sd.vae.dtype())?)
    }

    /// One Diffusion-DPO micro-batch: `batch` preference pairs, winner and
    /// loser of a pair noised with the same noise at the same timestep; the
    /// reference errors come from the UNet with its adapters taken off (the
    /// frozen base), outside the graph. Captions are never dropped.
    fn dpo_micro_batch(&mut self) -> Result<(f64, Vec<Option<Tensor>>)> {
        let dtype = self.sd.dtype();
        let device = self.sd.device().clone();
        let (mut win, mut lose, mut texts, mut ids) = (vec![], vec![], vec![], vec![]);
        for _ in 0..self.cfg.batch {
            let pair = self.next_index();
            let (w_idx, l_idx) = (2 * pair, 2 * pair + 1);
            let (v, time_ids) = self.choose_crop(w_idx)?;
            win.push(self.draw_latent(w_idx, v)?);
            lose.push(self.draw_latent(l_idx, v)?);
            texts.push(self.dataset.samples[w_idx].text.clone());
            ids.push(time_ids);
        }
        win.extend(lose);
        let latents = Tensor::cat(&win, 0)?.to_dtype(dtype)?;
        let twice = [texts.clone(), texts].concat();
        let ids = [ids.clone(), ids].concat();
        let (context, added) = self.condition(&twice, &ids)?;
        let (b, c, hh, ww) = latents.dims4()?;
        let noise = self
            .state
            .rng
            .randn((b / 2, c, hh, ww), 1.0, &device, DType::F32)?;
        let noise = Tensor::cat(&[&noise, &noise], 0)?.to_dtype(dtype)?;
        let half = self.draw_timesteps(b / 2)?;
        let timesteps = [half.clone(), half].concat();
        let prediction = self.prediction();
        let policy = per_sample_loss(
            &self.sd.unet,
            &self.schedule,
            prediction,
            &latents,
            &noise,
            &timesteps,
            &context,
            added.as_ref(),
        )?;
        let schedule = &self.schedule;
        let reference = with_adapters_off(&mut self.sd.unet, |base| {
            per_sample_loss(
                base,
                schedule,
                prediction,
                &latents.detach(),
                &noise,
                &timesteps,
                &context.detach(),
                added.as_ref(),
            )
        })?
        .detach();
        let (loss, _) = dpo_loss(&policy, &reference, self.cfg.dpo_beta)?;
        self.finish_micro_batch(loss)
    }

    /// The loss value and the gradients of the trained tensors (optimizer
    /// order) of one micro-batch's loss; a non-finite loss is an error.
    fn finish_micro_batch(&mut self, loss: Tensor) -> Result<(f64, Vec<Option<Tensor>>)> {
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        ensure!(
            value.is_finite(),
            "loss is {value} at update {}",
            self.state.step + 1
        );
        let grads = loss.backward()?;
        let g = self
            .opt
            .params
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect();
        Ok((value, g))
    }

    /// One micro-batch: loss value and the gradients of the trained tensors (optimizer order).
    pub fn micro_batch(&mut self) -> Result<(f64, Vec<Option<Tensor>>)> {
        if self.cfg.objective == Objective::Dpo {
            return self.dpo_micro_batch();
        }
        let dtype = self.sd.dtype();
        let device = self.sd.device().clone();
        let (mut lat, mut texts, mut ids) = (vec![], vec![], vec![]);
        for _ in 0..self.cfg.batch {
            let idx = self.next_index();
            let (v, time_ids) = self.choose_crop(idx)?;
            lat.push(self.draw_latent(idx, v)?);
            let drop = self.cfg.caption_dropout > 0.0
                && self.state.rng.uniform() < self.cfg.caption_dropout;
            texts.push(if drop {
                String::new()
            } else {
                self.dataset.samples[idx].text.clone()
            });
            ids.push(time_ids);
        }
        let latents = Tensor::cat(&lat, 0)?.to_dtype(dtype)?;
        let (context, added) = self.condition(&texts, &ids)?;
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
        let timesteps = self.draw_timesteps(latents.dim(0)?)?;
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
        self.finish_micro_batch(loss)
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
            let (ctx, pooled) = if self.cfg.trains_text_encoder() {
                let (c, p) = self.sd.encode_text_batch(&[&text])?;
                (c.detach(), p.map(|p| p.detach()))
            } else {
                self.text(&text)?
            };
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
        self.drawn = (usize::MAX, 0);
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
        if let Some(e) = &mut self.ema {
            e.update(&self.opt.params)?;
        }
        self.state.step += 1;
        Ok(StepStats {
            step: self.state.step,
            loss: loss / self.cfg.grad_accum as f64,
            grad_norm,
            lr,
            timesteps: self.drawn,
        })
    }

    /// Every tensor a checkpoint holds: trained weights (LoRA factors or
    /// full weights), AdamW moments and, with EMA, the averages (`.ema`).
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut m = HashMap::new();
        for (i, name) in self.names.iter().enumerate() {
            m.insert(name.clone(), self.opt.params[i].as_tensor().clone());
            m.insert(format!("{name}.exp_avg"), self.opt.m[i].clone());
            m.insert(format!("{name}.exp_avg_sq"), self.opt.v[i].clone());
            if let Some(e) = &self.ema {
                m.insert(format!("{name}.ema"), e.shadow[i].clone());
            }
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
            names: self.names.clone(),
            ema_updates: self.ema.as_ref().map_or(0, |e| e.updates),
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
            text_encoder_targets,
            batch,
            grad_accum,
            resolution,
            seed,
            crop,
            random_flip,
            full,
            ema_decay,
            ema_warmup
        );
        if a.trains_text_encoder() != b.trains_text_encoder() {
            diffs.push(format!(
                "train_text_encoder (checkpoint {}, now {})",
                a.trains_text_encoder(),
                b.trains_text_encoder()
            ));
        }
        ensure!(
            diffs.is_empty(),
            "{}: cannot resume with different settings: {}",
            dir.display(),
            diffs.join(", ")
        );
        let names = self.names.clone();
        if self.cfg.full {
            full::check_names(&self.full, &st.names)
                .with_context(|| format!("{}", dir.display()))?;
        }
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
            if let Some(e) = &mut self.ema {
                e.shadow[i] = get(&format!("{name}.ema"))?;
            }
        }
        if let Some(e) = &mut self.ema {
            e.updates = st.ema_updates;
        }
        self.opt.step = st.adam_step;
        self.state = st.state;
        Ok(())
    }

    /// The trained adapters (current weights) as a LoRA file with rank/alpha/step metadata.
    pub fn lora_file(&self) -> Result<selma_lora::LoraFile> {
        let mut meta = BTreeMap::new();
        meta.insert("selma_steps".into(), self.state.step.to_string());
        meta.insert("selma_seed".into(), self.cfg.seed.to_string());
        meta.insert(
            "selma_base_model".into(),
            self.cfg.model.display().to_string(),
        );
        if let Some(e) = &self.ema {
            meta.insert("selma_ema_decay".into(), e.decay.to_string());
        }
        let mut file = self.lora.to_lora_file(&meta)?;
        for set in &self.te_lora {
            file.layers.extend(set.to_lora_file(&meta)?.layers);
        }
        Ok(file)
    }

    /// Runs `f` with the output weights in place (the EMA averages when EMA
    /// is on, else the current weights), then puts the exact current weights back.
    pub fn with_output_weights<R>(&mut self, f: impl FnOnce(&mut Self) -> Result<R>) -> Result<R> {
        let Some(shadow) = self.ema.as_ref().map(|e| e.shadow.clone()) else {
            return f(self);
        };
        let saved = snapshot(&self.opt.params)?;
        assign(&self.opt.params, &shadow)?;
        let r = f(self);
        assign(&self.opt.params, &saved)?;
        r
    }

    /// Runs `f` on the model with plain (frozen) copies of the fully trained
    /// parts swapped in (full mode) or with the adapters on detached views of
    /// their variables (LoRA mode), so sampling builds no autograd graph and
    /// takes the same path as inference.
    fn with_frozen_model<R>(&mut self, f: impl FnOnce(&StableDiffusion) -> Result<R>) -> Result<R> {
        if self.full.is_empty() {
            // Adapters on plain (detached) views of the variables: the
            // inference path `generate --lora` takes, with no graph.
            let mut saved = vec![];
            for_each_adapted(&mut self.sd, &mut |_, l| {
                for a in l.adapters_mut() {
                    saved.push((a.up.clone(), a.down.clone()));
                    a.up = a.up.detach();
                    a.down = a.down.detach();
                }
            });
            let r = f(&self.sd);
            let mut it = saved.into_iter();
            for_each_adapted(&mut self.sd, &mut |_, l| {
                for a in l.adapters_mut() {
                    if let Some((up, down)) = it.next() {
                        a.up = up;
                        a.down = down;
                    }
                }
            });
            return r;
        }
        let device = self.sd.device().clone();
        let mut unet = None;
        let mut te = None;
        let mut te2 = None;
        for part in &self.full {
            match part.component.as_str() {
                "unet" => unet = Some(full::frozen_unet(part, &self.sd.unet, &device)?),
                "text_encoder" => {
                    te = Some(full::frozen_text_encoder(
                        part,
                        &self.sd.text_encoder,
                        &device,
                    )?)
                }
                "text_encoder_2" => {
                    if let Some(t) = &self.sd.text_encoder_2 {
                        te2 = Some(full::frozen_text_encoder(part, t, &device)?)
                    }
                }
                other => bail!("unknown trained component {other}"),
            }
        }
        let unet = unet.map(|u| std::mem::replace(&mut self.sd.unet, u));
        let te = te.map(|t| std::mem::replace(&mut self.sd.text_encoder, t));
        let te2 = match (te2, &mut self.sd.text_encoder_2) {
            (Some(t), Some(slot)) => Some(std::mem::replace(slot, t)),
            _ => None,
        };
        let r = f(&self.sd);
        if let Some(u) = unet {
            self.sd.unet = u;
        }
        if let Some(t) = te {
            self.sd.text_encoder = t;
        }
        if let (Some(t), Some(slot)) = (te2, &mut self.sd.text_encoder_2) {
            *slot = t;
        }
        r
    }

    /// Runs `f` on a plain model holding the output weights (EMA when on):
    /// what `save_output` writes, for rendering and measuring.
    pub fn with_output_model<R>(
        &mut self,
        f: impl FnOnce(&StableDiffusion) -> Result<R>,
    ) -> Result<R> {
        self.with_output_weights(|t| t.with_frozen_model(f))
    }

    /// Saves the LoRA (output weights) to `cfg.out` in `cfg.format` (atomic).
    pub fn save_lora(&mut self) -> Result<()> {
        let fmt: selma_lora::LoraFormat = self.cfg.format.parse()?;
        if let Some(p) = self.cfg.out.parent() {
            if !p.as_os_str().is_empty() {
                std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
            }
        }
        let file = self.with_output_weights(|t| t.lora_file())?;
        file.save(&self.cfg.out, fmt)
            .with_context(|| format!("writing {}", self.cfg.out.display()))
    }

    /// Full mode: writes the diffusers folder `cfg.out` with the output
    /// weights (EMA when on); see [`full::write_model_folder`].
    pub fn save_model_folder(&mut self) -> Result<()> {
        ensure!(self.cfg.full, "save_model_folder needs full mode");
        let mut trained: BTreeMap<String, BTreeMap<String, Tensor>> = BTreeMap::new();
        let values = match &self.ema {
            Some(e) => e.shadow.clone(),
            None => self
                .opt
                .params
                .iter()
                .map(|p| p.as_tensor().clone())
                .collect(),
        };
        let mut i = 0;
        for part in &self.full {
            let m = trained.entry(part.component.clone()).or_default();
            for k in part.vars.keys() {
                m.insert(k.clone(), values[i].clone());
                i += 1;
            }
        }
        full::write_model_folder(&self.cfg.model, &self.cfg.out, &trained)
            .with_context(|| format!("writing the trained model to {}", self.cfg.out.display()))
    }

    /// Writes the run's output: the model folder (full mode) or the LoRA file.
    pub fn save_output(&mut self) -> Result<()> {
        if self.cfg.full {
            self.save_model_folder()
        } else {
            self.save_lora()
        }
    }

    /// Renders every validation prompt (DDIM, guidance 7.5, seed = prompt
    /// index, training resolution) with the output weights into
    /// `<run_dir>/validation/step-<N>-<i>.png`; returns the files written.
    pub fn render_validation(&mut self) -> Result<Vec<PathBuf>> {
        use selma_diffusion::pipeline::{GenerateRequest, InitNoise};
        use selma_diffusion::scheduler::{SamplerOptions, SchedulerKind};
        let dir = self.cfg.run_dir().join("validation");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let res = self.cfg.resolution as usize;
        let prompts = self.cfg.validation_prompts.clone();
        let steps = self.cfg.validation_steps;
        let step = self.state.step;
        let images = self.with_output_model(|sd| {
            prompts
                .iter()
                .enumerate()
                .map(|(i, prompt)| {
                    let req = GenerateRequest {
                        prompt: prompt.clone(),
                        negative: String::new(),
                        steps,
                        guidance: 7.5,
                        scheduler: SchedulerKind::Ddim,
                        sampler: SamplerOptions::default(),
                        width: res,
                        height: res,
                        batch: 1,
                        init: InitNoise::Seed(i as u64),
                        noise_seed: i as u64,
                    };
                    Ok(sd
                        .generate(&req, &mut |_, _| {})
                        .with_context(|| format!("rendering validation prompt {prompt:?}"))?
                        .remove(0))
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let mut out = vec![];
        for (i, (prompt, img)) in prompts.iter().zip(images).enumerate() {
            let path = dir.join(format!("step-{step}-{i}.png"));
            let params = format!(
                "{prompt}\nSteps: {steps}, Sampler: ddim, CFG scale: 7.5, Seed: {i}, step: {step}"
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
    /// `on_step` sees each update (progress bars). Saves the output at the end.
    pub fn run(&mut self, mut on_step: impl FnMut(&StepStats)) -> Result<()> {
        let run_dir = self.cfg.run_dir();
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        let log_path = run_dir.join("loss.jsonl");
        trim_loss_log(&log_path, self.state.step)?;
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
        self.save_output()
    }
}

/// Keeps only the lines of a loss log up to update `step` (atomically), so a
/// resumed run (or a fresh one in a used run folder) logs each update once.
fn trim_loss_log(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if kept.len() == text.len() {
        return Ok(());
    }
    selma_io::write_atomic(path, kept.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::trim_loss_log;

    #[test]
    fn trimming_keeps_each_update_up_to_the_checkpoint_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("loss.jsonl");
        let line = |s: u64| format!("{{\"step\":{s},\"loss\":0.5}}\n");
        let text: String = (1..=5).map(line).collect();
        std::fs::write(&p, &text).unwrap();
        trim_loss_log(&p, 5).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), text);
        trim_loss_log(&p, 3).unwrap();
        let kept: String = (1..=3).map(line).collect();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), kept);
        trim_loss_log(&p, 0).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "");
        trim_loss_log(&dir.path().join("missing.jsonl"), 2).unwrap();
    }
}
