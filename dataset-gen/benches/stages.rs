//! Pairs per second per stage on the tiny models: `cargo bench -p ip2p-dataset-gen`.
//!
//! Text: captions answered per second by a scripted OpenAI-compatible server on loopback
//! (client, retries, validation; not an LLM's speed). Render: shared-seed pairs per second
//! (tiny-sd, 64 px, 20 Euler ancestral steps, Prompt-to-Prompt on). CLIP: pairs scored per second
//! (tiny-clip). Parquet: rows written per second. One JSON line per figure: the median of
//! `runs` after a warm-up.

use std::time::{Duration, Instant};

use candle_core::Device;
use dataset_gen::input::Triple;
use dataset_gen::llm::{EditWriter, LlmConfig};
use dataset_gen::mock_llm::MockLlm;
use dataset_gen::output::write_part;
use dataset_gen::render::{draw_samples, png, ImageConfig, PairGenerator, Row};
use futures::StreamExt;
use ip2p::loader::{self, LoadOptions, ModelDir};
use ip2p::pipeline::clip_score::ClipScorer;
use ip2p::pipeline::Txt2ImgPipeline;

fn fixtures() -> std::path::PathBuf {
    std::env::var_os("IP2P_FIXTURES")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures")
        })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report(stage: &str, unit: &str, per_second: Vec<f64>, note: &str) {
    println!(
        "{}",
        serde_json::json!({
            "bench": "dataset-gen",
            "stage": stage,
            "per_second": median(per_second),
            "unit": unit,
            "threads": threads(),
            "note": note,
        })
    );
}

fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[tokio::main]
async fn main() {
    let runs = 5;
    // Text stage.
    let mock = MockLlm::start(Duration::ZERO).await.expect("mock");
    let w = EditWriter::new(LlmConfig {
        base_url: mock.base_url(),
        model: "mock".into(),
        ..Default::default()
    })
    .expect("writer");
    let mut text = Vec::new();
    for r in 0..=runs {
        let n = 200;
        let t = Instant::now();
        let ok = futures::stream::iter(0..n)
            .map(|i| {
                let w = &w;
                async move { w.write(&format!("a photo number {r}-{i}")).await }
            })
            .buffer_unordered(8)
            .filter(|r| futures::future::ready(r.is_ok()))
            .count()
            .await;
        assert_eq!(ok, n);
        if r > 0 {
            text.push(n as f64 / t.elapsed().as_secs_f64());
        }
    }
    report(
        "text",
        "captions",
        text,
        "scripted loopback server, 8 in flight",
    );

    // Render and CLIP.
    let dir = ModelDir::from_dir(&fixtures().join("tiny-sd")).expect("tiny-sd");
    let c = loader::load(&dir, &Device::Cpu, &LoadOptions::default()).expect("load");
    let clip = ClipScorer::from_dir(&fixtures().join("tiny-clip"), &Device::Cpu).expect("clip");
    let cfg = ImageConfig {
        width: 64,
        height: 64,
        steps: 20,
        samples: 1,
        ..Default::default()
    };
    let gen = PairGenerator::new(
        Txt2ImgPipeline::new(c).expect("pipe"),
        clip.clone(),
        cfg.clone(),
    );
    let triple = Triple {
        input: "a field of sunflowers".into(),
        edit: "turn them into roses".into(),
        output: "a field of roses".into(),
    };
    let mut render = Vec::new();
    let mut score = Vec::new();
    let mut rows = Vec::new();
    for r in 0..=runs {
        let spec = draw_samples(&cfg, r)[0];
        let t = Instant::now();
        let pair = gen.render_pair(&triple, &spec).expect("render");
        let dt = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let sims = clip
            .score_pair([&pair[0], &pair[1]], [&triple.input, &triple.output])
            .expect("clip");
        let ds = t.elapsed().as_secs_f64();
        if r > 0 {
            render.push(1.0 / dt);
            score.push(1.0 / ds);
        }
        rows.push(Row {
            item: r,
            sample: 0,
            triple: triple.clone(),
            original_png: png(&pair[0]).expect("png"),
            edited_png: png(&pair[1]).expect("png"),
            spec,
            sims,
        });
    }
    report("render", "pairs", render, "tiny-sd, 64 px, 20 steps, P2P");
    report("clip", "pairs", score, "tiny-clip, 28 px");

    // Parquet.
    let tmp = std::env::temp_dir().join(format!("dataset-gen-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp");
    let many: Vec<Row> = (0..50).flat_map(|_| rows.clone()).collect();
    let mut write = Vec::new();
    for r in 0..=runs {
        let t = Instant::now();
        write_part(&tmp.join(format!("p{r}.parquet")), &many).expect("write");
        if r > 0 {
            write.push(many.len() as f64 / t.elapsed().as_secs_f64());
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    report(
        "parquet",
        "rows",
        write,
        "64 px PNG pairs, atomic commit with fsync",
    );
}
