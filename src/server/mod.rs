//! The edit service: gRPC, gRPC-Web and HTTP/JSON on one port.
//!
//! The shape of text-embeddings-inference: thin doors ([`grpc`], [`http`]) that validate
//! ([`validate`]) and enqueue ([`jobs`]); one thread owning the model fed by a bounded queue
//! ([`worker`]); every error mapped once to a status ([`status`]). Handlers never do tensor math.

mod auth;
pub mod client;
pub mod codec;
mod config;
mod grpc;
mod http;
mod jobs;
mod metrics;
mod page;
pub mod proto;
mod serve;
mod status;
pub mod validate;
mod worker;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use tokio::sync::watch;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

pub use self::config::ServerConfig;
use self::metrics::Metrics;
use self::proto::image_editor_server::ImageEditorServer;
use self::worker::Queue;
use crate::pipeline::edit::{DEFAULT_IMAGE_GUIDANCE, DEFAULT_TEXT_GUIDANCE};
use crate::pipeline::EditPipeline;
use crate::schedulers::SchedulerKind;
use crate::{Error, Result};

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    pub config: Arc<ServerConfig>,
    pub queue: Queue,
    pub metrics: Metrics,
    pub model: String,
    pub default_scheduler: SchedulerKind,
    /// The preloaded Textual Inversion trigger words.
    pub embedding_triggers: Vec<String>,
    ready: AtomicBool,
}

impl AppState {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The answer to `GetInfo`.
    pub fn info(&self) -> proto::ServerInfo {
        let c = &self.config;
        proto::ServerInfo {
            model: self.model.clone(),
            schedulers: SchedulerKind::ALL
                .iter()
                .map(|k| k.name().to_owned())
                .collect(),
            defaults: Some(proto::Defaults {
                steps: c.default_steps,
                text_guidance: DEFAULT_TEXT_GUIDANCE as f32,
                image_guidance: DEFAULT_IMAGE_GUIDANCE as f32,
                scheduler: self.default_scheduler.name().into(),
                resolution: c.default_resolution,
                resize: proto::ResizePolicy::Paper as i32,
            }),
            limits: Some(proto::Limits {
                max_pixels: c.max_pixels,
                max_message_bytes: c.max_message_bytes as u64,
                max_steps: c.max_steps,
                max_variations: c.max_variations,
                max_instruction_chars: c.max_instruction_chars,
                queue_capacity: c.queue_capacity as u32,
                max_resolution: c.max_resolution,
            }),
            version: env!("CARGO_PKG_VERSION").into(),
            embedding_triggers: self.embedding_triggers.clone(),
            loras: c.request_loras.iter().map(|l| l.name.clone()).collect(),
        }
    }
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// Starts a graceful shutdown: no new edits, in-flight ones finish (up to the drain time),
    /// then connections close. Resolves when the server has stopped.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    /// Waits until the model is loaded and the warm-up edit has run.
    pub async fn ready(&self) {
        while !self.state.is_ready() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn cors(origins: &[String]) -> CorsLayer {
    let allow = if origins.is_empty() || origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    let expose = [
        "grpc-status",
        "grpc-message",
        "grpc-status-details-bin",
        "x-ip2p-seed",
        "x-ip2p-request-id",
        "x-ip2p-width",
        "x-ip2p-height",
        "x-ip2p-scheduler",
        "x-ip2p-steps",
        "x-ip2p-truncated-tokens",
        "x-ip2p-total-seconds",
        // A full queue's 429 says when to retry; a refused token says how to authenticate.
        "retry-after",
        "www-authenticate",
    ]
    .map(::http::HeaderName::from_static);
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([
            ::http::Method::GET,
            ::http::Method::POST,
            ::http::Method::OPTIONS,
        ])
        // Mirrored, not `*`: the Fetch standard leaves `Authorization` out of the wildcard
        // (Firefox enforces it), and every client here sends a bearer token.
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers(expose)
        .max_age(Duration::from_secs(3600))
}

/// Binds, starts the worker and serves. The warm-up edit runs in the background; health turns
/// SERVING when it is done.
pub async fn start(
    config: ServerConfig,
    pipeline: EditPipeline,
    model: String,
) -> Result<ServerHandle> {
    start_many(config, vec![pipeline], model).await
}

/// [`start`] with one model worker per pipeline (each on its own device), all behind the one
/// bounded queue: each edit goes to the next free worker. Health turns SERVING when every
/// worker has run its warm-up edit.
pub async fn start_many(
    config: ServerConfig,
    pipelines: Vec<EditPipeline>,
    model: String,
) -> Result<ServerHandle> {
    let Some(first) = pipelines.first() else {
        return Err(Error::invalid("device", "no model worker to serve with"));
    };
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(c), Some(k)) => Some(serve::tls_acceptor(c, k)?),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(|e| Error::io(config.addr.to_string(), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io(config.addr.to_string(), e))?;
    let metrics = Metrics::new();
    let default_scheduler = first
        .components()
        .scheduler
        .kind()
        .unwrap_or(SchedulerKind::EulerAncestral);
    let embedding_triggers = first.components().tokenizer.embedding_triggers().to_vec();
    let loras = Arc::new(crate::loader::lora::LoraLibrary::load(
        &config.request_loras,
        &crate::pipeline::adapters::adaptable_weights(first.components()),
    )?);
    let pipelines: Vec<Arc<EditPipeline>> = pipelines.into_iter().map(Arc::new).collect();
    let workers = pipelines
        .iter()
        .enumerate()
        .map(|(i, p)| worker::Worker::new(i, p.clone(), loras.clone()))
        .collect();
    let queue = worker::spawn(
        workers,
        config.queue_capacity,
        config.preview_size,
        metrics.clone(),
    )
    .map_err(|e| Error::io("ip2p-worker thread", e))?;
    let config = Arc::new(config);
    let state = Arc::new(AppState {
        config: config.clone(),
        queue: queue.clone(),
        metrics,
        model,
        default_scheduler,
        embedding_triggers,
        ready: AtomicBool::new(false),
    });

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&health_reporter, false).await;
    let app = router(&state, health_service)?;
    spawn_warm_up(state.clone(), pipelines, health_reporter.clone());
    let (tx, rx) = watch::channel(false);
    let shutdown = drain(state.clone(), rx, health_reporter);
    let task = tokio::spawn(serve::serve(
        listener,
        app,
        tls,
        shutdown,
        Duration::from_secs(10),
    ));
    tracing::info!(%addr, "listening (gRPC, gRPC-Web, HTTP)");
    Ok(ServerHandle {
        addr,
        state,
        shutdown: tx,
        task,
    })
}

/// Every door on one router: gRPC (with health and reflection v1 and v1alpha), gRPC-Web and
/// HTTP, behind the token check, the body limit and CORS.
fn router(
    state: &Arc<AppState>,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Result<axum::Router> {
    let config = &state.config;
    // Reflection in both versions: grpcurl asks v1, while Python's grpcio-reflection,
    // grpc_cli and several GUI clients still ask v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_error = |e: tonic_reflection::server::Error| Error::Config {
        path: "proto".into(),
        message: e.to_string(),
    };
    let reflection_v1 = reflection().build_v1().map_err(reflection_error)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_error)?;
    let editor = ImageEditorServer::new(grpc::Service {
        state: state.clone(),
    })
    .max_decoding_message_size(config.max_message_bytes)
    .max_encoding_message_size(usize::MAX);
    let grpc_router = tonic::service::Routes::new(editor)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .prepare()
        .into_axum_router()
        .layer(tonic_web::GrpcWebLayer::new());
    let token = auth::Token(config.token.clone().map(Arc::new));
    Ok(http::router(state.clone())
        .merge(page::router())
        .merge(grpc_router)
        .layer(axum::middleware::from_fn_with_state(
            token,
            auth::middleware,
        ))
        .layer(DefaultBodyLimit::max(config.max_message_bytes))
        .layer(cors(&config.cors_origins)))
}

/// Runs every worker's warm-up edit (unless turned off), then reports SERVING.
fn spawn_warm_up(
    state: Arc<AppState>,
    pipelines: Vec<Arc<EditPipeline>>,
    reporter: tonic_health::server::HealthReporter,
) {
    let skip = state.config.no_warmup;
    tokio::spawn(async move {
        if !skip {
            let t = std::time::Instant::now();
            let r =
                tokio::task::spawn_blocking(move || pipelines.iter().try_for_each(|p| warm_up(p)))
                    .await;
            match r {
                Ok(Ok(())) => {
                    tracing::info!(seconds = t.elapsed().as_secs_f64(), "warm-up edit done")
                }
                Ok(Err(e)) => tracing::error!(error = %e, "warm-up edit failed"),
                Err(e) => tracing::error!(error = %e, "warm-up task failed"),
            }
        }
        state.ready.store(true, Ordering::SeqCst);
        set_health(&reporter, true).await;
    });
}

/// Resolves once shutdown is asked for (`rx` turns true) and the in-flight edits have drained
/// (or the drain time is over): health NOT_SERVING first, then the queue closed.
async fn drain(
    state: Arc<AppState>,
    mut rx: watch::Receiver<bool>,
    reporter: tonic_health::server::HealthReporter,
) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            break;
        }
    }
    tracing::info!("shutting down: draining in-flight edits");
    state.ready.store(false, Ordering::SeqCst);
    set_health(&reporter, false).await;
    state.queue.stop_accepting();
    let limit = Duration::from_secs(state.config.drain_seconds);
    if tokio::time::timeout(limit, state.queue.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!("drain time over with edits still running");
    }
}

/// Sets both health entries a probe may ask for: `ip2p.v1.ImageEditor` and the server as a
/// whole (`""`, which tonic-health otherwise reports SERVING from the start).
async fn set_health(reporter: &tonic_health::server::HealthReporter, serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    reporter
        .set_service_status(
            <ImageEditorServer<grpc::Service> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    reporter.set_service_status("", status).await;
}

/// One tiny edit, so the first real request does not pay for lazy initialisation.
fn warm_up(pipeline: &EditPipeline) -> Result<()> {
    let input = crate::pipeline::InputImage::from_dynamic(image::DynamicImage::ImageRgb8(
        image::RgbImage::from_pixel(64, 64, image::Rgb([128, 128, 128])),
    ));
    let params = crate::pipeline::EditParams {
        instruction: "warm up".into(),
        steps: 1,
        resolution: 64,
        ..Default::default()
    };
    pipeline.edit(&input, &params, &mut crate::pipeline::NoProgress)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_server::Health;
    use tonic_health::pb::HealthCheckRequest;

    async fn status(svc: &tonic_health::server::HealthService, name: &str) -> i32 {
        svc.check(tonic::Request::new(HealthCheckRequest {
            service: name.into(),
        }))
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
    }

    #[tokio::test]
    async fn health_is_not_serving_until_ready_for_every_name() {
        let (reporter, _) = tonic_health::server::health_reporter();
        let svc = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        super::set_health(&reporter, false).await;
        for name in ["", "ip2p.v1.ImageEditor"] {
            assert_eq!(
                status(&svc, name).await,
                ServingStatus::NotServing as i32,
                "{name:?}"
            );
        }
        super::set_health(&reporter, true).await;
        for name in ["", "ip2p.v1.ImageEditor"] {
            assert_eq!(
                status(&svc, name).await,
                ServingStatus::Serving as i32,
                "{name:?}"
            );
        }
    }
}
