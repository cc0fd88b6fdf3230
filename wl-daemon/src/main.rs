//! `wl-daemon`: the services. `run` is the proxy daemon (wl-daemon.service), `broker` the
//! secrets broker (wl-broker.service), each its own process.
//!
//! Thin on purpose: parse the command line, set up logging, hand over to the library, and
//! turn any error into one line on stderr and exit status 1, or 78 (`EX_CONFIG`) when the
//! configuration is at fault: the units do not restart on that status
//! (`RestartPreventExitStatus=78`), since only an operator's edit can fix it.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use wl_daemon::config::Config;

#[derive(Parser)]
#[command(name = "wl-daemon", version, about = "wl: governs what AI agents send to the APIs they call")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Intercept agents' connections and proxy them (wl-daemon.service).
    Run {
        /// Configuration file (TOML); the built-in default when absent.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the effective configuration and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// Hold the secrets and issue Secret Capability Tokens (wl-broker.service).
    Broker {
        /// Configuration file (TOML; the `[broker]` section); the built-in default when absent.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

/// mimalloc instead of glibc's malloc: the request path allocates and frees many small
/// buffers per request (hyper, h2, rustls, the audit line); glibc's allocator was about 12%
/// of the daemon's CPU at full keep-alive load, and a request costs 10-15% less CPU with
/// mimalloc (docs/profile.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v3's `mimalloc.h` (the crate names only some options):
/// how many milliseconds freed memory stays committed before it is returned to the kernel.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Returns freed memory to the kernel at once rather than after mimalloc's default delay.
/// The delay kept the 19 MB that aya's BTF parsing frees at start-up (and what a burst
/// frees) resident indefinitely while the daemon is idle: 46 MiB resident instead of 19.
/// An operator's `MIMALLOC_PURGE_DELAY` wins.
fn return_freed_memory_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets an integer option; mimalloc reads options atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
    }
}

fn main() -> ExitCode {
    return_freed_memory_at_once();
    // Before any thread exists (see the function's docs).
    wl_daemon::policy::facts::init_local_offset();
    let cli = Cli::parse();
    init_logging(match cli.command {
        Command::Run { .. } => "wl-daemon",
        Command::Broker { .. } => "wl-broker",
    });
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wl-daemon: error: {}", one_line(&e));
            if e.downcast_ref::<wl_daemon::config::ConfigError>().is_some() {
                ExitCode::from(EX_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// sysexits.h: "configuration error"; systemd shows it as `status=78/CONFIG`.
const EX_CONFIG: u8 = 78;

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, print_config } => {
            let config = match config {
                Some(path) => Config::load(&path)?,
                None => Config::builtin(),
            };
            if print_config {
                print!("{}", config.to_toml());
                return Ok(());
            }
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(wl_daemon::daemon::run(config))
        }
        Command::Broker { config } => {
            let config = match config {
                Some(path) => Config::load(&path)?,
                None => Config::builtin(),
            };
            // Before any thread exists, so that every thread of the broker inherits it.
            wl_daemon::broker::isolate_network();
            // Two threads are plenty: every request is a short critical section.
            let runtime =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            runtime.block_on(wl_daemon::broker::run(config))
        }
    }
}

/// Logs to the journal, with each event's fields as journal fields (`REQUEST_ID`, `HOST`,
/// ...), when systemd connected our output to it (`JOURNAL_STREAM`); to stderr otherwise.
fn init_logging(identifier: &str) {
    use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt};
    let filter = || tracing_subscriber::EnvFilter::try_from_env("WL_LOG").unwrap_or_else(|_| "info".into());
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journal) = tracing_journald::layer() {
            tracing_subscriber::registry()
                .with(filter())
                // Fields as `HOST=`, not tracing-journald's default `F_HOST=`: what operators
                // type in `journalctl HOST=api.openai.com`.
                .with(journal.with_syslog_identifier(identifier.to_owned()).with_field_prefix(None))
                .init();
            return;
        }
    }
    tracing_subscriber::fmt().with_env_filter(filter()).with_writer(std::io::stderr).init();
}

/// An error and its causes on one line, without repeating a cause its parent already shows.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option number is mimalloc's purge delay: its default (1,000 ms in mimalloc v3, or
    /// the environment's) before, 0 after. A mimalloc upgrade that renumbers its options
    /// fails here rather than silently setting another option.
    #[test]
    fn purge_delay_option_is_set_to_zero() {
        // SAFETY: reads an integer option.
        let get = || unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        match std::env::var("MIMALLOC_PURGE_DELAY") {
            Ok(v) => assert_eq!(get().to_string(), v),
            Err(_) => {
                assert_eq!(get(), 1000);
                return_freed_memory_at_once();
                assert_eq!(get(), 0);
            }
        }
    }
}
