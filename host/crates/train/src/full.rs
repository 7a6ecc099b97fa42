//! Full fine-tuning (`selma train --full`): the UNet (and optionally the text
//! encoders) rebuilt from their checkpoints with every weight a candle `Var`
//! (selma-diffusion's trainable `Vb`), frozen copies for rendering, and the
//! output: a complete diffusers model folder (configs and untouched parts
//! copied, the trained weights written as f32 safetensors), built in a hidden
//! temporary folder and renamed into place.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use safetensors::tensor::{Dtype, View};
use selma_diffusion::clip::ClipTextModel;
use selma_diffusion::pipeline::StableDiffusion;
use selma_diffusion::unet::UNet2DConditionModel;
use selma_diffusion::weights::{MemorySource, SafetensorsSource, Vb};

/// One fully trained component of the model.
#[derive(Debug, Clone)]
pub struct FullPart {
    /// Component folder name: `unet`, `text_encoder` or `text_encoder_2`.
    pub component: String,
    /// Its weights as variables, by checkpoint key.
    pub vars: BTreeMap<String, Var>,
}

impl FullPart {
    /// `<component>.<key>` names, in `vars` order.
    pub fn names(&self) -> Vec<String> {
        self.vars
            .keys()
            .map(|k| format!("{}.{k}", self.component))
            .collect()
    }
}

/// Replaces `sd.unet` (and, with `text_encoders`, `sd.text_encoder` and
/// `sd.text_encoder_2`) by copies whose weights are f32 variables loaded from
/// `model`'s component folders. Returns the trained parts, UNet first.
pub fn make_trainable(
    sd: &mut StableDiffusion,
    model: &Path,
    text_encoders: bool,
) -> Result<Vec<FullPart>> {
    let device = sd.device().clone();
    let mut parts = vec![];
    let dir = model.join("unet");
    let vb = Vb::trainable_from_dir(&dir, DType::F32, &device)?;
    let unet = UNet2DConditionModel::load(&vb, sd.unet.config())
        .with_context(|| format!("building a trainable UNet from {}", dir.display()))?;
    vb.check_fully_used()
        .with_context(|| format!("loading {}", dir.display()))?;
    sd.unet = unet;
    parts.push(FullPart {
        component: "unet".into(),
        vars: vb.vars(),
    });
    if text_encoders {
        let mut load = |name: &str, te: &mut ClipTextModel| -> Result<()> {
            let dir = model.join(name);
            let vb = Vb::trainable_from_dir(&dir, DType::F32, &device)?;
            let m = ClipTextModel::load(&vb, &te.config).with_context(|| {
                format!("building a trainable text encoder from {}", dir.display())
            })?;
            vb.check_fully_used()
                .with_context(|| format!("loading {}", dir.display()))?;
            *te = m;
            parts.push(FullPart {
                component: name.into(),
                vars: vb.vars(),
            });
            Ok(())
        };
        load("text_encoder", &mut sd.text_encoder)?;
        if let Some(te2) = &mut sd.text_encoder_2 {
            load("text_encoder_2", te2)?;
        }
    }
    Ok(parts)
}

fn frozen_vb(part: &FullPart, device: &Device) -> Vb {
    let src = MemorySource::new(
        part.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach())),
        &format!("trained {}", part.component),
    );
    Vb::new(Arc::new(src), DType::F32, device)
}

/// A frozen UNet sharing `part`'s current weights (plain inference, no graph).
pub fn frozen_unet(
    part: &FullPart,
    like: &UNet2DConditionModel,
    device: &Device,
) -> Result<UNet2DConditionModel> {
    UNet2DConditionModel::load(&frozen_vb(part, device), like.config())
}

/// A frozen text encoder sharing `part`'s current weights.
pub fn frozen_text_encoder(
    part: &FullPart,
    like: &ClipTextModel,
    device: &Device,
) -> Result<ClipTextModel> {
    ClipTextModel::load(&frozen_vb(part, device), &like.config)
}

/// A tensor as raw little-endian bytes for safetensors.
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

fn f32_raw(t: &Tensor) -> Result<Raw> {
    let v: Vec<f32> = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    Ok(Raw {
        dtype: Dtype::F32,
        shape: t.dims().to_vec(),
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    })
}

fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name.ends_with(".bin")
        || name.ends_with(".ckpt")
        || name.ends_with(".pt")
        || (name.contains(".safetensors.index") && name.ends_with(".json"))
        || (name.contains(".bin.index") && name.ends_with(".json"))
}

fn copy_tree(src: &Path, dst: &Path, skip_weights: &HashSet<String>, rel: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    for e in std::fs::read_dir(src).with_context(|| format!("listing {}", src.display()))? {
        let e = e?;
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        let to = dst.join(&name);
        if p.is_dir() {
            copy_tree(&p, &to, skip_weights, &rel.join(&name))?;
        } else {
            let top = rel
                .components()
                .next()
                .map(|c| c.as_os_str().to_string_lossy().to_string());
            if top.is_some_and(|t| skip_weights.contains(&t)) && is_weight_file(&name) {
                continue;
            }
            std::fs::copy(&p, &to)
                .with_context(|| format!("copying {} to {}", p.display(), to.display()))?;
        }
    }
    Ok(())
}

/// The file name a trained component's weights are written to.
pub fn weight_file_name(component: &str) -> &'static str {
    if component == "unet" {
        "diffusion_pytorch_model.safetensors"
    } else {
        "model.safetensors"
    }
}

/// Writes a complete diffusers folder at `out`: `model` copied, except that
/// each trained component's weight files are replaced by one f32 safetensors
/// file holding `trained[component]` (keys without the component prefix)
/// plus any stored tensor not trained (buffers such as `position_ids`, bytes
/// unchanged). Built in a hidden sibling folder, then renamed over `out`; an
/// existing `out` is replaced only when it is a model folder itself.
pub fn write_model_folder(
    model: &Path,
    out: &Path,
    trained: &BTreeMap<String, BTreeMap<String, Tensor>>,
) -> Result<()> {
    if let (Ok(a), Ok(b)) = (model.canonicalize(), out.canonicalize()) {
        ensure!(
            a != b,
            "--out {} is the base model folder: choose another output folder",
            out.display()
        );
    }
    if out.exists() {
        let empty = out.is_dir()
            && std::fs::read_dir(out)
                .with_context(|| format!("listing {}", out.display()))?
                .next()
                .is_none();
        ensure!(
            empty || out.join("model_index.json").is_file(),
            "--out {} exists and is not a model folder: remove it or choose another path",
            out.display()
        );
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    out.file_name()
        .with_context(|| format!("--out {} has no folder name", out.display()))?;
    let tmp = selma_io::temp_path(out)?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    let skip: HashSet<String> = trained.keys().cloned().collect();
    copy_tree(model, &tmp, &skip, Path::new(""))?;
    for (component, tensors) in trained {
        let src_dir = model.join(component);
        let files = SafetensorsSource::from_dir(&src_dir)?.files().to_vec();
        let mut raw: BTreeMap<String, Raw> = BTreeMap::new();
        for f in &files {
            let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .with_context(|| format!("parsing {}", f.display()))?;
            for (k, view) in st.tensors() {
                if !tensors.contains_key(&k) {
                    raw.insert(
                        k,
                        Raw {
                            dtype: view.dtype(),
                            shape: view.shape().to_vec(),
                            data: view.data().to_vec(),
                        },
                    );
                }
            }
        }
        for (k, t) in tensors {
            raw.insert(k.clone(), f32_raw(t)?);
        }
        let dst = tmp.join(component).join(weight_file_name(component));
        let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        safetensors::tensor::serialize_to_file(raw.iter(), Some(meta), &dst)
            .with_context(|| format!("writing {}", dst.display()))?;
        std::fs::File::open(&dst)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("flushing {}", dst.display()))?;
    }
    if out.exists() {
        if out.is_dir() {
            std::fs::remove_dir_all(out)
        } else {
            std::fs::remove_file(out)
        }
        .with_context(|| format!("replacing {}", out.display()))?;
    }
    std::fs::rename(&tmp, out)
        .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    Ok(())
}

/// Checks that `names` (from a checkpoint) equal `parts`' names.
pub fn check_names(parts: &[FullPart], names: &[String]) -> Result<()> {
    let have: Vec<String> = parts.iter().flat_map(|p| p.names()).collect();
    if have != names {
        bail!(
            "the checkpoint's trained weights ({} tensors) differ from this model's ({} tensors)",
            names.len(),
            have.len()
        );
    }
    Ok(())
}
