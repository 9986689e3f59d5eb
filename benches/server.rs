//! The service's cost over the in-process pipeline, and its throughput under concurrency,
//! on the tiny fixture model (so the model's own time is small and the overhead shows).
//!
//!     cargo bench --bench server
//!
//! Prints one JSON line per figure.

use std::time::{Duration, Instant};

use candle_core::Device;
use ip2p::loader::{self, LoadOptions, ModelDir};
use ip2p::pipeline::{EditPipeline, NoProgress};
use ip2p::server::proto::image_editor_client::ImageEditorClient;
use ip2p::server::{self, proto, ServerConfig};

fn pipeline() -> EditPipeline {
    let dir = ModelDir::from_dir(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/tiny-ip2p"),
    )
    .expect("fixture model");
    EditPipeline::new(loader::load(&dir, &Device::Cpu, &LoadOptions::default()).expect("load"))
        .expect("pipeline")
}

fn request(seed: u64) -> proto::EditRequest {
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([x as u8 * 4, y as u8 * 4, 9])
    }))
    .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
    .expect("png");
    proto::EditRequest {
        image: Some(proto::Image {
            data: Some(proto::image::Data::Encoded(png)),
        }),
        instruction: "make it blue".into(),
        steps: Some(2),
        seed: Some(seed),
        resolution: Some(64),
        ..Default::default()
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = 30;
    let cfg = ServerConfig::default();
    let pipe = pipeline();
    let job = server::validate::validate(&request(1), &cfg).expect("valid");
    // In-process: the pipeline plus PNG encoding, as the worker does.
    let mut local = Vec::new();
    for i in 0..n + 3 {
        let t = Instant::now();
        let mut p = job.params.clone();
        p.seed = i;
        let out = pipe.edit(&job.input, &p, &mut NoProgress).expect("edit");
        server::codec::encode(&out.image, job.output, i).expect("encode");
        if i >= 3 {
            local.push(t.elapsed());
        }
    }
    let local_med = median(local);

    let h = server::start(
        ServerConfig {
            addr: "127.0.0.1:0".parse().expect("addr"),
            queue_capacity: 64,
            ..Default::default()
        },
        pipeline(),
        "tiny-ip2p".into(),
    )
    .await
    .expect("server");
    h.ready().await;
    let mut c = ImageEditorClient::connect(format!("http://{}", h.addr))
        .await
        .expect("connect");
    let mut remote = Vec::new();
    for i in 0..n + 3 {
        let t = Instant::now();
        c.edit(request(i)).await.expect("edit");
        if i >= 3 {
            remote.push(t.elapsed());
        }
    }
    let remote_med = median(remote);
    println!(
        "{}",
        serde_json::json!({
            "figure": "unary_edit_latency", "model": "tiny-ip2p", "steps": 2, "px": 64,
            "in_process_ms": local_med.as_secs_f64() * 1e3,
            "grpc_ms": remote_med.as_secs_f64() * 1e3,
            "overhead_ms": (remote_med.as_secs_f64() - local_med.as_secs_f64()) * 1e3,
            "runs": n,
        })
    );

    for clients in [1usize, 4, 16] {
        let per = 48 / clients;
        let t = Instant::now();
        let mut tasks = Vec::new();
        for k in 0..clients {
            let addr = h.addr;
            tasks.push(tokio::spawn(async move {
                let mut c = ImageEditorClient::connect(format!("http://{addr}"))
                    .await
                    .expect("connect");
                for i in 0..per {
                    c.edit(request((k * 1000 + i) as u64)).await.expect("edit");
                }
            }));
        }
        for t in tasks {
            t.await.expect("client");
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({
                "figure": "throughput", "clients": clients, "requests": per * clients,
                "edits_per_second": (per * clients) as f64 / secs,
                "in_process_edits_per_second": 1.0 / local_med.as_secs_f64(),
                "threads": 2,
            })
        );
    }
    h.shutdown().await;
}
