//! `wlctl`: the operator's command line. It grows with each component; today it talks to the
//! daemon (status, mode, reload) and the secrets broker (secrets, signing keys), manages the
//! beacon CA, checks policies and configuration files, and reads the audit trail.

use std::{io::BufRead, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use wl_daemon::{
    admin::AdminRequest,
    broker::{protocol::BrokerRequest, store::SecretValue},
    config::Config,
    tls::ca,
};

/// Where packaged installs keep the configuration.
const DEFAULT_CONFIG: &str = "/etc/wl/wl.toml";

#[derive(Parser)]
#[command(name = "wlctl", version, about = "Operate wl on this host")]
struct Cli {
    /// Configuration file (default /etc/wl/wl.toml when it exists, else the built-in one).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Machine-readable output (one JSON document) for status, mode, reload, ca show,
    /// secret and broker commands.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// What the running daemon is doing: mode, policies, cgroups, listeners.
    Status,
    /// Show the mode, or switch it live (observe | enforce).
    Mode {
        /// The new mode; without it, the current one is shown.
        mode: Option<wl_daemon::config::Mode>,
    },
    /// Reload the configuration file (mode, per-host modes; other changes are named as
    /// waiting for a restart) and the policy directory, as SIGHUP and `systemctl reload` do.
    Reload,
    /// The beacon CA agents trust for governed hosts.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Cedar policies: check a directory, run test cases.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
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
    /// Secrets held by the broker (values are read from stdin or a file, never from the
    /// command line, and never printed).
    Secret {
        #[command(subcommand)]
        command: SecretCommand,
    },
    /// The secrets broker itself.
    Broker {
        #[command(subcommand)]
        command: BrokerCommand,
    },
    /// Shell completions on stdout, e.g. `wlctl completions bash > /etc/bash_completion.d/wlctl`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum SecretCommand {
    /// Store a new secret; its value is read from stdin (one line, or all of it with
    /// --raw) or from --from-file.
    Put {
        /// The secret's name (what `[[credential]] secret` refers to).
        name: String,
        /// A host it may be sent to (repeatable; at least one).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// Read the value from this file instead of stdin.
        #[arg(long)]
        from_file: Option<PathBuf>,
        /// Keep the value byte for byte (no trailing newline removed).
        #[arg(long)]
        raw: bool,
    },
    /// Replace a secret's value (and its hosts, with --host).
    Rotate {
        /// The secret's name.
        name: String,
        /// New hosts (repeatable); without, the old ones stay.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Read the value from this file instead of stdin.
        #[arg(long)]
        from_file: Option<PathBuf>,
        /// Keep the value byte for byte.
        #[arg(long)]
        raw: bool,
    },
    /// Names, hosts, creation, rotation and last-use times (never values).
    List,
    /// Delete a secret.
    Rm {
        /// The secret's name.
        name: String,
    },
    /// Check that the value on stdin (or --from-file) is the stored one. Exit 0 when it
    /// is, 4 when it differs.
    Verify {
        /// The secret's name.
        name: String,
        /// Read the value from this file instead of stdin.
        #[arg(long)]
        from_file: Option<PathBuf>,
        /// Keep the value byte for byte.
        #[arg(long)]
        raw: bool,
    },
}

#[derive(Subcommand)]
enum BrokerCommand {
    /// Counts and the current signing key.
    Status,
    /// Make a new SCT signing key; tokens signed by the old one stay valid until they expire.
    RotateKey,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create the CA under state_dir if there is none (wl-daemon run also does).
    Init,
    /// Subject, SHA-256 fingerprint and validity.
    Show,
    /// The CA certificate (PEM) on stdout.
    Export,
    /// Add the CA to the system trust store (Debian: /usr/local/share/ca-certificates).
    Install,
    /// Remove it from the system trust store.
    Uninstall,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Parse and validate (strict, against wl's schema) every *.cedar file in DIR (default:
    /// policy.dir). Exit 0 valid, 2 invalid, 1 unreadable.
    Check {
        /// The directory.
        dir: Option<PathBuf>,
    },
    /// Run the cases in FILE against DIR (default: policy.dir, or the built-in policies).
    /// Exit 0 all pass, 4 some fail, 3 malformed cases, 2 invalid policies, 1 unreadable.
    Test {
        /// The TOML file of cases.
        file: PathBuf,
        /// The policy directory.
        #[arg(long)]
        policies: Option<PathBuf>,
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
    /// Check a trail's hash chain, checkpoint signatures and end (default: the configured
    /// trail with its rotated files). Exit 0 intact (a torn last line from a crash is
    /// reported, not an error), 2 altered, 1 unreadable.
    Verify {
        /// Trail files, oldest first (default: audit.path's rotated files, then audit.path).
        files: Vec<PathBuf>,
        /// The broker's trail instead of the daemon's.
        #[arg(long)]
        broker: bool,
        /// The checkpoint public key (default: <state_dir>/audit/checkpoint.pub).
        #[arg(long)]
        key: Option<PathBuf>,
        /// The anchor (default: <state_dir>/audit/head, when checking the configured trail).
        #[arg(long)]
        anchor: Option<PathBuf>,
    },
    /// Print records, optionally only those of one kind or one process.
    Tail {
        /// The audit file (default: the configured audit.path).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Only records of this kind (connection, ...).
        #[arg(long)]
        kind: Option<String>,
        /// Only records of this agent pid.
        #[arg(long)]
        pid: Option<u32>,
        /// Only records for this host.
        #[arg(long)]
        host: Option<String>,
        /// Only records with this decision (allow, deny).
        #[arg(long)]
        decision: Option<String>,
        /// Only the last N matching records.
        #[arg(long, short = 'n', default_value_t = 20)]
        lines: usize,
        /// Keep printing records as they are written (until interrupted).
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Status => admin(cli.config.as_deref(), cli.json, AdminRequest::Status, |v| {
            println!("wl-daemon {}, up {} s", v["version"].as_str().unwrap_or("?"), v["uptime_s"]);
            println!("mode:      {}", v["mode"].as_str().unwrap_or("?"));
            if v["host_modes"].as_object().is_some_and(|m| !m.is_empty()) {
                println!("per host:  {}", v["host_modes"]);
            }
            println!(
                "policies:  {} from {}",
                v["policies"]["count"],
                v["policies"]["source"].as_str().unwrap_or("?")
            );
            println!("cgroups:   {}", v["cgroups"]);
            println!("listeners: {}", v["listeners"]);
            println!("requests:  {}", v["requests"]);
            println!(
                "audit:     {} records, {} dropped, {} write errors, {} waiting for the disk",
                v["audit"]["records"],
                v["audit"]["dropped"],
                v["audit"]["write_errors"],
                v["audit"]["waiting_for_disk"]
            );
        }),
        Command::Mode { mode: None } => admin(cli.config.as_deref(), cli.json, AdminRequest::Status, |v| {
            println!("{}", v["mode"].as_str().unwrap_or("?"));
        }),
        Command::Mode { mode: Some(mode) } => {
            admin(cli.config.as_deref(), cli.json, AdminRequest::Mode { mode }, |v| {
                println!(
                    "mode: {} (was {})",
                    v["mode"].as_str().unwrap_or("?"),
                    v["previous"].as_str().unwrap_or("?")
                );
            })
        }
        Command::Reload => admin(cli.config.as_deref(), cli.json, AdminRequest::Reload, |v| {
            println!("reloaded: {} policies, mode {}", v["policies"], v["mode"].as_str().unwrap_or("?"));
            let pending: Vec<&str> =
                v["restart_needed"].as_array().into_iter().flatten().filter_map(|s| s.as_str()).collect();
            if !pending.is_empty() {
                println!("changed, applied at restart (systemctl restart wl-daemon): {}", pending.join(", "));
            }
        }),
        Command::Ca { command } => {
            match load_config(cli.config.as_deref()).and_then(|cfg| ca_command(command, &cfg, cli.json)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("wlctl: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Policy { command } => {
            let cfg = match load_config(cli.config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("wlctl: {e}");
                    return ExitCode::FAILURE;
                }
            };
            policy_command(command, &cfg)
        }
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
        Command::Secret { command } => {
            let req = match command {
                SecretCommand::Put { name, hosts, from_file, raw } => read_value(from_file.as_deref(), raw)
                    .map(|value| BrokerRequest::Put { name, hosts, value }),
                SecretCommand::Rotate { name, hosts, from_file, raw } => {
                    read_value(from_file.as_deref(), raw).map(|value| BrokerRequest::Rotate {
                        name,
                        hosts,
                        value,
                    })
                }
                SecretCommand::List => Ok(BrokerRequest::List),
                SecretCommand::Rm { name } => Ok(BrokerRequest::Remove { name }),
                SecretCommand::Verify { name, from_file, raw } => {
                    read_value(from_file.as_deref(), raw).map(|value| BrokerRequest::Verify { name, value })
                }
            };
            broker_command(cli.config.as_deref(), req, cli.json)
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "wlctl", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Broker { command } => {
            let req = match command {
                BrokerCommand::Status => BrokerRequest::Status,
                BrokerCommand::RotateKey => BrokerRequest::RotateKey,
            };
            broker_command(cli.config.as_deref(), Ok(req), cli.json)
        }
        Command::Audit { command: AuditCommand::Verify { files, broker, key, anchor } } => {
            let cfg = match load_config(cli.config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("wlctl: {e}");
                    return ExitCode::FAILURE;
                }
            };
            audit_verify(&cfg, files, broker, key, anchor)
        }
        Command::Audit { command: AuditCommand::Tail { file, kind, pid, host, decision, lines, follow } } => {
            let file = match file.map_or_else(|| load_config(cli.config.as_deref()).map(|c| c.audit.path), Ok)
            {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("wlctl: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let f = match std::fs::File::open(&file) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("wlctl: cannot open audit log `{}`: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            };
            let wanted = |line: &str| {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    return false;
                };
                kind.as_deref().is_none_or(|k| v["kind"] == k)
                    && pid.is_none_or(|p| v["agent"]["pid"] == p)
                    && host.as_deref().is_none_or(|h| v["host"] == h)
                    && decision.as_deref().is_none_or(|d| v["decision"] == d)
            };
            let mut reader = std::io::BufReader::new(f);
            let mut kept = std::collections::VecDeque::with_capacity(lines);
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 && line.ends_with('\n') {
                if wanted(&line) {
                    if kept.len() == lines {
                        kept.pop_front();
                    }
                    kept.push_back(line.trim_end().to_owned());
                }
                line.clear();
            }
            for l in kept {
                println!("{l}");
            }
            // Follow: complete lines only; a rotation starts the new file from its top.
            if !follow {
                return ExitCode::SUCCESS;
            }
            loop {
                match reader.read_line(&mut line) {
                    Ok(0) => {
                        std::thread::sleep(std::time::Duration::from_millis(200));
                        use std::os::unix::fs::MetadataExt;
                        let ino = |m: std::io::Result<std::fs::Metadata>| m.map(|m| m.ino()).ok();
                        let rotated = ino(std::fs::metadata(&file)) != ino(reader.get_ref().metadata());
                        if rotated {
                            if let Ok(f) = std::fs::File::open(&file) {
                                reader = std::io::BufReader::new(f);
                            }
                        }
                    }
                    Ok(_) if line.ends_with('\n') => {
                        if wanted(&line) {
                            println!("{}", line.trim_end());
                        }
                        line.clear();
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("wlctl: reading `{}`: {e}", file.display());
                        return ExitCode::FAILURE;
                    }
                }
            }
        }
    }
}

/// Reads a secret's value from a file or stdin. Without `raw`, one trailing newline (what
/// `echo` and editors add) is removed.
fn read_value(from_file: Option<&std::path::Path>, raw: bool) -> Result<SecretValue, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    match from_file {
        Some(path) => {
            bytes = std::fs::read(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
        }
        None => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprintln!("wlctl: reading the secret's value from stdin (end with Ctrl-D)");
            }
            std::io::stdin().read_to_end(&mut bytes).map_err(|e| format!("cannot read stdin: {e}"))?;
        }
    }
    if !raw {
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        }
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    if bytes.is_empty() {
        return Err("the secret's value is empty".into());
    }
    Ok(SecretValue::new(bytes))
}

fn millis(ms: Option<i64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) => time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
            .ok()
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
            .unwrap_or_else(|| ms.to_string()),
    }
}

/// Runs one broker command; exit 1 when the broker is unreachable or refuses.
fn broker_command(
    config: Option<&std::path::Path>,
    req: Result<BrokerRequest, String>,
    json: bool,
) -> ExitCode {
    let result = load_config(config).and_then(|cfg| {
        let req = req?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        let reply = rt.block_on(wl_daemon::broker::client::call(&cfg.broker.socket, &req))?;
        Ok((req, reply))
    });
    let (req, reply) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wlctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !reply.ok {
        eprintln!(
            "wlctl: the broker refused ({}): {}",
            reply.code.as_deref().unwrap_or("?"),
            reply.message.as_deref().unwrap_or("")
        );
        return ExitCode::FAILURE;
    }
    if json && !matches!(req, BrokerRequest::List) {
        println!("{}", serde_json::to_string(&reply).expect("replies serialize"));
        let differs = matches!(req, BrokerRequest::Verify { .. }) && reply.matches != Some(true);
        return if differs { ExitCode::from(4) } else { ExitCode::SUCCESS };
    }
    match req {
        BrokerRequest::Put { name, .. } | BrokerRequest::Rotate { name, .. } => {
            let meta = reply.secret.expect("put and rotate return the secret's description");
            println!("{name}: stored (version {}, hosts {})", meta.version, meta.hosts.join(", "));
        }
        BrokerRequest::Remove { name } => println!("{name}: removed"),
        BrokerRequest::List if json => {
            println!(
                "{}",
                serde_json::to_string(&reply.secrets.unwrap_or_default()).expect("listings serialize")
            )
        }
        BrokerRequest::List => {
            let secrets = reply.secrets.unwrap_or_default();
            println!(
                "{:<20} {:>3} {:<28} {:<26} {:<26} LAST USED",
                "NAME", "VER", "HOSTS", "CREATED", "ROTATED"
            );
            for s in &secrets {
                println!(
                    "{:<20} {:>3} {:<28} {:<26} {:<26} {}",
                    s.meta.name,
                    s.meta.version,
                    s.meta.hosts.join(","),
                    millis(Some(s.meta.created_ms)),
                    millis(s.meta.rotated_ms),
                    millis(s.last_used_ms)
                );
            }
        }
        BrokerRequest::Verify { name, .. } => {
            if reply.matches == Some(true) {
                println!("{name}: matches the stored value");
            } else {
                println!("{name}: differs from the stored value");
                return ExitCode::from(4);
            }
        }
        BrokerRequest::RotateKey => println!("new signing key {}", reply.kid.unwrap_or_default()),
        BrokerRequest::Status => {
            println!("signing key: {}", reply.kid.unwrap_or_default());
            println!("counts:      {}", reply.counts.unwrap_or_default());
        }
        BrokerRequest::Issue(_) | BrokerRequest::Redeem { .. } => {}
    }
    ExitCode::SUCCESS
}

fn audit_verify(
    cfg: &Config,
    files: Vec<PathBuf>,
    broker: bool,
    key: Option<PathBuf>,
    anchor: Option<PathBuf>,
) -> ExitCode {
    use wl_daemon::audit::{trail, verify};
    let (path, opts) = if broker {
        (cfg.broker.audit.clone(), cfg.broker_trail_options())
    } else {
        (cfg.audit.path.clone(), cfg.trail_options())
    };
    let (_, default_key, default_anchor) = trail::key_paths(&opts.key_dir);
    let configured = files.is_empty();
    let files = if configured {
        let mut all = trail::rotated_files(&path);
        if path.exists() {
            all.push(path.clone());
        }
        all
    } else {
        files
    };
    if files.is_empty() {
        eprintln!("wlctl: no audit trail at `{}`", path.display());
        return ExitCode::FAILURE;
    }
    let key = match verify::read_public_key(&key.unwrap_or(default_key)) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("wlctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    let anchor = match anchor.or_else(|| (configured && default_anchor.exists()).then_some(default_anchor)) {
        Some(p) => match verify::read_anchor(&p) {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!("wlctl: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let report = verify::verify(&files, &key, anchor);
    for (seq, bytes) in &report.recovered {
        println!(
            "note: the checkpoint at seq {seq} records a torn line of {bytes} bytes cut off after a crash"
        );
    }
    if let Some((file, bytes)) = &report.torn_tail {
        println!(
            "note: the last line of {} is incomplete ({bytes} bytes): a crash while writing, not tampering; the next start seals it",
            file.display()
        );
    }
    match &report.problem {
        None => {
            println!(
                "ok: {} records (seq {}..{}) in {} file(s), {} checkpoints verified{}",
                report.records,
                report.first_seq.unwrap_or(0),
                report.last_seq.unwrap_or(0),
                files.len(),
                report.checkpoints,
                if anchor.is_some() { ", end matches the anchor" } else { "" }
            );
            ExitCode::SUCCESS
        }
        Some(p) => {
            println!("ALTERED: {p}");
            println!("(checked {} records before it)", report.records);
            ExitCode::from(2)
        }
    }
}

fn load_config(path: Option<&std::path::Path>) -> Result<Config, String> {
    match path {
        Some(p) => Config::load(p).map_err(|e| e.to_string()),
        None if std::path::Path::new(DEFAULT_CONFIG).exists() => {
            Config::load(std::path::Path::new(DEFAULT_CONFIG)).map_err(|e| e.to_string())
        }
        None => Ok(Config::builtin()),
    }
}

/// Where Debian's update-ca-certificates picks up local CAs.
const LOCAL_CA_DIR: &str = "/usr/local/share/ca-certificates";
const LOCAL_CA_FILE: &str = "wl-beacon-ca.crt";
/// The bundle update-ca-certificates writes.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

fn ca_command(command: CaCommand, cfg: &Config, json: bool) -> Result<(), String> {
    let state = &cfg.state_dir;
    let constraints =
        || if cfg.tls.ca_name_constraints { cfg.tls.governed_hosts.clone() } else { Vec::new() };
    match command {
        CaCommand::Init => {
            if ca::cert_path(state).exists() {
                println!("beacon CA already exists: {}", ca::cert_path(state).display());
            } else {
                ca::BeaconCa::create(state, &constraints()).map_err(|e| e.to_string())?;
                println!("created beacon CA: {}", ca::cert_path(state).display());
            }
            show(&ca::BeaconCa::load(state).map_err(|e| e.to_string())?, json)
        }
        CaCommand::Show => show(&ca::BeaconCa::load(state).map_err(|e| e.to_string())?, json),
        CaCommand::Export => {
            print!("{}", ca::BeaconCa::load(state).map_err(|e| e.to_string())?.cert_pem());
            Ok(())
        }
        CaCommand::Install => {
            let ca = ca::BeaconCa::load(state).map_err(|e| e.to_string())?;
            std::fs::create_dir_all(LOCAL_CA_DIR).map_err(|e| format!("creating {LOCAL_CA_DIR}: {e}"))?;
            let dest = std::path::Path::new(LOCAL_CA_DIR).join(LOCAL_CA_FILE);
            std::fs::write(&dest, ca.cert_pem()).map_err(|e| format!("writing {}: {e}", dest.display()))?;
            update_ca_certificates()?;
            println!("installed {} ({})", dest.display(), ca.fingerprint());
            println!("Runtimes with their own trust stores need these in the agents' environment:");
            for var in [
                "REQUESTS_CA_BUNDLE",
                "SSL_CERT_FILE",
                "CURL_CA_BUNDLE",
                "NODE_EXTRA_CA_CERTS",
                "AWS_CA_BUNDLE",
            ] {
                println!("  {var}={SYSTEM_BUNDLE}");
            }
            println!("  (Java: keytool -importcert -cacerts -alias wl-beacon -file {})", dest.display());
            Ok(())
        }
        CaCommand::Uninstall => {
            let dest = std::path::Path::new(LOCAL_CA_DIR).join(LOCAL_CA_FILE);
            match std::fs::remove_file(&dest) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    println!("not installed ({} does not exist)", dest.display());
                    return Ok(());
                }
                Err(e) => return Err(format!("removing {}: {e}", dest.display())),
            }
            update_ca_certificates()?;
            println!("removed {}", dest.display());
            Ok(())
        }
    }
}

fn update_ca_certificates() -> Result<(), String> {
    let out = std::process::Command::new("update-ca-certificates").arg("--fresh").output().map_err(|e| {
        format!("running update-ca-certificates: {e} (is the ca-certificates package installed?)")
    })?;
    if !out.status.success() {
        return Err(format!(
            "update-ca-certificates failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

fn show(ca: &ca::BeaconCa, json: bool) -> Result<(), String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(ca.cert_der()).map_err(|e| format!("parsing the CA: {e}"))?;
    let limited_to: Vec<String> = match cert.name_constraints() {
        Ok(Some(nc)) => nc.value.permitted_subtrees.iter().flatten().map(|s| s.base.to_string()).collect(),
        _ => Vec::new(),
    };
    if json {
        let v = serde_json::json!({
            "subject": cert.subject().to_string(),
            "fingerprint_sha256": ca.fingerprint(),
            "not_before": cert.validity().not_before.to_rfc2822().unwrap_or_default(),
            "not_after": cert.validity().not_after.to_rfc2822().unwrap_or_default(),
            "limited_to": limited_to,
        });
        println!("{v}");
        return Ok(());
    }
    println!("subject:     {}", cert.subject());
    println!("fingerprint: SHA256 {}", ca.fingerprint());
    println!("not before:  {}", cert.validity().not_before);
    println!("not after:   {}", cert.validity().not_after);
    if !limited_to.is_empty() {
        println!("limited to:  {}", limited_to.join(", "));
    }
    Ok(())
}

fn load_policies(dir: Option<&std::path::Path>) -> Result<wl_daemon::policy::PolicyEngine, ExitCode> {
    use wl_daemon::policy::{PolicyEngine, PolicyError};
    let result = match dir {
        Some(d) => PolicyEngine::load_dir(d),
        None => Ok(PolicyEngine::builtin()),
    };
    result.map_err(|e| {
        eprintln!("wlctl: {e}");
        match e {
            PolicyError::Read { .. } => ExitCode::FAILURE,
            PolicyError::Parse(_) | PolicyError::Invalid(_) => ExitCode::from(2),
        }
    })
}

fn policy_command(command: PolicyCommand, cfg: &Config) -> ExitCode {
    let configured = cfg.policy.dir.is_dir().then_some(cfg.policy.dir.as_path());
    match command {
        PolicyCommand::Check { dir } => {
            let dir = dir.as_deref().or(configured);
            match load_policies(dir) {
                Ok(engine) => {
                    println!("{}: {} policies, valid", engine.source, engine.count);
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            }
        }
        PolicyCommand::Test { file, policies } => {
            let engine = match load_policies(policies.as_deref().or(configured)) {
                Ok(e) => e,
                Err(code) => return code,
            };
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("wlctl: cannot read `{}`: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            };
            let cases: wl_daemon::policy::cases::CaseFile = match toml::from_str(&text) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("wlctl: `{}`: {}", file.display(), e.to_string().replace('\n', " "));
                    return ExitCode::from(3);
                }
            };
            let results = wl_daemon::policy::cases::run(&engine, &cases);
            let failed = results.iter().filter(|r| !r.passed).count();
            for r in &results {
                println!("{} {}: {}", if r.passed { "ok  " } else { "FAIL" }, r.name, r.detail);
            }
            println!("{} passed, {} failed", results.len() - failed, failed);
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(4)
            }
        }
    }
}

/// Sends one request to the daemon's admin socket; prints the reply with `show` or the
/// daemon's error. Exit 1 when the daemon is unreachable or refuses.
fn admin(
    config: Option<&std::path::Path>,
    json: bool,
    req: AdminRequest,
    show: impl FnOnce(&serde_json::Value),
) -> ExitCode {
    let cfg = match load_config(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wlctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    match rt.block_on(wl_daemon::admin::request(&cfg.admin_socket, &req)) {
        Ok(v) if v["ok"] == true => {
            if json {
                println!("{v}");
            } else {
                show(&v);
            }
            ExitCode::SUCCESS
        }
        Ok(v) => {
            eprintln!("wlctl: {}", v["error"].as_str().unwrap_or("the daemon refused"));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("wlctl: {e}");
            ExitCode::FAILURE
        }
    }
}
