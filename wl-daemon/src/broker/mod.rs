//! `wl-daemon broker` (wl-broker.service): the only process that holds secrets.
//!
//! It keeps the sealed secret store and the SCT signing keys ([`store`]), answers on a Unix
//! socket whose peers are checked by uid ([`protocol`]), applies its own Cedar policy
//! (`UseSecret`) before issuing a Secret Capability Token ([`sct`]), and hands a secret out
//! only against a token that verifies, is bound to the same agent, host, secret and
//! request, and has not been used before ([`ledger`]). Every issue, redemption, refusal
//! and change is written to its own audit trail (never a value).
//!
//! The process itself (state, socket, request handling) is `server.rs`. The proxy side is
//! [`client`]: after its policy allows a request to a host with a `[[credential]]`, the
//! proxy asks for a token and redeems it on one connection.

pub mod client;
pub mod ledger;
pub mod protocol;
pub mod sct;
mod server;
pub mod store;

pub use server::{isolate_network, run};

use std::time::SystemTime;

/// Clock difference tolerated between issue and redemption checks (the proxy and the
/// broker share a host, so this only covers clock steps).
pub const SKEW_MS: i64 = 5_000;

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
