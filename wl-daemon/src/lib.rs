//! wl-daemon: the enforcement layer between AI agents and the APIs they call.
//!
//! Modules follow one connection's path (see docs/architecture.md):
//! [`intercept`] (eBPF programs, original destination, agent identity) →
//! [`proxy`] (listeners, relaying) → [`audit`] (the trail). [`config`] is read by all and
//! depends on none; [`daemon`] wires them together for `wl-daemon run`.

pub mod admin;
pub mod audit;
pub mod broker;
pub mod config;
pub mod daemon;
pub mod intercept;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod service;
pub mod tls;
