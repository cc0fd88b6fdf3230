//! What policy sees of a connection or a request, gathered from the wire and turned into
//! the Cedar context the schema declares. Bodies are inspected only when they are JSON and
//! within the configured size; anything else simply leaves the fields out.

use std::net::IpAddr;

use cedar_policy::RestrictedExpression;
use hyper::header::{self, HeaderName};
use serde_json::{json, Map, Value};

/// Facts for `Connect`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectFacts {
    /// Destination address.
    pub ip: IpAddr,
    /// Destination port.
    pub port: u16,
    /// Whether the agent spoke TLS.
    pub tls: bool,
    /// The SNI, when there was one.
    pub sni: Option<String>,
}

/// Context entries, built directly (no JSON round trip: Cedar's JSON parser tries and
/// formats an error for every escape form a plain value is not, which dominated the cost).
pub type Pairs = Vec<(String, RestrictedExpression)>;

fn string(v: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(v.to_owned())
}

fn record(pairs: Pairs) -> RestrictedExpression {
    RestrictedExpression::new_record(pairs).expect("distinct keys")
}

impl ConnectFacts {
    /// The Cedar context entries.
    pub fn to_pairs(&self) -> Pairs {
        vec![
            ("ip".into(), RestrictedExpression::new_ip(self.ip.to_string())),
            ("port".into(), RestrictedExpression::new_long(i64::from(self.port))),
            ("tls".into(), RestrictedExpression::new_bool(self.tls)),
            ("sni".into(), string(self.sni.as_deref().unwrap_or(""))),
        ]
    }

    /// The Cedar context as JSON (for the record; decisions use [`Self::to_pairs`]).
    pub fn to_json(&self) -> Value {
        json!({
            "ip": {"__extn": {"fn": "ip", "arg": self.ip.to_string()}},
            "port": self.port,
            "tls": self.tls,
            "sni": self.sni.clone().unwrap_or_default(),
        })
    }
}

/// Selected request headers (see the schema's `Headers`).
#[derive(Clone, Debug, Default)]
pub struct HeaderFacts(pub Vec<(&'static str, String)>);

/// The headers policy may read: (HTTP name, context name). Names, not strings: looking a
/// header up by `&str` parses the name on every request.
pub static POLICY_HEADERS: [(HeaderName, &str); 6] = [
    (header::USER_AGENT, "user_agent"),
    (header::CONTENT_TYPE, "content_type"),
    (HeaderName::from_static("openai-organization"), "openai_organization"),
    (HeaderName::from_static("openai-project"), "openai_project"),
    (HeaderName::from_static("anthropic-version"), "anthropic_version"),
    (HeaderName::from_static("anthropic-beta"), "anthropic_beta"),
];

impl HeaderFacts {
    /// Picks the policy headers out of a request's headers.
    pub fn from_headers(h: &hyper::HeaderMap) -> Self {
        Self(
            POLICY_HEADERS
                .iter()
                .filter_map(|(name, key)| {
                    h.get(name).and_then(|v| v.to_str().ok()).map(|v| (*key, v.to_owned()))
                })
                .collect(),
        )
    }
}

/// Fields of a JSON body (see the schema's `Body`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BodyFacts {
    /// `model`.
    pub model: Option<String>,
    /// `stream`.
    pub stream: Option<bool>,
    /// `max_tokens` (or `max_completion_tokens` / `max_output_tokens`).
    pub max_tokens: Option<i64>,
}

impl BodyFacts {
    /// Reads the fields from a JSON body. Not JSON, not an object, too deeply nested
    /// (serde_json stops at 128 levels): no fields.
    pub fn from_json_bytes(bytes: &[u8]) -> Self {
        let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(bytes) else { return Self::default() };
        Self {
            model: obj.get("model").and_then(Value::as_str).map(str::to_owned),
            stream: obj.get("stream").and_then(Value::as_bool),
            max_tokens: ["max_tokens", "max_completion_tokens", "max_output_tokens"]
                .iter()
                .find_map(|k| obj.get(*k).and_then(Value::as_i64)),
        }
    }
}

/// Facts for `Request`.
#[derive(Clone, Debug)]
pub struct RequestFacts {
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Query string (without `?`).
    pub query: String,
    /// Selected headers.
    pub headers: HeaderFacts,
    /// JSON body fields.
    pub body: BodyFacts,
    /// Local hour, 0-23.
    pub hour: u8,
    /// Local weekday, 0 = Monday.
    pub weekday: u8,
}

impl RequestFacts {
    /// The Cedar context entries.
    pub fn to_pairs(&self) -> Pairs {
        let headers: Pairs = self.headers.0.iter().map(|(k, v)| ((*k).to_owned(), string(v))).collect();
        let mut body: Pairs = Vec::new();
        if let Some(m) = &self.body.model {
            body.push(("model".into(), string(m)));
        }
        if let Some(s) = self.body.stream {
            body.push(("stream".into(), RestrictedExpression::new_bool(s)));
        }
        if let Some(t) = self.body.max_tokens {
            body.push(("max_tokens".into(), RestrictedExpression::new_long(t)));
        }
        vec![
            ("method".into(), string(&self.method)),
            ("path".into(), string(&self.path)),
            ("query".into(), string(&self.query)),
            ("headers".into(), record(headers)),
            ("body".into(), record(body)),
            ("hour".into(), RestrictedExpression::new_long(i64::from(self.hour))),
            ("weekday".into(), RestrictedExpression::new_long(i64::from(self.weekday))),
        ]
    }

    /// The Cedar context as JSON (for the record; decisions use [`Self::to_pairs`]).
    pub fn to_json(&self) -> Value {
        let headers: Map<String, Value> =
            self.headers.0.iter().map(|(k, v)| ((*k).to_owned(), Value::String(v.clone()))).collect();
        let mut body = Map::new();
        if let Some(m) = &self.body.model {
            body.insert("model".into(), m.clone().into());
        }
        if let Some(s) = self.body.stream {
            body.insert("stream".into(), s.into());
        }
        if let Some(t) = self.body.max_tokens {
            body.insert("max_tokens".into(), t.into());
        }
        json!({
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": headers,
            "body": body,
            "hour": self.hour,
            "weekday": self.weekday,
        })
    }
}

/// The host's UTC offset, read once by [`init_local_offset`].
static LOCAL_OFFSET: std::sync::OnceLock<time::UtcOffset> = std::sync::OnceLock::new();

/// Reads the host's UTC offset. Call before any thread starts: the `time` crate refuses
/// to read it in a multi-threaded process (the C time zone functions are not thread-safe).
/// A change of offset (daylight saving) is picked up at the next restart.
pub fn init_local_offset() {
    let offset = time::UtcOffset::current_local_offset().unwrap_or(time::UtcOffset::UTC);
    let _ = LOCAL_OFFSET.set(offset);
}

/// The local hour and weekday (0 = Monday); UTC when the offset was never read.
pub fn local_hour_weekday() -> (u8, u8) {
    let offset = LOCAL_OFFSET.get().copied().unwrap_or(time::UtcOffset::UTC);
    let now = time::OffsetDateTime::now_utc().to_offset(offset);
    (now.hour(), now.weekday().number_days_from_monday())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_fields_from_json_only() {
        let b = BodyFacts::from_json_bytes(
            br#"{"model":"gpt-4o-mini","stream":true,"max_completion_tokens":64}"#,
        );
        assert_eq!(
            b,
            BodyFacts { model: Some("gpt-4o-mini".into()), stream: Some(true), max_tokens: Some(64) }
        );
        assert_eq!(BodyFacts::from_json_bytes(b"model=gpt-4o"), BodyFacts::default());
        assert_eq!(BodyFacts::from_json_bytes(br#"["model"]"#), BodyFacts::default());
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(BodyFacts::from_json_bytes(deep.as_bytes()), BodyFacts::default());
    }
}
