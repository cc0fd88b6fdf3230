//! cgroup v2 facts from the file system: where the hierarchy is mounted, a cgroup's id, and
//! the way back from an id (what the kernel records) to a path and a systemd unit.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

/// Errors about the cgroup hierarchy.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup2 file system in `/proc/self/mountinfo`.
    #[error(
        "no cgroup2 file system is mounted: mount one (mount -t cgroup2 none /sys/fs/cgroup) and start again"
    )]
    NoCgroup2,
    /// `/proc/self/mountinfo` could not be read.
    #[error("cannot read /proc/self/mountinfo: {0}")]
    MountInfo(#[source] std::io::Error),
    /// A configured cgroup does not exist.
    #[error("cgroup `{cgroup}` does not exist (looked for {}): create it or fix intercept.cgroups", path.display())]
    Missing {
        /// As configured.
        cgroup: String,
        /// Where it was looked for.
        path: PathBuf,
    },
}

/// Finds the cgroup2 mount point in a mountinfo text (`/proc/self/mountinfo`).
pub fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mount-point options [optional...] - fstype ...
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// The cgroup2 mount of this machine.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::MountInfo)?;
    find_cgroup2_mount(&text).ok_or(CgroupError::NoCgroup2)
}

/// The directory of a configured cgroup (`"/agents.slice"`) under the mount.
pub fn cgroup_dir(mount: &Path, cgroup: &str) -> Result<PathBuf, CgroupError> {
    let dir = mount.join(cgroup.trim_start_matches('/'));
    if dir.join("cgroup.procs").exists() {
        Ok(dir)
    } else {
        Err(CgroupError::Missing { cgroup: cgroup.to_owned(), path: dir })
    }
}

/// The cgroup v2 id of a cgroup directory: its inode number, which is what
/// `bpf_get_current_cgroup_id()` returns.
pub fn cgroup_id(dir: &Path) -> std::io::Result<u64> {
    Ok(std::fs::metadata(dir)?.ino())
}

/// The cgroup2 path of a process from `/proc/PID/cgroup` (the `0::` line).
pub fn cgroup_of_pid(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    parse_proc_cgroup(&text)
}

/// The `0::PATH` entry of a `/proc/PID/cgroup` text.
pub fn parse_proc_cgroup(text: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix("0::")).map(|p| p.trim().to_owned())
}

/// The systemd unit a cgroup path belongs to: the innermost `.service` or `.scope`
/// component, or the innermost `.slice` when there is neither.
pub fn unit_of_cgroup(path: &str) -> Option<String> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    parts
        .iter()
        .rev()
        .find(|p| p.ends_with(".service") || p.ends_with(".scope"))
        .or_else(|| parts.iter().rev().find(|p| p.ends_with(".slice")))
        .map(|p| (*p).to_owned())
}

/// Maps cgroup ids back to paths. Consulted when `/proc/PID` is already gone or disagrees
/// with the id the kernel recorded; walks the hierarchy once per unknown id.
#[derive(Debug)]
pub struct CgroupNames {
    mount: PathBuf,
    known: Mutex<HashMap<u64, String>>,
}

impl CgroupNames {
    /// Names under `mount`.
    pub fn new(mount: PathBuf) -> Self {
        Self { mount, known: Mutex::new(HashMap::new()) }
    }

    /// The cgroup2 mount point.
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// The path of the cgroup with this id, preferring `hint` (from `/proc`) when it matches.
    pub fn path_of(&self, id: u64, hint: Option<&str>) -> Option<String> {
        if let Some(hint) = hint {
            let dir = self.mount.join(hint.trim_start_matches('/'));
            if cgroup_id(&dir).ok() == Some(id) {
                self.known.lock().expect("cgroup name cache poisoned").insert(id, hint.to_owned());
                return Some(hint.to_owned());
            }
        }
        if let Some(p) = self.known.lock().expect("cgroup name cache poisoned").get(&id) {
            return Some(p.clone());
        }
        let found = self.walk(id)?;
        self.known.lock().expect("cgroup name cache poisoned").insert(id, found.clone());
        Some(found)
    }

    fn walk(&self, id: u64) -> Option<String> {
        let mut stack = vec![self.mount.clone()];
        // Bounded: a host has thousands of cgroups at most; stop rather than spin.
        let mut budget = 100_000usize;
        while let Some(dir) = stack.pop() {
            if cgroup_id(&dir).ok() == Some(id) {
                let rel = dir.strip_prefix(&self.mount).ok()?;
                return Some(format!("/{}", rel.display()));
            }
            for entry in std::fs::read_dir(&dir).ok()?.flatten() {
                budget = budget.checked_sub(1)?;
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(entry.path());
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_a_hybrid_host() {
        let mi = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                  40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
                  41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(find_cgroup2_mount(mi), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(find_cgroup2_mount("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"), None);
    }

    #[test]
    fn units_from_paths() {
        assert_eq!(unit_of_cgroup("/system.slice/agent.service").as_deref(), Some("agent.service"));
        assert_eq!(
            unit_of_cgroup("/user.slice/user-0.slice/session-3.scope").as_deref(),
            Some("session-3.scope")
        );
        assert_eq!(unit_of_cgroup("/agents.slice").as_deref(), Some("agents.slice"));
        assert_eq!(unit_of_cgroup("/wl-test-1"), None);
        assert_eq!(unit_of_cgroup("/"), None);
    }

    #[test]
    fn proc_cgroup_v2_line() {
        let text = "12:pids:/user.slice\n0::/system.slice/ssh.service\n";
        assert_eq!(parse_proc_cgroup(text).as_deref(), Some("/system.slice/ssh.service"));
    }
}
