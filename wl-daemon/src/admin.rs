//! The admin socket: `wlctl status`, `wlctl mode` and `wlctl reload` talk to the running
//! daemon here. A Unix socket (mode 0600) that also checks the peer's uid (root or the
//! daemon's own); one JSON request line in, one JSON response line out.

use std::{path::Path, sync::Arc, time::Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::{config::Mode, policy::PolicyStore, reload::Reloader};

/// A request on the socket.
#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum AdminRequest {
    /// Mode, policies, attached cgroups, listeners, uptime.
    Status,
    /// Switch the global mode.
    Mode {
        /// The new mode.
        mode: Mode,
    },
    /// Reload the configuration file and the policy directory (`crate::reload`).
    Reload,
}

/// What the daemon reports in `status`.
#[derive(Debug)]
pub struct AdminState {
    /// Policies and mode.
    pub policy: Arc<PolicyStore>,
    /// Attached cgroups.
    pub cgroups: Vec<String>,
    /// Listener addresses.
    pub listeners: Vec<String>,
    /// When the daemon started.
    pub started: Instant,
    /// What `reload` runs.
    pub reloader: Arc<Reloader>,
}

/// Errors binding the socket.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on the admin socket `{}`: {source} (check admin_socket and its directory)", path.display())]
pub struct AdminError {
    path: std::path::PathBuf,
    #[source]
    source: std::io::Error,
}

/// Binds the socket (replacing a stale one) with mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let err = |source| AdminError { path: path.to_owned(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // The state-directory lock guarantees no other daemon owns it.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(err)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Serves requests until the task is dropped.
pub async fn serve(listener: UnixListener, state: Arc<AdminState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &state).await {
                tracing::debug!(error = %e, "admin request failed");
            }
        });
    }
}

async fn handle(stream: UnixStream, state: &AdminState) -> std::io::Result<()> {
    let me = nix::unistd::geteuid().as_raw();
    let peer = stream.peer_cred()?.uid();
    let (rd, mut wr) = stream.into_split();
    if peer != 0 && peer != me {
        tracing::warn!(uid = peer, "admin socket: refused a request from an unprivileged user");
        let reply = json!({"ok": false, "error": "permission denied: wlctl must run as root"});
        return wr.write_all(format!("{reply}\n").as_bytes()).await;
    }
    let mut line = String::new();
    BufReader::new(tokio::io::AsyncReadExt::take(rd, 64 * 1024)).read_line(&mut line).await?;
    let reply = match serde_json::from_str::<AdminRequest>(&line) {
        Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        Ok(AdminRequest::Status) => {
            let engine = state.policy.current();
            json!({
                "ok": true,
                "version": env!("CARGO_PKG_VERSION"),
                "mode": state.policy.mode(),
                "host_modes": state.policy.host_modes(),
                "policies": {"source": engine.source, "count": engine.count},
                "cgroups": state.cgroups,
                "listeners": state.listeners,
                "uptime_s": state.started.elapsed().as_secs(),
                "requests": crate::metrics::METRICS.requests_by_decision(),
                "audit": {
                    "records": crate::metrics::METRICS.audit_records.load(std::sync::atomic::Ordering::Relaxed),
                    "dropped": crate::metrics::METRICS.audit_dropped.load(std::sync::atomic::Ordering::Relaxed),
                    "write_errors": crate::metrics::METRICS.audit_write_errors.load(std::sync::atomic::Ordering::Relaxed),
                    "waiting_for_disk": crate::metrics::METRICS.audit_retained.load(std::sync::atomic::Ordering::Relaxed),
                },
            })
        }
        Ok(AdminRequest::Mode { mode }) => {
            let previous = state.policy.mode();
            state.policy.set_mode(mode);
            tracing::info!(?previous, ?mode, "mode switched by wlctl");
            json!({"ok": true, "mode": mode, "previous": previous})
        }
        Ok(AdminRequest::Reload) => match state.reloader.reload("wlctl reload") {
            Ok(r) => {
                json!({"ok": true, "policies": r.policies, "mode": r.mode, "restart_needed": r.restart_needed})
            }
            Err(e) => json!({"ok": false, "error": e}),
        },
    };
    wr.write_all(format!("{reply}\n").as_bytes()).await
}

/// Client side (wlctl): sends one request, returns the reply.
pub async fn request(path: &Path, req: &AdminRequest) -> Result<serde_json::Value, String> {
    let stream = UnixStream::connect(path).await.map_err(|e| {
        format!(
            "cannot reach wl-daemon at `{}`: {e} (is it running? is admin_socket the same?)",
            path.display()
        )
    })?;
    let (rd, mut wr) = stream.into_split();
    let line = serde_json::to_string(req).expect("requests serialize");
    wr.write_all(format!("{line}\n").as_bytes()).await.map_err(|e| e.to_string())?;
    let mut reply = String::new();
    BufReader::new(rd).read_line(&mut reply).await.map_err(|e| e.to_string())?;
    serde_json::from_str(&reply).map_err(|e| format!("bad reply from wl-daemon: {e}"))
}
