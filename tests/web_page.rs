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
    let mut checks = Checks::default();
    page_checks(&seen, &mut checks);
    let png = std::path::Path::new(&out_dir).join("web-page.png");
    checks.check(
        "a screenshot is kept",
        std::fs::metadata(&png).is_ok_and(|m| m.len() > 10_000),
        png.display(),
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
    checks.check("the server counts the cancelled edit", cancelled, "");
    checks.finish();
    h.shutdown().await;
}

/// Named checks: each printed, then `N passed, N failed`; the test fails on any failure.
#[derive(Default)]
struct Checks {
    passed: usize,
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, name: &str, ok: bool, detail: impl std::fmt::Display) {
        if ok {
            println!("ok - {name}");
            self.passed += 1;
        } else {
            println!("not ok - {name}: {detail}");
            self.failed.push(name.to_owned());
        }
    }

    fn finish(self) {
        println!("{} passed, {} failed", self.passed, self.failed.len());
        assert!(self.failed.is_empty(), "failed: {:?}", self.failed);
    }
}

/// What the driver saw, as checks.
fn page_checks(seen: &serde_json::Value, c: &mut Checks) {
    let wrong = seen["wrongToken"].as_str().unwrap_or("");
    c.check(
        "a wrong token shows the server's 401 message",
        wrong.to_lowercase().contains("token"),
        wrong,
    );
    c.check(
        "GetInfo names the model",
        seen["model"].as_str().unwrap_or("").contains("tiny-ip2p"),
        &seen["model"],
    );
    c.check(
        "a mask is painted with the brush",
        seen["maskPixels"].as_u64().unwrap_or(0) > 100,
        &seen["maskPixels"],
    );
    c.check(
        "an edit with 2 variations finishes",
        seen["status"]
            .as_str()
            .unwrap_or("")
            .starts_with("Done: 2 picture"),
        &seen["status"],
    );
    c.check(
        "a preview is shown while it runs",
        seen["log"]["previews"].as_u64().unwrap_or(0) >= 1,
        &seen["log"],
    );
    let empty = Vec::new();
    let results = seen["results"].as_array().unwrap_or(&empty);
    let (w, h) = (&seen["picture"]["width"], &seen["picture"]["height"]);
    c.check(
        "the picture is 256×192",
        (w.as_u64(), h.as_u64()) == (Some(256), Some(192)),
        &seen["picture"],
    );
    c.check(
        "both results at the input's size",
        results.len() == 2
            && results
                .iter()
                .all(|r| (&r["width"], &r["height"]) == (w, h)),
        &seen["results"],
    );
    c.check(
        "pixels outside the mask unchanged, inside changed",
        results.iter().all(|r| {
            r["maxDiffOutsideMask"].as_f64() == Some(0.0)
                && r["meanDiffInsideMask"].as_f64().unwrap_or(0.0) > 1.0
        }),
        &seen["results"],
    );
    let seeds: Vec<&str> = results
        .iter()
        .map(|r| r["seed"].as_str().unwrap_or(""))
        .collect();
    c.check(
        "the grid is labelled with the locked seed and the next",
        seeds.first() == Some(&"5") && seeds.get(1).is_some_and(|s| *s != "5"),
        format!("{seeds:?}"),
    );
    c.check(
        "the history holds the edit",
        seen["history"].as_u64() == Some(1),
        &seen["history"],
    );
    c.check(
        "cancel after the first step returns the page to idle",
        seen["afterCancel"].as_str() == Some("Cancelled."),
        &seen["afterCancel"],
    );
}
