//! State kept in this gateway process, library-wide so that a configuration reload (which
//! creates new policy instances) keeps counts and permits: counters by key and window,
//! concurrency permits by key, and a throttle for warnings.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, RwLock};

use outpost_plugin_sdk::{host, level};

/// Shards of each table: requests for different keys rarely wait on one another.
pub(crate) const SHARDS: usize = 64;

/// At most this many live counters per shard (about a million in all): keys come from
/// requests, and a flood of distinct keys must not grow the process without bound. A key that
/// finds its shard full evicts an arbitrary counter of that shard and is counted.
pub(crate) const MAX_KEYS_PER_SHARD: usize = 16_384;

/// How often a shard drops the counters of windows that have ended.
const SWEEP_EVERY_MS: u64 = 1_000;

/// FNV-1a: a stable, cheap hash to pick a shard.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

struct Count {
    value: AtomicI64,
    expires_ms: u64,
}

#[derive(Default)]
struct CounterShard {
    map: HashMap<Box<str>, Count>,
    next_sweep_ms: u64,
}

/// Counters of this process: the key names the window, so each window is its own entry, and
/// an entry is dropped once its window (plus a margin) has passed.
pub(crate) struct Counters {
    shards: Box<[RwLock<CounterShard>]>,
    max_per_shard: usize,
}

/// The process's counters.
pub(crate) fn counters() -> &'static Counters {
    static COUNTERS: OnceLock<Counters> = OnceLock::new();
    COUNTERS.get_or_init(Counters::new)
}

impl Counters {
    /// An empty table.
    pub(crate) fn new() -> Counters {
        Self::bounded(MAX_KEYS_PER_SHARD)
    }

    /// An empty table holding at most `max_per_shard` keys per shard.
    pub(crate) fn bounded(max_per_shard: usize) -> Counters {
        Counters {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            max_per_shard,
        }
    }

    /// Adds `delta` to the counter `key` (created at 0, living until `expires_ms`) and answers
    /// the new value. Allocates only when the key is new.
    pub(crate) fn add(&self, key: &str, delta: i64, expires_ms: u64, now_ms: u64) -> i64 {
        let shard = &self.shards[fnv1a(key.as_bytes()) as usize % SHARDS];
        {
            let read = shard.read().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = read.map.get(key) {
                if c.expires_ms > now_ms {
                    return c
                        .value
                        .fetch_add(delta, Ordering::Relaxed)
                        .saturating_add(delta);
                }
            }
        }
        let mut write = shard.write().unwrap_or_else(|e| e.into_inner());
        let s = &mut *write;
        if now_ms >= s.next_sweep_ms {
            s.map.retain(|_, c| c.expires_ms > now_ms);
            s.next_sweep_ms = now_ms + SWEEP_EVERY_MS;
        }
        if let Some(c) = s.map.get_mut(key) {
            if c.expires_ms > now_ms {
                let v = c.value.get_mut();
                *v = v.saturating_add(delta);
                return *v;
            }
            // The key's lifetime ended (a window reused only by lifetime quotas never does).
            *c = Count {
                value: AtomicI64::new(delta),
                expires_ms,
            };
            return delta;
        }
        if s.map.len() >= self.max_per_shard {
            // Full: every key still counts. An arbitrary live counter makes room (the map's
            // iteration order is randomised per process), so a flood of new keys can only
            // restart some counts early, never leave new keys unlimited.
            static FULL: Throttle = Throttle::new();
            FULL.warn(|| {
                format!(
                    "capacity={}: Local limit counters are full; counters are evicted to make room.",
                    self.max_per_shard * SHARDS
                )
            });
            if let Some(victim) = s.map.keys().next().cloned() {
                s.map.remove(&victim);
            }
        }
        s.map.insert(
            key.into(),
            Count {
                value: AtomicI64::new(delta),
                expires_ms,
            },
        );
        delta
    }

    /// How many counters the process holds (tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).map.len())
            .sum()
    }
}

#[derive(Default)]
struct PermitShard {
    by_key: HashMap<Box<str>, u32>,
    /// Key and permits held, by index; an index whose count fell to 0 is in `free`.
    entries: Vec<(Box<str>, u64)>,
    free: Vec<u32>,
}

/// Concurrency permits of this process, by key.
pub(crate) struct Permits {
    shards: Box<[Mutex<PermitShard>]>,
}

/// The process's permits.
pub(crate) fn permits() -> &'static Permits {
    static PERMITS: OnceLock<Permits> = OnceLock::new();
    PERMITS.get_or_init(Permits::new)
}

impl Permits {
    /// No permits held.
    pub(crate) fn new() -> Permits {
        Permits {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn shard(&self, i: usize) -> MutexGuard<'_, PermitShard> {
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a permit for `key` when fewer than `max` are held; the answer (never 0) is what
    /// [`Permits::release`] takes back. Allocates only for a key that holds no permit yet.
    pub(crate) fn acquire(&self, key: &str, max: u64) -> Option<u64> {
        let i = fnv1a(key.as_bytes()) as usize % SHARDS;
        let mut guard = self.shard(i);
        let s = &mut *guard;
        let index = match s.by_key.get(key) {
            Some(&index) => {
                if s.entries[index as usize].1 >= max {
                    return None;
                }
                index
            }
            None => {
                let index = match s.free.pop() {
                    Some(index) => {
                        s.entries[index as usize].0 = key.into();
                        index
                    }
                    None => {
                        s.entries.push((key.into(), 0));
                        u32::try_from(s.entries.len() - 1).ok()?
                    }
                };
                s.by_key.insert(key.into(), index);
                index
            }
        };
        s.entries[index as usize].1 += 1;
        Some(1 + ((i as u64) << 32 | u64::from(index)))
    }

    /// Gives a permit back (once per permit; anything else is ignored).
    pub(crate) fn release(&self, permit: u64) {
        let Some(p) = permit.checked_sub(1) else {
            return;
        };
        let (i, index) = ((p >> 32) as usize, p as u32 as usize);
        if i >= SHARDS {
            return;
        }
        let mut guard = self.shard(i);
        let s = &mut *guard;
        let Some(entry) = s.entries.get_mut(index) else {
            return;
        };
        if entry.1 == 0 {
            return;
        }
        entry.1 -= 1;
        if entry.1 == 0 {
            let key = std::mem::take(&mut entry.0);
            s.by_key.remove(&key);
            s.free.push(index as u32);
        }
    }

    /// Permits held for a key (tests).
    #[cfg(test)]
    pub(crate) fn held(&self, key: &str) -> u64 {
        let s = self.shard(fnv1a(key.as_bytes()) as usize % SHARDS);
        s.by_key.get(key).map_or(0, |&i| s.entries[i as usize].1)
    }
}

/// Lets one warning through per ten seconds.
pub(crate) struct Throttle(AtomicU64);

impl Throttle {
    const EVERY_MS: u64 = 10_000;

    /// A throttle that lets the first warning through.
    pub(crate) const fn new() -> Self {
        Throttle(AtomicU64::new(0))
    }

    /// Logs the warning unless one was logged less than ten seconds ago.
    pub(crate) fn warn(&self, message: impl FnOnce() -> String) {
        // + 1: the monotonic clock may start at 0, which means "never logged".
        let now = host::monotonic_ns() / 1_000_000 + 1;
        let last = self.0.load(Ordering::Relaxed);
        if last != 0 && now < last + Self::EVERY_MS {
            return;
        }
        if self
            .0
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            host::log(level::WARN, &message());
        }
    }
}
