//! One dictionary API over several backends: the object-safe [`Dict`]
//! trait, its implementation for [`ShmDict`], and [`connect`], which picks a
//! backend from one string.
//!
//! The shared-memory dictionary serves the processes of one machine; with
//! the cargo feature `redis`, `RedisDict` serves the
//! same operations from a Redis server or cluster, so a program moves from
//! one machine to several by changing the string it passes to [`connect`].
//! `docs/design.md` ("The Redis backend") has the table of what differs.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::{DictGuard, ShmDict};

#[cfg(feature = "redis")]
pub(crate) mod redis;

/// The dictionary operations every backend provides.
///
/// Object safe: `Box<dyn Dict>` (what [`connect`] returns) works, so code
/// written against it runs unchanged on shared memory (`shm:NAME`) or on
/// Redis (`redis://HOST:PORT/NAME`). Keys and values are byte strings. Each
/// single-key operation is linearizable (on Redis: against the primary that
/// holds the dictionary).
///
/// `ShmDict` has inherent methods of the same names, which take
/// `impl AsRef<[u8]>` and generic closures; they are what a call on a
/// `ShmDict` value picks. Through `dyn Dict` (or `Dict::get(&d, ..)`) the
/// trait's methods run.
pub trait Dict: Send + Sync {
    /// The value of `key`, if present.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Creates or overwrites `key`.
    fn insert(&self, key: &[u8], value: &[u8]) -> Result<()>;
    /// Removes `key`; whether it was present.
    fn remove(&self, key: &[u8]) -> Result<bool>;
    /// Whether `key` is present.
    fn contains_key(&self, key: &[u8]) -> Result<bool>;
    /// Atomic read-modify-write: stores `f(current)` (removes the key if it
    /// returns `None`) as one step against every other writer; `f` may run
    /// more than once. Returns what was stored.
    #[allow(clippy::type_complexity)] // The contract spells the closure type out.
    fn update(
        &self,
        key: &[u8],
        f: &mut dyn FnMut(Option<&[u8]>) -> Option<Vec<u8>>,
    ) -> Result<Option<Vec<u8>>>;
    /// The number of keys (exact).
    fn len(&self) -> Result<usize>;
    /// Whether there are no keys.
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Every live key, each exactly once (keys written during the call may
    /// or may not be included).
    fn keys(&self) -> Result<Vec<Vec<u8>>>;
    /// The value of `key` as soon as it is present, or `None` once `timeout`
    /// has passed. Sleeps (or blocks in the server); does not poll.
    fn wait_for(&self, key: &[u8], timeout: Duration) -> Result<Option<Vec<u8>>>;
    /// The value of `key`; if absent, stores `f()` and returns it. `f` runs
    /// in one caller at a time per key; the others wait for its value. `f`
    /// may use the other operations of this dictionary, but not
    /// `get_or_insert_with` or `lock`.
    fn get_or_insert_with(&self, key: &[u8], f: &mut dyn FnMut() -> Vec<u8>) -> Result<Vec<u8>>;
    /// The dictionary-wide lock, held until the returned guard is dropped.
    /// Waits while another live holder has it, never for a dead one.
    fn lock(&self) -> Result<Box<dyn DictLock + '_>>;
}

/// A held [`Dict::lock`].
pub trait DictLock {
    /// Whether this acquisition replaced a holder that died (shared memory)
    /// or whose lease expired without a release (Redis).
    fn recovered(&self) -> bool;
    /// The lock's fencing token, where the backend has one (Redis: a number
    /// that grows with every acquisition of the dictionary's lock; pass it
    /// to whatever the lock protects so it can refuse a stale holder).
    fn fencing_token(&self) -> Option<u64> {
        None
    }
}

impl DictLock for DictGuard<'_> {
    fn recovered(&self) -> bool {
        DictGuard::recovered(self)
    }
}

impl Dict for ShmDict {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        ShmDict::get(self, key)
    }
    fn insert(&self, key: &[u8], value: &[u8]) -> Result<()> {
        ShmDict::insert(self, key, value)
    }
    fn remove(&self, key: &[u8]) -> Result<bool> {
        ShmDict::remove(self, key)
    }
    fn contains_key(&self, key: &[u8]) -> Result<bool> {
        ShmDict::contains_key(self, key)
    }
    #[allow(clippy::type_complexity)] // The contract spells the closure type out.
    fn update(
        &self,
        key: &[u8],
        f: &mut dyn FnMut(Option<&[u8]>) -> Option<Vec<u8>>,
    ) -> Result<Option<Vec<u8>>> {
        ShmDict::update(self, key, f)
    }
    fn len(&self) -> Result<usize> {
        Ok(ShmDict::len(self))
    }
    fn keys(&self) -> Result<Vec<Vec<u8>>> {
        ShmDict::keys(self)
    }
    fn wait_for(&self, key: &[u8], timeout: Duration) -> Result<Option<Vec<u8>>> {
        ShmDict::wait_for(self, key, timeout)
    }
    fn get_or_insert_with(&self, key: &[u8], f: &mut dyn FnMut() -> Vec<u8>) -> Result<Vec<u8>> {
        ShmDict::get_or_insert_with(self, key, f)
    }
    fn lock(&self) -> Result<Box<dyn DictLock + '_>> {
        Ok(Box::new(ShmDict::lock(self)?))
    }
}

/// Opens a dictionary from one string, choosing the backend by its scheme:
///
/// | target | backend |
/// |--------|---------|
/// | `shm:NAME` | [`ShmDict::open`]`(NAME)` (attach, or create with default sizing) |
/// | `redis://HOST:PORT/NAME` | `RedisDict` on one Redis server (feature `redis`) |
/// | `redis+cluster://HOST:PORT,HOST:PORT/NAME` | the same on a Redis Cluster, any of whose nodes are listed (feature `redis`) |
///
/// NAME follows the segment name rules on every backend (`InvalidName`
/// otherwise). A `redis` target in a build without the feature is
/// `InvalidArgument`; on Redis, no answer from the server is `Io` naming
/// it, at once.
///
/// ```no_run
/// use std::time::Duration;
/// let d = shmdict::connect("shm:jobs")?; // or "redis://10.0.0.5:6379/jobs"
/// d.insert(b"job/7", b"queued")?;
/// d.update(b"done", &mut |n| {
///     let n = n.map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
///     Some((n + 1).to_le_bytes().to_vec())
/// })?;
/// let v = d.wait_for(b"job/7/result", Duration::from_secs(5))?;
/// # let _ = v;
/// # Ok::<(), shmdict::Error>(())
/// ```
pub fn connect(target: &str) -> Result<Box<dyn Dict>> {
    if let Some(name) = target.strip_prefix("shm:") {
        return Ok(Box::new(ShmDict::open(name)?));
    }
    if target.starts_with("redis://") || target.starts_with("redis+cluster://") {
        #[cfg(feature = "redis")]
        {
            return Ok(Box::new(redis::RedisDict::connect_target(target)?));
        }
        #[cfg(not(feature = "redis"))]
        {
            return Err(Error::InvalidArgument {
                segment: target.to_owned(),
                reason:
                    "this build of shmdict has no Redis support: enable the cargo feature `redis`"
                        .into(),
            });
        }
    }
    Err(Error::InvalidArgument {
        segment: target.to_owned(),
        reason: "a target is shm:NAME, redis://HOST:PORT/NAME or \
                 redis+cluster://HOST:PORT,HOST:PORT/NAME"
            .into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_safe_and_targets_checked() {
        fn takes(_: &dyn Dict) {}
        let _ = takes;
        for bad in ["", "jobs", "http://x/y", "shm", "redis:/x"] {
            assert!(
                matches!(connect(bad), Err(Error::InvalidArgument { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(connect("shm:a/b"), Err(Error::InvalidName { .. })));
        #[cfg(not(feature = "redis"))]
        {
            let e = connect("redis://127.0.0.1:1/x").err().expect("refused");
            assert!(e.to_string().contains("feature `redis`"), "{e}");
        }
    }
}
