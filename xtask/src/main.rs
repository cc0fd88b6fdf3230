//! `cargo xtask`: the project's own set-up, build, run, test and bench tasks.
//!
//! Every task that needs tools calls `setup` first, so that on a fresh machine of this
//! project's kind (Debian 12, root, rustup's stable and nightly) `cargo xtask run` and
//! `cargo xtask test` work with nothing done by hand.

mod bench;
mod bench_compare;
mod bench_micro;
mod bench_tls;
mod package;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent; prints what it does and why).
    Setup,
    /// Build everything (the eBPF object is built by wl-daemon's build.rs).
    Build {
        /// Release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build and run `wl-daemon run` as root; extra arguments go to it (e.g. `-- --config F`).
    Run {
        /// Arguments for `wl-daemon run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: unit tests and the end-to-end tests (root, real eBPF, real clients).
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// rustfmt and clippy, as CI runs them.
    Lint,
    /// Benchmarks; results go to BENCHMARKS.md. `bench compare`: wl beside direct, nginx
    /// and mitmproxy (installs oha and mitmproxy into the cache first). `bench foundation`:
    /// only the connect() hook and splice path measurements (about a minute).
    Bench {
        /// `compare` for the side-by-side comparison, `foundation` for the connect() and
        /// splice measurements alone; nothing for all the component benchmarks.
        what: Option<String>,
        /// Print results without rewriting BENCHMARKS.md.
        #[arg(long)]
        no_write: bool,
        /// `compare` only: measure just these systems (repeatable; `many` for the
        /// 10,000-connection run alone), print them, and write nothing. For iterating on
        /// one number; the full comparison is what BENCHMARKS.md reports.
        #[arg(long)]
        only: Vec<String>,
    },
    /// Build the Debian package (target/debian/wl_VERSION_ARCH.deb) from a release build.
    Deb,
    /// Install from source under /usr/local, as the package does (users, CA, units enabled
    /// and started).
    Install {
        /// Install under this directory instead of / (nothing is run then).
        #[arg(long, default_value = "/")]
        destdir: PathBuf,
    },
    /// Remove what `install` installed (runs /usr/local/share/wl/uninstall).
    Uninstall {
        /// Also remove the users, configuration and state (the audit trails are kept).
        #[arg(long)]
        purge: bool,
    },
    /// Measuring client that `bench` runs inside a cgroup.
    #[command(hide = true)]
    BenchClient {
        /// `connect ADDR N` or `bulk ADDR BYTES`.
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::Build { release } => build(release),
        Task::Run { args } => {
            setup::setup()?;
            build(true)?;
            let bin = workspace_root().join("target/release/wl-daemon");
            let status = Command::new(&bin)
                .arg("run")
                .args(&args)
                .status()
                .with_context(|| format!("starting {}", bin.display()))?;
            if !status.success() {
                bail!("wl-daemon exited with {status}");
            }
            Ok(())
        }
        Task::Test { filter } => {
            setup::setup()?;
            build(false)?;
            // The booted-systemd tests install the package, and the same from source, in a
            // machine made by debootstrap.
            let deb = package::deb()?;
            let tree = workspace_root().join("target/install-tree");
            if tree.exists() {
                std::fs::remove_dir_all(&tree)?;
            }
            package::install(&tree)?;
            let machine = setup::machine_root()?;
            test(filter.as_deref(), &deb, &tree, &machine)
        }
        Task::Lint => lint(),
        Task::Bench { what, no_write, only } => {
            setup::setup()?;
            build(true)?;
            match what.as_deref() {
                None => bench::run(!no_write),
                Some("compare") => bench::compare(!no_write, &only),
                Some("foundation") => bench::foundation_only(!no_write),
                Some(other) => bail!(
                    "unknown benchmark `{other}`: `cargo xtask bench`, `cargo xtask bench compare` or \
                     `cargo xtask bench foundation`"
                ),
            }
        }
        Task::Deb => {
            setup::setup()?;
            let deb = package::deb()?;
            println!("{}", deb.display());
            Ok(())
        }
        Task::Install { destdir } => {
            setup::setup()?;
            package::install(&destdir)
        }
        Task::Uninstall { purge } => package::uninstall(purge),
        Task::BenchClient { args } => bench::client(&args),
    }
}

/// The workspace root (xtask's parent directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

/// Runs a command, failing with its name when it fails.
pub fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

pub fn build(release: bool) -> anyhow::Result<()> {
    let mut cmd = cargo();
    // Default members: everything but wl-ebpf, which only builds for the BPF target.
    cmd.args(["build", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    eprintln!("xtask: building ({})", if release { "release" } else { "debug" });
    run_cmd(&mut cmd)
}

fn test(filter: Option<&str>, deb: &Path, install_tree: &Path, machine: &Path) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    let root = workspace_root();
    let mut cmd = cargo();
    cmd.arg("test");
    cmd.env("WL_BIN_DIR", root.join("target/debug"));
    cmd.env("WL_CACHE_DIR", setup::cache_dir());
    cmd.env("WL_DEB", deb);
    cmd.env("WL_INSTALL_TREE", install_tree);
    cmd.env("WL_MACHINE_ROOT", machine);
    if let Some(f) = filter {
        cmd.args(["--", f]);
    }
    eprintln!("xtask: running the tests (unit and end-to-end)");
    // Pass the output through as it comes, and total the per-binary results so that the
    // run ends with one line saying how many tests ran (the last binary cargo runs, the
    // doc-tests, has none).
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().context("starting cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(word)
                            .map(|n| n.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. "))
                    })
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            };
            passed += count("passed");
            failed += count("failed");
        }
    }
    let status = child.wait()?;
    println!("xtask: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed with {status}");
    }
    Ok(())
}

fn lint() -> anyhow::Result<()> {
    run_cmd(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run_cmd(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))
}
