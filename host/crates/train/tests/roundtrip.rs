//! Must-show 5 (library level): a trained LoRA saved as peft and as kohya,
//! loaded back into a fresh model as runtime adapters, renders the same
//! image bytes as the in-memory adapters; the LoRA visibly changes the image.

use crate::common;

use candle_core::{DType, Device};
use selma_diffusion::nn::Adaptable;
use selma_diffusion::pipeline::{GenerateRequest, InitNoise, StableDiffusion};
use selma_diffusion::scheduler::{SamplerOptions, SchedulerKind};
use selma_lora::{LoraFile, LoraFormat};
use selma_train::trainer::Trainer;

fn render(sd: &StableDiffusion) -> Vec<u8> {
    let req = GenerateRequest {
        prompt: "a checkered pattern number 0".into(),
        negative: String::new(),
        steps: 4,
        guidance: 3.0,
        scheduler: SchedulerKind::Ddim,
        sampler: SamplerOptions::default(),
        width: 64,
        height: 64,
        batch: 1,
        init: InitNoise::Seed(7),
        noise_seed: 0,
    };
    sd.generate(&req, &mut |_, _| {}).unwrap().remove(0).pixels
}

#[test]
fn peft_and_kohya_files_render_like_the_in_memory_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path());
    let data = common::dataset(dir.path(), 2);
    let mut cfg = common::small_config(&model, &data, &dir.path().join("e.safetensors"));
    cfg.steps = 8;
    cfg.lr = 2e-2;
    cfg.save_every = 0;
    cfg.validation_prompts = vec!["a checkered pattern number 0".into()];
    cfg.validation_every = 4;
    cfg.validation_steps = 2;
    let run_dir = cfg.run_dir();
    let mut t = Trainer::new(cfg).unwrap();
    t.run(|_| {}).unwrap();
    // Validation renders at updates 4 and 8; they differ as the LoRA trains.
    let v4 = std::fs::read(run_dir.join("validation/step-4-0.png")).unwrap();
    let v8 = std::fs::read(run_dir.join("validation/step-8-0.png")).unwrap();
    assert_ne!(v4, v8);

    // In-memory adapters, detached from the variables (plain inference path).
    t.sd.unet.visit_adaptable("", &mut |_, l| {
        for a in l.adapters_mut() {
            a.up = a.up.copy().unwrap().detach();
            a.down = a.down.copy().unwrap().detach();
        }
    });
    let in_memory = render(&t.sd);
    let file = t.lora_file().unwrap();

    let base = StableDiffusion::load(&model, &Device::Cpu, DType::F32).unwrap();
    let plain = render(&base);
    let changed = plain.iter().zip(&in_memory).filter(|(a, b)| a != b).count();
    assert!(changed > 100, "the LoRA changes only {changed} bytes");

    for fmt in [LoraFormat::Peft, LoraFormat::Kohya] {
        let path = dir.path().join(format!("{fmt:?}.safetensors"));
        file.save(&path, fmt).unwrap();
        let loaded = LoraFile::load(&path, &Device::Cpu).unwrap();
        let mut sd = StableDiffusion::load(&model, &Device::Cpu, DType::F32).unwrap();
        let n = sd.attach_lora(&loaded, 1.0).unwrap();
        assert_eq!(n, t.lora.layers.len());
        assert_eq!(render(&sd), in_memory, "{fmt:?} file renders differently");
    }
}
