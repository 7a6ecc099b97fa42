//! Host-side plain types of the plugin contract (metadata, parameters,
//! skill definitions, verdicts, images, merge inputs/outputs). They mirror
//! the WIT records but do not depend on the generated bindings, so callers
//! of `selma-runtime` never see wasmtime types.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Which of the five plugin kinds a component implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PluginKind {
    /// Seeds, rules and templates for one skill.
    Skill,
    /// Writes candidate prompts.
    PromptGenerator,
    /// Accepts or rejects candidate prompts.
    PromptFilter,
    /// Keeps, rejects or scores generated images.
    ImageFilter,
    /// Merges LoRA experts layer by layer.
    MergeStrategy,
}

impl PluginKind {
    /// All kinds, in contract order.
    pub const ALL: [PluginKind; 5] = [
        PluginKind::Skill,
        PluginKind::PromptGenerator,
        PluginKind::PromptFilter,
        PluginKind::ImageFilter,
        PluginKind::MergeStrategy,
    ];

    /// The WIT name (`merge-strategy`), also the name of the exported interface.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Skill => "skill",
            PluginKind::PromptGenerator => "prompt-generator",
            PluginKind::PromptFilter => "prompt-filter",
            PluginKind::ImageFilter => "image-filter",
            PluginKind::MergeStrategy => "merge-strategy",
        }
    }

    /// Parse a WIT kind name (`skill`, `prompt-generator`, ...).
    pub fn parse(s: &str) -> Option<PluginKind> {
        PluginKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A typed parameter value (the WIT `param-value`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "kebab-case")]
pub enum ParamValue {
    /// `true` / `false`.
    Boolean(bool),
    /// A signed 64-bit integer.
    Integer(i64),
    /// A 64-bit float.
    Number(f64),
    /// Free text.
    Text(String),
}

impl ParamValue {
    /// The type's name as shown to users (`boolean`, `integer`, `number`, `text`).
    pub fn type_name(&self) -> &'static str {
        match self {
            ParamValue::Boolean(_) => "boolean",
            ParamValue::Integer(_) => "integer",
            ParamValue::Number(_) => "number",
            ParamValue::Text(_) => "text",
        }
    }
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Boolean(b) => write!(f, "{b}"),
            ParamValue::Integer(i) => write!(f, "{i}"),
            // Keep a decimal point so a number never reads as an integer.
            ParamValue::Number(x) if x.is_finite() && x.fract() == 0.0 => write!(f, "{x:.1}"),
            ParamValue::Number(x) => write!(f, "{x}"),
            ParamValue::Text(s) => write!(f, "{s:?}"),
        }
    }
}

/// One declared parameter: name, default (fixes the type), help line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamSpec {
    /// Parameter name as used in `--param name=value`.
    pub name: String,
    /// Default value; its variant is the parameter's type.
    pub default: ParamValue,
    /// One-line help.
    pub help: String,
}

/// What a plugin says about itself (`selma plugins list` / `inspect`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// Short unique name, lowercase with dashes.
    pub name: String,
    /// Semantic version of the plugin.
    pub version: String,
    /// The plugin's kind.
    pub kind: PluginKind,
    /// One line: what it does.
    pub description: String,
    /// Longer help (may be empty).
    pub help: String,
    /// Parameter schema.
    pub params: Vec<ParamSpec>,
}

/// Rules for whoever writes a skill's prompts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rules {
    /// Prompts must have fewer words than this.
    pub max_words: u32,
    /// Extra constraints in plain words.
    pub constraints: Vec<String>,
    /// The task instruction put before the examples in an LLM prompt.
    pub instruction: String,
}

/// A named list of values for a template slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Slot {
    /// Slot name as written in patterns (`{name}`).
    pub name: String,
    /// Values the slot takes.
    pub values: Vec<String>,
}

/// Templates for the offline generator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Templates {
    /// Patterns with `{slot}` placeholders.
    pub patterns: Vec<String>,
    /// The slots' values.
    pub slots: Vec<Slot>,
}

/// A skill's definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkillInfo {
    /// Skill id, e.g. `counting`.
    pub id: String,
    /// One line: what the skill teaches.
    pub description: String,
    /// Hand-written seed prompts (three or more).
    pub seeds: Vec<String>,
    /// Prompt-writing rules.
    pub rules: Rules,
    /// Optional templates for offline generation.
    pub templates: Option<Templates>,
}

/// A prompt filter's judgement of one candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Keep the candidate?
    pub keep: bool,
    /// Why it was rejected.
    pub reason: Option<String>,
}

/// An image filter's judgement of one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageVerdict {
    /// Keep the image?
    pub keep: bool,
    /// Score in [0, 1], higher is better.
    pub score: f32,
    /// Why it was rejected.
    pub reason: Option<String>,
}

/// An 8-bit RGB image owned by the host (the WIT `image` resource).
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Row-major RGB bytes, `width * height * 3` long.
    pub pixels: Vec<u8>,
    /// Fraction of pixels flagged non-finite before quantisation.
    pub non_finite: f32,
}

/// Statistics of one image channel over all pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChannelStats {
    /// Mean value in [0, 255].
    pub mean: f32,
    /// Population standard deviation.
    pub std: f32,
    /// Smallest value.
    pub min: u8,
    /// Largest value.
    pub max: u8,
}

impl RgbImage {
    /// Per-channel (R, G, B) statistics, computed in f64.
    pub fn stats(&self) -> [ChannelStats; 3] {
        let n = (self.width as usize) * (self.height as usize);
        let mut sum = [0f64; 3];
        let mut sq = [0f64; 3];
        let mut min = [u8::MAX; 3];
        let mut max = [0u8; 3];
        for px in self.pixels.chunks_exact(3).take(n) {
            for c in 0..3 {
                let v = px[c];
                sum[c] += v as f64;
                sq[c] += (v as f64) * (v as f64);
                min[c] = min[c].min(v);
                max[c] = max[c].max(v);
            }
        }
        std::array::from_fn(|c| {
            if n == 0 {
                return ChannelStats {
                    mean: 0.0,
                    std: 0.0,
                    min: 0,
                    max: 0,
                };
            }
            let mean = sum[c] / n as f64;
            let var = (sq[c] / n as f64 - mean * mean).max(0.0);
            ChannelStats {
                mean: mean as f32,
                std: var.sqrt() as f32,
                min: min[c],
                max: max[c],
            }
        })
    }
}

/// One expert's LoRA factors for the layer being merged.
#[derive(Debug, Clone)]
pub struct ExpertLayer {
    /// up [out, r] (peft `lora_B`, kohya `lora_up`), f32.
    pub up: Tensor,
    /// down [r, in] (`lora_A`, `lora_down`), f32.
    pub down: Tensor,
    /// alpha / rank.
    pub scale: f32,
    /// The user's weight for this expert.
    pub weight: f32,
}

/// What a merge strategy returns for one layer.
#[derive(Debug, Clone)]
pub enum MergedLayer {
    /// Factors whose product is the merged delta (scale 1).
    Factors {
        /// [out, r]
        up: Tensor,
        /// [r, in]
        down: Tensor,
    },
    /// The dense merged delta [out, in].
    Delta(Tensor),
}

/// Severity of a plugin log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Debug detail.
    Debug,
    /// Normal progress.
    Info,
    /// Something looks off.
    Warn,
    /// Something failed.
    Error,
}

/// One message a plugin logged through the `log` import.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    /// The plugin's name.
    pub plugin: String,
    /// Severity.
    pub level: LogLevel,
    /// The message (at most 4 KiB).
    pub message: String,
}
