//! The audit trail's own numbers, as `cargo xtask bench` reports them:
//! - durable appends: 256 concurrent submitters, each waiting for its record to be on
//!   disk (`record_durable`: written and fdatasync'ed with its batch), for 3 s;
//! - writer capacity: batches of 1,024 request-sized records through the chain, no fsync
//!   but the periodic checkpoints';
//! - `verify` of an untouched trail of 100,000 records.
//!
//! Prints one JSON object.

use std::{sync::Arc, time::Instant};

use wl_daemon::{
    audit::{
        trail::{key_paths, Pending, Trail, TrailOptions},
        verify, AuditLog, AuditRecord,
    },
    config::Mode,
};

mod common;

fn record(i: u64) -> AuditRecord {
    common::request_record(i, Mode::Enforce)
}

fn options(dir: &std::path::Path) -> TrailOptions {
    TrailOptions {
        key_dir: dir.join("keys"),
        rotate_bytes: 1 << 40,
        checkpoint_every: 10_000,
        checkpoint_interval: std::time::Duration::from_secs(5),
    }
}

fn main() {
    let dir =
        tempfile::tempdir_in(std::env::var_os("WL_BENCH_DIR").unwrap_or_else(|| "/var/tmp".into())).unwrap();

    // Durable appends with group commit.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let durable_per_s = rt.block_on(async {
        let (log, writer) =
            AuditLog::open(&dir.path().join("durable.jsonl"), options(dir.path())).await.unwrap();
        let log = Arc::new(log);
        let stop = Instant::now() + std::time::Duration::from_secs(3);
        let mut tasks = Vec::new();
        for t in 0..256u64 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < stop {
                    log.record_durable(record(t * 1_000_000 + n)).await.expect("durable append");
                    n += 1;
                }
                n
            }));
        }
        let started = Instant::now();
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        let rate = total as f64 / started.elapsed().as_secs_f64();
        drop(log);
        writer.shutdown().await;
        rate
    });

    // Writer capacity and verification.
    let path = dir.path().join("capacity.jsonl");
    let keys = dir.path().join("capacity-keys");
    let mut trail =
        Trail::open(&path, TrailOptions { key_dir: keys.clone(), ..options(dir.path()) }).unwrap();
    let n = 100_000u64;
    let started = Instant::now();
    for b in 0..n / 1024 + 1 {
        let batch = (b * 1024..((b + 1) * 1024).min(n)).map(|i| Pending::Record(record(i))).collect();
        trail.commit(batch, false);
    }
    trail.close();
    let capacity_per_s = n as f64 / started.elapsed().as_secs_f64();
    let (_, public, anchor) = key_paths(&keys);
    let key = verify::read_public_key(&public).unwrap();
    let anchor = verify::read_anchor(&anchor).unwrap();
    let started = Instant::now();
    let report = verify::verify(&[path], &key, Some(anchor));
    let verify_s = started.elapsed().as_secs_f64();
    assert!(report.problem.is_none() && report.records > n);
    println!(
        "{{\"durable_records_per_s\": {durable_per_s:.0}, \"writer_records_per_s\": {capacity_per_s:.0}, \
         \"verify_100k_s\": {verify_s:.3}, \"verified_records\": {}}}",
        report.records
    );
}
