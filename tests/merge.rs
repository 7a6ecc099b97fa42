//! End-to-end tests of `selma merge`: the real binary, the bundled merge
//! plugins, LoRA files written here from seeded random tensors. Expected
//! values come from independent computations in this file (plain loops over
//! the experts' factors, or hand-computed cases), not from the code under test.

use crate::support;

use candle_core::{Device, Tensor};
use selma_lora::rng::SplitMix64;
use selma_lora::{ops, LoraFile, LoraFormat, LoraLayer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn selma(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_selma"))
        .args(args)
        .output()
        .expect("run the selma binary")
}

fn check_ok(out: &Output) {
    assert!(
        out.status.success(),
        "selma failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn random(shape: &[usize], rng: &mut SplitMix64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (rng.next_f64() - 0.5) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

const Q: &str = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k";
const OUT: &str = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0";
const TE: &str = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj";
const CONV: &str = "unet.up_blocks.0.resnets.0.conv1";

/// Layers of the test experts: (module, up shape without rank, down shape
/// without rank).
fn layout() -> Vec<(&'static str, Vec<usize>, Vec<usize>)> {
    vec![
        (Q, vec![16], vec![12]),
        (OUT, vec![10], vec![10]),
        (TE, vec![8], vec![8]),
        (CONV, vec![6, 1, 1], vec![4, 3, 3]),
    ]
}

/// An expert of rank `rank` with alpha `alpha` on every layer of `layout`.
fn expert(rank: usize, alpha: f32, seed: u64) -> LoraFile {
    let mut rng = SplitMix64::new(seed);
    let mut layers = BTreeMap::new();
    for (m, up, down) in layout() {
        let mut us = vec![up[0], rank];
        us.extend(&up[1..]);
        let mut ds = vec![rank];
        ds.extend(&down);
        let l = LoraLayer::new(random(&us, &mut rng), random(&ds, &mut rng), alpha).unwrap();
        layers.insert(m.to_string(), l);
    }
    LoraFile {
        layers,
        metadata: BTreeMap::new(),
    }
}

/// Independent delta: scale * sum_k up[o, k] * down[k, i] by plain loops.
fn delta_by_hand(l: &LoraLayer) -> (usize, usize, Vec<f64>) {
    let (u, d) = (vals(&l.up), vals(&l.down));
    let r = l.down.dims()[0];
    let out = l.up.dims()[0];
    let inp = d.len() / r;
    let s = (l.alpha / r as f32) as f64;
    let mut v = vec![0f64; out * inp];
    for o in 0..out {
        for i in 0..inp {
            v[o * inp + i] = s
                * (0..r)
                    .map(|k| u[o * r + k] as f64 * d[k * inp + i] as f64)
                    .sum::<f64>();
        }
    }
    (out, inp, v)
}

struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    files: Vec<PathBuf>,
    experts: Vec<LoraFile>,
}

/// Three experts with different ranks and alphas, one written as kohya.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let experts = vec![expert(4, 4.0, 1), expert(2, 8.0, 2), expert(3, 1.5, 3)];
    let mut files = Vec::new();
    for (i, e) in experts.iter().enumerate() {
        let p = dir.path().join(format!("e{i}.safetensors"));
        let fmt = if i == 1 {
            LoraFormat::Kohya
        } else {
            LoraFormat::Peft
        };
        e.save(&p, fmt).unwrap();
        files.push(p);
    }
    Setup {
        dir: dir.path().to_path_buf(),
        _dir: dir,
        files,
        experts,
    }
}

fn run_merge(s: &Setup, name: &str, extra: &[&str]) -> LoraFile {
    let out = s.dir.join(name);
    let mut args: Vec<String> = vec!["merge".into(), "--quiet".into()];
    args.extend(s.files.iter().map(|p| p.display().to_string()));
    args.extend(extra.iter().map(|a| a.to_string()));
    args.extend(["--out".into(), out.display().to_string()]);
    let argv: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    check_ok(&selma(&argv));
    LoraFile::load(&out, &Device::Cpu).unwrap()
}

fn weighted_sum_by_hand(experts: &[LoraFile], module: &str, w: &[f64]) -> Vec<f64> {
    let mut acc: Option<Vec<f64>> = None;
    for (e, wi) in experts.iter().zip(w) {
        let (_, _, d) = delta_by_hand(&e.layers[module]);
        let acc = acc.get_or_insert_with(|| vec![0.0; d.len()]);
        acc.iter_mut().zip(d).for_each(|(a, x)| *a += wi * x);
    }
    acc.unwrap()
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= tol,
            "{what}: entry {i}: {g} vs {w}"
        );
    }
}

fn frob_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn linear_and_cat_reproduce_the_weighted_delta_sum() {
    let s = setup();
    let w = [0.5, 0.3, 0.2];
    for strategy in ["linear", "cat"] {
        let m = run_merge(
            &s,
            &format!("{strategy}.safetensors"),
            &["--strategy", strategy, "--weights", "0.5,0.3,0.2"],
        );
        assert_eq!(m.layers.len(), 4);
        for (module, _, _) in layout() {
            let l = &m.layers[module];
            // exact: rank 4 + 2 + 3, alpha = rank
            assert_eq!(l.rank(), 9, "{strategy} {module}");
            assert_eq!(l.alpha, 9.0);
            let want = weighted_sum_by_hand(&s.experts, module, &w);
            assert_close(
                &vals(&l.delta().unwrap()),
                &want,
                1e-5,
                &format!("{strategy} {module}"),
            );
        }
        // the conv layer keeps its 4-D shapes
        assert_eq!(m.layers[CONV].up.dims(), &[6, 9, 1, 1]);
        assert_eq!(m.layers[CONV].down.dims(), &[9, 4, 3, 3]);
    }
    // default weights are 1/K
    let m = run_merge(&s, "lin-default.safetensors", &["--strategy", "linear"]);
    let want = weighted_sum_by_hand(&s.experts, Q, &[1.0 / 3.0; 3]);
    assert_close(
        &vals(&m.layers[Q].delta().unwrap()),
        &want,
        1e-5,
        "1/K weights",
    );
}

#[test]
fn svd_is_exact_at_full_rank_and_best_below() {
    let s = setup();
    let w = [1.0 / 3.0; 3];
    // full rank of every layer: min(out, in) <= 12 > 9 = rank of the sum
    let m = run_merge(
        &s,
        "svd-full.safetensors",
        &["--strategy", "svd", "--rank", "16"],
    );
    for (module, _, _) in layout() {
        let want = weighted_sum_by_hand(&s.experts, module, &w);
        assert_close(
            &vals(&m.layers[module].delta().unwrap()),
            &want,
            1e-5,
            module,
        );
    }
    // rank 3: the Eckart-Young error and the independently computed optimum
    let m = run_merge(
        &s,
        "svd-3.safetensors",
        &["--strategy", "svd", "--rank", "3"],
    );
    for (module, _, _) in layout() {
        let l = &m.layers[module];
        assert_eq!((l.rank(), l.alpha), (3, 3.0), "{module}");
        let want = weighted_sum_by_hand(&s.experts, module, &w);
        let (out, inp, _) = delta_by_hand(&s.experts[0].layers[module]);
        let dense = Tensor::from_vec(
            want.iter().map(|x| *x as f32).collect::<Vec<_>>(),
            (out, inp),
            &Device::Cpu,
        )
        .unwrap();
        let sv = ops::singular_values(&dense).unwrap();
        let discarded = sv[3..].iter().map(|x| x * x).sum::<f64>().sqrt();
        let got = vals(&l.delta().unwrap());
        let err = frob_diff(&got, &want);
        assert!(
            (err - discarded).abs() < 1e-5,
            "{module}: {err} vs {discarded}"
        );
    }
    // default rank for a dense result: the largest expert rank (4)
    let m = run_merge(&s, "ties-default.safetensors", &["--strategy", "ties"]);
    assert!(m.layers.values().all(|l| l.rank() == 4 && l.alpha == 4.0));
    // lower --rank re-factors linear's exact factors
    let m = run_merge(
        &s,
        "lin-3.safetensors",
        &["--strategy", "linear", "--rank", "3"],
    );
    assert!(m.layers.values().all(|l| l.rank() == 3));
}

/// Two rank-1 experts on a [3, 2] layer with deltas
/// A = [[1,1],[-2,-2],[3,3]] and B = [[-4,-2],[1,0.5],[1,0.5]].
fn tiny_pair(dir: &Path) -> Vec<PathBuf> {
    let t = |v: &[f32], s: &[usize]| Tensor::from_vec(v.to_vec(), s, &Device::Cpu).unwrap();
    let pairs = [
        (t(&[1., -2., 3.], &[3, 1]), t(&[1., 1.], &[1, 2])),
        (t(&[-4., 1., 1.], &[3, 1]), t(&[1., 0.5], &[1, 2])),
    ];
    pairs
        .into_iter()
        .enumerate()
        .map(|(i, (up, down))| {
            let mut layers = BTreeMap::new();
            layers.insert(Q.to_string(), LoraLayer::new(up, down, 1.0).unwrap());
            let f = LoraFile {
                layers,
                metadata: BTreeMap::new(),
            };
            let p = dir.join(format!("tiny{i}.safetensors"));
            f.save(&p, LoraFormat::Peft).unwrap();
            p
        })
        .collect()
}

fn merge_files(files: &[PathBuf], out: &Path, extra: &[&str]) -> LoraFile {
    let mut args: Vec<String> = vec!["merge".into(), "--quiet".into()];
    args.extend(files.iter().map(|p| p.display().to_string()));
    args.extend(extra.iter().map(|a| a.to_string()));
    args.extend(["--out".into(), out.display().to_string()]);
    let argv: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    check_ok(&selma(&argv));
    LoraFile::load(out, &Device::Cpu).unwrap()
}

#[test]
fn ties_hand_computed() {
    let dir = tempfile::tempdir().unwrap();
    let files = tiny_pair(dir.path());
    // density 0.5 keeps 3 of 6 entries per expert (ties at the threshold keep
    // the lower index): A' = [[0,0],[-2,0],[3,3]], B' = [[-4,-2],[1,0],[0,0]].
    // Elected signs of A'+B' = [[-,-],[-,0],[+,+]]; agreeing means:
    // [[-4,-2],[-2,0],[3,3]]. Rank 2 = full rank, so the SVD is exact.
    let m = merge_files(
        &files,
        &dir.path().join("t.safetensors"),
        &[
            "--strategy",
            "ties",
            "--param",
            "density=0.5",
            "--rank",
            "2",
        ],
    );
    assert_close(
        &vals(&m.layers[Q].delta().unwrap()),
        &[-4., -2., -2., 0., 3., 3.],
        1e-5,
        "ties",
    );
    // weights 0.75/0.25 act relative to their mean (1.5 and 0.5), lambda 2:
    // A'' = [[0,0],[-3,0],[4.5,4.5]], B'' = [[-2,-1],[0.5,0],[0,0]] ->
    // means [[-2,-1],[-3,0],[4.5,4.5]] * 2
    let m = merge_files(
        &files,
        &dir.path().join("t2.safetensors"),
        &[
            "--strategy",
            "ties",
            "--param",
            "density=0.5",
            "--param",
            "lambda=2",
            "--weights",
            "0.75,0.25",
            "--rank",
            "2",
        ],
    );
    assert_close(
        &vals(&m.layers[Q].delta().unwrap()),
        &[-4., -2., -6., 0., 9., 9.],
        1e-5,
        "weighted ties",
    );
}

#[test]
fn dare_drops_and_rescales() {
    let dir = tempfile::tempdir().unwrap();
    let e = expert(3, 3.0, 9);
    let p = dir.path().join("one.safetensors");
    e.save(&p, LoraFormat::Peft).unwrap();
    let files = vec![p];
    let run = |name: &str, seed: &str| {
        merge_files(
            &files,
            &dir.path().join(name),
            &[
                "--strategy",
                "dare",
                "--param",
                "drop_rate=0.5",
                "--weights",
                "1",
                "--rank",
                "16",
                "--seed",
                seed,
            ],
        )
    };
    let a = run("a.safetensors", "1");
    let (_, _, tau) = delta_by_hand(&e.layers[Q]);
    let got = vals(&a.layers[Q].delta().unwrap());
    // every entry is dropped (0) or kept and rescaled by 1 / (1 - 0.5)
    let mut dropped = 0;
    for (g, t) in got.iter().zip(&tau) {
        let g = *g as f64;
        if g.abs() < 1e-5 {
            dropped += 1;
        } else {
            assert!((g - 2.0 * t).abs() < 1e-5, "{g} vs 2 * {t}");
        }
    }
    let frac = dropped as f64 / tau.len() as f64;
    assert!((0.35..0.65).contains(&frac), "dropped fraction {frac}");
    // seeded: same seed same result, another seed another mask
    let b = run("b.safetensors", "1");
    assert_eq!(vals(&a.layers[Q].up), vals(&b.layers[Q].up));
    let c = run("c.safetensors", "2");
    assert_ne!(
        vals(&a.layers[Q].delta().unwrap()),
        vals(&c.layers[Q].delta().unwrap())
    );
    // drop_rate 0 is the plain weighted sum
    let z = merge_files(
        &files,
        &dir.path().join("z.safetensors"),
        &[
            "--strategy",
            "dare",
            "--param",
            "drop_rate=0",
            "--weights",
            "1",
            "--rank",
            "16",
        ],
    );
    assert_close(&vals(&z.layers[Q].delta().unwrap()), &tau, 1e-5, "rate 0");
}

#[test]
fn kohya_and_peft_outputs_round_trip() {
    let s = setup();
    let peft = s.dir.join("out-peft.safetensors");
    let kohya = s.dir.join("out-kohya.safetensors");
    let args = |fmt: &str, out: &Path| -> Vec<String> {
        let mut a: Vec<String> = vec!["merge".into(), "--quiet".into()];
        a.extend(s.files.iter().map(|p| p.display().to_string()));
        a.extend(
            ["--strategy", "svd", "--rank", "5", "--format", fmt, "--out"]
                .iter()
                .map(|x| x.to_string()),
        );
        a.push(out.display().to_string());
        a
    };
    for (fmt, out) in [("peft", &peft), ("kohya", &kohya)] {
        let a = args(fmt, out);
        check_ok(&selma(&a.iter().map(|x| x.as_str()).collect::<Vec<_>>()));
    }
    let (p, pf) = LoraFile::load_detect(&peft, &Device::Cpu).unwrap();
    let (k, kf) = LoraFile::load_detect(&kohya, &Device::Cpu).unwrap();
    assert_eq!((pf, kf), (LoraFormat::Peft, LoraFormat::Kohya));
    assert_eq!(p.layers.len(), 4);
    for (m, lp) in &p.layers {
        let lk = &k.layers[m];
        assert_eq!(vals(&lp.up), vals(&lk.up), "{m}");
        assert_eq!(vals(&lp.down), vals(&lk.down), "{m}");
        assert_eq!((lp.alpha, lk.alpha), (5.0, 5.0));
    }
    // a merged file merges again (its own output as input, both layouts)
    let again = merge_files(
        &[peft.clone(), kohya.clone()],
        &s.dir.join("again.safetensors"),
        &["--strategy", "linear"],
    );
    for (m, lp) in &p.layers {
        let want: Vec<f64> = vals(&lp.delta().unwrap())
            .iter()
            .map(|x| *x as f64)
            .collect();
        assert_close(&vals(&again.layers[m].delta().unwrap()), &want, 1e-5, m);
    }
}

#[test]
fn plugin_and_native_agree() {
    let s = setup();
    for (strategy, params) in [("ties", vec!["--param", "density=0.3"]), ("linear", vec![])] {
        let mut a = vec!["--strategy", strategy, "--rank", "6"];
        a.extend(&params);
        let plugin = run_merge(&s, &format!("{strategy}-p.safetensors"), &a);
        a.push("--native");
        let native = run_merge(&s, &format!("{strategy}-n.safetensors"), &a);
        for (m, l) in &plugin.layers {
            let want: Vec<f64> = vals(&native.layers[m].delta().unwrap())
                .iter()
                .map(|x| *x as f64)
                .collect();
            assert_close(
                &vals(&l.delta().unwrap()),
                &want,
                1e-5,
                &format!("{strategy} {m}"),
            );
        }
    }
}

#[test]
fn mismatched_inputs_are_refused_with_names() {
    let s = setup();
    let mut partial = s.experts[0].clone();
    partial.layers.remove(TE);
    let p = s.dir.join("partial.safetensors");
    partial.save(&p, LoraFormat::Peft).unwrap();
    let out = s.dir.join("never.safetensors");
    let o = selma(&[
        "merge",
        "--quiet",
        s.files[0].to_str().unwrap(),
        p.to_str().unwrap(),
        "--strategy",
        "linear",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("partial.safetensors") && err.contains(TE),
        "{err}"
    );
    assert!(!out.exists());
    // wrong number of weights
    let o = selma(&[
        "merge",
        "--quiet",
        s.files[0].to_str().unwrap(),
        s.files[1].to_str().unwrap(),
        "--strategy",
        "linear",
        "--weights",
        "1,2,3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--weights"));
    // unknown parameter names the plugin and the key
    let o = selma(&[
        "merge",
        "--quiet",
        s.files[0].to_str().unwrap(),
        "--strategy",
        "ties",
        "--param",
        "dnsity=0.5",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("ties") && err.contains("dnsity"), "{err}");
}

/// A strategy written outside the bundled set (tests/plugins/external-merge,
/// built here from the SDK) is loaded by path into the same `selma` binary:
/// swapping the merge needs no host rebuild. Its maths is `gain` times the
/// exact weighted delta sum, checked against the factors by hand.
#[test]
fn external_strategy_loads_by_path_without_rebuilding_the_host() {
    let wasm = support::test_plugin("external-merge");
    let wasm = wasm.to_str().unwrap();
    let inspect = selma(&["plugins", "inspect", wasm]);
    check_ok(&inspect);
    assert!(
        String::from_utf8_lossy(&inspect.stdout).contains("scaled-linear"),
        "inspect shows the plugin's own name"
    );

    let dir = tempfile::tempdir().unwrap();
    let files = tiny_pair(dir.path());
    let experts: Vec<LoraFile> = files
        .iter()
        .map(|p| LoraFile::load(p, &Device::Cpu).unwrap())
        .collect();
    let out = dir.path().join("external.safetensors");
    let merged = merge_files(&files, &out, &["--strategy", wasm, "--param", "gain=2"]);
    let want: Vec<f64> = weighted_sum_by_hand(&experts, Q, &[0.5, 0.5])
        .into_iter()
        .map(|v| 2.0 * v)
        .collect();
    assert_close(
        &vals(&merged.layers[Q].delta().unwrap()),
        &want,
        1e-5,
        "scaled-linear with gain 2",
    );
}

/// A strategy whose output is not finite (here `scaled-linear` with a gain
/// that overflows f32, as a plugin written from outside found) stops the
/// merge with an error naming the strategy and the layer; no file is
/// written, with factors or with a dense delta.
#[test]
fn non_finite_merge_output_is_an_error_and_writes_nothing() {
    let wasm = support::test_plugin("external-merge");
    let wasm = wasm.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files = tiny_pair(dir.path());
    let out = dir.path().join("bad.safetensors");
    for extra in [&[][..], &["--rank", "2"][..]] {
        let mut args = vec!["merge"];
        args.extend(files.iter().map(|p| p.to_str().unwrap()));
        args.extend(["--strategy", wasm, "--param", "gain=1e39", "--out"]);
        args.push(out.to_str().unwrap());
        args.extend(extra);
        let o = selma(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?}: merged a non-finite LoRA");
        assert!(
            err.contains("scaled-linear")
                && err.contains("NaN or infinite")
                && err.contains("layer"),
            "{extra:?}: {err}"
        );
        assert!(!out.exists(), "{extra:?}: a file was written");
    }
}
