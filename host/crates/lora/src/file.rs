//! LoRA files: [`LoraLayer`] (one adapted module) and [`LoraFile`] (all of
//! them plus the safetensors metadata), read from either layout with
//! auto-detection and written to either layout atomically.
//!
//! Alpha on read, first match wins: a per-layer `.alpha` tensor; peft's
//! `lora_adapter_metadata` JSON (`<component>.alpha_pattern` /
//! `<component>.lora_alpha`, as diffusers writes it) or `lora_config`; the plain
//! metadata entries `lora_alpha`, `alpha`, `network_alpha`, `ss_network_alpha`;
//! otherwise alpha = rank. Rank always comes from the tensor shapes.

use crate::names::{self, Part};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::Path;

/// One adapted module: delta = (alpha / rank) * up @ down.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    /// [out, r] (conv: [out, r, 1, 1]); peft `lora_B`, kohya `lora_up`.
    pub up: Tensor,
    /// [r, in] (conv: [r, in, kh, kw]); peft `lora_A`, kohya `lora_down`.
    pub down: Tensor,
    pub alpha: f32,
}

impl LoraLayer {
    /// Check the factor shapes agree and build the layer.
    pub fn new(up: Tensor, down: Tensor, alpha: f32) -> Result<Self> {
        let layer = Self { up, down, alpha };
        layer.check()?;
        Ok(layer)
    }

    fn check(&self) -> Result<()> {
        let (u, d) = (self.up.dims(), self.down.dims());
        let ok = match (u.len(), d.len()) {
            (2, 2) => u[1] == d[0],
            (4, 4) => u[1] == d[0] && u[2] == 1 && u[3] == 1,
            _ => false,
        };
        if !ok {
            bail!("LoRA factor shapes do not fit: up {u:?} (want [out, r] or [out, r, 1, 1]), down {d:?} (want [r, in] or [r, in, kh, kw])");
        }
        Ok(())
    }

    /// The rank r (rows of `down`).
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// alpha / rank.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank() as f32
    }

    /// Output features (rows of the delta).
    pub fn out_features(&self) -> usize {
        self.up.dims()[0]
    }

    /// Input features of the flattened delta (in * kh * kw for conv).
    pub fn in_features(&self) -> usize {
        self.down.dims()[1..].iter().product()
    }

    /// `up` as a 2-D [out, r] f32 tensor.
    pub fn up_2d(&self) -> Result<Tensor> {
        Ok(self
            .up
            .reshape((self.out_features(), self.rank()))?
            .to_dtype(DType::F32)?)
    }

    /// `down` as a 2-D [r, in*kh*kw] f32 tensor.
    pub fn down_2d(&self) -> Result<Tensor> {
        Ok(self
            .down
            .reshape((self.rank(), self.in_features()))?
            .to_dtype(DType::F32)?)
    }

    /// The weight delta scale * up @ down, 2-D [out, in*kh*kw].
    pub fn delta(&self) -> Result<Tensor> {
        let d = self.up_2d()?.matmul(&self.down_2d()?)?;
        Ok((d * self.scale() as f64)?)
    }
}

/// The two on-disk key layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// diffusers/peft: `unet.<module>.lora_A.weight` / `lora_B.weight`.
    Peft,
    /// kohya: `lora_unet_<module_with_underscores>.lora_down.weight` / `lora_up` / `alpha`.
    Kohya,
}

impl std::str::FromStr for LoraFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "peft" | "diffusers" => Ok(Self::Peft),
            "kohya" => Ok(Self::Kohya),
            _ => bail!("unknown LoRA format {s:?}: use `peft` or `kohya`"),
        }
    }
}

/// A LoRA file: canonical module path -> layer, plus string metadata.
#[derive(Debug, Clone, Default)]
pub struct LoraFile {
    pub layers: BTreeMap<String, LoraLayer>,
    pub metadata: BTreeMap<String, String>,
}

/// Metadata keys this module writes itself (dropped from carried metadata).
const OWN_METADATA: [&str; 9] = [
    "format",
    "lora_adapter_metadata",
    "lora_config",
    "lora_alpha",
    "alpha",
    "rank",
    "network_alpha",
    "ss_network_alpha",
    "ss_network_dim",
];

impl LoraFile {
    /// Read a safetensors LoRA file (layout auto-detected), tensors as f32.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Ok(Self::load_detect(path, device)?.0)
    }

    /// Like [`LoraFile::load`], also returning the detected layout.
    pub fn load_detect(path: &Path, device: &Device) -> Result<(Self, LoraFormat)> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read LoRA file {}", path.display()))?;
        Self::from_bytes(&bytes, device).with_context(|| {
            format!(
                "{} is not a LoRA file selma can read (peft/diffusers or kohya safetensors)",
                path.display()
            )
        })
    }

    /// Parse safetensors bytes (layout auto-detected).
    pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<(Self, LoraFormat)> {
        let st = SafeTensors::deserialize(bytes).context("invalid safetensors data")?;
        let (_, header) =
            SafeTensors::read_metadata(bytes).context("invalid safetensors header")?;
        let metadata: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();

        #[derive(Default)]
        struct Parts {
            up: Option<Tensor>,
            down: Option<Tensor>,
            alpha: Option<f32>,
        }
        let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
        let (mut n_kohya, mut n_peft) = (0usize, 0usize);
        for (key, view) in st.iter() {
            let parsed = names::parse_key(key).with_context(|| format!("tensor {key:?}"))?;
            let Some(parsed) = parsed else {
                bail!("tensor {key:?} is not a LoRA tensor (expected *.lora_A/B.weight, *.lora_down/up.weight or *.alpha keys)");
            };
            if parsed.kohya {
                n_kohya += 1
            } else {
                n_peft += 1
            }
            let values = view_to_f32(&view).with_context(|| format!("tensor {key:?}"))?;
            let entry = parts.entry(parsed.module).or_default();
            match parsed.part {
                Part::Alpha => {
                    if values.len() != 1 {
                        bail!("alpha tensor {key:?} has {} values, want 1", values.len());
                    }
                    entry.alpha = Some(values[0]);
                }
                Part::Up | Part::Down => {
                    let t = Tensor::from_vec(values, view.shape(), device)?;
                    let slot = if parsed.part == Part::Up {
                        &mut entry.up
                    } else {
                        &mut entry.down
                    };
                    if slot.replace(t).is_some() {
                        bail!(
                            "tensor {key:?}: its module has two {:?} tensors (mixed key layouts?)",
                            parsed.part
                        );
                    }
                }
            }
        }
        if parts.is_empty() {
            bail!("no LoRA tensors found");
        }
        let format = if n_kohya >= n_peft {
            LoraFormat::Kohya
        } else {
            LoraFormat::Peft
        };
        let alphas = MetadataAlphas::parse(&metadata);
        let mut layers = BTreeMap::new();
        for (module, p) in parts {
            let up = p
                .up
                .ok_or_else(|| anyhow!("module {module:?} has no up (lora_B / lora_up) tensor"))?;
            let down = p.down.ok_or_else(|| {
                anyhow!("module {module:?} has no down (lora_A / lora_down) tensor")
            })?;
            let rank = down.dims().first().copied().unwrap_or(0);
            let alpha = p
                .alpha
                .or_else(|| alphas.lookup(&module))
                .unwrap_or(rank as f32);
            let layer =
                LoraLayer::new(up, down, alpha).with_context(|| format!("module {module:?}"))?;
            layers.insert(module, layer);
        }
        Ok((Self { layers, metadata }, format))
    }

    /// Serialize to safetensors bytes in `format` (f32 tensors).
    pub fn to_bytes(&self, format: LoraFormat) -> Result<Vec<u8>> {
        let mut tensors: Vec<(String, RawF32)> = Vec::new();
        let mut metadata: BTreeMap<String, String> = self
            .metadata
            .iter()
            .filter(|(k, _)| !OWN_METADATA.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let uniform = self.uniform_rank_alpha();
        match format {
            LoraFormat::Peft => {
                for (module, layer) in &self.layers {
                    names::split_component(module)?;
                    tensors.push((format!("{module}.lora_A.weight"), RawF32::of(&layer.down)?));
                    tensors.push((format!("{module}.lora_B.weight"), RawF32::of(&layer.up)?));
                }
                metadata.insert("format".into(), "pt".into());
                metadata.insert(
                    "lora_adapter_metadata".into(),
                    self.peft_adapter_metadata()?.to_string(),
                );
                if let Some((rank, alpha)) = uniform {
                    metadata.insert("rank".into(), rank.to_string());
                    metadata.insert("lora_alpha".into(), fmt_num(alpha));
                }
            }
            LoraFormat::Kohya => {
                let two_te = self.layers.keys().any(|m| m.starts_with("text_encoder_2."));
                for (module, layer) in &self.layers {
                    let stem = names::kohya_stem(module, two_te)?;
                    tensors.push((format!("{stem}.lora_down.weight"), RawF32::of(&layer.down)?));
                    tensors.push((format!("{stem}.lora_up.weight"), RawF32::of(&layer.up)?));
                    tensors.push((
                        format!("{stem}.alpha"),
                        RawF32 {
                            shape: vec![],
                            data: layer.alpha.to_le_bytes().to_vec(),
                        },
                    ));
                }
                let max_rank = self.layers.values().map(|l| l.rank()).max().unwrap_or(0);
                let (dim, alpha) = uniform.unwrap_or((max_rank, max_rank as f32));
                metadata.insert("ss_network_module".into(), "networks.lora".into());
                metadata.insert("ss_network_dim".into(), dim.to_string());
                metadata.insert("ss_network_alpha".into(), fmt_num(alpha));
            }
        }
        // Kohya stems must be unique (the `_` flattening could collide).
        let mut seen = std::collections::HashSet::new();
        for (k, _) in &tensors {
            if !seen.insert(k.clone()) {
                bail!("two modules map to the same key {k:?}");
            }
        }
        Ok(serialize_sorted(tensors, &metadata))
    }

    /// Write to `path` in `format`: to a temporary file next to it, then rename
    /// (its folder is created).
    pub fn save(&self, path: &Path, format: LoraFormat) -> Result<()> {
        let bytes = self.to_bytes(format)?;
        write_atomic(path, &bytes)
    }

    /// (rank, alpha) when every layer has the same ones.
    fn uniform_rank_alpha(&self) -> Option<(usize, f32)> {
        let mut it = self.layers.values();
        let first = it.next()?;
        let (r, a) = (first.rank(), first.alpha);
        it.all(|l| l.rank() == r && l.alpha == a).then_some((r, a))
    }

    /// diffusers' `lora_adapter_metadata`: per component a peft LoraConfig
    /// (r, lora_alpha, target_modules, rank_pattern, alpha_pattern) with keys
    /// prefixed by the component name.
    fn peft_adapter_metadata(&self) -> Result<serde_json::Value> {
        let mut out = serde_json::Map::new();
        for component in names::COMPONENTS {
            let layers: Vec<(&str, &LoraLayer)> = self
                .layers
                .iter()
                .filter_map(|(m, l)| match names::split_component(m) {
                    Ok((c, rest)) if c == component => Some((rest, l)),
                    _ => None,
                })
                .collect();
            let Some((_, first)) = layers.first() else {
                continue;
            };
            let (r0, a0) = (first.rank(), first.alpha);
            let mut rank_pattern = serde_json::Map::new();
            let mut alpha_pattern = serde_json::Map::new();
            let mut targets = Vec::new();
            for (rest, l) in &layers {
                targets.push(serde_json::Value::from(*rest));
                if l.rank() != r0 {
                    rank_pattern.insert(rest.to_string(), l.rank().into());
                }
                if l.alpha != a0 {
                    alpha_pattern.insert(rest.to_string(), json_num(l.alpha));
                }
            }
            out.insert(format!("{component}.r"), r0.into());
            out.insert(format!("{component}.lora_alpha"), json_num(a0));
            out.insert(format!("{component}.target_modules"), targets.into());
            out.insert(format!("{component}.rank_pattern"), rank_pattern.into());
            out.insert(format!("{component}.alpha_pattern"), alpha_pattern.into());
        }
        Ok(serde_json::Value::Object(out))
    }
}

/// One peft config's alphas: component ("" for unprefixed configs), the
/// default `lora_alpha` and the per-module `alpha_pattern`.
type AlphaConfig = (String, Option<f32>, Vec<(String, f32)>);

/// Alpha sources found in safetensors metadata.
#[derive(Default)]
struct MetadataAlphas {
    configs: Vec<AlphaConfig>,
    global: Option<f32>,
}

impl MetadataAlphas {
    fn parse(metadata: &BTreeMap<String, String>) -> Self {
        let mut out = Self::default();
        for key in ["lora_adapter_metadata", "lora_config"] {
            let Some(json) = metadata
                .get(key)
                .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
            else {
                continue;
            };
            let Some(obj) = json.as_object() else {
                continue;
            };
            for prefix in ["unet.", "text_encoder.", "text_encoder_2.", ""] {
                let alpha = obj
                    .get(&format!("{prefix}lora_alpha"))
                    .and_then(|v| v.as_f64())
                    .map(|v| v as f32);
                let pattern: Vec<(String, f32)> = obj
                    .get(&format!("{prefix}alpha_pattern"))
                    .and_then(|v| v.as_object())
                    .map(|m| {
                        m.iter()
                            .filter_map(|(k, v)| Some((k.clone(), v.as_f64()? as f32)))
                            .collect()
                    })
                    .unwrap_or_default();
                if alpha.is_some() || !pattern.is_empty() {
                    let component = prefix.trim_end_matches('.').to_string();
                    out.configs.push((component, alpha, pattern));
                }
            }
        }
        out.global = ["lora_alpha", "alpha", "network_alpha", "ss_network_alpha"]
            .iter()
            .find_map(|k| metadata.get(*k)?.trim().parse::<f32>().ok());
        out
    }

    fn lookup(&self, module: &str) -> Option<f32> {
        let (component, rest) = names::split_component(module).ok()?;
        for (c, alpha, pattern) in &self.configs {
            if !c.is_empty() && c != component {
                continue;
            }
            for (pat, a) in pattern {
                if rest == pat || rest.ends_with(&format!(".{pat}")) {
                    return Some(*a);
                }
            }
            if alpha.is_some() {
                return *alpha;
            }
        }
        self.global
    }
}

/// A numeric value as JSON: an integer when it is one (peft writes ints).
fn json_num(x: f32) -> serde_json::Value {
    if x.fract() == 0.0 && x.abs() < 1e9 {
        (x as i64).into()
    } else {
        (x as f64).into()
    }
}

fn fmt_num(x: f32) -> String {
    if x.fract() == 0.0 && x.abs() < 1e9 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// Decode a safetensors view to f32 values.
fn view_to_f32(view: &safetensors::tensor::TensorView<'_>) -> Result<Vec<f32>> {
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => bail!("unsupported dtype {other:?} (want F32, F16, BF16 or F64)"),
    })
}

/// An owned f32 tensor in safetensors byte form.
/// safetensors bytes with the header's keys and the data in name order, so
/// that the same adapter always gives the same bytes (the safetensors crate
/// takes the metadata as a `HashMap`, whose order changes with every map).
/// Layout: u64 LE header length, the JSON header padded with spaces to a
/// multiple of 8, then each tensor's little-endian data.
fn serialize_sorted(
    mut tensors: Vec<(String, RawF32)>,
    metadata: &BTreeMap<String, String>,
) -> Vec<u8> {
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let q = |s: &str| serde_json::Value::from(s).to_string();
    let mut header = String::from("{");
    if !metadata.is_empty() {
        let entries: Vec<String> = metadata
            .iter()
            .map(|(k, v)| format!("{}:{}", q(k), q(v)))
            .collect();
        header.push_str(&format!("\"__metadata__\":{{{}}}", entries.join(",")));
    }
    let mut offset = 0usize;
    for (name, t) in &tensors {
        if header.len() > 1 {
            header.push(',');
        }
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        header.push_str(&format!(
            "{}:{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            q(name),
            shape.join(","),
            offset,
            offset + t.data.len()
        ));
        offset += t.data.len();
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + offset);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for (_, t) in &tensors {
        out.extend_from_slice(&t.data);
    }
    out
}

struct RawF32 {
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl RawF32 {
    fn of(t: &Tensor) -> Result<Self> {
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self {
            shape: t.dims().to_vec(),
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })
    }
}

#[cfg(test)]
impl safetensors::tensor::View for RawF32 {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes `bytes` to `path` atomically (selma-io's temp file, fsync, rename).
pub use selma_io::write_atomic;

#[cfg(test)]
mod serialize_tests {
    use super::*;

    fn raw(shape: &[usize], vals: &[f32]) -> RawF32 {
        RawF32 {
            shape: shape.to_vec(),
            data: vals.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    #[test]
    fn sorted_serializer_is_stable_and_reads_like_the_reference() {
        let tensors = || {
            vec![
                ("b.lora_B.weight".to_string(), raw(&[2, 1], &[1.0, 2.0])),
                (
                    "a.lora_A.weight".to_string(),
                    raw(&[1, 3], &[3.0, -4.0, 5.5]),
                ),
                ("a.alpha".to_string(), raw(&[], &[8.0])),
            ]
        };
        let meta: BTreeMap<String, String> = [("rank", "1"), ("format", "pt"), ("x\"y", "q\\z")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let ours = serialize_sorted(tensors(), &meta);
        assert_eq!(
            ours,
            serialize_sorted(tensors().into_iter().rev().collect(), &meta)
        );
        let header_len = u64::from_le_bytes(ours[..8].try_into().unwrap()) as usize;
        assert_eq!(header_len % 8, 0);
        let reference = safetensors::serialize(
            tensors(),
            Some(
                meta.clone()
                    .into_iter()
                    .collect::<std::collections::HashMap<_, _>>(),
            ),
        )
        .unwrap();
        let (a, b) = (
            SafeTensors::deserialize(&ours).unwrap(),
            SafeTensors::deserialize(&reference).unwrap(),
        );
        let mut names = a.names();
        names.sort();
        let mut ref_names = b.names();
        ref_names.sort();
        assert_eq!(names, ref_names);
        for n in names {
            let (x, y) = (a.tensor(n).unwrap(), b.tensor(n).unwrap());
            assert_eq!(
                (x.dtype(), x.shape(), x.data()),
                (y.dtype(), y.shape(), y.data())
            );
        }
        let (_, ma) = SafeTensors::read_metadata(&ours).unwrap();
        let (_, mb) = SafeTensors::read_metadata(&reference).unwrap();
        assert_eq!(ma.metadata(), mb.metadata());
    }
}
