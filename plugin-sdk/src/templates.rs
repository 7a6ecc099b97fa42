//! Template expansion for the offline prompt generator: patterns with
//! `{slot}` placeholders, filled from named value lists, enumerable (every
//! combination has an index) and sampleable with a seeded [`Rng`].

use crate::rng::{Rng, SplitMix64};
use crate::text::{capitalize_first, clean, word_count};
use crate::{SkillInfo, Slot, Templates};

#[derive(Clone, Debug, PartialEq)]
enum Piece {
    Text(String),
    Slot(usize),
}

/// Parsed, validated templates: every placeholder names a non-empty slot.
#[derive(Clone, Debug)]
pub struct TemplateSet {
    patterns: Vec<Vec<Piece>>,
    /// Number of distinct fillings of each pattern.
    counts: Vec<u128>,
    slots: Vec<Vec<String>>,
}

impl TemplateSet {
    /// Parse `templates`; errors name the pattern and the problem.
    pub fn new(templates: &Templates) -> Result<Self, String> {
        let names: Vec<&str> = templates.slots.iter().map(|s| s.name.as_str()).collect();
        for slot in &templates.slots {
            if slot.values.is_empty() {
                return Err(format!("template slot \"{}\" has no values", slot.name));
            }
        }
        if templates.patterns.is_empty() {
            return Err("templates have no patterns".to_string());
        }
        let mut patterns = Vec::with_capacity(templates.patterns.len());
        let mut counts = Vec::with_capacity(templates.patterns.len());
        for pattern in &templates.patterns {
            let pieces = parse_pattern(pattern, &names)?;
            let mut count: u128 = 1;
            for piece in &pieces {
                if let Piece::Slot(s) = piece {
                    count = count
                        .checked_mul(templates.slots[*s].values.len() as u128)
                        .ok_or_else(|| format!("template \"{pattern}\": too many combinations"))?;
                }
            }
            patterns.push(pieces);
            counts.push(count);
        }
        let slots = templates.slots.iter().map(|s| s.values.clone()).collect();
        Ok(Self {
            patterns,
            counts,
            slots,
        })
    }

    /// Number of patterns.
    pub fn pattern_count(&self) -> usize {
        self.patterns.len()
    }

    /// Number of fillings over all patterns (an upper bound on distinct
    /// prompts: two fillings can coincide as text).
    pub fn total(&self) -> u128 {
        self.counts.iter().fold(0u128, |a, &c| a.saturating_add(c))
    }

    /// The `index`-th filling in a fixed order (patterns in order, then the
    /// placeholders as mixed-radix digits, the last one fastest), or `None`
    /// past [`TemplateSet::total`].
    pub fn nth(&self, mut index: u128) -> Option<String> {
        for (pieces, &count) in self.patterns.iter().zip(&self.counts) {
            if index < count {
                // Decode digits from the last placeholder backwards.
                let mut choice = vec![0usize; pieces.len()];
                for (k, piece) in pieces.iter().enumerate().rev() {
                    if let Piece::Slot(s) = piece {
                        let n = self.slots[*s].len() as u128;
                        choice[k] = (index % n) as usize;
                        index /= n;
                    }
                }
                return Some(self.render(pieces, |k, _| choice[k]));
            }
            index -= count;
        }
        None
    }

    /// A random filling: a pattern uniformly, then each placeholder's value
    /// uniformly and independently.
    pub fn sample(&self, rng: &mut impl Rng) -> String {
        let p = rng.below(self.patterns.len() as u64) as usize;
        self.render(&self.patterns[p], |_, n| rng.below(n as u64) as usize)
    }

    fn render(&self, pieces: &[Piece], mut pick: impl FnMut(usize, usize) -> usize) -> String {
        let mut out = String::new();
        for (k, piece) in pieces.iter().enumerate() {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Slot(s) => {
                    let values = &self.slots[*s];
                    out.push_str(&values[pick(k, values.len())]);
                }
            }
        }
        capitalize_first(&clean(&out))
    }
}

/// Fill one pattern with explicit values (`{name}` -> value); errors on an
/// unknown placeholder or an unbalanced brace.
pub fn fill(pattern: &str, values: &[(&str, &str)]) -> Result<String, String> {
    let names: Vec<&str> = values.iter().map(|(n, _)| *n).collect();
    let pieces = parse_pattern(pattern, &names)?;
    Ok(pieces
        .iter()
        .map(|p| match p {
            Piece::Text(t) => t.as_str(),
            Piece::Slot(s) => values[*s].1,
        })
        .collect())
}

/// The placeholder names used in `pattern`, in order (with repeats).
pub fn placeholders(pattern: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    let mut rest = pattern;
    while let Some(open) = rest.find(['{', '}']) {
        if rest.as_bytes()[open] == b'}' {
            return Err(format!("template \"{pattern}\": '}}' without '{{'"));
        }
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("template \"{pattern}\": '{{' without '}}'"))?;
        let name = &after[..close];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(format!(
                "template \"{pattern}\": bad placeholder \"{{{name}}}\""
            ));
        }
        names.push(name.to_string());
        rest = &after[close + 1..];
    }
    Ok(names)
}

fn parse_pattern(pattern: &str, slot_names: &[&str]) -> Result<Vec<Piece>, String> {
    // Validate braces and names first, then split.
    placeholders(pattern)?;
    let mut pieces = Vec::new();
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            pieces.push(Piece::Text(rest[..open].to_string()));
        }
        let close = open + rest[open..].find('}').expect("checked by placeholders()");
        let name = &rest[open + 1..close];
        let slot = slot_names.iter().position(|n| *n == name).ok_or_else(|| {
            format!("template \"{pattern}\": placeholder {{{name}}} has no slot of that name")
        })?;
        pieces.push(Piece::Slot(slot));
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest.to_string()));
    }
    Ok(pieces)
}

/// A template slot from string slices.
pub fn slot(name: &str, values: &[&str]) -> Slot {
    Slot {
        name: name.to_string(),
        values: values.iter().map(|v| v.to_string()).collect(),
    }
}

/// Check a skill definition the way the host uses it: an id, at least three
/// seeds, every seed under `rules.max_words`, an instruction, and templates
/// (if any) that parse. Errors name the skill and the problem.
pub fn validate_skill(info: &SkillInfo) -> Result<(), String> {
    let id = &info.id;
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(format!(
            "skill \"{id}\": the id must be lowercase letters, digits and dashes"
        ));
    }
    if info.seeds.len() < 3 {
        return Err(format!(
            "skill \"{id}\": {} seeds, at least 3 needed",
            info.seeds.len()
        ));
    }
    if info.rules.max_words == 0 {
        return Err(format!("skill \"{id}\": rules.max-words must be > 0"));
    }
    for seed in &info.seeds {
        let n = word_count(seed);
        if n >= info.rules.max_words as usize {
            return Err(format!(
                "skill \"{id}\": seed \"{seed}\" has {n} words, the limit is fewer than {}",
                info.rules.max_words
            ));
        }
    }
    if info.rules.instruction.trim().is_empty() {
        return Err(format!("skill \"{id}\": rules.instruction is empty"));
    }
    if let Some(t) = &info.templates {
        TemplateSet::new(t).map_err(|e| format!("skill \"{id}\": {e}"))?;
    }
    Ok(())
}

/// Up to `limit` distinct prompts from `info`'s templates that respect its
/// word limit, drawn with a [`SplitMix64`] seeded by `seed` (at most
/// `20 * limit` draws), in draw order. Empty without templates.
pub fn distinct_prompts(info: &SkillInfo, limit: usize, seed: u64) -> Result<Vec<String>, String> {
    let Some(t) = &info.templates else {
        return Ok(Vec::new());
    };
    let set = TemplateSet::new(t)?;
    let mut rng = SplitMix64::new(seed);
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for _ in 0..limit.saturating_mul(20) {
        if out.len() >= limit {
            break;
        }
        let p = set.sample(&mut rng);
        if word_count(&p) < info.rules.max_words as usize && seen.insert(p.to_lowercase()) {
            out.push(p);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rules;
    use std::collections::BTreeSet;

    fn small() -> Templates {
        Templates {
            patterns: vec![
                "a {color} {animal} on a {place}".into(),
                "{animal} and {animal}".into(),
            ],
            slots: vec![
                slot("color", &["red", "blue"]),
                slot("animal", &["cat", "dog", "owl"]),
                slot("place", &["sofa", "roof"]),
            ],
        }
    }

    #[test]
    fn total_counts_every_placeholder() {
        let t = TemplateSet::new(&small()).unwrap();
        // 2*3*2 = 12 for the first pattern, 3*3 = 9 for the second.
        assert_eq!(t.total(), 21);
        assert_eq!(t.pattern_count(), 2);
    }

    #[test]
    fn nth_enumerates_every_filling_once() {
        let t = TemplateSet::new(&small()).unwrap();
        assert_eq!(t.nth(0).unwrap(), "A red cat on a sofa");
        assert_eq!(t.nth(1).unwrap(), "A red cat on a roof");
        assert_eq!(t.nth(2).unwrap(), "A red dog on a sofa");
        assert_eq!(t.nth(11).unwrap(), "A blue owl on a roof");
        assert_eq!(t.nth(12).unwrap(), "Cat and cat");
        assert_eq!(t.nth(20).unwrap(), "Owl and owl");
        assert_eq!(t.nth(21), None);
        let all: BTreeSet<String> = (0..21).map(|i| t.nth(i).unwrap()).collect();
        assert_eq!(all.len(), 21);
    }

    #[test]
    fn sample_is_seeded_and_reaches_all_fillings() {
        let t = TemplateSet::new(&small()).unwrap();
        let draw = |seed| {
            let mut r = SplitMix64::new(seed);
            (0..5).map(|_| t.sample(&mut r)).collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        let all: BTreeSet<String> = (0..21).map(|i| t.nth(i).unwrap()).collect();
        let mut r = SplitMix64::new(11);
        let seen: BTreeSet<String> = (0..2000).map(|_| t.sample(&mut r)).collect();
        assert_eq!(seen, all);
    }

    #[test]
    fn errors_name_the_problem() {
        let mut bad = small();
        bad.patterns.push("a {colour} car".into());
        let e = TemplateSet::new(&bad).unwrap_err();
        assert!(e.contains("{colour}"), "{e}");
        let mut bad = small();
        bad.slots[0].values.clear();
        assert!(TemplateSet::new(&bad).unwrap_err().contains("\"color\""));
        assert!(placeholders("a {b").unwrap_err().contains("without"));
        assert!(placeholders("a b}").unwrap_err().contains("without"));
        assert!(placeholders("a {} b")
            .unwrap_err()
            .contains("bad placeholder"));
    }

    #[test]
    fn fill_and_placeholders() {
        assert_eq!(
            fill(
                "{n} {thing}s on a {thing}",
                &[("n", "two"), ("thing", "box")]
            )
            .unwrap(),
            "two boxs on a box"
        );
        assert_eq!(placeholders("{a} x {b} {a}").unwrap(), ["a", "b", "a"]);
        assert!(fill("{x}", &[]).is_err());
    }

    fn skill(max_words: u32) -> SkillInfo {
        SkillInfo {
            id: "toy".into(),
            description: "d".into(),
            seeds: vec!["one two".into(), "three four five".into(), "six".into()],
            rules: Rules {
                max_words,
                constraints: vec![],
                instruction: "write".into(),
            },
            templates: Some(small()),
        }
    }

    #[test]
    fn validate_skill_reports_each_problem() {
        assert_eq!(validate_skill(&skill(30)), Ok(()));
        let e = validate_skill(&skill(3)).unwrap_err();
        assert!(
            e.contains("three four five") && e.contains("3 words"),
            "{e}"
        );
        let mut s = skill(30);
        s.seeds.pop();
        assert!(validate_skill(&s).unwrap_err().contains("2 seeds"));
        let mut s = skill(30);
        s.id = "Bad Id".into();
        assert!(validate_skill(&s).unwrap_err().contains("lowercase"));
        let mut s = skill(30);
        s.templates.as_mut().unwrap().patterns.push("{nope}".into());
        assert!(validate_skill(&s).unwrap_err().contains("{nope}"));
    }

    #[test]
    fn distinct_prompts_respect_the_word_limit() {
        // All 21 fillings have 3 ("Cat and owl") or 6 words.
        let all = distinct_prompts(&skill(30), 100, 1).unwrap();
        assert_eq!(all.len(), 21);
        let short = distinct_prompts(&skill(4), 100, 1).unwrap();
        assert_eq!(short.len(), 9);
        assert!(short.iter().all(|p| word_count(p) == 3));
        assert_eq!(distinct_prompts(&skill(30), 5, 1).unwrap().len(), 5);
    }
}
