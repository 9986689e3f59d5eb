//! The flower world: a procedural scene renderer that stands in for Stable Diffusion +
//! Prompt-to-Prompt on a world small enough to train an editing model on this CPU.
//!
//! A [`Scene`] is drawn from a seed (horizon, sky, ground, an optional sun or moon, stars,
//! 1–7 flowers of one kind); [`Scene::render`] paints it at any size, anti-aliased by 4 × 4
//! supersampling; [`Scene::caption`] describes it as the paper's captions do; [`Edit`]s change
//! one thing (flower kind, time of day, ground, the sun, the flowers) and keep everything else,
//! flower positions and sizes included. [`Scene::labels`] and [`classify`] name what a pixel
//! shows, for judging an edit by its pixels.

use std::time::Instant;

use image::RgbImage;
use ip2p::pipeline::clip_score::Similarities;
use ip2p::schedulers::noise::{rng_for, unit};
use rand_chacha::ChaCha20Rng;
use rand_core::RngCore;

use crate::input::{Item, Triple};
use crate::render::{png, ItemResult, Row, SampleSpec};
use crate::Result;

/// The sky, by time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sky {
    Day,
    Sunset,
    Night,
}

/// What covers the ground.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ground {
    Grass,
    Snow,
    Sand,
}

/// The flowers' kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Sunflower,
    Rose,
    Tulip,
    Daisy,
}

impl Sky {
    pub const ALL: [Sky; 3] = [Sky::Day, Sky::Sunset, Sky::Night];
    /// Top and horizon colours.
    fn gradient(self) -> ([f32; 3], [f32; 3]) {
        match self {
            Sky::Day => ([90.0, 150.0, 230.0], [200.0, 225.0, 245.0]),
            Sky::Sunset => ([60.0, 40.0, 110.0], [250.0, 150.0, 80.0]),
            Sky::Night => ([10.0, 15.0, 40.0], [30.0, 40.0, 80.0]),
        }
    }
    fn phrase(self) -> &'static str {
        match self {
            Sky::Day => "under a blue day sky",
            Sky::Sunset => "under a sunset sky",
            Sky::Night => "under a night sky with stars",
        }
    }
}

impl Ground {
    pub const ALL: [Ground; 3] = [Ground::Grass, Ground::Snow, Ground::Sand];
    /// Horizon and bottom colours.
    fn gradient(self) -> ([f32; 3], [f32; 3]) {
        match self {
            Ground::Grass => ([60.0, 140.0, 50.0], [30.0, 90.0, 30.0]),
            Ground::Snow => ([235.0, 240.0, 245.0], [210.0, 220.0, 235.0]),
            Ground::Sand => ([230.0, 200.0, 140.0], [200.0, 170.0, 110.0]),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Ground::Grass => "grass",
            Ground::Snow => "snow",
            Ground::Sand => "sand",
        }
    }
    fn phrase(self) -> &'static str {
        match self {
            Ground::Grass => "on green grass",
            Ground::Snow => "on snow",
            Ground::Sand => "on sand",
        }
    }
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Sunflower, Kind::Rose, Kind::Tulip, Kind::Daisy];
    /// The plural, as captions and instructions say it.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Sunflower => "sunflowers",
            Kind::Rose => "roses",
            Kind::Tulip => "tulips",
            Kind::Daisy => "daisies",
        }
    }
    fn singular(self) -> &'static str {
        match self {
            Kind::Sunflower => "sunflower",
            Kind::Rose => "rose",
            Kind::Tulip => "tulip",
            Kind::Daisy => "daisy",
        }
    }
}

const STEM: [f32; 3] = [40.0, 110.0, 40.0];
const SUN: [f32; 3] = [255.0, 230.0, 90.0];
const MOON: [f32; 3] = [230.0, 230.0, 210.0];
const STAR: [f32; 3] = [255.0, 255.0, 255.0];
const SUNFLOWER_PETAL: [f32; 3] = [250.0, 200.0, 30.0];
const SUNFLOWER_DISC: [f32; 3] = [100.0, 60.0, 20.0];
const ROSE: [f32; 3] = [200.0, 30.0, 50.0];
const ROSE_RING: [f32; 3] = [150.0, 20.0, 40.0];
const TULIP: [f32; 3] = [170.0, 60.0, 200.0];
const DAISY_PETAL: [f32; 3] = [245.0, 245.0, 245.0];
const DAISY_DISC: [f32; 3] = [250.0, 210.0, 50.0];

/// One flower; positions and sizes in fractions of the picture (`r` of its width), so every
/// size renders the same scene.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Flower {
    pub x: f32,
    pub y: f32,
    pub r: f32,
    /// The stem reaches the bottom edge, or else is two radii long.
    pub long_stem: bool,
}

/// A whole scene.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    /// The horizon, as a fraction of the height from the top.
    pub horizon: f32,
    pub sky: Sky,
    pub ground: Ground,
    /// Where the sun (day) or moon (night) stands, if the sky has one: centre and radius (of
    /// the width). Not drawn at sunset.
    pub orb: Option<(f32, f32, f32)>,
    /// Star positions (drawn at night, above the horizon).
    pub stars: Vec<(f32, f32)>,
    pub kind: Kind,
    pub flowers: Vec<Flower>,
}

/// What a pixel shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Label {
    Sky(Sky),
    Ground(Ground),
    Sun,
    Moon,
    Star,
    Stem,
    Flower(Kind),
}

fn pick<T: Copy>(rng: &mut ChaCha20Rng, xs: &[T]) -> T {
    xs[((unit(rng) * xs.len() as f64) as usize).min(xs.len() - 1)]
}

fn between(rng: &mut ChaCha20Rng, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * unit(rng) as f32
}

fn lerp(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    let t = t.clamp(0.0, 1.0);
    [0, 1, 2].map(|i| a[i] + (b[i] - a[i]) * t)
}

/// Whether `(dx, dy)` lies in the ellipse with semi-axes `a` (along angle `th`) and `b`.
fn in_ellipse(dx: f32, dy: f32, th: f32, a: f32, b: f32) -> bool {
    let (s, c) = th.sin_cos();
    let (u, v) = (dx * c + dy * s, -dx * s + dy * c);
    (u / a).powi(2) + (v / b).powi(2) <= 1.0
}

impl Scene {
    /// The scene of `seed` (every draw from its own ChaCha20 stream).
    pub fn random(seed: u64) -> Self {
        let mut rng = rng_for(seed, b"world___", 0);
        let horizon = between(&mut rng, 0.45, 0.65);
        let sky = pick(&mut rng, &Sky::ALL);
        let ground = pick(&mut rng, &Ground::ALL);
        let kind = pick(&mut rng, &Kind::ALL);
        let orb_r = between(&mut rng, 0.05, 0.07);
        let orb = (
            between(&mut rng, 0.1, 0.9),
            between(&mut rng, 0.12, 0.3) * horizon / 0.65,
            orb_r,
        );
        let has_orb = unit(&mut rng) < 0.6;
        let n_stars = 20 + (unit(&mut rng) * 41.0) as usize;
        let stars = (0..n_stars)
            .map(|_| (unit(&mut rng) as f32, unit(&mut rng) as f32 * horizon))
            .collect();
        let n = 1 + (unit(&mut rng) * 7.0).min(6.0) as usize;
        let flowers = (0..n)
            .map(|k| {
                let r = between(&mut rng, 0.05, 0.09);
                // Spread across the width: one slot each, jittered inside it.
                let slot = (k as f32 + between(&mut rng, 0.2, 0.8)) / n as f32;
                Flower {
                    x: 0.06 + 0.88 * slot,
                    y: between(&mut rng, horizon + 0.12, 0.8),
                    r,
                    long_stem: unit(&mut rng) < 0.5,
                }
            })
            .collect();
        Self {
            horizon,
            sky,
            ground,
            orb: has_orb.then_some(orb),
            stars,
            kind,
            flowers,
        }
    }

    /// What the scene shows at `(x, y)` (pixels) in a `w × h` picture, and its colour.
    fn sample(&self, x: f32, y: f32, w: f32, h: f32) -> (Label, [f32; 3]) {
        for f in self.flowers.iter().rev() {
            if let Some(hit) = self.flower_at(f, x, y, w, h) {
                return hit;
            }
        }
        let hy = self.horizon * h;
        if y >= hy {
            let (a, b) = self.ground.gradient();
            return (
                Label::Ground(self.ground),
                lerp(a, b, (y - hy) / (h - hy).max(1.0)),
            );
        }
        if let Some((ox, oy, or)) = self.orb {
            let (dx, dy) = (x - ox * w, y - oy * h);
            if dx * dx + dy * dy <= (or * w).powi(2) {
                match self.sky {
                    Sky::Day => return (Label::Sun, SUN),
                    Sky::Night => return (Label::Moon, MOON),
                    Sky::Sunset => {}
                }
            }
        }
        if self.sky == Sky::Night {
            let (px, py) = (x.floor(), y.floor());
            let is_star = self.stars.iter().any(|&(sx, sy)| {
                (sx * w).floor().min(w - 1.0) == px && (sy * h).floor().min(hy - 1.0) == py
            });
            if is_star {
                return (Label::Star, STAR);
            }
        }
        let (a, b) = self.sky.gradient();
        (Label::Sky(self.sky), lerp(a, b, y / hy.max(1.0)))
    }

    /// The flower `f` (head or stem) at `(x, y)`, if it covers that point.
    fn flower_at(&self, f: &Flower, x: f32, y: f32, w: f32, h: f32) -> Option<(Label, [f32; 3])> {
        let r = f.r * w;
        let (cx, cy) = (f.x * w, f.y * h);
        let (dx, dy) = (x - cx, y - cy);
        if dx.abs() > 1.2 * r || dy < -1.2 * r {
            return None;
        }
        if let Some(c) = head(self.kind, dx, dy, r) {
            return Some((Label::Flower(self.kind), c));
        }
        let stem_end = if f.long_stem { h } else { cy + 2.0 * r };
        (dy > 0.0 && y <= stem_end && dx.abs() <= 0.08 * r).then_some((Label::Stem, STEM))
    }

    /// The picture at `w × h`, 4 × 4 samples per pixel (rows in parallel).
    pub fn render(&self, w: u32, h: u32) -> RgbImage {
        use rayon::prelude::*;
        const S: u32 = 4;
        let (wf, hf) = (w as f32, h as f32);
        let mut buf = vec![0u8; (w * h * 3) as usize];
        buf.par_chunks_mut((w * 3).max(1) as usize)
            .enumerate()
            .for_each(|(py, row)| {
                for (px, out) in row.chunks_exact_mut(3).enumerate() {
                    let mut acc = [0f32; 3];
                    for sy in 0..S {
                        for sx in 0..S {
                            let x = px as f32 + (sx as f32 + 0.5) / S as f32;
                            let y = py as f32 + (sy as f32 + 0.5) / S as f32;
                            let (_, c) = self.sample(x, y, wf, hf);
                            for i in 0..3 {
                                acc[i] += c[i];
                            }
                        }
                    }
                    for i in 0..3 {
                        out[i] = (acc[i] / (S * S) as f32).round().clamp(0.0, 255.0) as u8;
                    }
                }
            });
        RgbImage::from_raw(w, h, buf).unwrap_or_default()
    }

    /// What each pixel's centre shows, row by row.
    pub fn labels(&self, w: u32, h: u32) -> Vec<Label> {
        let (wf, hf) = (w as f32, h as f32);
        (0..h)
            .flat_map(|py| (0..w).map(move |px| (px, py)))
            .map(|(px, py)| self.sample(px as f32 + 0.5, py as f32 + 0.5, wf, hf).0)
            .collect()
    }

    /// "five sunflowers on green grass under a blue day sky with a sun".
    pub fn caption(&self) -> String {
        let flowers = match self.flowers.len() {
            0 => "an empty field".to_owned(),
            1 => format!("one {}", self.kind.singular()),
            n => format!(
                "{} {}",
                NUMBERS[n.min(NUMBERS.len() - 1)],
                self.kind.plural()
            ),
        };
        let orb = match (self.sky, self.orb) {
            (Sky::Day, Some(_)) => " with a sun",
            (Sky::Night, Some(_)) => " and a moon",
            _ => "",
        };
        format!(
            "{flowers} {} {}{orb}",
            self.ground.phrase(),
            self.sky.phrase()
        )
    }
}

const NUMBERS: [&str; 8] = ["no", "one", "two", "three", "four", "five", "six", "seven"];

/// A flower head's colour at `(dx, dy)` from its centre, radius `r`, if the head covers it.
fn head(kind: Kind, dx: f32, dy: f32, r: f32) -> Option<[f32; 3]> {
    let d = (dx * dx + dy * dy).sqrt();
    let petals = |dist: f32, long: f32, wide: f32| {
        (0..12).any(|k| {
            let th = k as f32 * std::f32::consts::TAU / 12.0;
            let (s, c) = th.sin_cos();
            in_ellipse(dx - dist * r * c, dy - dist * r * s, th, long * r, wide * r)
        })
    };
    match kind {
        Kind::Sunflower => {
            if d <= 0.45 * r {
                Some(SUNFLOWER_DISC)
            } else {
                petals(0.7, 0.32, 0.13).then_some(SUNFLOWER_PETAL)
            }
        }
        Kind::Daisy => {
            if d <= 0.35 * r {
                Some(DAISY_DISC)
            } else {
                petals(0.65, 0.36, 0.11).then_some(DAISY_PETAL)
            }
        }
        Kind::Rose => {
            if d > r {
                None
            } else if (0.4 * r..=0.58 * r).contains(&d) {
                Some(ROSE_RING)
            } else {
                Some(ROSE)
            }
        }
        Kind::Tulip => {
            let cup = dy >= 0.0 && d <= 0.75 * r;
            let middle = in_ellipse(
                dx,
                dy + 0.25 * r,
                std::f32::consts::FRAC_PI_2,
                0.7 * r,
                0.35 * r,
            );
            let left = in_ellipse(dx + 0.4 * r, dy + 0.1 * r, 1.35, 0.7 * r, 0.33 * r);
            let right = in_ellipse(dx - 0.4 * r, dy + 0.1 * r, -1.35, 0.7 * r, 0.33 * r);
            (cup || middle || left || right).then_some(TULIP)
        }
    }
}

/// The label whose colour is nearest `c` (for judging a model's output by its pixels). Sky
/// and ground gradients count as their class anywhere between their two ends.
pub fn classify(c: [u8; 3]) -> Label {
    let c = c.map(f32::from);
    let dist = |a: [f32; 3]| (0..3).map(|i| (a[i] - c[i]).powi(2)).sum::<f32>();
    // Distance to the segment between a gradient's two colours.
    let seg = |(a, b): ([f32; 3], [f32; 3])| {
        let ab: Vec<f32> = (0..3).map(|i| b[i] - a[i]).collect();
        let len2: f32 = ab.iter().map(|v| v * v).sum();
        let t = ((0..3).map(|i| (c[i] - a[i]) * ab[i]).sum::<f32>() / len2).clamp(0.0, 1.0);
        dist(lerp(a, b, t))
    };
    let mut best = (f32::INFINITY, Label::Stem);
    let mut consider = |d: f32, l: Label| {
        if d < best.0 {
            best = (d, l);
        }
    };
    for s in Sky::ALL {
        consider(seg(s.gradient()), Label::Sky(s));
    }
    for g in Ground::ALL {
        consider(seg(g.gradient()), Label::Ground(g));
    }
    consider(dist(SUN), Label::Sun);
    consider(dist(MOON), Label::Moon);
    consider(dist(STEM), Label::Stem);
    for (col, k) in [
        (SUNFLOWER_PETAL, Kind::Sunflower),
        (SUNFLOWER_DISC, Kind::Sunflower),
        (ROSE, Kind::Rose),
        (ROSE_RING, Kind::Rose),
        (TULIP, Kind::Tulip),
        (DAISY_PETAL, Kind::Daisy),
        (DAISY_DISC, Kind::Daisy),
    ] {
        consider(dist(col), Label::Flower(k));
    }
    best.1
}

/// One change to a scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Edit {
    Kind(Kind),
    Sky(Sky),
    Ground(Ground),
    AddSun,
    RemoveSun,
    RemoveFlowers,
}

impl Edit {
    /// The edit's type, for counting accuracy per type.
    pub fn kind_name(self) -> &'static str {
        match self {
            Edit::Kind(_) => "flower kind",
            Edit::Sky(_) => "time of day",
            Edit::Ground(_) => "ground",
            Edit::AddSun => "add sun",
            Edit::RemoveSun => "remove sun",
            Edit::RemoveFlowers => "remove flowers",
        }
    }

    /// Every edit that changes `s`.
    pub fn applicable(s: &Scene) -> Vec<Edit> {
        let mut out = Vec::new();
        if !s.flowers.is_empty() {
            out.extend(
                Kind::ALL
                    .iter()
                    .filter(|&&k| k != s.kind)
                    .map(|&k| Edit::Kind(k)),
            );
            out.push(Edit::RemoveFlowers);
        }
        out.extend(
            Sky::ALL
                .iter()
                .filter(|&&k| k != s.sky)
                .map(|&k| Edit::Sky(k)),
        );
        out.extend(
            Ground::ALL
                .iter()
                .filter(|&&g| g != s.ground)
                .map(|&g| Edit::Ground(g)),
        );
        if s.sky == Sky::Day {
            out.push(if s.orb.is_some() {
                Edit::RemoveSun
            } else {
                Edit::AddSun
            });
        }
        out
    }

    /// `s` with this edit made; everything else (positions, sizes, stars) kept.
    pub fn apply(self, s: &Scene) -> Scene {
        let mut t = s.clone();
        match self {
            Edit::Kind(k) => t.kind = k,
            Edit::Sky(k) => t.sky = k,
            Edit::Ground(g) => t.ground = g,
            Edit::RemoveSun => t.orb = None,
            Edit::RemoveFlowers => t.flowers.clear(),
            Edit::AddSun => t.orb = Some(added_sun(s)),
        }
        t
    }

    /// The ways an instruction may say this edit of `s`.
    pub fn phrasings(self, s: &Scene) -> Vec<String> {
        let from = s.kind.plural();
        let ground = s.ground.name();
        match self {
            Edit::Kind(k) => {
                let to = k.plural();
                vec![
                    format!("turn the {from} into {to}"),
                    format!("replace the {from} with {to}"),
                    format!("make the flowers {to}"),
                    format!("change the {from} to {to}"),
                ]
            }
            Edit::Sky(Sky::Night) => vec![
                "make it night".into(),
                "turn it into night".into(),
                "make it nighttime".into(),
            ],
            Edit::Sky(Sky::Sunset) => vec![
                "make it sunset".into(),
                "turn it into a sunset".into(),
                "make it evening".into(),
            ],
            Edit::Sky(Sky::Day) => vec![
                "make it daytime".into(),
                "make it day".into(),
                "turn it into day".into(),
            ],
            Edit::Ground(Ground::Snow) => vec![
                "make it winter".into(),
                "cover the ground in snow".into(),
                format!("turn the {ground} into snow"),
            ],
            Edit::Ground(Ground::Sand) => vec![
                format!("turn the {ground} into sand"),
                "cover the ground in sand".into(),
                "make it a desert".into(),
            ],
            Edit::Ground(Ground::Grass) => vec![
                "make it spring".into(),
                format!("turn the {ground} into grass"),
                "cover the ground in grass".into(),
            ],
            Edit::AddSun => vec![
                "add a sun".into(),
                "put a sun in the sky".into(),
                "make it sunny".into(),
            ],
            Edit::RemoveSun => vec![
                "remove the sun".into(),
                "take away the sun".into(),
                "hide the sun".into(),
            ],
            Edit::RemoveFlowers => vec![
                "remove the flowers".into(),
                format!("take the {from} away"),
                format!("delete the {from}"),
            ],
        }
    }
}

/// Where "add a sun" puts the sun: one place for every scene, three quarters across and
/// high in the sky (scaled with the horizon), so that the edit is a function of the picture.
/// A sun drawn at a random place could not be learned: nothing in the input says where.
fn added_sun(s: &Scene) -> (f32, f32, f32) {
    (0.78, 0.2 * s.horizon / 0.65, 0.06)
}

/// Where the sun of `s` (the scene of `seed`) stands, or would stand.
fn sun_place(seed: u64, s: &Scene) -> (f32, f32, f32) {
    if let Some(o) = s.orb {
        return o;
    }
    let mut rng = rng_for(seed, b"sunplace", 0);
    let r = between(&mut rng, 0.05, 0.07);
    (
        between(&mut rng, 0.1, 0.9),
        between(&mut rng, 0.12, 0.3) * s.horizon / 0.65,
        r,
    )
}

/// The edit types, each equally likely in [`example`].
pub const EDIT_TYPES: [&str; 6] = [
    "flower kind",
    "time of day",
    "ground",
    "add sun",
    "remove sun",
    "remove flowers",
];

/// One training example of the world: the scene, the instruction, the edited scene.
#[derive(Debug, Clone)]
pub struct Example {
    pub scene: Scene,
    pub edit: Edit,
    pub instruction: String,
    pub edited: Scene,
}

/// The example of `seed`: an edit type chosen uniformly, its scene (a day sky with or without
/// a sun where the type needs one), a target and a phrasing.
pub fn example(seed: u64) -> Example {
    let mut scene = Scene::random(seed);
    let mut rng = rng_for(seed, b"edit____", 0);
    let ty = pick(&mut rng, &EDIT_TYPES);
    match ty {
        "add sun" => {
            scene.sky = Sky::Day;
            scene.orb = None;
        }
        "remove sun" => {
            scene.sky = Sky::Day;
            scene.orb = Some(sun_place(seed, &scene));
        }
        _ => {}
    }
    let of_type: Vec<Edit> = Edit::applicable(&scene)
        .into_iter()
        .filter(|e| e.kind_name() == ty)
        .collect();
    let edit = pick(&mut rng, &of_type);
    let phrasings = edit.phrasings(&scene);
    let instruction = pick(
        &mut rng,
        &phrasings.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .to_owned();
    let edited = edit.apply(&scene);
    Example {
        scene,
        edit,
        instruction,
        edited,
    }
}

/// A world a dataset can be made of instead of Stable Diffusion renders (`--world`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum World {
    Flowers,
}

impl std::str::FromStr for World {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "flowers" => Ok(Self::Flowers),
            _ => Err(format!("unknown world `{s}` (flowers)")),
        }
    }
}

/// The seed of example `index` of a run seeded `run_seed`.
pub fn example_seed(run_seed: u64, index: usize) -> u64 {
    rng_for(run_seed, b"worldsee", index as u64).next_u64()
}

/// The run's items: `count` examples, each already a triple (caption, instruction, edited
/// caption), so the text stage asks no LLM.
pub fn items(run_seed: u64, count: usize) -> Vec<Item> {
    (0..count)
        .map(|index| {
            let ex = example(example_seed(run_seed, index));
            let caption = ex.scene.caption();
            Item {
                index,
                caption: caption.clone(),
                triple: Some(Triple {
                    input: caption,
                    edit: ex.instruction,
                    output: ex.edited.caption(),
                }),
            }
        })
        .collect()
}

/// Renders examples as dataset rows (the image worker's job for a world run).
#[derive(Debug, Clone)]
pub struct WorldGenerator {
    pub run_seed: u64,
    pub width: u32,
    pub height: u32,
}

impl WorldGenerator {
    /// Example `index`: one row, both pictures rendered (no sampling, no filter).
    pub fn generate(&self, index: usize, t: &Triple) -> Result<ItemResult> {
        let seed = example_seed(self.run_seed, index);
        let ex = example(seed);
        let t0 = Instant::now();
        let (a, b) = (
            ex.scene.render(self.width, self.height),
            ex.edited.render(self.width, self.height),
        );
        let render_time = t0.elapsed();
        let t1 = Instant::now();
        let row = Row {
            item: index,
            sample: 0,
            triple: t.clone(),
            original_png: png(&a)?,
            edited_png: png(&b)?,
            spec: SampleSpec {
                seed: seed as u32,
                guidance_scale: 0.0,
                p2p_threshold: 0.0,
            },
            // Exact pairs: nothing to measure.
            sims: Similarities {
                image0_caption0: f32::NAN,
                image1_caption1: f32::NAN,
                direction: f32::NAN,
                image0_image1: f32::NAN,
            },
        };
        Ok(ItemResult {
            rows: vec![row],
            rendered: 1,
            passed: 1,
            filtered: Vec::new(),
            render_time,
            clip_time: Default::default(),
            encode_time: t1.elapsed(),
        })
    }
}

/// How an edited picture compares with the truth (see [`judge`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// Of the pixels the edit should change, the fraction whose class is now the truth's.
    pub changed_right: f64,
    /// Mean absolute difference from the input (0–255) over the pixels that should not change.
    pub unchanged_mae: f64,
    /// `changed_right ≥ 0.8` and `unchanged_mae ≤ 10`.
    pub correct: bool,
}

/// A pixel "should change" when the truth differs from the input by more than this (0–255) in
/// some channel; it "should not" when the two are equal.
const CHANGE: u8 = 24;

/// Judges `output` (the model's edit of `input`) against `truth` (the edited scene rendered):
/// the pixels that should change must take the truth's class ([`classify`]), the others must
/// keep their colour.
pub fn judge(input: &RgbImage, truth: &RgbImage, output: &RgbImage) -> Verdict {
    let (mut changed, mut right, mut kept, mut err) = (0usize, 0usize, 0usize, 0f64);
    for ((a, t), o) in input.pixels().zip(truth.pixels()).zip(output.pixels()) {
        let diff = (0..3).map(|i| a[i].abs_diff(t[i])).max().unwrap_or(0);
        if diff > CHANGE {
            changed += 1;
            right += usize::from(classify(o.0) == classify(t.0));
        } else if diff == 0 {
            kept += 1;
            err += (0..3).map(|i| f64::from(a[i].abs_diff(o[i]))).sum::<f64>() / 3.0;
        }
    }
    let changed_right = if changed == 0 {
        1.0
    } else {
        right as f64 / changed as f64
    };
    let unchanged_mae = if kept == 0 { 0.0 } else { err / kept as f64 };
    Verdict {
        changed_right,
        unchanged_mae,
        correct: changed_right >= 0.8 && unchanged_mae <= 10.0,
    }
}

/// One row per edit type of `report`'s first examples: input, true edit, the model's edit,
/// 4-pixel white gaps.
pub fn grid(report: &Report) -> RgbImage {
    let Some((a, _, _, _)) = report.firsts.values().next() else {
        return RgbImage::new(0, 0);
    };
    let (w, h, gap) = (a.width(), a.height(), 4);
    let rows = report.firsts.len() as u32;
    let mut out = RgbImage::from_pixel(
        3 * w + 2 * gap,
        rows * h + (rows - 1) * gap,
        image::Rgb([255; 3]),
    );
    for (r, (input, truth, output, _)) in report.firsts.values().enumerate() {
        for (c, img) in [input, truth, output].into_iter().enumerate() {
            let (x, y) = (c as u32 * (w + gap), r as u32 * (h + gap));
            image::imageops::replace(&mut out, img, i64::from(x), i64::from(y));
        }
    }
    out
}

/// The seed of held-out example `index`: a stream no training run draws from.
pub fn held_out_seed(index: usize) -> u64 {
    rng_for(0x5eed_e7a1, b"heldout_", index as u64).next_u64()
}

/// How the edits of held-out examples are made and judged.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub examples: usize,
    pub width: u32,
    pub height: u32,
    pub steps: usize,
    pub text_guidance: f64,
    pub image_guidance: f64,
    /// The edits' noise seed.
    pub seed: u64,
}

/// Counts of one edit type (or of all).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Tally {
    pub examples: usize,
    pub correct: usize,
    pub mean_changed_right: f64,
    pub mean_unchanged_mae: f64,
}

impl Tally {
    fn add(&mut self, v: &Verdict) {
        let n = self.examples as f64;
        self.mean_changed_right = (self.mean_changed_right * n + v.changed_right) / (n + 1.0);
        self.mean_unchanged_mae = (self.mean_unchanged_mae * n + v.unchanged_mae) / (n + 1.0);
        self.examples += 1;
        self.correct += usize::from(v.correct);
    }

    /// The fraction correct.
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.examples.max(1) as f64
    }
}

/// Accuracy per edit type and overall.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub by_type: std::collections::BTreeMap<String, Tally>,
    /// The first example of each type: input, true edit, the model's edit, instruction.
    #[serde(skip)]
    pub firsts: std::collections::BTreeMap<String, (RgbImage, RgbImage, RgbImage, String)>,
    pub overall: Tally,
}

/// Edits `opts.examples` held-out scenes with `pipe` and judges each against its truth.
pub fn evaluate(pipe: &ip2p::pipeline::EditPipeline, opts: &EvalOptions) -> ip2p::Result<Report> {
    let mut report = Report::default();
    for index in 0..opts.examples {
        let ex = example(held_out_seed(index));
        let input = ex.scene.render(opts.width, opts.height);
        let truth = ex.edited.render(opts.width, opts.height);
        let params = ip2p::pipeline::EditParams {
            instruction: ex.instruction.clone(),
            steps: opts.steps,
            text_guidance: opts.text_guidance,
            image_guidance: opts.image_guidance,
            seed: opts.seed,
            resolution: opts.width.max(opts.height),
            resize: ip2p::pipeline::ResizePolicy::Native,
            keep_working_size: true,
            ..Default::default()
        };
        let image = ip2p::pipeline::InputImage::from_dynamic(input.clone().into());
        let out = pipe.edit(&image, &params, &mut ip2p::pipeline::NoProgress)?;
        let output = out.image.to_rgb8();
        let v = judge(&input, &truth, &output);
        let ty = ex.edit.kind_name().to_owned();
        report.by_type.entry(ty.clone()).or_default().add(&v);
        report
            .firsts
            .entry(ty)
            .or_insert((input, truth, output, ex.instruction));
        report.overall.add(&v);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_fixes_the_scene_and_other_seeds_differ() {
        assert_eq!(Scene::random(7), Scene::random(7));
        assert_ne!(Scene::random(7), Scene::random(8));
        let a = Scene::random(7).render(64, 48);
        assert_eq!(a, Scene::random(7).render(64, 48));
    }

    #[test]
    fn scenes_stay_within_the_worlds_ranges() {
        for seed in 0..300 {
            let s = Scene::random(seed);
            assert!((0.45..=0.65).contains(&s.horizon));
            assert!((1..=7).contains(&s.flowers.len()));
            assert!((20..=60).contains(&s.stars.len()));
            for f in &s.flowers {
                assert!((0.05..=0.09).contains(&f.r) && f.y > s.horizon && f.y < 1.0);
            }
            if let Some((_, _, r)) = s.orb {
                assert!((0.05..=0.07).contains(&r));
            }
        }
    }

    #[test]
    fn the_palette_is_drawn_and_classified_back() {
        // A daytime grass scene with a sun and sunflowers: each part's exact colour appears
        // and classifies as what it is.
        let mut s = Scene::random(3);
        s.sky = Sky::Day;
        s.ground = Ground::Grass;
        s.kind = Kind::Sunflower;
        s.orb = Some((0.5, 0.15, 0.06));
        let (w, h) = (256, 192);
        let img = s.render(w, h);
        let labels = s.labels(w, h);
        let mut agree = 0;
        for (p, l) in img.pixels().zip(&labels) {
            if classify(p.0) == *l {
                agree += 1;
            }
        }
        // Only anti-aliased edges may disagree.
        let frac = agree as f64 / labels.len() as f64;
        assert!(frac > 0.97, "{frac}");
        let sun_px = img.get_pixel(w / 2, (0.15 * h as f32) as u32).0;
        assert_eq!(sun_px, [255, 230, 90]);
        assert_eq!(classify([252, 198, 33]), Label::Flower(Kind::Sunflower));
        assert_eq!(classify([200, 30, 50]), Label::Flower(Kind::Rose));
        assert_eq!(classify([140, 180, 240]), Label::Sky(Sky::Day));
        assert_eq!(classify([45, 115, 40]), Label::Ground(Ground::Grass));
    }

    #[test]
    fn every_kind_of_flower_and_scene_classifies_back() {
        for seed in 0..40 {
            let s = Scene::random(seed);
            let (w, h) = (128, 96);
            let img = s.render(w, h);
            let labels = s.labels(w, h);
            let agree = img
                .pixels()
                .zip(&labels)
                .filter(|(p, l)| classify(p.0) == **l)
                .count();
            let frac = agree as f64 / labels.len() as f64;
            assert!(frac > 0.93, "seed {seed}: {frac} ({})", s.caption());
        }
    }

    #[test]
    fn edits_change_what_they_say_and_keep_the_rest() {
        let mut counts = std::collections::HashMap::new();
        for seed in 0..400 {
            let ex = example(seed);
            *counts.entry(ex.edit.kind_name()).or_insert(0) += 1;
            let (a, b) = (&ex.scene, &ex.edited);
            assert_ne!(a, b, "seed {seed}: {:?} changed nothing", ex.edit);
            assert_eq!(a.horizon, b.horizon);
            assert_eq!(a.stars, b.stars);
            if ex.edit != Edit::RemoveFlowers {
                assert_eq!(a.flowers, b.flowers, "positions and sizes kept");
            }
            assert!(!ex.instruction.is_empty());
        }
        assert_eq!(counts.len(), 6, "{counts:?}");
        assert!(counts.values().all(|&n| n >= 30), "{counts:?}");
    }

    #[test]
    fn captions_read_like_the_papers() {
        let mut s = Scene::random(1);
        s.kind = Kind::Sunflower;
        s.sky = Sky::Day;
        s.ground = Ground::Grass;
        s.orb = Some((0.5, 0.2, 0.06));
        s.flowers.truncate(1);
        while s.flowers.len() < 5 {
            s.flowers.push(s.flowers[0]);
        }
        assert_eq!(
            s.caption(),
            "five sunflowers on green grass under a blue day sky with a sun"
        );
        s.flowers.truncate(1);
        s.sky = Sky::Night;
        s.ground = Ground::Snow;
        s.kind = Kind::Daisy;
        assert_eq!(
            s.caption(),
            "one daisy on snow under a night sky with stars and a moon"
        );
    }

    #[test]
    fn the_judge_accepts_the_truth_and_refuses_no_edit_or_a_wrong_one() {
        for index in 0..30 {
            let ex = example(held_out_seed(index));
            let (a, t) = (ex.scene.render(128, 96), ex.edited.render(128, 96));
            let right = judge(&a, &t, &t);
            assert!(right.correct && right.changed_right == 1.0 && right.unchanged_mae == 0.0);
            let none = judge(&a, &t, &a);
            assert!(!none.correct, "{:?}: {none:?}", ex.edit);
            // The right change with a wash over everything else is still wrong.
            let washed = image::RgbImage::from_fn(128, 96, |x, y| {
                let p = t.get_pixel(x, y).0;
                image::Rgb(p.map(|v| v.saturating_add(20)))
            });
            assert!(!judge(&a, &t, &washed).correct);
        }
    }

    #[test]
    fn held_out_seeds_are_not_training_seeds() {
        let train: std::collections::HashSet<u64> = (0..5000).map(|i| example_seed(0, i)).collect();
        assert!((0..500).all(|i| !train.contains(&held_out_seed(i))));
    }

    #[test]
    fn other_aspects_render_the_same_scene() {
        let s = Scene::random(11);
        for (w, h) in [(256, 192), (192, 256), (100, 100)] {
            let img = s.render(w, h);
            assert_eq!(img.dimensions(), (w, h));
            let labels = s.labels(w, h);
            assert!(labels.iter().any(|l| matches!(l, Label::Flower(_))));
        }
    }
}
