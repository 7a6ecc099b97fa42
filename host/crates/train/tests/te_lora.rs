//! Text-encoder LoRA (`train_text_encoder` without `full`): adapters on the
//! CLIP attention projections train beside the UNet's (every one gets a
//! gradient), the written file (peft and kohya) holds both components and
//! renders, through `attach_lora`, exactly like the trainer's output weights,
//! and an interrupted run resumes bit-identically.

use crate::common;

use candle_core::{DType, Device};
use selma_diffusion::pipeline::StableDiffusion;
use selma_lora::LoraFile;
use selma_train::trainer::{TrainConfig, Trainer};

fn config(dir: &std::path::Path, out: &str) -> TrainConfig {
    let mut cfg = common::config_in(dir, out);
    cfg.train_text_encoder = Some(true);
    cfg.lr = 1e-2;
    cfg.grad_accum = 1;
    cfg
}

fn render(sd: &StableDiffusion) -> Vec<u8> {
    common::render(sd, "a checkered pattern number 2", 3)
}

fn flat(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn abs_sum(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn text_encoder_adapters_train_and_round_trip_through_peft_and_kohya_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "te.safetensors");
    cfg.steps = 3;
    cfg.ema_decay = 0.5;
    cfg.save_every = 0;
    let mut t = Trainer::new(cfg.clone()).unwrap();
    assert_eq!(t.te_lora.len(), 1);
    let te = &t.te_lora[0];
    // Four projections in each encoder layer of the tiny model.
    assert!(!te.layers.is_empty() && te.layers.len().is_multiple_of(4));
    assert!(te.layers.iter().all(|l| l.path.ends_with("_proj")));
    t.run(|_| {}).unwrap();
    // `up` starts at zero: a non-zero `up` means a gradient reached it.
    for l in t.te_lora[0].layers.iter().chain(&t.lora.layers) {
        assert!(abs_sum(l.up.as_tensor()) > 0.0, "{} got no update", l.path);
    }
    // Captions were encoded in the graph, not from the cache.
    assert!(t.text_encoder_calls >= 3 * cfg.batch as u64);

    let in_memory = t
        .with_output_model(|sd| Ok(render(sd)))
        .expect("render the output weights");
    let base = StableDiffusion::load(&cfg.model, &Device::Cpu, DType::F32).unwrap();
    assert!(render(&base) != in_memory, "training changed nothing");

    // The peft file holds both components; loaded, it renders identically.
    let file = LoraFile::load(&cfg.out, &Device::Cpu).unwrap();
    let n_te = file
        .layers
        .keys()
        .filter(|k| k.starts_with("text_encoder."))
        .count();
    assert_eq!(n_te, t.te_lora[0].layers.len());
    assert_eq!(file.layers.len(), n_te + t.lora.layers.len());
    let mut sd = StableDiffusion::load(&cfg.model, &Device::Cpu, DType::F32).unwrap();
    sd.attach_lora(&file, 1.0).unwrap();
    assert!(
        render(&sd) == in_memory,
        "the peft file renders differently"
    );
    // The file holds the EMA weights (they differ from the current ones).
    let nu = t.lora.vars().len();
    let shadow = &t.ema.as_ref().unwrap().shadow;
    let l = &file.layers[&format!("text_encoder.{}", t.te_lora[0].layers[0].path)];
    assert_eq!(flat(&l.up), flat(&shadow[nu + 1]));
    assert_ne!(flat(&l.up), flat(t.te_lora[0].layers[0].up.as_tensor()));

    // Same through kohya's layout (`lora_te_` keys).
    let kohya = dir.path().join("te-kohya.safetensors");
    let f = t.with_output_weights(|t| t.lora_file()).unwrap();
    f.save(&kohya, "kohya".parse().unwrap()).unwrap();
    let names = {
        let bytes = std::fs::read(&kohya).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.names().into_iter().map(String::from).collect::<Vec<_>>()
    };
    assert!(names.iter().any(|k| k.starts_with("lora_te_")), "{names:?}");
    assert!(names.iter().any(|k| k.starts_with("lora_unet_")));
    let mut sd = StableDiffusion::load(&cfg.model, &Device::Cpu, DType::F32).unwrap();
    sd.attach_lora(&LoraFile::load(&kohya, &Device::Cpu).unwrap(), 1.0)
        .unwrap();
    assert!(
        render(&sd) == in_memory,
        "the kohya file renders differently"
    );
}

#[test]
fn text_encoder_lora_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = config(dir.path(), "a/te.safetensors");
    a.steps = 6;
    a.save_every = 0;
    let mut ta = Trainer::new(a.clone()).unwrap();
    ta.run(|_| {}).unwrap();

    let mut b = config(dir.path(), "b/te.safetensors");
    b.steps = 3;
    b.save_every = 3;
    Trainer::new(b.clone()).unwrap().run(|_| {}).unwrap();
    b.steps = 6;
    let mut tb = Trainer::new(b.clone()).unwrap();
    tb.resume(&b.run_dir()).unwrap();
    assert_eq!(tb.state.step, 3);
    tb.run(|_| {}).unwrap();
    let (fa, fb) = (
        std::fs::read(&a.out).unwrap(),
        std::fs::read(&b.out).unwrap(),
    );
    assert!(
        fa == fb,
        "resumed text-encoder LoRA differs from the straight run"
    );
}

#[test]
fn text_encoder_targets_that_match_nothing_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "bad.safetensors");
    cfg.text_encoder_targets = vec!["to_q".into()];
    let e = format!("{:#}", Trainer::new(cfg).err().unwrap());
    assert!(
        e.contains("text_encoder") && e.contains("--text-encoder-targets to_q"),
        "{e}"
    );
}
