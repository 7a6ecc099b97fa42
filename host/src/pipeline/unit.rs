//! The units of work of a run, typed: what each one is called on disk and
//! in `selma status` (`prompts:general`, `expert:counting/unfiltered@seed2`,
//! `scores:merged:ties:spatial`, ...), parsed back from those names, and the
//! stage each belongs to. Every unit name in the pipeline is written here,
//! once; manifests are stored under these names.

use super::config::Stage;
use super::plan::Replica;
use anyhow::{bail, Context, Result};
use std::fmt;
use std::str::FromStr;

/// What a replica adds to a unit's name: `/unfiltered`, then `@seed<N>`
/// (the seed only when `[run] seeds` is set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Tag {
    /// Trained on every image, not only the kept ones.
    pub unfiltered: bool,
    /// The replica's seed, when seeds are configured.
    pub seed: Option<u64>,
}

impl Tag {
    /// The tag of a replica.
    pub fn of(r: &Replica) -> Self {
        Self {
            unfiltered: r.unfiltered,
            seed: r.tagged.then_some(r.seed),
        }
    }
    /// The same seed, without the data setting (the base model has none).
    pub fn seed_only(self) -> Self {
        Self {
            unfiltered: false,
            seed: self.seed,
        }
    }
    /// Splits a trailing `/unfiltered` and `@seed<N>` off `s`.
    fn split(s: &str) -> Result<(&str, Self)> {
        let (rest, seed) = match s.rsplit_once("@seed") {
            Some((r, n)) => (
                r,
                Some(
                    n.parse::<u64>()
                        .with_context(|| format!("{s:?}: bad @seed suffix"))?,
                ),
            ),
            None => (s, None),
        };
        let (rest, unfiltered) = match rest.strip_suffix("/unfiltered") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        Ok((rest, Self { unfiltered, seed }))
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unfiltered {
            f.write_str("/unfiltered")?;
        }
        if let Some(s) = self.seed {
            write!(f, "@seed{s}")?;
        }
        Ok(())
    }
}

/// A model variant under evaluation (its display name is its `Display`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VariantId {
    /// The student without adapters (`base[@seedN]`).
    Base(Tag),
    /// A skill's expert (`expert:<skill>...`).
    Expert(String, Tag),
    /// The joint adapter (`joint...`).
    Joint(Tag),
    /// A merge (`merged:<name>...`).
    Merged(String, Tag),
}

impl VariantId {
    /// The train or merge unit whose LoRA this variant applies (None: base).
    pub fn unit(&self) -> Option<Unit> {
        match self {
            Self::Base(_) => None,
            Self::Expert(s, t) => Some(Unit::Expert(s.clone(), *t)),
            Self::Joint(t) => Some(Unit::Joint(*t)),
            Self::Merged(n, t) => Some(Unit::Merged(n.clone(), *t)),
        }
    }
    /// The seed-aggregated name (without `@seed<N>`).
    pub fn group(&self) -> String {
        let mut v = self.clone();
        match &mut v {
            Self::Base(t) | Self::Expert(_, t) | Self::Joint(t) | Self::Merged(_, t) => {
                t.seed = None
            }
        }
        v.to_string()
    }
}

impl fmt::Display for VariantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Base(t) => write!(f, "base{t}"),
            Self::Expert(s, t) => write!(f, "expert:{s}{t}"),
            Self::Joint(t) => write!(f, "joint{t}"),
            Self::Merged(n, t) => write!(f, "merged:{n}{t}"),
        }
    }
}

impl FromStr for VariantId {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (head, tag) = Tag::split(s)?;
        Ok(match head.split_once(':') {
            None if head == "base" && !tag.unfiltered => Self::Base(tag),
            None if head == "joint" => Self::Joint(tag),
            Some(("expert", skill)) if !skill.is_empty() => Self::Expert(skill.into(), tag),
            Some(("merged", name)) if !name.is_empty() => Self::Merged(name.into(), tag),
            _ => bail!("{s:?} is not a variant name (base, expert:SKILL, joint, merged:NAME)"),
        })
    }
}

/// One unit of work: done when its manifest holds the input hash of this run.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unit {
    /// A skill's training prompts (`prompts:<skill>`).
    Prompts(String),
    /// A skill's teacher images (`images:<skill>`).
    Images(String),
    /// The image filters' verdicts on a skill's images (`filter:<skill>`).
    Filter(String),
    /// A skill's LoRA expert (`expert:<skill>[/unfiltered][@seedN]`).
    Expert(String, Tag),
    /// The joint adapter on every skill's data (`joint...`).
    Joint(Tag),
    /// A merge of the experts (`merged:<name>...`).
    Merged(String, Tag),
    /// A skill's held-out prompts (`eval-prompts:<skill>`).
    EvalPrompts(String),
    /// One variant's images and scores on one skill (`scores:<variant>:<skill>`).
    Scores(VariantId, String),
    /// `results.json`.
    Results,
    /// `report.html`.
    Report,
}

impl Unit {
    /// The stage whose manifests folder holds this unit.
    pub fn stage(&self) -> Stage {
        match self {
            Self::Prompts(_) => Stage::Prompts,
            Self::Images(_) | Self::Filter(_) => Stage::Images,
            Self::Expert(..) | Self::Joint(_) => Stage::Train,
            Self::Merged(..) => Stage::Merge,
            Self::EvalPrompts(_) | Self::Scores(..) | Self::Results => Stage::Eval,
            Self::Report => Stage::Report,
        }
    }
    /// The train unit of an adapter name (`joint` or a skill id).
    pub fn adapter(name: &str, tag: Tag) -> Self {
        if name == "joint" {
            Self::Joint(tag)
        } else {
            Self::Expert(name.into(), tag)
        }
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Prompts(s) => write!(f, "prompts:{s}"),
            Self::Images(s) => write!(f, "images:{s}"),
            Self::Filter(s) => write!(f, "filter:{s}"),
            Self::Expert(s, t) => write!(f, "expert:{s}{t}"),
            Self::Joint(t) => write!(f, "joint{t}"),
            Self::Merged(n, t) => write!(f, "merged:{n}{t}"),
            Self::EvalPrompts(s) => write!(f, "eval-prompts:{s}"),
            Self::Scores(v, s) => write!(f, "scores:{v}:{s}"),
            Self::Results => f.write_str("results"),
            Self::Report => f.write_str("report"),
        }
    }
}

impl FromStr for Unit {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || anyhow::anyhow!("{s:?} is not a unit name");
        let skill = |rest: &str| -> Result<String> {
            if rest.is_empty() || rest.contains(':') {
                return Err(bad());
            }
            Ok(rest.to_string())
        };
        if s == "results" {
            return Ok(Self::Results);
        }
        if s == "report" {
            return Ok(Self::Report);
        }
        if let Some(rest) = s.strip_prefix("scores:") {
            let (v, sk) = rest.rsplit_once(':').ok_or_else(bad)?;
            return Ok(Self::Scores(v.parse()?, skill(sk)?));
        }
        if s.starts_with("joint") || s.starts_with("expert:") || s.starts_with("merged:") {
            return Ok(match s.parse::<VariantId>()? {
                VariantId::Expert(n, t) => Self::Expert(n, t),
                VariantId::Joint(t) => Self::Joint(t),
                VariantId::Merged(n, t) => Self::Merged(n, t),
                VariantId::Base(_) => return Err(bad()),
            });
        }
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        Ok(match kind {
            "prompts" => Self::Prompts(skill(rest)?),
            "images" => Self::Images(skill(rest)?),
            "filter" => Self::Filter(skill(rest)?),
            "eval-prompts" => Self::EvalPrompts(skill(rest)?),
            _ => return Err(bad()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags() -> Vec<Tag> {
        let mut v = vec![];
        for unfiltered in [false, true] {
            for seed in [None, Some(0), Some(12)] {
                v.push(Tag { unfiltered, seed });
            }
        }
        v
    }

    /// The names as manifests of earlier runs spell them.
    #[test]
    fn names_match_the_run_directory_spelling() {
        let t = Tag {
            unfiltered: true,
            seed: Some(2),
        };
        let cases = [
            (Unit::Prompts("general".into()), "prompts:general"),
            (Unit::Images("general".into()), "images:general"),
            (Unit::Filter("general".into()), "filter:general"),
            (
                Unit::Expert("counting".into(), t),
                "expert:counting/unfiltered@seed2",
            ),
            (
                Unit::Expert("counting".into(), Tag::default()),
                "expert:counting",
            ),
            (Unit::Joint(t), "joint/unfiltered@seed2"),
            (Unit::Joint(Tag::default()), "joint"),
            (
                Unit::Merged("ties".into(), t.seed_only()),
                "merged:ties@seed2",
            ),
            (Unit::EvalPrompts("spatial".into()), "eval-prompts:spatial"),
            (
                Unit::Scores(VariantId::Merged("linear".into(), t), "single".into()),
                "scores:merged:linear/unfiltered@seed2:single",
            ),
            (
                Unit::Scores(VariantId::Base(Tag::default()), "single".into()),
                "scores:base:single",
            ),
            (Unit::Results, "results"),
            (Unit::Report, "report"),
        ];
        for (u, name) in cases {
            assert_eq!(u.to_string(), name);
            assert_eq!(name.parse::<Unit>().unwrap(), u, "{name}");
        }
    }

    /// Display then FromStr is the identity for every shape of unit.
    #[test]
    fn every_unit_round_trips() {
        let mut units = vec![Unit::Results, Unit::Report];
        for s in ["a", "b-c", "x_1"] {
            units.push(Unit::Prompts(s.into()));
            units.push(Unit::Images(s.into()));
            units.push(Unit::Filter(s.into()));
            units.push(Unit::EvalPrompts(s.into()));
            for t in tags() {
                units.push(Unit::Expert(s.into(), t));
                units.push(Unit::Joint(t));
                units.push(Unit::Merged(format!("m.{s}"), t));
                for v in [
                    VariantId::Base(t.seed_only()),
                    VariantId::Expert(s.into(), t),
                    VariantId::Joint(t),
                    VariantId::Merged("ties".into(), t),
                ] {
                    units.push(Unit::Scores(v, s.into()));
                }
            }
        }
        for u in units {
            let name = u.to_string();
            assert_eq!(name.parse::<Unit>().unwrap(), u, "{name}");
        }
    }

    #[test]
    fn bad_names_are_errors() {
        for s in [
            "",
            "prompts:",
            "prompts",
            "bogus:x",
            "expert:",
            "scores:base",
            "scores:nope:x",
            "base",
            "joint@seedx",
            "images:a:b",
        ] {
            assert!(s.parse::<Unit>().is_err(), "{s:?} parsed");
        }
    }

    #[test]
    fn stages_and_variant_groups() {
        assert_eq!(Unit::Filter("a".into()).stage(), Stage::Images);
        assert_eq!(Unit::Joint(Tag::default()).stage(), Stage::Train);
        assert_eq!(Unit::Results.stage(), Stage::Eval);
        let v = VariantId::Expert(
            "a".into(),
            Tag {
                unfiltered: true,
                seed: Some(3),
            },
        );
        assert_eq!(v.group(), "expert:a/unfiltered");
        assert_eq!(v.unit().unwrap().to_string(), "expert:a/unfiltered@seed3");
        assert_eq!(VariantId::Base(Tag::default()).unit(), None);
    }
}
