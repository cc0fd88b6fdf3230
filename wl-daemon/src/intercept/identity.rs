//! Who made a connection: the kernel's record (pid, uid, gid, cgroup id, comm) enriched from
//! `/proc` and the user database (executable, cgroup path, systemd unit, user name).
//!
//! Short-lived agents may exit before the daemon looks; then the kernel's facts stand alone
//! and the cgroup path comes from the id (see [`CgroupNames`]).

use std::{collections::HashMap, sync::Mutex};

use serde::Serialize;
use wl_common::ConnRecord;

use super::cgroup::{cgroup_of_pid, unit_of_cgroup, CgroupNames};

/// The agent behind one connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
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
}

impl IdentityResolver {
    /// A resolver for cgroups under `cgroups`.
    pub fn new(cgroups: CgroupNames) -> Self {
        Self {
            cgroups,
            users: Mutex::new(HashMap::new()),
        }
    }

    /// Everything known about the caller of a recorded connection.
    pub fn resolve(&self, rec: &ConnRecord) -> AgentIdentity {
        let exe = std::fs::read_link(format!("/proc/{}/exe", rec.pid))
            .ok()
            .map(|p| p.display().to_string());
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

    fn user_name(&self, uid: u32) -> Option<String> {
        let mut users = self.users.lock().expect("user cache poisoned");
        users
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            })
            .clone()
    }
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
        let id =
            super::super::cgroup::cgroup_id(&mount.join(path.trim_start_matches('/'))).unwrap();
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
        assert_eq!(
            ident.exe,
            std::env::current_exe()
                .ok()
                .map(|p| p.display().to_string())
        );
        assert_eq!(
            ident.user.as_deref(),
            Some("root")
                .filter(|_| rec.uid == 0)
                .or(ident.user.as_deref())
        );
    }
}
