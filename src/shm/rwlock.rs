//! The robust lock of a `Value`/`Array` segment: an exclusive side, shared
//! holds in one of two modes, and claims of disjoint element ranges.
//!
//! Words (offsets in `prim.rs`):
//!
//! | word              | values                                                |
//! |-------------------|-------------------------------------------------------|
//! | `P_LOCK`          | `0` free, `HELD \| token` held exclusively (`lockword`) |
//! | `P_MODE`          | mode of the current shared holders: 0 read, 1 chunk    |
//! | entry + `E_SHARED`| shared holds of that attach entry's handle             |
//! | `P_HWM`           | entries `0..hwm` may have a non-zero shared count      |
//! | `P_CLAIM_LOCK`    | lock word of the claim table (`lockword`)              |
//! | claim slot        | owner (`0` or `HELD \| token`), start, end (elements)  |
//! | `P_FUTEX_SEQ`     | bumped (and woken) when a lock is released             |
//! | `P_FUTEX_SLEEPERS`| processes sleeping on the sequence (a hint)            |
//!
//! **Exclusive** (`Array::write`, `Array::set`, `Value` writers of the double
//! buffer): take the lock word, then *drain*: wait until every live handle's
//! shared count is zero. **Shared in mode m** (`read`/`get`: read mode;
//! `chunk_mut`: chunk mode): increment the handle's count, then look at the
//! lock word and the mode; if the word is free and the mode is m, the hold
//! is granted; otherwise undo the increment, take the lock word (waiting
//! for the exclusive holder), drain if the mode differs, set the mode,
//! increment the count and release the lock word. The increment-then-look of
//! a shared holder and the take-then-drain of the exclusive side are each
//! separated by a SeqCst fence (Dekker): at least one of them sees the
//! other, so an exclusive holder and a shared holder, or shared holders of
//! different modes, never overlap. Chunk holders then claim their element
//! range in the claim table, which refuses ranges overlapping a live claim.
//!
//! So at any time the data is accessed by: one exclusive holder; or any
//! number of readers (only reads); or chunk holders, each alone on its own
//! range. That is what makes the zero-copy slices of the guards sound.
//!
//! **Dead holders.** A process killed at any instruction cannot block the
//! others for long. A lock or claim word names a token; a waiter that finds
//! it held asks whether that handle's process still runs and, if not, clears
//! it (`lockword::clear_if_dead`). A dead process's shared count is ignored,
//! and its attach entry freed, by the next drain. Either way the acquisition
//! that found the dead holder reports `recovered`. Counts and words of this
//! process's own handle are judged by its process-local state (`Local`), so
//! a corrupted word naming ourselves does not make us wait for ourselves.
//!
//! **Waiting** spins briefly, then sleeps on the futex sequence word, which
//! every release bumps when someone sleeps; sleeps are bounded (10 to 100
//! ms) so liveness is re-checked even if a wake-up is lost to a crash.
//!
//! A thread must not request a lock mode that conflicts with a guard it
//! holds itself on the same segment (for example `get` while holding
//! `write()`): like `std::sync::RwLock`, that waits for itself forever.
//!
//! **Loom models** (`tests/loom.rs`, through `__loom::ArrayLock` in
//! `lib.rs`) run this code on a heap region of loom atomics. Only waiting
//! differs there: `wait_until` polls and yields instead of spinning and
//! sleeping on the futex, and `wake` is just its fence, so the sleepers'
//! handshake (and the fence of `release_shared` that serves it) is not
//! modelled; everything else, orderings included, is the code above.

#[cfg(not(loom))]
use std::time::{Duration, Instant};

use crate::prim::{
    word, Local, CLAIM_BYTES, CLAIM_SLOTS, E_SHARED, P_CLAIMS, P_CLAIM_LOCK, P_HWM, P_LOCK, P_MODE,
};
#[cfg(not(loom))]
use crate::prim::{word32, P_FUTEX_SEQ, P_FUTEX_SLEEPERS};
use crate::shm::attach::{self, Token, TOKEN_BITS};
use crate::shm::layout::ATTACH_ENTRIES;
use crate::shm::lockword::{self, HELD};
use crate::shm::region::Region;
use crate::sync::{fence, AtomicU64, Ordering};
#[cfg(not(loom))]
use crate::sys::robust_mutex::{futex_wait, futex_wake_all};

/// Shared-hold modes (values of `P_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Readers of the whole array (`read`, `get`).
    Read = 0,
    /// Holders of disjoint ranges (`chunk_mut`).
    Chunk = 1,
}

/// Polls before the first sleep.
#[cfg(not(loom))]
const SPINS: u32 = 64;
/// Sleep bounds between liveness checks.
#[cfg(not(loom))]
const FIRST_SLEEP: Duration = Duration::from_millis(10);
#[cfg(not(loom))]
const MAX_SLEEP: Duration = Duration::from_millis(100);

const TOKEN_MASK: u64 = (1 << TOKEN_BITS) - 1;

/// Waits until `ready` returns true. `ready(check)` is asked with
/// `check == true` when it should also look for dead holders (the first time
/// after the spinning phase, then after every sleep that was not woken).
#[cfg(not(loom))]
fn wait_until(r: &Region, mut ready: impl FnMut(bool) -> bool) {
    for i in 0..SPINS {
        if ready(false) {
            return;
        }
        if i < 16 {
            for _ in 0..(1u32 << (i / 2)) {
                std::hint::spin_loop();
            }
        } else {
            std::thread::yield_now();
        }
    }
    let seq = word32(r, P_FUTEX_SEQ);
    let sleepers = word32(r, P_FUTEX_SLEEPERS);
    // SeqCst, then the fence: Dekker with `wake` (state change, fence, read
    // of the sleepers): either it sees us and bumps the sequence, or our
    // next `ready` sees its change.
    sleepers.fetch_add(1, Ordering::SeqCst);
    fence(Ordering::SeqCst);
    let mut sleep = FIRST_SLEEP;
    let mut check = true;
    loop {
        // Acquire: pairs with the bump in `wake` (the change it announces
        // was made before).
        let s = seq.load(Ordering::Acquire);
        if ready(check) {
            break;
        }
        let t0 = Instant::now();
        futex_wait(seq, s, sleep);
        // A sleep that ran to its end means nobody released anything:
        // time to ask whether the holders still live.
        check = t0.elapsed() >= sleep;
        if check {
            sleep = (sleep * 2).min(MAX_SLEEP);
        }
    }
    // Relaxed: only a hint for wakers.
    sleepers.fetch_sub(1, Ordering::Relaxed);
}

/// Under loom: polls `ready`, yielding to the model scheduler in between.
/// Every poll after the first also looks for dead holders: loom does not
/// model time, so a liveness check may come at any point of a wait, which
/// is what this explores. There is no sleeping, so the futex words and the
/// sleepers' Dekker handshake with `wake` are not modelled.
#[cfg(loom)]
fn wait_until(_r: &Region, mut ready: impl FnMut(bool) -> bool) {
    if ready(false) {
        return;
    }
    loop {
        crate::sync::yield_now();
        if ready(true) {
            return;
        }
    }
}

/// Wakes sleepers after a release (if any sleep).
#[cfg(not(loom))]
fn wake(r: &Region) {
    let seq = word32(r, P_FUTEX_SEQ);
    // Pairs with the fence in `wait_until`: see there.
    fence(Ordering::SeqCst);
    // Relaxed: ordered by the fence.
    if word32(r, P_FUTEX_SLEEPERS).load(Ordering::Relaxed) != 0 {
        // Release: pairs with the Acquire load in `wait_until`.
        seq.fetch_add(1, Ordering::Release);
        futex_wake_all(seq);
    }
}

/// Under loom nobody sleeps: only the fence of [`wake`] remains (it orders
/// the release before later loads of the releasing thread, as on the real
/// path).
#[cfg(loom)]
fn wake(_r: &Region) {
    fence(Ordering::SeqCst);
}

/// Takes the exclusive lock word for this handle, waiting for a live holder
/// and taking over from a dead one. Returns whether it took over.
pub(crate) fn lock_word(r: &Region, l: &Local) -> bool {
    let x = word(r, P_LOCK);
    if lockword::try_lock(x, &l.x) {
        return false;
    }
    let mut recovered = false;
    wait_until(r, |check| {
        if lockword::try_lock(x, &l.x) {
            return true;
        }
        if check {
            // Acquire: see `lockword::clear_if_dead`.
            let seen = x.load(Ordering::Acquire);
            if seen != 0 && lockword::clear_if_dead(r, x, seen, &l.x) {
                recovered = true;
                return lockword::try_lock(x, &l.x);
            }
        }
        false
    });
    recovered
}

/// Releases the exclusive lock word.
pub(crate) fn unlock_word(r: &Region, l: &Local) {
    lockword::unlock(word(r, P_LOCK), &l.x);
    wake(r);
}

/// The shared count of attach entry `i`.
fn shared_count(r: &Region, i: u64) -> &AtomicU64 {
    word(r, attach::entry_off(i) + E_SHARED)
}

/// With the lock word held: waits until no live handle has a shared hold.
/// Returns whether a dead holder's count was found (and its entry freed).
fn drain(r: &Region, l: &Local) -> bool {
    // Pairs with the fence in `acquire_shared` (Dekker): our lock word is
    // taken before we read any count.
    fence(Ordering::SeqCst);
    let mut recovered = false;
    wait_until(r, |check| {
        // SeqCst: see `attach_region` (a handle attached after this read
        // sees our lock word held).
        let hwm = word(r, P_HWM).load(Ordering::SeqCst).min(ATTACH_ENTRIES);
        let mut busy = false;
        for i in 0..hwm {
            if i == l.index {
                // Our own handle: trust the process-local count. Acquire:
                // pairs with the Release decrement in `release_shared`.
                if l.shared.load(Ordering::Acquire) != 0 {
                    busy = true;
                }
                continue;
            }
            // Acquire: pairs with the Release (SeqCst) decrement of the
            // holder, so its reads and writes happen before ours.
            if shared_count(r, i).load(Ordering::Acquire) == 0 {
                continue;
            }
            // Acquire: if the count we read was written by the entry's
            // current owner, its claim of the entry is visible here.
            let ident = word(r, attach::entry_off(i)).load(Ordering::Acquire);
            if ident == 0 {
                continue; // A free entry: its count is stale.
            }
            if check && !attach::entry_alive(r, l.x.lock_fd, i) {
                // Died holding: its count will never drop. Free its entry
                // (CAS from the dead identity, so a new owner is never
                // disturbed); the next owner zeroes the count.
                attach::clear_dead(r, i, ident);
                recovered = true;
                continue;
            }
            busy = true;
            if !check {
                break;
            }
        }
        !busy
    });
    recovered
}

/// Takes the lock exclusively: the word, then no shared holders. Returns
/// whether a dead holder was found.
pub(crate) fn acquire_exclusive(r: &Region, l: &Local) -> bool {
    let taken_over = lock_word(r, l);
    let dead_shared = drain(r, l);
    taken_over | dead_shared
}

/// Releases [`acquire_exclusive`].
pub(crate) fn release_exclusive(r: &Region, l: &Local) {
    unlock_word(r, l);
}

/// Takes a shared hold in `mode`. Returns whether a dead holder was found.
pub(crate) fn acquire_shared(r: &Region, l: &Local, mode: Mode) -> bool {
    let count = shared_count(r, l.index);
    let x = word(r, P_LOCK);
    let m = word(r, P_MODE);
    // SeqCst, then the fence: Dekker with `drain` (lock word, fence,
    // counts): either the exclusive side sees our count or we see its word.
    l.shared.fetch_add(1, Ordering::SeqCst);
    count.fetch_add(1, Ordering::SeqCst);
    fence(Ordering::SeqCst);
    // Acquire (both): pairs with the Release of `unlock_word` and of the
    // mode change made under the word, so the last exclusive holder's
    // writes are visible before we read the data.
    if x.load(Ordering::Acquire) == 0 && m.load(Ordering::Acquire) == mode as u64 {
        return false;
    }
    release_shared(r, l);
    // Slow path: under the lock word no exclusive holder is active and the
    // mode cannot change.
    let mut recovered = lock_word(r, l);
    // Relaxed: the mode is only written under the word, which we hold.
    if m.load(Ordering::Relaxed) != mode as u64 {
        recovered |= drain(r, l);
        // Release: read (Acquire) by the fast path of other holders.
        m.store(mode as u64, Ordering::Release);
    }
    // SeqCst: as above; the next exclusive holder drains after taking the
    // word we still hold, so it sees this count.
    l.shared.fetch_add(1, Ordering::SeqCst);
    count.fetch_add(1, Ordering::SeqCst);
    unlock_word(r, l);
    recovered
}

/// Releases a shared hold.
pub(crate) fn release_shared(r: &Region, l: &Local) {
    // SeqCst (Release part): this hold's accesses happen before a drainer's
    // Acquire read of the counts. Then the fence: Dekker with `drain`, so a
    // drainer that sleeps is woken.
    shared_count(r, l.index).fetch_sub(1, Ordering::SeqCst);
    l.shared.fetch_sub(1, Ordering::SeqCst);
    fence(Ordering::SeqCst);
    // Relaxed: ordered by the fence.
    if word(r, P_LOCK).load(Ordering::Relaxed) != 0 {
        wake(r);
    }
}

// ---------------------------------------------------------------------------
// Claims of element ranges (chunk mode).
// ---------------------------------------------------------------------------

fn claim_words(r: &Region, slot: u64) -> (&AtomicU64, &AtomicU64, &AtomicU64) {
    let off = P_CLAIMS + slot * CLAIM_BYTES;
    (word(r, off), word(r, off + 8), word(r, off + 16))
}

/// The owner of a claim word, or `None` if free (or not a valid owner
/// word: only a corrupted segment has those, and they count as free).
fn claim_owner(v: u64) -> Option<Token> {
    (v & HELD != 0 && v & !(HELD | TOKEN_MASK) == 0).then_some(Token(v & TOKEN_MASK))
}

/// Why a claim was not made.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ClaimError {
    /// Every slot holds a live claim.
    Full,
}

/// Claims elements `start..end` for this handle (caller holds a shared hold
/// in chunk mode), waiting while a live claim overlaps it. Returns the slot
/// and whether an overlapping claim of a dead holder was cleared.
pub(crate) fn claim(
    r: &Region,
    l: &Local,
    start: u64,
    end: u64,
) -> Result<(u64, bool), ClaimError> {
    let mut recovered = false;
    if let Some(res) = try_claim(r, l, start, end, false, &mut recovered) {
        return res.map(|slot| (slot, recovered));
    }
    let mut outcome = None;
    wait_until(r, |check| {
        outcome = try_claim(r, l, start, end, check, &mut recovered);
        outcome.is_some()
    });
    match outcome {
        Some(res) => res.map(|slot| (slot, recovered)),
        None => Err(ClaimError::Full),
    }
}

/// One attempt of [`claim`] under the claim lock: `None` if a live claim
/// overlaps (or, unless `check`, if no slot is free). With `check`, asks
/// whether the owners of claims still live, and frees the dead ones' slots.
fn try_claim(
    r: &Region,
    l: &Local,
    start: u64,
    end: u64,
    check: bool,
    recovered: &mut bool,
) -> Option<Result<u64, ClaimError>> {
    let lock = word(r, P_CLAIM_LOCK);
    lockword::lock(r, lock, &l.claim_lock);
    let mut free = None;
    let mut conflict = false;
    for slot in 0..CLAIM_SLOTS {
        let (owner, s, e) = claim_words(r, slot);
        // Relaxed (all claim words): only accessed under the claim lock,
        // whose Acquire/Release order them.
        let Some(t) = claim_owner(owner.load(Ordering::Relaxed)) else {
            free.get_or_insert(slot);
            continue;
        };
        let overlaps = s.load(Ordering::Relaxed) < end && start < e.load(Ordering::Relaxed);
        let dead = if t == l.x.token {
            // Ours: the process-local mask says whether a guard holds it.
            // Relaxed: only changed under the claim lock, which we hold.
            l.claimed.load(Ordering::Relaxed) & (1 << slot) == 0
        } else {
            check && !attach::token_alive(r, l.x.lock_fd, t)
        };
        if dead {
            owner.store(0, Ordering::Relaxed);
            *recovered |= overlaps;
            free.get_or_insert(slot);
        } else if overlaps {
            conflict = true;
        }
    }
    let result = match (conflict, free) {
        (true, _) => None,
        (false, Some(slot)) => {
            let (owner, s, e) = claim_words(r, slot);
            s.store(start, Ordering::Relaxed);
            e.store(end, Ordering::Relaxed);
            owner.store(HELD | l.x.token.0, Ordering::Relaxed);
            l.claimed.fetch_or(1 << slot, Ordering::Relaxed);
            Some(Ok(slot))
        }
        (false, None) if check => Some(Err(ClaimError::Full)),
        (false, None) => None,
    };
    lockword::unlock(lock, &l.claim_lock);
    result
}

/// Takes a shared hold in chunk mode and claims elements `start..end` (an
/// empty range claims nothing): what a chunk guard holds. Returns the claim
/// slot (`None` for an empty range) and whether a dead holder was found. On
/// `Full` nothing is held.
pub(crate) fn acquire_range(
    r: &Region,
    l: &Local,
    start: u64,
    end: u64,
) -> Result<(Option<u64>, bool), ClaimError> {
    let recovered = acquire_shared(r, l, Mode::Chunk);
    if start >= end {
        return Ok((None, recovered));
    }
    match claim(r, l, start, end) {
        Ok((slot, took_over)) => Ok((Some(slot), recovered | took_over)),
        Err(e) => {
            release_shared(r, l);
            Err(e)
        }
    }
}

/// Releases [`acquire_range`].
pub(crate) fn release_range(r: &Region, l: &Local, slot: Option<u64>) {
    if let Some(slot) = slot {
        release_claim(r, l, slot);
    }
    release_shared(r, l);
}

/// Releases a claim made by [`claim`].
pub(crate) fn release_claim(r: &Region, l: &Local, slot: u64) {
    let lock = word(r, P_CLAIM_LOCK);
    lockword::lock(r, lock, &l.claim_lock);
    let (owner, _, _) = claim_words(r, slot);
    // Relaxed: under the claim lock. Only our own claim is cleared (a claim
    // word taken over meanwhile stays with its new owner).
    if owner.load(Ordering::Relaxed) == HELD | l.x.token.0 {
        owner.store(0, Ordering::Relaxed);
    }
    l.claimed.fetch_and(!(1 << slot), Ordering::Relaxed);
    lockword::unlock(lock, &l.claim_lock);
    wake(r);
}
