//! `cargo xtask bench`: measurements against a baseline on the same machine in the same run,
//! alternating A B A B so that a noisy 2-core machine hits both alike. Results are written
//! to BENCHMARKS.md with the machine and the commands.
//!
//! - connect() latency on a port that is *not* intercepted, from a process in an intercepted
//!   cgroup vs. one in a cgroup with no programs: the cost every connect pays for the hook.
//! - bulk throughput through the splice path vs. direct, over loopback, and through nginx's
//!   TCP proxy (the stream module) as the bar a production proxy sets for the same hop.
//!
//! The measuring clients are this same binary (`cargo xtask bench-client ...`, hidden),
//! moved into the right cgroup before they start.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::workspace_root;

const ROUNDS: usize = 5;
const CONNECTS_PER_ROUND: usize = 2_000;
/// connect() rounds: many short ones, so that noise hits both sides alike.
const CONNECT_ROUNDS: usize = 20;
const BULK_BYTES: u64 = 1 << 30;

/// A cgroup for one benchmark, removed on drop.
struct Cgroup {
    name: String,
    dir: PathBuf,
}

impl Cgroup {
    fn new(tag: &str) -> anyhow::Result<Self> {
        let mount = cgroup2_mount()?;
        let name = format!("/wl-bench-{}-{tag}", std::process::id());
        let dir = mount.join(name.trim_start_matches('/'));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { name, dir })
    }

    /// Runs this binary's bench-client inside the cgroup and returns its stdout.
    fn run_client(&self, args: &[String]) -> anyhow::Result<String> {
        let exe = std::env::current_exe()?;
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("echo $$ > {}/cgroup.procs && exec \"$@\"", self.dir.display()))
            .arg("sh")
            .arg(exe)
            .arg("bench-client")
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("bench client failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    text.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mp = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mp))
        })
        .context("no cgroup2 mount")
}

/// A release wl-daemon for the benchmark, stopped on drop.
struct Daemon {
    child: Child,
    _dir: PathBuf,
}

impl Daemon {
    /// A daemon intercepting `ports` for `cgroup`; `kernel_relay` as `intercept.kernel_relay`.
    fn start(cgroup: &str, ports: &[u16], kernel_relay: bool) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "wl-bench-{}-{}",
            std::process::id(),
            cgroup.trim_start_matches('/')
        ));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("wl.toml");
        let ports = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
        std::fs::write(
            &config,
            format!(
                "state_dir = {state:?}\n[intercept]\ncgroups = [{cgroup:?}]\nports = [{ports}]\n\
                 listen = [\"127.0.0.1:0\", \"[::1]:0\"]\nkernel_relay = {kernel_relay}\n[audit]\npath = {audit:?}\n",
                state = dir.join("state").display().to_string(),
                audit = dir.join("audit.jsonl").display().to_string(),
            ),
        )?;
        let bin = workspace_root().join("target/release/wl-daemon");
        let mut child = Command::new(&bin)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("WL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        // Ready once the programs are attached: poll bpftool for them.
        let deadline = Instant::now() + Duration::from_secs(20);
        let cg_dir = cgroup2_mount()?.join(cgroup.trim_start_matches('/'));
        loop {
            let out = Command::new("bpftool").args(["cgroup", "show"]).arg(&cg_dir).output()?;
            if String::from_utf8_lossy(&out.stdout).contains("wl_connect4") {
                break;
            }
            if let Some(status) = child.try_wait()? {
                let mut err = String::new();
                child.stderr.take().unwrap().read_to_string(&mut err)?;
                bail!("wl-daemon exited with {status}: {err}");
            }
            if Instant::now() > deadline {
                bail!("wl-daemon did not attach within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { child, _dir: dir })
    }
}

impl Daemon {
    /// The share of the agents' bytes to their upstreams that the kernel relay carried,
    /// from the connection records written so far (`bytes_up_kernel` / `bytes_up`).
    fn kernel_relayed_share(&self) -> anyhow::Result<f64> {
        let text = std::fs::read_to_string(self._dir.join("audit.jsonl"))?;
        let (mut kernel, mut all) = (0u64, 0u64);
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)?;
            if v["kind"] == "connection" {
                kernel += v["bytes_up_kernel"].as_u64().unwrap_or(0);
                all += v["bytes_up"].as_u64().unwrap_or(0);
            }
        }
        Ok(if all == 0 { 0.0 } else { kernel as f64 / all as f64 })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = nix_pid(self.child.id());
        let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

fn nix_pid(pid: u32) -> i32 {
    pid as i32
}

/// Accepts connections and closes them at once: the far end for the connect() benchmark.
fn accept_server() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.2:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    Ok(addr)
}

/// Serves each connection to a fresh loopback listener with `handler`, on a thread of its
/// own, until the process exits; returns the address.
fn serve_each(handler: fn(TcpStream)) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.2:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || handler(stream));
        }
    });
    Ok(addr)
}

/// Drains each connection, answering with the byte count it received: the far end of the
/// upload measurement.
fn sink_server() -> anyhow::Result<SocketAddr> {
    serve_each(|mut stream| {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        let _ = stream.write_all(&total.to_le_bytes());
    })
}

/// Answers each connection with as many bytes as its first 8 (a little-endian count) ask
/// for, written 256 KiB at a time, then closes: the far end of the download measurement.
fn source_server() -> anyhow::Result<SocketAddr> {
    serve_each(|mut stream| {
        let mut want = [0u8; 8];
        if stream.read_exact(&mut want).is_err() {
            return;
        }
        let total = u64::from_le_bytes(want);
        let buf = vec![0xa5u8; 256 * 1024];
        let mut sent = 0u64;
        while sent < total {
            let n = (total - sent).min(buf.len() as u64) as usize;
            if stream.write_all(&buf[..n]).is_err() {
                return;
            }
            sent += n as u64;
        }
    })
}

/// nginx as a plain TCP proxy (stream module) in front of `sink`: the process, its address
/// and its scratch directory.
fn nginx_stream(sink: SocketAddr) -> anyhow::Result<(crate::bench_tls::Proc, SocketAddr, PathBuf)> {
    let dir = std::env::temp_dir().join(format!("wl-bench-stream-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let addr: SocketAddr = {
        let l = TcpListener::bind("127.0.0.3:0")?;
        l.local_addr()?
    };
    let d = dir.display();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "load_module {module};\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             daemon off;\nevents {{ worker_connections 64; }}\n\
             stream {{ server {{ listen {addr}; proxy_pass {sink}; proxy_half_close on; \
             proxy_buffer_size 256k; }} }}\n",
            module = crate::bench_tls::NGINX_STREAM_MODULE,
        ),
    )?;
    let child = Command::new("nginx")
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stderr(Stdio::null())
        .spawn()
        .context("starting nginx (stream proxy)")?;
    let proc = crate::bench_tls::Proc(child);
    crate::bench_tls::wait_port(&addr.to_string())?;
    Ok((proc, addr, dir))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// `cargo xtask bench`.
pub fn run(write: bool) -> anyhow::Result<()> {
    require_root()?;
    let hooked = Cgroup::new("hooked")?;
    let bare = Cgroup::new("bare")?;
    let report = foundation(&hooked, &bare)?;
    println!("{report}");

    // 3. Cedar evaluation per request.
    let policy_report = crate::bench_tls::policy_eval()?;
    println!("{policy_report}");

    // 4. The secrets broker's round trip.
    let broker_report = crate::bench_tls::broker_round_trip()?;
    println!("{broker_report}");

    // 5. The audit trail.
    let audit_report = crate::bench_tls::audit_trail()?;
    println!("{audit_report}");

    // 6. The Criterion microbenchmarks of the hot pieces.
    let micro = crate::bench_micro::run()?;
    let micro_report = crate::bench_micro::report(&micro);
    println!("{micro_report}");
    let mint = crate::bench_micro::leaf_summary(&micro);

    // 7. TLS interception against direct and nginx.
    let scratch = crate::bench_tls::scratch()?;
    let tls = crate::bench_tls::run(&scratch, &hooked.dir, &hooked.name);
    let _ = std::fs::remove_dir_all(&scratch);
    let tls_report = crate::bench_tls::report(&tls?, &mint);
    println!("{tls_report}");

    if write {
        let path = workspace_root().join("BENCHMARKS.md");
        let header =
            "# Benchmarks\n\nNumbers from `cargo xtask bench` and `cargo xtask bench compare` on this \
                      project's machines; every comparison is measured in the same run on the same machine, \
                      alternating the sides.\n\n";
        // `bench compare` owns its own section: keep it.
        let kept = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| section(&text, crate::bench_compare::COMPARISON_HEADING).map(str::to_owned))
            .unwrap_or_default();
        std::fs::write(
            &path,
            format!(
                "{header}{kept}{report}\n{tls_report}\n{policy_report}\n{broker_report}\n{audit_report}\n{micro_report}"
            ),
        )?;
        eprintln!("xtask bench: wrote {}", path.display());
    }
    Ok(())
}

/// `cargo xtask bench foundation`: only the connect() and splice measurements, written
/// into their section of BENCHMARKS.md.
pub fn foundation_only(write: bool) -> anyhow::Result<()> {
    require_root()?;
    let hooked = Cgroup::new("hooked")?;
    let bare = Cgroup::new("bare")?;
    let report = foundation(&hooked, &bare)?;
    println!("{report}");
    if write {
        write_section(FOUNDATION_HEADING, &report)?;
        eprintln!("xtask bench foundation: wrote its section of BENCHMARKS.md");
    }
    Ok(())
}

const FOUNDATION_HEADING: &str = "## Foundation: connect() hook cost and splice throughput";

fn require_root() -> anyhow::Result<()> {
    if !Path::new("/proc/self").exists() || !nix_is_root() {
        bail!("the benchmarks attach eBPF programs: run `cargo xtask bench` as root");
    }
    Ok(())
}

/// Sections 1 and 2: connect() with and without the hook, bulk through the splice path,
/// direct and through nginx. `hooked` gets the daemon, `bare` stays without programs.
/// `CONNECT_ROUNDS` alternating runs of one client in the hooked and the bare cgroup:
/// (median with the hook, median without, median of the paired differences).
fn paired_rounds(hooked: &Cgroup, bare: &Cgroup, args: &[String]) -> anyhow::Result<(f64, f64, f64)> {
    let (mut with_hook, mut without, mut diffs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..CONNECT_ROUNDS {
        let h = hooked.run_client(args)?.trim().parse::<f64>()?;
        let b = bare.run_client(args)?.trim().parse::<f64>()?;
        with_hook.push(h);
        without.push(b);
        diffs.push(h - b);
    }
    Ok((median(&mut with_hook), median(&mut without), median(&mut diffs)))
}

fn foundation(hooked: &Cgroup, bare: &Cgroup) -> anyhow::Result<String> {
    let sink = sink_server()?;
    let source = source_server()?;
    let plain_ports = [sink.port(), source.port()];

    // 1. connect() on a non-intercepted port: hook vs no hook.
    let intercepted_port = {
        let l = TcpListener::bind("127.0.0.2:0")?;
        l.local_addr()?.port()
    };
    let daemon = Daemon::start(&hooked.name, &[intercepted_port], true)?;
    let acceptor = accept_server()?;
    let connect_args = vec!["connect".to_string(), acceptor.to_string(), CONNECTS_PER_ROUND.to_string()];
    let (connect_hook, connect_bare, added_ns) = paired_rounds(hooked, bare, &connect_args)?;
    // 1b. setsockopt(): the kernel relay's setsockopt program runs on every call in the
    // intercepted cgroups (no target; reported so that its cost is known).
    let sockopt_args = vec!["setsockopt".to_string(), acceptor.to_string(), CONNECTS_PER_ROUND.to_string()];
    let (sockopt_hook, sockopt_bare, sockopt_added_ns) = paired_rounds(hooked, bare, &sockopt_args)?;
    drop(daemon);

    // 2. Bulk throughput: through the splice path vs direct vs nginx's TCP proxy.
    crate::bench_tls::tools()?;
    let (_nginx, nginx_addr, nginx_dir) = nginx_stream(sink)?;
    let daemon = Daemon::start(&hooked.name, &plain_ports, true)?;
    // The same path with the kernel relay off: every byte through the daemon's splice(2).
    let daemon_only = Cgroup::new("splice")?;
    let daemon_only_wl = Daemon::start(&daemon_only.name, &plain_ports, false)?;
    let bulk_args = vec!["bulk".to_string(), sink.to_string(), BULK_BYTES.to_string()];
    let nginx_args = vec!["bulk".to_string(), nginx_addr.to_string(), BULK_BYTES.to_string()];
    let download_args = vec!["download".to_string(), source.to_string(), BULK_BYTES.to_string()];
    let (mut spliced, mut unrelayed, mut direct, mut proxied) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut down_wl, mut down_unrelayed, mut down_direct) = (Vec::new(), Vec::new(), Vec::new());
    let run =
        |cg: &Cgroup, args: &[String]| -> anyhow::Result<f64> { Ok(cg.run_client(args)?.trim().parse()?) };
    for _ in 0..ROUNDS {
        spliced.push(run(hooked, &bulk_args)?);
        direct.push(run(bare, &bulk_args)?);
        unrelayed.push(run(&daemon_only, &bulk_args)?);
        proxied.push(run(bare, &nginx_args)?);
        down_wl.push(run(hooked, &download_args)?);
        down_direct.push(run(bare, &download_args)?);
        down_unrelayed.push(run(&daemon_only, &download_args)?);
    }
    drop(daemon_only_wl);
    // Connection records are written when connections end: give the last one a moment.
    std::thread::sleep(Duration::from_millis(500));
    let kernel_share = daemon.kernel_relayed_share()?;
    drop(daemon);
    drop(_nginx);
    let _ = std::fs::remove_dir_all(&nginx_dir);
    let (bulk_spliced, bulk_unrelayed, bulk_direct, bulk_nginx) =
        (median(&mut spliced), median(&mut unrelayed), median(&mut direct), median(&mut proxied));
    let (down_wl, down_unrelayed, down_direct) =
        (median(&mut down_wl), median(&mut down_unrelayed), median(&mut down_direct));

    let ratio = bulk_spliced / bulk_direct;
    Ok(format!(
        "{FOUNDATION_HEADING}\n\n\
         {machine}\n\
         Command: `cargo xtask bench` or `cargo xtask bench foundation` (release build). connect() and setsockopt(): {CONNECT_ROUNDS} alternating rounds of \
         {CONNECTS_PER_ROUND} calls, median per round, result = median of the paired differences. \
         Bulk: {ROUNDS} rounds in turns (uploads: wl, direct, wl with `kernel_relay = false`, nginx; then \
         downloads: wl, direct, wl without the relay), medians; each side writes and reads 256 KiB at a \
         time; nothing pinned. With the kernel relay (the default) the audit records say it carried \
         {kernel_pct:.1}% of the uploaded bytes; the rest (the start of each transfer) went through the \
         daemon's splice(2), as every downloaded byte does. nginx 1.22 stream module: \
         `proxy_pass` to the sink with `proxy_half_close on` and `proxy_buffer_size 256k`, one worker.\n\n\
         | measurement | with wl | baseline | result | target |\n|---|---|---|---|---|\n\
         | connect() to a non-intercepted port, per call | {connect_hook:.0} ns (intercepted cgroup) | {connect_bare:.0} ns (cgroup without programs) | {added:+.2} µs added | < 2 µs added: {c_ok} |\n\
         | setsockopt(TCP_NODELAY), per call (the kernel relay's setsockopt program) | {sockopt_hook:.0} ns (intercepted cgroup) | {sockopt_bare:.0} ns (cgroup without programs) | {sockopt_added:+.0} ns added | |\n\
         | bulk upload, {gib} GiB agent to upstream over loopback | {bulk_spliced:.2} Gbit/s (splice path) | {bulk_direct:.2} Gbit/s (direct) | {pct:.0}% of direct | ≥ 80%: {b_ok} |\n\
         | the same with `kernel_relay = false` (daemon's splice(2) only) | {bulk_unrelayed:.2} Gbit/s | | {unrelayed_pct:.0}% of direct | |\n\
         | the same through nginx's TCP proxy | | {bulk_nginx:.2} Gbit/s (nginx stream) | {nginx_pct:.0}% of direct; wl {vs_nginx:.2}x nginx | |\n\
         | bulk download, {gib} GiB the other way (upstream to agent: splice(2) in the daemon, relay or not) | {down_wl:.2} Gbit/s | {down_direct:.2} Gbit/s (direct) | {down_pct:.0}% of direct | ≥ 80%: {d_ok} |\n\
         | the same with `kernel_relay = false` | {down_unrelayed:.2} Gbit/s | | {down_unrelayed_pct:.0}% of direct | |\n",
        machine = machine_description(),
        added = added_ns / 1000.0,
        sockopt_added = sockopt_added_ns,
        c_ok = if added_ns < 2000.0 { "met" } else { "not met" },
        gib = BULK_BYTES >> 30,
        pct = ratio * 100.0,
        b_ok = if ratio >= 0.8 { "met" } else { "not met" },
        nginx_pct = bulk_nginx / bulk_direct * 100.0,
        unrelayed_pct = bulk_unrelayed / bulk_direct * 100.0,
        kernel_pct = kernel_share * 100.0,
        down_pct = down_wl / down_direct * 100.0,
        d_ok = if down_wl / down_direct >= 0.8 { "met" } else { "not met" },
        down_unrelayed_pct = down_unrelayed / down_direct * 100.0,
        vs_nginx = bulk_spliced / bulk_nginx,
    ))
}

/// The section of `text` that starts with `heading`, up to the next `## ` heading.
fn section<'a>(text: &'a str, heading: &str) -> Option<&'a str> {
    let start = text.find(heading)?;
    let rest = &text[start + heading.len()..];
    let end = rest.find("\n## ").map_or(text.len(), |i| start + heading.len() + i + 1);
    Some(&text[start..end])
}

/// Puts `body` (which starts with `heading`) into BENCHMARKS.md in place of the section
/// with that heading, or after the file's header when there is none.
pub fn write_section(heading: &str, body: &str) -> anyhow::Result<()> {
    let path = workspace_root().join("BENCHMARKS.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n\n".into());
    let body = format!("{}\n", body.trim_end());
    let new = match section(&text, heading) {
        Some(old) => text.replacen(old, &format!("{body}\n"), 1),
        None => match text.find("\n## ") {
            Some(i) => format!("{}\n{body}\n{}", &text[..i], &text[i + 1..]),
            None => format!("{text}\n{body}"),
        },
    };
    std::fs::write(&path, new)?;
    Ok(())
}

/// `cargo xtask bench compare` (see `bench_compare.rs`), with an intercepted cgroup.
pub fn compare(write: bool, only: &[String]) -> anyhow::Result<()> {
    if !nix_is_root() {
        bail!("the comparison attaches eBPF programs: run `cargo xtask bench compare` as root");
    }
    let hooked = Cgroup::new("compare")?;
    crate::bench_compare::run(write, only, &hooked.dir, &hooked.name)
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Uid:").map(|v| v.split_whitespace().nth(1) == Some("0")))
        })
        .unwrap_or(false)
}

/// The machine, for every report.
pub fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<u64>().unwrap_or(0))
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_owned()))
        })
        .unwrap_or_default();
    format!(
        "Machine: {cpu}, {cores} cores, {:.0} GiB RAM, {os}, kernel {}.\n",
        mem as f64 / 1024.0 / 1024.0,
        kernel.trim()
    )
}

/// The hidden `bench-client` subcommand: runs inside a cgroup, prints one number.
pub fn client(args: &[String]) -> anyhow::Result<()> {
    match args {
        [mode, addr, n] if mode == "connect" => {
            let addr: SocketAddr = addr.parse()?;
            let n: usize = n.parse()?;
            let mut samples = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                let s = TcpStream::connect(addr)?;
                samples.push(t.elapsed().as_nanos() as f64);
                // Reset instead of TIME_WAIT, so that rounds never run out of ports.
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                drop(s);
            }
            println!("{}", median(&mut samples));
        }
        [mode, addr, n] if mode == "setsockopt" => {
            let addr: SocketAddr = addr.parse()?;
            let n: usize = n.parse()?;
            let s = TcpStream::connect(addr)?;
            let sock = socket2::SockRef::from(&s);
            let mut samples = Vec::with_capacity(n);
            for i in 0..n {
                let t = Instant::now();
                sock.set_tcp_nodelay(i % 2 == 0)?;
                samples.push(t.elapsed().as_nanos() as f64);
            }
            println!("{}", median(&mut samples));
        }
        [mode, addr, bytes] if mode == "bulk" => {
            let addr: SocketAddr = addr.parse()?;
            let total: u64 = bytes.parse()?;
            let buf = vec![0x5au8; 256 * 1024];
            let mut s = TcpStream::connect(addr)?;
            let t = Instant::now();
            let mut sent = 0u64;
            while sent < total {
                let n = (total - sent).min(buf.len() as u64) as usize;
                s.write_all(&buf[..n])?;
                sent += n as u64;
            }
            s.shutdown(std::net::Shutdown::Write)?;
            let mut ack = [0u8; 8];
            s.read_exact(&mut ack)?;
            let secs = t.elapsed().as_secs_f64();
            if u64::from_le_bytes(ack) != total {
                bail!("sink received {} of {total} bytes", u64::from_le_bytes(ack));
            }
            println!("{}", total as f64 * 8.0 / secs / 1e9);
        }
        [mode, addr, bytes] if mode == "download" => {
            let addr: SocketAddr = addr.parse()?;
            let total: u64 = bytes.parse()?;
            let mut buf = vec![0u8; 256 * 1024];
            let mut s = TcpStream::connect(addr)?;
            let t = Instant::now();
            s.write_all(&total.to_le_bytes())?;
            let mut got = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            let secs = t.elapsed().as_secs_f64();
            if got != total {
                bail!("received {got} of {total} bytes");
            }
            println!("{}", total as f64 * 8.0 / secs / 1e9);
        }
        _ => bail!(
            "usage: bench-client connect ADDR N | setsockopt ADDR N | bulk ADDR BYTES | download ADDR BYTES"
        ),
    }
    Ok(())
}
