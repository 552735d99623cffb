//! `ShmDict::check`: a consistency check of a live segment that also repairs
//! what dead processes left behind.
//!
//! With the write gate closed (`gate.rs`) no live process is inside a write
//! operation, so the index, the counters and the arena can be compared
//! exactly:
//!
//! - a slot still WRITING, or a bucket's insert lock or the defragmentation
//!   lock still held, belongs to a dead process: released (a dead
//!   handle's pending change of the key count, `livecount.rs`, is first
//!   settled from the slot it still holds, so `len()`, exact without
//!   `check()`, stays exact);
//! - the capacity counter (`H_LIVE`) and each bucket's overflow count are recomputed
//!   from the entries actually present (a process killed inside an insert or
//!   a removal can leave them too high, never too low): corrected;
//! - every arena granule must be in exactly one place: a published block, a
//!   free list, or an untouched chunk. Granules in none of them were taken by
//!   a process that died before publishing, or unpublished by one that died
//!   before recording them as retired, or drained by one that died
//!   defragmenting: they are reclaimed as the largest buddy-aligned blocks
//!   that fit, retired rather than freed (a borrowed read may still hold
//!   an unpublished one; `epoch.rs`).
//!
//! Anything else (an entry naming an invalid block, overlapping blocks, a
//! broken free list) is corruption this code does not try to fix: it is
//! reported in `problems`, and leaked blocks are then not reclaimed, since
//! the accounting they rely on is unreliable.
//!
//! Readers are never stopped. Writers wait while the gate is closed. User
//! code never runs inside the gate (`update`'s closure runs before its write
//! enters it), so only the library's own work is waited for; if live
//! handles have not all left their write operations after about a second in
//! all (a stopped process, say; the budget is shared by all the handles
//! waited for, not one per handle), `check` gives up on repairs, reopens the
//! gate and says so in `skipped`.

use std::fmt;

use crate::dict::ShmDict;
use crate::error::Result;
use crate::shm::attach;
use crate::shm::gate::{self, Busy};
use crate::shm::layout::{
    Entry, B_LOCK, B_OVERFLOW, GRANULE, H_DEFRAG_LOCK, H_LIVE, SLOTS_PER_BUCKET,
};
use crate::shm::seqlock;
use crate::sync::Ordering;

/// Backoff steps `check` waits, in all (one budget shared by every handle
/// it waits for, not one per handle), for live handles to leave their write
/// operations: 2,048 yields, then 5,000 sleeps of at least 200 µs, so a
/// little over one second (see `lockword::Backoff` and `gate::close`).
const WRITER_WAIT_STEPS: u32 = 2048 + 5000;

/// What [`ShmDict::check`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckReport {
    /// The segment's name.
    pub segment: String,
    /// Keys found in the index.
    pub keys: u64,
    /// The capacity counter (new keys reserve a place in it) before the
    /// check; it equals `keys` afterwards, if repairs ran. A writer killed
    /// inside a new-key insert or a removal can leave it one too high.
    /// (`len()` does not read it: it is exact without `check()`.)
    pub counter_before: u64,
    /// Slots a dead writer left WRITING, released.
    pub slots_released: u64,
    /// Changes of the key count that dead writers had recorded and not
    /// finished, settled (applied if published, dropped otherwise; `len()`
    /// already counted them correctly).
    pub pending_counts_settled: u64,
    /// Insert or defragmentation locks a dead process left held, released.
    pub locks_released: u64,
    /// Buckets whose overflow count was wrong, corrected.
    pub overflow_counts_fixed: u64,
    /// Arena bytes in published blocks.
    pub bytes_in_use: u64,
    /// Arena bytes on the free lists (after reclamation).
    pub bytes_free: u64,
    /// Arena bytes never carved yet.
    pub bytes_untouched: u64,
    /// Arena bytes holding index tables of later generations (current,
    /// older, or taken by a grower that was killed: `grow.rs`). In use,
    /// free, untouched, retired and these add up to the arena.
    pub bytes_index: u64,
    /// Blocks left by dead processes, reclaimed: retired, so that they are
    /// freed once no borrowed read can see them (a writer killed between
    /// unpublishing a value and recording it leaves a block a reader may
    /// still hold), or freed at once if the arena has no room to record
    /// them. `bytes_free` and `bytes_retired` count them where they went.
    pub leaked_blocks_reclaimed: u64,
    /// Their total size in bytes.
    pub leaked_bytes_reclaimed: u64,
    /// Arena bytes of replaced or removed values waiting until no borrowed
    /// read can see them (`Stats::retired_bytes`), plus the bags that list
    /// them.
    pub bytes_retired: u64,
    /// Borrowed reads held by live processes.
    pub pins: u64,
    /// How long the oldest of them has been held.
    pub oldest_pin_age: Option<std::time::Duration>,
    /// Attached handles whose process runs.
    pub handles_live: u64,
    /// Attach entries left by processes that died without detaching.
    pub handles_dead: u64,
    /// Corruption found and not repaired. Empty if the segment is sound.
    pub problems: Vec<String>,
    /// Why repairs were skipped, if they were (the figures above are then
    /// a snapshot of a segment in use, not exact).
    pub skipped: Option<String>,
}

impl CheckReport {
    /// Whether no corruption was found. (Crash leftovers that were repaired
    /// do not count as problems.)
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// Whether anything was repaired.
    pub fn repaired(&self) -> bool {
        self.slots_released
            + self.pending_counts_settled
            + self.locks_released
            + self.overflow_counts_fixed
            + self.leaked_blocks_reclaimed
            > 0
            || (self.skipped.is_none() && self.counter_before != self.keys)
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if !self.is_ok() {
            "CORRUPT"
        } else if self.repaired() {
            "ok (repaired)"
        } else {
            "ok"
        };
        writeln!(f, "segment {}: {verdict}", self.segment)?;
        writeln!(
            f,
            "  keys: {} (counter was {})",
            self.keys, self.counter_before
        )?;
        writeln!(
            f,
            "  arena: {} bytes in use, {} free, {} untouched, {} retired, {} index tables",
            self.bytes_in_use,
            self.bytes_free,
            self.bytes_untouched,
            self.bytes_retired,
            self.bytes_index
        )?;
        if let Some(age) = self.oldest_pin_age {
            writeln!(
                f,
                "  borrowed reads: {} held, the oldest for {:.1} s",
                self.pins,
                age.as_secs_f64()
            )?;
        }
        writeln!(
            f,
            "  repaired: {} slots released, {} pending counts settled, {} locks released, {} overflow counts fixed, {} leaked blocks ({} bytes) reclaimed",
            self.slots_released,
            self.pending_counts_settled,
            self.locks_released,
            self.overflow_counts_fixed,
            self.leaked_blocks_reclaimed,
            self.leaked_bytes_reclaimed
        )?;
        write!(
            f,
            "  handles: {} live, {} dead",
            self.handles_live, self.handles_dead
        )?;
        if let Some(s) = &self.skipped {
            write!(f, "\n  repairs skipped: {s}")?;
        }
        for p in &self.problems {
            write!(f, "\n  problem: {p}")?;
        }
        Ok(())
    }
}

/// Which arena granules are accounted for.
struct Granules {
    bits: Vec<u64>,
    overlaps: u64,
}

impl Granules {
    fn new(n: u64) -> Granules {
        Granules {
            bits: vec![0; n.div_ceil(64) as usize],
            overlaps: 0,
        }
    }

    /// Marks `[start, start + len)`; counts granules already marked.
    fn mark(&mut self, start: u64, len: u64) {
        for g in start..start + len {
            let (w, b) = ((g / 64) as usize, g % 64);
            if let Some(word) = self.bits.get_mut(w) {
                if *word & 1 << b != 0 {
                    self.overlaps += 1;
                }
                *word |= 1 << b;
            }
        }
    }

    fn is_marked(&self, g: u64) -> bool {
        self.bits
            .get((g / 64) as usize)
            .is_some_and(|w| w & 1 << (g % 64) != 0)
    }
}

impl ShmDict {
    /// Checks the segment's consistency and repairs what processes killed in
    /// the middle of an operation left behind: slots and locks still held,
    /// counters off by the interrupted operation, and arena blocks that were
    /// taken or unpublished but never published or recorded (which are
    /// retired, and freed once no borrowed read can see them). See
    /// [`CheckReport`].
    ///
    /// Runs on a live segment. Readers are not stopped; writers in all
    /// processes pause while it runs (it takes time proportional to the
    /// capacity plus the arena size: about 0.2 ms for a 1 MiB arena, 45 ms
    /// for a 1 GiB arena with a million-key index, in a release build).
    /// Before it scans, `check` waits for the write operations in flight to
    /// finish (never for user code: `update` closures run outside them); if
    /// they have not all finished after a little over a second in all (one
    /// budget for all handles, not per handle; a stopped process, say),
    /// repairs are skipped and [`CheckReport::skipped`] says why.
    ///
    /// `Ok` even when corruption is found: see [`CheckReport::is_ok`].
    pub fn check(&self) -> Result<CheckReport> {
        let reg = self.registration()?;
        let live = |i: u64| attach::entry_alive(&self.region, reg.lock_fd, i);
        let closed = gate::close(&self.region, &reg.local, live, WRITER_WAIT_STEPS);
        let skipped = match &closed {
            Ok(_) => None,
            Err(Busy::OtherChecker) => Some("another process is checking the segment".to_owned()),
            Err(Busy::Writer(i)) => Some(format!(
                "the process of handle {i} stayed inside a write operation past the wait budget of about a second (stopped?)"
            )),
        };
        let mut report = self.scan(skipped.is_none());
        report.skipped = skipped;
        drop(closed);
        Ok(report)
    }

    /// Returns a leaked block to use. A writer killed between unpublishing a
    /// value and recording it as retired leaks a block that a borrowed read
    /// may still hold, so leaked blocks are retired (freed once no pin can
    /// see them), not freed; only when even that needs room the arena does
    /// not have are they freed at once.
    fn reclaim_leaked(&self, granule: u64, order: u32) {
        let reg = self.me.registered();
        let e = crate::shm::layout::Entry::new(granule as u32, order, 0);
        let ep = self.epochs();
        let alive = |i: u64| self.entry_alive(i);
        if !matches!(ep.ensure_spare(reg.index, &reg.local, &alive), Ok(true))
            || ep.retire(reg.index, e, &reg.local, &alive).is_err()
        {
            self.slab().free(granule, order, &self.me);
        }
    }

    /// The scan behind `check`; repairs only if `repair` (the gate is closed).
    fn scan(&self, repair: bool) -> CheckReport {
        let (handles_live, handles_dead) =
            attach::census(&self.region, self.me.registered().lock_fd);
        let held = self.epochs().held(&|i| self.entry_alive(i));
        let mut rep = CheckReport {
            segment: self.name.clone(),
            handles_live,
            handles_dead,
            pins: held.pins,
            oldest_pin_age: held.oldest_pin_age(),
            ..CheckReport::default()
        };
        if repair {
            // A grower killed after its flip left the old table unsealed
            // (`grow.rs`): seal it before anything else is repaired.
            if let Err(c) = self.step().seal_if_needed() {
                rep.problems.push(format!("index generations: {}", c.0));
            }
        }
        let index = self.index();
        let slab = self.slab();
        let nb = index.table().nbuckets;
        let mask = nb - 1;
        // Only carved chunks can hold blocks: the rest of a growing
        // dictionary's reservation is not even looked at.
        let ngranules = slab.chunks_carved() << self.geo.chunk_order;
        let mut granules = Granules::new(ngranules);
        let mut overflow = vec![0u64; nb as usize];
        if repair {
            // Before any slot is released below: a dead writer's record is
            // settled from the state of the slot it still holds.
            rep.pending_counts_settled = crate::shm::livecount::settle_all_dead(&self.region);
        }
        let live_word = self.region.word(H_LIVE);
        // Relaxed: with the gate closed nobody writes it; otherwise a snapshot.
        rep.counter_before = live_word.map_or(0, |w| w.load(Ordering::Relaxed));

        for b in 0..nb {
            let lock = index.bucket_word(b, B_LOCK);
            // Acquire: what a (dead) holder wrote before is visible.
            let l = lock.load(Ordering::Acquire);
            if l != 0 && repair {
                // No live process is inside an insert: the holder is dead.
                // AcqRel: as lockword::clear_if_dead.
                if lock
                    .compare_exchange(l, 0, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    rep.locks_released += 1;
                }
            }
            for s in 0..SLOTS_PER_BUCKET {
                let (ctrl, entry) = index.slot(b, s);
                let c = ctrl.load(Ordering::Acquire); // Acquire: as seqlock::read_begin.
                if seqlock::is_writing(c) && repair {
                    // Its writer is dead (no live one is inside an operation);
                    // the entry word is the old or the new block, complete.
                    // AcqRel: as seqlock::wait_unlocked.
                    if ctrl
                        .compare_exchange(
                            c,
                            seqlock::released(c),
                            Ordering::AcqRel,
                            Ordering::Relaxed,
                        )
                        .is_ok()
                    {
                        rep.slots_released += 1;
                    }
                }
                let e = Entry(entry.load(Ordering::Acquire)); // Acquire: as Index::find.
                if e.0 == Entry::EMPTY {
                    continue;
                }
                let Some(words) = index.block_of(e) else {
                    rep.problems.push(format!(
                        "bucket {b} slot {s} names an invalid block (granule {}, order {})",
                        e.granule(),
                        e.order()
                    ));
                    continue;
                };
                // Relaxed: the block is published (or the scan is a snapshot).
                let hash = words[1].load(Ordering::Relaxed);
                let size = GRANULE << e.order();
                // The lengths must fit the block (`block.rs` owns its layout).
                if crate::shm::block::lengths(words).is_none() || Entry::tag_of(hash) != e.tag() {
                    if repair {
                        rep.problems.push(format!(
                            "bucket {b} slot {s}: the block's lengths or hash do not match its entry"
                        ));
                    }
                    continue;
                }
                rep.keys += 1;
                rep.bytes_in_use += size;
                granules.mark(e.granule() as u64, 1 << e.order());
                let home = hash & mask;
                let dist = b.wrapping_sub(home) & mask;
                for k in 0..dist {
                    overflow[((home + k) & mask) as usize] += 1;
                }
            }
        }
        if !repair {
            // Without the gate the rest would only race with writers.
            rep.bytes_untouched =
                (self.geo.nchunks() - slab.chunks_carved()) * (GRANULE << self.geo.chunk_order);
            return rep;
        }
        for (b, &want) in overflow.iter().enumerate() {
            let w = index.bucket_word(b as u64, B_OVERFLOW);
            // SeqCst: as every overflow-count access (Index::find).
            if w.load(Ordering::SeqCst) != want {
                w.store(want, Ordering::SeqCst);
                rep.overflow_counts_fixed += 1;
            }
        }
        if rep.counter_before != rep.keys {
            if let Some(w) = live_word {
                w.store(rep.keys, Ordering::Relaxed); // Relaxed: a counter.
            }
        }
        if let Some(d) = self.region.word(H_DEFRAG_LOCK) {
            // Defragmentation runs inside a write operation: a held lock is
            // a dead process's. AcqRel: as lockword::clear_if_dead.
            let v = d.load(Ordering::Acquire);
            if v != 0
                && d.compare_exchange(v, 0, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                rep.locks_released += 1;
            }
        }

        let carved_granules = ngranules;
        rep.bytes_untouched =
            (self.geo.arena_bytes / GRANULE).saturating_sub(carved_granules) * GRANULE;
        // Index tables carved from the arena (`grow.rs`) are not blocks.
        for (start, len) in crate::shm::grow::carved_tables(&self.region, &self.geo) {
            granules.mark(start, len);
            rep.bytes_index += len * GRANULE;
        }
        // Commits killed between counting a unit and marking it left the
        // count too high: recount it from the commit table.
        let commits = crate::shm::commit::Commits::new(&self.region, &self.geo);
        commits.set_committed(commits.recount());
        let mut free_bytes = 0;
        if let Err(c) = slab.for_each_free(|g, o| {
            granules.mark(g, 1 << o);
            free_bytes += GRANULE << o;
        }) {
            rep.problems.push(format!("free lists: {}", c.0));
        }
        // Retired blocks, and the bags that list them, wait in the stashes
        // for borrowed readers (`epoch.rs`).
        let mut retired_bytes = 0;
        if let Err(c) = self.epochs().for_each_held(|g, o| {
            granules.mark(g, 1 << o);
            retired_bytes += GRANULE << o;
        }) {
            rep.problems.push(format!("retired blocks: {}", c.0));
        }
        rep.bytes_retired = retired_bytes;
        if granules.overlaps > 0 {
            rep.problems.push(format!(
                "{} arena granules are in two places at once (published twice, or published and free)",
                granules.overlaps
            ));
        }
        if rep.problems.is_empty() {
            // Return each maximal run of unaccounted granules as the largest
            // buddy-aligned blocks that fit.
            let mut g = 0;
            while g < carved_granules {
                if granules.is_marked(g) {
                    g += 1;
                    continue;
                }
                let mut order = 0;
                while order < self.geo.chunk_order {
                    let next = 1u64 << (order + 1);
                    if g % next != 0
                        || g + next > carved_granules
                        || (g..g + next).any(|x| granules.is_marked(x))
                    {
                        break;
                    }
                    order += 1;
                }
                self.reclaim_leaked(g, order);
                rep.leaked_blocks_reclaimed += 1;
                rep.leaked_bytes_reclaimed += GRANULE << order;
                g += 1 << order;
            }
        }
        if rep.leaked_blocks_reclaimed > 0 {
            // Leaked blocks were retired (or, short of room, freed), and
            // retiring them may have taken a spill bag or freed older
            // retired blocks: count again what is free and what is held,
            // so the figures are those the repairs left (the gate is still
            // closed: nothing else moves them).
            free_bytes = 0;
            let _ = slab.for_each_free(|_, o| free_bytes += GRANULE << o);
            retired_bytes = 0;
            let _ = self
                .epochs()
                .for_each_held(|_, o| retired_bytes += GRANULE << o);
            rep.bytes_retired = retired_bytes;
        }
        rep.bytes_free = free_bytes;
        rep
    }
}
