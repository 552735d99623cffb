//! Sleeping until a key changes: futex channels in the segment header.
//!
//! The segment holds `WAIT_CHANNELS` (1024) 32-bit futex words after the
//! key-lock table; a key's channel is chosen by its hash. A channel word is
//!
//! | bits  | meaning                                                  |
//! |-------|----------------------------------------------------------|
//! | 0     | WAITERS: someone may be sleeping on this channel         |
//! | 1..32 | sequence, advanced by a writer that found WAITERS set    |
//!
//! A waiter sets WAITERS, then checks its condition (the key present, or its
//! version changed), then sleeps with `FUTEX_WAIT` on the word value it set,
//! and re-checks after every wake-up. A writer, after publishing, reads the
//! word; only if WAITERS is set does it advance the sequence (clearing
//! WAITERS in the same CAS) and `FUTEX_WAKE` the sleepers. So a write costs
//! one fence and one load when nobody waits, and a waiter that died leaves at
//! most one unnecessary wake-up behind (the next writer clears its bit).
//!
//! No wake-up is lost: the waiter's bit-set and the writer's publication are
//! each followed by a SeqCst fence and then a read of the other's word, so
//! either the writer sees WAITERS (and changes the word, which makes the
//! waiter's `FUTEX_WAIT` return at once or wakes it), or the waiter's check
//! sees the publication. Keys that share a channel cause spurious wake-ups,
//! after which a waiter re-checks and sleeps again.

use crate::sync::mapped::AtomicU32;
use std::time::{Duration, Instant};

use crate::shm::layout::{WAIT_CHANNELS, WAIT_CHANNEL_BYTES, WAIT_OFF};
use crate::shm::region::Region;
use crate::sync::{fence, Ordering};
use crate::sys::robust_mutex::{futex_wait, futex_wake_all};

const WAITERS: u32 = 1;

/// The channel word of a key hash.
fn channel(r: &Region, hash: u64) -> Option<&AtomicU32> {
    // High bits: the low ones choose the home bucket.
    let ch = (hash >> 48) % WAIT_CHANNELS;
    r.word32(WAIT_OFF + ch * WAIT_CHANNEL_BYTES)
}

/// Tells sleepers on the channel of `hash` that a key there changed. Call
/// after the change is published.
#[inline]
pub(crate) fn notify(r: &Region, hash: u64) {
    // SeqCst fence: orders our publication before the read in
    // `notify_after_fence`; pairs with the fence in `wait_until` (see the
    // module docs).
    fence(Ordering::SeqCst);
    notify_after_fence(r, hash);
}

/// [`notify`] for a caller that has issued a SeqCst fence after its
/// publication already (`ShmDict::retire_and_notify`: the fence of the
/// retire serves both).
pub(crate) fn notify_after_fence(r: &Region, hash: u64) {
    let Some(w) = channel(r, hash) else { return };
    // Relaxed: ordered by the caller's fence; a stale "no waiters" is
    // impossible by the fence pairing, a stale "waiters" costs one wake-up.
    let v = w.load(Ordering::Relaxed);
    if v & WAITERS != 0 {
        // Release: a sleeper that reads the new sequence sees our write.
        // Failure means another writer advanced it for us.
        let next = (v & !WAITERS).wrapping_add(2);
        let _ = w.compare_exchange(v, next, Ordering::Release, Ordering::Relaxed);
        futex_wake_all(w);
    }
}

/// Calls `check` until it returns `Some`, sleeping on the channel of `hash`
/// between calls, until `deadline`. `Ok(None)` on timeout.
pub(crate) fn wait_until<T, E>(
    r: &Region,
    hash: u64,
    deadline: Option<Instant>,
    mut check: impl FnMut() -> Result<Option<T>, E>,
) -> Result<Option<T>, E> {
    if let Some(v) = check()? {
        return Ok(Some(v));
    }
    let Some(w) = channel(r, hash) else {
        return Ok(None);
    };
    loop {
        // AcqRel: the value we will sleep on; Acquire pairs with `notify`'s
        // Release so a changed sequence comes with the writer's publication.
        let seen = w.fetch_or(WAITERS, Ordering::AcqRel) | WAITERS;
        // SeqCst fence: pairs with the one in `notify` (module docs).
        fence(Ordering::SeqCst);
        if let Some(v) = check()? {
            return Ok(Some(v));
        }
        let left = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => left,
                _ => return Ok(None),
            },
            // Without a deadline, still wake now and then: a writer that
            // died between publishing and notifying must not strand us.
            None => Duration::from_secs(1),
        };
        // Cap each sleep for the same reason.
        futex_wait(w, seen, left.min(Duration::from_secs(1)));
    }
}

/// Identifies the state of one key at one moment: see
/// [`ShmDict::get_versioned`](crate::ShmDict::get_versioned) and
/// [`ShmDict::wait_change`](crate::ShmDict::wait_change).
///
/// Every write to the key (insert, update, removal) gives it a new version,
/// even a write of the same bytes. [`Version::ABSENT`] is the version of a
/// key that is not present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Version(u64);

impl Version {
    /// The version of an absent key.
    pub const ABSENT: Version = Version(0);
}

impl crate::ShmDict {
    /// Returns the value of `key` as soon as it is present, or `None` if
    /// `timeout` passes first.
    ///
    /// Sleeps on a futex in the segment between checks: no spinning, no
    /// polling interval. A write by another process wakes it within
    /// microseconds (the wake-up latency is in `docs/performance.md`).
    pub fn wait_for(
        &self,
        key: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> crate::Result<Option<Vec<u8>>> {
        let key = key.as_ref();
        let deadline = Instant::now().checked_add(timeout);
        wait_until(
            &self.region,
            crate::shm::layout::hash_key(key),
            deadline,
            || self.get(key),
        )
    }

    /// The value of `key` (`None` if absent) and its [`Version`], read
    /// together, for [`wait_change`](crate::ShmDict::wait_change).
    pub fn get_versioned(
        &self,
        key: impl AsRef<[u8]>,
    ) -> crate::Result<(Option<Vec<u8>>, Version)> {
        let key = key.as_ref();
        let mut out = Vec::new();
        let found = self
            .index()
            .find(key, crate::shm::layout::hash_key(key), Some(&mut out))
            .map_err(|c| crate::Error::corrupt(&self.name, c.0))?;
        Ok(match found {
            Some(loc) => (Some(out), Version(loc.version())),
            None => (None, Version::ABSENT),
        })
    }

    /// Waits until `key` is written after the state `seen` (from
    /// [`get_versioned`](crate::ShmDict::get_versioned) or an earlier
    /// `wait_change`), and returns its new value and version; `None` if
    /// `timeout` passes first. Returns at once if the key already changed.
    ///
    /// Writes that happen in quick succession may be seen as one change: a
    /// watcher always gets the latest state, not every intermediate one.
    /// Removing and re-creating a key counts as a change; a key that stays
    /// absent does not change.
    ///
    /// ```
    /// # let name = format!("doc-wait-change-{}", std::process::id());
    /// # let dict = shmdict::ShmDict::open(&name)?;
    /// use std::time::Duration;
    /// let (value, version) = dict.get_versioned("status")?;
    /// assert_eq!(value, None);
    /// dict.insert("status", "ready")?; // normally another process
    /// let (value, _next) = dict
    ///     .wait_change("status", version, Duration::from_secs(1))?
    ///     .expect("changed");
    /// assert_eq!(value.as_deref(), Some(&b"ready"[..]));
    /// # shmdict::ShmDict::unlink(&name)?;
    /// # Ok::<(), shmdict::Error>(())
    /// ```
    #[allow(clippy::type_complexity)]
    pub fn wait_change(
        &self,
        key: impl AsRef<[u8]>,
        seen: Version,
        timeout: Duration,
    ) -> crate::Result<Option<(Option<Vec<u8>>, Version)>> {
        let key = key.as_ref();
        let deadline = Instant::now().checked_add(timeout);
        wait_until(
            &self.region,
            crate::shm::layout::hash_key(key),
            deadline,
            || {
                let (v, version) = self.get_versioned(key)?;
                Ok((version != seen).then_some((v, version)))
            },
        )
    }
}
