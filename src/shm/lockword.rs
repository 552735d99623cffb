//! Owner-tagged lock words and the backoff used while waiting on another
//! process.
//!
//! A lock word guards a short structural change (a bucket's new-key insert,
//! the arena's defragmentation). It is never held across user code.
//!
//! | value                  | state                               |
//! |------------------------|-------------------------------------|
//! | `0`                    | free                                |
//! | `HELD \| token`        | held by the handle named by `token` (62 bits, see `attach`) |
//! | anything else          | garbage (a corrupted segment): cleared by waiters |
//!
//! A waiter that finds the word held for a while asks whether the holder is
//! still attached and alive ([`attach::token_alive`]); if not, it clears the
//! word with a CAS from the exact value it saw, so a live new holder is never
//! disturbed.

use crate::shm::attach::{self, Holder, Token, TOKEN_BITS};
use crate::shm::region::Region;
use crate::sync::{spin_hint, yield_now, AtomicU64, Ordering};

/// Set in a lock word while it is held.
pub(crate) const HELD: u64 = 1 << 63;
const TOKEN_MASK: u64 = (1 << TOKEN_BITS) - 1;

/// Who holds a lock word, if anyone.
pub(crate) fn holder(v: u64) -> Option<Token> {
    (v & HELD != 0).then_some(Token(v & TOKEN_MASK))
}

/// Spins, then yields, then sleeps; says when to check the holder's liveness.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    step: u32,
}

impl Backoff {
    /// Steps of pure spinning before yielding.
    const SPIN_STEPS: u32 = 6;
    /// Steps before the first liveness check, and between checks.
    const FIRST_CHECK: u32 = 16;
    const CHECK_EVERY: u32 = 64;
    /// Steps after which each wait sleeps instead of yielding.
    const SLEEP_AFTER: u32 = 2048;

    pub(crate) fn new() -> Backoff {
        Backoff { step: 0 }
    }

    /// Waits a little. Returns `true` when the caller should check whether the
    /// holder it waits for is still alive.
    #[cfg(not(loom))]
    pub(crate) fn snooze(&mut self) -> bool {
        if self.step < Self::SPIN_STEPS {
            for _ in 0..1u32 << self.step {
                spin_hint();
            }
        } else if self.step < Self::SLEEP_AFTER {
            yield_now();
        } else {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        self.step = self.step.saturating_add(1);
        self.step == Self::FIRST_CHECK
            || (self.step > Self::FIRST_CHECK && self.step % Self::CHECK_EVERY == 0)
    }

    /// Under loom: yields to the model scheduler once, and asks for a
    /// liveness check every time. Loom does not model time, so a check may
    /// come at any point of a wait, which is what this explores (as
    /// `rwlock::wait_until` does under loom).
    #[cfg(loom)]
    pub(crate) fn snooze(&mut self) -> bool {
        yield_now();
        self.step = self.step.saturating_add(1);
        true
    }
}

/// Takes the lock word for `me`, waiting for a live holder and taking over
/// from a dead one.
pub(crate) fn lock(r: &Region, word: &AtomicU64, me: &Holder) {
    let mut backoff = Backoff::new();
    loop {
        if try_lock(word, me) {
            return;
        }
        // Acquire: pairs with `unlock`; see `clear_if_dead`.
        let seen = word.load(Ordering::Acquire);
        if backoff.snooze() {
            clear_if_dead(r, word, seen, me);
        }
    }
}

/// Takes the lock word if it is free right now.
pub(crate) fn try_lock(word: &AtomicU64, me: &Holder) -> bool {
    me.begin_hold();
    // AcqRel: Acquire pairs with the Release in `unlock`, so the previous
    // holder's changes are visible; Release publishes `begin_hold`.
    let ok = word
        .compare_exchange(0, HELD | me.token.0, Ordering::AcqRel, Ordering::Relaxed)
        .is_ok();
    if !ok {
        me.end_hold();
    }
    ok
}

/// Clears `word` if it still holds `seen` and `seen`'s holder is dead (see
/// [`attach::release_if_dead`]: a word naming our own handle is cleared only
/// while none of its threads holds anything), or if `seen` is not a value a
/// lock word can hold (only a corrupted segment has those). Returns whether
/// the word is (now) free.
pub(crate) fn clear_if_dead(r: &Region, word: &AtomicU64, seen: u64, me: &Holder) -> bool {
    let malformed = seen != 0 && seen & !(HELD | TOKEN_MASK) != 0 || seen == HELD;
    // AcqRel: acquire what the dead holder published; release our clearing
    // to the next locker. Fails harmlessly if the word changed.
    let clear = || {
        word.compare_exchange(seen, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    };
    match holder(seen) {
        None if seen == 0 => true,
        Some(_) if malformed => clear(),
        Some(t) => attach::release_if_dead(r, me, t, clear),
        // Non-zero without HELD: garbage.
        None => clear(),
    }
}

/// Releases the lock word taken by [`lock`] for `me`.
pub(crate) fn unlock(word: &AtomicU64, me: &Holder) {
    // Release: pairs with the Acquire of the next `lock`. A CAS rather than a
    // store: if we were wrongly presumed dead and the word was taken over, the
    // new holder keeps it.
    let _ = word.compare_exchange(HELD | me.token.0, 0, Ordering::Release, Ordering::Relaxed);
    me.end_hold();
}

#[cfg(all(test, not(loom)))]
mod tests {
    //! Regression: a lock word holding a value without the HELD bit (a
    //! flipped bit in a corrupted segment) was reported free but never
    //! cleared, so `lock` retried forever (found by tests/api.rs).

    use super::*;
    use crate::shm::layout::INDEX_OFF;

    #[test]
    fn malformed_lock_words_are_cleared() {
        let r = Region::heap(INDEX_OFF as usize + 64);
        let me = Holder::new(Token(3));
        let word = r.word(INDEX_OFF).unwrap();
        // `HELD | 1 << 40 | 3` is well formed (entry 3, generation 2^28)
        // but names a handle that is not attached; bit 62 is never part of
        // a token.
        for garbage in [
            1,
            0x8000,
            HELD,
            HELD | 1 << 40 | 3,
            HELD | 1 << 62 | 3,
            u64::MAX,
        ] {
            word.store(garbage, Ordering::Relaxed);
            lock(&r, word, &me);
            assert_eq!(word.load(Ordering::Relaxed), HELD | 3, "after {garbage:#x}");
            unlock(word, &me);
            assert_eq!(word.load(Ordering::Relaxed), 0);
        }
    }
}
