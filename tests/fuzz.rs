//! Fuzzing: a seeded mutation fuzzer (no coverage guidance) over every
//! input a user or a plugin author hands to selma: LoRA files (peft and
//! kohya layouts), model safetensors, pipeline.toml, metadata.jsonl with
//! its captions, PNG images, tokenizer folders and `.wasm` components. Each
//! case starts from a valid file, applies a few byte and text mutations
//! (bit flips, boundary bytes and integers, cuts, insertions, repeated
//! spans, numbers swapped for extreme ones) and runs the real loader, then
//! what a caller does next (deltas, tensor reads, encoding, image
//! preparation). The oracle: no panic, no abort, and every error names the
//! file (its folder) it came from.
//!
//! CI runs a fixed budget; `SELMA_FUZZ_ITERS=N` sets the cases per target
//! and `SELMA_FUZZ_SEED=S` other cases (`scripts/fuzz.sh` runs long campaigns). A failing input is saved under
//! `target/fuzz-failures/`; each one fixed is copied to
//! `tests/fixtures/fuzz/<target>/` and replayed first on every run.

use crate::support;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use selma_diffusion::tokenizer::ClipTokenizer;
use selma_diffusion::weights::{SafetensorsSource, TensorSource};
use selma_lora::file::{LoraFile, LoraFormat, LoraLayer};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// splitmix64: the case generator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const BYTES: [u8; 12] = [
    0, 0xff, 0x7f, 0x80, b'"', b'{', b'}', b'[', b'\n', b'\\', b'0', b'-',
];
const WORDS: [u64; 8] = [
    0,
    1,
    u64::MAX,
    1 << 63,
    i32::MAX as u64,
    u32::MAX as u64,
    1 << 40,
    0xffff_fff0,
];
const NUMBERS: [&str; 9] = [
    "0",
    "-1",
    "18446744073709551615",
    "99999999999999999999",
    "1e308",
    "-1e308",
    "NaN",
    "3",
    "4294967296",
];

/// One to four mutations of `seed`.
fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(b.len() + 1);
        match rng.below(8) {
            0 if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] = BYTES[rng.below(BYTES.len())];
            }
            2 => {
                let n = (1 + rng.below(16)).min(b.len() - at);
                b.drain(at..at + n);
            }
            3 => {
                let ins: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                b.splice(at..at, ins);
            }
            4 if at < b.len() => {
                let n = (1 + rng.below(64)).min(b.len() - at);
                let span = b[at..at + n].to_vec();
                let to = rng.below(b.len() + 1);
                b.splice(to..to, span);
            }
            5 => b.truncate(at),
            6 if b.len() >= 8 => {
                let i = at.min(b.len() - 8);
                b[i..i + 8].copy_from_slice(&WORDS[rng.below(WORDS.len())].to_le_bytes());
            }
            _ => {
                // A run of digits (a shape, an offset, a count, a rate)
                // replaced by an extreme number.
                let digits: Vec<usize> = (0..b.len()).filter(|&i| b[i].is_ascii_digit()).collect();
                if digits.is_empty() {
                    continue;
                }
                let s = digits[rng.below(digits.len())];
                let mut e = s;
                while e < b.len() && (b[e].is_ascii_digit() || b[e] == b'.') {
                    e += 1;
                }
                let n = NUMBERS[rng.below(NUMBERS.len())].as_bytes().to_vec();
                b.splice(s..e, n);
            }
        }
    }
    b
}

/// Mutates a safetensors file: mostly its JSON header (dtypes, shapes,
/// offsets, keys, metadata), with the length prefix rewritten so the
/// loader gets past it; else anywhere.
fn mutate_safetensors(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let n = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    if rng.below(10) < 7 && 8 + n <= seed.len() {
        let header = mutate(&seed[8..8 + n], rng);
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&header);
        out.extend_from_slice(&seed[8 + n..]);
        out
    } else {
        mutate(seed, rng)
    }
}

/// Reads a case folder the way selma does.
type Reader = Box<dyn Fn(&Path) -> Result<()>>;

/// A fuzz target: where its case is written and what reads it.
struct Target {
    name: &'static str,
    /// How a case is made from a seed.
    mutator: fn(&[u8], &mut Rng) -> Vec<u8>,
    /// Valid files to start from.
    seeds: Vec<Vec<u8>>,
    /// The file (inside the case folder) a case replaces.
    file: &'static str,
    /// Reads the case folder the way selma does.
    run: Reader,
    /// Cases per default budget.
    budget: usize,
}

/// What one target's campaign found.
#[derive(Debug, Default)]
struct Tally {
    cases: usize,
    accepted: usize,
    failures: Vec<String>,
}

/// `SELMA_FUZZ_SEED` varies the cases of a long campaign (default 0: CI's).
fn seed_offset() -> u64 {
    std::env::var("SELMA_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn iters(default: usize) -> usize {
    std::env::var("SELMA_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Runs one case: Ok(accepted) when it passed the oracle, else why not.
fn case(t: &Target, dir: &Path, bytes: &[u8]) -> Result<bool, String> {
    std::fs::write(dir.join(t.file), bytes).unwrap();
    let out = catch_unwind(AssertUnwindSafe(|| (t.run)(dir)));
    match out {
        Ok(Ok(())) => Ok(true),
        Ok(Err(e)) => {
            let msg = format!("{e:#}");
            if msg.contains(&dir.display().to_string()) {
                Ok(false)
            } else {
                Err(format!("error without the file's name: {msg}"))
            }
        }
        Err(p) => {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("panic: {what}"))
        }
    }
}

/// Replays the saved regressions, then `budget` seeded cases.
fn campaign(t: &Target, seed: u64) -> Tally {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(t.name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut tally = Tally::default();
    let saved = support::root().join("tests/fixtures/fuzz").join(t.name);
    let failures = support::root().join("target/fuzz-failures").join(t.name);
    let mut regressions: Vec<PathBuf> = std::fs::read_dir(&saved)
        .into_iter()
        .flatten()
        .map(|e| e.unwrap().path())
        .collect();
    regressions.sort();
    for p in regressions {
        tally.cases += 1;
        if let Err(why) = case(t, &dir, &std::fs::read(&p).unwrap()) {
            tally.failures.push(format!("{}: {why}", p.display()));
        }
    }
    let mut rng = Rng(seed ^ seed_offset().wrapping_mul(0x2545_f491_4f6c_dd1d));
    for i in 0..iters(t.budget) {
        let seed = &t.seeds[rng.below(t.seeds.len())];
        let bytes = (t.mutator)(seed, &mut rng);
        tally.cases += 1;
        match case(t, &dir, &bytes) {
            Ok(accepted) => tally.accepted += accepted as usize,
            Err(why) => {
                std::fs::create_dir_all(&failures).unwrap();
                let keep = failures.join(format!("case-{seed:x}-{i}", seed = rng.0));
                std::fs::write(&keep, &bytes).unwrap();
                tally
                    .failures
                    .push(format!("{} ({}): {why}", i, keep.display()));
            }
        }
        let _ = std::fs::remove_file(dir.join(t.file));
    }
    tally
}

fn check(t: Target, seed: u64) {
    let tally = campaign(&t, seed);
    eprintln!(
        "fuzz {}: {} cases, {} accepted, {} failures",
        t.name,
        tally.cases,
        tally.accepted,
        tally.failures.len()
    );
    assert!(
        tally.failures.is_empty(),
        "fuzz {}: {} failing case(s):\n{}",
        t.name,
        tally.failures.len(),
        tally.failures[..tally.failures.len().min(10)].join("\n")
    );
}

fn lora_seeds() -> Vec<Vec<u8>> {
    let d = Device::Cpu;
    let t = |shape: &[usize], k: f32| {
        let n: usize = shape.iter().product();
        Tensor::from_vec((0..n).map(|i| k * i as f32 / n as f32).collect(), shape, &d).unwrap()
    };
    let mut f = LoraFile::default();
    f.layers.insert(
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q".into(),
        LoraLayer::new(t(&[8, 2], 0.5), t(&[2, 8], -0.25), 2.0).unwrap(),
    );
    f.layers.insert(
        "unet.down_blocks.0.resnets.0.conv1".into(),
        LoraLayer::new(t(&[4, 2, 1, 1], 1.0), t(&[2, 4, 3, 3], 0.1), 1.0).unwrap(),
    );
    f.metadata.insert("rank".into(), "2".into());
    vec![
        f.to_bytes(LoraFormat::Peft).unwrap(),
        f.to_bytes(LoraFormat::Kohya).unwrap(),
    ]
}

#[test]
fn fuzz_lora_files() {
    check(
        Target {
            name: "lora",
            mutator: mutate_safetensors,
            seeds: lora_seeds(),
            file: "lora.safetensors",
            run: Box::new(|dir| {
                let (f, _) = LoraFile::load_detect(&dir.join("lora.safetensors"), &Device::Cpu)?;
                for (name, l) in &f.layers {
                    l.delta()
                        .map_err(|e| e.context(format!("layer {name} of {}", dir.display())))?;
                }
                Ok(())
            }),
            budget: 3000,
        },
        1,
    );
}

fn weights_seed() -> Vec<u8> {
    let d = Device::Cpu;
    let ramp = |n: usize| Tensor::arange(0f32, n as f32, &d).unwrap();
    let tensors = vec![
        (
            "unet.conv_in.weight".to_string(),
            ramp(24).reshape((2, 3, 2, 2)).unwrap(),
        ),
        (
            "unet.conv_in.bias".to_string(),
            ramp(2).to_dtype(DType::F16).unwrap(),
        ),
        (
            "text.embed".to_string(),
            ramp(12)
                .reshape((3, 4))
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        ),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("w.safetensors");
    candle_core::safetensors::save(&tensors.into_iter().collect(), &p).unwrap();
    std::fs::read(p).unwrap()
}

#[test]
fn fuzz_model_safetensors() {
    check(
        Target {
            name: "weights",
            mutator: mutate_safetensors,
            seeds: vec![weights_seed()],
            file: "model.safetensors",
            run: Box::new(|dir| {
                let src = SafetensorsSource::open(&[dir.join("model.safetensors")])?;
                for k in src.keys() {
                    src.load(&k, DType::F32, &Device::Cpu)?;
                }
                Ok(())
            }),
            budget: 3000,
        },
        2,
    );
}

#[test]
fn fuzz_pipeline_toml() {
    check(
        Target {
            name: "pipeline",
            mutator: mutate,
            seeds: vec![selma::pipeline::config::DEFAULT_CONFIG.as_bytes().to_vec()],
            file: "pipeline.toml",
            run: Box::new(|dir| {
                let path = dir.join("pipeline.toml");
                let opts = selma::pipeline::RunOptions {
                    config: Some(path.clone()),
                    run_dir: Some(dir.join("run")),
                    ..Default::default()
                };
                let loaded = selma::pipeline::load(&opts)?;
                selma::pipeline::validate(loaded, opts)?;
                Ok(())
            }),
            budget: 1500,
        },
        3,
    );
}

/// A 6x4 PNG as selma writes it.
fn png_seed() -> Vec<u8> {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("x.png");
    let rgb: Vec<u8> = (0..6 * 4 * 3).map(|i| (i * 7) as u8).collect();
    selma_diffusion::image_io::write_png(&p, 6, 4, &rgb, "a red circle\nSteps: 4").unwrap();
    std::fs::read(p).unwrap()
}

#[test]
fn fuzz_png_images() {
    check(
        Target {
            name: "png",
            mutator: mutate,
            seeds: vec![png_seed()],
            file: "x.png",
            run: Box::new(|dir| {
                let p = dir.join("x.png");
                let a = selma_diffusion::image_io::read_png(&p);
                let img = selma_train::dataset::load_rgb(&p)?;
                selma_train::dataset::prepare(
                    &img,
                    8,
                    selma_train::dataset::Variant {
                        x: 0,
                        y: 0,
                        flip: false,
                    },
                    &Device::Cpu,
                )
                .map_err(|e| e.context(format!("preparing {}", p.display())))?;
                a.map(|_| ())
            }),
            budget: 3000,
        },
        4,
    );
}

#[test]
fn fuzz_metadata_jsonl() {
    let seed = br#"{"file_name": "a.png", "text": "a red circle"}
{"file_name": "b.png", "text": "two blue squares left of a green triangle", "detailed": "x"}
"#
    .to_vec();
    let png = png_seed();
    check(
        Target {
            name: "metadata",
            mutator: mutate,
            seeds: vec![seed],
            file: "metadata.jsonl",
            run: Box::new(move |dir| {
                for n in ["a.png", "b.png"] {
                    std::fs::write(dir.join(n), &png).unwrap();
                }
                let ds = selma_train::dataset::Dataset::open(dir, false)?;
                for s in &ds.samples {
                    selma_train::dataset::load_rgb(&s.image)?;
                }
                Ok(())
            }),
            budget: 3000,
        },
        5,
    );
}

fn tokenizer_dir() -> PathBuf {
    support::root().join("models/shapeworld-base/tokenizer")
}

/// One target per tokenizer file; the other files stay valid.
fn tokenizer_target(name: &'static str, file: &'static str, budget: usize) -> Target {
    Target {
        name,
        mutator: mutate,
        seeds: vec![std::fs::read(tokenizer_dir().join(file)).unwrap()],
        file,
        run: Box::new(move |dir| {
            for other in [
                "vocab.json",
                "merges.txt",
                "tokenizer_config.json",
                "special_tokens_map.json",
            ] {
                if other != file {
                    std::fs::copy(tokenizer_dir().join(other), dir.join(other)).unwrap();
                }
            }
            let tok = ClipTokenizer::from_dir(dir)?;
            for text in [
                "a red circle left of two blue squares",
                "",
                "ünïcode 😀 and <|endoftext|>",
            ] {
                let ids = tok
                    .encode_padded(text)
                    .map_err(|e| e.context(format!("encoding with {}", dir.display())))?;
                assert_eq!(ids.len(), tok.max_len(), "padded length");
                tok.decode(&ids);
            }
            Ok(())
        }),
        budget,
    }
}

#[test]
fn fuzz_tokenizer_files() {
    check(tokenizer_target("tokenizer-vocab", "vocab.json", 1000), 6);
    check(tokenizer_target("tokenizer-merges", "merges.txt", 1000), 7);
    check(
        tokenizer_target("tokenizer-config", "tokenizer_config.json", 1000),
        8,
    );
}

#[test]
fn fuzz_wasm_components_given_to_inspect() {
    let wasm =
        support::root().join("target/wasm-plugins/wasm32-wasip2/release/selma_plugin_length.wasm");
    let seed = std::fs::read(&wasm)
        .unwrap_or_else(|e| panic!("{} (built with the host): {e}", wasm.display()));
    let cache = tempfile::tempdir().unwrap();
    let rt = selma_runtime::Runtime::new(selma_runtime::RuntimeConfig {
        cache_dir: Some(cache.path().to_path_buf()),
        call_timeout: std::time::Duration::from_secs(5),
        ..Default::default()
    })
    .unwrap();
    check(
        Target {
            name: "wasm",
            mutator: mutate,
            seeds: vec![seed],
            file: "plugin.wasm",
            run: Box::new(move |dir| {
                rt.inspect(dir.join("plugin.wasm").to_str().unwrap())?;
                Ok(())
            }),
            budget: 300,
        },
        9,
    );
}

/// The oracle itself can fail: a reader that panics on one byte value or
/// returns an error that does not name its file is reported.
#[test]
fn the_harness_reports_panics_and_unnamed_errors() {
    for (bad, want) in [
        (true, "panic: 0xff"),
        (false, "error without the file's name"),
    ] {
        let t = Target {
            name: "self-test",
            mutator: mutate,
            seeds: vec![vec![0x10; 64]],
            file: "x.bin",
            run: Box::new(move |dir| {
                let b = std::fs::read(dir.join("x.bin"))?;
                if b.contains(&0xff) {
                    if bad {
                        panic!("0xff");
                    }
                    anyhow::bail!("a byte 0xff somewhere");
                }
                Ok(())
            }),
            budget: 200,
        };
        let tally = campaign(&t, 10);
        assert!(!tally.failures.is_empty(), "{tally:?}");
        assert!(tally.failures.iter().all(|f| f.contains(want)), "{tally:?}");
        assert!(
            tally.accepted > 0 && tally.accepted < tally.cases,
            "{tally:?}"
        );
    }
    let _ = std::fs::remove_dir_all(support::root().join("target/fuzz-failures/self-test"));
}
