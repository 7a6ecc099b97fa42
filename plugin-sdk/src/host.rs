//! Safe wrappers for the host imports: `log`, `random`, `llm`, `tensor` and
//! `image`. A plugin may only call what its world imports (see each module);
//! calling another kind's import makes the component fail to load.

/// Write to the run's log (every world imports `log`).
pub mod log {
    use selma_plugin_bindings_imports::selma::plugin::log::{log, Level};

    /// Log at debug level.
    pub fn debug(message: impl AsRef<str>) {
        log(Level::Debug, message.as_ref());
    }

    /// Log at info level.
    pub fn info(message: impl AsRef<str>) {
        log(Level::Info, message.as_ref());
    }

    /// Log at warn level.
    pub fn warn(message: impl AsRef<str>) {
        log(Level::Warn, message.as_ref());
    }

    /// Log at error level.
    pub fn error(message: impl AsRef<str>) {
        log(Level::Error, message.as_ref());
    }
}

/// The host's seeded random source (prompt-generator and merge-strategy
/// worlds). The same run seed and plugin name give the same draws.
pub mod random {
    use crate::rng::Rng;
    use selma_plugin_bindings_imports::selma::plugin::random as host;

    /// A uniformly distributed u64 from the host.
    pub fn next_u64() -> u64 {
        host::next_u64()
    }

    /// A uniform float in [0, 1) from the host.
    pub fn next_f64() -> f64 {
        host::next_f64()
    }

    /// The host source as an [`Rng`] (for `sample_k`, `shuffle`, templates).
    /// Each draw is one host call; for many draws seed a
    /// [`crate::rng::SplitMix64`] with [`next_u64`] instead.
    #[derive(Clone, Copy, Debug, Default)]
    pub struct HostRng;

    impl Rng for HostRng {
        fn next_u64(&mut self) -> u64 {
            host::next_u64()
        }
    }
}

/// Text completion through the run's LLM endpoint (prompt-generator world).
/// Granted per plugin by the run config; otherwise every call errors.
pub mod llm {
    use selma_plugin_bindings_imports::selma::plugin::llm::complete as host_complete;
    pub use selma_plugin_bindings_imports::selma::plugin::llm::CompletionRequest;

    /// A request with OpenAI-like defaults: temperature 1, top_p 1,
    /// 256 tokens, one completion, no system message, no stop sequences.
    pub fn request(prompt: impl Into<String>) -> CompletionRequest {
        CompletionRequest {
            prompt: prompt.into(),
            system: None,
            temperature: 1.0,
            top_p: 1.0,
            max_tokens: 256,
            n: 1,
            stop: Vec::new(),
        }
    }

    /// Ask the host for `request.n` completions. Errors (not granted,
    /// endpoint down...) carry the host's message, prefixed with `llm: `.
    pub fn complete(request: &CompletionRequest) -> Result<Vec<String>, String> {
        host_complete(request).map_err(|e| format!("llm: {e}"))
    }
}

/// Host-owned f32 tensors and their fused ops (merge-strategy world).
/// Methods live on [`Tensor`](crate::Tensor) itself: `shape`, `to_list`, `matmul`, `scale`,
/// `add`, `magnitude_prune`, `random_drop`, `svd_factors`.
pub mod tensor {
    use selma_plugin_bindings_imports::selma::plugin::tensor as host;
    pub use selma_plugin_bindings_imports::selma::plugin::tensor::Tensor;

    /// `sum_i weights[i] * tensors[i]` (equal shapes).
    pub fn weighted_sum(tensors: &[&Tensor], weights: &[f32]) -> Result<Tensor, String> {
        if tensors.len() != weights.len() {
            return Err(format!(
                "weighted_sum: {} tensors but {} weights",
                tensors.len(),
                weights.len()
            ));
        }
        host::weighted_sum(tensors, weights)
    }

    /// TIES sign election and disjoint mean over equal-shape tensors.
    pub fn sign_elect_mean(tensors: &[&Tensor]) -> Result<Tensor, String> {
        host::sign_elect_mean(tensors)
    }

    /// Concatenate 2-D tensors along `dim` (0: rows, 1: columns).
    pub fn concat(tensors: &[&Tensor], dim: u32) -> Result<Tensor, String> {
        host::concat(tensors, dim)
    }

    /// Shape as `(rows, cols)` of a 2-D tensor, or an error naming `what`.
    pub fn dims2(t: &Tensor, what: &str) -> Result<(u32, u32), String> {
        match t.shape()[..] {
            [r, c] => Ok((r, c)),
            ref s => Err(format!("{what}: expected a 2-D tensor, got shape {s:?}")),
        }
    }
}

/// Host-owned RGB images (image-filter world). Use [`Image::stats`](crate::Image::stats) (one
/// fused host call) rather than copying pixels.
pub mod image {
    pub use selma_plugin_bindings_imports::selma::plugin::image::{ChannelStats, Image};
}
