//! Interception: loads wl's eBPF programs, attaches them to the configured cgroups, writes
//! their settings, and answers the one question the proxy asks of every accepted
//! connection: where was it going, and who asked? ([`Interceptor::take_record`]). When
//! `kernel_relay` is on it also attaches the relay's `sk_msg` program and hands the proxy
//! the relay's maps ([`Interceptor::relay`], `relay.rs`).
//!
//! In: the `[intercept]` configuration and the bound listener addresses. Out: a running
//! [`Interceptor`]; dropping it detaches everything (`fail = "open"`), or leaves the pinned
//! links in place so agents' intercepted connects are refused until the daemon is back
//! (`fail = "closed"`). A daemon that finds pinned links from an earlier run of the same
//! eBPF object takes them over (same maps, same links) instead of attaching twice.

pub mod cgroup;
pub mod identity;
pub mod relay;
mod sockdiag;

use std::{
    collections::BTreeSet,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, SockHash},
    programs::{
        cgroup_sockopt::CgroupSockoptLink, links::FdLink, links::PinnedLink, CgroupAttachMode,
        CgroupSockAddr, CgroupSockopt, SkMsg, SockOps,
    },
    Ebpf, EbpfLoader,
};
use sha2::{Digest, Sha256};
use tokio::io::{unix::AsyncFd, Interest};
use wl_common::{maps, programs, ConnRecord, PeerKey, Settings, AF_INET, AF_INET6};

use self::relay::KernelRelay;
use crate::config::{FailMode, InterceptConfig};

/// The eBPF object built from `wl-ebpf` by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wl-kernel"));

/// The ring buffer aya-log uses; pinned with the other maps so that taken-over programs
/// keep logging into it.
const LOG_MAP: &str = "AYA_LOGS";
/// File in the pin directory naming the object the pins belong to.
// bpffs refuses names with a dot in them.
const OBJECT_ID_FILE: &str = "object-sha256";

/// Why interception could not start. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    /// The process lacks the capabilities to load and attach programs.
    #[error("loading eBPF programs needs CAP_BPF and CAP_NET_ADMIN (effective: {have}): run wl-daemon as root or through wl-daemon.service")]
    Privileges {
        /// What the process has, as text.
        have: String,
    },
    /// A configured cgroup could not be used.
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    /// The eBPF object could not be loaded.
    #[error("cannot load the eBPF programs: {0}")]
    Load(String),
    /// A program could not be attached.
    #[error("cannot attach {program} to cgroup `{cgroup}`: {message}")]
    Attach {
        /// Program name.
        program: &'static str,
        /// Configured cgroup.
        cgroup: String,
        /// What the kernel said.
        message: String,
    },
    /// The maps could not be written.
    #[error("cannot configure the eBPF maps: {0}")]
    Maps(String),
    /// The pin directory could not be prepared.
    #[error("cannot use pin directory `{}` (intercept.pin_dir): {message}", path.display())]
    Pin {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// A cgroup the programs are attached to.
#[derive(Debug)]
struct Target {
    name: String,
    dir: PathBuf,
    id: u64,
}

/// The running interception. See the module docs.
pub struct Interceptor {
    // Field order is drop order: links and maps go before the object that owns the programs.
    pinned: Vec<PinnedLink>,
    /// Held, never read: dropping an unpinned link detaches it (`fail = "open"`).
    _owned: Vec<FdLink>,
    /// The relay's setsockopt program, one link per cgroup; never pinned (below).
    _relay_sockopt: Vec<CgroupSockoptLink>,
    by_peer: Mutex<HashMap<MapData, PeerKey, ConnRecord>>,
    logger: Option<tokio::task::JoinHandle<()>>,
    attached: Vec<String>,
    /// False when the records' pids are the host's while the daemon is in a container.
    pids_usable: bool,
    /// The kernel relay of spliced connections, when configured and the kernel took it.
    relay: Option<KernelRelay>,
    _ebpf: Ebpf,
}

impl std::fmt::Debug for Interceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interceptor").field("attached", &self.attached).finish_non_exhaustive()
    }
}

impl Interceptor {
    /// Loads, configures and attaches. `listeners` are the bound listener addresses (with
    /// their real ports). Must run inside a tokio runtime (the kernel log reader is a task).
    pub fn start(
        cfg: &InterceptConfig,
        mount: &Path,
        listeners: &[SocketAddr],
    ) -> Result<Self, InterceptError> {
        check_capabilities()?;
        let targets = cfg
            .cgroups
            .iter()
            .map(|name| {
                let dir = cgroup::cgroup_dir(mount, name)?;
                let id = cgroup::cgroup_id(&dir).map_err(|e| InterceptError::Load(e.to_string()))?;
                Ok(Target { name: name.clone(), dir, id })
            })
            .collect::<Result<Vec<_>, InterceptError>>()?;
        let mut exempt = Vec::new();
        for name in &cfg.exempt_cgroups {
            let dir = cgroup::cgroup_dir(mount, name)?;
            exempt.push(cgroup::cgroup_id(&dir).map_err(|e| InterceptError::Load(e.to_string()))?);
        }
        // The daemon's own cgroup is exempt when it is a dedicated one (wl-daemon.service);
        // when it shares an intercepted cgroup with agents, only its own process is.
        if let Some(own) = cgroup::cgroup_of_pid(std::process::id()) {
            let own_dir = mount.join(own.trim_start_matches('/'));
            if let Ok(id) = cgroup::cgroup_id(&own_dir) {
                if own != "/" && !targets.iter().any(|t| t.id == id) {
                    exempt.push(id);
                }
            }
        }

        let object_id = hex::encode(Sha256::digest(EBPF_OBJECT));
        let pin_dir = cfg.pin_dir.clone();
        match cfg.fail {
            FailMode::Closed => prepare_pin_dir(&pin_dir, &object_id)?,
            // Switching from closed to open: whatever an earlier run pinned goes.
            FailMode::Open => clear_pin_dir(&pin_dir)?,
        }

        let level: u8 =
            if tracing::level_filters::LevelFilter::current() >= tracing::level_filters::LevelFilter::DEBUG {
                4
            } else {
                2
            };
        let mut loader = EbpfLoader::new();
        loader.override_global(aya_log::LEVEL, &level, false);
        let map_pins: Vec<(&str, PathBuf)> = maps::ALL
            .iter()
            .chain(std::iter::once(&LOG_MAP))
            .map(|name| (*name, pin_dir.join(format!("map-{name}"))))
            .collect();
        if cfg.fail == FailMode::Closed {
            for (name, path) in &map_pins {
                loader.map_pin_path(name, path.as_path());
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(|e| InterceptError::Load(chain(&e)))?;

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(spawn_kernel_log_reader(logger)),
            Err(e) => {
                tracing::warn!(error = %e, "kernel-side log unavailable");
                None
            }
        };

        let relay_attached = cfg.kernel_relay
            && match attach_relay(&mut ebpf) {
                Ok(()) => true,
                Err(message) => {
                    tracing::warn!(
                        error = %message,
                        "the kernel relay is not available on this kernel: spliced connections are relayed by the daemon"
                    );
                    false
                }
            };
        let pidns = own_pid_namespace();
        // The relay's flag goes on only once its setsockopt program is attached to every
        // cgroup (below): no socket joins the relay before kernel TLS can keep it out.
        write_maps(&mut ebpf, cfg, listeners, &exempt, pidns, false).map_err(InterceptError::Maps)?;
        // In a container, the connect programs that number pids as the daemon does; if the
        // kernel refuses them, the host-pid ones, and records' pids are not used.
        let mut pids_usable = true;
        let mut use_pidns_programs = pidns.is_some();

        let mut pinned = Vec::new();
        let mut owned = Vec::new();
        let mut relay_sockopt = Vec::new();
        let mut attached = Vec::new();
        let mut keep = BTreeSet::new();
        for target in &targets {
            let fd = File::open(&target.dir).map_err(|e| InterceptError::Attach {
                program: "cgroup",
                cgroup: target.name.clone(),
                message: e.to_string(),
            })?;
            // Not pinned even with `fail = "closed"`: it matters only for connections this
            // daemon relays, which end with it.
            if relay_attached {
                let link = attach_sockopt(&mut ebpf, &fd).map_err(|message| InterceptError::Attach {
                    program: programs::SETSOCKOPT,
                    cgroup: target.name.clone(),
                    message,
                })?;
                relay_sockopt.push(link);
            }
            for base in ALL_PROGRAMS {
                let prog = if use_pidns_programs { pidns_variant(base) } else { base };
                let pin_path = pin_dir.join(format!("link-{}-{}", target.id, prog));
                keep.insert(pin_path.clone());
                if cfg.fail == FailMode::Closed && pin_path.exists() {
                    // Taken over from the previous run: same object, same maps.
                    let link = PinnedLink::from_pin(&pin_path)
                        .map_err(|e| InterceptError::Pin { path: pin_path.clone(), message: chain(&e) })?;
                    pinned.push(link);
                    continue;
                }
                let link = match attach(&mut ebpf, prog, &fd) {
                    Err(message) if prog != base => {
                        tracing::warn!(
                            error = %message,
                            "this kernel does not offer pid namespaces to connect programs (Linux 6.10 does): \
                             agents' pids, executables and units are not recorded"
                        );
                        use_pidns_programs = false;
                        pids_usable = false;
                        attach(&mut ebpf, base, &fd)
                    }
                    other => other,
                }
                .map_err(|message| InterceptError::Attach { program: base, cgroup: target.name.clone(), message })?;
                if cfg.fail == FailMode::Closed {
                    let link = link
                        .pin(&pin_path)
                        .map_err(|e| InterceptError::Pin { path: pin_path.clone(), message: chain(&e) })?;
                    pinned.push(link);
                } else {
                    owned.push(link);
                }
            }
            attached.push(target.name.clone());
            tracing::debug!(cgroup = %target.name, cgroup_id = target.id, "attached");
        }
        if cfg.fail == FailMode::Closed {
            remove_stale_links(&pin_dir, &keep)?;
        }
        if relay_attached {
            write_maps(&mut ebpf, cfg, listeners, &exempt, pidns, true).map_err(InterceptError::Maps)?;
        }

        let by_peer =
            ebpf.take_map(maps::BY_PEER).ok_or_else(|| InterceptError::Maps("no BY_PEER map".into()))?;
        let by_peer = HashMap::try_from(by_peer).map_err(|e| InterceptError::Maps(chain(&e)))?;
        let relay = if relay_attached {
            Some(take_relay_maps(&mut ebpf).map_err(InterceptError::Maps)?)
        } else {
            None
        };
        Ok(Self {
            pinned,
            _owned: owned,
            _relay_sockopt: relay_sockopt,
            by_peer: Mutex::new(by_peer),
            logger,
            attached,
            pids_usable,
            relay,
            _ebpf: ebpf,
        })
    }

    /// The record of the connection whose client is `peer` (as seen from `accept()`),
    /// removed from the map: each record is used once.
    pub fn take_record(&self, peer: SocketAddr) -> Option<ConnRecord> {
        let key = peer_key(peer);
        let mut map = self.by_peer.lock().expect("BY_PEER lock poisoned");
        let mut rec: ConnRecord = map.get(&key, 0).ok()?;
        // Already read; a failed delete only leaves an entry for the LRU to age out.
        let _ = map.remove(&key);
        if !self.pids_usable {
            // Host pids, which name other processes (or none) in the daemon's namespace.
            rec.pid = 0;
            rec.tid = 0;
        }
        Some(rec)
    }

    /// The cgroups the programs are attached to.
    pub fn attached(&self) -> &[String] {
        &self.attached
    }

    /// How many links stay pinned when the daemon exits.
    pub fn pinned_links(&self) -> usize {
        self.pinned.len()
    }

    /// The kernel relay, when it is on.
    pub fn relay(&self) -> Option<&KernelRelay> {
        self.relay.as_ref()
    }
}

/// Loads the relay's `sk_msg` program and attaches it to the agent socket map.
fn attach_relay(ebpf: &mut Ebpf) -> Result<(), String> {
    let map = ebpf.map(maps::AGENT_SOCKS).ok_or("no AGENT_SOCKS map")?;
    let agents: SockHash<&MapData, u64> = SockHash::try_from(map).map_err(|e| chain(&e))?;
    let map_fd = agents.fd().try_clone().map_err(|e| e.to_string())?;
    let prog: &mut SkMsg = ebpf
        .program_mut(programs::RELAY_MSG)
        .ok_or("no relay program in the object")?
        .try_into()
        .map_err(|e| chain(&e))?;
    prog.load().map_err(|e| chain(&e))?;
    prog.attach(&map_fd).map_err(|e| chain(&e))?;
    Ok(())
}

fn take_relay_maps(ebpf: &mut Ebpf) -> Result<KernelRelay, String> {
    let mut take = |name: &str| ebpf.take_map(name).ok_or_else(|| format!("no {name} map"));
    let agents = SockHash::try_from(take(maps::AGENT_SOCKS)?).map_err(|e| chain(&e))?;
    let upstreams = SockHash::try_from(take(maps::UPSTREAM_SOCKS)?).map_err(|e| chain(&e))?;
    let state = HashMap::try_from(take(maps::RELAY_STATE)?).map_err(|e| chain(&e))?;
    let forwarded = HashMap::try_from(take(maps::RELAY_FORWARDED)?).map_err(|e| chain(&e))?;
    Ok(KernelRelay::new(agents, upstreams, state, forwarded))
}

impl Drop for Interceptor {
    fn drop(&mut self) {
        if let Some(task) = self.logger.take() {
            task.abort();
        }
    }
}

/// Every pinnable program, in attach order: sock_ops first so that no connection is
/// redirected before its record can be re-keyed. (The relay's setsockopt program is
/// attached apart: see `Interceptor::new`.)
const ALL_PROGRAMS: [&str; 7] = [
    programs::SOCK_OPS,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
    programs::SENDMSG4,
    programs::SENDMSG6,
    programs::CONNECT4,
    programs::CONNECT6,
];

/// The program to attach in place of `base` for a daemon in its own pid namespace.
fn pidns_variant(base: &'static str) -> &'static str {
    match base {
        programs::CONNECT4 => programs::CONNECT4_PIDNS,
        programs::CONNECT6 => programs::CONNECT6_PIDNS,
        other => other,
    }
}

/// The inode of the host's initial pid namespace (`PROC_PID_INIT_INO`, fixed by the kernel).
const INIT_PID_NAMESPACE_INODE: u64 = 0xEFFF_FFFC;

/// The daemon's pid namespace (device, inode) when it is not the host's (a container).
fn own_pid_namespace() -> Option<(u64, u64)> {
    let st = nix::sys::stat::stat("/proc/self/ns/pid").ok()?;
    let (dev, ino) = (st.st_dev, st.st_ino);
    (ino != INIT_PID_NAMESPACE_INODE).then_some((dev, ino))
}

fn attach(ebpf: &mut Ebpf, name: &'static str, cgroup: &File) -> Result<FdLink, String> {
    let prog = ebpf.program_mut(name).ok_or_else(|| format!("program {name} missing from the object"))?;
    // bpf_link attachments to cgroups are always multi-program; the kernel refuses flags.
    let mode = CgroupAttachMode::Single;
    if name == programs::SOCK_OPS {
        let p: &mut SockOps = prog.try_into().map_err(|e| chain(&e))?;
        if p.fd().is_err() {
            p.load().map_err(|e| chain(&e))?;
        }
        let id = p.attach(cgroup, mode).map_err(|e| chain(&e))?;
        let link = p.take_link(id).map_err(|e| chain(&e))?;
        FdLink::try_from(link).map_err(|e| chain(&e))
    } else {
        let p: &mut CgroupSockAddr = prog.try_into().map_err(|e| chain(&e))?;
        if p.fd().is_err() {
            p.load().map_err(|e| chain(&e))?;
        }
        let id = p.attach(cgroup, mode).map_err(|e| chain(&e))?;
        let link = p.take_link(id).map_err(|e| chain(&e))?;
        FdLink::try_from(link).map_err(|e| chain(&e))
    }
}

/// Attaches the relay's setsockopt program to one cgroup. The link is aya's own type (aya
/// 0.14 converts it to no `FdLink`, so it cannot be pinned like the others).
fn attach_sockopt(ebpf: &mut Ebpf, cgroup: &File) -> Result<CgroupSockoptLink, String> {
    let p: &mut CgroupSockopt = ebpf
        .program_mut(programs::SETSOCKOPT)
        .ok_or("the setsockopt program is missing from the object")?
        .try_into()
        .map_err(|e| chain(&e))?;
    if p.fd().is_err() {
        p.load().map_err(|e| chain(&e))?;
    }
    let id = p.attach(cgroup, CgroupAttachMode::Single).map_err(|e| chain(&e))?;
    p.take_link(id).map_err(|e| chain(&e))
}

fn write_maps(
    ebpf: &mut Ebpf,
    cfg: &InterceptConfig,
    listeners: &[SocketAddr],
    exempt: &[u64],
    pidns: Option<(u64, u64)>,
    kernel_relay: bool,
) -> Result<(), String> {
    let mut settings = Settings { daemon_tgid: std::process::id(), ..Default::default() };
    if let Some((dev, ino)) = pidns {
        settings.pidns_dev = dev;
        settings.pidns_ino = ino;
    }
    settings.flags = wl_common::FLAG_ENABLED;
    if cfg.block_quic {
        settings.flags |= wl_common::FLAG_BLOCK_QUIC;
    }
    if kernel_relay {
        settings.flags |= wl_common::FLAG_KERNEL_RELAY;
    }
    for addr in listeners {
        match addr {
            SocketAddr::V4(a) => {
                settings.listen_ip4 = u32::from_ne_bytes(a.ip().octets());
                settings.listen_port4 = a.port();
                settings.flags |= wl_common::FLAG_HAS_V4;
            }
            SocketAddr::V6(a) => {
                settings.listen_ip6 = ip6_words(a.ip());
                settings.listen_port6 = a.port();
                settings.flags |= wl_common::FLAG_HAS_V6;
            }
        }
    }

    // Maps may be reused from pins: clear what an earlier configuration left.
    {
        let mut ports: HashMap<_, u16, u32> =
            HashMap::try_from(ebpf.map_mut(maps::PORTS).ok_or("no PORTS map")?).map_err(|e| chain(&e))?;
        let old: Vec<u16> = ports.keys().filter_map(Result::ok).collect();
        for k in old {
            ports.remove(&k).map_err(|e| chain(&e))?;
        }
        for p in &cfg.ports {
            ports.insert(p, 1, 0).map_err(|e| chain(&e))?;
        }
    }
    {
        let mut ex: HashMap<_, u64, u32> =
            HashMap::try_from(ebpf.map_mut(maps::EXEMPT_CGROUPS).ok_or("no EXEMPT_CGROUPS map")?)
                .map_err(|e| chain(&e))?;
        let old: Vec<u64> = ex.keys().filter_map(Result::ok).collect();
        for k in old {
            ex.remove(&k).map_err(|e| chain(&e))?;
        }
        for id in exempt {
            ex.insert(id, 1, 0).map_err(|e| chain(&e))?;
        }
    }
    {
        let mut trie: LpmTrie<_, [u8; 16], u32> =
            LpmTrie::try_from(ebpf.map_mut(maps::EXCLUDED).ok_or("no EXCLUDED map")?)
                .map_err(|e| chain(&e))?;
        let old: Vec<Key<[u8; 16]>> = trie.keys().filter_map(Result::ok).collect();
        for k in old {
            trie.remove(&k).map_err(|e| chain(&e))?;
        }
        for net in &cfg.exclude {
            let (bytes, len) = match net.network() {
                IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), u32::from(net.prefix_len()) + 96),
                IpAddr::V6(v6) => (v6.octets(), u32::from(net.prefix_len())),
            };
            trie.insert(&Key::new(len, bytes), 1, 0).map_err(|e| chain(&e))?;
        }
    }
    let mut array: Array<_, Settings> =
        Array::try_from(ebpf.map_mut(maps::SETTINGS).ok_or("no SETTINGS map")?).map_err(|e| chain(&e))?;
    array.set(0, settings, 0).map_err(|e| chain(&e))?;
    Ok(())
}

/// The map key for a client address as `accept()` reports it.
pub fn peer_key(peer: SocketAddr) -> PeerKey {
    match peer {
        SocketAddr::V4(a) => v4_key(*a.ip(), a.port()),
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => v4_key(v4, a.port()),
            None => {
                PeerKey { family: u32::from(AF_INET6), port: u32::from(a.port()), addr: ip6_words(a.ip()) }
            }
        },
    }
}

fn v4_key(ip: Ipv4Addr, port: u16) -> PeerKey {
    PeerKey {
        family: u32::from(AF_INET),
        port: u32::from(port),
        addr: [u32::from_ne_bytes(ip.octets()), 0, 0, 0],
    }
}

fn ip6_words(ip: &Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
}

/// The original destination recorded by the kernel.
pub fn original_destination(rec: &ConnRecord) -> SocketAddr {
    if rec.family == AF_INET {
        SocketAddr::from((Ipv4Addr::from(rec.orig_ip[0].to_ne_bytes()), rec.orig_port))
    } else {
        let mut o = [0u8; 16];
        for (i, w) in rec.orig_ip.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        SocketAddr::from((Ipv6Addr::from(o), rec.orig_port))
    }
}

fn spawn_kernel_log_reader(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // SAFETY: the logger owns its ring buffer's fd for its whole life and always
        // returns that same fd; the AsyncFd owns the logger.
        let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "cannot poll the kernel-side log");
                return;
            }
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    })
}

/// Checks CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN in the effective set, so that a
/// missing privilege is reported as such rather than as a verifier or map error.
pub fn check_capabilities() -> Result<(), InterceptError> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    if (has(CAP_BPF) || has(CAP_SYS_ADMIN)) && has(CAP_NET_ADMIN) {
        Ok(())
    } else {
        Err(InterceptError::Privileges { have: format!("{eff:#x}") })
    }
}

fn ensure_bpffs(pin_dir: &Path) -> Result<(), InterceptError> {
    let err = |message: String| InterceptError::Pin { path: pin_dir.to_owned(), message };
    let parent = pin_dir.parent().ok_or_else(|| err("has no parent directory".into()))?;
    let is_bpffs = |p: &Path| {
        nix::sys::statfs::statfs(p).map(|s| s.filesystem_type().0 == libc::BPF_FS_MAGIC).unwrap_or(false)
    };
    if is_bpffs(parent) {
        return Ok(());
    }
    if parent == Path::new("/sys/fs/bpf") {
        // Systemd hosts mount it at boot; minimal hosts may not have.
        nix::mount::mount(Some("bpf"), parent, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .map_err(|e| err(format!("mounting bpffs on /sys/fs/bpf failed: {e}")))?;
        tracing::info!("mounted bpffs on /sys/fs/bpf");
        return Ok(());
    }
    Err(err(format!("`{}` is not a bpffs mount", parent.display())))
}

fn prepare_pin_dir(pin_dir: &Path, object_id: &str) -> Result<(), InterceptError> {
    ensure_bpffs(pin_dir)?;
    let err = |message: String| InterceptError::Pin { path: pin_dir.to_owned(), message };
    std::fs::create_dir_all(pin_dir).map_err(|e| err(e.to_string()))?;
    // bpffs holds only bpf objects and directories: the object id is the name of an empty
    // directory inside OBJECT_ID_FILE.
    let id_dir = pin_dir.join(OBJECT_ID_FILE);
    let previous = std::fs::read_dir(&id_dir)
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned());
    if previous.as_deref() != Some(object_id) {
        if previous.is_some() {
            tracing::warn!(
                "pinned programs are from another wl build: replacing them (interception pauses briefly)"
            );
        }
        clear_pin_dir(pin_dir)?;
        std::fs::create_dir_all(pin_dir).map_err(|e| err(e.to_string()))?;
        std::fs::create_dir_all(id_dir.join(object_id)).map_err(|e| err(e.to_string()))?;
    }
    Ok(())
}

/// Removes every pinned link and map of an earlier run (unpinning a link that nothing else
/// holds detaches it) and the directory itself.
pub fn clear_pin_dir(pin_dir: &Path) -> Result<(), InterceptError> {
    let err = |message: String| InterceptError::Pin { path: pin_dir.to_owned(), message };
    if !pin_dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(pin_dir).map_err(|e| err(e.to_string()))?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path).map_err(|e| err(e.to_string()))?;
        } else {
            std::fs::remove_file(&path).map_err(|e| err(e.to_string()))?;
        }
    }
    std::fs::remove_dir(pin_dir).map_err(|e| err(e.to_string()))
}

fn remove_stale_links(pin_dir: &Path, keep: &BTreeSet<PathBuf>) -> Result<(), InterceptError> {
    let entries = std::fs::read_dir(pin_dir)
        .map_err(|e| InterceptError::Pin { path: pin_dir.to_owned(), message: e.to_string() })?;
    for entry in entries.flatten() {
        let path = entry.path();
        let is_link = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("link-"));
        if is_link && !keep.contains(&path) {
            tracing::info!(pin = %path.display(), "detaching a cgroup no longer configured");
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(())
}

/// An error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_keys_match_the_kernel_layout() {
        let k = peer_key("127.0.0.1:40000".parse().unwrap());
        assert_eq!(k.family, u32::from(AF_INET));
        assert_eq!(k.port, 40000);
        assert_eq!(k.addr[0].to_ne_bytes(), [127, 0, 0, 1]);
        // An IPv4-mapped peer is keyed as IPv4, as sock_ops does.
        assert_eq!(peer_key("[::ffff:127.0.0.1]:40000".parse().unwrap()), k);
        let k6 = peer_key("[::1]:5".parse().unwrap());
        assert_eq!(k6.family, u32::from(AF_INET6));
        assert_eq!(k6.addr[3].to_ne_bytes(), [0, 0, 0, 1]);
    }

    #[test]
    fn original_destination_round_trips() {
        for addr in ["127.0.0.2:443", "[::1]:8443", "[2001:db8::7]:80"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let key = peer_key(addr);
            let rec = ConnRecord {
                orig_ip: key.addr,
                orig_port: addr.port(),
                family: key.family as u16,
                ..Default::default()
            };
            assert_eq!(original_destination(&rec), addr);
        }
    }
}
