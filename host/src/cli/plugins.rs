//! `selma plugins`: list the bundled plugins, inspect one (bundled or a
//! `.wasm` file), and scaffold a new plugin crate.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use selma_runtime::{Metadata, PluginKind, Runtime, RuntimeConfig};
use std::path::{Path, PathBuf};

/// List, inspect and scaffold plugins.
#[derive(Subcommand, Debug)]
pub enum PluginsCommand {
    /// List the plugins bundled in this binary (name, kind, version, description).
    List {
        /// Print a JSON array of metadata objects instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a plugin's metadata, help and parameter table.
    Inspect {
        /// A bundled plugin name or the path of a .wasm component.
        #[arg(value_name = "NAME|FILE.wasm")]
        plugin: String,
        /// Print the metadata as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Scaffold a new plugin crate that builds with
    /// `cargo build --release --target wasm32-wasip2`.
    New {
        /// skill, prompt-generator, prompt-filter, image-filter or merge-strategy.
        #[arg(value_parser = ["skill", "prompt-generator", "prompt-filter", "image-filter", "merge-strategy"])]
        kind: String,
        /// The plugin's name: lowercase letters, digits and dashes (e.g. my-merge).
        name: String,
        /// Folder to create the crate in (default: ./<name>).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// Run a `selma plugins` subcommand.
pub fn run(cmd: PluginsCommand) -> Result<()> {
    match cmd {
        PluginsCommand::List { json } => list(json),
        PluginsCommand::Inspect { plugin, json } => inspect(&plugin, json),
        PluginsCommand::New { kind, name, dir } => {
            let kind = PluginKind::parse(&kind).expect("clap checked the kind");
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            scaffold::write_plugin_crate(kind, &name, &dir)?;
            println!("created {} plugin \"{name}\" in {}", kind, dir.display());
            println!("build it: cargo build --release --target wasm32-wasip2 --manifest-path {}/Cargo.toml", dir.display());
            Ok(())
        }
    }
}

fn runtime() -> Result<Runtime> {
    Runtime::new(RuntimeConfig::default())
}

fn list(json: bool) -> Result<()> {
    let rt = runtime()?;
    let all = rt.list_bundled()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    if all.is_empty() {
        println!("no bundled plugins in this build (it was built with SELMA_SKIP_BUNDLED=1)");
        return Ok(());
    }
    let w_name = all.iter().map(|m| m.name.len()).max().unwrap_or(4).max(4);
    let w_kind = all
        .iter()
        .map(|m| m.kind.as_str().len())
        .max()
        .unwrap_or(4)
        .max(4);
    let w_ver = all
        .iter()
        .map(|m| m.version.len())
        .max()
        .unwrap_or(7)
        .max(7);
    println!(
        "{:w_name$}  {:w_kind$}  {:w_ver$}  DESCRIPTION",
        "NAME", "KIND", "VERSION"
    );
    for m in &all {
        println!(
            "{:w_name$}  {:w_kind$}  {:w_ver$}  {}",
            m.name,
            m.kind.as_str(),
            m.version,
            m.description
        );
    }
    Ok(())
}

fn inspect(spec: &str, json: bool) -> Result<()> {
    let rt = runtime()?;
    let m = rt.inspect(spec)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        print!("{}", render_inspect(&m));
    }
    Ok(())
}

/// The human-readable `inspect` page.
fn render_inspect(m: &Metadata) -> String {
    let mut s = format!("{} {} ({})\n{}\n", m.name, m.version, m.kind, m.description);
    if !m.help.trim().is_empty() {
        s.push('\n');
        for line in m.help.trim_end().lines() {
            s.push_str(&wrap(line, 88));
            s.push('\n');
        }
    }
    s.push('\n');
    if m.params.is_empty() {
        s.push_str("parameters: none\n");
        return s;
    }
    s.push_str(&format!(
        "parameters (set with --param {0}.NAME=VALUE on `selma prompts` and `selma merge`, \
         or [params.{0}] NAME = VALUE in pipeline.toml):\n",
        m.name
    ));
    let rows: Vec<[String; 4]> = m
        .params
        .iter()
        .map(|p| {
            [
                p.name.clone(),
                p.default.type_name().to_string(),
                p.default.to_string(),
                p.help.clone(),
            ]
        })
        .collect();
    let head = ["NAME", "TYPE", "DEFAULT", "HELP"];
    let w: Vec<usize> = (0..3)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .max()
                .unwrap_or(0)
                .max(head[i].len())
        })
        .collect();
    s.push_str(&format!(
        "  {:w0$}  {:w1$}  {:w2$}  {}\n",
        head[0],
        head[1],
        head[2],
        head[3],
        w0 = w[0],
        w1 = w[1],
        w2 = w[2]
    ));
    for r in rows {
        s.push_str(&format!(
            "  {:w0$}  {:w1$}  {:w2$}  {}\n",
            r[0],
            r[1],
            r[2],
            r[3],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2]
        ));
    }
    s
}

/// Greedy word wrap of one line to `width` columns.
fn wrap(line: &str, width: usize) -> String {
    let mut out = String::new();
    let mut col = 0;
    for word in line.split_whitespace() {
        if col > 0 && col + 1 + word.len() > width {
            out.push('\n');
            col = 0;
        } else if col > 0 {
            out.push(' ');
            col += 1;
        }
        out.push_str(word);
        col += word.len();
    }
    out
}

/// `selma plugins new`: a compiling plugin crate per kind.
mod scaffold {
    use super::*;

    /// Write Cargo.toml, src/lib.rs and README.md of a new plugin crate.
    pub fn write_plugin_crate(kind: PluginKind, name: &str, dir: &Path) -> Result<()> {
        let valid = name.len() <= 64
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !name.ends_with('-');
        if !valid {
            bail!(
                "plugin name {name:?} is not valid: use lowercase letters, digits and dashes, \
                 starting with a letter (e.g. my-merge)"
            );
        }
        if dir.exists()
            && std::fs::read_dir(dir)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        {
            bail!(
                "{} already exists and is not empty; pick another --dir",
                dir.display()
            );
        }
        std::fs::create_dir_all(dir.join("src"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let files = [
            ("Cargo.toml", cargo_toml(name)),
            ("src/lib.rs", lib_rs(kind, name)),
            ("README.md", readme(kind, name)),
            (".gitignore", "/target\n".to_string()),
        ];
        for (file, text) in files {
            let path = dir.join(file);
            selma_io::write_atomic(&path, text.as_bytes())?;
        }
        Ok(())
    }

    /// The SDK dependency: this source tree's plugin-sdk when it is on disk
    /// (a development build), else the published crate.
    fn sdk_dependency() -> String {
        let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-sdk");
        match sdk.canonicalize() {
            Ok(p) if p.join("Cargo.toml").is_file() => {
                format!(
                    "selma-plugin-sdk = {{ path = {:?} }}",
                    p.display().to_string()
                )
            }
            _ => format!("selma-plugin-sdk = \"{}\"", env!("CARGO_PKG_VERSION")),
        }
    }

    fn cargo_toml(name: &str) -> String {
        format!(
            r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

# A selma plugin is a WebAssembly component: a cdylib built for wasm32-wasip2.
[lib]
crate-type = ["cdylib"]

[dependencies]
{sdk}

# Not part of any enclosing workspace.
[workspace]

# Small components: plugins orchestrate, the host does the heavy maths.
[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
strip = true
panic = "abort"
debug = false
"#,
            sdk = sdk_dependency()
        )
    }

    fn type_name(name: &str) -> String {
        name.split('-')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let mut c = p.chars();
                c.next()
                    .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                    .unwrap_or_default()
            })
            .collect()
    }

    fn lib_rs(kind: PluginKind, name: &str) -> String {
        let ty = type_name(name);
        let (uses, kind_variant, params, body, export) = match kind {
            PluginKind::Skill => (
                "Metadata, Plugin, PluginKind, Rules, Skill, SkillInfo",
                "Skill",
                "vec![]",
                format!(
                    r#"impl Skill for {ty} {{
    fn info() -> SkillInfo {{
        SkillInfo {{
            id: "{name}".into(),
            description: "TODO: one line on what this skill teaches".into(),
            // Three or more hand-written seed prompts.
            seeds: vec![
                "a red apple next to a green pear on a wooden table".into(),
                "a cat sleeping on a blue sofa under a window".into(),
                "two children flying a yellow kite on a beach".into(),
            ],
            rules: Rules {{
                max_words: 30,
                constraints: vec!["describe one scene".into()],
                instruction: "Write new image descriptions in the style of the examples.".into(),
            }},
            templates: None,
        }}
    }}
}}"#
                ),
                "skill",
            ),
            PluginKind::PromptGenerator => (
                "params, random, GenerateRequest, Metadata, Plugin, PluginKind, PromptGenerator",
                "PromptGenerator",
                r#"vec![params::text("suffix", "at sunset", "text appended to a sampled prompt")]"#,
                format!(
                    r#"impl PromptGenerator for {ty} {{
    /// Offline example: append a suffix to prompts sampled from the pool
    /// (or the skill's seeds) with the host's seeded random source.
    fn generate(req: GenerateRequest) -> Result<Vec<String>, String> {{
        let suffix = req.params.str("suffix")?.to_string();
        let source = if req.pool.is_empty() {{ &req.skill.seeds }} else {{ &req.pool }};
        if source.is_empty() {{
            return Err("no seeds or pooled prompts to start from".into());
        }}
        Ok((0..req.wanted)
            .map(|_| {{
                let i = (random::next_u64() % source.len() as u64) as usize;
                format!("{{}} {{suffix}}", source[i])
            }})
            .collect())
    }}
}}"#
                ),
                "prompt_generator",
            ),
            PluginKind::PromptFilter => (
                "params, Metadata, Params, Plugin, PluginKind, PromptFilter, Verdict",
                "PromptFilter",
                r#"vec![params::integer("max-words", 30, "reject prompts with more words than this")]"#,
                format!(
                    r#"impl PromptFilter for {ty} {{
    fn filter(candidates: Vec<String>, _pool: Vec<String>, params: Params) -> Result<Vec<Verdict>, String> {{
        let max = params.i64("max-words")? as usize;
        Ok(candidates
            .iter()
            .map(|c| match c.split_whitespace().count() {{
                n if n > max => selma_plugin_sdk::reject(format!("{{n}} words > {{max}}")),
                _ => selma_plugin_sdk::keep(),
            }})
            .collect())
    }}
}}"#
                ),
                "prompt_filter",
            ),
            PluginKind::ImageFilter => (
                "params, Image, ImageFilter, ImageVerdict, Metadata, Params, Plugin, PluginKind",
                "ImageFilter",
                r#"vec![params::number("min-std", 8.0, "reject images whose mean channel std is below this")]"#,
                format!(
                    r#"impl ImageFilter for {ty} {{
    /// Example: reject flat (near-constant) images; score = contrast.
    fn check(img: &Image, _prompt: String, params: Params) -> Result<ImageVerdict, String> {{
        let min_std = params.f64("min-std")? as f32;
        let stats = img.stats();
        let std = stats.iter().map(|c| c.std).sum::<f32>() / stats.len().max(1) as f32;
        let keep = std >= min_std;
        Ok(ImageVerdict {{
            keep,
            score: (std / 64.0).clamp(0.0, 1.0),
            reason: (!keep).then(|| format!("flat image: channel std {{std:.1}} < {{min_std}}")),
        }})
    }}
}}"#
                ),
                "image_filter",
            ),
            PluginKind::MergeStrategy => (
                "params, tensor, ExpertLayer, MergeStrategy, MergedLayer, Metadata, Params, Plugin, PluginKind, Tensor",
                "MergeStrategy",
                r#"vec![params::number("lambda", 1.0, "multiplier of the merged delta")]"#,
                format!(
                    r#"impl MergeStrategy for {ty} {{
    /// Example: lambda * sum_i weight_i * scale_i * up_i @ down_i, returned
    /// as a dense delta (the host re-factors it to the requested rank).
    /// All maths runs in the host; no tensor data enters the plugin.
    fn merge_layer(
        layer: String,
        experts: Vec<ExpertLayer>,
        _rank: Option<u32>,
        params: Params,
    ) -> Result<MergedLayer, String> {{
        let lambda = params.f32("lambda")?;
        if experts.is_empty() {{
            return Err(format!("{{layer}}: no experts"));
        }}
        let mut deltas: Vec<Tensor> = Vec::with_capacity(experts.len());
        let mut weights = Vec::with_capacity(experts.len());
        for e in &experts {{
            deltas.push(e.up.matmul(&e.down)?);
            weights.push(lambda * e.weight * e.scale);
        }}
        let refs: Vec<&Tensor> = deltas.iter().collect();
        Ok(MergedLayer::Delta(tensor::weighted_sum(&refs, &weights)?))
    }}
}}"#
                ),
                "merge_strategy",
            ),
        };
        format!(
            r#"//! {name}: a selma {kind} plugin (scaffolded by `selma plugins new`).

use selma_plugin_sdk::{{{uses}}};

struct {ty};

impl Plugin for {ty} {{
    fn metadata() -> Metadata {{
        Metadata {{
            name: "{name}".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::{kind_variant},
            description: "TODO: one line on what {name} does".into(),
            help: String::new(),
            params: {params},
        }}
    }}
}}

{body}

selma_plugin_sdk::export!({export}: {ty});
"#
        )
    }

    fn readme(kind: PluginKind, name: &str) -> String {
        let file = name.replace('-', "_");
        format!(
            r#"# {name}

A selma {kind} plugin (a WebAssembly component).

Build (once: `rustup target add wasm32-wasip2`):

    cargo build --release --target wasm32-wasip2

The component is `target/wasm32-wasip2/release/{file}.wasm`. Check it loads:

    selma plugins inspect target/wasm32-wasip2/release/{file}.wasm

and use it wherever selma takes a plugin name, by path. Plugins run
sandboxed: no files, network or environment; a memory cap and a deadline
per call.
"#
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use selma_runtime::{ParamSpec, ParamValue};

    #[test]
    fn inspect_page_shows_every_parameter_with_type_and_default() {
        let m = Metadata {
            name: "ties".into(),
            version: "0.1.0".into(),
            kind: PluginKind::MergeStrategy,
            description: "TIES merging".into(),
            help: "trim, elect, merge".into(),
            params: vec![
                ParamSpec {
                    name: "density".into(),
                    default: ParamValue::Number(0.2),
                    help: "kept fraction".into(),
                },
                ParamSpec {
                    name: "variant".into(),
                    default: ParamValue::Text("linear".into()),
                    help: "h".into(),
                },
            ],
        };
        let page = render_inspect(&m);
        assert!(
            page.starts_with("ties 0.1.0 (merge-strategy)\nTIES merging\n"),
            "{page}"
        );
        assert!(
            page.contains("  density  number  0.2       kept fraction\n"),
            "{page}"
        );
        assert!(
            page.contains("  variant  text    \"linear\"  h\n"),
            "{page}"
        );
    }

    #[test]
    fn help_is_wrapped_without_losing_words() {
        let text = "alpha beta gamma delta epsilon zeta eta theta iota kappa";
        let w = wrap(text, 12);
        assert!(w.lines().all(|l| l.len() <= 12), "{w}");
        assert_eq!(w.split_whitespace().collect::<Vec<_>>().join(" "), text);
    }
}
