//! Admission of new connections: at most [`HANDSHAKE_SLOTS`] connections at a time are
//! between accept and the end of their TLS handshake; the others wait, accepted, for a slot.
//!
//! Why: a TLS handshake is the most CPU a connection costs (key exchange, the leaf's
//! signature), and when thousands of agents connect at once (a fleet starting, a network
//! coming back) their handshakes all become runnable together. Without a limit, the
//! requests of connections that are already established queue behind those handshakes,
//! and every one of them holds its buffers while it waits: memory grows with the storm,
//! not with the load. With the gate, established connections keep their latency, the
//! handshakes are served in arrival order at the rate the CPU allows, and a waiting
//! connection costs only its socket and a small task.
//!
//! A slot is held for at most [`SLOT_LEASE`]: a client that stalls in its handshake (or a
//! hostile one that opens many connections and sends nothing) gives its slot up and goes on
//! under its own timeout (`tls.handshake_timeout`), so it cannot hold the gate shut.
//!
//! The same kind of gate, with [`RESUME_SLOTS`], stands before parked keep-alive
//! connections that resume (`proxy::park`): when thousands of agents send their next
//! request at once, each resumed connection gets its HTTP state back (buffers, the request,
//! its upstream stream, about 28 KB), and the burst, not the load, would set the memory.

use std::{
    future::Future,
    sync::{atomic::AtomicU64, Arc},
    time::Duration,
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use crate::metrics::{InFlight, METRICS};

/// Connections that may be in their handshake at once. Enough to keep both cores busy while
/// some handshakes wait for their client's next flight; few enough that established
/// connections are never queued behind many.
pub const HANDSHAKE_SLOTS: usize = 64;

/// The longest a connection keeps its slot.
pub const SLOT_LEASE: Duration = Duration::from_millis(250);

/// Parked connections that may be resumed and serving a request at once. A quick request
/// holds its slot about a millisecond, so this limits memory in a burst, not throughput;
/// 1,024 requests in flight are about 28 MB.
pub const RESUME_SLOTS: usize = 1024;

/// The gate every new connection passes (or, built with [`Gate::resumptions`], every
/// parked connection that resumes).
#[derive(Debug, Clone)]
pub struct Gate {
    slots: Arc<Semaphore>,
    /// The gauge of connections waiting for a slot.
    waiting: &'static AtomicU64,
}

impl Default for Gate {
    fn default() -> Self {
        Self::new(HANDSHAKE_SLOTS)
    }
}

impl Gate {
    /// A gate for handshakes with `slots` slots.
    pub fn new(slots: usize) -> Self {
        Self { slots: Arc::new(Semaphore::new(slots)), waiting: &METRICS.connections_waiting }
    }

    /// The gate for parked connections that resume, with `slots` slots.
    pub fn resumptions(slots: usize) -> Self {
        Self { slots: Arc::new(Semaphore::new(slots)), waiting: &METRICS.resumptions_waiting }
    }

    /// Waits for a slot (first come, first served).
    pub async fn enter(&self) -> Slot {
        let waiting = InFlight::enter(self.waiting);
        let permit = self.slots.clone().acquire_owned().await.expect("the gate's semaphore is never closed");
        drop(waiting);
        Slot { permit: Some(permit), expires: Instant::now() + SLOT_LEASE }
    }
}

/// A connection's place in its handshake phase; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    expires: Instant,
}

impl Slot {
    /// Runs `step` of the handshake phase; if the lease runs out first, the slot is freed
    /// and `step` goes on without it.
    pub async fn hold<F: Future>(&mut self, step: F) -> F::Output {
        if self.permit.is_none() {
            return step.await;
        }
        tokio::pin!(step);
        tokio::select! {
            biased;
            out = &mut step => out,
            _ = tokio::time::sleep_until(self.expires) => {
                self.permit = None;
                step.await
            }
        }
    }

    /// Whether the slot is still held.
    pub fn is_held(&self) -> bool {
        self.permit.is_some()
    }

    /// When the lease runs out.
    pub fn expires(&self) -> Instant {
        self.expires
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn slots_are_limited_and_freed_on_drop() {
        let gate = Gate::new(2);
        let a = gate.enter().await;
        let _b = gate.enter().await;
        // The third waits until one is dropped.
        let third = tokio::spawn({
            let gate = gate.clone();
            async move { gate.enter().await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!third.is_finished(), "a third connection got a slot of two");
        drop(a);
        let c = tokio::time::timeout(Duration::from_secs(1), third).await.expect("slot freed").unwrap();
        assert!(c.is_held());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_step_gives_its_slot_up_after_the_lease() {
        let gate = Gate::new(1);
        let mut stalled = gate.enter().await;
        let stalled_step = tokio::spawn(async move {
            // A client that never sends the rest of its handshake.
            stalled.hold(tokio::time::sleep(Duration::from_secs(3600))).await;
            stalled
        });
        // Someone else gets the only slot once the lease has run out, long before the
        // stalled step ends.
        let next =
            tokio::time::timeout(SLOT_LEASE * 2, gate.enter()).await.expect("the lease frees the slot");
        assert!(next.is_held());
        assert!(!stalled_step.is_finished());
        stalled_step.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_quick_step_keeps_the_slot() {
        let gate = Gate::new(1);
        let mut slot = gate.enter().await;
        assert_eq!(slot.hold(async { 7 }).await, 7);
        assert!(slot.is_held());
        assert!(tokio::time::timeout(Duration::from_millis(1), gate.enter()).await.is_err());
    }
}
