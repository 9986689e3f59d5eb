//! The `ip2p` binary, run as a user would.

mod common;

use std::process::Command;

use common::fixtures;

fn ip2p() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ip2p"));
    c.env("HF_HUB_OFFLINE", "1").env_remove("IP2P_MODEL");
    c
}

fn write_png(path: &std::path::Path, w: u32, h: u32) {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 3) as u8, (y * 3) as u8, 77]))
        .save(path)
        .expect("write input");
}

#[test]
fn edit_writes_an_image_and_prints_the_seed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let input = tmp.path().join("in.png");
    write_png(&input, 80, 60);
    let out = tmp.path().join("out.png");
    let model = fixtures().join("tiny-ip2p");
    let run = |seed: &str, out: &std::path::Path| {
        let o = ip2p()
            .args(["edit", "--model"])
            .arg(&model)
            .arg(&input)
            .arg("turn it into a watercolor")
            .arg("-o")
            .arg(out)
            .args(["--steps", "3", "--resolution", "64", "--seed", seed])
            .output()
            .expect("run ip2p");
        assert!(
            o.status.success(),
            "stderr: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let stdout = run("1234", &out);
    assert!(stdout.contains("seed 1234"), "{stdout}");
    let img = image::open(&out).expect("output decodes");
    assert_eq!((img.width(), img.height()), (80, 60));
    let out2 = tmp.path().join("again.png");
    run("1234", &out2);
    assert_eq!(
        image::open(&out2).expect("decodes").to_rgb8(),
        img.to_rgb8(),
        "same seed, same image"
    );
}

#[test]
fn random_seed_is_reported() {
    let tmp = tempfile::tempdir().expect("tmp");
    let input = tmp.path().join("in.png");
    write_png(&input, 64, 64);
    let o = ip2p()
        .args(["edit", "--model"])
        .arg(fixtures().join("tiny-ip2p"))
        .arg(&input)
        .arg("make it night")
        .arg("-o")
        .arg(tmp.path().join("o.jpg"))
        .args(["--steps", "1", "--scheduler", "ddim", "--resolution", "64"])
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8_lossy(&o.stdout);
    let seed: u64 = s
        .split("seed ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a seed in the output");
    assert!(seed < 1 << 53, "seeds fit a JSON number exactly: {seed}");
    assert!(s.contains("scheduler ddim"), "{s}");
}

#[test]
fn bad_input_fails_cleanly() {
    let tmp = tempfile::tempdir().expect("tmp");
    let junk = tmp.path().join("junk.png");
    std::fs::write(&junk, b"this is not a png").expect("write");
    let good = tmp.path().join("good.png");
    write_png(&good, 64, 64);
    let cases: Vec<(Vec<std::ffi::OsString>, &str)> = vec![
        (
            vec![
                "--model".into(),
                fixtures().join("tiny-ip2p").into(),
                junk.clone().into(),
                "x".into(),
            ],
            "junk.png",
        ),
        (
            vec![
                "--model".into(),
                "/no/such/model".into(),
                good.clone().into(),
                "x".into(),
            ],
            "/no/such/model",
        ),
        (
            vec![
                "--model".into(),
                fixtures().join("tiny-sd").into(),
                good.clone().into(),
                "x".into(),
            ],
            "8 input channels",
        ),
        (
            vec![
                "--model".into(),
                "someone/not-cached".into(),
                good.clone().into(),
                "x".into(),
            ],
            "offline",
        ),
        (
            vec![
                "--model".into(),
                fixtures().join("tiny-ip2p").into(),
                good.clone().into(),
                "x".into(),
                "--text-guidance".into(),
                "NaN".into(),
            ],
            "text_guidance",
        ),
        (
            vec![
                "--model".into(),
                fixtures().join("tiny-ip2p").into(),
                good.clone().into(),
                "x".into(),
                "--scheduler".into(),
                "plms".into(),
            ],
            "unknown scheduler",
        ),
    ];
    for (args, needle) in cases {
        let o = ip2p().arg("edit").args(&args).output().expect("run");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(
            err.contains(needle),
            "{args:?}: stderr lacks {needle:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for e in std::fs::read_dir(src).expect("read_dir") {
        let e = e.expect("entry");
        let to = dst.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).expect("copy");
        }
    }
}

#[test]
fn hub_ids_resolve_through_the_hugging_face_cache_offline() {
    // The layout huggingface_hub writes: HF_HOME/hub/models--owner--name/{refs/main, snapshots/<rev>/…}.
    let tmp = tempfile::tempdir().expect("tmp");
    let repo = tmp.path().join("hub/models--someone--tiny-ip2p");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    copy_dir(
        &fixtures().join("tiny-ip2p"),
        &repo.join("snapshots").join(rev),
    );
    std::fs::create_dir_all(repo.join("refs")).expect("refs");
    std::fs::write(repo.join("refs/main"), rev).expect("ref");
    let input = tmp.path().join("in.png");
    write_png(&input, 64, 64);
    let o = ip2p()
        .env("HF_HOME", tmp.path())
        .env_remove("HF_HUB_CACHE")
        .args(["edit", "--model", "someone/tiny-ip2p"])
        .arg(&input)
        .arg("make it pop")
        .arg("-o")
        .arg(tmp.path().join("o.png"))
        .args(["--steps", "1", "--seed", "3", "--resolution", "64"])
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(tmp.path().join("o.png").is_file());

    // Not cached and offline: a clear error that says so.
    let o = ip2p()
        .env("HF_HOME", tmp.path())
        .args(["edit", "--model", "someone/other-model"])
        .arg(&input)
        .arg("x")
        .output()
        .expect("run");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not in the Hugging Face cache") && err.contains("offline"),
        "{err}"
    );
}

/// Starts `ip2p serve` on a free loopback port; returns the child and its address.
fn spawn_server(extra: &[&str]) -> (std::process::Child, String) {
    let (child, addr, _) = spawn_server_logged(extra);
    (child, addr)
}

/// [`spawn_server`], also returning every line the server writes to stderr (a pipe, not a
/// terminal), as they come.
fn spawn_server_logged(
    extra: &[&str],
) -> (
    std::process::Child,
    String,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    let model = fixtures().join("tiny-ip2p");
    let mut args = vec!["--model", model.to_str().expect("utf-8 path")];
    args.extend(extra);
    spawn_serve(&args)
}

/// `ip2p serve` with `args` on a free port.
fn spawn_serve(
    args: &[&str],
) -> (
    std::process::Child,
    String,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use std::io::BufRead;
    let extra = args;
    let mut child = ip2p()
        .arg("serve")
        .args(["--addr", "127.0.0.1:0", "--no-warmup"])
        .args(extra)
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn ip2p serve");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = std::io::BufReader::new(stderr).lines();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let addr = loop {
        let line = lines
            .next()
            .expect("serve printed its address")
            .expect("line");
        log.lock().expect("log").push(line.clone());
        if let Some(rest) = line
            .split(" on ")
            .nth(1)
            .filter(|_| line.contains("ip2p serving"))
        {
            break rest.split_whitespace().next().expect("addr").to_owned();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    let sink = log.clone();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            sink.lock().expect("log").push(l);
        }
    });
    (child, addr, log)
}

/// Logs written to a file or pipe carry no ANSI escape sequences; `--log-format json` writes
/// one JSON object per log line, an edit's lines with its request id.
#[test]
fn serve_logs_have_no_colour_in_files_and_json_lines_parse() {
    let tmp = tempfile::tempdir().expect("tmp");
    let input = tmp.path().join("in.png");
    write_png(&input, 64, 64);
    for format in ["text", "json"] {
        let (mut child, addr, log) = spawn_server_logged(&["--log-format", format]);
        let o = ip2p()
            .arg("edit")
            .arg(&input)
            .arg("add a rainbow")
            .arg("-o")
            .arg(tmp.path().join(format!("{format}.png")))
            .args(["--steps", "2", "--resolution", "64", "--seed", "5"])
            .args(["--server", &format!("http://{addr}")])
            .output()
            .expect("edit");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // The edit's last line ("finished") is logged before the result is sent.
        let t0 = std::time::Instant::now();
        while !log
            .lock()
            .expect("log")
            .iter()
            .any(|l| l.contains("finished"))
        {
            assert!(t0.elapsed() < std::time::Duration::from_secs(20), "no log");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        let lines = log.lock().expect("log").clone();
        assert!(lines.len() > 2, "{lines:?}");
        for l in &lines {
            assert!(
                !l.contains('\u{1b}'),
                "escape sequence in {format} log: {l:?}"
            );
        }
        if format == "json" {
            let objects: Vec<serde_json::Value> = lines
                .iter()
                .filter(|l| !l.starts_with("ip2p serving"))
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect();
            assert!(
                objects.iter().all(|o| o["level"].is_string()),
                "{objects:?}"
            );
            let finished = objects
                .iter()
                .find(|o| o["fields"]["message"] == "finished")
                .expect("a finished line");
            assert!(
                finished["span"]["request_id"]
                    .as_str()
                    .is_some_and(|r| !r.is_empty()),
                "{finished}"
            );
        }
    }
}

#[test]
fn edit_through_the_server_equals_the_in_process_edit() {
    let (mut child, addr) = spawn_server(&["--token", "t0k"]);
    let tmp = tempfile::tempdir().expect("tmp");
    let input = tmp.path().join("in.png");
    write_png(&input, 72, 56);
    let run = |extra: &[&str], out: &std::path::Path| {
        let o = ip2p()
            .arg("edit")
            .arg(&input)
            .arg("add a rainbow")
            .arg("-o")
            .arg(out)
            .args(["--steps", "3", "--resolution", "64", "--seed", "77"])
            .args(extra)
            .output()
            .expect("run");
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
        )
    };
    let local = tmp.path().join("local.png");
    let model = fixtures().join("tiny-ip2p");
    let (ok, log) = run(&["--model", model.to_str().expect("utf8")], &local);
    assert!(ok, "{log}");
    let remote = tmp.path().join("remote.png");
    let url = format!("http://{addr}");
    let (ok, log) = run(&["--server", &url, "--token", "t0k"], &remote);
    assert!(ok, "{log}");
    assert!(log.contains("seed 77"), "{log}");
    assert_eq!(
        image::open(&local).expect("local").to_rgb8(),
        image::open(&remote).expect("remote").to_rgb8(),
        "the server's edit differs from the in-process edit"
    );
    let (ok, log) = run(
        &["--server", &url, "--token", "wrong"],
        &tmp.path().join("x.png"),
    );
    assert!(!ok && log.to_lowercase().contains("token"), "{log}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn serve_drains_in_flight_edits_on_sigterm() {
    use ip2p::server::proto;

    let (mut child, addr) = spawn_server(&[]);

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut c =
            proto::image_editor_client::ImageEditorClient::connect(format!("http://{addr}"))
                .await
                .expect("connect");
        let png = {
            let mut out = Vec::new();
            image::DynamicImage::ImageRgb8(image::RgbImage::new(128, 128))
                .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
                .expect("png");
            out
        };
        let req = proto::EditRequest {
            image: Some(proto::Image {
                data: Some(proto::image::Data::Encoded(png)),
            }),
            instruction: "make it snow".into(),
            steps: Some(30),
            seed: Some(1),
            resolution: Some(128),
            ..Default::default()
        };
        let mut s = c.edit_stream(req).await.expect("stream").into_inner();
        loop {
            if let Some(proto::edit_event::Event::Started(_)) =
                s.message().await.expect("event").and_then(|e| e.event)
            {
                break;
            }
        }
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
        let mut got_result = false;
        while let Some(ev) = s
            .message()
            .await
            .expect("the in-flight edit is not cut off")
        {
            if let Some(proto::edit_event::Event::Result(r)) = ev.event {
                assert_eq!(r.images.len(), 1);
                got_result = true;
            }
        }
        assert!(got_result, "the in-flight edit finished with a result");
    });
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "serve did not exit after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "serve exited with {status}");
}

/// A plain HTTP/1.1 GET; the response body.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut r = String::new();
    c.read_to_string(&mut r).expect("read");
    r.split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default()
}

/// Without --model, `edit` and `serve` use the shipped flower-world model, and the server's
/// info names it.
#[test]
fn without_a_model_flag_edit_and_serve_use_the_shipped_flower_model() {
    let tmp = tempfile::tempdir().expect("tmp");
    let asset = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/sunflowers.png");
    let out = tmp.path().join("out.png");
    let o = ip2p()
        .arg("edit")
        .arg(&asset)
        .arg("make it night")
        .arg("-o")
        .arg(&out)
        .args(["--steps", "2"])
        .output()
        .expect("edit");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&out).expect("output").to_rgb8();
    assert_eq!(img.dimensions(), (256, 192));
    let (mut child, addr, _) = spawn_serve(&[]);
    let body = http_get(&addr, "/v1/info");
    let _ = child.kill();
    let _ = child.wait();
    let info: serde_json::Value = serde_json::from_str(&body).expect("info json");
    assert_eq!(info["model"], "flowers-ip2p", "{body}");
}
