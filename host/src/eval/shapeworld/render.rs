//! A loaded model that renders many different prompts at once, each with
//! its own noise seed, through `StableDiffusion::sample_prompts` (the
//! pipeline's `generate` batches one prompt). Image `k` of a batch uses the
//! generator seeded `seeds[k]`, exactly as `selma generate --prompt P --seed
//! S` seeds its single image, so a sample can be re-rendered alone.

use anyhow::{ensure, Result};
use selma_diffusion::pipeline::{RgbImage, Sampling, StableDiffusion};
use selma_diffusion::scheduler::{SamplerOptions, SchedulerKind};
use selma_diffusion::vae::to_rgb8;

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

/// A loaded model rendering at its UNet's native image size.
pub struct Renderer {
    /// The model (LoRAs already attached or merged).
    pub sd: StableDiffusion,
    width: usize,
    height: usize,
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
        })
    }

    /// Image side lengths (width, height).
    pub fn size(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    /// Render `prompts[k]` from noise seeded `seeds[k]`, all in one batch.
    pub fn render(
        &mut self,
        prompts: &[&str],
        seeds: &[u64],
        s: &SampleSettings,
    ) -> Result<Vec<RgbImage>> {
        ensure!(prompts.len() == seeds.len(), "one seed per prompt");
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let sampling = Sampling {
            negative: String::new(),
            steps: s.steps,
            guidance: s.guidance,
            scheduler: s.scheduler,
            sampler: SamplerOptions {
                eta: s.eta,
                karras: None,
            },
            width: self.width,
            height: self.height,
        };
        let latents = self
            .sd
            .sample_prompts(prompts, seeds, &sampling, &mut |_, _| {})?;
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
