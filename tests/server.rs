//! The edit service, started for real on 127.0.0.1:0 with the tiny fixture model and called
//! with real clients: tonic (gRPC), reqwest (gRPC-Web framing by hand, HTTP/JSON, SSE).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use candle_core::Device;
use common::fixtures;
use ip2p::loader::{self, LoadOptions, ModelDir};
use ip2p::pipeline::EditPipeline;
use ip2p::server::proto::image_editor_client::ImageEditorClient;
use ip2p::server::proto::{self, edit_event::Event};
use ip2p::server::{self, ServerConfig, ServerHandle};
use prost::Message;
use tonic::transport::Channel;

/// Server tests run one at a time: their timing checks must not compete with each other's
/// worker threads for the machine's cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A plain HTTP client. The workspace builds reqwest with rustls but without a bundled crypto
/// provider (dataset-gen chooses ring), so one is installed before the first client.
fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

fn pipeline() -> EditPipeline {
    let dir = ModelDir::from_dir(&fixtures().join("tiny-ip2p")).expect("fixture");
    EditPipeline::new(loader::load(&dir, &Device::Cpu, &LoadOptions::default()).expect("load"))
        .expect("pipeline")
}

fn config() -> ServerConfig {
    ServerConfig {
        addr: "127.0.0.1:0".parse().expect("addr"),
        drain_seconds: 30,
        ..Default::default()
    }
}

async fn start(cfg: ServerConfig) -> ServerHandle {
    let h = server::start(cfg, pipeline(), "tiny-ip2p".into())
        .await
        .expect("server starts");
    tokio::time::timeout(Duration::from_secs(60), h.ready())
        .await
        .expect("ready in time");
    h
}

async fn client(h: &ServerHandle) -> ImageEditorClient<Channel> {
    ImageEditorClient::connect(format!("http://{}", h.addr))
        .await
        .expect("connect")
        .max_decoding_message_size(usize::MAX)
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let img =
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, 150]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("png");
    out
}

fn request(steps: u32, seed: u64) -> proto::EditRequest {
    proto::EditRequest {
        image: Some(proto::Image {
            data: Some(proto::image::Data::Encoded(png(64, 48))),
        }),
        instruction: "turn it into a watercolor".into(),
        steps: Some(steps),
        seed: Some(seed),
        resolution: Some(64),
        request_id: format!("test-{seed}"),
        ..Default::default()
    }
}

/// A request whose steps are slow enough to observe (tiny model at 256 px).
fn slow_request(steps: u32, seed: u64) -> proto::EditRequest {
    proto::EditRequest {
        resolution: Some(256),
        image: Some(proto::Image {
            data: Some(proto::image::Data::Encoded(png(256, 256))),
        }),
        ..request(steps, seed)
    }
}

fn grpc_web_frame(msg: &impl Message) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut f = vec![0u8];
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    f.extend_from_slice(&body);
    f
}

/// Splits a gRPC-Web response body into (messages, trailers).
fn grpc_web_parse(mut body: &[u8]) -> (Vec<Vec<u8>>, String) {
    let (mut msgs, mut trailers) = (Vec::new(), String::new());
    while body.len() >= 5 {
        let flag = body[0];
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        let data = &body[5..5 + len];
        if flag & 0x80 != 0 {
            trailers.push_str(&String::from_utf8_lossy(data));
        } else {
            msgs.push(data.to_vec());
        }
        body = &body[5 + len..];
    }
    (msgs, trailers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_doors_return_identical_bytes_equal_to_the_pipeline() {
    let _serial = SERIAL.lock().await;
    let h = start(config()).await;
    let req = request(3, 42);

    let grpc = client(&h)
        .await
        .edit(req.clone())
        .await
        .expect("grpc edit")
        .into_inner();
    assert_eq!(grpc.request_id, "test-42");
    assert_eq!(grpc.images.len(), 1);
    let grpc_png = grpc.images[0].data.clone();
    assert_eq!(grpc.images[0].seed, 42);
    assert_eq!((grpc.images[0].width, grpc.images[0].height), (64, 48));

    let http = http_client();
    let r = http
        .post(format!("http://{}/ip2p.v1.ImageEditor/Edit", h.addr))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(grpc_web_frame(&req))
        .send()
        .await
        .expect("grpc-web call");
    assert_eq!(r.status(), 200);
    let (msgs, trailers) = grpc_web_parse(&r.bytes().await.expect("body"));
    assert!(trailers.contains("grpc-status:0"), "trailers: {trailers}");
    let web = proto::EditResponse::decode(msgs[0].as_slice()).expect("decode");
    assert_eq!(
        web.images[0].data, grpc_png,
        "gRPC-Web bytes differ from gRPC"
    );

    let b64 = base64::engine::general_purpose::STANDARD;
    let body = serde_json::json!({
        "image": b64.encode(png(64, 48)),
        "instruction": "turn it into a watercolor",
        "steps": 3, "seed": 42, "resolution": 64, "request_id": "test-42",
    });
    let r = http
        .post(format!("http://{}/v1/edit", h.addr))
        .json(&body)
        .send()
        .await
        .expect("http call");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ip2p-seed"], "42");
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(
        r.bytes().await.expect("body").to_vec(),
        grpc_png,
        "HTTP bytes differ from gRPC"
    );

    // Multipart too.
    let form = reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(png(64, 48)).file_name("in.png"),
        )
        .text("instruction", "turn it into a watercolor")
        .text("steps", "3")
        .text("seed", "42")
        .text("resolution", "64");
    let r = http
        .post(format!("http://{}/v1/edit", h.addr))
        .multipart(form)
        .send()
        .await
        .expect("multipart call");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.bytes().await.expect("body").to_vec(),
        grpc_png,
        "multipart bytes differ"
    );

    // The in-process pipeline with the same seed, encoded the same way.
    let cfg = ServerConfig::default();
    let job = ip2p::server::validate::validate(&req, &cfg).expect("valid");
    let out = pipeline()
        .edit(&job.input, &job.params, &mut ip2p::pipeline::NoProgress)
        .expect("edit");
    let direct = ip2p::server::codec::encode(&out.image, job.output, 42).expect("encode");
    assert_eq!(
        direct.data, grpc_png,
        "served bytes differ from the in-process pipeline"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_events_arrive_in_order_and_end_with_the_unary_result() {
    let _serial = SERIAL.lock().await;
    let h = start(config()).await;
    let mut c = client(&h).await;
    let mut req = request(4, 7);
    req.preview_every = 2;
    let mut stream = c
        .edit_stream(req.clone())
        .await
        .expect("stream")
        .into_inner();
    let mut kinds = Vec::new();
    let mut steps = Vec::new();
    let mut previews = 0;
    let mut result = None;
    while let Some(ev) = stream.message().await.expect("event") {
        match ev.event.expect("event kind") {
            Event::Queued(_) => kinds.push("queued"),
            Event::Started(_) => kinds.push("started"),
            Event::Progress(p) => {
                kinds.push("progress");
                steps.push(p.step);
                assert_eq!(p.total, 4);
                if let Some(b) = p.preview {
                    image::load_from_memory(&b).expect("preview is a PNG");
                    previews += 1;
                }
            }
            Event::Result(r) => {
                kinds.push("result");
                result = Some(r);
            }
        }
    }
    assert_eq!(
        kinds,
        ["queued", "started", "progress", "progress", "progress", "progress", "result"]
    );
    assert_eq!(steps, [1, 2, 3, 4]);
    assert_eq!(previews, 2, "a preview every 2 steps");
    let unary = c.edit(req).await.expect("unary").into_inner();
    assert_eq!(result.expect("result").images, unary.images);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_frees_the_worker_within_a_step() {
    let _serial = SERIAL.lock().await;
    let h = start(config()).await;
    let mut c = client(&h).await;
    let mut a = c
        .edit_stream(slow_request(1000, 1))
        .await
        .expect("stream a")
        .into_inner();
    // Wait for two steps to measure a step's time.
    let mut times = Vec::new();
    while let Some(ev) = a.message().await.expect("event") {
        if let Some(Event::Progress(p)) = ev.event {
            times.push(Instant::now());
            if p.step == 3 {
                break;
            }
        }
    }
    let step = times[2] - times[1];
    // B waits behind A.
    let mut b = c
        .edit_stream(request(2, 2))
        .await
        .expect("stream b")
        .into_inner();
    match b.message().await.expect("event").and_then(|e| e.event) {
        Some(Event::Queued(q)) => assert_eq!(q.position, 1, "one job ahead"),
        other => panic!("expected queued, got {other:?}"),
    }
    let dropped = Instant::now();
    drop(a);
    loop {
        match b.message().await.expect("event").and_then(|e| e.event) {
            Some(Event::Started(_)) => break,
            Some(_) => continue,
            None => panic!("stream b ended before starting"),
        }
    }
    let waited = dropped.elapsed();
    assert!(
        waited <= step * 3 + Duration::from_millis(200),
        "B started {waited:?} after A was dropped; one step takes {step:?}"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_refused_at_once_and_deadlines_stop_jobs() {
    let _serial = SERIAL.lock().await;
    let h = start(ServerConfig {
        queue_capacity: 1,
        ..config()
    })
    .await;
    let mut c = client(&h).await;
    let mut running = c
        .edit_stream(slow_request(1000, 1))
        .await
        .expect("a")
        .into_inner();
    loop {
        if let Some(Event::Started(_)) = running
            .message()
            .await
            .expect("event")
            .and_then(|e| e.event)
        {
            break;
        }
    }
    let mut waiting = c.edit_stream(request(2, 2)).await.expect("b").into_inner();
    let _ = waiting.message().await;
    // Warm the connection path, then time the refusal.
    let t = Instant::now();
    let err = c.edit(request(2, 3)).await.expect_err("queue is full");
    let took = t.elapsed();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(took < Duration::from_millis(50), "refusal took {took:?}");
    let details = tonic_types::StatusExt::get_error_details(&err);
    assert!(details.retry_info().is_some(), "a retry hint is given");
    drop(running);
    drop(waiting);
    tokio::time::timeout(Duration::from_secs(30), h.state.queue.wait_idle())
        .await
        .expect("queue drains");

    // A deadline that passes mid-edit: DEADLINE_EXCEEDED, and the job stops.
    // Through gRPC-Web, whose client does not enforce the deadline itself (tonic's would give
    // up locally at the same instant), so the status seen is the server's.
    let t = Instant::now();
    let r = http_client()
        .post(format!("http://{}/ip2p.v1.ImageEditor/Edit", h.addr))
        .header("content-type", "application/grpc-web+proto")
        .header("grpc-timeout", "400m")
        .body(grpc_web_frame(&slow_request(1000, 4)))
        .send()
        .await
        .expect("call");
    let status = r
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_else(String::new);
    let body = r.bytes().await.expect("body");
    let (_, trailers) = grpc_web_parse(&body);
    assert!(
        status == "4" || trailers.contains("grpc-status:4"),
        "expected DEADLINE_EXCEEDED, got status {status:?} trailers {trailers:?}"
    );
    // The 400 ms deadline is answered by the waiting handler, not after 1000 steps of work.
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the deadline was honoured late: {:?}",
        t.elapsed()
    );
    tokio::time::timeout(Duration::from_secs(10), h.state.queue.wait_idle())
        .await
        .expect("the job stopped");
    assert!(t.elapsed() < Duration::from_secs(10));
    let m = h.state.metrics.render();
    assert!(m.contains("outcome=\"deadline\""), "{m}");
    h.shutdown().await;
}

fn with(f: impl FnOnce(&mut proto::EditRequest)) -> proto::EditRequest {
    let mut r = request(2, 9);
    f(&mut r);
    r
}

fn huge_png_header() -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&50_000u32.to_be_bytes());
    ihdr.extend_from_slice(&50_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    for chunk in [
        &ihdr[..],
        &b"IDAT\x78\x9c\x03\x00\x00\x00\x00\x01"[..],
        &b"IEND"[..],
    ] {
        png.extend_from_slice(&((chunk.len() - 4) as u32).to_be_bytes());
        png.extend_from_slice(chunk);
        png.extend_from_slice(&crc32(chunk).to_be_bytes());
    }
    png
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_clear_statuses_and_the_server_keeps_serving() {
    let _serial = SERIAL.lock().await;
    let h = start(config()).await;
    let mut c = client(&h).await;
    let enc = |b: Vec<u8>| {
        Some(proto::Image {
            data: Some(proto::image::Data::Encoded(b)),
        })
    };
    let cases: Vec<(&str, proto::EditRequest, &str)> = vec![
        (
            "corrupt bytes",
            with(|r| r.image = enc(b"not an image at all".to_vec())),
            "image",
        ),
        (
            "50k x 50k header",
            with(|r| r.image = enc(huge_png_header())),
            "image",
        ),
        ("empty message", proto::EditRequest::default(), "image"),
        (
            "10 000 characters",
            with(|r| r.instruction = "a".repeat(10_000)),
            "instruction",
        ),
        (
            "NaN guidance",
            with(|r| r.text_guidance = Some(f32::NAN)),
            "text_guidance",
        ),
        (
            "negative guidance",
            with(|r| r.image_guidance = Some(-1.0)),
            "image_guidance",
        ),
        ("steps 0", with(|r| r.steps = Some(0)), "steps"),
        ("steps 100 000", with(|r| r.steps = Some(100_000)), "steps"),
        (
            "mask of the wrong size",
            with(|r| {
                r.mask = Some(proto::Image {
                    data: Some(proto::image::Data::Raw(proto::RawImage {
                        pixels: vec![255; 10 * 10],
                        width: 10,
                        height: 10,
                        format: proto::PixelFormat::Gray8 as i32,
                    })),
                })
            }),
            "mask",
        ),
        (
            "unknown scheduler",
            with(|r| r.scheduler = "plms".into()),
            "scheduler",
        ),
        (
            "too many variations",
            with(|r| r.variations = Some(100)),
            "variations",
        ),
        (
            "raw buffer too short",
            with(|r| {
                r.image = Some(proto::Image {
                    data: Some(proto::image::Data::Raw(proto::RawImage {
                        pixels: vec![0; 5],
                        width: 64,
                        height: 64,
                        format: proto::PixelFormat::Rgba8 as i32,
                    })),
                })
            }),
            "image.raw.pixels",
        ),
    ];
    for (what, req, field) in cases {
        let err = c.edit(req).await.expect_err(what);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err:?}");
        let details = tonic_types::StatusExt::get_error_details(&err);
        let br = details
            .bad_request()
            .unwrap_or_else(|| panic!("{what}: no BadRequest details"));
        assert_eq!(br.field_violations[0].field, field, "{what}");
    }
    // HTTP: NaN in a form field, and an unknown content type.
    let http = http_client();
    let form = reqwest::multipart::Form::new()
        .part("image", reqwest::multipart::Part::bytes(png(64, 48)))
        .text("instruction", "x")
        .text("text_guidance", "NaN");
    let r = http
        .post(format!("http://{}/v1/edit", h.addr))
        .multipart(form)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    let j: serde_json::Value = r.json().await.expect("json error");
    assert_eq!(j["error"]["field"], "text_guidance");
    let r = http
        .post(format!("http://{}/v1/edit", h.addr))
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);

    // Still serving.
    let ok = c
        .edit(request(1, 5))
        .await
        .expect("a good request after the bad ones");
    assert_eq!(ok.into_inner().images.len(), 1);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_is_served_without_the_token_and_the_api_still_needs_it() {
    let _serial = SERIAL.lock().await;
    let h = start(ServerConfig {
        token: Some("s3cret".into()),
        ..config()
    })
    .await;
    let http = http_client();
    let get = |p: &str| http.get(format!("http://{}{p}", h.addr)).send();
    let page = get("/").await.expect("page");
    assert_eq!(page.status(), 200);
    let ct = page.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .to_owned();
    assert!(ct.starts_with("text/html"), "{ct}");
    let html = page.text().await.expect("html");
    assert!(html.contains("/ui/app.js") && html.contains("id=\"instruction\""));
    for (asset, needle) in [
        ("/ui/app.js", "startEdit"),
        ("/ui/shared/transport.js", "export function startEdit"),
        ("/ui/shared/sse.js", "export class SseParser"),
        ("/ui/style.css", ".grid"),
    ] {
        let r = get(asset).await.expect("asset");
        assert_eq!(r.status(), 200, "{asset}");
        let ct = r.headers()["content-type"]
            .to_str()
            .unwrap_or("")
            .to_owned();
        assert!(ct.starts_with("text/"), "{asset}: {ct}");
        assert!(r.text().await.expect("body").contains(needle), "{asset}");
    }
    assert_eq!(get("/ui/nothing.js").await.expect("404").status(), 404);
    assert_eq!(get("/v1/info").await.expect("info").status(), 401);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_guard_every_door_but_health() {
    let _serial = SERIAL.lock().await;
    let h = start(ServerConfig {
        token: Some("s3cret".into()),
        ..config()
    })
    .await;
    let mut c = client(&h).await;
    let err = c.edit(request(1, 1)).await.expect_err("no token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut req = tonic::Request::new(request(1, 1));
    req.metadata_mut()
        .insert("authorization", "Bearer wrong".parse().expect("header"));
    assert_eq!(
        c.edit(req).await.expect_err("wrong").code(),
        tonic::Code::Unauthenticated
    );
    let mut req = tonic::Request::new(request(1, 1));
    req.metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().expect("header"));
    assert!(c.edit(req).await.is_ok());

    let http = http_client();
    let url = format!("http://{}/v1/info", h.addr);
    assert_eq!(http.get(&url).send().await.expect("send").status(), 401);
    assert_eq!(
        http.get(&url)
            .bearer_auth("s3cret")
            .send()
            .await
            .expect("send")
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("http://{}/healthz", h.addr))
            .send()
            .await
            .expect("send")
            .status(),
        200
    );
    // gRPC-Web without the token.
    let r = http
        .post(format!("http://{}/ip2p.v1.ImageEditor/GetInfo", h.addr))
        .header("content-type", "application/grpc-web+proto")
        .body(grpc_web_frame(&proto::GetInfoRequest {}))
        .send()
        .await
        .expect("send");
    assert_eq!(
        r.headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap_or("")),
        Some("16")
    );
    // Health over gRPC needs no token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        Channel::from_shared(format!("http://{}", h.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect"),
    );
    let s = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "ip2p.v1.ImageEditor".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        s.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_origin_passes_preflight_and_completes_a_grpc_web_call() {
    let _serial = SERIAL.lock().await;
    let h = start(config()).await;
    let http = http_client();
    let url = format!("http://{}/ip2p.v1.ImageEditor/Edit", h.addr);
    let origin = "https://plugin.example";
    let pre = http
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,x-grpc-web,x-user-agent,authorization",
        )
        .send()
        .await
        .expect("preflight");
    assert!(pre.status().is_success(), "{}", pre.status());
    assert!(pre.headers().contains_key("access-control-allow-origin"));
    // `Authorization` must be named: the Fetch standard's `*` does not cover it.
    let allowed = pre
        .headers()
        .get("access-control-allow-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    for h in ["authorization", "content-type", "x-grpc-web"] {
        assert!(
            allowed.split(',').any(|a| a.trim() == h),
            "{h} not in `{allowed}`"
        );
    }
    let r = http
        .post(&url)
        .header("origin", origin)
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(grpc_web_frame(&request(2, 11)))
        .send()
        .await
        .expect("call");
    assert!(r.headers().contains_key("access-control-allow-origin"));
    let expose = r
        .headers()
        .get("access-control-expose-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(expose.contains("grpc-status"), "{expose}");
    // A cross-origin client reads a 429's Retry-After only when it is exposed.
    assert!(expose.contains("retry-after"), "{expose}");
    let (msgs, trailers) = grpc_web_parse(&r.bytes().await.expect("body"));
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let resp = proto::EditResponse::decode(msgs[0].as_slice()).expect("decode");
    assert_eq!(resp.images[0].seed, 11);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sse_stream_and_info() {
    let _serial = SERIAL.lock().await;
    let h = start(config()).await;
    let http = http_client();
    let b64 = base64::engine::general_purpose::STANDARD;
    let r = http
        .post(format!("http://{}/v1/edit/stream", h.addr))
        .json(&serde_json::json!({
            "image": b64.encode(png(64, 48)), "instruction": "make it night",
            "steps": 3, "seed": 5, "resolution": 64, "preview_every": 1,
        }))
        .send()
        .await
        .expect("sse");
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("events");
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(
        names,
        ["queued", "started", "progress", "progress", "progress", "result"],
        "{text}"
    );
    let info: serde_json::Value = http
        .get(format!("http://{}/v1/info", h.addr))
        .send()
        .await
        .expect("info")
        .json()
        .await
        .expect("json");
    assert_eq!(info["limits"]["max_steps"], 1000);
    assert!(info["schedulers"].as_array().is_some_and(|s| s.len() == 5));
    let metrics = http
        .get(format!("http://{}/metrics", h.addr))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("ip2p_requests_total{door=\"http\",outcome=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("ip2p_step_seconds_bucket"));
    h.shutdown().await;
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_with_cancels_and_bad_inputs_then_shutdown_mid_run() {
    let _serial = SERIAL.lock().await;
    // Room for every client's request (and for dropped streams the worker has not reaped yet):
    // this test is about cancels, bad inputs and shutdown; queue-full refusals have their own
    // test, and with a tight queue the number of successful edits depended on machine load.
    let h = start(ServerConfig {
        queue_capacity: 64,
        ..config()
    })
    .await;
    let addr = h.addr;
    let rss_before = rss_kib();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for client_id in 0..16u64 {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = ImageEditorClient::connect(format!("http://{addr}"))
                .await
                .expect("connect");
            let mut outcomes = Vec::new();
            for i in 0..13u64 {
                let n = client_id * 13 + i;
                if n >= 200 {
                    break;
                }
                let outcome = match n % 5 {
                    // A bad request.
                    0 => c
                        .edit(with(|r| r.steps = Some(0)))
                        .await
                        .map(|_| "ok")
                        .unwrap_or_else(|e| code(&e)),
                    // A cancel: start a stream, read an event, drop it.
                    1 => match c.edit_stream(request(3, n)).await {
                        Ok(s) => {
                            let mut s = s.into_inner();
                            let _ = s.message().await;
                            "cancelled"
                        }
                        Err(e) => code(&e),
                    },
                    _ => c
                        .edit(request(1, n))
                        .await
                        .map(|_| "ok")
                        .unwrap_or_else(|e| code(&e)),
                };
                outcomes.push(outcome);
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            outcomes
        }));
    }
    // Shut down mid-run: in-flight edits finish, later ones are refused cleanly.
    while done.load(std::sync::atomic::Ordering::SeqCst) < 150 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let state = h.state.clone();
    let shutdown = tokio::spawn(h.shutdown());
    let mut all = Vec::new();
    for t in tasks {
        let outcomes = tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("no client hangs")
            .expect("client task");
        all.extend(outcomes);
    }
    tokio::time::timeout(Duration::from_secs(60), shutdown)
        .await
        .expect("shutdown completes")
        .expect("shutdown task");
    assert_eq!(all.len(), 200);
    for o in &all {
        assert!(
            [
                "ok",
                "cancelled",
                "InvalidArgument",
                "ResourceExhausted",
                "Unavailable"
            ]
            .contains(o),
            "unexpected outcome {o}"
        );
    }
    let ok = all.iter().filter(|o| **o == "ok").count();
    assert!(ok > 50, "only {ok} edits succeeded: {all:?}");
    let invalid = all.iter().filter(|o| **o == "InvalidArgument").count();
    assert!(
        invalid >= 30,
        "bad requests before the shutdown are refused as invalid ({invalid})"
    );
    assert!(state.queue.is_idle(), "every job finished or stopped");
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(grown < 512 * 1024, "RSS grew by {grown} KiB");
}

fn code(e: &tonic::Status) -> &'static str {
    match e.code() {
        tonic::Code::InvalidArgument => "InvalidArgument",
        tonic::Code::ResourceExhausted => "ResourceExhausted",
        tonic::Code::Unavailable => "Unavailable",
        tonic::Code::Cancelled => "cancelled",
        _ => "other",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn photoshop_flow_raw_rgba_with_a_selection_and_variations() {
    let _serial = SERIAL.lock().await;
    let h = start(config()).await;
    let mut c = client(&h).await;
    let (w, hgt) = (40u32, 30u32);
    let rgba: Vec<u8> = (0..w * hgt)
        .flat_map(|i| [(i % 255) as u8, 80, 160, if i % 2 == 0 { 255 } else { 128 }])
        .collect();
    // Select the right half.
    let mask: Vec<u8> = (0..w * hgt)
        .map(|i| if i % w >= w / 2 { 255 } else { 0 })
        .collect();
    let req = proto::EditRequest {
        image: Some(proto::Image {
            data: Some(proto::image::Data::Raw(proto::RawImage {
                pixels: rgba.clone(),
                width: w,
                height: hgt,
                format: proto::PixelFormat::Rgba8 as i32,
            })),
        }),
        mask: Some(proto::Image {
            data: Some(proto::image::Data::Raw(proto::RawImage {
                pixels: mask,
                width: w,
                height: hgt,
                format: proto::PixelFormat::Gray8 as i32,
            })),
        }),
        instruction: "make it red".into(),
        steps: Some(2),
        seed: Some(100),
        resolution: Some(64),
        variations: Some(2),
        output_format: proto::OutputFormat::RawRgba as i32,
        ..Default::default()
    };
    let r = c.edit(req).await.expect("edit").into_inner();
    assert_eq!(r.images.len(), 2);
    assert_eq!(r.images[0].seed, 100);
    assert_eq!(r.images[1].seed, 101);
    assert_ne!(r.images[0].data, r.images[1].data, "variations differ");
    for img in &r.images {
        assert_eq!((img.width, img.height), (w, hgt));
        assert_eq!(img.data.len() as u32, w * hgt * 4);
        for y in 0..hgt {
            for x in 0..w {
                let i = ((y * w + x) * 4) as usize;
                // Alpha is the input's everywhere.
                assert_eq!(img.data[i + 3], rgba[i + 3]);
                if x < w / 2 {
                    // Outside the selection the input is untouched.
                    assert_eq!(
                        &img.data[i..i + 3],
                        &rgba[i..i + 3],
                        "pixel ({x},{y}) changed outside the mask"
                    );
                }
            }
        }
    }
    let changed = (0..(w * hgt) as usize)
        .filter(|p| (p % w as usize) >= (w / 2) as usize)
        .any(|p| r.images[0].data[p * 4..p * 4 + 3] != rgba[p * 4..p * 4 + 3]);
    assert!(changed, "the selection was edited");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_grpc_and_http() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().expect("tmp");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let (cert_path, key_path) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
    let h = start(ServerConfig {
        tls_cert: Some(cert_path),
        tls_key: Some(key_path),
        ..config()
    })
    .await;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(cert.cert.pem()))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://localhost:{}", h.addr.port()))
        .expect("uri")
        .tls_config(tls)
        .expect("tls config")
        .connect()
        .await
        .expect("TLS connect");
    let mut c = ImageEditorClient::new(channel);
    let info = c
        .get_info(proto::GetInfoRequest {})
        .await
        .expect("info over TLS")
        .into_inner();
    assert_eq!(info.model, "tiny-ip2p");
    let r = c
        .edit(request(1, 3))
        .await
        .expect("edit over TLS")
        .into_inner();
    assert_eq!(r.images.len(), 1);
    // A plaintext client is not served.
    let plain = ImageEditorClient::connect(format!("http://{}", h.addr)).await;
    if let Ok(mut p) = plain {
        assert!(p.get_info(proto::GetInfoRequest {}).await.is_err());
    }
    h.shutdown().await;
}

/// The services listed through gRPC reflection `v1` or `v1alpha` (generated clients of both).
macro_rules! list_services {
    ($v:ident, $channel:expr) => {{
        use tonic_reflection::pb::$v::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = ServerReflectionClient::new($channel)
            .server_reflection_info(futures::stream::iter([req]))
            .await
            .expect(concat!("reflection ", stringify!($v)))
            .into_inner();
        let msg = resp.message().await.expect("answer").expect("one answer");
        match msg.message_response {
            Some(MessageResponse::ListServicesResponse(l)) => l
                .service
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<String>>(),
            other => panic!("unexpected {other:?}"),
        }
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_service_and_oversized_messages_are_refused() {
    let _serial = SERIAL.lock().await;
    let h = start(ServerConfig {
        max_message_bytes: 64 * 1024,
        ..config()
    })
    .await;
    let channel = Channel::from_shared(format!("http://{}", h.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    for (version, names) in [
        ("v1", list_services!(v1, channel.clone())),
        ("v1alpha", list_services!(v1alpha, channel.clone())),
    ] {
        for want in ["ip2p.v1.ImageEditor", "grpc.health.v1.Health"] {
            assert!(names.iter().any(|n| n == want), "{version}: {names:?}");
        }
    }

    // A message over --max-message-bytes is refused on both doors, and the server goes on.
    let mut c = client(&h).await;
    let big = with(|r| r.negative_prompt = Some("x".repeat(100 * 1024)));
    let err = c.edit(big).await.expect_err("too large");
    assert!(
        matches!(
            err.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{err:?}"
    );
    let r = http_client()
        .post(format!("http://{}/v1/edit", h.addr))
        .header("content-type", "application/json")
        .body(vec![b' '; 100 * 1024])
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 413);
    assert!(c.edit(request(1, 1)).await.is_ok());
    h.shutdown().await;
}

/// `--device cpu,cpu`: two model workers behind the one queue. Two edits sent at once run at
/// the same time (both workers busy), and each result is byte for byte what a one-worker
/// server returns for the same request.
#[tokio::test]
async fn two_workers_run_two_edits_at_once_with_one_workers_results() {
    let _serial = SERIAL.lock().await;
    let two = server::start_many(config(), vec![pipeline(), pipeline()], "tiny-ip2p".into())
        .await
        .expect("server starts");
    tokio::time::timeout(Duration::from_secs(60), two.ready())
        .await
        .expect("ready in time");
    let (mut c1, mut c2) = (client(&two).await, client(&two).await);
    let (a, b) = (slow_request(12, 101), slow_request(12, 202));
    let watch = {
        let state = two.state.clone();
        tokio::spawn(async move {
            let mut most = 0;
            for _ in 0..2000 {
                most = most.max(state.queue.running());
                if most == 2 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            most
        })
    };
    let (ra, rb) = tokio::join!(c1.edit(a.clone()), c2.edit(b.clone()));
    let (ra, rb) = (
        ra.expect("edit a").into_inner(),
        rb.expect("edit b").into_inner(),
    );
    assert_eq!(
        watch.await.expect("watch"),
        2,
        "the two edits never ran at once"
    );
    // A worker counts its edit after sending the result: wait until both are free.
    tokio::time::timeout(Duration::from_secs(10), two.state.queue.wait_idle())
        .await
        .expect("idle");
    let m = two.state.metrics.render();
    for w in ["0", "1"] {
        let line = format!("ip2p_worker_edits_total{{device=\"cpu\",worker=\"{w}\"}}");
        let n: u64 = m
            .lines()
            .find(|l| l.starts_with(&line))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        // The warm-up edits are not counted: each worker ran one of the two edits.
        assert_eq!(n, 1, "worker {w}: {m}");
    }
    two.shutdown().await;

    let one = start(config()).await;
    let mut c = client(&one).await;
    for (req, got) in [(a, ra), (b, rb)] {
        let want = c.edit(req).await.expect("edit").into_inner();
        assert_eq!(got.images.len(), 1);
        assert_eq!(
            got.images, want.images,
            "two-worker result differs from one worker's"
        );
    }
    one.shutdown().await;
}

/// Embeddings preloaded with the model (`ip2p serve --embedding`) are named by `GetInfo` (gRPC
/// and HTTP), and an instruction using a trigger word edits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preloaded_embeddings_are_listed_and_usable() {
    let _g = SERIAL.lock().await;
    let dir = ModelDir::from_dir(&fixtures().join("tiny-ip2p")).expect("fixture");
    let opts = LoadOptions {
        embeddings: vec![
            ip2p::loader::embeddings::EmbeddingSpec {
                path: fixtures().join("personal/cat-toy.pt"),
                token: Some("<cat-toy>".into()),
            },
            ip2p::loader::embeddings::EmbeddingSpec {
                path: fixtures().join("personal/watercolor-style.safetensors"),
                token: None,
            },
        ],
        ..Default::default()
    };
    let pipe = EditPipeline::new(loader::load(&dir, &Device::Cpu, &opts).expect("load"))
        .expect("pipeline");
    let h = server::start(config(), pipe, "tiny-ip2p".into())
        .await
        .expect("server starts");
    tokio::time::timeout(Duration::from_secs(60), h.ready())
        .await
        .expect("ready in time");
    let mut c = client(&h).await;
    let info = c
        .get_info(proto::GetInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.embedding_triggers, ["<cat-toy>", "<watercolor-style>"]);
    let json: serde_json::Value = http_client()
        .get(format!("http://{}/v1/info", h.addr))
        .send()
        .await
        .expect("http info")
        .json()
        .await
        .expect("json");
    assert_eq!(
        json["embedding_triggers"],
        serde_json::json!(["<cat-toy>", "<watercolor-style>"])
    );
    let mut req = request(1, 3);
    req.instruction = "turn <cat-toy> into <watercolor-style>".into();
    let r = c.edit(req).await.expect("edit").into_inner();
    assert_eq!(r.images.len(), 1);
    h.shutdown().await;
}

/// A LoRA named by a request (`--request-lora`) gives the bytes the same file folded in at load
/// (`--lora`) gives; the next request without it gets the model's own bytes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_loras_apply_per_edit_as_if_folded_at_load() {
    let _g = SERIAL.lock().await;
    let file = fixtures().join("personal/tiny-lora-kohya.safetensors");
    let mut cfg = config();
    cfg.request_loras = vec![ip2p::loader::lora::NamedLora {
        name: "kohya".into(),
        path: file.clone(),
    }];
    let h = start(cfg).await;
    let dir = ModelDir::from_dir(&fixtures().join("tiny-ip2p")).expect("fixture");
    let folded_opts = LoadOptions {
        loras: vec![ip2p::loader::lora::LoraSpec {
            path: file,
            scale: 0.7,
        }],
        ..Default::default()
    };
    let folded = EditPipeline::new(loader::load(&dir, &Device::Cpu, &folded_opts).expect("load"))
        .expect("pipeline");
    let hf = server::start(config(), folded, "folded".into())
        .await
        .expect("server starts");
    tokio::time::timeout(Duration::from_secs(60), hf.ready())
        .await
        .expect("ready");

    let mut c = client(&h).await;
    let info = c.get_info(proto::GetInfoRequest {}).await.expect("info");
    assert_eq!(info.into_inner().loras, ["kohya"]);
    let with = |scale: f32| {
        let mut r = request(3, 42);
        r.loras = vec![proto::LoraWeight {
            name: "kohya".into(),
            scale: Some(scale),
        }];
        r
    };
    let bytes = |r: proto::EditResponse| r.images[0].data.clone();
    let plain = bytes(c.edit(request(3, 42)).await.expect("plain").into_inner());
    let adapted = bytes(c.edit(with(0.7)).await.expect("lora").into_inner());
    let again = bytes(c.edit(request(3, 42)).await.expect("plain").into_inner());
    let expected = bytes(
        client(&hf)
            .await
            .edit(request(3, 42))
            .await
            .expect("folded")
            .into_inner(),
    );
    assert_ne!(adapted, plain, "the LoRA changed nothing");
    assert_eq!(
        adapted, expected,
        "per-request LoRA differs from the folded model"
    );
    assert_eq!(again, plain, "the model changed after a LoRA request");

    // The HTTP door takes the same field; unknown names and bad scales name the field.
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = |loras: serde_json::Value| {
        serde_json::json!({
            "image": b64.encode(png(64, 48)), "instruction": "turn it into a watercolor",
            "steps": 3, "seed": 42, "resolution": 64, "loras": loras,
        })
    };
    let url = format!("http://{}/v1/edit", h.addr);
    let http = http_client();
    let r = http
        .post(&url)
        .json(&body(serde_json::json!([{"name": "kohya", "scale": 0.7}])))
        .send()
        .await
        .expect("http");
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.expect("body").to_vec(), adapted);
    for (loras, says) in [
        (
            serde_json::json!([{"name": "nope"}]),
            "no LoRA named `nope`",
        ),
        (
            serde_json::json!([{"name": "kohya", "scale": 50.0}]),
            "outside -10..=10",
        ),
        (
            serde_json::json!([{"name": "kohya"}, {"name": "kohya"}]),
            "named twice",
        ),
    ] {
        let r = http
            .post(&url)
            .json(&body(loras))
            .send()
            .await
            .expect("http");
        assert_eq!(r.status(), 400);
        let e: serde_json::Value = r.json().await.expect("json");
        assert_eq!(e["error"]["field"], "loras", "{e}");
        let m = e["error"]["message"].as_str().unwrap_or("");
        assert!(m.contains(says), "{m}");
    }
    h.shutdown().await;
    hf.shutdown().await;
}

/// A request LoRA that adapts layers a request cannot change is refused when the server starts.
#[tokio::test]
async fn a_request_lora_that_does_not_fit_stops_the_start() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("bad.safetensors");
    let t = candle_core::Tensor::ones((2, 4), candle_core::DType::F32, &Device::Cpu).expect("t");
    let m = std::collections::HashMap::from([
        ("lora_unet_conv_in.lora_down.weight".to_owned(), t.clone()),
        ("lora_unet_conv_in.lora_up.weight".to_owned(), t),
    ]);
    candle_core::safetensors::save(&m, &p).expect("save");
    let mut cfg = config();
    cfg.request_loras = vec![ip2p::loader::lora::NamedLora {
        name: "bad".into(),
        path: p,
    }];
    let m = match server::start(cfg, pipeline(), "tiny-ip2p".into()).await {
        Ok(_) => panic!("a LoRA for conv_in was accepted per request"),
        Err(e) => e.to_string(),
    };
    assert!(m.contains("match no layer") && m.contains("--lora"), "{m}");
}
