//! The tamper-evident trail, end to end: a real daemon's trail verifies with
//! `wlctl audit verify` and a flipped byte is named; a full audit disk in `enforce`
//! refuses requests (nothing forwarded unrecorded) and service resumes by itself once space
//! returns; `kill -9` under load leaves a trail that verifies and holds every request the
//! upstream answered.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;
use wl_e2e::{
    agents::{output, AgentView, FakeApi},
    bin,
    pki::TestRoot,
    Daemon, DaemonConfig, DaemonHome, TestCgroup,
};

const API: &str = "api.openai.com";

fn config(cg: &TestCgroup, root: &TestRoot) -> DaemonConfig {
    let mut cfg = DaemonConfig::new(cg, &[443]);
    cfg.mode = "enforce";
    cfg.extra = format!("[tls]\nupstream_extra_roots = [{:?}]\n", root.cert.display().to_string());
    cfg
}

fn wlctl(home: &DaemonHome, args: &[&str]) -> (i32, String) {
    let out = Command::new(bin("wlctl"))
        .arg("--config")
        .arg(home.dir.path().join("wl.toml"))
        .args(args)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// curl in the agents' cgroup: one status code per URL.
fn curl(view: &AgentView, cg: &TestCgroup, paths: &[String]) -> Vec<String> {
    let mut cmd = view.command(Some(cg), "curl");
    cmd.args(["-sS", "--http1.1", "-w", "%{http_code}\\n"]);
    for p in paths {
        cmd.args(["-o", "/dev/null", &format!("https://{API}{p}")]);
    }
    let out = output(&mut cmd);
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn a_real_trail_verifies_and_a_flipped_byte_is_named() {
    let agents = TestCgroup::new("trail");
    let home = DaemonHome::new();
    let dir = home.dir.path();
    let root = TestRoot::new(dir);
    let _api = FakeApi::start(dir, "127.0.1.32", &root.server_cert("api", &[API], false));
    let daemon = Daemon::start(&home, &config(&agents, &root));
    let view = AgentView::new(dir, &[(API, "127.0.1.32")], &[&dir.join("state/ca/beacon-ca.pem")]);
    let paths: Vec<String> = (0..20).map(|i| format!("/v1/models/{i}")).collect();
    assert!(curl(&view, &agents, &paths).iter().all(|c| c == "200"));
    daemon.stop_ok();

    let (code, text) = wlctl(&home, &["audit", "verify"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("ok:") && text.contains("end matches the anchor"), "{text}");

    // Every forwarded request's decision was written before its request record.
    let all = records(&home.audit_path());
    for p in &paths {
        let seq_of = |kind: &str| {
            all.iter()
                .find(|r| r["kind"] == kind && r["path"] == p.as_str())
                .map(|r| r["seq"].as_u64().unwrap())
        };
        let (decision, request) = (seq_of("decision").expect("decision record"), seq_of("request").unwrap());
        assert!(decision < request, "{p}: decision seq {decision}, request seq {request}");
    }

    // `wlctl audit tail` reads the configured trail, filtered.
    let (code, text) =
        wlctl(&home, &["audit", "tail", "--kind", "decision", "--decision", "allow", "-n", "3"]);
    assert_eq!(code, 0, "{text}");
    let tailed: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(tailed.len(), 3, "{text}");
    assert!(tailed.iter().all(|r| r["kind"] == "decision"), "{text}");
    assert_eq!(tailed[2]["path"], "/v1/models/19");

    // One byte changed in the middle of the trail: named by seq.
    let path = home.audit_path();
    let mut bytes = std::fs::read(&path).unwrap();
    let text_now = String::from_utf8(bytes.clone()).unwrap();
    let target = text_now.find("/v1/models/7\"").unwrap() + "/v1/models/".len();
    bytes[target] = b'8';
    std::fs::write(&path, &bytes).unwrap();
    let (code, text) = wlctl(&home, &["audit", "verify"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("ALTERED") && text.contains("seq"), "{text}");
}

#[test]
fn a_full_audit_disk_refuses_in_enforce_and_resumes_when_space_returns() {
    let agents = TestCgroup::new("fulldisk");
    let home = DaemonHome::new();
    let dir = home.dir.path();
    let root = TestRoot::new(dir);
    let api = FakeApi::start(dir, "127.0.1.33", &root.server_cert("api", &[API], false));
    // The audit directory is a small file system of the daemon's own (its mount namespace).
    let small = dir.join("small");
    std::fs::create_dir(&small).unwrap();
    let mut cfg = config(&agents, &root);
    cfg.audit_path = Some(small.join("audit.jsonl"));
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(format!("mount -t tmpfs -o size=512k tmpfs {} && exec \"$@\"", small.display()))
        .arg("sh")
        .arg(bin("wl-daemon"));
    let daemon = Daemon::start_cmd(&home, &cfg, cmd);
    let view = AgentView::new(dir, &[(API, "127.0.1.33")], &[&dir.join("state/ca/beacon-ca.pem")]);
    // The daemon's view of its small file system.
    let inside = PathBuf::from(format!("/proc/{}/root{}", daemon.pid(), small.display()));

    let before: Vec<String> = (0..5).map(|i| format!("/v1/models/before-{i}")).collect();
    assert!(curl(&view, &agents, &before).iter().all(|c| c == "200"));

    // Fill it up.
    let filler = inside.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![b'x'; 4096];
        while f.write_all(&chunk).is_ok() {}
    }
    // The trail file's last page may still have room for a record or two.
    let mut primed = false;
    for i in 0..20 {
        if curl(&view, &agents, &[format!("/v1/models/prime-{i}")]) == ["503"] {
            primed = true;
            break;
        }
    }
    assert!(primed, "the full file system never refused a record");
    let upstream_before = api.entries("request").len();
    let full: Vec<String> = (0..5).map(|i| format!("/v1/models/full-{i}")).collect();
    let codes = curl(&view, &agents, &full);
    assert!(codes.iter().all(|c| c == "503"), "{codes:?}");
    assert_eq!(api.entries("request").len(), upstream_before, "a request went upstream unrecorded");

    // observe: service goes on with the disk full; the records wait in memory.
    assert_eq!(wlctl(&home, &["mode", "observe"]).0, 0);
    let observed = vec!["/v1/models/observed".to_string()];
    assert_eq!(curl(&view, &agents, &observed), ["200"]);
    assert_eq!(wlctl(&home, &["mode", "enforce"]).0, 0);

    // Space returns: service resumes without a restart.
    std::fs::remove_file(&filler).unwrap();
    let after: Vec<String> = (0..5).map(|i| format!("/v1/models/after-{i}")).collect();
    assert!(curl(&view, &agents, &after).iter().all(|c| c == "200"));
    let trail = inside.join("audit.jsonl");
    let copy = dir.join("copy.jsonl");
    // Request records are written when their responses end; wait for the last one.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let all = loop {
        std::fs::copy(&trail, &copy).unwrap();
        let all = records(&copy);
        let last = after.last().unwrap().as_str();
        if all.iter().any(|r| r["kind"] == "request" && r["path"] == last) {
            break all;
        }
        assert!(std::time::Instant::now() < deadline, "the last request record never came");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let has = |kind: &str, p: &str| all.iter().any(|r| r["kind"] == kind && r["path"] == p);
    assert!(
        has("request", "/v1/models/observed"),
        "the record made in observe while the disk was full is lost"
    );
    for p in before.iter().chain(&after) {
        assert!(has("decision", p) && has("request", p), "{p} missing from the trail");
    }
    // The refusals themselves were kept while the disk was full and written after.
    for p in &full {
        assert!(
            all.iter().any(|r| r["kind"] == "request" && r["path"] == p.as_str() && r["status"] == 503),
            "the refusal of {p} is not in the trail"
        );
        assert!(!has("decision", p), "{p}: a decision that was never acted on");
    }
    let key = dir.join("state/audit/checkpoint.pub");
    let out =
        Command::new(bin("wlctl")).args(["audit", "verify", "--key"]).arg(&key).arg(&copy).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    daemon.stop_ok();
}

#[test]
fn kill_9_under_load_keeps_every_answered_request_and_the_trail_verifies() {
    let agents = TestCgroup::new("crash");
    let home = DaemonHome::new();
    let dir = home.dir.path();
    let root = TestRoot::new(dir);
    let api = FakeApi::start(dir, "127.0.1.34", &root.server_cert("api", &[API], false));
    let cfg = config(&agents, &root);
    let daemon = Daemon::start(&home, &cfg);
    let view = AgentView::new(dir, &[(API, "127.0.1.34")], &[&dir.join("state/ca/beacon-ca.pem")]);
    // Bounded load: 400 requests in one client, killed part way through.
    let paths: Vec<String> = (0..400).map(|i| format!("/v1/models/load-{i}")).collect();
    let loader = std::thread::spawn({
        let mut cmd = view.command(Some(&agents), "curl");
        cmd.args(["-sS", "--http1.1", "-o", "/dev/null"]);
        for p in &paths {
            cmd.arg(format!("https://{API}{p}"));
        }
        move || output(&mut cmd)
    });
    // Kill once a good part of the load has been answered.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while api.entries("request").len() < 50 {
        assert!(std::time::Instant::now() < deadline, "the load did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    daemon.kill9();
    let _ = loader.join();

    let (code, text) = wlctl(&home, &["audit", "verify"]);
    assert_eq!(code, 0, "{text}");
    let all = records(&home.audit_path());
    let answered: Vec<String> =
        api.entries("request").iter().map(|r| r["path"].as_str().unwrap().to_owned()).collect();
    assert!(answered.len() >= 50);
    for p in &answered {
        assert!(
            all.iter().any(|r| r["kind"] == "decision" && r["path"] == p.as_str()),
            "{p} was answered upstream but is not in the trail"
        );
    }
    // A restart seals whatever the crash left, and the trail still verifies.
    let daemon = Daemon::start(&home, &cfg);
    daemon.stop_ok();
    let (code, text) = wlctl(&home, &["audit", "verify"]);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn metrics_pass_promtool_and_count_what_happened() {
    let agents = TestCgroup::new("metrics");
    let home = DaemonHome::new();
    let dir = home.dir.path();
    let root = TestRoot::new(dir);
    let _api = FakeApi::start(dir, "127.0.1.35", &root.server_cert("api", &[API], false));
    home.write_policy(
        "wl.cedar",
        "@id(\"allow-all\")\npermit(principal, action, resource);\n@id(\"no-secret-path\")\nforbid(principal, action, resource) when { context has path && context.path == \"/v1/secret\" };\n",
    );
    let port = wl_e2e::free_port("127.0.0.1");
    let mut cfg = config(&agents, &root);
    cfg.extra.push_str(&format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
    let daemon = Daemon::start(&home, &cfg);
    let view = AgentView::new(dir, &[(API, "127.0.1.35")], &[&dir.join("state/ca/beacon-ca.pem")]);
    let paths: Vec<String> = ["/v1/models", "/v1/models", "/v1/models", "/v1/secret", "/v1/secret"]
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(curl(&view, &agents, &paths), ["200", "200", "200", "403", "403"]);

    // Request records (and so the counters) are final when each response ends.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let out =
            Command::new("curl").args(["-sS", &format!("http://127.0.0.1:{port}/metrics")]).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        if text.contains("decision=\"deny\",mode=\"enforce\",status=\"4xx\"} 2") {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "counters never reached the requests made:\n{text}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(
        text.contains(
            "wl_requests_total{host=\"api.openai.com\",decision=\"allow\",mode=\"enforce\",status=\"2xx\"} 3"
        ),
        "{text}"
    );
    assert!(text.contains("wl_leaf_mints_total 1"), "{text}");
    assert!(text.contains("wl_stage_duration_seconds_count{stage=\"policy\"} 5"), "{text}");

    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut check.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let (code, status) = wlctl(&home, &["status"]);
    assert_eq!(code, 0, "{status}");
    assert!(status.contains("\"allow\":3") && status.contains("\"deny\":2"), "{status}");
    // Metrics hold nothing that keeps the daemon from shutting down cleanly.
    daemon.stop_ok();
}
