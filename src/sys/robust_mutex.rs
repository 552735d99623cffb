//! Robust process-shared mutexes in a segment, and futex waits.
//!
//! A [`RobustMutex`] is a glibc `pthread_mutex_t` placed in shared memory
//! with the attributes `PTHREAD_PROCESS_SHARED`, `PTHREAD_MUTEX_ROBUST` and
//! `PTHREAD_MUTEX_ERRORCHECK`:
//!
//! - *process-shared*: threads of any process that maps the segment use it;
//! - *robust*: when the holder dies, the kernel marks the mutex (through the
//!   holder thread's robust list, which glibc registers for every thread) and
//!   wakes a waiter, whose lock call returns `EOWNERDEAD`. We then call
//!   `pthread_mutex_consistent` and report the acquisition as *recovered*;
//! - *error-checking*: a thread that locks a mutex it already holds gets
//!   `EDEADLK` instead of deadlocking on itself.
//!
//! Nothing in the segment is trusted: before every use the mutex's
//! attribute words are compared with those of a freshly initialized mutex
//! (a mutex of another type could make libc misbehave), and a lock attempt
//! waits in bounded slices; after each slice, if the futex word names a
//! thread that provably does not exist (only a corrupted segment does that:
//! the kernel marks a dead owner's mutex itself), the mutex is marked as if
//! its owner had died, so the next attempt recovers it instead of waiting
//! forever.
//!
//! "Provably" matters: a thread id means something only in its own pid
//! namespace. Processes in other namespaces (containers sharing /dev/shm)
//! may hold the mutex, and their thread ids name nothing, or another
//! thread, here. So the owner's absence counts only when every live handle
//! of the segment is in our pid namespace, and the thread belongs to no
//! live attached process (a futex word naming a live but unrelated thread,
//! such as pid 2, is garbage too); the caller's `owner_missing` decides
//! asked *after* reading the futex word: a holder attached before it took
//! the mutex). Otherwise a corrupted futex word is waited on, as a live
//! holder would be: "cannot tell" is never "dead".
//!
//! The futex helpers wrap `FUTEX_WAIT`/`FUTEX_WAKE` on shared (not
//! process-private) futex words.
//!
//! `unsafe` code is confined to the modules that talk to the OS or hand out
//! views of shared memory: `sys/` (this file: pthread and clock calls;
//! `ofd.rs`, `fork.rs`, `child.rs`: fcntl, open, dup3, process calls),
//! `shm/region.rs` (the mapping as atomic words), `shm/attach.rs` (a
//! handle's descriptor borrowed for `fcntl`), `shm/registration.rs`
//! (references to a handle's boxed registrations), `prim/view.rs` and
//! `array.rs` (typed `Value` and `Array` views of a mapping),
//! `pool/process.rs` and `space/eval.rs` (`fork`, `_exit` and other process
//! calls), and, under `cfg(loom)` only, `testing/loom.rs`. Every block
//! carries a `// SAFETY:` comment.

use crate::sync::mapped::{AtomicU32, Ordering};
use std::mem::MaybeUninit;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rustix::thread::futex;

use crate::shm::region::Region;

/// Bytes reserved for one mutex in a segment (glibc's `pthread_mutex_t` is
/// 40 bytes on x86-64 and 48 on aarch64).
pub(crate) const MUTEX_BYTES: u64 = 64;
const _: () = assert!(std::mem::size_of::<libc::pthread_mutex_t>() as u64 <= MUTEX_BYTES);
const _: () = assert!(std::mem::align_of::<libc::pthread_mutex_t>() <= 8);

/// How long one lock attempt sleeps before checking the owner's existence.
const SLICE: Duration = Duration::from_millis(100);

/// Bits of the kernel's robust-futex word (Documentation/locking/robust-futex-ABI).
const FUTEX_OWNER_DIED: u32 = 0x4000_0000;
const FUTEX_TID_MASK: u32 = 0x3fff_ffff;

/// Why a lock could not be taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LockError {
    /// The mutex bytes are not a mutex of ours.
    Corrupt(&'static str),
    /// This thread already holds it.
    Deadlock,
    /// The holder died and a previous recovery left it unusable
    /// (`ENOTRECOVERABLE`: only after a recovering process died too early).
    NotRecoverable,
    /// The timeout passed.
    Timeout,
    /// Any other error number from libc.
    Os(i32),
}

/// A mutex's place in a segment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RobustMutex<'a> {
    ptr: *mut libc::pthread_mutex_t,
    _region: std::marker::PhantomData<&'a Region>,
}

/// The attribute-carrying 32-bit words of a freshly initialized mutex: the
/// (offset, value) pairs that are non-zero. A mutex in a segment must match.
/// `Err` with libc's error number if even a local mutex cannot be made.
fn template() -> Result<&'static [(usize, u32)], i32> {
    static T: OnceLock<Result<Vec<(usize, u32)>, i32>> = OnceLock::new();
    let t = T.get_or_init(|| {
        let mut m = MaybeUninit::<libc::pthread_mutex_t>::zeroed();
        // SAFETY: `m` is a zeroed, properly aligned local; `init_at` needs a
        // writable mutex-sized place and nothing else.
        let rc = unsafe { init_at(m.as_mut_ptr()) };
        if rc != 0 {
            return Err(rc);
        }
        let words = std::mem::size_of::<libc::pthread_mutex_t>() / 4;
        let base = m.as_ptr().cast::<u32>();
        Ok((0..words)
            .filter_map(|i| {
                // SAFETY: `i < size / 4` and the local is initialized (zeroed,
                // then written by libc), 4-aligned; a plain read of our own
                // local memory.
                let v = unsafe { base.add(i).read() };
                (v != 0).then_some((i * 4, v))
            })
            .collect())
    });
    t.as_deref().map_err(|&rc| rc)
}

/// Initializes a robust, process-shared, error-checking mutex at `m`.
///
/// # Safety
/// `m` must be valid for writes of a `pthread_mutex_t`, 8-aligned, and no
/// thread may be using a mutex there.
unsafe fn init_at(m: *mut libc::pthread_mutex_t) -> i32 {
    let mut attr = MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
    // SAFETY: pthread_mutexattr_init initializes `attr`; every later call
    // gets a pointer to that initialized local, and `m` is valid per this
    // function's contract.
    unsafe {
        let a = attr.as_mut_ptr();
        let mut rc = libc::pthread_mutexattr_init(a);
        if rc != 0 {
            return rc;
        }
        for (f, v) in [
            (
                libc::pthread_mutexattr_setpshared as unsafe extern "C" fn(_, _) -> _,
                libc::PTHREAD_PROCESS_SHARED,
            ),
            (
                libc::pthread_mutexattr_setrobust,
                libc::PTHREAD_MUTEX_ROBUST,
            ),
            (
                libc::pthread_mutexattr_settype,
                libc::PTHREAD_MUTEX_ERRORCHECK,
            ),
        ] {
            rc = f(a, v);
            if rc != 0 {
                libc::pthread_mutexattr_destroy(a);
                return rc;
            }
        }
        rc = libc::pthread_mutex_init(m, a);
        libc::pthread_mutexattr_destroy(a);
        rc
    }
}

impl<'a> RobustMutex<'a> {
    /// The mutex at byte offset `off` of `r`, if it fits there.
    pub(crate) fn at(r: &'a Region, off: u64) -> Option<RobustMutex<'a>> {
        let ptr = r.raw(off, MUTEX_BYTES)?.cast::<libc::pthread_mutex_t>();
        Some(RobustMutex {
            ptr,
            _region: std::marker::PhantomData,
        })
    }

    /// Initializes the mutex. Only for a segment nobody else can see yet.
    pub(crate) fn init(&self) -> Result<(), i32> {
        // SAFETY: `ptr` is in bounds and 8-aligned (`Region::raw`); the
        // segment is not yet published, so no other thread uses this mutex.
        match unsafe { init_at(self.ptr) } {
            0 => Ok(()),
            rc => Err(rc),
        }
    }

    /// The 32-bit word at byte offset `off` of the mutex, read atomically
    /// (libc updates the lock word with atomics; the attribute words never
    /// change after initialization).
    fn word(&self, off: usize) -> &AtomicU32 {
        // SAFETY: `off + 4 <= size_of::<pthread_mutex_t>()` (callers pass
        // template offsets or 0), the mutex lies in the mapping for 'a, and
        // `ptr` is 8-aligned so `ptr + off` is 4-aligned. libc accesses these
        // words atomically or not at all after initialization.
        unsafe { &*self.ptr.cast::<u8>().add(off).cast::<AtomicU32>() }
    }

    /// Checks that the bytes are a mutex of the kind we create.
    fn validate(&self) -> Result<(), LockError> {
        for &(off, v) in template().map_err(LockError::Os)? {
            // Relaxed: attribute words are written once, before publication.
            if self.word(off).load(Ordering::Relaxed) != v {
                return Err(LockError::Corrupt("a mutex's attributes are not shmdict's"));
            }
        }
        Ok(())
    }

    /// Locks, waiting while a live thread holds the mutex, until `deadline`
    /// (`None`: no limit). `Ok(true)` if the previous holder died and this
    /// acquisition recovered the mutex.
    ///
    /// `owner_missing(tid)` says whether the thread a futex word names
    /// provably holds nothing of this segment (see the module doc).
    pub(crate) fn lock(
        &self,
        deadline: Option<Instant>,
        owner_missing: &dyn Fn(u32) -> bool,
    ) -> Result<bool, LockError> {
        self.validate()?;
        loop {
            let slice_end = match deadline {
                Some(d) => d.min(Instant::now() + SLICE),
                None => Instant::now() + SLICE,
            };
            // SAFETY: `ptr` points to an initialized mutex (validated above)
            // inside the mapping, which outlives `self`.
            let rc = unsafe {
                timed_lock(
                    self.ptr,
                    slice_end.saturating_duration_since(Instant::now()),
                )
            };
            match rc {
                0 => return Ok(false),
                libc::EOWNERDEAD => {
                    // SAFETY: as above; we hold the mutex now, as
                    // pthread_mutex_consistent requires.
                    let rc = unsafe { libc::pthread_mutex_consistent(self.ptr) };
                    return if rc == 0 {
                        Ok(true)
                    } else {
                        // SAFETY: as above; we hold it.
                        unsafe { libc::pthread_mutex_unlock(self.ptr) };
                        Err(LockError::Os(rc))
                    };
                }
                libc::ETIMEDOUT => {
                    // Checked at the end of every slice, the caller's last
                    // one included: a caller waiting in short slices (each
                    // a call with a near deadline) must recover a missing
                    // owner too, by its next call.
                    self.mark_if_owner_missing(owner_missing);
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(LockError::Timeout);
                    }
                }
                libc::EDEADLK => return Err(LockError::Deadlock),
                libc::ENOTRECOVERABLE => return Err(LockError::NotRecoverable),
                rc => return Err(LockError::Os(rc)),
            }
        }
    }

    /// If the lock word names a thread that provably does not exist, marks
    /// the owner as dead the way the kernel would have, so the next lock
    /// recovers.
    fn mark_if_owner_missing(&self, owner_missing: &dyn Fn(u32) -> bool) {
        if !cfg!(target_env = "gnu") {
            return; // The lock word's place is glibc's layout.
        }
        let w = self.word(0);
        // Relaxed: a hint; the CAS below re-checks the exact value.
        let v = w.load(Ordering::Relaxed);
        let tid = v & FUTEX_TID_MASK;
        if v == 0 || v & FUTEX_OWNER_DIED != 0 {
            return; // Free, or already marked: the next attempt proceeds.
        }
        // No owner at all but flag bits set (garbage): free; an owner that
        // does not exist: mark it dead. A real owner is waited for.
        // The order matters: the futex word first, then the namespaces (a
        // holder attached before it took the mutex), then the thread.
        let fixed = if tid == 0 {
            0
        } else if owner_missing(tid) {
            v | FUTEX_OWNER_DIED
        } else {
            return;
        };
        // AcqRel: the next locker's Acquire CAS on this word sees our change.
        // Fails harmlessly if the word changed meanwhile (someone unlocked).
        let _ = w.compare_exchange(v, fixed, Ordering::AcqRel, Ordering::Relaxed);
        // Wake any waiter so it notices.
        let _ = futex::wake(w, futex::Flags::empty(), u32::MAX);
    }

    /// Unlocks a mutex this thread holds.
    pub(crate) fn unlock(&self) {
        // SAFETY: the mutex is initialized and lies in the mapping for 'a.
        // Guards call this once; a guard inherited through `fork` calls it
        // from a thread that does not hold the mutex, which the
        // error-checking type refuses with EPERM, leaving the parent's hold
        // intact.
        let rc = unsafe { libc::pthread_mutex_unlock(self.ptr) };
        debug_assert!(rc == 0 || rc == libc::EPERM, "unlock: error {rc}");
    }
}

#[cfg(target_env = "gnu")]
extern "C" {
    /// glibc (2.30 and later): `pthread_mutex_timedlock` against a chosen
    /// clock. The `libc` crate does not declare it.
    fn pthread_mutex_clocklock(
        mutex: *mut libc::pthread_mutex_t,
        clock: libc::clockid_t,
        abstime: *const libc::timespec,
    ) -> libc::c_int;
}

/// Tries to lock `m` for at most about `d`: 0, or an error number as
/// `pthread_mutex_timedlock` returns them (`ETIMEDOUT` when `d` passed).
///
/// The slice is timed on `CLOCK_MONOTONIC` (with glibc's
/// `pthread_mutex_clocklock`), so a jump of the wall clock can neither make
/// a slice last far longer (a step back) nor end every slice at once (a
/// step forward, which would turn the wait into a spin). Other C libraries
/// get `pthread_mutex_timedlock`, which only takes `CLOCK_REALTIME`.
///
/// # Safety
///
/// `m` points to an initialized mutex that stays mapped during the call.
unsafe fn timed_lock(m: *mut libc::pthread_mutex_t, d: Duration) -> libc::c_int {
    #[cfg(target_env = "gnu")]
    {
        let ts = clock_after(libc::CLOCK_MONOTONIC, d);
        // SAFETY: the caller's obligation covers `m`; `ts` is a local.
        unsafe { pthread_mutex_clocklock(m, libc::CLOCK_MONOTONIC, &ts) }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        let ts = clock_after(libc::CLOCK_REALTIME, d);
        // SAFETY: the caller's obligation covers `m`; `ts` is a local.
        unsafe { libc::pthread_mutex_timedlock(m, &ts) }
    }
}

/// `clock`'s current reading plus `d`, as an absolute timeout.
fn clock_after(clock: libc::clockid_t, d: Duration) -> libc::timespec {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec owned by this frame;
    // clock_gettime writes only into it. (It cannot fail for these clocks.)
    unsafe { libc::clock_gettime(clock, &mut now) };
    let end = Duration::new(
        now.tv_sec.max(0) as u64,
        now.tv_nsec.clamp(0, 999_999_999) as u32,
    )
    .saturating_add(d);
    libc::timespec {
        tv_sec: end.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
        tv_nsec: end.subsec_nanos() as _,
    }
}

/// Sleeps while `*word == expected`, at most `timeout`. Returns early on a
/// wake-up, a signal, or if the word already differs; callers re-check
/// their condition in a loop.
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = futex::Timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: timeout.subsec_nanos() as _,
    };
    // Errors (EAGAIN: the word changed; EINTR; ETIMEDOUT) all mean "look
    // again", which the caller does.
    let _ = futex::wait(word, futex::Flags::empty(), expected, Some(&ts));
}

/// Wakes every process sleeping on `word`.
pub(crate) fn futex_wake_all(word: &AtomicU32) {
    let _ = futex::wake(word, futex::Flags::empty(), i32::MAX as u32);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_unlock_relock_and_deadlock_detection() {
        let r = Region::heap(4096);
        let m = RobustMutex::at(&r, 64).unwrap();
        m.init().unwrap();
        assert_eq!(
            m.lock(None, &|tid| !crate::sys::thread_exists(tid)),
            Ok(false)
        );
        assert_eq!(
            m.lock(None, &|tid| !crate::sys::thread_exists(tid)),
            Err(LockError::Deadlock),
            "errorcheck type"
        );
        m.unlock();
        assert_eq!(
            m.lock(Some(Instant::now()), &|tid| !crate::sys::thread_exists(tid)),
            Ok(false)
        );
        m.unlock();
    }

    #[test]
    fn a_thread_that_exits_holding_it_is_recovered() {
        let r = std::sync::Arc::new(Region::heap(4096));
        RobustMutex::at(&r, 0).unwrap().init().unwrap();
        let r2 = r.clone();
        std::thread::spawn(move || {
            assert_eq!(
                RobustMutex::at(&r2, 0)
                    .unwrap()
                    .lock(None, &|tid| !crate::sys::thread_exists(tid)),
                Ok(false)
            );
            // Exits holding it.
        })
        .join()
        .unwrap();
        let m = RobustMutex::at(&r, 0).unwrap();
        assert_eq!(
            m.lock(None, &|tid| !crate::sys::thread_exists(tid)),
            Ok(true),
            "EOWNERDEAD is reported as recovered"
        );
        m.unlock();
        assert_eq!(
            m.lock(None, &|tid| !crate::sys::thread_exists(tid)),
            Ok(false),
            "consistent again"
        );
        m.unlock();
    }

    #[test]
    fn garbage_is_refused_and_a_missing_owner_is_recovered() {
        let r = Region::heap(4096);
        let m = RobustMutex::at(&r, 0).unwrap();
        assert!(
            matches!(
                m.lock(None, &|tid| !crate::sys::thread_exists(tid)),
                Err(LockError::Corrupt(_))
            ),
            "all zero"
        );
        m.init().unwrap();
        // A lock word naming a thread id that cannot exist (above pid_max).
        m.word(0).store(0x3fff_fff0, Ordering::Relaxed);
        assert_eq!(
            m.lock(None, &|tid| !crate::sys::thread_exists(tid)),
            Ok(true)
        );
        m.unlock();
        let timed = m.lock(Some(Instant::now() + Duration::from_millis(10)), &|tid| {
            !crate::sys::thread_exists(tid)
        });
        assert_eq!(timed, Ok(false));
        m.unlock();
        // Someone may be in another pid namespace: a missing thread proves
        // nothing, so the word is waited on like a live holder.
        m.word(0).store(0x3fff_fff0, Ordering::Relaxed);
        let timed = m.lock(Some(Instant::now() + Duration::from_millis(250)), &|_| {
            false
        });
        assert_eq!(timed, Err(LockError::Timeout));
        assert_eq!(
            m.lock(None, &|tid| !crate::sys::thread_exists(tid)),
            Ok(true)
        );
        m.unlock();
        // Flag bits without an owner: freed, then locked normally.
        m.word(0).store(0x8000_0000, Ordering::Relaxed);
        assert_eq!(
            m.lock(None, &|tid| !crate::sys::thread_exists(tid)),
            Ok(false)
        );
        m.unlock();
    }

    /// Regression: a lock word naming a missing thread was checked only
    /// after a slice that ended before the caller's deadline, so a caller
    /// waiting in slices shorter than `SLICE` (`ShmDict::lock_timeout` in a
    /// loop, as the Python binding does to notice Ctrl-C) timed out
    /// forever instead of recovering the mutex.
    #[test]
    fn short_timed_attempts_recover_a_missing_owner() {
        let r = Region::heap(4096);
        let m = RobustMutex::at(&r, 0).unwrap();
        m.init().unwrap();
        // A lock word naming a thread id that cannot exist (above pid_max).
        m.word(0).store(0x3fff_fff0, Ordering::Relaxed);
        let missing = |tid| !crate::sys::thread_exists(tid);
        let mut attempts = Vec::new();
        for _ in 0..5 {
            let got = m.lock(Some(Instant::now() + Duration::from_millis(20)), &missing);
            let done = got.is_ok();
            attempts.push(got);
            if done {
                break;
            }
        }
        assert_eq!(
            attempts.last(),
            Some(&Ok(true)),
            "20 ms attempts never recovered the mutex: {attempts:?}"
        );
        assert!(attempts.len() <= 2, "{attempts:?}");
        m.unlock();
        // A zero timeout tries once: free now, so it locks.
        assert_eq!(m.lock(Some(Instant::now()), &missing), Ok(false));
        m.unlock();
    }

    #[test]
    fn timeout_while_held_by_a_live_thread() {
        let r = std::sync::Arc::new(Region::heap(4096));
        RobustMutex::at(&r, 0).unwrap().init().unwrap();
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let r2 = r.clone();
        let t = std::thread::spawn(move || {
            let m = RobustMutex::at(&r2, 0).unwrap();
            m.lock(None, &|tid| !crate::sys::thread_exists(tid))
                .unwrap();
            held_tx.send(()).unwrap();
            done_rx.recv().unwrap();
            m.unlock();
        });
        held_rx.recv().unwrap();
        let m = RobustMutex::at(&r, 0).unwrap();
        let got = m.lock(Some(Instant::now() + Duration::from_millis(250)), &|tid| {
            !crate::sys::thread_exists(tid)
        });
        assert_eq!(got, Err(LockError::Timeout));
        done_tx.send(()).unwrap();
        t.join().unwrap();
        assert_eq!(
            m.lock(None, &|tid| !crate::sys::thread_exists(tid)),
            Ok(false)
        );
        m.unlock();
    }
}
