//! Loopback upstreams (the fixtures' `upstream.py`) and test certificates.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use serde_json::Value;

/// Directory of the fixture scripts.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A self-signed certificate for the given IP addresses; returns (cert, key) paths.
pub fn self_signed_cert(dir: &Path, ips: &[&str]) -> (PathBuf, PathBuf) {
    let cert = dir.join("upstream.crt");
    let key = dir.join("upstream.key");
    let san = ips.iter().map(|ip| format!("IP:{ip}")).collect::<Vec<_>>().join(",");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
        ])
        .args(["-subj", "/CN=wl-e2e-upstream", "-addext", &format!("subjectAltName={san}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl req failed: {}", String::from_utf8_lossy(&out.stderr));
    (cert, key)
}

/// A running `upstream.py`, killed on drop.
#[derive(Debug)]
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl Upstream {
    /// Plain TCP (banner, then echo) on `ip`, on an ephemeral port unless `port` is given.
    pub fn tcp(dir: &Path, ip: &str, port: u16) -> Self {
        Self::start(dir, ip, port, None)
    }

    /// TLS serving a fixed HTTP response, with the given certificate.
    pub fn tls(dir: &Path, ip: &str, port: u16, cert: &Path, key: &Path) -> Self {
        Self::start(dir, ip, port, Some((cert, key)))
    }

    fn start(dir: &Path, ip: &str, port: u16, tls: Option<(&Path, &Path)>) -> Self {
        let log = dir.join(format!("upstream-{ip}-{port}-{}.jsonl", crate::unique("log")));
        let mut cmd = Command::new("python3");
        cmd.arg(fixtures().join("upstream.py")).arg(ip).arg(port.to_string()).arg(&log);
        if let Some((cert, key)) = tls {
            cmd.arg("--tls").arg(cert).arg(key);
        }
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn upstream.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("upstream ready line");
        let port: u16 = line
            .strip_prefix("ready ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("upstream.py did not start: {line:?}"));
        let addr = SocketAddr::new(ip.parse().expect("ip"), port);
        Self { addr, child, log }
    }

    /// Every accepted connection so far: `{"peer": [ip, port], "owner": pid}`.
    pub fn accepted(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("upstream log line"))
            .collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
