//! Atomic training checkpoints: a folder `checkpoint-<step>/` holding
//! `state.json` (step, RNG state, data order, config) and `tensors.safetensors`
//! (LoRA factors and AdamW moments, exact f32/f64 bits). Written into a hidden
//! temporary folder, every file fsync'ed, then renamed into place, so a killed
//! process leaves the previous checkpoint intact and never a partial one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{de::DeserializeOwned, Serialize};

/// File holding the JSON state inside a checkpoint folder.
pub const STATE_FILE: &str = "state.json";
/// File holding the tensors inside a checkpoint folder.
pub const TENSORS_FILE: &str = "tensors.safetensors";

fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("flushing {} to disk", path.display()))
}

/// Writes `checkpoint-<step>/` under `run_dir` atomically; returns its path.
/// An existing checkpoint of the same step is replaced.
pub fn save<S: Serialize>(
    run_dir: &Path,
    step: u64,
    state: &S,
    tensors: &HashMap<String, Tensor>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("creating the run folder {}", run_dir.display()))?;
    let name = format!("checkpoint-{step}");
    let dst = run_dir.join(&name);
    let tmp = selma_io::temp_path(&dst)?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let st = tmp.join(STATE_FILE);
    std::fs::write(&st, serde_json::to_vec_pretty(state)?)
        .with_context(|| format!("writing {}", st.display()))?;
    let tf = tmp.join(TENSORS_FILE);
    let cpu: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&cpu, &tf)
        .with_context(|| format!("writing {}", tf.display()))?;
    sync(&st)?;
    sync(&tf)?;
    sync(&tmp)?;
    if dst.exists() {
        std::fs::remove_dir_all(&dst).with_context(|| format!("replacing {}", dst.display()))?;
    }
    std::fs::rename(&tmp, &dst)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))?;
    sync(run_dir)?;
    Ok(dst)
}

/// The newest complete `checkpoint-<step>` folder under `run_dir`, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    if !run_dir.is_dir() {
        return Ok(None);
    }
    let mut best: Option<(u64, PathBuf)> = None;
    for e in std::fs::read_dir(run_dir).with_context(|| format!("listing {}", run_dir.display()))? {
        let p = e?.path();
        let Some(step) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if p.join(STATE_FILE).is_file()
            && p.join(TENSORS_FILE).is_file()
            && best.as_ref().is_none_or(|(b, _)| step > *b)
        {
            best = Some((step, p));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// Deletes all but the newest `keep` complete checkpoints under `run_dir`
/// (`keep = 0` keeps everything). Returns the folders removed.
pub fn prune(run_dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    if keep == 0 || !run_dir.is_dir() {
        return Ok(vec![]);
    }
    let mut all: Vec<(u64, PathBuf)> = vec![];
    for e in std::fs::read_dir(run_dir).with_context(|| format!("listing {}", run_dir.display()))? {
        let p = e?.path();
        if let Some(step) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|s| s.parse::<u64>().ok())
        {
            all.push((step, p));
        }
    }
    all.sort();
    let n = all.len().saturating_sub(keep);
    let mut removed = vec![];
    for (_, p) in all.into_iter().take(n) {
        std::fs::remove_dir_all(&p).with_context(|| format!("removing old {}", p.display()))?;
        removed.push(p);
    }
    Ok(removed)
}

/// Resolves `--resume PATH`: a checkpoint folder itself, or a run folder
/// (its newest checkpoint).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(STATE_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    match latest(path)? {
        Some(p) => Ok(p),
        None => bail!(
            "--resume {}: neither a checkpoint folder (with {STATE_FILE}) nor a run folder holding checkpoint-<step>/ folders",
            path.display()
        ),
    }
}

/// Reads a checkpoint folder: its state and tensors (on `device`).
pub fn load<S: DeserializeOwned>(
    dir: &Path,
    device: &Device,
) -> Result<(S, HashMap<String, Tensor>)> {
    let st = dir.join(STATE_FILE);
    let text = std::fs::read(&st).with_context(|| format!("reading {}", st.display()))?;
    let state =
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", st.display()))?;
    let tf = dir.join(TENSORS_FILE);
    let tensors = candle_core::safetensors::load(&tf, device)
        .with_context(|| format!("reading {}", tf.display()))?;
    Ok((state, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_is_complete_latest_wins_and_prune_keeps_the_newest() {
        let d = tempfile::tempdir().unwrap();
        let t: HashMap<String, Tensor> = [(
            "x".to_string(),
            Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap(),
        )]
        .into();
        for step in [5u64, 10, 15] {
            save(d.path(), step, &serde_json::json!({ "step": step }), &t).unwrap();
        }
        // A stale temporary folder of a killed writer is never picked.
        std::fs::create_dir(d.path().join(".checkpoint-99.tmp-1")).unwrap();
        let last = latest(d.path()).unwrap().unwrap();
        assert!(last.ends_with("checkpoint-15"));
        assert_eq!(resolve(d.path()).unwrap(), last);
        let (st, ts): (serde_json::Value, _) = load(&last, &Device::Cpu).unwrap();
        assert_eq!(st["step"], 15);
        assert_eq!(ts["x"].to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
        let removed = prune(d.path(), 2).unwrap();
        assert_eq!(removed.len(), 1);
        assert!(removed[0].ends_with("checkpoint-5"));
        assert!(d.path().join("checkpoint-10").is_dir());
    }
}
