//! Living under systemd: the daemon and the broker speak the `sd_notify` protocol
//! (`READY=1`, `RELOADING=1` then `READY=1` on SIGHUP, `STOPPING=1`, `WATCHDOG=1` at half
//! `WATCHDOG_USEC`) to the socket systemd names in `NOTIFY_SOCKET`, here a datagram socket
//! the test holds; and the unit files in `systemd/` pass `systemd-analyze verify` and score
//! within the exposure limits with `systemd-analyze security --offline=yes`.

use std::{
    os::unix::net::UnixDatagram,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use wl_e2e::{bin, Daemon, DaemonConfig, DaemonHome, TestCgroup};

/// Messages received on `sock` until `want` arrives (10 s at most).
fn until(sock: &UnixDatagram, want: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        assert!(Instant::now() < deadline, "no {want:?}; got {seen:?}");
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).trim_end().to_owned();
            let done = msg.lines().any(|l| l == want);
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }
}

fn notify_socket(dir: &Path) -> (UnixDatagram, std::path::PathBuf) {
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    (sock, path)
}

#[test]
fn the_daemon_and_the_broker_speak_sd_notify() {
    let cg = TestCgroup::new("notify");
    let home = DaemonHome::new();
    let (sock, path) = notify_socket(home.dir.path());
    let cfg = DaemonConfig::new(&cg, &[443]);

    for broker in [false, true] {
        // As systemd does: the watchdog is for the main process, named by WATCHDOG_PID.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "WATCHDOG_PID=$$ exec \"$@\"", "sh"])
            .arg(bin("wl-daemon"))
            .env("NOTIFY_SOCKET", &path)
            .env("WATCHDOG_USEC", "300000");
        let service = if broker {
            Daemon::start_broker_cmd(&home, &cfg, cmd)
        } else {
            Daemon::start_cmd(&home, &cfg, cmd)
        };
        let what = if broker { "broker" } else { "daemon" };
        until(&sock, "READY=1");
        // The watchdog keeps pinging at half the interval.
        let pings = until(&sock, "WATCHDOG=1");
        assert!(pings.iter().all(|m| m == "WATCHDOG=1"), "{what}: {pings:?}");
        service.signal_hup();
        let reload = until(&sock, "READY=1");
        assert!(reload.iter().any(|m| m == "RELOADING=1"), "{what}: {reload:?}");
        service.stop_ok();
        until(&sock, "STOPPING=1");
    }
}

/// The units, installed into an empty root so that `verify` finds the binaries.
fn unit_root(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("root");
    let units = root.join("etc/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
    std::fs::copy(bin("wl-daemon"), root.join("usr/bin/wl-daemon")).unwrap();
    std::fs::copy(bin("wlctl"), root.join("usr/bin/wlctl")).unwrap();
    std::fs::copy("/usr/bin/kill", root.join("usr/bin/kill")).unwrap();
    // The units they depend on (targets, slices), as the distribution ships them.
    let status = Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(root.join("usr/lib/systemd/system"))
        .status()
        .unwrap();
    assert!(status.success());
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    for unit in ["wl-daemon.service", "wl-broker.service", "wl-agents.slice"] {
        std::fs::copy(src.join(unit), units.join(unit)).unwrap();
    }
    root
}

#[test]
fn the_units_verify_and_score_within_their_exposure_limits() {
    let dir = tempfile::tempdir().unwrap();
    let root = unit_root(dir.path());
    let units = root.join("etc/systemd/system");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("--man=no")
        .args(["wl-daemon.service", "wl-broker.service", "wl-agents.slice"].map(|u| units.join(u)))
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !text.contains("wl-"), "systemd-analyze verify:\n{text}");

    for (unit, limit) in [("wl-daemon.service", 3.0), ("wl-broker.service", 1.5)] {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(format!("--root={}", root.display()))
            .arg(unit)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let score: f64 = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("→ Overall exposure level for "))
            .and_then(|l| l.split(": ").nth(1))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| {
                panic!("no score for {unit}:\n{text}{}", String::from_utf8_lossy(&out.stderr))
            });
        assert!(score <= limit, "{unit} scores {score}, above {limit}:\n{text}");
    }
}
