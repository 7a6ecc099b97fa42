//! `selma model init` layouts and the sampling pipeline on the tiny model:
//! init's key lists equal the real SD checkpoints', init is byte-deterministic,
//! the tiny folder loads completely, and sampling is reproducible (seeds,
//! batches, `--latents`-style initial noise).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use selma_diffusion::init::{clip_param_shapes, init_model, unet_param_shapes, Preset};
use selma_diffusion::pipeline::{GenerateRequest, InitNoise, Sampling, StableDiffusion};
use selma_diffusion::scheduler::{GaussianRng, SamplerOptions, SchedulerKind};

fn fixture(model: &str, part: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sd-layouts")
        .join(model)
        .join(part)
}

fn key_lines(path: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

fn fmt(v: Vec<(String, Vec<usize>)>) -> BTreeSet<String> {
    v.into_iter().map(|(k, s)| format!("{k} {s:?}")).collect()
}

#[test]
fn init_unet_and_clip_layouts_equal_the_real_checkpoints() {
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("sdxl", "unet").join("config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        fmt(unet_param_shapes(&cfg).unwrap()),
        key_lines(&fixture("sdxl", "unet").join("keys.txt")),
        "sdxl unet"
    );
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("sdxl", "text_encoder_2").join("config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        fmt(clip_param_shapes(&cfg, "text_model.", true).unwrap()),
        key_lines(&fixture("sdxl", "text_encoder_2").join("keys.txt")),
        "sdxl text_encoder_2"
    );
    for m in ["sd15", "sd21"] {
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(m, "unet").join("config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            fmt(unet_param_shapes(&cfg).unwrap()),
            key_lines(&fixture(m, "unet").join("keys.txt")),
            "{m} unet"
        );
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(m, "text_encoder").join("config.json")).unwrap(),
        )
        .unwrap();
        // The fixtures list the keys without transformers' `text_model.` prefix.
        let ours: BTreeSet<String> = fmt(clip_param_shapes(&cfg, "", false).unwrap())
            .into_iter()
            .filter(|k| !k.starts_with("embeddings.position_ids"))
            .collect();
        let real: BTreeSet<String> = key_lines(&fixture(m, "text_encoder").join("keys.txt"))
            .into_iter()
            .map(|k| k.trim_start_matches("text_model.").to_string())
            .filter(|k| !k.starts_with("embeddings.position_ids"))
            .collect();
        assert_eq!(ours, real, "{m} text encoder");
    }
}

fn tiny(dir: &Path, seed: u64) -> PathBuf {
    let out = dir.join(format!("tiny-{seed}"));
    init_model(Preset::Tiny, &out, seed).unwrap();
    out
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![];
    for sub in ["", "unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        let d = dir.join(sub);
        let mut names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        names.sort();
        for p in names {
            out.push((
                p.strip_prefix(dir).unwrap().display().to_string(),
                std::fs::read(&p).unwrap(),
            ));
        }
    }
    out
}

#[test]
fn tiny_init_is_deterministic_and_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tiny(tmp.path(), 1);
    let b = tmp.path().join("again");
    init_model(Preset::Tiny, &b, 1).unwrap();
    let c = tiny(tmp.path(), 2);
    let (fa, fb, fc) = (files(&a), files(&b), files(&c));
    let names: Vec<&str> = fa.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(names.contains(&want), "missing {want}: {names:?}");
    }
    assert_eq!(fa, fb, "same seed must give the same bytes");
    let unet = |f: &[(String, Vec<u8>)]| {
        f.iter()
            .find(|(n, _)| n == "unet/diffusion_pytorch_model.safetensors")
            .unwrap()
            .1
            .clone()
    };
    assert_ne!(unet(&fa), unet(&fc), "another seed must give other weights");
    // refuses to overwrite a non-empty folder
    assert!(init_model(Preset::Tiny, &a, 1).is_err());
}

fn request(init: InitNoise, batch: usize, kind: SchedulerKind) -> GenerateRequest {
    GenerateRequest {
        prompt: "a red cube on a blue table".into(),
        negative: "blurry".into(),
        steps: 3,
        guidance: 7.5,
        scheduler: kind,
        sampler: SamplerOptions::default(),
        width: 64,
        height: 64,
        batch,
        init,
        noise_seed: 0,
    }
}

#[test]
fn tiny_model_loads_and_samples_reproducibly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny(tmp.path(), 3);
    // load() checks that every weight file is consumed completely
    let sd = StableDiffusion::load(&dir, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(sd.vae_scale(), 8);
    let mut steps = vec![];
    let a = sd
        .generate(
            &request(InitNoise::Seed(5), 1, SchedulerKind::Ddim),
            &mut |i, n| steps.push((i, n)),
        )
        .unwrap();
    assert_eq!(steps, vec![(1, 3), (2, 3), (3, 3)]);
    assert_eq!(
        (a[0].width, a[0].height, a[0].pixels.len()),
        (64, 64, 64 * 64 * 3)
    );
    let b = sd
        .generate(
            &request(InitNoise::Seed(5), 1, SchedulerKind::Ddim),
            &mut |_, _| {},
        )
        .unwrap();
    assert_eq!(a[0].pixels, b[0].pixels, "same seed, same image");
    let c = sd
        .generate(
            &request(InitNoise::Seed(6), 1, SchedulerKind::Ddim),
            &mut |_, _| {},
        )
        .unwrap();
    assert_ne!(a[0].pixels, c[0].pixels, "another seed, another image");
    // batch element i equals a single image seeded seed + i
    let batch = sd
        .generate(
            &request(InitNoise::Seed(5), 2, SchedulerKind::Ddim),
            &mut |_, _| {},
        )
        .unwrap();
    let close = |x: &[u8], y: &[u8]| {
        x.iter()
            .zip(y)
            .all(|(p, q)| (*p as i32 - *q as i32).abs() <= 1)
    };
    assert!(close(&batch[0].pixels, &a[0].pixels));
    assert!(close(&batch[1].pixels, &c[0].pixels));
    // initial noise from a tensor equals the seeded noise it was drawn from
    let z = GaussianRng::new(5)
        .randn((1, 4, 8, 8), &Device::Cpu, DType::F32)
        .unwrap();
    for kind in [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::DpmPp2M,
    ] {
        let from_seed = sd
            .sample_latents(&request(InitNoise::Seed(5), 1, kind), &mut |_, _| {})
            .unwrap();
        let from_file = sd
            .sample_latents(
                &request(InitNoise::Latents(z.clone()), 1, kind),
                &mut |_, _| {},
            )
            .unwrap();
        let d = (from_seed - from_file)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{kind}: {d}");
    }
    // the wrong latent shape is refused with the expected shape in the message
    let bad = Tensor::zeros((1, 4, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let e = sd
        .generate(
            &request(InitNoise::Latents(bad), 1, SchedulerKind::Ddim),
            &mut |_, _| {},
        )
        .unwrap_err();
    assert!(format!("{e:#}").contains("[1, 4, 8, 8]"), "{e:#}");
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The [`Sampling`] of `request(..)` with another negative prompt.
fn sampling(kind: SchedulerKind, negative: &str) -> Sampling {
    let r = request(InitNoise::Seed(0), 1, kind);
    Sampling {
        negative: negative.into(),
        steps: r.steps,
        guidance: r.guidance,
        scheduler: kind,
        sampler: r.sampler,
        width: r.width,
        height: r.height,
    }
}

#[test]
fn several_prompts_in_one_batch_match_one_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let sd = StableDiffusion::load(&tiny(tmp.path(), 3), &Device::Cpu, DType::F32).unwrap();
    let prompts = ["a red cube on a blue table", "two green spheres"];
    for kind in [SchedulerKind::Ddim, SchedulerKind::EulerAncestral] {
        let s = sampling(kind, "blurry");
        let mut steps = 0;
        let many = sd
            .sample_prompts(&prompts, &[5, 9], &s, &mut |_, _| steps += 1)
            .unwrap();
        assert_eq!(many.dims(), &[2, 4, 8, 8]);
        assert_eq!(steps, 3);
        for (k, (p, seed)) in prompts.iter().zip([5, 9]).enumerate() {
            let mut req = request(InitNoise::Seed(seed), 1, kind);
            req.prompt = p.to_string();
            let one = sd.sample_latents(&req, &mut |_, _| {}).unwrap();
            let d = max_diff(&many.narrow(0, k, 1).unwrap(), &one);
            assert!(d < 1e-4, "{kind} image {k}: {d}");
        }
        // one prompt under seeds s, s + 1 is exactly a batch seeded s
        let twice = sd
            .sample_prompts(&[prompts[0]; 2], &[5, 6], &s, &mut |_, _| {})
            .unwrap();
        let batch = sd
            .sample_latents(&request(InitNoise::Seed(5), 2, kind), &mut |_, _| {})
            .unwrap();
        assert_eq!(max_diff(&twice, &batch), 0.0, "{kind}");
    }
    let e = sd
        .sample_prompts(
            &prompts,
            &[1],
            &sampling(SchedulerKind::Ddim, ""),
            &mut |_, _| {},
        )
        .unwrap_err();
    assert!(format!("{e:#}").contains("one seed per prompt"), "{e:#}");
}

#[test]
fn tiny_xl_model_loads_and_samples_reproducibly() {
    use selma_diffusion::pipeline::Family;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("xl");
    init_model(Preset::TinyXl, &dir, 4).unwrap();
    let sd = StableDiffusion::load(&dir, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(sd.family, Family::Sdxl);
    assert!(sd.force_zeros_for_empty_prompt);
    // pooled embeds + time ids reach the UNet; an empty negative prompt
    // takes SDXL's zero-embedding path
    let mut req = request(InitNoise::Seed(1), 1, SchedulerKind::Euler);
    req.negative = String::new();
    let a = sd.generate(&req, &mut |_, _| {}).unwrap();
    let b = sd.generate(&req, &mut |_, _| {}).unwrap();
    assert_eq!(a[0].pixels, b[0].pixels);
    req.init = InitNoise::Seed(2);
    let c = sd.generate(&req, &mut |_, _| {}).unwrap();
    assert_ne!(a[0].pixels, c[0].pixels);
    let cond = sd.conditioning("a cube", "", 1, true).unwrap();
    assert_eq!(cond.context.dims(), &[2, 77, 64]);
    assert_eq!(cond.pooled.as_ref().unwrap().dims(), &[2, 32]);
    let zero = cond
        .context
        .get(0)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(zero, 0.0, "force_zeros_for_empty_prompt");
    // several prompts in one batch carry their own pooled embeds
    let many = sd
        .sample_prompts(
            &["a cube", "a ball"],
            &[1, 2],
            &sampling(SchedulerKind::Euler, ""),
            &mut |_, _| {},
        )
        .unwrap();
    for (k, (p, seed)) in [("a cube", 1), ("a ball", 2)].into_iter().enumerate() {
        req.prompt = p.into();
        req.init = InitNoise::Seed(seed);
        let one = sd.sample_latents(&req, &mut |_, _| {}).unwrap();
        let d = max_diff(&many.narrow(0, k, 1).unwrap(), &one);
        assert!(d < 1e-4, "xl image {k}: {d}");
    }
}

#[test]
fn png_round_trip_keeps_pixels_and_parameters() {
    use selma_diffusion::image_io::{read_png, write_png, GenerationParams};
    let tmp = tempfile::tempdir().unwrap();
    let (w, h) = (5, 3);
    let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 17 % 256) as u8).collect();
    let params = GenerationParams {
        prompt: "a red cube".into(),
        negative: "blurry".into(),
        steps: 20,
        sampler: "euler".into(),
        guidance: 7.5,
        seed: Some(42),
        size: (w, h),
        model: "tiny".into(),
        extra: vec![("Lora".into(), "style.safetensors:0.8".into())],
    };
    let text = params.to_text();
    assert_eq!(
        text,
        "a red cube\nNegative prompt: blurry\nSteps: 20, Sampler: euler, CFG scale: 7.5, Seed: 42, Size: 5x3, Model: tiny, Lora: style.safetensors:0.8"
    );
    let p = tmp.path().join("x.png");
    write_png(&p, w, h, &rgb, &text).unwrap();
    let back = read_png(&p).unwrap();
    assert_eq!((back.width, back.height), (w, h));
    assert_eq!(back.rgb, rgb);
    assert_eq!(back.parameters.as_deref(), Some(text.as_str()));
    // non-Latin-1 text goes to an iTXt chunk and comes back intact
    let utf8 = "一只红色的立方体 🟥";
    write_png(&p, w, h, &rgb, utf8).unwrap();
    assert_eq!(read_png(&p).unwrap().parameters.as_deref(), Some(utf8));
    // a wrong buffer size is refused and leaves no file behind
    let q = tmp.path().join("bad.png");
    assert!(write_png(&q, w, h, &rgb[1..], "x").is_err());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

/// Our whole pipeline (tokenizer, CLIP, UNet, VAE, schedulers, guidance, SDXL
/// conditioning) against images rendered by diffusers 0.42.1 from the same
/// folders and latents (see tests/fixtures/diffusers-ref/README.md).
#[test]
fn matches_diffusers_reference_images() {
    use selma_diffusion::image_io::read_png;
    let refs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers-ref");
    let lat =
        selma_diffusion::pipeline::load_latents_file(&refs.join("latents.safetensors")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (sd1, xl) = (tmp.path().join("tiny"), tmp.path().join("xl"));
    init_model(Preset::Tiny, &sd1, 0).unwrap();
    init_model(Preset::TinyXl, &xl, 0).unwrap();
    let sd1 = StableDiffusion::load(&sd1, &Device::Cpu, DType::F32).unwrap();
    let xl = StableDiffusion::load(&xl, &Device::Cpu, DType::F32).unwrap();
    let mut req = request(InitNoise::Latents(lat), 1, SchedulerKind::Ddim);
    req.steps = 10;
    let cases = [
        (
            "ref-ddim.png",
            &sd1,
            SchedulerKind::Ddim,
            false,
            "blurry",
            7.5,
        ),
        (
            "ref-dpm.png",
            &sd1,
            SchedulerKind::DpmPp2M,
            false,
            "blurry",
            7.5,
        ),
        (
            "ref-dpm-karras.png",
            &sd1,
            SchedulerKind::DpmPp2M,
            true,
            "blurry",
            7.5,
        ),
        (
            "ref-sdxl-euler.png",
            &xl,
            SchedulerKind::Euler,
            false,
            "",
            5.0,
        ),
    ];
    for (file, model, kind, karras, negative, guidance) in cases {
        req.scheduler = kind;
        req.sampler.karras = Some(karras).filter(|k| *k);
        req.negative = negative.into();
        req.guidance = guidance;
        let ours = model.generate(&req, &mut |_, _| {}).unwrap();
        let want = read_png(&refs.join(file)).unwrap();
        let max = ours[0]
            .pixels
            .iter()
            .zip(&want.rgb)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        assert!(
            max <= 2,
            "{file}: max pixel difference {max} from diffusers"
        );
    }
}
