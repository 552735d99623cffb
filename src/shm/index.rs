//! The open-addressing hash index.
//!
//! `nbuckets` buckets (a power of two) of 64 bytes, probed linearly from the
//! home bucket `hash & (nbuckets - 1)`:
//!
//! | bytes  | word                                                    |
//! |--------|---------------------------------------------------------|
//! | 0..8   | overflow count: keys whose probe passed this bucket     |
//! | 8..16  | insert lock (a `lockword`) for keys whose home this is  |
//! | 16..64 | three slots, each a control word and an entry word      |
//!
//! There are no tombstones. A slot's entry word is 0 (empty) or names the
//! arena block holding the key and value (`layout::Entry`). A lookup stops at
//! the first bucket whose overflow count is 0: no key beyond it probed
//! through it. An insert increments the counts of the buckets it passes
//! *before* publishing its entry; a removal clears the entry *before*
//! decrementing them. So a removal really empties its slot, and unbounded
//! insert/remove churn never exhausts the index (F14's scheme; see
//! docs/design.md).
//!
//! A new-key insert or a removal records its change of the number of keys
//! in its handle's attach entry before it stores the entry word, so that
//! `len()` is exact even after a kill (see `livecount.rs`).
//!
//! Keys never move within a table. When the index grows (`grow.rs`), every
//! entry is copied into a table twice as large while no writer runs, and
//! the old table's slots are marked `MOVED`; a lookup that meets the mark
//! starts again in the current table. An [`Index`] is one table: writers
//! take the current one inside the write gate, where it cannot change.
//!
//! New keys are inserted under the insert lock
//! of their home bucket, so two processes inserting the same new key are
//! serialized and the second finds the first's entry: exactly one entry per
//! key. Overwrites and removals of existing keys take only their slot.

use crate::shm::attach::{self, Holder, Token};
use crate::shm::block;
use crate::shm::commit::Commits;
use crate::shm::grow::{self, Table, MOVED};
use crate::shm::layout::{
    Entry, Geometry, BUCKET_BYTES, B_LOCK, B_OVERFLOW, B_SLOTS, GRANULE, H_LIVE, SLOTS_PER_BUCKET,
    SLOT_BYTES,
};
use crate::shm::livecount::Record;
use crate::shm::lockword;
use crate::shm::region::Region;
use crate::shm::seqlock;
use crate::shm::slab::{Corrupt, Slab};
use crate::sync::{AtomicU64, Ordering};

/// Where a key was found, and the state it was found in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Loc {
    /// The bucket (absolute, before masking) and the slot in it.
    bucket: u64,
    slot: u64,
    /// The control word when the key was read (not WRITING).
    ctrl: u64,
    /// The entry word when the key was read.
    pub(crate) entry: Entry,
    /// Buckets between the home bucket and the key's bucket.
    steps: u64,
    /// The table it was found in: its generation and bucket mask.
    gen: u32,
    mask: u64,
}

impl Loc {
    /// A number that changes with every write to the key: the slot's place
    /// (24 bits, modulo 2^24) and its control word's version (40 bits).
    /// Never 0 (a slot holding a key has been released at least once).
    /// The table's generation is mixed into the place: a key copied into a
    /// new table gets a new version.
    pub(crate) fn version(&self) -> u64 {
        let place = ((self.bucket & self.mask) * SLOTS_PER_BUCKET
            + self.slot
            + u64::from(self.gen) * 0x9e37)
            & 0xff_ffff;
        place << 40 | seqlock::version(self.ctrl)
    }
}

/// Outcome of [`Index::insert_new`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NewKey {
    Inserted,
    /// The key appeared meanwhile: overwrite it instead.
    Exists,
    /// `capacity` live keys, or no empty slot at all.
    Full,
    /// /dev/shm has no room for the index memory the key needs
    /// (`commit.rs`).
    NoRoom,
}

/// Buckets [`Index::copy_into`] prefetches ahead of the one it copies.
const PREFETCH_AHEAD: u64 = 4;

/// What an index bucket that was never committed reads as: empty, without
/// touching its memory (`commit.rs`). Writers commit a bucket before they
/// store into it, so nothing is ever stored here.
#[cfg(not(loom))]
static UNCOMMITTED_BUCKET: [AtomicU64; (BUCKET_BYTES / 8) as usize] =
    [const { AtomicU64::new(0) }; (BUCKET_BYTES / 8) as usize];

/// The control and entry words of slot `s` of a bucket's words.
#[inline]
fn slot_in(words: &[AtomicU64], s: u64) -> (&AtomicU64, &AtomicU64) {
    let w = ((B_SLOTS + s * SLOT_BYTES) / 8) as usize;
    (&words[w], &words[w + 1])
}

/// Why a lookup in one table stopped without an answer.
enum Stop {
    /// It met a slot marked `MOVED`: the table is no longer current.
    Moved,
    Corrupt(Corrupt),
}

/// One table of the index of one segment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Index<'a> {
    r: &'a Region,
    g: &'a Geometry,
    slab: Slab<'a>,
    t: Table,
    /// Why the current table could not be found (a corrupted header):
    /// every operation then reports it.
    bad: Option<Corrupt>,
}

impl<'a> Index<'a> {
    /// The current table.
    #[inline]
    pub(crate) fn new(r: &'a Region, g: &'a Geometry) -> Index<'a> {
        match grow::current(r, g) {
            Ok(t) => Index::with_table(r, g, t),
            Err(c) => Index {
                bad: Some(c),
                ..Index::with_table(r, g, Table::first(g))
            },
        }
    }

    /// The table `t` (validated by `grow::table`).
    #[inline]
    pub(crate) fn with_table(r: &'a Region, g: &'a Geometry, t: Table) -> Index<'a> {
        Index {
            r,
            g,
            slab: Slab::new(r, g),
            t,
            bad: None,
        }
    }

    /// The current table, after a lookup in this one met a `MOVED` slot.
    /// The mark was stored (Release) after the flip that replaced this
    /// table, and seen (Acquire, `read_begin`), so the current table is a
    /// later one; if it is not, the mark is garbage, not a growth step
    /// (restarting would loop forever).
    fn successor(&self) -> Result<Index<'a>, Corrupt> {
        let next = Index::new(self.r, self.g);
        next.sound()?;
        if next.t.gen <= self.t.gen {
            return Err(Corrupt(
                "a slot of the current index table is marked as moved to a later one",
            ));
        }
        Ok(next)
    }

    /// The table this index reads.
    pub(crate) fn table(&self) -> Table {
        self.t
    }

    #[inline]
    fn sound(&self) -> Result<(), Corrupt> {
        self.bad.map_or(Ok(()), Err)
    }

    fn mask(&self) -> u64 {
        self.t.nbuckets - 1
    }

    /// The eight words of a bucket, bounds-checked once; all zero, without
    /// touching the segment, if its memory was never committed (tables
    /// after the first are committed whole before they are used).
    #[inline]
    fn bucket(&self, bucket: u64) -> &'a [AtomicU64] {
        #[cfg(not(loom))]
        if self.t.gen == 0 && !Commits::new(self.r, self.g).bucket_ready(bucket & self.mask()) {
            return &UNCOMMITTED_BUCKET;
        }
        let off = self.t.off + (bucket & self.mask()) * BUCKET_BYTES;
        self.r
            .words(off, BUCKET_BYTES / 8)
            .expect("buckets lie inside the validated index")
    }

    /// Whether a writer may store into `bucket` (committing its memory
    /// first if need be).
    fn ensure_bucket(&self, bucket: u64) -> bool {
        self.t.gen > 0 || Commits::new(self.r, self.g).ensure_bucket(bucket & self.mask())
    }

    /// The word at byte offset `field` of a bucket.
    pub(crate) fn bucket_word(&self, bucket: u64, field: u64) -> &'a AtomicU64 {
        &self.bucket(bucket)[(field / 8) as usize]
    }

    /// Byte offset of the control word of slot `s` of a bucket (the entry
    /// word follows it).
    fn slot_off(&self, bucket: u64, s: u64) -> u64 {
        self.t.off + (bucket & self.mask()) * BUCKET_BYTES + B_SLOTS + s * SLOT_BYTES
    }

    /// The count record of the handle `me` (see `livecount.rs`).
    fn record(&self, me: &Holder) -> Option<Record<'a>> {
        Record::of(self.r, me.token.index())
    }

    /// Stores `new` into the entry word of a slot this handle holds WRITING,
    /// for a change of the number of keys (`insert`: a new key, else a
    /// removal), recording it first so that a kill at any point leaves
    /// `len()` exact (see `livecount.rs`).
    fn store_counted(&self, entry: &AtomicU64, ctrl_off: u64, new: u64, insert: bool, me: &Holder) {
        #[cfg(loom)]
        if crate::shm::livecount::killed_at(1) {
            return;
        }
        let rec = self.record(me);
        let pending = rec.map(|rec| rec.begin(ctrl_off, insert, me));
        #[cfg(loom)]
        if crate::shm::livecount::killed_at(2) {
            return;
        }
        // Release: pairs with the Acquire entry loads of readers that see
        // this entry before the unlock; the block was fully written before.
        entry.store(new, Ordering::Release);
        #[cfg(loom)]
        if crate::shm::livecount::killed_at(3) {
            return;
        }
        if let (Some(rec), Some(p)) = (rec, pending) {
            rec.finish(p, me);
        }
    }

    /// Slot `s` of a bucket: its control word and entry word.
    #[inline]
    pub(crate) fn slot(&self, bucket: u64, s: u64) -> (&'a AtomicU64, &'a AtomicU64) {
        slot_in(self.bucket(bucket), s)
    }

    /// The slot a lookup found a key in: committed (it held an entry), so
    /// the commit bit is not looked at again.
    #[inline]
    fn slot_found(&self, loc: &Loc) -> (&'a AtomicU64, &'a AtomicU64) {
        let off = self.t.off + (loc.bucket & self.mask()) * BUCKET_BYTES;
        let words = self
            .r
            .words(off, BUCKET_BYTES / 8)
            .expect("buckets lie inside the validated index");
        slot_in(words, loc.slot)
    }

    /// The capacity counter: new keys reserve a place in it before they
    /// are published, removals give it back afterwards. A process killed in
    /// between leaves it one too high (new keys then meet `Full` one key
    /// early) until `check()` recomputes it. `len()` does not read it.
    fn live(&self) -> &'a AtomicU64 {
        self.r.word(H_LIVE).expect("header word")
    }

    /// The block an entry names, checked against the arena's bounds.
    pub(crate) fn block_of(&self, e: Entry) -> Option<&'a [AtomicU64]> {
        self.slab.block(e.granule() as u64, e.order())
    }

    /// Looks `key` up. If `out` is given, the value is copied into it from
    /// the same snapshot that matched the key.
    ///
    /// A lookup that meets a `MOVED` slot (its table was replaced while it
    /// looked) starts again in the current table; the `Loc` says which
    /// table it was found in.
    pub(crate) fn find(
        &self,
        key: &[u8],
        hash: u64,
        mut out: Option<&mut Vec<u8>>,
    ) -> Result<Option<Loc>, Corrupt> {
        self.sound()?;
        let mut next: Option<Index<'a>> = None;
        loop {
            let ix = next.as_ref().unwrap_or(self);
            match ix.find_here(key, hash, out.as_deref_mut()) {
                Ok(found) => return Ok(found),
                Err(Stop::Corrupt(c)) => return Err(c),
                Err(Stop::Moved) => next = Some(ix.successor()?),
            }
        }
    }

    #[inline(always)]
    fn find_here(
        &self,
        key: &[u8],
        hash: u64,
        mut out: Option<&mut Vec<u8>>,
    ) -> Result<Option<Loc>, Stop> {
        let home = hash & self.mask();
        let tag = Entry::tag_of(hash);
        for steps in 0..self.t.nbuckets {
            let bucket = home + steps;
            let words = self.bucket(bucket);
            for s in 0..SLOTS_PER_BUCKET {
                let (ctrl, entry) = slot_in(words, s);
                let mut retry = seqlock::Retry::new();
                loop {
                    let begin = seqlock::read_begin(ctrl);
                    if begin == MOVED {
                        return Err(Stop::Moved);
                    }
                    // Acquire: pairs with the Release unlock that published it.
                    let e = Entry(entry.load(Ordering::Acquire));
                    if e.0 == Entry::EMPTY || e.tag() != tag {
                        break;
                    }
                    let read = match self.block_of(e) {
                        Some(words) => block::read(words, key, hash, out.as_deref_mut()),
                        None => block::Read::Invalid,
                    };
                    if !seqlock::read_validate(ctrl, begin) {
                        // Released meanwhile (a write completed): read the
                        // slot again.
                        retry.pause();
                        continue;
                    }
                    match read {
                        block::Read::Match => {
                            return Ok(Some(Loc {
                                bucket,
                                slot: s,
                                ctrl: begin,
                                entry: e,
                                steps,
                                gen: self.t.gen,
                                mask: self.mask(),
                            }))
                        }
                        block::Read::Mismatch => break,
                        block::Read::Invalid => {
                            return Err(Stop::Corrupt(Corrupt(
                                "index entry names an invalid block",
                            )))
                        }
                    }
                }
            }
            // SeqCst: a lookup that misses the key must not see a count older
            // than the key's insertion (which increments before publishing).
            if words[(B_OVERFLOW / 8) as usize].load(Ordering::SeqCst) == 0 {
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// Prefetches the home bucket of `hash` (see [`Region::prefetch`]).
    #[inline]
    pub(crate) fn prefetch_bucket(&self, hash: u64) {
        Region::prefetch(&self.bucket(hash & self.mask())[0]);
    }

    /// Prefetches the blocks that the home bucket of `hash` names under
    /// `hash`'s tag: where a lookup of the key will compare it. Loads the
    /// bucket's entry words (Relaxed: a hint; nothing is concluded from
    /// them).
    #[inline]
    pub(crate) fn prefetch_blocks(&self, hash: u64) {
        let words = self.bucket(hash & self.mask());
        let tag = Entry::tag_of(hash);
        for s in 0..SLOTS_PER_BUCKET {
            let (_, entry) = slot_in(words, s);
            let e = Entry(entry.load(Ordering::Relaxed));
            if e.0 != Entry::EMPTY && e.tag() == tag {
                if let Some(block) = self.block_of(e) {
                    Region::prefetch(&block[0]);
                }
            }
        }
    }

    /// Looks `key` up for a reader pinned in the epoch (`epoch.rs`), without
    /// the seqlock: returns the entry found, and the byte offset (in the
    /// region) and length of the value, whose bytes stay unchanged while the
    /// pin lives.
    ///
    /// Why no seqlock is needed: the entry word is loaded once (Acquire), so
    /// the read is linearized at that load, and it synchronizes with the
    /// Release store that published the entry, after the block was written.
    /// The block is not written again until it is unpublished, retired and
    /// freed. Its unpublication comes after the store we read from in the
    /// entry word's modification order, so it is not ordered before our
    /// pin's SeqCst fence (our load would then have seen it); so the
    /// retire's SeqCst fence follows our pin's fence, and `epoch.rs` keeps
    /// the block until the pin is released. The key and the lengths are
    /// therefore compared once, with no validation: the words cannot change
    /// under us. (A miss reads the overflow counts as `find` does.)
    ///
    /// Only for a caller whose pin's fence precedes this call.
    #[inline]
    pub(crate) fn find_pinned(
        &self,
        key: &[u8],
        hash: u64,
    ) -> Result<Option<(Entry, u64, usize)>, Corrupt> {
        self.sound()?;
        let home = hash & self.mask();
        let tag = Entry::tag_of(hash);
        for steps in 0..self.t.nbuckets {
            let words = self.bucket(home + steps);
            for s in 0..SLOTS_PER_BUCKET {
                let (_, entry) = slot_in(words, s);
                // Acquire: pairs with the Release store that published the
                // entry (`try_replace`, `store_counted`): the block's words
                // written before it are visible.
                let e = Entry(entry.load(Ordering::Acquire));
                if e.0 == Entry::EMPTY || e.tag() != tag {
                    continue;
                }
                let block = self
                    .block_of(e)
                    .ok_or(Corrupt("index entry names an invalid block"))?;
                match block::match_value(block, key, hash) {
                    Ok(Some((off, len))) => {
                        let start = self.g.arena_off + e.granule() as u64 * GRANULE;
                        return Ok(Some((e, start + off as u64, len)));
                    }
                    Ok(None) => {}
                    Err(()) => return Err(Corrupt("a block's lengths exceed the block")),
                }
            }
            // SeqCst: as in `find`.
            if words[(B_OVERFLOW / 8) as usize].load(Ordering::SeqCst) == 0 {
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// Replaces the entry at `loc` with `new`, if the slot is unchanged since
    /// `loc` was read. On `false` the caller looks the key up again.
    ///
    /// Only for an index taken inside the write gate (the current table);
    /// `false` if `loc` is from an older table.
    pub(crate) fn try_replace(&self, loc: &Loc, new: Entry, me: &Holder) -> bool {
        if loc.gen != self.t.gen || self.bad.is_some() {
            return false;
        }
        let (ctrl, entry) = self.slot_found(loc);
        let Some(locked) = self.lock_slot(ctrl, loc.ctrl, me) else {
            return false;
        };
        // Release: pairs with the Acquire entry loads of readers that see this
        // entry before the unlock; the block was fully written before.
        entry.store(new.0, Ordering::Release);
        seqlock::unlock(ctrl, locked, me);
        true
    }

    /// Removes the entry at `loc`, if the slot is unchanged since `loc` was
    /// read. On `false` the caller looks the key up again.
    ///
    /// Only for an index taken inside the write gate, as `try_replace`.
    pub(crate) fn try_remove(&self, loc: &Loc, hash: u64, me: &Holder) -> bool {
        if loc.gen != self.t.gen || self.bad.is_some() {
            return false;
        }
        let (ctrl, entry) = self.slot_found(loc);
        let Some(locked) = self.lock_slot(ctrl, loc.ctrl, me) else {
            return false;
        };
        let off = self.slot_off(loc.bucket, loc.slot);
        self.store_counted(entry, off, Entry::EMPTY, false, me);
        #[cfg(loom)]
        if crate::shm::livecount::killed_at(4) {
            return true;
        }
        seqlock::unlock(ctrl, locked, me);
        // Only now, with the key gone, do the buckets it passed stop counting it.
        let home = hash & self.mask();
        for step in 0..loc.steps {
            // SeqCst: see `find`.
            self.bucket_word(home + step, B_OVERFLOW)
                .fetch_sub(1, Ordering::SeqCst);
        }
        // Relaxed: the capacity counter (not `len`).
        self.live().fetch_sub(1, Ordering::Relaxed);
        true
    }

    /// Locks a slot seen as `seen`. If that fails (it is WRITING, or changed
    /// since), waits until no writer holds it, recovering a dead writer's
    /// hold, and reports failure so the caller reads it again.
    fn lock_slot(&self, ctrl: &AtomicU64, seen: u64, me: &Holder) -> Option<u64> {
        let locked = seqlock::try_lock(ctrl, seen, me);
        if locked.is_none() {
            seqlock::wait_unlocked(self.r, ctrl, me);
        }
        locked
    }

    /// Inserts `key` as a new key with entry `new`, under its home bucket's
    /// insert lock. `Exists` if it is present after all.
    pub(crate) fn insert_new(
        &self,
        key: &[u8],
        hash: u64,
        new: Entry,
        me: &Holder,
    ) -> Result<NewKey, Corrupt> {
        self.sound()?;
        let home = hash & self.mask();
        if !self.ensure_bucket(home) {
            return Ok(NewKey::NoRoom);
        }
        let lock = self.bucket_word(home, B_LOCK);
        lockword::lock(self.r, lock, me);
        let result = self.insert_locked(key, hash, home, new, me);
        lockword::unlock(lock, me);
        result
    }

    fn insert_locked(
        &self,
        key: &[u8],
        hash: u64,
        home: u64,
        new: Entry,
        me: &Holder,
    ) -> Result<NewKey, Corrupt> {
        if self.find(key, hash, None)?.is_some() {
            return Ok(NewKey::Exists);
        }
        // Relaxed: a counter; the bound is enforced by the fetch_add's result.
        if self.live().fetch_add(1, Ordering::Relaxed) >= self.t.capacity {
            self.live().fetch_sub(1, Ordering::Relaxed);
            return Ok(NewKey::Full);
        }
        let mut counted = 0;
        for steps in 0..self.t.nbuckets {
            let bucket = home + steps;
            if !self.ensure_bucket(bucket) {
                // Give back what this insert counted so far.
                for k in 0..counted {
                    self.bucket_word(home + k, B_OVERFLOW)
                        .fetch_sub(1, Ordering::SeqCst); // SeqCst: see `find`.
                }
                self.live().fetch_sub(1, Ordering::Relaxed);
                return Ok(NewKey::NoRoom);
            }
            let words = self.bucket(bucket);
            for s in 0..SLOTS_PER_BUCKET {
                let (ctrl, entry) = slot_in(words, s);
                let seen = seqlock::read_begin(ctrl);
                // Relaxed: ordered after `seen` (Acquire); the CAS below
                // re-validates the version it was read at.
                if seqlock::is_writing(seen) || entry.load(Ordering::Relaxed) != Entry::EMPTY {
                    continue;
                }
                if let Some(locked) = seqlock::try_lock(ctrl, seen, me) {
                    // The CAS succeeded on the version we saw empty, so no
                    // writer touched the slot since: it is still empty.
                    self.store_counted(entry, self.slot_off(bucket, s), new.0, true, me);
                    #[cfg(loom)]
                    if crate::shm::livecount::killed_at(4) {
                        return Ok(NewKey::Inserted);
                    }
                    seqlock::unlock(ctrl, locked, me);
                    return Ok(NewKey::Inserted);
                }
            }
            // SeqCst: counts before the entry is published; see `find`.
            self.bucket_word(bucket, B_OVERFLOW)
                .fetch_add(1, Ordering::SeqCst);
            counted += 1;
        }
        // No empty slot anywhere (only possible if capacity was corrupted).
        for steps in 0..self.t.nbuckets {
            self.bucket_word(home + steps, B_OVERFLOW)
                .fetch_sub(1, Ordering::SeqCst);
        }
        self.live().fetch_sub(1, Ordering::Relaxed);
        Ok(NewKey::Full)
    }

    /// Every key present during the whole scan, each once; keys inserted or
    /// removed during the scan may or may not appear.
    /// (A scan that meets a `MOVED` slot starts again in the current
    /// table.)
    pub(crate) fn keys(&self) -> Result<Vec<Vec<u8>>, Corrupt> {
        let mut ix = *self;
        loop {
            ix.sound()?;
            match ix.keys_here() {
                Ok(keys) => return Ok(keys),
                Err(Stop::Corrupt(c)) => return Err(c),
                Err(Stop::Moved) => ix = ix.successor()?,
            }
        }
    }

    fn keys_here(&self) -> Result<Vec<Vec<u8>>, Stop> {
        let mut seen = std::collections::HashSet::new();
        let mut key = Vec::new();
        for bucket in 0..self.t.nbuckets {
            let words = self.bucket(bucket);
            for s in 0..SLOTS_PER_BUCKET {
                let (ctrl, entry) = slot_in(words, s);
                let mut retry = seqlock::Retry::new();
                loop {
                    let begin = seqlock::read_begin(ctrl);
                    if begin == MOVED {
                        return Err(Stop::Moved);
                    }
                    let e = Entry(entry.load(Ordering::Acquire)); // Acquire: as in find.
                    if e.0 == Entry::EMPTY {
                        break;
                    }
                    let ok = self
                        .block_of(e)
                        .is_some_and(|w| block::read_key(w, &mut key));
                    if !seqlock::read_validate(ctrl, begin) {
                        retry.pause();
                        continue;
                    }
                    if !ok {
                        return Err(Stop::Corrupt(Corrupt("index entry names an invalid block")));
                    }
                    if !seen.contains(&key) {
                        seen.insert(key.clone());
                    }
                    break;
                }
            }
        }
        Ok(seen.into_iter().collect())
    }

    /// Copies every entry of this table into `to`, an empty table no
    /// process can see yet (`grow.rs`), with the write gate closed.
    /// Returns the number of entries copied.
    pub(crate) fn copy_into(&self, to: &Index<'_>) -> Result<u64, Corrupt> {
        let mut copied = 0;
        for bucket in 0..self.t.nbuckets {
            // The copy reads each entry's block for its hash: one miss per
            // key, most of the step's time. Start those of a bucket a few
            // ahead now, so they overlap this bucket's work.
            if bucket + PREFETCH_AHEAD < self.t.nbuckets {
                self.prefetch_entries(bucket + PREFETCH_AHEAD);
            }
            let words = self.bucket(bucket);
            for s in 0..SLOTS_PER_BUCKET {
                let (_, entry) = slot_in(words, s);
                // Relaxed: no writer runs (the gate is closed; a dead
                // writer's stores are visible through its death).
                let e = Entry(entry.load(Ordering::Relaxed));
                if e.0 == Entry::EMPTY {
                    continue;
                }
                let block = self
                    .block_of(e)
                    .ok_or(Corrupt("index entry names an invalid block"))?;
                // Relaxed: the block was published before the gate closed.
                let hash = block[1].load(Ordering::Relaxed);
                if Entry::tag_of(hash) != e.tag() {
                    return Err(Corrupt("a block's hash does not match its entry"));
                }
                to.place(e, hash)?;
                copied += 1;
            }
        }
        Ok(copied)
    }

    /// Prefetches the blocks the entries of `bucket` name (Relaxed loads:
    /// a hint).
    fn prefetch_entries(&self, bucket: u64) {
        let words = self.bucket(bucket);
        for s in 0..SLOTS_PER_BUCKET {
            let (_, entry) = slot_in(words, s);
            let e = Entry(entry.load(Ordering::Relaxed));
            if e.0 != Entry::EMPTY {
                if let Some(block) = self.block_of(e) {
                    Region::prefetch(&block[1]);
                }
            }
        }
    }

    /// Stores `e` (of a key hashing to `hash`) in the first empty slot of
    /// its probe sequence, counting the buckets it passes. Only for a table
    /// no process can see yet: plain stores, published by the flip.
    fn place(&self, e: Entry, hash: u64) -> Result<(), Corrupt> {
        let home = hash & self.mask();
        for steps in 0..self.t.nbuckets {
            let words = self.bucket(home + steps);
            for s in 0..SLOTS_PER_BUCKET {
                let (ctrl, entry) = slot_in(words, s);
                // Relaxed (all three): published by the flip's Release.
                if entry.load(Ordering::Relaxed) == Entry::EMPTY {
                    // Version 1: a slot holding a key has been released at
                    // least once (`Loc::version` is never 0).
                    ctrl.store(seqlock::released(0), Ordering::Relaxed);
                    entry.store(e.0, Ordering::Relaxed);
                    return Ok(());
                }
            }
            let over = &words[(B_OVERFLOW / 8) as usize];
            over.store(over.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
        Err(Corrupt("more entries than slots in the next index table"))
    }

    /// Zeroes this table: a killed grower's partial copy (`grow.rs`).
    pub(crate) fn zero(&self) {
        for bucket in 0..self.t.nbuckets {
            for w in self.bucket(bucket) {
                w.store(0, Ordering::Relaxed); // Relaxed: published by the flip.
            }
        }
    }

    /// Marks every slot of this (replaced) table that holds an entry
    /// `MOVED` (`grow.rs`, the seal).
    pub(crate) fn mark_moved(&self) {
        for bucket in 0..self.t.nbuckets {
            let words = self.bucket(bucket);
            for s in 0..SLOTS_PER_BUCKET {
                let (ctrl, entry) = slot_in(words, s);
                // Relaxed: the table is no longer written but for these marks.
                if entry.load(Ordering::Relaxed) != Entry::EMPTY
                    && ctrl.load(Ordering::Relaxed) != MOVED
                {
                    // Release: pairs with the Acquire of a reader's
                    // `read_begin` that sees the mark, so its next load of
                    // `H_TABLES` sees the flip made before.
                    ctrl.store(MOVED, Ordering::Release);
                }
            }
        }
    }

    /// Live keys, exact also after kills (see `livecount.rs`).
    pub(crate) fn len(&self) -> u64 {
        crate::shm::livecount::len(self.r)
    }

    /// Releases every slot left WRITING by a former handle of attach entry
    /// `entry`, as a waiter would for a dead writer (the entry word is the
    /// old or the new block, both complete). Returns how many it released.
    ///
    /// Only for the claimer of `entry`, between its claim and the first use
    /// of its token: then no live handle owns the index but the claimer,
    /// which holds nothing yet, so every such slot is a dead writer's.
    pub(crate) fn release_slots_of(&self, entry: u64) -> u64 {
        let mut released = 0;
        for bucket in 0..self.t.nbuckets {
            for s in 0..SLOTS_PER_BUCKET {
                let (ctrl, _) = self.slot(bucket, s);
                let c = ctrl.load(Ordering::Acquire); // Acquire: as seqlock::read_begin.
                if seqlock::is_writing(c)
                    && attach::short_index(seqlock::owner(c)) == entry
                    // AcqRel: as seqlock::wait_unlocked.
                    && ctrl
                        .compare_exchange(c, seqlock::released(c), Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                {
                    released += 1;
                }
            }
        }
        released
    }
}

/// The attach hook of dictionaries: call it after claiming attach entry
/// `entry` for a new dictionary handle whose token is `token`, before the
/// handle writes anything (every path that hands out a dictionary token:
/// opening, and re-registering a handle inherited through `fork`).
///
/// Slots name their writer by a short token (generation mod 2^11, see
/// `attach`'s module docs), so a slot a dead handle of this entry left
/// WRITING 2,048 claims ago would name the new handle and look alive:
/// writers of that key would wait as long as the new handle lives. When
/// `token` starts a new epoch of 2^11 generations (the entry's word
/// `attach::E_SWEPT` records the last epoch swept), this releases every
/// WRITING slot of the entry's index ([`Index::release_slots_of`]) and then
/// records the epoch. A claimer killed while sweeping leaves the epoch
/// unrecorded, so the next claimer of the entry sweeps again. Returns the
/// number of slots released.
pub(crate) fn sweep_slots_on_attach(r: &Region, g: &Geometry, entry: u64, token: Token) -> u64 {
    let Some(swept) = r.word(attach::entry_off(entry) + attach::E_SWEPT) else {
        return 0;
    };
    // Relaxed: the entry is ours (claimed with AcqRel, which ordered the
    // previous owners' stores before this load).
    if swept.load(Ordering::Relaxed) == token.epoch() {
        return 0;
    }
    let released = Index::new(r, g).release_slots_of(entry);
    // Relaxed: read only by later claimers of this entry, ordered by their
    // claim (the detach is Release).
    swept.store(token.epoch(), Ordering::Relaxed);
    released
}

#[cfg(all(test, not(loom)))]
mod tests {
    //! Regression (issue 10, item 5): a slot's owner is a short token
    //! (generation mod 2^11). A writer killed holding a slot, 2,048 claims
    //! of its attach entry later, looked like the entry's new live handle,
    //! and every writer of the key waited for it as long as that lived.

    use super::*;
    use crate::dict::ShmDict;
    use crate::shm::attach::{attach, process_identity, short_token_alive, E_SWEPT};

    #[test]
    fn a_dead_writers_slot_is_released_when_its_short_token_comes_back() {
        let d = std::sync::Arc::new(ShmDict::on_heap(16, 1 << 16));
        d.insert("k", "old").unwrap(); // by attach entry 0
        let (r, g) = (&d.region, &d.geo);
        let index = Index::new(r, g);
        let loc = index
            .find(b"k", crate::shm::layout::hash_key(b"k"), None)
            .unwrap()
            .unwrap();
        let (ctrl, _) = index.slot(loc.bucket, loc.slot);
        // A handle of entry 1, generation 5, killed holding the slot.
        let dead_gen = 5u64;
        let dead_short = 1 | dead_gen << 12;
        let c = ctrl.load(Ordering::Relaxed);
        ctrl.store(c | dead_short << 1 | seqlock::WRITING, Ordering::Relaxed);
        // 2,047 more claims of entry 1 went by; the next one repeats the
        // dead writer's short token.
        let gen_word = r.word(attach::entry_off(1) + 8).unwrap();
        gen_word.store(dead_gen + 2047, Ordering::Relaxed);
        let (entry, token) =
            attach(r, crate::shm::attach::LockFd::NONE, process_identity()).unwrap();
        assert_eq!((entry, token.short()), (1, dead_short));
        assert!(
            short_token_alive(r, crate::shm::attach::LockFd::NONE, dead_short),
            "the dead writer's short token names the new live handle"
        );

        assert_eq!(sweep_slots_on_attach(r, g, entry, token), 1);
        assert!(!seqlock::is_writing(ctrl.load(Ordering::Relaxed)));
        let swept = r.word(attach::entry_off(1) + E_SWEPT).unwrap();
        assert_eq!(swept.load(Ordering::Relaxed), token.epoch());
        assert_eq!(
            sweep_slots_on_attach(r, g, entry, token),
            0,
            "once per epoch"
        );

        // Without the sweep this waited for the live handle of entry 1.
        let (tx, rx) = std::sync::mpsc::channel();
        let d2 = d.clone();
        std::thread::spawn(move || {
            d2.insert("k", "new").unwrap();
            tx.send(())
        });
        rx.recv_timeout(std::time::Duration::from_secs(30))
            .expect("the insert finished");
        assert_eq!(d.get("k").unwrap().as_deref(), Some(&b"new"[..]));
    }

    #[test]
    fn a_claimer_killed_while_sweeping_leaves_the_sweep_to_the_next() {
        let d = ShmDict::on_heap(16, 1 << 16);
        let (r, g) = (&d.region, &d.geo);
        r.word(attach::entry_off(1) + 8)
            .unwrap()
            .store(2047, Ordering::Relaxed);
        let (_, first) = attach(r, crate::shm::attach::LockFd::NONE, process_identity()).unwrap();
        assert_eq!(first.epoch(), 1);
        // Killed before recording the epoch: the entry is reclaimed.
        attach::detach(r, crate::shm::attach::LockFd::NONE, 1, process_identity());
        let (_, next) = attach(r, crate::shm::attach::LockFd::NONE, process_identity()).unwrap();
        assert_eq!(next.epoch(), 1);
        let swept = r.word(attach::entry_off(1) + E_SWEPT).unwrap();
        assert_eq!(swept.load(Ordering::Relaxed), 0, "not recorded");
        sweep_slots_on_attach(r, g, 1, next);
        assert_eq!(swept.load(Ordering::Relaxed), 1);
    }
}
