//! Real clients run as agents: curl, python3 (raw sockets, requests, openai), node.

use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::{servers::fixtures, TestCgroup};

/// Runs a fixture Python script (plain `python3`) inside `cg` (or outside when `None`) and
/// parses the JSON it prints.
pub fn python_json(cg: Option<&TestCgroup>, script: &str, args: &[&str]) -> Value {
    let mut cmd = match cg {
        Some(cg) => cg.command("python3"),
        None => Command::new("python3"),
    };
    cmd.arg(fixtures().join(script)).args(args);
    let out = run(&mut cmd);
    assert!(out.status.success(), "{script} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{script} printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
    })
}

/// Runs curl inside `cg` (or outside) with `args`; no proxy variables reach it.
pub fn curl(cg: Option<&TestCgroup>, args: &[&str]) -> Output {
    let mut cmd = match cg {
        Some(cg) => cg.command("curl"),
        None => Command::new("curl"),
    };
    cmd.args(["-sS", "--max-time", "10"]).args(args);
    run(&mut cmd)
}

fn run(cmd: &mut Command) -> Output {
    for var in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null()).output().expect("run client")
}
