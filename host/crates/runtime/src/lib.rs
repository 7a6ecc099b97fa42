//! selma-runtime: the sandboxed wasmtime host of selma's plugins.
//!
//! One [`Runtime`] owns one wasmtime `Engine` (component model, epoch
//! interruption driven by a ticker thread), the five per-kind linkers, the
//! on-disk cache of compiled components and the registry of bundled
//! plugins (embedded in the binary by `build.rs`). Loading a plugin by
//! bundled name or `.wasm` path gives a typed handle per kind
//! ([`SkillPlugin`], [`GeneratorPlugin`], [`PromptFilterPlugin`],
//! [`ImageFilterPlugin`], [`MergePlugin`]) whose calls run under the
//! sandbox limits of [`RuntimeConfig`]; every error names the plugin.
//!
//! Build: `build.rs` compiles `plugins/` for `wasm32-wasip2` (needs
//! `rustup target add wasm32-wasip2`). Set `SELMA_SKIP_BUNDLED=1` to build
//! without bundled plugins (bootstrap, or a machine without the target):
//! the registry is then empty and only `.wasm` paths load.

#[doc(hidden)]
pub mod bindings;
mod cache;
mod host;
mod params;
mod plugin;
pub mod types;

pub use cache::default_cache_dir;
pub use params::Params;
pub use plugin::{
    GeneratorPlugin, ImageFilterPlugin, MergePlugin, PromptFilterPlugin, SkillPlugin,
};
pub use types::*;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use host::HostState;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine};

mod bundled {
    include!(concat!(env!("OUT_DIR"), "/bundled.rs"));
}

/// How often the ticker thread advances the engine's epoch.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Most log lines kept for [`Runtime::drain_logs`].
const MAX_LOG_LINES: usize = 100_000;

/// One text-completion request from a plugin (OpenAI-compatible semantics).
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    /// The full prompt text.
    pub prompt: String,
    /// Optional system message.
    pub system: Option<String>,
    /// Sampling temperature.
    pub temperature: f32,
    /// Nucleus sampling mass.
    pub top_p: f32,
    /// Most tokens per completion.
    pub max_tokens: u32,
    /// Number of completions.
    pub n: u32,
    /// Stop sequences.
    pub stop: Vec<String>,
}

/// Where the `llm` import sends granted requests (implemented by the host
/// glue over `selma-llm`, or by tests).
pub trait LlmBackend: Send + Sync {
    /// Return `req.n` completions or an error.
    fn complete(&self, req: &CompletionRequest) -> Result<Vec<String>>;
}

/// Sandbox limits and run-wide settings of a [`Runtime`].
#[derive(Clone)]
pub struct RuntimeConfig {
    /// Linear-memory cap per plugin instance (default 256 MiB).
    pub memory_limit: usize,
    /// Wall-clock deadline per plugin call (default 30 s); time spent
    /// waiting on the LLM endpoint does not count.
    pub call_timeout: Duration,
    /// Time one plugin call may spend waiting on the LLM endpoint, all its
    /// requests together (default 30 min): a plugin that keeps asking is
    /// stopped (each request is bounded by the client's own timeout).
    pub llm_wait_limit: Duration,
    /// Cap on data passed into a plugin per call (strings, lists) and on
    /// tensor/image data a plugin copies out (default 64 MiB).
    pub max_input_bytes: usize,
    /// Cap on the data a plugin returns per call (default 16 MiB).
    pub max_output_bytes: usize,
    /// Cap on host tensor memory one instance may hold (default 4 GiB).
    pub max_tensor_bytes: usize,
    /// Cap on the host tensors and images one instance holds at once
    /// (default 65,536): empty tensors cost no bytes but each handle
    /// costs host memory.
    pub max_handles: usize,
    /// Compiled-component cache folder; `None`: [`default_cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Run seed; each plugin's `random` stream is seeded from it and the
    /// plugin's name.
    pub seed: u64,
    /// LLM endpoint for the `llm` import.
    pub llm: Option<Arc<dyn LlmBackend>>,
    /// Plugin names allowed to call the `llm` import.
    pub llm_grants: Vec<String>,
    /// Device of tensors that plugins create.
    pub device: Device,
    /// Also print plugin log lines to stderr (`[plugin] level: message`).
    pub log_to_stderr: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            memory_limit: 256 << 20,
            call_timeout: Duration::from_secs(30),
            llm_wait_limit: Duration::from_secs(30 * 60),
            max_input_bytes: 64 << 20,
            max_output_bytes: 16 << 20,
            max_tensor_bytes: 4 << 30,
            max_handles: 1 << 16,
            cache_dir: None,
            seed: 0,
            llm: None,
            llm_grants: Vec::new(),
            device: Device::Cpu,
            log_to_stderr: true,
        }
    }
}

impl std::fmt::Debug for RuntimeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeConfig")
            .field("memory_limit", &self.memory_limit)
            .field("call_timeout", &self.call_timeout)
            .field("max_input_bytes", &self.max_input_bytes)
            .field("max_output_bytes", &self.max_output_bytes)
            .field("cache_dir", &self.cache_dir)
            .field("seed", &self.seed)
            .field("llm", &self.llm.is_some())
            .field("llm_grants", &self.llm_grants)
            .finish()
    }
}

pub(crate) struct Limits {
    pub(crate) memory: usize,
    pub(crate) timeout: Duration,
    pub(crate) llm_wait: Duration,
    pub(crate) max_input_bytes: usize,
    pub(crate) max_output_bytes: usize,
    pub(crate) max_tensor_bytes: usize,
    pub(crate) max_handles: usize,
}

/// Run-wide state every plugin store points to.
pub(crate) struct Shared {
    pub(crate) limits: Limits,
    pub(crate) seed: u64,
    pub(crate) llm: Option<Arc<dyn LlmBackend>>,
    pub(crate) llm_grants: Vec<String>,
    pub(crate) device: Device,
    log_to_stderr: bool,
    logs: Mutex<Logs>,
}

/// The log lines kept between drains, and how many past the cap each
/// plugin lost.
#[derive(Default)]
struct Logs {
    lines: Vec<LogLine>,
    dropped: std::collections::BTreeMap<String, usize>,
}

impl Shared {
    pub(crate) fn emit_log(&self, line: LogLine) {
        if self.log_to_stderr {
            let level = match line.level {
                LogLevel::Debug => "debug",
                LogLevel::Info => "info",
                LogLevel::Warn => "warn",
                LogLevel::Error => "error",
            };
            eprintln!("[{}] {level}: {}", line.plugin, line.message);
        }
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        if logs.lines.len() < MAX_LOG_LINES {
            logs.lines.push(line);
        } else {
            *logs.dropped.entry(line.plugin).or_default() += 1;
        }
    }
}

pub(crate) struct Inner {
    pub(crate) engine: Engine,
    pub(crate) shared: Arc<Shared>,
    pub(crate) linker: Linker<HostState>,
    fingerprint: String,
    cache_dir: Option<PathBuf>,
    components: Mutex<HashMap<String, Component>>,
    stop_ticker: Arc<AtomicBool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

/// The plugin host: engine, linkers, component cache, bundled registry.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl Runtime {
    /// Create the engine (and its epoch ticker thread) and the linkers.
    pub fn new(cfg: RuntimeConfig) -> Result<Runtime> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        let engine = Engine::new(&config)
            .map_err(anyhow::Error::from)
            .context("creating the wasmtime engine")?;

        let mut linker: Linker<HostState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(anyhow::Error::from)
            .context("linking WASI")?;
        plugin::add_imports_to_linker(&mut linker)
            .map_err(anyhow::Error::from)
            .context("linking the selma imports")?;

        let stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("selma-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
                .context("starting the epoch ticker thread")?;
        }

        let fingerprint = cache::engine_fingerprint(&engine);
        let cache_dir = cfg.cache_dir.clone().or_else(default_cache_dir);
        let shared = Arc::new(Shared {
            limits: Limits {
                memory: cfg.memory_limit,
                timeout: cfg.call_timeout,
                llm_wait: cfg.llm_wait_limit,
                max_input_bytes: cfg.max_input_bytes,
                max_output_bytes: cfg.max_output_bytes,
                max_tensor_bytes: cfg.max_tensor_bytes,
                max_handles: cfg.max_handles,
            },
            seed: cfg.seed,
            llm: cfg.llm,
            llm_grants: cfg.llm_grants,
            device: cfg.device,
            log_to_stderr: cfg.log_to_stderr,
            logs: Mutex::new(Logs::default()),
        });
        Ok(Runtime {
            inner: Arc::new(Inner {
                engine,
                shared,
                linker,
                fingerprint,
                cache_dir,
                components: Mutex::new(HashMap::new()),
                stop_ticker: stop,
            }),
        })
    }

    /// Names of the plugins embedded in this binary, sorted.
    pub fn bundled_names(&self) -> Vec<&'static str> {
        let mut v: Vec<&str> = bundled::BUNDLED.iter().map(|b| b.0).collect();
        v.sort_unstable();
        v
    }

    /// The compiled-component cache folder in use, if any.
    pub fn cache_dir(&self) -> Option<&Path> {
        self.inner.cache_dir.as_deref()
    }

    /// Take the log lines plugins wrote so far. At most 100,000 are kept
    /// between drains; past that, each plugin that lost lines gets one
    /// warning line at the end saying how many.
    pub fn drain_logs(&self) -> Vec<LogLine> {
        let mut logs = self
            .inner
            .shared
            .logs
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Logs { mut lines, dropped } = std::mem::take(&mut *logs);
        for (plugin, n) in dropped {
            lines.push(LogLine {
                message: format!(
                    "{n} further log line(s) dropped: the host keeps at most {MAX_LOG_LINES} \
                     between drains"
                ),
                plugin,
                level: LogLevel::Warn,
            });
        }
        lines
    }

    /// Load a skill plugin (bundled name or `.wasm` path).
    pub fn skill(&self, spec: &str) -> Result<SkillPlugin> {
        let (c, origin) = self.component(spec)?;
        SkillPlugin::load(self.inner.clone(), &c, &origin)
    }

    /// Load a prompt-generator plugin.
    pub fn generator(&self, spec: &str) -> Result<GeneratorPlugin> {
        let (c, origin) = self.component(spec)?;
        GeneratorPlugin::load(self.inner.clone(), &c, &origin)
    }

    /// Load a prompt-filter plugin.
    pub fn prompt_filter(&self, spec: &str) -> Result<PromptFilterPlugin> {
        let (c, origin) = self.component(spec)?;
        PromptFilterPlugin::load(self.inner.clone(), &c, &origin)
    }

    /// Load an image-filter plugin.
    pub fn image_filter(&self, spec: &str) -> Result<ImageFilterPlugin> {
        let (c, origin) = self.component(spec)?;
        ImageFilterPlugin::load(self.inner.clone(), &c, &origin)
    }

    /// Load a merge-strategy plugin.
    pub fn merge_strategy(&self, spec: &str) -> Result<MergePlugin> {
        let (c, origin) = self.component(spec)?;
        MergePlugin::load(self.inner.clone(), &c, &origin)
    }

    /// Which kind a plugin is, from the interfaces its component exports
    /// (no instantiation).
    pub fn kind_of(&self, spec: &str) -> Result<PluginKind> {
        let (c, origin) = self.component(spec)?;
        plugin::detect_kind(&self.inner.engine, &c, &origin)
    }

    /// A plugin's metadata, whatever its kind.
    pub fn inspect(&self, spec: &str) -> Result<Metadata> {
        let (c, origin) = self.component(spec)?;
        let inner = self.inner.clone();
        Ok(
            match plugin::detect_kind(&self.inner.engine, &c, &origin)? {
                PluginKind::Skill => SkillPlugin::load(inner, &c, &origin)?.metadata().clone(),
                PluginKind::PromptGenerator => GeneratorPlugin::load(inner, &c, &origin)?
                    .metadata()
                    .clone(),
                PluginKind::PromptFilter => PromptFilterPlugin::load(inner, &c, &origin)?
                    .metadata()
                    .clone(),
                PluginKind::ImageFilter => ImageFilterPlugin::load(inner, &c, &origin)?
                    .metadata()
                    .clone(),
                PluginKind::MergeStrategy => {
                    MergePlugin::load(inner, &c, &origin)?.metadata().clone()
                }
            },
        )
    }

    /// Metadata of every bundled plugin, sorted by kind then name.
    pub fn list_bundled(&self) -> Result<Vec<Metadata>> {
        let mut out = Vec::new();
        for name in self.bundled_names() {
            out.push(self.inspect(name)?);
        }
        out.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
        Ok(out)
    }

    /// Resolve a spec to a compiled component and a display origin
    /// (`bundled plugin "x"` or the file path).
    fn component(&self, spec: &str) -> Result<(Component, String)> {
        let is_path = spec.ends_with(".wasm") || spec.contains('/') || spec.contains('\\');
        let (bytes, sha, origin): (std::borrow::Cow<[u8]>, String, String) = if is_path {
            let path = Path::new(spec);
            let bytes = std::fs::read(path)
                .with_context(|| format!("reading plugin file {}", path.display()))?;
            let sha = cache::sha256_hex(&bytes);
            (bytes.into(), sha, path.display().to_string())
        } else if let Some(b) = bundled::BUNDLED.iter().find(|b| b.0 == spec) {
            (
                b.2.into(),
                b.1.to_string(),
                format!("bundled plugin \"{spec}\""),
            )
        } else {
            let names = self.bundled_names();
            bail!(
                "no bundled plugin named \"{spec}\" (bundled: {}); to load an external plugin pass \
                 the path of its .wasm file",
                if names.is_empty() { "none in this build".to_string() } else { names.join(", ") }
            );
        };
        check_component_header(&bytes, &origin)?;
        if let Some(c) = self
            .inner
            .components
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&sha)
        {
            return Ok((c.clone(), origin));
        }
        let c = cache::load(
            &self.inner.engine,
            &self.inner.fingerprint,
            self.inner.cache_dir.as_deref(),
            &bytes,
            &sha,
            &origin,
        )?;
        self.inner
            .components
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sha, c.clone());
        Ok((c, origin))
    }
}

/// Refuse anything that is not a WebAssembly component, naming the file.
fn check_component_header(bytes: &[u8], origin: &str) -> Result<()> {
    const MAGIC: &[u8] = b"\0asm";
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        bail!(
            "{origin}: not a WebAssembly component (no `\\0asm` header); a selma plugin is built \
             with `cargo build --release --target wasm32-wasip2`"
        );
    }
    match bytes[4..8] {
        [0x0d, 0x00, 0x01, 0x00] => Ok(()),
        [0x01, 0x00, 0x00, 0x00] => bail!(
            "{origin}: a core WebAssembly module, not a component; build the plugin for \
             `wasm32-wasip2` (or wrap it with `wasm-tools component new`)"
        ),
        _ => bail!("{origin}: not a WebAssembly component (unknown version/layer bytes)"),
    }
}

/// The seed of a plugin's `random` stream: sha256(run seed, plugin name).
pub(crate) fn plugin_seed(seed: u64, name: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(name.as_bytes());
    u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

/// "256 MiB", "4 KiB", "8.2 MiB (8600000 bytes)" or "123 bytes".
pub(crate) fn fmt_bytes(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{} KiB", n >> 10)
    } else if n >= 1 << 20 {
        format!("{:.1} MiB ({n} bytes)", n as f64 / (1u64 << 20) as f64)
    } else {
        format!("{n} bytes")
    }
}

/// "30s", "1.5s".
pub(crate) fn fmt_secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_check_names_the_file_and_the_problem() {
        let e = check_component_header(b"hello world", "x/y.wasm")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x/y.wasm") && e.contains("not a WebAssembly component"),
            "{e}"
        );
        let core = b"\0asm\x01\x00\x00\x00";
        let e = check_component_header(core, "m.wasm")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m.wasm") && e.contains("core WebAssembly module"),
            "{e}"
        );
        check_component_header(b"\0asm\x0d\x00\x01\x00", "c.wasm").unwrap();
    }

    #[test]
    fn handles_can_move_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<Runtime>();
        send::<SkillPlugin>();
        send::<GeneratorPlugin>();
        send::<PromptFilterPlugin>();
        send::<ImageFilterPlugin>();
        send::<MergePlugin>();
    }

    #[test]
    fn plugin_seeds_depend_on_seed_and_name_only() {
        assert_eq!(plugin_seed(7, "dare"), plugin_seed(7, "dare"));
        assert_ne!(plugin_seed(7, "dare"), plugin_seed(8, "dare"));
        assert_ne!(plugin_seed(7, "dare"), plugin_seed(7, "ties"));
    }

    #[test]
    fn byte_and_duration_formatting() {
        assert_eq!(fmt_bytes(256 << 20), "256 MiB");
        assert_eq!(fmt_bytes(4096), "4 KiB");
        assert_eq!(fmt_bytes(1000), "1000 bytes");
        assert_eq!(fmt_bytes((8 << 20) + 8), "8.0 MiB (8388616 bytes)");
        assert_eq!(fmt_secs(Duration::from_secs(30)), "30s");
        assert_eq!(fmt_secs(Duration::from_millis(1500)), "1.5s");
    }

    #[test]
    fn image_stats_match_hand_computed_values() {
        // 2 pixels: (0, 10, 255) and (100, 10, 1).
        let img = RgbImage {
            width: 2,
            height: 1,
            pixels: vec![0, 10, 255, 100, 10, 1],
            non_finite: 0.0,
        };
        let s = img.stats();
        assert_eq!(
            (s[0].mean, s[0].std, s[0].min, s[0].max),
            (50.0, 50.0, 0, 100)
        );
        assert_eq!(
            (s[1].mean, s[1].std, s[1].min, s[1].max),
            (10.0, 0.0, 10, 10)
        );
        assert_eq!(
            (s[2].mean, s[2].std, s[2].min, s[2].max),
            (128.0, 127.0, 1, 255)
        );
    }
}
