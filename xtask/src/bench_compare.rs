//! `cargo xtask bench compare`: wl beside what users would otherwise run, on one upstream,
//! with one load generator, in turns.
//!
//! Systems: direct to the upstream (the limit); nginx as a TLS-terminating reverse proxy
//! with upstream keep-alive (the bar a production proxy sets); wl transparent (eBPF
//! redirect, TLS interception, Cedar, audit), with and without credential injection; wl
//! explicit (its CONNECT listener, as `HTTPS_PROXY` agents use it); mitmproxy 11 in
//! regular mode. The upstream is nginx serving a chat-completion-sized JSON body and a
//! server-sent-events body. The generator is oha (the one tool here that speaks through
//! an HTTP proxy too), pinned to CPU 0; every proxy and the upstream are pinned to CPU 1.
//!
//! Per system: keep-alive requests/s and p50/p99/p99.9 at 32 connections; one keep-alive
//! connection's p50; a new connection per request (p50); time to the first byte of the
//! SSE response on a new connection (curl); the proxy's CPU time per request and peak RSS;
//! and for wl, peak RSS with 10,000 open keep-alive connections (the open-file limit
//! here is 20,000 per process, which that run stays under).
//!
//! Twelve rounds. A round runs every system's keep-alive load, then every system's single
//! connection, then new connections, then SSE, in reverse order every other round: the
//! runs a ratio compares are seconds apart, and a drift within a round favours no system.
//! Each goal and ratio is a trimmed mean over rounds of a paired value (wl against its
//! baseline in the same round). The first and second half of the rounds are reported as
//! two runs so that their agreement shows, and the whole run's ratios are compared with
//! the previous run's on this machine (kept in the cache directory). Every run's result
//! also goes to stderr, to see the spread behind a mean.
//! Everything is loopback, bounded in time, and stopped at the end.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _};

use crate::{
    bench_tls::{self, Proc, CRED_HOST, HOST},
    run_cmd,
    setup::cache_dir,
    workspace_root,
};

/// Rounds per run, and the length of each keep-alive run. On this project's 2-vCPU
/// machines a proxy's keep-alive rate wanders by a factor of up to two within seconds
/// while the CPU it is bound by stays fully busy, and the wandering of two systems measured
/// seconds apart is unrelated (docs/profile.md, "Reading this machine's numbers"): pairing
/// cannot cancel it, only measuring longer averages it out. The spread of a run's mean rate
/// falls with the square root of its length (4-second runs: about 20%, 20-second runs:
/// about 9%), so twelve 16-second runs per system bring a whole run's ratio to about 4%,
/// and two runs' ratios within 15% of each other at about three standard deviations.
const ROUNDS: usize = 12;
const LOAD_SECONDS: u32 = 16;
const SHORT_SECONDS: u32 = 2;
const CONNECTIONS: u32 = 32;
const MANY_CONNECTIONS: u32 = 10_000;
/// Time-to-first-event samples per system and round.
const SSE_PER_ROUND: usize = 2;
const WL_CONNECT: &str = "127.0.2.4:3128";
const MITM_LISTEN: &str = "127.0.2.5:8080";
/// wl's Prometheus endpoint: its gauges are read during the 10,000-connection run.
const WL_METRICS: &str = "127.0.2.6:9464";
/// The load generator's version, built from crates.io into the cache.
const OHA_VERSION: &str = "1.16.0";
/// `--only` name of the 10,000-connection run.
const MANY: &str = "many";

/// How a system is reached.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    /// The client resolves the name to this address (direct, or nginx's).
    Resolve(&'static str),
    /// The client resolves to the upstream from an intercepted cgroup.
    Transparent,
    /// Through an HTTP proxy (CONNECT).
    Proxy(&'static str),
}

struct System {
    name: &'static str,
    host: &'static str,
    route: Route,
    /// Which of the started processes is the proxy (for CPU and memory).
    proxy: Option<&'static str>,
}

const SYSTEMS: [System; 6] = [
    System { name: "direct", host: HOST, route: Route::Resolve(bench_tls::UPSTREAM_IP), proxy: None },
    System {
        name: "nginx proxy",
        host: HOST,
        route: Route::Resolve(bench_tls::NGINX_PROXY_IP),
        proxy: Some("nginx"),
    },
    System { name: "wl transparent", host: HOST, route: Route::Transparent, proxy: Some("wl") },
    System {
        name: "wl transparent + credential",
        host: CRED_HOST,
        route: Route::Transparent,
        proxy: Some("wl+broker"),
    },
    System { name: "wl explicit (CONNECT)", host: HOST, route: Route::Proxy(WL_CONNECT), proxy: Some("wl") },
    System { name: "mitmproxy 11", host: HOST, route: Route::Proxy(MITM_LISTEN), proxy: Some("mitmproxy") },
];

/// One oha run.
#[derive(Clone, Copy, Debug, Default)]
struct Load {
    rps: f64,
    requests: f64,
    p50: f64,
    p99: f64,
    p999: f64,
}

/// Where a kind of run's results go among a system's samples.
type RunsOf = fn(&mut Samples) -> &mut Vec<Load>;

/// One system's samples over the rounds.
#[derive(Default)]
struct Samples {
    keep_alive: Vec<Load>,
    one: Vec<Load>,
    new_conn: Vec<Load>,
    sse_ms: Vec<f64>,
    cpu_us_per_request: Vec<f64>,
}

/// Installs what the comparison needs; returns (oha, mitmdump).
fn tools() -> anyhow::Result<(PathBuf, PathBuf)> {
    bench_tls::tools()?;
    let dir = cache_dir().join("bench");
    let oha = dir.join("oha/bin/oha");
    if !oha.exists() {
        eprintln!(
            "xtask bench compare: building oha from crates.io into {} (load generator; a few minutes)",
            dir.display()
        );
        run_cmd(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                // The version this module parses the JSON output of.
                .args(["install", "oha", "--version", OHA_VERSION, "--locked", "--root"])
                .arg(dir.join("oha")),
        )?;
    }
    let mitmdump = dir.join("mitmproxy/bin/mitmdump");
    if !mitmdump.exists() {
        eprintln!(
            "xtask bench compare: installing mitmproxy 11 from PyPI into {}",
            dir.join("mitmproxy").display()
        );
        run_cmd(Command::new("python3").args(["-m", "venv"]).arg(dir.join("mitmproxy")))?;
        run_cmd(Command::new(dir.join("mitmproxy/bin/pip")).args([
            "install",
            "-q",
            "--disable-pip-version-check",
            "mitmproxy>=11,<12",
        ]))?;
    }
    Ok((oha, mitmdump))
}

/// Starts `argv` on CPU 1 in a mount namespace whose /etc/hosts is `hosts`.
fn start(
    name: &'static str,
    hosts: &Path,
    argv: &[&std::ffi::OsStr],
    env: &[(&str, &str)],
) -> anyhow::Result<Proc> {
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(format!("mount --bind {} /etc/hosts && exec taskset -c 1 \"$@\"", hosts.display()))
        .arg("sh")
        .args(argv)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(Proc(cmd.spawn().with_context(|| format!("starting {name}"))?))
}

/// The process ids of `root` and its descendants (nginx's workers, mitmproxy's helpers).
fn tree(root: u32) -> Vec<u32> {
    let mut pids = vec![root];
    let mut i = 0;
    while i < pids.len() {
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", pids[i])).unwrap_or_default();
        pids.extend(children.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        i += 1;
    }
    pids
}

/// CPU time (user + system) of a process tree, in microseconds.
fn cpu_us(pids: &[u32]) -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .sum::<f64>()
        * 1e6
        / tick
}

/// Peak resident memory (VmHWM) of a process tree, MiB.
fn peak_rss_mib(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmHWM:").and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            })
        })
        .sum::<f64>()
        / 1024.0
}

/// Resets the peak resident memory (VmHWM) of processes to their current resident memory
/// (`clear_refs` 5), so that a later peak is the load's and not start-up's.
fn reset_peak_rss(pids: &[u32]) {
    for p in pids {
        let _ = std::fs::write(format!("/proc/{p}/clear_refs"), "5");
    }
}

/// Which runs raised wl's peak resident memory. The peak is one number over the whole
/// comparison (every wl system shares the daemon); this says which load set it, so that an
/// unusual peak can be traced to a system and a kind of run.
struct PeakRises {
    /// The peak after the previous run, MiB.
    last: f64,
    /// (rise in MiB, the run that caused it), for every rise of at least half a MiB.
    rises: Vec<(f64, String)>,
}

impl PeakRises {
    fn new(pids: &[u32]) -> Self {
        Self { last: peak_rss_mib(pids), rises: Vec::new() }
    }

    /// Called after each run that went through wl: notes whether the peak rose during it.
    fn after(&mut self, pids: &[u32], run: impl FnOnce() -> String) {
        let now = peak_rss_mib(pids);
        if now >= self.last + 0.5 {
            self.rises.push((now - self.last, run()));
        }
        self.last = self.last.max(now);
    }

    /// The runs that raised the peak most, largest first.
    fn largest(&self, n: usize) -> String {
        let mut rises = self.rises.clone();
        rises.sort_by(|a, b| b.0.total_cmp(&a.0));
        let named: Vec<String> =
            rises.iter().take(n).map(|(mib, run)| format!("+{mib:.1} MiB in {run}")).collect();
        if named.is_empty() {
            "no run raised it by half a MiB or more".into()
        } else {
            named.join(", ")
        }
    }
}

/// Parses oha's JSON output.
fn parse_oha(text: &str) -> anyhow::Result<Load> {
    let v: serde_json::Value = serde_json::from_str(text).context("oha's JSON output")?;
    let pct = |k: &str| v["latencyPercentiles"][k].as_f64().unwrap_or(f64::NAN) * 1000.0;
    let ok: f64 = v["statusCodeDistribution"]
        .as_object()
        .map(|m| m.iter().filter(|(code, _)| code.starts_with('2')).filter_map(|(_, n)| n.as_f64()).sum())
        .unwrap_or(0.0);
    // (`-w`: requests in flight at the deadline finish rather than count as errors.)
    let errors: f64 = v["errorDistribution"]
        .as_object()
        .map(|m| m.values().filter_map(|n| n.as_f64()).sum())
        .unwrap_or(0.0);
    if ok == 0.0 || errors > ok * 0.01 {
        bail!("oha: {ok} successful requests, {errors} errors: {}", v["errorDistribution"]);
    }
    Ok(Load {
        rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(f64::NAN),
        requests: ok,
        p50: pct("p50"),
        p99: pct("p99"),
        p999: pct("p99.9"),
    })
}

/// The shell prefix that puts a client where `system` needs it: its /etc/hosts, and the
/// intercepted cgroup for the transparent path.
fn client_prefix(dir: &Path, system: &System, cgroup_dir: &Path) -> anyhow::Result<String> {
    let ip = match system.route {
        Route::Resolve(ip) => ip,
        Route::Transparent | Route::Proxy(_) => bench_tls::UPSTREAM_IP,
    };
    let hosts = dir.join(format!("hosts-client-{ip}"));
    std::fs::write(&hosts, format!("127.0.0.1 localhost\n{ip} {HOST} {CRED_HOST}\n"))?;
    let join = if system.route == Route::Transparent {
        format!("echo $$ > {}/cgroup.procs && ", cgroup_dir.display())
    } else {
        String::new()
    };
    Ok(format!("mount --bind {} /etc/hosts && {join}", hosts.display()))
}

fn client(prefix: &str, command: &str) -> anyhow::Result<String> {
    let script = format!("{prefix}exec taskset -c 0 {command}");
    let out =
        Command::new("unshare").args(["-m", "--propagation", "private", "sh", "-c", &script]).output()?;
    if !out.status.success() {
        bail!(
            "`{command}` failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn oha_run(oha: &Path, prefix: &str, system: &System, args: &str) -> anyhow::Result<Load> {
    let proxy = match system.route {
        Route::Proxy(addr) => format!("-x http://{addr}"),
        _ => String::new(),
    };
    let cmd = format!(
        "{oha} --no-tui --output-format json --insecure -w {proxy} {args} https://{host}/v1/chat/completions",
        oha = oha.display(),
        host = system.host
    );
    let load = parse_oha(&client(prefix, &cmd)?)?;
    // Every run on stderr, for a look at the spread behind the medians.
    eprintln!("  {:<28} {args:<38} {:>8.0} req/s  p50 {:.3} ms", system.name, load.rps, load.p50);
    Ok(load)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// Runs the comparison and (with `write`) puts its section into BENCHMARKS.md.
pub fn run(write: bool, only: &[String], cgroup_dir: &Path, cgroup_name: &str) -> anyhow::Result<()> {
    for name in only {
        if name != MANY && !SYSTEMS.iter().any(|s| s.name == name) {
            let names: Vec<&str> = SYSTEMS.iter().map(|s| s.name).chain([MANY]).collect();
            bail!("--only {name:?}: not a system of the comparison; one of {names:?}");
        }
    }
    let (oha, mitmdump) = tools()?;
    let dir = bench_tls::scratch()?;
    let result = measure(&dir, &oha, &mitmdump, only, cgroup_dir, cgroup_name);
    let _ = std::fs::remove_dir_all(&dir);
    let Some((section, svg)) = result? else { return Ok(()) };
    println!("{section}");
    if write {
        let svg_path = workspace_root().join("docs/benchmarks-latency.svg");
        std::fs::write(&svg_path, svg)?;
        crate::bench::write_section(COMPARISON_HEADING, &section)?;
        eprintln!("xtask bench compare: wrote BENCHMARKS.md and {}", svg_path.display());
    }
    Ok(())
}

/// The heading of this command's section in BENCHMARKS.md.
pub const COMPARISON_HEADING: &str = "## Comparison: direct, nginx, wl, mitmproxy";

/// Measures every system (or those in `only`, printing them instead of reporting).
fn measure(
    dir: &Path,
    oha: &Path,
    mitmdump: &Path,
    only: &[String],
    cgroup_dir: &Path,
    cgroup_name: &str,
) -> anyhow::Result<Option<(String, String)>> {
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    bench_tls::pki(dir)?;
    let nginx_confs = bench_tls::write_nginx_confs(dir)?;
    let proxy_hosts = dir.join("hosts-proxies");
    std::fs::write(
        &proxy_hosts,
        format!("127.0.0.1 localhost\n{} {HOST} {CRED_HOST}\n", bench_tls::UPSTREAM_IP),
    )?;
    let os = |s: &str| std::ffi::OsString::from(s);

    // Two nginx processes: the upstream, and the proxy measured (its CPU and memory alone).
    let _upstream =
        start("upstream nginx", &proxy_hosts, &[&os("nginx"), &os("-c"), nginx_confs.0.as_os_str()], &[])?;
    let nginx = start("nginx", &proxy_hosts, &[&os("nginx"), &os("-c"), nginx_confs.1.as_os_str()], &[])?;
    bench_tls::wait_port(&format!("{}:443", bench_tls::UPSTREAM_IP))?;
    bench_tls::wait_port(&format!("{}:443", bench_tls::NGINX_PROXY_IP))?;

    let wl_config = dir.join("wl.toml");
    let connect = format!("[connect]\nlisten = {WL_CONNECT:?}\n[metrics]\nlisten = {WL_METRICS:?}\n");
    std::fs::write(&wl_config, bench_tls::wl_config_text(dir, cgroup_name, &connect))?;
    let release = workspace_root().join("target/release");
    let broker = start(
        "broker",
        &proxy_hosts,
        &[release.join("wl-daemon").as_os_str(), &os("broker"), &os("--config"), wl_config.as_os_str()],
        &[("WL_LOG", "warn")],
    )?;
    bench_tls::store_bench_secret(dir, &wl_config)?;
    // WL_BENCH_WRAP runs the daemon under a profiler, e.g. "heaptrack -o /tmp/wl" (docs/profile.md).
    let mut wl_argv: Vec<std::ffi::OsString> =
        std::env::var("WL_BENCH_WRAP").unwrap_or_default().split_whitespace().map(os).collect();
    wl_argv.extend([
        release.join("wl-daemon").into_os_string(),
        os("run"),
        os("--config"),
        wl_config.clone().into_os_string(),
    ]);
    let wl_argv: Vec<&std::ffi::OsStr> = wl_argv.iter().map(|a| a.as_os_str()).collect();
    let wl = start("wl", &proxy_hosts, &wl_argv, &[("WL_LOG", "warn")])?;
    bench_tls::wait_port(WL_CONNECT)?;

    let mitm = start(
        "mitmproxy",
        &proxy_hosts,
        &[
            mitmdump.as_os_str(),
            &os("--mode"),
            &os("regular"),
            &os("--listen-host"),
            &os(MITM_LISTEN.split(':').next().unwrap_or_default()),
            &os("--listen-port"),
            &os(MITM_LISTEN.rsplit(':').next().unwrap_or_default()),
            &os("--set"),
            &os(&format!("confdir={}", dir.join("mitmproxy").display())),
            &os("--set"),
            &os(&format!("ssl_verify_upstream_trusted_ca={}", dir.join("root.pem").display())),
            &os("--quiet"),
        ],
        &[],
    )?;
    bench_tls::wait_port(MITM_LISTEN)?;

    let pid_of = |which: &str| -> Vec<u32> {
        match which {
            "nginx" => tree(nginx.0.id()),
            "wl" => tree(wl.0.id()),
            "wl+broker" => [tree(wl.0.id()), tree(broker.0.id())].concat(),
            "mitmproxy" => tree(mitm.0.id()),
            _ => Vec::new(),
        }
    };

    // Peaks under load, not at start-up (wl's comes from aya parsing the kernel's BTF while
    // it loads the programs; reported on its own).
    let startup_wl = peak_rss_mib(&pid_of("wl"));
    for which in ["nginx", "wl+broker", "mitmproxy"] {
        reset_peak_rss(&pid_of(which));
    }
    let wl_pids = pid_of("wl");
    let mut wl_peak = PeakRises::new(&wl_pids);
    let through_wl = |system: &System| system.proxy.is_some_and(|p| p.starts_with("wl"));

    let sse_url = |s: &System| format!("https://{}/v1/sse", s.host);
    let mut samples: Vec<Samples> = SYSTEMS.iter().map(|_| Samples::default()).collect();
    let prefixes: Vec<String> =
        SYSTEMS.iter().map(|system| client_prefix(dir, system, cgroup_dir)).collect::<Result<_, _>>()?;
    // The single-connection runs: oha's arguments, and where each system's results go.
    let single: [(&str, RunsOf); 2] =
        [("-c 1", |s| &mut s.one), ("-c 1 --disable-keepalive", |s| &mut s.new_conn)];
    for round in 0..ROUNDS {
        eprintln!("xtask bench compare: round {} of {ROUNDS}", round + 1);
        // One kind of run at a time for every system, so that the runs a ratio compares
        // are seconds apart rather than a minute; every other round in reverse order, so
        // that a drift of the machine's speed within a round favours no system.
        let mut order: Vec<usize> = (0..SYSTEMS.len()).filter(|&i| wanted(SYSTEMS[i].name)).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for &i in &order {
            let system = &SYSTEMS[i];
            let pids = system.proxy.map(pid_of).unwrap_or_default();
            let cpu_before = cpu_us(&pids);
            let load = oha_run(oha, &prefixes[i], system, &format!("-z {LOAD_SECONDS}s -c {CONNECTIONS}"))?;
            let cpu_after = cpu_us(&pids);
            samples[i].keep_alive.push(load);
            if system.proxy.is_some() {
                samples[i].cpu_us_per_request.push((cpu_after - cpu_before) / load.requests);
            }
            if through_wl(system) {
                wl_peak
                    .after(&wl_pids, || format!("{}'s keep-alive run of round {}", system.name, round + 1));
            }
        }
        for (args, runs_of) in single {
            for &i in &order {
                let load = oha_run(oha, &prefixes[i], &SYSTEMS[i], &format!("-z {SHORT_SECONDS}s {args}"))?;
                runs_of(&mut samples[i]).push(load);
                if through_wl(&SYSTEMS[i]) {
                    wl_peak.after(&wl_pids, || {
                        format!("{}'s `{args}` run of round {}", SYSTEMS[i].name, round + 1)
                    });
                }
            }
        }
        for &i in &order {
            let system = &SYSTEMS[i];
            let proxy = match system.route {
                Route::Proxy(addr) => format!("-x http://{addr}"),
                _ => String::new(),
            };
            for _ in 0..SSE_PER_ROUND {
                let t = client(
                    &prefixes[i],
                    &format!(
                        "curl -sk {proxy} -o /dev/null -w '%{{time_starttransfer}}' {}",
                        sse_url(system)
                    ),
                )?;
                samples[i].sse_ms.push(t.trim().parse::<f64>().context("curl's time")? * 1000.0);
            }
            if through_wl(system) {
                wl_peak.after(&wl_pids, || format!("{}'s SSE runs of round {}", system.name, round + 1));
            }
        }
    }
    let mut rss: BTreeMap<&str, f64> = ["nginx", "wl", "wl+broker", "mitmproxy"]
        .into_iter()
        .map(|w| (w, peak_rss_mib(&pid_of(w))))
        .collect();
    rss.insert("wl start-up", startup_wl);
    let peak_note = wl_peak.largest(3);
    eprintln!("xtask bench compare: wl's peak RSS under load rose most in: {peak_note}");

    if !only.is_empty() {
        print_focused(&samples, &rss, only);
    }
    if !wanted(MANY) {
        return Ok(None);
    }
    // wl with 10,000 open keep-alive connections (its peak memory; requests rate-limited).
    reset_peak_rss(&pid_of("wl"));
    let transparent = &SYSTEMS[2];
    let prefix = client_prefix(dir, transparent, cgroup_dir)?;
    let watching = std::sync::atomic::AtomicBool::new(true);
    let (many, gauges) = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| watch_wl_gauges(&watching));
        // oha opens all its connections at once; at this machine's handshake rate the last
        // wait several seconds for theirs, past oha's default connect timeout of 5 s (a
        // timed-out connection is opened again, and its request counted as an error).
        let many = oha_run(
            oha,
            &prefix,
            transparent,
            &format!("-z 15s -c {MANY_CONNECTIONS} -q 4000 --connect-timeout 30s"),
        );
        watching.store(false, std::sync::atomic::Ordering::Relaxed);
        (many, watcher.join().unwrap_or_default())
    });
    let rss_many = peak_rss_mib(&pid_of("wl"));
    let many_note = match many {
        Ok(l) => format!(
            "{:.0} requests over 15 s; at most {:.0} requests in flight at once, {:.0} connections parked, {:.0} waiting for a handshake slot",
            l.requests, gauges.max_in_flight, gauges.max_parked, gauges.max_waiting
        ),
        Err(e) => format!("the run reported: {e}"),
    };

    if !only.is_empty() {
        println!("wl with {MANY_CONNECTIONS} open keep-alive connections: peak RSS {rss_many:.1} MiB ({many_note})");
        return Ok(None);
    }
    Ok(Some(report(&samples, &rss, &peak_note, rss_many, &many_note, oha)))
}

/// The highest values of wl's gauges seen during a run.
#[derive(Default)]
struct Gauges {
    max_in_flight: f64,
    max_parked: f64,
    max_waiting: f64,
}

/// Reads wl's metrics twice a second while `watching` holds.
fn watch_wl_gauges(watching: &std::sync::atomic::AtomicBool) -> Gauges {
    let mut g = Gauges::default();
    while watching.load(std::sync::atomic::Ordering::Relaxed) {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "1", &format!("http://{WL_METRICS}/metrics")])
            .output();
        let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0)
        };
        g.max_in_flight = g.max_in_flight.max(value("wl_requests_in_flight"));
        g.max_parked = g.max_parked.max(value("wl_connections_parked"));
        g.max_waiting = g.max_waiting.max(value("wl_connections_waiting"));
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    g
}

/// `--only`: the measured systems' medians, printed.
fn print_focused(samples: &[Samples], rss: &BTreeMap<&str, f64>, only: &[String]) {
    println!("| system | keep-alive req/s | p50 ms | p99 ms | 1 connection p50 ms | new connection p50 ms | CPU µs/request |");
    for (i, sys) in SYSTEMS.iter().enumerate() {
        if only.iter().any(|o| o == sys.name) {
            let a = summarize(&samples[i], 0..ROUNDS);
            println!(
                "| {} | {:.0} | {:.2} | {:.2} | {:.3} | {:.3} | {:.0} |",
                sys.name, a.rps, a.p50, a.p99, a.one_p50, a.new_p50, a.cpu_us
            );
        }
    }
    println!("peak RSS under load: {rss:?}");
}

/// Medians over a range of rounds.
struct Summary {
    rps: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    one_p50: f64,
    new_p50: f64,
    sse_ms: f64,
    cpu_us: f64,
}

fn summarize(s: &Samples, rounds: std::ops::Range<usize>) -> Summary {
    let pick = |v: &[Load], f: fn(&Load) -> f64| median(v[rounds.clone()].iter().map(f).collect());
    let per_round = SSE_PER_ROUND;
    Summary {
        rps: pick(&s.keep_alive, |l| l.rps),
        p50: pick(&s.keep_alive, |l| l.p50),
        p99: pick(&s.keep_alive, |l| l.p99),
        p999: pick(&s.keep_alive, |l| l.p999),
        one_p50: pick(&s.one, |l| l.p50),
        new_p50: pick(&s.new_conn, |l| l.p50),
        sse_ms: median(s.sse_ms[rounds.start * per_round..rounds.end * per_round].to_vec()),
        cpu_us: if s.cpu_us_per_request.is_empty() {
            f64::NAN
        } else {
            median(s.cpu_us_per_request[rounds].to_vec())
        },
    }
}

/// Each round's `f(a) / f(b)` (a ratio of runs seconds apart, steadier than a ratio of
/// two medians taken minutes apart), combined over `rounds` as a trimmed geometric mean.
fn paired_ratio(
    a: &Samples,
    b: &Samples,
    rounds: std::ops::Range<usize>,
    f: impl Fn(&Samples, usize) -> f64,
) -> f64 {
    trimmed_mean(rounds.map(|r| (f(a, r) / f(b, r)).ln()).collect()).exp()
}

/// Each round's `f(a) - f(b)`, combined over `rounds` as a trimmed mean.
fn paired_difference(
    a: &Samples,
    b: &Samples,
    rounds: std::ops::Range<usize>,
    f: impl Fn(&Samples, usize) -> f64,
) -> f64 {
    trimmed_mean(rounds.map(|r| f(a, r) - f(b, r)).collect())
}

/// The mean of `v` without its lowest and highest sixth: as robust as the median to a
/// round the machine disturbed, and with less spread of its own when none did (the
/// median of n values varies about as much as the mean of 0.64 n).
fn trimmed_mean(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let cut = v.len() / 6;
    let kept = &v[cut..v.len() - cut];
    kept.iter().sum::<f64>() / kept.len() as f64
}

fn rps(s: &Samples, round: usize) -> f64 {
    s.keep_alive[round].rps
}

fn one_p50(s: &Samples, round: usize) -> f64 {
    s.one[round].p50
}

fn new_p50(s: &Samples, round: usize) -> f64 {
    s.new_conn[round].p50
}

fn cpu(s: &Samples, round: usize) -> f64 {
    s.cpu_us_per_request[round]
}

fn report(
    samples: &[Samples],
    rss: &BTreeMap<&str, f64>,
    peak_note: &str,
    rss_many: f64,
    many_note: &str,
    oha: &Path,
) -> (String, String) {
    let all: Vec<Summary> = samples.iter().map(|s| summarize(s, 0..ROUNDS)).collect();
    let runs = [0..ROUNDS / 2, ROUNDS / 2..ROUNDS];
    let idx = |name: &str| SYSTEMS.iter().position(|s| s.name == name).expect("a system of the table");
    let (direct, nginx, wl, wl_cred, mitm) = (
        idx("direct"),
        idx("nginx proxy"),
        idx("wl transparent"),
        idx("wl transparent + credential"),
        idx("mitmproxy 11"),
    );
    let oha_version = Command::new(oha)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let tool_version = |cmd: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .output()
            .map(|o| {
                let t =
                    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
                t.lines().next().unwrap_or("").trim().to_string()
            })
            .unwrap_or_default()
    };
    // "Mitmproxy: 11.0.2" and "nginx version: nginx/1.22.1": the versions alone.
    let mitm_version =
        tool_version(&format!("{} --version", cache_dir().join("bench/mitmproxy/bin/mitmdump").display()))
            .rsplit(' ')
            .next()
            .unwrap_or_default()
            .to_string();
    let nginx_version = tool_version("nginx -v").rsplit('/').next().unwrap_or_default().to_string();

    let mut s = String::new();
    let _ = write!(
        s,
        "{COMPARISON_HEADING}\n\n{machine}\
         Command: `cargo xtask bench compare`. Upstream: nginx {nginx_version}, TLS, serving a 1.2 KB chat completion \
         (`/v1/chat/completions`) and a server-sent-events body (`/v1/sse`); the nginx proxy is a second nginx \
         process (its CPU and memory alone are the proxy's). Generator: {oha_version} \
         (`--insecure` for every system alike), pinned to CPU 0; proxies and upstream pinned to CPU 1. \
         mitmproxy {mitm_version}, regular mode. wl: release build, `observe`, audit trail on, the built-in \
         policies; \"+ credential\" adds a key from the broker (SCT issue and redeem) to every request. \
         {ROUNDS} rounds; in each, every system's keep-alive run, then every system's one-connection run, and so \
         on, in reverse order every other round; the table shows medians over the rounds. \
         Keep-alive: {CONNECTIONS} connections for {LOAD_SECONDS} s. One connection and new connection per \
         request: {SHORT_SECONDS} s each. SSE: curl's time to the first byte on a new connection. CPU: the \
         proxy's processes' user + system time over the keep-alive run divided by its requests. RSS: peak \
         (VmHWM) under load: reset (`clear_refs`) once every proxy is up, then the highest over all rounds. \
         {MANY_CONNECTIONS} connections: wl transparent, oha with {MANY_CONNECTIONS} connections opened at once, \
         4,000 requests/s in all for 15 s, connect timeout 30 s.\n\n\
         ![latency percentiles per system](docs/benchmarks-latency.svg)\n\n\
         | system | keep-alive req/s | p50 ms | p99 ms | p99.9 ms | 1 connection p50 ms | new connection p50 ms | SSE first byte ms | proxy CPU µs/request |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        machine = crate::bench::machine_description(),
    );
    for (i, sys) in SYSTEMS.iter().enumerate() {
        let a = &all[i];
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.3} | {:.3} | {:.2} | {} |",
            sys.name,
            a.rps,
            a.p50,
            a.p99,
            a.p999,
            a.one_p50,
            a.new_p50,
            a.sse_ms,
            if a.cpu_us.is_nan() { "-".to_string() } else { format!("{:.0}", a.cpu_us) }
        );
    }
    let _ = write!(s, "\nRatios of keep-alive throughput, per half of the run (rounds 1-{} and {}-{}):\n\n| system | to direct | | to nginx | |\n|---|---|---|---|---|\n", ROUNDS / 2, ROUNDS / 2 + 1, ROUNDS);
    let mut worst = (0.0_f64, "");
    let mut whole_run = serde_json::Map::new();
    for (i, sys) in SYSTEMS.iter().enumerate() {
        let r = |run: &std::ops::Range<usize>, base: usize| {
            paired_ratio(&samples[i], &samples[base], run.clone(), rps)
        };
        let (d1, d2) = (r(&runs[0], direct), r(&runs[1], direct));
        let (n1, n2) = (r(&runs[0], nginx), r(&runs[1], nginx));
        for (a, b) in [(d1, d2), (n1, n2)] {
            let differ = (a - b).abs() / a.max(b);
            if differ > worst.0 {
                worst = (differ, sys.name);
            }
        }
        let _ = writeln!(s, "| {} | {d1:.3} | {d2:.3} | {n1:.3} | {n2:.3} |", sys.name);
        whole_run
            .insert(sys.name.into(), serde_json::json!([r(&(0..ROUNDS), direct), r(&(0..ROUNDS), nginx)]));
    }
    let _ = writeln!(
        s,
        "\nThe two halves' ratios differ by at most {:.0}% ({}; six rounds each, so their spread is \
         larger than a whole run's).",
        worst.0 * 100.0,
        worst.1
    );
    let _ = writeln!(
        s,
        "{}\n",
        against_previous_run(&cache_dir().join("bench/compare-ratios.json"), whole_run, &commit())
    );
    let _ = write!(
        s,
        "Peak RSS under load: nginx {:.1} MiB, wl {:.1} MiB (broker {:.1} MiB more), mitmproxy {:.1} MiB. wl's peak rose most in these runs: {peak_note}. wl with {MANY_CONNECTIONS} open keep-alive connections: {rss_many:.1} MiB ({many_note}). wl's start-up peak, before any load: {:.1} MiB (aya parses the kernel's BTF while loading the eBPF programs; freed and returned once running).\n\n",
        rss["nginx"],
        rss["wl"],
        rss["wl+broker"] - rss["wl"],
        rss["mitmproxy"],
        rss["wl start-up"],
    );
    let met = |ok: bool| if ok { "met" } else { "not met" };
    // Each goal from the rounds paired: wl's run against its baseline's in the same round.
    let (w, c, n, d, m) =
        (&samples[wl], &samples[wl_cred], &samples[nginx], &samples[direct], &samples[mitm]);
    let every = || 0..ROUNDS;
    let (w_nginx, c_nginx) = (paired_ratio(w, n, every(), rps), paired_ratio(c, n, every(), rps));
    let (w_mitm, c_mitm) = (paired_ratio(w, m, every(), rps), paired_ratio(c, m, every(), rps));
    let one_added = paired_difference(w, d, every(), one_p50);
    let one_added_cred = paired_difference(c, d, every(), one_p50);
    let new_added = paired_difference(w, d, every(), new_p50);
    let cpu_ratio = paired_ratio(w, n, every(), cpu);
    let _ = write!(
        s,
        "Each goal below pairs the runs of one round (wl's against its baseline's, seconds apart) and takes the \
         mean over the {ROUNDS} rounds without the highest and lowest sixth (for ratios, of their logarithms).\n\n\
         | goal (wl transparent) | measured | |\n|---|---|---|\n\
         | keep-alive throughput ≥ 90% of nginx's | {:.0}% ({:.0}% with credential) | {} |\n\
         | keep-alive throughput ≥ 30x mitmproxy's | {:.1}x ({:.1}x with credential) | {} |\n\
         | one keep-alive connection: < 0.1 ms added at p50 | {:+.3} ms | {} |\n\
         | the same with credential injection: < 0.2 ms | {:+.3} ms | {} |\n\
         | new connection (leaf cached): < 0.3 ms added | {:+.3} ms | {} |\n\
         | peak RSS < 30 MiB at that load | {:.1} MiB | {} |\n\
         | peak RSS < 150 MiB with {MANY_CONNECTIONS} connections | {rss_many:.1} MiB | {} |\n\
         | proxy CPU per request ≤ nginx's + 50% | {:.2}x nginx's ({:.0} µs vs {:.0} µs, medians) | {} |\n",
        w_nginx * 100.0,
        c_nginx * 100.0,
        met(w_nginx >= 0.9),
        w_mitm,
        c_mitm,
        met(w_mitm >= 30.0),
        one_added,
        met(one_added < 0.1),
        one_added_cred,
        met(one_added_cred < 0.2),
        new_added,
        met(new_added < 0.3),
        rss["wl"],
        met(rss["wl"] < 30.0),
        met(rss_many < 150.0),
        cpu_ratio,
        all[wl].cpu_us,
        all[nginx].cpu_us,
        met(cpu_ratio <= 1.5),
    );
    (s, svg(&all))
}

/// Compares this run's whole-run ratios (to direct, to nginx, per system) with those of
/// the previous full `bench compare` on this machine, kept in the cache directory, and
/// keeps this run's for the next: the acceptance asks that two consecutive runs agree.
fn against_previous_run(
    path: &Path,
    ratios: serde_json::Map<String, serde_json::Value>,
    commit: &str,
) -> String {
    let previous: Option<serde_json::Value> =
        std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let now = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let current = serde_json::json!({ "when": now, "commit": commit, "ratios": ratios });
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::write(path, serde_json::to_vec_pretty(&current).unwrap_or_default());
    let Some(previous) = previous else {
        return "No earlier run on this machine to compare the whole run's ratios with.".into();
    };
    let mut worst = (0.0_f64, String::new());
    for (name, now_pair) in &ratios {
        let (Some(a), Some(b)) = (now_pair.as_array(), previous["ratios"][name].as_array()) else { continue };
        for (k, base) in ["direct", "nginx"].iter().enumerate() {
            let (Some(x), Some(y)) = (a.get(k).and_then(|v| v.as_f64()), b.get(k).and_then(|v| v.as_f64()))
            else {
                continue;
            };
            let differ = (x - y).abs() / x.max(y);
            if differ > worst.0 {
                worst = (differ, format!("{name} to {base}"));
            }
        }
    }
    let same = match previous["commit"].as_str() {
        Some(c) if c == commit => format!("commit {commit}, as this one"),
        Some(c) => format!("commit {c}, this one {commit}"),
        None => "commit not recorded".into(),
    };
    format!(
        "Against the previous run on this machine ({}, {same}), whole-run ratios differ by at most {:.0}% ({}; \
         goal: within 15%, {}).",
        previous["when"].as_str().unwrap_or("unknown time"),
        worst.0 * 100.0,
        worst.1,
        if worst.0 <= 0.15 { "met" } else { "not met" }
    )
}

/// The checked-out commit, `-dirty` when the code measured has uncommitted changes (not
/// BENCHMARKS.md, which a run itself rewrites): two runs agreeing only means something
/// for the same code.
fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(workspace_root())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let dirty =
        if git(&["status", "--porcelain", "--", "Cargo.toml", "Cargo.lock", "wl-daemon", "wl-ebpf", "xtask"])
            .is_empty()
        {
            ""
        } else {
            "-dirty"
        };
    format!("{}{dirty}", git(&["rev-parse", "--short", "HEAD"]))
}

/// Grouped bars of p50, p99 and p99.9 (keep-alive, log scale) per system.
fn svg(all: &[Summary]) -> String {
    let (w, h, left, top, bottom) = (900.0, 420.0, 70.0, 30.0, 90.0);
    let plot_h = h - top - bottom;
    let max = all.iter().map(|a| a.p999).filter(|v| v.is_finite()).fold(1.0_f64, f64::max);
    let (lo, hi) = (0.1_f64.log10(), (max * 1.5).log10());
    let y = |v: f64| top + plot_h * (1.0 - ((v.max(0.1)).log10() - lo) / (hi - lo));
    let group_w = (w - left - 20.0) / all.len() as f64;
    let colors = ["#4e79a7", "#f28e2b", "#e15759"];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"18\" font-size=\"14\">Keep-alive latency at {CONNECTIONS} connections (ms, log scale): p50, p99, p99.9</text>\n"
    );
    let mut tick = 0.1;
    while tick <= max * 1.5 {
        let ty = y(tick);
        let _ = writeln!(s, "<line x1=\"{left}\" x2=\"{}\" y1=\"{ty:.1}\" y2=\"{ty:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{tick}</text>", w - 20.0, left - 6.0, ty + 4.0);
        tick *= 10.0;
    }
    for (i, (a, sys)) in all.iter().zip(SYSTEMS.iter()).enumerate() {
        let x0 = left + i as f64 * group_w + group_w * 0.15;
        let bar = group_w * 0.7 / 3.0;
        for (j, v) in [a.p50, a.p99, a.p999].into_iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            let x = x0 + j as f64 * bar;
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{} {}: {v:.2} ms</title></rect>",
                y(v),
                bar - 2.0,
                (top + plot_h - y(v)).max(0.0),
                colors[j],
                sys.name,
                ["p50", "p99", "p99.9"][j]
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            x0 + group_w * 0.35,
            top + plot_h + 18.0,
            sys.name.replace('&', "&amp;")
        );
    }
    for (j, label) in ["p50", "p99", "p99.9"].iter().enumerate() {
        let x = left + j as f64 * 80.0;
        let _ = writeln!(s, "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{label}</text>", h - 30.0, colors[j], x + 16.0, h - 20.0);
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_largest_rises_of_the_peak_are_named_largest_first() {
        let mut peak = super::PeakRises::new(&[std::process::id()]);
        assert!(peak.last > 0.0, "this process has a peak of its own");
        assert_eq!(peak.largest(3), "no run raised it by half a MiB or more");
        // A run that touches 64 MiB more than the peak so far raises it by about that much.
        let before = peak.last;
        let ballast = vec![1u8; 64 << 20];
        peak.after(&[std::process::id()], || "the ballast run".into());
        assert!(ballast.iter().step_by(4096).all(|&b| b == 1));
        assert!(peak.last >= before + 60.0, "{} then {}", before, peak.last);
        peak.rises.push((2.0, "a small run".into()));
        peak.rises.push((0.6, "a smaller run".into()));
        let named = peak.largest(2);
        assert!(
            named.starts_with("+6") && named.contains("MiB in the ballast run, +2.0 MiB in a small run"),
            "{named}"
        );
        assert!(!named.contains("smaller"));
    }

    #[test]
    fn a_disturbed_round_moves_the_trimmed_mean_little() {
        let steady = vec![1.0, 1.1, 0.9, 1.0, 1.05, 0.95];
        assert!((super::trimmed_mean(steady.clone()) - 1.0).abs() < 1e-9);
        let mut disturbed = steady;
        disturbed[2] = 40.0;
        assert!((super::trimmed_mean(disturbed) - 1.0375).abs() < 1e-9);
        assert!(super::trimmed_mean(vec![f64::NAN]).is_nan());
    }

    #[test]
    fn a_run_is_compared_with_the_one_before() {
        let dir = std::env::temp_dir().join(format!("wl-xtask-ratios-{}", std::process::id()));
        let path = dir.join("compare-ratios.json");
        let ratios = |wl_to_nginx: f64| {
            let mut m = serde_json::Map::new();
            m.insert("wl transparent".into(), serde_json::json!([0.3, wl_to_nginx]));
            m
        };
        let first = super::against_previous_run(&path, ratios(0.8), "abc");
        assert!(first.starts_with("No earlier run"), "{first}");
        let second = super::against_previous_run(&path, ratios(0.6), "abc");
        assert!(second.contains("commit abc, as this one"), "{second}");
        assert!(
            second.contains("differ by at most 25% (wl transparent to nginx; goal: within 15%, not met)"),
            "{second}"
        );
        let third = super::against_previous_run(&path, ratios(0.55), "def");
        assert!(third.contains("commit abc, this one def"), "{third}");
        assert!(
            third.contains("differ by at most 8% (wl transparent to nginx; goal: within 15%, met)"),
            "{third}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
