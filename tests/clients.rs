//! The Photoshop plugin's and the web page's pure modules (`clients/shared/`), tested by
//! `node --test clients/test/` (SSE parsing byte by byte, pixel padding and masks, the request,
//! error mapping, the edit state machine, the three transports). Needs Node ≥ 18 on the PATH
//! (`.ci/run` installs it when missing).

use std::process::Command;

#[test]
fn the_clients_pure_modules_pass_node_test() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("node")
        .args(["--test", "--test-reporter=tap", "clients/test/"])
        .current_dir(root)
        .output()
        .expect("node is needed for the clients' tests (Node 18 or newer on the PATH)");
    let text = String::from_utf8_lossy(&out.stdout);
    let count = |key: &str| -> usize {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("# {key} ")))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    let (pass, fail) = (count("pass"), count("fail"));
    println!("clients: {pass} passed, {fail} failed");
    assert!(
        out.status.success() && fail == 0 && pass >= 15,
        "node --test: {pass} passed, {fail} failed\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
