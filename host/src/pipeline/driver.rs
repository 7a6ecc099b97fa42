//! The one driver every unit of work goes through: it hashes the unit's
//! inputs, decides whether the unit is done (its manifest holds this input
//! hash and its outputs exist), whether this invocation may run it (stage
//! selection, shard ownership, another worker's claim), and writes its
//! manifest when the work is finished. A unit's outputs are renamed into
//! place before its manifest is written, so kill -9 at any moment loses at
//! most the unit in progress. Without `--shard`, a unit is claimed before it
//! runs ([`super::claim`]), so several workers on one run directory split
//! the work.

use super::claim::{self, Guard, Outcome};
use super::config::Stage;
use super::plan::Plan;
use super::store::{file_safe, hash_json, Manifest, RunDir};
use super::unit::Unit;
use anyhow::Result;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// When an invocation may run a unit that is not done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// When its stage is selected, in any invocation (sharded or not).
    Selected,
    /// When its stage is selected and this invocation's shard owns index `k`.
    Shard(usize),
    /// When its stage is selected, in an unsharded invocation only.
    Unsharded,
    /// Whenever its upstream is done: bookkeeping on finished work.
    Always,
    /// When its stage is selected, or to finish work started for the same
    /// inputs (a partial manifest exists), e.g. images other shards rendered.
    Resumable,
}

/// What [`Driver::claim`] decided.
pub enum Claim {
    /// Done with these inputs; its output hash is recorded.
    Done,
    /// Not done, and this invocation may run it.
    Todo(Pending),
    /// Not done, and not for this invocation (recorded as waiting).
    Skip,
}

/// A unit to run: the token that [`Pending::commit`] turns into a manifest.
/// It holds the unit's claim (if any) until it is dropped.
#[derive(Debug)]
pub struct Pending {
    /// The unit.
    pub unit: Unit,
    /// Its input hash.
    pub input: String,
    /// The outputs whose presence, with a finished manifest, makes it done.
    outputs: Vec<PathBuf>,
    guard: Option<Guard>,
}

/// What [`Pending::acquire`] found.
pub enum Acquired {
    /// The unit is this worker's to run.
    Mine,
    /// Another live worker runs it (waiting reason given).
    Busy(String),
    /// Another worker finished it meanwhile (its manifest).
    Done(Manifest),
}

impl Pending {
    /// Claims the unit for this process (without `--shard`; sharded runs
    /// split the work by index instead), then checks again that no other
    /// worker finished it meanwhile. Needs only the plan, so worker threads
    /// can acquire the units they start.
    pub fn acquire(&mut self, plan: &Plan) -> Result<Acquired> {
        if plan.opts.shard.is_some() || self.guard.is_some() {
            return Ok(Acquired::Mine);
        }
        let stage = self.unit.stage().name();
        let name = self.unit.to_string();
        let path = plan
            .dir
            .meta()
            .join("claims")
            .join(stage)
            .join(format!("{}.claim", file_safe(&name)));
        match claim::try_claim(&path)? {
            Outcome::Held(h, path) => Ok(Acquired::Busy(format!(
                "claimed by another worker ({}; its lock on {} is released when it exits)",
                h.map_or_else(|| "starting".to_string(), |h| h.to_string()),
                path.display()
            ))),
            Outcome::Claimed(g) => {
                if let Some(m) = plan.dir.done_with(stage, &name, &self.input, &self.outputs) {
                    return Ok(Acquired::Done(m));
                }
                self.guard = Some(g);
                Ok(Acquired::Mine)
            }
        }
    }

    /// Writes the unit's finished manifest (after its outputs are in place).
    /// Needs only the run directory, so worker threads can commit their unit.
    pub fn commit(&self, dir: &RunDir, output: &str, counts: Counts) -> Result<Manifest> {
        fault_pause(self.unit.stage().name());
        let m = self.manifest(output, true, counts);
        dir.write_manifest(&m)?;
        Ok(m)
    }
    /// Writes a not-done manifest with these inputs: work has started, and
    /// what is already on disk for these inputs may be kept.
    pub fn mark_started(&self, dir: &RunDir) -> Result<()> {
        dir.write_manifest(&self.manifest("", false, Counts::new()))
    }
    fn manifest(&self, output: &str, done: bool, counts: Counts) -> Manifest {
        Manifest {
            stage: self.unit.stage().name().into(),
            unit: self.unit.to_string(),
            input_hash: self.input.clone(),
            output_hash: output.into(),
            done,
            counts,
        }
    }
}

/// Fault injection for the chaos tests: `SELMA_FAULT_PAUSE_MS=merge=40,report=40`
/// sleeps that long before each unit of those stages records that it is
/// done (its outputs already in place), so a kill aimed at a stage that
/// lasts a few ms lands in it, in the window between outputs and manifest.
fn fault_pause(stage: &str) {
    static PAUSES: std::sync::OnceLock<HashMap<String, u64>> = std::sync::OnceLock::new();
    let pauses = PAUSES.get_or_init(|| {
        let text = std::env::var("SELMA_FAULT_PAUSE_MS").unwrap_or_default();
        text.split(',')
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.trim().to_string(), v.trim().parse().ok()?))
            })
            .collect()
    });
    if let Some(ms) = pauses.get(stage) {
        std::thread::sleep(std::time::Duration::from_millis(*ms));
    }
}

/// Counts shown by `selma status`, stored in a manifest.
pub type Counts = BTreeMap<String, f64>;

/// The state of one invocation: the plan, what is done, what ran, what waits.
pub struct Driver<'p> {
    /// The validated run.
    pub plan: &'p Plan,
    outputs: HashMap<Unit, String>,
    /// Units run (not skipped) by this invocation, in order.
    pub ran: Vec<Unit>,
    /// Units that could not run in this invocation, with the reason.
    pub waiting: Vec<(String, String)>,
    /// Units left because another live worker holds their claim.
    pub busy: Vec<Unit>,
    model_ids: HashMap<PathBuf, String>,
}

impl<'p> Driver<'p> {
    /// A driver for `plan` that knows of no unit yet.
    pub fn new(plan: &'p Plan) -> Self {
        Self {
            plan,
            outputs: HashMap::new(),
            ran: vec![],
            waiting: vec![],
            busy: vec![],
            model_ids: HashMap::new(),
        }
    }

    /// The output hash of a unit done in this run (None: not done).
    pub fn output(&self, u: &Unit) -> Option<&str> {
        self.outputs.get(u).map(String::as_str)
    }

    /// The output hashes of `upstream`, or None (and `unit` waits) when one
    /// of them is not done.
    pub fn upstream(&mut self, unit: &Unit, upstream: &[Unit]) -> Option<Vec<String>> {
        let mut out = vec![];
        for u in upstream {
            match self.outputs.get(u) {
                Some(h) => out.push(h.clone()),
                None => {
                    self.wait(unit, format!("{u} is not done"));
                    return None;
                }
            }
        }
        Some(out)
    }

    /// Records that `unit` waits, and why.
    pub fn wait(&mut self, unit: &Unit, why: String) {
        self.waiting.push((unit.to_string(), why));
    }

    /// Identity of a model folder (computed once), creating the configured
    /// random model first when it is missing.
    pub fn model_id(&mut self, dir: &Path) -> Result<String> {
        if let Some(id) = self.model_ids.get(dir) {
            return Ok(id.clone());
        }
        super::stages::ensure_model(self.plan, dir)?;
        let id = selma_io::model_identity(dir, None)?;
        self.model_ids.insert(dir.to_path_buf(), id.clone());
        Ok(id)
    }

    /// Decides a unit: done with these inputs (every one of `outputs`
    /// exists), to run here (and claimed), or not for this invocation.
    pub fn claim(
        &mut self,
        unit: Unit,
        input: &serde_json::Value,
        outputs: &[PathBuf],
        gate: Gate,
    ) -> Result<Claim> {
        let mut p = match self.decide(unit, input, outputs, gate) {
            Claim::Todo(p) => p,
            other => return Ok(other),
        };
        match p.acquire(self.plan)? {
            Acquired::Mine => Ok(Claim::Todo(p)),
            Acquired::Busy(why) => {
                self.busy(p.unit, why);
                Ok(Claim::Skip)
            }
            Acquired::Done(m) => {
                self.outputs.insert(p.unit, m.output_hash);
                Ok(Claim::Done)
            }
        }
    }

    /// Records a unit another live worker holds.
    pub fn busy(&mut self, unit: Unit, why: String) {
        self.waiting.push((unit.to_string(), why));
        self.busy.push(unit);
    }

    /// [`Driver::claim`] without taking the claim: the caller acquires it
    /// ([`Pending::acquire`]) when it starts the work, e.g. in a worker thread.
    pub fn decide(
        &mut self,
        unit: Unit,
        input: &serde_json::Value,
        outputs: &[PathBuf],
        gate: Gate,
    ) -> Claim {
        let input = hash_json(input);
        let dir = &self.plan.dir;
        let stage = unit.stage();
        let name = unit.to_string();
        if let Some(m) = dir.done_with(stage.name(), &name, &input, outputs) {
            self.outputs.insert(unit, m.output_hash);
            return Claim::Done;
        }
        let shard = self.plan.opts.shard;
        let started = || {
            dir.manifest(stage.name(), &name)
                .is_some_and(|m| m.input_hash == input)
        };
        let may_start = self.plan.wants(stage) || (gate == Gate::Resumable && started());
        let why = match gate {
            Gate::Always => None,
            _ if !may_start => Some(format!("the {stage} stage was not selected")),
            Gate::Shard(k) => shard
                .filter(|s| !s.owns(k))
                .map(|s| format!("belongs to shard {}/{}", k % s.count, s.count)),
            Gate::Unsharded if shard.is_some() => Some(format!(
                "the {stage} stage runs in an unsharded run (without --shard)"
            )),
            _ => None,
        };
        match why {
            Some(why) => {
                self.waiting.push((name, why));
                Claim::Skip
            }
            None => Claim::Todo(Pending {
                unit,
                input,
                outputs: outputs.to_vec(),
                guard: None,
            }),
        }
    }

    /// Commits a claimed unit (manifest written) and records it as done and run.
    pub fn finish(&mut self, p: Pending, output: &str, counts: Counts) -> Result<()> {
        let m = p.commit(&self.plan.dir, output, counts)?;
        self.record(p.unit, m);
        Ok(())
    }

    /// Records a unit finished by another worker meanwhile as done.
    pub fn done_elsewhere(&mut self, unit: Unit, m: Manifest) {
        self.outputs.insert(unit, m.output_hash);
    }

    /// Records a unit committed elsewhere (a worker thread) as done and run.
    pub fn record(&mut self, unit: Unit, m: Manifest) {
        self.outputs.insert(unit.clone(), m.output_hash);
        self.ran.push(unit);
    }

    /// Is `stage` selected in this invocation?
    pub fn wants(&self, stage: Stage) -> bool {
        self.plan.wants(stage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::config::Loaded;
    use crate::pipeline::plan::RunOptions;
    use crate::pipeline::store::Shard;
    use serde_json::json;

    const CONFIG: &str = r#"
[models]
teacher = "$RUN/model"
init_tiny = true
[[skills]]
name = "general"
[[merge]]
strategy = "linear"
"#;

    fn plan(dir: &Path, shard: Option<Shard>, stages: Option<Vec<Stage>>) -> Plan {
        let loaded = Loaded::parse(CONFIG, "test.toml", dir).unwrap();
        let opts = RunOptions {
            run_dir: Some(dir.to_path_buf()),
            shard,
            stages,
            ..Default::default()
        };
        crate::pipeline::validate(loaded, opts).unwrap()
    }

    fn todo(c: Claim) -> Pending {
        match c {
            Claim::Todo(p) => p,
            Claim::Done => panic!("claimed as done"),
            Claim::Skip => panic!("skipped"),
        }
    }

    /// Done means: a finished manifest with these inputs, and the outputs exist.
    #[test]
    fn a_finished_unit_is_done_for_the_same_inputs_only() {
        let tmp = tempfile::tempdir().unwrap();
        let p = plan(tmp.path(), None, None);
        let out = tmp.path().join("out.txt");
        let unit = Unit::Prompts("general".into());
        let mut d = Driver::new(&p);
        let c = todo(
            d.claim(
                unit.clone(),
                &json!({"a": 1}),
                std::slice::from_ref(&out),
                Gate::Selected,
            )
            .unwrap(),
        );
        std::fs::write(&out, "x").unwrap();
        d.finish(c, "h1", Counts::new()).unwrap();
        assert_eq!(d.ran, vec![unit.clone()]);

        let mut d = Driver::new(&p);
        let c = d
            .claim(
                unit.clone(),
                &json!({"a": 1}),
                std::slice::from_ref(&out),
                Gate::Selected,
            )
            .unwrap();
        assert!(matches!(c, Claim::Done));
        assert_eq!(d.output(&unit), Some("h1"));
        assert!(d.ran.is_empty());
        todo(
            d.claim(
                unit.clone(),
                &json!({"a": 2}),
                std::slice::from_ref(&out),
                Gate::Selected,
            )
            .unwrap(),
        );
        std::fs::remove_file(&out).unwrap();
        todo(
            d.claim(unit, &json!({"a": 1}), &[out], Gate::Selected)
                .unwrap(),
        );
    }

    /// Shard ownership, unsharded-only units and stage selection decide
    /// who runs a unit that is not done; the reason is recorded.
    #[test]
    fn gates_follow_shards_and_stage_selection() {
        let tmp = tempfile::tempdir().unwrap();
        let shard = "0/2".parse().ok();
        let p = plan(tmp.path(), shard, None);
        let mut d = Driver::new(&p);
        let u = Unit::Expert("general".into(), Default::default());
        assert!(matches!(
            d.claim(u.clone(), &json!(1), &[], Gate::Shard(1)).unwrap(),
            Claim::Skip
        ));
        assert_eq!(d.waiting.last().unwrap().1, "belongs to shard 1/2");
        todo(d.claim(u, &json!(1), &[], Gate::Shard(2)).unwrap());
        assert!(matches!(
            d.claim(Unit::Report, &json!(1), &[], Gate::Unsharded)
                .unwrap(),
            Claim::Skip
        ));
        todo(
            d.claim(Unit::Results, &json!(1), &[], Gate::Always)
                .unwrap(),
        );

        let p = plan(tmp.path(), None, Some(vec![Stage::Train]));
        let mut d = Driver::new(&p);
        let prompts = Unit::Prompts("general".into());
        assert!(matches!(
            d.claim(prompts, &json!(1), &[], Gate::Selected).unwrap(),
            Claim::Skip
        ));
        assert_eq!(
            d.waiting.last().unwrap().1,
            "the prompts stage was not selected"
        );
        // Resumable: only work started for the same inputs is finished.
        let images = Unit::Images("general".into());
        assert!(matches!(
            d.claim(images.clone(), &json!(1), &[], Gate::Resumable)
                .unwrap(),
            Claim::Skip
        ));
        let all = plan(tmp.path(), None, None);
        let mut starter = Driver::new(&all);
        todo(
            starter
                .claim(images.clone(), &json!(1), &[], Gate::Resumable)
                .unwrap(),
        )
        .mark_started(&all.dir)
        .unwrap();
        todo(
            d.claim(images.clone(), &json!(1), &[], Gate::Resumable)
                .unwrap(),
        );
        assert!(matches!(
            d.claim(images, &json!(2), &[], Gate::Resumable).unwrap(),
            Claim::Skip
        ));
    }

    #[test]
    fn missing_upstream_makes_a_unit_wait() {
        let tmp = tempfile::tempdir().unwrap();
        let p = plan(tmp.path(), None, None);
        let mut d = Driver::new(&p);
        let u = Unit::Images("general".into());
        assert_eq!(d.upstream(&u, &[Unit::Prompts("general".into())]), None);
        assert_eq!(
            d.waiting,
            vec![(
                "images:general".to_string(),
                "prompts:general is not done".to_string()
            )]
        );
        assert_eq!(d.upstream(&u, &[]), Some(vec![]));
    }
}
