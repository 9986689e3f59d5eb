//! The Photoshop plugin in a real browser: its panel and committed bundle
//! (`clients/photoshop/dist/ip2p-panel.js`) driven in headless Chromium by
//! `clients/browser/plugin.mjs`, with a fake Photoshop host (an in-memory document with trimmed
//! reads and a feathered selection), against `ip2p serve` on the tiny fixture model with the
//! token on and a one-slot queue, from another loopback origin (preflight and auth run). Checks:
//! the new layers at the crop's offset and size, masked by the selection, pixels outside it
//! unchanged, one history step, no network inside a modal scope, a decodable preview, cancel →
//! idle and counted by the server, the 401 and 429 messages (with the retry hint), and the XHR
//! and unary fallbacks of a UXP-like host (no `Response.body`, `FormData`, `btoa`). Needs Node
//! ≥ 20 and Chromium (`.ci/run` installs both when missing).

mod common;

use std::time::Duration;

use candle_core::Device;
use common::fixtures;
use ip2p::loader::{self, LoadOptions, ModelDir};
use ip2p::pipeline::EditPipeline;
use ip2p::server::{self, ServerConfig};

/// The checks `plugin.mjs` makes; fewer passing means one was skipped.
const CHECKS: u64 = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_photoshop_plugin_edits_in_headless_chromium() {
    let dir = ModelDir::from_dir(&fixtures().join("tiny-ip2p")).expect("fixture");
    let pipe =
        EditPipeline::new(loader::load(&dir, &Device::Cpu, &LoadOptions::default()).expect("load"))
            .expect("pipeline");
    let cfg = ServerConfig {
        addr: "127.0.0.1:0".parse().expect("addr"),
        token: Some("s3cret".into()),
        queue_capacity: 1,
        default_resolution: 256,
        drain_seconds: 5,
        ..Default::default()
    };
    let h = server::start(cfg, pipe, "tiny-ip2p".into())
        .await
        .expect("server");
    tokio::time::timeout(Duration::from_secs(60), h.ready())
        .await
        .expect("ready");
    let root = env!("CARGO_MANIFEST_DIR");
    let (addr, dir) = (
        format!("http://{}", h.addr),
        format!("{root}/target/browser-artifacts"),
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .args([
                "--experimental-websocket",
                "clients/browser/plugin.mjs",
                &addr,
                "s3cret",
                &dir,
            ])
            .current_dir(root)
            .output()
    })
    .await
    .expect("join")
    .expect("node (≥ 20) is needed for the browser tests");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    let line = stdout.lines().last().unwrap_or("");
    let seen: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "no JSON from the driver ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(
        seen["failure"],
        serde_json::Value::Null,
        "{}",
        seen["failure"]
    );
    assert_eq!(seen["failed"].as_u64(), Some(0), "{stdout}");
    assert_eq!(seen["passed"].as_u64(), Some(CHECKS), "{stdout}");
    h.shutdown().await;
}
