//! The end-to-end harness: real wl binaries, real cgroups, real clients, loopback servers.
//!
//! Every test that uses it needs root and working eBPF (CI here has both); without them it
//! fails with a message saying so, it never skips. Everything a test creates (cgroups,
//! daemons, servers, pinned objects, files) is removed by `Drop`, also when the test fails.

pub mod agents;
pub mod clients;
pub mod machine;
pub mod pki;
pub mod servers;

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde_json::Value;

/// How long a daemon may take to report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this test process and call, for cgroups and pin directories.
pub fn unique(tag: &str) -> String {
    format!("wl-e2e-{}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed), tag)
}

/// Panics unless running as root: the end-to-end tests attach real eBPF programs.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "end-to-end tests load eBPF programs and create cgroups: run `cargo xtask test` as root"
    );
}

/// A built binary of the workspace (`WL_BIN_DIR`, set by `cargo xtask test`, or target/debug).
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("WL_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: build first (cargo xtask test does)", path.display());
    path
}

/// The test clients' cache (the Python virtualenv made by `cargo xtask setup`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("WL_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/wl")))
        .expect("WL_CACHE_DIR or HOME")
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> PathBuf {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    text.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .expect("a cgroup2 mount")
}

/// A free TCP port on `ip` (bound and released; good enough for tests).
pub fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0)).expect("bind an ephemeral port").local_addr().unwrap().port()
}

/// A cgroup made for one test, removed (with any process left in it) on drop.
#[derive(Debug)]
pub struct TestCgroup {
    /// Path relative to the cgroup2 mount, as the config names it (`/wl-e2e-...`).
    pub name: String,
    /// Absolute directory.
    pub dir: PathBuf,
}

impl TestCgroup {
    /// Creates `/<unique>` under the cgroup2 mount.
    pub fn new(tag: &str) -> Self {
        require_root();
        let name = format!("/{}", unique(tag));
        let dir = cgroup2_mount().join(name.trim_start_matches('/'));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
        Self { name, dir }
    }

    /// A command that runs `program` inside this cgroup (it moves itself in, then execs).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("echo $$ > {}/cgroup.procs && exec \"$@\"", self.dir.display()))
            .arg("sh")
            .arg(program);
        cmd
    }

    /// Programs attached to this cgroup, as `bpftool cgroup show` lists them.
    pub fn attached_programs(&self) -> Vec<String> {
        let out = Command::new("bpftool").args(["cgroup", "show"]).arg(&self.dir).output().expect("bpftool");
        assert!(out.status.success(), "bpftool failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.trim_start().chars().next().is_some_and(|c| c.is_ascii_digit()))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What a test daemon's configuration says; rendered to TOML by [`Daemon::start`].
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// `mode`.
    pub mode: &'static str,
    /// `intercept.cgroups`.
    pub cgroups: Vec<String>,
    /// `intercept.ports`.
    pub ports: Vec<u16>,
    /// `intercept.listen`.
    pub listen: Vec<String>,
    /// `intercept.block_quic`.
    pub block_quic: bool,
    /// `intercept.fail`.
    pub fail: &'static str,
    /// `intercept.exclude`.
    pub exclude: Vec<String>,
    /// `intercept.kernel_relay`.
    pub kernel_relay: bool,
    /// Extra lines inside `[policy]`.
    pub policy: String,
    /// `audit.path`, when not the home's `audit.jsonl`.
    pub audit_path: Option<PathBuf>,
    /// Extra lines inside `[broker]` (socket, audit and policy_dir are set in the home).
    pub broker: String,
    /// Appended verbatim.
    pub extra: String,
}

impl DaemonConfig {
    /// Intercepts `ports` for `cgroup`, with ephemeral loopback listeners.
    pub fn new(cgroup: &TestCgroup, ports: &[u16]) -> Self {
        Self {
            mode: "observe",
            cgroups: vec![cgroup.name.clone()],
            ports: ports.to_vec(),
            listen: vec!["127.0.0.1:0".into(), "[::1]:0".into()],
            block_quic: true,
            fail: "open",
            exclude: Vec::new(),
            kernel_relay: true,
            policy: String::new(),
            audit_path: None,
            broker: String::new(),
            extra: String::new(),
        }
    }

    fn render(&self, dir: &Path, pin_dir: &Path) -> String {
        let list = |v: &[String]| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
        format!(
            "mode = {mode:?}\nstate_dir = {state:?}\nadmin_socket = {admin:?}\n\n[intercept]\ncgroups = [{cgroups}]\nports = [{ports}]\n\
             listen = [{listen}]\nexclude = [{exclude}]\nblock_quic = {quic}\nfail = {fail:?}\npin_dir = {pin:?}\nkernel_relay = {relay}\n\n\
             [audit]\npath = {audit:?}\n\n[broker]\n{broker_socket}state_dir = {broker_state:?}\naudit = {broker_audit:?}\n\
             policy_dir = {broker_policies:?}\n{broker}\n\n[policy]\ndir = {policies:?}\n{policy}\n{extra}\n",
            mode = self.mode,
            state = dir.join("state").display().to_string(),
            admin = dir.join("admin.sock").display().to_string(),
            cgroups = list(&self.cgroups),
            ports = self.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", "),
            listen = list(&self.listen),
            exclude = list(&self.exclude),
            quic = self.block_quic,
            relay = self.kernel_relay,
            fail = self.fail,
            pin = pin_dir.display().to_string(),
            audit = self.audit_path.clone().unwrap_or_else(|| dir.join("audit.jsonl")).display().to_string(),
            policies = dir.join("policies").display().to_string(),
            broker_socket = if self.broker.contains("socket =") {
                String::new()
            } else {
                format!("socket = {:?}\n", dir.join("broker.sock").display().to_string())
            },
            broker_audit = dir.join("broker-audit.jsonl").display().to_string(),
            broker_state = dir.join("state/broker").display().to_string(),
            broker_policies = dir.join("broker-policies").display().to_string(),
            broker = self.broker,
            policy = self.policy,
            extra = self.extra,
        )
    }
}

/// Where a daemon keeps its files; outlives restarts of the daemon.
#[derive(Debug)]
pub struct DaemonHome {
    /// Temporary directory with config, state and audit log.
    pub dir: tempfile::TempDir,
    /// bpffs pin directory, removed on drop.
    pub pin_dir: PathBuf,
}

impl DaemonHome {
    /// A fresh home.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("wl-e2e-").tempdir().expect("tempdir");
        Self { dir, pin_dir: PathBuf::from("/sys/fs/bpf").join(unique("pins")) }
    }

    /// Writes the configuration file and returns its path.
    pub fn write_config(&self, cfg: &DaemonConfig) -> PathBuf {
        let path = self.dir.path().join("wl.toml");
        std::fs::write(&path, cfg.render(self.dir.path(), &self.pin_dir)).expect("write config");
        path
    }

    /// The policy directory the daemon reads (absent until a test writes policies; the
    /// built-in policies apply until then).
    pub fn policy_dir(&self) -> PathBuf {
        self.dir.path().join("policies")
    }

    /// Writes (atomically: write, then rename) one policy file.
    pub fn write_policy(&self, name: &str, text: &str) {
        let dir = self.policy_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }

    /// The broker's socket (unless a test's `[broker]` lines move it).
    pub fn broker_socket(&self) -> PathBuf {
        self.dir.path().join("broker.sock")
    }

    /// The broker's audit records so far.
    pub fn broker_audit_records(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.path().join("broker-audit.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad audit line {l:?}: {e}")))
            .collect()
    }

    /// The audit log path.
    pub fn audit_path(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    /// All audit records so far.
    pub fn audit_records(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.audit_path()).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad audit line {l:?}: {e}")))
            .collect()
    }

    /// Waits (up to 10 s) for an audit record matching `pred`.
    pub fn wait_audit(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = self.audit_records().into_iter().find(|r| pred(r)) {
                return v;
            }
            assert!(Instant::now() < deadline, "no audit record {what}; have: {:#?}", self.audit_records());
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Default for DaemonHome {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for DaemonHome {
    fn drop(&mut self) {
        // Unpinning detaches whatever a fail = "closed" daemon left attached.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// A running `wl-daemon run`, stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts the daemon with `cfg` in `home` and waits until it reports ready.
    pub fn start(home: &DaemonHome, cfg: &DaemonConfig) -> Self {
        Self::start_in(home, cfg, None)
    }

    /// Like [`Daemon::start`], with the daemon itself running inside `cgroup` when given.
    pub fn start_in(home: &DaemonHome, cfg: &DaemonConfig, cgroup: Option<&TestCgroup>) -> Self {
        let cmd = match cgroup {
            Some(cg) => cg.command(bin("wl-daemon")),
            None => Command::new(bin("wl-daemon")),
        };
        Self::start_cmd(home, cfg, cmd)
    }

    /// Like [`Daemon::start`], with `cmd` (which runs `wl-daemon` or wraps it and appends
    /// its arguments) as the command line.
    pub fn start_cmd(home: &DaemonHome, cfg: &DaemonConfig, cmd: Command) -> Self {
        Self::spawn(home, cfg, cmd, "run", "wl-daemon ready")
    }

    /// Starts the secrets broker (`wl-daemon broker`) with `cfg` in `home` and waits until
    /// it reports ready. The same type: it is a process of ours with a log, stopped on drop.
    pub fn start_broker(home: &DaemonHome, cfg: &DaemonConfig) -> Self {
        Self::start_broker_cmd(home, cfg, Command::new(bin("wl-daemon")))
    }

    /// Like [`Daemon::start_broker`], with `cmd` as the command line (as in
    /// [`Daemon::start_cmd`]).
    pub fn start_broker_cmd(home: &DaemonHome, cfg: &DaemonConfig, cmd: Command) -> Self {
        Self::spawn(home, cfg, cmd, "broker", "wl-broker ready")
    }

    fn spawn(
        home: &DaemonHome,
        cfg: &DaemonConfig,
        mut cmd: Command,
        sub: &str,
        ready: &'static str,
    ) -> Self {
        require_root();
        let config = home.write_config(cfg);
        cmd.arg(sub).arg("--config").arg(&config);
        cmd.env("WL_LOG", "info,wl_kernel=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn wl-daemon");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains(ready) {
                        let _ = ready_tx.send(());
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let mut daemon = Daemon { child: Some(child), log };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if ready_rx.recv_timeout(Duration::from_millis(50)).is_ok() {
                return daemon;
            }
            if let Some(status) = daemon.child.as_mut().unwrap().try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                panic!("wl-daemon exited with {status} before ready:\n{}", daemon.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "wl-daemon not ready after {READY_TIMEOUT:?}:\n{}",
                daemon.log_text()
            );
        }
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Everything the daemon logged so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits (up to 10 s) for a log line containing `needle`.
    pub fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(Instant::now() < deadline, "no log line with {needle:?}:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Sends SIGHUP (reload policies).
    pub fn signal_hup(&self) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    }

    /// SIGKILL (a crash), then waits for it to be gone.
    pub fn kill9(mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM, then waits for the exit status.
    pub fn stop(mut self) -> ExitStatus {
        self.terminate()
    }

    /// SIGTERM; panics with the daemon's log unless it exits 0.
    pub fn stop_ok(mut self) {
        let status = self.terminate();
        std::thread::sleep(Duration::from_millis(50));
        assert!(status.success(), "wl-daemon exited with {status}:\n{}", self.log_text());
    }

    fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.terminate();
        }
    }
}

/// Runs `wl-daemon run --config` on a configuration expected to be refused; returns the
/// exit status and stderr.
pub fn run_refused(cmd: &mut Command) -> (ExitStatus, String) {
    let out = cmd.env("NO_COLOR", "1").stdin(Stdio::null()).output().expect("run wl-daemon");
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The pid owning the TCP socket whose local address is `local` (via `ss -p`).
pub fn socket_owner(local: SocketAddr) -> Option<u32> {
    let out = Command::new("ss").args(["-Htanp", "src"]).arg(local.to_string()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find("pid=")? + 4;
    text[start..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}
