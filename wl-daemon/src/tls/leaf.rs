//! Leaf certificates per SNI name: minted on first use, cached (bounded), re-minted before
//! they expire. Concurrent first connections to one name mint once.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::sync::OnceCell;

use super::ca::{BeaconCa, CaError};

struct Entry {
    cell: Arc<OnceCell<Arc<CertifiedKey>>>,
    minted_at: Instant,
}

/// The cache. Also a rustls certificate resolver: [`LeafCache::get`] must have been awaited
/// for the name before the handshake, so that resolving never signs on the handshake path.
pub struct LeafCache {
    ca: BeaconCa,
    validity: Duration,
    capacity: usize,
    entries: Mutex<(HashMap<String, Entry>, VecDeque<String>)>,
    mints: AtomicU64,
}

impl std::fmt::Debug for LeafCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafCache")
            .field("ca", &self.ca)
            .field("mints", &self.mints())
            .finish_non_exhaustive()
    }
}

impl LeafCache {
    /// A cache of at most `capacity` names whose leaves are valid for `validity`.
    pub fn new(ca: BeaconCa, validity: Duration, capacity: usize) -> Self {
        Self {
            ca,
            validity,
            capacity: capacity.max(1),
            entries: Mutex::new((HashMap::new(), VecDeque::new())),
            mints: AtomicU64::new(0),
        }
    }

    /// The CA that signs the leaves.
    pub fn ca(&self) -> &BeaconCa {
        &self.ca
    }

    /// How many names have a cached leaf.
    pub fn len(&self) -> usize {
        self.entries.lock().expect("leaf cache poisoned").0.len()
    }

    /// Whether none has.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many leaves have been minted (for metrics and tests).
    pub fn mints(&self) -> u64 {
        self.mints.load(Ordering::Relaxed)
    }

    /// The leaf for `name`, minting it if needed.
    pub async fn get(&self, name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let cell = {
            let mut guard = self.entries.lock().expect("leaf cache poisoned");
            let (map, order) = &mut *guard;
            // Re-mint at half the validity, so a served leaf always has time left.
            let stale = map.get(name).is_some_and(|e| e.minted_at.elapsed() > self.validity / 2);
            if stale || !map.contains_key(name) {
                if !map.contains_key(name) {
                    while map.len() >= self.capacity {
                        match order.pop_front() {
                            Some(old) => {
                                map.remove(&old);
                            }
                            None => break,
                        }
                    }
                    order.push_back(name.to_owned());
                }
                map.insert(
                    name.to_owned(),
                    Entry { cell: Arc::new(OnceCell::new()), minted_at: Instant::now() },
                );
            }
            map[name].cell.clone()
        };
        let key = cell
            .get_or_try_init(|| async {
                self.mints.fetch_add(1, Ordering::Relaxed);
                crate::metrics::METRICS.leaf_mints.fetch_add(1, Ordering::Relaxed);
                self.ca.mint(name, self.validity).map(Arc::new)
            })
            .await?;
        Ok(key.clone())
    }

    fn ready(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let guard = self.entries.lock().expect("leaf cache poisoned");
        guard.0.get(name).and_then(|e| e.cell.get().cloned())
    }
}

/// Resolves the server certificate from the cache by SNI (lower-cased).
#[derive(Debug)]
pub struct CacheResolver(pub Arc<LeafCache>);

impl ResolvesServerCert for CacheResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?.to_ascii_lowercase();
        self.0.ready(name.trim_end_matches('.'))
    }
}

/// Always the same certificate, whatever the ClientHello asks for: explicit listeners
/// choose the name themselves, and a client that connects to one by IP address sends no
/// server name at all.
#[derive(Debug)]
pub struct FixedResolver(pub Arc<CertifiedKey>);

impl ResolvesServerCert for FixedResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn concurrent_first_requests_mint_once_and_capacity_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let ca = BeaconCa::load_or_create(dir.path(), &[]).unwrap();
        let cache = Arc::new(LeafCache::new(ca, Duration::from_secs(3600), 2));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let c = cache.clone();
                tokio::spawn(async move { c.get("api.openai.com").await.unwrap() })
            })
            .collect();
        let mut keys = Vec::new();
        for t in tasks {
            keys.push(t.await.unwrap());
        }
        assert_eq!(cache.mints(), 1);
        assert!(keys.iter().all(|k| Arc::ptr_eq(k, &keys[0])));
        cache.get("a.example").await.unwrap();
        cache.get("b.example").await.unwrap();
        assert_eq!(cache.entries.lock().unwrap().0.len(), 2, "bounded");
        assert!(cache.ready("api.openai.com").is_none(), "oldest evicted");
    }
}
