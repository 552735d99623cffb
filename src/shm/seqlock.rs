//! The control word of an index slot: a sequence lock for writers and a
//! version that readers validate against.
//!
//! | bits   | meaning                                              |
//! |--------|------------------------------------------------------|
//! | 0      | WRITING: a writer holds the slot                     |
//! | 1..24  | the writer's short token (`Token::short`) while WRITING, else 0 |
//! | 24..64 | version: incremented by every release of the slot    |
//!
//! The owner is the 23-bit short token (attach index, generation mod
//! 2^11): the version needs its 40 bits (a reader's snapshot is validated
//! by it). Short tokens repeat every 2,048 claims of an attach entry; the
//! claimer of a dictionary entry releases its index's WRITING slots when
//! they could (see `index::sweep_slots_on_attach` and `attach`'s module
//! docs), so a slot's owner never names a live handle it is not.
//!
//! Values are copy-on-write: a writer prepares a complete block in the arena,
//! takes the slot (WRITING, the word is odd), stores the new entry word,
//! releases it (even again, version + 1) and only then frees the old block.
//! A reader loads the control word, the entry word and the block's bytes, then
//! loads the control word again: if it is unchanged, no release happened in
//! between, so the old block was not freed (and reused) while it was read.
//! Readers therefore never wait and never write; an odd word does not stop
//! them, because the entry word always names a complete block.
//!
//! # What readers guarantee
//!
//! Reads are lock-free, not wait-free. A read is retried only when its
//! validation fails, and validation fails only if the slot was *released*
//! between the read's two loads of the control word: a write to that key
//! (or a takeover of a dead writer's slot) completed meanwhile. So every
//! retry is paid for by a completed write, and the system as a whole always
//! makes progress; a WRITING slot, a stopped writer or a dead one never makes
//! a reader retry or wait. A single reader can still starve while writers
//! complete writes to the same key faster than it can copy the value (a
//! large value against a tight write loop). Retries are paced by [`Retry`]:
//! a few short spins, then a yield of the CPU before each further attempt,
//! so a starved reader does not burn a core spinning against the writer
//! (with whom it may share one); it never sleeps and never blocks anybody.
//!
//! A writer killed while WRITING leaves the entry word either old or new.
//! Another writer that waits on the slot for long checks the owner's liveness
//! and releases the slot for it (see [`wait_unlocked`]).

use crate::shm::attach::{self, Holder, SHORT_TOKEN_BITS};
use crate::shm::lockword::Backoff;
use crate::shm::region::Region;
use crate::sync::{AtomicU64, Ordering};

pub(crate) const WRITING: u64 = 1;
const OWNER_SHIFT: u32 = 1;
const VERSION_SHIFT: u32 = 24;
const VERSION_MASK: u64 = !((1 << VERSION_SHIFT) - 1);

#[inline]
pub(crate) fn is_writing(ctrl: u64) -> bool {
    ctrl & WRITING != 0
}

const _: () = assert!(OWNER_SHIFT + SHORT_TOKEN_BITS == VERSION_SHIFT);

/// The short token of a control word's owner (0 if not WRITING).
#[inline]
pub(crate) fn owner(ctrl: u64) -> u64 {
    (ctrl & !VERSION_MASK) >> OWNER_SHIFT
}

/// The version field of a control word (40 bits).
#[inline]
pub(crate) fn version(ctrl: u64) -> u64 {
    ctrl >> VERSION_SHIFT
}

/// The value after the slot holding `ctrl` is released: version + 1, no owner.
#[inline]
pub(crate) fn released(ctrl: u64) -> u64 {
    (ctrl & VERSION_MASK).wrapping_add(1 << VERSION_SHIFT)
}

/// Takes the slot if its control word still equals `seen` (which must not be
/// WRITING). Returns the locked value to pass to [`unlock`].
#[inline]
pub(crate) fn try_lock(ctrl: &AtomicU64, seen: u64, me: &Holder) -> Option<u64> {
    if is_writing(seen) {
        return None;
    }
    let locked = (seen & VERSION_MASK) | me.token.short() << OWNER_SHIFT | WRITING;
    me.begin_hold();
    // AcqRel: Acquire pairs with the previous writer's Release in `unlock`, so
    // we see the entry it left; Release orders our block writes (done before)
    // and `begin_hold` ahead of the lock.
    match ctrl.compare_exchange(seen, locked, Ordering::AcqRel, Ordering::Relaxed) {
        Ok(_) => Some(locked),
        Err(_) => {
            me.end_hold();
            None
        }
    }
}

/// Releases a slot taken by [`try_lock`].
#[inline]
pub(crate) fn unlock(ctrl: &AtomicU64, locked: u64, me: &Holder) {
    // Release: pairs with the Acquire load of readers (`read_begin`) and the
    // Acquire of the next `try_lock`: the entry word stored while WRITING is
    // visible to whoever sees the new version. A plain store suffices: while
    // we hold the slot only we change it; others release a WRITING word only
    // for a holder that is dead (a stopped process counts as alive) or, for
    // our own token, only while no thread of ours holds anything
    // (`attach::release_if_dead`).
    ctrl.store(released(locked), Ordering::Release);
    me.end_hold();
}

/// Starts an optimistic read: the control word to validate against later.
#[inline]
pub(crate) fn read_begin(ctrl: &AtomicU64) -> u64 {
    // Acquire: pairs with the Release in `unlock`: the entry word and the
    // block it names are visible.
    ctrl.load(Ordering::Acquire)
}

/// Ends an optimistic read: `true` if nothing was released since `begin`, so
/// every word read in between belongs to one consistent snapshot.
#[inline]
pub(crate) fn read_validate(ctrl: &AtomicU64, begin: u64) -> bool {
    // Acquire fence: pairs with the Release fence a writer issues after it
    // takes a block from the free lists and before it stores into the block
    // (slab::alloc, slab::push). If any word we read was written after the
    // block was recycled, that writer's fence synchronizes with this one, and
    // the release that retired the block (which happened before the recycling)
    // is visible to the load below, so the versions differ.
    crate::sync::fence(Ordering::Acquire);
    // Relaxed: ordered by the fence above.
    ctrl.load(Ordering::Relaxed) & VERSION_MASK == begin & VERSION_MASK
}

/// Paces the retries of one optimistic read (see the module doc, "What
/// readers guarantee").
#[derive(Debug, Default)]
pub(crate) struct Retry {
    attempts: u32,
}

impl Retry {
    /// Retries that only spin (1, 2, 4, ... spin hints); later ones yield.
    const SPIN_RETRIES: u32 = 6;

    pub(crate) fn new() -> Retry {
        Retry::default()
    }

    /// Call after a failed [`read_validate`], before reading again.
    #[inline]
    pub(crate) fn pause(&mut self) {
        if self.attempts < Self::SPIN_RETRIES {
            for _ in 0..1u32 << self.attempts {
                crate::sync::spin_hint();
            }
        } else {
            crate::sync::yield_now();
        }
        self.attempts = self.attempts.saturating_add(1);
    }
}

/// Waits until the slot is not WRITING, releasing it on behalf of a dead
/// writer. Returns the control word seen last (not WRITING).
pub(crate) fn wait_unlocked(r: &Region, ctrl: &AtomicU64, me: &Holder) -> u64 {
    let mut backoff = Backoff::new();
    loop {
        let c = ctrl.load(Ordering::Acquire); // Acquire: as in `read_begin`.
        if !is_writing(c) {
            return c;
        }
        if backoff.snooze() {
            // If the writer died while holding the slot, its entry word is
            // either the old or the new value, both complete blocks. If it
            // was changing the number of keys, settle its count record
            // first, while the slot still says what it did (`livecount.rs`;
            // our own token here means a bogus hold: nothing of ours to
            // settle). Then release the slot as it would have. AcqRel: see
            // `try_lock` and `unlock`.
            let o = owner(c);
            attach::release_slot_if_dead(r, me, o, || {
                if o != me.token.short() {
                    crate::shm::livecount::settle(r, o);
                }
                ctrl.compare_exchange(c, released(c), Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            });
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn versions_and_owners() {
        let w = AtomicU64::new(0);
        let me = &Holder::new(crate::shm::attach::Token(0x5a5a5));
        let begin = read_begin(&w);
        let locked = try_lock(&w, begin, me).unwrap();
        assert!(is_writing(w.load(Ordering::Relaxed)));
        assert_eq!(owner(locked), me.token.short());
        assert!(
            try_lock(&w, locked, me).is_none(),
            "cannot lock a WRITING word"
        );
        assert!(
            read_validate(&w, begin),
            "locking alone does not invalidate readers"
        );
        unlock(&w, locked, me);
        let after = w.load(Ordering::Relaxed);
        assert!(!is_writing(after));
        assert!(!read_validate(&w, begin), "a release invalidates readers");
        assert!(
            try_lock(&w, begin, me).is_none(),
            "a stale version cannot lock"
        );
        assert_eq!(after >> VERSION_SHIFT, 1);
    }
}
