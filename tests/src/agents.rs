//! Agents as users run them: no proxy settings, no base URL, trusting the beacon CA only
//! through their own mount-namespace view of the system trust store, and resolving API
//! names through their own view of `/etc/hosts`. The machine's files stay untouched.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use serde_json::Value;

use crate::{cache_dir, servers::fixtures, TestCgroup};

/// The system trust store path inside the agent's view.
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// An agent's view: its `/etc/hosts` and system trust bundle.
#[derive(Debug)]
pub struct AgentView {
    hosts: PathBuf,
    bundle: PathBuf,
}

impl AgentView {
    /// Maps `names` (name, ip) in the hosts file; the bundle is the machine's plus `trust`.
    pub fn new(dir: &Path, names: &[(&str, &str)], trust: &[&Path]) -> Self {
        let tag = crate::unique("view");
        let hosts = dir.join(format!("{tag}-hosts"));
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for (name, ip) in names {
            text.push_str(&format!("{ip} {name}\n"));
        }
        std::fs::write(&hosts, text).unwrap();
        let bundle = dir.join(format!("{tag}-bundle.pem"));
        let mut pem = std::fs::read_to_string(SYSTEM_BUNDLE).unwrap_or_default();
        for t in trust {
            pem.push_str(&std::fs::read_to_string(t).unwrap());
        }
        std::fs::write(&bundle, pem).unwrap();
        Self { hosts, bundle }
    }

    /// `program` run inside this view (and inside `cg` when given), with the variables
    /// runtimes with their own stores need pointing at the system bundle.
    pub fn command(&self, cg: Option<&TestCgroup>, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let join =
            cg.map(|cg| format!("echo $$ > {}/cgroup.procs && ", cg.dir.display())).unwrap_or_default();
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount --bind {} /etc/hosts && mount --bind {} {SYSTEM_BUNDLE} && {join}exec \"$@\"",
                self.hosts.display(),
                self.bundle.display()
            ))
            .arg("sh")
            .arg(program);
        for var in [
            "HTTPS_PROXY",
            "https_proxy",
            "HTTP_PROXY",
            "http_proxy",
            "ALL_PROXY",
            "all_proxy",
            "OPENAI_BASE_URL",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("REQUESTS_CA_BUNDLE", SYSTEM_BUNDLE)
            .env("SSL_CERT_FILE", SYSTEM_BUNDLE)
            .env("NODE_EXTRA_CA_CERTS", SYSTEM_BUNDLE)
            .env("OPENAI_API_KEY", "placeholder")
            .stdin(Stdio::null());
        cmd
    }
}

/// The virtualenv's python (requests, openai), made by `cargo xtask setup`.
pub fn venv_python() -> PathBuf {
    let p = cache_dir().join("py/bin/python");
    assert!(p.exists(), "{} missing: run cargo xtask setup", p.display());
    p
}

/// Runs `cmd` and parses the JSON it prints.
pub fn json_of(cmd: &mut Command) -> Value {
    let out = output(cmd);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON from {cmd:?} ({e}):\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Runs `cmd` with a bound on its run time.
pub fn output(cmd: &mut Command) -> Output {
    let mut timed = Command::new("timeout");
    timed.arg("60").arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => timed.env(k, v),
            None => timed.env_remove(k),
        };
    }
    timed.stdin(Stdio::null()).output().expect("run agent")
}

/// A fixture script path.
pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// A running fake API (`fake_api.py`), killed on drop.
#[derive(Debug)]
pub struct FakeApi {
    /// Its address.
    pub addr: std::net::SocketAddr,
    child: std::process::Child,
    log: PathBuf,
}

impl FakeApi {
    /// Serves HTTPS on `ip:443` with the given certificate.
    pub fn start(dir: &Path, ip: &str, cert: &crate::pki::ServerCert) -> Self {
        Self::start_with_key(dir, ip, cert, None)
    }

    /// Like [`FakeApi::start`]; with `key`, it answers only requests that carry
    /// `Authorization: Bearer KEY` (401 otherwise).
    pub fn start_with_key(dir: &Path, ip: &str, cert: &crate::pki::ServerCert, key: Option<&str>) -> Self {
        use std::io::BufRead;
        let log = dir.join(format!("{}.jsonl", crate::unique("api")));
        let mut cmd = Command::new("python3");
        if let Some(key) = key {
            cmd.env("FAKE_API_KEY", key);
        }
        let mut child = cmd
            .arg(fixtures().join("fake_api.py"))
            .args([ip, "443"])
            .arg(&cert.cert)
            .arg(&cert.key)
            .arg(&log)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn fake_api.py");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "fake_api.py did not start");
        Self { addr: format!("{ip}:443").parse().unwrap(), child, log }
    }

    /// The file it logs requests to (its own record, which holds what it received).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Log entries of one kind (`request` or `chunk`).
    pub fn entries(&self, kind: &str) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|v| v["kind"] == kind)
            .collect()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
