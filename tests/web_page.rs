//! The web page in a real browser: `ip2p serve`'s page on the tiny fixture model, token on,
//! driven in headless Chromium by `clients/browser/page.mjs` (a wrong token shows the server's
//! 401 message; a picture uploaded, a mask painted, 2 variations edited and shown at the input's
//! size with the pixels outside the mask unchanged; a preview seen; an edit cancelled after its
//! first step returns the page to idle and the server counts it). Needs Node ≥ 20 and Chromium
//! (`.ci/run` installs both when missing); the screenshot is kept in
//! `target/browser-artifacts/web-page.png`.

mod common;

use std::time::Duration;

use candle_core::Device;
use common::fixtures;
use ip2p::loader::{self, LoadOptions, ModelDir};
use ip2p::pipeline::EditPipeline;
use ip2p::server::{self, ServerConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_edits_in_headless_chromium() {
    let dir = ModelDir::from_dir(&fixtures().join("tiny-ip2p")).expect("fixture");
    let pipe =
        EditPipeline::new(loader::load(&dir, &Device::Cpu, &LoadOptions::default()).expect("load"))
            .expect("pipeline");
    let cfg = ServerConfig {
        addr: "127.0.0.1:0".parse().expect("addr"),
        token: Some("s3cret".into()),
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
    let out_dir = format!("{root}/target/browser-artifacts");
    let (addr, dir) = (format!("http://{}", h.addr), out_dir.clone());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .args([
                "--experimental-websocket",
                "clients/browser/page.mjs",
                &addr,
                "s3cret",
                "assets/sunflowers.png",
                &dir,
            ])
            .current_dir(root)
            .output()
    })
    .await
    .expect("join")
    .expect("node (≥ 20) is needed for the browser tests");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("");
    let seen: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "no JSON from the driver ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    println!("{seen:#}");
    assert!(seen.get("failure").is_none(), "{}", seen["failure"]);

    let wrong = seen["wrongToken"].as_str().unwrap_or("");
    assert!(
        wrong.to_lowercase().contains("token"),
        "wrong token shown as `{wrong}`"
    );
    assert!(seen["model"].as_str().unwrap_or("").contains("tiny-ip2p"));
    assert!(
        seen["maskPixels"].as_u64().unwrap_or(0) > 100,
        "no mask painted"
    );
    assert!(
        seen["status"]
            .as_str()
            .unwrap_or("")
            .starts_with("Done: 2 picture"),
        "{}",
        seen["status"]
    );
    assert!(
        seen["log"]["previews"].as_u64().unwrap_or(0) >= 1,
        "no preview shown"
    );
    let results = seen["results"].as_array().expect("results");
    assert_eq!(results.len(), 2);
    let (w, hgt) = (&seen["picture"]["width"], &seen["picture"]["height"]);
    assert_eq!((w.as_u64(), hgt.as_u64()), (Some(256), Some(192)));
    let mut seeds = Vec::new();
    for r in results {
        assert_eq!(
            (&r["width"], &r["height"]),
            (w, hgt),
            "a result not at the input's size"
        );
        assert_eq!(
            r["maxDiffOutsideMask"].as_f64(),
            Some(0.0),
            "pixels outside the mask changed: {r}"
        );
        assert!(
            r["meanDiffInsideMask"].as_f64().unwrap_or(0.0) > 1.0,
            "nothing changed inside the mask: {r}"
        );
        seeds.push(r["seed"].as_str().unwrap_or("").to_owned());
    }
    assert_eq!(seeds[0], "5");
    assert_ne!(seeds[0], seeds[1], "variations share a seed");
    assert_eq!(seen["history"].as_u64(), Some(1));
    assert_eq!(seen["afterCancel"].as_str(), Some("Cancelled."));
    let png = std::path::Path::new(&out_dir).join("web-page.png");
    assert!(
        std::fs::metadata(&png)
            .map(|m| m.len() > 10_000)
            .unwrap_or(false),
        "no screenshot"
    );

    // The server saw the cancel (the stream closed mid-edit).
    let mut cancelled = false;
    for _ in 0..100 {
        let m = h.state.metrics.render();
        cancelled = m
            .lines()
            .any(|l| l.contains("outcome=\"cancelled\"") && !l.ends_with(" 0"));
        if cancelled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cancelled, "the server did not count the cancelled edit");
    h.shutdown().await;
}
