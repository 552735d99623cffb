//! The exact number of live keys (`ShmDict::len`), also after a kill.
//!
//! A single shared counter cannot be exact across a SIGKILL: a writer that
//! publishes a new key (or empties a slot) and then updates the counter can
//! die between the two, and nobody can tell afterwards whether the counter
//! was updated (issue 10, item 9). So each attach entry keeps its own count,
//! in one word together with a record of the change in flight; applying the
//! change and clearing the record is then a single store, and whoever finds
//! the handle dead can tell from the record and the slot exactly what is
//! left to do.
//!
//! Attach entry words 4 and 5 (see `attach.rs`; word 3 is the lead's, 6..8
//! stay reserved):
//!
//! | word | bits   | meaning                                                 |
//! |------|--------|---------------------------------------------------------|
//! | 4    | 0      | BUSY: a thread of the handle is using the record        |
//! | 4    | 1      | PENDING: word 5 names a slot the handle holds WRITING,  |
//! |      |        | whose change of the count is not applied yet            |
//! | 4    | 2..42  | count: keys added minus keys removed through this entry |
//! |      |        | (all its owners so far), modulo 2^40                    |
//! | 4    | 42..64 | sequence: incremented whenever PENDING is set           |
//! | 5    | 0      | the change: 1 = +1 (a new key), 0 = -1 (a removal)      |
//! | 5    | 1..64  | byte offset of the slot's control word in the segment   |
//!
//! The count is never reset or folded elsewhere: when an entry is claimed
//! again its new owner continues from it. `len()` is the sum of all entries'
//! counts, each corrected by its PENDING change if that change is already
//! published (see [`len`]).
//!
//! A writer that changes the number of keys (a new-key insert, a removal)
//! does, while it holds the slot WRITING:
//!
//! 1. claims the record (BUSY; threads of one handle take turns, for the
//!    few stores below; a BUSY word that no thread of the handle uses, which
//!    only corruption produces, is cleared rather than waited for);
//! 2. writes word 5, then sets PENDING (Release);
//! 3. stores the slot's entry word (the publication);
//! 4. stores count ± 1 with BUSY and PENDING clear: applied and cleared in
//!    one store;
//! 5. releases the slot.
//!
//! Killed before 2: nothing was recorded and nothing published. Killed
//! after 2: the slot is still WRITING by the dead token (only the writer
//! itself releases it in step 5), and its entry word says whether step 3
//! happened: a new key's slot is non-empty, a removal's slot is empty.
//! Killed after 4: nothing is pending. Whoever releases a dead writer's
//! slot ([`settle`], from `seqlock::wait_unlocked` and `check()`), or claims
//! a dead handle's entry ([`adopt`]), first settles the record: applies the
//! change if it was published, drops it otherwise, with one CAS on word 4,
//! so settling twice (two processes finding the same dead writer) applies
//! it once. The sequence number makes a stale settler's CAS fail even if
//! the entry's next owner brings the count back to the same value.
//!
//! Settling relies on the dead writer's stores being visible to whoever
//! found it dead (the liveness test observes the process's exit through the
//! kernel, which orders them), as every other takeover in this crate does.

use crate::shm::attach::{self, Holder, Token};
use crate::shm::layout::{Entry, ATTACH_ENTRIES, H_ATTACH_HWM};
use crate::shm::lockword::Backoff;
use crate::shm::region::Region;
use crate::shm::seqlock;
use crate::sync::{AtomicU64, Ordering};

/// Byte offset, inside an attach entry, of the count word (word 4).
pub(crate) const E_COUNT: u64 = 32;
/// Byte offset, inside an attach entry, of the pending slot word (word 5).
pub(crate) const E_PENDING_SLOT: u64 = 40;

const BUSY: u64 = 1;
const PENDING: u64 = 2;
const COUNT_SHIFT: u32 = 2;
const COUNT_BITS: u32 = 40;
const COUNT_MOD: u64 = 1 << COUNT_BITS;
const COUNT_MASK: u64 = (COUNT_MOD - 1) << COUNT_SHIFT;
const SEQ_ONE: u64 = 1 << (COUNT_SHIFT + COUNT_BITS);
const _: () = assert!(crate::shm::layout::MAX_CAPACITY < COUNT_MOD / 2);

fn count(l: u64) -> u64 {
    (l & COUNT_MASK) >> COUNT_SHIFT
}

/// `l` with BUSY and PENDING clear and the count moved by `delta` (±1 or 0).
fn settled(l: u64, delta: i64) -> u64 {
    let c = count(l).wrapping_add(delta as u64) & (COUNT_MOD - 1);
    (l & !(COUNT_MASK | BUSY | PENDING)) | c << COUNT_SHIFT
}

/// The change a record names: +1 for a new key, -1 for a removal.
fn delta_of(slot_word: u64) -> i64 {
    if slot_word & 1 == 1 {
        1
    } else {
        -1
    }
}

/// The count record of one attach entry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Record<'a> {
    word: &'a AtomicU64,
    slot: &'a AtomicU64,
}

/// A change recorded by [`Record::begin`], applied by [`Record::finish`].
#[derive(Debug)]
#[must_use]
pub(crate) struct Pending {
    word: u64,
    delta: i64,
}

impl<'a> Record<'a> {
    /// The record of attach entry `index` (`None` only for an index outside
    /// the table, which a validated token never has).
    pub(crate) fn of(r: &'a Region, index: u64) -> Option<Record<'a>> {
        if index >= ATTACH_ENTRIES {
            return None;
        }
        let off = attach::entry_off(index);
        Some(Record {
            word: r.word(off + E_COUNT)?,
            slot: r.word(off + E_PENDING_SLOT)?,
        })
    }

    /// Steps 1 and 2: records that the slot whose control word is at byte
    /// `ctrl_off` (held WRITING by `me`) is about to gain a key (`insert`)
    /// or lose one.
    pub(crate) fn begin(&self, ctrl_off: u64, insert: bool, me: &Holder) -> Pending {
        // AcqRel (Release half): ordered before our CAS that sets BUSY, so a
        // thread of ours that sees BUSY and then reads this count sees us.
        me.record_users.fetch_add(1, Ordering::AcqRel);
        let mut backoff = Backoff::new();
        let mut l;
        loop {
            // Acquire: pairs with the AcqRel claim and the Release `finish`
            // of other threads of this handle.
            l = self.word.load(Ordering::Acquire);
            if l & (BUSY | PENDING) == 0 {
                // AcqRel: Release orders our `record_users` increment before
                // BUSY (see above); Acquire continues from the count that the
                // previous `finish` stored.
                if self
                    .word
                    .compare_exchange_weak(l, l | BUSY, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    break;
                }
                continue;
            }
            // Another thread of this handle is between its begin and finish
            // (a few stores, with no waiting), or the word is corrupted: if
            // no other thread of ours uses the record, it is the latter, and
            // is cleared (nothing of ours is pending). Acquire: pairs with
            // the AcqRel increments of those threads.
            if backoff.snooze() && me.record_users.load(Ordering::Acquire) == 1 {
                // AcqRel: as the claim above; fails if the word moved.
                let _ = self.word.compare_exchange(
                    l,
                    settled(l, 0),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
            }
        }
        // Relaxed: published by the Release store of PENDING below.
        self.slot
            .store(ctrl_off << 1 | u64::from(insert), Ordering::Relaxed);
        let word = l.wrapping_add(SEQ_ONE) | BUSY | PENDING;
        // Release: pairs with the Acquire load of word 4 in `len`, `settle`
        // and `adopt`: whoever sees PENDING sees word 5.
        self.word.store(word, Ordering::Release);
        Pending {
            word,
            delta: if insert { 1 } else { -1 },
        }
    }

    /// Step 4, after the entry word was stored: applies the change and
    /// clears the record in one store.
    pub(crate) fn finish(&self, p: Pending, me: &Holder) {
        // Release: pairs with the Acquire loads of `len` (which then no
        // longer adds the change itself) and of the next `begin`. A plain
        // store suffices: while PENDING is set only this thread changes the
        // word (settlers act only for a dead handle).
        self.word.store(settled(p.word, p.delta), Ordering::Release);
        // AcqRel: after the store above, as `Holder::end_hold`.
        me.record_users.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether the change a record names is published in its slot: the entry
/// word is non-empty after a new key, empty after a removal.
fn published(r: &Region, slot_word: u64) -> Option<bool> {
    let entry = r.word((slot_word >> 1) + 8)?;
    // Acquire: pairs with the Release entry store of the writer.
    let e = entry.load(Ordering::Acquire);
    Some((e != Entry::EMPTY) == (slot_word & 1 == 1))
}

/// A slot of an index table that growth replaced (`grow.rs`) has its
/// control word overwritten with `MOVED` by the seal, whoever held it. A
/// pending record can name such a slot only if its writer died holding the
/// slot before the growth step (live writers finish before it, and whoever
/// released a dead writer's slot settled its record first), and the slot's
/// entry word is never written again: so a record naming a `MOVED` slot is
/// the dead writer's, and the entry word says whether its change was
/// published. (Seen in `tests/growth.rs` `sigkill_during_growth`: the
/// record of a writer killed mid-insert was never settled once its slot
/// was sealed, and `len()` stayed one short.)
const MOVED: u64 = crate::shm::grow::MOVED;

/// The control word a record names.
fn ctrl_of(r: &Region, slot_word: u64) -> Option<&AtomicU64> {
    r.word(slot_word >> 1)
}

/// Settles the pending change of `dead`, a handle found dead, before the
/// caller releases a slot it left WRITING. Only a record that names a slot
/// still WRITING by `dead` is settled (otherwise the entry may have a new
/// owner whose record this is). Idempotent.
pub(crate) fn settle(r: &Region, dead: u64) {
    let Some(rec) = Record::of(r, attach::short_index(dead)) else {
        return;
    };
    // Acquire: pairs with the Release store of PENDING in `begin`.
    let l = rec.word.load(Ordering::Acquire);
    if l & PENDING == 0 {
        return;
    }
    let s = rec.slot.load(Ordering::Relaxed); // Relaxed: ordered by the Acquire above.
    let Some(ctrl) = ctrl_of(r, s) else {
        return;
    };
    // Acquire: as seqlock::read_begin.
    let c = ctrl.load(Ordering::Acquire);
    if !(c == MOVED || (seqlock::is_writing(c) && seqlock::owner(c) == dead)) {
        return;
    }
    let Some(done) = published(r, s) else {
        return;
    };
    let delta = if done { delta_of(s) } else { 0 };
    // AcqRel: pairs with other settlers' CAS; fails if the record changed
    // since we read it (settled already), so the change is applied once.
    let _ = rec
        .word
        .compare_exchange(l, settled(l, delta), Ordering::AcqRel, Ordering::Relaxed);
}

/// Records that entry `index` may hold a key count from now on (see
/// [`len`]). Call when a dictionary handle claims the entry, before its
/// first write.
pub(crate) fn note_entry(r: &Region, index: u64) {
    if let Some(w) = r.word(H_ATTACH_HWM) {
        // SeqCst: pairs with the SeqCst load in `len`.
        w.fetch_max(index + 1, Ordering::SeqCst);
    }
}

/// Settles whatever a dead previous owner left in the record of entry
/// `index`, which `me` has just claimed and not used yet. Returns whether
/// there was anything to settle.
pub(crate) fn adopt(r: &Region, index: u64, me: Token) -> bool {
    let Some(rec) = Record::of(r, index) else {
        return false;
    };
    // Acquire: as in `settle`.
    let l = rec.word.load(Ordering::Acquire);
    if l & (BUSY | PENDING) == 0 {
        return false;
    }
    let mut delta = 0;
    if l & PENDING != 0 {
        let s = rec.slot.load(Ordering::Relaxed); // Relaxed: as in `settle`.
                                                  // Acquire: as seqlock::read_begin.
        let c = ctrl_of(r, s).map_or(0, |w| w.load(Ordering::Acquire));
        let owner = seqlock::owner(c);
        // Any token of this entry but ours is a dead previous owner's. If
        // the slot was released meanwhile, its releaser settled the record
        // first (and our CAS below fails), or the record is stale: dropped.
        if (c == MOVED
            || (seqlock::is_writing(c)
                && attach::short_index(owner) == index
                && owner != me.short()))
            && published(r, s) == Some(true)
        {
            delta = delta_of(s);
        }
    }
    // AcqRel: as in `settle`.
    rec.word
        .compare_exchange(l, settled(l, delta), Ordering::AcqRel, Ordering::Relaxed)
        .is_ok()
}

/// Settles the records of every handle while no live handle is inside a
/// write operation (`check()`, gate closed): any record in use belongs to a
/// dead handle. Call before releasing slots left WRITING. Returns how many
/// records were settled.
pub(crate) fn settle_all_dead(r: &Region) -> u64 {
    let mut n = 0;
    for i in 0..ATTACH_ENTRIES {
        let Some(rec) = Record::of(r, i) else { break };
        // Acquire: as in `settle`.
        let l = rec.word.load(Ordering::Acquire);
        if l & (BUSY | PENDING) == 0 {
            continue;
        }
        let mut delta = 0;
        if l & PENDING != 0 {
            let s = rec.slot.load(Ordering::Relaxed); // Relaxed: as in `settle`.
                                                      // Acquire: as seqlock::read_begin.
            let c = ctrl_of(r, s).map_or(0, |w| w.load(Ordering::Acquire));
            if (c == MOVED
                || (seqlock::is_writing(c) && attach::short_index(seqlock::owner(c)) == i))
                && published(r, s) == Some(true)
            {
                delta = delta_of(s);
            }
        }
        // AcqRel: as in `settle`.
        if rec
            .word
            .compare_exchange(l, settled(l, delta), Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            n += 1;
        }
    }
    n
}

/// The number of live keys: the sum of every entry's count, each with its
/// pending change added if that change is already published.
///
/// Exact whenever no write is in flight, including right after any number
/// of writers were killed at any instruction (nothing needs to run first).
/// While writes run concurrently it is a value the count passed through or
/// is about to: each change is counted from the moment its entry word is
/// stored. Reads 4,096 entries (a few microseconds).
pub(crate) fn len(r: &Region) -> u64 {
    let mut sum = 0u64;
    // SeqCst: pairs with the SeqCst `fetch_max` of `note_entry`, which a
    // handle makes before its first write: a count changed by a write that
    // completed before this call lies below the mark read here.
    let hwm = r
        .word(H_ATTACH_HWM)
        .map_or(ATTACH_ENTRIES, |w| w.load(Ordering::SeqCst))
        .min(ATTACH_ENTRIES);
    for i in 0..hwm {
        let Some(rec) = Record::of(r, i) else { break };
        // Acquire: pairs with the Release stores of `begin` and `finish`.
        let l = rec.word.load(Ordering::Acquire);
        sum = sum.wrapping_add(count(l));
        if l & PENDING != 0 {
            let s = rec.slot.load(Ordering::Relaxed); // Relaxed: ordered by the Acquire above.
            if published(r, s) == Some(true) {
                sum = sum.wrapping_add(delta_of(s) as u64);
            }
        }
    }
    let sum = sum & (COUNT_MOD - 1);
    // A transiently negative sum (a removal counted before the insert it
    // undoes, read in another entry) reads as 0.
    if sum >= COUNT_MOD / 2 {
        0
    } else {
        sum
    }
}

#[cfg(loom)]
loom::thread_local! {
    /// The step at which the current model thread's "process" is killed
    /// (0: never); see [`killed_at`].
    static KILL_AT: std::cell::Cell<u32> = std::cell::Cell::new(0);
}

/// Loom models only: makes the current thread's writes stop at step `step`
/// of a counted store (see [`killed_at`]).
#[cfg(loom)]
pub(crate) fn kill_at(step: u32) {
    KILL_AT.with(|k| k.set(step));
}

/// Loom models only: whether the current thread's "process" is dead at
/// kill point `n`. Kill points along a new-key insert or a removal: 1
/// before the record is begun, 2 after it, 3 after the entry word is
/// stored, 4 after the record is finished (before the slot is released).
/// Once a thread is killed, every later kill point reports it dead, and the
/// code under test returns at once without another shared write.
#[cfg(loom)]
pub(crate) fn killed_at(n: u32) -> bool {
    KILL_AT.with(|k| k.get() != 0 && k.get() <= n)
}
