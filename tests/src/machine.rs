//! A booted Debian 12 machine for the package and service tests: a copy of the root
//! filesystem `cargo xtask test` made with debootstrap (`WL_MACHINE_ROOT`), booted with
//! `systemd-nspawn --boot`. Its own root, so its systemd never touches this machine's
//! `/tmp` or `/var`; its own network namespace with only loopback; its own cgroup
//! namespace under a test cgroup, so programs wl attaches to its root govern only it.
//!
//! Commands run inside with `nsenter` into its PID 1's namespaces. Such a command stays in
//! the test's cgroup, so its connections are not the machine's agents'; an agent is a
//! unit the machine's systemd starts (`systemd-run`).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::TestCgroup;

/// A running machine; powered off and deleted on drop.
pub struct Machine {
    /// Holds `root/` (the machine's filesystem) and `console.log`.
    dir: tempfile::TempDir,
    nspawn: Child,
    init_pid: u32,
    // Dropped after `Machine::drop` has powered the machine off.
    _cgroups: MachineCgroups,
}

impl Machine {
    /// Copies the root, lets `prepare` write into it (e.g. `/etc/hosts`), boots it with
    /// `binds` (host path, machine path; read-only) and waits until its systemd says the
    /// system is running.
    pub fn boot(tag: &str, binds: &[(&Path, &str)], prepare: impl FnOnce(&Path)) -> Self {
        let base = std::env::var_os("WL_MACHINE_ROOT").map(PathBuf::from).expect(
            "WL_MACHINE_ROOT is not set: run the tests with `cargo xtask test`, which makes the \
             machine's root filesystem with debootstrap",
        );
        assert!(
            base.join("etc/wl-test-machine").exists(),
            "{} is not a complete machine root",
            base.display()
        );
        // Not in /tmp: a machine root holds device nodes and setuid binaries.
        let dir = tempfile::Builder::new().prefix("wl-machine-").tempdir_in("/var/tmp").unwrap();
        let root = dir.path().join("root");
        let copy = Command::new("cp").arg("-a").arg("--reflink=auto").arg(&base).arg(&root).status();
        assert!(copy.unwrap().success(), "copying the machine root");
        prepare(&root);

        // nspawn puts the machine in a `payload` cgroup under its own: a test cgroup of its
        // own keeps it apart from this machine's other cgroups.
        let cgroup = TestCgroup::new(tag);
        let mut cmd = cgroup.command("systemd-nspawn");
        cmd.arg("--directory")
            .arg(&root)
            .args(["--boot", "--register=no", "--keep-unit", "--private-network", "--console=pipe"])
            .arg(format!("--machine={tag}"))
            // What wl-daemon.service asks for. nspawn's own seccomp filter refuses bpf()
            // even with CAP_BPF unless it is allowed by name.
            .args([
                "--capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN,CAP_SYS_PTRACE",
                "--system-call-filter=bpf",
            ]);
        for (host, guest) in binds {
            cmd.arg(format!("--bind-ro={}:{guest}", host.display()));
        }
        let log = std::fs::File::create(dir.path().join("console.log")).unwrap();
        let nspawn = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("systemd-nspawn");

        // Its PID 1 is nspawn's child.
        let deadline = Instant::now() + Duration::from_secs(30);
        let init_pid = loop {
            let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", nspawn.id()))
                .unwrap_or_default();
            if let Some(pid) = children.split_whitespace().next().and_then(|p| p.parse().ok()) {
                break pid;
            }
            assert!(Instant::now() < deadline, "systemd-nspawn started no init");
            std::thread::sleep(Duration::from_millis(50));
        };
        let machine = Self { dir, nspawn, init_pid, _cgroups: MachineCgroups { cgroup } };
        // `--wait` returns once boot is over, whatever the outcome; the outcome must be
        // "running" (no unit failed), or the test would judge wl on a broken machine.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = machine.sh("systemctl is-system-running --wait");
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if state == "running" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the machine did not boot: {state}\n{}",
                machine.sh_ok("systemctl --failed --no-pager; journalctl -b --no-pager | tail -40")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        machine
    }

    /// Runs a shell script inside the machine, as root.
    pub fn sh(&self, script: &str) -> Output {
        Command::new("nsenter")
            .args(["--target", &self.init_pid.to_string(), "--all"])
            .args(["/bin/sh", "-c", script])
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .env("SYSTEMD_PAGER", "")
            .output()
            .expect("nsenter")
    }

    /// Like [`Machine::sh`], asserting success; returns stdout and stderr together.
    pub fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "in the machine, `{script}` failed ({}):\n{text}", out.status);
        text
    }

    /// A path inside the machine, as seen from the host.
    pub fn path(&self, inside: &str) -> PathBuf {
        self.dir.path().join("root").join(inside.trim_start_matches('/'))
    }

    /// Waits up to 30 s for `check` to succeed inside the machine; returns its output.
    pub fn wait_for(&self, what: &str, check: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.sh(check);
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            assert!(
                Instant::now() < deadline,
                "{what}: `{check}` still fails: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // A clean power-off (units stop, programs detach), then nspawn exits; if it does
        // not within 30 s, it is killed (its machine's processes die with its namespace).
        let _ = self.sh("systemctl poweroff --no-block");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

impl Drop for MachineCgroups {
    /// nspawn leaves its `payload` and `supervisor` cgroups behind, in the unified
    /// hierarchy and in the `name=systemd` one of a hybrid host: empty now, removed
    /// children first, so that the test cgroup itself can go.
    fn drop(&mut self) {
        fn remove_tree(dir: &Path) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        remove_tree(&entry.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        let name = self.cgroup.name.trim_start_matches('/').to_string();
        for sub in ["payload", "supervisor"] {
            remove_tree(&crate::cgroup2_mount().join(&name).join(sub));
        }
        remove_tree(&Path::new("/sys/fs/cgroup/systemd").join(&name));
    }
}

/// The machine's test cgroup, with nspawn's leftovers removed before it.
struct MachineCgroups {
    cgroup: TestCgroup,
}
