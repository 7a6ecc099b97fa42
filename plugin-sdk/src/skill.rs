//! [`StaticSkill`]: a skill written as Rust constants, turned into the WIT
//! [`SkillInfo`] and [`Metadata`] a skill plugin returns.

use crate::templates::{slot, TemplateSet};
use crate::{Metadata, PluginKind, Rules, SkillInfo, Templates};

/// A skill definition in constants (see the bundled skill plugins).
#[derive(Clone, Copy, Debug)]
pub struct StaticSkill {
    /// Skill id, e.g. `counting` (also the plugin name).
    pub id: &'static str,
    /// One line: what the skill teaches.
    pub description: &'static str,
    /// Hand-written seed prompts (>= 3).
    pub seeds: &'static [&'static str],
    /// Prompts must have fewer words than this.
    pub max_words: u32,
    /// Extra rules in plain words.
    pub constraints: &'static [&'static str],
    /// The task instruction put before the examples in an LLM prompt.
    pub instruction: &'static str,
    /// Template patterns with `{slot}` placeholders (may be empty).
    pub patterns: &'static [&'static str],
    /// Slot name -> values.
    pub slots: &'static [(&'static str, &'static [&'static str])],
}

impl StaticSkill {
    /// The WIT record (templates omitted when there are no patterns).
    pub fn info(&self) -> SkillInfo {
        let templates = (!self.patterns.is_empty()).then(|| Templates {
            patterns: self.patterns.iter().map(|p| p.to_string()).collect(),
            slots: self.slots.iter().map(|(n, v)| slot(n, v)).collect(),
        });
        SkillInfo {
            id: self.id.to_string(),
            description: self.description.to_string(),
            seeds: self.seeds.iter().map(|s| s.to_string()).collect(),
            rules: Rules {
                max_words: self.max_words,
                constraints: self.constraints.iter().map(|c| c.to_string()).collect(),
                instruction: self.instruction.to_string(),
            },
            templates,
        }
    }

    /// Metadata for the skill plugin; `help` lists the rules and, given the
    /// final `info` (which may add computed slots), the template space.
    pub fn metadata(&self, version: &str, info: &SkillInfo) -> Metadata {
        let mut help = format!(
            "Teaches: {}\nRules: fewer than {} words. {}\nSeeds: {}.",
            self.description,
            self.max_words,
            self.constraints.join(" "),
            info.seeds.len()
        );
        if let Some(set) = info
            .templates
            .as_ref()
            .and_then(|t| TemplateSet::new(t).ok())
        {
            help.push_str(&format!(
                " Templates: {} patterns, {} fillings.",
                set.pattern_count(),
                set.total()
            ));
        }
        Metadata {
            name: self.id.to_string(),
            version: version.to_string(),
            kind: PluginKind::Skill,
            description: self.description.to_string(),
            help,
            params: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::validate_skill;

    const TOY: StaticSkill = StaticSkill {
        id: "toy",
        description: "toy scenes",
        seeds: &["a cat", "a dog", "an owl"],
        max_words: 10,
        constraints: &["Be brief."],
        instruction: "Write scenes.",
        patterns: &["a {c} {a}"],
        slots: &[("c", &["red", "blue"]), ("a", &["cat", "dog", "owl"])],
    };

    #[test]
    fn info_and_metadata_carry_every_field() {
        let info = TOY.info();
        assert_eq!(validate_skill(&info), Ok(()));
        assert_eq!(info.seeds.len(), 3);
        assert_eq!(info.rules.max_words, 10);
        assert_eq!(
            info.templates.as_ref().unwrap().slots[1].values,
            ["cat", "dog", "owl"]
        );
        let m = TOY.metadata("1.2.3", &info);
        assert_eq!(m.name, "toy");
        assert_eq!(m.kind, PluginKind::Skill);
        assert!(
            m.help.contains("fewer than 10 words") && m.help.contains("6 fillings"),
            "{}",
            m.help
        );
        let bare = StaticSkill {
            patterns: &[],
            ..TOY
        };
        assert!(bare.info().templates.is_none());
    }
}
