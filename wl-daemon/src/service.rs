//! Telling systemd how the service is doing (`Type=notify`): `READY=1` once every
//! listener is bound and the programs are attached, `RELOADING=1` ... `READY=1` around a
//! reload, `STOPPING=1` when shutdown starts, and `WATCHDOG=1` at half the unit's
//! `WatchdogSec=` while the runtime is responsive. Without `NOTIFY_SOCKET` (not under
//! systemd) each of these does nothing.

use sd_notify::NotifyState;

fn send(state: NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(false, &[state]) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Started and serving.
pub fn ready() {
    send(NotifyState::Ready);
}

/// Reloading its configuration; [`ready`] follows.
pub fn reloading() {
    send(NotifyState::Reloading);
}

/// Shutting down.
pub fn stopping() {
    send(NotifyState::Stopping);
}

/// Starts the watchdog keep-alive when the unit asks for one: a task on the runtime, so a
/// runtime that stops making progress stops the pings and systemd restarts the service.
pub fn watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    let every = std::time::Duration::from_micros(usec / 2);
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            send(NotifyState::Watchdog);
        }
    }))
}
