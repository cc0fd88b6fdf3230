//! The secrets broker and credential injection, end to end: the official openai SDK with a
//! placeholder key against an API that accepts only the real one, the secret's absence from
//! everything wl writes, single-use tokens across broker restarts, peer uid checks, crash
//! safety of `wlctl secret put`, and what a missing broker means in each mode.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{net::UnixStream, process::CommandExt},
    path::Path,
    process::{Command, Stdio},
};

use serde_json::{json, Value};
use wl_e2e::{
    agents::{fixture, json_of, output, venv_python, AgentView, FakeApi},
    bin,
    pki::TestRoot,
    Daemon, DaemonConfig, DaemonHome, TestCgroup,
};

const API: &str = "api.openai.com";

/// A fresh secret: random, and with characters that base64 and URL encoding change.
fn random_secret() -> String {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut bytes).unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("sk-wl-e2e/{hex}+k")
}

/// Every form in which the secret could leak.
fn forms(secret: &str) -> Vec<String> {
    use base64::Engine;
    let b = secret.as_bytes();
    let url: String = b
        .iter()
        .map(|&c| {
            if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect();
    vec![
        secret.to_owned(),
        base64::engine::general_purpose::STANDARD.encode(b),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b),
        url,
    ]
}

fn assert_absent(secret: &str, what: &str, text: &[u8]) {
    for form in forms(secret) {
        assert!(
            !text.windows(form.len()).any(|w| w == form.as_bytes()),
            "the secret (as {form:?}) appears in {what}"
        );
    }
}

fn config(cg: &TestCgroup, root: &TestRoot, mode: &'static str) -> DaemonConfig {
    let mut cfg = DaemonConfig::new(cg, &[443]);
    cfg.mode = mode;
    cfg.extra = format!(
        "[tls]\nupstream_extra_roots = [{:?}]\n\n[[credential]]\nhost = \"{API}\"\nsecret = \"openai\"\n\
         header = \"authorization\"\nformat = \"Bearer {{secret}}\"\n",
        root.cert.display().to_string()
    );
    cfg
}

fn wlctl(home: &DaemonHome, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut child = Command::new(bin("wlctl"))
        .arg("--config")
        .arg(home.dir.path().join("wl.toml"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn put(home: &DaemonHome, name: &str, host: &str, value: &str) -> std::process::Output {
    wlctl(home, &["secret", "put", name, "--host", host], Some(&format!("{value}\n")))
}

/// One request on the broker's socket, as the proxy speaks it.
fn broker_call(socket: &Path, req: &Value) -> Value {
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
}

fn use_of(host: &str, secret: &str) -> Value {
    json!({"agent": null, "host": host, "secret": secret, "method": "POST", "path": "/v1/chat/completions"})
}

fn with(mut base: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().map_while(Result::ok) {
        let path = entry.path();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            files_under(&path, out);
        } else if kind.is_file() {
            out.push(path);
        }
    }
}

#[test]
fn the_sdk_works_with_a_placeholder_key_and_the_secret_shows_up_nowhere() {
    let agents = TestCgroup::new("secrets");
    let home = DaemonHome::new();
    let dir = home.dir.path();
    let root = TestRoot::new(dir);
    let secret = random_secret();
    let api =
        FakeApi::start_with_key(dir, "127.0.1.30", &root.server_cert("api", &[API], false), Some(&secret));
    let cfg = config(&agents, &root, "enforce");
    let broker = Daemon::start_broker(&home, &cfg);
    let out = put(&home, "openai", API, &secret);
    assert!(out.status.success(), "put: {}", String::from_utf8_lossy(&out.stderr));
    let daemon = Daemon::start(&home, &cfg);
    let view = AgentView::new(dir, &[(API, "127.0.1.30")], &[&dir.join("state/ca/beacon-ca.pem")]);

    // The agent runs with OPENAI_API_KEY=placeholder (AgentView sets it) and gets answers.
    let sdk = |mode: &str| {
        json_of(
            view.command(Some(&agents), venv_python())
                .arg(fixture("openai_client.py"))
                .args([mode, "gpt-4o-mini"]),
        )
    };
    let r = sdk("chat");
    assert_eq!(r["ok"], true, "{r}");
    let r = sdk("stream");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["content"], "part0 part1 part2 part3 part4 ");
    // Without wl's injection the API refuses the placeholder: the credential made it work.
    let requests = api.entries("request");
    assert_eq!(requests.len(), 2);
    for r in &requests {
        assert_eq!(
            r["authorization"],
            format!("Bearer {secret}"),
            "the upstream must see exactly the real key"
        );
    }

    // An API that echoes the credential: the agent gets it redacted, in headers and body.
    let echo = output(view.command(Some(&agents), "curl").args([
        "-sS",
        "-D",
        "-",
        "-H",
        "Authorization: Bearer placeholder",
        &format!("https://{API}/v1/echo"),
    ]));
    let text = String::from_utf8_lossy(&echo.stdout).to_lowercase();
    assert!(text.contains("x-echo: [redacted by wl]"), "{text}");
    assert!(text.contains("\"you_sent\": \"bearer [redacted by wl]\""), "{text}");
    assert_absent(&secret, "the echoed response", &echo.stdout);

    // The agent's own environment holds only the placeholder.
    let env = output(&mut view.command(Some(&agents), "env"));
    assert!(String::from_utf8_lossy(&env.stdout).contains("OPENAI_API_KEY=placeholder"));
    assert_absent(&secret, "the agent's environment", &env.stdout);

    // The audit trails: which secret, which token, never the value.
    let rec =
        home.wait_audit("for the injected request", |r| r["kind"] == "request" && r["path"] == "/v1/echo");
    assert_eq!(rec["secret"], "openai");
    assert_eq!(rec["credential"], "injected");
    assert_eq!(rec["redactions"], 2);
    let jti = rec["jti"].as_str().unwrap().to_owned();
    assert_eq!(jti.len(), 32);
    let broker_records = home.broker_audit_records();
    for event in ["issue", "redeem"] {
        assert!(
            broker_records.iter().any(|r| r["event"] == event && r["jti"] == jti.as_str() && r["ok"] == true),
            "no {event} record for {jti}: {broker_records:#?}"
        );
    }

    // Nothing wl wrote holds the secret: logs, audit trails, state (but the sealed store).
    daemon.stop_ok();
    let broker_log = broker.log_text();
    broker.stop_ok();
    let mut files = Vec::new();
    files_under(dir, &mut files);
    let mut scanned = 0;
    for file in files {
        let sealed = file.extension().is_some_and(|e| e == "sealed");
        if sealed || file == api.log_path() {
            continue;
        }
        assert_absent(&secret, &file.display().to_string(), &std::fs::read(&file).unwrap());
        scanned += 1;
    }
    assert!(scanned > 5, "only {scanned} files scanned");
    assert!(dir.join("audit.jsonl").exists() && dir.join("broker-audit.jsonl").exists());
    assert_absent(&secret, "the broker's log", broker_log.as_bytes());
    assert!(broker_log.contains("wl-broker ready"));
}

#[test]
fn tokens_are_single_use_across_restarts_and_refused_with_their_codes() {
    let agents = TestCgroup::new("sct");
    let home = DaemonHome::new();
    let root = TestRoot::new(home.dir.path());
    let cfg = config(&agents, &root, "enforce");
    let broker = Daemon::start_broker(&home, &cfg);
    let secret = random_secret();
    assert!(put(&home, "openai", API, &secret).status.success());
    let socket = home.broker_socket();
    let issue = |u: Value| broker_call(&socket, &with(json!({"op": "issue"}), u));
    let redeem = |sct: &str, u: Value| broker_call(&socket, &with(json!({"op": "redeem", "sct": sct}), u));

    let first = issue(use_of(API, "openai"));
    assert_eq!(first["ok"], true, "{first}");
    let sct = first["sct"].as_str().unwrap().to_owned();
    let got = redeem(&sct, use_of(API, "openai"));
    assert_eq!(got["ok"], true, "{got}");
    use base64::Engine;
    let value = base64::engine::general_purpose::STANDARD.decode(got["value"].as_str().unwrap()).unwrap();
    assert_eq!(value, secret.as_bytes());
    assert_eq!(redeem(&sct, use_of(API, "openai"))["code"], "sct_replayed");

    // Binding and integrity, each with its code; none of these uses the token up.
    let second = issue(use_of(API, "openai"))["sct"].as_str().unwrap().to_owned();
    assert_eq!(redeem(&second, use_of("api.anthropic.com", "openai"))["code"], "sct_wrong_host");
    assert_eq!(redeem(&second, use_of(API, "anthropic"))["code"], "sct_wrong_secret");
    let other_agent = with(
        use_of(API, "openai"),
        json!({"agent": {"pid": 4242, "tid": 4242, "uid": 1000, "gid": 1000, "user": null, "comm": "x",
                          "exe": null, "cgroup": null, "cgroup_id": 1, "unit": null}}),
    );
    assert_eq!(redeem(&second, other_agent)["code"], "sct_wrong_agent");
    assert_eq!(
        redeem(&second, with(use_of(API, "openai"), json!({"path": "/v1/files"})))["code"],
        "sct_wrong_request"
    );
    let mut tampered = second.clone().into_bytes();
    let at = tampered.len() - 100; // inside the claims' host and secret
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let code = redeem(&tampered, use_of(API, "openai"))["code"].clone();
    assert!(code == "sct_bad_signature" || code == "sct_malformed", "{code}");
    assert_eq!(redeem("wlsct1.AAAA", use_of(API, "openai"))["code"], "sct_malformed");

    // A new signing key: tokens signed by the old one are still good until they expire.
    let before_rotation = issue(use_of(API, "openai"))["sct"].as_str().unwrap().to_owned();
    let rotated = wlctl(&home, &["broker", "rotate-key"], None);
    assert!(rotated.status.success(), "{}", String::from_utf8_lossy(&rotated.stderr));
    assert_eq!(redeem(&before_rotation, use_of(API, "openai"))["ok"], true);
    let after = issue(use_of(API, "openai"))["sct"].as_str().unwrap().to_owned();
    assert_ne!(after[7..18], before_rotation[7..18], "the new token names the new key id");

    // Issuing is the broker's policy: a secret only for the hosts it was stored for.
    let denied = issue(use_of("evil.example", "openai"));
    assert_eq!(denied["code"], "policy_denied", "{denied}");
    assert_eq!(issue(use_of(API, "nope"))["code"], "no_such_secret");

    // A crash and a restart: the used token stays used, the unused one still works once.
    broker.kill9();
    let broker = Daemon::start_broker(&home, &cfg);
    assert_eq!(redeem(&sct, use_of(API, "openai"))["code"], "sct_replayed");
    assert_eq!(redeem(&second, use_of(API, "openai"))["ok"], true);
    assert_eq!(redeem(&second, use_of(API, "openai"))["code"], "sct_replayed");

    let records = home.broker_audit_records();
    for code in ["sct_replayed", "sct_wrong_host", "sct_wrong_agent", "policy_denied"] {
        assert!(records.iter().any(|r| r["code"] == code), "no audit record with {code}");
    }
    broker.stop_ok();
}

#[test]
fn a_uid_that_is_not_allowed_is_refused_by_the_broker() {
    let agents = TestCgroup::new("uids");
    let home = DaemonHome::new();
    let root = TestRoot::new(home.dir.path());
    // A socket another user can reach, so that the broker's own check is what refuses.
    let run = Path::new("/tmp").join(wl_e2e::unique("broker"));
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let socket = run.join("broker.sock");
    let mut cfg = config(&agents, &root, "enforce");
    cfg.broker = format!("socket = {:?}\n", socket.display().to_string());
    let broker = Daemon::start_broker(&home, &cfg);
    let client = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b'{"op": "list"}\n')
print(s.makefile().readline().strip())
"#;
    let out = Command::new("/usr/bin/python3")
        .args(["-c", client])
        .arg(&socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["code"], "uid_not_allowed", "{reply}");
    assert!(reply["message"].as_str().unwrap().contains("uid 65534"), "{reply}");
    // Root (an admin) is served on the same socket.
    assert_eq!(broker_call(&socket, &json!({"op": "list"}))["ok"], true);
    // The broker has no network of its own: another network namespace, with no interface up.
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_ne!(ns(&broker.pid().to_string()), ns("self"), "the broker shares the host's network");
    let links = Command::new("nsenter")
        .arg(format!("--net=/proc/{}/ns/net", broker.pid()))
        .args(["ip", "-o", "link", "show", "up"])
        .output()
        .unwrap();
    assert!(links.status.success());
    assert_eq!(String::from_utf8_lossy(&links.stdout).trim(), "", "interfaces up in the broker's namespace");
    let refused = home.broker_audit_records();
    assert!(refused.iter().any(|r| r["event"] == "connect" && r["peer_uid"] == 65534), "{refused:#?}");
    broker.stop_ok();
    std::fs::remove_dir_all(&run).unwrap();
}

#[test]
fn kill_9_during_puts_loses_no_acknowledged_secret() {
    let agents = TestCgroup::new("crash");
    let home = DaemonHome::new();
    let root = TestRoot::new(home.dir.path());
    let cfg = config(&agents, &root, "enforce");
    let mut broker = Daemon::start_broker(&home, &cfg);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (acknowledged, broker) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut acknowledged = Vec::new();
            // Bounded: at most 400 puts, stopped earlier by the flag.
            for i in 0..400 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let (name, value) = (format!("s{i}"), random_secret());
                if put(&home, &name, API, &value).status.success() {
                    acknowledged.push((name, value));
                }
            }
            acknowledged
        });
        for _ in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(400));
            broker.kill9();
            broker = Daemon::start_broker(&home, &cfg);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (writer.join().unwrap(), broker)
    });
    assert!(acknowledged.len() >= 5, "only {} puts went through", acknowledged.len());
    broker.kill9();
    let broker = Daemon::start_broker(&home, &cfg);
    for (name, value) in &acknowledged {
        let out = wlctl(&home, &["secret", "verify", name], Some(&format!("{value}\n")));
        assert!(
            out.status.success(),
            "acknowledged secret {name} does not read back: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let list = wlctl(&home, &["secret", "list", "--json"], None);
    let listed: Value = serde_json::from_slice(&list.stdout).unwrap();
    for (name, _) in &acknowledged {
        assert!(listed.as_array().unwrap().iter().any(|s| s["name"] == name.as_str()), "{name} not listed");
    }
    broker.stop_ok();
}

#[test]
fn without_the_broker_enforce_sends_nothing_and_observe_goes_on_without_the_credential() {
    let agents = TestCgroup::new("nobroker");
    let home = DaemonHome::new();
    let dir = home.dir.path();
    let root = TestRoot::new(dir);
    let api = FakeApi::start(dir, "127.0.1.31", &root.server_cert("api", &[API], false));
    let _daemon = Daemon::start(&home, &config(&agents, &root, "enforce"));
    let view = AgentView::new(dir, &[(API, "127.0.1.31")], &[&dir.join("state/ca/beacon-ca.pem")]);
    let curl = || {
        let out = output(view.command(Some(&agents), "curl").args([
            "-sS",
            "-w",
            "\n%{http_code}",
            "-H",
            "Authorization: Bearer placeholder",
            &format!("https://{API}/v1/models"),
        ]));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.to_owned(), body.to_owned())
    };

    let (code, body) = curl();
    assert_eq!(code, "503", "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["type"], "wl_credential_unavailable");
    assert!(body["error"]["message"].as_str().unwrap().contains("broker unavailable"), "{body}");
    assert!(api.entries("request").is_empty(), "enforce forwarded a request without its credential");
    let rec = home.wait_audit("for the refusal", |r| r["kind"] == "request" && r["status"] == 503);
    assert_eq!(rec["credential"], "missing");
    assert_eq!(rec["credential_error"], "broker_unavailable");

    let out = wlctl(&home, &["mode", "observe"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, _) = curl();
    assert_eq!(code, "200");
    let seen = api.entries("request");
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0]["authorization"], "Bearer placeholder",
        "observe forwards the request as the agent sent it"
    );
    let rec = home.wait_audit("for the observed request", |r| r["kind"] == "request" && r["status"] == 200);
    assert_eq!(rec["credential"], "missing");
    assert_eq!(rec["credential_error"], "broker_unavailable");
    assert_eq!(rec["mode"], "observe");
}

#[test]
fn broker_users_by_name_must_exist() {
    let agents = TestCgroup::new("users");
    let home = DaemonHome::new();
    let root = TestRoot::new(home.dir.path());
    let mut cfg = config(&agents, &root, "enforce");
    cfg.broker = "client_users = [\"no-such-user-wl\"]\n".into();
    let config = home.write_config(&cfg);
    let (status, stderr) =
        wl_e2e::run_refused(Command::new(bin("wl-daemon")).args(["broker", "--config"]).arg(&config));
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("broker.client_users: there is no user named `no-such-user-wl`"), "{stderr}");

    // A user that exists (nobody) may obtain secrets: the client operations answer it.
    cfg.broker = "client_users = [\"nobody\"]\n".into();
    let run = Path::new("/tmp").join(wl_e2e::unique("users"));
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let socket = run.join("broker.sock");
    cfg.broker.push_str(&format!("socket = {:?}\n", socket.display().to_string()));
    let broker = Daemon::start_broker(&home, &cfg);
    let ask = |op: &str| {
        let out = Command::new("/usr/bin/python3")
            .args(["-c", "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\ns.sendall(sys.argv[2].encode()+b'\\n')\nprint(s.makefile().readline().strip())"])
            .arg(&socket)
            .arg(format!("{{\"op\": \"{op}\"}}"))
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    assert_eq!(ask("status")["ok"], true);
    assert_eq!(ask("list")["code"], "uid_not_allowed", "a client is not an admin");
    broker.stop_ok();
    std::fs::remove_dir_all(&run).unwrap();
}
