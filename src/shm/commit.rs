//! Memory given before it is touched: a full /dev/shm is `Full`, never
//! SIGBUS.
//!
//! A segment is a sparse file in /dev/shm (tmpfs). Its pages get memory
//! when first touched, and when tmpfs has none left (64 MB is Docker's
//! default /dev/shm) that first touch, a store or even a load, kills the
//! process with SIGBUS. So every part of a dictionary segment is committed
//! (`fallocate`, [`Region::commit`]) before anything touches it, and a
//! commit that fails is an error the operation reports as `Full`:
//!
//! - the header and the tables before the stashes, and this module's
//!   commit table, when the segment is created (`COMMITTED_AT_CREATION`,
//!   about 300 KiB);
//! - a page of stashes (`epoch.rs`) before its first use, and the index and
//!   the arena in units (`Geometry::index_unit_shift`, at least 64 KiB)
//!   before a writer first stores into them.
//!
//! The commit table holds one bit per such part, set (Release) after the
//! memory is given; every process checks it (Acquire) before touching a
//! part, so a unit is committed once, by whoever needs it first. A reader
//! never commits: an index unit whose bit is clear was never written, so
//! it reads as empty without being touched (`Index::bucket`); a stash page
//! whose bit is clear holds no pin and no retired block.
//!
//! `fallocate` on tmpfs only allocates (zeroed) pages the file does not
//! have yet, and is idempotent, so racing committers are harmless. Under
//! loom there is no file and everything counts as committed.
//!
//! The budget (`Options::max_bytes`): the header counts the bytes committed
//! (`H_COMMITTED`, starting at what creation commits). A committer first
//! reserves a unit's bytes in it by compare-and-swap, never past
//! `H_MAX_BYTES`, then commits, then sets the unit's bit; if another
//! committer set the bit first (or the commit failed) it gives the bytes
//! back. So the count never exceeds the budget, and once every committer
//! has finished it is exactly the bytes the bits stand for. A committer
//! killed between reserving and setting the bit leaves the count a unit
//! too high: the budget errs on the safe side, and `check()` recounts it.

use crate::shm::layout::{
    Geometry, BUCKET_BYTES, COMMIT_ARENA_OFF, COMMIT_INDEX_OFF, COMMIT_STASH_OFF, GRANULE,
    H_COMMITTED, PAGE, STASH_BYTES, STASH_OFF,
};
use crate::shm::region::Region;
use crate::sync::Ordering;

/// Why the calling thread's last commit failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shortage {
    /// /dev/shm (the file system) has no room.
    NoRoom,
    /// The dictionary's `max_bytes` would be exceeded.
    Budget,
}

#[cfg(not(loom))]
std::thread_local! {
    static LAST_SHORTAGE: std::cell::Cell<Shortage> = const { std::cell::Cell::new(Shortage::NoRoom) };
}

fn note(why: Shortage) {
    #[cfg(not(loom))]
    LAST_SHORTAGE.with(|c| c.set(why));
    #[cfg(loom)]
    let _ = why;
}

/// Why the calling thread's last failed commit failed.
pub(crate) fn last_shortage() -> Shortage {
    #[cfg(not(loom))]
    return LAST_SHORTAGE.with(|c| c.get());
    #[cfg(loom)]
    Shortage::NoRoom
}

/// The commit table of one segment.
#[derive(Clone, Copy)]
pub(crate) struct Commits<'a> {
    r: &'a Region,
    g: &'a Geometry,
}

/// Which bitmap a unit is in.
#[derive(Clone, Copy)]
struct Bitmap {
    /// Byte offset of the bitmap.
    table: u64,
    /// Byte offset of unit 0 in the segment, and log2 of the unit.
    base: u64,
    shift: u32,
    /// Units in the bitmap.
    units: u64,
}

impl<'a> Commits<'a> {
    pub(crate) fn new(r: &'a Region, g: &'a Geometry) -> Commits<'a> {
        Commits { r, g }
    }

    fn index_map(&self) -> Bitmap {
        let shift = self.g.index_unit_shift;
        Bitmap {
            table: COMMIT_INDEX_OFF,
            base: self.g.index_off,
            shift,
            units: (self.g.nbuckets * BUCKET_BYTES).div_ceil(1 << shift),
        }
    }

    fn arena_map(&self) -> Bitmap {
        let shift = self.g.arena_unit_shift;
        Bitmap {
            table: COMMIT_ARENA_OFF,
            base: self.g.arena_off,
            shift,
            units: self.g.arena_bytes.div_ceil(1 << shift),
        }
    }

    /// Reserves `bytes` of the budget (`false`: it would be exceeded).
    fn reserve(&self, bytes: u64) -> bool {
        let Some(w) = self.r.word(H_COMMITTED) else {
            return false;
        };
        let max = if self.g.max_bytes == 0 {
            u64::MAX
        } else {
            self.g.max_bytes
        };
        // Relaxed: a counter; the compare-and-swap decides.
        let mut cur = w.load(Ordering::Relaxed);
        loop {
            match cur.checked_add(bytes) {
                Some(next) if next <= max => {}
                _ => {
                    note(Shortage::Budget);
                    return false;
                }
            }
            match w.compare_exchange_weak(cur, cur + bytes, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(seen) => cur = seen,
            }
        }
    }

    /// Gives back bytes reserved by [`reserve`](Self::reserve).
    fn unreserve(&self, bytes: u64) {
        if let Some(w) = self.r.word(H_COMMITTED) {
            w.fetch_sub(bytes, Ordering::Relaxed); // Relaxed: a counter.
        }
    }

    /// Bytes committed (a snapshot).
    pub(crate) fn committed(&self) -> u64 {
        self.r
            .word(H_COMMITTED)
            .map_or(0, |w| w.load(Ordering::Relaxed)) // Relaxed: a statistic.
    }

    /// The bytes the bits of the commit table stand for, plus what creation
    /// commits: what [`committed`](Self::committed) says once no commit is
    /// in flight. For `check()`, which stores it.
    pub(crate) fn recount(&self) -> u64 {
        let mut total = crate::shm::layout::committed_at_creation();
        for m in [self.stash_map(), self.index_map(), self.arena_map()] {
            let unit = 1u64 << m.shift;
            for u in 0..m.units {
                if self.is_set(m, u) {
                    let end = (m.base + (u + 1) * unit).min(self.r.len());
                    total += end.saturating_sub(m.base + u * unit);
                }
            }
        }
        total
    }

    /// Sets the committed count (`check()`, with the write gate closed).
    pub(crate) fn set_committed(&self, bytes: u64) {
        if let Some(w) = self.r.word(H_COMMITTED) {
            w.store(bytes, Ordering::Relaxed); // Relaxed: a counter.
        }
    }

    fn stash_map(&self) -> Bitmap {
        Bitmap {
            table: COMMIT_STASH_OFF,
            base: STASH_OFF,
            shift: PAGE.trailing_zeros(),
            units: (crate::shm::layout::ATTACH_ENTRIES * STASH_BYTES).div_ceil(PAGE),
        }
    }

    /// Whether unit `u` of `m` is committed.
    #[inline]
    fn is_set(&self, m: Bitmap, u: u64) -> bool {
        u < m.units && self.bit(m.table, u)
    }

    /// Commits the units of `m` that cover `off..off + len` (segment byte
    /// offsets). `false` if /dev/shm has no room (or the range is outside
    /// the part).
    fn ensure(&self, m: Bitmap, off: u64, len: u64) -> bool {
        if cfg!(loom) || len == 0 {
            return true;
        }
        let Some(rel) = off.checked_sub(m.base) else {
            return false;
        };
        let (first, last) = (rel >> m.shift, (rel + len - 1) >> m.shift);
        if last >= m.units {
            return false;
        }
        for u in first..=last {
            if self.is_set(m, u) {
                continue;
            }
            let start = m.base + (u << m.shift);
            // The unit's bytes inside the file (the last unit may be short).
            let bytes = (start + (1 << m.shift)).min(self.r.len()) - start;
            let Some(w) = self.r.word(m.table + (u / 64) * 8) else {
                return false;
            };
            if !self.reserve(bytes) {
                return false;
            }
            if !self.r.commit(start, bytes) {
                self.unreserve(bytes);
                note(Shortage::NoRoom);
                return false;
            }
            // Release: pairs with the Acquire in `is_set`.
            if w.fetch_or(1 << (u % 64), Ordering::Release) & (1 << (u % 64)) != 0 {
                self.unreserve(bytes); // Another committer counted it.
            }
        }
        true
    }

    /// Whether index bucket `b` may be touched (else it reads as empty).
    #[inline]
    pub(crate) fn bucket_ready(&self, b: u64) -> bool {
        // `b` is below nbuckets (callers mask it), so its unit is in range.
        self.bit(
            COMMIT_INDEX_OFF,
            (b * BUCKET_BYTES) >> self.g.index_unit_shift,
        )
    }

    /// Commits index bucket `b` before a writer stores into it.
    #[inline]
    pub(crate) fn ensure_bucket(&self, b: u64) -> bool {
        self.bucket_ready(b) || {
            let m = self.index_map();
            self.ensure(m, m.base + b * BUCKET_BYTES, BUCKET_BYTES)
        }
    }

    /// Commits the arena bytes of a block before it is written.
    #[inline]
    pub(crate) fn ensure_block(&self, granule: u64, order: u32) -> bool {
        let shift = self.g.arena_unit_shift;
        let (off, len) = (granule * GRANULE, GRANULE << order);
        let unit = off >> shift;
        // The fast path: a block inside one unit already committed.
        if unit == (off + len - 1) >> shift && self.bit(COMMIT_ARENA_OFF, unit) {
            return true;
        }
        let m = self.arena_map();
        self.ensure(m, m.base + off, len)
    }

    /// Bit `u` of the bitmap at `table`, without a range check of `u`
    /// against the part (callers compute it from an offset inside it).
    #[inline]
    fn bit(&self, table: u64, u: u64) -> bool {
        if cfg!(loom) {
            return true;
        }
        // Acquire: pairs with the Release `fetch_or` in `ensure`: the
        // memory was given before the bit was set.
        self.r
            .word(table + (u / 64) * 8)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (u % 64)) != 0)
    }

    /// Commits the arena bytes `off..off + len` (relative to the arena):
    /// an index table carved from it (`grow.rs`).
    pub(crate) fn ensure_arena(&self, off: u64, len: u64) -> bool {
        let m = self.arena_map();
        self.ensure(m, m.base + off, len)
    }

    /// Commits the first word of a block (a free-list link is stored there).
    #[inline]
    pub(crate) fn ensure_link(&self, granule: u64) -> bool {
        self.ensure_block(granule, 0)
    }

    /// Whether stash `i`'s page may be touched (else it holds nothing).
    #[inline]
    pub(crate) fn stash_ready(&self, i: u64) -> bool {
        // `i` is below ATTACH_ENTRIES (callers check), so its page is in range.
        self.bit(COMMIT_STASH_OFF, (i * STASH_BYTES) >> PAGE.trailing_zeros())
    }

    /// Commits stash `i`'s page before its owner uses it.
    pub(crate) fn ensure_stash(&self, i: u64) -> bool {
        self.stash_ready(i) || {
            let m = self.stash_map();
            self.ensure(m, STASH_OFF + i * STASH_BYTES, STASH_BYTES)
        }
    }
}

/// Commits what a new segment needs before its initialization writes.
pub(crate) fn at_creation(r: &Region) -> bool {
    crate::shm::layout::COMMITTED_AT_CREATION
        .iter()
        .all(|&(off, len)| r.commit(off, len))
}
