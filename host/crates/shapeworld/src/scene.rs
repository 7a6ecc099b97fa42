//! The scene model (shapes, colours, objects with a box position and size)
//! and the exact renderer: every pixel is either the background or one
//! object's palette colour, as the ShapeWorld spec defines them.

use serde::{Deserialize, Serialize};

/// Image side in pixels (images are `SIZE x SIZE` RGB).
pub const SIZE: usize = 32;
/// Background colour.
pub const BACKGROUND: [u8; 3] = [240, 240, 240];
/// Smallest object box side.
pub const MIN_SIDE: u8 = 7;
/// Largest object box side.
pub const MAX_SIDE: u8 = 10;

/// An object colour (the four palette entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    /// (220,40,40)
    Red,
    /// (40,170,60)
    Green,
    /// (40,80,220)
    Blue,
    /// (230,200,40)
    Yellow,
}

impl Color {
    /// Every colour, in vocabulary order.
    pub const ALL: [Color; 4] = [Color::Red, Color::Green, Color::Blue, Color::Yellow];

    /// The exact render value.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [220, 40, 40],
            Color::Green => [40, 170, 60],
            Color::Blue => [40, 80, 220],
            Color::Yellow => [230, 200, 40],
        }
    }

    /// The caption word.
    pub fn word(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
        }
    }
}

/// An object shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// Filled disc.
    Circle,
    /// Filled square.
    Square,
    /// Filled upward isosceles triangle.
    Triangle,
}

impl Shape {
    /// Every shape, in vocabulary order.
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    /// The singular caption word.
    pub fn word(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }

    /// The plural caption word.
    pub fn plural(self) -> &'static str {
        match self {
            Shape::Circle => "circles",
            Shape::Square => "squares",
            Shape::Triangle => "triangles",
        }
    }

    /// Is local pixel (col `i`, row `j`) of an `s x s` box inside the shape?
    /// Exact integer tests on pixel centres (i + 0.5, j + 0.5), doubled:
    /// - circle: centre within s/2 of the box centre;
    /// - triangle: apex at the top centre, the bottom row spans the full
    ///   width, row `j` covers |x - s/2| <= (j + 1) / 2.
    pub fn covers(self, s: u8, i: u8, j: u8) -> bool {
        let (s, i, j) = (s as i32, i as i32, j as i32);
        match self {
            Shape::Square => true,
            Shape::Circle => {
                let (dx, dy) = (2 * i + 1 - s, 2 * j + 1 - s);
                dx * dx + dy * dy <= s * s
            }
            Shape::Triangle => (2 * i + 1 - s).abs() <= j + 1,
        }
    }
}

/// One object: shape, colour and its box (top-left corner, side in px).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    /// Shape.
    pub shape: Shape,
    /// Colour.
    pub color: Color,
    /// Left column of the box.
    pub x: u8,
    /// Top row of the box.
    pub y: u8,
    /// Box side (7..=10).
    pub size: u8,
}

impl Object {
    /// The object's pixels as (x, y) image coordinates.
    pub fn pixels(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let s = self.size;
        (0..s).flat_map(move |j| {
            (0..s)
                .filter(move |&i| self.shape.covers(s, i, j))
                .map(move |i| ((self.x + i) as usize, (self.y + j) as usize))
        })
    }

    /// (sum of x, sum of y, pixel count) of the object's pixels: the
    /// centroid is (sum_x / n, sum_y / n), kept as integers so that
    /// relations can be decided exactly.
    pub fn moments(&self) -> (i64, i64, i64) {
        self.pixels().fold((0, 0, 0), |(sx, sy, n), (x, y)| {
            (sx + x as i64, sy + y as i64, n + 1)
        })
    }

    /// Centroid (x, y) of the object's pixels.
    pub fn centroid(&self) -> (f64, f64) {
        let (sx, sy, n) = self.moments();
        (sx as f64 / n as f64, sy as f64 / n as f64)
    }

    /// Does the box stay >= 1 px from the border?
    pub fn inside(&self) -> bool {
        let (x, y, s) = (self.x as usize, self.y as usize, self.size as usize);
        x >= 1 && y >= 1 && x + s < SIZE && y + s < SIZE
    }

    /// Are the two boxes apart with at least one free pixel between them
    /// (in x or in y)? Objects lie inside their boxes, so apart boxes
    /// never touch, not even diagonally.
    pub fn apart(&self, other: &Object) -> bool {
        let (ax, ay, a) = (self.x as usize, self.y as usize, self.size as usize);
        let (bx, by, b) = (other.x as usize, other.y as usize, other.size as usize);
        ax + a < bx || bx + b < ax || ay + a < by || by + b < ay
    }
}

/// A scene: its objects, in caption order (for binding and spatial captions
/// the first object is the caption's first).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scene {
    /// The objects.
    pub objects: Vec<Object>,
}

impl Scene {
    /// Render to row-major RGB bytes (`SIZE * SIZE * 3`).
    pub fn render(&self) -> Vec<u8> {
        let mut px = BACKGROUND.repeat(SIZE * SIZE);
        self.render_into(&mut px);
        px
    }

    /// Draw the objects over `px` (row-major RGB, `SIZE * SIZE * 3`).
    pub fn render_into(&self, px: &mut [u8]) {
        assert_eq!(px.len(), SIZE * SIZE * 3, "ShapeWorld images are 32x32 RGB");
        for o in &self.objects {
            let rgb = o.color.rgb();
            for (x, y) in o.pixels() {
                let k = (y * SIZE + x) * 3;
                px[k..k + 3].copy_from_slice(&rgb);
            }
        }
    }

    /// Do all objects lie inside the frame and pairwise apart?
    pub fn valid(&self) -> bool {
        self.objects.iter().all(|o| {
            o.inside() && (MIN_SIDE..=MAX_SIDE).contains(&o.size) && o.pixels().next().is_some()
        }) && self
            .objects
            .iter()
            .enumerate()
            .all(|(i, a)| self.objects[i + 1..].iter().all(|b| a.apart(b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn widths(shape: Shape, s: u8) -> Vec<usize> {
        (0..s)
            .map(|j| (0..s).filter(|&i| shape.covers(s, i, j)).count())
            .collect()
    }

    #[test]
    fn shapes_match_hand_drawn_masks() {
        // Hand-derived row widths (see the spec's definitions).
        assert_eq!(widths(Shape::Triangle, 7), [1, 3, 3, 5, 5, 7, 7]);
        assert_eq!(widths(Shape::Triangle, 8), [2, 2, 4, 4, 6, 6, 8, 8]);
        assert_eq!(widths(Shape::Circle, 7), [3, 5, 7, 7, 7, 5, 3]);
        assert_eq!(widths(Shape::Circle, 8), [4, 6, 8, 8, 8, 8, 6, 4]);
        assert_eq!(widths(Shape::Square, 9), [9; 9]);
        // Triangle rows grow from top to bottom; the bottom row is full.
        for s in MIN_SIDE..=MAX_SIDE {
            let w = widths(Shape::Triangle, s);
            assert!(w.windows(2).all(|p| p[0] <= p[1]) && w[s as usize - 1] == s as usize);
            let c = widths(Shape::Circle, s);
            assert_eq!(c, c.iter().rev().cloned().collect::<Vec<_>>());
        }
    }

    #[test]
    fn render_paints_exact_colours_on_the_background() {
        let o = Object {
            shape: Shape::Square,
            color: Color::Blue,
            x: 2,
            y: 3,
            size: 7,
        };
        let px = Scene { objects: vec![o] }.render();
        let at = |x: usize, y: usize| &px[(y * SIZE + x) * 3..(y * SIZE + x) * 3 + 3];
        assert_eq!(at(2, 3), [40, 80, 220]);
        assert_eq!(at(8, 9), [40, 80, 220]);
        assert_eq!(at(9, 9), BACKGROUND);
        assert_eq!(at(1, 3), BACKGROUND);
        let blue = px.chunks(3).filter(|p| *p == [40, 80, 220]).count();
        assert_eq!(blue, 49);
        assert_eq!(o.centroid(), (5.0, 6.0));
    }

    #[test]
    fn apart_needs_a_free_pixel() {
        let a = Object {
            shape: Shape::Square,
            color: Color::Red,
            x: 1,
            y: 1,
            size: 7,
        };
        // a covers columns 1..=7; column 8 free, so x = 9 is apart, 8 is not.
        assert!(a.apart(&Object { x: 9, ..a }));
        assert!(!a.apart(&Object { x: 8, ..a }));
        assert!(!a.apart(&Object { x: 8, y: 8, ..a }));
        assert!(a.apart(&Object { x: 8, y: 9, ..a }));
        assert!(a.inside());
        assert!(!Object { x: 0, ..a }.inside());
        assert!(Object { x: 24, ..a }.inside());
        assert!(!Object { x: 25, ..a }.inside());
    }
}
