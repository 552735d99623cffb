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
//! Keys never move once inserted. New keys are inserted under the insert lock
//! of their home bucket, so two processes inserting the same new key are
//! serialized and the second finds the first's entry: exactly one entry per
//! key. Overwrites and removals of existing keys take only their slot.

use crate::shm::attach::Holder;
use crate::shm::block;
use crate::shm::layout::{
    Entry, Geometry, BUCKET_BYTES, B_LOCK, B_OVERFLOW, B_SLOTS, H_LIVE, SLOTS_PER_BUCKET,
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
}

impl Loc {
    /// A number that changes with every write to the key: the slot's place
    /// (24 bits, modulo 2^24) and its control word's version (40 bits).
    /// Never 0 (a slot holding a key has been released at least once).
    pub(crate) fn version(&self, nbuckets: u64) -> u64 {
        let place = ((self.bucket & (nbuckets - 1)) * SLOTS_PER_BUCKET + self.slot) & 0xff_ffff;
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
}

/// The index of one segment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Index<'a> {
    r: &'a Region,
    g: &'a Geometry,
    slab: Slab<'a>,
}

impl<'a> Index<'a> {
    pub(crate) fn new(r: &'a Region, g: &'a Geometry) -> Index<'a> {
        Index {
            r,
            g,
            slab: Slab::new(r, g),
        }
    }

    fn mask(&self) -> u64 {
        self.g.nbuckets - 1
    }

    /// The eight words of a bucket, bounds-checked once.
    fn bucket(&self, bucket: u64) -> &'a [AtomicU64] {
        let off = self.g.index_off + (bucket & self.mask()) * BUCKET_BYTES;
        self.r
            .words(off, BUCKET_BYTES / 8)
            .expect("buckets lie inside the validated index")
    }

    /// The word at byte offset `field` of a bucket.
    pub(crate) fn bucket_word(&self, bucket: u64, field: u64) -> &'a AtomicU64 {
        &self.bucket(bucket)[(field / 8) as usize]
    }

    /// Byte offset of the control word of slot `s` of a bucket (the entry
    /// word follows it).
    fn slot_off(&self, bucket: u64, s: u64) -> u64 {
        self.g.index_off + (bucket & self.mask()) * BUCKET_BYTES + B_SLOTS + s * SLOT_BYTES
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
    pub(crate) fn slot(&self, bucket: u64, s: u64) -> (&'a AtomicU64, &'a AtomicU64) {
        let words = self.bucket(bucket);
        let w = ((B_SLOTS + s * SLOT_BYTES) / 8) as usize;
        (&words[w], &words[w + 1])
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
    pub(crate) fn find(
        &self,
        key: &[u8],
        hash: u64,
        mut out: Option<&mut Vec<u8>>,
    ) -> Result<Option<Loc>, Corrupt> {
        let home = hash & self.mask();
        let tag = Entry::tag_of(hash);
        for steps in 0..self.g.nbuckets {
            let bucket = home + steps;
            for s in 0..SLOTS_PER_BUCKET {
                let (ctrl, entry) = self.slot(bucket, s);
                let mut retry = seqlock::Retry::new();
                loop {
                    let begin = seqlock::read_begin(ctrl);
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
                            }))
                        }
                        block::Read::Mismatch => break,
                        block::Read::Invalid => {
                            return Err(Corrupt("index entry names an invalid block"))
                        }
                    }
                }
            }
            // SeqCst: a lookup that misses the key must not see a count older
            // than the key's insertion (which increments before publishing).
            if self.bucket_word(bucket, B_OVERFLOW).load(Ordering::SeqCst) == 0 {
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// Replaces the entry at `loc` with `new`, if the slot is unchanged since
    /// `loc` was read. On `false` the caller looks the key up again.
    pub(crate) fn try_replace(&self, loc: &Loc, new: Entry, me: &Holder) -> bool {
        let (ctrl, entry) = self.slot(loc.bucket, loc.slot);
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
    pub(crate) fn try_remove(&self, loc: &Loc, hash: u64, me: &Holder) -> bool {
        let (ctrl, entry) = self.slot(loc.bucket, loc.slot);
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
        let home = hash & self.mask();
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
        if self.live().fetch_add(1, Ordering::Relaxed) >= self.g.capacity {
            self.live().fetch_sub(1, Ordering::Relaxed);
            return Ok(NewKey::Full);
        }
        for steps in 0..self.g.nbuckets {
            let bucket = home + steps;
            for s in 0..SLOTS_PER_BUCKET {
                let (ctrl, entry) = self.slot(bucket, s);
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
        }
        // No empty slot anywhere (only possible if capacity was corrupted).
        for steps in 0..self.g.nbuckets {
            self.bucket_word(home + steps, B_OVERFLOW)
                .fetch_sub(1, Ordering::SeqCst);
        }
        self.live().fetch_sub(1, Ordering::Relaxed);
        Ok(NewKey::Full)
    }

    /// Every key present during the whole scan, each once; keys inserted or
    /// removed during the scan may or may not appear.
    pub(crate) fn keys(&self) -> Result<Vec<Vec<u8>>, Corrupt> {
        let mut seen = std::collections::HashSet::new();
        let mut key = Vec::new();
        for bucket in 0..self.g.nbuckets {
            for s in 0..SLOTS_PER_BUCKET {
                let (ctrl, entry) = self.slot(bucket, s);
                let mut retry = seqlock::Retry::new();
                loop {
                    let begin = seqlock::read_begin(ctrl);
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
                        return Err(Corrupt("index entry names an invalid block"));
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

    /// Live keys, exact also after kills (see `livecount.rs`).
    pub(crate) fn len(&self) -> u64 {
        crate::shm::livecount::len(self.r)
    }
}
