//! Cedar evaluation per request with 10 and 1,000 policies, as `cargo xtask bench` reports
//! it: for the first request of a connection (building the agent's entities and the subset
//! of policies whose scope can apply, then deciding) and for later requests (deciding only).
//! Prints one JSON object of p50/p99 in microseconds.

use std::time::Instant;

use wl_daemon::policy::{AgentEntities, PolicyEngine};

mod common;

fn policies(n: usize) -> String {
    let mut s = String::from("@id(\"no-uploads\")\nforbid(principal, action == Wl::Action::\"Request\", resource) when { context.path like \"/v1/files*\" };\n");
    for i in 0..n - 1 {
        s.push_str(&format!(
            "@id(\"bot{i}\")\npermit(principal in Wl::Cgroup::\"/agents.slice/bot{i}.service\", action == Wl::Action::\"Request\", resource == Wl::Host::\"api.openai.com\") \
             when {{ context.method == \"POST\" && context.path == \"/v1/chat/completions\" && context.body has model && [\"gpt-4o-mini\", \"gpt-4.1-mini\"].contains(context.body.model) }};\n"
        ));
    }
    s
}

/// A permit-all base and `n - 1` policies in scope for the request's agent, action and
/// host, the i-th with the condition `when(i)`.
fn in_scope(n: usize, when: impl Fn(usize) -> String) -> String {
    let mut s = String::from("@id(\"base\")\npermit(principal, action, resource);\n");
    for i in 0..n - 1 {
        s.push_str(&format!(
            "@id(\"p{i}\")\npermit(principal, action == Wl::Action::\"Request\", resource == Wl::Host::\"api.openai.com\") \
             when {{ {} }};\n",
            when(i)
        ));
    }
    s
}

/// Each for one path prefix of the request's method: the scope prefilter keeps every one,
/// the guards (`policy/guard.rs`) all but the one for `/v1/*`.
fn per_path(n: usize) -> String {
    in_scope(n, |i| format!("context.method == \"POST\" && context.path like \"/v{i}/*\""))
}

/// Each for one model (`has model && model == ...`, which the guards also read).
fn per_model(n: usize) -> String {
    in_scope(n, |i| format!("context.body has model && context.body.model == \"model-{i}\""))
}

/// Starting with something no guard reads (the hour): Cedar evaluates every one, the
/// worst case for a large set.
fn unguarded(n: usize) -> String {
    in_scope(n, |i| format!("context.hour >= 0 && context.path like \"/v{i}/*\""))
}

/// Times `decide` 5,000 times after 500 warm-up runs, each of which must allow; returns
/// (p50, p99) in microseconds.
fn sample(mut decide: impl FnMut() -> bool) -> (f64, f64) {
    let mut samples = Vec::with_capacity(5000);
    for i in 0..5500 {
        let t = Instant::now();
        let allowed = decide();
        let us = t.elapsed().as_secs_f64() * 1e6;
        assert!(allowed);
        if i >= 500 {
            samples.push(us);
        }
    }
    percentiles(samples)
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

fn main() {
    let agent = common::agent();
    let facts = common::chat_request();
    let mut out = Vec::new();
    for n in [10usize, 1000] {
        let engine = PolicyEngine::from_sources(&[("bench.cedar".into(), policies(n))], "bench".into())
            .expect("valid");
        // A connection's first request: entities and the policy subset are built, then decided.
        let (p50, p99) = sample(|| {
            let entities = AgentEntities::new(Some(&agent), "api.openai.com");
            engine.decide_request(&entities, &facts).allow
        });
        out.push(format!("\"p50_{n}_us\": {p50:.2}, \"p99_{n}_us\": {p99:.2}"));
        // Later requests on the same connection reuse the entities and the policy subset.
        let entities = AgentEntities::new(Some(&agent), "api.openai.com");
        let (p50, p99) = sample(|| engine.decide_request(&entities, &facts).allow);
        out.push(format!("\"p50_{n}_cached_us\": {p50:.2}, \"p99_{n}_cached_us\": {p99:.2}"));
    }
    // Every policy in scope: what a set written without principal or resource scopes costs.
    let engine =
        PolicyEngine::from_sources(&[("bench.cedar".into(), per_path(1000))], "bench".into()).expect("valid");
    let entities = AgentEntities::new(Some(&agent), "api.openai.com");
    let (p50, p99) = sample(|| engine.decide_request(&entities, &facts).allow);
    out.push(format!("\"p50_1000_in_scope_us\": {p50:.2}, \"p99_1000_in_scope_us\": {p99:.2}"));
    for (name, set) in [("per_model", per_model(1000)), ("unguarded", unguarded(1000))] {
        let engine =
            PolicyEngine::from_sources(&[("bench.cedar".into(), set)], "bench".into()).expect("valid");
        let (p50, p99) = sample(|| engine.decide_request(&entities, &facts).allow);
        out.push(format!("\"p50_1000_{name}_us\": {p50:.2}, \"p99_1000_{name}_us\": {p99:.2}"));
    }
    println!("{{{}}}", out.join(", "));
}
