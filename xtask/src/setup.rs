//! `cargo xtask setup`: installs what building and testing need, and says why.
//!
//! Idempotent: each step checks first and does nothing when its tool is already there.
//! Only package registries are reachable from this project's machines, so everything comes
//! from rustup's components, crates.io, Debian or PyPI.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _};

use crate::run_cmd;

/// Where downloaded test tools live (the Python virtualenv, stamps).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WL_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("wl")
}

/// Runs every step.
pub fn setup() -> anyhow::Result<()> {
    let cache = cache_dir();
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    nightly()?;
    rust_src()?;
    bpf_linker(&cache)?;
    debian_packages()?;
    python_clients(&cache)?;
    Ok(())
}

fn say(step: &str, msg: &str) {
    eprintln!("xtask setup: {step}: {msg}");
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn nightly() -> anyhow::Result<()> {
    if succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        return Ok(());
    }
    say("nightly", "installing the nightly toolchain (the eBPF programs need -Z build-std)");
    run_cmd(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))
        .context("the eBPF side needs a nightly Rust toolchain; install one with rustup")
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    Ok(PathBuf::from(output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim()))
}

fn rust_src() -> anyhow::Result<()> {
    let core = nightly_sysroot()?.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if core.exists() {
        return Ok(());
    }
    say("rust-src", "adding rust-src to nightly (the BPF target builds core from source)");
    run_cmd(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker must use the nightly rustc's LLVM. No matching LLVM development package exists
/// for Debian 12, so it is linked against the `libLLVM` shared library that rustup ships
/// with the nightly toolchain. A stamp records which one, so a nightly update rebuilds it.
fn bpf_linker(cache: &Path) -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    let lib = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .find(|n| n.starts_with("libLLVM-") && n.ends_with(".so"))
        .context("the nightly toolchain ships no libLLVM-*.so; cannot build bpf-linker")?;
    let lib = lib.trim_start_matches("lib").trim_end_matches(".so").to_owned(); // LLVM-22-rust-...
    let major = lib
        .trim_start_matches("LLVM-")
        .split(['-', '.'])
        .next()
        .filter(|m| m.chars().all(|c| c.is_ascii_digit()))
        .with_context(|| format!("cannot read the LLVM major version from {lib}"))?
        .to_owned();
    let stamp = cache.join("bpf-linker.llvm");
    let stamped = std::fs::read_to_string(&stamp).unwrap_or_default();
    let works = succeeds(Command::new("bpf-linker").arg("--version"));
    if works && (stamped.trim() == lib || stamped.is_empty()) {
        if stamped.is_empty() {
            std::fs::write(&stamp, &lib)?;
        }
        return Ok(());
    }
    say(
        "bpf-linker",
        &format!("building bpf-linker against the nightly's own {lib} (links the eBPF object; takes about 2 minutes)"),
    );
    let sysroot_lib = sysroot.join("lib");
    let rustflags =
        format!("-L {dir} -l dylib={lib} -C link-arg=-Wl,-rpath,{dir}", dir = sysroot_lib.display());
    run_cmd(
        Command::new("cargo")
            .args(["+nightly", "install", "bpf-linker", "--locked", "--force", "--no-default-features"])
            .args(["--features", &format!("llvm-{major},no-llvm-linking")])
            .env("RUSTFLAGS", rustflags),
    )?;
    std::fs::write(&stamp, &lib)?;
    Ok(())
}

/// Tools the end-to-end tests run: curl, openssl (test certificates), ss (which process owns
/// a socket), setpriv and unshare (unprivileged and namespaced agents), node (fetch),
/// bpftool (what is attached to a cgroup), promtool (checks the metrics endpoint),
/// debootstrap and systemd-nspawn (the booted-systemd test), dpkg-deb and objcopy (the
/// package).
fn debian_packages() -> anyhow::Result<()> {
    let wanted = [
        ("curl", "curl"),
        ("openssl", "openssl"),
        ("ss", "iproute2"),
        ("setpriv", "util-linux"),
        ("unshare", "util-linux"),
        ("node", "nodejs"),
        ("python3", "python3"),
        ("bpftool", "bpftool"),
        ("promtool", "prometheus"),
        ("debootstrap", "debootstrap"),
        ("systemd-nspawn", "systemd-container"),
        ("dpkg-deb", "dpkg"),
        ("objcopy", "binutils"),
    ];
    let mut missing: Vec<&str> = wanted
        .iter()
        .filter(|(cmd, _)| !succeeds(Command::new("sh").args(["-c", &format!("command -v {cmd}")])))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    say("packages", &format!("installing {} with apt-get (used by the end-to-end tests)", missing.join(" ")));
    // Packages must not start services on this machine (prometheus ships one): a
    // policy-rc.d that says no, for the time of the install.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let placed = !policy.exists();
    if placed {
        std::fs::write(
            policy,
            "#!/bin/sh\n# placed by cargo xtask setup for the time of an install\nexit 101\n",
        )?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let result = run_cmd(Command::new("apt-get").args(["update", "-q"])).and_then(|()| {
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y", "-q"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    });
    if placed {
        let _ = std::fs::remove_file(policy);
    }
    result
}

/// A virtualenv with the Python clients agents use (`requests`, the official `openai` SDK,
/// `websockets`).
fn python_clients(cache: &Path) -> anyhow::Result<()> {
    let venv = cache.join("py");
    let python = venv.join("bin/python");
    if succeeds(Command::new(&python).args(["-c", "import requests, openai, websockets"])) {
        return Ok(());
    }
    say(
        "python",
        &format!("creating {} with requests, openai and websockets (test clients)", venv.display()),
    );
    run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run_cmd(Command::new(venv.join("bin/pip")).args([
        "install",
        "-q",
        "--disable-pip-version-check",
        "requests",
        "openai",
        "websockets",
    ]))
}

/// The packages of the booted-systemd test's machine: systemd itself, and what the test
/// runs inside (curl as the agent, python3 for the fake API), and procps, which the package
/// depends on (/bin/kill) and minbase leaves out.
const MACHINE_PACKAGES: &str = "systemd,systemd-sysv,dbus,ca-certificates,curl,python3,iproute2,procps";

/// A Debian 12 root filesystem for the booted-systemd test (`tests/tests/systemd_boot.rs`),
/// made once with debootstrap and kept in the cache; the test boots copies of it. A marker
/// written last says it is complete and with which packages, so an interrupted or older
/// one is made again.
pub fn machine_root() -> anyhow::Result<PathBuf> {
    let root = cache_dir().join("machine/debian12");
    let marker = root.join("etc/wl-test-machine");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == MACHINE_PACKAGES) {
        return Ok(root);
    }
    say(
        "machine",
        &format!(
            "making a Debian 12 root in {} with debootstrap (booted-systemd test; about a minute)",
            root.display()
        ),
    );
    if root.exists() {
        std::fs::remove_dir_all(&root)
            .with_context(|| format!("removing the incomplete {}", root.display()))?;
    }
    std::fs::create_dir_all(root.parent().expect("has a parent"))?;
    run_cmd(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={MACHINE_PACKAGES}"), "bookworm"])
            .arg(&root)
            .arg("http://deb.debian.org/debian")
            .stdout(Stdio::null()),
    )
    .context("debootstrap failed (it needs Debian's package mirror)")?;
    std::fs::write(&marker, MACHINE_PACKAGES)?;
    Ok(root)
}
