//! Weight loading: the `TensorSource` trait, mmap'd safetensors files
//! (`SafetensorsSource`), a shape-only test backend (`ShapeOnlySource`) and
//! `Vb`, the path-prefixed builder that model constructors take. `Vb` checks
//! every shape against the caller's expectation, converts to the requested
//! dtype/device and records each key it hands out, so a loader can prove it
//! consumed a checkpoint completely (`unused_keys`) and asked for nothing that
//! is absent (`missing_keys`). In trainable mode (`Vb::new_trainable`) every
//! weight `get` hands out is a candle `Var`, recorded under its checkpoint key
//! (`Vb::vars`), so a model built from it trains all its weights (full
//! fine-tuning); buffers loaded with `get_any_shape` stay plain tensors.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use candle_core::{safetensors::MmapedSafetensors, DType, Device, Shape, Tensor, Var};

/// A named collection of tensors (a checkpoint, or a test stand-in for one).
pub trait TensorSource: Send + Sync {
    /// Loads tensor `name` converted to `dtype` on `device`.
    fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor>;
    /// The stored shape of `name`, or None when the source does not hold it.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Every key the source holds, sorted.
    fn keys(&self) -> Vec<String>;
    /// Where `name` lives (a file path), for error messages.
    fn origin(&self, name: &str) -> String;
    /// True when the source holds `name`.
    fn contains(&self, name: &str) -> bool {
        self.shape(name).is_some()
    }
}

/// One or more memory-mapped `.safetensors` files; f32/f16/bf16 are converted
/// to the requested dtype when a tensor is loaded.
pub struct SafetensorsSource {
    files: Vec<PathBuf>,
    st: MmapedSafetensors,
    /// key -> (file index, shape)
    index: BTreeMap<String, (usize, Vec<usize>)>,
}

/// The weight file names a diffusers component folder may hold, best first.
pub const WEIGHT_FILE_NAMES: &[&str] = &[
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bf16.safetensors",
    "model.bf16.safetensors",
];

impl SafetensorsSource {
    /// Memory-maps the given files (a key in several files: the last wins).
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        if paths.is_empty() {
            bail!("no safetensors file given");
        }
        let files: Vec<PathBuf> = paths.iter().map(|p| p.as_ref().to_path_buf()).collect();
        for f in &files {
            if !f.is_file() {
                bail!("weight file {} does not exist", f.display());
            }
        }
        // SAFETY: the files are mapped read-only; like every mmap-based
        // loader we rely on nobody truncating them while the model is live.
        let st = unsafe { MmapedSafetensors::multi(&files) }.with_context(|| {
            format!(
                "reading safetensors header of {}",
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        let mut index = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            // Re-read the small header per file to know which file holds what.
            let header = read_header_shapes(f)?;
            for (k, shape) in header {
                index.insert(k, (i, shape));
            }
        }
        Ok(Self { files, st, index })
    }

    /// Opens the weights of a diffusers component folder (`unet/`,
    /// `text_encoder/`, ...): the first of [`WEIGHT_FILE_NAMES`] present, or
    /// the shards listed by a `*.safetensors.index.json` (or a variant's
    /// `*.safetensors.index.fp16.json`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        for name in WEIGHT_FILE_NAMES {
            let p = dir.join(name);
            if p.is_file() {
                return Self::open(&[p]);
            }
        }
        let mut index_files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("listing weight folder {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.contains(".safetensors.index") && n.ends_with(".json"))
            })
            .collect();
        // Plain `*.safetensors.index.json` before variants (`*.index.fp16.json`).
        index_files.sort_by_key(|p| (p.to_string_lossy().len(), p.clone()));
        if let Some(idx) = index_files.first() {
            let text = std::fs::read_to_string(idx)
                .with_context(|| format!("reading {}", idx.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", idx.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{} has no \"weight_map\" object", idx.display()))?;
            let shards: BTreeSet<&str> = map.values().filter_map(|s| s.as_str()).collect();
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            return Self::open(&paths);
        }
        bail!(
            "no weights in {}: expected one of {} (or a sharded *.safetensors.index.json)",
            dir.display(),
            WEIGHT_FILE_NAMES.join(", ")
        )
    }

    /// The files this source maps.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

/// Reads only the JSON header of a safetensors file: key -> shape.
fn read_header_shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("{} is too short for a safetensors file", path.display()))?;
    let n = u64::from_le_bytes(len) as usize;
    if n > 100 << 20 {
        bail!(
            "{}: safetensors header of {n} bytes is implausible",
            path.display()
        );
    }
    let mut buf = vec![0u8; n];
    f.read_exact(&mut buf)
        .with_context(|| format!("{}: truncated safetensors header", path.display()))?;
    let v: serde_json::Value = serde_json::from_slice(&buf)
        .with_context(|| format!("{}: safetensors header is not JSON", path.display()))?;
    let obj = v
        .as_object()
        .with_context(|| format!("{}: safetensors header is not an object", path.display()))?;
    let mut out = Vec::with_capacity(obj.len());
    for (k, e) in obj {
        if k == "__metadata__" {
            continue;
        }
        let shape = e
            .get("shape")
            .and_then(|s| s.as_array())
            .with_context(|| format!("{}: tensor {k} has no shape", path.display()))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<Vec<_>>>()
            .with_context(|| format!("{}: tensor {k} has a bad shape", path.display()))?;
        out.push((k.clone(), shape));
    }
    Ok(out)
}

impl TensorSource for SafetensorsSource {
    fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self
            .st
            .load(name, device)
            .with_context(|| format!("loading tensor {name} from {}", self.origin(name)))?;
        if t.dtype() == dtype {
            Ok(t)
        } else {
            Ok(t.to_dtype(dtype)?)
        }
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.index.get(name).map(|(_, s)| s.clone())
    }
    fn keys(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }
    fn origin(&self, name: &str) -> String {
        match self.index.get(name) {
            Some((i, _)) => self.files[*i].display().to_string(),
            None => self
                .files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

/// Serves every key of a key list (one `name [d0, d1, ...]` per line, as in
/// fixtures' `keys.txt`) as a zero-cost broadcast view of a scalar zero, so a
/// full-size model can be built in tests without allocating its weights.
pub struct ShapeOnlySource {
    origin: String,
    shapes: BTreeMap<String, Vec<usize>>,
}

impl ShapeOnlySource {
    /// Parses a key list (`name [d0, d1]` lines; `[]` for a scalar).
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let mut shapes = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, rest) = line
                .split_once(' ')
                .with_context(|| format!("{origin}:{}: expected `name [dims]`", i + 1))?;
            let rest = rest.trim();
            let inner = rest
                .strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .with_context(|| format!("{origin}:{}: shape must look like [a, b]", i + 1))?;
            let dims = inner
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| s.parse::<usize>())
                .collect::<std::result::Result<Vec<_>, _>>()
                .with_context(|| format!("{origin}:{}: bad dimension in {rest}", i + 1))?;
            shapes.insert(name.to_string(), dims);
        }
        Ok(Self {
            origin: origin.to_string(),
            shapes,
        })
    }

    /// Reads a key list file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading key list {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Builds the source from explicit (name, shape) pairs.
    pub fn from_shapes<I: IntoIterator<Item = (String, Vec<usize>)>>(it: I, origin: &str) -> Self {
        Self {
            origin: origin.to_string(),
            shapes: it.into_iter().collect(),
        }
    }
}

impl TensorSource for ShapeOnlySource {
    fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let shape = self
            .shapes
            .get(name)
            .with_context(|| format!("tensor {name} not in {}", self.origin))?;
        Ok(Tensor::zeros((), dtype, device)?.broadcast_as(shape.as_slice())?)
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.shapes.get(name).cloned()
    }
    fn keys(&self) -> Vec<String> {
        self.shapes.keys().cloned().collect()
    }
    fn origin(&self, _name: &str) -> String {
        self.origin.clone()
    }
}

/// An in-memory source (tests, freshly initialised models).
pub struct MemorySource {
    origin: String,
    tensors: BTreeMap<String, Tensor>,
}

impl MemorySource {
    /// Wraps a name -> tensor map.
    pub fn new<I: IntoIterator<Item = (String, Tensor)>>(it: I, origin: &str) -> Self {
        Self {
            origin: origin.to_string(),
            tensors: it.into_iter().collect(),
        }
    }
}

impl TensorSource for MemorySource {
    fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .with_context(|| format!("tensor {name} not in {}", self.origin))?;
        Ok(t.to_device(device)?.to_dtype(dtype)?)
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.dims().to_vec())
    }
    fn keys(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
    fn origin(&self, _name: &str) -> String {
        self.origin.clone()
    }
}

struct VbShared {
    source: Arc<dyn TensorSource>,
    used: Mutex<BTreeSet<String>>,
    missing: Mutex<BTreeSet<String>>,
    /// Trainable mode: the variables handed out, by key.
    vars: Option<Mutex<BTreeMap<String, Var>>>,
}

/// Path-prefixed weight builder: `vb.pp("down_blocks").pp(0).get((320, 4, 3, 3), "weight")`.
/// Cheap to clone; all clones share the record of consumed keys.
#[derive(Clone)]
pub struct Vb {
    shared: Arc<VbShared>,
    prefix: String,
    dtype: DType,
    device: Device,
}

impl Vb {
    /// A root builder over `source` producing `dtype` tensors on `device`.
    pub fn new(source: Arc<dyn TensorSource>, dtype: DType, device: &Device) -> Self {
        Self {
            shared: Arc::new(VbShared {
                source,
                used: Mutex::new(BTreeSet::new()),
                missing: Mutex::new(BTreeSet::new()),
                vars: None,
            }),
            prefix: String::new(),
            dtype,
            device: device.clone(),
        }
    }

    /// A root builder in trainable mode: every weight `get` returns is the
    /// tensor of a fresh candle `Var` (the same `Var` when a key is asked for
    /// twice), recorded by its full key; see [`Vb::vars`].
    pub fn new_trainable(source: Arc<dyn TensorSource>, dtype: DType, device: &Device) -> Self {
        Self {
            shared: Arc::new(VbShared {
                source,
                used: Mutex::new(BTreeSet::new()),
                missing: Mutex::new(BTreeSet::new()),
                vars: Some(Mutex::new(BTreeMap::new())),
            }),
            prefix: String::new(),
            dtype,
            device: device.clone(),
        }
    }

    /// A trainable builder over a diffusers component folder's weights.
    pub fn trainable_from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self::new_trainable(
            Arc::new(SafetensorsSource::from_dir(dir)?),
            dtype,
            device,
        ))
    }

    /// True for a trainable builder.
    pub fn is_trainable(&self) -> bool {
        self.shared.vars.is_some()
    }

    /// The variables handed out so far by full key (trainable mode; empty otherwise).
    pub fn vars(&self) -> BTreeMap<String, Var> {
        match &self.shared.vars {
            Some(v) => v.lock().unwrap().clone(),
            None => BTreeMap::new(),
        }
    }

    /// Opens a diffusers component folder's weights (see [`SafetensorsSource::from_dir`]).
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self::new(
            Arc::new(SafetensorsSource::from_dir(dir)?),
            dtype,
            device,
        ))
    }

    /// A builder whose keys live under `self.prefix + "." + s`.
    pub fn pp<S: ToString>(&self, s: S) -> Self {
        Self {
            shared: self.shared.clone(),
            prefix: self.key(&s.to_string()),
            dtype: self.dtype,
            device: self.device.clone(),
        }
    }

    /// The same builder producing another dtype (records stay shared).
    pub fn with_dtype(&self, dtype: DType) -> Self {
        Self {
            dtype,
            ..self.clone()
        }
    }

    /// The full key of `name` under this builder's prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else if name.is_empty() {
            self.prefix.clone()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// This builder's prefix ("" at the root).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// The dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The device tensors are loaded on.
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// The underlying source.
    pub fn source(&self) -> &Arc<dyn TensorSource> {
        &self.shared.source
    }

    /// True when the source holds `name` under this prefix (does not consume it).
    pub fn contains(&self, name: &str) -> bool {
        self.shared.source.contains(&self.key(name))
    }

    /// The stored shape of `name` under this prefix, if present (does not consume it).
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.shared.source.shape(&self.key(name))
    }

    /// Loads `name`, checking it has exactly `shape`; records the key as used.
    /// In trainable mode the result is a variable's tensor.
    pub fn get<S: Into<Shape>>(&self, shape: S, name: &str) -> Result<Tensor> {
        self.fetch(shape.into(), name, true)
    }

    fn fetch(&self, want: Shape, name: &str, trainable: bool) -> Result<Tensor> {
        let key = self.key(name);
        let src = &self.shared.source;
        let Some(have) = src.shape(&key) else {
            self.shared.missing.lock().unwrap().insert(key.clone());
            bail!(
                "weight {key} is missing from {} (expected shape {:?}); is this the right model folder/variant?",
                src.origin(&key),
                want.dims()
            );
        };
        if have.as_slice() != want.dims() {
            bail!(
                "weight {key} in {} has shape {:?} but the config implies {:?}; does config.json match the weights?",
                src.origin(&key),
                have,
                want.dims()
            );
        }
        if trainable {
            if let Some(vars) = &self.shared.vars {
                let mut vars = vars.lock().unwrap();
                if let Some(v) = vars.get(&key) {
                    if v.dtype() == self.dtype && v.device().same_device(&self.device) {
                        return Ok(v.as_tensor().clone());
                    }
                    bail!("weight {key} was asked for twice in different dtypes or devices");
                }
                let t = src.load(&key, self.dtype, &self.device)?;
                let v = Var::from_tensor(&t)
                    .with_context(|| format!("making weight {key} trainable"))?;
                vars.insert(key.clone(), v.clone());
                self.shared.used.lock().unwrap().insert(key);
                return Ok(v.as_tensor().clone());
            }
        }
        let t = src.load(&key, self.dtype, &self.device)?;
        self.shared.used.lock().unwrap().insert(key);
        Ok(t)
    }

    /// Loads `name` with whatever shape it has; records the key as used.
    /// Meant for buffers (e.g. CLIP's `position_ids`): never a variable.
    pub fn get_any_shape(&self, name: &str) -> Result<Tensor> {
        let key = self.key(name);
        let Some(shape) = self.shared.source.shape(&key) else {
            self.shared.missing.lock().unwrap().insert(key.clone());
            bail!(
                "weight {key} is missing from {}",
                self.shared.source.origin(&key)
            );
        };
        self.fetch(shape.into(), name, false)
    }

    /// Keys of the source that no `get` has consumed (over all clones).
    pub fn unused_keys(&self) -> Vec<String> {
        let used = self.shared.used.lock().unwrap();
        self.shared
            .source
            .keys()
            .into_iter()
            .filter(|k| !used.contains(k))
            .collect()
    }

    /// Keys that a `get` asked for but the source lacks.
    pub fn missing_keys(&self) -> Vec<String> {
        self.shared
            .missing
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .collect()
    }

    /// Number of keys consumed so far.
    pub fn used_count(&self) -> usize {
        self.shared.used.lock().unwrap().len()
    }

    /// Errors when any key of the source was left unused or any was missing.
    pub fn check_fully_used(&self) -> Result<()> {
        let unused = self.unused_keys();
        let missing = self.missing_keys();
        if unused.is_empty() && missing.is_empty() {
            return Ok(());
        }
        let show = |v: &[String]| {
            let mut s = v.iter().take(20).cloned().collect::<Vec<_>>().join(", ");
            if v.len() > 20 {
                s.push_str(&format!(", ... ({} in all)", v.len()));
            }
            s
        };
        bail!(
            "weights of {} do not match the model: {} unused key(s) [{}], {} missing key(s) [{}]",
            self.shared.source.origin(""),
            unused.len(),
            show(&unused),
            missing.len(),
            show(&missing)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trainable_builder_hands_out_recorded_variables() {
        let dev = Device::Cpu;
        let src = MemorySource::new(
            [
                (
                    "a.weight".to_string(),
                    Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap(),
                ),
                (
                    "a.position_ids".to_string(),
                    Tensor::new(&[0f32, 1.0], &dev).unwrap(),
                ),
            ],
            "mem",
        );
        let vb = Vb::new_trainable(Arc::new(src), DType::F32, &dev);
        assert!(vb.is_trainable());
        let w = vb.pp("a").get((2, 2), "weight").unwrap();
        assert!(w.is_variable());
        let again = vb.pp("a").get((2, 2), "weight").unwrap();
        assert_eq!(again.id(), w.id(), "one variable per key");
        let buf = vb.pp("a").get_any_shape("position_ids").unwrap();
        assert!(!buf.is_variable(), "buffers are not trained");
        let vars = vb.vars();
        assert_eq!(vars.keys().collect::<Vec<_>>(), vec!["a.weight"]);
        // The variable's values are the stored weights, and set() is seen through `w`.
        assert_eq!(
            w.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 2.0], vec![3.0, 4.0]]
        );
        vars["a.weight"].set(&w.zeros_like().unwrap()).unwrap();
        assert_eq!(w.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        vb.check_fully_used().unwrap();
        // A plain builder hands out plain tensors.
        let plain = Vb::new(
            Arc::new(MemorySource::new(
                [("x".to_string(), Tensor::new(&[1f32], &dev).unwrap())],
                "m",
            )),
            DType::F32,
            &dev,
        );
        assert!(!plain.get(1, "x").unwrap().is_variable());
        assert!(plain.vars().is_empty());
    }
}
