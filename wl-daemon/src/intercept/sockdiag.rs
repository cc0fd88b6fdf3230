//! One TCP socket's owner (uid) and inode, by its exact address pair, from the kernel's
//! `sock_diag` netlink interface (`sock_diag(7)`, `inet_diag`): a hash lookup in the
//! kernel, where reading `/proc/net/tcp` walks every socket on the host, and a busy host
//! has tens of thousands in TIME_WAIT (milliseconds per read).
//!
//! The layouts are the kernel's ABI (`linux/netlink.h`, `linux/inet_diag.h`): a 16-byte
//! `nlmsghdr`, then `inet_diag_req_v2` (56 bytes) in the request and `inet_diag_msg` in the
//! answer. Without `NLM_F_DUMP`, a request with the full address pair and no cookie asks
//! for exactly that socket.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
};

use nix::sys::socket::{
    recv, sendto, setsockopt, socket, sockopt::ReceiveTimeout, AddressFamily, MsgFlags, NetlinkAddr,
    SockFlag, SockProtocol, SockType,
};
use nix::sys::time::{TimeVal, TimeValLike as _};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_HDR: usize = 16;
const REQUEST_LEN: usize = NLMSG_HDR + 56;
/// In `inet_diag_msg`: family, state, timer, retrans (4), the socket id (48), expires,
/// rqueue, wqueue (12), then uid and inode.
const UID_AT: usize = NLMSG_HDR + 64;
const INODE_AT: usize = NLMSG_HDR + 68;

/// The (uid, inode) of the TCP socket whose local address is `local` and whose peer is
/// `remote`; `None` when there is none or the kernel does not answer.
pub fn lookup(local: SocketAddr, remote: SocketAddr) -> Option<(u32, u64)> {
    let (local, remote) = (unmapped(local), unmapped(remote));
    if local.is_ipv4() != remote.is_ipv4() {
        return None;
    }
    let request = request(local, remote);
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .ok()?;
    // The kernel answers at once; the bound only guards against the unexpected.
    setsockopt(&fd, ReceiveTimeout, &TimeVal::milliseconds(200)).ok()?;
    sendto(fd.as_raw_fd(), &request, &NetlinkAddr::new(0, 0), MsgFlags::empty()).ok()?;
    let mut answer = [0u8; 512];
    let n = recv(fd.as_raw_fd(), &mut answer, MsgFlags::empty()).ok()?;
    parse(&answer[..n])
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is (the socket is AF_INET).
fn unmapped(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, |v4| SocketAddr::new(v4.into(), a.port())),
        IpAddr::V4(_) => a,
    }
}

fn request(local: SocketAddr, remote: SocketAddr) -> [u8; REQUEST_LEN] {
    let mut r = [0u8; REQUEST_LEN];
    r[0..4].copy_from_slice(&(REQUEST_LEN as u32).to_ne_bytes());
    r[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    r[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    r[8..12].copy_from_slice(&1u32.to_ne_bytes()); // sequence number
    let b = NLMSG_HDR;
    r[b] = if local.is_ipv4() { libc::AF_INET as u8 } else { libc::AF_INET6 as u8 };
    r[b + 1] = libc::IPPROTO_TCP as u8;
    r[b + 4..b + 8].copy_from_slice(&u32::MAX.to_ne_bytes()); // every state
    let id = b + 8;
    r[id..id + 2].copy_from_slice(&local.port().to_be_bytes());
    r[id + 2..id + 4].copy_from_slice(&remote.port().to_be_bytes());
    let octets = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => {
            let mut o = [0u8; 16];
            o[..4].copy_from_slice(&v4.octets());
            o
        }
        IpAddr::V6(v6) => v6.octets(),
    };
    r[id + 4..id + 20].copy_from_slice(&octets(local));
    r[id + 20..id + 36].copy_from_slice(&octets(remote));
    // Interface 0; cookie INET_DIAG_NOCOOKIE (both words all ones).
    r[id + 40..id + 48].fill(0xff);
    r
}

fn parse(answer: &[u8]) -> Option<(u32, u64)> {
    let word = |at: usize| Some(u32::from_ne_bytes(answer.get(at..at + 4)?.try_into().ok()?));
    let kind = u16::from_ne_bytes(answer.get(4..6)?.try_into().ok()?);
    // NLMSG_ERROR (not found) or anything else: no answer.
    if kind != SOCK_DIAG_BY_FAMILY {
        return None;
    }
    Some((word(UID_AT)?, u64::from(word(INODE_AT)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real connection: its client socket is found by its address pair, with this
    /// process's uid and the inode `/proc/net/tcp` lists for it; a pair that is not a
    /// socket is not found.
    #[test]
    fn finds_a_loopback_client_socket() {
        for ip in ["127.0.0.1", "::1"] {
            let server = std::net::TcpListener::bind((ip, 0)).unwrap();
            let client = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
            let (_accepted, peer) = server.accept().unwrap();
            let (uid, inode) = lookup(peer, server.local_addr().unwrap()).expect("the client socket");
            assert_eq!(uid, nix::unistd::geteuid().as_raw());
            assert_eq!(
                Some((uid, inode)),
                super::super::identity::find_tcp_socket(client.local_addr().unwrap())
            );
            let mut other = peer;
            other.set_port(1);
            assert_eq!(lookup(other, server.local_addr().unwrap()), None);
        }
    }
}
