//! The text stage against a scripted OpenAI-compatible server on loopback.

use std::time::Duration;

use dataset_gen::llm::{EditWriter, LlmConfig, Reject};
use dataset_gen::mock_llm::MockLlm;
use dataset_gen::retry::RetryPolicy;

fn config(base_url: String) -> LlmConfig {
    LlmConfig {
        base_url,
        model: "mock".into(),
        api_key: Some("test-key".into()),
        retry: RetryPolicy {
            max_retries: 3,
            base: Duration::from_millis(20),
            cap: Duration::from_millis(100),
            attempt_timeout: Duration::from_millis(700),
            max_retry_after: Duration::from_secs(5),
        },
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_validated_and_transient_failures_retried() {
    let mock = MockLlm::start(Duration::from_secs(3)).await.expect("mock");
    let w = EditWriter::new(config(mock.base_url())).expect("writer");
    let captions = [
        "a quiet harbour",
        "a bus [malformed]",
        "a tower [429]",
        "a bridge [500]",
        "a garden [slow]",
        "a road [fail]",
        "a hill [same]",
        "a lake [empty]",
        "a meadow [prose-once]",
    ];
    let results = futures::future::join_all(captions.iter().map(|c| w.write(c))).await;

    let ok = results[0].as_ref().expect("good reply");
    assert_eq!(ok.input, "a quiet harbour");
    assert_eq!(ok.edit, "make it snowy");
    assert_eq!(ok.output, "a quiet harbour, covered in snow");
    // Never JSON: asked three times (the first and two fresh samples), then rejected.
    assert_eq!(results[1], Err(Reject::InvalidJson));
    assert!(results[2].is_ok(), "429 then success: {:?}", results[2]);
    assert!(results[3].is_ok(), "5xx then success: {:?}", results[3]);
    assert!(results[4].is_ok(), "timeout then success: {:?}", results[4]);
    assert_eq!(results[5], Err(Reject::RequestFailed));
    assert_eq!(results[6], Err(Reject::Unchanged));
    assert_eq!(results[7], Err(Reject::EmptyField));
    // Prose first, JSON on the fresh sample: a good triple.
    let prose = results[8].as_ref().expect("prose, then JSON");
    assert_eq!(prose.output, "a meadow [prose-once], covered in snow");

    // Retry-After: 1 was honoured.
    let t = mock.attempts("[429]");
    assert_eq!(t.len(), 2);
    let waited = t[1] - t[0];
    assert!(
        waited >= Duration::from_millis(950),
        "retried after {waited:?}"
    );
    assert_eq!(mock.attempts("[500]").len(), 2);
    assert_eq!(mock.attempts("[slow]").len(), 2);
    // A permanent failure: the first attempt and max_retries more, then given up.
    assert_eq!(mock.attempts("[fail]").len(), 4);
    // Good replies are not asked again, nor well-formed unusable ones; an answer that is not
    // JSON is, up to twice.
    assert_eq!(mock.attempts("quiet harbour").len(), 1);
    assert_eq!(mock.attempts("[same]").len(), 1);
    assert_eq!(mock.attempts("[empty]").len(), 1);
    assert_eq!(mock.attempts("[malformed]").len(), 3);
    assert_eq!(mock.attempts("[prose-once]").len(), 2);

    let retries = w.stats().snapshot();
    assert_eq!(retries.rate_limited, 1);
    assert_eq!(retries.server_error, 1 + 3);
    assert_eq!(retries.timeout, 1);
    assert_eq!(retries.invalid_json, 2 + 1);

    // The request: structured output, temperature 0.7, the few-shot examples, the caption last.
    let reqs = mock.requests();
    let r = reqs
        .iter()
        .find(|r| {
            r["messages"]
                .as_array()
                .and_then(|m| m.last())
                .map(|m| m["content"] == "a quiet harbour")
                == Some(true)
        })
        .expect("request seen");
    assert_eq!(r["model"], "mock");
    assert!((r["temperature"].as_f64().expect("temperature") - 0.7).abs() < 1e-6);
    assert_eq!(r["response_format"]["type"], "json_schema");
    assert_eq!(r["response_format"]["json_schema"]["strict"], true);
    assert_eq!(
        r["response_format"]["json_schema"]["schema"]["required"],
        serde_json::json!(["instruction", "edited_caption"])
    );
    let msgs = r["messages"].as_array().expect("messages");
    assert_eq!(msgs[0]["role"], "system");
    assert_eq!(msgs.len(), 1 + 2 * 20 + 1);
    assert_eq!(msgs[1]["role"], "user");
    assert_eq!(msgs[2]["role"], "assistant");
    let shot: serde_json::Value =
        serde_json::from_str(msgs[2]["content"].as_str().expect("content")).expect("json");
    assert!(shot["instruction"].is_string() && shot["edited_caption"].is_string());
}

#[tokio::test]
async fn over_long_captions_are_not_sent() {
    let mock = MockLlm::start(Duration::ZERO).await.expect("mock");
    let mut cfg = config(mock.base_url());
    cfg.max_chars = 20;
    let w = EditWriter::new(cfg).expect("writer");
    assert_eq!(w.write(&"x".repeat(21)).await, Err(Reject::CaptionTooLong));
    assert!(mock.requests().is_empty());
    // The answer's edited caption ("<caption>, covered in snow") is over the limit too.
    assert_eq!(w.write("a short one").await, Err(Reject::TooLong));
}
