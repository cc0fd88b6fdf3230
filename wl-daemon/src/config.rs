//! Configuration: the TOML file (or the embedded default) in, a validated [`Config`] out.
//!
//! Parsed in two stages, as ripgrep does: serde reads the raw file (unknown keys are errors
//! that name the key and the line), then [`Config::validate`] checks what serde cannot
//! (listeners on loopback, at most one per family, non-zero ports, absolute cgroup paths).
//! Every other module reads a `Config`; this module depends on none of them.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The configuration compiled into the binary, used when no `--config` is given.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// Whether policy decisions are enforced or only recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Record every decision, never deny (the default).
    #[default]
    Observe,
    /// Deny what policy denies; any failure denies.
    Enforce,
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "observe" => Ok(Mode::Observe),
            "enforce" => Ok(Mode::Enforce),
            other => Err(format!("unknown mode `{other}`: use observe or enforce")),
        }
    }
}

/// What happens to intercepted connections while the daemon is not running.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Programs are detached on exit: agents connect directly.
    #[default]
    Open,
    /// Programs stay attached (pinned): intercepted connects are refused until the daemon
    /// is back.
    Closed,
}

/// The whole configuration, as read and validated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The file it was read from (`None`: the built-in one); a reload reads it again.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// `observe` or `enforce`.
    #[serde(default)]
    pub mode: Mode,
    /// Where wl keeps its state (lock file, later the CA and the broker's store).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The admin socket `wlctl` talks to.
    #[serde(default = "default_admin_socket")]
    pub admin_socket: PathBuf,
    /// Which connections are intercepted and where they go.
    #[serde(default)]
    pub intercept: InterceptConfig,
    /// The audit trail.
    #[serde(default)]
    pub audit: AuditConfig,
    /// TLS interception.
    #[serde(default)]
    pub tls: TlsConfig,
    /// Reverse-proxy listeners, one per API (`OPENAI_BASE_URL=https://HOST:9443/v1`).
    #[serde(default)]
    pub reverse: Vec<ReverseConfig>,
    /// The HTTP CONNECT listener for `HTTPS_PROXY`.
    #[serde(default)]
    pub connect: Option<ConnectConfig>,
    /// Cedar policies.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// The secrets broker (`wl-daemon broker`), and how the proxy reaches it.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// Credentials injected into requests to a host (`[[credential]]`).
    #[serde(default)]
    pub credential: Vec<CredentialConfig>,
    /// Prometheus metrics.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// `[metrics]`: where `GET /metrics` is served.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A loopback address (`127.0.0.1:9464`); no metrics endpoint when absent.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// `[broker]`: the secrets broker process and the proxy's connection to it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// The broker's Unix socket.
    #[serde(default = "default_broker_socket")]
    pub socket: PathBuf,
    /// Where the broker keeps the sealed store, its keys and the SCT ledger (its own
    /// directory: the broker runs as its own user).
    #[serde(default = "default_broker_state_dir")]
    pub state_dir: PathBuf,
    /// uids that may obtain secrets (the proxy's user); the broker's own uid always may.
    #[serde(default = "default_uids")]
    pub client_uids: Vec<u32>,
    /// uids that may manage secrets (`wlctl secret ...`); root always may.
    #[serde(default = "default_uids")]
    pub admin_uids: Vec<u32>,
    /// Users (by name, looked up when the broker starts) that may obtain secrets, such as
    /// the daemon's service user `wl`.
    #[serde(default)]
    pub client_users: Vec<String>,
    /// Users (by name) that may manage secrets.
    #[serde(default)]
    pub admin_users: Vec<String>,
    /// The broker's own Cedar policies (action `UseSecret`); the built-in policy when the
    /// directory does not exist.
    #[serde(default = "default_broker_policy_dir")]
    pub policy_dir: PathBuf,
    /// Lifetime of a Secret Capability Token (at most 60 s).
    #[serde(default = "default_token_ttl", with = "humantime_serde")]
    pub token_ttl: Duration,
    /// The broker's audit trail (secret issues, redemptions, refusals, changes).
    #[serde(default = "default_broker_audit")]
    pub audit: PathBuf,
    /// How long the proxy waits for the broker before treating it as down.
    #[serde(default = "default_broker_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_broker_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/wl-broker")
}
fn default_broker_socket() -> PathBuf {
    PathBuf::from("/run/wl-broker/broker.sock")
}
fn default_uids() -> Vec<u32> {
    vec![0]
}
fn default_broker_policy_dir() -> PathBuf {
    PathBuf::from("/etc/wl/broker-policies")
}
fn default_token_ttl() -> Duration {
    Duration::from_secs(30)
}
fn default_broker_audit() -> PathBuf {
    PathBuf::from("/var/log/wl-broker/audit.jsonl")
}
fn default_broker_timeout() -> Duration {
    Duration::from_secs(2)
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            socket: default_broker_socket(),
            state_dir: default_broker_state_dir(),
            client_uids: default_uids(),
            admin_uids: default_uids(),
            client_users: Vec::new(),
            admin_users: Vec::new(),
            policy_dir: default_broker_policy_dir(),
            token_ttl: default_token_ttl(),
            audit: default_broker_audit(),
            timeout: default_broker_timeout(),
        }
    }
}

impl Config {
    /// The broker's state directory.
    pub fn broker_state_dir(&self) -> PathBuf {
        self.broker.state_dir.clone()
    }
}

/// `[[credential]]`: the secret injected into every request to `host`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    /// The API host (exact name).
    pub host: String,
    /// The secret's name in the broker.
    pub secret: String,
    /// The header that carries it (`authorization`, `x-api-key`).
    pub header: String,
    /// The header's value, with `{secret}` where the secret goes.
    #[serde(default = "default_credential_format")]
    pub format: String,
    /// Other headers removed from the agent's request (other spellings of its credential).
    #[serde(default)]
    pub strip: Vec<String>,
}

fn default_credential_format() -> String {
    "Bearer {secret}".into()
}

/// `[policy]`: where the policies are and how much of a request they see.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Directory of `*.cedar` files; when it does not exist, the built-in policies apply.
    #[serde(default = "default_policy_dir")]
    pub dir: PathBuf,
    /// JSON request bodies up to this many bytes are inspected for `context.body`.
    #[serde(default = "default_body_limit")]
    pub body_limit: usize,
    /// Per-host mode overrides (`"api.openai.com" = "enforce"`).
    #[serde(default)]
    pub host_modes: std::collections::BTreeMap<String, Mode>,
}

fn default_policy_dir() -> PathBuf {
    PathBuf::from("/etc/wl/policies")
}
fn default_body_limit() -> usize {
    64 * 1024
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self { dir: default_policy_dir(), body_limit: default_body_limit(), host_modes: Default::default() }
    }
}

/// `[tls]`: which hosts are terminated and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server names whose TLS is terminated: exact names or `*.suffix` (subdomains only).
    /// Every other name is spliced untouched.
    #[serde(default = "default_governed")]
    pub governed_hosts: Vec<String>,
    /// Validity of minted leaf certificates.
    #[serde(default = "default_leaf_validity", with = "humantime_serde")]
    pub leaf_validity: Duration,
    /// Extra PEM roots trusted for upstreams (private APIs, tests), besides public roots.
    #[serde(default)]
    pub upstream_extra_roots: Vec<PathBuf>,
    /// How long a client may take to send its ClientHello or finish the handshake.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Limit a newly created beacon CA to the governed hosts (X.509 name constraints).
    #[serde(default)]
    pub ca_name_constraints: bool,
}

/// `[[reverse]]`: a TLS listener that forwards everything to one API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReverseConfig {
    /// Where agents connect (`127.0.0.1:9443`).
    pub listen: SocketAddr,
    /// The API host requests go to, and the name its certificate must carry.
    pub host: String,
    /// Names the listener's own certificate is issued for (what agents put in the URL).
    #[serde(default = "default_server_names")]
    pub server_names: Vec<String>,
    /// Address to connect to (`host:port`); default `HOST:443`, resolved by DNS.
    #[serde(default)]
    pub upstream: Option<String>,
}

/// `[connect]`: the explicit-proxy listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectConfig {
    /// Where agents connect (`HTTPS_PROXY=http://127.0.0.1:3128`).
    pub listen: SocketAddr,
}

fn default_governed() -> Vec<String> {
    [
        "api.openai.com",
        "api.anthropic.com",
        "generativelanguage.googleapis.com",
        "api.mistral.ai",
        "api.groq.com",
        "api.cohere.com",
        "api.together.xyz",
        "openrouter.ai",
        "*.openai.azure.com",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}
fn default_leaf_validity() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_server_names() -> Vec<String> {
    vec!["localhost".into()]
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            governed_hosts: default_governed(),
            leaf_validity: default_leaf_validity(),
            upstream_extra_roots: Vec::new(),
            handshake_timeout: default_handshake_timeout(),
            ca_name_constraints: false,
        }
    }
}

impl TlsConfig {
    /// Is TLS to this server name terminated? (`name` lower-case, no trailing dot.)
    pub fn is_governed(&self, name: &str) -> bool {
        self.governed_hosts.iter().any(|pattern| match pattern.strip_prefix("*.") {
            Some(suffix) => {
                name.len() > suffix.len() + 1
                    && name.ends_with(suffix)
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
            }
            None => pattern == name,
        })
    }
}

/// `[intercept]`: the eBPF side.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterceptConfig {
    /// cgroup2 paths, relative to the cgroup2 mount, whose processes are intercepted
    /// (with all their descendants).
    #[serde(default = "default_cgroups")]
    pub cgroups: Vec<String>,
    /// Destination TCP ports that are intercepted.
    #[serde(default = "default_ports")]
    pub ports: Vec<u16>,
    /// Where redirected connections arrive: loopback addresses, at most one per family.
    /// Port 0 picks a free port.
    #[serde(default = "default_listen")]
    pub listen: Vec<SocketAddr>,
    /// Destinations that are never redirected.
    #[serde(default)]
    pub exclude: Vec<IpNet>,
    /// Refuse UDP to port 443 (QUIC) so that clients fall back to TCP.
    #[serde(default = "default_true")]
    pub block_quic: bool,
    /// What happens to agents' connections while the daemon is down.
    #[serde(default)]
    pub fail: FailMode,
    /// cgroup2 paths whose processes are never redirected.
    #[serde(default)]
    pub exempt_cgroups: Vec<String>,
    /// How long to wait for an agent's first bytes before treating the connection as one
    /// where the server speaks first, and splicing it.
    #[serde(default = "default_server_first_after", with = "humantime_serde")]
    pub server_first_after: Duration,
    /// bpffs directory where programs and maps are pinned with `fail = "closed"`.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Relay the agent-to-upstream bytes of spliced connections inside the kernel
    /// (`intercept/relay.rs`) rather than through the daemon.
    #[serde(default = "default_true")]
    pub kernel_relay: bool,
}

/// `[audit]`: where records go.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// JSON-lines file the records are appended to.
    #[serde(default = "default_audit_path")]
    pub path: PathBuf,
    /// Rotate the file when it grows past this many bytes (the chain goes on).
    #[serde(default = "default_rotate_bytes")]
    pub rotate_bytes: u64,
    /// A signed checkpoint after this many records...
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// ...or this long after the last one.
    #[serde(default = "default_checkpoint_interval", with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// In `enforce`, a request's decision is on disk (fsynced, with group commit) before
    /// the request is forwarded; a trail that cannot be written refuses requests (503).
    #[serde(default = "default_true")]
    pub durable: bool,
}

fn default_rotate_bytes() -> u64 {
    100 << 20
}
fn default_checkpoint_every() -> u64 {
    10_000
}
fn default_checkpoint_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/wl")
}
fn default_admin_socket() -> PathBuf {
    PathBuf::from("/run/wl/admin.sock")
}
fn default_cgroups() -> Vec<String> {
    vec!["/".into()]
}
fn default_ports() -> Vec<u16> {
    vec![80, 443]
}
fn default_listen() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([127, 0, 0, 1], 15001)), SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 15001))]
}
fn default_true() -> bool {
    true
}
fn default_server_first_after() -> Duration {
    Duration::from_millis(300)
}
fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/wl")
}
fn default_audit_path() -> PathBuf {
    PathBuf::from("/var/log/wl/audit.jsonl")
}

impl Default for InterceptConfig {
    fn default() -> Self {
        Self {
            cgroups: default_cgroups(),
            ports: default_ports(),
            listen: default_listen(),
            exclude: Vec::new(),
            block_quic: true,
            fail: FailMode::Open,
            exempt_cgroups: Vec::new(),
            server_first_after: default_server_first_after(),
            pin_dir: default_pin_dir(),
            kernel_relay: true,
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            path: default_audit_path(),
            rotate_bytes: default_rotate_bytes(),
            checkpoint_every: default_checkpoint_every(),
            checkpoint_interval: default_checkpoint_interval(),
            durable: true,
        }
    }
}

impl Config {
    /// How the daemon's trail is written (keys and anchor under `<state_dir>/audit`).
    pub fn trail_options(&self) -> crate::audit::trail::TrailOptions {
        crate::audit::trail::TrailOptions {
            key_dir: self.state_dir.join("audit"),
            rotate_bytes: self.audit.rotate_bytes,
            checkpoint_every: self.audit.checkpoint_every,
            checkpoint_interval: self.audit.checkpoint_interval,
        }
    }

    /// How the broker's trail is written (its own key, under the broker's state).
    pub fn broker_trail_options(&self) -> crate::audit::trail::TrailOptions {
        crate::audit::trail::TrailOptions {
            key_dir: self.broker_state_dir().join("audit"),
            ..self.trail_options()
        }
    }
}

/// Why a configuration was refused. Messages are one line and say what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config `{path}`: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys or wrong types.
    #[error("invalid config `{origin}`{location}: {message}")]
    Parse {
        /// The file, or `<built-in>`.
        origin: String,
        /// ` line L, column C` when known.
        location: String,
        /// What serde or the TOML parser said.
        message: String,
    },
    /// The values parse but do not make sense together.
    #[error("invalid config `{origin}`: {message}")]
    Invalid {
        /// The file, or `<built-in>`.
        origin: String,
        /// What is wrong and what to do.
        message: String,
    },
}

impl Config {
    /// The embedded default configuration.
    pub fn builtin() -> Self {
        Self::parse(DEFAULT_TOML, "<built-in>").expect("the built-in configuration is valid")
    }

    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut config = Self::parse(&text, &path.display().to_string())?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let location = match e.span() {
                Some(span) => {
                    let (line, column) = line_column(text, span.start);
                    format!(" at line {line}, column {column}")
                }
                None => String::new(),
            };
            ConfigError::Parse {
                origin: origin.to_owned(),
                location,
                message: e.message().trim().replace('\n', " "),
            }
        })?;
        config.validate().map_err(|message| ConfigError::Invalid { origin: origin.to_owned(), message })?;
        Ok(config)
    }

    /// The effective configuration as TOML (`wl-daemon run --print-config`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a Config always serializes")
    }

    fn validate_credentials(&self) -> Result<(), String> {
        if self.broker.token_ttl.is_zero() || self.broker.token_ttl > Duration::from_secs(60) {
            return Err(format!(
                "broker.token_ttl is {}: give a lifetime between 1s and 60s",
                humantime::format_duration(self.broker.token_ttl)
            ));
        }
        for (i, c) in self.credential.iter().enumerate() {
            let host = c.host.to_ascii_lowercase();
            if host.is_empty() || host.starts_with("*.") || host != c.host {
                return Err(format!(
                    "credential for host `{}`: give one exact, lower-case host name (no wildcards)",
                    c.host
                ));
            }
            let reverse = self.reverse.iter().any(|r| r.host == c.host);
            if !self.tls.is_governed(&c.host) && !reverse {
                return Err(format!(
                    "credential for host `{}`: the host is not in tls.governed_hosts (nor a [[reverse]] host), so its TLS is never terminated and no credential could be injected: add it there",
                    c.host
                ));
            }
            if self.credential[..i].iter().any(|o| o.host == c.host) {
                return Err(format!("two [[credential]] entries for host `{}`: keep one", c.host));
            }
            crate::broker::store::check_name(&c.secret)
                .map_err(|e| format!("credential for `{}`: {e}", c.host))?;
            for h in std::iter::once(&c.header).chain(&c.strip) {
                if hyper::header::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    return Err(format!("credential for `{}`: `{h}` is not a valid header name", c.host));
                }
            }
            if c.format.matches("{secret}").count() != 1 {
                return Err(format!(
                    "credential for `{}`: format `{}` must contain {{secret}} exactly once, like \"Bearer {{secret}}\"",
                    c.host, c.format
                ));
            }
            if hyper::header::HeaderValue::from_str(&c.format).is_err() {
                return Err(format!(
                    "credential for `{}`: format `{}` is not a valid header value",
                    c.host, c.format
                ));
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), String> {
        if self.audit.checkpoint_every == 0 || self.audit.checkpoint_interval.is_zero() {
            return Err("audit.checkpoint_every and audit.checkpoint_interval must be above zero".into());
        }
        if self.audit.rotate_bytes < 4096 {
            return Err(format!("audit.rotate_bytes is {}: give at least 4096", self.audit.rotate_bytes));
        }
        if let Some(addr) = self.metrics.listen {
            if !addr.ip().is_loopback() {
                return Err(format!(
                    "metrics.listen `{addr}` is not a loopback address: metrics stay on this host (scrape through a local agent or an SSH tunnel)"
                ));
            }
        }
        let ic = &self.intercept;
        if ic.cgroups.is_empty() {
            return Err(
                "intercept.cgroups is empty: name at least one cgroup (\"/\" is the whole host)".into()
            );
        }
        for cg in ic.cgroups.iter().chain(&ic.exempt_cgroups) {
            if !cg.starts_with('/') || cg.split('/').any(|part| part == "..") {
                return Err(format!(
                    "cgroup `{cg}` must be an absolute path under the cgroup2 mount, like \"/\" or \"/agents.slice\""
                ));
            }
        }
        if ic.ports.is_empty() {
            return Err(
                "intercept.ports is empty: list the destination ports to intercept, such as [80, 443]".into(),
            );
        }
        if ic.ports.contains(&0) {
            return Err("intercept.ports contains 0, which is not a destination port".into());
        }
        if ic.listen.is_empty() {
            return Err(
                "intercept.listen is empty: give a loopback address such as \"127.0.0.1:15001\"".into()
            );
        }
        for (i, addr) in ic.listen.iter().enumerate() {
            if !addr.ip().is_loopback() {
                return Err(format!(
                    "intercept.listen `{addr}` is not a loopback address: redirected connections must stay on this host"
                ));
            }
            if ic.listen[..i].iter().any(|other| other.is_ipv4() == addr.is_ipv4()) {
                return Err(format!(
                    "intercept.listen has two {} listeners: give at most one per family",
                    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
                ));
            }
        }
        self.validate_credentials()?;
        for host in &self.tls.governed_hosts {
            let bare = host.strip_prefix("*.").unwrap_or(host);
            if bare.is_empty()
                || bare.contains('*')
                || bare != bare.to_ascii_lowercase()
                || bare.ends_with('.')
            {
                return Err(format!(
                    "tls.governed_hosts entry `{host}` must be a lower-case host name or `*.suffix`"
                ));
            }
        }
        if self.tls.leaf_validity < Duration::from_secs(300) {
            return Err("tls.leaf_validity must be at least 5m".into());
        }
        for r in &self.reverse {
            if r.server_names.is_empty() {
                return Err(format!("reverse listener {}: server_names is empty", r.listen));
            }
        }
        if !ic.pin_dir.is_absolute() {
            return Err(format!("intercept.pin_dir `{}` must be an absolute path", ic.pin_dir.display()));
        }
        Ok(())
    }
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_matches_documented_defaults() {
        let c = Config::builtin();
        assert_eq!(c.mode, Mode::Observe);
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/wl"));
        assert_eq!(c.intercept.cgroups, vec!["/".to_string()]);
        assert_eq!(c.intercept.ports, vec![80, 443]);
        assert_eq!(c.intercept.listen, default_listen());
        assert!(c.intercept.block_quic);
        assert_eq!(c.intercept.fail, FailMode::Open);
        assert_eq!(c.audit.path, PathBuf::from("/var/log/wl/audit.jsonl"));
        // And an empty file means the same thing as the built-in one.
        assert_eq!(Config::parse("", "empty").unwrap(), c);
    }

    #[test]
    fn printed_config_parses_back_to_itself() {
        let c = Config::builtin();
        assert_eq!(Config::parse(&c.to_toml(), "printed").unwrap(), c);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = Config::parse("mode = \"observe\"\n[intercept]\nportz = [443]\n", "t.toml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("portz"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }

    #[test]
    fn bad_values_are_refused_with_reasons() {
        for (toml, needle) in [
            ("mode = \"deny\"", "deny"),
            ("[intercept]\nlisten = [\"10.0.0.1:15001\"]", "not a loopback"),
            ("[intercept]\nlisten = [\"127.0.0.1:1\", \"127.0.0.2:2\"]", "two IPv4"),
            ("[intercept]\nports = []", "ports is empty"),
            ("[intercept]\ncgroups = [\"agents\"]", "absolute path"),
            ("[intercept]\nexclude = [\"10.0.0.0/33\"]", "line 2"),
            ("[intercept]\nfail = \"sometimes\"", "sometimes"),
            ("[broker]\ntoken_ttl = \"5m\"", "between 1s and 60s"),
            ("[[credential]]\nhost = \"api.openai.com\"\nsecret = \"o\"\nheader = \"authorization\"\nformat = \"Bearer\"", "exactly once"),
            ("[[credential]]\nhost = \"internal.example\"\nsecret = \"o\"\nheader = \"authorization\"", "not in tls.governed_hosts"),
            ("[[credential]]\nhost = \"api.openai.com\"\nsecret = \"../o\"\nheader = \"authorization\"", "invalid secret name"),
            ("[[credential]]\nhost = \"api.openai.com\"\nsecret = \"o\"\nheader = \"bad header\"", "not a valid header name"),
            ("[[credential]]\nhost = \"api.openai.com\"\nsecret = \"o\"\nheader = \"x\"\n[[credential]]\nhost = \"api.openai.com\"\nsecret = \"p\"\nheader = \"x\"", "two [[credential]]"),
        ] {
            let msg = Config::parse(toml, "t.toml").unwrap_err().to_string();
            assert!(msg.contains(needle), "{toml:?} -> {msg}");
        }
    }
}
