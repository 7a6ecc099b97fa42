//! World v2's pretraining captions: alt-text style descriptions that leave
//! out part of what a scene holds, at stated rates, the way web alt-text
//! describes photos. A model pretrained on them learns to draw every scene
//! but follows detailed prompts (every object, count, colour and relation
//! stated, the grammar of [`crate::caption`]) unreliably: the weakness
//! SELMA's skill-specific fine-tuning is meant to fix.
//!
//! A description mentions groups of identical objects ("three red
//! circles", "circles", "a square"); its meaning is an existence claim
//! (see [`AltText::holds`]), so it is true of its scene however much it
//! leaves out. The words are the grammar's 21, so the tokenizer is v1's.

use crate::caption::{Relation, NUMBER_WORDS};
use crate::scene::{Color, Object, Scene, Shape};
use anyhow::{ensure, Result};
use selma_rng::{Rng, SplitMix64};
use serde::{Deserialize, Serialize};

/// How often an alt-text caption states each part of its scene.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AltTextRates {
    /// A scene of several kinds of object mentions every kind with this
    /// probability; otherwise it mentions one kind, chosen uniformly.
    pub mention_all: f64,
    /// A mention states its colour ("a red circle", not "a circle").
    pub color: f64,
    /// A mention states its number word ("three circles", "one circle";
    /// otherwise "circles", "a circle").
    pub number: f64,
    /// A caption that mentions two single objects states a relation that
    /// holds between them ("a red circle left of a square"), when one does.
    pub relation: f64,
}

impl Default for AltTextRates {
    /// World v2's rates.
    fn default() -> Self {
        Self {
            mention_all: 0.5,
            color: 0.6,
            number: 0.35,
            relation: 0.15,
        }
    }
}

impl AltTextRates {
    /// Every rate must be a probability; the error names the rate.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("mention_all", self.mention_all),
            ("color", self.color),
            ("number", self.number),
            ("relation", self.relation),
        ] {
            ensure!(
                (0.0..=1.0).contains(&v),
                "alt-text rate {name} must be in [0, 1], got {v}"
            );
        }
        Ok(())
    }
}

/// One mentioned group: `n` objects of one shape (and colour) in the scene.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mention {
    /// The shape (always said).
    pub shape: Shape,
    /// The colour, when said.
    pub color: Option<Color>,
    /// How many objects of this kind the scene holds.
    pub n: u8,
    /// Is the number word said?
    pub number_said: bool,
}

impl Mention {
    /// The words of the mention: "[number|a] [colour] shape(s)".
    pub fn text(&self) -> String {
        let mut words: Vec<&str> = Vec::with_capacity(3);
        if self.number_said {
            words.push(NUMBER_WORDS[(self.n as usize).clamp(1, 4) - 1]);
        } else if self.n == 1 {
            words.push("a");
        }
        if let Some(c) = self.color {
            words.push(c.word());
        }
        words.push(if self.n == 1 {
            self.shape.word()
        } else {
            self.shape.plural()
        });
        words.join(" ")
    }

    /// Does `o` fit the mention's stated attributes?
    fn fits(&self, o: &Object) -> bool {
        o.shape == self.shape && self.color.is_none_or(|c| o.color == c)
    }

    /// Is the mention true of `scene`: exactly `n` fitting objects when the
    /// number is said, otherwise at least one ("a circle") or at least two
    /// ("circles")?
    pub fn holds(&self, scene: &Scene) -> bool {
        let k = scene.objects.iter().filter(|o| self.fits(o)).count();
        if self.number_said {
            k == self.n as usize
        } else {
            k >= (self.n as usize).min(2)
        }
    }
}

/// An alt-text caption: mentions joined by "and", or two single-object
/// mentions joined by a relation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AltText {
    /// The mentioned groups, in caption order.
    pub mentions: Vec<Mention>,
    /// The relation of the first mention to the second, when stated.
    pub relation: Option<Relation>,
}

impl AltText {
    /// The caption text.
    pub fn text(&self) -> String {
        let parts: Vec<String> = self.mentions.iter().map(Mention::text).collect();
        match self.relation {
            Some(rel) if parts.len() == 2 => format!("{} {} {}", parts[0], rel.words(), parts[1]),
            _ => parts.join(" and "),
        }
    }

    /// Is the caption true of `scene`: every mention holds and, with a
    /// relation, some object fitting the first mention stands in it to some
    /// object fitting the second?
    pub fn holds(&self, scene: &Scene) -> bool {
        if !self.mentions.iter().all(|m| m.holds(scene)) {
            return false;
        }
        match (self.relation, self.mentions.as_slice()) {
            (None, _) => true,
            (Some(rel), [a, b]) => scene.objects.iter().any(|x| {
                a.fits(x)
                    && scene
                        .objects
                        .iter()
                        .any(|y| !std::ptr::eq(x, y) && b.fits(y) && rel.holds(x, y))
            }),
            (Some(_), _) => false,
        }
    }
}

/// The groups of identical objects of `scene` (colour, shape, count), in
/// the order of their first object.
fn groups(scene: &Scene) -> Vec<(Color, Shape, u8, usize)> {
    let mut out: Vec<(Color, Shape, u8, usize)> = Vec::new();
    for (i, o) in scene.objects.iter().enumerate() {
        match out
            .iter_mut()
            .find(|(c, s, _, _)| *c == o.color && *s == o.shape)
        {
            Some(g) => g.2 += 1,
            None => out.push((o.color, o.shape, 1, i)),
        }
    }
    out
}

/// Describe `scene` in alt-text style at `rates`. The draws, in order:
/// which kinds are mentioned, their order (a uniform shuffle), per mention
/// colour then number, then the relation.
pub fn describe(scene: &Scene, rates: &AltTextRates, rng: &mut SplitMix64) -> AltText {
    let all = groups(scene);
    let mut chosen = if all.len() > 1 && rng.next_f64() >= rates.mention_all {
        vec![all[rng.below(all.len() as u64) as usize]]
    } else {
        all
    };
    selma_rng::shuffle(&mut chosen, rng);
    // A mention without its colour is about every object of its shape (and
    // counts them all); a second colourless mention of the same shape says
    // nothing new and is dropped.
    let mut mentions: Vec<Mention> = Vec::with_capacity(chosen.len());
    let mut objects: Vec<usize> = Vec::with_capacity(chosen.len());
    for &(color, shape, n, first) in &chosen {
        let color = (rng.next_f64() < rates.color).then_some(color);
        let number_said = rng.next_f64() < rates.number;
        let n = match color {
            Some(_) => n,
            None => scene.objects.iter().filter(|o| o.shape == shape).count() as u8,
        };
        let m = Mention {
            shape,
            color,
            n,
            number_said,
        };
        if color.is_none()
            && mentions
                .iter()
                .any(|x| x.color.is_none() && x.shape == shape)
        {
            continue;
        }
        mentions.push(m);
        objects.push(first);
    }
    let mut relation = None;
    if let ([a, b], [ma, mb]) = (objects.as_slice(), mentions.as_slice()) {
        if ma.n == 1 && mb.n == 1 && rng.next_f64() < rates.relation {
            let (a, b) = (&scene.objects[*a], &scene.objects[*b]);
            let holding: Vec<Relation> = Relation::ALL
                .into_iter()
                .filter(|r| r.holds(a, b))
                .collect();
            if !holding.is_empty() {
                relation = Some(rng.pick(&holding));
            }
        }
    }
    AltText { mentions, relation }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caption::{Form, VOCABULARY};
    use crate::sample::sample;

    fn m(shape: Shape, color: Option<Color>, n: u8, number_said: bool) -> Mention {
        Mention {
            shape,
            color,
            n,
            number_said,
        }
    }

    #[test]
    fn text_says_what_is_stated() {
        use Color::*;
        use Shape::*;
        assert_eq!(m(Circle, Some(Red), 3, true).text(), "three red circles");
        assert_eq!(m(Circle, None, 3, false).text(), "circles");
        assert_eq!(m(Square, None, 1, false).text(), "a square");
        assert_eq!(m(Square, Some(Blue), 1, true).text(), "one blue square");
        let t = AltText {
            mentions: vec![
                m(Triangle, Some(Green), 1, false),
                m(Square, None, 1, false),
            ],
            relation: Some(Relation::LeftOf),
        };
        assert_eq!(t.text(), "a green triangle left of a square");
        let t = AltText {
            relation: None,
            ..t
        };
        assert_eq!(t.text(), "a green triangle and a square");
    }

    #[test]
    fn meaning_is_checked_against_the_scene_model() {
        use Color::*;
        use Shape::*;
        let at = |shape, color, x, y| Object {
            shape,
            color,
            x,
            y,
            size: 8,
        };
        // Three red circles in a row and a blue square below the first.
        let scene = Scene {
            objects: vec![
                at(Circle, Red, 1, 1),
                at(Circle, Red, 11, 1),
                at(Circle, Red, 21, 1),
                at(Square, Blue, 1, 20),
            ],
        };
        assert!(scene.valid());
        let says = |mentions: Vec<Mention>, relation| AltText { mentions, relation }.holds(&scene);
        assert!(says(vec![m(Circle, None, 3, false)], None));
        assert!(says(vec![m(Circle, Some(Red), 3, true)], None));
        assert!(says(vec![m(Square, None, 1, false)], None));
        assert!(says(vec![m(Square, Some(Blue), 1, true)], None));
        assert!(!says(vec![m(Circle, None, 2, true)], None));
        assert!(!says(vec![m(Circle, Some(Blue), 1, false)], None));
        assert!(!says(vec![m(Triangle, None, 1, false)], None));
        assert!(!says(vec![m(Square, None, 2, false)], None));
        let (sq, ci) = (m(Square, None, 1, false), m(Circle, Some(Red), 1, false));
        assert!(says(vec![sq, ci], Some(Relation::Below)));
        assert!(says(vec![ci, sq], Some(Relation::Above)));
        assert!(
            says(vec![ci, sq], Some(Relation::RightOf)),
            "the first circle is not, the second is"
        );
        assert!(says(vec![sq, ci], Some(Relation::LeftOf)));
        assert!(!says(vec![ci, sq], Some(Relation::LeftOf)));
        assert!(!says(vec![sq, ci], Some(Relation::Above)));
        assert!(!says(vec![sq, ci], Some(Relation::RightOf)));
    }

    #[test]
    fn every_description_is_true_and_uses_the_grammar_words() {
        let mut r = SplitMix64::new(21);
        let rates = AltTextRates::default();
        for i in 0..6000 {
            let form = [Form::Single, Form::Count, Form::Binding, Form::Spatial][i % 4];
            let (scene, _) = sample(form, 1.0, &mut r);
            let alt = describe(&scene, &rates, &mut r);
            let text = alt.text();
            assert!(alt.holds(&scene), "{text} / {scene:?}");
            assert!(text.split(' ').all(|w| VOCABULARY.contains(&w)), "{text}");
            assert!(text.split(' ').count() <= 8, "{text}");
            assert!(!alt.mentions.is_empty());
        }
    }

    /// Is `share` of `n` draws within 4 standard errors of `p`?
    fn near(share_of: (usize, usize), p: f64) -> bool {
        let (k, n) = share_of;
        let share = k as f64 / n as f64;
        (share - p).abs() <= 4.0 * (p * (1.0 - p) / n as f64).sqrt() + 1e-12
    }

    #[test]
    fn v2_captions_follow_their_stated_rates() {
        use crate::dataset::dataset_entry;
        use crate::sample::{SampleOptions, World};
        let v2 = SampleOptions::world(World::V2);
        let v1 = SampleOptions::world(World::V1);
        let rates = v2.alt_text.unwrap();
        let (mut multi, mut all_said) = (0, 0);
        let (mut mentions, mut colors, mut numbers) = (0, 0, 0);
        let (mut eligible, mut related) = (0, 0);
        let n = 4000;
        for i in 0..n {
            let (scene, caption, alt) = dataset_entry(9, i, &v2);
            let alt = alt.expect("v2 captions are alt-text");
            // The scene is v1's scene of the same seed and index, and the
            // detailed caption is true of it.
            assert_eq!(scene, dataset_entry(9, i, &v1).0, "scene {i}");
            assert!(caption.holds(&scene), "{caption} / {scene:?}");
            assert!(alt.holds(&scene), "{} / {scene:?}", alt.text());
            // Rates are read where no mention is merged away: scenes whose
            // kinds have distinct shapes.
            let g = groups(&scene);
            let kinds = g.len();
            let distinct = g
                .iter()
                .all(|a| g.iter().filter(|b| b.1 == a.1).count() == 1);
            if !distinct {
                continue;
            }
            if kinds > 1 {
                multi += 1;
                all_said += usize::from(alt.mentions.len() == kinds);
            }
            for m in &alt.mentions {
                mentions += 1;
                colors += usize::from(m.color.is_some());
                numbers += usize::from(m.number_said);
            }
            let o = &scene.objects;
            if o.len() == 2
                && alt.mentions.len() == 2
                && Relation::ALL.into_iter().any(|r| r.holds(&o[0], &o[1]))
            {
                eligible += 1;
                related += usize::from(alt.relation.is_some());
            }
            if alt.relation.is_some() {
                assert_eq!(alt.mentions.len(), 2);
            }
        }
        assert!(multi > 1000 && mentions > 4000 && eligible > 500);
        assert!(
            near((all_said, multi), rates.mention_all),
            "{all_said}/{multi}"
        );
        assert!(near((colors, mentions), rates.color), "{colors}/{mentions}");
        assert!(
            near((numbers, mentions), rates.number),
            "{numbers}/{mentions}"
        );
        assert!(
            near((related, eligible), rates.relation),
            "{related}/{eligible}"
        );
        // And at the extremes the rates are obeyed exactly.
        let full = SampleOptions {
            alt_text: Some(AltTextRates {
                mention_all: 1.0,
                color: 1.0,
                number: 1.0,
                relation: 0.0,
            }),
            ..v2.clone()
        };
        let bare = SampleOptions {
            alt_text: Some(AltTextRates {
                mention_all: 0.0,
                color: 0.0,
                number: 0.0,
                relation: 1.0,
            }),
            ..v2
        };
        for i in 0..500 {
            let (scene, _, alt) = dataset_entry(4, i, &full);
            let alt = alt.unwrap();
            assert_eq!(alt.mentions.len(), groups(&scene).len());
            assert!(alt.holds(&scene));
            assert!(alt
                .mentions
                .iter()
                .all(|m| m.color.is_some() && m.number_said));
            let alt = dataset_entry(4, i, &bare).2.unwrap();
            assert_eq!(alt.mentions.len(), 1);
            assert!(alt
                .mentions
                .iter()
                .all(|m| m.color.is_none() && !m.number_said));
        }
    }

    #[test]
    fn rates_outside_zero_one_are_errors_naming_the_rate() {
        let bad = AltTextRates {
            number: 1.5,
            ..AltTextRates::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("number"));
        AltTextRates::default().validate().unwrap();
    }
}
