//! The OpenAI-compatible client: configuration, request bodies, the retry
//! loop and the mapping of HTTP failures to readable errors.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::fmt;
use std::time::Duration;

/// Where and how to reach the completion endpoint.
#[derive(Clone, Debug)]
pub struct LlmConfig {
    /// Base URL up to the API version, e.g. `http://localhost:8000/v1`; a bare
    /// `http://host:port` gets `/v1` appended.
    pub endpoint: String,
    /// Model name sent in every request (`gpt-3.5-turbo-instruct`, a vLLM
    /// model id, an Ollama tag...).
    pub model: String,
    /// Name of the environment variable holding the API key; `None` sends no
    /// `Authorization` header (local servers).
    pub api_key_env: Option<String>,
    /// Use `/chat/completions` (messages) instead of `/completions` (prompt).
    pub chat: bool,
    /// Time limit for one HTTP exchange, body included.
    pub timeout: Duration,
    /// How many times a failed request is retried (429, 5xx, connection
    /// errors, timeouts) before giving up.
    pub max_retries: u32,
    /// Wait before the first retry; doubled for each further one.
    pub initial_backoff: Duration,
    /// Upper bound of the exponential backoff.
    pub max_backoff: Duration,
    /// Upper bound on a server's `Retry-After`.
    pub max_retry_after: Duration,
}

impl LlmConfig {
    /// A config with the default timeout (120 s), 5 retries and backoff 1 s..30 s.
    pub fn new(endpoint: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            model: model.into(),
            api_key_env: None,
            chat: false,
            timeout: Duration::from_secs(120),
            max_retries: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(120),
        }
    }
}

/// One completion request (OpenAI semantics).
#[derive(Clone, Debug, PartialEq)]
pub struct CompletionRequest {
    /// The prompt (completions) or the user message (chat).
    pub prompt: String,
    /// System message; with the completions API it is put before the prompt.
    pub system: Option<String>,
    pub temperature: f32,
    pub top_p: f32,
    pub max_tokens: u32,
    /// Number of completions wanted.
    pub n: u32,
    /// Stop sequences (OpenAI accepts at most 4).
    pub stop: Vec<String>,
}

impl CompletionRequest {
    /// A request for `n` completions of `prompt` at temperature 1, top_p 1
    /// (the SELMA reference values) and 1024 tokens.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            system: None,
            temperature: 1.0,
            top_p: 1.0,
            max_tokens: 1024,
            n: 1,
            stop: Vec::new(),
        }
    }
}

/// The API key; its `Debug` never shows the value.
#[derive(Clone)]
struct ApiKey(String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// A blocking client for one OpenAI-compatible endpoint and model.
#[derive(Debug)]
pub struct LlmClient {
    config: LlmConfig,
    base: String,
    api_key: Option<ApiKey>,
    agent: ureq::Agent,
}

/// What went wrong with one attempt, and whether it is worth retrying.
enum Failure {
    Retry {
        error: anyhow::Error,
        retry_after: Option<Duration>,
    },
    Fatal(anyhow::Error),
}

impl LlmClient {
    /// Build a client; reads the API key from `config.api_key_env` now.
    pub fn new(config: LlmConfig) -> Result<Self> {
        let base = normalise_endpoint(&config.endpoint)?;
        if config.model.trim().is_empty() {
            bail!(
                "no LLM model name given: pass --llm-model (e.g. the model id your server serves)"
            );
        }
        let api_key = match &config.api_key_env {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => Some(ApiKey(v.trim().to_string())),
                Ok(_) => bail!("environment variable {var} (named as the LLM API key variable) is empty; export the key in it"),
                Err(_) => bail!("environment variable {var} (named as the LLM API key variable) is not set; export the key in it"),
            },
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(config.timeout))
            .user_agent(concat!("selma-llm/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(Self {
            config,
            base,
            api_key,
            agent,
        })
    }

    /// The configuration this client was built with.
    pub fn config(&self) -> &LlmConfig {
        &self.config
    }

    /// The full URL requests go to (`.../v1/completions` or `.../v1/chat/completions`).
    pub fn url(&self) -> String {
        if self.config.chat {
            format!("{}/chat/completions", self.base)
        } else {
            format!("{}/completions", self.base)
        }
    }

    /// The JSON body sent for `req`, asking for `n` choices.
    pub fn request_body(&self, req: &CompletionRequest, n: u32) -> Value {
        let mut body = json!({
            "model": self.config.model,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "max_tokens": req.max_tokens,
            "n": n,
        });
        let obj = body.as_object_mut().expect("json object");
        if self.config.chat {
            let mut messages = Vec::new();
            if let Some(system) = &req.system {
                messages.push(json!({"role": "system", "content": system}));
            }
            messages.push(json!({"role": "user", "content": req.prompt}));
            obj.insert("messages".into(), Value::Array(messages));
        } else {
            let prompt = match &req.system {
                Some(system) => format!("{system}\n\n{}", req.prompt),
                None => req.prompt.clone(),
            };
            obj.insert("prompt".into(), Value::String(prompt));
        }
        if !req.stop.is_empty() {
            obj.insert("stop".into(), json!(req.stop));
        }
        body
    }

    /// Ask for `req.n` completions and return their texts in choice order.
    ///
    /// Servers that return fewer choices than asked (Ollama and llama.cpp
    /// ignore `n`) are asked again for the rest.
    pub fn complete(&self, req: &CompletionRequest) -> Result<Vec<String>> {
        let wanted = req.n.max(1) as usize;
        let mut texts = Vec::with_capacity(wanted);
        let mut calls = 0;
        while texts.len() < wanted {
            calls += 1;
            let missing = (wanted - texts.len()) as u32;
            let got = self.call_with_retries(req, missing)?;
            if got.is_empty() {
                bail!(
                    "LLM endpoint {} returned no choices (asked for {missing})",
                    self.url()
                );
            }
            texts.extend(got);
            if calls > wanted {
                break;
            }
        }
        texts.truncate(wanted);
        Ok(texts)
    }

    /// One logical call: retries transient failures with exponential backoff.
    fn call_with_retries(&self, req: &CompletionRequest, n: u32) -> Result<Vec<String>> {
        let body = self.request_body(req, n);
        let mut attempt = 0u32;
        loop {
            match self.attempt(&body) {
                Ok(texts) => return Ok(texts),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry { error, retry_after }) => {
                    if attempt >= self.config.max_retries {
                        return Err(error.context(format!(
                            "LLM request failed after {} attempts",
                            attempt + 1
                        )));
                    }
                    let wait = match retry_after {
                        Some(d) => d.min(self.config.max_retry_after),
                        None => self.backoff(attempt),
                    };
                    std::thread::sleep(wait);
                    attempt += 1;
                }
            }
        }
    }

    /// Exponential backoff before retry number `attempt` (0-based).
    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(20));
        self.config
            .initial_backoff
            .saturating_mul(factor)
            .min(self.config.max_backoff)
    }

    /// One HTTP exchange, classified.
    fn attempt(&self, body: &Value) -> std::result::Result<Vec<String>, Failure> {
        let url = self.url();
        let mut request = self.agent.post(&url).header("Accept", "application/json");
        if let Some(key) = &self.api_key {
            request = request.header("Authorization", format!("Bearer {}", key.0));
        }
        let response = match request.send_json(body) {
            Ok(r) => r,
            Err(e) => return Err(classify_transport_error(&url, e, self.config.timeout)),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let text = match response.into_body().read_to_string() {
            Ok(t) => t,
            Err(e) => {
                return Err(Failure::Retry {
                    error: anyhow!("reading the reply of LLM endpoint {url} failed: {e}"),
                    retry_after: None,
                })
            }
        };
        if !(200..300).contains(&status) {
            let message = error_message(&text);
            let error = anyhow!("LLM endpoint {url} answered HTTP {status}: {message}");
            let hint = match status {
                401 | 403 => Some("check the API key (the variable named by --llm-api-key-env)"),
                404 => Some("check --llm-endpoint (it should end in /v1), --llm-model, and --llm-chat for chat-only models"),
                _ => None,
            };
            let error = match hint {
                Some(h) => error.context(h.to_string()),
                None => error,
            };
            return if status == 429 || status >= 500 {
                Err(Failure::Retry { error, retry_after })
            } else {
                Err(Failure::Fatal(error))
            };
        }
        parse_choices(&text, self.config.chat)
            .with_context(|| format!("malformed reply from LLM endpoint {url}"))
            .map_err(Failure::Fatal)
    }
}

/// Whether ureq was built with a TLS provider. Without one ureq panics on
/// an https URL, so such endpoints are refused up front. Set to `true` when
/// the workspace enables `ureq/rustls` (it does).
const TLS_SUPPORTED: bool = true;

/// Turn `http://host:port[/prefix]` into the API base (no trailing slash).
fn normalise_endpoint(endpoint: &str) -> Result<String> {
    let e = endpoint.trim().trim_end_matches('/');
    let Some(rest) = e
        .strip_prefix("http://")
        .or_else(|| e.strip_prefix("https://"))
    else {
        bail!("LLM endpoint {endpoint:?} must start with http:// or https:// (e.g. http://localhost:8000/v1)");
    };
    if rest.is_empty() {
        bail!("LLM endpoint {endpoint:?} has no host");
    }
    if e.starts_with("https://") && !TLS_SUPPORTED {
        bail!(
            "LLM endpoint {endpoint:?} is https, but this build of selma has no TLS support \
             (ureq's `rustls` feature is off); use an http:// endpoint (a local vLLM, llama.cpp or \
             Ollama server, or an HTTP proxy in front of the API)"
        );
    }
    if rest.contains('/') {
        Ok(e.to_string())
    } else {
        Ok(format!("{e}/v1"))
    }
}

/// Connection-level failures: refused, DNS, timeouts, resets.
fn classify_transport_error(url: &str, e: ureq::Error, timeout: Duration) -> Failure {
    if let ureq::Error::Timeout(_) = e {
        return Failure::Retry {
            error: anyhow!(
                "LLM endpoint {url} timed out: no complete reply within {:.0?} (a stalled or \
                 overloaded server; raise [llm] timeout_s if it is just slow)",
                timeout
            ),
            retry_after: None,
        };
    }
    if let ureq::Error::Protocol(_) = e {
        return Failure::Retry {
            error: anyhow!(
                "LLM endpoint {url} did not answer in HTTP ({e}); is the URL that of an \
                 OpenAI-compatible server?"
            ),
            retry_after: None,
        };
    }
    let retryable = matches!(
        e,
        ureq::Error::Io(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Timeout(_)
            | ureq::Error::Protocol(_)
            | ureq::Error::BodyStalled
    );
    let error =
        anyhow!("LLM endpoint {url} is unreachable: {e}; is the server running and the URL right?");
    if retryable {
        Failure::Retry {
            error,
            retry_after: None,
        }
    } else {
        Failure::Fatal(anyhow!("cannot reach LLM endpoint {url}: {e}"))
    }
}

/// `Retry-After` in seconds (the HTTP-date form is ignored: backoff is used).
fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

/// The most useful message in an error body: OpenAI's `error.message`,
/// `error` as a string, `detail` / `message` (FastAPI, others), else the
/// start of the body.
fn error_message(body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        let candidates = [
            v.pointer("/error/message"),
            v.get("error"),
            v.get("detail"),
            v.get("message"),
        ];
        for c in candidates.into_iter().flatten() {
            match c {
                Value::String(s) => return s.clone(),
                Value::Null => {}
                other if !other.is_object() => return other.to_string(),
                _ => {}
            }
        }
    }
    let trimmed = body.trim();
    if trimmed.is_empty() {
        return "(empty body)".to_string();
    }
    let mut s: String = trimmed.chars().take(300).collect();
    if s.len() < trimmed.len() {
        s.push('…');
    }
    s
}

/// The choices' texts, sorted by their `index`.
fn parse_choices(body: &str, chat: bool) -> Result<Vec<String>> {
    let v: Value = serde_json::from_str(body).with_context(|| {
        let start: String = body.chars().take(200).collect();
        format!("the body is not JSON (starts with {start:?})")
    })?;
    let choices = v
        .get("choices")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("no `choices` array in the reply"))?;
    let mut out = Vec::with_capacity(choices.len());
    for (pos, c) in choices.iter().enumerate() {
        let index = c.get("index").and_then(Value::as_u64).unwrap_or(pos as u64);
        let text = if chat {
            c.pointer("/message/content")
                .and_then(Value::as_str)
                .or_else(|| c.get("text").and_then(Value::as_str))
                .ok_or_else(|| anyhow!("choice {pos} has no `message.content` string"))?
        } else {
            c.get("text")
                .and_then(Value::as_str)
                .or_else(|| c.pointer("/message/content").and_then(Value::as_str))
                .ok_or_else(|| anyhow!("choice {pos} has no `text` string"))?
        };
        out.push((index, text.to_string()));
    }
    out.sort_by_key(|(i, _)| *i);
    Ok(out.into_iter().map(|(_, t)| t).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_server::{MockResponse, MockServer};
    use std::time::Instant;

    fn fast(endpoint: &str) -> LlmConfig {
        let mut c = LlmConfig::new(endpoint, "test-model");
        c.initial_backoff = Duration::from_millis(5);
        c.max_backoff = Duration::from_millis(20);
        c.timeout = Duration::from_secs(10);
        c
    }

    fn req() -> CompletionRequest {
        CompletionRequest {
            prompt: "Write 3 prompts.".into(),
            system: None,
            temperature: 0.7,
            top_p: 0.9,
            max_tokens: 256,
            n: 3,
            stop: vec!["\n21.".into()],
        }
    }

    #[test]
    fn endpoint_normalisation() {
        assert_eq!(
            normalise_endpoint("http://localhost:8000").unwrap(),
            "http://localhost:8000/v1"
        );
        assert_eq!(
            normalise_endpoint("http://localhost:8000/v1/").unwrap(),
            "http://localhost:8000/v1"
        );
        assert_eq!(
            normalise_endpoint("http://example.org/openai/v1").unwrap(),
            "http://example.org/openai/v1"
        );
        match normalise_endpoint("https://api.openai.com/v1") {
            Ok(base) => assert!(TLS_SUPPORTED && base == "https://api.openai.com/v1"),
            Err(e) => assert!(
                !TLS_SUPPORTED && e.to_string().contains("no TLS support"),
                "{e}"
            ),
        }
        assert!(normalise_endpoint("localhost:8000").is_err());
    }

    #[test]
    fn completions_body_shape() {
        let client = LlmClient::new(fast("http://127.0.0.1:1")).unwrap();
        let mut r = req();
        r.system = Some("Be brief.".into());
        let body = client.request_body(&r, 3);
        let expected = json!({
            "model": "test-model",
            "prompt": "Be brief.\n\nWrite 3 prompts.",
            "temperature": 0.7f32,
            "top_p": 0.9f32,
            "max_tokens": 256,
            "n": 3,
            "stop": ["\n21."],
        });
        assert_eq!(body, expected);
        assert_eq!(client.url(), "http://127.0.0.1:1/v1/completions");
    }

    #[test]
    fn chat_body_shape() {
        let mut cfg = fast("http://127.0.0.1:1/v1");
        cfg.chat = true;
        let client = LlmClient::new(cfg).unwrap();
        let mut r = req();
        r.stop.clear();
        r.system = Some("sys".into());
        let body = client.request_body(&r, 2);
        let expected = json!({
            "model": "test-model",
            "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "Write 3 prompts."}
            ],
            "temperature": 0.7f32,
            "top_p": 0.9f32,
            "max_tokens": 256,
            "n": 2,
        });
        assert_eq!(body, expected);
        assert_eq!(client.url(), "http://127.0.0.1:1/v1/chat/completions");
    }

    #[test]
    fn completes_n_choices_and_sends_the_body() {
        let server = MockServer::with_responder(|_, i| format!("answer {i}"));
        let client = LlmClient::new(fast(&server.base_url())).unwrap();
        let out = client.complete(&req()).unwrap();
        assert_eq!(out, vec!["answer 0", "answer 1", "answer 2"]);
        let seen = server.requests();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].path, "/v1/completions");
        assert_eq!(
            seen[0].json.as_ref().unwrap(),
            &client.request_body(&req(), 3)
        );
        assert_eq!(seen[0].header("authorization"), None);
    }

    #[test]
    fn chat_completions_round_trip() {
        let server = MockServer::with_responder(|r, i| format!("{} #{i}", r.prompt_text()));
        let mut cfg = fast(&server.base_url());
        cfg.chat = true;
        let client = LlmClient::new(cfg).unwrap();
        let mut r = req();
        r.n = 2;
        let out = client.complete(&r).unwrap();
        assert_eq!(out, vec!["Write 3 prompts. #0", "Write 3 prompts. #1"]);
        assert_eq!(server.requests()[0].path, "/v1/chat/completions");
    }

    #[test]
    fn asks_again_when_server_ignores_n() {
        let server = MockServer::with_responder(|_, i| format!("c{i}"));
        server.set_max_choices(Some(1));
        let client = LlmClient::new(fast(&server.base_url())).unwrap();
        let out = client.complete(&req()).unwrap();
        assert_eq!(out.len(), 3);
        let ns: Vec<u64> = server
            .requests()
            .iter()
            .map(|r| r.json.as_ref().unwrap()["n"].as_u64().unwrap())
            .collect();
        assert_eq!(ns, vec![3, 2, 1]);
    }

    #[test]
    fn retries_429_then_succeeds() {
        let server = MockServer::start();
        server.fail_times(429, 2);
        let client = LlmClient::new(fast(&server.base_url())).unwrap();
        let out = client.complete(&req()).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(server.requests().len(), 3);
    }

    #[test]
    fn honours_retry_after() {
        let server = MockServer::start();
        server.push(MockResponse::Status {
            code: 429,
            body: r#"{"error":{"message":"slow down"}}"#.into(),
            retry_after: Some("1".into()),
        });
        let client = LlmClient::new(fast(&server.base_url())).unwrap();
        let t = Instant::now();
        client.complete(&req()).unwrap();
        // The configured backoff is 5 ms; only Retry-After explains a 1 s wait.
        assert!(
            t.elapsed() >= Duration::from_millis(950),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(server.requests().len(), 2);
    }

    #[test]
    fn server_errors_exhaust_retries() {
        let server = MockServer::start();
        server.fail_times(500, 10);
        let mut cfg = fast(&server.base_url());
        cfg.max_retries = 2;
        let client = LlmClient::new(cfg).unwrap();
        let err = format!("{:#}", client.complete(&req()).unwrap_err());
        assert!(err.contains("after 3 attempts"), "{err}");
        assert!(err.contains("HTTP 500"), "{err}");
        assert!(err.contains("mock failure"), "{err}");
        assert_eq!(server.requests().len(), 3);
    }

    #[test]
    fn client_errors_are_not_retried_and_show_the_message() {
        let server = MockServer::start();
        server.push(MockResponse::Status {
            code: 400,
            body:
                r#"{"error":{"message":"max_tokens is too large","type":"invalid_request_error"}}"#
                    .into(),
            retry_after: None,
        });
        let client = LlmClient::new(fast(&server.base_url())).unwrap();
        let err = format!("{:#}", client.complete(&req()).unwrap_err());
        assert!(err.contains("HTTP 400: max_tokens is too large"), "{err}");
        assert_eq!(server.requests().len(), 1);
    }

    #[test]
    fn malformed_json_is_reported() {
        let server = MockServer::start();
        server.push(MockResponse::Raw {
            code: 200,
            body: "<html>not json</html>".into(),
        });
        let client = LlmClient::new(fast(&server.base_url())).unwrap();
        let err = format!("{:#}", client.complete(&req()).unwrap_err());
        assert!(err.contains("malformed reply"), "{err}");
        assert!(err.contains("not JSON"), "{err}");
    }

    /// A raw TCP endpoint that reads each request, then misbehaves.
    #[derive(Clone, Copy, Debug)]
    enum Fault {
        /// Holds the connection without answering.
        Stall,
        /// Promises 1000 bytes, sends 20, closes.
        CutBody,
        /// Answers bytes that are not HTTP.
        Garbage,
        /// A valid 200 reply whose body is 40 MiB.
        Huge,
    }

    fn faulty(fault: Fault) -> String {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { return };
                std::thread::spawn(move || {
                    // Read the head and the body it announces.
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let head_end = loop {
                        let Ok(n) = c.read(&mut chunk) else { return };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let Ok(n) = c.read(&mut chunk) else { return };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let _ = match fault {
                        Fault::Stall => {
                            std::thread::sleep(Duration::from_secs(30));
                            Ok(())
                        }
                        Fault::CutBody => c.write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                              content-length: 1000\r\n\r\n{\"choices\": [{\"te",
                        ),
                        Fault::Garbage => c.write_all(b"\x00\xff\x13 not http at all\r\n\r\n"),
                        Fault::Huge => {
                            let n = 40 << 20;
                            let _ = c.write_all(
                                format!(
                                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                                     content-length: {}\r\n\r\n{{\"choices\": [{{\"text\": \"",
                                    n + 30
                                )
                                .as_bytes(),
                            );
                            let block = vec![b'a'; 1 << 20];
                            let mut r = Ok(());
                            for _ in 0..40 {
                                r = c.write_all(&block);
                                if r.is_err() {
                                    break;
                                }
                            }
                            r
                        }
                    };
                });
            }
        });
        format!("http://{addr}")
    }

    #[test]
    fn faulty_endpoints_fail_in_bounded_time_with_a_clear_error() {
        for (fault, want) in [
            (Fault::Stall, "timed out"),
            (Fault::CutBody, "reading the reply"),
            (Fault::Garbage, "did not answer in HTTP"),
            (Fault::Huge, "reading the reply"),
        ] {
            let url = faulty(fault);
            let mut cfg = fast(&url);
            cfg.timeout = Duration::from_secs(1);
            cfg.max_retries = 1;
            let client = LlmClient::new(cfg).unwrap();
            let t0 = Instant::now();
            let err = format!("{:#}", client.complete(&req()).unwrap_err());
            let took = t0.elapsed();
            eprintln!("{fault:?} ({took:.1?}): {err}");
            assert!(
                took < Duration::from_secs(6),
                "{fault:?} took {took:?}: {err}"
            );
            assert!(err.contains(&url) && err.contains(want), "{fault:?}: {err}");
            assert!(
                err.len() < 2000,
                "{fault:?}: an error of {} bytes",
                err.len()
            );
        }
    }

    #[test]
    fn unreachable_endpoint_is_reported() {
        // Bind then drop a listener: the port is (almost surely) closed now.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cfg = fast(&format!("http://127.0.0.1:{port}"));
        cfg.max_retries = 1;
        let client = LlmClient::new(cfg).unwrap();
        let err = format!("{:#}", client.complete(&req()).unwrap_err());
        assert!(err.contains("unreachable"), "{err}");
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    }

    #[test]
    fn api_key_is_sent_but_never_printed() {
        let var = "SELMA_LLM_TEST_KEY_7F3A";
        let secret = "sk-test-SECRET-0123456789";
        // Only this test reads or writes this uniquely named variable.
        std::env::set_var(var, secret);
        let server = MockServer::start();
        server.fail_times(401, 1);
        let mut cfg = fast(&server.base_url());
        cfg.api_key_env = Some(var.into());
        let client = LlmClient::new(cfg).unwrap();
        let err = client.complete(&req()).unwrap_err();
        let shown = format!("{err:#} {err:?} {client:?}");
        assert!(!shown.contains(secret), "{shown}");
        assert!(shown.contains("HTTP 401"), "{shown}");
        client.complete(&req()).unwrap();
        for r in server.requests() {
            assert_eq!(
                r.header("authorization"),
                Some(format!("Bearer {secret}").as_str())
            );
        }
    }

    #[test]
    fn missing_api_key_variable_is_named() {
        let mut cfg = fast("http://127.0.0.1:1");
        cfg.api_key_env = Some("SELMA_LLM_TEST_SURELY_UNSET_91C2".into());
        let err = LlmClient::new(cfg).unwrap_err().to_string();
        assert!(err.contains("SELMA_LLM_TEST_SURELY_UNSET_91C2"), "{err}");
        assert!(err.contains("not set"), "{err}");
    }

    #[test]
    fn error_message_extraction() {
        assert_eq!(error_message(r#"{"error":{"message":"m1"}}"#), "m1");
        assert_eq!(error_message(r#"{"error":"m2"}"#), "m2");
        assert_eq!(error_message(r#"{"detail":"m3"}"#), "m3");
        assert_eq!(error_message("plain text"), "plain text");
        assert_eq!(error_message(""), "(empty body)");
    }

    #[test]
    fn retry_after_parsing_and_backoff() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        let mut cfg = LlmConfig::new("http://x", "m");
        cfg.initial_backoff = Duration::from_millis(100);
        cfg.max_backoff = Duration::from_millis(500);
        let client = LlmClient::new(cfg).unwrap();
        let waits: Vec<u128> = (0..5).map(|a| client.backoff(a).as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 500, 500]);
    }
}
