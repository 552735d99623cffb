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
//!   [`PIN_SLOTS`] pin lines, each on its own cache line with two
//!   sub-slots: `epoch << 32 | count`. A reader joins a sub-slot counting
//!   pins at the current epoch, or claims an idle one with it (see
//!   [`Epochs::pin`] for why two suffice), then issues a SeqCst fence before
//!   it reads the index. Unpinning decrements the count (Release).
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
//! | 64 + 64 * i  | pin line `i`: two sub-slot words, then their starts (ms) |
//! | `S_RING`..   | ring records: block entry word, retire epoch          |
//!
//! A spill bag: word 0 the next (older) bag's granule + 1, word 1 its epoch
//! (the newest of its records' and of the next bag's: never older than the
//! next bag's), word 2 its count, words 3.. block entries.

use crate::shm::attach::Holder;
use crate::shm::commit::Commits;
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
/// Ring records kept free, before a spare bag is needed, for the retires
/// of a handle's other threads (see `ensure_spare`). Half the ring: the
/// ring is then also emptied of what it can free every 22 retires, which
/// keeps blocks flowing back while the arena is tight (the tuple space's
/// full-arena reserves, `space/mod.rs`, rely on prompt reuse: a margin of 8
/// made `tests/space.rs` `full_arena_drains` fail).
#[cfg(not(loom))]
const SPARE_MARGIN: u64 = RING_RECORDS / 2;
#[cfg(loom)]
const SPARE_MARGIN: u64 = 0;
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

const STASH_WORDS: usize = (STASH_BYTES / 8) as usize;

/// The words of one stash, with fixed offsets (no bounds check per field).
#[derive(Clone, Copy)]
struct Stash<'a>(&'a [AtomicU64; STASH_WORDS]);

impl<'a> Stash<'a> {
    /// The word at byte offset `off`: one of the `S_` fields, a pin slot's
    /// word or a ring record's (offsets below `STASH_BYTES` by the const
    /// assertion above; callers bound ring indices by `RING_RECORDS`).
    #[inline]
    fn at(self, off: u64) -> &'a AtomicU64 {
        &self.0[(off / 8) as usize]
    }

    /// Pin sub-slot `slot` (`0..2 * PIN_SLOTS`): line `slot / 2`, word
    /// `slot % 2` of it.
    #[inline]
    fn pin(self, slot: u64) -> &'a AtomicU64 {
        let slot = slot % (PIN_SLOTS * 2);
        self.at(S_PINS + (slot / 2) * PIN_BYTES + (slot % 2) * 8)
    }

    /// When sub-slot `slot`'s count last went from 0 to 1 (ms).
    #[inline]
    fn since(self, slot: u64) -> &'a AtomicU64 {
        let slot = slot % (PIN_SLOTS * 2);
        self.at(S_PINS + (slot / 2) * PIN_BYTES + 16 + (slot % 2) * 8)
    }

    /// Ring record `i` (`i < RING_RECORDS`): entry word, retire epoch.
    #[inline]
    fn record(self, i: u64) -> (&'a AtomicU64, &'a AtomicU64) {
        let off = S_RING + i.min(RING_RECORDS - 1) * RECORD_BYTES;
        (self.at(off), self.at(off + 8))
    }
}

/// Adds to (or takes from) the stash's count of bytes held back: retired
/// blocks and the bags that list them. Under the stash lock.
fn add_bytes(st: Stash<'_>, n: u64, add: bool) {
    let bytes = st.at(S_RETIRED_BYTES);
    // Relaxed: under the stash lock.
    let v = bytes.load(Ordering::Relaxed);
    let v = if add {
        v.saturating_add(n)
    } else {
        v.saturating_sub(n)
    };
    bytes.store(v, Ordering::Relaxed);
}

/// The ring is full and nothing can take its records: forget the oldest
/// (leaked until `check()`): the newest moves into its place, after the
/// ring is shortened (so it is never listed twice). Under the stash lock.
#[cold]
fn drop_oldest(st: Stash<'_>) {
    let (first_e, first_s) = st.record(0);
    let (last_e, last_s) = st.record(RING_RECORDS - 1);
    // Relaxed (all): under the stash lock.
    let e0 = Entry(first_e.load(Ordering::Relaxed));
    let (e, s) = (
        last_e.load(Ordering::Relaxed),
        last_s.load(Ordering::Relaxed),
    );
    st.at(S_RING_LEN).store(RING_RECORDS - 1, Ordering::Relaxed);
    first_e.store(e, Ordering::Relaxed);
    first_s.store(s, Ordering::Relaxed);
    add_bytes(st, GRANULE << e0.order(), false);
}

/// The message of the error a stash gives when /dev/shm has no room for
/// its page (the dictionary reports it as `Full`).
pub(crate) const NO_ROOM: &str = "/dev/shm has no room for the handle's stash";

/// Pins a sub-slot can count (the low 32 bits of its word hold the count,
/// the high 32 the epoch's low 32 bits: a live pin is never 2^32 epochs
/// behind, since the epoch cannot pass it by more than one).
const COUNT_MASK: u64 = 0xffff_ffff;
const EPOCH_MASK: u64 = 0xffff_ffff;
/// More pins than this on one sub-slot is an error, not a wrap.
const MAX_PINS: u64 = 1 << 31;
/// The message of the error for a pin past [`MAX_PINS`] (the dictionary
/// reports it as `Full`).
pub(crate) const TOO_MANY_PINS: &str =
    "more than 2^31 borrowed reads held at once through one handle";
/// Words of a spill bag before its entries.
const BAG_HEADER_WORDS: u64 = 3;
/// Granule index + 1 fits in 32 bits (`layout::Geometry`).
const LINK_MASK: u64 = 0xffff_ffff;

fn pin_count(v: u64) -> u64 {
    v & COUNT_MASK
}

fn pin_epoch(v: u64) -> u64 {
    v >> 32
}

/// Frees the blocks of `entries` (no reader can see them any more), one
/// chain per order, each pushed on its free list with one compare-and-swap
/// (`Slab::free_all`). Returns the bytes freed. Reorders `entries`.
fn free_entries(slab: &Slab<'_>, mut entries: &mut [Entry], me: &Holder) -> u64 {
    let mut granules = [0u64; RING_RECORDS as usize];
    let mut freed = 0;
    while let Some(first) = entries.first() {
        let order = first.order();
        // Those of `order` go to `granules`, the others stay, in front.
        let (mut n, mut rest) = (0, 0);
        for i in 0..entries.len() {
            let e = entries[i];
            if e.order() == order && n < granules.len() {
                granules[n] = e.granule() as u64;
                n += 1;
            } else {
                entries[rest] = e;
                rest += 1;
            }
        }
        slab.free_all(&granules[..n], order, me);
        freed += n as u64 * (GRANULE << order);
        entries = &mut entries[..rest];
    }
    freed
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

impl Held {
    /// How long the oldest live pin has been held, now.
    pub(crate) fn oldest_pin_age(&self) -> Option<std::time::Duration> {
        self.oldest_pin_since_ms
            .map(|since| std::time::Duration::from_millis(now_ms().saturating_sub(since)))
    }
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

    /// The words of stash `stash`, bounds-checked once, for its owner (or a
    /// reclaimer that took its lock): its page is committed first
    /// (`commit.rs`; [`NO_ROOM`] if /dev/shm has no room).
    #[inline]
    fn st(&self, stash: u64) -> Result<Stash<'a>, Corrupt> {
        if stash >= ATTACH_ENTRIES {
            return Err(Corrupt("stash index out of range"));
        }
        if !Commits::new(self.r, self.g).ensure_stash(stash) {
            return Err(Corrupt(NO_ROOM));
        }
        self.words_of(stash)
    }

    /// Stash `stash` to look at, if its page was ever committed (else it
    /// holds no pin and no retired block, and is not touched).
    #[inline]
    fn st_if_used(&self, stash: u64) -> Option<Stash<'a>> {
        if stash >= ATTACH_ENTRIES || !Commits::new(self.r, self.g).stash_ready(stash) {
            return None;
        }
        self.words_of(stash).ok()
    }

    fn words_of(&self, stash: u64) -> Result<Stash<'a>, Corrupt> {
        self.r
            .words(STASH_OFF + stash * STASH_BYTES, STASH_WORDS as u64)
            .and_then(|w| w.try_into().ok())
            .map(Stash)
            .ok_or(Corrupt("stash outside the segment"))
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

    /// Pins the stash of entry `stash` (this handle's own), on pin line
    /// `hint` by preference. Until [`Epochs::unpin`], no block this reader
    /// can reach from the index afterwards is recycled.
    ///
    /// A pin joins a sub-slot that already counts pins at the current
    /// epoch, or claims an idle one; each line has two, because live pins
    /// are only ever at the current epoch or the one before (the epoch
    /// cannot pass a pin by more than one). So overlapping borrowed reads
    /// never hold the epoch back: the older sub-slot drains while new pins
    /// go to the other. (With one epoch per slot, a reader that kept four
    /// `ValueRef`s alive at all times made every new pin join an old
    /// epoch, and nothing was ever reclaimed again.)
    pub(crate) fn pin(&self, stash: u64, hint: u64) -> Result<Pin, Corrupt> {
        let st = self.st(stash)?;
        // Relaxed: a stale epoch only makes the pin older (conservative);
        // the SeqCst fence below orders the pin before the reads.
        let epoch = self.global()?.load(Ordering::Relaxed) & EPOCH_MASK;
        let mut spins = 0u32;
        let slot = loop {
            if let Some(slot) = self.try_pin(st, hint, epoch)? {
                break slot;
            }
            // Only contention on the words (a CAS lost) gets here.
            spins += 1;
            if spins % 64 == 0 {
                crate::sync::yield_now();
            } else {
                crate::sync::spin_hint();
            }
        };
        // SeqCst: orders the pin before every read of the index that
        // follows; pairs with the SeqCst fences of `try_advance` (which
        // then sees the pin) and of `retire` (see the module docs).
        fence(Ordering::SeqCst);
        Ok(Pin { stash, slot })
    }

    /// One attempt at pinning at `epoch` (its low 32 bits): on line `hint`
    /// first, then on the others, join the line's sub-slot at `epoch`, else
    /// claim an idle one; failing on every line (every sub-slot busy at
    /// another epoch: only pins that read a stale epoch do that), join the
    /// first busy one, keeping its older epoch. `None`: a CAS lost a race;
    /// try again.
    fn try_pin(&self, st: Stash<'a>, hint: u64, epoch: u64) -> Result<Option<u64>, Corrupt> {
        let slots = PIN_SLOTS * 2;
        let first = (hint % PIN_SLOTS) * 2;
        let order = |k: u64| (first + k) % slots;
        // Relaxed (all): the caller's fence publishes the pin.
        for line in 0..PIN_SLOTS {
            for want_join in [true, false] {
                for sub in 0..2 {
                    let slot = order(line * 2 + sub);
                    let w = st.pin(slot);
                    let v = w.load(Ordering::Relaxed);
                    let (n, e) = (pin_count(v), pin_epoch(v));
                    let new = if want_join && n > 0 && e == epoch {
                        if n >= MAX_PINS {
                            return Err(Corrupt(TOO_MANY_PINS));
                        }
                        v + 1
                    } else if !want_join && n == 0 {
                        epoch << 32 | 1
                    } else {
                        continue;
                    };
                    if w.compare_exchange(v, new, Ordering::Relaxed, Ordering::Relaxed)
                        .is_err()
                    {
                        return Ok(None);
                    }
                    if n == 0 {
                        // Relaxed: a statistic (the oldest pin's age).
                        st.since(slot).store(now_ms(), Ordering::Relaxed);
                    }
                    return Ok(Some(slot));
                }
            }
        }
        let slot = order(0);
        let w = st.pin(slot);
        let v = w.load(Ordering::Relaxed);
        if pin_count(v) >= MAX_PINS {
            // Every sub-slot busy and this one full: only a corrupted stash
            // (or 2^31 pins) does that. An error, never an endless retry.
            return Err(Corrupt(TOO_MANY_PINS));
        }
        if pin_count(v) == 0 {
            return Ok(None); // Freed meanwhile: the next attempt claims it.
        }
        Ok(
            w.compare_exchange(v, v + 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
                .then_some(slot),
        )
    }

    /// Releases a pin taken by [`Epochs::pin`].
    pub(crate) fn unpin(&self, pin: Pin) {
        if let Ok(st) = self.st(pin.stash) {
            let w = st.pin(pin.slot);
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
        if let Ok(st) = self.st(stash) {
            for slot in 0..PIN_SLOTS * 2 {
                // Release: pairs with an advance's Acquire fence, as unpin.
                st.pin(slot).store(0, Ordering::Release);
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
            let Some(st) = self.st_if_used(i) else {
                continue;
            };
            let mut blocked = false;
            for slot in 0..PIN_SLOTS * 2 {
                let v = st.pin(slot).load(Ordering::Relaxed); // Relaxed: after the fence.
                if pin_count(v) > 0 && pin_epoch(v) != epoch & EPOCH_MASK {
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

    /// Whether a block the caller has just unpublished can no longer be seen
    /// by any pinned reader, so that the caller may write into it at once
    /// instead of retiring it: moves the epoch, as far as the pins allow,
    /// two steps past the epoch read after the unpublication (what a block
    /// retired then would wait for). `false`: a live pin may still see the
    /// block; the caller retires it instead.
    pub(crate) fn quiesce(&self, alive: &dyn Fn(u64) -> bool) -> Result<bool, Corrupt> {
        // SeqCst: as in `retire`: orders the unpublication before the read
        // of the epoch; pairs with the fence of `pin`.
        fence(Ordering::SeqCst);
        let start = self.global()?.load(Ordering::Relaxed); // Relaxed: after the fence.
        let done = |epoch: u64| epoch >= start.saturating_add(2);
        for _ in 0..3 {
            // Acquire: as in `reclaim_locked`: pairs with the Release CAS of
            // `try_advance`, so the reads of every reader it waited for
            // happen before the caller writes into the block.
            if done(self.global()?.load(Ordering::Acquire)) {
                return Ok(true);
            }
            if !self.try_advance(alive)? {
                break;
            }
        }
        // Acquire: as above.
        Ok(done(self.global()?.load(Ordering::Acquire)))
    }

    /// Makes sure stash `stash` has room to retire a block without new
    /// memory, so that a retire after the caller publishes never fails.
    /// `Ok(false)`: the arena has no room for a spare spill bag (the caller
    /// reports `Full` before it publishes anything).
    ///
    /// Only a ring within [`SPARE_MARGIN`] records of full needs a spare
    /// bag: the margin is room for the retires of other threads of this
    /// handle between their check and their retire. Before taking one, the
    /// ring is emptied of what no pin can see (moving the epoch if it can):
    /// without borrowed readers no bag is ever taken, so a tight arena keeps
    /// its room for values. (A spare for every handle at once would cost a
    /// tiny arena dearly: 200 handles would hold 100 KiB of bags.)
    #[inline]
    pub(crate) fn ensure_spare(
        &self,
        stash: u64,
        me: &Holder,
        alive: &dyn Fn(u64) -> bool,
    ) -> Result<bool, Corrupt> {
        let st = self.st(stash)?;
        // Relaxed (both): only this stash's owner consumes the spare or
        // fills the ring; a stale value at worst means one retire finds no
        // spare later (handled there).
        if st.at(S_RING_LEN).load(Ordering::Relaxed) < RING_RECORDS - SPARE_MARGIN
            || st.at(S_SPARE).load(Ordering::Relaxed) != 0
        {
            return Ok(true);
        }
        self.ensure_spare_slow(st, me, alive)
    }

    #[cold]
    fn ensure_spare_slow(
        &self,
        st: Stash<'a>,
        me: &Holder,
        alive: &dyn Fn(u64) -> bool,
    ) -> Result<bool, Corrupt> {
        self.advance_twice(alive)?;
        let lock = st.at(S_LOCK);
        lockword::lock(self.r, lock, me);
        let reclaimed = self.reclaim_locked(st, me);
        lockword::unlock(lock, me);
        reclaimed?;
        // Relaxed: as in `ensure_spare`.
        if st.at(S_RING_LEN).load(Ordering::Relaxed) < RING_RECORDS - SPARE_MARGIN {
            return Ok(true);
        }
        let slab = Slab::new(self.r, self.g);
        let Some(bag) = slab.alloc(SPILL_ORDER, me)? else {
            return Ok(false);
        };
        lockword::lock(self.r, lock, me);
        let spare = st.at(S_SPARE);
        // Relaxed: under the stash lock.
        if spare.load(Ordering::Relaxed) == 0 {
            spare.store(bag + 1, Ordering::Relaxed);
            add_bytes(st, GRANULE << SPILL_ORDER, true);
        } else {
            slab.free(bag, SPILL_ORDER, me);
        }
        lockword::unlock(lock, me);
        Ok(true)
    }

    /// Moves the epoch up to twice (what a block retired now needs before
    /// it can be freed), stopping at the first pin in the way.
    fn advance_twice(&self, alive: &dyn Fn(u64) -> bool) -> Result<(), Corrupt> {
        if self.try_advance(alive)? {
            self.try_advance(alive)?;
        }
        Ok(())
    }

    /// A handle detaches: its spare bag goes back to the arena, and what
    /// its stash holds that no pin can see is freed. The rest waits for
    /// the entry's next owner or any writer short of room.
    pub(crate) fn release_stash(&self, stash: u64, me: &Holder, alive: &dyn Fn(u64) -> bool) {
        let Ok(st) = self.st(stash) else {
            return;
        };
        let _ = self.advance_twice(alive);
        let lock = st.at(S_LOCK);
        lockword::lock(self.r, lock, me);
        let spare = st.at(S_SPARE);
        // Relaxed: under the stash lock.
        let s = spare.load(Ordering::Relaxed);
        if s != 0 {
            spare.store(0, Ordering::Relaxed);
            Slab::new(self.r, self.g).free(s - 1, SPILL_ORDER, me);
            add_bytes(st, GRANULE << SPILL_ORDER, false);
        }
        let _ = self.reclaim_locked(st, me);
        lockword::unlock(lock, me);
    }

    /// Records that the block of `e`, just unpublished by the caller, is
    /// retired: it is freed once no pinned reader can see it. Never fails
    /// for want of memory if [`Epochs::ensure_spare`] succeeded before the
    /// unpublication (if more threads of one handle than the margin raced
    /// for the spare and the arena is full, a block is leaked until
    /// `check()`).
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
        self.retire_after_fence(stash, e, me, alive)
    }

    /// [`Epochs::retire`] for a caller that issued the SeqCst fence itself,
    /// after the unpublication (`ShmDict::retire_and_notify`, whose fence
    /// also serves the waiters' check).
    pub(crate) fn retire_after_fence(
        &self,
        stash: u64,
        e: Entry,
        me: &Holder,
        alive: &dyn Fn(u64) -> bool,
    ) -> Result<(), Corrupt> {
        let st = self.st(stash)?;
        let epoch = self.global()?.load(Ordering::Relaxed); // Relaxed: after the caller's fence.
        let lock = st.at(S_LOCK);
        lockword::lock(self.r, lock, me);
        let r = self.retire_locked(st, e, epoch, me, alive);
        lockword::unlock(lock, me);
        r
    }

    fn retire_locked(
        &self,
        st: Stash<'a>,
        e: Entry,
        epoch: u64,
        me: &Holder,
        alive: &dyn Fn(u64) -> bool,
    ) -> Result<(), Corrupt> {
        let len_w = st.at(S_RING_LEN);
        // Relaxed (all stash words): under the stash lock, whose Acquire and
        // Release order them between holders.
        let mut len = len_w.load(Ordering::Relaxed).min(RING_RECORDS);
        if len == RING_RECORDS {
            // The ring is full: move the epoch if nobody stands in the way,
            // free what that allows, and spill the rest into a bag.
            self.advance_twice(alive)?;
            self.reclaim_locked(st, me)?;
            len = len_w.load(Ordering::Relaxed).min(RING_RECORDS);
            if len == RING_RECORDS {
                self.spill(st, me)?;
                len = len_w.load(Ordering::Relaxed).min(RING_RECORDS);
            }
        }
        let (rec_e, rec_s) = st.record(len);
        rec_e.store(e.0, Ordering::Relaxed);
        rec_s.store(epoch, Ordering::Relaxed);
        len_w.store(len + 1, Ordering::Relaxed);
        add_bytes(st, GRANULE << e.order(), true);
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
    fn spill(&self, st: Stash<'a>, me: &Holder) -> Result<(), Corrupt> {
        let slab = Slab::new(self.r, self.g);
        let spare = st.at(S_SPARE);
        let bag = match spare.load(Ordering::Relaxed) {
            0 => match slab.alloc(SPILL_ORDER, me)? {
                Some(g) => {
                    add_bytes(st, GRANULE << SPILL_ORDER, true);
                    g
                }
                // No spare (more threads of this handle than the margin
                // raced for it) and no room: the oldest record's block is
                // leaked (`check()` reclaims it) so the retire can proceed.
                None => {
                    drop_oldest(st);
                    return Ok(());
                }
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
            let (e, s) = st.record(i);
            newest = newest.max(s.load(Ordering::Relaxed));
            // Relaxed: the bag is ours until linked (under the lock).
            words[(BAG_HEADER_WORDS + i) as usize]
                .store(e.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let head = st.at(S_SPILL);
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
        st.at(S_RING_LEN).store(0, Ordering::Relaxed);
        head.store(bag + 1, Ordering::Relaxed);
        Ok(())
    }

    /// Frees what stash `st` holds that no pinned reader can see any more.
    /// The caller holds the stash's lock. Returns the bytes freed.
    fn reclaim_locked(&self, st: Stash<'a>, me: &Holder) -> Result<u64, Corrupt> {
        let slab = Slab::new(self.r, self.g);
        // Acquire: pairs with the Release CAS of `try_advance`: the reads of
        // every reader it waited for happen before our frees.
        let epoch = self.global()?.load(Ordering::Acquire);
        let free_before = |rec_epoch: u64| rec_epoch.saturating_add(2) <= epoch;
        let mut freed = 0;
        // The ring: the records kept are rewritten with the ring emptied
        // first, and the others freed after it is rewritten (see `spill`).
        let len_w = st.at(S_RING_LEN);
        let len = len_w.load(Ordering::Relaxed).min(RING_RECORDS) as usize;
        let mut records = [(Entry(0), 0u64); RING_RECORDS as usize];
        for (i, r) in records.iter_mut().enumerate().take(len) {
            let (e, s) = st.record(i as u64);
            *r = (Entry(e.load(Ordering::Relaxed)), s.load(Ordering::Relaxed));
        }
        let records = &records[..len];
        if records.iter().any(|&(_, s)| free_before(s)) {
            len_w.store(0, Ordering::Relaxed);
            let mut kept = 0;
            for &(e, s) in records.iter().filter(|&&(_, s)| !free_before(s)) {
                let (rec_e, rec_s) = st.record(kept);
                rec_e.store(e.0, Ordering::Relaxed);
                rec_s.store(s, Ordering::Relaxed);
                kept += 1;
            }
            len_w.store(kept, Ordering::Relaxed);
            // Freed after the ring is rewritten, each order's blocks as one
            // chain with one compare-and-swap (`free_entries`).
            let mut done = [Entry(0); RING_RECORDS as usize];
            let mut ndone = 0;
            for &(e, _) in records.iter().filter(|&&(_, s)| free_before(s)) {
                done[ndone] = e;
                ndone += 1;
            }
            freed += free_entries(&slab, &mut done[..ndone], me);
        }
        // The spill chain, newest first: cut it at the first bag old enough
        // (every older one is older still) and free the rest.
        let head = st.at(S_SPILL);
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
        add_bytes(st, freed, false);
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
    /// moving the epoch as far as the pins allow (twice is all a block
    /// retired now needs). Stashes whose lock a live process holds are
    /// skipped, never waited for. Returns the bytes freed.
    pub(crate) fn reclaim_everywhere(
        &self,
        me: &Holder,
        alive: &dyn Fn(u64) -> bool,
    ) -> Result<u64, Corrupt> {
        self.advance_twice(alive)?;
        let mut freed = 0;
        for i in 0..self.hwm() {
            let Some(st) = self.st_if_used(i) else {
                continue;
            };
            let lock = st.at(S_LOCK);
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
            let r = self.reclaim_locked(st, me);
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
            let Some(st) = self.st_if_used(i) else {
                continue;
            };
            // Acquire: a snapshot; the write gate orders it.
            let len = st.at(S_RING_LEN).load(Ordering::Acquire).min(RING_RECORDS);
            for k in 0..len {
                let e = Entry(st.record(k).0.load(Ordering::Relaxed));
                if slab.block_ok(e.granule() as u64, e.order()) {
                    f(e.granule() as u64, e.order());
                } else {
                    return Err(Corrupt("a retired record names an invalid block"));
                }
            }
            let spare = st.at(S_SPARE).load(Ordering::Relaxed);
            if spare != 0 {
                if !slab.block_ok(spare - 1, SPILL_ORDER) {
                    return Err(Corrupt("a spare spill bag is outside the arena"));
                }
                f(spare - 1, SPILL_ORDER);
            }
            let mut cur = st.at(S_SPILL).load(Ordering::Relaxed) & LINK_MASK;
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
            let Some(st) = self.st_if_used(i) else {
                continue;
            };
            h.retired_bytes += st.at(S_RETIRED_BYTES).load(Ordering::Relaxed);
            let mut pinned = Vec::new();
            for slot in 0..PIN_SLOTS * 2 {
                let (w, since) = (st.pin(slot), st.since(slot));
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

    /// Regression: past 65,535 pins on every slot, `pin` spun forever
    /// (the Python view work found it: 262,141 views hung). Now a
    /// sub-slot counts up to 2^31 and more is an error.
    #[test]
    fn too_many_pins_is_an_error_not_a_hang() {
        let (r, g) = setup();
        let ep = Epochs::new(&r, &g);
        let first = ep.pin(0, 0).unwrap();
        let st = ep.st(0).unwrap();
        let w = st.pin(first.slot);
        w.store(w.load(Ordering::Relaxed) - 1 + MAX_PINS, Ordering::Relaxed);
        assert_eq!(ep.pin(0, 0), Err(Corrupt(TOO_MANY_PINS)));
        w.store(0, Ordering::Relaxed);
        assert!(ep.pin(0, 0).is_ok(), "usable again once pins are dropped");
    }

    /// Every sub-slot busy at other epochs with full counts (garbage in a
    /// corrupted stash): an error, not an endless retry.
    #[test]
    fn pins_on_a_stash_full_of_garbage_fail_instead_of_spinning() {
        let (r, g) = setup();
        let ep = Epochs::new(&r, &g);
        let st = ep.st(0).unwrap();
        for slot in 0..PIN_SLOTS * 2 {
            st.pin(slot).store(u64::MAX, Ordering::Relaxed);
        }
        assert_eq!(ep.pin(0, 1), Err(Corrupt(TOO_MANY_PINS)));
        ep.reset_pins(0);
        assert!(ep.pin(0, 1).is_ok());
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
            ep.retire_locked(
                ep.st(0).unwrap(),
                Entry::new(b as u32, 0, 0),
                7,
                &me,
                &everyone_alive,
            )
            .unwrap();
            retired_at_7.push(b);
        }
        // Then the retires of threads that read 6 and took the lock only
        // now: the first spills the 7s into a bag, the others fill the ring.
        for _ in 0..RING_RECORDS {
            let b = block();
            ep.retire_locked(
                ep.st(0).unwrap(),
                Entry::new(b as u32, 0, 0),
                6,
                &me,
                &everyone_alive,
            )
            .unwrap();
        }
        // One more spills the 6s into a second bag.
        let b = block();
        ep.retire_locked(
            ep.st(0).unwrap(),
            Entry::new(b as u32, 0, 0),
            7,
            &me,
            &everyone_alive,
        )
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
