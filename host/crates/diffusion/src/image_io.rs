//! PNG output with the generation parameters in a text chunk (keyword
//! `parameters`, AUTOMATIC1111-style text, so other tools show them), written
//! atomically (temp file + rename); and a small reader used by tests and
//! tools to get pixels and parameters back.

use anyhow::{ensure, Context, Result};
use std::io::BufReader;
use std::path::Path;

/// The text-chunk keyword holding the parameters.
pub const PARAMETERS_KEY: &str = "parameters";

/// What produced an image, rendered as A1111-style text.
#[derive(Debug, Clone, Default)]
pub struct GenerationParams {
    /// Prompt.
    pub prompt: String,
    /// Negative prompt (may be empty).
    pub negative: String,
    /// Inference steps.
    pub steps: usize,
    /// Sampler name (`ddim`, `euler`, ...).
    pub sampler: String,
    /// Classifier-free guidance scale.
    pub guidance: f64,
    /// Seed (None when the initial noise came from a file).
    pub seed: Option<u64>,
    /// Width and height in pixels.
    pub size: (usize, usize),
    /// Model folder name.
    pub model: String,
    /// Further `key: value` pairs (eta, LoRAs, latents file, dtype, ...).
    pub extra: Vec<(String, String)>,
}

impl GenerationParams {
    /// `prompt\nNegative prompt: ...\nSteps: 30, Sampler: ddim, CFG scale: 7.5, Seed: 1, Size: 512x512, Model: m, ...`.
    pub fn to_text(&self) -> String {
        let mut s = self.prompt.clone();
        if !self.negative.is_empty() {
            s.push_str("\nNegative prompt: ");
            s.push_str(&self.negative);
        }
        let mut kv = vec![
            ("Steps".to_string(), self.steps.to_string()),
            ("Sampler".to_string(), self.sampler.clone()),
            ("CFG scale".to_string(), format!("{}", self.guidance)),
        ];
        if let Some(seed) = self.seed {
            kv.push(("Seed".into(), seed.to_string()));
        }
        kv.push(("Size".into(), format!("{}x{}", self.size.0, self.size.1)));
        kv.push(("Model".into(), self.model.clone()));
        kv.extend(self.extra.iter().cloned());
        s.push('\n');
        s.push_str(
            &kv.iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        s
    }
}

/// Write `rgb` (`width * height * 3` bytes) to `path` as an 8-bit RGB PNG
/// with `parameters` in a tEXt chunk (iTXt when it is not Latin-1). The file
/// appears complete or not at all.
pub fn write_png(
    path: &Path,
    width: usize,
    height: usize,
    rgb: &[u8],
    parameters: &str,
) -> Result<()> {
    ensure!(
        rgb.len() == width * height * 3,
        "image buffer holds {} bytes, {width}x{height} RGB needs {}",
        rgb.len(),
        width * height * 3
    );
    selma_io::write_atomic_with(path, |w| {
        let mut enc = png::Encoder::new(&mut *w, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        if parameters.chars().all(|c| (c as u32) < 256) {
            enc.add_text_chunk(PARAMETERS_KEY.into(), parameters.into())?;
        } else {
            enc.add_itxt_chunk(PARAMETERS_KEY.into(), parameters.into())?;
        }
        let mut writer = enc.write_header()?;
        writer.write_image_data(rgb)?;
        writer.finish()?;
        Ok(())
    })
    .with_context(|| format!("writing PNG {}", path.display()))
}

/// A decoded 8-bit RGB PNG and its `parameters` text, if any.
#[derive(Debug, Clone)]
pub struct PngImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height * 3` bytes.
    pub rgb: Vec<u8>,
    /// The `parameters` text chunk.
    pub parameters: Option<String>,
}

/// Read an 8-bit RGB PNG written by [`write_png`] (or any 8-bit RGB PNG).
pub fn read_png(path: &Path) -> Result<PngImage> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let dec = png::Decoder::new(BufReader::new(f));
    let mut reader = dec
        .read_info()
        .with_context(|| format!("decoding PNG {}", path.display()))?;
    let mut buf = vec![
        0;
        reader
            .output_buffer_size()
            .context("PNG output size overflows")?
    ];
    let info = reader.next_frame(&mut buf)?;
    ensure!(
        info.color_type == png::ColorType::Rgb && info.bit_depth == png::BitDepth::Eight,
        "{}: expected 8-bit RGB, found {:?} {:?}",
        path.display(),
        info.color_type,
        info.bit_depth
    );
    buf.truncate(info.buffer_size());
    let meta = reader.info();
    let mut parameters = meta
        .uncompressed_latin1_text
        .iter()
        .find(|c| c.keyword == PARAMETERS_KEY)
        .map(|c| c.text.clone());
    if parameters.is_none() {
        if let Some(c) = meta.utf8_text.iter().find(|c| c.keyword == PARAMETERS_KEY) {
            parameters = Some(c.get_text()?);
        }
    }
    Ok(PngImage {
        width: info.width as usize,
        height: info.height as usize,
        rgb: buf,
        parameters,
    })
}
