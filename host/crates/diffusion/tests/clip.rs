//! CLIP tokenizer and text encoder tests.
//!
//! Tokenizer: a hand-made vocabulary and merge list with hand-computed ids,
//! loaded from both folder layouts (tokenizer.json; vocab.json + merges.txt).
//! Encoder: a tiny seeded random CLIP written to safetensors, compared with
//! candle-transformers' `models::clip` loaded from the same file (f32, 1e-4
//! relative). candle-transformers' configurable CLIP only implements
//! `quick_gelu`, so the OpenCLIP (`gelu` = exact erf GELU) path is compared
//! with a plain f64 re-implementation in this file instead.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, IndexOp, Module, Tensor, Var, D};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::{
    text_model::{
        Activation as RefAct, ClipEncoder, ClipTextConfig as RefCfg, ClipTextTransformer,
    },
    EncoderConfig,
};
use selma_diffusion::clip::{ClipTextConfig, ClipTextModel, HiddenLayer};
use selma_diffusion::lora::attach_lora;
use selma_diffusion::nn::merge_all_adapters;
use selma_diffusion::tokenizer::ClipTokenizer;
use selma_diffusion::weights::Vb;
use selma_lora::{LoraFile, LoraLayer};

// ---------------------------------------------------------------- tokenizer

/// Vocabulary entries (id = position).
const VOCAB: &[&str] = &[
    "!",
    "!!</w>",
    "'",
    "2</w>",
    "a",
    "a</w>",
    "at",
    "c",
    "e</w>",
    "h",
    "ho",
    "hoto</w>",
    "o</w>",
    "of</w>",
    "p",
    "photo</w>",
    "s</w>",
    "t</w>",
    "th",
    "the</w>",
    "to</w>",
    "<|startoftext|>",
    "<|endoftext|>",
    "Ã",
    "©</w>",
];
/// Merges, by rank.
const MERGES: &[(&str, &str)] = &[
    ("h", "o"),
    ("t", "o</w>"),
    ("ho", "to</w>"),
    ("p", "hoto</w>"),
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "t"),
    ("c", "at</w>"), // never applies: "cat" ends in "t</w>", so "at" is not formed
    ("!", "!</w>"),
    ("o", "f</w>"),
];

fn vocab_json() -> serde_json::Value {
    let m: serde_json::Map<String, serde_json::Value> = VOCAB
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), serde_json::json!(i)))
        .collect();
    serde_json::Value::Object(m)
}

/// Writes a tokenizer folder in one of the two layouts. `pad` is the
/// tokenizer_config pad token (None: no tokenizer_config at all).
fn write_tokenizer(dir: &Path, layout_json: bool, pad: Option<&str>, max_len: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    if layout_json {
        // Merges as "a b" strings and (newer tokenizers) as pairs: use both.
        let merges: Vec<serde_json::Value> = MERGES
            .iter()
            .enumerate()
            .map(|(i, (a, b))| {
                if i % 2 == 0 {
                    serde_json::json!(format!("{a} {b}"))
                } else {
                    serde_json::json!([a, b])
                }
            })
            .collect();
        let tj = serde_json::json!({
            "version": "1.0",
            "added_tokens": [
                {"id": 21, "content": "<|startoftext|>", "special": true},
                {"id": 22, "content": "<|endoftext|>", "special": true}
            ],
            "model": {"type": "BPE", "vocab": vocab_json(), "merges": merges,
                      "end_of_word_suffix": "</w>", "unk_token": "<|endoftext|>"}
        });
        std::fs::write(
            dir.join("tokenizer.json"),
            serde_json::to_string_pretty(&tj)?,
        )?;
    } else {
        std::fs::write(
            dir.join("vocab.json"),
            serde_json::to_string(&vocab_json())?,
        )?;
        let mut txt = String::from("#version: 0.2\n");
        for (a, b) in MERGES {
            txt.push_str(&format!("{a} {b}\n"));
        }
        std::fs::write(dir.join("merges.txt"), txt)?;
    }
    if let Some(pad) = pad {
        let cfg = serde_json::json!({
            "bos_token": {"content": "<|startoftext|>", "lstrip": false},
            "eos_token": "<|endoftext|>",
            "pad_token": pad,
            "unk_token": "<|endoftext|>",
            "model_max_length": max_len
        });
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string())?;
    }
    Ok(())
}

const TEXT: &str = "  A photo\tof THE   cat's 2 hats!!\n";
/// By hand: a | photo (h+o, t+o</w>, ho+to</w>, p+hoto</w>) | of | the (t+h, th+e</w>)
/// | c a t</w> (mid-word "a" is id 4, not "a</w>") | ' s</w> | 2 | h at s</w> | !!
const TEXT_IDS: &[u32] = &[5, 15, 13, 19, 7, 4, 17, 2, 16, 3, 9, 6, 16, 1];

#[test]
fn tokenizer_matches_hand_computed_ids_in_both_layouts() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut all = vec![];
    for json in [true, false] {
        let dir = tmp.path().join(if json { "json" } else { "txt" });
        write_tokenizer(&dir, json, Some("<|endoftext|>"), 20)?;
        let tok = ClipTokenizer::from_dir(&dir)?;
        assert_eq!(
            (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_len()),
            (21, 22, 22, 20)
        );
        assert_eq!(tok.encode(TEXT)?, TEXT_IDS);
        // Byte-level: "é" = C3 A9 -> "Ã", "©" (+ </w>).
        assert_eq!(tok.encode("é")?, vec![23, 24]);
        // Special tokens in the text are kept whole.
        assert_eq!(tok.encode("<|endoftext|> a")?, vec![22, 5]);
        let padded = tok.encode_padded(TEXT)?;
        let mut want = vec![21];
        want.extend_from_slice(TEXT_IDS);
        want.push(22);
        want.resize(20, 22);
        assert_eq!(padded, want);
        assert_eq!(tok.decode(&TEXT_IDS[..9]), "a photo of the cat 's");
        all.push(padded);
    }
    assert_eq!(all[0], all[1]);
    Ok(())
}

#[test]
fn tokenizer_pads_with_the_folders_pad_token_and_truncates() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // SD 2 / SDXL tokenizer_2 style: pad "!" (id 0).
    let d2 = tmp.path().join("sd2");
    write_tokenizer(&d2, true, Some("!"), 20)?;
    let tok = ClipTokenizer::from_dir(&d2)?;
    assert_eq!(tok.pad_id(), 0);
    assert_eq!(tok.encode_padded("the cat")?, {
        let mut v = vec![21, 19, 7, 4, 17, 22];
        v.resize(20, 0);
        v
    });
    // No tokenizer_config: pad with eos, maximum length 77.
    let d3 = tmp.path().join("bare");
    write_tokenizer(&d3, false, None, 0)?;
    let tok = ClipTokenizer::from_dir(&d3)?;
    assert_eq!((tok.pad_id(), tok.max_len()), (22, 77));
    let ids = tok.encode_padded("a")?;
    assert_eq!(ids.len(), 77);
    assert_eq!(&ids[..4], &[21, 5, 22, 22]);
    // Truncation keeps bos and eos: 8 = bos + 6 tokens + eos.
    let d4 = tmp.path().join("short");
    write_tokenizer(&d4, true, Some("<|endoftext|>"), 8)?;
    let tok = ClipTokenizer::from_dir(&d4)?;
    assert_eq!(tok.encode_padded(TEXT)?, vec![21, 5, 15, 13, 19, 7, 4, 22]);
    assert_eq!(tok.truncated_tokens(TEXT)?, TEXT_IDS.len() - 6);
    // A missing file is an error naming the folder.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty)?;
    let err = ClipTokenizer::from_dir(&empty).err().unwrap().to_string();
    assert!(err.contains("empty") && err.contains("merges.txt"), "{err}");
    Ok(())
}

#[test]
fn tokenizer_round_trips_arbitrary_unicode_through_bytes() -> Result<()> {
    // A vocabulary holding every byte symbol with and without `</w>` (as
    // CLIP's does) plus a few merges: any text must encode without unknowns
    // and decode back to the cleaned text (up to the spaces between pieces).
    // The 256 byte symbols are found by tokenizing each byte value alone.
    let mut printable: Vec<u32> = (33..=126).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut n = 0;
    let symbols: Vec<char> = (0u32..256)
        .map(|b| {
            if printable.contains(&b) {
                char::from_u32(b).unwrap()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            }
        })
        .collect();
    // Known GPT-2/CLIP mapping points: space -> 'Ġ', newline -> 'Ċ', DEL -> 'ġ', soft hyphen -> 'Ń'.
    assert_eq!(
        (symbols[0x20], symbols[0x0A], symbols[0x7F], symbols[0xAD]),
        ('Ġ', 'Ċ', 'ġ', 'Ń')
    );
    let mut vocab = serde_json::Map::new();
    for c in &symbols {
        let i = vocab.len();
        vocab.insert(c.to_string(), serde_json::json!(i));
        vocab.insert(format!("{c}</w>"), serde_json::json!(i + 1));
    }
    for t in ["th", "the</w>", "<|startoftext|>", "<|endoftext|>"] {
        let i = vocab.len();
        vocab.insert(t.to_string(), serde_json::json!(i));
    }
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("vocab.json"),
        serde_json::Value::Object(vocab).to_string(),
    )?;
    std::fs::write(
        dir.path().join("merges.txt"),
        "#version: 0.2\nt h\nth e</w>\n",
    )?;
    let tok = ClipTokenizer::from_dir(dir.path())?;
    assert_eq!(tok.encode("the")?.len(), 1);
    // Soft hyphen (C2 AD) is punctuation: "Â" + "Ń</w>".
    let ids = tok.encode("\u{ad}")?;
    assert_eq!(
        ids,
        vec![tok.token_id("Â").unwrap(), tok.token_id("Ń</w>").unwrap()]
    );
    let texts = [
        "The Quick brown fox, 2024!",
        "café crème brûlée — naïve",
        "東京タワー と 🐱🚀 emoji",
        "tabs\tand\nnewlines   and  ¿qué? ½ ² Ⅻ",
        "it's we'll they'd I'M",
    ];
    for t in texts {
        let ids = tok.encode(t)?;
        let back = tok.decode(&ids);
        let squash = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
        assert_eq!(squash(&back), squash(&ClipTokenizer::clean(t)), "{t:?}");
    }
    Ok(())
}

// ------------------------------------------------------------------ encoder

const VOCAB_N: usize = 64;
const HIDDEN: usize = 32;
const HEADS: usize = 4;
const LAYERS: usize = 3;
const INTER: usize = 48;
const MAX_POS: usize = 16;
const PROJ: usize = 24;
const BOS: u32 = 62;
const EOS: u32 = 63;

fn rand_vec(n: usize, seed: u64, scale: f64) -> Vec<f32> {
    let mut r =
        selma_rng::SplitMix64::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(7));
    (0..n)
        .map(|_| ((r.next_f64() * 2.0 - 1.0) * scale) as f32)
        .collect()
}

/// Writes a tiny random CLIP (seeded) as `model.safetensors` + `config.json`.
fn write_tiny_clip(dir: &Path, act: &str, projection: bool, prefix: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut shapes: Vec<(String, Vec<usize>, f64)> = vec![
        (
            "embeddings.token_embedding.weight".into(),
            vec![VOCAB_N, HIDDEN],
            1.0,
        ),
        (
            "embeddings.position_embedding.weight".into(),
            vec![MAX_POS, HIDDEN],
            0.5,
        ),
        ("final_layer_norm.weight".into(), vec![HIDDEN], 1.0),
        ("final_layer_norm.bias".into(), vec![HIDDEN], 0.2),
    ];
    for l in 0..LAYERS {
        let p = format!("encoder.layers.{l}");
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            shapes.push((
                format!("{p}.self_attn.{n}.weight"),
                vec![HIDDEN, HIDDEN],
                0.3,
            ));
            shapes.push((format!("{p}.self_attn.{n}.bias"), vec![HIDDEN], 0.1));
        }
        shapes.push((format!("{p}.mlp.fc1.weight"), vec![INTER, HIDDEN], 0.3));
        shapes.push((format!("{p}.mlp.fc1.bias"), vec![INTER], 0.1));
        shapes.push((format!("{p}.mlp.fc2.weight"), vec![HIDDEN, INTER], 0.3));
        shapes.push((format!("{p}.mlp.fc2.bias"), vec![HIDDEN], 0.1));
        for n in ["layer_norm1", "layer_norm2"] {
            shapes.push((format!("{p}.{n}.weight"), vec![HIDDEN], 1.0));
            shapes.push((format!("{p}.{n}.bias"), vec![HIDDEN], 0.2));
        }
    }
    let mut map = HashMap::new();
    for (i, (name, shape, scale)) in shapes.into_iter().enumerate() {
        let n = shape.iter().product();
        let mut v = rand_vec(n, 100 + i as u64, scale);
        if name.ends_with("norm1.weight")
            || name.ends_with("norm2.weight")
            || name.starts_with("final_layer_norm.weight")
        {
            v.iter_mut().for_each(|x| *x = 1.0 + 0.3 * *x);
        }
        map.insert(
            format!("{prefix}{name}"),
            Tensor::from_vec(v, shape, &Device::Cpu)?,
        );
    }
    if projection {
        map.insert(
            "text_projection.weight".into(),
            Tensor::from_vec(
                rand_vec(PROJ * HIDDEN, 999, 0.3),
                (PROJ, HIDDEN),
                &Device::Cpu,
            )?,
        );
    }
    candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
    let cfg = serde_json::json!({
        "architectures": [if projection {"CLIPTextModelWithProjection"} else {"CLIPTextModel"}],
        "vocab_size": VOCAB_N, "hidden_size": HIDDEN, "intermediate_size": INTER,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "max_position_embeddings": MAX_POS, "hidden_act": act, "layer_norm_eps": 1e-5,
        "projection_dim": PROJ, "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": 1
    });
    std::fs::write(dir.join("config.json"), cfg.to_string())?;
    Ok(())
}

/// Two sequences of length 10: SD1-style eos padding and SD2-style "!" (0) padding.
fn ids() -> Result<Tensor> {
    Ok(Tensor::new(
        &[
            [BOS, 5, 9, 17, EOS, EOS, EOS, EOS, EOS, EOS],
            [BOS, 3, 4, 5, 6, 7, 8, EOS, 0, 0],
        ],
        &Device::Cpu,
    )?)
}

fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.dims(), reference.dims());
    let d = (ours.to_dtype(DType::F64).unwrap() - reference.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_keepdim(D::Minus1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let m = reference
        .to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    d / m
}

fn ref_cfg(layers: usize) -> RefCfg {
    RefCfg {
        vocab_size: VOCAB_N,
        embed_dim: HIDDEN,
        activation: RefAct::QuickGelu,
        intermediate_size: INTER,
        max_position_embeddings: MAX_POS,
        pad_with: None,
        num_hidden_layers: layers,
        num_attention_heads: HEADS,
        projection_dim: PROJ,
    }
}

#[test]
fn clip_l_matches_candle_transformers() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // Checkpoint keys with the `text_model.` prefix and a text_projection
    // (CLIPTextModelWithProjection, as SDXL's text_encoder_2).
    write_tiny_clip(tmp.path(), "quick_gelu", true, "text_model.")?;
    let ours = ClipTextModel::from_dir(tmp.path(), DType::F32, &Device::Cpu)?;
    let file = tmp.path().join("model.safetensors");
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&file], DType::F32, &Device::Cpu)? };
    let reference = ClipTextTransformer::new(vb.pp("text_model"), &ref_cfg(LAYERS))?;
    let ids = ids()?;

    // last_hidden_state (SD 1.x / 2.x conditioning).
    let out = ours.forward(&ids, HiddenLayer::Last)?;
    let want = reference.forward_with_mask(&ids, usize::MAX)?;
    let e = rel_err(&out.hidden, &want);
    assert!(e < 1e-4, "last_hidden_state rel err {e}");

    // Pooled output: candle-transformers pools at argmax(ids) = the first eos here.
    let want_pooled = reference.forward(&ids)?;
    let e = rel_err(&out.pooled, &want_pooled);
    assert!(e < 1e-4, "pooled rel err {e}");
    assert_eq!(ours.eos_positions(&ids)?, vec![4, 7]);

    // text_projection (no bias) of the pooled output.
    let proj = candle_nn::linear_no_bias(HIDDEN, PROJ, vb.pp("text_projection"))?;
    let e = rel_err(
        out.text_embeds.as_ref().unwrap(),
        &proj.forward(&want_pooled)?,
    );
    assert!(e < 1e-4, "text_embeds rel err {e}");

    // hidden_states[-2] without final norm (SDXL): candle's encoder exposes
    // every layer's output; embeddings computed from the same tables.
    let tok = candle_nn::embedding(
        VOCAB_N,
        HIDDEN,
        vb.pp("text_model.embeddings.token_embedding"),
    )?;
    let pos = candle_nn::embedding(
        MAX_POS,
        HIDDEN,
        vb.pp("text_model.embeddings.position_embedding"),
    )?;
    let emb = tok
        .forward(&ids)?
        .broadcast_add(&pos.forward(&Tensor::arange(0u32, 10, &Device::Cpu)?)?)?;
    let enc = ClipEncoder::new(
        vb.pp("text_model.encoder"),
        &EncoderConfig::Text(ref_cfg(LAYERS)),
    )?;
    let mask: Vec<f32> = (0..10)
        .flat_map(|i| (0..10).map(move |j| if j > i { f32::MIN } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (10, 10), &Device::Cpu)?.broadcast_as((2, 1, 10, 10))?;
    let hs = enc.output_hidden_states(&emb, Some(&mask))?; // layer outputs 1..=LAYERS
    let pen = ours.forward(&ids, HiddenLayer::PENULTIMATE)?;
    let e = rel_err(&pen.hidden, &hs[LAYERS - 2]);
    assert!(e < 1e-4, "hidden_states[-2] rel err {e}");
    // The pooled output does not depend on the chosen hidden layer.
    assert!(rel_err(&pen.pooled, &want_pooled) < 1e-4);
    // hidden_states[-3] = output of the first layer; hidden_states[-4] = embeddings.
    let h3 = ours.forward(
        &ids,
        HiddenLayer::FromEnd {
            k: 3,
            final_norm: false,
        },
    )?;
    assert!(rel_err(&h3.hidden, &hs[0]) < 1e-4);
    let h4 = ours.forward(
        &ids,
        HiddenLayer::FromEnd {
            k: 4,
            final_norm: false,
        },
    )?;
    assert!(rel_err(&h4.hidden, &emb) < 1e-6);
    assert!(ours
        .forward(
            &ids,
            HiddenLayer::FromEnd {
                k: 5,
                final_norm: false
            }
        )
        .is_err());

    // clip-skip style hidden_states[-2] with the final norm = a reference
    // model truncated to LAYERS-1 layers.
    let short = ClipTextTransformer::new(vb.pp("text_model"), &ref_cfg(LAYERS - 1))?;
    let skip = ours.forward(
        &ids,
        HiddenLayer::FromEnd {
            k: 2,
            final_norm: true,
        },
    )?;
    let e = rel_err(&skip.hidden, &short.forward_with_mask(&ids, usize::MAX)?);
    assert!(e < 1e-4, "clip-skip rel err {e}");
    Ok(())
}

#[test]
fn unprefixed_checkpoint_gives_the_same_model() -> Result<()> {
    // transformers 5 saves CLIPTextModel without the `text_model.` prefix
    // (as the SD 1.5 / 2.1 fixtures show); both layouts must load alike.
    let tmp = tempfile::tempdir()?;
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_tiny_clip(&a, "quick_gelu", false, "text_model.")?;
    write_tiny_clip(&b, "quick_gelu", false, "")?;
    // Older transformers checkpoints also store the `position_ids` buffer
    // (int64); it is consumed, not reported as unused.
    let f = b.join("model.safetensors");
    let mut map = candle_core::safetensors::load(&f, &Device::Cpu)?;
    map.insert(
        "embeddings.position_ids".into(),
        Tensor::arange(0i64, MAX_POS as i64, &Device::Cpu)?.unsqueeze(0)?,
    );
    candle_core::safetensors::save(&map, &f)?;
    let cfg = ClipTextConfig::from_file(&b.join("config.json"))?;
    let vb = Vb::from_dir(&b, DType::F32, &Device::Cpu)?;
    ClipTextModel::load(&vb, &cfg)?;
    vb.check_fully_used()?;
    let ma = ClipTextModel::from_dir(&a, DType::F32, &Device::Cpu)?;
    let mb = ClipTextModel::from_dir(&b, DType::F32, &Device::Cpu)?;
    let ids = ids()?;
    let (oa, ob) = (
        ma.forward(&ids, HiddenLayer::Last)?,
        mb.forward(&ids, HiddenLayer::Last)?,
    );
    assert_eq!(rel_err(&oa.hidden, &ob.hidden), 0.0);
    assert!(oa.text_embeds.is_none());
    Ok(())
}

/// Plain f64 CLIP forward (OpenCLIP: exact erf GELU), written independently
/// of the crate's layers: returns every hidden state (embeddings first) and
/// the final-normed last layer.
fn naive_clip(dir: &Path, ids: &[Vec<u32>]) -> Result<(Vec<Tensor>, Tensor)> {
    let w = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    let g = |k: &str| -> Tensor { w[&format!("text_model.{k}")].to_dtype(DType::F64).unwrap() };
    let b = ids.len();
    let l = ids[0].len();
    let ln = |x: &Tensor, p: &str| -> Result<Tensor> {
        let mu = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mu)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        Ok(xc
            .broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(&g(&format!("{p}.weight")))?
            .broadcast_add(&g(&format!("{p}.bias")))?)
    };
    let lin = |x: &Tensor, p: &str| -> Result<Tensor> {
        Ok(x.broadcast_matmul(&g(&format!("{p}.weight")).t()?)?
            .broadcast_add(&g(&format!("{p}.bias")))?)
    };
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    let tok = g("embeddings.token_embedding.weight")
        .index_select(&Tensor::new(flat, &Device::Cpu)?, 0)?;
    let pos = g("embeddings.position_embedding.weight").narrow(0, 0, l)?;
    let mut x = tok.reshape((b, l, HIDDEN))?.broadcast_add(&pos)?;
    let mut states = vec![x.clone()];
    let hd = HIDDEN / HEADS;
    for layer in 0..LAYERS {
        let p = format!("encoder.layers.{layer}");
        let h = ln(&x, &format!("{p}.layer_norm1"))?;
        let q = lin(&h, &format!("{p}.self_attn.q_proj"))?;
        let k = lin(&h, &format!("{p}.self_attn.k_proj"))?;
        let v = lin(&h, &format!("{p}.self_attn.v_proj"))?;
        let mut out = vec![0f64; b * l * HIDDEN];
        let (q, k, v) = (
            q.to_vec3::<f64>()?,
            k.to_vec3::<f64>()?,
            v.to_vec3::<f64>()?,
        );
        for bi in 0..b {
            for head in 0..HEADS {
                for i in 0..l {
                    let s: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..hd)
                                .map(|d| q[bi][i][head * hd + d] * k[bi][j][head * hd + d])
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                    for d in 0..hd {
                        out[(bi * l + i) * HIDDEN + head * hd + d] = (0..=i)
                            .map(|j| (s[j] - m).exp() / z * v[bi][j][head * hd + d])
                            .sum();
                    }
                }
            }
        }
        let a = Tensor::from_vec(out, (b, l, HIDDEN), &Device::Cpu)?;
        x = (x + lin(&a, &format!("{p}.self_attn.out_proj"))?)?;
        let h = lin(
            &ln(&x, &format!("{p}.layer_norm2"))?,
            &format!("{p}.mlp.fc1"),
        )?;
        let gelu = ((&h * 0.5)? * ((&h / 2f64.sqrt())?.erf()? + 1.0)?)?;
        x = (&x + lin(&gelu, &format!("{p}.mlp.fc2"))?)?;
        states.push(x.clone());
    }
    let last = ln(&x, "final_layer_norm")?;
    Ok((states, last))
}

#[test]
fn openclip_gelu_matches_plain_reference() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_tiny_clip(tmp.path(), "gelu", false, "text_model.")?;
    let ours = ClipTextModel::from_dir(tmp.path(), DType::F32, &Device::Cpu)?;
    let ids = ids()?;
    let (states, last) = naive_clip(tmp.path(), &ids.to_vec2::<u32>()?)?;
    let out = ours.forward(&ids, HiddenLayer::Last)?;
    let e = rel_err(&out.hidden, &last);
    assert!(e < 1e-4, "last_hidden_state rel err {e}");
    let pen = ours.forward(&ids, HiddenLayer::PENULTIMATE)?;
    let e = rel_err(&pen.hidden, &states[LAYERS - 1]);
    assert!(e < 1e-4, "hidden_states[-2] rel err {e}");
    // Pooled at the first eos: row 0 position 4, row 1 position 7.
    assert!(rel_err(&out.pooled.i(0)?, &last.i((0, 4))?) < 1e-4);
    assert!(rel_err(&out.pooled.i(1)?, &last.i((1, 7))?) < 1e-4);
    // Sanity: quick_gelu on the same weights gives a different function.
    write_tiny_clip(&tmp.path().join("q"), "quick_gelu", false, "text_model.")?;
    let q = ClipTextModel::from_dir(&tmp.path().join("q"), DType::F32, &Device::Cpu)?;
    assert!(rel_err(&q.forward(&ids, HiddenLayer::Last)?.hidden, &last) > 1e-3);
    Ok(())
}

#[test]
fn text_encoder_lora_runtime_merged_and_gradients() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_tiny_clip(tmp.path(), "quick_gelu", false, "text_model.")?;
    let base = ClipTextModel::from_dir(tmp.path(), DType::F32, &Device::Cpu)?;
    let ids = ids()?;
    let y0 = base.forward(&ids, HiddenLayer::Last)?.hidden;
    let mk = |s: u64, shape: (usize, usize)| {
        Tensor::from_vec(rand_vec(shape.0 * shape.1, s, 0.3), shape, &Device::Cpu).unwrap()
    };
    let mut layers = std::collections::BTreeMap::new();
    for (i, m) in ["self_attn.q_proj", "self_attn.v_proj", "mlp.fc1"]
        .iter()
        .enumerate()
    {
        let out = if *m == "mlp.fc1" { INTER } else { HIDDEN };
        layers.insert(
            format!("text_encoder.text_model.encoder.layers.1.{m}"),
            LoraLayer::new(
                mk(500 + i as u64, (out, 2)),
                mk(600 + i as u64, (2, HIDDEN)),
                1.0,
            )?,
        );
    }
    let file = LoraFile {
        layers,
        metadata: Default::default(),
    };
    let mut m = base.clone();
    assert_eq!(attach_lora(&mut m, &file, "text_encoder", 0.8)?, 3);
    let y_rt = m.forward(&ids, HiddenLayer::Last)?.hidden;
    assert!(rel_err(&y_rt, &y0) > 1e-3, "LoRA had no effect");
    let mut merged = m.clone();
    merge_all_adapters(&mut merged)?;
    let e = rel_err(&merged.forward(&ids, HiddenLayer::Last)?.hidden, &y_rt);
    assert!(e < 1e-5, "merged vs runtime {e}");
    // A LoRA on a module the model lacks is an error naming it.
    let mut bad = file.clone();
    let l = bad.layers.values().next().unwrap().clone();
    bad.layers
        .insert("text_encoder.text_model.encoder.layers.9.mlp.fc1".into(), l);
    let err = format!(
        "{:#}",
        attach_lora(&mut base.clone(), &bad, "text_encoder", 1.0).unwrap_err()
    );
    assert!(err.contains("layers.9.mlp.fc1"), "{err}");

    // Gradients flow from the pooled output and the hidden states to the adapters.
    let mut t = base.clone();
    let down = Var::from_tensor(&mk(700, (2, HIDDEN)))?;
    let up = Var::from_tensor(&mk(701, (HIDDEN, 2)))?;
    t.layers[0]
        .self_attn
        .k_proj
        .adapters
        .push(selma_diffusion::nn::Adapter::new(
            up.as_tensor().clone(),
            down.as_tensor().clone(),
            0.5,
            1.0,
        ));
    let o = t.forward(&ids, HiddenLayer::Last)?;
    let loss = (o.hidden.sqr()?.sum_all()? + o.pooled.sum_all()?)?;
    let grads = loss.backward()?;
    for v in [&up, &down] {
        let g = grads
            .get(v.as_tensor())
            .expect("gradient reaches the adapter");
        let n = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
        assert!(n > 1e-8 && n.is_finite(), "gradient norm {n}");
    }
    Ok(())
}
