//! Policy test cases for security teams' own CI (`wlctl policy test FILE`): a TOML file of
//! cases, each an agent, an action, a host, a context and the expected decision.
//!
//! ```toml
//! [[case]]
//! name = "mini is allowed for the bot"
//! action = "Request"                      # Connect | Request
//! host = "api.openai.com"
//! agent = { cgroup = "/agents.slice/bot.service", user = "bot", uid = 1000 }
//! context = { method = "POST", path = "/v1/chat/completions", body = { model = "gpt-4o-mini" } }
//! expect = "allow"                        # allow | deny
//! ```

use serde::Deserialize;

use super::{
    facts::{BodyFacts, ConnectFacts, HeaderFacts, RequestFacts},
    AgentEntities, PolicyEngine,
};
use crate::intercept::{cgroup::unit_of_cgroup, identity::AgentIdentity};

/// The file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    /// The cases.
    #[serde(rename = "case")]
    pub cases: Vec<Case>,
}

/// One case.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// Shown in the report.
    pub name: String,
    /// `Connect` or `Request`.
    pub action: String,
    /// The resource.
    pub host: String,
    /// The principal.
    #[serde(default)]
    pub agent: CaseAgent,
    /// Context fields (anything not given takes a neutral default).
    #[serde(default)]
    pub context: CaseContext,
    /// `allow` or `deny`.
    pub expect: String,
}

/// The agent of a case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseAgent {
    /// cgroup path (the unit is derived from it).
    pub cgroup: Option<String>,
    /// User name.
    pub user: Option<String>,
    /// uid.
    #[serde(default)]
    pub uid: u32,
    /// gid.
    #[serde(default)]
    pub gid: u32,
    /// Executable.
    pub exe: Option<String>,
    /// Task name.
    #[serde(default)]
    pub comm: String,
}

/// Context of a case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseContext {
    /// Request: method.
    pub method: Option<String>,
    /// Request: path.
    pub path: Option<String>,
    /// Request: query.
    pub query: Option<String>,
    /// Request: headers by context name (`user_agent`, ...).
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Request: body fields.
    #[serde(default)]
    pub body: CaseBody,
    /// Request: hour (default 12).
    pub hour: Option<u8>,
    /// Request: weekday, 0 = Monday (default 2).
    pub weekday: Option<u8>,
    /// Connect: destination IP (default 192.0.2.1).
    pub ip: Option<std::net::IpAddr>,
    /// Connect: port (default 443).
    pub port: Option<u16>,
    /// Connect: TLS (default true).
    pub tls: Option<bool>,
    /// Connect: SNI (default the host).
    pub sni: Option<String>,
}

/// Body fields of a case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseBody {
    /// `model`.
    pub model: Option<String>,
    /// `stream`.
    pub stream: Option<bool>,
    /// `max_tokens`.
    pub max_tokens: Option<i64>,
}

/// The outcome of one case.
#[derive(Debug)]
pub struct CaseResult {
    /// The case's name.
    pub name: String,
    /// Whether it matched the expectation.
    pub passed: bool,
    /// What happened (decision and determining policies, or the error).
    pub detail: String,
}

/// Runs every case against `engine`.
pub fn run(engine: &PolicyEngine, file: &CaseFile) -> Vec<CaseResult> {
    file.cases.iter().map(|c| run_one(engine, c)).collect()
}

fn run_one(engine: &PolicyEngine, c: &Case) -> CaseResult {
    let fail = |detail: String| CaseResult { name: c.name.clone(), passed: false, detail };
    let expect_allow = match c.expect.as_str() {
        "allow" => true,
        "deny" => false,
        other => return fail(format!("expect must be \"allow\" or \"deny\", not `{other}`")),
    };
    let agent = AgentIdentity {
        pid: 0,
        tid: 0,
        uid: c.agent.uid,
        gid: c.agent.gid,
        user: c.agent.user.clone(),
        comm: c.agent.comm.clone(),
        exe: c.agent.exe.clone(),
        cgroup: c.agent.cgroup.clone(),
        cgroup_id: 0,
        unit: c.agent.cgroup.as_deref().and_then(unit_of_cgroup),
    };
    let entities = AgentEntities::new(Some(&agent), &c.host);
    let ctx = &c.context;
    let decision = match c.action.as_str() {
        "Connect" => engine.decide_connect(
            &entities,
            &ConnectFacts {
                ip: ctx.ip.unwrap_or_else(|| "192.0.2.1".parse().expect("literal")),
                port: ctx.port.unwrap_or(443),
                tls: ctx.tls.unwrap_or(true),
                sni: Some(ctx.sni.clone().unwrap_or_else(|| c.host.clone())),
            },
        ),
        "Request" => {
            let headers = HeaderFacts(
                super::facts::POLICY_HEADERS
                    .iter()
                    .filter_map(|(_, key)| ctx.headers.get(*key).map(|v| (*key, v.clone())))
                    .collect(),
            );
            engine.decide_request(
                &entities,
                &RequestFacts {
                    method: ctx.method.clone().unwrap_or_else(|| "GET".into()),
                    path: ctx.path.clone().unwrap_or_else(|| "/".into()),
                    query: ctx.query.clone().unwrap_or_default(),
                    headers,
                    body: BodyFacts {
                        model: ctx.body.model.clone(),
                        stream: ctx.body.stream,
                        max_tokens: ctx.body.max_tokens,
                    },
                    hour: ctx.hour.unwrap_or(12),
                    weekday: ctx.weekday.unwrap_or(2),
                },
            )
        }
        other => return fail(format!("action must be Connect or Request, not `{other}`")),
    };
    let got = if decision.allow { "allow" } else { "deny" };
    let mut detail = format!(
        "{got} (policies: {})",
        if decision.policies.is_empty() { "none".into() } else { decision.policies.join(", ") }
    );
    if !decision.errors.is_empty() {
        detail.push_str(&format!("; errors: {}", decision.errors.join("; ")));
    }
    CaseResult { name: c.name.clone(), passed: decision.allow == expect_allow, detail }
}
