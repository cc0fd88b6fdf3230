//! Cedar on every request and connection, end to end: the official openai SDK in
//! intercepted cgroups against a fake API, in enforce and observe, reloads under load,
//! bodies policy cannot read, and `wlctl policy` as security teams run it in CI.

use std::process::Command;

use serde_json::Value;
use wl_e2e::{
    agents::{fixture, json_of, output, venv_python, AgentView, FakeApi},
    bin,
    pki::TestRoot,
    Daemon, DaemonConfig, DaemonHome, TestCgroup,
};

const API: &str = "api.openai.com";

fn start(
    home: &DaemonHome,
    cgs: &[&TestCgroup],
    root: &TestRoot,
    mode: &'static str,
    policy: &str,
) -> Daemon {
    let mut cfg = DaemonConfig::new(cgs[0], &[443]);
    cfg.cgroups = cgs.iter().map(|c| c.name.clone()).collect();
    cfg.mode = mode;
    cfg.policy = policy.to_owned();
    cfg.extra = format!("[tls]\nupstream_extra_roots = [{:?}]\n", root.cert.display().to_string());
    Daemon::start(home, &cfg)
}

fn mini_only(agents: &TestCgroup) -> String {
    format!(
        r#"@id("allow-all")
permit(principal, action, resource);

@id("agents-mini-only")
forbid(principal in Wl::Cgroup::"{cg}", action == Wl::Action::"Request", resource == Wl::Host::"api.openai.com")
when {{ context.method == "POST" && context.path == "/v1/chat/completions" }}
unless {{ context.body has model && context.body.model == "gpt-4o-mini" }};
"#,
        cg = agents.name
    )
}

fn sdk(view: &AgentView, cg: &TestCgroup, model: &str) -> Value {
    json_of(view.command(Some(cg), venv_python()).arg(fixture("openai_client.py")).args(["chat", model]))
}

fn chat_requests(api: &FakeApi) -> usize {
    api.entries("request").iter().filter(|r| r["path"] == "/v1/chat/completions").count()
}

#[test]
fn enforce_denies_with_the_policy_and_observe_records_would_deny() {
    let agents = TestCgroup::new("agents");
    let others = TestCgroup::new("others");
    let home = DaemonHome::new();
    let dir = home.dir.path();
    let root = TestRoot::new(dir);
    let api = FakeApi::start(dir, "127.0.1.20", &root.server_cert("api", &[API], false));
    home.write_policy("wl.cedar", &mini_only(&agents));
    let daemon = start(&home, &[&agents, &others], &root, "enforce", "");
    let view =
        AgentView::new(dir, &[(API, "127.0.1.20")], &[&home.dir.path().join("state/ca/beacon-ca.pem")]);

    // Enforce: another model is refused with wl's message; the upstream sees nothing.
    let r = sdk(&view, &agents, "gpt-4o");
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["status"], 403, "{r}");
    assert_eq!(r["error_type"], "PermissionDeniedError", "{r}");
    assert_eq!(r["body"]["type"], "wl_policy_denied", "{r}");
    assert!(r["body"]["message"].as_str().unwrap().contains("agents-mini-only"), "{r}");
    assert_eq!(r["body"]["policies"], serde_json::json!(["agents-mini-only"]), "{r}");
    assert_eq!(chat_requests(&api), 0, "a denied request reached the upstream");
    // The allowed model passes; another cgroup is decided by its own policies.
    assert_eq!(sdk(&view, &agents, "gpt-4o-mini")["ok"], true);
    assert_eq!(sdk(&view, &others, "gpt-4o")["ok"], true);
    assert_eq!(chat_requests(&api), 2);
    let denied = home.wait_audit("for the denial", |r| r["kind"] == "request" && r["status"] == 403);
    assert_eq!(denied["decision"], "deny");
    assert_eq!(denied["mode"], "enforce");
    assert_eq!(denied["would_deny"], false);
    assert_eq!(denied["policies"], serde_json::json!(["agents-mini-only"]));
    daemon.stop_ok();

    // Observe: the same call succeeds and is recorded as would_deny, same policy.
    let _daemon = start(&home, &[&agents, &others], &root, "observe", "");
    let r = sdk(&view, &agents, "gpt-4o");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(chat_requests(&api), 3);
    let rec = home.wait_audit("for would_deny", |r| r["kind"] == "request" && r["would_deny"] == true);
    assert_eq!(rec["decision"], "deny");
    assert_eq!(rec["mode"], "observe");
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["policies"], serde_json::json!(["agents-mini-only"]));
}

#[test]
fn bodies_policy_cannot_read_leave_the_fields_out() {
    let agents = TestCgroup::new("bodies");
    let home = DaemonHome::new();
    let dir = home.dir.path();
    let root = TestRoot::new(dir);
    let api = FakeApi::start(dir, "127.0.1.21", &root.server_cert("api", &[API], false));
    home.write_policy("wl.cedar", &mini_only(&agents));
    let _daemon = start(&home, &[&agents], &root, "enforce", "body_limit = 1024");
    let view =
        AgentView::new(dir, &[(API, "127.0.1.21")], &[&home.dir.path().join("state/ca/beacon-ca.pem")]);
    let post = |body: String| {
        let file = dir.join(wl_e2e::unique("body"));
        std::fs::write(&file, body).unwrap();
        let out = output(view.command(Some(&agents), "curl").args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Content-Type: application/json",
            // No `Expect: 100-continue`: the body is on its way before wl answers.
            "-H",
            "Expect:",
            "--data-binary",
            &format!("@{}", file.display()),
            &format!("https://{API}/v1/chat/completions"),
        ]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let big = format!("{{\"model\": \"gpt-4o-mini\", \"pad\": \"{}\"}}", "x".repeat(4096));
    // Larger than the socket buffers: the refusal must still reach the client, not a reset.
    let huge = format!("{{\"model\": \"gpt-4o-mini\", \"pad\": \"{}\"}}", "x".repeat(300_000));
    let deep = format!("{{\"model\": \"gpt-4o-mini\", \"x\": {}1{}}}", "[".repeat(5000), "]".repeat(5000));
    for (what, body) in [
        ("not JSON", "model=gpt-4o-mini".to_string()),
        ("over the limit", big),
        ("far over the limit", huge),
        ("deeply nested", deep),
    ] {
        assert_eq!(post(body), "403", "{what}: the policy needs context.body.model, which is absent");
    }
    assert_eq!(post(r#"{"model": "gpt-4o-mini", "messages": []}"#.into()), "200");
    assert_eq!(chat_requests(&api), 1);
}

#[test]
fn reloads_are_atomic_fast_and_refuse_invalid_sets() {
    let agents = TestCgroup::new("reload");
    let home = DaemonHome::new();
    let dir = home.dir.path();
    let root = TestRoot::new(dir);
    let _api = FakeApi::start(dir, "127.0.1.22", &root.server_cert("api", &[API], false));
    home.write_policy("wl.cedar", "@id(\"allow-all\")\npermit(principal, action, resource);\n");
    let daemon = start(&home, &[&agents], &root, "enforce", "");
    let view =
        AgentView::new(dir, &[(API, "127.0.1.22")], &[&home.dir.path().join("state/ca/beacon-ca.pem")]);
    // One curl process making requests back to back; prints one status per request.
    let loop_cmd = |n: usize| {
        let mut cmd = view.command(Some(&agents), "curl");
        cmd.args(["-sS", "--http1.1", "-w", "%{http_code}\\n"]);
        for _ in 0..n {
            cmd.args(["-o", "/dev/null", &format!("https://{API}/v1/models")]);
        }
        cmd
    };

    // Rewrites of an equivalent set while requests flow: none fails.
    let client = loop_cmd(300).stdout(std::process::Stdio::piped()).spawn().unwrap();
    for i in 0..6 {
        home.write_policy(
            "wl.cedar",
            &format!("// rev {i}\n@id(\"allow-all\")\npermit(principal, action, resource);\n"),
        );
        daemon.signal_hup();
        std::thread::sleep(std::time::Duration::from_millis(60));
    }
    let out = client.wait_with_output().unwrap();
    let codes: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(codes.len(), 300);
    let failed: Vec<&&str> = codes.iter().filter(|c| **c != "200").collect();
    assert!(failed.is_empty(), "{} of 300 requests failed during reloads: {failed:?}", failed.len());

    // A new policy decides within 1 s of the file changing (no signal needed).
    home.write_policy(
        "wl.cedar",
        "@id(\"allow-all\")\npermit(principal, action, resource);\n\n@id(\"no-models\")\nforbid(principal, action == Wl::Action::\"Request\", resource) when { context.path == \"/v1/models\" };\n",
    );
    let changed = std::time::Instant::now();
    let status = || {
        let out = output(view.command(Some(&agents), "curl").args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("https://{API}/v1/models"),
        ]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    while status() != "403" {
        assert!(changed.elapsed() < std::time::Duration::from_secs(5), "the new policy never decided");
    }
    assert!(changed.elapsed() < std::time::Duration::from_millis(1500), "took {:?}", changed.elapsed());

    // An invalid file is refused with its error; the previous set keeps deciding.
    home.write_policy(
        "broken.cedar",
        "@id(\"oops\")\npermit(principal, action, resource) when { context.nope };\n",
    );
    daemon.wait_log("policy reload refused");
    let line = daemon.wait_log("broken.cedar at line 2");
    assert!(line.contains("nope"), "{line}");
    assert_eq!(status(), "403", "the old set (with no-models) must still decide");
}

#[test]
fn wlctl_policy_check_and_test() {
    let home = DaemonHome::new();
    let dir = home.dir.path();
    let good = dir.join("good");
    std::fs::create_dir(&good).unwrap();
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/examples/openai.cedar"),
        good.join("openai.cedar"),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(bin("wlctl")).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = run(&["policy", "check", good.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("valid"), "{out}");

    let bad = dir.join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("a.cedar"), "permit(principal, action, resource);\n").unwrap();
    std::fs::write(
        bad.join("b.cedar"),
        "\npermit(principal, action, resource)\nwhen { context.method == };\n",
    )
    .unwrap();
    let (code, _, err) = run(&["policy", "check", bad.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("b.cedar at line 3"), "{err}");

    let cases = dir.join("cases.toml");
    std::fs::write(
        &cases,
        r#"
[[case]]
name = "bot may use mini"
action = "Request"
host = "api.openai.com"
agent = { cgroup = "/agents.slice/bot.service", user = "bot", uid = 1000 }
context = { method = "POST", path = "/v1/chat/completions", body = { model = "gpt-4o-mini" }, hour = 10, weekday = 1 }
expect = "allow"

[[case]]
name = "no uploads"
action = "Request"
host = "api.openai.com"
agent = { cgroup = "/agents.slice/bot.service" }
context = { method = "POST", path = "/v1/files" }
expect = "deny"

[[case]]
name = "night shift (expected wrongly)"
action = "Request"
host = "api.openai.com"
agent = { cgroup = "/agents.slice/bot.service" }
context = { method = "POST", path = "/v1/chat/completions", body = { model = "gpt-4o-mini" }, hour = 23 }
expect = "allow"
"#,
    )
    .unwrap();
    let (code, out, err) =
        run(&["policy", "test", cases.to_str().unwrap(), "--policies", good.to_str().unwrap()]);
    assert_eq!(code, Some(4), "{out}{err}");
    assert!(out.contains("ok   bot may use mini") && out.contains("ok   no uploads"), "{out}");
    assert!(out.contains("FAIL night shift"), "{out}");
    assert!(out.contains("2 passed, 1 failed"), "{out}");

    std::fs::write(&cases, "[[case]]\nname = 1\n").unwrap();
    let (code, _, err) =
        run(&["policy", "test", cases.to_str().unwrap(), "--policies", good.to_str().unwrap()]);
    assert_eq!(code, Some(3), "{err}");
    let (code, _, _) = run(&["policy", "test", cases.to_str().unwrap(), "--policies", bad.to_str().unwrap()]);
    assert_eq!(code, Some(2));
}

#[test]
fn wlctl_switches_the_mode_live_and_reloads() {
    let agents = TestCgroup::new("mode");
    let home = DaemonHome::new();
    let dir = home.dir.path();
    let root = TestRoot::new(dir);
    let _api = FakeApi::start(dir, "127.0.1.23", &root.server_cert("api", &[API], false));
    home.write_policy(
        "wl.cedar",
        "@id(\"allow-all\")\npermit(principal, action, resource);\n@id(\"no-models\")\nforbid(principal, action == Wl::Action::\"Request\", resource) when { context.path == \"/v1/models\" };\n",
    );
    let _daemon = start(&home, &[&agents], &root, "observe", "");
    let view =
        AgentView::new(dir, &[(API, "127.0.1.23")], &[&home.dir.path().join("state/ca/beacon-ca.pem")]);
    let status = || {
        let out = output(view.command(Some(&agents), "curl").args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("https://{API}/v1/models"),
        ]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let config = dir.join("wl.toml");
    let wlctl = |args: &[&str]| {
        let out = Command::new(bin("wlctl")).arg("--config").arg(&config).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(status(), "200", "observe lets it through");
    let (code, out, err) = wlctl(&["mode", "enforce"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("mode: enforce (was observe)"), "{out}");
    assert_eq!(status(), "403", "enforce denies it");
    let (_, out, _) = wlctl(&["status"]);
    assert!(out.contains("mode:      enforce") && out.contains("policies:  2"), "{out}");
    let (_, out, _) = wlctl(&["status", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["cgroups"], serde_json::json!([agents.name]));
    assert_eq!(wlctl(&["mode", "observe"]).0, Some(0));
    assert_eq!(status(), "200");

    // wlctl reload: a broken set is refused and said so; the previous one stays.
    home.write_policy("broken.cedar", "permit(principal, action, resource) when { context.nope };\n");
    let (code, _, err) = wlctl(&["reload"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("reload refused") && err.contains("broken.cedar"), "{err}");
    std::fs::remove_file(home.policy_dir().join("broken.cedar")).unwrap();
    let (code, out, err) = wlctl(&["reload"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("reloaded: 2 policies"), "{out}");
}

#[test]
fn a_denied_connection_is_reset_in_enforce() {
    let agents = TestCgroup::new("connect");
    let home = DaemonHome::new();
    let dir = home.dir.path();
    let root = TestRoot::new(dir);
    let api = FakeApi::start(dir, "127.0.1.24", &root.server_cert("api", &[API], false));
    home.write_policy(
        "wl.cedar",
        &format!(
            "@id(\"allow-all\")\npermit(principal, action, resource);\n@id(\"no-openai-here\")\nforbid(principal in Wl::Cgroup::\"{}\", action == Wl::Action::\"Connect\", resource == Wl::Host::\"{API}\");\n",
            agents.name
        ),
    );
    let _daemon = start(&home, &[&agents], &root, "enforce", "");
    let view =
        AgentView::new(dir, &[(API, "127.0.1.24")], &[&home.dir.path().join("state/ca/beacon-ca.pem")]);
    let out = output(view.command(Some(&agents), "curl").args(["-sS", &format!("https://{API}/v1/models")]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reset") || err.contains("Connection reset"), "{err}");
    assert!(api.entries("request").is_empty());
    let rec = home
        .wait_audit("for the denied connection", |r| r["kind"] == "connection" && r["decision"] == "deny");
    assert_eq!(rec["policies"], serde_json::json!(["no-openai-here"]));
    assert!(rec["error"].as_str().unwrap().contains("denied by policy"), "{rec}");
}

#[test]
fn the_shipped_example_cases_pass() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/examples");
    let out = Command::new(bin("wlctl"))
        .args(["policy", "test"])
        .arg(examples.join("openai.cases.toml"))
        .arg("--policies")
        .arg(&examples)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("10 passed, 0 failed"), "{text}");
}

#[test]
fn agents_of_another_user_are_decided_by_their_own_policies() {
    let agents = TestCgroup::new("users");
    let home = DaemonHome::new();
    let dir = home.dir.path();
    let root = TestRoot::new(dir);
    let api = FakeApi::start(dir, "127.0.1.25", &root.server_cert("api", &[API], false));
    home.write_policy(
        "wl.cedar",
        "@id(\"allow-all\")\npermit(principal, action, resource);\n\n@id(\"nobody-no-models\")\nforbid(principal in Wl::User::\"nobody\", action == Wl::Action::\"Request\", resource) when { context.path == \"/v1/models\" };\n",
    );
    let _daemon = start(&home, &[&agents], &root, "enforce", "");
    let view =
        AgentView::new(dir, &[(API, "127.0.1.25")], &[&home.dir.path().join("state/ca/beacon-ca.pem")]);
    let url = format!("https://{API}/v1/models");
    let as_root = output(view.command(Some(&agents), "curl").args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &url,
    ]));
    assert_eq!(String::from_utf8_lossy(&as_root.stdout), "200");
    let as_nobody = output(view.command(Some(&agents), "setpriv").args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "curl",
        "-sS",
        "-w",
        "\n%{http_code}",
        &url,
    ]));
    let text = String::from_utf8_lossy(&as_nobody.stdout);
    assert!(
        text.ends_with("\n403") && text.contains("nobody-no-models"),
        "{text}{}",
        String::from_utf8_lossy(&as_nobody.stderr)
    );
    assert_eq!(api.entries("request").len(), 1, "only root's request went upstream");
    let rec = home.wait_audit("for nobody's denial", |r| r["kind"] == "request" && r["status"] == 403);
    assert_eq!(rec["agent"]["uid"], 65534);
    assert_eq!(rec["agent"]["user"], "nobody");
}
