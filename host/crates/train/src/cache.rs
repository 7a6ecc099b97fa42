//! The run folder's caches and their keys: VAE posteriors
//! (`<run_dir>/latent-cache/`, keyed by image bytes, codec identity,
//! resolution, crop/flip and dtype) and, while the text encoder is frozen,
//! text embeddings (`<run_dir>/text-cache/`, keyed by caption, text-encoder
//! identity and dtype). Each keeps what it served in memory too. The
//! identities are `selma_io::model_identity` over the model's part folders,
//! so another model (or changed weights) never hits old entries.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use crate::dataset::Variant;

/// The text encoders' and tokenizers' part folders.
const TEXT_PARTS: [&str; 4] = ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"];

/// Identity of the image codec: the `vae/` folder, or whatever other part
/// folder the model declares besides the UNet, text encoders, tokenizers and
/// scheduler (plus `model_index.json`).
pub fn vae_identity(model: &Path) -> Result<String> {
    let mut dirs = vec![];
    for e in std::fs::read_dir(model).with_context(|| format!("listing {}", model.display()))? {
        let e = e.with_context(|| format!("listing {}", model.display()))?;
        let name = e.file_name().to_string_lossy().to_string();
        let other = ["unet", "scheduler"].contains(&name.as_str())
            || name.starts_with("text_encoder")
            || name.starts_with("tokenizer");
        if e.path().is_dir() && !other {
            dirs.push(name);
        }
    }
    dirs.sort();
    let parts: Vec<&str> = dirs.iter().map(String::as_str).collect();
    selma_io::model_identity(model, Some(&parts))
}

/// Identity of the text encoders and tokenizers (plus `model_index.json`).
pub fn text_encoder_identity(model: &Path) -> Result<String> {
    selma_io::model_identity(model, Some(&TEXT_PARTS))
}

/// Loads a cache entry (`None` when absent); errors name the file.
fn load_entry(file: &Path, device: &Device) -> Result<Option<HashMap<String, Tensor>>> {
    if !file.is_file() {
        return Ok(None);
    }
    let m = candle_core::safetensors::load(file, device)
        .with_context(|| format!("reading cache entry {}", file.display()))?;
    Ok(Some(m))
}

/// Writes a cache entry atomically (selma-io temp name, then rename); the
/// cache folder is created on first use.
fn store_entry(file: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = selma_io::temp_path(file)?;
    if let Err(e) = candle_core::safetensors::save(tensors, &tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", file.display()));
    }
    selma_io::commit(&tmp, file)
}

/// The tensors of `pairs`, moved to the CPU for saving.
fn on_cpu(pairs: &[(&str, &Tensor)]) -> Result<HashMap<String, Tensor>> {
    pairs
        .iter()
        .map(|(k, t)| Ok((k.to_string(), t.to_device(&Device::Cpu)?)))
        .collect()
}

/// VAE posteriors `(mean, std)` (f32) of dataset samples, in memory and on disk.
#[derive(Debug)]
pub struct LatentCache {
    dir: PathBuf,
    vae_id: String,
    memory: HashMap<(usize, Variant), (Tensor, Tensor)>,
}

impl LatentCache {
    /// The cache of `run_dir` for the codec of `model`.
    pub fn new(run_dir: &Path, model: &Path) -> Result<Self> {
        Ok(Self {
            dir: run_dir.join("latent-cache"),
            vae_id: vae_identity(model)?,
            memory: HashMap::new(),
        })
    }

    /// The posterior of sample `idx` in variant `v` served before, if any.
    pub fn remembered(&self, idx: usize, v: Variant) -> Option<(Tensor, Tensor)> {
        self.memory.get(&(idx, v)).cloned()
    }

    /// Keeps the posterior of sample `idx` in variant `v` in memory.
    pub fn remember(&mut self, idx: usize, v: Variant, mean: Tensor, std: Tensor) {
        self.memory.insert((idx, v), (mean, std));
    }

    /// The entry file of `image` (its bytes) at `resolution` in variant `v` and `dtype`.
    pub fn entry(&self, image: &Path, resolution: u32, v: Variant, dtype: &str) -> Result<PathBuf> {
        let bytes = std::fs::read(image).with_context(|| format!("reading {}", image.display()))?;
        let mut h = Sha256::new();
        h.update(&bytes);
        h.update(self.vae_id.as_bytes());
        h.update(format!("{resolution}:{}:{}:{}:{dtype}", v.x, v.y, v.flip));
        let key = hex::encode(h.finalize());
        Ok(self.dir.join(format!("{key}.safetensors")))
    }

    /// Reads an entry file (`None` when absent).
    pub fn load(&self, file: &Path, device: &Device) -> Result<Option<(Tensor, Tensor)>> {
        let Some(t) = load_entry(file, device)? else {
            return Ok(None);
        };
        Ok(Some((
            t.get("mean").context("cached latents lack `mean`")?.clone(),
            t.get("std").context("cached latents lack `std`")?.clone(),
        )))
    }

    /// Writes an entry file (atomic).
    pub fn store(&self, file: &Path, mean: &Tensor, std: &Tensor) -> Result<()> {
        store_entry(file, &on_cpu(&[("mean", mean), ("std", std)])?)
    }
}

/// Text embeddings `(context, pooled)` of captions, in memory and on disk.
#[derive(Debug)]
pub struct TextCache {
    dir: PathBuf,
    te_id: String,
    memory: HashMap<String, (Tensor, Option<Tensor>)>,
}

impl TextCache {
    /// The cache of `run_dir` for the text encoders of `model`.
    pub fn new(run_dir: &Path, model: &Path) -> Result<Self> {
        Ok(Self {
            dir: run_dir.join("text-cache"),
            te_id: text_encoder_identity(model)?,
            memory: HashMap::new(),
        })
    }

    /// The embeddings of `text` served before, if any.
    pub fn remembered(&self, text: &str) -> Option<(Tensor, Option<Tensor>)> {
        self.memory.get(text).cloned()
    }

    /// Keeps the embeddings of `text` in memory.
    pub fn remember(&mut self, text: &str, t: (Tensor, Option<Tensor>)) {
        self.memory.insert(text.to_string(), t);
    }

    /// The entry file of `text` in `dtype`.
    pub fn entry(&self, text: &str, dtype: &str) -> PathBuf {
        let mut h = Sha256::new();
        h.update(self.te_id.as_bytes());
        h.update([0u8]);
        h.update(text.as_bytes());
        h.update([0u8]);
        h.update(dtype.as_bytes());
        let key = hex::encode(h.finalize());
        self.dir.join(format!("{key}.safetensors"))
    }

    /// Reads an entry file (`None` when absent).
    pub fn load(&self, file: &Path, device: &Device) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let Some(m) = load_entry(file, device)? else {
            return Ok(None);
        };
        let ctx = m
            .get("context")
            .with_context(|| format!("{} lacks `context`", file.display()))?
            .clone();
        Ok(Some((ctx, m.get("pooled").cloned())))
    }

    /// Writes an entry file (atomic).
    pub fn store(&self, file: &Path, t: &(Tensor, Option<Tensor>)) -> Result<()> {
        let mut pairs = vec![("context", &t.0)];
        if let Some(p) = &t.1 {
            pairs.push(("pooled", p));
        }
        store_entry(file, &on_cpu(&pairs)?)
    }
}
