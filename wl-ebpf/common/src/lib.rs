//! Types shared by wl's eBPF programs (`wl-ebpf`) and wl-daemon.
//!
//! In: nothing; out: `#[repr(C)]` structs with no implicit padding, map names and flag bits.
//! Both sides must agree on every byte, so every struct has a compile-time size check and
//! uses `u32` flags rather than `bool`. Addresses are kept in network byte order exactly as
//! the kernel hands them over (`[u32; 4]`, IPv4 in element 0); ports are in host order.
#![no_std]

/// `AF_INET`, as stored in [`ConnRecord::family`] and [`PeerKey::family`].
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as stored in [`ConnRecord::family`] and [`PeerKey::family`].
pub const AF_INET6: u16 = 10;

/// [`Settings::flags`]: interception is on (cleared while the daemon reconfigures).
pub const FLAG_ENABLED: u32 = 1;
/// [`Settings::flags`]: refuse UDP to port 443 so that QUIC clients fall back to TCP.
pub const FLAG_BLOCK_QUIC: u32 = 1 << 1;
/// [`Settings::flags`]: the IPv4 listener fields are valid.
pub const FLAG_HAS_V4: u32 = 1 << 2;
/// [`Settings::flags`]: the IPv6 listener fields are valid.
pub const FLAG_HAS_V6: u32 = 1 << 3;
/// [`Settings::flags`]: put intercepted agent sockets into [`maps::AGENT_SOCKS`], so that a
/// spliced connection's agent-to-upstream bytes can be relayed inside the kernel (the
/// daemon loaded and attached the `sk_msg` program).
pub const FLAG_KERNEL_RELAY: u32 = 1 << 4;

/// Names of the maps in the eBPF object; user space looks them up by these names.
pub mod maps {
    /// `Array<Settings>` with one entry.
    pub const SETTINGS: &str = "WL_SETTINGS";
    /// `HashMap<u16 port (host order), u32>`: destination ports that are intercepted.
    pub const PORTS: &str = "WL_PORTS";
    /// `HashMap<u64 cgroup id, u32>`: cgroups whose connections are never redirected.
    pub const EXEMPT_CGROUPS: &str = "WL_EXEMPT_CGROUPS";
    /// `LpmTrie<[u8; 16], u32>`: destinations never redirected (IPv4 as `::ffff:a.b.c.d`).
    pub const EXCLUDED: &str = "WL_EXCLUDED";
    /// `LruHashMap<u64 socket cookie, ConnRecord>`: written by connect4/6.
    pub const BY_COOKIE: &str = "WL_BY_COOKIE";
    /// `LruHashMap<PeerKey, ConnRecord>`: written by sock_ops, read (and deleted) by the daemon.
    pub const BY_PEER: &str = "WL_BY_PEER";
    /// `SockHash<u64 socket cookie>`: intercepted agent sockets, added by sock_ops when
    /// `FLAG_KERNEL_RELAY` is set; the `sk_msg` program runs on their sends. The daemon
    /// removes a socket once its connection is not spliced.
    pub const AGENT_SOCKS: &str = "WL_AGENT_SOCKS";
    /// `SockHash<u64 agent socket cookie>`: the daemon's upstream socket of each spliced
    /// connection, where the agent's sends go once the relay has switched.
    pub const UPSTREAM_SOCKS: &str = "WL_UPSTREAM_SOCKS";
    /// `LruHashMap<PeerKey of the agent socket, RelayState>`: created by sock_ops, then
    /// written by `sk_msg` only (which cannot read a socket's cookie, only its addresses).
    pub const RELAY_STATE: &str = "WL_RELAY_STATE";
    /// `LruHashMap<u64 agent socket cookie, u64>`: written by the daemon only: how many of
    /// the agent's bytes it has handed to the upstream socket so far.
    pub const RELAY_FORWARDED: &str = "WL_RELAY_FORWARDED";
    /// Every map of the object, for pinning (`intercept.fail = "closed"`).
    pub const ALL: [&str; 10] = [
        SETTINGS,
        PORTS,
        EXEMPT_CGROUPS,
        EXCLUDED,
        BY_COOKIE,
        BY_PEER,
        AGENT_SOCKS,
        UPSTREAM_SOCKS,
        RELAY_STATE,
        RELAY_FORWARDED,
    ];
}

/// Names of the programs in the eBPF object.
pub mod programs {
    /// `cgroup/connect4`: redirects TCP connects, refuses UDP connects to 443.
    pub const CONNECT4: &str = "wl_connect4";
    /// `cgroup/connect6`: the same for IPv6 and IPv4-mapped IPv6.
    pub const CONNECT6: &str = "wl_connect6";
    /// `CONNECT4` for a daemon in a pid namespace of its own (a container): records the
    /// caller's pid in the daemon's namespace (`bpf_get_ns_current_pid_tgid`, Linux 6.10+
    /// in these program types) instead of the host's.
    pub const CONNECT4_PIDNS: &str = "wl_connect4_pidns";
    /// `CONNECT6` likewise.
    pub const CONNECT6_PIDNS: &str = "wl_connect6_pidns";
    /// `cgroup/sendmsg4`: refuses unconnected UDP sends to 443.
    pub const SENDMSG4: &str = "wl_sendmsg4";
    /// `cgroup/sendmsg6`: the same for IPv6.
    pub const SENDMSG6: &str = "wl_sendmsg6";
    /// `cgroup/getpeername4`: restores the original peer for the agent.
    pub const GETPEERNAME4: &str = "wl_getpeername4";
    /// `cgroup/getpeername6`: the same for IPv6.
    pub const GETPEERNAME6: &str = "wl_getpeername6";
    /// `sock_ops`: re-keys the connection record by the client's address and port.
    pub const SOCK_OPS: &str = "wl_sock_ops";
    /// `sk_msg` on [`super::maps::AGENT_SOCKS`]: the kernel relay of spliced connections.
    pub const RELAY_MSG: &str = "wl_relay_msg";
    /// `cgroup/setsockopt`: takes a socket out of the kernel relay for good when its owner
    /// installs an upper-layer protocol on it (`TCP_ULP`: kernel TLS).
    pub const SETSOCKOPT: &str = "wl_setsockopt";
}

/// Interception settings, written by the daemon into a one-entry array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// IPv6 listener address, network byte order.
    pub listen_ip6: [u32; 4],
    /// IPv4 listener address, network byte order.
    pub listen_ip4: u32,
    /// IPv4 listener port, host order.
    pub listen_port4: u16,
    /// IPv6 listener port, host order.
    pub listen_port6: u16,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// The daemon's own process id (tgid) in its pid namespace: never redirected.
    pub daemon_tgid: u32,
    /// The daemon's pid namespace (`stat /proc/self/ns/pid`: device and inode), for the
    /// `*_PIDNS` programs, which record pids as the daemon sees them.
    pub pidns_dev: u64,
    /// See `pidns_dev`.
    pub pidns_ino: u64,
}

/// What the kernel knew when an agent called `connect()`: the original destination and the
/// caller. Written under the socket cookie, then copied under the client's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnRecord {
    /// Original destination address, network byte order (IPv4 in element 0).
    pub orig_ip: [u32; 4],
    /// Original destination port, host order.
    pub orig_port: u16,
    /// `AF_INET` or `AF_INET6` for `orig_ip` (IPv4-mapped IPv6 is recorded as `AF_INET`).
    pub family: u16,
    /// Process id (tgid) of the caller.
    pub pid: u32,
    /// Thread id of the caller.
    pub tid: u32,
    /// Real user id of the caller.
    pub uid: u32,
    /// Real group id of the caller.
    pub gid: u32,
    /// Always zero; keeps `cgroup_id` 8-byte aligned without implicit padding.
    pub reserved: u32,
    /// cgroup v2 id of the caller (the inode number of its cgroup directory).
    pub cgroup_id: u64,
    /// The caller's `comm` (task name), NUL padded.
    pub comm: [u8; 16],
    /// The agent socket's cookie (set by sock_ops when it re-keys the record): the key of
    /// the kernel relay's maps.
    pub cookie: u64,
}

/// What the `sk_msg` program knows about one agent socket of the kernel relay.
///
/// Until `switched`, the agent's sends go the normal way, to the daemon's accepted socket,
/// and are counted in `passed`. The program switches on a send that finds the daemon's
/// `RELAY_FORWARDED` count equal to `passed`: every byte sent before it is then already in
/// the upstream socket, so sending this one straight there keeps the stream in order.
/// Sends on one socket run one at a time (under the socket's lock), so plain fields do.
///
/// `daemon_only` keeps a socket on the daemon's path for good, switched or not: it is set
/// when the agent installs an upper-layer protocol on the socket (`TCP_ULP`). With kernel
/// TLS, the kernel runs `sk_msg` programs on the *plaintext* of each record and a redirect
/// sends that plaintext, unencrypted, to the other socket; on the daemon's path the
/// records are encrypted first, as the agent expects.
///
/// Keyed by the agent's address, which a later socket may reuse: `cookie` says which
/// socket the entry belongs to (sock_ops writes a fresh entry for every new socket before
/// the socket can send), and the daemon's maps are keyed by it, so an entry can never send
/// one connection's bytes into another's upstream socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayState {
    /// The agent socket's cookie.
    pub cookie: u64,
    /// Bytes sent to the daemon's socket before the switch.
    pub passed: u64,
    /// 1 once the sends go straight to the upstream socket.
    pub switched: u32,
    /// 1 once the agent asked for an upper-layer protocol on the socket: from then on its
    /// sends go to the daemon, whatever `switched` says.
    pub daemon_only: u32,
}

/// A connection as the daemon sees it from `accept()`: the client's address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// `AF_INET` or `AF_INET6` (IPv4-mapped addresses are keyed as `AF_INET`).
    pub family: u32,
    /// Client port, host order.
    pub port: u32,
    /// Client address, network byte order (IPv4 in element 0, the rest zero).
    pub addr: [u32; 4],
}

const _: () = assert!(core::mem::size_of::<Settings>() == 48);
const _: () = assert!(core::mem::size_of::<ConnRecord>() == 72);
const _: () = assert!(core::mem::size_of::<RelayState>() == 24);
const _: () = assert!(core::mem::size_of::<PeerKey>() == 24);

#[cfg(feature = "user")]
mod user {
    // SAFETY: all four are #[repr(C)] plain integers and arrays with no padding (sizes
    // asserted above), so every bit pattern is valid.
    unsafe impl aya::Pod for super::Settings {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PeerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RelayState {}
}
