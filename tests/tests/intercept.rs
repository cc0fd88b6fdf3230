//! Transparent interception end to end: the real daemon, real eBPF programs attached to a
//! cgroup made for the test, loopback upstreams, and curl and python3 as agents with no
//! proxy settings.

use serde_json::Value;
use wl_e2e::{
    clients::{curl, python_json},
    servers::{self_signed_cert, Upstream},
    Daemon, DaemonConfig, DaemonHome, TestCgroup,
};

fn dst_is(r: &Value, dst: &str) -> bool {
    r["kind"] == "connection" && r["dst"] == dst
}

#[test]
fn agents_in_the_cgroup_are_redirected_spliced_and_audited() {
    let cg = TestCgroup::new("redirect");
    let home = DaemonHome::new();
    let dir = home.dir.path();
    let (cert, key) = self_signed_cert(dir, &["127.0.0.2", "::1"]);
    let tcp = Upstream::tcp(dir, "127.0.0.2", 0);
    let tls4 = Upstream::tls(dir, "127.0.0.2", 0, &cert, &key);
    let tls6 = Upstream::tls(dir, "::1", 0, &cert, &key);
    let cfg = DaemonConfig::new(&cg, &[tcp.addr.port(), tls4.addr.port(), tls6.addr.port()]);
    let daemon = Daemon::start(&home, &cfg);

    // python3, raw TCP: banner and echo arrive unchanged, getpeername() shows the original.
    let out = python_json(Some(&cg), "tcp_client.py", &["127.0.0.2", &tcp.addr.port().to_string()]);
    assert_eq!(out["banner"], "hello from upstream\n", "{out}");
    assert_eq!(out["echo_ok"], true, "{out}");
    assert_eq!(out["peer"], serde_json::json!(["127.0.0.2", tcp.addr.port()]), "getpeername: {out}");
    let pid = out["pid"].as_u64().unwrap();

    // The upstream saw the daemon, not the agent.
    let seen = tcp.accepted();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["owner"].as_u64(), Some(u64::from(daemon.pid())), "upstream peer: {seen:?}");
    assert_ne!(seen[0]["peer"], out["local"], "the agent's own socket reached the upstream");

    // One audit record with the original destination and the agent's identity.
    let dst = tcp.addr.to_string();
    let rec = home.wait_audit("for the python connection", |r| dst_is(r, &dst));
    assert_eq!(rec["action"], "splice", "{rec}");
    assert_eq!(rec["agent"]["pid"].as_u64(), Some(pid), "{rec}");
    assert_eq!(rec["agent"]["uid"], 0, "{rec}");
    assert_eq!(rec["agent"]["user"], "root", "{rec}");
    assert_eq!(rec["agent"]["exe"], out["exe"], "{rec}");
    assert_eq!(rec["agent"]["cgroup"], cg.name.as_str(), "{rec}");
    assert!(rec["agent"]["comm"].as_str().unwrap().starts_with("python"), "{rec}");
    assert!(rec["bytes_up"].as_u64().unwrap() >= 64 && rec["bytes_down"].as_u64().unwrap() >= 84, "{rec}");

    // curl over TLS, IPv4 and IPv6: the upstream's own certificate and bytes reach it.
    let direct = curl(None, &["--cacert", cert.to_str().unwrap(), &format!("https://{}/", tls4.addr)]);
    assert!(direct.status.success(), "direct curl: {}", String::from_utf8_lossy(&direct.stderr));
    for upstream in [&tls4, &tls6] {
        let url = format!("https://{}/", upstream.addr);
        let got = curl(Some(&cg), &["--cacert", cert.to_str().unwrap(), &url]);
        assert!(got.status.success(), "curl {url}: {}", String::from_utf8_lossy(&got.stderr));
        assert_eq!(got.stdout, direct.stdout, "body through wl differs from direct");
        let dst = upstream.addr.to_string();
        let rec = home.wait_audit(&format!("for curl to {dst}"), |r| dst_is(r, &dst));
        assert_eq!(rec["agent"]["exe"], "/usr/bin/curl", "{rec}");
        assert_eq!(rec["agent"]["comm"], "curl", "{rec}");
        let owners: Vec<_> = upstream.accepted().iter().map(|a| a["owner"].as_u64()).collect();
        assert!(owners.contains(&Some(u64::from(daemon.pid()))), "{url} accepted {owners:?}");
    }

    // Kernel-side events reach the daemon's log through aya-log.
    daemon.wait_log(&format!("redirect pid {pid} port {}", tcp.addr.port()));

    // A client outside the cgroup is not intercepted.
    let before = home.audit_records().len();
    let out = python_json(None, "tcp_client.py", &["127.0.0.2", &tcp.addr.port().to_string()]);
    assert_eq!(out["echo_ok"], true);
    let last = tcp.accepted().pop().unwrap();
    assert_eq!(last["peer"], out["local"], "outside client should reach the upstream itself");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(home.audit_records().len(), before, "outside client was audited");

    daemon.stop_ok();
}

/// The kernel relay (`intercept.kernel_relay`, on by default) takes over the agent's half
/// of a spliced connection without reordering or losing a byte: the agent uploads 24 MiB in
/// writes of varying size to an echo upstream, and the echo that comes back through the
/// daemon must match it byte for byte. Once after a short exchange (so the relay must carry
/// the whole upload), then starting before the upstream's banner (the switch happens while
/// bytes are in flight, whenever the daemon catches up), also with a non-blocking agent
/// (which must see "would block" when the upstream socket is full, never an error or a
/// loss) and with sendfile(2); and all of it with the relay off as the control.
///
/// Kernel TLS on a relayed socket: the kernel would hand the relay each record's plaintext
/// and a redirect would send it unencrypted, so a socket whose owner asks for an
/// upper-layer protocol (`TCP_ULP`) halfway through the upload must leave the relay at
/// that point: the relay carries exactly the bytes sent before, the daemon the rest, and
/// the echo still matches. (This machine's kernel has no kernel TLS, so the call fails
/// with ENOENT, but the hook that must see it runs first either way.) The exchange-first
/// and kernel-TLS cases run over IPv6 too (the programs key IPv6 sockets differently).
#[test]
fn spliced_uploads_move_into_the_kernel_relay_in_order() {
    const BYTES: u64 = 24 << 20;
    let cg = TestCgroup::new("relay");
    let home = DaemonHome::new();
    let dir = home.dir.path();
    let echo = Upstream::tcp(dir, "127.0.0.2", 0);
    // The same port on ::1, so that one intercepted port covers both.
    let echo6 = Upstream::tcp(dir, "::1", echo.addr.port());
    let port = echo.addr.port().to_string();
    let size = BYTES.to_string();
    let half = (BYTES / 2).to_string();

    for relay in [true, false] {
        let mut cfg = DaemonConfig::new(&cg, &[echo.addr.port()]);
        cfg.kernel_relay = relay;
        let daemon = Daemon::start(&home, &cfg);
        // The kernel took the relay's program (a refusal would turn the relay off).
        daemon.wait_log(&format!("kernel_relay={relay}"));
        let kernel_tls_halfway = ["--hello", "--ulp-at", half.as_str()];
        let cases: [(&Upstream, &[&str]); 7] = [
            (&echo, &["--hello"]),
            (&echo, &[]),
            (&echo, &["--nonblocking"]),
            (&echo, &["--sendfile"]),
            (&echo, &kernel_tls_halfway),
            (&echo6, &["--hello"]),
            (&echo6, &kernel_tls_halfway),
        ];
        for (upstream, mode) in cases {
            let host = upstream.addr.ip().to_string();
            let dst = upstream.addr.to_string();
            let mut args = vec![host.as_str(), port.as_str(), size.as_str()];
            args.extend_from_slice(mode);
            let out = python_json(Some(&cg), "stream_client.py", &args);
            let sent = out["sent"].as_u64().unwrap();
            assert_eq!(out["banner_ok"], true, "relay {relay} {host} {mode:?}: {out}");
            assert_eq!(out["echoed"].as_u64(), Some(sent), "relay {relay} {host} {mode:?}: {out}");
            assert_eq!(out["in_order"], true, "relay {relay} {host} {mode:?}: the echo differs: {out}");
            let pid = out["pid"].clone();
            let rec = home.wait_audit(&format!("the upload (relay {relay}, {host}, {mode:?})"), |r| {
                dst_is(r, &dst) && r["agent"]["pid"] == pid
            });
            assert_eq!(rec["action"], "splice", "{rec}");
            assert_eq!(rec["bytes_up"].as_u64(), Some(sent), "{rec}");
            let kernel = rec["bytes_up_kernel"].as_u64().unwrap();
            match (relay, mode) {
                // After the exchange the daemon has forwarded everything and said so: the
                // upload's first send already goes straight to the upstream.
                (true, ["--hello"]) => assert_eq!(kernel, BYTES, "{rec}\n{}", daemon.log_text()),
                (true, ["--hello", "--ulp-at", _]) => {
                    let before = out["ulp_sent_before"].as_u64().expect("the agent asked for kernel TLS");
                    assert!((BYTES / 2..BYTES).contains(&before), "{out}");
                    assert_eq!(kernel, before, "the relay went on after TCP_ULP: {rec}\n{out}");
                }
                (true, _) => assert!(kernel <= BYTES, "{rec}"),
                (false, _) => assert_eq!(kernel, 0, "{rec}"),
            }
        }
        daemon.stop_ok();
    }
}

#[test]
fn non_intercepted_ports_are_untouched() {
    let cg = TestCgroup::new("ports");
    let home = DaemonHome::new();
    let tcp = Upstream::tcp(home.dir.path(), "127.0.0.2", 0);
    let other = wl_e2e::free_port("127.0.0.2");
    let _daemon = Daemon::start(&home, &DaemonConfig::new(&cg, &[other]));
    let out = python_json(Some(&cg), "tcp_client.py", &["127.0.0.2", &tcp.addr.port().to_string()]);
    assert_eq!(out["echo_ok"], true);
    assert_eq!(tcp.accepted()[0]["peer"], out["local"], "a port not in intercept.ports was redirected");
}

#[test]
fn excluded_destinations_are_not_redirected() {
    let cg = TestCgroup::new("exclude");
    let home = DaemonHome::new();
    let tcp = Upstream::tcp(home.dir.path(), "127.0.0.4", 0);
    let mut cfg = DaemonConfig::new(&cg, &[tcp.addr.port()]);
    cfg.exclude = vec!["127.0.0.4/32".into()];
    let _daemon = Daemon::start(&home, &cfg);
    let out = python_json(Some(&cg), "tcp_client.py", &["127.0.0.4", &tcp.addr.port().to_string()]);
    assert_eq!(tcp.accepted()[0]["peer"], out["local"], "an excluded CIDR was redirected");
}

#[test]
fn quic_to_443_is_refused_only_when_block_quic_is_on() {
    let cg = TestCgroup::new("quic");
    let home = DaemonHome::new();
    let receiver = std::net::UdpSocket::bind("127.0.0.3:443").expect("bind udp 127.0.0.3:443");
    receiver.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();

    let mut cfg = DaemonConfig::new(&cg, &[443]);
    let daemon = Daemon::start(&home, &cfg);
    let out = python_json(Some(&cg), "udp_send.py", &["127.0.0.3", "443"]);
    assert_eq!(out["sendto"], "errno 1", "unconnected send with block_quic: {out}");
    assert_eq!(out["connect"], "errno 1", "connected send with block_quic: {out}");
    // Other UDP ports are untouched.
    let out = python_json(Some(&cg), "udp_send.py", &["127.0.0.3", "444"]);
    assert_eq!(out["sendto"], "sent", "{out}");
    daemon.wait_log("refused udp to port 443");
    daemon.stop_ok();

    cfg.block_quic = false;
    let _daemon = Daemon::start(&home, &cfg);
    let out = python_json(Some(&cg), "udp_send.py", &["127.0.0.3", "443"]);
    assert_eq!(out, serde_json::json!({"sendto": "sent", "connect": "sent"}));
    let mut buf = [0u8; 16];
    let (n, _) = receiver.recv_from(&mut buf).expect("datagram with block_quic = false");
    assert_eq!(&buf[..n], b"quic?");
}

#[test]
fn the_daemon_inside_an_intercepted_cgroup_does_not_redirect_itself() {
    let cg = TestCgroup::new("self");
    let home = DaemonHome::new();
    let tcp = Upstream::tcp(home.dir.path(), "127.0.0.2", 0);
    let daemon = Daemon::start_in(&home, &DaemonConfig::new(&cg, &[tcp.addr.port()]), Some(&cg));
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", daemon.pid())).unwrap();
    assert!(own.contains(&cg.name), "daemon is not in the test cgroup: {own}");

    let out = python_json(Some(&cg), "tcp_client.py", &["127.0.0.2", &tcp.addr.port().to_string()]);
    assert_eq!(out["echo_ok"], true, "{out}");
    let seen = tcp.accepted();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["owner"].as_u64(), Some(u64::from(daemon.pid())));
    // Exactly one record: the daemon's own upstream connect did not loop back into itself.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let dst = tcp.addr.to_string();
    let records: Vec<_> = home.audit_records().into_iter().filter(|r| r["kind"] == "connection").collect();
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["dst"], dst.as_str());
    assert_eq!(records[0]["agent"]["pid"], out["pid"]);
}

#[test]
fn fail_open_detaches_on_sigterm() {
    let cg = TestCgroup::new("failopen");
    let home = DaemonHome::new();
    let tcp = Upstream::tcp(home.dir.path(), "127.0.0.2", 0);
    let daemon = Daemon::start(&home, &DaemonConfig::new(&cg, &[tcp.addr.port()]));
    // Seven interception programs and the kernel relay's setsockopt program.
    assert_eq!(cg.attached_programs().len(), 8, "{:?}", cg.attached_programs());
    daemon.stop_ok();
    assert!(cg.attached_programs().is_empty(), "left attached: {:?}", cg.attached_programs());
    let out = python_json(Some(&cg), "tcp_client.py", &["127.0.0.2", &tcp.addr.port().to_string()]);
    assert_eq!(out["echo_ok"], true);
    assert_eq!(tcp.accepted()[0]["peer"], out["local"], "should connect directly after exit");
}

#[test]
fn fail_closed_refuses_while_down_and_is_taken_over_on_restart() {
    let cg = TestCgroup::new("failclosed");
    let home = DaemonHome::new();
    let tcp = Upstream::tcp(home.dir.path(), "127.0.0.2", 0);
    let mut cfg = DaemonConfig::new(&cg, &[tcp.addr.port()]);
    // Fixed listener ports: the pinned programs keep redirecting to them while down.
    cfg.listen = vec![
        format!("127.0.0.1:{}", wl_e2e::free_port("127.0.0.1")),
        format!("[::1]:{}", wl_e2e::free_port("::1")),
    ];
    cfg.fail = "closed";
    let port = tcp.addr.port().to_string();

    let daemon = Daemon::start(&home, &cfg);
    assert_eq!(python_json(Some(&cg), "tcp_client.py", &["127.0.0.2", &port])["echo_ok"], true);
    daemon.stop_ok();
    // The seven interception programs; the relay's setsockopt program went with the daemon.
    let left = cg.attached_programs();
    assert_eq!(left.len(), 7, "links should stay pinned: {left:?}");
    assert!(!left.iter().any(|p| p.contains("wl_setsockopt")), "{left:?}");

    // Down: the agent's connect is refused, and nothing reaches the upstream.
    let mut client = cg.command("python3");
    client.arg(wl_e2e::servers::fixtures().join("tcp_client.py")).args(["127.0.0.2", &port]);
    let out = client.output().unwrap();
    assert!(!out.status.success(), "connect should fail while the daemon is down");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ConnectionRefused"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tcp.accepted().len(), 1);

    // Back: the pinned programs are taken over, not attached twice, and intercept again.
    let daemon = Daemon::start(&home, &cfg);
    // The seven pinned ones taken over, the relay's setsockopt program attached anew.
    assert_eq!(cg.attached_programs().len(), 8, "attached twice: {:?}", cg.attached_programs());
    let out = python_json(Some(&cg), "tcp_client.py", &["127.0.0.2", &port]);
    assert_eq!(out["echo_ok"], true);
    let pid = out["pid"].clone();
    home.wait_audit("after takeover", |r| r["agent"]["pid"] == pid);
    assert_eq!(tcp.accepted().last().unwrap()["owner"].as_u64(), Some(u64::from(daemon.pid())));
    daemon.stop_ok();

    // Switching the same cgroup to fail = "open" removes the pins and detaches on exit.
    cfg.fail = "open";
    let daemon = Daemon::start(&home, &cfg);
    assert!(!home.pin_dir.exists(), "pins left after switching to fail = open");
    daemon.stop_ok();
    assert!(cg.attached_programs().is_empty(), "{:?}", cg.attached_programs());
}

#[test]
fn other_client_first_protocols_are_spliced_except_on_443() {
    let cg = TestCgroup::new("binary");
    let home = DaemonHome::new();
    let tcp = Upstream::tcp(home.dir.path(), "127.0.0.2", 0);
    let _daemon = Daemon::start(&home, &DaemonConfig::new(&cg, &[tcp.addr.port()]));
    let script = format!(
        "import socket; s = socket.create_connection(('127.0.0.2', {})); s.sendall(bytes([0, 1, 2, 255]) * 4); \
         s.settimeout(10); data = b''\nwhile len(data) < 36: data += s.recv(100)\nprint(data[20:].hex())",
        tcp.addr.port()
    );
    let out = cg.command("python3").args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "000102ff".repeat(4), "banner then the echo");
    let rec = home.wait_audit("for the binary connection", |r| r["kind"] == "connection");
    assert_eq!(rec["action"], "splice", "{rec}");
}

/// Spliced connections give their handshake slot back: more long-lived spliced
/// connections than there are slots (64) stay open together, and new ones still get through.
#[test]
fn long_lived_spliced_connections_do_not_hold_handshake_slots() {
    let cg = TestCgroup::new("manysplice");
    let home = DaemonHome::new();
    let tcp = Upstream::tcp(home.dir.path(), "127.0.2.9", 0);
    let _daemon = Daemon::start(&home, &DaemonConfig::new(&cg, &[tcp.addr.port()]));
    // Each connection is checked end to end (banner, then its own bytes echoed) and kept
    // open while the next ones are made.
    let script = format!(
        "import socket\nsocks = []\nfor i in range(100):\n    s = socket.create_connection(('127.0.2.9', {}))\n    \
         s.settimeout(10)\n    s.sendall(b'%04d' % i)\n    data = b''\n    while len(data) < 24: data += s.recv(100)\n    \
         assert data[20:] == b'%04d' % i, data\n    socks.append(s)\nprint(len(socks))",
        tcp.addr.port()
    );
    let out = cg.command("python3").args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "100");
    // ...and every one went through wl: one splice record each once they have closed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let spliced = home
            .audit_records()
            .iter()
            .filter(|r| r["kind"] == "connection" && r["action"] == "splice" && r["error"].is_null())
            .count();
        if spliced == 100 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{spliced} of 100 splice records");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
