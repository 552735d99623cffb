//! The write gate: how `check()` pauses writers to repair a live segment.
//!
//! Every write operation (insert, update, remove) runs *inside the gate*: it
//! increments its handle's in-flight count in the attach table
//! (`attach::E_ACTIVE`), then reads the gate word; if the gate is open it
//! proceeds and decrements the count when done. `check()` closes the gate
//! (a lock word, `H_GATE`) and waits until every *live* handle's count is
//! zero. From then until it reopens the gate, no live process is between
//! taking an arena block and publishing it, or between retiring a block and
//! freeing it, or inside a new-key insert or a removal: whatever is
//! unaccounted for then was left by a dead process, and can be reclaimed.
//!
//! The handshake is Dekker's: the writer's increment and the checker's
//! close are each followed by a SeqCst fence and then a read of the other
//! side's word, so at least one of them sees the other. A writer that sees the gate closed
//! undoes its increment and waits for the gate to open (taking it over from
//! a dead checker, as for any lock word). A checker whose wait exceeds its
//! budget (one budget for all the handles it waits for, not one per handle;
//! see [`close`]) gives up and reopens the gate, reporting that it repaired
//! nothing.
//!
//! User code never runs inside the gate: `update` runs its closure (and the
//! tuple space its predicates) before the write enters the gate, and enters
//! it only to take a block and publish it. So the time a live handle spends
//! inside is the library's own work (and waiting for slots and locks of
//! other writers), never a slow or blocked closure.
//!
//! Readers never enter the gate: `check()` never stops them.

use crate::shm::attach::{self, Holder, E_ACTIVE};
use crate::shm::layout::{ATTACH_ENTRIES, H_GATE};
use crate::shm::lockword::{self, Backoff};
use crate::shm::region::Region;
use crate::sync::{fence, AtomicU64, Ordering};

/// A write operation in flight: leaves the gate when dropped.
#[derive(Debug)]
pub(crate) struct InFlight<'a> {
    active: Option<&'a AtomicU64>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(a) = self.active {
            // Release: everything this operation wrote happens before a
            // checker's Acquire load that sees the count drop.
            a.fetch_sub(1, Ordering::Release);
        }
    }
}

/// Enters the gate for one write operation of the handle at `index`.
///
/// If the segment's words are out of bounds (impossible for a validated
/// geometry), the operation proceeds without the gate.
pub(crate) fn enter<'a>(r: &'a Region, index: u64, me: &Holder) -> InFlight<'a> {
    let (Some(active), Some(gate)) = (r.word(attach::entry_off(index) + E_ACTIVE), r.word(H_GATE))
    else {
        return InFlight { active: None };
    };
    loop {
        // Dekker with `close`: our increment, a SeqCst fence, our read of the
        // gate; its close, a SeqCst fence, its reads of the counts. By the
        // fences' total order, if we read the gate open, the checker's fence
        // came after ours and its read of our count sees the increment.
        // Relaxed: ordered by the fence.
        active.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        // Acquire: besides the fence's ordering, pairs with the Release of
        // the gate's last reopening (`Closed::drop`), so what the closer
        // did (a growth step: `grow.rs`) is visible to this operation.
        let g = gate.load(Ordering::Acquire);
        if g == 0 {
            return InFlight {
                active: Some(active),
            };
        }
        // Release: pairs with the checker's Acquire read of the count.
        active.fetch_sub(1, Ordering::Release);
        let mut backoff = Backoff::new();
        loop {
            // Acquire: pairs with the checker's Release in `open`.
            let seen = gate.load(Ordering::Acquire);
            if seen == 0 || (backoff.snooze() && lockword::clear_if_dead(r, gate, seen, me)) {
                break;
            }
        }
    }
}

/// The gate, closed by this handle: reopens when dropped.
#[derive(Debug)]
pub(crate) struct Closed<'a> {
    gate: &'a AtomicU64,
    me: &'a Holder,
}

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        lockword::unlock(self.gate, self.me);
    }
}

/// Why the gate could not be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Busy {
    /// Another live handle is checking the segment.
    OtherChecker,
    /// A live handle stayed inside a write operation past the bound (a
    /// stopped or very slow process); the handle's attach index.
    Writer(u64),
}

/// Closes the gate and waits until no live handle is inside a write
/// operation, for at most `spins` backoff steps in all: the steps are
/// counted across every handle waited for, so the budget bounds the whole
/// wait, not the wait for each handle.
///
/// `own_index` is the caller's attach index; it must not be inside a write
/// operation itself (other threads of its process may be: they are waited
/// for like any other).
pub(crate) fn close<'a>(
    r: &'a Region,
    me: &'a Holder,
    is_live: impl Fn(u64) -> bool,
    spins: u32,
) -> Result<Closed<'a>, Busy> {
    let gate = r.word(H_GATE).ok_or(Busy::OtherChecker)?;
    if !lockword::try_lock(gate, me) {
        // Acquire: pairs with unlock, as in lockword::lock.
        let seen = gate.load(Ordering::Acquire);
        if !(lockword::clear_if_dead(r, gate, seen, me) && lockword::try_lock(gate, me)) {
            return Err(Busy::OtherChecker);
        }
    }
    let closed = Closed { gate, me };
    // SeqCst: the other half of the Dekker handshake in `enter`: the close
    // (the CAS above) is ordered before the count reads below.
    fence(Ordering::SeqCst);
    let mut backoff = Backoff::new();
    let mut steps = 0;
    for i in 0..ATTACH_ENTRIES {
        let Some(active) = r.word(attach::entry_off(i) + E_ACTIVE) else {
            break;
        };
        // Acquire: pairs with the Release decrement in InFlight::drop, so the
        // finished operation's writes are visible to the repair.
        while active.load(Ordering::Acquire) != 0 {
            if !is_live(i) {
                break; // Died inside an operation: what it held is reclaimed.
            }
            if steps >= spins {
                return Err(Busy::Writer(i));
            }
            backoff.snooze();
            steps += 1;
        }
    }
    Ok(closed)
}
