//! The request prefilter's second half: a policy's leading comparisons of
//! `context.method`, `context.path` or `context.body.model` with a literal.
//!
//! Scope narrows a large set by agent and host (`Scoped::may_apply`); many policies share
//! one scope and differ in their `when`, typically `context.method == "POST" &&
//! context.path like "/v1/files*" && ...`. Cedar evaluates every policy it is given, so
//! 1,000 such policies cost about a millisecond per request. A guard is one of those
//! leading comparisons (`==`, `!=`, `like`) or `context.body has FIELD` tests, taken from
//! the first condition when it is a `when`, up to the first conjunct of any other shape.
//! For a `Request`, `method` and `path` are always present strings and `body` an always
//! present record, so these cannot error; `context.body.model` is read only after a
//! leading `context.body has model`, which Cedar evaluates first. Cedar evaluates `&&`
//! left to right and stops at the first false operand. A policy with a guard that is
//! false for this request is therefore neither satisfied nor erroneous: leaving it out
//! changes no decision, no determining policy and no error.

use cedar_policy::Policy;
use serde_json::Value;

use super::facts::RequestFacts;

/// The context attribute a guard reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attr {
    Method,
    Path,
    /// `context.body.model`: only after a `Has(Model)` guard.
    Model,
}

/// Fields `context.body` may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyField {
    Model,
    Stream,
    MaxTokens,
}

/// What the attribute is compared with.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Test {
    /// `context.body has FIELD` (the guard's `attr` is unused).
    Has(BodyField),
    Eq(String),
    Ne(String),
    /// A `like` pattern.
    Like(Pattern),
}

/// A `like` pattern as the literal runs between its wildcards.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pattern {
    /// The non-empty literal runs, in order.
    runs: Vec<String>,
    /// Whether the pattern has a wildcard at all, before its first run, after its last.
    any_wildcard: bool,
    leading_wildcard: bool,
    trailing_wildcard: bool,
}

impl Pattern {
    fn new(elements: &[Option<char>]) -> Self {
        let runs = elements
            .split(Option::is_none)
            .filter(|run| !run.is_empty())
            .map(|run| run.iter().flatten().collect())
            .collect();
        Self {
            runs,
            any_wildcard: elements.iter().any(Option::is_none),
            leading_wildcard: elements.first().is_some_and(Option::is_none),
            trailing_wildcard: elements.last().is_some_and(Option::is_none),
        }
    }

    /// Cedar's `like`: the whole text against the pattern, a wildcard matching any run of
    /// characters. The first run is a prefix, the last a suffix, the others are found
    /// left to right (the leftmost match leaves the most room for the rest): no
    /// allocation, linear in the text.
    fn matches(&self, text: &str) -> bool {
        if !self.any_wildcard {
            return self.runs.first().map_or(text.is_empty(), |r| r == text);
        }
        let mut runs = self.runs.as_slice();
        let mut rest = text;
        if !self.leading_wildcard {
            let Some((first, others)) = runs.split_first() else { return true };
            let Some(after) = rest.strip_prefix(first.as_str()) else { return false };
            rest = after;
            runs = others;
        }
        if !self.trailing_wildcard {
            // A pattern ending in a literal has a last run.
            let Some((last, others)) = runs.split_last() else { return true };
            let Some(before) = rest.strip_suffix(last.as_str()) else { return false };
            rest = before;
            runs = others;
        }
        for run in runs {
            match rest.find(run.as_str()) {
                Some(at) => rest = &rest[at + run.len()..],
                None => return false,
            }
        }
        true
    }
}

/// One leading comparison of a policy's `when`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Guard {
    attr: Attr,
    test: Test,
}

/// The guards of `policy` (empty when its first condition has none).
pub(super) fn guards(policy: &Policy) -> Vec<Guard> {
    let Ok(est) = policy.to_json() else { return Vec::new() };
    let Some(first) = est["conditions"].as_array().and_then(|c| c.first()) else { return Vec::new() };
    if first["kind"] != "when" {
        return Vec::new();
    }
    let mut conjuncts = Vec::new();
    flatten_and(&first["body"], &mut conjuncts);
    let mut out: Vec<Guard> = Vec::new();
    for conjunct in conjuncts {
        let Some(g) = guard(conjunct) else { break };
        // Reading the model errs when it is absent: only after its `has`.
        let reads_model = g.attr == Attr::Model && !matches!(g.test, Test::Has(_));
        if reads_model && !out.iter().any(|o| o.test == Test::Has(BodyField::Model)) {
            break;
        }
        out.push(g);
    }
    out
}

/// Whether `policy` has no `when` or `unless` at all: with its scope matched, it holds.
pub(super) fn unconditional(policy: &Policy) -> bool {
    policy.to_json().is_ok_and(|est| est["conditions"].as_array().is_some_and(Vec::is_empty))
}

/// Do all guards hold for this request?
pub(super) fn pass(guards: &[Guard], facts: &RequestFacts) -> bool {
    guards.iter().all(|g| {
        let value = match (&g.test, g.attr) {
            (Test::Has(field), _) => {
                return match field {
                    BodyField::Model => facts.body.model.is_some(),
                    BodyField::Stream => facts.body.stream.is_some(),
                    BodyField::MaxTokens => facts.body.max_tokens.is_some(),
                }
            }
            (_, Attr::Method) => facts.method.as_str(),
            (_, Attr::Path) => facts.path.as_str(),
            // Present: a `has` guard before this one held (`all` stops at the first false).
            (_, Attr::Model) => facts.body.model.as_deref().unwrap_or_default(),
        };
        match &g.test {
            Test::Has(_) => unreachable!("answered above"),
            Test::Eq(lit) => value == lit,
            Test::Ne(lit) => value != lit,
            Test::Like(pattern) => pattern.matches(value),
        }
    })
}

/// `a && b && c` parses as `(a && b) && c`: the operands in evaluation order.
fn flatten_and<'a>(expr: &'a Value, out: &mut Vec<&'a Value>) {
    match expr.get("&&") {
        Some(and) => {
            flatten_and(&and["left"], out);
            flatten_and(&and["right"], out);
        }
        None => out.push(expr),
    }
}

fn guard(expr: &Value) -> Option<Guard> {
    let (op, operands) = expr.as_object().filter(|o| o.len() == 1)?.iter().next()?;
    match op.as_str() {
        "==" | "!=" => {
            let (left, right) = (&operands["left"], &operands["right"]);
            let (attr, lit) = match (attribute(left), literal(right)) {
                (Some(a), Some(l)) => (a, l),
                _ => (attribute(right)?, literal(left)?),
            };
            let test = if op == "==" { Test::Eq(lit) } else { Test::Ne(lit) };
            Some(Guard { attr, test })
        }
        "has" => {
            let on = operands["left"].get(".")?;
            if on["left"]["Var"] != "context" || on["attr"] != "body" {
                return None;
            }
            let field = match operands["attr"].as_str()? {
                "model" => BodyField::Model,
                "stream" => BodyField::Stream,
                "max_tokens" => BodyField::MaxTokens,
                _ => return None,
            };
            Some(Guard { attr: Attr::Model, test: Test::Has(field) })
        }
        "like" => {
            let attr = attribute(&operands["left"])?;
            let pattern = operands["pattern"]
                .as_array()?
                .iter()
                .map(|e| match e {
                    Value::String(w) if w == "Wildcard" => Some(vec![None]),
                    _ => e["Literal"].as_str().map(|s| s.chars().map(Some).collect()),
                })
                .collect::<Option<Vec<Vec<Option<char>>>>>()?
                .concat();
            Some(Guard { attr, test: Test::Like(Pattern::new(&pattern)) })
        }
        _ => None,
    }
}

/// `context.method`, `context.path` or `context.body.model`.
fn attribute(expr: &Value) -> Option<Attr> {
    let dot = expr.get(".")?;
    if dot["left"]["Var"] == "context" {
        return match dot["attr"].as_str()? {
            "method" => Some(Attr::Method),
            "path" => Some(Attr::Path),
            _ => None,
        };
    }
    let inner = dot["left"].get(".")?;
    (inner["left"]["Var"] == "context" && inner["attr"] == "body" && dot["attr"] == "model")
        .then_some(Attr::Model)
}

/// A string literal.
fn literal(expr: &Value) -> Option<String> {
    expr.get("Value")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn guards_of(when: &str) -> Vec<Guard> {
        guards(&Policy::from_str(&format!("permit(principal, action, resource) {when};")).unwrap())
    }

    fn pass(guards: &[Guard], method: &str, path: &str) -> bool {
        pass_model(guards, method, path, None)
    }

    fn pass_model(guards: &[Guard], method: &str, path: &str, model: Option<&str>) -> bool {
        let facts = RequestFacts {
            method: method.into(),
            path: path.into(),
            query: String::new(),
            headers: Default::default(),
            body: crate::policy::facts::BodyFacts { model: model.map(str::to_owned), ..Default::default() },
            hour: 0,
            weekday: 0,
        };
        super::pass(guards, &facts)
    }

    #[test]
    fn leading_comparisons_become_guards_up_to_the_first_other_conjunct() {
        let g = guards_of(
            r#"when { context.method == "POST" && "/x" != context.path && context.path like "/v1/*" && context.body.model == "a" && context.path == "/never" }"#,
        );
        assert_eq!(g.len(), 3, "{g:?}");
        assert!(pass(&g, "POST", "/v1/chat"));
        assert!(!pass(&g, "GET", "/v1/chat"));
        assert!(!pass(&g, "POST", "/v2/chat"));
        // Not a `when` first, or not a leading comparison: no guard.
        assert!(
            guards_of(r#"unless { context.method == "GET" } when { context.method == "POST" }"#).is_empty()
        );
        assert!(guards_of(r#"when { context.body.model == "a" && context.method == "POST" }"#).is_empty());
        // The model, after its `has` only.
        let g = guards_of(r#"when { context.body has model && context.body.model == "gpt-4o-mini" }"#);
        assert_eq!(g.len(), 2);
        assert!(pass_model(&g, "POST", "/", Some("gpt-4o-mini")));
        assert!(!pass_model(&g, "POST", "/", Some("gpt-4o")));
        assert!(!pass_model(&g, "POST", "/", None));
        assert_eq!(guards_of(r#"when { context.body has stream && context.body.model == "m" }"#).len(), 1);
        assert!(guards_of(r#"when { context.method == "POST" || context.path == "/x" }"#).is_empty());
    }

    #[test]
    fn like_matches_as_cedar_does() {
        let p = |s: &str| guards_of(&format!("when {{ context.path like \"{s}\" }}"));
        assert!(pass(&p("/v1/*"), "", "/v1/"));
        assert!(pass(&p("/v1/*"), "", "/v1/files/x"));
        assert!(!pass(&p("/v1/*"), "", "/v1"));
        assert!(pass(&p("*files*"), "", "/v1/files/x"));
        assert!(pass(&p("/a*b*c"), "", "/aXbYbZc"));
        assert!(!pass(&p("/a*b*c"), "", "/aXbYbZ"));
        assert!(pass(&p(r"/x\*y"), "", "/x*y"), "an escaped star is a literal");
        assert!(!pass(&p(r"/x\*y"), "", "/xzy"));
        assert!(pass(&p("**"), "", ""));
        assert!(pass(&p("*"), "", "/anything"));
        assert!(pass(&p("a*a"), "", "aXa") && pass(&p("a*a"), "", "aa"));
        assert!(!pass(&p("a*a"), "", "a"), "prefix and suffix may not overlap");
        assert!(!pass(&p("/ab*b"), "", "/ab"));
        assert!(pass(&p("*/v1/*/x"), "", "/org/v1/y/z/x"));
        assert!(!pass(&p("/exact"), "", "/exact/more") && pass(&p("/exact"), "", "/exact"));
        assert!(pass(&p("/é*ü"), "", "/éxyzü"), "characters, not bytes");
    }
}
