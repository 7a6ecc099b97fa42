//! selma-train: training LoRA experts (SELMA's "learn one skill" stage) on
//! selma-diffusion's UNet. AdamW with decoupled weight decay, gradient-norm
//! clipping, diffusers' LR schedules and gradient accumulation ([`optim`]);
//! image-caption datasets ([`dataset`]); a serialisable seeded RNG ([`rng`]);
//! atomic, bit-exact resumable checkpoints ([`checkpoint`]); LoRA adapters
//! as trainable variables ([`lora`]); full fine-tuning of every UNet and
//! text-encoder weight ([`full`]); EMA of trained weights ([`ema`]); the run
//! configuration ([`config`]), the diffusion loss ([`loss`]), the latent and
//! text-embedding caches ([`cache`]) and the training loop ([`trainer`]).

pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod dataset;
pub mod ema;
pub mod full;
pub mod lora;
pub mod loss;
pub mod optim;
pub mod rng;
pub mod trainer;
