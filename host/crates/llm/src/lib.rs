//! selma-llm: a blocking client for OpenAI-compatible text-completion
//! endpoints (OpenAI, vLLM, llama.cpp server, Ollama), used by prompt
//! generation.
//!
//! Owns: the request bodies of `/v1/completions` and `/v1/chat/completions`,
//! the API key (read from a named environment variable, never printed),
//! retries with exponential backoff on 429 / 5xx / connection errors
//! (honouring `Retry-After`), and readable errors. With the `test-server`
//! feature it also ships [`test_server::MockServer`], a tiny local endpoint
//! for tests.

mod client;
#[cfg(any(test, feature = "test-server"))]
pub mod test_server;

pub use client::{CompletionRequest, LlmClient, LlmConfig};
