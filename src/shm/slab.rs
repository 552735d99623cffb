//! The arena allocator: power-of-two blocks with lock-free free lists.
//!
//! The arena is `nchunks` chunks of `GRANULE << chunk_order` bytes. A block of
//! order `o` is `GRANULE << o` bytes and starts at a granule index that is a
//! multiple of `1 << o` (buddy alignment), so two free buddies of order `o`
//! can be merged into one block of order `o + 1`.
//!
//! Each order has a free list in the header: a Treiber stack whose head is
//! two words, 16-aligned at the start of the head's cache line, that change
//! together by one 16-byte compare-and-swap:
//!
//! | word | meaning                                                    |
//! |------|------------------------------------------------------------|
//! | 0    | granule index + 1 of the top block (0 = empty list)       |
//! | 1    | tag, incremented by every push and pop (ABA guard)         |
//!
//! and whose links live in word 0 of each free block (granule index + 1).
//! The tag is what keeps a `pop` that stalled between reading the top's
//! link and its CAS from succeeding after the list changed under it (the
//! same top, a different next: one block handed to two owners). With 64
//! bits it would take 2^64 pushes and pops during one stall to wrap; the
//! 32-bit tag of format 2 (top and tag in one word) wrapped after 2^32,
//! about a minute of churn at tens of millions of operations a second
//! (issue 10, item 5). The 16-byte CAS is `cmpxchg16b` on
//! x86_64 and `casp` (or `ldxp`/`stxp`) on AArch64, through
//! `portable-atomic`; a CPU without one cannot open a dictionary
//! ([`heads_lock_free`]). Under loom, which has no 16-byte atomic, the head
//! is modelled as one word holding both halves (32 bits each): the same
//! code, a narrower tag.
//!
//! `alloc(o)` pops order `o`; failing that, pops a larger order and splits it,
//! pushing the unused halves; failing that, carves a fresh chunk (a counter in
//! the header, so untouched arena pages stay untouched); failing that, it
//! defragments once and tries again. `free` pushes the block on its order's
//! list without merging, so the fast paths are one CAS each.
//!
//! Defragmentation (the slow path before reporting `Full`) takes the
//! owner-tagged defragmentation lock, drains every free list, merges free
//! buddies, pushes the merged blocks back and bumps the defragmentation
//! epoch. Allocators that fail while it runs wait for it and try again; an
//! allocator whose retry fails while another defragmentation runs or ran
//! since its own (which drained the lists it looked at) waits for that one
//! and tries again too. So a defragmentation never causes a spurious
//! `Full`.
//!
//! Memory ordering rule for recycled blocks: after taking a block off a free
//! list and before storing into it, a process issues a Release fence (in
//! [`Slab::alloc`] and [`Slab::push`]). See `seqlock::read_validate` for the
//! Acquire fence it pairs with.

use crate::shm::attach::Holder;
use crate::shm::commit::Commits;
use crate::shm::layout::{
    Geometry, FREE_OFF, FREE_SHARDS, GRANULE, H_CHUNKS_CARVED, H_DEFRAG_EPOCH, H_DEFRAG_LOCK,
};
use crate::shm::lockword::{self, Backoff};
use crate::shm::region::Region;
use crate::sync::{fence, AtomicU64, Ordering};

/// Links and tops are granule index + 1; an arena has fewer than 2^32
/// granules (checked by `layout::Geometry`).
const LINK_MASK: u64 = 0xffff_ffff;

/// Whether this CPU changes a free-list head with a real 16-byte atomic
/// instruction. If not, `portable-atomic` would fall back to a lock that
/// only this process sees, and free lists shared with other processes
/// would break: dictionaries refuse to open instead.
#[cfg(not(loom))]
pub(crate) fn heads_lock_free() -> bool {
    crate::sync::AtomicU128::is_lock_free()
}

/// A free list's head as read: the top block and the tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    /// Granule index + 1 of the top block; 0 = empty.
    top: u64,
    tag: u64,
}

impl Head {
    /// The head after a push or pop that leaves `top` on top.
    fn next(self, top: u64) -> Head {
        Head {
            top,
            tag: self.tag.wrapping_add(1),
        }
    }
}

/// The two words of a free list's head, changed together.
#[derive(Debug, Clone, Copy)]
struct HeadWords<'a> {
    #[cfg(not(loom))]
    pair: &'a crate::sync::AtomicU128,
    /// Under loom: top in bits 0..32, tag in bits 32..64.
    #[cfg(loom)]
    word: &'a AtomicU64,
}

impl HeadWords<'_> {
    #[cfg(not(loom))]
    #[inline]
    fn load(self, order: Ordering) -> Head {
        let v = self.pair.load(order);
        Head {
            top: v as u64,
            tag: (v >> 64) as u64,
        }
    }

    #[cfg(not(loom))]
    #[inline]
    fn compare_exchange_weak(
        self,
        cur: Head,
        new: Head,
        success: Ordering,
        failure: Ordering,
    ) -> Result<(), Head> {
        let pack = |h: Head| h.top as u128 | (h.tag as u128) << 64;
        self.pair
            .compare_exchange_weak(pack(cur), pack(new), success, failure)
            .map(|_| ())
            .map_err(|v| Head {
                top: v as u64,
                tag: (v >> 64) as u64,
            })
    }

    #[cfg(loom)]
    fn load(self, order: Ordering) -> Head {
        let v = self.word.load(order);
        Head {
            top: v & LINK_MASK,
            tag: v >> 32,
        }
    }

    #[cfg(loom)]
    fn compare_exchange_weak(
        self,
        cur: Head,
        new: Head,
        success: Ordering,
        failure: Ordering,
    ) -> Result<(), Head> {
        let pack = |h: Head| (h.top & LINK_MASK) | h.tag << 32;
        self.word
            .compare_exchange_weak(pack(cur), pack(new), success, failure)
            .map(|_| ())
            .map_err(|v| Head {
                top: v & LINK_MASK,
                tag: v >> 32,
            })
    }
}

#[cfg(not(loom))]
std::thread_local! {
    static SHORT_OF_SHM: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn note_short_of_shm() {
    #[cfg(not(loom))]
    SHORT_OF_SHM.with(|c| c.set(true));
}

fn clear_short_of_shm() {
    #[cfg(not(loom))]
    SHORT_OF_SHM.with(|c| c.set(false));
}

/// Whether the calling thread's last failed `alloc` failed because /dev/shm
/// had no room for the block's memory (not because the arena is full).
pub(crate) fn short_of_shm() -> bool {
    #[cfg(not(loom))]
    return SHORT_OF_SHM.with(|c| c.get());
    #[cfg(loom)]
    false
}

/// The allocator over one segment's arena.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slab<'a> {
    r: &'a Region,
    g: &'a Geometry,
}

/// A free list or block reference failed a bounds or alignment check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Corrupt(pub(crate) &'static str);

impl<'a> Slab<'a> {
    pub(crate) fn new(r: &'a Region, g: &'a Geometry) -> Slab<'a> {
        Slab { r, g }
    }

    /// Whether a block of `order` may start at `granule`.
    pub(crate) fn block_ok(&self, granule: u64, order: u32) -> bool {
        order <= self.g.chunk_order
            && granule % (1u64 << order) == 0
            && granule
                .checked_add(1u64 << order)
                .and_then(|end| end.checked_mul(GRANULE))
                .is_some_and(|end| end <= self.g.arena_bytes)
    }

    /// The words of a block, bounds- and alignment-checked.
    pub(crate) fn block(&self, granule: u64, order: u32) -> Option<&'a [AtomicU64]> {
        if !self.block_ok(granule, order) {
            return None;
        }
        self.r
            .words(self.g.arena_off + granule * GRANULE, (GRANULE << order) / 8)
    }

    fn head(&self, order: u32, shard: u64) -> HeadWords<'a> {
        let off = FREE_OFF + (order as u64 * FREE_SHARDS + shard % FREE_SHARDS) * 64;
        HeadWords {
            #[cfg(not(loom))]
            pair: self
                .r
                .pair(off)
                .expect("free-list heads lie inside the validated table"),
            #[cfg(loom)]
            word: self
                .r
                .word(off)
                .expect("free-list heads lie inside the validated table"),
        }
    }

    fn push(&self, granule: u64, order: u32, shard: u64) {
        let Some(link) = self.block(granule, order).map(|w| &w[0]) else {
            return; // Not a valid block: leak it rather than corrupt the list.
        };
        // Release fence: we own this block (just taken off a list, or retired
        // after the Release unlock that replaced it); readers that read the
        // link below synchronize with this fence (seqlock::read_validate).
        fence(Ordering::Release);
        let head = self.head(order, shard);
        let mut cur = head.load(Ordering::Relaxed); // Relaxed: validated by the CAS.
        loop {
            link.store(cur.top & LINK_MASK, Ordering::Relaxed); // Relaxed: published by the CAS.
                                                                // Release: pairs with the Acquire in `pop`; the popper sees the
                                                                // link and everything we did to the block before freeing it.
            match head.compare_exchange_weak(
                cur,
                cur.next(granule + 1),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(()) => return,
                Err(seen) => cur = seen,
            }
        }
    }

    /// Pushes blocks of `order` (valid ones; an invalid one is leaked
    /// rather than followed) with one compare-and-swap: they are linked
    /// into a chain first, whose last link then takes the list's top. The
    /// list ends up as if they had been pushed one by one in the order
    /// given (the last on top), so allocation order does not change.
    fn push_all(&self, granules: &[u64], order: u32, shard: u64) {
        // Release fence: as in `push`, for every block of the chain: the
        // links below are our first stores into blocks we own.
        fence(Ordering::Release);
        let mut first = None;
        let mut last: Option<&AtomicU64> = None;
        for &g in granules.iter().rev() {
            let Some(link) = self.block(g, order).map(|w| &w[0]) else {
                continue;
            };
            match last {
                // Relaxed: published by the CAS below.
                Some(prev) => prev.store(g + 1, Ordering::Relaxed),
                None => first = Some(g),
            }
            last = Some(link);
        }
        let (Some(first), Some(last)) = (first, last) else {
            return;
        };
        let head = self.head(order, shard);
        let mut cur = head.load(Ordering::Relaxed); // Relaxed: validated by the CAS.
        loop {
            last.store(cur.top & LINK_MASK, Ordering::Relaxed); // Relaxed: published by the CAS.
                                                                // Release: pairs with the Acquire in `pop`, as in `push`.
            match head.compare_exchange_weak(
                cur,
                cur.next(first + 1),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(()) => return,
                Err(seen) => cur = seen,
            }
        }
    }

    fn pop(&self, order: u32, shard: u64) -> Result<Option<u64>, Corrupt> {
        let head = self.head(order, shard);
        // Acquire: pairs with the Release CAS in `push` that installed `cur`,
        // or in `pop` that emptied the list.
        let mut cur = head.load(Ordering::Acquire);
        loop {
            if cur.top == 0 {
                return Ok(None);
            }
            let granule = cur.top - 1;
            let words = self
                .block(granule, order)
                .ok_or(Corrupt("free-list entry out of bounds"))?;
            // Relaxed: if the block was popped and reused meanwhile this is
            // garbage, but then the tag changed and the CAS below fails.
            let next = words[0].load(Ordering::Relaxed) & LINK_MASK;
            // Acquire (both outcomes): pairs with `push`'s Release. Release
            // (on success): an allocator that then finds this list empty
            // (Acquire load) sees what we did before, notably taking the
            // defragmentation lock when this pop drains the list (see
            // `alloc`).
            match head.compare_exchange_weak(
                cur,
                cur.next(next),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(()) => return Ok(Some(granule)),
                Err(seen) => cur = seen,
            }
        }
    }

    /// Carves a fresh chunk from the untouched end of the arena, for a
    /// block of `order` (its memory, and the links `split` stores, are
    /// committed first: `commit.rs`).
    fn carve(&self, order: u32) -> Option<u64> {
        let w = self.r.word(H_CHUNKS_CARVED)?;
        let mut cur = w.load(Ordering::Relaxed); // Relaxed: a counter; the CAS decides.
        loop {
            if cur >= self.g.nchunks() {
                return None;
            }
            // Committed before the chunk is ours: if another allocator
            // carves it instead, it finds the memory there (harmless).
            if !self.commit_split(cur << self.g.chunk_order, self.g.chunk_order, order) {
                return None;
            }
            // Relaxed: the chunk's memory is untouched zeroes; nothing to order.
            match w.compare_exchange_weak(cur, cur + 1, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(cur << self.g.chunk_order),
                Err(seen) => cur = seen,
            }
        }
    }

    /// Carves `n` consecutive fresh chunks for an index table (`grow.rs`):
    /// the granule of the first, or `None` if the arena's reservation has
    /// fewer left. Their memory is the caller's to commit.
    pub(crate) fn carve_run(&self, n: u64) -> Option<u64> {
        let w = self.r.word(H_CHUNKS_CARVED)?;
        let mut cur = w.load(Ordering::Relaxed); // Relaxed: a counter; the CAS decides.
        loop {
            if cur.checked_add(n)? > self.g.nchunks() {
                return None;
            }
            // Relaxed: the chunks' memory is untouched; nothing to order.
            match w.compare_exchange_weak(cur, cur + n, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(cur << self.g.chunk_order),
                Err(seen) => cur = seen,
            }
        }
    }

    /// Keeps the first block of `to` inside the block `granule` of order
    /// `from`, and frees the rest as blocks of orders `to..from`.
    fn split(&self, granule: u64, from: u32, to: u32, shard: u64) -> u64 {
        for o in (to..from).rev() {
            self.push(granule + (1u64 << o), o, shard);
        }
        granule
    }

    /// Pops a block of `order`, from `shard` first, then from the others.
    fn pop_any(&self, order: u32, shard: u64) -> Result<Option<u64>, Corrupt> {
        for i in 0..FREE_SHARDS {
            if let Some(g) = self.pop(order, shard + i)? {
                return Ok(Some(g));
            }
        }
        Ok(None)
    }

    /// Takes a block of `order`. `Ok(None)` means the arena is full even after
    /// defragmentation (or the order exceeds a chunk), or /dev/shm could not
    /// give the block's memory ([`short_of_shm`] then says so).
    pub(crate) fn alloc(&self, order: u32, me: &Holder) -> Result<Option<u64>, Corrupt> {
        clear_short_of_shm();
        if order > self.g.chunk_order {
            return Ok(None);
        }
        let lock = self.r.word(H_DEFRAG_LOCK).ok_or(Corrupt("header"))?;
        let epoch = self.r.word(H_DEFRAG_EPOCH).ok_or(Corrupt("header"))?;
        let mut after = None;
        loop {
            if let Some(g) = self.take(order, me.shard())? {
                // Release fence: see the module docs; the caller stores into
                // the block next.
                fence(Ordering::Release);
                return Ok(Some(g));
            }
            if let Some(seen) = after {
                // Our take after a defragmentation failed. If another one
                // ran meanwhile, it had drained every list into its own
                // memory, so what we saw empty may have been in transit:
                // then wait for it and look again. Acquire (both): pairs
                // with the Release unlock and epoch bump of a defragmenter
                // (a drain that emptied a list we saw empty happened after
                // its lock was taken: `pop`'s Release).
                if lock.load(Ordering::Acquire) == 0 && epoch.load(Ordering::Acquire) == seen {
                    return Ok(None);
                }
            }
            self.defragment(me)?;
            // Acquire: pairs with the Release bump of the defragmentation
            // that produced this value: its pushes are visible to our take.
            after = Some(epoch.load(Ordering::Acquire));
        }
    }

    /// Commits what splitting block `granule` of order `from` down to
    /// `to` touches: the kept block, and the link word of every half
    /// pushed. `false` (and a note for [`short_of_shm`]) if /dev/shm has no
    /// room.
    fn commit_split(&self, granule: u64, from: u32, to: u32) -> bool {
        let c = Commits::new(self.r, self.g);
        let ok =
            c.ensure_block(granule, to) && (to..from).all(|o| c.ensure_link(granule + (1u64 << o)));
        if !ok {
            note_short_of_shm();
        }
        ok
    }

    fn take(&self, order: u32, shard: u64) -> Result<Option<u64>, Corrupt> {
        if let Some(g) = self.pop_any(order, shard)? {
            if Commits::new(self.r, self.g).ensure_block(g, order)
                || self.commit_split(g, order, order)
            {
                return Ok(Some(g));
            }
            // Its link word was stored while it was listed: it goes back.
            self.push(g, order, shard);
            return Ok(None);
        }
        for larger in order + 1..=self.g.chunk_order {
            if let Some(g) = self.pop_any(larger, shard)? {
                if self.commit_split(g, larger, order) {
                    return Ok(Some(self.split(g, larger, order, shard)));
                }
                self.push(g, larger, shard);
                return Ok(None);
            }
        }
        Ok(self
            .carve(order)
            .map(|g| self.split(g, self.g.chunk_order, order, shard)))
    }

    /// Returns a block to a free list (the handle's own shard).
    pub(crate) fn free(&self, granule: u64, order: u32, me: &Holder) {
        self.push(granule, order, me.shard());
    }

    /// Returns blocks of one order to a free list (the handle's own shard)
    /// with one compare-and-swap for all of them.
    pub(crate) fn free_all(&self, granules: &[u64], order: u32, me: &Holder) {
        self.push_all(granules, order, me.shard());
    }

    /// Merges free buddies. If another process is defragmenting, waits for it
    /// instead (its result serves us too).
    fn defragment(&self, me: &Holder) -> Result<(), Corrupt> {
        let lock = self.r.word(H_DEFRAG_LOCK).ok_or(Corrupt("header"))?;
        let epoch = self.r.word(H_DEFRAG_EPOCH).ok_or(Corrupt("header"))?;
        if !lockword::try_lock(lock, me) {
            let mut backoff = Backoff::new();
            loop {
                let seen = lock.load(Ordering::Acquire); // Acquire: pairs with unlock.
                if seen == 0
                    || (backoff.snooze() && lockword::clear_if_dead(self.r, lock, seen, me))
                {
                    return Ok(());
                }
            }
        }
        let result = self.merge_all(me.shard());
        // Release: pairs with the Acquire loads in `alloc`: whoever sees
        // the new epoch sees the merged blocks pushed back.
        epoch.fetch_add(1, Ordering::Release);
        lockword::unlock(lock, me);
        result
    }

    fn merge_all(&self, shard: u64) -> Result<(), Corrupt> {
        let top = self.g.chunk_order;
        let max_blocks = self.g.arena_bytes / GRANULE;
        let mut by_order: Vec<Vec<u64>> = vec![Vec::new(); top as usize + 1];
        let mut result = Ok(());
        'drain: for o in 0..=top {
            loop {
                match self.pop_any(o, shard) {
                    Ok(Some(g)) => by_order[o as usize].push(g),
                    Ok(None) => break,
                    Err(e) => {
                        result = Err(e);
                        break 'drain;
                    }
                }
                if by_order[o as usize].len() as u64 > max_blocks {
                    result = Err(Corrupt("free list longer than the arena (a cycle)"));
                    break 'drain;
                }
            }
        }
        for o in 0..top as usize {
            let mut list = std::mem::take(&mut by_order[o]);
            list.sort_unstable();
            list.dedup();
            let mut i = 0;
            while i < list.len() {
                let g = list[i];
                if g & (1 << o) == 0 && list.get(i + 1) == Some(&(g + (1 << o))) {
                    by_order[o + 1].push(g);
                    i += 2;
                } else {
                    self.push(g, o as u32, shard);
                    i += 1;
                }
            }
        }
        let mut last = std::mem::take(&mut by_order[top as usize]);
        last.sort_unstable();
        last.dedup();
        for g in last {
            self.push(g, top, shard);
        }
        result
    }

    /// Free blocks per order (a snapshot; exact only when the arena is quiet).
    pub(crate) fn free_counts(&self) -> Vec<u64> {
        let max_blocks = self.g.arena_bytes / GRANULE;
        (0..=self.g.chunk_order)
            .map(|o| {
                let mut n = 0;
                for shard in 0..FREE_SHARDS {
                    // Acquire: pairs with push's Release, so links are visible.
                    let mut cur = self.head(o, shard).load(Ordering::Acquire).top & LINK_MASK;
                    while cur != 0 && n <= max_blocks {
                        n += 1;
                        cur = match self.block(cur - 1, o) {
                            Some(w) => w[0].load(Ordering::Relaxed) & LINK_MASK,
                            None => 0,
                        };
                    }
                }
                n
            })
            .collect()
    }

    /// Calls `f(granule, order)` for every block on every free list. Stops
    /// with an error at a link that is out of bounds or a list longer than
    /// the arena could hold (a cycle). Exact only while no one allocates or
    /// frees (`check()` runs it with the write gate closed).
    pub(crate) fn for_each_free(&self, mut f: impl FnMut(u64, u32)) -> Result<(), Corrupt> {
        let max_blocks = self.g.arena_bytes / GRANULE;
        for o in 0..=self.g.chunk_order {
            for shard in 0..FREE_SHARDS {
                // Acquire: pairs with push's Release, so links are visible.
                let mut cur = self.head(o, shard).load(Ordering::Acquire).top & LINK_MASK;
                let mut n = 0;
                while cur != 0 {
                    n += 1;
                    if n > max_blocks {
                        return Err(Corrupt("free list longer than the arena (a cycle)"));
                    }
                    let w = self
                        .block(cur - 1, o)
                        .ok_or(Corrupt("free-list entry out of bounds"))?;
                    f(cur - 1, o);
                    cur = w[0].load(Ordering::Relaxed) & LINK_MASK; // Relaxed: after the Acquire above.
                }
            }
        }
        Ok(())
    }

    /// Chunks carved so far.
    pub(crate) fn chunks_carved(&self) -> u64 {
        self.r
            .word(H_CHUNKS_CARVED)
            .map_or(0, |w| w.load(Ordering::Relaxed).min(self.g.nchunks())) // Relaxed: a statistic.
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn setup(arena: u64) -> (Region, Geometry) {
        let g = Geometry::new(16, arena).unwrap();
        (Region::heap(g.total_bytes as usize), g)
    }

    #[test]
    fn blocks_are_aligned_disjoint_and_reused() {
        let (r, g) = setup(64 * 1024);
        let s = Slab::new(&r, &g);
        let me = &Holder::new(crate::shm::attach::Token(1));
        let mut used = Vec::new();
        for &o in [0u32, 3, 1, 0, 2, 5].iter().cycle() {
            match s.alloc(o, me).unwrap() {
                Some(b) => {
                    assert_eq!(b % (1 << o), 0, "block of order {o} misaligned");
                    used.push((b, b + (1 << o), o));
                }
                None => break,
            }
        }
        used.sort_unstable();
        for w in used.windows(2) {
            assert!(w[0].1 <= w[1].0, "blocks overlap: {:?}", w);
        }
        let n = used.len();
        for &(b, _, o) in &used {
            s.free(b, o, me);
        }
        let mut again = 0;
        for &(_, _, o) in &used {
            again += s.alloc(o, me).unwrap().is_some() as usize;
        }
        assert_eq!(again, n, "every freed block is reusable");
    }

    #[test]
    fn full_then_freed_small_blocks_merge_into_a_chunk() {
        let (r, g) = setup(64 * 1024);
        let s = Slab::new(&r, &g);
        let me = &Holder::new(crate::shm::attach::Token(1));
        let mut small = Vec::new();
        while let Some(b) = s.alloc(0, me).unwrap() {
            small.push(b);
        }
        assert_eq!(
            small.len() as u64,
            g.arena_bytes / GRANULE,
            "every granule used"
        );
        assert_eq!(s.alloc(g.chunk_order, me).unwrap(), None, "full");
        for b in small {
            s.free(b, 0, me);
        }
        for _ in 0..g.nchunks() {
            assert!(
                s.alloc(g.chunk_order, me).unwrap().is_some(),
                "freed space merges back"
            );
        }
        assert_eq!(s.alloc(0, me).unwrap(), None);
    }

    #[test]
    fn corrupt_free_list_is_reported_not_followed() {
        let (r, g) = setup(64 * 1024);
        let s = Slab::new(&r, &g);
        r.pair(FREE_OFF)
            .unwrap()
            .store(u32::MAX as u128, Ordering::Relaxed);
        assert!(s
            .alloc(0, &Holder::new(crate::shm::attach::Token(1)))
            .is_err());
    }
}

#[cfg(all(test, not(loom)))]
mod tag_tests {
    //! Regression (issue 10, item 5): the free-list tag was 32 bits, in one
    //! word with the top. A `pop` that read the top and its link, then
    //! stalled while 2^32 pushes and pops went by, found the head value it
    //! had read (same top, same tag after the wrap) with a different list
    //! under it; its CAS succeeded and installed a stale link, so a block
    //! still in use went back on the list: one block, two owners.

    use super::*;

    /// The stalled pop, replayed on a head whose tag is about to wrap at
    /// 32 bits: the popper reads head `h` and the link of the top block;
    /// meanwhile the top is popped (and kept by its new owner), its link
    /// block popped too, and the top pushed back after 2^32 - 2 other
    /// operations, leaving top and low 32 tag bits as the popper saw them.
    #[test]
    fn a_stalled_pop_does_not_succeed_after_the_tag_wraps_32_bits() {
        let g = Geometry::new(16, 64 * 1024).unwrap();
        let r = Region::heap(g.total_bytes as usize);
        let s = Slab::new(&r, &g);
        let me = &Holder::new(crate::shm::attach::Token(1));
        let (a, b) = (
            s.alloc(0, me).unwrap().unwrap(),
            s.alloc(0, me).unwrap().unwrap(),
        );
        let shard = me.shard();
        s.push(b, 0, shard);
        s.push(a, 0, shard); // list: a -> b
        let head = s.head(0, shard);
        // The popper's reads.
        let seen = head.load(Ordering::Acquire);
        assert_eq!(seen.top, a + 1);
        let next = s.block(a, 0).unwrap()[0].load(Ordering::Relaxed);
        assert_eq!(next, b + 1);
        // Meanwhile: `a` and `b` popped (b stays in use), `a` pushed back.
        assert_eq!(s.pop(0, shard), Ok(Some(a)));
        assert_eq!(s.pop(0, shard), Ok(Some(b)));
        s.push(a, 0, shard); // list: a, its link now 0
                             // ... and 2^32 - 3 further operations, as far as the tag goes.
        let now = head.load(Ordering::Relaxed);
        let wrapped = Head {
            top: now.top,
            tag: now.tag + (1u64 << 32) - 3,
        };
        assert!(head
            .compare_exchange_weak(now, wrapped, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok());
        let now = head.load(Ordering::Relaxed);
        assert_eq!(now.top, seen.top, "the same top");
        assert_eq!(now.tag as u32, seen.tag as u32, "the same 32-bit tag");
        // The stalled popper's CAS: with a 32-bit tag it succeeded and made
        // `b` (in use) the top of the list.
        let stale =
            head.compare_exchange_weak(seen, seen.next(next), Ordering::Acquire, Ordering::Acquire);
        assert!(stale.is_err(), "a stale pop succeeded");
        assert_eq!(s.pop(0, shard), Ok(Some(a)));
        assert_eq!(s.pop(0, shard), Ok(None), "b is not on the list");
    }
}

#[cfg(all(test, not(loom)))]
mod chain_tests {
    use super::*;

    /// `free_all` pushes a chain with one CAS: every block comes back
    /// exactly once, in the order one-by-one pushes would give (the tuple
    /// space's full-arena drain depends on that order), and what was on the
    /// list before stays under it.
    #[test]
    fn free_all_returns_each_block_once() {
        let g = Geometry::new(16, 64 * 1024).unwrap();
        let r = Region::heap(g.total_bytes as usize);
        let s = Slab::new(&r, &g);
        let me = &Holder::new(crate::shm::attach::Token(1));
        let before = s.alloc(0, me).unwrap().unwrap();
        let blocks: Vec<u64> = (0..10).map(|_| s.alloc(0, me).unwrap().unwrap()).collect();
        // What splitting the carved chunk left on the list: not ours here.
        while let Ok(Some(_)) = s.pop(0, me.shard()) {}
        s.free(before, 0, me);
        s.free_all(&blocks, 0, me);
        s.free_all(&[], 0, me);
        let mut back = Vec::new();
        while let Ok(Some(b)) = s.pop(0, me.shard()) {
            back.push(b);
        }
        // As if pushed one by one: the last on top, the earlier list below.
        let mut want: Vec<u64> = blocks.iter().rev().copied().collect();
        want.push(before);
        assert_eq!(back, want);
    }
}
