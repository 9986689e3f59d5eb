//! A scripted OpenAI-compatible chat endpoint on loopback, for tests and benchmarks.
//!
//! The reply depends on markers in the caption (the last user message), so concurrent requests
//! behave deterministically:
//! - `[malformed]`: a reply that is not JSON;
//! - `[prose-once]`: the first attempt gets prose instead of JSON, later ones a good reply;
//! - `[prose-then-slow]`: prose first, then a good reply after the configured delay;
//! - `[429]`: the first attempt gets `429` with `Retry-After: 1`, later ones a good reply;
//! - `[500]`: the first attempt gets `500`, later ones a good reply;
//! - `[fail]`: always `500`;
//! - `[slow]`: the first attempt answers only after the configured delay;
//! - `[same]`: the edited caption equals the caption; `[empty]`: an empty instruction;
//! - anything else: "make it snowy" → "<caption>, covered in snow".

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

type Response = hyper::Response<Full<Bytes>>;

#[derive(Debug, Default)]
struct MockState {
    attempts: Mutex<HashMap<String, Vec<Instant>>>,
    requests: Mutex<Vec<serde_json::Value>>,
    slow: Duration,
}

/// The running mock; stops when dropped.
#[derive(Debug)]
pub struct MockLlm {
    pub addr: SocketAddr,
    state: Arc<MockState>,
    stop: Option<oneshot::Sender<()>>,
}

impl MockLlm {
    /// Starts on `127.0.0.1:0` in the current tokio runtime.
    pub async fn start(slow: Duration) -> std::io::Result<Self> {
        let state = Arc::new(MockState {
            slow,
            ..Default::default()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, mut rx) = oneshot::channel::<()>();
        let served = state.clone();
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    c = listener.accept() => c,
                    _ = &mut rx => return,
                };
                let Ok((stream, _)) = conn else { continue };
                let state = served.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |r| route(state.clone(), r));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            state,
            stop: Some(tx),
        })
    }

    /// The base URL to configure a client with.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// When each attempt for the caption containing `needle` arrived.
    pub fn attempts(&self, needle: &str) -> Vec<Instant> {
        let map = self
            .state
            .attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter(|(k, _)| k.contains(needle))
            .flat_map(|(_, v)| v.clone())
            .collect()
    }

    /// Every request body received.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        self.state
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// `status` with a JSON body and `headers`.
fn json(
    status: StatusCode,
    headers: &[(&'static str, &'static str)],
    body: &serde_json::Value,
) -> Response {
    let mut r = hyper::Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    for (k, v) in headers {
        h.insert(*k, hyper::header::HeaderValue::from_static(v));
    }
    r
}

/// `POST /v1/chat/completions` with a JSON body goes to [`chat`]; anything else is refused.
async fn route(
    state: Arc<MockState>,
    req: Request<Incoming>,
) -> Result<Response, std::convert::Infallible> {
    if req.method() != Method::POST || req.uri().path() != "/v1/chat/completions" {
        return Ok(json(StatusCode::NOT_FOUND, &[], &serde_json::json!({})));
    }
    let body = match req.into_body().collect().await {
        Ok(b) => serde_json::from_slice::<serde_json::Value>(&b.to_bytes()).ok(),
        Err(_) => None,
    };
    Ok(match body {
        Some(body) => chat(state, body).await,
        None => json(StatusCode::BAD_REQUEST, &[], &serde_json::json!({})),
    })
}

fn completion(content: &str) -> Response {
    json(
        StatusCode::OK,
        &[],
        &serde_json::json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": 0,
            "model": "mock",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
                "logprobs": null
            }],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        }),
    )
}

fn error(status: StatusCode, headers: &[(&'static str, &'static str)]) -> Response {
    let body = serde_json::json!({"error": {"message": "scripted", "type": "server_error", "param": null, "code": null}});
    json(status, headers, &body)
}

async fn chat(state: Arc<MockState>, body: serde_json::Value) -> Response {
    let caption = body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    let attempt = {
        let mut map = state.attempts.lock().unwrap_or_else(|p| p.into_inner());
        let v = map.entry(caption.clone()).or_default();
        v.push(Instant::now());
        v.len()
    };
    state
        .requests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(body);
    let good = |c: &str| {
        serde_json::json!({"instruction": "make it snowy", "edited_caption": format!("{c}, covered in snow")})
            .to_string()
    };
    if caption.contains("[malformed]") {
        return completion("{\"instruction\": \"make it snowy\", \"edited_caption\": ");
    }
    if (caption.contains("[prose-once]") || caption.contains("[prose-then-slow]")) && attempt == 1 {
        return completion(
            "Sure! Here is an edit: make it snowy. The edited caption would be snowy.",
        );
    }
    if caption.contains("[fail]") {
        return error(StatusCode::INTERNAL_SERVER_ERROR, &[]);
    }
    if caption.contains("[429]") && attempt == 1 {
        return error(StatusCode::TOO_MANY_REQUESTS, &[("retry-after", "1")]);
    }
    if caption.contains("[500]") && attempt == 1 {
        return error(StatusCode::BAD_GATEWAY, &[]);
    }
    if (caption.contains("[slow]") && attempt == 1)
        || (caption.contains("[prose-then-slow]") && attempt == 2)
    {
        tokio::time::sleep(state.slow).await;
    }
    if caption.contains("[same]") {
        return completion(
            &serde_json::json!({"instruction": "keep it", "edited_caption": caption}).to_string(),
        );
    }
    if caption.contains("[empty]") {
        return completion(
            &serde_json::json!({"instruction": "", "edited_caption": "x"}).to_string(),
        );
    }
    completion(&good(&caption))
}
