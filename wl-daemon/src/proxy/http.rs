//! HTTP on a terminated (or plain) connection: one hyper server per connection, one pass of
//! the request path per request.
//!
//! Per request: check that the host the agent names (Host or `:authority`) is the host the
//! connection is bound to (421 otherwise; nothing goes upstream), drop hop-by-hop headers,
//! forward to the original destination over verified TLS (or plain HTTP on a plain
//! connection) with the pooled client, stream the response back frame by frame, relay
//! upgrades (WebSocket), and write one audit record when the response body ends.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::{Buf, Bytes};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    header::{self, HeaderMap, HeaderName, HeaderValue},
    http::uri::{Authority, PathAndQuery},
    service::service_fn,
    Request, Response, StatusCode, Uri, Version,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;

use super::{upstream::LaneBody, Shared};
use crate::{
    audit::{AuditLog, AuditRecord, DecisionRecord, RequestRecord},
    broker::client::CredentialError,
    config::Mode,
    intercept::identity::AgentIdentity,
    metrics::METRICS,
    policy::{
        facts::{self, BodyFacts, HeaderFacts, RequestFacts},
        AgentEntities, Decision,
    },
};

/// The body sent upstream before counting: the agent's, possibly partly replayed.
pub type UpstreamBody = BoxBody<Bytes, hyper::Error>;

/// What the agent gets back.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// How the connection reached wl.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// TLS terminated by wl; forwarded over verified TLS.
    Https,
    /// Plain HTTP; forwarded in plain HTTP, never with a credential.
    Http,
}

/// Everything the requests of one connection share.
#[derive(Debug)]
pub struct ConnContext {
    /// Daemon-local connection number.
    pub conn_id: u64,
    /// Who is calling, when known.
    pub agent: Option<Arc<AgentIdentity>>,
    /// The host this connection is bound to (its SNI, or the reverse listener's API host).
    /// `None` on plain HTTP, where each request's Host names it.
    pub bound_host: Option<String>,
    /// When set (reverse listeners), requests go to this host whatever the agent's Host.
    pub fixed_host: bool,
    /// Where to connect.
    pub dst: SocketAddr,
    /// How requests are forwarded.
    pub scheme: Scheme,
    /// The parts.
    pub shared: Arc<Shared>,
    requests: AtomicU64,
    /// Policy entities for the last host decided on this connection: built once per
    /// connection (per host on plain HTTP), not per request.
    entities: std::sync::Mutex<Option<(String, Arc<AgentEntities>)>>,
}

impl ConnContext {
    /// A context for one connection.
    pub fn new(
        conn_id: u64,
        agent: Option<Arc<AgentIdentity>>,
        bound_host: Option<String>,
        fixed_host: bool,
        dst: SocketAddr,
        scheme: Scheme,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            conn_id,
            agent,
            bound_host,
            fixed_host,
            dst,
            scheme,
            shared,
            requests: AtomicU64::new(0),
            entities: std::sync::Mutex::new(None),
        }
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The policy entities for `host`, cached for the connection.
    fn entities(&self, host: &str) -> Arc<AgentEntities> {
        let mut cached = self.entities.lock().expect("entity cache poisoned");
        match &*cached {
            Some((h, e)) if h == host => e.clone(),
            _ => {
                let e = self.shared.entities.get(self.agent.as_deref(), host);
                *cached = Some((host.to_owned(), e.clone()));
                e
            }
        }
    }
}

/// Which HTTP the agent speaks on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 (TLS ALPN `http/1.1`, or no ALPN).
    Http1,
    /// HTTP/2 (TLS ALPN `h2`).
    Http2,
    /// Plain TCP: HTTP/1.1, or HTTP/2 with prior knowledge, told apart by the first bytes.
    Detect,
}

impl Protocol {
    /// From the ALPN protocol the TLS handshake settled on. HTTP/2 over TLS is always
    /// negotiated (RFC 9113, 3.2); without ALPN a TLS client speaks HTTP/1.1.
    pub fn from_alpn(alpn: Option<&[u8]>) -> Self {
        if alpn == Some(b"h2") {
            Self::Http2
        } else {
            Self::Http1
        }
    }
}

/// Serves HTTP on `io` until the client is done (HTTP/1.1 with upgrades, or HTTP/2). A
/// known protocol gets its own connection type: the version-detecting one costs about
/// 8 KB more per connection and a read before the first request. HTTP/1.1 connections are
/// parked while idle (`park`).
pub async fn serve<IO>(io: IO, ctx: Arc<ConnContext>, protocol: Protocol) -> Result<(), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let resumptions = ctx.shared.resumptions.clone();
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(req, ctx).await) }
    });
    let io = TokioIo::new(io);
    let timer = hyper_util::rt::TokioTimer::new();
    let header_timeout = super::park::KEEP_ALIVE_IDLE;
    match protocol {
        Protocol::Http1 => super::park::serve_http1(io.into_inner(), service, &resumptions).await,
        Protocol::Http2 => hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(timer)
            .serve_connection(io, service)
            .await
            .map_err(|e| e.to_string()),
        Protocol::Detect => {
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(timer).header_read_timeout(header_timeout);
            builder.serve_connection_with_upgrades(io, service).await.map_err(|e| e.to_string())
        }
    }
}

/// Lower-cased host without port or trailing dot.
pub fn normalize_host(authority: &str) -> String {
    let host = if authority.starts_with('[') {
        authority.split_once(']').map(|(h, _)| &h[1..]).unwrap_or(authority)
    } else {
        authority
            .rsplit_once(':')
            .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
            .map(|(h, _)| h)
            .unwrap_or(authority)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn requested_authority(req: &Request<Incoming>) -> Option<String> {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned))
}

async fn handle(mut req: Request<Incoming>, ctx: Arc<ConnContext>) -> Response<ProxyBody> {
    let _in_flight = crate::metrics::InFlight::enter(&METRICS.requests_in_flight);
    let started = Instant::now();
    let n = ctx.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let request_id = format!("wl-{}-{}", ctx.conn_id, n);
    let mut record = RequestRecord {
        conn_id: ctx.conn_id,
        request_id: request_id.clone(),
        agent: ctx.agent.clone(),
        method: req.method().to_string(),
        host: String::new(),
        path: req.uri().path().to_owned(),
        status: 0,
        bytes_up: 0,
        bytes_down: 0,
        duration_ms: 0,
        proto_agent: version_name(req.version()),
        proto_upstream: None,
        policy: Default::default(),
        secret: None,
        jti: None,
        credential: None,
        credential_error: None,
        redactions: 0,
        error: None,
    };

    // Which host is this request for, and may it go there?
    let named = requested_authority(&req).map(|a| normalize_host(&a));
    let host = match (&ctx.bound_host, named) {
        (Some(bound), _) if ctx.fixed_host => bound.clone(),
        (Some(bound), Some(named)) if *bound == named => bound.clone(),
        (Some(bound), named) => {
            let msg = format!(
                "request names host `{}` but this connection was opened for `{bound}`",
                named.as_deref().unwrap_or("(none)")
            );
            record.host = named.unwrap_or_default();
            discard_rest(req.into_body()).await;
            return finish_error(
                &ctx.shared.audit,
                record,
                started,
                StatusCode::MISDIRECTED_REQUEST,
                "wl_misdirected_request",
                msg,
            );
        }
        (None, Some(named)) => named,
        (None, None) => {
            discard_rest(req.into_body()).await;
            return finish_error(
                &ctx.shared.audit,
                record,
                started,
                StatusCode::BAD_REQUEST,
                "wl_bad_request",
                "request has no Host".into(),
            );
        }
    };
    record.host = host.clone();

    let upgrade = is_upgrade(req.headers()) && req.version() == Version::HTTP_11;
    let agent_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    // Build the upstream request.
    let port = ctx.dst.port();
    let uri = match upstream_uri(ctx.scheme, &host, port, req.uri()) {
        Ok(u) => u,
        Err(e) => {
            discard_rest(req.into_body()).await;
            return finish_error(
                &ctx.shared.audit,
                record,
                started,
                StatusCode::BAD_REQUEST,
                "wl_bad_request",
                format!("invalid request target: {e}"),
            );
        }
    };
    let query = req.uri().query().unwrap_or("").to_owned();
    let (mut parts, body) = req.into_parts();

    // Policy: the agent, the host, the request line, selected headers and JSON body fields.
    let shared = &ctx.shared;
    let (body_facts, body, whole_body) = inspect_body(&parts.headers, body, shared.body_limit).await;
    let (hour, weekday) = facts::local_hour_weekday();
    let request_facts = RequestFacts {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query,
        headers: HeaderFacts::from_headers(&parts.headers),
        body: body_facts,
        hour,
        weekday,
    };
    let deciding = Instant::now();
    let entities = ctx.entities(&host);
    let decision = shared.policy.current().decide_request(&entities, &request_facts);
    METRICS.policy_seconds.observe(deciding.elapsed());
    let mode = shared.policy.mode_for(&host);
    record.policy = crate::audit::PolicyOutcome::new(&decision, mode);
    if !decision.allow {
        tracing::info!(request_id, host = %host, policies = ?decision.policies, errors = ?decision.errors, ?mode, "policy denies request");
        if mode == Mode::Enforce {
            let msg = denial_message(&decision, &host, &request_facts.method, &request_facts.path);
            let policies = decision.policies.clone();
            discard_rest(body).await;
            return finish_denied(&shared.audit, record, started, msg, policies);
        }
    }

    // enforce: the decision is on disk before anything is acted on; a trail that cannot
    // be written refuses the request (fail closed).
    if mode == Mode::Enforce && shared.audit_durable {
        let decision_record = DecisionRecord {
            conn_id: ctx.conn_id,
            request_id: request_id.clone(),
            agent: ctx.agent.clone(),
            host: host.clone(),
            method: request_facts.method.clone(),
            path: request_facts.path.clone(),
            policy: crate::audit::PolicyOutcome::new(&decision, mode),
        };
        if let Err(e) = shared.audit.record_durable(AuditRecord::Decision(Box::new(decision_record))).await {
            tracing::warn!(request_id, error = %e, "audit trail unavailable: request refused");
            discard_rest(body).await;
            return finish_error(
                &shared.audit,
                record,
                started,
                StatusCode::SERVICE_UNAVAILABLE,
                "wl_audit_unavailable",
                format!("the audit trail cannot record this request, so it was not sent: {e}"),
            );
        }
    }

    // The credential bound to this host, if any: only over TLS verified for the host (the
    // connection's SNI, or the explicit listener's API host, is what upstream TLS verifies).
    let mut redactor = None;
    if let Some(binding) = shared.credentials.as_ref().and_then(|c| c.binding(&host).map(|b| (c, b))) {
        let (credentials, binding) = binding;
        record.secret = Some(binding.secret.clone());
        let injected = match ctx.scheme {
            Scheme::Https => {
                credentials
                    .inject(
                        binding,
                        &mut parts.headers,
                        ctx.agent.as_ref(),
                        &request_facts.method,
                        &request_facts.path,
                    )
                    .await
            }
            Scheme::Http => Err(CredentialError::Refused {
                code: "plaintext_upstream".into(),
                message: format!("the credential for `{host}` is never sent over plain HTTP; use https"),
            }),
        };
        match injected {
            Ok(injected) => {
                METRICS.credential("injected");
                record.credential = Some("injected");
                record.jti = Some(injected.jti);
                redactor = Some(injected.redactor);
            }
            Err(e) => {
                METRICS.credential(e.code());
                record.credential = Some("missing");
                record.credential_error = Some(e.code().to_owned());
                tracing::warn!(request_id, host = %host, secret = %binding.secret, error = %e, ?mode, "no credential for the request");
                if mode == Mode::Enforce {
                    discard_rest(body).await;
                    return finish_error(
                        &shared.audit,
                        record,
                        started,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "wl_credential_unavailable",
                        format!("no credential for `{host}`, so the request was not sent: {e}"),
                    );
                }
            }
        }
    }

    let up_counter = Arc::new(AtomicU64::new(0));
    strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.headers.remove(header::HOST);
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    let pools = ctx.shared.upstreams.pools(&host, port, ctx.dst);
    let sending = Instant::now();
    let outgoing = Outgoing { parts, body, whole_body, sent: up_counter.clone() };
    let result = send_upstream(&pools, ctx.scheme, upgrade, outgoing, &request_id).await;
    METRICS.upstream_seconds.observe(sending.elapsed());
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("upstream {host} ({}): {}", ctx.dst, error_chain(&e));
            tracing::warn!(request_id, error = %msg, "upstream failed");
            record.bytes_up = up_counter.load(Ordering::Relaxed);
            return finish_error(
                &ctx.shared.audit,
                record,
                started,
                StatusCode::BAD_GATEWAY,
                "wl_upstream_error",
                msg,
            );
        }
    };
    record.status = resp.status().as_u16();
    record.proto_upstream = Some(version_name(resp.version()));

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(agent_upgrade) = agent_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let rid = request_id.clone();
            tokio::spawn(async move {
                match tokio::try_join!(agent_upgrade, upstream_upgrade) {
                    Ok((a, u)) => {
                        let (mut a, mut u) = (TokioIo::new(a), TokioIo::new(u));
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut u).await;
                    }
                    Err(e) => tracing::warn!(request_id = rid, error = %e, "upgrade failed"),
                }
            });
        }
    } else {
        strip_hop_by_hop(resp.headers_mut(), false);
    }
    let (mut parts, body) = resp.into_parts();
    let mut body = body.boxed();
    if let Some(redactor) = &redactor {
        record.redactions += redactor.redact_headers(&mut parts.headers);
        if bounded_plain_length(&parts.headers).is_some() {
            // Small, complete, uncompressed bodies are read whole and scanned; streams
            // (SSE) and large or compressed bodies pass as they are.
            match body.collect().await {
                Ok(collected) => {
                    let bytes = collected.to_bytes();
                    let bytes = match redactor.redact(&bytes) {
                        Some((redacted, n)) => {
                            record.redactions += n;
                            parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(redacted.len()));
                            Bytes::from(redacted)
                        }
                        None => bytes,
                    };
                    body = Full::new(bytes).map_err(|never| match never {}).boxed();
                }
                Err(e) => {
                    let msg = format!("upstream {host} ({}): response body failed: {e}", ctx.dst);
                    return finish_error(
                        &ctx.shared.audit,
                        record,
                        started,
                        StatusCode::BAD_GATEWAY,
                        "wl_upstream_error",
                        msg,
                    );
                }
            }
        }
        if record.redactions > 0 {
            tracing::warn!(request_id, host = %host, redactions = record.redactions, "the response echoed the credential: redacted");
        }
    }
    let body = Audited::new(body, ctx.shared.audit.clone(), record, started, up_counter);
    Response::from_parts(parts, body.boxed())
}

/// The upstream request's target: the scheme of the connection, the host it is bound to (and
/// the port when not the scheme's default), and the agent's path and query as they came
/// (shared, not parsed again).
fn upstream_uri(scheme: Scheme, host: &str, port: u16, agent_uri: &Uri) -> Result<Uri, String> {
    let (scheme, default_port) = match scheme {
        Scheme::Https => (hyper::http::uri::Scheme::HTTPS, 443),
        Scheme::Http => (hyper::http::uri::Scheme::HTTP, 80),
    };
    // An IPv6 literal (`normalize_host` leaves it bare) goes back in brackets.
    let authority = match (port == default_port, host.contains(':')) {
        (true, false) => Authority::try_from(host),
        (true, true) => Authority::try_from(format!("[{host}]")),
        (false, false) => Authority::try_from(format!("{host}:{port}")),
        (false, true) => Authority::try_from(format!("[{host}]:{port}")),
    };
    let mut parts = hyper::http::uri::Parts::default();
    parts.scheme = Some(scheme);
    parts.authority = Some(authority.map_err(|e| e.to_string())?);
    parts.path_and_query =
        Some(agent_uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")));
    Uri::from_parts(parts).map_err(|e| e.to_string())
}

/// A request ready to go upstream.
struct Outgoing {
    parts: hyper::http::request::Parts,
    body: UpstreamBody,
    /// The whole body, when known: the request can be sent again.
    whole_body: Option<Bytes>,
    /// Bytes of the body sent.
    sent: Arc<AtomicU64>,
}

/// Times a request is sent again after the upstream left it unprocessed.
const UNPROCESSED_RETRIES: usize = 3;

/// Sends `req` with the client its scheme and upgrade call for.
///
/// An HTTP/2 upstream says which streams it has not processed (RFC 9113 section 8.7): a
/// stream it refuses with REFUSED_STREAM (most often one a new connection opened before
/// the server's limit on concurrent streams arrived), and every stream above the last one
/// named in its GOAWAY (a server closing a connection after so many requests, nginx's
/// `keepalive_requests`, or going down gracefully). Such a request is sent again when its
/// body is known whole: by then the client knows the limit, or opens a new connection.
/// Anything else that fails may have been processed and is not sent again (an LLM call
/// costs money). Upgrades go over HTTP/1.1 and are never sent again.
async fn send_upstream(
    pools: &super::upstream::Pools,
    scheme: Scheme,
    upgrade: bool,
    req: Outgoing,
    request_id: &str,
) -> Result<Response<LaneBody>, hyper_util::client::legacy::Error> {
    let Outgoing { parts, body, whole_body, sent } = req;
    match (scheme, upgrade) {
        (Scheme::Https, false) => {}
        (Scheme::Https, true) => {
            let req = Request::from_parts(parts, Counted::new(body, sent));
            return pools.tls_h1.request(req).await.map(|r| r.map(LaneBody::from));
        }
        (Scheme::Http, _) => {
            let req = Request::from_parts(parts, Counted::new(body, sent));
            return pools.plain.request(req).await.map(|r| r.map(LaneBody::from));
        }
    }
    let again = whole_body.map(|whole| (copy_parts(&parts), whole));
    let mut req = Request::from_parts(parts, Counted::new(body, sent.clone()));
    let mut retries = 0;
    loop {
        match pools.tls.request(req).await {
            Err(e) if retries < UNPROCESSED_RETRIES && is_unprocessed(&e) => {
                METRICS.upstream_unprocessed_streams.fetch_add(1, Ordering::Relaxed);
                let Some((parts, whole)) = &again else { return Err(e) };
                retries += 1;
                tracing::debug!(request_id, retries, error = %error_chain(&e), "the upstream did not process the request: sending it again");
                sent.store(0, Ordering::Relaxed);
                req = Request::from_parts(
                    copy_parts(parts),
                    Counted::new(full_body(whole.clone()), sent.clone()),
                );
            }
            result => return result,
        }
    }
}

/// Whether an upstream request failed in a way that says the upstream did not process it:
/// an HTTP/2 REFUSED_STREAM, or the server's GOAWAY, which h2 reports only on streams above
/// the GOAWAY's last stream and on those opened after it (a stream at or below it that the
/// connection's end cuts off fails as a broken pipe, and is not sent again).
fn is_unprocessed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM) || (h2.is_go_away() && h2.is_remote());
        }
        source = e.source();
    }
    false
}

/// The method, target, version and headers of a request (extensions are not copied: an
/// upstream request carries none).
fn copy_parts(parts: &hyper::http::request::Parts) -> hyper::http::request::Parts {
    let mut copy = Request::new(()).into_parts().0;
    copy.method = parts.method.clone();
    copy.uri = parts.uri.clone();
    copy.version = parts.version;
    copy.headers = parts.headers.clone();
    copy
}

fn full_body(bytes: Bytes) -> UpstreamBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// An HTTP version as the audit record names it (as `Version`'s `Debug` does).
fn version_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "unknown",
    }
}

/// Adds a finished request to the metrics.
fn count_request(record: &RequestRecord, started: Instant) {
    let mode = record.policy.mode.map(|m| match m {
        Mode::Observe => "observe",
        Mode::Enforce => "enforce",
    });
    METRICS.request(&record.host, record.policy.decision, mode, record.status);
    METRICS.request_seconds.observe(started.elapsed());
}

/// Responses scanned whole for an echoed credential: at most this many bytes.
const REDACT_BODY_LIMIT: usize = 1 << 20;

/// The length of a response body that can be scanned whole: declared, small, not
/// compressed, not an event stream.
fn bounded_plain_length(headers: &HeaderMap) -> Option<usize> {
    let length = headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse::<usize>().ok()?;
    let identity =
        headers.get(header::CONTENT_ENCODING).is_none_or(|v| v.as_bytes().eq_ignore_ascii_case(b"identity"));
    let stream =
        headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    (length <= REDACT_BODY_LIMIT && identity && !stream).then_some(length)
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// Headers that always describe one hop (RFC 9110 §7.6.1, and the proxy headers), besides
/// `Connection`, `Upgrade` and what `Connection` lists.
static HOP_BY_HOP: [HeaderName; 7] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes headers that describe one hop, not the message (RFC 9110 §7.6.1); for an
/// upgrade, `Connection: upgrade` and `Upgrade` are kept. Runs twice per request, so it
/// looks headers up by name, not by string, and allocates only for what `Connection` lists.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // `HeaderName::from_bytes` lowercases; an empty list allocates nothing.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(',').map(str::trim))
        .filter(|t| !(keep_upgrade && t.eq_ignore_ascii_case("upgrade")))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// Why a request was denied, for the agent (no secrets: only names, method and path).
fn denial_message(d: &Decision, host: &str, method: &str, path: &str) -> String {
    if !d.errors.is_empty() {
        return format!(
            "wl denied {method} {host}{path}: policy evaluation failed ({})",
            d.errors.join("; ")
        );
    }
    if d.policies.is_empty() {
        format!("wl denied {method} {host}{path}: no policy permits it")
    } else {
        format!("wl denied {method} {host}{path}: forbidden by policy {}", d.policies.join(", "))
    }
}

fn finish_denied(
    audit: &AuditLog,
    mut record: RequestRecord,
    started: Instant,
    message: String,
    policies: Vec<String>,
) -> Response<ProxyBody> {
    record.status = StatusCode::FORBIDDEN.as_u16();
    record.duration_ms = started.elapsed().as_millis() as u64;
    let body = json!({"error": {
        "type": "wl_policy_denied",
        "message": message,
        "policies": policies,
        "request_id": record.request_id,
    }})
    .to_string();
    let resp = Response::builder()
        .status(StatusCode::FORBIDDEN)
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-wl-request-id", record.request_id.as_str())
        .body(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed())
        .expect("static response parts are valid");
    record.error = Some(message);
    count_request(&record, started);
    audit.record(AuditRecord::Request(Box::new(record)));
    resp
}

/// Reads a JSON body up to `limit` bytes to extract policy fields, and gives back a body
/// that replays what was read followed by the rest. Other bodies pass untouched.
///
/// The third value is the whole body when it is known, so that the request can be sent
/// again: empty, or a JSON body read to its end (data only, no trailers).
async fn inspect_body(
    headers: &HeaderMap,
    body: Incoming,
    limit: usize,
) -> (BodyFacts, UpstreamBody, Option<Bytes>) {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.to_ascii_lowercase().contains("json"));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if body.is_end_stream() {
        return (BodyFacts::default(), body.boxed(), Some(Bytes::new()));
    }
    if !is_json || declared.is_some_and(|n| n > limit) {
        return (BodyFacts::default(), body.boxed(), None);
    }
    let mut body = body;
    let mut frames = std::collections::VecDeque::new();
    let mut data = Vec::new();
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    data.extend_from_slice(d);
                }
                frames.push_back(frame);
                if data.len() > limit {
                    // Too large: no fields; replay and stream the rest.
                    return (BodyFacts::default(), Replay { frames, rest: Some(body) }.boxed(), None);
                }
            }
            Some(Err(e)) => {
                // The agent's upload failed; let the upstream request fail the same way.
                frames.push_back(Frame::data(Bytes::new()));
                tracing::debug!(error = %e, "request body failed while inspecting");
                return (BodyFacts::default(), Replay { frames, rest: None }.boxed(), None);
            }
            None if frames.iter().all(Frame::is_data) => {
                // One buffer for the facts, the body sent, and a copy to send again.
                let whole = Bytes::from(data);
                let facts = BodyFacts::from_json_bytes(&whole);
                return (facts, full_body(whole.clone()), Some(whole));
            }
            None => return (BodyFacts::from_json_bytes(&data), Replay { frames, rest: None }.boxed(), None),
        }
    }
}

/// How much of a refused request's body wl reads and throws away before answering.
const DISCARD_BYTES: usize = 1 << 20;
const DISCARD_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads and discards what is left of a refused request's body (bounded in bytes and time)
/// so that the refusal reaches the agent. An HTTP/1.1 connection whose request body was not
/// read is closed after the response, and closing a socket with unread data makes the
/// kernel send RST, which can destroy the response still in flight: the client then sees a
/// reset instead of the 403 (the reason for nginx's lingering close).
async fn discard_rest<B>(mut body: B)
where
    B: Body + Unpin,
{
    let drain = async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.remaining());
            if seen > DISCARD_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_TIME, drain).await;
}

/// Frames already read, then the rest of the body.
struct Replay {
    frames: std::collections::VecDeque<Frame<Bytes>>,
    rest: Option<Incoming>,
}

impl Body for Replay {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(f) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }
}

/// A JSON error shaped like the APIs' own: `{"error": {"type", "message", "request_id"}}`.
pub fn json_error(status: StatusCode, kind: &str, message: &str, request_id: &str) -> Response<ProxyBody> {
    let body = json!({"error": {"type": kind, "message": message, "request_id": request_id}}).to_string();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-wl-request-id", request_id)
        .body(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed())
        .expect("static response parts are valid")
}

fn finish_error(
    audit: &AuditLog,
    mut record: RequestRecord,
    started: Instant,
    status: StatusCode,
    kind: &str,
    message: String,
) -> Response<ProxyBody> {
    record.status = status.as_u16();
    record.duration_ms = started.elapsed().as_millis() as u64;
    let resp = json_error(status, kind, &message, &record.request_id);
    record.error = Some(message);
    count_request(&record, started);
    audit.record(AuditRecord::Request(Box::new(record)));
    resp
}

/// A request body that counts the bytes it passes on.
pub struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Self { inner, count }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &poll {
            if let Some(data) = frame.data_ref() {
                self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that streams through and writes the request's audit record when it
/// ends (or is dropped by a client that went away).
struct Audited {
    inner: ProxyBody,
    pending: Option<(AuditLog, RequestRecord, Instant, Arc<AtomicU64>)>,
    bytes: u64,
}

impl Audited {
    fn new(
        inner: ProxyBody,
        audit: AuditLog,
        record: RequestRecord,
        started: Instant,
        up: Arc<AtomicU64>,
    ) -> Self {
        Self { inner, pending: Some((audit, record, started, up)), bytes: 0 }
    }

    fn finish(&mut self, error: Option<String>) {
        if let Some((audit, mut record, started, up)) = self.pending.take() {
            record.bytes_down = self.bytes;
            record.bytes_up = up.load(Ordering::Relaxed);
            record.duration_ms = started.elapsed().as_millis() as u64;
            record.error = error;
            count_request(&record, started);
            audit.record(AuditRecord::Request(Box::new(record)));
        }
    }
}

impl Body for Audited {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.bytes += d.len() as u64;
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let msg = format!("upstream body: {e}");
                self.finish(Some(msg));
            }
            Poll::Ready(None) => self.finish(None),
            Poll::Pending => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Audited {
    fn drop(&mut self) {
        if self.pending.is_some() {
            let done = self.inner.is_end_stream();
            self.finish(if done { None } else { Some("client went away before the response ended".into()) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(normalize_host("API.OpenAI.com"), "api.openai.com");
        assert_eq!(normalize_host("api.openai.com.:443"), "api.openai.com");
        assert_eq!(normalize_host("[::1]:8443"), "::1");
        assert_eq!(normalize_host("localhost"), "localhost");
    }

    #[test]
    fn upstream_targets_keep_the_agents_path_and_query() {
        let target = |scheme, host, port, agent: &str| {
            upstream_uri(scheme, host, port, &agent.parse().unwrap()).map(|u| u.to_string())
        };
        assert_eq!(
            target(Scheme::Https, "api.openai.com", 443, "/v1/models?limit=2").unwrap(),
            "https://api.openai.com/v1/models?limit=2"
        );
        assert_eq!(target(Scheme::Https, "api.test", 8443, "/a").unwrap(), "https://api.test:8443/a");
        assert_eq!(target(Scheme::Http, "api.test", 80, "/").unwrap(), "http://api.test/");
        assert_eq!(
            target(Scheme::Http, "api.test", 80, "http://other.test/x?y").unwrap(),
            "http://api.test/x?y",
            "an absolute-form target keeps only its path and query"
        );
        assert_eq!(target(Scheme::Http, "::1", 8080, "/p").unwrap(), "http://[::1]:8080/p");
        assert_eq!(target(Scheme::Https, "::1", 443, "/p").unwrap(), "https://[::1]/p");
        assert!(target(Scheme::Https, "bad host", 443, "/").is_err());
    }

    #[test]
    fn versions_are_named_as_before() {
        for v in [Version::HTTP_09, Version::HTTP_10, Version::HTTP_11, Version::HTTP_2, Version::HTTP_3] {
            assert_eq!(version_name(v), format!("{v:?}"));
        }
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret-hop"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("Basic eDp5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn headers_listed_in_connection_go_whatever_their_case() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("X-Secret-Hop ,  KEEP-ALIVE"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.keys().collect::<Vec<_>>(), [header::ACCEPT]);
    }

    #[test]
    fn upgrades_keep_their_connection_header() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade, x-hop"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(header::TRAILER, HeaderValue::from_static("x-sum"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert!(!h.contains_key("x-hop") && !h.contains_key(header::TRAILER));
        let mut plain = HeaderMap::new();
        plain.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut plain, false);
        assert!(plain.is_empty(), "without an upgrade, Upgrade goes too");
    }
}
