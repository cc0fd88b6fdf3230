//! The client side of the broker's socket: the proxy's [`BrokerClient`] (a small pool of
//! connections, an issue-then-redeem round trip per credential) and [`call`] for wlctl.

use std::{
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{
        unix::{OwnedReadHalf, OwnedWriteHalf},
        UnixStream,
    },
};
use zeroize::Zeroizing;

use super::{
    protocol::{BrokerRequest, Poller, Reply, Use, MAX_LINE},
    store::SecretValue,
};

/// Why the proxy did not get a credential.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The broker could not be reached or did not answer in time.
    #[error("secrets broker unavailable at `{}`: {why}", socket.display())]
    Unavailable {
        /// Its socket.
        socket: PathBuf,
        /// What happened.
        why: String,
    },
    /// The broker answered no.
    #[error("secrets broker refused ({code}): {message}")]
    Refused {
        /// Its error code.
        code: String,
        /// Its message.
        message: String,
    },
}

impl CredentialError {
    /// The code recorded in the audit trail and the agent's error.
    pub fn code(&self) -> &str {
        match self {
            CredentialError::Unavailable { .. } => "broker_unavailable",
            CredentialError::Refused { code, .. } => code,
        }
    }
}

/// One connection to the broker.
struct Conn {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
}

impl Conn {
    async fn open(socket: &Path) -> std::io::Result<Self> {
        let (rd, wr) = UnixStream::connect(socket).await?.into_split();
        Ok(Self { rd: BufReader::new(rd), wr })
    }

    /// Sends one request and reads one reply. Buffers that held a secret are zeroed.
    async fn call(&mut self, req: &BrokerRequest, poller: &Poller) -> std::io::Result<Reply> {
        let mut line = Zeroizing::new(serde_json::to_vec(req).expect("requests serialize"));
        line.push(b'\n');
        self.wr.write_all(&line).await?;
        // Polling only pays while nothing else in this process waits for the CPU.
        let others_busy = crate::metrics::METRICS.requests_in_flight.load(Ordering::Relaxed) > 1;
        poller.wait(&self.rd, others_busy).await;
        let mut reply = Zeroizing::new(Vec::with_capacity(512));
        (&mut self.rd).take(MAX_LINE).read_until(b'\n', &mut reply).await?;
        if reply.last() != Some(&b'\n') {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the broker closed the connection",
            ));
        }
        serde_json::from_slice(&reply)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad reply: {e}")))
    }
}

/// The proxy's handle on the broker.
pub struct BrokerClient {
    socket: PathBuf,
    timeout: Duration,
    idle: Mutex<Vec<Conn>>,
    /// Shared by all connections: whether the broker answers fast enough to poll for it.
    poller: Poller,
}

impl std::fmt::Debug for BrokerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerClient").field("socket", &self.socket).finish()
    }
}

/// Connections kept open for reuse.
const IDLE_MAX: usize = 16;

impl BrokerClient {
    /// A client for the broker at `socket`; nothing is connected until first use.
    pub fn new(socket: PathBuf, timeout: Duration) -> Self {
        Self { socket, timeout, idle: Mutex::new(Vec::new()), poller: Poller::default() }
    }

    /// Obtains the secret for one use: asks for a token, then redeems it, on one
    /// connection. Returns the secret and the token's id.
    pub async fn obtain(&self, use_: Use) -> Result<(SecretValue, String), CredentialError> {
        let unavailable = |why: String| CredentialError::Unavailable { socket: self.socket.clone(), why };
        let work = async {
            let reused = self.idle.lock().expect("broker pool poisoned").pop();
            let mut conn = match reused {
                Some(c) => c,
                None => Conn::open(&self.socket).await.map_err(|e| unavailable(e.to_string()))?,
            };
            let issued = match conn.call(&BrokerRequest::Issue(use_.clone()), &self.poller).await {
                Ok(r) => r,
                // A pooled connection the broker closed (it restarted): one fresh try.
                Err(_) => {
                    conn = Conn::open(&self.socket).await.map_err(|e| unavailable(e.to_string()))?;
                    conn.call(&BrokerRequest::Issue(use_.clone()), &self.poller)
                        .await
                        .map_err(|e| unavailable(e.to_string()))?
                }
            };
            let sct = refused(issued)?.sct.ok_or_else(|| unavailable("no token in the reply".into()))?;
            let redeemed = conn
                .call(&BrokerRequest::Redeem { sct, use_ }, &self.poller)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            let mut redeemed = refused(redeemed)?;
            let value = redeemed.value.take().ok_or_else(|| unavailable("no value in the reply".into()))?;
            let jti = redeemed.jti.take().unwrap_or_default();
            let mut idle = self.idle.lock().expect("broker pool poisoned");
            if idle.len() < IDLE_MAX {
                idle.push(conn);
            }
            Ok((value, jti))
        };
        let started = std::time::Instant::now();
        let result = match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(unavailable(format!("no answer within {:?}", self.timeout))),
        };
        crate::metrics::METRICS.broker_seconds.observe(started.elapsed());
        result
    }
}

fn refused(reply: Reply) -> Result<Reply, CredentialError> {
    if reply.ok {
        Ok(reply)
    } else {
        Err(CredentialError::Refused {
            code: reply.code.unwrap_or_else(|| "unknown".into()),
            message: reply.message.unwrap_or_default(),
        })
    }
}

/// One request on a fresh connection (wlctl, tests, benchmarks).
pub async fn call(socket: &Path, req: &BrokerRequest) -> Result<Reply, String> {
    let mut conn = Conn::open(socket).await.map_err(|e| {
        format!(
            "cannot reach the secrets broker at `{}`: {e} (is wl-broker running? is broker.socket the same?)",
            socket.display()
        )
    })?;
    conn.call(req, &Poller::default())
        .await
        .map_err(|e| format!("secrets broker at `{}`: {e}", socket.display()))
}

/// A connection kept for several requests (benchmarks).
pub struct Session(Conn, Poller);

impl Session {
    /// Connects.
    pub async fn connect(socket: &Path) -> std::io::Result<Self> {
        Ok(Self(Conn::open(socket).await?, Poller::default()))
    }

    /// One request.
    pub async fn call(&mut self, req: &BrokerRequest) -> std::io::Result<Reply> {
        self.0.call(req, &self.1).await
    }
}
