//! The secrets broker's round trip as the proxy makes it per request: `issue` (peer check,
//! the `UseSecret` Cedar policy, an Ed25519 signature) then `redeem` (the token
//! recognised as one it just signed, so no signature check; validity, binding, the ledger
//! append, decryption), on one kept-open connection to a real
//! `wl-daemon broker` process. Also each half alone. Prints one JSON object of p50/p99 in
//! microseconds.

use std::{path::Path, process::Command, time::Instant};

use wl_daemon::broker::{
    client::Session,
    protocol::{BrokerRequest, Use},
    store::SecretValue,
};

mod common;

fn percentiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

struct Broker(std::process::Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

fn start(dir: &Path) -> Broker {
    let config = dir.join("wl.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\n[broker]\nstate_dir = {:?}\nsocket = {:?}\naudit = {:?}\npolicy_dir = {:?}\n",
            dir.join("state").display().to_string(),
            dir.join("state/broker").display().to_string(),
            dir.join("broker.sock").display().to_string(),
            dir.join("broker-audit.jsonl").display().to_string(),
            dir.join("none").display().to_string(),
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_wl-daemon"))
        .args(["broker", "--config"])
        .arg(&config)
        .env("WL_LOG", "warn")
        .spawn()
        .expect("start the broker");
    for _ in 0..200 {
        if dir.join("broker.sock").exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    Broker(child)
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let _broker = start(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut s = Session::connect(&dir.path().join("broker.sock")).await.expect("connect to the broker");
        let put = BrokerRequest::Put {
            name: "openai".into(),
            hosts: vec!["api.openai.com".into()],
            value: SecretValue::new(b"sk-bench-0123456789abcdef0123456789abcdef".to_vec()),
        };
        assert!(s.call(&put).await.unwrap().ok);
        let use_ = Use {
            agent: Some(std::sync::Arc::new(common::agent())),
            host: "api.openai.com".into(),
            secret: "openai".into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
        };
        // The socket and the protocol alone: a request that does no work.
        let mut idle = Vec::new();
        for i in 0..5500 {
            let t = Instant::now();
            assert!(s.call(&BrokerRequest::Status).await.unwrap().ok);
            if i >= 500 {
                idle.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        let (mut both, mut issue, mut redeem) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..5500 {
            let t = Instant::now();
            let issued = s.call(&BrokerRequest::Issue(use_.clone())).await.unwrap();
            let t_issue = t.elapsed();
            let sct = issued.sct.expect("a token");
            let t2 = Instant::now();
            let redeemed = s.call(&BrokerRequest::Redeem { sct, use_: use_.clone() }).await.unwrap();
            let t_redeem = t2.elapsed();
            assert!(redeemed.ok && redeemed.value.is_some(), "{:?}", redeemed.code);
            if i >= 500 {
                both.push((t_issue + t_redeem).as_secs_f64() * 1e6);
                issue.push(t_issue.as_secs_f64() * 1e6);
                redeem.push(t_redeem.as_secs_f64() * 1e6);
            }
        }
        let (p50, p99) = percentiles(both);
        let (i50, i99) = percentiles(issue);
        let (r50, r99) = percentiles(redeem);
        let (s50, s99) = percentiles(idle);
        println!(
            "{{\"p50_us\": {p50:.1}, \"p99_us\": {p99:.1}, \"issue_p50_us\": {i50:.1}, \"issue_p99_us\": {i99:.1}, \
             \"redeem_p50_us\": {r50:.1}, \"redeem_p99_us\": {r99:.1}, \"status_p50_us\": {s50:.1}, \"status_p99_us\": {s99:.1}}}"
        );
    });
}
