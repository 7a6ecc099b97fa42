//! LoRA-aware, differentiable building blocks named like torch's modules:
//! `Linear`, `Conv2d`, `GroupNorm`, `LayerNorm`, `Embedding`, the activation
//! and attention ops, and the adapter machinery (`Adapter`, `LoraHost`,
//! `Adaptable`). Every op on the path from an adapter to a layer's output has
//! a backward in candle; fused candle kernels without a backward are used only
//! when nothing in the op's inputs tracks gradients. Frozen base weights get
//! an input-only backward (`frozen`); convolutions run as one GEMM over an
//! im2col matrix (`conv_gemm`), faster than candle's CPU conv2d.

pub mod adapter;
pub mod conv_gemm;
pub mod frozen;
pub mod layers;
pub mod ops;

pub use adapter::{
    adaptable_paths, clear_all_adapters, fit_adapter, join_path, merge_all_adapters, Adaptable,
    Adapter, LayerKind, LoraHost,
};
pub use conv_gemm::conv2d_gemm;
pub use frozen::{frozen_conv2d, frozen_fast_path, frozen_matmul_t, set_frozen_fast_path};
pub use layers::{Conv2d, Embedding, GroupNorm, LayerNorm, Linear};
pub use ops::{
    attention, attention_chunked, causal_mask, gelu_erf, gelu_tanh, merge_heads, quick_gelu, silu,
    softmax_last_dim, split_heads, Activation,
};
