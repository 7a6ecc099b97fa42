//! LoRA file layouts: peft and kohya round trips, auto-detection, alpha
//! sources, and the kohya <-> diffusers module-name mapping on the real SD
//! 1.5 / 2.1 / XL module lists (copied from shared/fixtures/sd-layouts).

use candle_core::{Device, Tensor};
use safetensors::tensor::{Dtype, TensorView};
use selma_lora::names::{self, Part};
use selma_lora::rng::SplitMix64;
use selma_lora::{LoraFile, LoraFormat, LoraLayer};
use std::collections::{BTreeMap, HashMap};

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut r = SplitMix64::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (r.next_f64() - 0.5) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn sample_file(with_te2: bool) -> LoraFile {
    let mut layers = BTreeMap::new();
    let mut add = |m: &str, up: &[usize], down: &[usize], alpha: f32, seed: u64| {
        let l = LoraLayer::new(random(up, seed), random(down, seed + 100), alpha).unwrap();
        layers.insert(m.to_string(), l);
    };
    add(
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        &[8, 4],
        &[4, 8],
        8.0,
        1,
    );
    add(
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
        &[8, 2],
        &[2, 6],
        2.0,
        2,
    );
    add(
        "unet.up_blocks.1.resnets.0.conv1",
        &[5, 3, 1, 1],
        &[3, 4, 3, 3],
        1.5,
        3,
    );
    add(
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        &[6, 2],
        &[2, 6],
        2.0,
        4,
    );
    if with_te2 {
        add(
            "text_encoder_2.text_model.encoder.layers.1.mlp.fc1",
            &[7, 3],
            &[3, 5],
            3.0,
            5,
        );
    }
    let mut metadata = BTreeMap::new();
    metadata.insert("selma_skill".to_string(), "counting".to_string());
    LoraFile { layers, metadata }
}

fn assert_same(a: &LoraFile, b: &LoraFile) {
    assert_eq!(
        a.layers.keys().collect::<Vec<_>>(),
        b.layers.keys().collect::<Vec<_>>()
    );
    for (m, la) in &a.layers {
        let lb = &b.layers[m];
        assert_eq!(la.up.dims(), lb.up.dims(), "{m} up");
        assert_eq!(la.down.dims(), lb.down.dims(), "{m} down");
        assert_eq!(vals(&la.up), vals(&lb.up), "{m} up");
        assert_eq!(vals(&la.down), vals(&lb.down), "{m} down");
        assert_eq!(la.alpha, lb.alpha, "{m} alpha");
    }
}

#[test]
fn peft_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    let f = sample_file(true);
    f.save(&path, LoraFormat::Peft).unwrap();
    let (g, fmt) = LoraFile::load_detect(&path, &Device::Cpu).unwrap();
    assert_eq!(fmt, LoraFormat::Peft);
    assert_same(&f, &g);
    assert_eq!(g.metadata["selma_skill"], "counting");
    // diffusers-readable keys and config
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.names().contains(
        &"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    ));
    let cfg: serde_json::Value =
        serde_json::from_str(&g.metadata["lora_adapter_metadata"]).unwrap();
    assert_eq!(cfg["unet.r"], 4);
    assert_eq!(cfg["unet.lora_alpha"], 8);
    assert_eq!(
        cfg["unet.rank_pattern"]["mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"],
        2
    );
    // no temporary file left behind
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn kohya_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    for with_te2 in [false, true] {
        let path = dir.path().join(format!("k{with_te2}.safetensors"));
        let f = sample_file(with_te2);
        f.save(&path, LoraFormat::Kohya).unwrap();
        let (g, fmt) = LoraFile::load_detect(&path, &Device::Cpu).unwrap();
        assert_eq!(fmt, LoraFormat::Kohya);
        assert_same(&f, &g);
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let te = if with_te2 { "lora_te1_" } else { "lora_te_" };
        let key = format!("{te}text_model_encoder_layers_0_self_attn_q_proj.alpha");
        assert!(st.names().contains(&key.as_str()), "{key}");
        assert!(st.names().contains(
            &"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight"
        ));
        assert!(g.metadata.contains_key("ss_network_dim"));
        // and kohya -> peft -> kohya keeps everything
        let p2 = dir.path().join("p.safetensors");
        g.save(&p2, LoraFormat::Peft).unwrap();
        assert_same(&f, &LoraFile::load(&p2, &Device::Cpu).unwrap());
    }
}

#[test]
fn delta_is_scaled_product_flattened() {
    let f = sample_file(false);
    let conv = &f.layers["unet.up_blocks.1.resnets.0.conv1"];
    assert_eq!(conv.rank(), 3);
    assert!((conv.scale() - 0.5).abs() < 1e-7);
    let d = conv.delta().unwrap();
    assert_eq!(d.dims(), &[5, 36]);
    let up = vals(&conv.up);
    let down = vals(&conv.down);
    let dv = vals(&d);
    for i in 0..5 {
        for j in 0..36 {
            let want: f32 = (0..3)
                .map(|k| up[i * 3 + k] * down[k * 36 + j])
                .sum::<f32>()
                * 0.5;
            assert!((dv[i * 36 + j] - want).abs() < 1e-6);
        }
    }
    assert!(LoraLayer::new(random(&[4, 3], 0), random(&[2, 4], 0), 1.0).is_err());
}

/// Write raw tensors (name, dtype, shape, bytes) with metadata.
fn write_raw(
    path: &std::path::Path,
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    meta: &[(&str, &str)],
) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let meta: HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    safetensors::serialize_to_file(views, Some(meta), path).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn alpha_sources_and_fp16() {
    let dir = tempfile::tempdir().unwrap();
    let m = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k";
    // kohya without per-layer alpha: ss_network_alpha applies.
    let p = dir.path().join("k.safetensors");
    let stem = format!("lora_unet_{}", m.replace('.', "_"));
    write_raw(
        &p,
        vec![
            (
                format!("{stem}.lora_down.weight"),
                Dtype::F32,
                vec![4, 3],
                f32_bytes(&[0.5; 12]),
            ),
            (
                format!("{stem}.lora_up.weight"),
                Dtype::F32,
                vec![2, 4],
                f32_bytes(&[1.0; 8]),
            ),
        ],
        &[("ss_network_alpha", "1.0"), ("ss_network_dim", "4")],
    );
    let f = LoraFile::load(&p, &Device::Cpu).unwrap();
    let l = &f.layers[&format!("unet.{m}")];
    assert_eq!((l.rank(), l.alpha), (4, 1.0));
    assert!((l.scale() - 0.25).abs() < 1e-7);

    // old diffusers keys, fp16, no alpha anywhere: alpha = rank.
    let p = dir.path().join("d.safetensors");
    let h = |v: f32, n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|_| half::f16::from_f32(v).to_le_bytes())
            .collect()
    };
    write_raw(
        &p,
        vec![
            (
                format!("unet.{m}.lora.down.weight"),
                Dtype::F16,
                vec![2, 3],
                h(0.5, 6),
            ),
            (
                format!("unet.{m}.lora.up.weight"),
                Dtype::F16,
                vec![4, 2],
                h(-2.0, 8),
            ),
        ],
        &[],
    );
    let (f, fmt) = LoraFile::load_detect(&p, &Device::Cpu).unwrap();
    assert_eq!(fmt, LoraFormat::Peft);
    let l = &f.layers[&format!("unet.{m}")];
    assert_eq!((l.rank(), l.alpha), (2, 2.0));
    assert_eq!(vals(&l.delta().unwrap()), vec![-2.0; 12]);

    // peft with a plain lora_alpha entry
    let p = dir.path().join("p.safetensors");
    write_raw(
        &p,
        vec![
            (
                format!("base_model.model.{m}.lora_A.weight"),
                Dtype::F32,
                vec![2, 3],
                f32_bytes(&[1.0; 6]),
            ),
            (
                format!("base_model.model.{m}.lora_B.weight"),
                Dtype::F32,
                vec![4, 2],
                f32_bytes(&[1.0; 8]),
            ),
        ],
        &[("lora_alpha", "16")],
    );
    let l = &LoraFile::load(&p, &Device::Cpu).unwrap().layers[&format!("unet.{m}")];
    assert_eq!(l.alpha, 16.0);
}

#[test]
fn unreadable_files_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.safetensors");
    write_raw(
        &p,
        vec![(
            "unet.x.lora_A.weight".into(),
            Dtype::F32,
            vec![2, 3],
            f32_bytes(&[1.0; 6]),
        )],
        &[],
    );
    let err = format!("{:#}", LoraFile::load(&p, &Device::Cpu).unwrap_err());
    assert!(
        err.contains("bad.safetensors") && err.contains("unet.x") && err.contains("up"),
        "{err}"
    );
    write_raw(
        &p,
        vec![(
            "conv_in.weight".into(),
            Dtype::F32,
            vec![1],
            f32_bytes(&[1.0]),
        )],
        &[],
    );
    let err = format!("{:#}", LoraFile::load(&p, &Device::Cpu).unwrap_err());
    assert!(err.contains("conv_in.weight"), "{err}");
    let err = format!(
        "{:#}",
        LoraFile::load(&dir.path().join("missing.safetensors"), &Device::Cpu).unwrap_err()
    );
    assert!(err.contains("missing.safetensors"), "{err}");
}

/// Every module of the real UNets and text encoders survives
/// diffusers -> kohya -> diffusers and parses from peft keys.
#[test]
fn kohya_names_map_back_on_real_layouts() {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut checked = 0;
    let mut attn_ff = 0;
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        // modules_<model>_<component>.txt
        let rest = stem.strip_prefix("modules_").unwrap();
        let (model, component) = rest.split_once('_').unwrap();
        let two_te = model == "sdxl";
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let module = format!("{component}.{}", line.trim());
            let kohya = names::kohya_stem(&module, two_te).unwrap();
            let parsed = names::parse_key(&format!("{kohya}.lora_up.weight"))
                .unwrap_or_else(|e| panic!("{module} ({kohya}): {e:#}"))
                .unwrap();
            assert_eq!(parsed.module, module, "{path:?}");
            assert_eq!(parsed.part, Part::Up);
            assert!(parsed.kohya);
            let peft = names::parse_key(&format!("{module}.lora_A.weight"))
                .unwrap()
                .unwrap();
            assert_eq!(peft.module, module);
            checked += 1;
            if [
                ".to_q",
                ".to_k",
                ".to_v",
                ".to_out.0",
                ".ff.net.0.proj",
                ".ff.net.2",
                "_proj",
                ".fc1",
                ".fc2",
            ]
            .iter()
            .any(|s| module.ends_with(s))
            {
                attn_ff += 1;
            }
        }
    }
    // 7 lists, 2477 modules; SD 1.5 alone has 128 attention projections.
    assert_eq!(checked, 2477);
    assert!(attn_ff > 1500, "{attn_ff}");
}

/// Kohya SDXL files use the original (SGM) block names; every one of them
/// must land on a real module of the SDXL UNet.
#[test]
fn kohya_sdxl_sgm_names_land_on_real_modules() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/modules_sdxl_unet.txt");
    let real: std::collections::HashSet<String> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| format!("unet.{}", l.trim()))
        .collect();
    let mut stems = Vec::new();
    for n in [4, 5, 7, 8] {
        stems.push(format!(
            "input_blocks_{n}_1_transformer_blocks_1_attn2_to_k"
        ));
        stems.push(format!("input_blocks_{n}_1_proj_out"));
    }
    for n in 0..6 {
        stems.push(format!(
            "output_blocks_{n}_1_transformer_blocks_0_ff_net_0_proj"
        ));
    }
    stems.push("middle_block_1_transformer_blocks_9_attn1_to_out_0".into());
    for n in [1, 2, 4, 5, 7, 8] {
        stems.push(format!("input_blocks_{n}_0_in_layers_2"));
        stems.push(format!("input_blocks_{n}_0_emb_layers_1"));
    }
    for n in 0..9 {
        stems.push(format!("output_blocks_{n}_0_out_layers_3"));
        stems.push(format!("output_blocks_{n}_0_skip_connection"));
    }
    stems.extend(
        [
            "input_blocks_3_0_op",
            "input_blocks_6_0_op",
            "output_blocks_2_2_conv",
            "output_blocks_5_2_conv",
        ]
        .map(String::from),
    );
    for stem in stems {
        let p = names::parse_key(&format!("lora_unet_{stem}.alpha"))
            .unwrap()
            .unwrap();
        assert!(
            real.contains(&p.module),
            "{stem} -> {} is not an SDXL module",
            p.module
        );
    }
}
