//! The dataset writer: `count` scenes as PNG files plus `metadata.jsonl`
//! (`file_name`, `text`, `skill`, `scene`), the image-folder layout the
//! trainer and the diffusers/kohya tools read. Written into a temporary
//! sibling folder and renamed into place when complete; scene `i` depends
//! only on (seed, i), so the output is byte-identical for a given seed and
//! the work is split over threads.

use crate::alttext::{describe, AltText};
use crate::caption::Caption;
use crate::sample::{sample, scene_seed, SampleOptions, SplitMix64};
use crate::scene::{Scene, SIZE};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What to write.
#[derive(Clone, Debug)]
pub struct DatasetOptions {
    /// Number of scenes.
    pub count: usize,
    /// Dataset seed.
    pub seed: u64,
    /// Form mix and the number-word knob.
    pub sample: SampleOptions,
    /// Replace an existing non-empty output folder.
    pub overwrite: bool,
    /// Worker threads (0: the machine's available parallelism).
    pub threads: usize,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        Self {
            count: 1000,
            seed: 0,
            sample: SampleOptions::default(),
            overwrite: false,
            threads: 0,
        }
    }
}

/// One line of `metadata.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetaLine {
    /// Image path relative to the dataset folder.
    pub file_name: String,
    /// The caption (world v2: the alt-text caption the model trains on).
    pub text: String,
    /// World v2: the detailed grammar caption of the scene (what a skill
    /// prompt would say; the verifier's ground truth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detailed: Option<String>,
    /// The caption's form (single, count, plural, binding, spatial).
    pub skill: String,
    /// The scene (objects in caption order, boxes in pixels).
    pub scene: Scene,
}

/// What [`write_dataset`] wrote.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DatasetSummary {
    /// Scenes written.
    pub count: usize,
    /// Scenes per form name, sorted by name.
    pub per_skill: Vec<(String, usize)>,
}

/// The scene and grammar caption of scene `index` of a dataset (world v2:
/// the detailed caption, every object, count, colour and relation).
pub fn dataset_scene(seed: u64, index: u64, opts: &SampleOptions) -> (Scene, Caption) {
    let (scene, caption, _) = dataset_entry(seed, index, opts);
    (scene, caption)
}

/// Scene `index` of a dataset: the scene, its grammar caption and, in
/// world v2, its alt-text caption (drawn after the scene, from the same
/// stream).
pub fn dataset_entry(
    seed: u64,
    index: u64,
    opts: &SampleOptions,
) -> (Scene, Caption, Option<AltText>) {
    let mut rng = SplitMix64::new(scene_seed(seed, index));
    let form = opts.mix.draw(&mut rng);
    match &opts.alt_text {
        None => {
            let (scene, caption) = sample(form, opts.number_word_keep, &mut rng);
            (scene, caption, None)
        }
        Some(rates) => {
            let (scene, caption) = sample(form, 1.0, &mut rng);
            let alt = describe(&scene, rates, &mut rng);
            (scene, caption, Some(alt))
        }
    }
}

/// Encode row-major RGB `SIZE x SIZE` pixels as PNG bytes.
pub fn encode_png(pixels: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(512);
    let mut enc = png::Encoder::new(&mut out, SIZE as u32, SIZE as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Fast);
    let mut w = enc.write_header().context("encoding PNG header")?;
    w.write_image_data(pixels).context("encoding PNG data")?;
    w.finish().context("finishing PNG")?;
    Ok(out)
}

/// Read an 8-bit RGB PNG: (width, height, row-major RGB bytes).
pub fn read_png(path: &Path) -> Result<(u32, u32, Vec<u8>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let dec = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = dec
        .read_info()
        .with_context(|| format!("{}: not a PNG", path.display()))?;
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    let info = reader
        .next_frame(&mut buf)
        .with_context(|| format!("decoding {}", path.display()))?;
    if info.color_type != png::ColorType::Rgb || info.bit_depth != png::BitDepth::Eight {
        bail!(
            "{}: expected 8-bit RGB, got {:?} {:?}",
            path.display(),
            info.color_type,
            info.bit_depth
        );
    }
    buf.truncate(info.buffer_size());
    Ok((info.width, info.height, buf))
}

/// The file name of scene `index` (zero-padded to the dataset size).
fn file_name(index: usize, count: usize) -> String {
    let width = count.saturating_sub(1).to_string().len().max(5);
    format!("{index:0width$}.png")
}

/// Write one contiguous range of scenes into `dir`; returns their
/// metadata lines (JSON, newline-terminated), in order.
fn write_range(
    dir: &Path,
    range: std::ops::Range<usize>,
    opts: &DatasetOptions,
) -> Result<Vec<(String, String)>> {
    let mut lines = Vec::with_capacity(range.len());
    let mut px = vec![0u8; SIZE * SIZE * 3];
    for i in range {
        let (scene, caption, alt) = dataset_entry(opts.seed, i as u64, &opts.sample);
        px.chunks_mut(3)
            .for_each(|p| p.copy_from_slice(&crate::scene::BACKGROUND));
        scene.render_into(&mut px);
        let name = file_name(i, opts.count);
        let path = dir.join(&name);
        std::fs::write(&path, encode_png(&px)?)
            .with_context(|| format!("writing {}", path.display()))?;
        let skill = caption.form().name().to_string();
        let line = MetaLine {
            file_name: name,
            text: alt.as_ref().map_or_else(|| caption.text(), AltText::text),
            detailed: alt.is_some().then(|| caption.text()),
            skill: skill.clone(),
            scene,
        };
        let mut json = serde_json::to_string(&line).context("serialising metadata")?;
        json.push('\n');
        lines.push((skill, json));
    }
    Ok(lines)
}

/// Write `opts.count` scenes to `out` (PNG files + `metadata.jsonl`),
/// atomically: everything goes to a hidden sibling folder first, which is
/// renamed to `out` when complete. An existing non-empty `out` is an error
/// unless `opts.overwrite`.
pub fn write_dataset(out: &Path, opts: &DatasetOptions) -> Result<DatasetSummary> {
    let name = out
        .file_name()
        .with_context(|| format!("output path {} has no folder name", out.display()))?
        .to_string_lossy()
        .to_string();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("creating the parent folder {}", parent.display()))?;
    let existing_nonempty = out.is_dir()
        && std::fs::read_dir(out)
            .with_context(|| format!("listing {}", out.display()))?
            .next()
            .is_some();
    if out.exists() && !out.is_dir() {
        bail!(
            "{} exists and is not a folder: choose another --out",
            out.display()
        );
    }
    if existing_nonempty && !opts.overwrite {
        bail!(
            "{} exists and is not empty: choose another --out, or pass --overwrite to replace it",
            out.display()
        );
    }
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("removing the stale {}", tmp.display()))?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = fill(&tmp, opts);
    let lines = match result {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let mut per_skill: std::collections::BTreeMap<String, usize> = Default::default();
    let meta = tmp.join("metadata.jsonl");
    {
        let f =
            std::fs::File::create(&meta).with_context(|| format!("creating {}", meta.display()))?;
        let mut w = std::io::BufWriter::new(f);
        for (skill, line) in &lines {
            *per_skill.entry(skill.clone()).or_default() += 1;
            w.write_all(line.as_bytes())
                .with_context(|| format!("writing {}", meta.display()))?;
        }
        w.flush()
            .with_context(|| format!("writing {}", meta.display()))?;
    }
    if out.exists() {
        // Empty folder, or overwrite: move the old one aside, then drop it.
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(out, &old)
            .with_context(|| format!("moving the old {} aside", out.display()))?;
        std::fs::rename(&tmp, out)
            .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("removing the old dataset {}", old.display()))?;
    } else {
        std::fs::rename(&tmp, out)
            .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    }
    Ok(DatasetSummary {
        count: lines.len(),
        per_skill: per_skill.into_iter().collect(),
    })
}

/// Render every scene into `dir` over worker threads; lines in index order.
fn fill(dir: &Path, opts: &DatasetOptions) -> Result<Vec<(String, String)>> {
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        opts.threads
    };
    let threads = threads.clamp(1, opts.count.max(1));
    let chunk = opts.count.div_ceil(threads);
    let parts: Vec<Result<Vec<(String, String)>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let start = (t * chunk).min(opts.count);
                let end = ((t + 1) * chunk).min(opts.count);
                s.spawn(move || write_range(dir, start..end, opts))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("dataset worker panicked"))
            .collect()
    });
    let mut lines = Vec::with_capacity(opts.count);
    for p in parts {
        lines.extend(p?);
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::Mix;

    fn opts(count: usize, seed: u64, threads: usize) -> DatasetOptions {
        DatasetOptions {
            count,
            seed,
            threads,
            ..DatasetOptions::default()
        }
    }

    fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                (
                    p.file_name().unwrap().to_string_lossy().to_string(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn same_seed_same_bytes_whatever_the_threads() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        let c = d.path().join("c");
        write_dataset(&a, &opts(300, 42, 1)).unwrap();
        write_dataset(&b, &opts(300, 42, 3)).unwrap();
        write_dataset(&c, &opts(300, 43, 2)).unwrap();
        let (fa, fb, fc) = (files(&a), files(&b), files(&c));
        assert_eq!(fa.len(), 301);
        assert_eq!(fa, fb);
        assert_ne!(fa, fc);
        // No temporary folders are left behind.
        let names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }

    #[test]
    fn metadata_describes_the_pixels_and_the_mix() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("ds");
        let o = DatasetOptions {
            sample: SampleOptions {
                mix: Mix::parse("single=1,count=1,binding=1,spatial=1,plural=1").unwrap(),
                number_word_keep: 0.5,
                alt_text: None,
            },
            ..opts(500, 7, 2)
        };
        let summary = write_dataset(&out, &o).unwrap();
        assert_eq!(summary.count, 500);
        assert_eq!(summary.per_skill.len(), 5, "{summary:?}");
        let text = std::fs::read_to_string(out.join("metadata.jsonl")).unwrap();
        let lines: Vec<MetaLine> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 500);
        assert_eq!(lines[0].file_name, "00000.png");
        for l in &lines {
            let caption = Caption::parse(&l.text).unwrap();
            assert_eq!(caption.form().name(), l.skill);
            assert!(caption.holds(&l.scene) && l.scene.valid(), "{l:?}");
            let (w, h, px) = read_png(&out.join(&l.file_name)).unwrap();
            assert_eq!((w, h), (32, 32));
            assert_eq!(px, l.scene.render());
        }
    }

    #[test]
    fn existing_output_needs_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("ds");
        std::fs::create_dir(&out).unwrap();
        // An empty folder is fine.
        write_dataset(&out, &opts(5, 1, 1)).unwrap();
        let e = write_dataset(&out, &opts(5, 1, 1)).unwrap_err().to_string();
        assert!(e.contains("--overwrite") && e.contains("ds"), "{e}");
        let o = DatasetOptions {
            overwrite: true,
            ..opts(3, 1, 1)
        };
        write_dataset(&out, &o).unwrap();
        assert_eq!(files(&out).len(), 4);
    }
}
