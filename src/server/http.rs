//! The HTTP/JSON door for clients that speak neither gRPC nor gRPC-Web.
//!
//! * `POST /v1/edit` — multipart (`image` file, `mask` file, other fields as text) or JSON
//!   (`{"image": "<base64>", "instruction": …}`). Answers with the image bytes and the seed in
//!   `x-ip2p-seed` (or, with `Accept: application/json` or several variations, JSON with base64
//!   images).
//! * `POST /v1/edit/stream` — the same request; the `EditStream` events as Server-Sent Events.
//! * `GET /v1/info`, `GET /metrics`, `GET /healthz`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use futures::{Stream, StreamExt};
use serde::Deserialize;

use super::jobs::{events, submit, wait_result};
use super::proto;
use super::status::ServerError;
use super::AppState;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A raw pixel buffer in JSON.
#[derive(Debug, Deserialize)]
pub struct RawJson {
    /// Base64 of the pixel bytes.
    pub pixels: String,
    pub width: u32,
    pub height: u32,
    /// `rgba8`, `rgb8` or `gray8`.
    pub format: String,
}

/// The JSON form of `EditRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditJson {
    /// Base64 of an encoded image (PNG, JPEG, WebP).
    pub image: Option<String>,
    pub image_raw: Option<RawJson>,
    #[serde(default)]
    pub instruction: String,
    pub negative_prompt: Option<String>,
    pub steps: Option<u32>,
    pub text_guidance: Option<f32>,
    pub image_guidance: Option<f32>,
    pub seed: Option<u64>,
    pub scheduler: Option<String>,
    pub resolution: Option<u32>,
    /// `paper` or `native`.
    pub resize: Option<String>,
    pub variations: Option<u32>,
    pub mask: Option<String>,
    pub mask_raw: Option<RawJson>,
    /// `png`, `jpeg`, `webp` or `raw_rgba`.
    pub output_format: Option<String>,
    pub jpeg_quality: Option<u32>,
    pub request_id: Option<String>,
    pub preview_every: Option<u32>,
    /// `[{"name": "style", "scale": 0.8}]`: preloaded LoRA files for this edit.
    #[serde(default)]
    pub loras: Vec<LoraJson>,
}

#[derive(Debug, Deserialize)]
pub struct LoraJson {
    pub name: String,
    pub scale: Option<f32>,
}

fn pixel_format(field: &str, s: &str) -> Result<i32, ServerError> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "rgba8" | "rgba" => proto::PixelFormat::Rgba8 as i32,
        "rgb8" | "rgb" => proto::PixelFormat::Rgb8 as i32,
        "gray8" | "gray" | "grey8" | "l8" => proto::PixelFormat::Gray8 as i32,
        o => {
            return Err(ServerError::invalid(
                field,
                format!("unknown pixel format `{o}` (rgba8, rgb8, gray8)"),
            ))
        }
    })
}

fn b64(field: &str, s: &str) -> Result<Vec<u8>, ServerError> {
    // Accept data URLs as browsers produce them.
    let s = s.split_once(";base64,").map(|(_, d)| d).unwrap_or(s);
    B64.decode(s.trim())
        .map_err(|e| ServerError::invalid(field, format!("not valid base64: {e}")))
}

fn image_of(
    field: &str,
    enc: Option<&str>,
    raw: Option<&RawJson>,
) -> Result<Option<proto::Image>, ServerError> {
    Ok(match (enc, raw) {
        (Some(_), Some(_)) => {
            return Err(ServerError::invalid(
                field,
                "give the image encoded or raw, not both",
            ))
        }
        (Some(e), None) => Some(proto::Image {
            data: Some(proto::image::Data::Encoded(b64(field, e)?)),
        }),
        (None, Some(r)) => Some(proto::Image {
            data: Some(proto::image::Data::Raw(proto::RawImage {
                pixels: b64(&format!("{field}_raw.pixels"), &r.pixels)?,
                width: r.width,
                height: r.height,
                format: pixel_format(&format!("{field}_raw.format"), &r.format)?,
            })),
        }),
        (None, None) => None,
    })
}

fn resize_of(s: Option<&str>) -> Result<i32, ServerError> {
    Ok(match s.map(|s| s.to_ascii_lowercase()) {
        None => proto::ResizePolicy::Unspecified as i32,
        Some(s) if s == "paper" => proto::ResizePolicy::Paper as i32,
        Some(s) if s == "native" => proto::ResizePolicy::Native as i32,
        Some(o) => {
            return Err(ServerError::invalid(
                "resize",
                format!("unknown resize policy `{o}` (paper, native)"),
            ))
        }
    })
}

fn output_of(s: Option<&str>) -> Result<i32, ServerError> {
    Ok(match s.map(|s| s.to_ascii_lowercase()) {
        None => proto::OutputFormat::Unspecified as i32,
        Some(s) => match s.as_str() {
            "png" => proto::OutputFormat::Png as i32,
            "jpeg" | "jpg" => proto::OutputFormat::Jpeg as i32,
            "webp" => proto::OutputFormat::Webp as i32,
            "raw_rgba" | "rgba" | "raw" => proto::OutputFormat::RawRgba as i32,
            o => {
                return Err(ServerError::invalid(
                    "output_format",
                    format!("unknown output format `{o}`"),
                ))
            }
        },
    })
}

impl EditJson {
    /// The equivalent protobuf request.
    pub fn into_proto(self) -> Result<proto::EditRequest, ServerError> {
        Ok(proto::EditRequest {
            image: image_of("image", self.image.as_deref(), self.image_raw.as_ref())?,
            instruction: self.instruction,
            negative_prompt: self.negative_prompt,
            steps: self.steps,
            text_guidance: self.text_guidance,
            image_guidance: self.image_guidance,
            seed: self.seed,
            scheduler: self.scheduler.unwrap_or_default(),
            resolution: self.resolution,
            resize: resize_of(self.resize.as_deref())?,
            variations: self.variations,
            mask: image_of("mask", self.mask.as_deref(), self.mask_raw.as_ref())?,
            output_format: output_of(self.output_format.as_deref())?,
            jpeg_quality: self.jpeg_quality,
            request_id: self.request_id.unwrap_or_default(),
            preview_every: self.preview_every.unwrap_or(0),
            loras: self
                .loras
                .into_iter()
                .map(|l| proto::LoraWeight {
                    name: l.name,
                    scale: l.scale,
                })
                .collect(),
        })
    }
}

fn parse_num<T: std::str::FromStr>(field: &str, v: &str) -> Result<T, ServerError> {
    v.trim()
        .parse()
        .map_err(|_| ServerError::invalid(field, format!("`{v}` is not a number")))
}

/// Reads a multipart form: `image` and `mask` as files (raw pixels with `image_format`,
/// `image_width`, `image_height`), the other fields as text.
async fn from_multipart(
    mut mp: Multipart,
    limit: usize,
) -> Result<proto::EditRequest, ServerError> {
    let mut j = EditJson::default();
    let (mut image, mut mask) = (None::<Vec<u8>>, None::<Vec<u8>>);
    let mut raw_meta: std::collections::HashMap<String, String> = Default::default();
    while let Some(field) = mp.next_field().await.map_err(|e| {
        body_error(
            e.status(),
            format!("bad multipart body: {}", e.body_text()),
            limit,
        )
    })? {
        let name = field.name().unwrap_or("").to_owned();
        let bytes = field.bytes().await.map_err(|e| {
            body_error(
                e.status(),
                format!("reading `{name}`: {}", e.body_text()),
                limit,
            )
        })?;
        let text = || String::from_utf8_lossy(&bytes).into_owned();
        match name.as_str() {
            "image" => image = Some(bytes.to_vec()),
            "mask" => mask = Some(bytes.to_vec()),
            "instruction" => j.instruction = text(),
            "negative_prompt" => j.negative_prompt = Some(text()),
            "steps" => j.steps = Some(parse_num("steps", &text())?),
            "text_guidance" => j.text_guidance = Some(parse_num("text_guidance", &text())?),
            "image_guidance" => j.image_guidance = Some(parse_num("image_guidance", &text())?),
            "seed" => j.seed = Some(parse_num("seed", &text())?),
            "scheduler" => j.scheduler = Some(text()),
            "resolution" => j.resolution = Some(parse_num("resolution", &text())?),
            "resize" => j.resize = Some(text()),
            "variations" => j.variations = Some(parse_num("variations", &text())?),
            "output_format" => j.output_format = Some(text()),
            "jpeg_quality" => j.jpeg_quality = Some(parse_num("jpeg_quality", &text())?),
            "request_id" => j.request_id = Some(text()),
            "preview_every" => j.preview_every = Some(parse_num("preview_every", &text())?),
            "image_format" | "image_width" | "image_height" | "mask_format" | "mask_width"
            | "mask_height" => {
                raw_meta.insert(name, text());
            }
            other => return Err(ServerError::invalid(other, "unknown field")),
        }
    }
    let mut req = j.into_proto()?;
    let to_image = |prefix: &str, bytes: Vec<u8>| -> Result<proto::Image, ServerError> {
        Ok(match raw_meta.get(&format!("{prefix}_format")) {
            None => proto::Image {
                data: Some(proto::image::Data::Encoded(bytes)),
            },
            Some(f) => {
                let dim = |k: &str| -> Result<u32, ServerError> {
                    let key = format!("{prefix}_{k}");
                    parse_num(&key, raw_meta.get(&key).map(String::as_str).unwrap_or(""))
                };
                proto::Image {
                    data: Some(proto::image::Data::Raw(proto::RawImage {
                        pixels: bytes,
                        width: dim("width")?,
                        height: dim("height")?,
                        format: pixel_format(&format!("{prefix}_format"), f)?,
                    })),
                }
            }
        })
    };
    req.image = image.map(|b| to_image("image", b)).transpose()?;
    req.mask = mask.map(|b| to_image("mask", b)).transpose()?;
    Ok(req)
}

fn body_error(status: StatusCode, text: String, limit: usize) -> ServerError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ServerError::TooLarge { limit }
    } else {
        ServerError::invalid("body", text)
    }
}

/// Parses either body kind into a protobuf request.
async fn parse_request(req: Request, limit: usize) -> Result<proto::EditRequest, ServerError> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ct.starts_with("multipart/form-data") {
        let mp = Multipart::from_request(req, &())
            .await
            .map_err(|e| body_error(e.status(), e.body_text(), limit))?;
        from_multipart(mp, limit).await
    } else if ct.starts_with("application/json") || ct.is_empty() {
        let bytes = Bytes::from_request(req, &())
            .await
            .map_err(|e| body_error(e.status(), e.body_text(), limit))?;
        if bytes.is_empty() {
            return Err(ServerError::invalid("body", "empty request"));
        }
        let j: EditJson = serde_json::from_slice(&bytes)
            .map_err(|e| ServerError::invalid("body", format!("invalid JSON: {e}")))?;
        j.into_proto()
    } else {
        Err(ServerError::invalid(
            "content-type",
            format!("`{ct}` is not supported (application/json or multipart/form-data)"),
        ))
    }
}

fn deadline_of(headers: &HeaderMap) -> Option<Instant> {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    if let Some(ms) = h("x-ip2p-timeout-ms").and_then(|v| v.parse::<u64>().ok()) {
        return Some(Instant::now() + Duration::from_millis(ms));
    }
    h("grpc-timeout")
        .and_then(super::grpc::parse_grpc_timeout)
        .map(|d| Instant::now() + d)
}

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"))
}

/// The JSON form of a response (images base64).
pub fn response_json(r: &proto::EditResponse) -> serde_json::Value {
    let p = r.parameters.clone().unwrap_or_default();
    let t = r.timings.unwrap_or_default();
    serde_json::json!({
        "request_id": r.request_id,
        "images": r.images.iter().map(|i| serde_json::json!({
            "data": B64.encode(&i.data),
            "width": i.width,
            "height": i.height,
            "mime_type": i.mime_type,
            "seed": i.seed,
        })).collect::<Vec<_>>(),
        "parameters": {
            "steps": p.steps, "text_guidance": p.text_guidance, "image_guidance": p.image_guidance,
            "scheduler": p.scheduler, "resolution": p.resolution,
            "resize": if p.resize == proto::ResizePolicy::Native as i32 { "native" } else { "paper" },
            "working_width": p.working_width, "working_height": p.working_height,
            "truncated_tokens": p.truncated_tokens, "seed": p.seed, "variations": p.variations,
        },
        "timings": {
            "queue_seconds": t.queue_seconds, "encode_seconds": t.encode_seconds,
            "denoise_seconds": t.denoise_seconds, "decode_seconds": t.decode_seconds,
            "total_seconds": t.total_seconds,
        },
    })
}

fn header_value(v: impl ToString) -> HeaderValue {
    HeaderValue::from_str(&v.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

async fn edit(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let headers = req.headers().clone();
    let run = async {
        let preq = parse_request(req, state.config.max_message_bytes)
            .await
            .inspect_err(|e| state.metrics.record("http", e.outcome()))?;
        let s = submit(&state, preq, deadline_of(&headers), "http").await?;
        wait_result(s, &state, "http").await
    };
    match run.await {
        Err(e) => e.into_response(),
        Ok(r) if r.images.len() != 1 || wants_json(&headers) => {
            Json(response_json(&r)).into_response()
        }
        Ok(r) => {
            let img = &r.images[0];
            let p = r.parameters.clone().unwrap_or_default();
            let mut resp = (StatusCode::OK, img.data.clone()).into_response();
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, header_value(&img.mime_type));
            h.insert("x-ip2p-seed", header_value(img.seed));
            h.insert("x-ip2p-request-id", header_value(&r.request_id));
            h.insert("x-ip2p-width", header_value(img.width));
            h.insert("x-ip2p-height", header_value(img.height));
            h.insert("x-ip2p-scheduler", header_value(&p.scheduler));
            h.insert("x-ip2p-steps", header_value(p.steps));
            h.insert("x-ip2p-truncated-tokens", header_value(p.truncated_tokens));
            if let Some(t) = r.timings {
                h.insert(
                    "x-ip2p-total-seconds",
                    header_value(format!("{:.3}", t.total_seconds)),
                );
            }
            resp
        }
    }
}

fn sse_event(ev: Result<proto::EditEvent, ServerError>) -> Event {
    use proto::edit_event::Event as E;
    match ev {
        Err(e) => Event::default()
            .event("error")
            .data(e.to_json().to_string()),
        Ok(proto::EditEvent { event: None }) => Event::default().comment("empty"),
        Ok(proto::EditEvent { event: Some(e) }) => match e {
            E::Queued(q) => Event::default()
                .event("queued")
                .data(serde_json::json!({ "position": q.position }).to_string()),
            E::Started(_) => Event::default().event("started").data("{}"),
            E::Progress(p) => Event::default().event("progress").data(
                serde_json::json!({
                    "step": p.step, "total": p.total, "variation": p.variation,
                    "preview": p.preview.map(|b| B64.encode(b)),
                })
                .to_string(),
            ),
            E::Result(r) => Event::default()
                .event("result")
                .data(response_json(&r).to_string()),
        },
    }
}

async fn edit_stream(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let headers = req.headers().clone();
    let preq = match parse_request(req, state.config.max_message_bytes).await {
        Ok(p) => p,
        Err(e) => {
            state.metrics.record("http", e.outcome());
            return e.into_response();
        }
    };
    let s = match submit(&state, preq, deadline_of(&headers), "http").await {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let stream: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> =
        Box::pin(events(s, state.clone(), "http").map(|e| Ok(sse_event(e))));
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response()
}

async fn info(State(state): State<Arc<AppState>>) -> Response {
    let i = state.info();
    let d = i.defaults.unwrap_or_default();
    let l = i.limits.unwrap_or_default();
    Json(serde_json::json!({
        "model": i.model,
        "version": i.version,
        "schedulers": i.schedulers,
        "embedding_triggers": i.embedding_triggers,
        "loras": i.loras,
        "defaults": {
            "steps": d.steps, "text_guidance": d.text_guidance, "image_guidance": d.image_guidance,
            "scheduler": d.scheduler, "resolution": d.resolution, "resize": "paper",
        },
        "limits": {
            "max_pixels": l.max_pixels, "max_message_bytes": l.max_message_bytes,
            "max_steps": l.max_steps, "max_variations": l.max_variations,
            "max_instruction_chars": l.max_instruction_chars, "queue_capacity": l.queue_capacity,
            "max_resolution": l.max_resolution,
        },
    }))
    .into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    if state.is_ready() {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

/// The HTTP routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/edit", post(edit))
        .route("/v1/edit/stream", post(edit_stream))
        .route("/v1/info", get(info))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(state)
}
