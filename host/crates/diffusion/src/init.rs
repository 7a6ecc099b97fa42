//! Random model folders in the exact diffusers layout (`selma model init`):
//! `model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/` (a
//! small CLIP-style BPE vocabulary trained here on a built-in corpus, or on
//! the ShapeWorld words) and `scheduler/`, every config included (the
//! shapeworld preset's `vae/` is the weightless pixel-unshuffle codec). The key / shape lists are derived from
//! the configs independently of the loaders (tests compare them with the real
//! checkpoint layouts), and the weights come from the seeded generator, one
//! stream per tensor name, so the bytes depend only on preset and seed.

use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::{Dtype, View};
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::codec::PIXEL_UNSHUFFLE;
use crate::scheduler::GaussianRng;
use crate::vae::VaeConfig;

/// Which random model to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// A few-MB SD 1.x-style model: every block type, fast on CPU (64 px images).
    Tiny,
    /// A few-MB SDXL-style model: two text encoders (the second with a
    /// projection), pooled embeds and size/crop time ids, linear projections,
    /// several transformer layers per block.
    TinyXl,
    /// The SD 1.5 architecture (UNet 860M, VAE 84M, CLIP-L) with random f16
    /// weights (~2.1 GB), for GPU checks and timings.
    Sd15Random,
    /// The ShapeWorld base architecture (32x32 images): the pixel-unshuffle
    /// codec (factor 2, no weights), a 6.6M-parameter UNet on 16x16x12
    /// latents, a 2-layer width-64 CLIP text encoder, a tokenizer with every
    /// ShapeWorld word as one token, v-prediction on the cosine schedule.
    Shapeworld,
}

impl std::str::FromStr for Preset {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tiny" => Ok(Self::Tiny),
            "tiny-xl" => Ok(Self::TinyXl),
            "sd15-random" => Ok(Self::Sd15Random),
            "shapeworld" => Ok(Self::Shapeworld),
            o => bail!("unknown preset {o:?}: use tiny, tiny-xl, sd15-random or shapeworld"),
        }
    }
}

/// The key prefix of CLIP text encoder checkpoints written by transformers 4.
pub const CLIP_PREFIX: &str = "text_model.";

/// A parameter name and shape.
pub type ParamShape = (String, Vec<usize>);

fn cfg_usize(cfg: &Value, key: &str, default: Option<usize>) -> Result<usize> {
    match cfg.get(key) {
        Some(v) if !v.is_null() => v
            .as_u64()
            .map(|x| x as usize)
            .with_context(|| format!("config key \"{key}\" must be an integer, got {v}")),
        _ => default.with_context(|| format!("config key \"{key}\" is missing")),
    }
}

fn per_block(cfg: &Value, key: &str, n: usize, default: usize) -> Result<Vec<usize>> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(vec![default; n]),
        Some(Value::Array(a)) => {
            ensure!(
                a.len() == n,
                "config key \"{key}\" has {} entries, expected {n}",
                a.len()
            );
            a.iter()
                .map(|v| {
                    v.as_u64()
                        .map(|x| x as usize)
                        .with_context(|| format!("\"{key}\": {v}"))
                })
                .collect()
        }
        Some(v) => Ok(vec![
            v.as_u64().with_context(|| format!(
                "config key \"{key}\" must be an integer or list, got {v}"
            ))? as usize;
            n
        ]),
    }
}

fn strings(cfg: &Value, key: &str) -> Result<Vec<String>> {
    cfg.get(key)
        .and_then(|v| v.as_array())
        .with_context(|| format!("config key \"{key}\" must be a list"))?
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .with_context(|| format!("\"{key}\": {v}"))
        })
        .collect()
}

struct Keys(Vec<ParamShape>);

impl Keys {
    fn add(&mut self, name: String, shape: &[usize]) {
        self.0.push((name, shape.to_vec()));
    }
    fn wb(&mut self, p: &str, w: &[usize], bias: Option<usize>) {
        self.add(format!("{p}.weight"), w);
        if let Some(b) = bias {
            self.add(format!("{p}.bias"), &[b]);
        }
    }
    fn norm(&mut self, p: &str, c: usize) {
        self.wb(p, &[c], Some(c));
    }
    fn conv(&mut self, p: &str, cin: usize, cout: usize, k: usize) {
        self.wb(p, &[cout, cin, k, k], Some(cout));
    }
    fn resnet(&mut self, p: &str, cin: usize, cout: usize, temb: Option<usize>) {
        self.norm(&format!("{p}.norm1"), cin);
        self.conv(&format!("{p}.conv1"), cin, cout, 3);
        if let Some(t) = temb {
            self.wb(&format!("{p}.time_emb_proj"), &[cout, t], Some(cout));
        }
        self.norm(&format!("{p}.norm2"), cout);
        self.conv(&format!("{p}.conv2"), cout, cout, 3);
        if cin != cout {
            self.conv(&format!("{p}.conv_shortcut"), cin, cout, 1);
        }
    }
    fn transformer(&mut self, p: &str, c: usize, cross: usize, linear: bool, layers: usize) {
        self.norm(&format!("{p}.norm"), c);
        let proj: Vec<usize> = if linear { vec![c, c] } else { vec![c, c, 1, 1] };
        self.wb(&format!("{p}.proj_in"), &proj, Some(c));
        for l in 0..layers {
            let b = format!("{p}.transformer_blocks.{l}");
            for (i, ctx) in [(1, c), (2, cross)] {
                self.norm(&format!("{b}.norm{i}"), c);
                self.wb(&format!("{b}.attn{i}.to_q"), &[c, c], None);
                self.wb(&format!("{b}.attn{i}.to_k"), &[c, ctx], None);
                self.wb(&format!("{b}.attn{i}.to_v"), &[c, ctx], None);
                self.wb(&format!("{b}.attn{i}.to_out.0"), &[c, c], Some(c));
            }
            self.norm(&format!("{b}.norm3"), c);
            self.wb(&format!("{b}.ff.net.0.proj"), &[8 * c, c], Some(8 * c));
            self.wb(&format!("{b}.ff.net.2"), &[c, 4 * c], Some(c));
        }
        self.wb(&format!("{p}.proj_out"), &proj, Some(c));
    }
}

/// Every key and shape of a diffusers `UNet2DConditionModel` (SD 1.x / 2.x /
/// XL: cross-attention and plain down/up blocks, `UNetMidBlock2DCrossAttn`,
/// SDXL's `text_time` added embedding).
pub fn unet_param_shapes(cfg: &Value) -> Result<Vec<ParamShape>> {
    let addition = match cfg.get("addition_embed_type") {
        None | Some(Value::Null) => None,
        Some(v) if v == "text_time" => Some(cfg_usize(
            cfg,
            "projection_class_embeddings_input_dim",
            None,
        )?),
        Some(v) => bail!("addition_embed_type {v} is not supported (only \"text_time\")"),
    };
    let boc: Vec<usize> = cfg
        .get("block_out_channels")
        .and_then(|v| v.as_array())
        .context("config key \"block_out_channels\" must be a list")?
        .iter()
        .map(|v| {
            v.as_u64()
                .map(|x| x as usize)
                .context("\"block_out_channels\" entries must be integers")
        })
        .collect::<Result<_>>()?;
    ensure!(!boc.is_empty(), "\"block_out_channels\" is empty");
    let n = boc.len();
    let down = strings(cfg, "down_block_types")?;
    let up = strings(cfg, "up_block_types")?;
    ensure!(
        down.len() == n && up.len() == n,
        "block type lists must match block_out_channels"
    );
    let layers = per_block(cfg, "layers_per_block", n, 2)?;
    let tlayers = per_block(cfg, "transformer_layers_per_block", n, 1)?;
    let cross = cfg_usize(cfg, "cross_attention_dim", Some(1280))?;
    let linear = cfg
        .get("use_linear_projection")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let cin = cfg_usize(cfg, "in_channels", Some(4))?;
    let cout = cfg_usize(cfg, "out_channels", Some(4))?;
    let c0 = boc[0];
    let temb = 4 * c0;
    let mut k = Keys(vec![]);
    k.conv("conv_in", cin, c0, 3);
    k.wb("time_embedding.linear_1", &[temb, c0], Some(temb));
    k.wb("time_embedding.linear_2", &[temb, temb], Some(temb));
    if let Some(pcid) = addition {
        k.wb("add_embedding.linear_1", &[temb, pcid], Some(temb));
        k.wb("add_embedding.linear_2", &[temb, temb], Some(temb));
    }
    for i in 0..n {
        let p = format!("down_blocks.{i}");
        let out = boc[i];
        let mut c = if i == 0 { c0 } else { boc[i - 1] };
        for j in 0..layers[i] {
            k.resnet(&format!("{p}.resnets.{j}"), c, out, Some(temb));
            if down[i].starts_with("CrossAttn") {
                k.transformer(
                    &format!("{p}.attentions.{j}"),
                    out,
                    cross,
                    linear,
                    tlayers[i],
                );
            }
            c = out;
        }
        if i + 1 < n {
            k.conv(&format!("{p}.downsamplers.0.conv"), out, out, 3);
        }
    }
    let last = boc[n - 1];
    k.resnet("mid_block.resnets.0", last, last, Some(temb));
    k.transformer(
        "mid_block.attentions.0",
        last,
        cross,
        linear,
        tlayers[n - 1],
    );
    k.resnet("mid_block.resnets.1", last, last, Some(temb));
    let rev: Vec<usize> = boc.iter().rev().copied().collect();
    let rlayers: Vec<usize> = layers.iter().rev().copied().collect();
    let rtl: Vec<usize> = tlayers.iter().rev().copied().collect();
    for i in 0..n {
        let p = format!("up_blocks.{i}");
        let out = rev[i];
        let prev = if i == 0 { rev[0] } else { rev[i - 1] };
        let input = rev[(i + 1).min(n - 1)];
        let nl = rlayers[i] + 1;
        for j in 0..nl {
            let skip = if j + 1 == nl { input } else { out };
            let rin = if j == 0 { prev } else { out };
            k.resnet(&format!("{p}.resnets.{j}"), rin + skip, out, Some(temb));
            if up[i].starts_with("CrossAttn") {
                k.transformer(&format!("{p}.attentions.{j}"), out, cross, linear, rtl[i]);
            }
        }
        if i + 1 < n {
            k.conv(&format!("{p}.upsamplers.0.conv"), out, out, 3);
        }
    }
    k.norm("conv_norm_out", c0);
    k.conv("conv_out", c0, cout, 3);
    Ok(k.0)
}

/// Every key and shape of a diffusers `AutoencoderKL` (modern attention names).
pub fn vae_param_shapes(c: &VaeConfig) -> Vec<ParamShape> {
    let boc = &c.block_out_channels;
    let n = boc.len();
    let g = |k: &mut Keys, p: &str, ch: usize| {
        k.norm(&format!("{p}.group_norm"), ch);
        for q in ["to_q", "to_k", "to_v", "to_out.0"] {
            k.wb(&format!("{p}.{q}"), &[ch, ch], Some(ch));
        }
    };
    let mut k = Keys(vec![]);
    k.conv("encoder.conv_in", c.in_channels, boc[0], 3);
    for i in 0..n {
        let mut cin = if i == 0 { boc[0] } else { boc[i - 1] };
        for j in 0..c.layers_per_block {
            k.resnet(
                &format!("encoder.down_blocks.{i}.resnets.{j}"),
                cin,
                boc[i],
                None,
            );
            cin = boc[i];
        }
        if i + 1 < n {
            k.conv(
                &format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                boc[i],
                boc[i],
                3,
            );
        }
    }
    let last = boc[n - 1];
    for part in ["encoder", "decoder"] {
        k.resnet(&format!("{part}.mid_block.resnets.0"), last, last, None);
        if c.mid_block_add_attention {
            g(&mut k, &format!("{part}.mid_block.attentions.0"), last);
        }
        k.resnet(&format!("{part}.mid_block.resnets.1"), last, last, None);
    }
    k.norm("encoder.conv_norm_out", last);
    k.conv("encoder.conv_out", last, 2 * c.latent_channels, 3);
    k.conv("decoder.conv_in", c.latent_channels, last, 3);
    let rev: Vec<usize> = boc.iter().rev().copied().collect();
    for i in 0..n {
        let mut cin = if i == 0 { rev[0] } else { rev[i - 1] };
        for j in 0..c.layers_per_block + 1 {
            k.resnet(
                &format!("decoder.up_blocks.{i}.resnets.{j}"),
                cin,
                rev[i],
                None,
            );
            cin = rev[i];
        }
        if i + 1 < n {
            k.conv(
                &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                rev[i],
                rev[i],
                3,
            );
        }
    }
    k.norm("decoder.conv_norm_out", boc[0]);
    k.conv("decoder.conv_out", boc[0], c.out_channels, 3);
    if c.use_quant_conv {
        let l2 = 2 * c.latent_channels;
        k.conv("quant_conv", l2, l2, 1);
    }
    if c.use_post_quant_conv {
        k.conv("post_quant_conv", c.latent_channels, c.latent_channels, 1);
    }
    k.0
}

/// Every key and shape of a transformers `CLIPTextModel` (with `prefix`,
/// usually [`CLIP_PREFIX`]); `text_projection` too when `with_projection`.
pub fn clip_param_shapes(
    cfg: &Value,
    prefix: &str,
    with_projection: bool,
) -> Result<Vec<ParamShape>> {
    let d = cfg_usize(cfg, "hidden_size", None)?;
    let ff = cfg_usize(cfg, "intermediate_size", None)?;
    let layers = cfg_usize(cfg, "num_hidden_layers", None)?;
    let vocab = cfg_usize(cfg, "vocab_size", None)?;
    let pos = cfg_usize(cfg, "max_position_embeddings", Some(77))?;
    let mut k = Keys(vec![]);
    k.add(
        format!("{prefix}embeddings.token_embedding.weight"),
        &[vocab, d],
    );
    k.add(
        format!("{prefix}embeddings.position_embedding.weight"),
        &[pos, d],
    );
    for l in 0..layers {
        let p = format!("{prefix}encoder.layers.{l}");
        for q in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            k.wb(&format!("{p}.self_attn.{q}"), &[d, d], Some(d));
        }
        k.norm(&format!("{p}.layer_norm1"), d);
        k.wb(&format!("{p}.mlp.fc1"), &[ff, d], Some(ff));
        k.wb(&format!("{p}.mlp.fc2"), &[d, ff], Some(d));
        k.norm(&format!("{p}.layer_norm2"), d);
    }
    k.norm(&format!("{prefix}final_layer_norm"), d);
    if with_projection {
        let pd = cfg_usize(cfg, "projection_dim", Some(d))?;
        k.add("text_projection.weight".into(), &[pd, d]);
    }
    Ok(k.0)
}

// ---------------------------------------------------------------- tokenizer

/// GPT-2 / CLIP byte -> printable unicode character table.
pub fn bytes_to_unicode() -> Vec<char> {
    let mut table = vec!['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap()
        };
    }
    table
}

const CORPUS: &str = "a photo of a red cube on a blue table next to a green sphere \
 two yellow cats and three brown dogs playing in the park at sunset \
 an astronaut riding a horse on the moon a painting of a city street in the rain \
 the left of the right above below behind in front of small large tall short \
 a bowl of fruit with apples oranges and bananas a portrait of a woman wearing a hat \
 a man holding an umbrella a car parked near a house with a white door and windows \
 one two three four five six seven eight nine ten colorful detailed high quality \
 black white purple pink orange gray silver golden wooden metal glass stone water";

/// `(vocab.json, merges.txt)` of a small CLIP-style BPE tokenizer trained on a
/// built-in corpus: 512 byte symbols, `n_merges` merges, then the two specials.
pub fn tiny_tokenizer(n_merges: usize) -> (String, String) {
    train_bpe(CORPUS.split_whitespace(), n_merges)
}

/// `(vocab.json, merges.txt)` of a CLIP-style BPE tokenizer in which every
/// word of `words` is one token (merges run until each word is one symbol);
/// any other text still encodes, byte by byte.
pub fn word_tokenizer(words: &[&str]) -> (String, String) {
    train_bpe(words.iter().copied(), usize::MAX)
}

/// Train byte-level BPE with CLIP's `</w>` end-of-word marking on `words`
/// (most frequent pair first, ties by pair order): at most `n_merges` merges,
/// fewer when every word is already one symbol.
fn train_bpe<'a>(words_in: impl Iterator<Item = &'a str>, n_merges: usize) -> (String, String) {
    let b2u = bytes_to_unicode();
    let mut words: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    for w in words_in {
        let mut syms: Vec<String> = w.bytes().map(|b| b2u[b as usize].to_string()).collect();
        if let Some(last) = syms.last_mut() {
            last.push_str("</w>");
        }
        *words.entry(syms).or_default() += 1;
    }
    let mut merges: Vec<(String, String)> = vec![];
    while merges.len() < n_merges {
        let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
        for (syms, &c) in &words {
            for p in syms.windows(2) {
                *counts.entry((p[0].clone(), p[1].clone())).or_default() += c;
            }
        }
        // most frequent pair; ties broken by the pair's order (deterministic)
        let Some((best, _)) = counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
            .map(|(p, c)| (p.clone(), *c))
        else {
            break;
        };
        let mut next = BTreeMap::new();
        for (syms, c) in words {
            let mut out: Vec<String> = Vec::with_capacity(syms.len());
            let mut i = 0;
            while i < syms.len() {
                if i + 1 < syms.len() && syms[i] == best.0 && syms[i + 1] == best.1 {
                    out.push(format!("{}{}", best.0, best.1));
                    i += 2;
                } else {
                    out.push(syms[i].clone());
                    i += 1;
                }
            }
            *next.entry(out).or_default() += c;
        }
        words = next;
        merges.push(best);
    }
    let mut vocab: Vec<String> = b2u.iter().map(|c| c.to_string()).collect();
    vocab.extend(b2u.iter().map(|c| format!("{c}</w>")));
    // two merges can spell the same token: keep ids contiguous
    let mut seen: std::collections::HashSet<String> = vocab.iter().cloned().collect();
    for (a, b) in &merges {
        let t = format!("{a}{b}");
        if seen.insert(t.clone()) {
            vocab.push(t);
        }
    }
    vocab.push("<|startoftext|>".into());
    vocab.push("<|endoftext|>".into());
    let map: serde_json::Map<String, Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let vocab_json = serde_json::to_string(&Value::Object(map)).expect("vocab serialises");
    let mut merges_txt = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        merges_txt.push_str(&format!("{a} {b}\n"));
    }
    (vocab_json, merges_txt)
}

// ---------------------------------------------------------------- writing

struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn is_norm(name: &str) -> bool {
    let module = name.rsplit_once('.').map(|(m, _)| m).unwrap_or(name);
    let last = module.rsplit('.').next().unwrap_or(module);
    last.contains("norm")
}

/// The random value of every element of `name` (seeded by seed and name):
/// norm scales 1 and shifts 0, embeddings N(0, 0.02), other biases N(0, 0.02),
/// other weights N(0, 1/fan_in).
pub fn init_values(name: &str, shape: &[usize], seed: u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let is_weight = name.ends_with(".weight");
    if is_norm(name) {
        return vec![if is_weight { 1.0 } else { 0.0 }; n];
    }
    let std = if name.contains("embedding.weight") || !is_weight || shape.len() < 2 {
        0.02
    } else {
        let fan_in: usize = shape[1..].iter().product();
        1.0 / (fan_in as f64).sqrt()
    };
    let mut rng = GaussianRng::new(seed ^ fnv1a(name));
    (0..n).map(|_| (rng.normal() * std) as f32).collect()
}

fn write_weights(path: &Path, params: &[ParamShape], seed: u64, half: bool) -> Result<usize> {
    let mut count = 0;
    let mut raw: BTreeMap<String, Raw> = BTreeMap::new();
    for (name, shape) in params {
        let v = init_values(name, shape, seed);
        count += v.len();
        let (dtype, data) = if half {
            (
                Dtype::F16,
                v.iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect(),
            )
        } else {
            (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        };
        ensure!(
            raw.insert(
                name.clone(),
                Raw {
                    dtype,
                    shape: shape.clone(),
                    data
                }
            )
            .is_none(),
            "duplicate parameter {name}"
        );
    }
    safetensors::tensor::serialize_to_file(raw.iter(), None::<HashMap<String, String>>, path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(count)
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}

/// The `unet/config.json` of the tiny preset.
pub fn tiny_unet_config() -> Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.30.0",
        "act_fn": "silu",
        "attention_head_dim": 4,
        "block_out_channels": [32, 64],
        "center_input_sample": false,
        "cross_attention_dim": 32,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 1,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 8,
        "out_channels": 4,
        "sample_size": 8,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "use_linear_projection": false
    })
}

/// The `vae/config.json` of the tiny preset (four levels: 8x downscale like SD).
pub fn tiny_vae_config() -> Value {
    json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.30.0",
        "act_fn": "silu",
        "block_out_channels": [16, 16, 32, 32],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "out_channels": 3,
        "sample_size": 64,
        "scaling_factor": 0.18215,
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
    })
}

/// The `unet/config.json` of the tiny-xl preset.
pub fn tiny_xl_unet_config() -> Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.30.0",
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "attention_head_dim": [2, 4],
        "block_out_channels": [32, 64],
        "center_input_sample": false,
        "cross_attention_dim": 64,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 1,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 8,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 80,
        "sample_size": 8,
        "transformer_layers_per_block": [1, 2],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": true
    })
}

/// Tokens per ShapeWorld prompt (bos + up to 12 words + eos, padded).
pub const SHAPEWORLD_MAX_TOKENS: usize = 16;

/// The `unet/config.json` of the shapeworld preset: channels (64, 128, 128),
/// one layer per block, attention at 8x8, 4x4 and mid, 4 heads, 8 groups,
/// cross-attention dim 64, 16x16x12 latents.
pub fn shapeworld_unet_config() -> Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.30.0",
        "act_fn": "silu",
        "attention_head_dim": 4,
        "block_out_channels": [64, 128, 128],
        "center_input_sample": false,
        "cross_attention_dim": 64,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 12,
        "layers_per_block": 1,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 8,
        "out_channels": 12,
        "sample_size": 16,
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": true
    })
}

/// The `vae/config.json` of the shapeworld preset: the weightless
/// pixel-unshuffle codec, factor 2 (32x32x3 <-> 16x16x12), scaling 1.
pub fn shapeworld_codec_config() -> Value {
    json!({
        "_class_name": PIXEL_UNSHUFFLE,
        "factor": 2,
        "in_channels": 3,
        "latent_channels": 12,
        "sample_size": 32,
        "scaling_factor": 1.0
    })
}

/// The shapeworld scheduler: v-prediction on the cosine
/// (`squaredcos_cap_v2`) schedule, 1000 steps, DDIM (diffusers' defaults:
/// x0 clipped to [-1, 1], which is exactly the pixel range of this codec).
pub fn shapeworld_scheduler_config() -> Value {
    json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.30.0",
        "beta_end": 0.02,
        "beta_schedule": "squaredcos_cap_v2",
        "beta_start": 0.0001,
        "clip_sample": true,
        "clip_sample_range": 1.0,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "set_alpha_to_one": true,
        "steps_offset": 0,
        "timestep_spacing": "leading",
        "trained_betas": null
    })
}

fn clip_config(hidden: usize, ff: usize, layers: usize, heads: usize, vocab: usize) -> Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "hidden_act": "quick_gelu",
        "hidden_size": hidden,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": ff,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "pad_token_id": 1,
        "projection_dim": hidden,
        "torch_dtype": "float32",
        "vocab_size": vocab
    })
}

/// SD 1.5's scheduler config, as a DDIM config.
pub fn sd15_scheduler_config() -> Value {
    json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.30.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": null
    })
}

/// What `init_model` wrote.
#[derive(Debug, Clone)]
pub struct InitSummary {
    /// The model folder.
    pub dir: PathBuf,
    /// Parameters per component (`unet`, `vae`, `text_encoder`).
    pub params: Vec<(String, usize)>,
}

/// Write a random model of `preset` into `out` (which must not exist or be
/// empty). Written into a sibling temp folder and renamed: all or nothing.
/// The shapeworld preset needs its vocabulary: use [`init_model_with_vocabulary`].
pub fn init_model(preset: Preset, out: &Path, seed: u64) -> Result<InitSummary> {
    init_model_with_vocabulary(preset, out, seed, &[])
}

/// [`init_model`] with the words the tokenizer must keep whole (one token
/// each); required by the shapeworld preset (the ShapeWorld vocabulary,
/// which the caller owns), ignored by the others.
pub fn init_model_with_vocabulary(
    preset: Preset,
    out: &Path,
    seed: u64,
    words: &[&str],
) -> Result<InitSummary> {
    ensure!(
        preset != Preset::Shapeworld || !words.is_empty(),
        "the shapeworld preset needs the ShapeWorld vocabulary (`selma model init` passes it)"
    );
    let params = build_folder_atomically(out, |tmp| write_model(preset, tmp, seed, words))?;
    Ok(InitSummary {
        dir: out.to_path_buf(),
        params,
    })
}

/// Create the folder `out` (which must not exist or be empty) by running
/// `build` on a sibling temp folder and renaming it: all or nothing.
pub fn build_folder_atomically<T>(out: &Path, build: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    if out.exists() {
        let empty = std::fs::read_dir(out)
            .with_context(|| format!("{} exists and is not a readable folder", out.display()))?
            .next()
            .is_none();
        ensure!(
            empty,
            "{} already exists and is not empty; pick a new --out",
            out.display()
        );
        std::fs::remove_dir(out).with_context(|| format!("replacing empty {}", out.display()))?;
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    out.file_name().context("--out has no folder name")?;
    let tmp = selma_io::temp_path(out)?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).ok();
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    match build(&tmp) {
        Ok(v) => {
            std::fs::rename(&tmp, out)
                .with_context(|| format!("moving {} to {}", tmp.display(), out.display()))?;
            Ok(v)
        }
        Err(e) => {
            std::fs::remove_dir_all(&tmp).ok();
            Err(e)
        }
    }
}

fn write_model(
    preset: Preset,
    dir: &Path,
    seed: u64,
    words: &[&str],
) -> Result<Vec<(String, usize)>> {
    for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    let sw = preset == Preset::Shapeworld;
    let (vocab, merges) = if sw {
        word_tokenizer(words)
    } else {
        tiny_tokenizer(300)
    };
    let vocab_size = serde_json::from_str::<serde_json::Map<String, Value>>(&vocab)?.len();
    let xl = preset == Preset::TinyXl;
    let (unet_cfg, mut vae_cfg, clip_cfg, half) = match preset {
        Preset::Shapeworld => {
            let mut clip = clip_config(64, 128, 2, 4, vocab_size);
            clip["max_position_embeddings"] = json!(SHAPEWORLD_MAX_TOKENS);
            (
                shapeworld_unet_config(),
                shapeworld_codec_config(),
                clip,
                false,
            )
        }
        Preset::Tiny => (
            tiny_unet_config(),
            tiny_vae_config(),
            clip_config(32, 64, 2, 2, vocab_size),
            false,
        ),
        Preset::TinyXl => (
            tiny_xl_unet_config(),
            tiny_vae_config(),
            clip_config(32, 64, 2, 2, vocab_size),
            false,
        ),
        Preset::Sd15Random => {
            let mut unet: Value = serde_json::from_str(include_str!(
                "../tests/fixtures/sd-layouts/sd15/unet/config.json"
            ))?;
            let mut vae: Value = serde_json::from_str(include_str!(
                "../tests/fixtures/sd-layouts/sd15/vae/config.json"
            ))?;
            for v in [&mut unet, &mut vae] {
                v.as_object_mut().map(|o| o.remove("_use_default_values"));
            }
            // CLIP ViT-L/14 text tower; our small vocabulary indexes its first rows.
            (unet, vae, clip_config(768, 3072, 12, 12, 49408), true)
        }
    };
    if xl {
        vae_cfg["scaling_factor"] = json!(0.13025);
        vae_cfg["force_upcast"] = json!(true);
    }
    let mut clip_cfg = clip_cfg;
    clip_cfg["bos_token_id"] = json!(vocab_size - 2);
    clip_cfg["eos_token_id"] = json!(vocab_size - 1);
    let vae_parsed = if sw {
        None
    } else {
        Some(VaeConfig::from_json(&vae_cfg.to_string()).context("preset VAE config")?)
    };
    let mut model_index = if xl {
        json!({
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": "0.30.0",
            "force_zeros_for_empty_prompt": true,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        })
    } else {
        json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.30.0",
            "feature_extractor": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        })
    };
    if sw {
        model_index["vae"] = json!(["selma", PIXEL_UNSHUFFLE]);
    }
    write_json(&dir.join("model_index.json"), &model_index)?;
    write_json(
        &dir.join("scheduler/scheduler_config.json"),
        &if sw {
            shapeworld_scheduler_config()
        } else {
            sd15_scheduler_config()
        },
    )?;
    write_json(&dir.join("unet/config.json"), &unet_cfg)?;
    write_json(&dir.join("vae/config.json"), &vae_cfg)?;
    write_json(&dir.join("text_encoder/config.json"), &clip_cfg)?;
    let toks: &[(&str, &str)] = if xl {
        &[("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")]
    } else {
        &[("tokenizer", "<|endoftext|>")]
    };
    for (sub, pad) in toks {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        std::fs::write(d.join("vocab.json"), &vocab)?;
        std::fs::write(d.join("merges.txt"), &merges)?;
        let specials = json!({
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": pad,
            "unk_token": "<|endoftext|>"
        });
        write_json(&d.join("special_tokens_map.json"), &specials)?;
        let mut tok_cfg = specials.clone();
        tok_cfg["tokenizer_class"] = json!("CLIPTokenizer");
        tok_cfg["model_max_length"] = json!(if sw { SHAPEWORLD_MAX_TOKENS } else { 77 });
        tok_cfg["do_lower_case"] = json!(true);
        write_json(&d.join("tokenizer_config.json"), &tok_cfg)?;
    }
    let unet = unet_param_shapes(&unet_cfg)?;
    let clip = clip_param_shapes(&clip_cfg, CLIP_PREFIX, false)?;
    let mut counts = vec![(
        "unet".to_string(),
        write_weights(
            &dir.join("unet/diffusion_pytorch_model.safetensors"),
            &unet,
            seed,
            half,
        )?,
    )];
    // the pixel-unshuffle codec has no weights
    if let Some(vae_parsed) = &vae_parsed {
        counts.push((
            "vae".to_string(),
            write_weights(
                &dir.join("vae/diffusion_pytorch_model.safetensors"),
                &vae_param_shapes(vae_parsed),
                seed.wrapping_add(1),
                half,
            )?,
        ));
    }
    counts.push((
        "text_encoder".to_string(),
        write_weights(
            &dir.join("text_encoder/model.safetensors"),
            &clip,
            seed.wrapping_add(2),
            half,
        )?,
    ));
    if xl {
        // OpenCLIP-bigG style: erf GELU, projection of the pooled embedding.
        let mut cfg2 = clip_cfg.clone();
        cfg2["architectures"] = json!(["CLIPTextModelWithProjection"]);
        cfg2["hidden_act"] = json!("gelu");
        cfg2["pad_token_id"] = json!(0);
        let d = dir.join("text_encoder_2");
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        write_json(&d.join("config.json"), &cfg2)?;
        let clip2 = clip_param_shapes(&cfg2, CLIP_PREFIX, true)?;
        counts.push((
            "text_encoder_2".to_string(),
            write_weights(
                &d.join("model.safetensors"),
                &clip2,
                seed.wrapping_add(3),
                half,
            )?,
        ));
    }
    Ok(counts)
}
