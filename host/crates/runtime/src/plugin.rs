//! Plugin instances: a [`Sandbox`] per loaded plugin (store + bindings,
//! re-instantiated from the `InstancePre` after any trap or deadline), the
//! typed handle of each kind, conversions between the generated WIT types
//! and [`crate::types`], input/output size caps and error messages that
//! name the plugin and say what happened.

use crate::bindings::{generator, image_filter, merge, prompt_filter, skill};
use crate::host::HostState;
use crate::params::Params;
use crate::types::*;
use crate::{fmt_bytes, fmt_secs, Inner};
use anyhow::{anyhow, bail, Result};
use candle_core::Tensor;
use std::sync::Arc;
use wasmtime::component::{Component, HasSelf, Linker, Resource};
use wasmtime::{Engine, Store, Trap, UpdateDeadline};

use merge::selma::plugin::types as wt;

/// Epoch ticks between deadline checks (ticks are 10 ms).
const CHECK_TICKS: u64 = 2;

/// Add every selma host import (log, random, llm, tensor, image and the
/// type-only interfaces) to a linker. One linker serves all five worlds: a
/// component may import less than its world allows (wit-component drops
/// unused imports), and never gets more than the contract's interfaces.
pub(crate) fn add_imports_to_linker(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use generator::selma::plugin::{llm, skill as wskill};
    use image_filter::selma::plugin::image;
    use merge::selma::plugin::{log, random, tensor, types};
    fn get(s: &mut HostState) -> &mut HostState {
        s
    }
    types::add_to_linker::<_, HasSelf<HostState>>(l, get)?;
    log::add_to_linker::<_, HasSelf<HostState>>(l, get)?;
    random::add_to_linker::<_, HasSelf<HostState>>(l, get)?;
    llm::add_to_linker::<_, HasSelf<HostState>>(l, get)?;
    tensor::add_to_linker::<_, HasSelf<HostState>>(l, get)?;
    image::add_to_linker::<_, HasSelf<HostState>>(l, get)?;
    wskill::add_to_linker::<_, HasSelf<HostState>>(l, get)?;
    Ok(())
}

/// The plugin kind a component implements, from its exported interfaces.
pub(crate) fn detect_kind(engine: &Engine, c: &Component, origin: &str) -> Result<PluginKind> {
    let ty = c.component_type();
    let names: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
    for n in &names {
        let bare = n.split('@').next().unwrap_or(n);
        if let Some(k) = bare
            .strip_prefix("selma:plugin/")
            .and_then(PluginKind::parse)
        {
            return Ok(k);
        }
    }
    bail!(
        "{origin}: not a selma plugin: it exports none of selma:plugin/{{skill, prompt-generator, \
         prompt-filter, image-filter, merge-strategy}} (exports: {})",
        if names.is_empty() {
            "nothing".to_string()
        } else {
            names.join(", ")
        }
    )
}

/// One generated world binding, as the sandbox needs it.
pub(crate) trait World: Sized + Send + 'static {
    type Pre: Clone + Send + Sync;
    const KIND: PluginKind;
    fn pre(inner: &Inner, c: &Component) -> wasmtime::Result<Self::Pre>;
    fn instantiate(pre: &Self::Pre, store: &mut Store<HostState>) -> wasmtime::Result<Self>;
    fn metadata(&self, store: &mut Store<HostState>) -> wasmtime::Result<wt::Metadata>;
}

macro_rules! world {
    ($ty:ty, $pre:ty, $kind:expr) => {
        impl World for $ty {
            type Pre = $pre;
            const KIND: PluginKind = $kind;
            fn pre(inner: &Inner, c: &Component) -> wasmtime::Result<$pre> {
                <$pre>::new(inner.linker.instantiate_pre(c)?)
            }
            fn instantiate(pre: &$pre, store: &mut Store<HostState>) -> wasmtime::Result<Self> {
                pre.instantiate(store)
            }
            fn metadata(&self, store: &mut Store<HostState>) -> wasmtime::Result<wt::Metadata> {
                self.selma_plugin_plugin().call_metadata(store)
            }
        }
    };
}

world!(
    skill::SkillPlugin,
    skill::SkillPluginPre<HostState>,
    PluginKind::Skill
);
world!(
    generator::PromptGeneratorPlugin,
    generator::PromptGeneratorPluginPre<HostState>,
    PluginKind::PromptGenerator
);
world!(
    prompt_filter::PromptFilterPlugin,
    prompt_filter::PromptFilterPluginPre<HostState>,
    PluginKind::PromptFilter
);
world!(
    image_filter::ImageFilterPlugin,
    image_filter::ImageFilterPluginPre<HostState>,
    PluginKind::ImageFilter
);
world!(
    merge::MergeStrategyPlugin,
    merge::MergeStrategyPluginPre<HostState>,
    PluginKind::MergeStrategy
);

/// A loaded plugin: its `InstancePre`, its metadata and (while healthy) a
/// live store + instance. Any trap discards the live instance; the next
/// call instantiates a fresh one.
pub(crate) struct Sandbox<W: World> {
    inner: Arc<Inner>,
    pre: W::Pre,
    live: Option<(Store<HostState>, W)>,
    meta: Metadata,
    /// Where it came from (`bundled plugin "x"` or the file path); errors
    /// before the metadata is known name this instead of the plugin.
    origin: String,
    loaded: bool,
    /// Where the next fresh instance's `random` stream starts (None: at
    /// the plugin's seed).
    random_from: Option<u64>,
}

impl<W: World> Sandbox<W> {
    fn load(inner: Arc<Inner>, c: &Component, origin: &str) -> Result<Sandbox<W>> {
        let kind = detect_kind(&inner.engine, c, origin)?;
        if kind != W::KIND {
            bail!(
                "{origin} is a {kind} plugin, but a {} plugin is needed here",
                W::KIND
            );
        }
        let pre = W::pre(&inner, c).map_err(|e| {
            anyhow!(
                "{origin}: cannot link the {} plugin: {e:#} (was it built against selma:plugin@0.1.0 \
                 with wasm32-wasip2?)",
                W::KIND
            )
        })?;
        let placeholder = Metadata {
            name: origin.to_string(),
            version: String::new(),
            kind: W::KIND,
            description: String::new(),
            help: String::new(),
            params: Vec::new(),
        };
        let mut sb = Sandbox {
            inner,
            pre,
            live: None,
            meta: placeholder,
            origin: origin.to_string(),
            loaded: false,
            random_from: None,
        };
        let raw = sb.call("metadata", |w: &W, store| w.metadata(store))?;
        let meta = convert_metadata(raw, origin)?;
        if meta.kind != W::KIND {
            bail!(
                "plugin \"{}\" ({origin}): invalid return: metadata says kind {} but the component \
                 implements {}",
                meta.name,
                meta.kind,
                W::KIND
            );
        }
        sb.meta = meta;
        sb.loaded = true;
        // The live instance was created under the placeholder name: start
        // afresh so logs, grants and the random seed use the real name.
        sb.live = None;
        Ok(sb)
    }

    fn name(&self) -> &str {
        &self.meta.name
    }

    fn new_store(&self) -> Store<HostState> {
        let mut state = HostState::new(&self.meta.name, self.inner.shared.clone());
        if let Some(r) = self.random_from {
            state.set_random_state(r);
        }
        let mut store = Store::new(&self.inner.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(CHECK_TICKS);
        let timeout = self.inner.shared.limits.timeout;
        store.epoch_deadline_callback(move |ctx| {
            if ctx.data().elapsed() > timeout {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Continue(CHECK_TICKS))
            }
        });
        store
    }

    /// Run one call on the live instance (instantiating one if needed).
    /// A wasmtime error (trap, deadline, out of memory, host error) discards
    /// the instance and becomes an error naming the plugin.
    fn call<R>(
        &mut self,
        what: &str,
        f: impl FnOnce(&W, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R> {
        if self.live.is_none() {
            let mut store = self.new_store();
            store.data_mut().begin_call();
            match W::instantiate(&self.pre, &mut store) {
                Ok(w) => self.live = Some((store, w)),
                Err(e) => return Err(self.describe(e, store.data(), "instantiation")),
            }
        }
        let (store, w) = self.live.as_mut().expect("instantiated above");
        store.data_mut().begin_call();
        store.set_epoch_deadline(CHECK_TICKS);
        match f(w, store) {
            Ok(v) => Ok(v),
            Err(e) => {
                let (store, _) = self.live.take().expect("live");
                Err(self.describe(e, store.data(), what))
            }
        }
    }

    /// The position of the plugin's `random` stream: the live instance's,
    /// else where a fresh instance would start.
    fn random_state(&self) -> u64 {
        match &self.live {
            Some((store, _)) => store.data().random_state(),
            None => self.random_from.unwrap_or_else(|| {
                HostState::new(&self.meta.name, self.inner.shared.clone()).random_state()
            }),
        }
    }

    /// Continue the `random` stream from `state` (a value of `random_state`),
    /// in the live instance and in any instance made after a trap.
    fn set_random_state(&mut self, state: u64) {
        self.random_from = Some(state);
        if let Some((store, _)) = &mut self.live {
            store.data_mut().set_random_state(state);
        }
    }

    fn describe(&self, e: wasmtime::Error, st: &HostState, what: &str) -> anyhow::Error {
        let limits = &self.inner.shared.limits;
        let output = st.call_output();
        let trap = e.downcast_ref::<Trap>().copied();
        let reason = if st.limiter.hit {
            format!("out of memory (limit {})", fmt_bytes(limits.memory))
        } else if trap == Some(Trap::Interrupt) {
            format!("deadline of {} exceeded", fmt_secs(limits.timeout))
        } else if let Some(p) = panic_message(&output) {
            format!("panicked: {p}")
        } else if let Some(t) = trap {
            let t = match t {
                Trap::StackOverflow => {
                    "stack overflow: the wasm call stack is exhausted (unbounded or too deep \
                     recursion)"
                        .to_string()
                }
                // Rust and C guests keep their stack in linear memory below
                // the data; running out of it wraps the stack pointer past
                // the memory's end. Safe Rust cannot reach this otherwise.
                Trap::MemoryOutOfBounds => "out of bounds memory access, most likely a stack \
                     overflow (unbounded or too deep recursion overruns the guest's shadow \
                     stack, 1 MiB in Rust's default)"
                    .to_string(),
                t => t.to_string(),
            };
            let tail = tail(&output, 2000);
            if tail.is_empty() {
                format!("trapped: {t}")
            } else {
                format!("trapped: {t}; its output:\n{tail}")
            }
        } else {
            // A host import refused the call (bad tensor, table error...):
            // its message, without the wasm backtrace context around it.
            format!("host call failed: {}", e.root_cause())
        };
        if self.loaded {
            anyhow!("plugin \"{}\": {what}: {reason}", self.meta.name)
        } else {
            anyhow!("{}: {what}: {reason}", self.origin)
        }
    }

    fn check_input(&self, what: &str, bytes: usize) -> Result<()> {
        let cap = self.inner.shared.limits.max_input_bytes;
        if bytes > cap {
            bail!(
                "plugin \"{}\": {what}: input of {} exceeds the limit of {} (max_input_bytes)",
                self.name(),
                fmt_bytes(bytes),
                fmt_bytes(cap)
            );
        }
        Ok(())
    }

    fn check_output(&self, what: &str, bytes: usize) -> Result<()> {
        let cap = self.inner.shared.limits.max_output_bytes;
        if bytes > cap {
            bail!(
                "plugin \"{}\": {what}: invalid return: {} of data exceeds the limit of {} \
                 (max_output_bytes)",
                self.name(),
                fmt_bytes(bytes),
                fmt_bytes(cap)
            );
        }
        Ok(())
    }

    fn invalid(&self, what: &str, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("plugin \"{}\": {what}: invalid return: {msg}", self.name())
    }

    fn failed(&self, what: &str, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("plugin \"{}\": {what} failed: {msg}", self.name())
    }

    fn wit_params(&self, params: &Params) -> Result<Vec<wt::Param>> {
        if params.plugin() != self.name() {
            bail!(
                "plugin \"{}\": parameters were validated for plugin \"{}\"",
                self.name(),
                params.plugin()
            );
        }
        Ok(params
            .values()
            .iter()
            .map(|(n, v)| wt::Param {
                name: n.clone(),
                value: to_wit_value(v),
            })
            .collect())
    }
}

/// The panic message in a guest's captured stderr, with its location.
fn panic_message(output: &str) -> Option<String> {
    let start = output.find("panicked at ")?;
    let rest = &output[start + "panicked at ".len()..];
    let (location, body) = match rest.split_once('\n') {
        Some((loc, body)) => (loc.trim_end_matches(':'), body),
        None => (rest.trim_end_matches(':'), ""),
    };
    let body = body.split("\nnote: ").next().unwrap_or(body).trim();
    let body = tail(body, 2000);
    Some(if body.is_empty() {
        format!("at {location}")
    } else {
        format!("{body} (at {location})")
    })
}

fn tail(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.len() <= max {
        return s.to_string();
    }
    let mut cut = s.len() - max;
    while !s.is_char_boundary(cut) {
        cut += 1;
    }
    format!("...{}", &s[cut..])
}

fn to_wit_value(v: &ParamValue) -> wt::ParamValue {
    match v {
        ParamValue::Boolean(b) => wt::ParamValue::Boolean(*b),
        ParamValue::Integer(i) => wt::ParamValue::Integer(*i),
        ParamValue::Number(x) => wt::ParamValue::Number(*x),
        ParamValue::Text(s) => wt::ParamValue::Text(s.clone()),
    }
}

fn from_wit_value(v: wt::ParamValue) -> ParamValue {
    match v {
        wt::ParamValue::Boolean(b) => ParamValue::Boolean(b),
        wt::ParamValue::Integer(i) => ParamValue::Integer(i),
        wt::ParamValue::Number(x) => ParamValue::Number(x),
        wt::ParamValue::Text(s) => ParamValue::Text(s),
    }
}

fn convert_metadata(m: wt::Metadata, origin: &str) -> Result<Metadata> {
    let kind = match m.kind {
        wt::PluginKind::Skill => PluginKind::Skill,
        wt::PluginKind::PromptGenerator => PluginKind::PromptGenerator,
        wt::PluginKind::PromptFilter => PluginKind::PromptFilter,
        wt::PluginKind::ImageFilter => PluginKind::ImageFilter,
        wt::PluginKind::MergeStrategy => PluginKind::MergeStrategy,
    };
    let name_ok = !m.name.is_empty()
        && m.name.len() <= 64
        && m.name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !name_ok {
        bail!(
            "{origin}: metadata: invalid return: plugin name {:?} must be 1-64 characters of \
             lowercase letters, digits and dashes",
            m.name
        );
    }
    check_metadata_sizes(&m, origin)?;
    let mut params = Vec::with_capacity(m.params.len());
    for p in m.params {
        if p.name.is_empty() || params.iter().any(|q: &ParamSpec| q.name == p.name) {
            bail!(
                "plugin \"{}\" ({origin}): metadata: invalid return: parameter name {:?} is empty \
                 or declared twice",
                m.name,
                p.name
            );
        }
        params.push(ParamSpec {
            name: p.name,
            default: from_wit_value(p.default),
            help: p.help,
        });
    }
    Ok(Metadata {
        name: m.name,
        version: m.version,
        kind,
        description: m.description,
        help: m.help,
        params,
    })
}

/// Caps on what a plugin's metadata may hold (`plugins inspect` prints
/// it, every run hashes it): (field, limit in bytes or items).
pub const METADATA_LIMITS: [(&str, usize); 6] = [
    ("version", 64),
    ("description", 1024),
    ("help", 64 * 1024),
    ("params", 256),
    ("param help", 4096),
    ("param default", 4096),
];

fn check_metadata_sizes(m: &wt::Metadata, origin: &str) -> Result<()> {
    let text_default = |v: &wt::ParamValue| match v {
        wt::ParamValue::Text(t) => t.len(),
        _ => 0,
    };
    let sizes = [
        m.version.len(),
        m.description.len(),
        m.help.len(),
        m.params.len(),
        m.params.iter().map(|p| p.help.len()).max().unwrap_or(0),
        m.params
            .iter()
            .map(|p| text_default(&p.default))
            .max()
            .unwrap_or(0),
    ];
    for ((field, cap), got) in METADATA_LIMITS.iter().zip(sizes) {
        if got > *cap {
            let (got, cap) = if *field == "params" {
                (format!("{got} parameters"), format!("{cap}"))
            } else {
                (fmt_bytes(got), fmt_bytes(*cap))
            };
            bail!(
                "plugin \"{}\" ({origin}): metadata: invalid return: {field} of {got} exceeds \
                 the limit of {cap}",
                m.name
            );
        }
    }
    Ok(())
}

fn strings_bytes(v: &[String]) -> usize {
    v.iter().map(|s| s.len() + 8).sum()
}

fn skill_info_bytes(s: &SkillInfo) -> usize {
    let t = s.templates.as_ref().map_or(0, |t| {
        strings_bytes(&t.patterns)
            + t.slots
                .iter()
                .map(|s| s.name.len() + strings_bytes(&s.values))
                .sum::<usize>()
    });
    s.id.len()
        + s.description.len()
        + strings_bytes(&s.seeds)
        + strings_bytes(&s.rules.constraints)
        + s.rules.instruction.len()
        + t
}

macro_rules! common_methods {
    () => {
        /// The plugin's metadata (read once at load).
        pub fn metadata(&self) -> &Metadata {
            &self.sb.meta
        }

        /// The plugin's name.
        pub fn name(&self) -> &str {
            self.sb.name()
        }

        /// Validate `key=value` strings against the parameter schema.
        pub fn params(&self, given: &[(String, String)]) -> Result<Params> {
            Params::from_strings(&self.sb.meta, given)
        }

        /// Validate a TOML table against the parameter schema.
        pub fn params_toml(&self, table: &toml::Table) -> Result<Params> {
            Params::from_toml(&self.sb.meta, table)
        }

        /// Every parameter at its default.
        pub fn default_params(&self) -> Params {
            Params::defaults(&self.sb.meta)
        }

        /// The position of the plugin's `random` stream, to resume work
        /// where it stopped ([`Self::set_random_state`]).
        pub fn random_state(&self) -> u64 {
            self.sb.random_state()
        }

        /// Continue the plugin's `random` stream from a position that
        /// [`Self::random_state`] returned.
        pub fn set_random_state(&mut self, state: u64) {
            self.sb.set_random_state(state)
        }
    };
}

/// A loaded `skill` plugin.
pub struct SkillPlugin {
    sb: Sandbox<skill::SkillPlugin>,
}

impl SkillPlugin {
    pub(crate) fn load(inner: Arc<Inner>, c: &Component, origin: &str) -> Result<Self> {
        Ok(SkillPlugin {
            sb: Sandbox::load(inner, c, origin)?,
        })
    }

    common_methods!();

    /// The skill's definition (seeds, rules, templates).
    pub fn info(&mut self) -> Result<SkillInfo> {
        let what = "info";
        let s = self
            .sb
            .call(what, |w, store| w.selma_plugin_skill().call_info(store))?;
        let info = SkillInfo {
            id: s.id,
            description: s.description,
            seeds: s.seeds,
            rules: Rules {
                max_words: s.rules.max_words,
                constraints: s.rules.constraints,
                instruction: s.rules.instruction,
            },
            templates: s.templates.map(|t| Templates {
                patterns: t.patterns,
                slots: t
                    .slots
                    .into_iter()
                    .map(|s| Slot {
                        name: s.name,
                        values: s.values,
                    })
                    .collect(),
            }),
        };
        self.sb.check_output(what, skill_info_bytes(&info))?;
        if info.id.is_empty() {
            return Err(self.sb.invalid(what, "empty skill id"));
        }
        if info.seeds.len() < 3 || info.seeds.iter().any(|s| s.trim().is_empty()) {
            return Err(self.sb.invalid(
                what,
                format!(
                    "a skill needs three or more non-empty seed prompts, got {}",
                    info.seeds.len()
                ),
            ));
        }
        Ok(info)
    }
}

/// A loaded `prompt-generator` plugin.
pub struct GeneratorPlugin {
    sb: Sandbox<generator::PromptGeneratorPlugin>,
}

impl GeneratorPlugin {
    pub(crate) fn load(inner: Arc<Inner>, c: &Component, origin: &str) -> Result<Self> {
        Ok(GeneratorPlugin {
            sb: Sandbox::load(inner, c, origin)?,
        })
    }

    common_methods!();

    /// Propose candidate prompts for `skill` given the accepted `pool`.
    pub fn generate(
        &mut self,
        skill: &SkillInfo,
        pool: &[String],
        wanted: u32,
        round: u32,
        params: &Params,
    ) -> Result<Vec<String>> {
        use generator::selma::plugin::skill as ws;
        let what = "generate";
        self.sb
            .check_input(what, skill_info_bytes(skill) + strings_bytes(pool))?;
        let req = generator::exports::selma::plugin::prompt_generator::GenerateRequest {
            skill: ws::SkillInfo {
                id: skill.id.clone(),
                description: skill.description.clone(),
                seeds: skill.seeds.clone(),
                rules: ws::Rules {
                    max_words: skill.rules.max_words,
                    constraints: skill.rules.constraints.clone(),
                    instruction: skill.rules.instruction.clone(),
                },
                templates: skill.templates.as_ref().map(|t| ws::Templates {
                    patterns: t.patterns.clone(),
                    slots: t
                        .slots
                        .iter()
                        .map(|s| ws::Slot {
                            name: s.name.clone(),
                            values: s.values.clone(),
                        })
                        .collect(),
                }),
            },
            pool: pool.to_vec(),
            wanted,
            round,
            params: self.sb.wit_params(params)?,
        };
        let r = self.sb.call(what, |w, store| {
            w.selma_plugin_prompt_generator().call_generate(store, &req)
        })?;
        let out = r.map_err(|m| self.sb.failed(what, m))?;
        self.sb.check_output(what, strings_bytes(&out))?;
        Ok(out)
    }
}

/// A loaded `prompt-filter` plugin.
pub struct PromptFilterPlugin {
    sb: Sandbox<prompt_filter::PromptFilterPlugin>,
}

impl PromptFilterPlugin {
    pub(crate) fn load(inner: Arc<Inner>, c: &Component, origin: &str) -> Result<Self> {
        Ok(PromptFilterPlugin {
            sb: Sandbox::load(inner, c, origin)?,
        })
    }

    common_methods!();

    /// Judge `candidates` in order against the accepted `pool`: one verdict
    /// per candidate.
    pub fn filter(
        &mut self,
        candidates: &[String],
        pool: &[String],
        params: &Params,
    ) -> Result<Vec<Verdict>> {
        let what = "filter";
        self.sb
            .check_input(what, strings_bytes(candidates) + strings_bytes(pool))?;
        let p = self.sb.wit_params(params)?;
        let r = self.sb.call(what, |w, store| {
            w.selma_plugin_prompt_filter()
                .call_filter(store, candidates, pool, &p)
        })?;
        let out = r.map_err(|m| self.sb.failed(what, m))?;
        let bytes: usize = out
            .iter()
            .map(|v| 8 + v.reason.as_ref().map_or(0, |r| r.len()))
            .sum();
        self.sb.check_output(what, bytes)?;
        if out.len() != candidates.len() {
            return Err(self.sb.invalid(
                what,
                format!("{} verdicts for {} candidates", out.len(), candidates.len()),
            ));
        }
        Ok(out
            .into_iter()
            .map(|v| Verdict {
                keep: v.keep,
                reason: v.reason,
            })
            .collect())
    }
}

/// A loaded `image-filter` plugin.
pub struct ImageFilterPlugin {
    sb: Sandbox<image_filter::ImageFilterPlugin>,
}

impl ImageFilterPlugin {
    pub(crate) fn load(inner: Arc<Inner>, c: &Component, origin: &str) -> Result<Self> {
        Ok(ImageFilterPlugin {
            sb: Sandbox::load(inner, c, origin)?,
        })
    }

    common_methods!();

    /// Judge one image made for `prompt`.
    pub fn check(&mut self, img: &RgbImage, prompt: &str, params: &Params) -> Result<ImageVerdict> {
        let what = "check";
        let need = (img.width as usize) * (img.height as usize) * 3;
        if img.pixels.len() != need {
            bail!(
                "plugin \"{}\": check: image of {}x{} has {} bytes, expected {need}",
                self.name(),
                img.width,
                img.height,
                img.pixels.len()
            );
        }
        self.sb.check_input(what, prompt.len())?;
        let p = self.sb.wit_params(params)?;
        let r = self.sb.call(what, |w, store| {
            let handle = store.data_mut().push_image(img.clone())?;
            let rep = handle.rep();
            let r = w
                .selma_plugin_image_filter()
                .call_check(&mut *store, handle, prompt, &p);
            let _ = store.data_mut().take_image(Resource::new_own(rep));
            r
        })?;
        let v = r.map_err(|m| self.sb.failed(what, m))?;
        self.sb
            .check_output(what, v.reason.as_ref().map_or(0, |r| r.len()))?;
        if !(0.0..=1.0).contains(&v.score) {
            return Err(self
                .sb
                .invalid(what, format!("score {} is not in [0, 1]", v.score)));
        }
        Ok(ImageVerdict {
            keep: v.keep,
            score: v.score,
            reason: v.reason,
        })
    }
}

/// A loaded `merge-strategy` plugin.
pub struct MergePlugin {
    sb: Sandbox<merge::MergeStrategyPlugin>,
}

impl MergePlugin {
    pub(crate) fn load(inner: Arc<Inner>, c: &Component, origin: &str) -> Result<Self> {
        Ok(MergePlugin {
            sb: Sandbox::load(inner, c, origin)?,
        })
    }

    common_methods!();

    /// Merge one layer's experts. Returned factors satisfy up [out, r],
    /// down [r, in]; a delta is [out, in] (checked).
    pub fn merge_layer(
        &mut self,
        layer: &str,
        experts: &[ExpertLayer],
        rank: Option<u32>,
        params: &Params,
    ) -> Result<MergedLayer> {
        use merge::exports::selma::plugin::merge_strategy as wm;
        let what = format!("merge-layer {layer}");
        let Some(first) = experts.first() else {
            bail!("plugin \"{}\": {what}: no experts given", self.name());
        };
        let (out_f, in_f) = (first.up.dims2()?.0, first.down.dims2()?.1);
        for (i, e) in experts.iter().enumerate() {
            let (o, r) = e.up.dims2()?;
            let (r2, n) = e.down.dims2()?;
            if o != out_f || n != in_f || r != r2 {
                bail!(
                    "plugin \"{}\": {what}: expert {i} has up {:?} and down {:?}, expected [{out_f}, r] \
                     and [r, {in_f}]",
                    self.name(),
                    e.up.dims(),
                    e.down.dims()
                );
            }
        }
        self.sb.check_input(&what, layer.len())?;
        let p = self.sb.wit_params(params)?;
        let r = self.sb.call(&what, |w, store| {
            // The expert tensors are passed as OWNED handles: the guest
            // drops them (or the store is discarded after a trap).
            let st = store.data_mut();
            let push = |st: &mut HostState, t: &Tensor| -> wasmtime::Result<Resource<Tensor>> {
                st.push_tensor(t.clone()).map_err(wasmtime::Error::msg)
            };
            let mut wit = Vec::with_capacity(experts.len());
            for e in experts {
                let up = push(st, &e.up)?;
                let down = push(st, &e.down)?;
                wit.push(wm::ExpertLayer {
                    up,
                    down,
                    scale: e.scale,
                    weight: e.weight,
                });
            }
            let r = w.selma_plugin_merge_strategy().call_merge_layer(
                &mut *store,
                layer,
                &wit,
                rank,
                &p,
            );
            Ok(match r? {
                Ok(wm::MergedLayer::Factors((u, d))) => {
                    let st = store.data_mut();
                    Ok(MergedLayer::Factors {
                        up: st.take_tensor(u)?,
                        down: st.take_tensor(d)?,
                    })
                }
                Ok(wm::MergedLayer::Delta(t)) => {
                    Ok(MergedLayer::Delta(store.data_mut().take_tensor(t)?))
                }
                Err(m) => Err(m),
            })
        })?;
        let merged = r.map_err(|m| self.sb.failed(&what, m))?;
        match &merged {
            MergedLayer::Factors { up, down } => {
                let ok = matches!((up.dims(), down.dims()), ([o, r], [r2, n]) if *o == out_f && *n == in_f && r == r2 && *r > 0);
                if !ok {
                    return Err(self.sb.invalid(
                        &what,
                        format!(
                            "factors up {:?} / down {:?} do not have the shapes [{out_f}, r] / [r, {in_f}]",
                            up.dims(),
                            down.dims()
                        ),
                    ));
                }
            }
            MergedLayer::Delta(d) => {
                if d.dims() != [out_f, in_f] {
                    return Err(self.sb.invalid(
                        &what,
                        format!("delta has shape {:?}, expected [{out_f}, {in_f}]", d.dims()),
                    ));
                }
            }
        }
        Ok(merged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_message_is_extracted_with_location() {
        let err = "\nthread '<unnamed>' panicked at src/lib.rs:12:5:\nboom: 42\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            panic_message(err).as_deref(),
            Some("boom: 42 (at src/lib.rs:12:5)")
        );
        assert_eq!(panic_message("no panic here"), None);
    }

    fn meta() -> wt::Metadata {
        wt::Metadata {
            name: "big-talker".into(),
            version: "0.1.0".into(),
            kind: wt::PluginKind::PromptFilter,
            description: "a filter".into(),
            help: String::new(),
            params: vec![wt::ParamSpec {
                name: "k".into(),
                default: wt::ParamValue::Text("x".into()),
                help: "a knob".into(),
            }],
        }
    }

    #[test]
    fn oversized_metadata_is_an_error_naming_the_plugin_and_field() {
        assert!(convert_metadata(meta(), "big.wasm").is_ok());
        type Edit = fn(&mut wt::Metadata);
        let cases: [(&str, Edit); 6] = [
            ("version of 65 bytes", |m| m.version = "1".repeat(65)),
            ("description of 10 MiB exceeds the limit of 1 KiB", |m| {
                m.description = "x".repeat(10 << 20)
            }),
            ("help of 65537 bytes", |m| {
                m.help = "h".repeat(64 * 1024 + 1)
            }),
            ("params of 257 parameters exceeds the limit of 256", |m| {
                let p = m.params[0].clone();
                m.params = (0..257)
                    .map(|i| wt::ParamSpec {
                        name: format!("k{i}"),
                        ..p.clone()
                    })
                    .collect();
            }),
            ("param help of", |m| m.params[0].help = "h".repeat(5000)),
            ("param default of", |m| {
                m.params[0].default = wt::ParamValue::Text("d".repeat(5000))
            }),
        ];
        for (want, edit) in cases {
            let mut m = meta();
            edit(&mut m);
            let e = convert_metadata(m, "big.wasm").unwrap_err().to_string();
            assert!(
                e.contains("plugin \"big-talker\" (big.wasm)") && e.contains(want),
                "{want}: {e}"
            );
        }
    }
}
