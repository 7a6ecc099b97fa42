//! The seeded scene sampler: `selma-rng`'s SplitMix64 (stable across
//! platforms and crate versions; re-exported here), one sampler per caption
//! form, and the mix of forms a dataset draws from. Scene `i` of a dataset depends only on
//! (seed, i), so datasets can be written in parallel or in shards.

use crate::alttext::AltTextRates;
use crate::caption::{Caption, Form, Relation};
use crate::scene::{Color, Object, Scene, Shape, MAX_SIDE, MIN_SIDE, SIZE};
use anyhow::{bail, Context, Result};
use selma_rng::Rng;
pub use selma_rng::SplitMix64;
use serde::{Deserialize, Serialize};

/// The seed of scene `index` of a dataset with seed `seed`.
pub fn scene_seed(seed: u64, index: u64) -> u64 {
    let mut a = SplitMix64::new(index ^ 0x5348_4150_4557_4F52);
    let mut b = SplitMix64::new(seed ^ a.next_u64());
    b.next_u64()
}

/// The share of each caption form in a dataset (weights, normalised when
/// drawing).
#[derive(Clone, Debug, PartialEq)]
pub struct Mix {
    weights: Vec<(Form, f64)>,
}

impl Default for Mix {
    /// SHAPEWORLD.md's mix: 20% single, 40% count, 20% binding, 20% spatial.
    fn default() -> Self {
        Self {
            weights: vec![
                (Form::Single, 0.2),
                (Form::Count, 0.4),
                (Form::Binding, 0.2),
                (Form::Spatial, 0.2),
            ],
        }
    }
}

impl Mix {
    /// A mix from (form, weight) pairs; weights must be finite, >= 0 and
    /// sum to more than 0.
    pub fn new(weights: Vec<(Form, f64)>) -> Result<Self> {
        if weights.iter().any(|(_, w)| !w.is_finite() || *w < 0.0) {
            bail!("form weights must be finite and >= 0, got {weights:?}");
        }
        if weights.iter().map(|(_, w)| w).sum::<f64>() <= 0.0 {
            bail!("form weights sum to 0: give at least one form a positive weight");
        }
        Ok(Self { weights })
    }

    /// Parse "single=0.2,count=0.4,binding=0.2,spatial=0.2" (forms not
    /// named get weight 0; "plural" is allowed).
    pub fn parse(text: &str) -> Result<Self> {
        let mut weights: Vec<(Form, f64)> = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once('=')
                .with_context(|| format!("mix entry \"{part}\": expected form=weight"))?;
            let form =
                Form::from_name(name.trim()).with_context(|| format!("mix entry \"{part}\""))?;
            let w: f64 = value
                .trim()
                .parse()
                .with_context(|| format!("mix entry \"{part}\": weight is not a number"))?;
            if weights.iter().any(|(f, _)| *f == form) {
                bail!("mix \"{text}\" names {form} twice");
            }
            weights.push((form, w));
        }
        Self::new(weights).with_context(|| format!("mix \"{text}\""))
    }

    /// The (form, weight) pairs.
    pub fn weights(&self) -> &[(Form, f64)] {
        &self.weights
    }

    /// Draw a form in proportion to the weights.
    pub fn draw(&self, rng: &mut SplitMix64) -> Form {
        let total: f64 = self.weights.iter().map(|(_, w)| w).sum();
        let mut u = rng.next_f64() * total;
        for &(f, w) in &self.weights {
            if u < w {
                return f;
            }
            u -= w;
        }
        // Rounding at the top end: the last form with weight.
        self.weights
            .iter()
            .rev()
            .find(|(_, w)| *w > 0.0)
            .map(|(f, _)| *f)
            .expect("Mix::new checked a positive weight")
    }
}

/// How a dataset draws its scenes.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleOptions {
    /// Shares of the caption forms.
    pub mix: Mix,
    /// World v1 only: for count scenes with n >= 3, the probability that
    /// the caption keeps its number word ("three red circles"); otherwise
    /// it is the plural form ("red circles"). SHAPEWORLD.md's weak-by-data
    /// setting is 0.1.
    pub number_word_keep: f64,
    /// World v2: caption every scene in alt-text style at these rates
    /// ([`crate::alttext`]); `None` is world v1 (the grammar's captions).
    pub alt_text: Option<AltTextRates>,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self::world(World::V1)
    }
}

impl SampleOptions {
    /// The pretraining distribution of `world` (SHAPEWORLD.md's form mix).
    pub fn world(world: World) -> Self {
        match world {
            World::V1 => Self {
                mix: Mix::default(),
                number_word_keep: 0.1,
                alt_text: None,
            },
            World::V2 => Self {
                mix: Mix::default(),
                number_word_keep: 1.0,
                alt_text: Some(AltTextRates::default()),
            },
        }
    }
}

/// Which ShapeWorld: the scenes are the same, the pretraining captions
/// differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum World {
    /// Captions from the grammar (number words of 3-4 objects mostly
    /// dropped): weak at counting by vocabulary.
    #[default]
    V1,
    /// Alt-text captions that leave out objects, colours, numbers and
    /// relations at stated rates: weak at following detailed prompts.
    V2,
}

impl World {
    /// "v1" or "v2".
    pub fn name(self) -> &'static str {
        match self {
            World::V1 => "v1",
            World::V2 => "v2",
        }
    }

    /// Is this world v1 (the default)?
    pub fn is_v1(&self) -> bool {
        *self == World::V1
    }

    /// The world called `name`.
    pub fn from_name(name: &str) -> Result<World> {
        match name {
            "v1" => Ok(World::V1),
            "v2" => Ok(World::V2),
            _ => bail!("unknown ShapeWorld world \"{name}\": use v1 or v2"),
        }
    }
}

fn kind(rng: &mut SplitMix64) -> (Color, Shape) {
    (rng.pick(&Color::ALL), rng.pick(&Shape::ALL))
}

fn two_kinds(rng: &mut SplitMix64) -> ((Color, Shape), (Color, Shape)) {
    let a = kind(rng);
    loop {
        let b = kind(rng);
        if b != a {
            return (a, b);
        }
    }
}

/// Place objects of `kinds` (in order) at random sizes and positions,
/// inside the frame and pairwise apart; `None` if an object found no room.
fn place(kinds: &[(Color, Shape)], rng: &mut SplitMix64) -> Option<Scene> {
    let mut objects: Vec<Object> = Vec::with_capacity(kinds.len());
    for &(color, shape) in kinds {
        let mut placed = false;
        for _ in 0..64 {
            let size = MIN_SIDE + rng.below((MAX_SIDE - MIN_SIDE + 1) as u64) as u8;
            // Box columns x..x+size-1 within 1..=SIZE-2.
            let span = (SIZE as u64 - 1) - size as u64;
            let o = Object {
                shape,
                color,
                x: 1 + rng.below(span) as u8,
                y: 1 + rng.below(span) as u8,
                size,
            };
            if objects.iter().all(|p| p.apart(&o)) {
                objects.push(o);
                placed = true;
                break;
            }
        }
        if !placed {
            return None;
        }
    }
    Some(Scene { objects })
}

/// Place `kinds` until `accept` holds (fresh placements each try).
fn place_until(
    kinds: &[(Color, Shape)],
    rng: &mut SplitMix64,
    accept: impl Fn(&Scene) -> bool,
) -> Scene {
    loop {
        if let Some(s) = place(kinds, rng) {
            if accept(&s) {
                return s;
            }
        }
    }
}

/// A random caption of `form` as the sampler draws them (count: n uniform
/// in 1..=4 with its number word; plural: the caption without a number).
pub fn sample_caption(form: Form, rng: &mut SplitMix64) -> Caption {
    match form {
        Form::Single => {
            let (color, shape) = kind(rng);
            Caption::Single { color, shape }
        }
        Form::Count => {
            let n = 1 + rng.below(4) as u8;
            let (color, shape) = kind(rng);
            Caption::Count { n, color, shape }
        }
        Form::Plural => {
            let (color, shape) = kind(rng);
            Caption::Plural { color, shape }
        }
        Form::Binding => {
            let (a, b) = two_kinds(rng);
            Caption::Binding { a, b }
        }
        Form::Spatial => {
            let (a, b) = two_kinds(rng);
            let rel = rng.pick(&Relation::ALL);
            Caption::Spatial { a, rel, b }
        }
    }
}

/// A random scene of `form` and its caption. Count scenes with n >= 3 keep
/// their number word with probability `number_word_keep`, else they are
/// captioned in the plural form; plural scenes have 2..=4 objects. The
/// scene's objects are in caption order and the caption is true of it.
pub fn sample(form: Form, number_word_keep: f64, rng: &mut SplitMix64) -> (Scene, Caption) {
    let mut caption = sample_caption(form, rng);
    let kinds: Vec<(Color, Shape)> = match caption {
        Caption::Single { color, shape } => vec![(color, shape)],
        Caption::Count { n, color, shape } => {
            if n >= 3 && rng.next_f64() >= number_word_keep {
                caption = Caption::Plural { color, shape };
            }
            vec![(color, shape); n as usize]
        }
        Caption::Plural { color, shape } => vec![(color, shape); 2 + rng.below(3) as usize],
        Caption::Binding { a, b } => vec![a, b],
        Caption::Spatial { a, b, .. } => vec![a, b],
    };
    let scene = place_until(&kinds, rng, |s| caption.holds(s));
    (scene, caption)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_and_draws_in_proportion() {
        let m = Mix::parse("single=1, count=3").unwrap();
        assert_eq!(m.weights(), [(Form::Single, 1.0), (Form::Count, 3.0)]);
        let mut r = SplitMix64::new(7);
        let n = 40_000;
        let counts = (0..n).filter(|_| m.draw(&mut r) == Form::Count).count();
        let share = counts as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.01, "{share}");
        for bad in [
            "single",
            "single=x",
            "blob=1",
            "single=-1",
            "single=0",
            "count=1,count=2",
        ] {
            assert!(Mix::parse(bad).is_err(), "{bad}");
        }
        assert!(Mix::parse("blob=1")
            .unwrap_err()
            .to_string()
            .contains("blob"));
    }

    #[test]
    fn every_form_samples_true_valid_scenes() {
        let mut r = SplitMix64::new(3);
        for form in Form::ALL {
            for _ in 0..2000 {
                let (scene, caption) = sample(form, 0.1, &mut r);
                assert!(scene.valid(), "{scene:?}");
                assert!(caption.holds(&scene), "{caption} / {scene:?}");
                let n = scene.objects.len();
                match caption {
                    Caption::Single { .. } => assert_eq!(n, 1),
                    Caption::Count { n: k, .. } => assert_eq!(n, k as usize),
                    Caption::Plural { .. } => assert!((2..=4).contains(&n)),
                    Caption::Binding { .. } | Caption::Spatial { .. } => assert_eq!(n, 2),
                }
            }
        }
    }

    #[test]
    fn objects_never_touch_in_pixels() {
        // Pixel-level check, independent of `Object::apart`: label each
        // pixel with its object; no pixel is claimed twice, no two objects
        // are 8-neighbours, and nothing is drawn on the 1 px border.
        let mut r = SplitMix64::new(11);
        for i in 0..3000 {
            let form = Form::ALL[i % Form::ALL.len()];
            let (scene, _) = sample(form, 0.1, &mut r);
            let mut owner = [[usize::MAX; SIZE]; SIZE];
            for (k, o) in scene.objects.iter().enumerate() {
                for (x, y) in o.pixels() {
                    assert!(x >= 1 && y >= 1 && x < SIZE - 1 && y < SIZE - 1);
                    assert_eq!(owner[y][x], usize::MAX, "overlap in {scene:?}");
                    owner[y][x] = k;
                }
            }
            for y in 1..SIZE - 1 {
                for x in 1..SIZE - 1 {
                    let k = owner[y][x];
                    if k == usize::MAX {
                        continue;
                    }
                    for (dx, dy) in [
                        (-1i32, -1i32),
                        (0, -1),
                        (1, -1),
                        (-1, 0),
                        (1, 0),
                        (-1, 1),
                        (0, 1),
                        (1, 1),
                    ] {
                        let o = owner[(y as i32 + dy) as usize][(x as i32 + dx) as usize];
                        assert!(o == usize::MAX || o == k, "objects touch in {scene:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn spatial_scenes_satisfy_their_relation_in_pixels() {
        // Centroids measured on the rendered image (pixels of the object's
        // colour inside its box; boxes are apart), in floating point.
        let mut r = SplitMix64::new(13);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3000 {
            let (scene, caption) = sample(Form::Spatial, 0.1, &mut r);
            let Caption::Spatial { rel, .. } = caption else {
                panic!("{caption}")
            };
            seen.insert(rel);
            let px = scene.render();
            let centroid = |o: &Object| {
                let (mut sx, mut sy, mut n) = (0.0, 0.0, 0.0);
                for y in o.y as usize..(o.y + o.size) as usize {
                    for x in o.x as usize..(o.x + o.size) as usize {
                        let k = (y * SIZE + x) * 3;
                        if px[k..k + 3] == o.color.rgb() {
                            sx += x as f64;
                            sy += y as f64;
                            n += 1.0;
                        }
                    }
                }
                (sx / n, sy / n)
            };
            let (a, b) = (centroid(&scene.objects[0]), centroid(&scene.objects[1]));
            let ok = match rel {
                Relation::LeftOf => a.0 <= b.0 - 3.0 + 1e-9,
                Relation::RightOf => a.0 >= b.0 + 3.0 - 1e-9,
                Relation::Above => a.1 <= b.1 - 3.0 + 1e-9,
                Relation::Below => a.1 >= b.1 + 3.0 - 1e-9,
            };
            assert!(ok, "{caption}: {a:?} vs {b:?}");
        }
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn number_word_knob_controls_large_counts() {
        let mut r = SplitMix64::new(9);
        let (mut kept, mut big) = (0, 0);
        for _ in 0..20_000 {
            let (scene, caption) = sample(Form::Count, 0.1, &mut r);
            let n = scene.objects.len();
            match caption {
                // n = 1, 2 always keep their number word.
                Caption::Count { .. } if n < 3 => {}
                Caption::Plural { .. } => {
                    assert!(n >= 3);
                    big += 1
                }
                Caption::Count { .. } => {
                    kept += 1;
                    big += 1
                }
                _ => unreachable!(),
            }
        }
        let share = kept as f64 / big as f64;
        assert!((share - 0.1).abs() < 0.015, "{share} of {big}");
        // keep = 1: never plural; keep = 0: never a number word for n >= 3.
        for _ in 0..2000 {
            assert!(!matches!(
                sample(Form::Count, 1.0, &mut r).1,
                Caption::Plural { .. }
            ));
            let (s, c) = sample(Form::Count, 0.0, &mut r);
            assert_eq!(matches!(c, Caption::Plural { .. }), s.objects.len() >= 3);
        }
    }

    #[test]
    fn captions_reach_the_whole_grammar() {
        let mut r = SplitMix64::new(5);
        for form in Form::ALL {
            let all = Caption::all(form);
            let seen: std::collections::HashSet<Caption> = (0..40 * all.len())
                .map(|_| sample_caption(form, &mut r))
                .collect();
            assert_eq!(seen.len(), all.len(), "{form}");
        }
    }
}
