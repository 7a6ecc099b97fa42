//! Rendering one image of the run's student or teacher to a PNG with its
//! generation parameters, and how many samplers run side by side: shared by
//! the images stage (teacher images) and the eval stage (variant images).

use crate::pipeline::plan::Plan;
use anyhow::{Context, Result};
use selma_diffusion::pipeline::StableDiffusion;
use std::path::Path;

/// The run's image size: `[images]` width/height, else the model's native size.
pub fn image_size(plan: &Plan, sd: &StableDiffusion) -> (usize, usize) {
    let im = &plan.loaded.cfg.images;
    let native = sd.unet.config().sample_size.unwrap_or(64) * sd.vae_scale();
    (im.width.unwrap_or(native), im.height.unwrap_or(native))
}

/// Render one image and write it (atomically) as a PNG with its parameters.
#[allow(clippy::too_many_arguments)]
pub fn render_png(
    sd: &StableDiffusion,
    plan: &Plan,
    prompt: &str,
    seed: u64,
    steps: usize,
    guidance: f64,
    out: &Path,
    note: &str,
) -> Result<()> {
    use selma_diffusion::pipeline::{GenerateRequest, InitNoise};
    use selma_diffusion::scheduler::{SamplerOptions, SchedulerKind};
    let im = &plan.loaded.cfg.images;
    let (w, h) = image_size(plan, sd);
    let scheduler: SchedulerKind = im.scheduler.get_ref().parse()?;
    let req = GenerateRequest {
        prompt: prompt.to_string(),
        negative: im.negative.clone(),
        steps,
        guidance,
        scheduler,
        sampler: SamplerOptions {
            eta: im.eta,
            karras: None,
        },
        width: w,
        height: h,
        batch: 1,
        init: InitNoise::Seed(seed),
        noise_seed: seed,
    };
    let img = sd
        .generate(&req, &mut |_, _| {})
        .with_context(|| format!("rendering {prompt:?}"))?
        .remove(0);
    let params = format!(
        "{prompt}\nSteps: {steps}, Sampler: {scheduler}, CFG scale: {guidance}, Seed: {seed}, Size: {}x{}, {note}",
        img.width, img.height
    );
    selma_diffusion::image_io::write_png(out, img.width, img.height, &img.pixels, &params)
}

/// How many images to render at once. On the CPU a small model's GEMMs
/// (latents of at most 32x32) keep one core busy and leave the others idle,
/// so one sampler runs per core (measured on ShapeWorld: 2 threads inside one
/// sampler were no faster than 1); a large model's GEMMs already use every
/// core, and a GPU runs one sampler.
pub fn samplers(plan: &Plan, sd: &StableDiffusion) -> usize {
    let (f, (w, h)) = (sd.vae_scale(), image_size(plan, sd));
    if !sd.device().is_cpu() || (w / f) * (h / f) > 32 * 32 {
        return 1;
    }
    super::cpu_cores()
}

/// Read a PNG as the runtime's image type.
pub fn read_rgb(path: &Path) -> Result<selma_runtime::RgbImage> {
    let png = selma_diffusion::image_io::read_png(path)?;
    Ok(selma_runtime::RgbImage {
        width: png.width as u32,
        height: png.height as u32,
        pixels: png.rgb,
        non_finite: 0.0,
    })
}
