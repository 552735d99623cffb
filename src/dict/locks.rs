//! Explicit locking: the dictionary lock (`lock()`), per-key locks
//! (`lock_keys()`), and memoization built on them.
//!
//! Both are robust process-shared pthread mutexes in the segment
//! (`sys/robust_mutex.rs`): a holder that dies releases them, and the next process to
//! acquire one is told so through `recovered()`.
//!
//! What the locks protect: nothing by themselves. Single-key operations
//! never take them and stay lock-free; the locks serialize *sequences* of
//! operations among the processes that take them (a transfer between two
//! keys, a read-check-write over several keys). A process that does not take
//! the lock still sees every single-key operation as atomic, but may observe
//! a sequence half done.
//!
//! Key locks are striped: a key's lock is one of `KEYLOCK_STRIPES` mutexes,
//! chosen by its hash, so unrelated keys rarely share one. `lock_keys` takes
//! the stripes of all its keys in ascending stripe order, each once, so two
//! callers can never deadlock each other. To keep that promise a thread may
//! hold only one key guard at a time (a second `lock_keys` or `lock()` while
//! holding one is refused with `InvalidArgument` instead of risking a
//! deadlock); take `lock()` first if you need both.

use std::cell::Cell;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

use crate::dict::ShmDict;
use crate::error::{Error, Result};
use crate::shm::layout::{hash_key, DICT_LOCK_OFF, KEYLOCK_BYTES, KEYLOCK_OFF, KEYLOCK_STRIPES};
use crate::shm::region::Region;
use crate::sys::robust_mutex::{LockError, RobustMutex};

thread_local! {
    /// Key guards this thread holds (0 or 1), across all dictionaries.
    static KEY_GUARDS: Cell<u32> = const { Cell::new(0) };
}

/// Initializes the mutexes of a new segment (not yet visible to others).
pub(crate) fn init(r: &Region) -> std::result::Result<(), i32> {
    let m = |off| RobustMutex::at(r, off).ok_or(libc::EINVAL);
    m(DICT_LOCK_OFF)?.init()?;
    for i in 0..KEYLOCK_STRIPES {
        m(KEYLOCK_OFF + i * KEYLOCK_BYTES)?.init()?;
    }
    Ok(())
}

/// The stripe of a key's lock. Uses hash bits that neither the home bucket
/// (low bits) nor the wait channel (bits 48..) use.
pub(crate) fn stripe_of(key: &[u8]) -> u64 {
    (hash_key(key) >> 24) % KEYLOCK_STRIPES
}

/// Holds [`ShmDict::lock`]: the dictionary's robust process-shared mutex.
/// Released when dropped. Not `Send`: the mutex belongs to the thread that
/// locked it.
#[must_use = "the lock is released when the guard is dropped"]
#[derive(Debug)]
pub struct DictGuard<'a> {
    dict: &'a ShmDict,
    mutex: RobustMutex<'a>,
    recovered: bool,
    _not_send: PhantomData<*const ()>,
}

impl DictGuard<'_> {
    /// Whether this acquisition found the previous holder dead (killed while
    /// holding the lock). The dictionary itself is consistent either way
    /// (every single-key operation is atomic), but a multi-key sequence the
    /// dead holder was running may be half done: check your invariants.
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    /// The dictionary this guard locks.
    pub fn dict(&self) -> &ShmDict {
        self.dict
    }
}

impl Drop for DictGuard<'_> {
    fn drop(&mut self) {
        self.mutex.unlock();
    }
}

/// Holds the locks of a set of keys: see [`ShmDict::lock_keys`]. Released
/// when dropped. Not `Send`.
#[must_use = "the locks are released when the guard is dropped"]
#[derive(Debug)]
pub struct KeysGuard<'a> {
    dict: &'a ShmDict,
    /// Held mutexes, in the order taken (ascending stripe).
    held: Vec<RobustMutex<'a>>,
    recovered: bool,
    /// Whether this guard counts in `KEY_GUARDS` (an empty key set does not).
    counted: bool,
    _not_send: PhantomData<*const ()>,
}

impl KeysGuard<'_> {
    /// Whether any of the locks was found with a dead holder (see
    /// [`DictGuard::recovered`]).
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    /// The dictionary this guard locks keys of.
    pub fn dict(&self) -> &ShmDict {
        self.dict
    }
}

impl Drop for KeysGuard<'_> {
    fn drop(&mut self) {
        for m in self.held.iter().rev() {
            m.unlock();
        }
        if self.counted {
            KEY_GUARDS.with(|c| c.set(c.get().saturating_sub(1)));
        }
    }
}

impl ShmDict {
    fn lock_error(&self, what: &str, e: LockError) -> Error {
        match e {
            LockError::Corrupt(m) => Error::corrupt(&self.name, format!("{what}: {m}")),
            LockError::Deadlock => Error::InvalidArgument {
                segment: self.name.clone(),
                reason: format!("this thread already holds the {what}"),
            },
            LockError::NotRecoverable => Error::corrupt(
                &self.name,
                format!("{what} is not recoverable (a recovering holder died too)"),
            ),
            LockError::Timeout => Error::io(
                &self.name,
                "lock",
                std::io::Error::from(std::io::ErrorKind::TimedOut),
            ),
            LockError::Os(rc) => Error::io(
                &self.name,
                "pthread_mutex_lock",
                std::io::Error::from_raw_os_error(rc),
            ),
        }
    }

    fn mutex(&self, off: u64) -> Result<RobustMutex<'_>> {
        RobustMutex::at(&self.region, off)
            .ok_or_else(|| Error::corrupt(&self.name, "lock outside the segment"))
    }

    /// Takes the dictionary's lock: a robust process-shared mutex, for
    /// sequences of operations that must be consistent together.
    ///
    /// While holding it, use the ordinary operations. It does not block other
    /// processes' single-key operations, which stay lock-free: every process
    /// that needs the sequence to be consistent must take the lock. Waits as
    /// long as a live process holds the lock, never for a dead one: if the
    /// holder died, this acquisition succeeds with
    /// [`DictGuard::recovered`] `== true`.
    ///
    /// `InvalidArgument` if this thread already holds the lock, or holds a
    /// [`lock_keys`](ShmDict::lock_keys) guard (take `lock()` first).
    ///
    /// ```
    /// # let name = format!("doc-lock-{}", std::process::id());
    /// let dict = shmdict::ShmDict::open(&name)?;
    /// {
    ///     let guard = dict.lock()?;
    ///     let a: i64 = dict.typed().get("a")?.unwrap_or(100);
    ///     let b: i64 = dict.typed().get("b")?.unwrap_or(0);
    ///     dict.typed().insert("a", &(a - 10))?;
    ///     dict.typed().insert("b", &(b + 10))?;
    ///     assert!(!guard.recovered());
    /// } // unlocked here
    /// # shmdict::ShmDict::unlink(&name)?;
    /// # Ok::<(), shmdict::Error>(())
    /// ```
    pub fn lock(&self) -> Result<DictGuard<'_>> {
        self.lock_until(None)?
            .ok_or_else(|| self.lock_error("dictionary lock", LockError::Timeout))
    }

    /// [`lock`](ShmDict::lock), giving up after `timeout`: `Ok(None)` if a
    /// live process still holds the lock by then. A zero `timeout` tries
    /// once without waiting.
    ///
    /// For callers that must do something else between waits (a binding
    /// that checks for Ctrl-C, an event loop): wait in short slices, each a
    /// `lock_timeout`. A holder found dead, or a lock word naming a thread
    /// that provably holds nothing of the segment, is recovered as in
    /// `lock()`, whatever the slice (after a short slice, by the next one).
    ///
    /// ```
    /// # let name = format!("doc-lock-timeout-{}", std::process::id());
    /// use std::time::Duration;
    /// let dict = shmdict::ShmDict::open(&name)?;
    /// let guard = loop {
    ///     if let Some(g) = dict.lock_timeout(Duration::from_millis(100))? {
    ///         break g;
    ///     }
    ///     // Between slices: check for cancellation, report progress, ...
    /// };
    /// assert!(!guard.recovered());
    /// # drop(guard);
    /// # shmdict::ShmDict::unlink(&name)?;
    /// # Ok::<(), shmdict::Error>(())
    /// ```
    pub fn lock_timeout(&self, timeout: Duration) -> Result<Option<DictGuard<'_>>> {
        // A timeout too long for the clock is no limit.
        self.lock_until(Instant::now().checked_add(timeout))
    }

    /// `lock()` with a deadline (`None`: none); `Ok(None)` once it passes.
    fn lock_until(&self, deadline: Option<Instant>) -> Result<Option<DictGuard<'_>>> {
        if KEY_GUARDS.with(Cell::get) > 0 {
            return Err(Error::InvalidArgument {
                segment: self.name.clone(),
                reason: "lock() while holding a lock_keys guard could deadlock: take lock() first"
                    .into(),
            });
        }
        // A holder is attached under its own identity before it takes a
        // mutex (a forked child registers now): see `owner_missing`.
        self.registration()?;
        let mutex = self.mutex(DICT_LOCK_OFF)?;
        let recovered = match mutex.lock(deadline, &|tid| self.owner_missing(tid)) {
            Ok(recovered) => recovered,
            Err(LockError::Timeout) if deadline.is_some() => return Ok(None),
            Err(e) => return Err(self.lock_error("dictionary lock", e)),
        };
        Ok(Some(DictGuard {
            dict: self,
            mutex,
            recovered,
            _not_send: PhantomData,
        }))
    }

    /// Locks the given keys (for example the two sides of a transfer), so
    /// that callers locking any of the same keys wait, while operations on
    /// other keys go on. Deadlock-free: locks are taken in one global order.
    ///
    /// Locks are striped (256 per dictionary), so two different keys may
    /// share one: that only serializes their holders. A thread may hold one
    /// key guard at a time; a second call while holding one is
    /// `InvalidArgument` (lock all keys in one call instead). A holder that
    /// dies releases its locks; the next acquisition reports
    /// [`KeysGuard::recovered`].
    ///
    /// ```
    /// # let name = format!("doc-lock-keys-{}", std::process::id());
    /// let dict = shmdict::ShmDict::open(&name)?;
    /// let balances = dict.typed::<i64>();
    /// balances.insert("alice", &100)?;
    /// {
    ///     let _guard = dict.lock_keys(&["alice", "bob"])?;
    ///     let a = balances.get("alice")?.unwrap_or(0);
    ///     let b = balances.get("bob")?.unwrap_or(0);
    ///     balances.insert("alice", &(a - 30))?;
    ///     balances.insert("bob", &(b + 30))?;
    /// }
    /// assert_eq!(balances.get("bob")?, Some(30));
    /// # shmdict::ShmDict::unlink(&name)?;
    /// # Ok::<(), shmdict::Error>(())
    /// ```
    pub fn lock_keys<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<KeysGuard<'_>> {
        if KEY_GUARDS.with(Cell::get) > 0 {
            return Err(Error::InvalidArgument {
                segment: self.name.clone(),
                reason: "this thread already holds a lock_keys guard: lock all keys in one call"
                    .into(),
            });
        }
        // Attached under our own identity before taking any mutex.
        self.registration()?;
        let mut stripes: Vec<u64> = keys.iter().map(|k| stripe_of(k.as_ref())).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut guard = KeysGuard {
            dict: self,
            held: Vec::with_capacity(stripes.len()),
            recovered: false,
            counted: !stripes.is_empty(),
            _not_send: PhantomData,
        };
        // Counted now so that an early return (dropping the guard) balances.
        if guard.counted {
            KEY_GUARDS.with(|c| c.set(c.get() + 1));
        }
        for s in stripes {
            let m = self.mutex(KEYLOCK_OFF + s * KEYLOCK_BYTES)?;
            guard.recovered |= m
                .lock(None, &|tid| self.owner_missing(tid))
                .map_err(|e| self.lock_error("key lock", e))?;
            guard.held.push(m);
        }
        Ok(guard)
    }

    /// Whether thread `tid`, named by a mutex's futex word, provably holds
    /// nothing of this segment (see `sys/robust_mutex.rs`).
    fn owner_missing(&self, tid: u32) -> bool {
        crate::shm::attach::thread_holds_nothing(&self.region, self.me.registered().lock_fd, tid)
    }

    /// Returns the value of `key`, computing and inserting it with `f` if
    /// absent: memoization shared by every process.
    ///
    /// `f` runs in at most one process (and thread) at a time for a given
    /// key; the others wait (asleep, on the key's lock) and then return the
    /// value it stored. If the computing process dies before storing, the
    /// next waiter takes over and runs `f` itself. Every caller gets the same
    /// value (unless the key is overwritten or removed in between by other
    /// operations).
    ///
    /// `f` runs while this thread holds the key's lock (see
    /// [`lock_keys`](ShmDict::lock_keys)): it must not call
    /// `get_or_insert_with` or `lock_keys` itself (that is refused with
    /// `InvalidArgument`). A panic in `f` releases the lock and propagates.
    pub fn get_or_insert_with(
        &self,
        key: impl AsRef<[u8]>,
        f: impl FnOnce() -> Vec<u8>,
    ) -> Result<Vec<u8>> {
        self.memoize(key.as_ref(), || Ok(f())).map(|(v, _)| v)
    }

    /// `get_or_insert_with` with a fallible `f` (an error stores nothing).
    /// Also says whether this call computed the value.
    pub(crate) fn memoize(
        &self,
        key: &[u8],
        f: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<(Vec<u8>, bool)> {
        if let Some(v) = self.get(key)? {
            return Ok((v, false));
        }
        let _guard = self.lock_keys(&[key])?;
        if let Some(v) = self.get(key)? {
            return Ok((v, false));
        }
        let v = f()?;
        self.insert(key, &v)?;
        Ok((v, true))
    }
}
