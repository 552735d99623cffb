//! Borrowed reads: a cross-process epoch, pin slots, and retired blocks that
//! wait in shared memory until no pinned reader can see them.
//!
//! Published blocks are immutable (copy-on-write), so a reader that holds a
//! block's bytes only needs the block not to be *recycled* while it holds
//! them. This module is the reclamation that waits for such readers: the
//! epoch scheme of crossbeam-epoch (Fraser's), laid out in the segment so
//! that its state survives any process.
//!
//! - **Epoch.** One global word (`H_EPOCH`), only ever increased.
//! - **Pins.** Each attach entry has a stash (`layout::STASH_OFF`) with
//!   [`PIN_SLOTS`] pin words, each on its own cache line: `epoch << 16 |
//!   count`. A reader claims a slot whose count is 0 with the current epoch,
//!   or joins a busy slot (count + 1, keeping its older epoch: a
//!   conservative pin), then issues a SeqCst fence before it reads the
//!   index. Unpinning decrements the count (Release).
//! - **Advance.** The epoch moves from `e` to `e + 1` only if every pin
//!   slot with a count, in every *live* entry, says `e`. Entries whose owner
//!   is dead are skipped: the kernel-kept liveness of `attach.rs` (OFD
//!   locks) decides that, never a timeout, so a stopped reader holds memory
//!   back (writers may get `Full`) but never loses its bytes.
//! - **Retire.** A writer that unpublished a block (overwrite, removal)
//!   issues a SeqCst fence, reads the epoch `s`, and records `(block, s)`
//!   in its own stash: a ring of [`RING_RECORDS`] records, and, when the ring
//!   is full and cannot be emptied, a chain of *spill bags* (arena blocks of
//!   order [`SPILL_ORDER`] listing retired blocks under one epoch). A block
//!   retired at `s` is freed once the epoch is `s + 2` or more: any reader
//!   that could have loaded it was pinned at `s` or earlier (its fence
//!   precedes the writer's in the SeqCst order, or it would have seen the
//!   unpublished slot), and the epoch cannot pass `p + 1` while a reader is
//!   pinned at `p`.
//! - **Ownership.** A stash belongs to its attach entry and survives its
//!   owner: a lock word (owner-tagged, `lockword.rs`) guards it, so the
//!   owner's threads, and any writer that needs room (`reclaim_everywhere`,
//!   before reporting `Full`), can free what it holds; a dead holder's lock
//!   is taken over. The next claimant of the entry resets its pin slots
//!   (`reset_pins`) and inherits its retired blocks.
//!
//! Stash layout (byte offsets inside a stash of `STASH_BYTES`):
//!
//! | bytes        | contents                                              |
//! |--------------|-------------------------------------------------------|
//! | 0            | lock word                                             |
//! | 8            | bytes of blocks retired and not yet freed             |
//! | 16           | newest spill bag: granule + 1 (0 = none)              |
//! | 24           | spare spill bag, taken ahead of need: granule + 1     |
//! | 32           | records in the ring                                   |
//! | 64 + 64 * i  | pin slot `i`: pin word, then the pin's start (ms)     |
//! | `S_RING`..   | ring records: block entry word, retire epoch          |
//!
//! A spill bag: word 0 the next (older) bag's granule + 1, word 1 its epoch
//! (the newest of its records' and of the next bag's: never older than the
//! next bag's), word 2 its count, words 3.. block entries.

use crate::shm::attach::Holder;
use crate::shm::layout::{
    Entry, Geometry, ATTACH_ENTRIES, GRANULE, H_ATTACH_HWM, H_EPOCH, STASH_BYTES, STASH_OFF,
};
use crate::shm::lockword::{self, Backoff};
use crate::shm::region::Region;
use crate::shm::slab::{Corrupt, Slab};
use crate::sync::{fence, AtomicU64, Ordering};

/// Pin slots per stash.
#[cfg(not(loom))]
pub(crate) const PIN_SLOTS: u64 = 4;
#[cfg(loom)]
pub(crate) const PIN_SLOTS: u64 = 2;
/// Records in a stash's ring.
#[cfg(not(loom))]
pub(crate) const RING_RECORDS: u64 = 44;
#[cfg(loom)]
pub(crate) const RING_RECORDS: u64 = 1;
/// Order of a spill bag: 512 bytes (61 records), or under loom 64 (5).
#[cfg(not(loom))]
pub(crate) const SPILL_ORDER: u32 = 3;
#[cfg(loom)]
pub(crate) const SPILL_ORDER: u32 = 0;

const S_LOCK: u64 = 0;
const S_RETIRED_BYTES: u64 = 8;
const S_SPILL: u64 = 16;
const S_SPARE: u64 = 24;
const S_RING_LEN: u64 = 32;
const S_PINS: u64 = 64;
const PIN_BYTES: u64 = 64;
const S_RING: u64 = S_PINS + PIN_SLOTS * PIN_BYTES;
const RECORD_BYTES: u64 = 16;
const _: () = assert!(S_RING + RING_RECORDS * RECORD_BYTES <= STASH_BYTES);

/// Pins a slot can count (the low 16 bits of its word).
const COUNT_MASK: u64 = 0xffff;
/// Words of a spill bag before its entries.
const BAG_HEADER_WORDS: u64 = 3;
/// Granule index + 1 fits in 32 bits (`layout::Geometry`).
const LINK_MASK: u64 = 0xffff_ffff;

fn pin_count(v: u64) -> u64 {
    v & COUNT_MASK
}

fn pin_epoch(v: u64) -> u64 {
    v >> 16
}

/// A pin held on slot `slot` of stash `stash`: what [`Epochs::unpin`]
/// releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pin {
    pub(crate) stash: u64,
    pub(crate) slot: u64,
}

/// What the stashes hold back, for `stats()` and `check()`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Held {
    /// Pins in live entries, and the start (ms, `now_ms`) of the oldest.
    pub(crate) pins: u64,
    pub(crate) oldest_pin_since_ms: Option<u64>,
    /// Bytes of retired blocks not yet freed, and of the bags listing them.
    pub(crate) retired_bytes: u64,
    /// The global epoch.
    pub(crate) epoch: u64,
}

/// The epoch machinery of one segment.
#[derive(Clone, Copy)]
pub(crate) struct Epochs<'a> {
    r: &'a Region,
    g: &'a Geometry,
}

/// Milliseconds of `CLOCK_MONOTONIC` (the same clock in every process of
/// the machine): when a pin started, for the oldest pin's age.
#[cfg(not(loom))]
pub(crate) fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC_COARSE
    // always exists on Linux (vDSO, no system call).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

#[cfg(loom)]
pub(crate) fn now_ms() -> u64 {
    0
}

impl<'a> Epochs<'a> {
    pub(crate) fn new(r: &'a Region, g: &'a Geometry) -> Epochs<'a> {
        Epochs { r, g }
    }

    fn word(&self, off: u64) -> Result<&'a AtomicU64, Corrupt> {
        self.r.word(off).ok_or(Corrupt("stash outside the segment"))
    }

    fn global(&self) -> Result<&'a AtomicU64, Corrupt> {
        self.word(H_EPOCH)
    }

    fn stash(&self, stash: u64, field: u64) -> Result<&'a AtomicU64, Corrupt> {
        if stash >= ATTACH_ENTRIES {
            return Err(Corrupt("stash index out of range"));
        }
        self.word(STASH_OFF + stash * STASH_BYTES + field)
    }

    fn pin_word(&self, stash: u64, slot: u64) -> Result<&'a AtomicU64, Corrupt> {
        self.stash(stash, S_PINS + (slot % PIN_SLOTS) * PIN_BYTES)
    }

    fn pin_since(&self, stash: u64, slot: u64) -> Result<&'a AtomicU64, Corrupt> {
        self.stash(stash, S_PINS + (slot % PIN_SLOTS) * PIN_BYTES + 8)
    }

    /// Entries that may be in use: `0..hwm` (see `livecount.rs`).
    fn hwm(&self) -> u64 {
        self.r
            .word(H_ATTACH_HWM)
            // Relaxed: an entry claimed after this read pins (and retires)
            // after the caller's fence, so it cannot hold what we decide on.
            .map_or(ATTACH_ENTRIES, |w| w.load(Ordering::Relaxed))
            .min(ATTACH_ENTRIES)
    }

    /// Pins the stash of entry `stash` (this handle's own), preferring slot
    /// `hint`. Until [`Epochs::unpin`], no block this reader can reach from
    /// the index afterwards is recycled.
    pub(crate) fn pin(&self, stash: u64, hint: u64) -> Result<Pin, Corrupt> {
        // Relaxed: a stale epoch only makes the pin older (conservative);
        // the SeqCst fence below orders the pin before the reads.
        let epoch = self.global()?.load(Ordering::Relaxed);
        let mut pinned = None;
        for k in 0..PIN_SLOTS {
            let slot = (hint + k) % PIN_SLOTS;
            let w = self.pin_word(stash, slot)?;
            let v = w.load(Ordering::Relaxed); // Relaxed: the CAS decides.
            if pin_count(v) == 0
                // Relaxed: the fence below publishes the pin.
                && w.compare_exchange(v, epoch << 16 | 1, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                // Relaxed: a statistic (the oldest pin's age).
                self.pin_since(stash, slot)?
                    .store(now_ms(), Ordering::Relaxed);
                pinned = Some(slot);
                break;
            }
        }
        let slot = match pinned {
            Some(slot) => slot,
            None => self.join(stash, hint)?,
        };
        // SeqCst: orders the pin before every read of the index that
        // follows; pairs with the SeqCst fences of `try_advance` (which
        // then sees the pin) and of `retire` (see the module docs).
        fence(Ordering::SeqCst);
        Ok(Pin { stash, slot })
    }

    /// Every slot is busy: joins one (its count + 1, its epoch kept).
    #[cold]
    fn join(&self, stash: u64, hint: u64) -> Result<u64, Corrupt> {
        let epoch = self.global()?.load(Ordering::Relaxed); // Relaxed: as in `pin`.
        let mut k = 0;
        loop {
            let slot = (hint + k) % PIN_SLOTS;
            let w = self.pin_word(stash, slot)?;
            let v = w.load(Ordering::Relaxed); // Relaxed: the CAS decides.
            let new = match pin_count(v) {
                0 => epoch << 16 | 1,
                COUNT_MASK => {
                    k += 1;
                    crate::sync::spin_hint();
                    continue;
                }
                _ => v + 1,
            };
            // Relaxed: published by the caller's fence.
            if w.compare_exchange(v, new, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                if pin_count(v) == 0 {
                    // Relaxed: a statistic.
                    self.pin_since(stash, slot)?
                        .store(now_ms(), Ordering::Relaxed);
                }
                return Ok(slot);
            }
        }
    }

    /// Releases a pin taken by [`Epochs::pin`].
    pub(crate) fn unpin(&self, pin: Pin) {
        if let Ok(w) = self.pin_word(pin.stash, pin.slot) {
            // Release: the reads made under the pin happen before an advance
            // that sees it gone (its Acquire fence), hence before any reuse
            // of what they read. A CAS loop, not fetch_sub: a count of 0
            // (a corrupted or reset slot) stays 0.
            let mut v = w.load(Ordering::Relaxed);
            while pin_count(v) > 0 {
                match w.compare_exchange_weak(v, v - 1, Ordering::Release, Ordering::Relaxed) {
                    Ok(_) => return,
                    Err(seen) => v = seen,
                }
            }
        }
    }

    /// Clears the pin slots of entry `stash`, whose previous owner is gone
    /// (called by the entry's new owner before it uses it).
    pub(crate) fn reset_pins(&self, stash: u64) {
        for slot in 0..PIN_SLOTS {
            if let Ok(w) = self.pin_word(stash, slot) {
                // Release: pairs with an advance's Acquire fence, as unpin.
                w.store(0, Ordering::Release);
            }
        }
    }

    /// Moves the epoch forward by one if every live pin is at the current
    /// epoch. `alive(i)`: whether entry `i`'s owner lives (pins of dead
    /// entries are ignored). Returns whether the epoch moved (here or by
    /// another process meanwhile).
    pub(crate) fn try_advance(&self, alive: &dyn Fn(u64) -> bool) -> Result<bool, Corrupt> {
        let global = self.global()?;
        // Relaxed: the CAS below fails if it changed.
        let epoch = global.load(Ordering::Relaxed);
        // SeqCst: pairs with the fence of `pin`: a pin whose fence comes
        // later in the SeqCst order reads the index after ours, and so
        // after every unpublication that preceded our caller's retire.
        fence(Ordering::SeqCst);
        for i in 0..self.hwm() {
            let mut blocked = false;
            for slot in 0..PIN_SLOTS {
                let v = self.pin_word(i, slot)?.load(Ordering::Relaxed); // Relaxed: after the fence.
                if pin_count(v) > 0 && pin_epoch(v) != epoch {
                    blocked = true;
                    break;
                }
            }
            if blocked && alive(i) {
                return Ok(false);
            }
        }
        // Acquire: pairs with the Release unpins we read, so the reads made
        // under those pins happen before whatever follows the advance.
        fence(Ordering::Acquire);
        // Release: pairs with the Acquire load in `reclaim_locked`.
        Ok(global
            .compare_exchange(epoch, epoch + 1, Ordering::Release, Ordering::Relaxed)
            .is_ok()
            || global.load(Ordering::Relaxed) != epoch)
    }

    /// Makes sure stash `stash` has a spare spill bag, so that a retire
    /// after the caller publishes never needs new memory. `Ok(false)`: the
    /// arena has no room for one (the caller reports `Full` before it
    /// publishes anything).
    ///
    /// A spare is only taken once the ring is half full: the other half is
    /// room for the retires of threads of this handle between their check
    /// and their retire. (Taking one for every handle at once would cost
    /// a tiny arena its room: 200 handles would hold 100 KiB of bags.)
    ///
    /// Before taking a spare, the ring is emptied of what no pin can see
    /// (moving the epoch if it can): without borrowed readers, no bag is
    /// ever taken, so a tight arena keeps all its room for values.
    #[inline]
    pub(crate) fn ensure_spare(
        &self,
        stash: u64,
        me: &Holder,
        alive: &dyn Fn(u64) -> bool,
    ) -> Result<bool, Corrupt> {
        // Relaxed (both): only this stash's owner consumes the spare or
        // fills the ring; a stale value at worst means one retire finds no
        // spare later (handled there).
        if self.stash(stash, S_RING_LEN)?.load(Ordering::Relaxed) < RING_RECORDS.div_ceil(2)
            || self.stash(stash, S_SPARE)?.load(Ordering::Relaxed) != 0
        {
            return Ok(true);
        }
        self.ensure_spare_slow(stash, me, alive)
    }

    /// A handle detaches: its spare bag goes back to the arena, and what
    /// its stash holds that no pin can see is freed. The rest waits for
    /// the entry's next owner or any writer short of room.
    pub(crate) fn release_stash(&self, stash: u64, me: &Holder, alive: &dyn Fn(u64) -> bool) {
        let Ok(lock) = self.stash(stash, S_LOCK) else {
            return;
        };
        let _ = self.try_advance(alive);
        lockword::lock(self.r, lock, me);
        if let Ok(spare) = self.stash(stash, S_SPARE) {
            // Relaxed: under the stash lock.
            let s = spare.load(Ordering::Relaxed);
            if s != 0 {
                spare.store(0, Ordering::Relaxed);
                Slab::new(self.r, self.g).free(s - 1, SPILL_ORDER, me);
                let _ = self.add_bytes(stash, GRANULE << SPILL_ORDER, false);
            }
        }
        let _ = self.reclaim_locked(stash, me);
        lockword::unlock(lock, me);
    }

    #[cold]
    fn ensure_spare_slow(
        &self,
        stash: u64,
        me: &Holder,
        alive: &dyn Fn(u64) -> bool,
    ) -> Result<bool, Corrupt> {
        self.try_advance(alive)?;
        let lock = self.stash(stash, S_LOCK)?;
        lockword::lock(self.r, lock, me);
        let reclaimed = self.reclaim_locked(stash, me);
        lockword::unlock(lock, me);
        reclaimed?;
        // Relaxed: as in `ensure_spare`.
        if self.stash(stash, S_RING_LEN)?.load(Ordering::Relaxed) < RING_RECORDS.div_ceil(2) {
            return Ok(true);
        }
        let slab = Slab::new(self.r, self.g);
        let Some(bag) = slab.alloc(SPILL_ORDER, me)? else {
            return Ok(false);
        };
        let lock = self.stash(stash, S_LOCK)?;
        lockword::lock(self.r, lock, me);
        let spare = self.stash(stash, S_SPARE)?;
        // Relaxed: under the stash lock.
        if spare.load(Ordering::Relaxed) == 0 {
            spare.store(bag + 1, Ordering::Relaxed);
            self.add_bytes(stash, GRANULE << SPILL_ORDER, true)?;
        } else {
            slab.free(bag, SPILL_ORDER, me);
        }
        lockword::unlock(lock, me);
        Ok(true)
    }

    /// Records that the block of `e`, just unpublished by the caller, is
    /// retired: it is freed once no pinned reader can see it. Never fails
    /// for want of memory if [`Epochs::ensure_spare`] succeeded before the
    /// unpublication (if two threads of one handle raced for the spare and
    /// the arena is full, the block is leaked until `check()`).
    pub(crate) fn retire(
        &self,
        stash: u64,
        e: Entry,
        me: &Holder,
        alive: &dyn Fn(u64) -> bool,
    ) -> Result<(), Corrupt> {
        // SeqCst: orders the unpublication (the slot's Release unlock,
        // before this) before reading the epoch; pairs with the fence of
        // `pin` (see the module docs).
        fence(Ordering::SeqCst);
        let epoch = self.global()?.load(Ordering::Relaxed); // Relaxed: after the fence.
        let lock = self.stash(stash, S_LOCK)?;
        lockword::lock(self.r, lock, me);
        let r = self.retire_locked(stash, e, epoch, me, alive);
        lockword::unlock(lock, me);
        r
    }

    fn retire_locked(
        &self,
        stash: u64,
        e: Entry,
        epoch: u64,
        me: &Holder,
        alive: &dyn Fn(u64) -> bool,
    ) -> Result<(), Corrupt> {
        let len_w = self.stash(stash, S_RING_LEN)?;
        // Relaxed (all stash words): under the stash lock, whose Acquire and
        // Release order them between holders.
        let mut len = len_w.load(Ordering::Relaxed).min(RING_RECORDS);
        if len == RING_RECORDS {
            // The ring is full: move the epoch if nobody stands in the way,
            // free what that allows, and spill the rest into a bag.
            self.try_advance(alive)?;
            self.reclaim_locked(stash, me)?;
            len = len_w.load(Ordering::Relaxed).min(RING_RECORDS);
            if len == RING_RECORDS {
                self.spill(stash, me)?;
                len = 0;
            }
        }
        let rec = S_RING + len * RECORD_BYTES;
        self.stash(stash, rec)?.store(e.0, Ordering::Relaxed);
        self.stash(stash, rec + 8)?.store(epoch, Ordering::Relaxed);
        len_w.store(len + 1, Ordering::Relaxed);
        self.add_bytes(stash, GRANULE << e.order(), true)
    }

    /// Adds to (or takes from) the stash's count of bytes held back:
    /// retired blocks and the bags that list them. Under the stash lock.
    fn add_bytes(&self, stash: u64, n: u64, add: bool) -> Result<(), Corrupt> {
        let bytes = self.stash(stash, S_RETIRED_BYTES)?;
        // Relaxed: under the stash lock.
        let v = bytes.load(Ordering::Relaxed);
        let v = if add {
            v.saturating_add(n)
        } else {
            v.saturating_sub(n)
        };
        bytes.store(v, Ordering::Relaxed);
        Ok(())
    }

    /// Moves the ring's records into a spill bag (the spare, or a new
    /// block) at the head of the chain, emptying the ring.
    ///
    /// Crash safety, here and in every change of a stash: a block is never
    /// listed twice, even for an instant, since a holder killed then would
    /// leave it to be freed twice. Records are removed from where they were
    /// *before* they appear elsewhere; a holder killed in between leaks
    /// them, and `check()` reclaims leaked blocks.
    fn spill(&self, stash: u64, me: &Holder) -> Result<(), Corrupt> {
        let slab = Slab::new(self.r, self.g);
        let spare = self.stash(stash, S_SPARE)?;
        let bag = match spare.load(Ordering::Relaxed) {
            0 => match slab.alloc(SPILL_ORDER, me)? {
                Some(g) => {
                    self.add_bytes(stash, GRANULE << SPILL_ORDER, true)?;
                    g
                }
                // No spare (two threads of this handle raced for it) and no
                // room: the oldest ring record's block is leaked (`check()`
                // reclaims it) so that the retire can proceed.
                None => return self.drop_oldest(stash),
            },
            s => {
                spare.store(0, Ordering::Relaxed);
                s - 1
            }
        };
        let words = slab
            .block(bag, SPILL_ORDER)
            .ok_or(Corrupt("spill bag outside the arena"))?;
        let mut newest = 0;
        let n = RING_RECORDS.min(words.len() as u64 - BAG_HEADER_WORDS);
        for i in 0..n {
            let rec = S_RING + i * RECORD_BYTES;
            let e = self.stash(stash, rec)?.load(Ordering::Relaxed);
            newest = newest.max(self.stash(stash, rec + 8)?.load(Ordering::Relaxed));
            // Relaxed: the bag is ours until linked (under the lock).
            words[(BAG_HEADER_WORDS + i) as usize].store(e, Ordering::Relaxed);
        }
        let head = self.stash(stash, S_SPILL)?;
        let next = head.load(Ordering::Relaxed) & LINK_MASK;
        // A bag's epoch is never older than the next bag's, so that
        // `reclaim_locked` may cut the chain at the first bag old enough.
        // Its records alone do not ensure it: a thread reads the epoch
        // before it takes the lock (`retire`), so a ring can fill with
        // records older than a bag spilled before them.
        if next != 0 {
            let older = slab
                .block(next - 1, SPILL_ORDER)
                .ok_or(Corrupt("spill bag outside the arena"))?;
            newest = newest.max(older[1].load(Ordering::Relaxed));
        }
        words[0].store(next, Ordering::Relaxed);
        words[1].store(newest, Ordering::Relaxed);
        words[2].store(n, Ordering::Relaxed);
        // The ring is emptied before the bag is linked (see above).
        self.stash(stash, S_RING_LEN)?.store(0, Ordering::Relaxed);
        head.store(bag + 1, Ordering::Relaxed);
        Ok(())
    }

    /// The ring is full and nothing can take its records: forget the
    /// oldest (leaked until `check()`): the newest moves into its place,
    /// after the ring is shortened (so it is never listed twice).
    #[cold]
    fn drop_oldest(&self, stash: u64) -> Result<(), Corrupt> {
        let first = self.stash(stash, S_RING)?;
        let e0 = Entry(first.load(Ordering::Relaxed));
        let last = S_RING + (RING_RECORDS - 1) * RECORD_BYTES;
        let (e, s) = (
            self.stash(stash, last)?.load(Ordering::Relaxed),
            self.stash(stash, last + 8)?.load(Ordering::Relaxed),
        );
        self.stash(stash, S_RING_LEN)?
            .store(RING_RECORDS - 1, Ordering::Relaxed);
        first.store(e, Ordering::Relaxed);
        self.stash(stash, S_RING + 8)?.store(s, Ordering::Relaxed);
        self.add_bytes(stash, GRANULE << e0.order(), false)
    }

    /// Frees what stash `stash` holds that no pinned reader can see any
    /// more. The caller holds the stash's lock. Returns the bytes freed.
    fn reclaim_locked(&self, stash: u64, me: &Holder) -> Result<u64, Corrupt> {
        let slab = Slab::new(self.r, self.g);
        // Acquire: pairs with the Release CAS of `try_advance`: the reads of
        // every reader it waited for happen before our frees.
        let epoch = self.global()?.load(Ordering::Acquire);
        let free_before = |rec_epoch: u64| rec_epoch.saturating_add(2) <= epoch;
        let mut freed = 0;
        // The ring: the records kept are rewritten with the ring emptied
        // first, and the others freed after it is rewritten (see `spill`).
        let len_w = self.stash(stash, S_RING_LEN)?;
        let len = len_w.load(Ordering::Relaxed).min(RING_RECORDS);
        let mut kept = Vec::new();
        let mut done = Vec::new();
        for i in 0..len {
            let rec = S_RING + i * RECORD_BYTES;
            let e = Entry(self.stash(stash, rec)?.load(Ordering::Relaxed));
            let s = self.stash(stash, rec + 8)?.load(Ordering::Relaxed);
            if free_before(s) {
                done.push(e);
            } else {
                kept.push((e, s));
            }
        }
        if !done.is_empty() {
            len_w.store(0, Ordering::Relaxed);
            for (k, &(e, s)) in kept.iter().enumerate() {
                let to = S_RING + k as u64 * RECORD_BYTES;
                self.stash(stash, to)?.store(e.0, Ordering::Relaxed);
                self.stash(stash, to + 8)?.store(s, Ordering::Relaxed);
            }
            len_w.store(kept.len() as u64, Ordering::Relaxed);
            for e in done {
                slab.free(e.granule() as u64, e.order(), me);
                freed += GRANULE << e.order();
            }
        }
        // The spill chain, newest first: cut it at the first bag old enough
        // (every older one is older still) and free the rest.
        let head = self.stash(stash, S_SPILL)?;
        let mut link: &AtomicU64 = head;
        let mut cur = head.load(Ordering::Relaxed) & LINK_MASK;
        let max_bags = self.g.arena_bytes / (GRANULE << SPILL_ORDER);
        let mut steps = 0;
        while cur != 0 {
            steps += 1;
            if steps > max_bags {
                return Err(Corrupt("spill chain longer than the arena (a cycle)"));
            }
            let words = slab
                .block(cur - 1, SPILL_ORDER)
                .ok_or(Corrupt("spill bag outside the arena"))?;
            if free_before(words[1].load(Ordering::Relaxed)) {
                link.store(0, Ordering::Relaxed);
                freed += self.free_chain(cur, me)?;
                break;
            }
            link = &words[0];
            cur = words[0].load(Ordering::Relaxed) & LINK_MASK;
        }
        self.add_bytes(stash, freed, false)?;
        Ok(freed)
    }

    /// Frees the chain of spill bags starting at `first` (granule + 1),
    /// already unlinked, with every block they list. Returns the bytes
    /// freed (blocks and bags).
    fn free_chain(&self, first: u64, me: &Holder) -> Result<u64, Corrupt> {
        let slab = Slab::new(self.r, self.g);
        let max_bags = self.g.arena_bytes / (GRANULE << SPILL_ORDER);
        let mut freed = 0;
        let mut cur = first;
        let mut steps = 0;
        while cur != 0 {
            steps += 1;
            if steps > max_bags {
                return Err(Corrupt("spill chain longer than the arena (a cycle)"));
            }
            let words = slab
                .block(cur - 1, SPILL_ORDER)
                .ok_or(Corrupt("spill bag outside the arena"))?;
            let n = words[2]
                .load(Ordering::Relaxed)
                .min(words.len() as u64 - BAG_HEADER_WORDS);
            for i in 0..n {
                let e = Entry(words[(BAG_HEADER_WORDS + i) as usize].load(Ordering::Relaxed));
                slab.free(e.granule() as u64, e.order(), me);
                freed += GRANULE << e.order();
            }
            let next = words[0].load(Ordering::Relaxed) & LINK_MASK;
            slab.free(cur - 1, SPILL_ORDER, me);
            freed += GRANULE << SPILL_ORDER;
            cur = next;
        }
        Ok(freed)
    }

    /// Frees, in every stash, whatever no pinned reader can see: first
    /// moving the epoch as far as the pins allow (twice is what a block
    /// retired now needs). Stashes whose lock a live process holds are
    /// skipped, never waited for. Returns the bytes freed.
    pub(crate) fn reclaim_everywhere(
        &self,
        me: &Holder,
        alive: &dyn Fn(u64) -> bool,
    ) -> Result<u64, Corrupt> {
        for _ in 0..3 {
            if !self.try_advance(alive)? {
                break;
            }
        }
        let mut freed = 0;
        for i in 0..self.hwm() {
            let lock = self.stash(i, S_LOCK)?;
            let mut backoff = Backoff::new();
            let mut taken = lockword::try_lock(lock, me);
            for _ in 0..2 {
                if taken {
                    break;
                }
                // Acquire: pairs with `unlock`; see `clear_if_dead`.
                let seen = lock.load(Ordering::Acquire);
                backoff.snooze();
                lockword::clear_if_dead(self.r, lock, seen, me);
                taken = lockword::try_lock(lock, me);
            }
            if !taken {
                continue;
            }
            let r = self.reclaim_locked(i, me);
            lockword::unlock(lock, me);
            freed += r?;
        }
        Ok(freed)
    }

    /// Calls `f(granule, order)` for every block the stashes hold: retired
    /// blocks, spill bags and spare bags (for `check()`'s accounting; exact
    /// only with the write gate closed).
    pub(crate) fn for_each_held(&self, mut f: impl FnMut(u64, u32)) -> Result<(), Corrupt> {
        let slab = Slab::new(self.r, self.g);
        let max_bags = self.g.arena_bytes / (GRANULE << SPILL_ORDER);
        for i in 0..self.hwm() {
            let len = self
                .stash(i, S_RING_LEN)?
                .load(Ordering::Acquire) // Acquire: a snapshot; the gate orders it.
                .min(RING_RECORDS);
            for k in 0..len {
                let e = Entry(
                    self.stash(i, S_RING + k * RECORD_BYTES)?
                        .load(Ordering::Relaxed),
                );
                if slab.block_ok(e.granule() as u64, e.order()) {
                    f(e.granule() as u64, e.order());
                } else {
                    return Err(Corrupt("a retired record names an invalid block"));
                }
            }
            let spare = self.stash(i, S_SPARE)?.load(Ordering::Relaxed);
            if spare != 0 {
                if !slab.block_ok(spare - 1, SPILL_ORDER) {
                    return Err(Corrupt("a spare spill bag is outside the arena"));
                }
                f(spare - 1, SPILL_ORDER);
            }
            let mut cur = self.stash(i, S_SPILL)?.load(Ordering::Relaxed) & LINK_MASK;
            let mut steps = 0;
            while cur != 0 {
                steps += 1;
                if steps > max_bags {
                    return Err(Corrupt("spill chain longer than the arena (a cycle)"));
                }
                let words = slab
                    .block(cur - 1, SPILL_ORDER)
                    .ok_or(Corrupt("spill bag outside the arena"))?;
                f(cur - 1, SPILL_ORDER);
                let n = words[2]
                    .load(Ordering::Relaxed)
                    .min(words.len() as u64 - BAG_HEADER_WORDS);
                for k in 0..n {
                    let e = Entry(words[(BAG_HEADER_WORDS + k) as usize].load(Ordering::Relaxed));
                    if !slab.block_ok(e.granule() as u64, e.order()) {
                        return Err(Corrupt("a spill bag names an invalid block"));
                    }
                    f(e.granule() as u64, e.order());
                }
                cur = words[0].load(Ordering::Relaxed) & LINK_MASK;
            }
        }
        Ok(())
    }

    /// Pins and retired bytes, for `stats()` (a snapshot).
    pub(crate) fn held(&self, alive: &dyn Fn(u64) -> bool) -> Held {
        let mut h = Held {
            // Relaxed: statistics.
            epoch: self.global().map_or(0, |w| w.load(Ordering::Relaxed)),
            ..Held::default()
        };
        for i in 0..self.hwm() {
            if let Ok(w) = self.stash(i, S_RETIRED_BYTES) {
                h.retired_bytes += w.load(Ordering::Relaxed);
            }
            let mut pinned = Vec::new();
            for slot in 0..PIN_SLOTS {
                let (Ok(w), Ok(since)) = (self.pin_word(i, slot), self.pin_since(i, slot)) else {
                    continue;
                };
                let v = w.load(Ordering::Relaxed);
                if pin_count(v) > 0 {
                    pinned.push((pin_count(v), since.load(Ordering::Relaxed)));
                }
            }
            if !pinned.is_empty() && alive(i) {
                for (n, since) in pinned {
                    h.pins += n;
                    h.oldest_pin_since_ms =
                        Some(h.oldest_pin_since_ms.map_or(since, |o: u64| o.min(since)));
                }
            }
        }
        h
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::shm::attach::Token;

    fn setup() -> (Region, Geometry) {
        let g = Geometry::new(64, 1 << 20).unwrap();
        let r = Region::heap(g.total_bytes as usize);
        // Entries 0..8 may be in use (attach raises it; nothing attaches here).
        r.word(H_ATTACH_HWM).unwrap().store(8, Ordering::Relaxed);
        (r, g)
    }

    fn everyone_alive(_: u64) -> bool {
        true
    }

    #[test]
    fn a_pinned_reader_keeps_blocks_retired_after_its_pin() {
        let (r, g) = setup();
        let ep = Epochs::new(&r, &g);
        let slab = Slab::new(&r, &g);
        let me = Holder::new(Token(1));
        let pin = ep.pin(1, 0).unwrap();
        let mut retired = Vec::new();
        for _ in 0..500 {
            let b = slab.alloc(0, &me).unwrap().unwrap();
            let e = Entry::new(b as u32, 0, 0);
            ep.ensure_spare(0, &me, &everyone_alive).unwrap();
            ep.retire(0, e, &me, &everyone_alive).unwrap();
            retired.push(b);
        }
        let held = ep.held(&everyone_alive);
        let bag = GRANULE << SPILL_ORDER;
        let bags = 500u64.div_ceil(RING_RECORDS) + 1; // spilled, and a spare
        assert!(
            (500 * GRANULE..=500 * GRANULE + bags * bag).contains(&held.retired_bytes),
            "{}",
            held.retired_bytes
        );
        assert_eq!(held.pins, 1);
        // Nothing retired under the pin may come back from the allocator.
        assert!(ep.reclaim_everywhere(&me, &everyone_alive).unwrap() == 0);
        let mut fresh = Vec::new();
        while let Some(b) = slab.alloc(0, &me).unwrap() {
            assert!(!retired.contains(&b), "block {b} recycled under a pin");
            fresh.push(b);
        }
        for b in fresh {
            slab.free(b, 0, &me);
        }
        ep.unpin(pin);
        let freed = ep.reclaim_everywhere(&me, &everyone_alive).unwrap();
        assert!(freed >= 500 * GRANULE, "all freed once unpinned: {freed}");
        assert!(
            ep.held(&everyone_alive).retired_bytes <= bag,
            "at most the spare bag stays"
        );
        ep.release_stash(0, &me, &everyone_alive);
        assert_eq!(ep.held(&everyone_alive).retired_bytes, 0);
    }

    #[test]
    fn pins_of_dead_entries_are_ignored() {
        let (r, g) = setup();
        let ep = Epochs::new(&r, &g);
        let me = Holder::new(Token(1));
        let _stuck = ep.pin(2, 0).unwrap();
        let only_0_alive = |i: u64| i != 2;
        assert!(
            ep.try_advance(&everyone_alive).unwrap(),
            "a pin at the current epoch lets it move once"
        );
        assert!(!ep.try_advance(&everyone_alive).unwrap(), "but not twice");
        assert!(ep.try_advance(&only_0_alive).unwrap());
        let slab = Slab::new(&r, &g);
        let b = slab.alloc(0, &me).unwrap().unwrap();
        ep.retire(0, Entry::new(b as u32, 0, 0), &me, &only_0_alive)
            .unwrap();
        assert_eq!(ep.reclaim_everywhere(&me, &only_0_alive).unwrap(), GRANULE);
        ep.reset_pins(2);
        assert!(ep.try_advance(&everyone_alive).unwrap());
    }

    #[test]
    fn joined_slots_count_every_pin() {
        let (r, g) = setup();
        let ep = Epochs::new(&r, &g);
        let pins: Vec<Pin> = (0..PIN_SLOTS * 3).map(|_| ep.pin(0, 0).unwrap()).collect();
        assert_eq!(ep.held(&everyone_alive).pins, PIN_SLOTS * 3);
        for p in pins {
            assert!(!ep.try_advance(&everyone_alive).unwrap() || ep.held(&everyone_alive).pins > 0);
            ep.unpin(p);
        }
        assert_eq!(ep.held(&everyone_alive).pins, 0);
        assert!(ep.try_advance(&everyone_alive).unwrap());
    }

    #[test]
    fn check_accounting_sees_every_held_block_once() {
        let (r, g) = setup();
        let ep = Epochs::new(&r, &g);
        let slab = Slab::new(&r, &g);
        let me = Holder::new(Token(1));
        let _pin = ep.pin(3, 0).unwrap();
        let mut want = std::collections::BTreeSet::new();
        for _ in 0..200 {
            ep.ensure_spare(0, &me, &everyone_alive).unwrap();
            let b = slab.alloc(1, &me).unwrap().unwrap();
            ep.retire(0, Entry::new(b as u32, 1, 0), &me, &everyone_alive)
                .unwrap();
            want.insert((b, 1));
        }
        let mut seen = std::collections::BTreeSet::new();
        ep.for_each_held(|g, o| {
            assert!(seen.insert((g, o)), "held twice: {g}");
        })
        .unwrap();
        let bags: Vec<_> = seen.iter().filter(|&&(_, o)| o == SPILL_ORDER).collect();
        assert!(!bags.is_empty(), "200 records spilled into bags");
        for w in &want {
            assert!(seen.contains(w), "retired block {w:?} not accounted");
        }
    }

    /// Threads of one handle read the epoch before they take the stash
    /// lock (`retire`), so records can reach the ring out of epoch order.
    /// A spill bag whose records are all older than an earlier bag's must
    /// not let `reclaim_locked` cut the chain there: the earlier bag's
    /// blocks would be freed an epoch early, under a reader pinned at their
    /// epoch.
    #[test]
    fn a_bag_of_stale_records_does_not_free_newer_bags_early() {
        let (r, g) = setup();
        let ep = Epochs::new(&r, &g);
        let slab = Slab::new(&r, &g);
        let me = Holder::new(Token(1));
        // Readers pinned at 6 (entry 2) and at 7 (entry 3).
        for _ in 0..6 {
            assert!(ep.try_advance(&everyone_alive).unwrap());
        }
        let at6 = ep.pin(2, 0).unwrap();
        assert!(ep.try_advance(&everyone_alive).unwrap());
        let _at7 = ep.pin(3, 0).unwrap();
        let block = || slab.alloc(0, &me).unwrap().unwrap();
        let mut retired_at_7 = Vec::new();
        // A full ring of blocks retired at 7.
        for _ in 0..RING_RECORDS {
            let b = block();
            ep.retire_locked(0, Entry::new(b as u32, 0, 0), 7, &me, &everyone_alive)
                .unwrap();
            retired_at_7.push(b);
        }
        // Then the retires of threads that read 6 and took the lock only
        // now: the first spills the 7s into a bag, the others fill the ring.
        for _ in 0..RING_RECORDS {
            let b = block();
            ep.retire_locked(0, Entry::new(b as u32, 0, 0), 6, &me, &everyone_alive)
                .unwrap();
        }
        // One more spills the 6s into a second bag.
        let b = block();
        ep.retire_locked(0, Entry::new(b as u32, 0, 0), 7, &me, &everyone_alive)
            .unwrap();
        retired_at_7.push(b);
        assert_eq!(
            ep.global().unwrap().load(Ordering::Relaxed),
            7,
            "held by the pin at 6"
        );
        ep.unpin(at6);
        ep.reclaim_everywhere(&me, &everyone_alive).unwrap();
        assert_eq!(
            ep.global().unwrap().load(Ordering::Relaxed),
            8,
            "held by the pin at 7"
        );
        // Nothing retired at 7 may be free while a reader pinned at 7 lives.
        while let Some(b) = slab.alloc(0, &me).unwrap() {
            assert!(
                !retired_at_7.contains(&b),
                "block {b}, retired at 7, freed at epoch 8 under a pin at 7"
            );
        }
    }
}
