//! Fixtures the benchmarks share: one agent, one chat-completion request, one request
//! record. Each benchmark is its own crate and uses only some of them.
#![allow(dead_code)]

use wl_daemon::{
    audit::{AuditRecord, PolicyOutcome, RequestRecord},
    config::Mode,
    intercept::identity::AgentIdentity,
    policy::facts::{BodyFacts, HeaderFacts, RequestFacts},
};

/// A python3 agent in the systemd service `bot7.service`.
pub fn agent() -> AgentIdentity {
    AgentIdentity {
        pid: 4242,
        tid: 4242,
        uid: 1000,
        gid: 1000,
        user: Some("bot".into()),
        comm: "python3".into(),
        exe: Some("/usr/bin/python3".into()),
        cgroup: Some("/agents.slice/bot7.service".into()),
        cgroup_id: 99,
        unit: Some("bot7.service".into()),
    }
}

/// `POST /v1/chat/completions` for gpt-4o-mini, as the policy engine sees it.
pub fn chat_request() -> RequestFacts {
    RequestFacts {
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        query: String::new(),
        headers: HeaderFacts(vec![("content_type", "application/json".into())]),
        body: BodyFacts { model: Some("gpt-4o-mini".into()), stream: Some(false), max_tokens: Some(256) },
        hour: 10,
        weekday: 2,
    }
}

/// The audit record of the `i`-th request, of a typical size.
pub fn request_record(i: u64, mode: Mode) -> AuditRecord {
    AuditRecord::Request(Box::new(RequestRecord {
        conn_id: i / 10,
        request_id: format!("wl-{}-{}", i / 10, i % 10),
        agent: None,
        method: "POST".into(),
        host: "api.openai.com".into(),
        path: "/v1/chat/completions".into(),
        status: 200,
        bytes_up: 312,
        bytes_down: 1210,
        duration_ms: 3,
        proto_agent: "HTTP/1.1",
        proto_upstream: Some("HTTP/1.1"),
        policy: PolicyOutcome {
            decision: Some("allow"),
            mode: Some(mode),
            would_deny: false,
            policies: vec!["allow-all".into()],
        },
        secret: None,
        jti: None,
        credential: None,
        credential_error: None,
        redactions: 0,
        error: None,
    }))
}
