//! `wlctl`: the operator's command line. It grows with each component; today it checks
//! configuration files and reads the audit trail.

use std::{io::BufRead, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use wl_daemon::config::Config;

#[derive(Parser)]
#[command(name = "wlctl", version, about = "Operate wl on this host")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// The audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check a configuration file; exit 0 when valid, 2 when not.
    Check {
        /// The file.
        path: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Print records, optionally only those of one kind or one process.
    Tail {
        /// The audit file.
        #[arg(long, default_value = "/var/log/wl/audit.jsonl")]
        file: PathBuf,
        /// Only records of this kind (connection, ...).
        #[arg(long)]
        kind: Option<String>,
        /// Only records of this agent pid.
        #[arg(long)]
        pid: Option<u32>,
        /// Only the last N matching records.
        #[arg(long, short = 'n', default_value_t = 20)]
        lines: usize,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Config { command: ConfigCommand::Check { path } } => match Config::load(&path) {
            Ok(_) => {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("wlctl: {e}");
                ExitCode::from(2)
            }
        },
        Command::Audit { command: AuditCommand::Tail { file, kind, pid, lines } } => {
            let f = match std::fs::File::open(&file) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("wlctl: cannot open audit log `{}`: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            };
            let mut kept = std::collections::VecDeque::with_capacity(lines);
            for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if kind.as_deref().is_some_and(|k| v["kind"] != k) {
                    continue;
                }
                if pid.is_some_and(|p| v["agent"]["pid"] != p) {
                    continue;
                }
                if kept.len() == lines {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
            for line in kept {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
    }
}
