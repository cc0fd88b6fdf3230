//! The kernel relay: the agent-to-upstream half of a spliced connection relayed inside the
//! kernel, from the agent's socket straight into the daemon's upstream socket.
//!
//! Why: a spliced byte otherwise crosses two TCP connections on the host (agent to daemon,
//! daemon to upstream), and the first one's kernel work is most of what the splice path
//! costs (docs/profile.md, "Splice path"). With the relay, an `sk_msg` program on the
//! agent's socket hands each send to the upstream socket's transmit path directly: one TCP
//! connection's work, in the agent's own `send()`, with the upstream socket's buffer as
//! the agent's backpressure. The upstream-to-agent half stays on splice(2).
//!
//! How the switch keeps the stream in order (see `wl_common::RelayState`): intercepted
//! agent sockets join `AGENT_SOCKS` when they connect; their sends reach the daemon as
//! usual and are counted by the program. Once the daemon has decided to splice and holds
//! the upstream socket, it adds that socket under the agent socket's cookie and publishes,
//! whenever it has nothing left to read, how many of the agent's bytes it has written to
//! the upstream socket. The first send that finds that number equal to its own count goes
//! straight to the upstream socket, and so do all later ones; since every earlier byte is
//! already in the upstream socket, nothing overtakes anything. The agent's end of stream
//! still reaches the daemon's socket, which passes it on as before.
//!
//! Connections that are not spliced leave `AGENT_SOCKS` as soon as the daemon knows
//! (their sockets go back to the kernel's plain TCP code).

use std::{os::fd::AsRawFd, sync::Mutex};

use aya::maps::{HashMap, MapData, SockHash};
use wl_common::{PeerKey, RelayState};

/// The relay's maps, as the daemon uses them.
pub struct KernelRelay {
    agents: Mutex<SockHash<MapData, u64>>,
    upstreams: Mutex<SockHash<MapData, u64>>,
    state: Mutex<HashMap<MapData, PeerKey, RelayState>>,
    forwarded: Mutex<HashMap<MapData, u64, u64>>,
}

impl std::fmt::Debug for KernelRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelRelay").finish_non_exhaustive()
    }
}

impl KernelRelay {
    /// The relay over the object's maps.
    pub fn new(
        agents: SockHash<MapData, u64>,
        upstreams: SockHash<MapData, u64>,
        state: HashMap<MapData, PeerKey, RelayState>,
        forwarded: HashMap<MapData, u64, u64>,
    ) -> Self {
        Self {
            agents: Mutex::new(agents),
            upstreams: Mutex::new(upstreams),
            state: Mutex::new(state),
            forwarded: Mutex::new(forwarded),
        }
    }

    /// The agent socket `cookie`, accepted from `peer`, takes part in the relay when its
    /// connection is spliced ([`RelayedConnection::join`]); dropping the handle without
    /// that takes the socket out of the relay.
    pub fn connection(&self, cookie: u64, peer: std::net::SocketAddr) -> RelayedConnection<'_> {
        RelayedConnection { relay: self, cookie, key: super::peer_key(peer), joined: false }
    }
}

/// One intercepted connection's part in the relay; its entries go when it is dropped.
pub struct RelayedConnection<'a> {
    relay: &'a KernelRelay,
    /// The agent socket's cookie: the key of the daemon's maps.
    cookie: u64,
    /// The agent socket's address: the key of its state.
    key: PeerKey,
    joined: bool,
}

impl RelayedConnection<'_> {
    /// The agent socket goes back to the kernel's plain TCP code and its state goes.
    fn leave(&self) {
        let _ = self.relay.agents.lock().expect("relay map lock").remove(&self.cookie);
        let mut state = self.relay.state.lock().expect("relay map lock");
        // Only this socket's: a later socket of the same address may have its own by now.
        if state.get(&self.key, 0).is_ok_and(|s| s.cookie == self.cookie) {
            let _ = state.remove(&self.key);
        }
    }

    /// The connection is spliced to `upstream`: the agent's sends may go straight there
    /// once the daemon has forwarded what came before ([`Self::forwarded`]). False when
    /// the kernel refused (the daemon then relays everything itself, as without the relay).
    pub fn join(&mut self, upstream: &impl AsRawFd) -> bool {
        if let Err(e) =
            self.relay.upstreams.lock().expect("relay map lock").insert(self.cookie, upstream.as_raw_fd(), 0)
        {
            tracing::debug!(error = %e, cookie = self.cookie, "kernel relay: upstream socket not added");
            return false;
        }
        self.joined = true;
        true
    }

    /// The daemon has written `total` of the agent's bytes to the upstream socket and has
    /// nothing more to read for now.
    pub fn forwarded(&self, total: u64) {
        if self.joined {
            let _ = self.relay.forwarded.lock().expect("relay map lock").insert(self.cookie, total, 0);
        }
    }
}

impl Drop for RelayedConnection<'_> {
    fn drop(&mut self) {
        // Each removal may find nothing (never added, or the kernel removed a closed
        // socket); the LRU maps would age out anything left.
        self.leave();
        if self.joined {
            let _ = self.relay.upstreams.lock().expect("relay map lock").remove(&self.cookie);
            let _ = self.relay.forwarded.lock().expect("relay map lock").remove(&self.cookie);
        }
    }
}
