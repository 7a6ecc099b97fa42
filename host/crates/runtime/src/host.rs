//! The host side of the plugin imports: one [`HostState`] per store (one
//! per plugin instance) implementing `log`, `random`, `llm`, `tensor` and
//! `image`, plus the sandbox's WASI context (no preopens, no environment,
//! no network, no stdin; stderr/stdout captured) and its resource limiter.

use crate::bindings::generator::selma::plugin::{llm, skill};
use crate::bindings::image_filter::selma::plugin::image;
use crate::bindings::merge::selma::plugin::{log, random, tensor, types};
use crate::types::{LogLevel, LogLine, RgbImage};
use crate::{CompletionRequest, Shared};
use candle_core::Tensor;
use selma_rng::SplitMix64;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::{Resource, ResourceTable};
use wasmtime::ResourceLimiter;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Most bytes of guest stdout+stderr kept per instance.
const STDIO_CAPACITY: usize = 1 << 20;
/// Longest log message kept (the WIT promises 4 KiB).
const MAX_LOG_MESSAGE: usize = 4096;
/// Most table elements a guest may grow to.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// Memory cap of one store; remembers whether the cap was hit so the error
/// can say "out of memory" instead of a bare trap.
pub(crate) struct Limiter {
    memory_limit: usize,
    pub(crate) hit: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.hit = true;
            wasmtime::bail!("out of memory: {desired} bytes requested");
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Everything one plugin instance's store holds.
pub(crate) struct HostState {
    /// The plugin's name (log prefix, grants, error messages).
    pub(crate) plugin: String,
    pub(crate) shared: Arc<Shared>,
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: Limiter,
    stdio: MemoryOutputPipe,
    stdio_mark: usize,
    rng: SplitMix64,
    tensor_bytes: usize,
    /// Host tensors and images in the table.
    handles: usize,
    /// When the current call started (for the deadline).
    pub(crate) call_started: Instant,
    /// Time spent this call waiting on slow host services (the LLM), which
    /// does not count against the plugin's deadline.
    pub(crate) host_wait: Duration,
}

impl HostState {
    pub(crate) fn new(plugin: &str, shared: Arc<Shared>) -> HostState {
        let stdio = MemoryOutputPipe::new(STDIO_CAPACITY);
        let mut b = WasiCtx::builder();
        b.stdout(stdio.clone())
            .stderr(stdio.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        let seed = crate::plugin_seed(shared.seed, plugin);
        HostState {
            plugin: plugin.to_string(),
            limiter: Limiter {
                memory_limit: shared.limits.memory,
                hit: false,
            },
            shared,
            wasi: b.build(),
            table: ResourceTable::new(),
            stdio,
            stdio_mark: 0,
            rng: SplitMix64::new(seed),
            tensor_bytes: 0,
            handles: 0,
            call_started: Instant::now(),
            host_wait: Duration::ZERO,
        }
    }

    /// The position of the plugin's `random` stream.
    pub(crate) fn random_state(&self) -> u64 {
        self.rng.state()
    }

    /// Continue the plugin's `random` stream from `state`.
    pub(crate) fn set_random_state(&mut self, state: u64) {
        self.rng = SplitMix64::new(state);
    }

    /// Mark the start of a call: the deadline clock and the stderr offset.
    pub(crate) fn begin_call(&mut self) {
        self.call_started = Instant::now();
        self.host_wait = Duration::ZERO;
        self.stdio_mark = self.stdio.contents().len();
    }

    /// What the guest wrote to stdout/stderr since the call started.
    pub(crate) fn call_output(&self) -> String {
        let all = self.stdio.contents();
        String::from_utf8_lossy(&all[self.stdio_mark.min(all.len())..]).into_owned()
    }

    /// Seconds of the deadline used so far this call.
    pub(crate) fn elapsed(&self) -> Duration {
        self.call_started.elapsed().saturating_sub(self.host_wait)
    }

    /// Count one more handle, within the handle cap.
    fn take_handle(&mut self) -> Result<(), String> {
        let cap = self.shared.limits.max_handles;
        if self.handles >= cap {
            return Err(format!(
                "host handle limit of {cap} live tensors and images exceeded (drop the tensors \
                 you no longer need)"
            ));
        }
        self.handles += 1;
        Ok(())
    }

    /// Put a host-made tensor into the table, within the tensor budget and
    /// the handle cap.
    pub(crate) fn push_tensor(&mut self, t: Tensor) -> Result<Resource<Tensor>, String> {
        let bytes = t.elem_count() * 4;
        let budget = self.shared.limits.max_tensor_bytes;
        if self.tensor_bytes + bytes > budget {
            return Err(format!(
                "host tensor memory limit of {} exceeded (a tensor of {:?} needs {})",
                crate::fmt_bytes(budget),
                t.dims(),
                crate::fmt_bytes(bytes)
            ));
        }
        self.take_handle()?;
        self.tensor_bytes += bytes;
        self.table.push(t).map_err(|e| e.to_string())
    }

    /// Take a tensor out of the table (a host-owned or returned handle).
    pub(crate) fn take_tensor(&mut self, r: Resource<Tensor>) -> wasmtime::Result<Tensor> {
        let t = self.table.delete(r)?;
        self.tensor_bytes = self.tensor_bytes.saturating_sub(t.elem_count() * 4);
        self.handles = self.handles.saturating_sub(1);
        Ok(t)
    }

    pub(crate) fn push_image(&mut self, img: RgbImage) -> wasmtime::Result<Resource<RgbImage>> {
        self.take_handle().map_err(wasmtime::Error::msg)?;
        Ok(self.table.push(img)?)
    }

    pub(crate) fn take_image(&mut self, r: Resource<RgbImage>) -> wasmtime::Result<RgbImage> {
        let img = self.table.delete(r)?;
        self.handles = self.handles.saturating_sub(1);
        Ok(img)
    }

    fn tensor(&self, r: &Resource<Tensor>) -> wasmtime::Result<&Tensor> {
        Ok(self.table.get(r)?)
    }

    fn tensors(&self, rs: &[Resource<Tensor>]) -> wasmtime::Result<Vec<Tensor>> {
        rs.iter().map(|r| self.tensor(r).cloned()).collect()
    }

    fn image(&self, r: &Resource<RgbImage>) -> wasmtime::Result<&RgbImage> {
        Ok(self.table.get(r)?)
    }

    /// Wrap a fallible host op: Ok(tensor) -> a new handle; Err -> the
    /// guest-visible error string.
    fn op(&mut self, r: anyhow::Result<Tensor>) -> OpResult {
        match r {
            Ok(t) => Ok(self.push_tensor(t)),
            Err(e) => Ok(Err(format!("{e:#}"))),
        }
    }

    fn check_elems(&self, dims: &[usize]) -> Result<(), String> {
        let n: usize = dims.iter().product();
        let budget = self.shared.limits.max_tensor_bytes;
        if n.saturating_mul(4) > budget {
            return Err(format!(
                "result of shape {dims:?} exceeds the host tensor memory limit of {}",
                crate::fmt_bytes(budget)
            ));
        }
        Ok(())
    }
}

type OpResult = wasmtime::Result<Result<Resource<Tensor>, String>>;

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}
/// The generator world imports the `skill` interface only for its types;
/// its `info` function is not something a generator may call.
impl skill::Host for HostState {
    fn info(&mut self) -> wasmtime::Result<skill::SkillInfo> {
        wasmtime::bail!(
            "skill.info is not a host import; a generator gets the skill in its request"
        )
    }
}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        let mut message = message;
        if message.len() > MAX_LOG_MESSAGE {
            let mut cut = MAX_LOG_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str("...");
        }
        let level = match level {
            log::Level::Debug => LogLevel::Debug,
            log::Level::Info => LogLevel::Info,
            log::Level::Warn => LogLevel::Warn,
            log::Level::Error => LogLevel::Error,
        };
        self.shared.emit_log(LogLine {
            plugin: self.plugin.clone(),
            level,
            message,
        });
        Ok(())
    }
}

impl random::Host for HostState {
    fn next_u64(&mut self) -> wasmtime::Result<u64> {
        Ok(self.rng.next_u64())
    }

    fn next_f64(&mut self) -> wasmtime::Result<f64> {
        Ok(self.rng.next_f64())
    }
}

impl llm::Host for HostState {
    fn complete(
        &mut self,
        request: llm::CompletionRequest,
    ) -> wasmtime::Result<Result<Vec<String>, String>> {
        if !self.shared.llm_grants.iter().any(|g| g == &self.plugin) {
            return Ok(Err(format!(
                "plugin \"{p}\" is not granted the llm import; grant it in pipeline.toml with \
                 `[plugins.{p}] grants = [\"llm\"]` or on the command line with `--grant-llm {p}`",
                p = self.plugin
            )));
        }
        let Some(backend) = self.shared.llm.clone() else {
            return Ok(Err(
                "no LLM endpoint is configured for this run (set [llm] in pipeline.toml or --llm-url)"
                    .to_string(),
            ));
        };
        let size = request.prompt.len()
            + request.system.as_ref().map_or(0, |s| s.len())
            + request.stop.iter().map(|s| s.len()).sum::<usize>();
        let cap = self.shared.limits.max_input_bytes;
        if size > cap {
            return Ok(Err(format!(
                "llm request of {} exceeds the input limit of {}",
                crate::fmt_bytes(size),
                crate::fmt_bytes(cap)
            )));
        }
        let req = CompletionRequest {
            prompt: request.prompt,
            system: request.system,
            temperature: request.temperature,
            top_p: request.top_p,
            max_tokens: request.max_tokens,
            n: request.n,
            stop: request.stop,
        };
        let limit = self.shared.limits.llm_wait;
        if self.host_wait >= limit {
            // A trap, not an error the guest could ignore and ask again.
            wasmtime::bail!(
                "llm wait limit of {} for one call exceeded ({} spent waiting on the endpoint)",
                crate::fmt_secs(limit),
                crate::fmt_secs(self.host_wait)
            );
        }
        let t0 = Instant::now();
        let out = backend.complete(&req);
        self.host_wait += t0.elapsed();
        Ok(out.map_err(|e| format!("{e:#}")))
    }
}

impl tensor::HostTensor for HostState {
    fn new(&mut self, shape: Vec<u32>, data: Vec<f32>) -> wasmtime::Result<Resource<Tensor>> {
        let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if n != Some(data.len()) {
            let need = n.map_or("more than usize::MAX".to_string(), |n| n.to_string());
            wasmtime::bail!(
                "tensor constructor: shape {shape:?} needs {need} values, got {}",
                data.len()
            );
        }
        let t = Tensor::from_vec(data, dims, &self.shared.device)?;
        self.push_tensor(t).map_err(wasmtime::Error::msg)
    }

    fn shape(&mut self, this: Resource<Tensor>) -> wasmtime::Result<Vec<u32>> {
        Ok(self
            .tensor(&this)?
            .dims()
            .iter()
            .map(|&d| d as u32)
            .collect())
    }

    fn to_list(&mut self, this: Resource<Tensor>) -> wasmtime::Result<Result<Vec<f32>, String>> {
        let t = self.tensor(&this)?;
        let bytes = t.elem_count() * 4;
        let cap = self.shared.limits.max_input_bytes;
        if bytes > cap {
            return Ok(Err(format!(
                "to-list refused: tensor {:?} is {}, above the input-size cap of {}; use host ops instead",
                t.dims(),
                crate::fmt_bytes(bytes),
                crate::fmt_bytes(cap)
            )));
        }
        let r = t
            .flatten_all()
            .and_then(|f| f.to_dtype(candle_core::DType::F32))
            .and_then(|f| f.to_vec1());
        Ok(r.map_err(|e| e.to_string()))
    }

    fn matmul(&mut self, this: Resource<Tensor>, rhs: Resource<Tensor>) -> OpResult {
        let (a, b) = (self.tensor(&this)?.clone(), self.tensor(&rhs)?.clone());
        let r = (|| {
            let (m, k) = a
                .dims2()
                .map_err(|_| anyhow::anyhow!("matmul: lhs is {:?}, not 2-D", a.dims()))?;
            let (k2, n) = b
                .dims2()
                .map_err(|_| anyhow::anyhow!("matmul: rhs is {:?}, not 2-D", b.dims()))?;
            anyhow::ensure!(
                k == k2,
                "matmul: shapes {:?} and {:?} do not chain",
                a.dims(),
                b.dims()
            );
            self.check_elems(&[m, n]).map_err(anyhow::Error::msg)?;
            Ok(a.contiguous()?.matmul(&b.contiguous()?)?)
        })();
        self.op(r)
    }

    fn scale(&mut self, this: Resource<Tensor>, factor: f32) -> wasmtime::Result<Resource<Tensor>> {
        let t = self.tensor(&this)?.affine(factor as f64, 0.0)?;
        self.push_tensor(t).map_err(wasmtime::Error::msg)
    }

    fn add(&mut self, this: Resource<Tensor>, rhs: Resource<Tensor>) -> OpResult {
        let (a, b) = (self.tensor(&this)?.clone(), self.tensor(&rhs)?.clone());
        let r = if a.dims() != b.dims() {
            Err(anyhow::anyhow!(
                "add: shapes {:?} and {:?} differ",
                a.dims(),
                b.dims()
            ))
        } else {
            a.add(&b).map_err(Into::into)
        };
        self.op(r)
    }

    fn magnitude_prune(&mut self, this: Resource<Tensor>, density: f32) -> OpResult {
        let t = self.tensor(&this)?.clone();
        let r = selma_lora::ops::magnitude_prune(&t, density);
        self.op(r)
    }

    fn random_drop(
        &mut self,
        this: Resource<Tensor>,
        rate: f32,
        seed: u64,
        rescale: bool,
    ) -> OpResult {
        let t = self.tensor(&this)?.clone();
        let r = selma_lora::ops::random_drop(&t, rate, seed, rescale);
        self.op(r)
    }

    fn svd_factors(
        &mut self,
        this: Resource<Tensor>,
        rank: u32,
    ) -> wasmtime::Result<Result<(Resource<Tensor>, Resource<Tensor>), String>> {
        let t = self.tensor(&this)?.clone();
        if rank == 0 {
            return Ok(Err("svd-factors: rank must be at least 1".into()));
        }
        match selma_lora::ops::svd_factors(&t, rank as usize) {
            Ok((u, d)) => {
                let u = match self.push_tensor(u) {
                    Ok(u) => u,
                    Err(e) => return Ok(Err(e)),
                };
                match self.push_tensor(d) {
                    Ok(d) => Ok(Ok((u, d))),
                    Err(e) => {
                        self.take_tensor(u)?;
                        Ok(Err(e))
                    }
                }
            }
            Err(e) => Ok(Err(format!("{e:#}"))),
        }
    }

    fn drop(&mut self, rep: Resource<Tensor>) -> wasmtime::Result<()> {
        self.take_tensor(rep)?;
        Ok(())
    }
}

impl tensor::Host for HostState {
    fn weighted_sum(&mut self, tensors: Vec<Resource<Tensor>>, weights: Vec<f32>) -> OpResult {
        let ts = self.tensors(&tensors)?;
        let refs: Vec<&Tensor> = ts.iter().collect();
        let r = selma_lora::ops::weighted_sum(&refs, &weights);
        self.op(r)
    }

    fn sign_elect_mean(&mut self, tensors: Vec<Resource<Tensor>>) -> OpResult {
        let ts = self.tensors(&tensors)?;
        let refs: Vec<&Tensor> = ts.iter().collect();
        let r = selma_lora::ops::sign_elect_mean(&refs);
        self.op(r)
    }

    fn concat(&mut self, tensors: Vec<Resource<Tensor>>, dim: u32) -> OpResult {
        let ts = self.tensors(&tensors)?;
        let refs: Vec<&Tensor> = ts.iter().collect();
        let r = if dim > 1 {
            Err(anyhow::anyhow!("concat: dim must be 0 or 1, got {dim}"))
        } else {
            selma_lora::ops::concat(&refs, dim as usize)
        };
        self.op(r)
    }
}

impl image::HostImage for HostState {
    fn width(&mut self, this: Resource<RgbImage>) -> wasmtime::Result<u32> {
        Ok(self.image(&this)?.width)
    }

    fn height(&mut self, this: Resource<RgbImage>) -> wasmtime::Result<u32> {
        Ok(self.image(&this)?.height)
    }

    fn stats(&mut self, this: Resource<RgbImage>) -> wasmtime::Result<Vec<image::ChannelStats>> {
        let s = self.image(&this)?.stats();
        Ok(s.iter()
            .map(|c| image::ChannelStats {
                mean: c.mean,
                std: c.std,
                min: c.min,
                max: c.max,
            })
            .collect())
    }

    fn non_finite_fraction(&mut self, this: Resource<RgbImage>) -> wasmtime::Result<f32> {
        Ok(self.image(&this)?.non_finite)
    }

    fn pixels(&mut self, this: Resource<RgbImage>) -> wasmtime::Result<Result<Vec<u8>, String>> {
        let img = self.image(&this)?;
        let cap = self.shared.limits.max_input_bytes;
        if img.pixels.len() > cap {
            return Ok(Err(format!(
                "pixels refused: the image is {}, above the input-size cap of {}; use stats instead",
                crate::fmt_bytes(img.pixels.len()),
                crate::fmt_bytes(cap)
            )));
        }
        Ok(Ok(img.pixels.clone()))
    }

    fn drop(&mut self, rep: Resource<RgbImage>) -> wasmtime::Result<()> {
        self.take_image(rep)?;
        Ok(())
    }
}

impl image::Host for HostState {}
