//! Captions → scripted LLM → tiny SD pairs → tiny CLIP filter → Parquet, read back column by
//! column (and by pyarrow when `IP2P_PYTHON` names a Python that has it).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use candle_core::Device;
use common::{all_rows, fixtures, part_bytes, python, run_config, write};
use dataset_gen::llm::LlmConfig;
use dataset_gen::mock_llm::MockLlm;
use dataset_gen::render::draw_samples;
use dataset_gen::retry::RetryPolicy;
use dataset_gen::run::run;
use ip2p::pipeline::clip_score::ClipScorer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captions_become_a_filtered_parquet_dataset() {
    let mock = MockLlm::start(Duration::from_secs(2)).await.expect("mock");
    let dir = tempfile::tempdir().expect("tmp");
    let captions = dir.path().join("captions.txt");
    write(
        &captions,
        "a red barn in a field\na bus on a street [malformed]\na tower at dusk [429]\n\
         A red  barn in a field\na bridge over a river [500]\na hill with one tree [same]\n\
         a lighthouse on a cliff [slow]\n",
    );
    // One finished triple in the paper's format rides along without the LLM.
    let triples = dir.path().join("human.jsonl");
    write(
        &triples,
        r#"{"input": "a bowl of apples", "edit": "make them pears", "output": "a bowl of pears"}
"#,
    );
    let out = dir.path().join("out");
    let mut cfg = run_config(vec![captions.clone(), triples.clone()], &out);
    cfg.llm = Some(LlmConfig {
        base_url: mock.base_url(),
        model: "mock".into(),
        api_key: None,
        retry: RetryPolicy {
            max_retries: 3,
            base: Duration::from_millis(10),
            cap: Duration::from_millis(50),
            attempt_timeout: Duration::from_millis(500),
            max_retry_after: Duration::from_secs(5),
        },
        ..Default::default()
    });
    let s = run(cfg.clone()).await.expect("run");

    // Inputs: 8 records, one duplicate (case and spaces), 7 items.
    assert_eq!(s.inputs.records, 8);
    assert_eq!(s.inputs.duplicates, 1);
    assert_eq!(s.items_in_shard, 7);
    assert_eq!(s.text.given, 1);
    assert_eq!(s.text.requested, 6);
    assert_eq!(s.text.ok, 4);
    assert_eq!(s.text.rejected.get("invalid_json"), Some(&1));
    assert_eq!(s.text.rejected.get("unchanged"), Some(&1));
    assert_eq!(s.text.retries.rate_limited, 1);
    assert_eq!(s.text.retries.server_error, 1);
    assert_eq!(s.text.retries.timeout, 1);
    // Images: 5 triples × 3 samples, all pass the open filter, 2 kept each.
    assert_eq!(s.images.triples, 7);
    assert_eq!(s.images.samples_rendered, 15);
    assert_eq!(s.images.samples_passed, 15);
    assert_eq!(s.images.rows, 10);
    assert_eq!(s.images.parts_written, 4);
    assert_eq!(s.dataset_rows, 10);
    assert!(s.images.pairs_per_second > 0.0);
    let summary: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("summary/shard-00000-of-00001.json")).expect("summary"),
    )
    .expect("json");
    assert_eq!(summary["images"]["rows"], 10);
    assert_eq!(summary["text"]["rejected"]["invalid_json"], 1);

    // Column by column.
    let rows = all_rows(&out);
    assert_eq!(rows.len(), 10);
    let clip = ClipScorer::from_dir(&fixtures().join("tiny-clip"), &Device::Cpu).expect("clip");
    let mut per_caption: HashMap<String, usize> = HashMap::new();
    for r in &rows {
        *per_caption.entry(r.original_prompt.clone()).or_default() += 1;
        if r.original_prompt == "a bowl of apples" {
            assert_eq!(r.edit_prompt, "make them pears");
            assert_eq!(r.edited_prompt, "a bowl of pears");
        } else {
            assert_eq!(r.edit_prompt, "make it snowy");
            assert_eq!(
                r.edited_prompt,
                format!("{}, covered in snow", r.original_prompt)
            );
        }
        let a = image::load_from_memory(&r.original_image)
            .expect("png")
            .to_rgb8();
        let b = image::load_from_memory(&r.edited_image)
            .expect("png")
            .to_rgb8();
        assert_eq!(a.dimensions(), (64, 64));
        assert_eq!(b.dimensions(), (64, 64));
        assert_ne!(a, b);
        assert!(r
            .original_path
            .as_deref()
            .is_some_and(|p| p.ends_with("_0.png")));
        assert!((7.5..15.0).contains(&r.guidance_scale));
        assert!((0.1..0.9).contains(&r.p2p_threshold));
        assert!(r.seed >= 0 && r.seed <= i64::from(u32::MAX));
        // The stored similarities are CLIP's on the stored images.
        let sims = clip
            .score_pair([&a, &b], [&r.original_prompt, &r.edited_prompt])
            .expect("score");
        for (got, want) in [
            (r.clip_sim_0, sims.image0_caption0),
            (r.clip_sim_1, sims.image1_caption1),
            (r.clip_sim_dir, sims.direction),
            (r.clip_sim_image, sims.image0_image1),
        ] {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
    }
    assert!(per_caption.values().all(|&n| n == 2), "{per_caption:?}");
    assert!(!per_caption.contains_key("a bus on a street [malformed]"));
    // The kept samples are the best two by direction among the three drawn.
    let first = &rows[0];
    let specs = draw_samples(&cfg.image, 0);
    assert!(specs.iter().any(|s| i64::from(s.seed) == first.seed));

    // A rerun finds everything done: no LLM call, no render, same files.
    let before = mock.requests().len();
    let files: Vec<Vec<u8>> = part_bytes(&out);
    let s2 = run(cfg.clone()).await.expect("rerun");
    assert_eq!(mock.requests().len(), before);
    assert_eq!(s2.images.parts_written, 0);
    assert_eq!(s2.images.parts_already_done, 4);
    assert_eq!(s2.dataset_rows, 10);
    let again: Vec<Vec<u8>> = part_bytes(&out);
    assert_eq!(files, again);

    // Other settings in the same folder are refused.
    let mut other = cfg.clone();
    other.image.samples = 4;
    let e = run(other).await.expect_err("must refuse").to_string();
    assert!(e.contains("other settings"), "{e}");

    if let Some(py) = python() {
        let script = r#"
import sys, glob, json, pyarrow.parquet as pq
files = sorted(glob.glob(sys.argv[1] + "/data/*.parquet"))
t = pq.read_table(files)
cols = ["original_prompt", "original_image", "edit_prompt", "edited_prompt", "edited_image",
        "seed", "guidance_scale", "p2p_threshold", "clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image"]
assert t.column_names == cols, t.column_names
assert t.num_rows == 10, t.num_rows
img = t.column("original_image").to_pylist()[0]
assert img["bytes"][:8] == b"\x89PNG\r\n\x1a\n" and img["path"].endswith("_0.png")
meta = json.loads(t.schema.metadata[b"huggingface"])
assert meta["info"]["features"]["edited_image"]["_type"] == "Image"
print("pyarrow ok", t.num_rows)
"#;
        let out_py = std::process::Command::new(py)
            .arg("-c")
            .arg(script)
            .arg(&out)
            .output()
            .expect("python");
        assert!(
            out_py.status.success(),
            "pyarrow check failed: {}",
            String::from_utf8_lossy(&out_py.stderr)
        );
        eprintln!("{}", String::from_utf8_lossy(&out_py.stdout).trim());
    } else {
        eprintln!("IP2P_PYTHON not set: the pyarrow read-back is skipped (CI runs it)");
    }
}

#[tokio::test]
async fn captions_without_an_llm_are_a_clear_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let captions = dir.path().join("c.txt");
    write(&captions, "a caption\n");
    let e = run(run_config(vec![captions], &dir.path().join("out")))
        .await
        .expect_err("must fail")
        .to_string();
    assert!(e.contains("need an edit written"), "{e}");
}

#[tokio::test]
async fn bad_settings_are_refused_before_any_work() {
    let dir = tempfile::tempdir().expect("tmp");
    let t = dir.path().join("t.jsonl");
    write(&t, r#"{"input": "a", "edit": "b", "output": "c"}"#);
    let out = dir.path().join("out");
    let mut c = run_config(vec![t.clone()], &out);
    c.shard = 2;
    c.num_shards = 2;
    assert!(run(c).await.is_err());
    let mut c = run_config(vec![t.clone()], &out);
    c.image.guidance_min = f64::NAN;
    assert!(run(c).await.is_err());
    let mut c = run_config(vec![t], &out);
    c.image.p2p_max = 1.5;
    assert!(run(c).await.is_err());
    assert!(!out.exists(), "nothing written for refused settings");
}
