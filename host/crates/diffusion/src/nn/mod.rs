//! LoRA-aware, differentiable building blocks named like torch's modules:
//! `Linear`, `Conv2d`, `GroupNorm`, `LayerNorm`, `Embedding` (`layers`), the
//! activations (`activation`), multi-head attention (`attention`) and the
//! adapter machinery (`Adapter`, `LoraHost`, `Adaptable`). Every op on the
//! path from an adapter to a layer's output has a backward in candle; fused
//! candle kernels without a backward are used only when nothing in the op's
//! inputs tracks gradients. Our own fused CPU kernels with a hand-written
//! backward live in `fused`. Frozen base weights and norms get an input-only
//! backward (`frozen`); convolutions run as one GEMM over an im2col matrix
//! (`conv_gemm`), faster than candle's CPU conv2d.

pub mod activation;
pub mod adapter;
pub mod attention;
pub mod conv_gemm;
pub mod frozen;
mod fused;
pub mod layers;
#[cfg(test)]
pub(crate) mod testing;

pub use activation::{
    geglu_erf, gelu_erf, gelu_tanh, quick_gelu, silu, softmax_last_dim, Activation,
};
pub use adapter::{
    adaptable_paths, clear_all_adapters, fit_adapter, join_path, merge_all_adapters, Adaptable,
    Adapter, LayerKind, LoraHost,
};
pub use attention::{
    attention, attention_chunked, causal_mask, merge_heads, split_heads, ATTENTION_MAX_SCORES,
};
pub use conv_gemm::conv2d_gemm;
pub use frozen::{
    frozen_conv2d, frozen_fast_path, frozen_matmul_t, group_norm_frozen, layer_norm_frozen,
    set_frozen_fast_path,
};
pub use layers::{Conv2d, Embedding, GroupNorm, LayerNorm, Linear};
