//! Peeks at the first bytes of an intercepted connection without consuming them: a TLS
//! ClientHello (server name and ALPN, parsed by rustls), a plain HTTP request, or something
//! else. Bounded in size and time, so a client that trickles bytes or never sends any
//! cannot hold a task for long.

use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// What the connection starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peeked {
    /// A TLS ClientHello.
    Tls {
        /// SNI, lower-cased, without a trailing dot.
        sni: Option<String>,
        /// ALPN protocols offered.
        alpn: Vec<Vec<u8>>,
    },
    /// Looks like an HTTP/1 request line.
    PlainHttp,
    /// The client sent nothing within the first-byte window: a protocol where the server
    /// speaks first (SMTP, FTP, some banners). wl cannot identify it and splices it.
    Silent,
}

/// Why a connection could not be classified.
#[derive(Debug, thiserror::Error)]
pub enum PeekError {
    /// The client closed before sending anything useful.
    #[error("client closed the connection before sending a request")]
    Closed,
    /// Nothing decisive within the time limit.
    #[error("no complete TLS ClientHello or HTTP request within {0:?}")]
    Timeout(Duration),
    /// More than the size limit without a complete ClientHello.
    #[error("ClientHello larger than {0} bytes")]
    TooLarge(usize),
    /// rustls refused the ClientHello.
    #[error("malformed TLS ClientHello: {0}")]
    BadHello(String),
    /// Neither TLS nor HTTP.
    #[error("neither TLS nor HTTP (first byte {0:#04x})")]
    Unknown(u8),
    /// Socket error.
    #[error("reading the connection: {0}")]
    Io(#[from] std::io::Error),
}

const TLS_HANDSHAKE: u8 = 0x16;

/// The first peek's buffer. Most ClientHellos fit (a few hundred bytes to about 2 KiB with
/// post-quantum key shares); a larger one grows it, up to the caller's limit, rather than
/// every connection zeroing and holding the whole limit (32 KiB) while its hello is awaited.
const FIRST_PEEK: usize = 4 * 1024;

/// Peeks until the connection is classified, `max` bytes are pending, or `timeout` passes.
/// A client that sends nothing at all within `first_byte` is [`Peeked::Silent`].
pub async fn peek(
    stream: &TcpStream,
    max: usize,
    first_byte: Duration,
    timeout: Duration,
) -> Result<Peeked, PeekError> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; FIRST_PEEK.min(max)];
    let mut seen = 0usize;
    let mut pause = Duration::from_millis(1);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = if seen == 0 {
            // Nothing yet: a client that stays silent may be waiting for the server.
            match tokio::time::timeout(first_byte.min(left), stream.peek(&mut buf)).await {
                Ok(r) => r?,
                Err(_) => return Ok(Peeked::Silent),
            }
        } else {
            match tokio::time::timeout(left, stream.peek(&mut buf)).await {
                Ok(r) => r?,
                Err(_) => return Err(PeekError::Timeout(timeout)),
            }
        };
        if n == 0 {
            return Err(PeekError::Closed);
        }
        if n > seen {
            seen = n;
            if let Some(result) = classify(&buf[..n]) {
                return result;
            }
            if n == max {
                return Err(PeekError::TooLarge(max));
            }
            if n == buf.len() {
                // The buffer is full: more may be waiting already.
                buf.resize((2 * n).min(max), 0);
                continue;
            }
            pause = Duration::from_millis(1);
        }
        // Incomplete: peek returns the same bytes until more arrive, so wait a little
        // (backing off) rather than spin.
        if Instant::now() + pause > deadline {
            return Err(PeekError::Timeout(timeout));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Classifies a prefix of the stream; `None` means more bytes are needed.
pub fn classify(bytes: &[u8]) -> Option<Result<Peeked, PeekError>> {
    let first = *bytes.first()?;
    if first != TLS_HANDSHAKE {
        return Some(if looks_like_http(bytes) {
            Ok(Peeked::PlainHttp)
        } else {
            Err(PeekError::Unknown(first))
        });
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = bytes;
    while !rd.is_empty() {
        match acceptor.read_tls(&mut rd) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Some(Err(PeekError::BadHello(e.to_string()))),
        }
    }
    match acceptor.accept() {
        Ok(None) => None,
        Ok(Some(accepted)) => {
            let hello = accepted.client_hello();
            let sni = hello.server_name().map(|s| s.trim_end_matches('.').to_ascii_lowercase());
            let alpn = hello.alpn().map(|it| it.map(<[u8]>::to_vec).collect()).unwrap_or_default();
            Some(Ok(Peeked::Tls { sni, alpn }))
        }
        Err((e, _alert)) => Some(Err(PeekError::BadHello(e.to_string()))),
    }
}

/// An HTTP/1 request line starts with an upper-case method token and a space.
fn looks_like_http(bytes: &[u8]) -> bool {
    let token: Vec<u8> = bytes.iter().take(8).take_while(|b| b.is_ascii_uppercase()).copied().collect();
    !token.is_empty() && bytes.get(token.len()).is_none_or(|&b| b == b' ')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_hello(sni: &str) -> Vec<u8> {
        client_hello_offering(sni, vec![b"h2".to_vec(), b"http/1.1".to_vec()])
    }

    fn client_hello_offering(sni: &str, alpn: Vec<Vec<u8>>) -> Vec<u8> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = alpn;
        let mut conn =
            rustls::ClientConnection::new(std::sync::Arc::new(cfg), sni.to_owned().try_into().unwrap())
                .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn reads_sni_and_alpn_and_needs_the_whole_hello() {
        let hello = client_hello("API.OpenAI.com");
        match classify(&hello) {
            Some(Ok(Peeked::Tls { sni, alpn })) => {
                assert_eq!(sni.as_deref(), Some("api.openai.com"));
                assert_eq!(alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
            }
            other => panic!("{other:?}"),
        }
        for cut in [1, 5, 40, hello.len() - 1] {
            assert!(classify(&hello[..cut]).is_none(), "a prefix of {cut} bytes is not complete");
        }
    }

    /// A ClientHello larger than the first peek's buffer, arriving in pieces, is read whole.
    #[tokio::test]
    async fn a_hello_larger_than_the_first_peek_is_read_whole() {
        let alpn: Vec<Vec<u8>> =
            (0..40).map(|i| format!("proto-{i:03}-{}", "x".repeat(200)).into_bytes()).collect();
        let hello = client_hello_offering("big.example", alpn.clone());
        assert!(hello.len() > 2 * FIRST_PEEK, "the hello is {} bytes", hello.len());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
            for piece in hello.chunks(3000) {
                client.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            client
        });
        let (server, _) = listener.accept().await.unwrap();
        let peeked = peek(&server, 32 * 1024, Duration::from_secs(1), Duration::from_secs(5)).await.unwrap();
        assert_eq!(peeked, Peeked::Tls { sni: Some("big.example".into()), alpn });
        drop(writer.await.unwrap());

        // The limit still holds.
        let small = peek_limit_of(FIRST_PEEK + 100).await;
        assert!(matches!(small, Err(PeekError::TooLarge(n)) if n == FIRST_PEEK + 100), "{small:?}");
    }

    async fn peek_limit_of(max: usize) -> Result<Peeked, PeekError> {
        let alpn: Vec<Vec<u8>> = (0..40).map(|i| format!("p{i}-{}", "y".repeat(200)).into_bytes()).collect();
        let hello = client_hello_offering("big.example", alpn);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut client, &hello).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        peek(&server, max, Duration::from_secs(1), Duration::from_secs(5)).await
    }

    #[test]
    fn plain_http_garbage_and_bad_hellos() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n").unwrap().unwrap(), Peeked::PlainHttp);
        assert_eq!(classify(b"POST").map(|r| r.is_ok()), Some(true));
        assert!(matches!(classify(b"\x00\x01binary").unwrap(), Err(PeekError::Unknown(0))));
        // A handshake record whose body is not a ClientHello.
        let bad = [0x16, 0x03, 0x01, 0x00, 0x04, 0x0e, 0x00, 0x00, 0x00];
        assert!(matches!(classify(&bad).unwrap(), Err(PeekError::BadHello(_))));
    }
}
