//! The Criterion microbenchmarks (`wl-daemon/benches/hot_paths.rs`) as part of
//! `cargo xtask bench`: runs them, reads the medians Criterion estimated from
//! `target/criterion/<group>/<name>/new/estimates.json`, and turns them into a section of
//! BENCHMARKS.md.

use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

use crate::workspace_root;

/// What each benchmark measures, in the order the section lists them.
const BENCHES: &[(&str, &str)] = &[
    ("leaf/mint_new_name", "leaf certificate for a new name (key pair, one ECDSA signature)"),
    ("leaf/cached", "leaf certificate from the cache"),
    ("cedar/builtin_first_request", "Cedar, built-in policies, a connection's first request"),
    ("cedar/builtin_later_request", "Cedar, built-in policies, a later request"),
    ("cedar/ten_policies_first_request", "Cedar, 10 policies, a connection's first request"),
    ("cedar/ten_policies_later_request", "Cedar, 10 policies, a later request"),
    ("sct/sign", "SCT signing (Ed25519)"),
    ("sct/verify", "SCT verification (verify_strict, validity, binding)"),
    ("audit/append_one", "audit append of one request record (hash chain, JSON, write)"),
    (
        "credential/redact_scan_1200_bytes",
        "scan of a 1.2 KB response for an injected credential's four forms (none found)",
    ),
];

/// Medians in nanoseconds, by benchmark id (`group/name`).
pub struct Micro(Vec<(&'static str, f64)>);

impl Micro {
    /// The median of `id` in nanoseconds.
    pub fn ns(&self, id: &str) -> Option<f64> {
        self.0.iter().find(|(i, _)| *i == id).map(|(_, ns)| *ns)
    }
}

/// Runs the microbenchmarks and reads their results.
pub fn run() -> anyhow::Result<Micro> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace_root())
        .args(["bench", "-q", "-p", "wl-daemon", "--bench", "hot_paths"])
        // Criterion's report goes to the terminal; the numbers are read from its files.
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()?;
    if !status.success() {
        bail!("the Criterion microbenchmarks failed (cargo bench -p wl-daemon --bench hot_paths)");
    }
    let dir = workspace_root().join("target/criterion");
    let mut out = Vec::new();
    for (id, _) in BENCHES {
        let path = dir.join(id).join("new/estimates.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("Criterion wrote no estimates for {id} ({})", path.display()))?;
        let estimates: serde_json::Value = serde_json::from_str(&text)?;
        let median = estimates["median"]["point_estimate"]
            .as_f64()
            .with_context(|| format!("no median in {}", path.display()))?;
        out.push((*id, median));
    }
    Ok(Micro(out))
}

fn human(ns: f64) -> String {
    if ns >= 1000.0 {
        format!("{:.1} µs", ns / 1000.0)
    } else {
        format!("{ns:.0} ns")
    }
}

/// The leaf-minting summary the TLS section quotes.
pub fn leaf_summary(m: &Micro) -> String {
    format!(
        "new name {}, cached {}",
        m.ns("leaf/mint_new_name").map_or("?".into(), human),
        m.ns("leaf/cached").map_or("?".into(), human)
    )
}

/// The BENCHMARKS.md section.
pub fn report(m: &Micro) -> String {
    let mut s = String::from(
        "## Microbenchmarks (Criterion)\n\n\
         Command: `cargo bench -p wl-daemon --bench hot_paths` (run by `cargo xtask bench`; \
         Criterion 0.8, 0.5 s warm-up, 50 samples over 2 s each). Each piece alone, in one \
         thread, no sockets: the median time per operation as Criterion estimates it. The \
         first request of a connection also builds the agent's Cedar entities and the set of \
         policies whose scope can apply; later requests reuse both.\n\n\
         | operation | median |\n|---|---|\n",
    );
    for (id, what) in BENCHES {
        s.push_str(&format!("| {what} (`{id}`) | {} |\n", m.ns(id).map_or("?".into(), human)));
    }
    s
}
