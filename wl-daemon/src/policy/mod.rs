//! Policy: Cedar decisions for every connection (`Connect`) and every HTTP request
//! (`Request`). Pure: facts in, a [`Decision`] out, no I/O besides loading files.
//!
//! The schema (`policies/wl.cedarschema`) and the built-in policies
//! (`policies/default.cedar`) are compiled in. A policy directory replaces the built-in
//! policies; every set is validated against the schema in strict mode before it is used,
//! and a set that fails keeps the previous one in force (see [`PolicyStore::reload`]).

pub mod cases;
pub mod facts;
mod guard;

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, LazyLock},
};

use arc_swap::ArcSwap;
use cedar_policy::{
    ActionConstraint, Authorizer, Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, Policy,
    PolicyId, PolicySet, PrincipalConstraint, Request, ResourceConstraint, RestrictedExpression, Schema,
    ValidationMode, Validator,
};
use serde::Serialize;

use crate::{config::Mode, intercept::identity::AgentIdentity};

/// The schema every policy set is validated against.
pub const SCHEMA: &str = include_str!("../../../policies/wl.cedarschema");
/// The built-in policies.
pub const DEFAULT_POLICIES: &str = include_str!("../../../policies/default.cedar");
/// The broker's built-in policies (`UseSecret`).
pub const BROKER_POLICIES: &str = include_str!("../../../policies/broker.cedar");

/// Why a policy set was refused. Messages name the file and line.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A file could not be read.
    #[error("cannot read policies from `{}`: {source}", path.display())]
    Read {
        /// File or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Syntax errors.
    #[error("{0}")]
    Parse(String),
    /// The set does not validate against the schema.
    #[error("{0}")]
    Invalid(String),
}

/// The outcome of one evaluation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Whether policy allows it (a permit applies, no forbid applies, and nothing erred).
    pub allow: bool,
    /// The policies that determined the decision (the forbids, or the permits).
    pub policies: Vec<String>,
    /// Evaluation errors (any error means deny: fail closed).
    pub errors: Vec<String>,
}

/// A policy with its scope and guards, for the prefilter.
struct Scoped {
    policy: Policy,
    principal: PrincipalConstraint,
    action: ActionConstraint,
    resource: ResourceConstraint,
    /// Leading method/path/model comparisons of its `when` (`guard.rs`).
    guards: Vec<guard::Guard>,
    /// Holds whenever `may_apply` says its scope matches: no condition, and a scope that
    /// `may_apply` judges exactly (an action list could name an action group).
    holds_in_scope: bool,
}

impl Scoped {
    /// Could this policy apply to `action` by `agent` on its host? Only the scope is
    /// checked, exactly as Cedar checks it first: a policy whose scope does not match is
    /// neither satisfied nor evaluated, so leaving it out changes no decision.
    fn may_apply(&self, action: &EntityUid, agent: &AgentEntities) -> bool {
        let principal_in = |u: &EntityUid| *u == agent.principal || agent.ancestors.contains(u);
        let principal = match &self.principal {
            PrincipalConstraint::Any => true,
            PrincipalConstraint::Eq(u) => *u == agent.principal,
            PrincipalConstraint::In(u) => principal_in(u),
            PrincipalConstraint::Is(t) => t == agent.principal.type_name(),
            PrincipalConstraint::IsIn(t, u) => t == agent.principal.type_name() && principal_in(u),
        };
        let action = match &self.action {
            ActionConstraint::Any => true,
            ActionConstraint::Eq(a) => a == action,
            ActionConstraint::In(list) => list.contains(action),
        };
        // Hosts have no parents: `in` a host is being that host.
        let resource = match &self.resource {
            ResourceConstraint::Any => true,
            ResourceConstraint::Eq(u) | ResourceConstraint::In(u) => *u == agent.host,
            ResourceConstraint::Is(t) => t == agent.host.type_name(),
            ResourceConstraint::IsIn(t, u) => t == agent.host.type_name() && *u == agent.host,
        };
        principal && action && resource
    }
}

/// Engines get a new generation each, so that per-connection caches notice a reload.
static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A validated policy set, ready to evaluate.
pub struct PolicyEngine {
    scoped: Vec<Scoped>,
    /// Every policy (the broker evaluates them all; it has few).
    all: PolicySet,
    generation: u64,
    authorizer: Authorizer,
    /// Where it came from: `<built-in>` or a directory.
    pub source: String,
    /// How many policies.
    pub count: usize,
}

impl std::fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEngine").field("source", &self.source).field("count", &self.count).finish()
    }
}

fn schema() -> Schema {
    Schema::from_cedarschema_str(SCHEMA).expect("the built-in schema is valid").0
}

impl PolicyEngine {
    /// The built-in policies.
    pub fn builtin() -> Self {
        Self::from_sources(
            &[("<built-in>/default.cedar".into(), DEFAULT_POLICIES.into())],
            "<built-in>".into(),
        )
        .expect("the built-in policies are valid")
    }

    /// This set's generation: different for every set loaded in this process, so caches of
    /// its decisions can tell a reload.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The broker's built-in policies.
    pub fn builtin_broker() -> Self {
        Self::from_sources(&[("<built-in>/broker.cedar".into(), BROKER_POLICIES.into())], "<built-in>".into())
            .expect("the built-in broker policies are valid")
    }

    /// Every `*.cedar` file in `dir` (sorted by name).
    pub fn load_dir(dir: &Path) -> Result<Self, PolicyError> {
        let read_err = |source| PolicyError::Read { path: dir.to_owned(), source };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(read_err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(PolicyError::Invalid(format!(
                "no *.cedar files in `{}`: an empty set would deny everything",
                dir.display()
            )));
        }
        let mut sources = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(&f)
                .map_err(|source| PolicyError::Read { path: f.clone(), source })?;
            sources.push((f.display().to_string(), text));
        }
        Self::from_sources(&sources, dir.display().to_string())
    }

    /// Parses and validates (file name, text) pairs. Policy ids are their `@id`
    /// annotation, or `FILE:LINE`.
    pub fn from_sources(sources: &[(String, String)], source: String) -> Result<Self, PolicyError> {
        let schema = schema();
        let mut all = PolicySet::new();
        let mut origin: HashMap<String, (String, usize)> = HashMap::new();
        let mut parse_errors = Vec::new();
        for (file, text) in sources {
            let set = match PolicySet::from_str(text) {
                Ok(s) => s,
                Err(e) => {
                    parse_errors.push(describe(&e, file, text));
                    continue;
                }
            };
            for policy in set.policies() {
                let line = policy_line(policy, text);
                let id =
                    policy.annotation("id").map(str::to_owned).unwrap_or_else(|| format!("{file}:{line}"));
                if origin.contains_key(&id) {
                    parse_errors.push(format!("{file} at line {line}: policy id `{id}` is used twice"));
                    continue;
                }
                origin.insert(id.clone(), (file.clone(), line));
                all.add(policy.new_id(PolicyId::new(&id))).map_err(|e| PolicyError::Parse(e.to_string()))?;
            }
        }
        if !parse_errors.is_empty() {
            return Err(PolicyError::Parse(parse_errors.join("\n")));
        }
        let result = Validator::new(schema.clone()).validate(&all, ValidationMode::Strict);
        if !result.validation_passed() {
            let msgs: Vec<String> = result
                .validation_errors()
                .map(|e| {
                    let id = e.policy_id().to_string();
                    let (file, start) = origin.get(&id).cloned().unwrap_or_default();
                    // The offending expression's line when Cedar points at it.
                    let text =
                        sources.iter().find(|(f, _)| *f == file).map(|(_, t)| t.as_str()).unwrap_or("");
                    let line = miette::Diagnostic::labels(e)
                        .and_then(|mut l| l.next())
                        .map(|l| text[..l.offset().min(text.len())].matches('\n').count() + 1)
                        .unwrap_or(start);
                    format!("{file} at line {line}: policy `{id}`: {e}")
                })
                .collect();
            return Err(PolicyError::Invalid(msgs.join("\n")));
        }
        let count = origin.len();
        let scoped = all
            .policies()
            .map(|p| Scoped {
                policy: p.clone(),
                principal: p.principal_constraint(),
                action: p.action_constraint(),
                resource: p.resource_constraint(),
                guards: guard::guards(p),
                holds_in_scope: guard::unconditional(p)
                    && !matches!(p.action_constraint(), ActionConstraint::In(_)),
            })
            .collect();
        let generation = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Self { scoped, all, generation, authorizer: Authorizer::new(), source, count })
    }

    /// Decides a connection.
    ///
    /// Remembered per agent and host for the last few destinations: the decision depends
    /// only on the policies (their generation), the agent's entities and these facts, and
    /// an agent opens connection after connection to the same address and name, each
    /// otherwise paying for the context (an `ip` extension value) and an evaluation.
    pub fn decide_connect(&self, agent: &AgentEntities, facts: &facts::ConnectFacts) -> Decision {
        let mut seen = agent.connects.lock().expect("connect decision cache poisoned");
        if let Some((_, _, d)) = seen.iter().find(|(g, f, _)| *g == self.generation && f == facts) {
            return d.clone();
        }
        drop(seen);
        let decision = self.decide("Connect", agent, || facts.to_pairs(), None);
        // Errors are not kept: a decision that failed is made again, and recorded again.
        if decision.errors.is_empty() {
            seen = agent.connects.lock().expect("connect decision cache poisoned");
            if seen.len() >= CONNECT_CACHE {
                seen.remove(0);
            }
            seen.push((self.generation, facts.clone(), decision.clone()));
        }
        decision
    }

    /// Decides an HTTP request.
    pub fn decide_request(&self, agent: &AgentEntities, facts: &facts::RequestFacts) -> Decision {
        self.decide("Request", agent, || facts.to_pairs(), Some(facts))
    }

    /// Decides whether `agent` may use the secret `secret` (stored for `hosts`) for one
    /// request `method path` to `host` (the broker's question).
    pub fn decide_use_secret(
        &self,
        agent: Option<&AgentIdentity>,
        secret: &str,
        hosts: &[String],
        host: &str,
        method: &str,
        path: &str,
    ) -> Decision {
        let fail = |msg: String| Decision { allow: false, policies: Vec::new(), errors: vec![msg] };
        let (principal, _, _, mut list) = entity_list(agent, host);
        let resource = uid("Wl::Secret", secret);
        let hosts =
            RestrictedExpression::new_set(hosts.iter().map(|h| RestrictedExpression::new_string(h.clone())));
        list.push(
            Entity::new(resource.clone(), [("hosts".to_owned(), hosts)].into(), HashSet::new())
                .expect("literal attributes evaluate"),
        );
        let entities = Entities::from_entities(list, None).expect("distinct entities");
        let s = |v: &str| RestrictedExpression::new_string(v.to_owned());
        let context = Context::from_pairs([
            ("host".to_owned(), s(host)),
            ("method".to_owned(), s(method)),
            ("path".to_owned(), s(path)),
        ]);
        let context = match context {
            Ok(c) => c,
            Err(e) => return fail(format!("context: {e}")),
        };
        let request = match Request::new(principal, uid("Wl::Action", "UseSecret"), resource, context, None) {
            Ok(r) => r,
            Err(e) => return fail(format!("request: {e}")),
        };
        let response = self.authorizer.is_authorized(&request, &self.all, &entities);
        let errors: Vec<String> = response.diagnostics().errors().map(|e| e.to_string()).collect();
        let allow = response.decision() == cedar_policy::Decision::Allow && errors.is_empty();
        Decision { allow, policies: response.diagnostics().reason().map(|p| p.to_string()).collect(), errors }
    }

    /// `request_facts` are given for `Request`: they let the guards leave out policies
    /// that cannot be satisfied.
    fn decide(
        &self,
        action_name: &'static str,
        agent: &AgentEntities,
        context: impl FnOnce() -> facts::Pairs,
        request_facts: Option<&facts::RequestFacts>,
    ) -> Decision {
        let action = uid("Wl::Action", action_name);
        let relevant = agent.relevant(self, action_name, &action);
        if let Some(decision) = &relevant.unconditional {
            // Every relevant policy holds (no conditions; the built-in set for requests):
            // Cedar's answer is known without building the context, which costs more
            // than the rest of the decision.
            return decision.clone();
        }
        let fail = |msg: String| Decision { allow: false, policies: Vec::new(), errors: vec![msg] };
        // The context is built by wl itself (facts.rs) and a unit test checks its shape
        // against the schema; validating it again per request would cost more than deciding.
        let context = match Context::from_pairs(context()) {
            Ok(c) => c,
            Err(e) => return fail(format!("context: {e}")),
        };
        let request = match Request::new(agent.principal.clone(), action, agent.host.clone(), context, None) {
            Ok(r) => r,
            Err(e) => return fail(format!("request: {e}")),
        };
        let guarded;
        let set = match request_facts {
            Some(facts) if relevant.guarded => {
                guarded = relevant.passing(self, facts);
                guarded.as_deref().unwrap_or(&relevant.set)
            }
            _ => &relevant.set,
        };
        let response = self.authorizer.is_authorized(&request, set, &agent.entities);
        let errors: Vec<String> = response.diagnostics().errors().map(|e| e.to_string()).collect();
        let allow = response.decision() == cedar_policy::Decision::Allow && errors.is_empty();
        Decision { allow, policies: response.diagnostics().reason().map(|p| p.to_string()).collect(), errors }
    }
}

/// The line (1-based) where a policy starts in its file.
fn policy_line(policy: &cedar_policy::Policy, text: &str) -> usize {
    let src = policy.to_string();
    // Policies keep their source text; find it in the file (first match is fine for ids).
    let first = src.lines().next().unwrap_or_default();
    text.find(first).map(|off| text[..off].matches('\n').count() + 1).unwrap_or(1)
}

/// A Cedar diagnostic with the file and line of its first label.
fn describe(e: &dyn miette::Diagnostic, file: &str, text: &str) -> String {
    let location = e
        .labels()
        .and_then(|mut l| l.next())
        .map(|l| {
            let off = l.offset().min(text.len());
            let line = text[..off].matches('\n').count() + 1;
            let col = off - text[..off].rfind('\n').map_or(0, |i| i + 1) + 1;
            format!(" at line {line}, column {col}")
        })
        .unwrap_or_default();
    let mut msg = e.to_string();
    if let Some(help) = e.help() {
        msg.push_str(&format!(" ({help})"));
    }
    format!("{file}{location}: {msg}")
}

/// The entity types wl's code names, parsed once: `EntityTypeName::from_str` runs Cedar's
/// parser (microseconds a call), and uids are built for every connection and decision.
static ENTITY_TYPES: LazyLock<Vec<(&'static str, EntityTypeName)>> = LazyLock::new(|| {
    ["Wl::Action", "Wl::Agent", "Wl::Cgroup", "Wl::Group", "Wl::Host", "Wl::Secret", "Wl::Unit", "Wl::User"]
        .into_iter()
        .map(|ty| (ty, EntityTypeName::from_str(ty).expect("static type names are valid")))
        .collect()
});

fn uid(ty: &'static str, id: &str) -> EntityUid {
    let name = match ENTITY_TYPES.iter().find(|(t, _)| *t == ty) {
        Some((_, name)) => name.clone(),
        None => EntityTypeName::from_str(ty).expect("static type names are valid"),
    };
    EntityUid::from_type_name_and_id(name, EntityId::new(id))
}

/// The entities one connection's decisions need: the agent with its user, group, unit and
/// cgroups, and the host. Built once per agent process and host ([`EntityCache`]).
#[derive(Debug)]
pub struct AgentEntities {
    principal: EntityUid,
    host: EntityUid,
    ancestors: HashSet<EntityUid>,
    entities: Entities,
    /// The policies that may apply to this agent and host, per engine generation and
    /// action: Cedar evaluates every policy it is given, so giving it only these keeps a
    /// large set cheap.
    relevant: std::sync::Mutex<Vec<(u64, &'static str, Arc<Relevant>)>>,
    /// Recent connect decisions (engine generation, facts, decision), oldest first.
    connects: std::sync::Mutex<Vec<(u64, facts::ConnectFacts, Decision)>>,
}

/// How many connect decisions an agent and host keep.
const CONNECT_CACHE: usize = 8;

/// The policies whose scope may apply to one agent, host and action.
struct Relevant {
    set: PolicySet,
    /// Their indices in `PolicyEngine::scoped`.
    members: Vec<usize>,
    /// Whether any of them has guards.
    guarded: bool,
    /// When every one of them holds in scope (`Scoped::holds_in_scope`), the decision,
    /// made once when the set is built: every request of the connection gets it (naming
    /// its policies means formatting their ids, which costs more than the rest).
    unconditional: Option<Decision>,
    /// Sets already built for guard outcomes (which members pass), most recent last: the
    /// requests of one connection mostly share an outcome, and building a set costs more
    /// than deciding with it.
    by_outcome: std::sync::Mutex<Vec<(Vec<bool>, Arc<PolicySet>)>>,
}

/// How many guard outcomes a connection keeps sets for.
const OUTCOME_CACHE: usize = 8;

impl std::fmt::Debug for Relevant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relevant").field("members", &self.members.len()).finish_non_exhaustive()
    }
}

impl Relevant {
    /// Cedar's decision when every member holds: any forbid denies (the forbids
    /// determine it), else any permit allows (the permits determine it), else deny.
    fn decision_without_conditions(&self, engine: &PolicyEngine) -> Decision {
        let ids = |effect: cedar_policy::Effect| -> Vec<String> {
            self.members
                .iter()
                .map(|&i| &engine.scoped[i].policy)
                .filter(|p| p.effect() == effect)
                .map(|p| p.id().to_string())
                .collect()
        };
        let forbids = ids(cedar_policy::Effect::Forbid);
        if !forbids.is_empty() {
            return Decision { allow: false, policies: forbids, errors: Vec::new() };
        }
        let permits = ids(cedar_policy::Effect::Permit);
        Decision { allow: !permits.is_empty(), policies: permits, errors: Vec::new() }
    }

    /// The members whose guards hold for `facts`, as a set of their own; `None` when that
    /// is all of them (use `set`).
    fn passing(&self, engine: &PolicyEngine, facts: &facts::RequestFacts) -> Option<Arc<PolicySet>> {
        let outcome: Vec<bool> =
            self.members.iter().map(|&i| guard::pass(&engine.scoped[i].guards, facts)).collect();
        if outcome.iter().all(|&p| p) {
            return None;
        }
        let mut cache = self.by_outcome.lock().expect("guard outcome cache poisoned");
        if let Some((_, set)) = cache.iter().find(|(o, _)| *o == outcome) {
            return Some(set.clone());
        }
        let mut set = PolicySet::new();
        for (&i, _) in self.members.iter().zip(&outcome).filter(|(_, &p)| p) {
            // INVARIANT: ids are unique in the engine, so adding a subset cannot clash.
            set.add(engine.scoped[i].policy.clone()).expect("unique policy ids");
        }
        let set = Arc::new(set);
        if cache.len() == OUTCOME_CACHE {
            cache.remove(0);
        }
        cache.push((outcome, set.clone()));
        Some(set)
    }
}

impl AgentEntities {
    fn relevant(
        &self,
        engine: &PolicyEngine,
        action_name: &'static str,
        action: &EntityUid,
    ) -> Arc<Relevant> {
        let mut cache = self.relevant.lock().expect("policy subset cache poisoned");
        if let Some((_, _, set)) = cache.iter().find(|(g, a, _)| *g == engine.generation && *a == action_name)
        {
            return set.clone();
        }
        let mut set = PolicySet::new();
        let mut members = Vec::new();
        for (i, s) in engine.scoped.iter().enumerate().filter(|(_, s)| s.may_apply(action, self)) {
            // INVARIANT: ids are unique in the engine, so adding a subset cannot clash.
            set.add(s.policy.clone()).expect("unique policy ids");
            members.push(i);
        }
        let guarded = members.iter().any(|&i| !engine.scoped[i].guards.is_empty());
        let all_hold = members.iter().all(|&i| engine.scoped[i].holds_in_scope);
        let mut relevant =
            Relevant { set, members, guarded, unconditional: None, by_outcome: Default::default() };
        if all_hold {
            relevant.unconditional = Some(relevant.decision_without_conditions(engine));
        }
        let relevant = Arc::new(relevant);
        cache.retain(|(g, _, _)| *g == engine.generation);
        cache.push((engine.generation, action_name, relevant.clone()));
        relevant
    }
}

impl AgentEntities {
    /// Entities for `agent` (unknown agents, such as explicit-listener clients whose socket
    /// owner is gone, are `Wl::Agent::"unknown"` with no parents) calling `host`.
    pub fn new(agent: Option<&AgentIdentity>, host: &str) -> Self {
        let (principal, host, ancestors, list) = entity_list(agent, host);
        let entities = Entities::from_entities(list, None).expect("distinct entities");
        Self {
            principal,
            host,
            ancestors,
            entities,
            relevant: std::sync::Mutex::new(Vec::new()),
            connects: std::sync::Mutex::new(Vec::new()),
        }
    }
}

/// Built [`AgentEntities`], shared by the connections of one agent process to one host.
///
/// Building them costs more than most decisions (Cedar's entity store hashes every uid and
/// computes the transitive closure of the parents: 15-25 µs), and agents open many
/// connections. The key is everything the entities are built from, so a hit is exactly
/// what a new build would give. Bounded: when full it starts over.
#[derive(Debug, Default)]
pub struct EntityCache {
    map: std::sync::Mutex<HashMap<EntityKey, Arc<AgentEntities>>>,
}

/// Everything [`entity_list`] reads.
#[derive(Debug, Hash, PartialEq, Eq)]
struct EntityKey {
    agent: Option<AgentKey>,
    host: String,
}

/// The parts of an [`AgentIdentity`] its entities are built from (not the thread, nor the
/// cgroup id, which the path already names).
#[derive(Debug, Hash, PartialEq, Eq)]
struct AgentKey {
    pid: u32,
    uid: u32,
    gid: u32,
    user: Option<String>,
    unit: Option<String>,
    cgroup: Option<String>,
    exe: Option<String>,
    comm: String,
}

/// Entries kept before [`EntityCache`] starts over.
const ENTITY_CACHE_MAX: usize = 4096;

impl EntityCache {
    /// The entities for `agent` calling `host`, built at most once while cached.
    pub fn get(&self, agent: Option<&AgentIdentity>, host: &str) -> Arc<AgentEntities> {
        let key = EntityKey {
            agent: agent.map(|a| AgentKey {
                pid: a.pid,
                uid: a.uid,
                gid: a.gid,
                user: a.user.clone(),
                unit: a.unit.clone(),
                cgroup: a.cgroup.clone(),
                exe: a.exe.clone(),
                comm: a.comm.clone(),
            }),
            host: host.to_owned(),
        };
        if let Some(found) = self.map.lock().expect("entity cache poisoned").get(&key) {
            return found.clone();
        }
        // Built outside the lock; two connections racing build twice, harmlessly.
        let built = Arc::new(AgentEntities::new(agent, host));
        let mut map = self.map.lock().expect("entity cache poisoned");
        if map.len() >= ENTITY_CACHE_MAX {
            map.clear();
        }
        map.insert(key, built.clone());
        built
    }
}

/// The agent entity with its parents, and the host entity: (agent, host, the agent's
/// ancestors, all entities).
fn entity_list(
    agent: Option<&AgentIdentity>,
    host: &str,
) -> (EntityUid, EntityUid, HashSet<EntityUid>, Vec<Entity>) {
    let s = |v: &str| RestrictedExpression::new_string(v.to_owned());
    let (principal, attrs, parents) = match agent {
        Some(a) => {
            let user = a.user.clone().unwrap_or_else(|| a.uid.to_string());
            let mut parents: HashSet<EntityUid> = HashSet::new();
            parents.insert(uid("Wl::User", &user));
            parents.insert(uid("Wl::Group", &a.gid.to_string()));
            if let Some(unit) = &a.unit {
                parents.insert(uid("Wl::Unit", unit));
            }
            if let Some(cg) = &a.cgroup {
                // "/a/b/c" is in "/a/b/c", "/a/b", "/a" and "/".
                let mut path = cg.as_str();
                loop {
                    parents.insert(uid("Wl::Cgroup", if path.is_empty() { "/" } else { path }));
                    match path.rfind('/') {
                        Some(0) if path.len() > 1 => path = "",
                        Some(i) if i > 0 => path = &path[..i],
                        _ => break,
                    }
                }
            }
            let attrs: HashMap<String, RestrictedExpression> = [
                ("uid".to_owned(), RestrictedExpression::new_long(i64::from(a.uid))),
                ("user".to_owned(), s(&user)),
                ("unit".to_owned(), s(a.unit.as_deref().unwrap_or(""))),
                ("cgroup".to_owned(), s(a.cgroup.as_deref().unwrap_or(""))),
                ("exe".to_owned(), s(a.exe.as_deref().unwrap_or(""))),
                ("comm".to_owned(), s(&a.comm)),
            ]
            .into();
            (uid("Wl::Agent", &format!("pid:{}", a.pid)), attrs, parents)
        }
        None => {
            let attrs: HashMap<String, RestrictedExpression> = [
                ("uid".to_owned(), RestrictedExpression::new_long(-1)),
                ("user".to_owned(), s("")),
                ("unit".to_owned(), s("")),
                ("cgroup".to_owned(), s("")),
                ("exe".to_owned(), s("")),
                ("comm".to_owned(), s("")),
            ]
            .into();
            (uid("Wl::Agent", "unknown"), attrs, HashSet::new())
        }
    };
    let mut list = Vec::new();
    for parent in &parents {
        list.push(Entity::with_uid(parent.clone()));
    }
    let ancestors = parents.clone();
    let agent_entity = Entity::new(principal.clone(), attrs, parents).expect("literal attributes evaluate");
    list.push(agent_entity);
    let host_uid = uid("Wl::Host", host);
    let host_attrs: HashMap<String, RestrictedExpression> = [("name".to_owned(), s(host))].into();
    list.push(
        Entity::new(host_uid.clone(), host_attrs, HashSet::new()).expect("literal attributes evaluate"),
    );
    (principal, host_uid, ancestors, list)
}

/// The policy set in force, swapped atomically on reload, and the modes.
#[derive(Debug)]
pub struct PolicyStore {
    engine: ArcSwap<PolicyEngine>,
    dir: Option<PathBuf>,
    /// The global mode; switched live by `wlctl mode` (0 observe, 1 enforce).
    mode: std::sync::atomic::AtomicU8,
    /// Per-host overrides; replaced by a configuration reload.
    host_modes: ArcSwap<HashMap<String, Mode>>,
}

impl PolicyStore {
    /// Loads from `dir` (or the built-in set when `None`).
    pub fn load(
        dir: Option<&Path>,
        mode: Mode,
        host_modes: HashMap<String, Mode>,
    ) -> Result<Self, PolicyError> {
        let engine = match dir {
            Some(d) => PolicyEngine::load_dir(d)?,
            None => PolicyEngine::builtin(),
        };
        Ok(Self {
            engine: ArcSwap::from_pointee(engine),
            dir: dir.map(Path::to_owned),
            mode: std::sync::atomic::AtomicU8::new(mode_to_u8(mode)),
            host_modes: ArcSwap::from_pointee(host_modes),
        })
    }

    /// The set in force.
    pub fn current(&self) -> Arc<PolicyEngine> {
        self.engine.load_full()
    }

    /// The mode for `host` (a per-host override, or the global mode).
    pub fn mode_for(&self, host: &str) -> Mode {
        self.host_modes.load().get(host).copied().unwrap_or_else(|| self.mode())
    }

    /// The global mode.
    pub fn mode(&self) -> Mode {
        match self.mode.load(std::sync::atomic::Ordering::Relaxed) {
            1 => Mode::Enforce,
            _ => Mode::Observe,
        }
    }

    /// Switches the global mode (per-host overrides stay).
    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode_to_u8(mode), std::sync::atomic::Ordering::Relaxed);
    }

    /// The per-host overrides.
    pub fn host_modes(&self) -> Arc<HashMap<String, Mode>> {
        self.host_modes.load_full()
    }

    /// Replaces the per-host overrides.
    pub fn set_host_modes(&self, host_modes: HashMap<String, Mode>) {
        self.host_modes.store(Arc::new(host_modes));
    }

    /// Re-reads the directory; on any error the previous set stays in force.
    pub fn reload(&self) -> Result<usize, PolicyError> {
        let Some(dir) = &self.dir else { return Ok(self.current().count) };
        let engine = PolicyEngine::load_dir(dir)?;
        let count = engine.count;
        self.engine.store(Arc::new(engine));
        Ok(count)
    }

    /// The policy directory, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }
}

fn mode_to_u8(mode: Mode) -> u8 {
    match mode {
        Mode::Observe => 0,
        Mode::Enforce => 1,
    }
}

/// Reloads `store` whenever a `*.cedar` file in its directory changes (polled: a change
/// decides within `interval`), until the task is dropped.
pub async fn watch(store: Arc<PolicyStore>, interval: std::time::Duration) {
    let Some(dir) = store.dir().map(Path::to_owned) else { return };
    let mut last = fingerprint(&dir);
    loop {
        tokio::time::sleep(interval).await;
        let now = fingerprint(&dir);
        if now != last {
            last = now;
            reload_and_log(&store, "policy directory changed");
        }
    }
}

/// Reloads and logs the outcome; the previous set stays in force on error.
pub fn reload_and_log(store: &PolicyStore, why: &str) {
    match store.reload() {
        Ok(count) => tracing::info!(policies = count, why, "policies reloaded"),
        Err(e) => {
            // The reason in the message too: `journalctl` and `systemctl status` show only that.
            tracing::error!(error = %e, why, "policy reload refused; the previous policies stay in force: {e}")
        }
    }
}

/// Names, sizes and modification times of the `*.cedar` files.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "cedar"))
                .filter_map(|e| e.metadata().ok().map(|m| (e.path(), m.len(), m.modified().ok())))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(cgroup: &str, uid: u32) -> AgentIdentity {
        AgentIdentity {
            pid: 42,
            tid: 42,
            uid,
            gid: uid,
            user: Some(if uid == 0 { "root".into() } else { format!("u{uid}") }),
            comm: "python3".into(),
            exe: Some("/usr/bin/python3".into()),
            cgroup: Some(cgroup.into()),
            cgroup_id: 7,
            unit: crate::intercept::cgroup::unit_of_cgroup(cgroup),
        }
    }

    #[test]
    fn entity_cache_shares_only_identical_inputs() {
        let cache = EntityCache::default();
        let bot = agent("/agents.slice/bot.service", 1000);
        let first = cache.get(Some(&bot), "api.openai.com");
        // Another thread of the same process: the same entities.
        let other_thread = AgentIdentity { tid: 43, ..bot.clone() };
        assert!(Arc::ptr_eq(&first, &cache.get(Some(&other_thread), "api.openai.com")));
        // Anything the entities are built from differs: built anew.
        assert!(!Arc::ptr_eq(&first, &cache.get(Some(&bot), "api.anthropic.com")));
        let other_pid = AgentIdentity { pid: 77, ..bot.clone() };
        assert!(!Arc::ptr_eq(&first, &cache.get(Some(&other_pid), "api.openai.com")));
        let other_exe = AgentIdentity { exe: Some("/usr/bin/node".into()), ..bot.clone() };
        assert!(!Arc::ptr_eq(&first, &cache.get(Some(&other_exe), "api.openai.com")));
        assert!(!Arc::ptr_eq(&first, &cache.get(None, "api.openai.com")));
        // Bounded.
        for pid in 0..(ENTITY_CACHE_MAX as u32 + 10) {
            cache.get(Some(&AgentIdentity { pid, ..bot.clone() }), "api.openai.com");
        }
        assert!(cache.map.lock().unwrap().len() <= ENTITY_CACHE_MAX);
    }

    fn chat(model: Option<&str>) -> facts::RequestFacts {
        facts::RequestFacts {
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            query: String::new(),
            headers: Default::default(),
            body: facts::BodyFacts { model: model.map(str::to_owned), ..Default::default() },
            hour: 10,
            weekday: 1,
        }
    }

    #[test]
    fn builtin_allows_and_forbids_cloud_metadata() {
        let engine = PolicyEngine::builtin();
        let a = AgentEntities::new(Some(&agent("/agents.slice/bot.service", 1000)), "169.254.169.254");
        let meta =
            facts::ConnectFacts { ip: "169.254.169.254".parse().unwrap(), port: 80, tls: false, sni: None };
        let d = engine.decide_connect(&a, &meta);
        assert!(!d.allow);
        assert_eq!(d.policies, vec!["deny-cloud-metadata".to_string()]);
        let api = facts::ConnectFacts {
            ip: "127.0.1.1".parse().unwrap(),
            port: 443,
            tls: true,
            sni: Some("api.openai.com".into()),
        };
        assert!(engine.decide_connect(&AgentEntities::new(None, "api.openai.com"), &api).allow);
        assert!(engine.decide_request(&AgentEntities::new(None, "api.openai.com"), &chat(None)).allow);
    }

    #[test]
    fn remembered_connect_decisions_follow_the_facts_and_the_policies() {
        let engine = PolicyEngine::builtin();
        // One agent and host for every connection below, so one cache.
        let a = AgentEntities::new(Some(&agent("/agents.slice/bot.service", 1000)), "api.openai.com");
        let to = |ip: &str, port: u16| facts::ConnectFacts {
            ip: ip.parse().unwrap(),
            port,
            tls: true,
            sni: Some("api.openai.com".into()),
        };
        for _ in 0..3 {
            assert!(engine.decide_connect(&a, &to("127.0.1.1", 443)).allow);
            assert!(!engine.decide_connect(&a, &to("169.254.169.254", 443)).allow, "not the cached allow");
        }
        // More destinations than the cache holds: each still decided on its own facts.
        for port in 1..=(CONNECT_CACHE as u16 * 2) {
            assert!(engine.decide_connect(&a, &to("127.0.1.1", port)).allow);
        }
        assert!(a.connects.lock().unwrap().len() <= CONNECT_CACHE);
        assert!(!engine.decide_connect(&a, &to("169.254.169.254", 443)).allow);
        // A reloaded policy set (a new generation) is not answered from the old one's.
        let src = "permit(principal, action, resource);\nforbid(principal, action == Wl::Action::\"Connect\", resource) when { context.port == 443 };";
        let strict = PolicyEngine::from_sources(&[("t.cedar".into(), src.into())], "t".into()).unwrap();
        let d = strict.decide_connect(&a, &to("127.0.1.1", 443));
        assert!(!d.allow, "{d:?}");
        assert!(engine.decide_connect(&a, &to("127.0.1.1", 443)).allow);
    }

    /// Cedar's own answer over the engine's whole set: (allow, sorted determining policies,
    /// errors), with wl's rule that an error denies.
    fn cedar_over_all(
        engine: &PolicyEngine,
        agent: &AgentEntities,
        facts: &facts::RequestFacts,
    ) -> (bool, Vec<String>, Vec<String>) {
        let request = Request::new(
            agent.principal.clone(),
            uid("Wl::Action", "Request"),
            agent.host.clone(),
            Context::from_pairs(facts.to_pairs()).unwrap(),
            None,
        )
        .unwrap();
        let r = Authorizer::new().is_authorized(&request, &engine.all, &agent.entities);
        let errors: Vec<String> = r.diagnostics().errors().map(|e| e.to_string()).collect();
        let mut policies: Vec<String> = r.diagnostics().reason().map(|p| p.to_string()).collect();
        policies.sort();
        (r.decision() == cedar_policy::Decision::Allow && errors.is_empty(), policies, errors)
    }

    /// The prefilters (scope and guards) change nothing: every decision, determining
    /// policy and error equals Cedar's over the whole set.
    #[test]
    fn prefiltered_decisions_equal_cedars_over_the_whole_set() {
        let src = r#"
            @id("base") permit(principal, action == Wl::Action::"Request", resource) when { context.path != "/admin" };
            @id("posts") permit(principal, action == Wl::Action::"Request", resource) when { context.method == "POST" && context.path like "/v1/*" };
            @id("no-files") forbid(principal, action == Wl::Action::"Request", resource) when { context.path like "*files*" && context.method != "GET" };
            @id("overflow") forbid(principal, action == Wl::Action::"Request", resource) when { context.method == "PUT" && context.body has max_tokens && context.body.max_tokens * 9223372036854775807 > 0 };
            @id("models") permit(principal in Wl::Cgroup::"/agents.slice", action == Wl::Action::"Request", resource == Wl::Host::"api.openai.com") when { "GET" == context.method && context.path == "/v1/models" };
            @id("or") forbid(principal, action == Wl::Action::"Request", resource) when { context.method == "DELETE" || context.path == "/v1/x" };
            @id("mini") permit(principal, action == Wl::Action::"Request", resource) when { context.body has model && context.body.model == "mini" && context.method == "PATCH" };
            @id("not-big") forbid(principal, action == Wl::Action::"Request", resource) when { context.body has model && context.body.model != "mini" && context.path == "/admin" };
        "#;
        let engine = PolicyEngine::from_sources(&[("t.cedar".into(), src.into())], "t".into()).unwrap();
        assert!(engine.scoped.iter().filter(|s| !s.guards.is_empty()).count() >= 4);
        let mut errors_seen = 0;
        for cgroup in ["/agents.slice/bot.service", "/other.slice/x.service"] {
            for host in ["api.openai.com", "api.anthropic.com"] {
                let agent = AgentEntities::new(Some(&agent(cgroup, 1000)), host);
                for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
                    for (path, model) in ["/admin", "/v1/models", "/v1/files/a", "/v1/x", "/v2/files", "/"]
                        .into_iter()
                        .flat_map(|p| [(p, None), (p, Some("mini")), (p, Some("big"))])
                    {
                        let mut facts = chat(model);
                        facts.body.max_tokens = Some(5); // `overflow` errs when it is evaluated
                        facts.method = method.into();
                        facts.path = path.into();
                        let got = engine.decide_request(&agent, &facts);
                        let mut got_policies = got.policies.clone();
                        got_policies.sort();
                        let (allow, policies, errors) = cedar_over_all(&engine, &agent, &facts);
                        let what = format!("{cgroup} {host} {method} {path} {model:?}");
                        assert_eq!(got.allow, allow, "{what}");
                        assert_eq!(got_policies, policies, "{what}");
                        assert_eq!(got.errors.len(), errors.len(), "{what}: {:?} vs {errors:?}", got.errors);
                        errors_seen += errors.len();
                    }
                }
            }
        }
        assert!(errors_seen > 0, "the erring policy was never evaluated: the test lost its edge");
    }

    /// Sets whose relevant policies all hold are decided without Cedar: the same decision
    /// and determining policies as Cedar's, for permits, forbids, both and neither.
    #[test]
    fn unconditional_sets_are_decided_as_cedar_decides() {
        let src = r#"
            @id("all") permit(principal, action == Wl::Action::"Request", resource == Wl::Host::"api.openai.com");
            @id("no-other") forbid(principal in Wl::Cgroup::"/other.slice", action, resource == Wl::Host::"api.openai.com");
            @id("anthropic") permit(principal in Wl::Cgroup::"/agents.slice", action, resource == Wl::Host::"api.anthropic.com");
        "#;
        let engine = PolicyEngine::from_sources(&[("t.cedar".into(), src.into())], "t".into()).unwrap();
        let mut shortcuts = 0;
        for cgroup in ["/agents.slice/bot.service", "/other.slice/x.service"] {
            for host in ["api.openai.com", "api.anthropic.com", "api.mistral.ai"] {
                let agent = AgentEntities::new(Some(&agent(cgroup, 1000)), host);
                let facts = chat(None);
                let got = engine.decide_request(&agent, &facts);
                shortcuts += usize::from(
                    agent.relevant(&engine, "Request", &uid("Wl::Action", "Request")).unconditional.is_some(),
                );
                let (allow, want, _) = cedar_over_all(&engine, &agent, &facts);
                let mut got_policies = got.policies.clone();
                got_policies.sort();
                assert_eq!(got.allow, allow, "{cgroup} {host}");
                assert_eq!(got_policies, want, "{cgroup} {host}");
            }
        }
        assert_eq!(shortcuts, 6, "every case here goes the short way");
    }

    #[test]
    fn models_cgroups_and_missing_fields() {
        let src = r#"
            @id("mini-only")
            permit(principal in Wl::Cgroup::"/agents.slice", action == Wl::Action::"Request", resource == Wl::Host::"api.openai.com")
            when { context.body has model && context.body.model == "gpt-4o-mini" };
        "#;
        let engine = PolicyEngine::from_sources(&[("t.cedar".into(), src.into())], "t".into()).unwrap();
        let inside = AgentEntities::new(Some(&agent("/agents.slice/bot.service", 1000)), "api.openai.com");
        let outside = AgentEntities::new(Some(&agent("/other.slice/x.service", 1000)), "api.openai.com");
        let d = engine.decide_request(&inside, &chat(Some("gpt-4o-mini")));
        assert!(d.allow && d.policies == vec!["mini-only".to_string()], "{d:?}");
        assert!(!engine.decide_request(&inside, &chat(Some("gpt-4o"))).allow);
        assert!(
            !engine.decide_request(&inside, &chat(None)).allow,
            "no body field: the policy decides as written"
        );
        assert!(!engine.decide_request(&outside, &chat(Some("gpt-4o-mini"))).allow);
    }

    #[test]
    fn the_contexts_wl_builds_match_the_schema() {
        let schema = schema();
        let connect = facts::ConnectFacts {
            ip: "10.1.2.3".parse().unwrap(),
            port: 443,
            tls: true,
            sni: Some("h".into()),
        };
        let action = uid("Wl::Action", "Connect");
        Context::from_pairs(connect.to_pairs())
            .unwrap()
            .validate(&schema, &action)
            .expect("Connect context fits the schema");
        let mut req = chat(Some("gpt-4o-mini"));
        req.body.stream = Some(true);
        req.body.max_tokens = Some(5);
        req.headers =
            facts::HeaderFacts(vec![("user_agent", "x".into()), ("content_type", "application/json".into())]);
        let action = uid("Wl::Action", "Request");
        Context::from_pairs(req.to_pairs())
            .unwrap()
            .validate(&schema, &action)
            .expect("Request context fits the schema");
        Context::from_pairs(chat(None).to_pairs())
            .unwrap()
            .validate(&schema, &action)
            .expect("without body fields too");
    }

    #[test]
    fn errors_name_file_and_line() {
        let bad_syntax = "permit(principal, action, resource)\nwhen { context.x == };\n";
        let e = PolicyEngine::from_sources(&[("p.cedar".into(), bad_syntax.into())], "t".into())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("p.cedar at line 2"), "{e}");
        let bad_type = "\n\n@id(\"typo\")\npermit(principal, action == Wl::Action::\"Request\", resource) when { context.modle == \"x\" };\n";
        let e = PolicyEngine::from_sources(&[("q.cedar".into(), bad_type.into())], "t".into())
            .unwrap_err()
            .to_string();
        assert!(e.contains("q.cedar at line 4") && e.contains("typo") && e.contains("modle"), "{e}");
    }

    #[test]
    fn the_examples_validate() {
        for f in ["openai.cedar", "anthropic.cedar"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/examples").join(f);
            let text = std::fs::read_to_string(&path).unwrap();
            PolicyEngine::from_sources(&[(f.into(), text)], "examples".into())
                .unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }
}
