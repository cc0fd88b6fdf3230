//! Leaf minting, cold (a new name: one signature) and cached (a cache hit), as
//! `cargo xtask bench` reports it. Prints one JSON object of medians in microseconds.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use wl_daemon::tls::{ca::BeaconCa, leaf::LeafCache};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let dir = std::env::temp_dir().join(format!("wl-bench-ca-{}", std::process::id()));
    let ca = BeaconCa::load_or_create(&dir, &[]).expect("CA");
    let cache = Arc::new(LeafCache::new(ca, Duration::from_secs(86_400), 100_000));
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let (mut cold, mut cached) = (Vec::new(), Vec::new());
    rt.block_on(async {
        for i in 0..2_000 {
            let name = format!("host{i}.bench.example");
            let t = Instant::now();
            cache.get(&name).await.unwrap();
            cold.push(t.elapsed().as_secs_f64() * 1e6);
            let t = Instant::now();
            cache.get(&name).await.unwrap();
            cached.push(t.elapsed().as_secs_f64() * 1e6);
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    println!("{{\"mint_cold_us\": {:.2}, \"mint_cached_us\": {:.3}}}", median(cold), median(cached));
}
