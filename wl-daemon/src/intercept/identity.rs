//! Who made a connection: the kernel's record (pid, uid, gid, cgroup id, comm) enriched from
//! `/proc` and the user database (executable, cgroup path, systemd unit, user name).
//!
//! Short-lived agents may exit before the daemon looks; then the kernel's facts stand alone
//! and the cgroup path comes from the id (see [`CgroupNames`]).
//!
//! Identities are shared: every connection of one agent thread holds the same
//! `Arc<AgentIdentity>`, and so does every audit record of its requests. A host with
//! thousands of keep-alive connections from a few agents keeps a few identities rather
//! than one set of strings per connection, and a request's record costs no string copies.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
};

use serde::{Deserialize, Serialize};
use wl_common::ConnRecord;

use super::cgroup::{cgroup_of_pid, unit_of_cgroup, CgroupNames};

/// The agent behind one connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AgentIdentity {
    /// Process id (tgid).
    pub pid: u32,
    /// Thread that called `connect()`.
    pub tid: u32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// User name, when the uid has one.
    pub user: Option<String>,
    /// Task name at connect time.
    pub comm: String,
    /// Executable path, when the process was still there.
    pub exe: Option<String>,
    /// cgroup2 path.
    pub cgroup: Option<String>,
    /// cgroup v2 id.
    pub cgroup_id: u64,
    /// systemd unit (service, scope or slice), when the cgroup belongs to one.
    pub unit: Option<String>,
}

/// Builds [`AgentIdentity`] values, caching what rarely changes (user names, cgroup paths).
#[derive(Debug)]
pub struct IdentityResolver {
    cgroups: CgroupNames,
    users: Mutex<HashMap<u32, Option<String>>>,
    shared: Mutex<Interned>,
}

/// The identities in use, each once. Entries whose last holder has gone are swept when the
/// map has doubled since the last sweep, so it stays within twice the identities in use (or
/// [`INTERNED_SWEEP_MIN`] entries).
#[derive(Debug, Default)]
struct Interned {
    map: HashMap<AgentIdentity, Weak<AgentIdentity>>,
    sweep_at: usize,
}

/// The map's size below which it is never swept.
const INTERNED_SWEEP_MIN: usize = 256;

impl Interned {
    fn share(&mut self, identity: AgentIdentity) -> Arc<AgentIdentity> {
        if let Some(existing) = self.map.get(&identity).and_then(Weak::upgrade) {
            return existing;
        }
        if self.map.len() >= self.sweep_at.max(INTERNED_SWEEP_MIN) {
            self.map.retain(|_, held| held.strong_count() > 0);
            self.sweep_at = self.map.len() * 2;
        }
        let shared = Arc::new(identity.clone());
        self.map.insert(identity, Arc::downgrade(&shared));
        shared
    }
}

impl IdentityResolver {
    /// A resolver for cgroups under `cgroups`.
    pub fn new(cgroups: CgroupNames) -> Self {
        Self { cgroups, users: Mutex::new(HashMap::new()), shared: Mutex::new(Interned::default()) }
    }

    /// Everything known about the caller of a recorded connection, shared with the other
    /// connections of the same agent thread.
    pub fn resolve(&self, rec: &ConnRecord) -> Arc<AgentIdentity> {
        let identity = self.identity_of(rec);
        self.shared.lock().expect("identity map poisoned").share(identity)
    }

    /// Everything known about the caller of a recorded connection, looked up afresh.
    fn identity_of(&self, rec: &ConnRecord) -> AgentIdentity {
        let exe = std::fs::read_link(format!("/proc/{}/exe", rec.pid)).ok().map(|p| p.display().to_string());
        let hint = cgroup_of_pid(rec.pid);
        let cgroup = self.cgroups.path_of(rec.cgroup_id, hint.as_deref());
        let unit = cgroup.as_deref().and_then(unit_of_cgroup);
        AgentIdentity {
            pid: rec.pid,
            tid: rec.tid,
            uid: rec.uid,
            gid: rec.gid,
            user: self.user_name(rec.uid),
            comm: comm_string(&rec.comm),
            exe,
            cgroup,
            cgroup_id: rec.cgroup_id,
            unit,
        }
    }

    /// The identity behind a loopback TCP client of an explicit listener (`peer`, accepted
    /// on `local`), where no kernel record exists: the socket's owner and inode from
    /// `sock_diag` (`/proc/net/tcp{,6}` if that fails), the process holding it from
    /// `/proc/*/fd` of that owner's processes. `None` when the socket is not local or
    /// already gone.
    pub fn resolve_tcp_peer(
        &self,
        peer: std::net::SocketAddr,
        local: std::net::SocketAddr,
    ) -> Option<Arc<AgentIdentity>> {
        let (uid, inode) = super::sockdiag::lookup(peer, local).or_else(|| find_tcp_socket(peer))?;
        let Some(pid) = find_pid_holding(inode, uid) else {
            // The uid is still worth recording.
            return Some(Arc::new(AgentIdentity {
                pid: 0,
                tid: 0,
                uid,
                gid: 0,
                user: self.user_name(uid),
                comm: String::new(),
                exe: None,
                cgroup: None,
                cgroup_id: 0,
                unit: None,
            }));
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let gid = status
            .lines()
            .find_map(|l| l.strip_prefix("Gid:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let comm_text = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let mut comm = [0u8; 16];
        let bytes = comm_text.trim_end().as_bytes();
        comm[..bytes.len().min(15)].copy_from_slice(&bytes[..bytes.len().min(15)]);
        let cgroup_id = cgroup_of_pid(pid)
            .and_then(|p| {
                super::cgroup::cgroup_id(&self.cgroups.mount().join(p.trim_start_matches('/'))).ok()
            })
            .unwrap_or(0);
        let rec = ConnRecord { pid, tid: pid, uid, gid, cgroup_id, comm, ..Default::default() };
        Some(self.resolve(&rec))
    }

    fn user_name(&self, uid: u32) -> Option<String> {
        let mut users = self.users.lock().expect("user cache poisoned");
        users
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten().map(|u| u.name)
            })
            .clone()
    }
}

/// Finds the TCP socket whose local address is `addr`: (owner uid, inode).
pub(super) fn find_tcp_socket(addr: std::net::SocketAddr) -> Option<(u32, u64)> {
    let file = if addr.is_ipv4() { "/proc/net/tcp" } else { "/proc/net/tcp6" };
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let local = parse_proc_net_addr(f.get(1)?)?;
        (local == addr).then(|| Some((f.get(7)?.parse().ok()?, f.get(9)?.parse().ok()?)))?
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): words in host order.
pub fn parse_proc_net_addr(field: &str) -> Option<std::net::SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::to_ne_bytes);
    let ip: std::net::IpAddr = match ip.len() {
        8 => std::net::Ipv4Addr::from(word(ip)?).into(),
        32 => {
            let mut o = [0u8; 16];
            for i in 0..4 {
                o[4 * i..4 * i + 4].copy_from_slice(&word(&ip[8 * i..8 * i + 8])?);
            }
            std::net::Ipv6Addr::from(o).into()
        }
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port))
}

/// The process of user `uid` with a descriptor on socket `inode` (scans that user's
/// processes in /proc; bounded by the host).
fn find_pid_holding(inode: u64, uid: u32) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let target = format!("socket:[{inode}]");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|proc_entry| {
        let pid: u32 = proc_entry.file_name().to_str()?.parse().ok()?;
        // /proc/PID belongs to the process's effective uid, which owns its sockets.
        if pid == std::process::id() || proc_entry.metadata().ok()?.uid() != uid {
            return None;
        }
        let fds = std::fs::read_dir(proc_entry.path().join("fd")).ok()?;
        fds.flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()))
            .then_some(pid)
    })
}

/// The NUL-padded `comm` as text.
pub fn comm_string(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_addresses() {
        let v4 = parse_proc_net_addr("0100007F:1F90").unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(v4, "127.0.0.1:8080".parse().unwrap());
            let v6 = parse_proc_net_addr("00000000000000000000000001000000:0050").unwrap();
            assert_eq!(v6, "[::1]:80".parse().unwrap());
        }
        assert!(parse_proc_net_addr("zz:1").is_none());
    }

    #[test]
    fn finds_the_owner_of_a_local_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (uid, inode) = find_tcp_socket(c.local_addr().unwrap()).expect("socket listed");
        assert_eq!(uid, nix::unistd::getuid().as_raw());
        assert!(inode > 0);
    }

    fn identity(pid: u32) -> AgentIdentity {
        AgentIdentity {
            pid,
            tid: pid,
            uid: 1000,
            gid: 1000,
            user: Some("agent".into()),
            comm: "python3".into(),
            exe: Some("/usr/bin/python3".into()),
            cgroup: Some("/agents.slice/bot.service".into()),
            cgroup_id: 7,
            unit: Some("bot.service".into()),
        }
    }

    #[test]
    fn connections_of_one_agent_share_its_identity() {
        let mut interned = Interned::default();
        let a = interned.share(identity(10));
        let again = interned.share(identity(10));
        assert!(Arc::ptr_eq(&a, &again));
        let other = interned.share(identity(11));
        assert!(!Arc::ptr_eq(&a, &other));
        assert_eq!(*other, identity(11));
        // Once its last holder is gone, an identity is made afresh (not resurrected).
        drop((a, again));
        let fresh = interned.share(identity(10));
        assert_eq!(Arc::strong_count(&fresh), 1);
    }

    #[test]
    fn identities_no_longer_held_are_swept() {
        let mut interned = Interned::default();
        let kept: Vec<_> = (0..10).map(|pid| interned.share(identity(pid))).collect();
        for pid in 100..100 + INTERNED_SWEEP_MIN as u32 * 4 {
            drop(interned.share(identity(pid)));
        }
        // Swept whenever it reached twice its size after the last sweep: never more than
        // the held identities plus that many again.
        assert!(interned.map.len() <= INTERNED_SWEEP_MIN + kept.len(), "{}", interned.map.len());
        for (pid, held) in kept.iter().enumerate() {
            assert!(Arc::ptr_eq(held, &interned.share(identity(pid as u32))));
        }
    }

    #[test]
    fn comm_stops_at_nul() {
        let mut c = [0u8; 16];
        c[..4].copy_from_slice(b"curl");
        assert_eq!(comm_string(&c), "curl");
        assert_eq!(comm_string(&[b'x'; 16]), "x".repeat(16));
    }

    #[test]
    fn resolves_this_process() {
        let mount = super::super::cgroup::cgroup2_mount().expect("cgroup2 is mounted here");
        let me = std::process::id();
        let path = cgroup_of_pid(me).expect("own cgroup");
        let id = super::super::cgroup::cgroup_id(&mount.join(path.trim_start_matches('/'))).unwrap();
        let rec = ConnRecord {
            pid: me,
            tid: me,
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            cgroup_id: id,
            ..Default::default()
        };
        let ident = IdentityResolver::new(CgroupNames::new(mount)).resolve(&rec);
        assert_eq!(ident.cgroup.as_deref(), Some(path.as_str()));
        assert_eq!(ident.exe, std::env::current_exe().ok().map(|p| p.display().to_string()));
        assert_eq!(ident.user.as_deref(), Some("root").filter(|_| rec.uid == 0).or(ident.user.as_deref()));
    }
}
