//! Image-caption datasets: a folder with `metadata.jsonl` (`file_name`,
//! `text`: the layout diffusers' and kohya's trainers read) or a folder of
//! images with same-named `.txt` captions. Every entry is checked when the
//! dataset is opened (image present and decodable, caption present): a bad
//! entry is an error naming the file, or, with `skip_bad`, skipped with a
//! warning. Images are resized (shorter side to the resolution), center- or
//! randomly cropped and optionally flipped, then scaled to [-1, 1].

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use serde::{Deserialize, Serialize};

use crate::rng::TrainRng;

/// Image extensions considered in caption-file folders.
pub const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "webp", "bmp"];

/// One training pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The image file.
    pub image: PathBuf,
    /// Its caption.
    pub text: String,
}

/// How training crops are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Crop {
    /// The central square (torchvision `CenterCrop`).
    Center,
    /// A seeded uniformly random square.
    Random,
}

/// Which crop and flip of an image a sample used (also the latent cache key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Variant {
    /// Left edge of the crop in the resized image.
    pub x: u32,
    /// Top edge of the crop in the resized image.
    pub y: u32,
    /// Mirrored left-right.
    pub flip: bool,
}

/// An opened, validated dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The dataset folder.
    pub root: PathBuf,
    /// The usable pairs, in file order.
    pub samples: Vec<Sample>,
    /// One line per skipped entry (only with `skip_bad`).
    pub warnings: Vec<String>,
    /// Preference pairs ([`Dataset::open_pairs`]): `samples` alternate
    /// winner, loser of one caption.
    pub paired: bool,
}

#[derive(Deserialize)]
struct PairLine {
    text: Option<String>,
    winner: Option<String>,
    loser: Option<String>,
}

/// The file of preference pairs in a data folder.
pub const PAIRS_FILE: &str = "pairs.jsonl";

#[derive(Deserialize)]
struct MetaLine {
    file_name: Option<String>,
    text: Option<String>,
}

fn check_image(path: &Path) -> Result<()> {
    ensure!(
        path.is_file(),
        "image {} not found (fix the entry or pass --skip-bad)",
        path.display()
    );
    image::image_dimensions(path).with_context(|| {
        format!(
            "image {} is unreadable (not a supported image file?)",
            path.display()
        )
    })?;
    Ok(())
}

impl Dataset {
    /// Opens `dir`: `metadata.jsonl` if present, else images with `.txt` captions.
    pub fn open(dir: &Path, skip_bad: bool) -> Result<Self> {
        ensure!(
            dir.is_dir(),
            "dataset folder {} does not exist",
            dir.display()
        );
        let mut samples = vec![];
        let mut warnings = vec![];
        let mut bad = |e: anyhow::Error| -> Result<()> {
            if skip_bad {
                let w = format!("skipping: {e:#}");
                eprintln!("warning: {w}");
                warnings.push(w);
                Ok(())
            } else {
                Err(e)
            }
        };
        let meta = dir.join("metadata.jsonl");
        if meta.is_file() {
            let text = std::fs::read_to_string(&meta)
                .with_context(|| format!("reading {}", meta.display()))?;
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let where_ = format!("{} line {}", meta.display(), i + 1);
                let entry: MetaLine = match serde_json::from_str(line) {
                    Ok(e) => e,
                    Err(e) => {
                        bad(anyhow::anyhow!("{where_}: not a JSON object ({e})"))?;
                        continue;
                    }
                };
                let Some(file) = entry.file_name else {
                    bad(anyhow::anyhow!("{where_}: no \"file_name\""))?;
                    continue;
                };
                let image = dir.join(&file);
                let Some(text) = entry.text else {
                    bad(anyhow::anyhow!(
                        "{where_}: caption (\"text\") missing for {}",
                        image.display()
                    ))?;
                    continue;
                };
                match check_image(&image).with_context(|| where_.clone()) {
                    Ok(()) => samples.push(Sample { image, text }),
                    Err(e) => bad(e)?,
                }
            }
        } else {
            let mut images: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("listing {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                        IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())
                    })
                })
                .collect();
            images.sort();
            for image in images {
                let cap = image.with_extension("txt");
                let text = match std::fs::read_to_string(&cap) {
                    Ok(t) => t.trim().to_string(),
                    Err(_) => {
                        bad(anyhow::anyhow!(
                            "caption {} missing for image {}",
                            cap.display(),
                            image.display()
                        ))?;
                        continue;
                    }
                };
                match check_image(&image) {
                    Ok(()) => samples.push(Sample { image, text }),
                    Err(e) => bad(e)?,
                }
            }
        }
        if samples.is_empty() {
            bail!(
                "dataset {} has no usable image-caption pairs (expected metadata.jsonl with \
                 file_name/text, or images with same-named .txt captions)",
                dir.display()
            );
        }
        Ok(Self {
            root: dir.to_path_buf(),
            samples,
            warnings,
            paired: false,
        })
    }

    /// Opens the preference pairs of `dir`: `pairs.jsonl`, one JSON object
    /// a line with `text` and the `winner` and `loser` image files (relative
    /// to `dir`), both drawn for that caption. Bad entries are errors naming
    /// the file and line, or, with `skip_bad`, skipped with a warning.
    pub fn open_pairs(dir: &Path, skip_bad: bool) -> Result<Self> {
        let file = dir.join(PAIRS_FILE);
        let text = std::fs::read_to_string(&file).with_context(|| {
            format!(
                "reading {} (the preference pairs of --objective dpo: lines of \
                 {{\"text\", \"winner\", \"loser\"}})",
                file.display()
            )
        })?;
        let (mut samples, mut warnings) = (vec![], vec![]);
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let where_ = format!("{} line {}", file.display(), i + 1);
            let entry = (|| -> Result<[Sample; 2]> {
                let e: PairLine = serde_json::from_str(line)
                    .map_err(|e| anyhow::anyhow!("not a JSON object ({e})"))?;
                let text = e.text.context("no \"text\"")?;
                let winner = dir.join(e.winner.context("no \"winner\"")?);
                let loser = dir.join(e.loser.context("no \"loser\"")?);
                check_image(&winner)?;
                check_image(&loser)?;
                ensure!(
                    image::image_dimensions(&winner)? == image::image_dimensions(&loser)?,
                    "winner {} and loser {} differ in size",
                    winner.display(),
                    loser.display()
                );
                Ok([
                    Sample {
                        image: winner,
                        text: text.clone(),
                    },
                    Sample { image: loser, text },
                ])
            })()
            .with_context(|| where_.clone());
            match entry {
                Ok(pair) => samples.extend(pair),
                Err(e) if skip_bad => {
                    let w = format!("skipping: {e:#}");
                    eprintln!("warning: {w}");
                    warnings.push(w);
                }
                Err(e) => return Err(e),
            }
        }
        ensure!(
            !samples.is_empty(),
            "{} holds no preference pairs",
            file.display()
        );
        Ok(Self {
            root: dir.to_path_buf(),
            samples,
            warnings,
            paired: true,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Number of training units: images, or preference pairs.
    pub fn units(&self) -> usize {
        if self.paired {
            self.samples.len() / 2
        } else {
            self.samples.len()
        }
    }

    /// Whether there are no pairs (never after `open`).
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// Size of `w x h` after scaling the shorter side to `res` (rounded).
pub fn resized_size(w: u32, h: u32, res: u32) -> (u32, u32) {
    if w <= h {
        let nh = ((h as f64) * res as f64 / w as f64).round() as u32;
        (res, nh.max(res))
    } else {
        let nw = ((w as f64) * res as f64 / h as f64).round() as u32;
        (nw.max(res), res)
    }
}

/// Picks the crop and flip of one image: center crop (torchvision rounding)
/// or a uniform random one, and a coin flip when `random_flip`.
pub fn choose_variant(
    w: u32,
    h: u32,
    res: u32,
    crop: Crop,
    random_flip: bool,
    rng: &mut TrainRng,
) -> Variant {
    let (nw, nh) = resized_size(w, h, res);
    let (x, y) = match crop {
        Crop::Center => (
            ((nw - res) as f64 / 2.0).round() as u32,
            ((nh - res) as f64 / 2.0).round() as u32,
        ),
        Crop::Random => (
            rng.below((nw - res) as u64 + 1) as u32,
            rng.below((nh - res) as u64 + 1) as u32,
        ),
    };
    let flip = random_flip && rng.coin();
    Variant { x, y, flip }
}

/// Decodes `path` as RGB8 (error names the file).
pub fn load_rgb(path: &Path) -> Result<image::RgbImage> {
    Ok(image::open(path)
        .with_context(|| format!("decoding image {}", path.display()))?
        .to_rgb8())
}

/// Resize (bilinear, shorter side to `res`), crop and flip `img` into a
/// `[3, res, res]` f32 tensor in [-1, 1].
pub fn prepare(img: &image::RgbImage, res: u32, v: Variant, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let (nw, nh) = resized_size(w, h, res);
    let resized = if (nw, nh) == (w, h) {
        img.clone()
    } else {
        image::imageops::resize(img, nw, nh, FilterType::Triangle)
    };
    ensure!(
        v.x + res <= nw && v.y + res <= nh,
        "crop {v:?} outside the resized {nw}x{nh} image"
    );
    let n = (res * res) as usize;
    let mut data = vec![0f32; 3 * n];
    for yy in 0..res {
        for xx in 0..res {
            let sx = if v.flip { res - 1 - xx } else { xx };
            let p = resized.get_pixel(v.x + sx, v.y + yy);
            let i = (yy * res + xx) as usize;
            for c in 0..3 {
                data[c * n + i] = p.0[c] as f32 / 127.5 - 1.0;
            }
        }
    }
    Ok(Tensor::from_vec(
        data,
        (3, res as usize, res as usize),
        device,
    )?)
}
