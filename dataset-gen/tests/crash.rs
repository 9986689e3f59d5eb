//! Runs that survive: `kill -9` mid-run and resume gives the dataset an uninterrupted run
//! gives; shards split the work without overlap.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{all_rows, fixtures, part_files, run_config, write};
use dataset_gen::output::StoredRow;
use dataset_gen::run::run;

fn triples(path: &Path, n: usize) {
    let text: String = (0..n)
        .map(|i| {
            format!(
                "{{\"input\": \"a photo of house number {i}\", \"edit\": \"paint it green\", \"output\": \"a photo of green house number {i}\"}}\n"
            )
        })
        .collect();
    write(path, &text);
}

fn command(input: &Path, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dataset-gen"));
    c.args(["--input"])
        .arg(input)
        .arg("--out")
        .arg(out)
        .arg("--model")
        .arg(fixtures().join("tiny-sd"))
        .arg("--clip")
        .arg(fixtures().join("tiny-clip"))
        .args([
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "6",
            "--samples",
            "3",
            "--keep",
            "2",
            "--items-per-part",
            "1",
            "--seed",
            "7",
            "--min-image-image",
            "-1",
            "--min-direction",
            "-1",
            "--min-image-text",
            "-1",
            "--offline",
            "--device",
            "cpu",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn ledger_lines(out: &Path) -> usize {
    std::fs::read_to_string(out.join("ledger/shard-00000-of-00001.parts.jsonl"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

fn key(r: &StoredRow) -> (String, i64) {
    (r.original_prompt.clone(), r.seed)
}

#[test]
fn a_killed_run_resumes_to_the_uninterrupted_dataset() {
    let dir = tempfile::tempdir().expect("tmp");
    let input = dir.path().join("t.jsonl");
    triples(&input, 8);

    let whole = dir.path().join("whole");
    let st = command(&input, &whole).status().expect("run");
    assert!(st.success());

    let cut = dir.path().join("cut");
    let mut child = command(&input, &cut).spawn().expect("spawn");
    let t0 = Instant::now();
    while ledger_lines(&cut) < 2 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
        if let Ok(Some(st)) = child.try_wait() {
            panic!("finished before it could be killed: {st}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("kill -9"); // SIGKILL on Unix
    let _ = child.wait();
    let done_at_kill = ledger_lines(&cut);
    assert!(done_at_kill < 8, "the run was already complete");

    let out = command(&input, &cut).output().expect("resume");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let a = all_rows(&whole);
    let b = all_rows(&cut);
    assert_eq!(a.len(), 16);
    assert_eq!(a, b, "resumed dataset differs from the uninterrupted one");
    let names = |p: &Path| -> Vec<String> {
        part_files(p)
            .iter()
            .map(|f| {
                f.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect()
    };
    assert_eq!(names(&whole), names(&cut));
    let mut keys: Vec<_> = b.iter().map(key).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), b.len(), "a row appears twice");
    assert_eq!(ledger_lines(&cut), 8, "one ledger line per part");
    let leftovers: Vec<_> = std::fs::read_dir(cut.join("data"))
        .expect("data")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_partition_the_work() {
    let dir = tempfile::tempdir().expect("tmp");
    let input = dir.path().join("t.jsonl");
    triples(&input, 5);
    let one = dir.path().join("one");
    run(run_config(vec![input.clone()], &one))
        .await
        .expect("one shard");
    let split = dir.path().join("split");
    let mut counts = Vec::new();
    for shard in 0..2 {
        let mut c = run_config(vec![input.clone()], &split);
        c.shard = shard;
        c.num_shards = 2;
        counts.push(run(c).await.expect("shard").items_in_shard);
    }
    assert_eq!(counts, vec![3, 2]);
    let mut a = all_rows(&one);
    let mut b = all_rows(&split);
    a.sort_by_key(key);
    b.sort_by_key(key);
    assert_eq!(a.len(), 10);
    assert_eq!(a, b, "two shards made other rows than one");
}

fn llm_config(base_url: String) -> dataset_gen::llm::LlmConfig {
    dataset_gen::llm::LlmConfig {
        base_url,
        model: "mock".into(),
        api_key: None,
        retry: dataset_gen::retry::RetryPolicy {
            max_retries: 3,
            base: Duration::from_millis(10),
            cap: Duration::from_millis(50),
            attempt_timeout: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(5),
        },
        ..Default::default()
    }
}

fn text_ledger_lines(out: &Path) -> usize {
    std::fs::read_to_string(out.join("ledger/shard-00000-of-00001.text.jsonl"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// An LLM that answers prose instead of JSON now and then loses no caption: each is asked
/// again with a fresh sample, every such caption ends as rows and the summary counts the
/// retries. A run killed while one caption waits for its fresh sample, then resumed, asks no
/// caption again that already had its final outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prose_answers_are_asked_again_and_a_resumed_run_asks_no_settled_caption() {
    let mock = dataset_gen::mock_llm::MockLlm::start(Duration::from_secs(120))
        .await
        .expect("mock");
    let dir = tempfile::tempdir().expect("tmp");
    let captions = dir.path().join("c.txt");
    let settled: Vec<String> = (0..5)
        .map(|i| format!("a field with {i} poppies [prose-once]"))
        .collect();
    write(&captions, &format!("{}\n", settled.join("\n")));

    // Uninterrupted, in this process: no caption lost, the retries counted.
    let out = dir.path().join("whole");
    let mut cfg = common::run_config(vec![captions.clone()], &out);
    cfg.llm = Some(llm_config(mock.base_url()));
    let s = run(cfg).await.expect("run");
    assert_eq!(s.text.ok, 5);
    assert!(s.text.rejected.is_empty(), "{:?}", s.text.rejected);
    assert_eq!(s.text.retries.invalid_json, 5);
    assert_eq!(s.dataset_rows, 10);
    let summary: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("summary/shard-00000-of-00001.json")).expect("summary"),
    )
    .expect("json");
    assert_eq!(summary["text"]["retries"]["invalid_json"], 5);
    let rows = all_rows(&out);
    for c in &settled {
        assert_eq!(
            rows.iter().filter(|r| &r.original_prompt == c).count(),
            2,
            "{c}"
        );
    }

    // Killed while one caption waits for its fresh sample (the mock holds it for 120 s).
    let pending = "a harbour at dawn [prose-then-slow]";
    let captions2 = dir.path().join("c2.txt");
    let settled2: Vec<String> = (0..4)
        .map(|i| format!("a garden with {i} roses [prose-once]"))
        .collect();
    write(&captions2, &format!("{}\n{pending}\n", settled2.join("\n")));
    let cut = dir.path().join("cut");
    let llm_args = |c: &mut Command| {
        c.args(["--llm-base-url", &mock.base_url(), "--llm-model", "mock"])
            .args(["--llm-timeout", "300"]);
    };
    let mut cmd = command(&captions2, &cut);
    llm_args(&mut cmd);
    let mut child = cmd.spawn().expect("spawn");
    let t0 = Instant::now();
    while mock.attempts(pending).len() < 2 || text_ledger_lines(&cut) < 4 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
        if let Ok(Some(st)) = child.try_wait() {
            panic!("finished before it could be killed: {st}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().expect("kill -9");
    let _ = child.wait();
    for c in &settled2 {
        assert_eq!(mock.attempts(c).len(), 2, "{c}");
    }

    let mut cmd = command(&captions2, &cut);
    llm_args(&mut cmd);
    let out2 = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("resume");
    assert!(
        out2.status.success(),
        "{}",
        String::from_utf8_lossy(&out2.stderr)
    );
    // The settled captions were not asked again; the pending one was (its third attempt).
    for c in &settled2 {
        assert_eq!(mock.attempts(c).len(), 2, "asked again: {c}");
    }
    assert_eq!(mock.attempts(pending).len(), 3);
    let rows = all_rows(&cut);
    assert_eq!(rows.len(), 10);
    assert_eq!(
        rows.iter().filter(|r| r.original_prompt == pending).count(),
        2
    );
    assert_eq!(text_ledger_lines(&cut), 5, "one final outcome per caption");
}
