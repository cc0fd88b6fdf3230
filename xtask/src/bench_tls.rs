//! The TLS interception benchmark: keep-alive request rate and latency through wl's
//! transparent path vs direct to the same upstream vs nginx as a TLS-terminating reverse
//! proxy (the bar a production proxy sets), one keep-alive connection's latency, and new
//! connections. One HTTPS upstream (nginx) serves a chat-completion-sized JSON body; the
//! load generator is wrk. The generator runs on CPU 0, proxies and upstream on CPU 1.
//! Systems are measured in turns (A B C A B C ...), medians reported.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::{run_cmd, workspace_root};

const ROUNDS: usize = 3;
const SECONDS: u32 = 5;
const CONNECTIONS: u32 = 32;
pub const HOST: &str = "api.openai.com";
/// A second name of the same upstream, with a `[[credential]]`: the same path plus injection.
pub const CRED_HOST: &str = "api.anthropic.com";
/// A third name of the same upstream, in `enforce` (per-host mode): every request's
/// decision is fsynced before it is forwarded.
const ENFORCE_HOST: &str = "api.mistral.ai";
/// A fourth name, with 1,000 policies whose scope applies to it and that no guard can leave
/// out (so Cedar evaluates every one on every request); the others see only the permit-all
/// base policy.
const POLICY_HOST: &str = "api.groq.com";
/// How many policies `POLICY_HOST` gets.
const MANY_POLICIES: usize = 1000;
/// The upstream nginx.
pub const UPSTREAM_IP: &str = "127.0.2.1";
/// nginx as a reverse proxy in front of it.
pub const NGINX_PROXY_IP: &str = "127.0.2.2";

/// One wrk run's numbers.
#[derive(Clone, Copy, Debug, Default)]
pub struct Wrk {
    /// Requests per second.
    pub rps: f64,
    /// Median latency, ms.
    pub p50: f64,
    /// 99th percentile latency, ms.
    pub p99: f64,
}

/// Medians per system and scenario.
#[derive(Debug, Default)]
pub struct Results {
    /// (system, keep-alive, single connection, new connection per request)
    pub rows: Vec<(&'static str, Wrk, Wrk, Wrk)>,
}

fn sh(cmd: &str) -> anyhow::Result<()> {
    run_cmd(Command::new("sh").arg("-c").arg(cmd))
}

/// nginx's TCP proxy module (Debian ships it apart from nginx-light).
pub const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// Installs wrk, nginx and nginx's stream module if missing, without letting Debian start
/// nginx as a service.
pub fn tools() -> anyhow::Result<()> {
    let have = |c: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {c}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if have("wrk") && have("nginx") && Path::new(NGINX_STREAM_MODULE).exists() {
        return Ok(());
    }
    eprintln!(
        "xtask bench: installing wrk, nginx-light and libnginx-mod-stream with apt-get \
         (load generator, reference proxies)"
    );
    // policy-rc.d 101: packages must not start services here.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let had_policy = policy.exists();
    if !had_policy {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n")?;
        sh("chmod 755 /usr/sbin/policy-rc.d")?;
    }
    let result =
        sh("apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk nginx-light libnginx-mod-stream");
    if !had_policy {
        let _ = std::fs::remove_file(policy);
    }
    result
}

/// A test root and the upstream's certificate for every name the benchmarks use.
pub fn pki(dir: &Path) -> anyhow::Result<()> {
    let d = dir.display();
    sh(&format!(
        "cd {d} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
         -subj /CN=wl-bench-root -addext basicConstraints=critical,CA:TRUE -addext keyUsage=keyCertSign \
         -keyout root.key -out root.pem 2>/dev/null && \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN={HOST} \
         -keyout api.key -out api.csr 2>/dev/null && \
         printf 'subjectAltName=DNS:{HOST},DNS:{CRED_HOST},DNS:{ENFORCE_HOST},DNS:{POLICY_HOST}\\n' > ext && \
         openssl x509 -req -in api.csr -CA root.pem -CAkey root.key -CAcreateserial -days 2 -extfile ext \
         -out api.pem 2>/dev/null"
    ))
}

/// The upstream's and the reverse proxy's nginx configurations, in that order: two
/// processes, as they would be on two machines. (One nginx serving both would answer its
/// own upstream requests in the same event loop, with no process switch between the two
/// hops, and its CPU time and memory would include the upstream's.)
fn nginx_confs(dir: &Path) -> (String, String) {
    let d = dir.display();
    // ~1.2 KB: the size of a short chat completion.
    let body = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore eu fugiat nulla pariatur. Excepteur sint occaecat cupidatat non proident, sunt in culpa qui officia deserunt mollit anim id est laborum. Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":140,"total_tokens":152}}"#;
    // A streamed chat completion's first events.
    // (`\n` is nginx's escape for a newline in a quoted string.)
    let sse = r#"data: {"choices":[{"delta":{"content":"Hello"}}]}\n\ndata: [DONE]\n\n"#;
    let head = |name: &str| {
        format!(
            "worker_processes 1;\npid {d}/nginx-{name}.pid;\nerror_log {d}/nginx-{name}-error.log;\ndaemon off;\n\
             events {{ worker_connections 19000; }}\n"
        )
    };
    let upstream = format!(
        "{}http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
           server {{\n    listen {UPSTREAM_IP}:443 ssl http2;\n    ssl_certificate {d}/api.pem;\n    ssl_certificate_key {d}/api.key;\n\
             location / {{ default_type application/json; return 200 '{body}'; }}\n\
             location /v1/sse {{ default_type text/event-stream; return 200 '{sse}'; }}\n  }}\n}}\n",
        head("upstream")
    );
    let proxy = format!(
        "{}http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
           upstream api {{ server {UPSTREAM_IP}:443; keepalive 128; }}\n\
           server {{\n    listen {NGINX_PROXY_IP}:443 ssl http2;\n    ssl_certificate {d}/api.pem;\n    ssl_certificate_key {d}/api.key;\n\
             location / {{\n      proxy_pass https://api;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n\
               proxy_ssl_verify on;\n      proxy_ssl_trusted_certificate {d}/root.pem;\n      proxy_ssl_name {HOST};\n\
               proxy_ssl_server_name on;\n      proxy_ssl_session_reuse on;\n    }}\n  }}\n}}\n",
        head("proxy")
    );
    (upstream, proxy)
}

/// Writes the two nginx configurations (see [`nginx_confs`]) into `dir` and returns their
/// paths: (upstream, proxy).
pub fn write_nginx_confs(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (upstream, proxy) = nginx_confs(dir);
    let paths = (dir.join("nginx-upstream.conf"), dir.join("nginx-proxy.conf"));
    std::fs::write(&paths.0, upstream)?;
    std::fs::write(&paths.1, proxy)?;
    Ok(paths)
}

/// A started process, stopped (SIGTERM, then SIGKILL after 5 s) on drop.
pub struct Proc(pub Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits up to 20 s until `addr` accepts.
pub fn wait_port(addr: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("{addr} did not come up");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Parses wrk's "Requests/sec" and its --latency distribution.
pub fn parse_wrk(text: &str) -> anyhow::Result<Wrk> {
    let ms = |v: &str| -> Option<f64> {
        let (num, unit): (String, String) = v.chars().partition(|c| c.is_ascii_digit() || *c == '.');
        let n: f64 = num.parse().ok()?;
        Some(match unit.as_str() {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            _ => return None,
        })
    };
    let mut out = Wrk::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", v] => out.rps = v.parse()?,
            ["50.000%" | "50%", v] => out.p50 = ms(v).context("p50")?,
            ["99.000%" | "99%", v] => out.p99 = ms(v).context("p99")?,
            _ => {}
        }
    }
    if out.rps == 0.0 {
        bail!("no Requests/sec in wrk output:\n{text}");
    }
    Ok(out)
}

fn median_of(v: &[Wrk]) -> Wrk {
    let med = |mut xs: Vec<f64>| {
        xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
        xs[xs.len() / 2]
    };
    Wrk {
        rps: med(v.iter().map(|w| w.rps).collect()),
        p50: med(v.iter().map(|w| w.p50).collect()),
        p99: med(v.iter().map(|w| w.p99).collect()),
    }
}

/// wl's configuration for the benchmarks: state and trails under `dir`, interception of
/// port 443 for `cgroup_name`, the test root for upstreams, the broker, a credential for
/// `CRED_HOST`; `extra` adds sections (TOML tables before the credential).
pub fn wl_config_text(dir: &Path, cgroup_name: &str, extra: &str) -> String {
    let path = |p: &str| dir.join(p).display().to_string();
    format!(
        "state_dir = {state:?}\n[intercept]\ncgroups = [{cgroup_name:?}]\nports = [443]\nlisten = [\"127.0.0.1:0\"]\n\
         [audit]\npath = {audit:?}\n[tls]\nupstream_extra_roots = [{root:?}]\n{extra}\
         [broker]\nstate_dir = {broker_state:?}\nsocket = {socket:?}\naudit = {broker_audit:?}\npolicy_dir = {none:?}\n\
         [[credential]]\nhost = {CRED_HOST:?}\nsecret = \"bench\"\nheader = \"x-api-key\"\nformat = \"{{secret}}\"\n",
        socket = path("broker.sock"),
        broker_state = path("state/broker"),
        broker_audit = path("broker-audit.jsonl"),
        none = path("no-broker-policies"),
        state = path("state"),
        audit = path("audit.jsonl"),
        root = path("root.pem"),
    )
}

/// Waits for the broker started on `wl_config` and stores the benchmark's secret for
/// `CRED_HOST`.
pub fn store_bench_secret(dir: &Path, wl_config: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.join("broker.sock").exists() {
        if Instant::now() > deadline {
            bail!("the broker did not come up");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut put = Command::new(workspace_root().join("target/release/wlctl"))
        .arg("--config")
        .arg(wl_config)
        .args(["secret", "put", "bench", "--host", CRED_HOST])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    std::io::Write::write_all(
        &mut put.stdin.take().context("stdin")?,
        b"sk-bench-0123456789abcdef0123456789abcdef\n",
    )?;
    if !put.wait()?.success() {
        bail!("wlctl secret put failed");
    }
    Ok(())
}

/// Runs the comparison. `hooked` is an intercepted cgroup directory (wl attached to it).
pub fn run(dir: &Path, cgroup_dir: &Path, cgroup_name: &str) -> anyhow::Result<Results> {
    tools()?;
    pki(dir)?;
    let confs = write_nginx_confs(dir)?;
    let nginx = |conf: &Path| -> anyhow::Result<Proc> {
        Ok(Proc(
            Command::new("taskset")
                .args(["-c", "1", "nginx", "-c"])
                .arg(conf)
                .stderr(Stdio::null())
                .spawn()
                .context("starting nginx")?,
        ))
    };
    let (_upstream, _nginx_proxy) = (nginx(&confs.0)?, nginx(&confs.1)?);
    wait_port(&format!("{UPSTREAM_IP}:443"))?;
    wait_port(&format!("{NGINX_PROXY_IP}:443"))?;

    // Policies: a permit-all base, and MANY_POLICIES that all apply to POLICY_HOST, each
    // starting with a condition no guard reads (policy/guard.rs), so Cedar evaluates every
    // one: the worst case for a large set.
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(policies.join("base.cedar"), "@id(\"base\")\npermit(principal, action, resource);\n")?;
    let mut many = String::new();
    for i in 0..MANY_POLICIES {
        many.push_str(&format!(
            "@id(\"p{i}\")\npermit(principal, action == Wl::Action::\"Request\", resource == Wl::Host::\"{POLICY_HOST}\") \
             when {{ context.hour >= 0 && context.path like \"/v{i}/*\" }};\n"
        ));
    }
    std::fs::write(policies.join("many.cedar"), many)?;
    let wl_config = dir.join("wl.toml");
    let policy = format!(
        "[policy]\ndir = {:?}\nhost_modes = {{ {ENFORCE_HOST:?} = \"enforce\" }}\n",
        dir.join("policies").display().to_string()
    );
    std::fs::write(&wl_config, wl_config_text(dir, cgroup_name, &policy))?;
    // The broker, with one secret for CRED_HOST (on the proxies' CPU).
    let _broker = Proc(
        Command::new("taskset")
            .args(["-c", "1"])
            .arg(workspace_root().join("target/release/wl-daemon"))
            .arg("broker")
            .arg("--config")
            .arg(&wl_config)
            .env("WL_LOG", "warn")
            .spawn()
            .context("starting wl-daemon broker")?,
    );
    store_bench_secret(dir, &wl_config)?;

    let _wl = Proc(
        Command::new("taskset")
            .args(["-c", "1"])
            .arg(workspace_root().join("target/release/wl-daemon"))
            .arg("run")
            .arg("--config")
            .arg(&wl_config)
            .env("WL_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .context("starting wl-daemon")?,
    );
    // Ready once the programs are attached.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new("bpftool").args(["cgroup", "show"]).arg(cgroup_dir).output()?;
        if String::from_utf8_lossy(&out.stdout).contains("wl_connect4") {
            break;
        }
        if Instant::now() > deadline {
            bail!("wl-daemon did not attach");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let systems: [(&'static str, &str, &str, bool); 6] = [
        ("direct", UPSTREAM_IP, HOST, false),
        ("nginx proxy", NGINX_PROXY_IP, HOST, false),
        ("wl transparent", UPSTREAM_IP, HOST, true),
        ("wl transparent + credential", UPSTREAM_IP, CRED_HOST, true),
        ("wl transparent, enforce (durable decisions)", UPSTREAM_IP, ENFORCE_HOST, true),
        ("wl transparent, 1,000 policies", UPSTREAM_IP, POLICY_HOST, true),
    ];
    let scenarios: [(u32, bool); 3] = [(CONNECTIONS, false), (1, false), (1, true)];
    let mut samples: Vec<[Vec<Wrk>; 3]> =
        (0..systems.len()).map(|_| [Vec::new(), Vec::new(), Vec::new()]).collect();
    for _ in 0..ROUNDS {
        for (si, (_, ip, host, in_cgroup)) in systems.iter().enumerate() {
            for (ci, (conns, close)) in scenarios.iter().enumerate() {
                let text = wrk(dir, ip, host, *in_cgroup, cgroup_dir, *conns, *close)?;
                samples[si][ci].push(parse_wrk(&text)?);
            }
        }
    }
    let mut results = Results::default();
    for (si, (name, _, _, _)) in systems.iter().enumerate() {
        let s = &samples[si];
        results.rows.push((name, median_of(&s[0]), median_of(&s[1]), median_of(&s[2])));
    }
    Ok(results)
}

/// One wrk run on CPU 0 with its own /etc/hosts mapping the API name to `ip`.
fn wrk(
    dir: &Path,
    ip: &str,
    host: &str,
    in_cgroup: bool,
    cgroup_dir: &Path,
    conns: u32,
    close: bool,
) -> anyhow::Result<String> {
    let hosts = dir.join(format!("hosts-{ip}-{host}"));
    std::fs::write(&hosts, format!("127.0.0.1 localhost\n{ip} {host}\n"))?;
    let join = if in_cgroup {
        format!("echo $$ > {}/cgroup.procs && ", cgroup_dir.display())
    } else {
        String::new()
    };
    let header = if close { "-H 'Connection: close'" } else { "" };
    let script = format!(
        "mount --bind {hosts} /etc/hosts && {join}exec taskset -c 0 wrk -t1 -c{conns} -d{SECONDS}s --latency {header} https://{host}/v1/chat/completions",
        hosts = hosts.display()
    );
    let out =
        Command::new("unshare").args(["-m", "--propagation", "private", "sh", "-c", &script]).output()?;
    if !out.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The Markdown section.
pub fn report(r: &Results, mint: &str) -> String {
    let find = |name: &str| r.rows.iter().find(|row| row.0 == name).copied().unwrap();
    let (_, d_ka, d_one, d_new) = find("direct");
    let (_, n_ka, _, _) = find("nginx proxy");
    let (_, w_ka, w_one, w_new) = find("wl transparent");
    let (_, c_ka, c_one, _) = find("wl transparent + credential");
    let (_, e_ka, e_one, _) = find("wl transparent, enforce (durable decisions)");
    let (_, p_ka, p_one, _) = find("wl transparent, 1,000 policies");
    let mut s = format!(
        "## TLS interception: wl transparent vs direct vs nginx\n\n\
         Command: `cargo xtask bench`. Upstream: nginx 1.22 over TLS (HTTP/1.1 to wrk) returning a 1.2 KB JSON \
         chat completion. Load: wrk 4.1, 1 thread, {SECONDS} s per run, {ROUNDS} rounds in turns, medians. \
         wrk on CPU 0; proxies and upstream on CPU 1. wl runs with interception (eBPF), TLS termination and \
         re-origination, and the audit trail on; nginx proxy (a second nginx process) terminates TLS and \
         re-originates verified TLS with upstream keep-alive. \"+ credential\": the same upstream under a second name with a \
         `[[credential]]`, so every request also gets an SCT issued and redeemed by the broker (a separate \
         process, on CPU 1 too) and the key injected. \"enforce (durable decisions)\": a third name in \
         `enforce`, so every request's decision is written and fdatasync'ed (group commit) before it is \
         forwarded; the other wl rows are `observe`, whose records are written asynchronously. \
         \"1,000 policies\": a fourth name to which 1,000 policies apply that no prefilter can leave out \
         (Cedar evaluates every one on every request, the worst case); the other names see only a \
         permit-all base policy.\n\n\
         New connection per request: one connection at a time, each closed after its request \
         (`Connection: close`). wrk's latency starts when the request is written, after the TCP and TLS \
         handshakes, so it leaves the handshake out; the whole cycle (connect, handshake, request, \
         close) is the inverse of the rate, and that is what the target is checked against.\n\n\
         | system | keep-alive req/s ({CONNECTIONS} conns) | p50 ms | p99 ms | 1 keep-alive connection p50 ms | new connection: request p50 ms | new connection: whole cycle ms | req/s |\n\
         |---|---|---|---|---|---|---|---|\n"
    );
    for (name, ka, one, new) in &r.rows {
        s.push_str(&format!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.3} | {:.3} | {:.3} | {:.0} |\n",
            ka.rps,
            ka.p50,
            ka.p99,
            one.p50,
            new.p50,
            1000.0 / new.rps,
            new.rps
        ));
    }
    let vs_nginx = w_ka.rps / n_ka.rps;
    let vs_direct = w_ka.rps / d_ka.rps;
    let added_one = w_one.p50 - d_one.p50;
    // Connections are made one at a time: the cycle is the inverse of the rate.
    let new_added = 1000.0 / w_new.rps - 1000.0 / d_new.rps;
    s.push_str(&format!(
        "\n| target | measured | |\n|---|---|---|\n\
         | keep-alive throughput ≥ 90% of nginx's | {:.0}% | {} |\n\
         | keep-alive throughput ≥ 50% of direct | {:.0}% | {} |\n\
         | one keep-alive connection: < 0.1 ms added at p50 | {:+.3} ms | {} |\n\
         | new connection: < 1 ms added | {:+.3} ms per connection (connect, TLS handshake with wl, request, close; leaf cached, upstream pooled) | {} |\n\
         \nCredential injection, whole path: keep-alive throughput {:.0}% of wl without a credential; one \
         keep-alive connection {:+.3} ms at p50.\n\
         \nDurable decisions (enforce) vs asynchronous records (observe): keep-alive throughput {:.0}%; one \
         keep-alive connection {:+.3} ms at p50.\n\
         \nPolicy, whole path: 1,000 applicable policies vs the permit-all base: keep-alive throughput {:.0}%; \
         one keep-alive connection {:+.3} ms at p50.\n\
         \nLeaf minting (Criterion, `leaf/*` below): {mint}.\n",
        vs_nginx * 100.0,
        met(vs_nginx >= 0.9),
        vs_direct * 100.0,
        met(vs_direct >= 0.5),
        added_one,
        met(added_one < 0.1),
        new_added,
        met(new_added < 1.0),
        c_ka.rps / w_ka.rps * 100.0,
        c_one.p50 - w_one.p50,
        e_ka.rps / w_ka.rps * 100.0,
        e_one.p50 - w_one.p50,
        p_ka.rps / w_ka.rps * 100.0,
        p_one.p50 - w_one.p50,
    ));
    s
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "not met"
    }
}

/// Scratch directory for one bench run.
pub fn scratch() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("wl-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Runs the broker round-trip benchmark twice (broker and client free to run on either
/// CPU, then both pinned to one) and returns its Markdown section.
pub fn broker_round_trip() -> anyhow::Result<String> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace_root())
        .args(["bench", "-q", "-p", "wl-daemon", "--bench", "broker", "--no-run"])
        .status()?;
    if !status.success() {
        bail!("building the broker bench failed");
    }
    // The bench binary cargo just built (the newest one).
    let deps = workspace_root().join("target/release/deps");
    let exe = std::fs::read_dir(&deps)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("broker-") && !n.contains('.'))
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .context("no broker bench binary")?;
    let run = |pinned: bool| -> anyhow::Result<serde_json::Value> {
        let mut cmd = if pinned {
            let mut c = Command::new("taskset");
            c.args(["-c", "1"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd.stderr(Stdio::inherit()).output()?;
        if !out.status.success() {
            bail!("broker bench failed");
        }
        Ok(serde_json::from_str(String::from_utf8(out.stdout)?.lines().last().unwrap_or("{}"))?)
    };
    let (free, pinned) = (run(false)?, run(true)?);
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let mut s = String::from(
        "## Secrets broker: SCT issue + redeem round trip\n\n\
         Command: `cargo bench -p wl-daemon --bench broker` (run by `cargo xtask bench`, once with the \
         broker and its client free to run on either CPU, once both pinned to CPU 1 with taskset). A real \
         `wl-daemon broker` process; one kept-open Unix-socket connection, as the proxy keeps; per sample an \
         `issue` (peer check, UseSecret policy, Ed25519 signature) then a `redeem` (the token recognised as \
         just issued, so no signature check; validity, binding, ledger append, decryption), each also writing the broker's audit record. 5,000 samples after 500 \
         warm-up. `status` is a request that does no work: the transport alone.\n\n\
         | placement | issue + redeem p50 µs | p99 µs | issue p50 | redeem p50 | status round trip p50 | target p50 < 150 µs |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for (name, v) in [("either CPU", &free), ("one CPU", &pinned)] {
        s.push_str(&format!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} |\n",
            f(v, "p50_us"),
            f(v, "p99_us"),
            f(v, "issue_p50_us"),
            f(v, "redeem_p50_us"),
            f(v, "status_p50_us"),
            met(f(v, "p50_us") < 150.0),
        ));
    }
    Ok(s)
}

/// Runs the audit trail benchmark and returns its Markdown section.
pub fn audit_trail() -> anyhow::Result<String> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace_root())
        .args(["bench", "-q", "-p", "wl-daemon", "--bench", "audit"])
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("audit bench failed");
    }
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8(out.stdout)?.lines().last().unwrap_or("{}"))?;
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok(format!(
        "## Audit trail: appends and verification\n\n\
         Command: `cargo bench -p wl-daemon --bench audit` (run by `cargo xtask bench`), trail in /var/tmp \
         (the machine's disk). Durable: 256 concurrent submitters for 3 s, each waiting until its record is \
         written and fdatasync'ed with its batch (group commit), as enforce does per request. Writer: batches \
         of 1,024 request-sized records through the hash chain. Verify: `wlctl audit verify`'s check of an \
         untouched trail of 100,000 records with its checkpoints and anchor.\n\n\
         | measurement | result | target | |\n|---|---|---|---|\n\
         | durable appends, group commit | {:.0} records/s | ≥ 50,000 records/s | {} |\n\
         | writer capacity (chain, no per-batch fsync) | {:.0} records/s | | |\n\
         | verify 100,000 records | {:.2} s | < 2 s | {} |\n",
        f("durable_records_per_s"),
        met(f("durable_records_per_s") >= 50_000.0),
        f("writer_records_per_s"),
        f("verify_100k_s"),
        met(f("verify_100k_s") < 2.0),
    ))
}

/// Runs the Cedar evaluation micro-benchmark and returns its Markdown section.
pub fn policy_eval() -> anyhow::Result<String> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace_root())
        .args(["bench", "-q", "-p", "wl-daemon", "--bench", "policy"])
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("policy bench failed");
    }
    let text = String::from_utf8(out.stdout)?;
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or("{}"))?;
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok(format!(
        "## Policy: Cedar evaluation per request\n\n\
         Command: `cargo bench -p wl-daemon --bench policy` (run by `cargo xtask bench`). First request \
         of a connection: build the agent's entities and the subset of policies whose scope can apply, \
         then decide. Later requests on the connection reuse both and only decide. 5,000 samples after \
         500 warm-up; the policies are per-agent permits (one per cgroup) plus a forbid.\n\n\
         | policies | later requests p50 µs | p99 µs | first request p50 µs | p99 µs | target p50 | |\n\
         |---|---|---|---|---|---|---|\n\
         | 10 | {:.1} | {:.1} | {:.1} | {:.1} | < 10 µs | {} |\n\
         | 1,000 | {:.1} | {:.1} | {:.1} | {:.1} | < 200 µs | {} |\n\
         \nWith 1,000 policies that are all in scope for the request (no principal or resource scope \
         narrows them), the guards (leading comparisons of `context.method`, `context.path` or, after \
         its `has`, `context.body.model`; `wl-daemon/src/policy/guard.rs`) leave out those that cannot \
         hold, and Cedar evaluates the rest:\n\n\
         | 1,000 policies in scope, each | p50 µs | p99 µs | target p50 < 200 µs |\n\
         |---|---|---|---|\n\
         | for one path prefix (`context.method == \"POST\" && context.path like \"/vN/*\"`) | {:.1} | {:.1} | {} |\n\
         | for one model (`context.body has model && context.body.model == \"model-N\"`) | {:.1} | {:.1} | {} |\n\
         | starting with a condition no guard reads (`context.hour >= 0 && ...`): every one evaluated | {:.1} | {:.1} | {} |\n\
         \nA large set stays cheap when its policies are narrowed by scope or begin with the method, path \
         or model they are about. The whole-path cost of an unguarded set is in the TLS section.\n",
        f("p50_10_cached_us"),
        f("p99_10_cached_us"),
        f("p50_10_us"),
        f("p99_10_us"),
        met(f("p50_10_cached_us") < 10.0),
        f("p50_1000_cached_us"),
        f("p99_1000_cached_us"),
        f("p50_1000_us"),
        f("p99_1000_us"),
        met(f("p50_1000_us") < 200.0),
        f("p50_1000_in_scope_us"),
        f("p99_1000_in_scope_us"),
        met(f("p50_1000_in_scope_us") < 200.0),
        f("p50_1000_per_model_us"),
        f("p99_1000_per_model_us"),
        met(f("p50_1000_per_model_us") < 200.0),
        f("p50_1000_unguarded_us"),
        f("p99_1000_unguarded_us"),
        met(f("p50_1000_unguarded_us") < 200.0),
    ))
}

#[cfg(test)]
mod tests {
    /// The benchmarks' configurations are valid for the wl built in this workspace.
    #[test]
    fn bench_configs_are_valid() {
        // Built by `cargo xtask test` before the tests run (WL_BIN_DIR).
        let bin_dir = std::env::var_os("WL_BIN_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| super::workspace_root().join("target/debug"));
        let wlctl = bin_dir.join("wlctl");
        assert!(wlctl.exists(), "{} is not built: run `cargo xtask test`", wlctl.display());
        let dir = std::env::temp_dir().join(format!("wl-bench-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for extra in [
            "[connect]\nlisten = \"127.0.2.4:3128\"\n",
            "[policy]\nhost_modes = { \"api.mistral.ai\" = \"enforce\" }\n",
        ] {
            let path = dir.join("wl.toml");
            std::fs::write(&path, super::wl_config_text(&dir, "/bench", extra)).unwrap();
            let out =
                std::process::Command::new(&wlctl).args(["config", "check"]).arg(&path).output().unwrap();
            assert!(
                out.status.success(),
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parses_wrk_output() {
        let text = "Running 5s test @ https://api.openai.com/\n  1 threads and 32 connections\n\
                    Latency Distribution\n     50%  412.00us\n     75%  1.20ms\n     90%    2.00ms\n     99%    5.31ms\n\
                    Requests/sec:  51234.56\nTransfer/sec:      8.00MB\n";
        let w = super::parse_wrk(text).unwrap();
        assert_eq!(w.rps, 51234.56);
        assert!((w.p50 - 0.412).abs() < 1e-9);
        assert!((w.p99 - 5.31).abs() < 1e-9);
    }
}
