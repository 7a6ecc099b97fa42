//! Prompt generation for one skill: the generate -> filter loop.
//!
//! Owns: the round loop (a generator plugin proposes candidates, the host
//! drops blanks and exact duplicates, each prompt filter judges the survivors
//! in order against the pool = seeds + accepted prompts), its statistics, the
//! loop's resumable state ([`LoopState`], saved after every round). The
//! glue that loads the plugins and runs a whole job is in [`job`].

mod job;
pub use job::*;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// One accepted prompt, one line of `prompts.jsonl`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptRecord {
    pub text: String,
    /// The skill's id (e.g. `counting`).
    pub skill: String,
    /// The generator plugin's name (e.g. `llm-fewshot`).
    pub generator: String,
    /// The 0-based round in which it was accepted.
    pub round: u32,
}

/// Something that proposes candidate prompts (a generator plugin).
pub trait CandidateSource {
    /// The name used in records, stats and errors.
    fn name(&self) -> &str;
    /// Candidates for this round; `pool` is seeds + accepted prompts.
    fn generate(&mut self, pool: &[String], wanted: u32, round: u32) -> Result<Vec<String>>;
    /// The position of its random stream, if it has one (saved with the
    /// loop's state so a resumed loop draws what an unbroken one would).
    fn random_state(&self) -> Option<u64> {
        None
    }
    /// Continue its random stream from a position [`Self::random_state`] gave.
    fn set_random_state(&mut self, _state: u64) {}
}

/// A judge of candidates (a prompt-filter plugin).
pub trait CandidateFilter {
    /// The name used in stats and errors.
    fn name(&self) -> &str;
    /// One `(keep, reason)` per candidate, judged in order against `pool`.
    fn judge(
        &mut self,
        candidates: &[String],
        pool: &[String],
    ) -> Result<Vec<(bool, Option<String>)>>;
    /// The position of its random stream, if it has one.
    fn random_state(&self) -> Option<u64> {
        None
    }
    /// Continue its random stream from a position [`Self::random_state`] gave.
    fn set_random_state(&mut self, _state: u64) {}
}

/// How many prompts a filter turned down, and its most recent reason.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FilterStats {
    pub name: String,
    pub rejected: usize,
    pub last_reason: Option<String>,
}

/// What happened over the whole loop.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoopStats {
    /// Rounds run (generator calls).
    pub rounds: u32,
    /// Candidates the generator returned, all rounds together.
    pub candidates: usize,
    /// Blank candidates and exact (whitespace-trimmed) repeats of anything
    /// seen before (pool, or an earlier candidate, rejected ones included),
    /// dropped by the host before the filters.
    pub blank_or_duplicate: usize,
    /// Per filter, in the order they ran.
    pub filters: Vec<FilterStats>,
    /// Candidates that passed every filter after the target was reached.
    pub surplus: usize,
    /// Prompts accepted.
    pub accepted: usize,
    /// The loop stopped early: [`STALL_ROUNDS`] rounds in a row added nothing.
    pub stalled: bool,
}

/// Consecutive rounds without a new prompt after which the loop gives up
/// (the generator's space is exhausted under the filters).
pub const STALL_ROUNDS: u32 = 10;

/// The loop's result: accepted prompts (in acceptance order) and stats.
#[derive(Clone, Debug)]
pub struct LoopOutcome {
    pub records: Vec<PromptRecord>,
    pub stats: LoopStats,
    /// Whether `count` prompts were reached within `max_rounds`.
    pub complete: bool,
}

/// What one loop is asked for.
#[derive(Clone, Copy, Debug)]
pub struct LoopSpec<'a> {
    /// The skill's id, written into each record.
    pub skill_id: &'a str,
    /// The skill's seed prompts: the pool starts with them.
    pub seeds: &'a [String],
    /// Prompts that count as already seen and are never accepted (held-out
    /// evaluation prompts must not repeat training prompts).
    pub exclude: &'a [String],
    /// Prompts to accept.
    pub count: usize,
    /// Generator rounds before giving up.
    pub max_rounds: u32,
}

/// Where a loop stands after a round: everything needed to continue it
/// exactly as if it had not stopped (saved by `selma prompts` and the
/// pipeline after every round, so an LLM failure loses no accepted prompt).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    /// Rounds finished.
    pub round: u32,
    /// Rounds in a row that added nothing.
    pub idle_rounds: u32,
    /// Prompts accepted so far, in order.
    pub records: Vec<PromptRecord>,
    /// Candidates seen and not accepted (turned down or surplus): their
    /// repeats are dropped as duplicates.
    pub turned_down: Vec<String>,
    /// The statistics so far.
    pub stats: LoopStats,
    /// The random stream positions of the generator, then of each filter
    /// (None for those without one).
    pub random: Vec<Option<u64>>,
}

/// Run rounds until `spec.count` prompts are accepted or `spec.max_rounds`
/// have run, starting from `resume` (a [`LoopState`] an earlier run of the
/// same loop saved) when given.
///
/// `on_round(state)` is called after every round; an error it returns
/// stops the loop.
pub fn run_loop(
    spec: &LoopSpec,
    source: &mut dyn CandidateSource,
    filters: &mut [&mut dyn CandidateFilter],
    resume: Option<LoopState>,
    on_round: &mut dyn FnMut(&LoopState) -> Result<()>,
) -> Result<LoopOutcome> {
    let count = spec.count;
    let mut pool: Vec<String> = spec.seeds.iter().map(|s| s.trim().to_string()).collect();
    let mut seen: HashSet<String> = pool.iter().cloned().collect();
    seen.extend(spec.exclude.iter().map(|s| s.trim().to_string()));
    let fresh_stats = LoopStats {
        filters: filters
            .iter()
            .map(|f| FilterStats {
                name: f.name().to_string(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let mut st = match resume {
        None => LoopState {
            stats: fresh_stats,
            ..Default::default()
        },
        Some(st) => {
            let names: Vec<&str> = st.stats.filters.iter().map(|f| f.name.as_str()).collect();
            let want: Vec<&str> = filters.iter().map(|f| f.name()).collect();
            if names != want || st.random.len() != filters.len() + 1 {
                bail!(
                    "the saved loop state ran filters {names:?}, this loop runs {want:?}: it is \
                     not this loop's"
                );
            }
            if let Some(r) = st.random[0] {
                source.set_random_state(r);
            }
            for (f, r) in filters.iter_mut().zip(&st.random[1..]) {
                if let Some(r) = r {
                    f.set_random_state(*r);
                }
            }
            for r in &st.records {
                pool.push(r.text.clone());
                seen.insert(r.text.clone());
            }
            seen.extend(st.turned_down.iter().cloned());
            st
        }
    };
    let generator = source.name().to_string();
    while st.records.len() < count && st.round < spec.max_rounds {
        let round = st.round;
        let before = st.records.len();
        let wanted = wanted_hint(count - before, before, st.stats.candidates);
        let raw = source
            .generate(&pool, wanted, round)
            .with_context(|| format!("generator {generator:?} failed in round {round}"))?;
        let mut stats = st.stats.clone();
        let mut turned_down = Vec::new();
        stats.rounds += 1;
        stats.candidates += raw.len();
        let mut candidates = Vec::with_capacity(raw.len());
        let mut this_round = HashSet::new();
        for c in raw {
            let c = c.trim().to_string();
            if c.is_empty() || seen.contains(&c) || !this_round.insert(c.clone()) {
                stats.blank_or_duplicate += 1;
            } else {
                candidates.push(c);
            }
        }
        for (f, fstats) in filters.iter_mut().zip(stats.filters.iter_mut()) {
            if candidates.is_empty() {
                break;
            }
            let verdicts = f
                .judge(&candidates, &pool)
                .with_context(|| format!("filter {:?} failed in round {round}", fstats.name))?;
            if verdicts.len() != candidates.len() {
                bail!(
                    "filter {:?} returned {} verdicts for {} candidates in round {round}; a filter must judge every candidate",
                    fstats.name,
                    verdicts.len(),
                    candidates.len()
                );
            }
            let mut kept = Vec::with_capacity(candidates.len());
            for (c, (keep, reason)) in candidates.into_iter().zip(verdicts) {
                if keep {
                    kept.push(c);
                } else {
                    fstats.rejected += 1;
                    if reason.is_some() {
                        fstats.last_reason = reason;
                    }
                    turned_down.push(c);
                }
            }
            candidates = kept;
        }
        // The round is complete: only now does it change the loop's state,
        // so a failure inside a round leaves the state of the round before.
        for c in candidates {
            if st.records.len() < count {
                pool.push(c.clone());
                st.records.push(PromptRecord {
                    text: c,
                    skill: spec.skill_id.to_string(),
                    generator: generator.clone(),
                    round,
                });
            } else {
                stats.surplus += 1;
                turned_down.push(c);
            }
        }
        for c in &turned_down {
            seen.insert(c.clone());
        }
        for r in &st.records[before..] {
            seen.insert(r.text.clone());
        }
        st.turned_down.extend(turned_down);
        st.stats = stats;
        st.round += 1;
        st.idle_rounds = if st.records.len() == before {
            st.idle_rounds + 1
        } else {
            0
        };
        st.random = std::iter::once(source.random_state())
            .chain(filters.iter().map(|f| f.random_state()))
            .collect();
        on_round(&st)?;
        if st.idle_rounds >= STALL_ROUNDS && st.records.len() < count {
            st.stats.stalled = true;
            break;
        }
    }
    st.stats.accepted = st.records.len();
    Ok(LoopOutcome {
        complete: st.records.len() >= count,
        records: st.records,
        stats: st.stats,
    })
}

/// How many candidates to ask for: the remaining count divided by the
/// acceptance rate so far (at least 5%), at least the remaining count and
/// at most 20x it or 1000, whichever is less (filter cost grows with the
/// square of a batch).
fn wanted_hint(remaining: usize, accepted: usize, candidates: usize) -> u32 {
    let rate = if candidates == 0 {
        1.0
    } else {
        (accepted as f64 / candidates as f64).max(0.05)
    };
    let want = (remaining as f64 / rate).ceil() as usize;
    let cap = remaining.max(remaining.saturating_mul(20).min(1000));
    want.clamp(remaining, cap).min(u32::MAX as usize) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(
        skill_id: &'a str,
        seeds: &'a [String],
        exclude: &'a [String],
        count: usize,
        max_rounds: u32,
    ) -> LoopSpec<'a> {
        LoopSpec {
            skill_id,
            seeds,
            exclude,
            count,
            max_rounds,
        }
    }

    fn ok(_: &LoopState) -> Result<()> {
        Ok(())
    }

    /// Draws candidates from its own random stream (a stand-in for a
    /// plugin's host `random`), and fails in the given rounds.
    struct Drawing {
        rng: selma_rng::SplitMix64,
        fail_in: Vec<u32>,
    }

    impl CandidateSource for Drawing {
        fn name(&self) -> &str {
            "drawing"
        }
        fn generate(&mut self, _: &[String], _: u32, round: u32) -> Result<Vec<String>> {
            // Draw before failing, as a generator that fails mid-call does.
            let out: Vec<String> = (0..6)
                .map(|_| format!("prompt {}", self.rng.below(80)))
                .collect();
            if let Some(i) = self.fail_in.iter().position(|r| *r == round) {
                self.fail_in.remove(i);
                bail!("the endpoint stopped answering");
            }
            Ok(out)
        }
        fn random_state(&self) -> Option<u64> {
            Some(self.rng.state())
        }
        fn set_random_state(&mut self, state: u64) {
            self.rng = selma_rng::SplitMix64::new(state);
        }
    }

    fn drawing(seed: u64) -> Drawing {
        Drawing {
            rng: selma_rng::SplitMix64::new(seed),
            fail_in: vec![],
        }
    }

    /// Rejects prompts whose number is a multiple of 3 (so some candidates
    /// are turned down and must stay duplicates after a resume).
    struct NoThrees;

    impl CandidateFilter for NoThrees {
        fn name(&self) -> &str {
            "no-threes"
        }
        fn judge(&mut self, c: &[String], _: &[String]) -> Result<Vec<(bool, Option<String>)>> {
            Ok(c.iter()
                .map(|s| {
                    let n: u64 = s.rsplit(' ').next().unwrap().parse().unwrap();
                    (!n.is_multiple_of(3), None)
                })
                .collect())
        }
    }

    #[test]
    fn a_resumed_loop_ends_exactly_where_an_unbroken_one_does() {
        let seeds = vec!["prompt 0".to_string()];
        let spec = spec("s", &seeds, &[], 30, 100);
        let unbroken =
            run_loop(&spec, &mut drawing(9), &mut [&mut NoThrees], None, &mut ok).unwrap();
        assert!(unbroken.complete && unbroken.stats.rounds > 3);

        // Fails in round 3, after drawing; the state of round 2 was saved.
        let mut saved = None;
        let mut gen = Drawing {
            rng: selma_rng::SplitMix64::new(9),
            fail_in: vec![3],
        };
        let err = run_loop(&spec, &mut gen, &mut [&mut NoThrees], None, &mut |st| {
            saved = Some(st.clone());
            Ok(())
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("round 3"), "{err:#}");
        let saved = saved.unwrap();
        assert_eq!(saved.round, 3);
        assert!(!saved.records.is_empty() && !saved.turned_down.is_empty());
        let json = serde_json::to_string(&saved).unwrap();
        let back: LoopState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);

        // A fresh generator (its stream at the seed) resumes from the file.
        let resumed = run_loop(
            &spec,
            &mut drawing(9),
            &mut [&mut NoThrees],
            Some(back),
            &mut ok,
        )
        .unwrap();
        assert_eq!(resumed.records, unbroken.records);
        assert_eq!(resumed.stats, unbroken.stats);

        // Without the random state, the resumed loop would draw another
        // stream and end elsewhere: the test can tell.
        let mut no_random = saved.clone();
        no_random.random = vec![None, None];
        let drifted = run_loop(
            &spec,
            &mut drawing(9),
            &mut [&mut NoThrees],
            Some(no_random),
            &mut ok,
        )
        .unwrap();
        assert_ne!(drifted.stats, unbroken.stats);
    }

    #[test]
    fn a_saved_state_of_other_filters_is_refused() {
        let seeds = vec!["prompt 0".to_string()];
        let spec = spec("s", &seeds, &[], 5, 10);
        let mut saved = None;
        run_loop(&spec, &mut drawing(1), &mut [], None, &mut |st| {
            saved = Some(st.clone());
            Ok(())
        })
        .unwrap();
        let err = run_loop(&spec, &mut drawing(1), &mut [&mut NoThrees], saved, &mut ok)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-threes"), "{err}");
    }

    /// Emits a fixed list per round.
    struct Scripted {
        rounds: Vec<Vec<&'static str>>,
        seen_pools: Vec<Vec<String>>,
        wanted: Vec<u32>,
    }

    impl CandidateSource for Scripted {
        fn name(&self) -> &str {
            "scripted"
        }
        fn generate(&mut self, pool: &[String], wanted: u32, round: u32) -> Result<Vec<String>> {
            self.seen_pools.push(pool.to_vec());
            self.wanted.push(wanted);
            Ok(self
                .rounds
                .get(round as usize)
                .map(|r| r.iter().map(|s| s.to_string()).collect())
                .unwrap_or_default())
        }
    }

    /// Rejects candidates containing a word, and checks the pool it is given.
    struct Reject(&'static str, Vec<usize>);

    impl CandidateFilter for Reject {
        fn name(&self) -> &str {
            self.0
        }
        fn judge(&mut self, c: &[String], pool: &[String]) -> Result<Vec<(bool, Option<String>)>> {
            self.1.push(pool.len());
            Ok(c.iter()
                .map(|s| {
                    let bad = s.contains(self.0);
                    (!bad, bad.then(|| format!("contains {}", self.0)))
                })
                .collect())
        }
    }

    #[test]
    fn loop_filters_dedups_and_stops_at_count() {
        let mut gen = Scripted {
            rounds: vec![
                vec!["seed one", " a cat ", "", "a dog", "a cat", "bad apple"],
                vec!["ugly cow", "a bird", "bad egg", "a fish", "a frog"],
            ],
            seen_pools: vec![],
            wanted: vec![],
        };
        let mut bad = Reject("bad", vec![]);
        let mut ugly = Reject("ugly", vec![]);
        let seeds = vec!["seed one".to_string(), "seed two".to_string()];
        let mut progress = vec![];
        let out = run_loop(
            &spec("s", &seeds, &[], 4, 10),
            &mut gen,
            &mut [&mut bad, &mut ugly],
            None,
            &mut |st| {
                progress.push((st.records.len(), st.round));
                Ok(())
            },
        )
        .unwrap();
        let texts: Vec<&str> = out.records.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(texts, ["a cat", "a dog", "a bird", "a fish"]);
        let rounds: Vec<u32> = out.records.iter().map(|r| r.round).collect();
        assert_eq!(rounds, [0, 0, 1, 1]);
        assert!(out.complete);
        assert_eq!(progress, [(2, 1), (4, 2)]);
        let s = &out.stats;
        assert_eq!((s.rounds, s.candidates, s.accepted), (2, 11, 4));
        // "seed one" (pool), "" and the second "a cat".
        assert_eq!(s.blank_or_duplicate, 3);
        assert_eq!(s.filters[0].rejected, 2);
        assert_eq!(s.filters[0].last_reason.as_deref(), Some("contains bad"));
        assert_eq!(s.filters[1].rejected, 1);
        assert_eq!(s.surplus, 1); // "a frog"
                                  // Round 0: 4 wanted; then 2 remain at an acceptance rate of 2/6.
        assert_eq!(gen.wanted, [4, 6]);
        // Round 1 sees seeds + the 2 accepted in round 0.
        assert_eq!(gen.seen_pools[1].len(), 4);
        assert_eq!(bad.1, [2, 4]);
        assert_eq!(
            s.candidates,
            s.blank_or_duplicate + 3 + s.surplus + s.accepted
        );
    }

    #[test]
    fn excluded_prompts_are_never_accepted() {
        let mut gen = Scripted {
            rounds: vec![vec!["a cat", "a dog", "a cow"], vec!["a bird"]],
            seen_pools: vec![],
            wanted: vec![],
        };
        let exclude = vec!["a dog".to_string(), " a bird ".to_string()];
        let out = run_loop(
            &spec("s", &[], &exclude, 3, 2),
            &mut gen,
            &mut [],
            None,
            &mut ok,
        )
        .unwrap();
        let texts: Vec<&str> = out.records.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(texts, ["a cat", "a cow"]);
        assert_eq!(out.stats.blank_or_duplicate, 2);
        // Excluded prompts are not in the pool the generator sees.
        assert_eq!(gen.seen_pools[1], ["a cat", "a cow"]);
    }

    #[test]
    fn loop_reports_shortfall_after_max_rounds() {
        let mut gen = Scripted {
            rounds: vec![vec!["x"], vec!["x"], vec!["y"]],
            seen_pools: vec![],
            wanted: vec![],
        };
        let out = run_loop(&spec("s", &[], &[], 5, 2), &mut gen, &mut [], None, &mut ok).unwrap();
        assert!(!out.complete);
        assert_eq!(out.records.len(), 1);
        assert_eq!(out.stats.rounds, 2);
    }

    #[test]
    fn loop_stops_when_rounds_stop_adding_prompts() {
        let mut rounds = vec![vec!["a", "b"]];
        rounds.extend((0..30).map(|_| vec!["a"]));
        let mut gen = Scripted {
            rounds,
            seen_pools: vec![],
            wanted: vec![],
        };
        let out = run_loop(
            &spec("s", &[], &[], 5, 100),
            &mut gen,
            &mut [],
            None,
            &mut ok,
        )
        .unwrap();
        assert!(out.stats.stalled && !out.complete);
        assert_eq!(out.stats.rounds, 1 + STALL_ROUNDS);
        assert_eq!(out.records.len(), 2);
    }

    #[test]
    fn verdict_count_mismatch_is_an_error_naming_the_filter() {
        struct Short;
        impl CandidateFilter for Short {
            fn name(&self) -> &str {
                "short"
            }
            fn judge(&mut self, _: &[String], _: &[String]) -> Result<Vec<(bool, Option<String>)>> {
                Ok(vec![])
            }
        }
        let mut gen = Scripted {
            rounds: vec![vec!["x"]],
            seen_pools: vec![],
            wanted: vec![],
        };
        let err = run_loop(
            &spec("s", &[], &[], 1, 1),
            &mut gen,
            &mut [&mut Short],
            None,
            &mut ok,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("\"short\"") && err.contains("0 verdicts"),
            "{err}"
        );
    }

    #[test]
    fn wanted_hint_follows_the_acceptance_rate() {
        assert_eq!(wanted_hint(10, 0, 0), 10);
        assert_eq!(wanted_hint(10, 50, 100), 20);
        assert_eq!(wanted_hint(10, 1, 1000), 200); // 5% floor
        assert_eq!(wanted_hint(3, 0, 40), 60); // 20x cap
        assert_eq!(wanted_hint(1, 99, 100), 2);
        assert_eq!(wanted_hint(900, 1, 10), 1000); // absolute cap
        assert_eq!(wanted_hint(1500, 1, 10), 1500); // never below the remaining
    }

    #[test]
    fn jsonl_round_trip_and_no_temp_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/prompts.jsonl");
        let recs = vec![
            PromptRecord {
                text: "a \"quoted\" cat".into(),
                skill: "general".into(),
                generator: "template".into(),
                round: 0,
            },
            PromptRecord {
                text: "two dogs".into(),
                skill: "general".into(),
                generator: "template".into(),
                round: 3,
            },
        ];
        selma_io::write_jsonl(&path, &recs).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let back: Vec<PromptRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(back, recs);
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }
}
