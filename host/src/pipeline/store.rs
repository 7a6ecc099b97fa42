//! The run directory: its layout, per-unit manifests (input hash, output
//! hash, counts), content hashing, derived seeds and shard selection.
//!
//! A unit of work (one skill's prompts, one skill's images, one expert, one
//! merge, ...) is done when its manifest exists with `done = true` and the
//! input hash of this run; its outputs' hash feeds the input hash of the
//! units downstream, so a change redoes exactly what depends on it.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One unit's record, `<run>/.selma/manifests/<stage>/<unit>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The stage (`prompts`, `images`, ...).
    pub stage: String,
    /// The unit (`prompts:general`, `expert:counting`, ...).
    pub unit: String,
    /// Hash of everything the unit's outputs depend on.
    pub input_hash: String,
    /// Hash of the outputs (empty while not done).
    pub output_hash: String,
    /// Finished?
    pub done: bool,
    /// Counts shown by `selma status`.
    #[serde(default)]
    pub counts: BTreeMap<String, f64>,
}

/// Paths of a run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    /// The run directory.
    pub root: PathBuf,
}

impl RunDir {
    /// A run directory at `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }
    /// `<run>/<skill>/`.
    pub fn skill_dir(&self, skill: &str) -> PathBuf {
        self.root.join(skill)
    }
    /// `<run>/<skill>/prompts.jsonl`.
    pub fn prompts(&self, skill: &str) -> PathBuf {
        self.skill_dir(skill).join("prompts.jsonl")
    }
    /// `<run>/<skill>/images/`.
    pub fn images(&self, skill: &str) -> PathBuf {
        self.skill_dir(skill).join("images")
    }
    /// `<run>/experts/`.
    pub fn experts(&self) -> PathBuf {
        self.root.join("experts")
    }
    /// `<run>/experts/<name>.safetensors`.
    pub fn expert(&self, name: &str) -> PathBuf {
        self.experts().join(format!("{name}.safetensors"))
    }
    /// The trainer's folder of an expert (checkpoints, loss.jsonl).
    pub fn expert_run(&self, name: &str) -> PathBuf {
        self.experts().join(format!("{name}.run"))
    }
    /// `<run>/merged/<name>.safetensors`.
    pub fn merged(&self, name: &str) -> PathBuf {
        self.root.join("merged").join(format!("{name}.safetensors"))
    }
    /// `<run>/eval/`.
    pub fn eval(&self) -> PathBuf {
        self.root.join("eval")
    }
    /// `<run>/results.json`.
    pub fn results(&self) -> PathBuf {
        self.root.join("results.json")
    }
    /// `<run>/report.html`.
    pub fn report(&self) -> PathBuf {
        self.root.join("report.html")
    }
    /// `<run>/.selma/`.
    pub fn meta(&self) -> PathBuf {
        self.root.join(".selma")
    }
    /// `<run>/.selma/plan.json` (what the last run planned; read by `selma status`).
    pub fn plan(&self) -> PathBuf {
        self.meta().join("plan.json")
    }
    fn manifest_path(&self, stage: &str, unit: &str) -> PathBuf {
        self.meta()
            .join("manifests")
            .join(stage)
            .join(format!("{}.json", file_safe(unit)))
    }
    /// A unit's manifest, if any (an unreadable one counts as absent).
    pub fn manifest(&self, stage: &str, unit: &str) -> Option<Manifest> {
        let text = std::fs::read_to_string(self.manifest_path(stage, unit)).ok()?;
        serde_json::from_str(&text).ok()
    }
    /// The unit's manifest when it is done with these inputs.
    pub fn done(&self, stage: &str, unit: &str, input_hash: &str) -> Option<Manifest> {
        self.manifest(stage, unit)
            .filter(|m| m.done && m.input_hash == input_hash)
    }
    /// [`RunDir::done`], and every one of `outputs` still exists.
    pub fn done_with(
        &self,
        stage: &str,
        unit: &str,
        input_hash: &str,
        outputs: &[PathBuf],
    ) -> Option<Manifest> {
        self.done(stage, unit, input_hash)
            .filter(|_| outputs.iter().all(|p| p.exists()))
    }
    /// Write a manifest atomically.
    pub fn write_manifest(&self, m: &Manifest) -> Result<()> {
        selma_io::write_json(&self.manifest_path(&m.stage, &m.unit), m)
    }
    /// Remove every manifest of a stage (`--force`).
    pub fn forget_stage(&self, stage: &str) -> Result<()> {
        let dir = self.meta().join("manifests").join(stage);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        Ok(())
    }
    /// Every manifest of a stage.
    pub fn manifests(&self, stage: &str) -> Vec<Manifest> {
        let dir = self.meta().join("manifests").join(stage);
        let mut out: Vec<Manifest> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|t| serde_json::from_str(&t).ok())
            .collect();
        out.sort_by(|a: &Manifest, b| a.unit.cmp(&b.unit));
        out
    }
}

/// A unit name usable as a file name (`expert:general` -> `expert-general`).
pub fn file_safe(unit: &str) -> String {
    unit.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Hex SHA-256 of a JSON value (serde_json writes maps in key order).
pub fn hash_json(v: &serde_json::Value) -> String {
    hex::encode(Sha256::digest(v.to_string().as_bytes()))
}

/// Hex SHA-256 of a file's bytes.
pub fn hash_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// A seed derived from the run seed and a path of labels.
pub fn derive_seed(run_seed: u64, parts: &[&str]) -> u64 {
    let mut h = Sha256::new();
    h.update(run_seed.to_le_bytes());
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    let d = h.finalize();
    // Keep seeds below 2^53 so they survive JSON and PNG text unchanged.
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes")) >> 11
}

/// Shard selection: unit `index` belongs to shard `i` of `n` when `index % n == i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This shard, from 0.
    pub index: usize,
    /// Number of shards.
    pub count: usize,
}

impl Shard {
    /// Does this shard own unit `k`?
    pub fn owns(&self, k: usize) -> bool {
        k % self.count == self.index
    }
}

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (i, n) = s
            .split_once('/')
            .with_context(|| format!("--shard {s:?}: expected i/n, e.g. 0/4"))?;
        let index: usize = i
            .trim()
            .parse()
            .with_context(|| format!("--shard {s:?}: bad i"))?;
        let count: usize = n
            .trim()
            .parse()
            .with_context(|| format!("--shard {s:?}: bad n"))?;
        anyhow::ensure!(
            count >= 1 && index < count,
            "--shard {s:?}: need 0 <= i < n (shards are numbered from 0)"
        );
        Ok(Self { index, count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_stable_and_distinct() {
        let a = derive_seed(0, &["image", "general", "0", "0"]);
        assert_eq!(a, derive_seed(0, &["image", "general", "0", "0"]));
        assert_ne!(a, derive_seed(1, &["image", "general", "0", "0"]));
        assert_ne!(a, derive_seed(0, &["image", "general", "0", "1"]));
        // Length-prefixed parts: ("ab","c") != ("a","bc").
        assert_ne!(derive_seed(0, &["ab", "c"]), derive_seed(0, &["a", "bc"]));
        assert!(a < (1 << 53));
    }

    #[test]
    fn shard_parse_and_split_cover_every_unit_once() {
        let s0: Shard = "0/3".parse().unwrap();
        let s1: Shard = "1/3".parse().unwrap();
        let s2: Shard = "2/3".parse().unwrap();
        for k in 0..30 {
            let owners = [s0, s1, s2].iter().filter(|s| s.owns(k)).count();
            assert_eq!(owners, 1);
        }
        assert!("3/3".parse::<Shard>().is_err());
        assert!("1".parse::<Shard>().is_err());
    }

    #[test]
    fn manifests_round_trip_and_done_checks_the_hash() {
        let d = tempfile::tempdir().unwrap();
        let rd = RunDir::new(d.path());
        let m = Manifest {
            stage: "train".into(),
            unit: "expert:general".into(),
            input_hash: "abc".into(),
            output_hash: "def".into(),
            done: true,
            counts: BTreeMap::new(),
        };
        rd.write_manifest(&m).unwrap();
        assert_eq!(rd.done("train", "expert:general", "abc"), Some(m.clone()));
        assert_eq!(rd.done("train", "expert:general", "xyz"), None);
        assert_eq!(rd.manifests("train"), vec![m]);
        rd.forget_stage("train").unwrap();
        assert!(rd.manifest("train", "expert:general").is_none());
    }
}
