//! Batched text-to-image sampling of many different prompts at once, each
//! with its own noise seed (the pipeline's `generate` batches one prompt).
//! Image `k` of a batch uses the generator seeded `seeds[k]`, exactly as
//! `selma generate --prompt P --seed S` seeds its single image, so a sample
//! can be re-rendered alone.

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use selma_diffusion::pipeline::{RgbImage, StableDiffusion};
use selma_diffusion::scheduler::{
    self, BatchNoise, GaussianRng, NoiseSource, SamplerOptions, SchedulerKind,
};
use selma_diffusion::vae::to_rgb8;
use std::collections::HashMap;

/// How every image is sampled.
#[derive(Debug, Clone, Copy)]
pub struct SampleSettings {
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale (<= 1: off).
    pub guidance: f64,
    /// Sampler.
    pub scheduler: SchedulerKind,
    /// DDIM eta (0: deterministic).
    pub eta: f64,
}

/// A loaded model plus a cache of prompt embeddings.
pub struct Renderer {
    /// The model (LoRAs already attached or merged).
    pub sd: StableDiffusion,
    width: usize,
    height: usize,
    texts: HashMap<String, Tensor>,
}

impl Renderer {
    /// Wrap a loaded model; the image size is the UNet's native one.
    pub fn new(sd: StableDiffusion) -> Result<Self> {
        ensure!(
            sd.text_encoder_2.is_none(),
            "{}: batched evaluation supports single-text-encoder (SD 1.x/2.x style) models",
            sd.dir.display()
        );
        let f = sd.vae_scale();
        let s = sd.unet.config().sample_size.unwrap_or(64) * f;
        Ok(Self {
            sd,
            width: s,
            height: s,
            texts: HashMap::new(),
        })
    }

    /// Image side lengths (width, height).
    pub fn size(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    fn context(&mut self, prompt: &str) -> Result<Tensor> {
        if let Some(t) = self.texts.get(prompt) {
            return Ok(t.clone());
        }
        let (c, _) = self
            .sd
            .encode_text(prompt)
            .with_context(|| format!("encoding the prompt {prompt:?}"))?;
        self.texts.insert(prompt.to_string(), c.clone());
        Ok(c)
    }

    /// Render `prompts[k]` from noise seeded `seeds[k]`, all in one batch.
    pub fn render(
        &mut self,
        prompts: &[&str],
        seeds: &[u64],
        s: &SampleSettings,
    ) -> Result<Vec<RgbImage>> {
        ensure!(prompts.len() == seeds.len(), "one seed per prompt");
        let b = prompts.len();
        if b == 0 {
            return Ok(Vec::new());
        }
        let f = self.sd.vae_scale();
        let (lh, lw) = (self.height / f, self.width / f);
        let lc = self.sd.unet.config().in_channels;
        let device: Device = self.sd.device().clone();
        let mut sched = scheduler::build(
            s.scheduler,
            &self.sd.scheduler_config,
            s.steps,
            SamplerOptions {
                eta: s.eta,
                karras: None,
            },
        )?;
        let guided = s.guidance > 1.0;
        let mut ctx = Vec::with_capacity(2 * b);
        if guided {
            let u = if self.sd.force_zeros_for_empty_prompt {
                self.context("")?.zeros_like()?
            } else {
                self.context("")?
            };
            ctx.extend(std::iter::repeat_n(u, b));
        }
        for p in prompts {
            ctx.push(self.context(p)?);
        }
        let ctx = Tensor::cat(&ctx, 0)?;
        let mul = if guided { 2 } else { 1 };

        let mut noise = BatchNoise {
            rngs: seeds.iter().map(|&x| GaussianRng::new(x)).collect(),
        };
        let like = Tensor::zeros((b, lc, lh, lw), DType::F32, &Device::Cpu)?;
        let init = noise.noise_like(&like)?;
        let mut latents = (init.to_device(&device)? * sched.init_noise_sigma())?;
        let timesteps = sched.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            let x = sched.scale_model_input(&latents, i)?;
            let x = if guided {
                Tensor::cat(&[&x, &x], 0)?
            } else {
                x
            };
            let ts = Tensor::from_vec(vec![t as f32; b * mul], b * mul, &device)?;
            let out = self
                .sd
                .unet
                .forward(&x.to_dtype(self.sd.dtype())?, &ts, &ctx, None)?
                .to_dtype(DType::F32)?;
            let pred = if guided {
                let u = out.narrow(0, 0, b)?;
                let c = out.narrow(0, b, b)?;
                (&u + ((c - &u)? * s.guidance)?)?
            } else {
                out
            };
            latents = sched.step(&pred, i, &latents, &mut noise)?;
        }
        let images = self.sd.vae.decode_latents(&latents)?;
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
}
