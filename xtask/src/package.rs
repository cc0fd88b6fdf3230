//! `cargo xtask deb`, `install` and `uninstall`: wl laid out as a Linux host installs it.
//!
//! One staging step places every file (binaries, units, sysusers.d and tmpfiles.d entries,
//! the configuration, policies, docs, shell completions, maintainer scripts) under a
//! directory in one of two layouts: Debian's (`/usr/bin`, `/lib/systemd/system`) for the
//! package, and `/usr/local` with units in `/etc/systemd/system` for installs from source.
//! The maintainer scripts in `xtask/package/` are shared by both, so a source install
//! creates the same users, CA and enabled units as the package, and its `uninstall`
//! script (installed with it) removes them the way `dpkg --remove`/`--purge` does.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context as _};

use crate::{run_cmd, workspace_root};

/// Where each kind of file goes.
struct Layout {
    bin: &'static str,
    units: &'static str,
    /// Parent of sysusers.d and tmpfiles.d.
    lib: &'static str,
    share: &'static str,
    zsh_completions: &'static str,
}

const DEBIAN: Layout = Layout {
    bin: "/usr/bin",
    units: "/lib/systemd/system",
    lib: "/usr/lib",
    share: "/usr/share",
    zsh_completions: "/usr/share/zsh/vendor-completions",
};

const FROM_SOURCE: Layout = Layout {
    bin: "/usr/local/bin",
    units: "/etc/systemd/system",
    lib: "/usr/local/lib",
    share: "/usr/local/share",
    zsh_completions: "/usr/local/share/zsh/site-functions",
};

/// Files the package marks as configuration: dpkg keeps an operator's edits on upgrade.
const CONFFILES: [&str; 2] = ["/etc/wl/wl.toml", "/etc/wl/policies/default.cedar"];

const MAINTAINER_SCRIPTS: [&str; 3] = ["postinst", "prerm", "postrm"];

/// Builds `target/debian/wl_<version>_<arch>.deb` from a release build; returns its path.
pub fn deb() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let version = env!("CARGO_PKG_VERSION");
    let arch = command_output(Command::new("dpkg").arg("--print-architecture"))?.trim().to_string();
    let out_dir = root.join("target/debian");
    let stage_dir = out_dir.join("stage");
    if stage_dir.exists() {
        fs::remove_dir_all(&stage_dir).with_context(|| format!("clearing {}", stage_dir.display()))?;
    }
    let files = stage(&stage_dir, &DEBIAN)?;

    let control = stage_dir.join("DEBIAN");
    fs::create_dir_all(&control)?;
    for script in MAINTAINER_SCRIPTS {
        write_script(&control.join(script), &script_text(script, &DEBIAN)?)?;
    }
    fs::write(control.join("conffiles"), CONFFILES.map(|f| format!("{f}\n")).concat())?;
    let installed_kib: u64 = files
        .iter()
        .map(|f| fs::metadata(stage_dir.join(relative(f))).map(|m| m.len()).unwrap_or(0))
        .sum::<u64>()
        / 1024;
    fs::write(
        control.join("control"),
        format!(
            "Package: wl\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: wl developers <wl@example.invalid>\n\
             Section: net\n\
             Priority: optional\n\
             Installed-Size: {installed_kib}\n\
             Depends: libc6 (>= 2.34), libgcc-s1, systemd (>= 247), ca-certificates, passwd, util-linux, procps\n\
             Description: enforcement layer between AI agents and the APIs they call\n \
             wl-daemon intercepts the outbound API calls of the agents on a host (eBPF cgroup\n \
             programs), terminates their TLS with certificates from its own beacon CA,\n \
             evaluates Cedar policies on every connection and request, injects credentials\n \
             held by a separate secrets broker, and writes a tamper-evident audit trail.\n \
             Installs wl-daemon.service and wl-broker.service, starting in observe mode.\n"
        ),
    )?;
    let deb = out_dir.join(format!("wl_{version}_{arch}.deb"));
    eprintln!("xtask: packaging {}", deb.display());
    run_cmd(
        Command::new("dpkg-deb").args(["--root-owner-group", "-Zxz", "--build"]).arg(&stage_dir).arg(&deb),
    )?;
    Ok(deb)
}

/// Installs wl from source under `destdir` (`/` for this host), then, on this host, runs
/// the same post-install steps as the package.
pub fn install(destdir: &Path) -> anyhow::Result<()> {
    let stage_dir = workspace_root().join("target/install-stage");
    if stage_dir.exists() {
        fs::remove_dir_all(&stage_dir)?;
    }
    let mut files = stage(&stage_dir, &FROM_SOURCE)?;
    let share = format!("{}/wl", FROM_SOURCE.share);
    for script in MAINTAINER_SCRIPTS.into_iter().chain(["uninstall"]) {
        let path = format!("{share}/{script}");
        write_script(&stage_dir.join(relative(&path)), &script_text(script, &FROM_SOURCE)?)?;
        files.push(path);
    }
    let manifest = format!("{share}/installed-files");
    files.push(manifest.clone());
    fs::write(
        stage_dir.join(relative(&manifest)),
        files.iter().map(|f| format!("{f}\n")).collect::<String>(),
    )?;

    for file in &files {
        let from = stage_dir.join(relative(file));
        let mut to = destdir.join(relative(file));
        fs::create_dir_all(to.parent().expect("files are in directories"))?;
        // Like dpkg with a conffile: an operator's edited configuration is never replaced.
        if CONFFILES.contains(&file.as_str()) && to.exists() && fs::read(&to)? != fs::read(&from)? {
            to = to.with_file_name(format!("{}.new", to.file_name().unwrap().to_string_lossy()));
            eprintln!("xtask: kept the existing {file}; the new one is {}", to.display());
        }
        fs::copy(&from, &to).with_context(|| format!("installing {}", to.display()))?;
    }
    eprintln!("xtask: installed {} files under {}", files.len(), destdir.display());
    if destdir == Path::new("/") {
        run_cmd(Command::new(format!("{share}/postinst")).arg("configure"))?;
    } else {
        eprintln!(
            "xtask: not this host's root, so nothing was run; inside it run: {share}/postinst configure"
        );
    }
    Ok(())
}

/// Removes a source install (its own `uninstall` script, so that it works without the
/// source tree too).
pub fn uninstall(purge: bool) -> anyhow::Result<()> {
    let script = format!("{}/wl/uninstall", FROM_SOURCE.share);
    if !Path::new(&script).exists() {
        bail!("{script} does not exist: wl was not installed with `cargo xtask install`");
    }
    let mut cmd = Command::new(&script);
    if purge {
        cmd.arg("--purge");
    }
    run_cmd(&mut cmd)
}

/// Places every installed file under `dir` in `layout`; returns their absolute paths.
fn stage(dir: &Path, layout: &Layout) -> anyhow::Result<Vec<String>> {
    let root = workspace_root();
    crate::build(true)?;
    fs::create_dir_all(dir)?;
    let mut files = Vec::new();
    let mut put = |path: String, contents: &[u8], mode: u32| -> anyhow::Result<()> {
        let at = dir.join(relative(&path));
        fs::create_dir_all(at.parent().expect("files are in directories"))?;
        fs::write(&at, contents).with_context(|| format!("writing {}", at.display()))?;
        fs::set_permissions(&at, fs::Permissions::from_mode(mode))?;
        files.push(path);
        Ok(())
    };

    for bin in ["wl-daemon", "wlctl"] {
        // Without the debug info the release profile keeps for profiling (~150 MB each).
        let stripped = dir.join(format!("{bin}.stripped"));
        run_cmd(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(root.join("target/release").join(bin))
                .arg(&stripped),
        )?;
        put(format!("{}/{bin}", layout.bin), &fs::read(&stripped)?, 0o755)?;
        fs::remove_file(&stripped)?;
    }

    for unit in ["wl-daemon.service", "wl-broker.service", "wl-agents.slice"] {
        let text = read(&root.join("systemd").join(unit))?;
        let text = text.replace("=/usr/bin/", &format!("={}/", layout.bin));
        put(format!("{}/{unit}", layout.units), text.as_bytes(), 0o644)?;
    }
    put(
        format!("{}/sysusers.d/wl.conf", layout.lib),
        read(&root.join("systemd/wl.sysusers"))?.as_bytes(),
        0o644,
    )?;
    put(
        format!("{}/tmpfiles.d/wl.conf", layout.lib),
        read(&root.join("systemd/wl.tmpfiles"))?.as_bytes(),
        0o644,
    )?;

    put("/etc/wl/wl.toml".into(), package_config()?.as_bytes(), 0o644)?;
    put(
        "/etc/wl/policies/default.cedar".into(),
        read(&root.join("policies/default.cedar"))?.as_bytes(),
        0o644,
    )?;

    let doc = format!("{}/doc/wl", layout.share);
    put(format!("{doc}/README.md"), read(&root.join("README.md"))?.as_bytes(), 0o644)?;
    for entry in sorted_dir(&root.join("docs"))? {
        let name = entry.file_name().unwrap().to_string_lossy().into_owned();
        put(format!("{doc}/docs/{name}"), &fs::read(&entry)?, 0o644)?;
    }
    put(format!("{doc}/copyright"), COPYRIGHT.as_bytes(), 0o644)?;
    put(
        format!("{doc}/examples/wl-agent.conf"),
        read(&root.join("systemd/wl-agent.conf.example"))?.as_bytes(),
        0o644,
    )?;
    put(
        format!("{doc}/examples/policies/wl.cedarschema"),
        &fs::read(root.join("policies/wl.cedarschema"))?,
        0o644,
    )?;
    for entry in sorted_dir(&root.join("policies/examples"))? {
        let name = entry.file_name().unwrap().to_string_lossy().into_owned();
        put(format!("{doc}/examples/policies/{name}"), &fs::read(&entry)?, 0o644)?;
    }

    let wlctl = root.join("target/release/wlctl");
    for (shell, path) in [
        ("bash", format!("{}/bash-completion/completions/wlctl", layout.share)),
        ("zsh", format!("{}/_wlctl", layout.zsh_completions)),
        ("fish", format!("{}/fish/vendor_completions.d/wlctl.fish", layout.share)),
    ] {
        let text = command_output(Command::new(&wlctl).args(["completions", shell]))?;
        put(path, text.as_bytes(), 0o644)?;
    }
    Ok(files)
}

/// The configuration the package installs: the built-in one, with the daemon's service
/// user allowed to obtain secrets from the broker.
fn package_config() -> anyhow::Result<String> {
    let builtin = read(&workspace_root().join("wl-daemon/src/default.toml"))?;
    let mut replaced = 0;
    let text: String = builtin
        .lines()
        .map(|line| {
            if line.starts_with("# wl-daemon's built-in configuration") {
                "# wl's configuration (installed by the package; kept across upgrades).".to_string()
            } else if let Some(rest) = line.strip_prefix("client_users = []") {
                replaced += 1;
                format!("client_users = [\"wl\"]{rest}")
            } else {
                line.to_string()
            }
        })
        .map(|line| line + "\n")
        .collect();
    ensure!(replaced == 1, "wl-daemon/src/default.toml no longer has one `client_users = []` line to adapt");
    Ok(text)
}

/// A maintainer script with this layout's paths filled in.
fn script_text(name: &str, layout: &Layout) -> anyhow::Result<String> {
    let text = read(&workspace_root().join("xtask/package").join(name))?;
    Ok(text
        .replace("@BINDIR@", layout.bin)
        .replace("@LIBDIR@", layout.lib)
        .replace("@SHAREDIR@", layout.share))
}

fn write_script(path: &Path, text: &str) -> anyhow::Result<()> {
    fs::create_dir_all(path.parent().expect("scripts are in directories"))?;
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn relative(path: &str) -> &str {
    path.trim_start_matches('/')
}

fn read(path: &Path) -> anyhow::Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn sorted_dir(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.retain(|p| p.is_file());
    entries.sort();
    Ok(entries)
}

fn command_output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8(out.stdout)?)
}

const COPYRIGHT: &str = "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: wl
Source: https://example.invalid/wl

Files: *
Copyright: the wl developers
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
";
