//! Text conditioning for a batch of captions: token ids from the model's
//! tokenizer(s) through its text encoder(s), the UNet's cross-attention
//! context and (SDXL) the pooled embedding. Training encodes its captions
//! here, in the graph, so gradients reach trainable text encoders.

use anyhow::{ensure, Context, Result};
use candle_core::Tensor;

use crate::clip::HiddenLayer;
use crate::pipeline::StableDiffusion;
use crate::tokenizer::ClipTokenizer;

impl StableDiffusion {
    /// Text embeddings of `texts`, one row per caption:
    /// `(context [N, L, D], pooled [N, P])`. The same conditioning as
    /// [`StableDiffusion::encode_text`] (the last hidden state of a single
    /// encoder; both encoders' penultimate states concatenated, and the second
    /// one's projection pooled, with two), computed for the whole batch at once.
    pub fn encode_text_batch<S: AsRef<str>>(
        &self,
        texts: &[S],
    ) -> Result<(Tensor, Option<Tensor>)> {
        match (&self.text_encoder_2, &self.tokenizer_2) {
            (Some(te2), Some(tok2)) => {
                let o1 = self.text_encoder.forward(
                    &self.batch_ids(&self.tokenizer, texts)?,
                    HiddenLayer::PENULTIMATE,
                )?;
                let o2 = te2.forward(&self.batch_ids(tok2, texts)?, HiddenLayer::PENULTIMATE)?;
                let ctx = Tensor::cat(&[&o1.hidden, &o2.hidden.to_dtype(o1.hidden.dtype())?], 2)?;
                let pooled = o2
                    .text_embeds
                    .context("text_encoder_2 has no text_projection (SDXL needs one)")?;
                Ok((ctx, Some(pooled)))
            }
            _ => Ok((
                self.text_encoder
                    .forward(&self.batch_ids(&self.tokenizer, texts)?, HiddenLayer::Last)?
                    .hidden,
                None,
            )),
        }
    }

    /// Padded token ids `[N, L]` of `texts` from `tok`.
    fn batch_ids<S: AsRef<str>>(&self, tok: &ClipTokenizer, texts: &[S]) -> Result<Tensor> {
        let rows = texts
            .iter()
            .map(|t| tok.encode_padded(t.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let l = rows.first().map_or(0, |r| r.len());
        ensure!(
            rows.iter().all(|r| r.len() == l),
            "tokenizer gave sequences of different lengths"
        );
        Ok(Tensor::from_vec(
            rows.concat(),
            (texts.len(), l),
            self.device(),
        )?)
    }
}
