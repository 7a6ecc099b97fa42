//! A minimal OpenAI-compatible endpoint for tests (feature `test-server`).
//!
//! One thread accepts connections on `127.0.0.1:<free port>` and answers each
//! with one HTTP/1.1 response (`Connection: close`): `POST /v1/completions`
//! and `POST /v1/chat/completions` return `n` choices made by a responder
//! closure; scripted responses (e.g. a few 429s or 500s) are served first.
//! Every request is recorded for assertions.

use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Makes the text of choice `index` for a request.
pub type Responder = Box<dyn FnMut(&RecordedRequest, u32) -> String + Send>;

/// A response served before the responder, in FIFO order.
#[derive(Clone, Debug)]
pub enum MockResponse {
    /// An error status with an OpenAI-style body and optional `Retry-After`.
    Status {
        code: u16,
        body: String,
        retry_after: Option<String>,
    },
    /// Exactly these choices (ignores `n`).
    Choices(Vec<String>),
    /// Any status with this raw body (e.g. malformed JSON).
    Raw { code: u16, body: String },
}

/// One request as the server received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// The body parsed as JSON, if it was.
    pub json: Option<Value>,
}

impl RecordedRequest {
    /// The first header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The prompt (completions) or all message contents joined by newlines (chat).
    pub fn prompt_text(&self) -> String {
        let Some(j) = &self.json else {
            return String::new();
        };
        if let Some(p) = j.get("prompt").and_then(Value::as_str) {
            return p.to_string();
        }
        j.get("messages")
            .and_then(Value::as_array)
            .map(|ms| {
                ms.iter()
                    .filter_map(|m| m.get("content").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    }

    /// The `n` asked for (1 when absent).
    pub fn n(&self) -> u32 {
        self.json
            .as_ref()
            .and_then(|j| j.get("n"))
            .and_then(Value::as_u64)
            .unwrap_or(1) as u32
    }
}

struct State {
    script: VecDeque<MockResponse>,
    requests: Vec<RecordedRequest>,
    responder: Responder,
    max_choices: Option<u32>,
    served: u64,
}

struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
}

/// The running mock endpoint; stops when dropped.
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl MockServer {
    /// A server whose choices read `mock completion <request>.<index>`.
    pub fn start() -> Self {
        let mut count = 0u64;
        Self::with_responder(move |_, i| {
            if i == 0 {
                count += 1;
            }
            format!("mock completion {count}.{i}")
        })
    }

    /// A server whose choice texts come from `responder(request, index)`.
    pub fn with_responder(
        responder: impl FnMut(&RecordedRequest, u32) -> String + Send + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind mock LLM server");
        let addr = listener.local_addr().expect("mock server address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                script: VecDeque::new(),
                requests: Vec::new(),
                responder: Box::new(responder),
                max_choices: None,
                served: 0,
            }),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    // A broken client connection only affects that request.
                    let _ = serve(&s, stream);
                }
            }
        });
        Self {
            addr,
            shared,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:<port>/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Queue a scripted response (served before the responder).
    pub fn push(&self, response: MockResponse) {
        self.lock().script.push_back(response);
    }

    /// Queue `times` failures with HTTP `code` (and `Retry-After: 0` for 429).
    pub fn fail_times(&self, code: u16, times: usize) {
        for _ in 0..times {
            self.push(MockResponse::Status {
                code,
                body: format!(
                    r#"{{"error":{{"message":"mock failure {code}","type":"mock_error"}}}}"#
                ),
                retry_after: (code == 429).then(|| "0".to_string()),
            });
        }
    }

    /// Return at most this many choices per request (Ollama ignores `n`).
    pub fn set_max_choices(&self, max: Option<u32>) {
        self.lock().max_choices = max;
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Read one request, record it, answer it.
fn serve(shared: &Shared, stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(());
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    let mut content_length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            let v = v.trim().to_string();
            if k == "content-length" {
                content_length = v.parse().unwrap_or(0);
            }
            headers.push((k, v));
        }
    }
    let mut raw = vec![0u8; content_length];
    reader.read_exact(&mut raw)?;
    let body = String::from_utf8_lossy(&raw).into_owned();
    let json = serde_json::from_str::<Value>(&body).ok();
    let request = RecordedRequest {
        method,
        path,
        headers,
        body,
        json,
    };
    let (code, body, retry_after) = {
        let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        state.requests.push(request.clone());
        respond(&mut state, &request)
    };
    let mut out = stream;
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let mut head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(r) = retry_after {
        head.push_str(&format!("Retry-After: {r}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    out.write_all(body.as_bytes())?;
    out.flush()
}

fn error_body(message: &str) -> String {
    json!({"error": {"message": message, "type": "invalid_request_error"}}).to_string()
}

/// (status, body, Retry-After) for one request.
fn respond(state: &mut State, req: &RecordedRequest) -> (u16, String, Option<String>) {
    let chat = match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/v1/completions") => false,
        ("POST", "/v1/chat/completions") => true,
        _ => {
            let msg = format!("no route for {} {}", req.method, req.path);
            return (404, error_body(&msg), None);
        }
    };
    let Some(j) = &req.json else {
        return (400, error_body("request body is not JSON"), None);
    };
    if j.get("model").and_then(Value::as_str).is_none() {
        return (400, error_body("missing `model`"), None);
    }
    let field_ok = if chat {
        j.get("messages").and_then(Value::as_array).is_some()
    } else {
        j.get("prompt").and_then(Value::as_str).is_some()
    };
    if !field_ok {
        let f = if chat { "messages" } else { "prompt" };
        return (400, error_body(&format!("missing `{f}`")), None);
    }
    let texts = match state.script.pop_front() {
        Some(MockResponse::Status {
            code,
            body,
            retry_after,
        }) => return (code, body, retry_after),
        Some(MockResponse::Raw { code, body }) => return (code, body, None),
        Some(MockResponse::Choices(texts)) => texts,
        None => {
            let mut n = req.n().max(1);
            if let Some(m) = state.max_choices {
                n = n.min(m);
            }
            (0..n).map(|i| (state.responder)(req, i)).collect()
        }
    };
    state.served += 1;
    let choices: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if chat {
                json!({"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"})
            } else {
                json!({"index": i, "text": t, "logprobs": null, "finish_reason": "stop"})
            }
        })
        .collect();
    let body = json!({
        "id": format!("mock-{}", state.served),
        "object": if chat { "chat.completion" } else { "text_completion" },
        "created": 0,
        "model": j["model"],
        "choices": choices,
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    });
    (200, body.to_string(), None)
}
