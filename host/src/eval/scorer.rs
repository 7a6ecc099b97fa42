//! Scorers: anything that scores one image against its prompt. Two kinds
//! here: image-filter plugins (their verdict's score) and CLIPScore
//! (`100 * max(cos(image, text), 0)` with a CLIP model folder).

use super::clip;
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::clip::text_model::ClipTextTransformer;
use candle_transformers::models::clip::vision_model::ClipVisionTransformer;
use selma_diffusion::tokenizer::ClipTokenizer;
use selma_runtime::{ImageFilterPlugin, Params, RgbImage};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Anything that scores one image against its prompt; higher is better.
pub trait Scorer {
    /// The scorer's name (a column of the results table).
    fn name(&self) -> String;
    /// Scores one image made for `prompt`.
    fn score(&mut self, img: &RgbImage, prompt: &str) -> Result<f64>;
    /// Every metric this scorer gives one image, by results-table column:
    /// by default its score under its name.
    fn metrics(&mut self, img: &RgbImage, prompt: &str) -> Result<Vec<(String, f64)>> {
        Ok(vec![(self.name(), self.score(img, prompt)?)])
    }
}

/// The column of an image filter's pass/fail verdicts (1 = kept): the
/// accuracy, when the filter is a verifier.
pub fn accuracy_column(filter: &str) -> String {
    format!("{filter} accuracy")
}

/// An image-filter plugin used as a scorer (its verdict's score; the plugin name in errors).
pub struct ImageFilterScorer {
    plugin: ImageFilterPlugin,
    params: Params,
}

impl ImageFilterScorer {
    /// Wraps a loaded image-filter plugin with validated parameters.
    pub fn new(plugin: ImageFilterPlugin, params: Params) -> Self {
        ImageFilterScorer { plugin, params }
    }
}

impl Scorer for ImageFilterScorer {
    fn name(&self) -> String {
        self.plugin.name().to_string()
    }

    fn score(&mut self, img: &RgbImage, prompt: &str) -> Result<f64> {
        Ok(self.verdict(img, prompt)?.0)
    }

    /// The verdict's score, and the pass/fail verdict as 1/0 in the
    /// accuracy column.
    fn metrics(&mut self, img: &RgbImage, prompt: &str) -> Result<Vec<(String, f64)>> {
        let (score, keep) = self.verdict(img, prompt)?;
        let name = self.name();
        Ok(vec![
            (accuracy_column(&name), if keep { 1.0 } else { 0.0 }),
            (name, score),
        ])
    }
}

impl ImageFilterScorer {
    /// The plugin's (score, keep) for one image.
    fn verdict(&mut self, img: &RgbImage, prompt: &str) -> Result<(f64, bool)> {
        let v = self
            .plugin
            .check(img, prompt, &self.params)
            .with_context(|| {
                format!(
                    "scoring with image-filter plugin \"{}\" (check the plugin and its \
                     parameters, or remove it from the eval scorers)",
                    self.plugin.name()
                )
            })?;
        Ok((v.score as f64, v.keep))
    }
}

/// Cosine similarity of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    dot / (na.sqrt() * nb.sqrt())
}

/// CLIPScore = 100 * max(cos(image, text), 0) with a CLIP model folder (HF layout:
/// config.json + model.safetensors, candle-transformers' clip as the encoder).
pub struct ClipScorer {
    dir: PathBuf,
    text_model: ClipTextTransformer,
    vision_model: ClipVisionTransformer,
    text_projection: Linear,
    visual_projection: Linear,
    tokenizer: ClipTokenizer,
    image_size: usize,
    max_tokens: usize,
    device: Device,
    text_cache: HashMap<String, Vec<f32>>,
}

impl ClipScorer {
    /// Loads config.json, model.safetensors, vocab.json + merges.txt from `dir`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg = clip::read_config(dir)?;
        let wpath = dir.join("model.safetensors");
        let tensors = candle_core::safetensors::load(&wpath, device).with_context(|| {
            format!(
                "loading CLIP weights {} (the folder needs model.safetensors in the Hugging \
                 Face CLIPModel layout)",
                wpath.display()
            )
        })?;
        for k in clip::REQUIRED_EXTRA {
            ensure!(
                tensors.contains_key(k),
                "{}: tensor {k} is missing: not a Hugging Face CLIPModel checkpoint",
                wpath.display()
            );
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let ctx = || format!("building the CLIP model from {}", wpath.display());
        let text_model =
            ClipTextTransformer::new(vb.pp("text_model"), &cfg.text_config).with_context(ctx)?;
        let vision_model = ClipVisionTransformer::new(vb.pp("vision_model"), &cfg.vision_config)
            .with_context(ctx)?;
        let text_projection = candle_nn::linear_no_bias(
            cfg.text_config.embed_dim,
            cfg.text_config.projection_dim,
            vb.pp("text_projection"),
        )
        .with_context(ctx)?;
        let visual_projection = candle_nn::linear_no_bias(
            cfg.vision_config.embed_dim,
            cfg.vision_config.projection_dim,
            vb.pp("visual_projection"),
        )
        .with_context(ctx)?;
        let tokenizer = ClipTokenizer::from_dir(dir)
            .with_context(|| format!("loading the CLIP tokenizer of {}", dir.display()))?;
        ensure!(
            (tokenizer.eos_id() as usize) < cfg.text_config.vocab_size,
            "{}: the tokenizer's eos id {} is outside the text model's vocabulary of {}",
            dir.display(),
            tokenizer.eos_id(),
            cfg.text_config.vocab_size
        );
        let max_tokens = tokenizer
            .max_len()
            .min(cfg.text_config.max_position_embeddings);
        ensure!(max_tokens >= 2, "{}: room for < 2 tokens", dir.display());
        Ok(ClipScorer {
            dir: dir.to_path_buf(),
            text_model,
            vision_model,
            text_projection,
            visual_projection,
            tokenizer,
            image_size: cfg.image_size,
            max_tokens,
            device: device.clone(),
            text_cache: HashMap::new(),
        })
    }

    /// The square input size of the vision tower.
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// `[bos] + tokens + [eos]` of `prompt`, truncated to the model's length.
    pub fn token_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut toks = self.tokenizer.encode(prompt)?;
        toks.truncate(self.max_tokens - 2);
        let mut ids = Vec::with_capacity(toks.len() + 2);
        ids.push(self.tokenizer.bos_id());
        ids.extend(toks);
        ids.push(self.tokenizer.eos_id());
        Ok(ids)
    }

    /// The projected text embedding of `prompt` (pooled at the first eos
    /// token, as transformers' CLIPTextModel does); cached per prompt.
    pub fn text_features(&mut self, prompt: &str) -> Result<Vec<f32>> {
        if let Some(f) = self.text_cache.get(prompt) {
            return Ok(f.clone());
        }
        let ids = self.token_ids(prompt)?;
        let eos_pos = ids.len() - 1;
        let f = (|| -> candle_core::Result<Vec<f32>> {
            let t = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
            let hidden = self.text_model.forward_with_mask(&t, usize::MAX)?;
            let pooled = hidden.i((.., eos_pos, ..))?;
            self.text_projection
                .forward(&pooled)?
                .squeeze(0)?
                .to_vec1::<f32>()
        })()
        .with_context(|| format!("CLIP text encoder of {}", self.dir.display()))?;
        if self.text_cache.len() < 100_000 {
            self.text_cache.insert(prompt.to_string(), f.clone());
        }
        Ok(f)
    }

    /// The projected image embedding of `img` after CLIP's preprocessing.
    pub fn image_features(&self, img: &RgbImage) -> Result<Vec<f32>> {
        let px = clip::preprocess(img, self.image_size, &self.device)?;
        (|| -> candle_core::Result<Vec<f32>> {
            let pooled = self.vision_model.forward(&px)?;
            self.visual_projection
                .forward(&pooled)?
                .squeeze(0)?
                .to_vec1::<f32>()
        })()
        .with_context(|| format!("CLIP image encoder of {}", self.dir.display()))
    }

    /// Cosine similarity of the image and text embeddings.
    pub fn cosine(&mut self, img: &RgbImage, prompt: &str) -> Result<f64> {
        let t = self.text_features(prompt)?;
        let i = self.image_features(img)?;
        let c = cosine(&i, &t);
        ensure!(
            c.is_finite(),
            "CLIP model {} produced non-finite embeddings for prompt {prompt:?}",
            self.dir.display()
        );
        Ok(c)
    }
}

impl Scorer for ClipScorer {
    fn name(&self) -> String {
        "clipscore".to_string()
    }

    fn score(&mut self, img: &RgbImage, prompt: &str) -> Result<f64> {
        Ok(100.0 * self.cosine(img, prompt)?.max(0.0))
    }
}
