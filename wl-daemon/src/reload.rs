//! Reload (`systemctl reload wl-daemon`, SIGHUP, `wlctl reload`): re-read the configuration
//! file and the policy directory, apply what can change while connections are open, and say
//! what waits for a restart.
//!
//! Live: the policies, `mode` and `policy.host_modes` (the file wins over an earlier
//! `wlctl mode`). Everything else (listeners, cgroups, TLS, credentials, audit, broker) is
//! fixed at start: a changed value is reported as waiting for `systemctl restart
//! wl-daemon`, and the running value stays. All or nothing: an invalid file or an invalid
//! policy set refuses the whole reload and changes nothing.

use std::sync::{Arc, Mutex};

use crate::{
    config::{Config, Mode},
    policy::PolicyStore,
};

/// What a reload applied.
#[derive(Debug)]
pub struct Reloaded {
    /// Policies now in force.
    pub policies: usize,
    /// The global mode now in force.
    pub mode: Mode,
    /// Settings that changed in the file and take effect at the next start (`section.key`).
    pub restart_needed: Vec<String>,
}

/// Holds what a reload compares against and applies to.
#[derive(Debug)]
pub struct Reloader {
    policy: Arc<PolicyStore>,
    /// The configuration in force: as started, with the live settings as last reloaded.
    running: Mutex<Config>,
}

impl Reloader {
    /// For a daemon started with `config`.
    pub fn new(policy: Arc<PolicyStore>, config: Config) -> Self {
        Self { policy, running: Mutex::new(config) }
    }

    /// Reloads, logs the outcome (`why` says who asked), and returns it.
    pub fn reload(&self, why: &str) -> Result<Reloaded, String> {
        let result = self.reload_quietly();
        match &result {
            Ok(r) => {
                tracing::info!(policies = r.policies, mode = ?r.mode, why, "reloaded");
                if !r.restart_needed.is_empty() {
                    tracing::warn!(
                        settings = ?r.restart_needed,
                        "changed settings take effect at restart (systemctl restart wl-daemon): {}",
                        r.restart_needed.join(", ")
                    );
                }
            }
            // The reason in the message too: `journalctl` and `systemctl status` show only that.
            Err(e) => tracing::error!(error = %e, why, "{e}"),
        }
        result
    }

    fn reload_quietly(&self) -> Result<Reloaded, String> {
        let mut running = self.running.lock().expect("reload lock poisoned");
        let new = match &running.source {
            Some(path) => Config::load(path).map_err(|e| {
                format!(
                    "configuration reload refused; the running configuration and policies stay in force: {e}"
                )
            })?,
            // Started on the built-in configuration: nothing to re-read.
            None => running.clone(),
        };
        let policies = self
            .policy
            .reload()
            .map_err(|e| format!("policy reload refused; the previous policies stay in force: {e}"))?;
        self.policy.set_mode(new.mode);
        self.policy.set_host_modes(new.policy.host_modes.clone().into_iter().collect());
        running.mode = new.mode;
        running.policy.host_modes = new.policy.host_modes.clone();
        Ok(Reloaded { policies, mode: new.mode, restart_needed: differences(&running, &new) })
    }
}

/// The settings (`section.key`, or `key` at the top) whose values differ.
fn differences(running: &Config, new: &Config) -> Vec<String> {
    let as_table = |c: &Config| match toml::Value::try_from(c) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::map::Map::new(),
    };
    let (old, new) = (as_table(running), as_table(new));
    let mut changed = Vec::new();
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        match (old.get(key), new.get(key)) {
            (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) => {
                let mut inner: Vec<&String> = a.keys().chain(b.keys()).collect();
                inner.sort();
                inner.dedup();
                changed.extend(
                    inner.into_iter().filter(|k| a.get(*k) != b.get(*k)).map(|k| format!("{key}.{k}")),
                );
            }
            (a, b) if a != b => changed.push(key.clone()),
            _ => {}
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text, "test").unwrap()
    }

    #[test]
    fn differences_name_the_changed_settings() {
        let a = config("mode = \"observe\"\n[intercept]\nports = [443]\n");
        let b = config("mode = \"observe\"\n[intercept]\nports = [443, 8443]\n[[credential]]\nhost = \"api.openai.com\"\nsecret = \"s\"\nheader = \"authorization\"\nformat = \"Bearer {secret}\"\n");
        assert_eq!(differences(&a, &b), vec!["credential".to_string(), "intercept.ports".to_string()]);
        assert!(differences(&a, &a.clone()).is_empty());
    }

    #[test]
    fn a_reload_applies_mode_and_host_modes_and_reports_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wl.toml");
        std::fs::write(&path, "mode = \"observe\"\n").unwrap();
        let started = Config::load(&path).unwrap();
        let policy = Arc::new(PolicyStore::load(None, started.mode, Default::default()).unwrap());
        let reloader = Reloader::new(policy.clone(), started);

        std::fs::write(
            &path,
            "mode = \"enforce\"\n[policy]\nhost_modes = { \"api.openai.com\" = \"observe\" }\n[tls]\nleaf_validity = \"1h\"\n",
        )
        .unwrap();
        let r = reloader.reload("test").unwrap();
        assert_eq!(r.mode, Mode::Enforce);
        assert_eq!(policy.mode(), Mode::Enforce);
        assert_eq!(policy.mode_for("api.openai.com"), Mode::Observe);
        assert_eq!(r.restart_needed, vec!["tls.leaf_validity".to_string()]);

        // An invalid file changes nothing.
        std::fs::write(&path, "mode = \"sometimes\"\n").unwrap();
        let e = reloader.reload("test").unwrap_err();
        assert!(e.contains("configuration reload refused") && e.contains("sometimes"), "{e}");
        assert_eq!(policy.mode(), Mode::Enforce);
    }
}
