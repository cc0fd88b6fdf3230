//! wl's kernel side: the programs that hand every intercepted agent connection to wl-daemon.
//!
//! In: socket calls of processes in the cgroups the daemon attached to, plus the settings,
//! ports, exemptions and exclusions the daemon wrote into maps. Out: a rewritten `connect()`
//! destination (wl's listener), a connection record keyed first by socket cookie and then,
//! once the connection is established, by the client's address and port (which is what the
//! daemon sees from `accept()`), the original peer restored in `getpeername()`, refused
//! UDP to port 443 when QUIC blocking is on, and (the kernel relay) spliced connections'
//! agent sends handed straight to the daemon's upstream socket, except on sockets whose
//! owner installed kernel TLS.
//!
//! Every entry point is `prog(ctx) { match try_prog(ctx) { .. } }`: a missing map entry or
//! helper failure lets the call through unchanged rather than breaking the agent's socket.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{bpf_pidns_info, bpf_sock_addr, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_get_ns_current_pid_tgid, bpf_get_socket_cookie,
    },
    macros::{cgroup_sock_addr, cgroup_sockopt, map, sk_msg, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, SockHash},
    programs::{SkMsgContext, SockAddrContext, SockOpsContext, SockoptContext},
};
use aya_log_ebpf::debug;
use wl_common::{
    ConnRecord, PeerKey, RelayState, Settings, AF_INET, AF_INET6, FLAG_BLOCK_QUIC, FLAG_ENABLED, FLAG_HAS_V4,
    FLAG_HAS_V6, FLAG_KERNEL_RELAY,
};

/// cgroup/sock_addr verdicts.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const QUIC_PORT: u16 = 443;

/// Capacity of the connection-record maps: records are deleted by the daemon on accept and
/// otherwise aged out by the LRU, so this bounds concurrent *pending* connects, not load.
const MAX_RECORDS: u32 = 65_536;

#[map(name = "WL_SETTINGS")]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map(name = "WL_PORTS")]
static PORTS: HashMap<u16, u32> = HashMap::with_max_entries(256, 0);

#[map(name = "WL_EXEMPT_CGROUPS")]
static EXEMPT_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(1024, 0);

#[map(name = "WL_EXCLUDED")]
static EXCLUDED: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(1024, 0);

#[map(name = "WL_BY_COOKIE")]
static BY_COOKIE: LruHashMap<u64, ConnRecord> = LruHashMap::with_max_entries(MAX_RECORDS, 0);

#[map(name = "WL_BY_PEER")]
static BY_PEER: LruHashMap<PeerKey, ConnRecord> = LruHashMap::with_max_entries(MAX_RECORDS, 0);

#[map(name = "WL_AGENT_SOCKS")]
static AGENT_SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_RECORDS, 0);

#[map(name = "WL_UPSTREAM_SOCKS")]
static UPSTREAM_SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_RECORDS, 0);

#[map(name = "WL_RELAY_STATE")]
static RELAY_STATE: LruHashMap<PeerKey, RelayState> = LruHashMap::with_max_entries(MAX_RECORDS, 0);

#[map(name = "WL_RELAY_FORWARDED")]
static RELAY_FORWARDED: LruHashMap<u64, u64> = LruHashMap::with_max_entries(MAX_RECORDS, 0);

/// `sk_msg` verdicts.
const SK_PASS: u32 = 1;

/// A destination in the form every program works with: network-order words, IPv4 in [0].
#[derive(Clone, Copy)]
struct Dest {
    family: u16,
    ip: [u32; 4],
    port: u16,
}

#[cgroup_sock_addr(connect4)]
pub fn wl_connect4(ctx: SockAddrContext) -> i32 {
    verdict(try_connect(&ctx, false, Pids::Host))
}

#[cgroup_sock_addr(connect6)]
pub fn wl_connect6(ctx: SockAddrContext) -> i32 {
    verdict(try_connect(&ctx, true, Pids::Host))
}

// The same two for a daemon in a container: separate programs, because a kernel that does
// not offer the pid-namespace helper to these program types refuses any program calling it.
#[cgroup_sock_addr(connect4)]
pub fn wl_connect4_pidns(ctx: SockAddrContext) -> i32 {
    verdict(try_connect(&ctx, false, Pids::DaemonNamespace))
}

#[cgroup_sock_addr(connect6)]
pub fn wl_connect6_pidns(ctx: SockAddrContext) -> i32 {
    verdict(try_connect(&ctx, true, Pids::DaemonNamespace))
}

/// Which pids a connection record carries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pids {
    /// As the host's initial pid namespace numbers them (the daemon runs there).
    Host,
    /// As the daemon's own pid namespace numbers them; 0 for a caller outside it, whose pid
    /// the daemon could not look up anyway.
    DaemonNamespace,
}

/// The caller's (tgid, tid).
#[inline(always)]
fn caller_pids(s: &Settings, pids: Pids) -> (u32, u32) {
    if pids == Pids::Host {
        let pid_tgid = bpf_get_current_pid_tgid();
        return ((pid_tgid >> 32) as u32, pid_tgid as u32);
    }
    let mut info = bpf_pidns_info { pid: 0, tgid: 0 };
    // SAFETY: `info` is a local of the size passed; the helper fills or zeroes it.
    let ok = unsafe {
        bpf_get_ns_current_pid_tgid(
            s.pidns_dev,
            s.pidns_ino,
            &mut info,
            core::mem::size_of::<bpf_pidns_info>() as u32,
        )
    } == 0;
    if ok {
        (info.tgid, info.pid)
    } else {
        (0, 0)
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn wl_sendmsg4(ctx: SockAddrContext) -> i32 {
    verdict(try_sendmsg(&ctx, false))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn wl_sendmsg6(ctx: SockAddrContext) -> i32 {
    verdict(try_sendmsg(&ctx, true))
}

#[cgroup_sock_addr(getpeername4)]
pub fn wl_getpeername4(ctx: SockAddrContext) -> i32 {
    verdict(try_getpeername(&ctx, false))
}

#[cgroup_sock_addr(getpeername6)]
pub fn wl_getpeername6(ctx: SockAddrContext) -> i32 {
    verdict(try_getpeername(&ctx, true))
}

/// Named `wl_sock_ops`, not `sockops`: a function named like its section collides with the
/// section symbol at link time.
#[sock_ops]
pub fn wl_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        if let Some((cookie, key)) = rekey_by_peer(&ctx) {
            if settings().is_some_and(|s| s.flags & FLAG_KERNEL_RELAY != 0) {
                // Only intercepted connections (those with a record) join the relay, with
                // a fresh state (replacing any an earlier socket of the same address left)
                // before their first send. A failed insert leaves the connection on the
                // daemon's path, which works.
                let fresh = RelayState { cookie, ..RelayState::default() };
                if RELAY_STATE.insert(&key, &fresh, 0).is_ok() {
                    // SAFETY: the context's own sock_ops pointer, valid for this call.
                    let _ = AGENT_SOCKS.update(cookie, unsafe { &mut *ctx.ops }, u64::from(BPF_NOEXIST));
                }
            }
        }
    }
    0
}

/// The kernel relay: runs on every send of an agent socket in `AGENT_SOCKS` (see
/// [`RelayState`]). Sends go to the daemon until the daemon has a spliced connection's
/// upstream socket in `UPSTREAM_SOCKS` and has forwarded every byte sent so far; from then
/// on they go straight into the upstream socket, and the daemon's socket sees only the end
/// of the stream.
#[sk_msg]
pub fn wl_relay_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the context's own message, read only.
    let msg = unsafe { &*ctx.msg };
    let key = local_key(msg.family, msg.local_port, msg.local_ip4, msg.local_ip6);
    let size = u64::from(msg.size);
    // No state (never created, or aged out of the LRU map): the daemon's path, for good,
    // since a count that did not start with the first send could switch too early.
    let Some(state) = RELAY_STATE.get_ptr_mut(&key) else {
        return SK_PASS;
    };
    // SAFETY: a map value, valid while the program runs; sends on one socket run one at
    // a time, so nothing else writes it meanwhile (the daemon only reads it).
    let state = unsafe { &mut *state };
    if state.daemon_only != 0 {
        return SK_PASS;
    }
    let mut cookie = state.cookie;
    if state.switched == 0 {
        // SAFETY: read only.
        let forwarded = unsafe { RELAY_FORWARDED.get(&cookie) };
        if forwarded != Some(&state.passed) {
            state.passed += size;
            return SK_PASS;
        }
        state.switched = 1;
    }
    // SK_DROP (the agent's send fails) only if the upstream socket is gone: the daemon
    // closes it when the connection has ended.
    UPSTREAM_SOCKS.redirect_msg(&ctx, &mut cookie, 0) as u32
}

/// `setsockopt()` level and option that install an upper-layer protocol on a TCP socket
/// (`SOL_TCP`, `TCP_ULP`): how kernel TLS starts.
const SOL_TCP: i32 = 6;
const TCP_ULP: i32 = 31;
/// cgroup/sockopt verdict: the kernel goes on with the call.
const SOCKOPT_ALLOW: i32 = 1;
/// The most of an option's value the kernel copies for the program (one page).
const SOCKOPT_COPIED_MAX: i32 = 4096;

/// Runs before every `setsockopt()` in the intercepted cgroups. Installing an upper-layer
/// protocol on a socket in the relay takes that socket off the relay for good
/// (`RelayState::daemon_only`): kernel TLS hands `sk_msg` programs each record's
/// plaintext, and a redirect would send it to the upstream unencrypted. The call itself
/// is never changed or refused.
#[cgroup_sockopt(setsockopt)]
pub fn wl_setsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: the context's own sockopt, valid for this call.
    let opt = unsafe { &mut *ctx.sockopt };
    if opt.level == SOL_TCP && opt.optname == TCP_ULP {
        // SAFETY: the socket of this call, which the kernel keeps for the program's run.
        let sk = unsafe { opt.__bindgen_anon_1.sk };
        if !sk.is_null() {
            // SAFETY: checked non-null; read only.
            let sk = unsafe { &*sk };
            // The agent's own address: the key its relay state has (as in the sk_msg
            // program, which sees the same socket from the sending side).
            let key = local_key(sk.family, sk.src_port, sk.src_ip4, sk.src_ip6);
            if let Some(state) = RELAY_STATE.get_ptr_mut(&key) {
                // SAFETY: a map value, valid while the program runs; the sk_msg program
                // reads the flag under the socket's lock, which the kernel takes only
                // after this program, before it installs the protocol.
                unsafe { (*state).daemon_only = 1 };
            }
        }
    }
    // An option longer than a page reaches the program cut to one page; 0 tells the kernel
    // to use the caller's own buffer (kernels before 6.5 fail the call otherwise).
    if opt.optlen > SOCKOPT_COPIED_MAX {
        opt.optlen = 0;
    }
    SOCKOPT_ALLOW
}

/// The key of a socket's own address (the agent's side), from whichever of its addresses
/// its family says is in use: what sock_ops, the relay's sk_msg and setsockopt programs all
/// see of one agent socket, and what the daemon sees from `accept()`.
#[inline(always)]
fn local_key(family: u32, port: u32, ip4: u32, ip6: [u32; 4]) -> PeerKey {
    if family == u32::from(AF_INET) {
        PeerKey { family: u32::from(AF_INET), port, addr: [ip4, 0, 0, 0] }
    } else {
        peer_key_v6(port, ip6)
    }
}

/// The key of an IPv6 socket's address (IPv4-mapped addresses as IPv4, as everywhere).
#[inline(always)]
fn peer_key_v6(port: u32, ip: [u32; 4]) -> PeerKey {
    if is_v4_mapped(&ip) {
        PeerKey { family: u32::from(AF_INET), port, addr: [ip[3], 0, 0, 0] }
    } else {
        PeerKey { family: u32::from(AF_INET6), port, addr: ip }
    }
}

/// The verifier insists that a cgroup/sock_addr program provably returns 0 or 1: spell the
/// two constants out rather than passing a computed value through.
#[inline(always)]
fn verdict(v: Option<i32>) -> i32 {
    if v == Some(REFUSE) {
        REFUSE
    } else {
        ALLOW
    }
}

fn settings() -> Option<&'static Settings> {
    SETTINGS.get(0)
}

fn sock_addr(ctx: &SockAddrContext) -> &mut bpf_sock_addr {
    // SAFETY: the kernel passes a valid context for the program's lifetime; field reads and
    // writes are checked by the verifier.
    unsafe { &mut *ctx.sock_addr }
}

/// The destination the caller asked for; IPv4-mapped IPv6 is reported as IPv4.
fn user_dest(sa: &bpf_sock_addr, v6: bool) -> Dest {
    let port = u16::from_be(sa.user_port as u16);
    if !v6 {
        return Dest { family: AF_INET, ip: [sa.user_ip4, 0, 0, 0], port };
    }
    let ip = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]];
    if is_v4_mapped(&ip) {
        Dest { family: AF_INET, ip: [ip[3], 0, 0, 0], port }
    } else {
        Dest { family: AF_INET6, ip, port }
    }
}

fn is_v4_mapped(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == 0xffffu32.to_be()
}

/// Is the caller (`tgid`) the daemon itself or in an exempt cgroup?
fn caller_exempt(s: &Settings, tgid: u32, pids: Pids) -> bool {
    // A host pid says nothing about a daemon in a container (`pidns_ino` set): there its
    // cgroup, always exempt, is what keeps its own connections direct.
    let comparable = pids == Pids::DaemonNamespace || s.pidns_ino == 0;
    if comparable && tgid == s.daemon_tgid {
        return true;
    }
    // SAFETY: helper without arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    EXEMPT_CGROUPS.get_ptr(&cgroup).is_some()
}

fn excluded(d: &Dest) -> bool {
    let mut bytes = [0u8; 16];
    let prefix_len = if d.family == AF_INET {
        bytes[10] = 0xff;
        bytes[11] = 0xff;
        bytes[12..16].copy_from_slice(&d.ip[0].to_ne_bytes());
        128
    } else {
        let mut i = 0;
        while i < 4 {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&d.ip[i].to_ne_bytes());
            i += 1;
        }
        128
    };
    EXCLUDED.get(Key::new(prefix_len, bytes)).is_some()
}

#[inline(always)]
fn try_connect(ctx: &SockAddrContext, v6: bool, pids: Pids) -> Option<i32> {
    let s = settings()?;
    if s.flags & FLAG_ENABLED == 0 {
        return Some(ALLOW);
    }
    let sa = sock_addr(ctx);
    let dest = user_dest(sa, v6);
    let sock_type = sa.type_;
    if sock_type == SOCK_DGRAM {
        return Some(quic_verdict(ctx, s, &dest, pids));
    }
    if sock_type != SOCK_STREAM || PORTS.get_ptr(&dest.port).is_none() {
        return Some(ALLOW);
    }
    let (tgid, tid) = caller_pids(s, pids);
    if caller_exempt(s, tgid, pids) {
        return Some(ALLOW);
    }
    // Which listener can this socket reach? An AF_INET socket only an IPv4 one; an AF_INET6
    // socket going to an IPv4-mapped address the IPv4 listener through its mapped form.
    let to_v4 = dest.family == AF_INET;
    if (to_v4 && s.flags & FLAG_HAS_V4 == 0) || (!to_v4 && s.flags & FLAG_HAS_V6 == 0) {
        return Some(ALLOW);
    }
    if is_listener(s, &dest) || excluded(&dest) {
        return Some(ALLOW);
    }

    // SAFETY: the cookie helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
    let uid_gid = bpf_get_current_uid_gid();
    let record = ConnRecord {
        orig_ip: dest.ip,
        orig_port: dest.port,
        family: dest.family,
        pid: tgid,
        tid,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        reserved: 0,
        // SAFETY: helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
        cookie,
    };
    // No record, no redirect: the daemon could not tell where the connection was going.
    BY_COOKIE.insert(&cookie, &record, 0).ok()?;

    if !v6 {
        sa.user_ip4 = s.listen_ip4;
        sa.user_port = (s.listen_port4.to_be()) as u32;
    } else if to_v4 {
        sa.user_ip6[0] = 0;
        sa.user_ip6[1] = 0;
        sa.user_ip6[2] = 0xffffu32.to_be();
        sa.user_ip6[3] = s.listen_ip4;
        sa.user_port = (s.listen_port4.to_be()) as u32;
    } else {
        sa.user_ip6[0] = s.listen_ip6[0];
        sa.user_ip6[1] = s.listen_ip6[1];
        sa.user_ip6[2] = s.listen_ip6[2];
        sa.user_ip6[3] = s.listen_ip6[3];
        sa.user_port = (s.listen_port6.to_be()) as u32;
    }
    debug!(ctx, "redirect pid {} port {}", record.pid, dest.port);
    Some(ALLOW)
}

fn is_listener(s: &Settings, d: &Dest) -> bool {
    if d.family == AF_INET {
        d.ip[0] == s.listen_ip4 && d.port == s.listen_port4
    } else {
        d.ip == s.listen_ip6 && d.port == s.listen_port6
    }
}

/// UDP to port 443 is QUIC in practice; refusing it makes HTTP/3 clients fall back to TCP,
/// which wl can see.
#[inline(always)]
fn quic_verdict(ctx: &SockAddrContext, s: &Settings, dest: &Dest, pids: Pids) -> i32 {
    if s.flags & FLAG_BLOCK_QUIC != 0
        && dest.port == QUIC_PORT
        && !caller_exempt(s, caller_pids(s, pids).0, pids)
    {
        debug!(ctx, "refused udp to port 443 (block_quic)");
        return REFUSE;
    }
    ALLOW
}

#[inline(always)]
fn try_sendmsg(ctx: &SockAddrContext, v6: bool) -> Option<i32> {
    let s = settings()?;
    if s.flags & FLAG_ENABLED == 0 {
        return Some(ALLOW);
    }
    let sa = sock_addr(ctx);
    let dest = user_dest(sa, v6);
    // sendmsg has one variant: its caller is matched by cgroup, or by host pid.
    Some(quic_verdict(ctx, s, &dest, Pids::Host))
}

/// The agent asked who it is talking to: answer with the original destination rather than
/// wl's listener.
#[inline(always)]
fn try_getpeername(ctx: &SockAddrContext, v6: bool) -> Option<i32> {
    // SAFETY: the cookie helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
    let record = BY_COOKIE.get_ptr(&cookie)?;
    // SAFETY: the pointer comes from a successful lookup and is only read.
    let record = unsafe { &*record };
    let sa = sock_addr(ctx);
    sa.user_port = (record.orig_port.to_be()) as u32;
    if !v6 {
        sa.user_ip4 = record.orig_ip[0];
    } else if record.family == AF_INET {
        sa.user_ip6[0] = 0;
        sa.user_ip6[1] = 0;
        sa.user_ip6[2] = 0xffffu32.to_be();
        sa.user_ip6[3] = record.orig_ip[0];
    } else {
        sa.user_ip6[0] = record.orig_ip[0];
        sa.user_ip6[1] = record.orig_ip[1];
        sa.user_ip6[2] = record.orig_ip[2];
        sa.user_ip6[3] = record.orig_ip[3];
    }
    Some(ALLOW)
}

/// Copies the record of a redirected connection under the client's local address and port,
/// the only key the daemon's accepted socket can name, adding the socket's cookie. Returns
/// the cookie and that key when the connection was redirected.
fn rekey_by_peer(ctx: &SockOpsContext) -> Option<(u64, PeerKey)> {
    // SAFETY: the cookie helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    let record = BY_COOKIE.get_ptr(&cookie)?;
    let key = local_key(ctx.family(), ctx.local_port(), ctx.local_ip4(), ctx.local_ip6());
    // SAFETY: the pointer comes from a successful lookup and is only read.
    let mut record = unsafe { *record };
    record.cookie = cookie;
    BY_PEER.insert(&key, &record, 0).ok()?;
    Some((cookie, key))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
