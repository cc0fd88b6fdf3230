//! `wlctl` as operators run it: the real binary against a real state directory, and the
//! trust store changes inside a private mount namespace (the machine's stays untouched).

use std::process::Command;

use wl_e2e::{bin, DaemonHome};

fn wlctl(config: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("wlctl")).arg("--config").arg(config).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ca_init_show_export_install_uninstall() {
    wl_e2e::require_root();
    let home = DaemonHome::new();
    let dir = home.dir.path();
    let config = dir.join("wl.toml");
    std::fs::write(&config, format!("state_dir = {:?}\n", dir.join("state").display().to_string())).unwrap();

    // show before init: a clear error.
    let (ok, _, err) = wlctl(&config, &["ca", "show"]);
    assert!(!ok && err.contains("beacon CA file"), "{err}");

    let (ok, out, err) = wlctl(&config, &["ca", "init"]);
    assert!(ok, "{err}");
    assert!(out.contains("created beacon CA") && out.contains("fingerprint: SHA256 "), "{out}");
    let (ok, again, _) = wlctl(&config, &["ca", "init"]);
    assert!(ok && again.contains("already exists"), "{again}");
    let fingerprint = out.lines().find(|l| l.starts_with("fingerprint")).unwrap().to_owned();
    assert!(again.contains(&fingerprint), "init twice must keep the same CA");
    let (_, show, _) = wlctl(&config, &["ca", "show"]);
    assert!(show.contains("wl beacon CA") && show.contains("not after"), "{show}");
    let (_, json, _) = wlctl(&config, &["ca", "show", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert!(fingerprint.ends_with(json["fingerprint_sha256"].as_str().unwrap()), "{json} vs {fingerprint}");
    assert!(json["subject"].as_str().unwrap().contains("wl beacon CA"), "{json}");
    let (_, pem, _) = wlctl(&config, &["ca", "export"]);
    assert_eq!(pem, std::fs::read_to_string(dir.join("state/ca/beacon-ca.pem")).unwrap());
    assert!(!pem.contains("PRIVATE KEY"));

    // install / uninstall against a private copy of the trust store.
    let certs = dir.join("etc-ssl-certs");
    let local = dir.join("local-cas");
    std::fs::create_dir(&local).unwrap();
    assert!(Command::new("cp").arg("-a").arg("/etc/ssl/certs").arg(&certs).status().unwrap().success());
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let script = format!(
        "mount --bind {certs} /etc/ssl/certs && mount --bind {local} /usr/local/share/ca-certificates && \
         {wlctl} --config {config} ca install && tr -d '\\n' < /etc/ssl/certs/ca-certificates.crt | grep -c {first} ; \
         {wlctl} --config {config} ca uninstall && tr -d '\\n' < /etc/ssl/certs/ca-certificates.crt | grep -c {first} ; true",
        certs = certs.display(),
        local = local.display(),
        wlctl = bin("wlctl").display(),
        config = config.display(),
        first = &body[..60],
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("installed /usr/local/share/ca-certificates/wl-beacon-ca.crt"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt"), "{text}");
    let counts: Vec<&str> =
        text.lines().filter(|l| l.chars().all(|c| c.is_ascii_digit()) && !l.is_empty()).collect();
    assert_eq!(
        counts,
        vec!["1", "0"],
        "bundle should hold the CA after install and not after uninstall:\n{text}"
    );
    // The machine's own store is untouched.
    assert!(!std::path::Path::new("/usr/local/share/ca-certificates/wl-beacon-ca.crt").exists());
}

#[test]
fn config_check() {
    let home = DaemonHome::new();
    let good = home.dir.path().join("good.toml");
    std::fs::write(&good, "mode = \"enforce\"\n").unwrap();
    let (ok, out, _) = wlctl(&good, &["config", "check", good.to_str().unwrap()]);
    assert!(ok && out.contains(": ok"), "{out}");
    let bad = home.dir.path().join("bad.toml");
    std::fs::write(&bad, "mode = \"enforce\"\n[tls]\ngoverned = []\n").unwrap();
    let out = Command::new(bin("wlctl")).args(["config", "check"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3") && err.contains("governed"), "{err}");
}

#[test]
fn completions_name_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(bin("wlctl")).args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        for word in ["status", "secret", "audit", "verify", "rotate-key", "policy"] {
            assert!(text.contains(word), "{shell} completions lack {word}");
        }
    }
    let out = Command::new(bin("wlctl")).args(["completions", "tcsh"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("possible values"),
        "a clear error for an unknown shell"
    );
}
