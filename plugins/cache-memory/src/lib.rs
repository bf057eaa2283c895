//! `cache-memory`: a cache inside the gateway process.
//!
//! ```toml
//! [[caches]]
//! name = "local"
//! provider = "cache-memory"
//! config = { max_bytes = 67108864, shards = 16 }
//! ```
//!
//! * Bounded by bytes (`max_bytes`, default 64 MiB): a key and its value count, plus a fixed
//!   per-entry overhead ([`ENTRY_OVERHEAD`]). A value larger than a shard's share of the bound
//!   is not stored (the `set` answers an error, so the caller sees it was not kept).
//! * Eviction is CLOCK (second chance): entries sit in insertion order; a lookup marks an entry
//!   as visited; when space is needed the oldest entry is evicted unless it was visited, in
//!   which case its mark is cleared and it moves to the back. Hot entries survive one-hit
//!   wonders without LRU's reordering on every hit.
//! * TTLs are exact: an expired entry is never answered, and is removed when met.
//! * Counters (`increment`) are atomic per key; a counter's TTL starts when it is created and
//!   is not extended by later increments (a fixed window, as rate limits need).
//! * Sharded (`shards`, default 16) by key hash so that concurrent requests rarely wait on one
//!   another.
//!
//! Everything answers immediately: no runtime, no I/O.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{export_plugin, Cache, Error, Reply};

/// Bytes counted per entry on top of its key and value (map slot, queue slot, bookkeeping).
pub const ENTRY_OVERHEAD: usize = 64;

/// `cache-memory` configuration.
#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields, default)]
pub struct Config {
    /// Upper bound of memory used, in bytes.
    pub max_bytes: u64,
    /// Number of independently locked shards.
    pub shards: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_bytes: 64 * 1024 * 1024,
            shards: 16,
        }
    }
}

enum Value {
    Bytes(Vec<u8>),
    Counter(i64),
}

struct Entry {
    value: Value,
    expires: Option<Instant>,
    visited: bool,
    size: usize,
}

#[derive(Default)]
struct Shard {
    map: HashMap<Vec<u8>, Entry>,
    /// Keys in CLOCK order (may hold keys already removed from the map: skipped lazily).
    queue: VecDeque<Vec<u8>>,
    bytes: usize,
}

impl Shard {
    fn live(&mut self, key: &[u8], now: Instant) -> Option<&mut Entry> {
        let expired = match self.map.get(key) {
            None => return None,
            Some(e) => e.expires.is_some_and(|t| t <= now),
        };
        if expired {
            self.remove(key);
            return None;
        }
        self.map.get_mut(key)
    }

    fn remove(&mut self, key: &[u8]) -> bool {
        match self.map.remove(key) {
            Some(e) => {
                self.bytes -= e.size;
                true
            }
            None => false,
        }
    }

    /// Evicts until `need` more bytes fit under `limit`.
    fn make_room(&mut self, need: usize, limit: usize) {
        let now = Instant::now();
        let mut budget = self.queue.len() * 2 + 1;
        while self.bytes + need > limit && budget > 0 {
            budget -= 1;
            let Some(key) = self.queue.pop_front() else {
                break;
            };
            let Some(e) = self.map.get_mut(&key) else {
                continue; // already removed
            };
            if e.visited && e.expires.is_none_or(|t| t > now) {
                e.visited = false;
                self.queue.push_back(key);
            } else {
                self.remove(&key);
            }
        }
    }

    fn insert(&mut self, key: &[u8], value: Value, expires: Option<Instant>, limit: usize) -> bool {
        let size = key.len()
            + ENTRY_OVERHEAD
            + match &value {
                Value::Bytes(v) => v.len(),
                Value::Counter(_) => 8,
            };
        if size > limit {
            return false;
        }
        self.remove(key);
        self.make_room(size, limit);
        if self.bytes + size > limit {
            return false;
        }
        self.bytes += size;
        self.map.insert(
            key.to_vec(),
            Entry {
                value,
                expires,
                visited: false,
                size,
            },
        );
        self.queue.push_back(key.to_vec());
        // Keep the queue from growing without bound with stale keys.
        if self.queue.len() > self.map.len() * 2 + 64 {
            let map = &self.map;
            self.queue.retain(|k| map.contains_key(k));
        }
        true
    }
}

/// The cache.
pub struct MemoryCache {
    shards: Vec<Mutex<Shard>>,
    shard_limit: usize,
}

impl MemoryCache {
    fn shard(&self, key: &[u8]) -> std::sync::MutexGuard<'_, Shard> {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        let i = (h.finish() as usize) % self.shards.len();
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes in use (all shards).
    pub fn bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).bytes)
            .sum()
    }
}

fn deadline(ttl: Option<Duration>) -> Option<Instant> {
    ttl.map(|t| Instant::now() + t)
}

impl Cache for MemoryCache {
    type Config = Config;

    fn new(c: Config) -> Result<Self, String> {
        if c.shards == 0 || c.shards > 1024 {
            return Err("shards must be between 1 and 1024".into());
        }
        let per = usize::try_from(c.max_bytes / c.shards as u64).unwrap_or(usize::MAX);
        if per < 1024 {
            return Err(format!(
                "max_bytes {} is too small for {} shards (at least 1 KiB per shard)",
                c.max_bytes, c.shards
            ));
        }
        Ok(Self {
            shards: (0..c.shards)
                .map(|_| Mutex::new(Shard::default()))
                .collect(),
            shard_limit: per,
        })
    }

    fn get(&self, key: &[u8]) -> Reply<Option<Vec<u8>>> {
        let mut shard = self.shard(key);
        let found = shard.live(key, Instant::now()).map(|e| {
            e.visited = true;
            match &e.value {
                Value::Bytes(v) => v.clone(),
                Value::Counter(n) => n.to_string().into_bytes(),
            }
        });
        Reply::ready(Ok(found))
    }

    fn set(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Reply<()> {
        let limit = self.shard_limit;
        let stored =
            self.shard(key)
                .insert(key, Value::Bytes(value.to_vec()), deadline(ttl), limit);
        Reply::ready(if stored {
            Ok(())
        } else {
            Err(Error::from(format!(
                "value of {} bytes does not fit (at most {} bytes per entry)",
                value.len(),
                limit.saturating_sub(key.len() + ENTRY_OVERHEAD)
            )))
        })
    }

    fn delete(&self, key: &[u8]) -> Reply<bool> {
        let mut shard = self.shard(key);
        let live = shard.live(key, Instant::now()).is_some();
        Reply::ready(Ok(live && shard.remove(key)))
    }

    fn increment(&self, key: &[u8], delta: i64, ttl: Option<Duration>) -> Reply<i64> {
        let limit = self.shard_limit;
        let mut shard = self.shard(key);
        let now = Instant::now();
        if let Some(e) = shard.live(key, now) {
            e.visited = true;
            return Reply::ready(match &mut e.value {
                Value::Counter(n) => {
                    *n = n.saturating_add(delta);
                    Ok(*n)
                }
                Value::Bytes(_) => Err(Error::from("the key holds a value, not a counter")),
            });
        }
        Reply::ready(
            if shard.insert(key, Value::Counter(delta), deadline(ttl), limit) {
                Ok(delta)
            } else {
                Err(Error::from("no room for the counter"))
            },
        )
    }
}

export_plugin! {
    name: "cache-memory",
    version: env!("CARGO_PKG_VERSION"),
    caches: ["cache-memory" => MemoryCache],
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_plugin_sdk::testing::{answer, block_on, cache};

    fn open(max_bytes: u64, shards: usize) -> outpost_plugin_sdk::api::CacheBox {
        cache::<MemoryCache>(&format!(
            r#"{{"max_bytes": {max_bytes}, "shards": {shards}}}"#
        ))
        .expect("config accepted")
    }

    fn get(c: &outpost_plugin_sdk::api::CacheBox, k: &[u8]) -> Option<Vec<u8>> {
        answer(block_on(c.get(k.into())))
            .expect("get")
            .into_option()
            .map(|v| v.into_vec())
    }

    #[test]
    fn stores_answers_and_deletes() {
        let c = open(1 << 20, 4);
        assert_eq!(get(&c, b"k"), None);
        answer(block_on(c.set(
            b"k".as_slice().into(),
            b"v".as_slice().into(),
            0,
        )))
        .expect("set");
        assert_eq!(get(&c, b"k").as_deref(), Some(b"v".as_slice()));
        assert_eq!(answer(block_on(c.delete(b"k".as_slice().into()))), Ok(true));
        assert_eq!(
            answer(block_on(c.delete(b"k".as_slice().into()))),
            Ok(false)
        );
        assert_eq!(get(&c, b"k"), None);
    }

    #[test]
    fn entries_expire() {
        let c = open(1 << 20, 1);
        answer(block_on(c.set(
            b"k".as_slice().into(),
            b"v".as_slice().into(),
            30,
        )))
        .expect("set");
        assert!(get(&c, b"k").is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(get(&c, b"k"), None);
    }

    #[test]
    fn counters_count_within_their_window() {
        let c = open(1 << 20, 2);
        let inc = |d| answer(block_on(c.increment(b"n".as_slice().into(), d, 50)));
        assert_eq!(inc(1), Ok(1));
        assert_eq!(inc(1), Ok(2));
        assert_eq!(inc(5), Ok(7));
        assert_eq!(get(&c, b"n").as_deref(), Some(b"7".as_slice()));
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(inc(1), Ok(1), "a new window starts after the TTL");
        answer(block_on(c.set(
            b"v".as_slice().into(),
            b"x".as_slice().into(),
            0,
        )))
        .expect("set");
        assert!(answer(block_on(c.increment(b"v".as_slice().into(), 1, 0))).is_err());
    }

    #[test]
    fn memory_stays_bounded_and_visited_entries_survive() {
        let m = MemoryCache::new(Config {
            max_bytes: 64 * 1024,
            shards: 1,
        })
        .expect("valid");
        let value = vec![7u8; 1000];
        // A hot key, looked up between every insert, survives a stream of cold ones.
        assert!(block_on_ok(m.set(b"hot", &value, None)));
        for i in 0..500u32 {
            assert!(block_on_ok(m.set(
                format!("cold-{i}").as_bytes(),
                &value,
                None
            )));
            let _ = m.get(b"hot");
            assert!(m.bytes() <= 64 * 1024, "bound held after {i} inserts");
        }
        assert!(
            matches!(ready(m.get(b"hot")), Ok(Some(_))),
            "the visited entry was kept"
        );
        assert!(
            matches!(ready(m.get(b"cold-0")), Ok(None)),
            "old cold entries were evicted"
        );
        // Too large for the bound: refused, not stored.
        assert!(!block_on_ok(m.set(b"big", &vec![0u8; 70 * 1024], None)));
    }

    fn ready<T: Send + 'static>(r: Reply<T>) -> Result<T, String> {
        block_on(r.resolve()).map_err(|e| e.message)
    }

    fn block_on_ok(r: Reply<()>) -> bool {
        ready(r).is_ok()
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(cache::<MemoryCache>(r#"{"shards": 0}"#).is_err());
        assert!(cache::<MemoryCache>(r#"{"max_bytes": 100}"#).is_err());
        assert!(cache::<MemoryCache>(r#"{"max_bytes": "lots"}"#).is_err());
        assert!(cache::<MemoryCache>(r#"{"size": 1}"#).is_err());
    }
}
