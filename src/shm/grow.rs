//! Growth while attached: the index doubles, the arena extends into its
//! reservation, and no process detaches (issue 12; docs/design.md,
//! "Growth").
//!
//! # The reservation
//!
//! A dictionary that may grow is one segment file whose size is a
//! reservation: the arena extends to the most the dictionary may ever take
//! (`Options::max_bytes`, else the size of the /dev/shm file system, at
//! most 128 GiB). The file is sparse and memory is committed in units as it
//! is first used (`commit.rs`), so the reservation costs address space, not
//! memory; every process maps all of it when it attaches, so growth never
//! maps, moves or unmaps anything. The arena grows simply by carving chunks
//! further into the reservation (`slab.rs`).
//!
//! # Index generations
//!
//! The index of generation `g` has `nbuckets << g` buckets for
//! `capacity << g` keys. Generation 0 is the table after the commit table;
//! every later one is taken from the arena (a block, if it is no larger
//! than a chunk, else a run of fresh chunks), and its record in the
//! header's growth log says where:
//!
//! | bytes  | growth record of generation `g` (`H_GROWTH_LOG + 32 g`)         |
//! |--------|------------------------------------------------------------------|
//! | 0..8   | state: `granule << 2 \| COPYING \| CARVED` (0 for generation 0) |
//! | 8..16  | when it became current (ns since the Unix epoch)               |
//! | 16..24 | pid of the process that grew it                                 |
//! | 24..32 | keys it started with                                             |
//!
//! `H_TABLES` names the current generation (bits 0..8) and whether the
//! previous table is still to be sealed (`UNSEALED`).
//!
//! # The growth step
//!
//! A writer whose new key finds the current table at capacity leaves the
//! write gate and calls [`grow`]. With the gate closed (`gate.rs`: no live
//! process is inside a write operation) it:
//!
//! 1. seals the previous table if a killed grower left it unsealed (below);
//! 2. takes the next table from the arena and records it (`CARVED`), or
//!    takes the one a killed grower recorded; zeroes it if it is a recycled
//!    block or that grower had begun copying (`COPYING`); commits its
//!    memory;
//! 3. copies every entry of the current table into it (the table is
//!    invisible until step 4, so plain stores suffice);
//! 4. *flips*: stores the new generation in `H_TABLES` with `UNSEALED`
//!    (Release: a process that sees the generation sees the whole table);
//! 5. *seals* the old table: stores [`MOVED`] in the control word of every
//!    slot that holds an entry, then clears `UNSEALED`;
//! 6. reopens the gate.
//!
//! Entries, blocks and the old table's memory stay where they are: the old
//! table is never written again (but for the marks) and never freed, so a
//! reader still probing it reads memory that stays valid.
//!
//! # What readers see
//!
//! Readers never enter the gate and never wait. Until the flip the current
//! table is complete and unchanged (no writer runs). A copying reader that
//! loaded the old generation may read the old table after the flip: until
//! the gate reopens nothing changes (the tables agree), and after the seal
//! every slot it could find a key in is `MOVED`. The seqlock does the rest:
//! a read that began before a slot's mark fails validation, and one that
//! sees the mark restarts from `H_TABLES`, so no block recycled after the
//! gate reopened is ever returned as valid (a writer that recycles a block
//! entered the gate after the seal, and the recycling's Release fence pairs
//! with the reader's Acquire fence in `seqlock::read_validate`). A borrowed
//! read (`Index::find_pinned`) needs no mark: its pin's SeqCst fence comes
//! before its load of `H_TABLES`, so if that load saw the old generation,
//! the pin's fence precedes, in the single SeqCst order, the fence of any
//! retire that happens after the flip (C++20 [atomics.order] p4.4), and
//! `epoch.rs` keeps the block until the pin is released.
//!
//! # A grower killed at any instruction
//!
//! - Before the flip: `H_TABLES` still names the old table, which is
//!   complete. The gate word names a dead holder, and the next writer takes
//!   the gate over (`lockword::clear_if_dead`) and goes on in the old table.
//!   The next grower finds the carved table in the log and reuses it
//!   (zeroing it first if copying had begun): the step is rolled back.
//! - After the flip: the new table is complete. Every writer checks
//!   `UNSEALED` when it enters the gate, and seals the old table itself
//!   before it writes anything (sealing is idempotent, so many may do it at
//!   once): the step is rolled forward.

use crate::shm::layout::{
    Geometry, BUCKET_BYTES, GRANULE, GROWTH_RECORD_BYTES, H_GROWTH_LOG, H_TABLES, MAX_GENERATIONS,
};
use crate::shm::region::Region;
use crate::shm::slab::Corrupt;
use crate::sync::Ordering;

/// `H_TABLES`: the current generation.
const GEN_MASK: u64 = 0xff;
/// `H_TABLES`: the previous table's slots are not all marked `MOVED` yet.
pub(crate) const UNSEALED: u64 = 1 << 8;

/// Growth record fields.
const R_STATE: u64 = 0;
const R_AT: u64 = 8;
const R_PID: u64 = 16;
const R_KEYS: u64 = 24;
/// Record state: the table's chunks are carved (the granule is valid).
const CARVED: u64 = 1;
/// Record state: a grower began copying into the table.
const COPYING: u64 = 2;

/// The control word of a slot of a table that is no longer current and
/// that held an entry when its successor was made (see the module docs):
/// WRITING, the largest short token and version, which no live slot
/// reaches while readers look (a reader that sees it merely restarts).
pub(crate) const MOVED: u64 = u64::MAX;

/// One index table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Table {
    pub(crate) gen: u32,
    /// Byte offset of bucket 0 in the segment.
    pub(crate) off: u64,
    pub(crate) nbuckets: u64,
    pub(crate) capacity: u64,
}

impl Table {
    /// Generation 0: the table after the commit table.
    #[inline]
    pub(crate) fn first(g: &Geometry) -> Table {
        Table {
            gen: 0,
            off: g.index_off,
            nbuckets: g.nbuckets,
            capacity: g.capacity,
        }
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.nbuckets * BUCKET_BYTES
    }
}

fn record_off(gen: u32) -> u64 {
    H_GROWTH_LOG + gen as u64 * GROWTH_RECORD_BYTES
}

fn record_word(r: &Region, gen: u32, field: u64) -> Option<&crate::sync::AtomicU64> {
    if gen as u64 >= MAX_GENERATIONS {
        return None;
    }
    r.word(record_off(gen) + field)
}

/// The current generation and the `UNSEALED` bit.
#[inline]
pub(crate) fn tables_word(r: &Region) -> u64 {
    // Acquire: pairs with the Release flip in `grow_locked` (the new
    // table's entries and record are visible) and with the Release that
    // clears UNSEALED (the marks are).
    r.word(H_TABLES).map_or(0, |w| w.load(Ordering::Acquire))
}

/// The table of generation `gen`, checked against the geometry.
#[inline]
pub(crate) fn table(r: &Region, g: &Geometry, gen: u32) -> Result<Table, Corrupt> {
    if gen == 0 {
        return Ok(Table::first(g));
    }
    if gen > g.max_gen {
        return Err(Corrupt("the current index generation exceeds the last"));
    }
    // Relaxed: written before the flip that made `gen` visible, and our
    // load of `H_TABLES` (Acquire) saw the flip or a later value.
    let state = record_word(r, gen, R_STATE)
        .ok_or(Corrupt("header"))?
        .load(Ordering::Relaxed);
    let t = Table {
        gen,
        off: 0,
        nbuckets: g.table_buckets(gen),
        capacity: g.table_capacity(gen),
    };
    let off = carved_off(g, state, t.bytes()).ok_or(Corrupt(
        "an index table's record names memory outside the arena",
    ))?;
    Ok(Table { off, ..t })
}

/// The segment offset of a table of `bytes` whose record state is
/// `state`, if it lies inside the arena, aligned as the allocator places
/// it (on its own size up to a chunk, else on a chunk).
fn carved_off(g: &Geometry, state: u64, bytes: u64) -> Option<u64> {
    if state & CARVED == 0 {
        return None;
    }
    let granule = state >> 2;
    let start = granule.checked_mul(GRANULE)?;
    let align = arena_bytes_of(g, bytes).min(GRANULE << g.chunk_order);
    (start % align == 0 && start.checked_add(bytes)? <= g.arena_bytes)
        .then_some(g.arena_off + start)
}

/// The arena bytes a table of `bytes` takes: a block (a power of two) up
/// to a chunk, else whole chunks.
pub(crate) fn arena_bytes_of(g: &Geometry, bytes: u64) -> u64 {
    let chunk = GRANULE << g.chunk_order;
    if bytes <= chunk {
        bytes.next_power_of_two().max(GRANULE)
    } else {
        bytes.div_ceil(chunk) * chunk
    }
}

/// Where a new table comes from (see [`Step::grow_locked`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// A block of this order from the allocator (it may hold old bytes).
    Block(u32),
    /// This many fresh chunks (zeroes).
    Chunks(u64),
}

impl Source {
    /// How a table of `bytes` is taken from the arena.
    pub(crate) fn for_table(g: &Geometry, bytes: u64) -> Source {
        let chunk = GRANULE << g.chunk_order;
        if bytes <= chunk {
            let order = (arena_bytes_of(g, bytes) / GRANULE).trailing_zeros();
            Source::Block(order)
        } else {
            Source::Chunks(bytes.div_ceil(chunk))
        }
    }
}

/// The current table.
#[inline]
pub(crate) fn current(r: &Region, g: &Geometry) -> Result<Table, Corrupt> {
    let w = tables_word(r);
    if w == 0 {
        return Ok(Table::first(g));
    }
    table(r, g, (w & GEN_MASK) as u32)
}

/// Writes generation 0's growth record (creation time and pid) into a new
/// segment's header.
pub(crate) fn log_creation(r: &Region) -> Option<()> {
    // Relaxed: the segment is not yet visible to any other process.
    record_word(r, 0, R_AT)?.store(now_nanos(), Ordering::Relaxed);
    record_word(r, 0, R_PID)?.store(std::process::id() as u64, Ordering::Relaxed);
    Some(())
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One entry of the growth history (`ShmDict::stats`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Growth {
    /// Index generation: 0 is the table the dictionary was created with.
    pub generation: u32,
    /// Keys the generation's index holds.
    pub capacity: u64,
    /// Buckets of its index.
    pub buckets: u64,
    /// When it became current (for generation 0: when the dictionary was
    /// created).
    pub at: std::time::SystemTime,
    /// The process that made it current.
    pub pid: u32,
    /// Keys present when it became current (0 for generation 0).
    pub keys: u64,
}

/// The growth history: one record per generation up to the current one.
pub(crate) fn history(r: &Region, g: &Geometry) -> Vec<Growth> {
    let cur = (tables_word(r) & GEN_MASK) as u32;
    (0..=cur.min(g.max_gen))
        .map(|gen| {
            // Relaxed: written before the flip we saw (Acquire).
            let get = |f| record_word(r, gen, f).map_or(0, |w| w.load(Ordering::Relaxed));
            Growth {
                generation: gen,
                capacity: g.table_capacity(gen),
                buckets: g.table_buckets(gen),
                at: std::time::UNIX_EPOCH + std::time::Duration::from_nanos(get(R_AT)),
                pid: get(R_PID) as u32,
                keys: get(R_KEYS),
            }
        })
        .collect()
}

/// Every table carved from the arena (current, old, or carved by a grower
/// that was killed), as (arena granule, granules): for `check()`, which
/// must not take them for leaked blocks.
pub(crate) fn carved_tables(r: &Region, g: &Geometry) -> Vec<(u64, u64)> {
    (1..=g.max_gen)
        .filter_map(|gen| {
            // Relaxed: read with the write gate closed.
            let state = record_word(r, gen, R_STATE)?.load(Ordering::Relaxed);
            let bytes = g.table_buckets(gen) * BUCKET_BYTES;
            let off = carved_off(g, state, bytes)?;
            Some((
                (off - g.arena_off) / GRANULE,
                arena_bytes_of(g, bytes) / GRANULE,
            ))
        })
        .collect()
}

/// What stops a growth step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The index is at its last generation.
    Last,
    /// The arena's reservation has no room left for the next table.
    NoChunks,
    /// /dev/shm or the budget could not give the table's memory
    /// (`commit::last_shortage` says which).
    NoMemory,
    Corrupt(Corrupt),
}

/// The parts of a dictionary a growth step needs.
pub(crate) struct Step<'a> {
    pub(crate) r: &'a Region,
    pub(crate) g: &'a Geometry,
}

impl Step<'_> {
    fn tables(&self) -> &crate::sync::AtomicU64 {
        self.r.word(H_TABLES).expect("header word")
    }

    /// Marks every slot of generation `old` that holds an entry `MOVED`,
    /// then clears `UNSEALED` if the current generation is `old + 1`.
    /// Idempotent: any writer that finds the table unsealed does it before
    /// it writes (see the module docs).
    pub(crate) fn seal(&self, old: u32) -> Result<(), Corrupt> {
        let t = table(self.r, self.g, old)?;
        let ix = crate::shm::index::Index::with_table(self.r, self.g, t);
        ix.mark_moved();
        let next = (old + 1) as u64;
        // Release: pairs with the Acquire of `tables_word`: whoever sees the
        // table sealed sees the marks. A failed exchange means another
        // sealer finished first.
        let _ = self.tables().compare_exchange(
            next | UNSEALED,
            next,
            Ordering::Release,
            Ordering::Relaxed,
        );
        Ok(())
    }

    /// Seals the previous table if a grower was killed before it did.
    pub(crate) fn seal_if_needed(&self) -> Result<(), Corrupt> {
        let w = tables_word(self.r);
        if w & UNSEALED == 0 {
            return Ok(());
        }
        match (w & GEN_MASK) as u32 {
            0 => Err(Corrupt("index generation 0 has no previous table to seal")),
            gen => self.seal(gen - 1),
        }
    }

    /// One growth step from generation `from`, with the write gate closed
    /// by the caller. `Ok(false)`: nothing to do (another grower made the
    /// step, or keys were removed meanwhile); `live` is the capacity
    /// counter.
    pub(crate) fn grow_locked(
        &self,
        from: u32,
        live: u64,
        take: impl FnOnce(Source) -> Result<Option<u64>, Corrupt>,
    ) -> Result<bool, Stop> {
        self.seal_if_needed().map_err(Stop::Corrupt)?;
        let cur = current(self.r, self.g).map_err(Stop::Corrupt)?;
        if cur.gen != from || live < cur.capacity {
            return Ok(false);
        }
        if cur.gen >= self.g.max_gen {
            return Err(Stop::Last);
        }
        let next = cur.gen + 1;
        let bytes = self.g.table_buckets(next) * BUCKET_BYTES;
        let state_word =
            record_word(self.r, next, R_STATE).ok_or(Stop::Corrupt(Corrupt("header")))?;
        // Relaxed: the gate is closed; a killed grower's stores are
        // visible to us through its death (as for every takeover).
        let mut state = state_word.load(Ordering::Relaxed);
        let off = match carved_off(self.g, state, bytes) {
            Some(off) => off,
            None => {
                let source = Source::for_table(self.g, bytes);
                let granule = take(source).map_err(Stop::Corrupt)?.ok_or(
                    if crate::shm::slab::short_of_shm() {
                        Stop::NoMemory
                    } else {
                        Stop::NoChunks
                    },
                )?;
                // A recycled block holds old bytes: zero it below.
                let dirty = if matches!(source, Source::Block(_)) {
                    COPYING
                } else {
                    0
                };
                state = granule << 2 | CARVED | dirty;
                // Relaxed: read only by growers and `check()` (gate closed)
                // and by readers after the flip (Release).
                state_word.store(state, Ordering::Relaxed);
                self.g.arena_off + granule * GRANULE
            }
        };
        let commits = crate::shm::commit::Commits::new(self.r, self.g);
        if !commits.ensure_arena(off - self.g.arena_off, bytes) {
            return Err(Stop::NoMemory);
        }
        let new = Table {
            gen: next,
            off,
            nbuckets: self.g.table_buckets(next),
            capacity: self.g.table_capacity(next),
        };
        let target = crate::shm::index::Index::with_table(self.r, self.g, new);
        if state & COPYING != 0 {
            target.zero(); // A killed grower's partial copy.
        }
        // Relaxed (both): read only by growers and `check()`, with the gate
        // closed, and ordered for readers by the flip's Release.
        state_word.store(
            state_word.load(Ordering::Relaxed) | COPYING,
            Ordering::Relaxed,
        );
        let from_ix = crate::shm::index::Index::with_table(self.r, self.g, cur);
        let keys = from_ix.copy_into(&target).map_err(Stop::Corrupt)?;
        // Relaxed: published by the flip below.
        let put = |f, v| {
            if let Some(w) = record_word(self.r, next, f) {
                w.store(v, Ordering::Relaxed);
            }
        };
        put(R_AT, now_nanos());
        put(R_PID, std::process::id() as u64);
        put(R_KEYS, keys);
        #[cfg(loom)]
        if crate::shm::livecount::killed_at(10) {
            return Ok(true);
        }
        // Release: pairs with the Acquire of `tables_word`: the new table's
        // entries and record are visible to whoever sees the generation.
        self.tables()
            .store(next as u64 | UNSEALED, Ordering::Release);
        #[cfg(loom)]
        if crate::shm::livecount::killed_at(11) {
            return Ok(true);
        }
        self.seal(cur.gen).map_err(Stop::Corrupt)?;
        Ok(true)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::dict::ShmDict;
    use crate::shm::index::Index;
    use crate::shm::layout::hash_key;

    fn growing() -> ShmDict {
        ShmDict::on_heap_growing(4, 1 << 16, 8 << 20)
    }

    #[test]
    fn the_index_doubles_and_keeps_every_key() {
        let d = growing();
        for i in 0u32..2000 {
            d.insert(i.to_le_bytes(), i.to_be_bytes()).unwrap();
        }
        let s = d.stats();
        assert!(s.generation >= 9, "{s:?}");
        assert!(s.capacity >= 2000);
        assert_eq!(s.growth.len() as u32, s.generation + 1);
        for (g, rec) in s.growth.iter().enumerate() {
            assert_eq!(rec.generation, g as u32);
            assert_eq!(rec.capacity, 4 << g);
            assert_eq!(rec.pid, std::process::id());
            if g > 0 {
                assert_eq!(rec.keys, 4 << (g - 1), "each step starts full");
            }
        }
        for i in 0u32..2000 {
            assert_eq!(d.get(i.to_le_bytes()).unwrap().unwrap(), i.to_be_bytes());
        }
        assert_eq!(d.len(), 2000);
        let report = d.check().unwrap();
        assert!(report.is_ok() && !report.repaired(), "{report}");
        assert_eq!(report.keys, 2000);
    }

    #[test]
    fn a_lookup_in_a_replaced_table_finds_the_key_in_the_current_one() {
        let d = growing();
        d.insert("a", "1").unwrap();
        let old = Index::new(&d.region, &d.geo);
        assert_eq!(old.table().gen, 0);
        let early = old.find(b"a", hash_key(b"a"), None).unwrap().unwrap();
        for i in 0u32..10 {
            d.insert(i.to_le_bytes(), "x").unwrap();
        }
        assert!(Index::new(&d.region, &d.geo).table().gen > 0);
        let loc = old.find(b"a", hash_key(b"a"), None).unwrap().unwrap();
        assert_ne!(loc.version(), 0);
        // Found in the current table (the old slot is MOVED).
        let cur = Index::new(&d.region, &d.geo);
        let again = cur.find(b"a", hash_key(b"a"), None).unwrap().unwrap();
        assert_eq!(loc.version(), again.version());
        assert!(
            cur.try_replace(&loc, loc.entry, &d.me),
            "the Loc is of the current table"
        );
        // A Loc found before the growth (in the old table) is refused by
        // writers, who then look the key up again.
        assert_ne!(old.table(), cur.table());
        assert!(
            !cur.try_replace(&early, early.entry, &d.me),
            "a Loc of a replaced table"
        );
        assert!(!cur.try_remove(&early, hash_key(b"a"), &d.me));
        assert_eq!(d.get("a").unwrap().unwrap(), b"1");
        assert_eq!(
            old.keys().unwrap().len(),
            11,
            "a scan restarts in the current table"
        );
    }

    #[test]
    fn garbage_in_the_tables_word_or_the_growth_log_is_an_error_not_a_crash() {
        use crate::Error;
        let d = growing();
        for i in 0u32..40 {
            d.insert(i.to_le_bytes(), "v").unwrap();
        }
        let tables = d.region.word(H_TABLES).unwrap();
        let good = tables.load(Ordering::Relaxed);
        let is_corrupt =
            |r: crate::Result<Option<Vec<u8>>>| matches!(r, Err(Error::Corrupt { .. }));
        // A generation past the last, then a record naming memory outside
        // the arena or misaligned.
        tables.store(GEN_MASK, Ordering::Relaxed);
        assert!(is_corrupt(d.get(0u32.to_le_bytes())));
        assert!(d.insert("x", "y").is_err());
        assert!(d.keys().is_err());
        tables.store(good, Ordering::Relaxed);
        let gen = (good & GEN_MASK) as u32;
        let rec = record_word(&d.region, gen, R_STATE).unwrap();
        let state = rec.load(Ordering::Relaxed);
        for bad in [
            u64::MAX,
            CARVED | (d.geo.arena_bytes / GRANULE) << 2,
            CARVED | 1 << 2,
            0,
        ] {
            rec.store(bad, Ordering::Relaxed);
            assert!(is_corrupt(d.get(0u32.to_le_bytes())), "{bad:#x}");
            assert!(
                d.reader().unwrap().get(0u32.to_le_bytes()).is_err(),
                "{bad:#x}"
            );
        }
        rec.store(state, Ordering::Relaxed);
        assert_eq!(d.get(0u32.to_le_bytes()).unwrap().unwrap(), b"v");
        // Every slot of the current table marked MOVED: garbage, not a
        // growth step (a lookup restarting forever would hang).
        let t = Index::new(&d.region, &d.geo).table();
        for w in d.region.words(t.off, t.bytes() / 8).unwrap() {
            w.store(u64::MAX, Ordering::Relaxed);
        }
        assert!(is_corrupt(d.get(0u32.to_le_bytes())));
        assert!(d.keys().is_err());
    }

    #[test]
    fn a_half_made_table_is_zeroed_and_reused() {
        let d = growing();
        for i in 0u32..4 {
            d.insert(i.to_le_bytes(), "v").unwrap();
        }
        // A grower killed while copying: the next table is carved and
        // holds garbage, and its record says copying began.
        let granule = d.slab().carve_run(1).unwrap();
        let rec = record_word(&d.region, 1, R_STATE).unwrap();
        rec.store(granule << 2 | CARVED | COPYING, Ordering::Relaxed);
        let t = table(&d.region, &d.geo, 1).unwrap();
        let commits = crate::shm::commit::Commits::new(&d.region, &d.geo);
        assert!(commits.ensure_arena(t.off - d.geo.arena_off, t.bytes()));
        for w in d.region.words(t.off, t.bytes() / 8).unwrap() {
            w.store(0x8000_0000_0000_0001, Ordering::Relaxed);
        }
        d.insert("new", "v").unwrap();
        assert_eq!(
            Index::new(&d.region, &d.geo).table(),
            t,
            "the carved table was reused"
        );
        assert_eq!(d.len(), 5);
        let report = d.check().unwrap();
        assert!(report.is_ok(), "{report}");
        assert_eq!(report.keys, 5);
    }
}
