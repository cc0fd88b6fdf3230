//! Criterion microbenchmarks of the pieces every governed request runs through, each alone
//! (no sockets, no other process): leaf minting (a new name, and a cache hit), the Cedar
//! decision per request, SCT signing and verification, one audit append, and the scan of
//! a response for an injected credential.
//!
//! `cargo xtask bench` runs them with `cargo bench -p wl-daemon --bench hot_paths` and
//! writes the medians Criterion estimates (`target/criterion/*/new/estimates.json`) into
//! BENCHMARKS.md. A filter narrows a run: `cargo bench -p wl-daemon --bench hot_paths -- sct`.

use std::{
    hint::black_box,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ed25519_dalek::SigningKey;
use wl_daemon::{
    audit::trail::{Pending, Trail, TrailOptions},
    broker::sct::{self, Binding, Claims},
    broker::store::SecretValue,
    config::Mode,
    policy::{AgentEntities, PolicyEngine},
    proxy::credential::Redactor,
    tls::{ca::BeaconCa, leaf::LeafCache},
};

mod common;

/// Ten policies of the kind operators write: one forbid on a path, nine permits for one
/// service each, narrowed by method, path and model.
fn ten_policies() -> String {
    let mut s = String::from(
        "@id(\"no-uploads\")\nforbid(principal, action == Wl::Action::\"Request\", resource) \
         when { context.path like \"/v1/files*\" };\n",
    );
    for i in 0..9 {
        s.push_str(&format!(
            "@id(\"bot{i}\")\npermit(principal in Wl::Cgroup::\"/agents.slice/bot{i}.service\", \
             action == Wl::Action::\"Request\", resource == Wl::Host::\"api.openai.com\") \
             when {{ context.method == \"POST\" && context.path == \"/v1/chat/completions\" \
             && context.body has model && [\"gpt-4o-mini\", \"gpt-4.1-mini\"].contains(context.body.model) }};\n"
        ));
    }
    s
}

fn leaf_minting(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let ca = BeaconCa::load_or_create(dir.path(), &[]).expect("a beacon CA");
    let validity = Duration::from_secs(86_400);
    let mut group = c.benchmark_group("leaf");
    // A new name: a key pair and one ECDSA signature by the CA.
    let n = AtomicU64::new(0);
    group.bench_function("mint_new_name", |b| {
        b.iter(|| {
            let name = format!("host{}.bench.example", n.fetch_add(1, Ordering::Relaxed));
            black_box(ca.mint(&name, validity).expect("minted"))
        })
    });
    // A name already in the cache: what every later connection to it pays.
    let cache = Arc::new(LeafCache::new(ca, validity, 1024));
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
    rt.block_on(cache.get("api.openai.com")).expect("minted");
    group.bench_function("cached", |b| {
        b.iter(|| black_box(rt.block_on(cache.get(black_box("api.openai.com"))).expect("cached")))
    });
    group.finish();
}

fn cedar_decision(c: &mut Criterion) {
    let agent = common::agent();
    let facts = common::chat_request();
    let mut group = c.benchmark_group("cedar");
    for (name, source) in [("builtin", None), ("ten_policies", Some(ten_policies()))] {
        let engine = match source {
            None => PolicyEngine::builtin(),
            Some(text) => {
                PolicyEngine::from_sources(&[("bench.cedar".into(), text)], "bench".into()).expect("valid")
            }
        };
        // A connection's first request: the agent's entities and the policies whose scope
        // can apply are worked out, then the request is decided.
        group.bench_function(format!("{name}_first_request"), |b| {
            b.iter(|| {
                let entities = AgentEntities::new(Some(&agent), "api.openai.com");
                black_box(engine.decide_request(&entities, &facts).allow)
            })
        });
        // Later requests on the connection reuse both.
        let entities = AgentEntities::new(Some(&agent), "api.openai.com");
        group.bench_function(format!("{name}_later_request"), |b| {
            b.iter(|| black_box(engine.decide_request(&entities, black_box(&facts)).allow))
        });
    }
    group.finish();
}

fn sct_sign_and_verify(c: &mut Criterion) {
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let verifying = key.verifying_key();
    let agent_digest = sct::agent_digest(Some(&common::agent()));
    let request_digest = sct::request_digest("POST", "/v1/chat/completions");
    let now = 1_790_000_000_000i64;
    let claims = Claims {
        kid: sct::key_id(&verifying),
        jti: [3u8; 16],
        agent: agent_digest,
        request: request_digest,
        issued_ms: now,
        expires_ms: now + 30_000,
        host: "api.openai.com".into(),
        secret: "openai".into(),
    };
    let binding =
        Binding { agent: &agent_digest, request: &request_digest, host: "api.openai.com", secret: "openai" };
    let mut group = c.benchmark_group("sct");
    group.bench_function("sign", |b| b.iter(|| black_box(sct::sign(&key, black_box(&claims)))));
    let token = sct::sign(&key, &claims);
    // Everything a redemption checks but the ledger: format, key id, verify_strict, the
    // validity window and the binding.
    group.bench_function("verify", |b| {
        b.iter(|| {
            let claims = sct::verify(black_box(&token), |_| Some(verifying), now + 5, 2_000, &binding);
            black_box(claims.expect("valid"))
        })
    });
    group.finish();
}

fn audit_append(c: &mut Criterion) {
    // On the machine's disk, as the daemon's trail is, rather than a tmpfs /tmp.
    let base = std::env::var_os("WL_BENCH_DIR").unwrap_or_else(|| "/var/tmp".into());
    let dir = tempfile::tempdir_in(base).expect("a temporary directory");
    let opts = TrailOptions {
        key_dir: dir.path().join("keys"),
        rotate_bytes: 1 << 40,
        checkpoint_every: 10_000,
        checkpoint_interval: Duration::from_secs(5),
    };
    let mut trail = Trail::open(&dir.path().join("audit.jsonl"), opts).expect("a trail");
    let mut group = c.benchmark_group("audit");
    // One request record through the hash chain, JSON and write(2), as the writer task does
    // when records arrive one at a time (no fsync: observe's records are not durable).
    let n = AtomicU64::new(0);
    group.bench_function("append_one", |b| {
        b.iter_batched(
            || common::request_record(n.fetch_add(1, Ordering::Relaxed), Mode::Observe),
            |record| trail.commit(vec![Pending::Record(record)], false),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn credential_redaction(c: &mut Criterion) {
    // A chat completion's size (the bench upstreams' body is about 1.2 KB) with no
    // credential in it: what every response on a credential-bound host pays.
    let redactor =
        Redactor::new(&SecretValue::new(b"sk-proj-0123456789abcdefghijklmnopqrstuvwxyz+/ABCDEF".to_vec()));
    let body: Vec<u8> = br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"lorem ipsum dolor sit amet"}}]}"#
        .iter()
        .copied()
        .cycle()
        .take(1200)
        .collect();
    let mut group = c.benchmark_group("credential");
    group.bench_function("redact_scan_1200_bytes", |b| {
        b.iter(|| black_box(redactor.redact(black_box(&body))))
    });
    group.finish();
}

criterion_group! {
    name = hot_paths;
    // Short runs: `cargo xtask bench` runs everything else too.
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    targets = leaf_minting, cedar_decision, sct_sign_and_verify, audit_append, credential_redaction
}
criterion_main!(hot_paths);
