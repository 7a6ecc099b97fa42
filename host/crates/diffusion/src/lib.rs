//! selma-diffusion: Stable Diffusion 1.x / 2.x / XL on candle, with LoRA-aware,
//! differentiable layers, our own CLIP tokenizer and text encoders, the UNet,
//! the latent codecs (VAE or pixel-unshuffle), the schedulers and the sampling pipeline.

pub mod clip;
pub mod codec;
pub mod image_io;
pub mod init;
pub mod lora;
pub mod nn;
pub mod pipeline;
pub mod scheduler;
pub mod text;
pub mod tokenizer;
pub mod tuning;
pub mod unet;
pub mod vae;
pub mod weights;
