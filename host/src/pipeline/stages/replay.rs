//! `[train.replay]`: the pool of pretraining-style images mixed into every
//! adapter's training set against forgetting. A ShapeWorld pool is rendered
//! on first use under `replay/` and identified by its render settings (it is
//! deterministic); a folder pool by its listing and its files' names, sizes
//! and modification times.

use crate::pipeline::config::ReplaySection;
use crate::pipeline::plan::Plan;
use crate::pipeline::store::{hash_file, hash_json};
use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};

/// Where a replay pool lives and what it is.
pub struct Pool {
    /// Its folder.
    pub dir: PathBuf,
    /// How listings under `experts/<file>.data/` reach it (relative inside
    /// the run directory, so a moved run keeps working).
    pub reach: PathBuf,
    /// Its identity, for input hashes.
    pub id: String,
}

/// The pool of `[train.replay]` (nothing is rendered or read yet).
pub fn pool(plan: &Plan, r: &ReplaySection) -> Result<Pool> {
    match (&r.data, r.shapeworld) {
        (Some(d), _) => {
            let dir = plan.loaded.resolve(d, &plan.dir.root);
            let reach = match dir.strip_prefix(&plan.dir.root) {
                Ok(inside) => Path::new("../..").join(inside),
                Err(_) => std::path::absolute(&dir).unwrap_or_else(|_| dir.clone()),
            };
            let meta = dir.join("metadata.jsonl");
            let mut files = vec![];
            for e in
                std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
            {
                let e = e?;
                let m = e.metadata()?;
                let mtime = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                files.push(json!([
                    e.file_name().to_string_lossy(),
                    m.len(),
                    mtime.to_string()
                ]));
            }
            files.sort_by_key(|f| f[0].as_str().unwrap_or_default().to_string());
            let id = hash_json(&json!({"listing": hash_file(&meta)?, "files": files}));
            Ok(Pool { dir, reach, id })
        }
        (None, Some(n)) => {
            // `sampler`: the scene sampler's bounded draws became selma-rng's
            // (rejection, then modulo; they were multiply-shift), which
            // changed the scenes of every seed: pools of the old sampler are
            // not reused, and the adapters trained on them are redone.
            // `world` joins the hash only for v2, so v1 pools keep their ids.
            let mut key = json!({
                "shapeworld": n, "mix": r.mix, "number_word_keep": r.number_word_keep, "seed": r.seed,
                "sampler": "selma-rng",
            });
            if r.world != selma_shapeworld::World::V1 {
                key["world"] = json!(r.world.name());
            }
            let id = hash_json(&key);
            let name = format!("shapeworld-{}", &id[..12]);
            let dir = plan.dir.root.join("replay").join(&name);
            Ok(Pool {
                dir,
                reach: Path::new("../../replay").join(name),
                id,
            })
        }
        (None, None) => bail!("[train.replay] names no pool"),
    }
}

/// The pool's rows as listing rows (rendering a ShapeWorld pool first if it
/// is not there; shards racing to render it accept the one that wins).
pub fn rows_of(r: &ReplaySection, pool: &Pool) -> Result<Vec<serde_json::Value>> {
    let meta = pool.dir.join("metadata.jsonl");
    if let (Some(n), false) = (r.shapeworld, meta.is_file()) {
        let opts = selma_shapeworld::DatasetOptions {
            count: n,
            seed: r.seed,
            sample: selma_shapeworld::SampleOptions {
                mix: selma_shapeworld::Mix::parse(&r.mix)?,
                ..match r.world {
                    selma_shapeworld::World::V1 => selma_shapeworld::SampleOptions {
                        number_word_keep: r.number_word_keep,
                        ..selma_shapeworld::SampleOptions::world(r.world)
                    },
                    selma_shapeworld::World::V2 => selma_shapeworld::SampleOptions::world(r.world),
                }
            },
            overwrite: false,
            threads: 0,
        };
        if let Err(e) = selma_shapeworld::write_dataset(&pool.dir, &opts) {
            if !meta.is_file() {
                return Err(e)
                    .with_context(|| format!("rendering the replay pool {}", pool.dir.display()));
            }
        }
    }
    let mut rows = vec![];
    for (i, r) in selma_io::read_jsonl::<serde_json::Value>(&meta)?
        .into_iter()
        .enumerate()
    {
        let (Some(f), Some(text)) = (r["file_name"].as_str(), r["text"].as_str()) else {
            bail!(
                "{} line {}: needs file_name and text",
                meta.display(),
                i + 1
            );
        };
        let path = pool.reach.join(f);
        rows.push(json!({"file_name": path.to_string_lossy(), "text": text}));
    }
    ensure!(
        !rows.is_empty(),
        "the replay pool {} is empty",
        meta.display()
    );
    Ok(rows)
}

/// `k` skill rows get round(k * share / (1 - share)) replay rows: a seeded
/// shuffle of the pool, cycled when the pool is smaller.
pub fn mix_rows(
    pool: &[serde_json::Value],
    k: usize,
    share: f64,
    seed: u64,
) -> Vec<serde_json::Value> {
    let n = (k as f64 * share / (1.0 - share)).round() as usize;
    let order = selma_rng::permutation(pool.len(), &mut selma_rng::SplitMix64::new(seed));
    (0..n)
        .map(|i| pool[order[i % pool.len()]].clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::mix_rows;
    use serde_json::json;

    /// Replay rows: round(k s / (1 - s)) of them, distinct while the pool
    /// lasts, then cycling; the same seed gives the same rows.
    #[test]
    fn replay_rows_share_distinctness_and_seed() {
        let pool: Vec<serde_json::Value> = (0..10).map(|i| json!({"file_name": i})).collect();
        let names = |rows: &[serde_json::Value]| -> Vec<i64> {
            rows.iter()
                .map(|r| r["file_name"].as_i64().unwrap())
                .collect()
        };
        // 7 skill rows at share 0.3 -> 3 replay rows; 14 at 0.5 -> 14.
        assert_eq!(mix_rows(&pool, 7, 0.3, 1).len(), 3);
        let many = names(&mix_rows(&pool, 14, 0.5, 1));
        assert_eq!(many.len(), 14);
        let mut first: Vec<i64> = many[..10].to_vec();
        first.sort();
        assert_eq!(first, (0..10).collect::<Vec<i64>>(), "a whole pass first");
        assert_eq!(&many[10..], &many[..4], "then the same order again");
        assert_eq!(many, names(&mix_rows(&pool, 14, 0.5, 1)));
        assert_ne!(many, names(&mix_rows(&pool, 14, 0.5, 2)));
        assert!(mix_rows(&pool, 0, 0.3, 1).is_empty());
    }
}
