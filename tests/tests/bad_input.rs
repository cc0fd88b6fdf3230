//! Bad input to `wl-daemon run`: each case gets a one-line error that names the thing and
//! what to do, a non-zero exit, and nothing left attached or pinned.

use std::process::Command;

use wl_e2e::{bin, run_refused, DaemonConfig, DaemonHome, TestCgroup};

/// Exit status of a refused configuration (sysexits' EX_CONFIG; the units do not restart
/// on it); every other refusal exits 1.
const EX_CONFIG: i32 = 78;

/// Runs the daemon and checks the refusal: exit status `code`, one error line, `needles` in it.
fn assert_refused_with(cmd: &mut Command, code: i32, needles: &[&str]) -> String {
    let (status, stderr) = run_refused(cmd);
    assert_eq!(status.code(), Some(code), "expected exit {code}, got {status}; stderr:\n{stderr}");
    let error_lines: Vec<_> = stderr.lines().filter(|l| l.starts_with("wl-daemon: error:")).collect();
    assert_eq!(error_lines.len(), 1, "expected one error line:\n{stderr}");
    for needle in needles {
        assert!(error_lines[0].contains(needle), "{needle:?} missing from {:?}", error_lines[0]);
    }
    error_lines[0].to_string()
}

/// A refusal that is not the configuration's fault (exit 1).
fn assert_refused(cmd: &mut Command, needles: &[&str]) -> String {
    assert_refused_with(cmd, 1, needles)
}

fn daemon_cmd(config: &std::path::Path) -> Command {
    let mut cmd = Command::new(bin("wl-daemon"));
    cmd.arg("run").arg("--config").arg(config);
    cmd
}

fn assert_nothing_left(cg: &TestCgroup, home: &DaemonHome) {
    assert!(cg.attached_programs().is_empty(), "left attached: {:?}", cg.attached_programs());
    assert!(!home.pin_dir.exists(), "left pinned: {}", home.pin_dir.display());
}

#[test]
fn unreadable_config() {
    let home = DaemonHome::new();
    let missing = home.dir.path().join("nope.toml");
    assert_refused_with(
        &mut daemon_cmd(&missing),
        EX_CONFIG,
        &["cannot read config", "nope.toml", "No such file"],
    );
}

#[test]
fn invalid_config_names_key_and_line() {
    let cg = TestCgroup::new("badcfg");
    let home = DaemonHome::new();
    let path = home.dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "mode = \"observe\"\n\n[intercept]\nports = [443]\nlisten_on = [\"127.0.0.1:0\"]\n",
    )
    .unwrap();
    assert_refused_with(&mut daemon_cmd(&path), EX_CONFIG, &["bad.toml", "line 5", "listen_on"]);
    std::fs::write(&path, "mode = \"enforce\"\n[intercept]\nports = [443,\n").unwrap();
    assert_refused_with(&mut daemon_cmd(&path), EX_CONFIG, &["bad.toml", "at line 4", "expected `]`"]);
    std::fs::write(&path, "[intercept]\nlisten = [\"192.0.2.1:15001\"]\n").unwrap();
    assert_refused_with(&mut daemon_cmd(&path), EX_CONFIG, &["not a loopback address"]);
    assert_nothing_left(&cg, &home);
}

#[test]
fn cgroup_that_does_not_exist() {
    let cg = TestCgroup::new("exists");
    let home = DaemonHome::new();
    let mut cfg = DaemonConfig::new(&cg, &[443]);
    cfg.cgroups.push("/wl-e2e-no-such-cgroup".into());
    cfg.fail = "closed";
    let config = home.write_config(&cfg);
    assert_refused(
        &mut daemon_cmd(&config),
        &["cgroup `/wl-e2e-no-such-cgroup` does not exist", "intercept.cgroups"],
    );
    assert_nothing_left(&cg, &home);
}

#[test]
fn no_cgroup2_mount() {
    let cg = TestCgroup::new("nomount");
    let home = DaemonHome::new();
    let config = home.write_config(&DaemonConfig::new(&cg, &[443]));
    let mount = wl_e2e::cgroup2_mount();
    // A private mount namespace without the cgroup2 mount; the host's stays as it is.
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(format!("umount -l {} && exec \"$@\"", mount.display()))
        .arg("sh")
        .arg(bin("wl-daemon"))
        .arg("run")
        .arg("--config")
        .arg(&config);
    assert_refused(&mut cmd, &["no cgroup2 file system is mounted"]);
    assert_nothing_left(&cg, &home);
}

#[test]
fn missing_privileges() {
    let cg = TestCgroup::new("noprivs");
    let home = DaemonHome::new();
    let config = home.write_config(&DaemonConfig::new(&cg, &[443]));
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
        .arg(bin("wl-daemon"))
        .arg("run")
        .arg("--config")
        .arg(&config);
    assert_refused(&mut cmd, &["CAP_BPF", "CAP_NET_ADMIN", "run wl-daemon as root"]);
    assert_nothing_left(&cg, &home);
}

#[test]
fn listener_port_in_use() {
    let cg = TestCgroup::new("inuse");
    let home = DaemonHome::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut cfg = DaemonConfig::new(&cg, &[443]);
    cfg.listen = vec![addr.to_string()];
    cfg.fail = "closed";
    let config = home.write_config(&cfg);
    assert_refused(
        &mut daemon_cmd(&config),
        &[&format!("cannot listen on {addr}"), "in use", "intercept.listen"],
    );
    assert_nothing_left(&cg, &home);
}

#[test]
fn a_second_daemon_on_the_same_state_dir_is_refused() {
    let cg = TestCgroup::new("second");
    let home = DaemonHome::new();
    let cfg = DaemonConfig::new(&cg, &[443]);
    let first = wl_e2e::Daemon::start(&home, &cfg);
    let config = home.write_config(&cfg);
    assert_refused(&mut daemon_cmd(&config), &["another wl-daemon is already running"]);
    // Seven interception programs and the kernel relay's setsockopt program.
    assert_eq!(cg.attached_programs().len(), 8, "the first daemon's programs only");
    first.stop_ok();
    assert_nothing_left(&cg, &home);
}

#[test]
fn print_config_shows_the_effective_configuration() {
    let out = Command::new(bin("wl-daemon")).args(["run", "--print-config"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "mode = \"observe\"",
        "state_dir = \"/var/lib/wl\"",
        "ports = [",
        "fail = \"open\"",
        "/var/log/wl/audit.jsonl",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
}
