//! The Debian package on a booted systemd: a Debian 12 machine (debootstrap, booted with
//! `systemd-nspawn --boot`, see `wl_e2e::machine`) gets `target/debian/wl_*.deb` with
//! dpkg, and then lives through an operator's day: both units reach active, an agent
//! service is intercepted and gets its credential injected, `systemctl reload` loads new
//! policies and keeps the old ones when the new ones are broken, a second daemon is
//! refused, each capability the unit grants is needed, `systemctl stop` detaches, a broken
//! configuration fails the start with the error in the journal and `systemctl status`, an
//! upgrade keeps the CA, secrets and edited configuration, `dpkg --remove` stops and
//! untrusts, and `dpkg --purge` leaves no units, users or state, only the audit trail,
//! which still verifies.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::Value;
use wl_e2e::{bin, machine::Machine, pki::TestRoot, require_root, servers::fixtures};

const SECRET: &str = "sk-machine-test-7f3a9c";

/// The request records of the daemon's trail inside the machine, for one agent unit.
fn requests_of(m: &Machine, unit: &str) -> Vec<Value> {
    std::fs::read_to_string(m.path("/var/log/wl/audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["kind"] == "request" && r["agent"]["unit"] == unit)
        .collect()
}

/// Waits for the request record of `unit` (records are written within milliseconds).
fn request_of(m: &Machine, unit: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(r) = requests_of(m, unit).pop() {
            return r;
        }
        assert!(Instant::now() < deadline, "no request record for {unit}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An agent: a service of the machine's own systemd, with no proxy settings and no key.
/// Returns curl's exit status and output.
fn agent(m: &Machine, unit: &str, curl_args: &str) -> (bool, String) {
    let out = m.sh(&format!(
        "systemd-run --wait --pipe --quiet --unit={unit} curl -sS --max-time 10 {curl_args} \
         https://api.openai.com/v1/models"
    ));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The daemon's journal since the machine booted.
fn journal(m: &Machine) -> String {
    m.sh_ok("journalctl -u wl-daemon --no-pager -o cat")
}

#[test]
fn the_package_on_a_booted_systemd() {
    require_root();
    let deb = PathBuf::from(
        std::env::var_os("WL_DEB")
            .expect("WL_DEB is not set: run the tests with `cargo xtask test`, which builds the package"),
    );
    // What the machine gets from the test: the fake API, its certificate, and the root
    // that stands in for the public ones (readable by the daemon's user).
    let share = tempfile::Builder::new().prefix("wl-machine-share-").tempdir().unwrap();
    std::fs::set_permissions(share.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = TestRoot::new(share.path());
    let api_cert = root.server_cert("api", &["api.openai.com"], false);
    std::fs::copy(fixtures().join("fake_api.py"), share.path().join("fake_api.py")).unwrap();
    for entry in std::fs::read_dir(share.path()).unwrap() {
        std::fs::set_permissions(entry.unwrap().path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let inside = |p: &Path| format!("/wl-test/{}", p.file_name().unwrap().to_string_lossy());

    let m = Machine::boot("wl-pkg", &[(share.path(), "/wl-test"), (&deb, "/root/wl.deb")], |root| {
        let hosts = root.join("etc/hosts");
        let mut text = std::fs::read_to_string(&hosts).unwrap_or_default();
        text.push_str("127.0.1.1 api.openai.com\n");
        std::fs::write(hosts, text).unwrap();
    });

    // Install: users, CA (trusted), both units enabled and active, events in the journal
    // with their fields as journal fields.
    let installed = m.sh_ok("dpkg -i /root/wl.deb");
    assert!(installed.contains("installed /usr/local/share/ca-certificates/wl-beacon-ca.crt"), "{installed}");
    m.wait_for("both units active", "systemctl is-active wl-broker.service wl-daemon.service");
    m.sh_ok("getent passwd wl && getent passwd wl-broker");
    m.sh_ok("systemctl is-enabled wl-broker.service wl-daemon.service");
    let ready = m.wait_for(
        "the ready event in the journal",
        "journalctl -u wl-daemon -o json --no-pager | grep '\"MESSAGE\":\"wl-daemon ready\"'",
    );
    let ready: Value = serde_json::from_str(ready.lines().last().unwrap()).unwrap();
    assert_eq!(ready["MODE"], "Observe", "{ready}");
    assert_eq!(ready["SYSLOG_IDENTIFIER"], "wl-daemon", "{ready}");
    assert_eq!(ready["_UID"].as_str(), m.sh_ok("id -u wl").lines().next(), "runs as its own user: {ready}");
    assert!(ready["LISTENERS"].as_str().unwrap().contains("127.0.0.1:15001"), "{ready}");

    // Configure as an operator would: the upstream's root, a credential, the secret.
    m.sh_ok(&format!(
        "sed -i 's|^upstream_extra_roots = \\[\\]|upstream_extra_roots = [\"{root}\"]|' /etc/wl/wl.toml && \
         printf '\\n[[credential]]\\nhost = \"api.openai.com\"\\nsecret = \"openai\"\\nheader = \"authorization\"\\nformat = \"Bearer {{secret}}\"\\n' >> /etc/wl/wl.toml && \
         wlctl config check /etc/wl/wl.toml && \
         printf '%s\\n' '{SECRET}' | wlctl secret put openai --host api.openai.com && \
         systemctl restart wl-daemon",
        root = inside(&root.cert)
    ));
    m.sh_ok(&format!(
        "systemd-run --unit=fake-api -E FAKE_API_KEY={SECRET} python3 /wl-test/fake_api.py 127.0.1.1 443 {} {} \
         /var/log/fake-api.jsonl",
        inside(&api_cert.cert),
        inside(&api_cert.key)
    ));
    m.wait_for("the fake API", "python3 -c \"import socket; socket.create_connection(('127.0.1.1', 443))\"");

    // An agent service is intercepted: it trusts the beacon CA through the system store the
    // package updated, and its request reaches the API with the key it never had.
    let (ok, out) = agent(&m, "agent-1", "");
    assert!(ok && out.contains("\"data\""), "agent-1: {out}");
    let rec = request_of(&m, "agent-1.service");
    assert_eq!(rec["host"], "api.openai.com", "{rec}");
    // Its pid as the machine numbers it (the daemon is in the machine's pid namespace), so
    // its executable is known too.
    assert_eq!(rec["agent"]["exe"], "/usr/bin/curl", "{rec}");
    assert_eq!(rec["secret"], "openai", "{rec}");
    let api_log = std::fs::read_to_string(m.path("/var/log/fake-api.jsonl")).unwrap();
    assert!(api_log.contains(&format!("Bearer {SECRET}")), "the API did not get the key: {api_log}");
    let everything = m.sh_ok(
        "journalctl -b --no-pager -o verbose; cat /var/log/wl/audit.jsonl /var/log/wl-broker/audit.jsonl",
    );
    assert!(!everything.contains(SECRET), "the secret is in the journal or an audit trail");

    // `systemctl reload` loads a new policy: observe records the request as would_deny.
    m.sh_ok(
        "printf '@id(\"no-model-lists\")\\nforbid(principal, action == Wl::Action::\"Request\", resource)\\n\
         when { context.path == \"/v1/models\" };\\n' > /etc/wl/policies/no-model-lists.cedar && \
         systemctl reload wl-daemon",
    );
    // (`systemctl reload` waits for the daemon's answer: nothing to wait for after it.)
    let (ok, out) = agent(&m, "agent-2", "");
    assert!(ok, "observe never denies: {out}");
    let rec = request_of(&m, "agent-2.service");
    assert_eq!(rec["would_deny"], true, "{rec}");
    assert_eq!(rec["policies"], serde_json::json!(["no-model-lists"]), "{rec}");

    // A broken policy on reload is refused: `systemctl reload` fails, the journal says why
    // and that the previous policies stay, and they do.
    let reload = m.sh(
        "printf 'permit(principal, action\\n' > /etc/wl/policies/broken.cedar && systemctl reload wl-daemon",
    );
    assert!(!reload.status.success(), "a broken policy reloaded");
    let said = journal(&m);
    assert!(
        said.contains("policy reload refused; the previous policies stay in force")
            && said.contains("broken.cedar"),
        "{said}"
    );
    m.sh_ok("systemctl is-active wl-daemon");
    let (ok, _) = agent(&m, "agent-3", "");
    assert!(ok);
    assert_eq!(request_of(&m, "agent-3.service")["policies"], serde_json::json!(["no-model-lists"]));
    m.sh_ok("rm /etc/wl/policies/broken.cedar /etc/wl/policies/no-model-lists.cedar && systemctl reload wl-daemon");

    // The reload re-reads the configuration: the mode applies live, the rest is named as
    // waiting for a restart.
    m.sh_ok(
        "sed -i 's/^mode = \"observe\"/mode = \"enforce\"/; s/^leaf_validity = \"24h\"/leaf_validity = \"12h\"/' \
         /etc/wl/wl.toml && systemctl reload wl-daemon",
    );
    let status: Value = serde_json::from_str(&m.sh_ok("wlctl status --json")).unwrap();
    assert_eq!(status["mode"], "enforce", "{status}");
    let said = journal(&m);
    assert!(
        said.contains("take effect at restart (systemctl restart wl-daemon): tls.leaf_validity"),
        "{said}"
    );
    m.sh_ok(
        "sed -i 's/^mode = \"enforce\"/mode = \"observe\"/; s/^leaf_validity = \"12h\"/leaf_validity = \"24h\"/' \
         /etc/wl/wl.toml && systemctl reload wl-daemon",
    );

    // A second daemon is refused, with a message that says what to do.
    let second = m.sh("timeout 10 wl-daemon run --config /etc/wl/wl.toml");
    let text = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && text.contains("another wl-daemon is already running"), "{text}");

    // Each capability the unit grants for the programs is needed: without it, no start.
    for dropped in ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"] {
        let rest: Vec<&str> = ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON", "CAP_SYS_PTRACE"]
            .into_iter()
            .filter(|c| *c != dropped)
            .collect();
        m.sh_ok(&format!(
            "mkdir -p /etc/systemd/system/wl-daemon.service.d && \
             printf '[Service]\\nAmbientCapabilities=\\nAmbientCapabilities={}\\n' > /etc/systemd/system/wl-daemon.service.d/caps.conf && \
             systemctl daemon-reload",
            rest.join(" ")
        ));
        let start = m.sh("systemctl restart wl-daemon");
        assert!(!start.status.success(), "wl-daemon started without {dropped}");
        m.sh_ok("systemctl stop wl-daemon; systemctl reset-failed wl-daemon");
    }
    m.sh_ok("rm -r /etc/systemd/system/wl-daemon.service.d && systemctl daemon-reload && systemctl restart wl-daemon");

    // `systemctl stop` detaches: an agent that trusts only the API's real root fails while
    // wl intercepts (it is shown the beacon's certificate) and reaches the API after.
    // (--capath too: Debian's curl also trusts /etc/ssl/certs, where the beacon CA is.)
    let direct =
        format!("--cacert {} --capath /wl-test -H 'Authorization: Bearer {SECRET}'", inside(&root.cert));
    let (ok, out) = agent(&m, "agent-4", &direct);
    assert!(
        !ok && out.contains("certificate"),
        "intercepted, so the beacon's certificate: {out}\n{}",
        m.sh_ok("journalctl -u wl-daemon --no-pager -n 30; tail -n 5 /var/log/wl/audit.jsonl")
    );
    m.sh_ok("systemctl stop wl-daemon");
    let (ok, out) = agent(&m, "agent-5", &direct);
    assert!(ok && out.contains("\"data\""), "after stop the agent goes direct: {out}");
    assert!(requests_of(&m, "agent-5.service").is_empty());

    // A broken configuration: the start fails, and the journal and `systemctl status` say why.
    m.sh_ok("cp /etc/wl/wl.toml /root/wl.toml.good && sed -i 's/^mode = \"observe\"/mode = \"sometimes\"/' /etc/wl/wl.toml");
    assert!(!m.sh("systemctl start wl-daemon").status.success(), "started with a broken config");
    let status = m.wait_for(
        "the error in systemctl status",
        "systemctl status wl-daemon --no-pager -n 20 | grep -B20 'wl-daemon: error:.*sometimes'",
    );
    // Not restarted in a loop: only an edit can fix a configuration.
    assert!(status.contains("status=78") && status.contains("Active: failed"), "status: {status}");
    assert!(journal(&m).lines().any(|l| l.starts_with("wl-daemon: error:") && l.contains("sometimes")));
    m.sh_ok("cp /root/wl.toml.good /etc/wl/wl.toml && systemctl reset-failed wl-daemon && systemctl start wl-daemon");

    // Upgrade (the same package again): units restarted, the CA, secrets and the edited
    // configuration carried over.
    let fingerprint = m.sh_ok("wlctl ca show | grep fingerprint");
    m.sh_ok("dpkg -i /root/wl.deb");
    m.wait_for(
        "both units active after the upgrade",
        "systemctl is-active wl-broker.service wl-daemon.service",
    );
    assert_eq!(m.sh_ok("wlctl ca show | grep fingerprint"), fingerprint, "the upgrade replaced the CA");
    assert!(std::fs::read_to_string(m.path("/etc/wl/wl.toml")).unwrap().contains("[[credential]]"));
    let (ok, out) = agent(&m, "agent-6", "");
    assert!(ok && out.contains("\"data\""), "after the upgrade: {out}");
    assert_eq!(request_of(&m, "agent-6.service")["credential"], "injected");

    // Remove: services stopped, units gone, the CA no longer trusted; configuration, users
    // and state stay for a reinstall.
    let beacon = m.sh_ok("wlctl ca export");
    let beacon_body: String = beacon.lines().filter(|l| !l.starts_with("-----")).collect();
    m.sh_ok("dpkg --remove wl");
    assert!(!m
        .sh("systemctl is-active --quiet wl-daemon || systemctl is-active --quiet wl-broker")
        .status
        .success());
    let bundle: String =
        std::fs::read_to_string(m.path("/etc/ssl/certs/ca-certificates.crt")).unwrap().lines().collect();
    assert!(!bundle.contains(&beacon_body), "the beacon CA is still trusted after remove");
    assert!(m.path("/etc/wl/wl.toml").exists() && m.path("/var/lib/wl-broker").exists());
    m.sh_ok("getent passwd wl");

    // Purge: no units, users or state; the audit trails stay and still verify.
    let purged = m.sh_ok("dpkg --purge wl");
    assert!(purged.contains("kept the audit trail in /var/log/wl"), "{purged}");
    let leftovers = m.sh_ok(
        "find /etc/systemd /lib/systemd/system /usr/lib/systemd /etc/wl /var/lib/wl /var/lib/wl-broker \
         /usr/bin/wl-daemon /usr/bin/wlctl -name 'wl*' 2>/dev/null; true",
    );
    assert!(leftovers.trim().is_empty(), "left after purge: {leftovers}");
    assert!(!m.sh("getent passwd wl || getent passwd wl-broker || getent group wl").status.success());
    for (trail, what) in [("/var/log/wl", "daemon"), ("/var/log/wl-broker", "broker")] {
        let file = m.path(&format!("{trail}/audit.jsonl"));
        assert!(file.metadata().is_ok_and(|m| m.len() > 0), "the {what}'s trail is gone");
        let verify = std::process::Command::new(bin("wlctl"))
            .args(["audit", "verify"])
            .arg(&file)
            .arg("--key")
            .arg(m.path(&format!("{trail}/checkpoint.pub")))
            .arg("--anchor")
            .arg(m.path(&format!("{trail}/head")))
            .output()
            .unwrap();
        assert!(
            verify.status.success(),
            "the kept {what} trail does not verify: {}{}",
            String::from_utf8_lossy(&verify.stdout),
            String::from_utf8_lossy(&verify.stderr)
        );
    }
}

/// `cargo xtask install` does what the package does, from source, under /usr/local; its
/// `uninstall --purge` leaves what `dpkg --purge` leaves.
#[test]
fn the_source_install_on_a_booted_systemd() {
    require_root();
    let tree =
        PathBuf::from(std::env::var_os("WL_INSTALL_TREE").expect(
            "WL_INSTALL_TREE is not set: run the tests with `cargo xtask test`, which installs into it",
        ));
    let m = Machine::boot("wl-src", &[], |root| {
        let copy = std::process::Command::new("cp").arg("-a").arg(tree.join(".")).arg(root).status().unwrap();
        assert!(copy.success());
    });
    m.sh_ok("/usr/local/share/wl/postinst configure");
    m.wait_for("both units active", "systemctl is-active wl-broker.service wl-daemon.service");
    let units = m.sh_ok("systemctl show -p FragmentPath -p ExecStart wl-daemon.service");
    assert!(
        units.contains("/etc/systemd/system/wl-daemon.service") && units.contains("/usr/local/bin/wl-daemon"),
        "{units}"
    );
    let status = m.sh_ok("wlctl status --json");
    let status: Value = serde_json::from_str(&status).unwrap_or_else(|e| panic!("{e}: {status}"));
    assert_eq!(status["mode"], "observe", "{status}");
    m.sh_ok("test -f /usr/local/share/ca-certificates/wl-beacon-ca.crt && bash -c 'complete -p' >/dev/null");

    let out = m.sh_ok("/usr/local/share/wl/uninstall --purge");
    assert!(out.contains("wl: uninstalled"), "{out}");
    let leftovers = m.sh_ok(
        "find /etc/systemd /usr/local /etc/wl /var/lib/wl /var/lib/wl-broker /usr/local/share/ca-certificates \
         -name 'wl*' 2>/dev/null; true",
    );
    assert!(leftovers.trim().is_empty(), "left after uninstall --purge: {leftovers}");
    assert!(!m.sh("getent passwd wl || getent passwd wl-broker").status.success());
    assert!(m.path("/var/log/wl/audit.jsonl").exists(), "the audit trail was not kept");
}
