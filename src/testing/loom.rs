//! Entry points for the loom models in `tests/loom.rs`; not part of the API
//! (exported as `shmdict::__loom` under `--cfg loom` only).
//!
//! Under `--cfg loom` the real algorithms run on a heap buffer of loom
//! atomics instead of a shared mapping (see `shm/region.rs`).

use crate::shm::layout::Geometry;
use crate::shm::region::Region;
use crate::shm::slab::Slab;

/// A dictionary on the heap with the given geometry.
pub fn dict(capacity: u64, arena_bytes: u64) -> crate::ShmDict {
    crate::ShmDict::on_heap(capacity, arena_bytes)
}

/// A dictionary on the heap that grows: `capacity` keys and `arena_bytes`
/// to start with, its arena reserved up to `reserve` bytes.
pub fn growing_dict(capacity: u64, arena_bytes: u64, reserve: u64) -> crate::ShmDict {
    crate::ShmDict::on_heap_growing(capacity, arena_bytes, reserve)
}

/// The index generation of `dict` (`grow.rs`).
pub fn generation(dict: &crate::ShmDict) -> u32 {
    dict.index().table().gen
}

/// A growth step of `dict`'s index from generation `from`, by another
/// process, killed at kill point `step` of it (see `livecount::killed_at`;
/// 10: the table is copied, not yet current; 11: it is current, the old one
/// not yet sealed; 0: never). The step runs on the calling model thread: it
/// closes the write gate, grows, and, if killed, leaves the gate closed in
/// the name of its process, which is dead (its attach entry names
/// `attach::LOOM_DEAD_IDENTITY`). Call it while no other thread writes: a
/// dead holder's gate may be taken over at once, and a live grower's is not.
pub fn kill_grower(dict: &crate::ShmDict, from: u32, step: u32) {
    let r = &dict.region;
    let ident = if step == 0 {
        2
    } else {
        crate::shm::attach::LOOM_DEAD_IDENTITY
    };
    let (index, token) = crate::shm::attach::attach(r, crate::shm::attach::LockFd::NONE, ident)
        .expect("a free attach entry");
    crate::shm::livecount::note_entry(r, index);
    let me = crate::shm::attach::Holder::new(token);
    let closed = crate::shm::gate::close(r, &me, |_| true, 1000).expect("no writer inside");
    // Relaxed: the capacity counter; the gate is closed.
    let live = r
        .word(crate::shm::layout::H_LIVE)
        .expect("header")
        .load(crate::sync::Ordering::Relaxed);
    crate::shm::livecount::kill_at(step);
    let step_ = crate::shm::grow::Step { r, g: &dict.geo };
    let _ = step_
        .grow_locked(from, live, |source| dict.take_table(source))
        .expect("the step has room");
    crate::shm::livecount::kill_at(0);
    if step == 0 {
        drop(closed);
    } else {
        std::mem::forget(closed); // Killed: nobody reopens the gate.
    }
}

/// What a writer that takes the block at `granule` of `order` from the
/// arena, once it is free, does to it: the Release fence every writer
/// issues before storing into a recycled block (`slab.rs`), then
/// [`POISON`] over its words after the free-list link. For a block that
/// copying readers (which hold no pin) may still read.
pub fn recycle_block(dict: &crate::ShmDict, granule: u64, order: u32) {
    crate::sync::fence(crate::sync::Ordering::Release);
    let words = dict.slab().block(granule, order).expect("a block");
    for w in &words[1..] {
        // Relaxed: ordered by the fence above.
        w.store(
            u64::from_ne_bytes([POISON; 8]),
            crate::sync::Ordering::Relaxed,
        );
    }
}

/// The granule and order of the block `key`'s entry names now.
pub fn block_of(dict: &crate::ShmDict, key: &[u8]) -> Option<(u64, u32)> {
    let hash = crate::shm::layout::hash_key(key);
    let loc = dict.index().find(key, hash, None).expect("sound")?;
    Some((loc.entry.granule() as u64, loc.entry.order()))
}

/// The home bucket of `key` in `dict`.
pub fn home_bucket(dict: &crate::ShmDict, key: &[u8]) -> u64 {
    crate::shm::layout::hash_key(key) & (dict.nbuckets() - 1)
}

/// Takes a block of `order` from `dict`'s arena and never publishes it:
/// what a process killed between allocating and publishing leaves.
pub fn leak_block(dict: &crate::ShmDict, order: u32) {
    dict.slab()
        .alloc(order, &dict.me)
        .expect("not corrupt")
        .expect("room");
}

/// Marks the slot holding `key` as WRITING by a handle that is not
/// attached (a dead writer), as a process killed mid-write leaves it.
pub fn forge_dead_writer(dict: &crate::ShmDict, key: &[u8]) {
    use crate::shm::layout::SLOTS_PER_BUCKET;
    use crate::sync::Ordering;
    let home = crate::shm::layout::hash_key(key) & (dict.geo.nbuckets - 1);
    let index = dict.index();
    for s in 0..SLOTS_PER_BUCKET {
        let (ctrl, entry) = index.slot(home, s);
        if entry.load(Ordering::Relaxed) != 0 {
            let c = ctrl.load(Ordering::Relaxed);
            // Attach entry 3 is never claimed in the models: dead.
            ctrl.store(c | 3 << 1 | 1, Ordering::Relaxed);
            return;
        }
    }
    panic!("key not in its home bucket");
}

/// Marks the insert lock of `key`'s home bucket as held by a handle that
/// is not attached (a dead inserter).
pub fn forge_dead_insert_lock(dict: &crate::ShmDict, key: &[u8]) {
    use crate::sync::Ordering;
    let home = crate::shm::layout::hash_key(key) & (dict.geo.nbuckets - 1);
    dict.index()
        .bucket_word(home, crate::shm::layout::B_LOCK)
        .store(crate::shm::lockword::HELD | 3, Ordering::Relaxed);
}

/// A second handle of `dict`'s segment, whose process is killed at kill
/// point `step` (see `livecount::killed_at`; 0: never) of a new-key
/// insert of `key` (`insert`) or of the removal of `key`: the real index
/// code runs on the calling model thread and stops there, leaving what a
/// SIGKILL at that instruction leaves (its attach entry names a dead
/// process). Returns the dead handle's attach index.
pub fn kill_counted_write(dict: &crate::ShmDict, key: &[u8], insert: bool, step: u32) -> u64 {
    let r = &dict.region;
    let (index, token) = crate::shm::attach::attach(
        r,
        crate::shm::attach::LockFd::NONE,
        crate::shm::attach::LOOM_DEAD_IDENTITY,
    )
    .expect("attach");
    crate::shm::livecount::note_entry(r, index);
    let dead = crate::shm::attach::Holder::new(token);
    let hash = crate::shm::layout::hash_key(key);
    let ix = dict.index();
    crate::shm::livecount::kill_at(step);
    if insert {
        let order = crate::shm::layout::order_for(key.len(), 8).expect("fits");
        let slab = dict.slab();
        let g = slab.alloc(order, &dead).expect("sound").expect("room");
        let words = slab.block(g, order).expect("block");
        crate::shm::block::write(words, key, hash, &[7; 8]).expect("fits");
        let e = crate::shm::layout::Entry::new(g as u32, order, hash);
        ix.insert_new(key, hash, e, &dead).expect("sound");
    } else {
        let loc = ix.find(key, hash, None).expect("sound").expect("present");
        ix.try_remove(&loc, hash, &dead);
    }
    crate::shm::livecount::kill_at(0);
    index
}

/// What a process that claims the dead handle's attach entry `index`
/// does first (`livecount::adopt`), with a token of its own.
pub fn adopt_entry(dict: &crate::ShmDict, index: u64) {
    let mine = crate::shm::attach::Token(index | 0x7ff << 12);
    crate::shm::livecount::adopt(&dict.region, index, mine);
}

/// One lock word (`lockword.rs`) on a heap region, taken for one
/// attached handle whose [`Holder`](crate::shm::attach::Holder) the model's
/// threads share (as the threads of one process share a handle), and a
/// counter in a loom cell that the lock guards: loom reports two holders
/// at once as a data race on the cell, and a census asserts it too.
#[derive(Debug)]
pub struct LockWord {
    region: Region,
    me: crate::shm::attach::Holder,
    data: loom::cell::UnsafeCell<u64>,
    inside: loom::sync::atomic::AtomicU64,
}

// SAFETY: the cell is accessed only by `increment` while it holds the
// lock word, and by `get` through `&mut`-free reads after the threads
// joined; loom checks every access for races (which is what the model
// tests).
unsafe impl Sync for LockWord {}

impl LockWord {
    /// Byte offset of the lock word: the first word after the attach
    /// table.
    const OFF: u64 = crate::prim::DATA_OFF;

    /// A free lock word and a handle attached by a live process.
    #[allow(clippy::new_without_default)]
    pub fn new() -> LockWord {
        let region = Region::heap(Self::OFF as usize + 64);
        let (_, token) = crate::shm::attach::attach(
            &region,
            crate::shm::attach::LockFd::NONE,
            crate::shm::attach::process_identity(),
        )
        .expect("attach");
        LockWord {
            region,
            me: crate::shm::attach::Holder::new(token),
            data: loom::cell::UnsafeCell::new(0),
            inside: loom::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Takes the word (`lockword::lock`), increments the counter with a
    /// non-atomic read-modify-write, releases the word.
    pub fn increment(&self) {
        let word = self.region.word(Self::OFF).expect("in bounds");
        crate::shm::lockword::lock(&self.region, word, &self.me);
        enter(&self.inside, 1, u64::MAX, "lock word");
        // SAFETY: under the lock word (loom reports a race otherwise).
        self.data.with_mut(|p| unsafe { *p += 1 });
        // A holder can be descheduled while it holds the word.
        loom::thread::yield_now();
        leave(&self.inside, 1);
        crate::shm::lockword::unlock(word, &self.me);
    }

    /// The counter (call after the incrementing threads joined).
    pub fn get(&self) -> u64 {
        // SAFETY: as in `increment`.
        self.data.with(|p| unsafe { *p })
    }
}

/// The bare slab allocator on a heap region.
#[derive(Debug)]
pub struct Arena {
    region: Region,
    geo: Geometry,
    me: crate::shm::attach::Holder,
}

impl Arena {
    /// An arena of at least `bytes` bytes.
    pub fn new(bytes: u64) -> Arena {
        let geo = Geometry::new(1, bytes).expect("geometry");
        Arena {
            region: Region::heap(geo.total_bytes as usize),
            geo,
            me: crate::shm::attach::Holder::new(crate::shm::attach::Token(1)),
        }
    }

    /// Largest order.
    pub fn max_order(&self) -> u32 {
        self.geo.chunk_order
    }

    /// Allocates a block of `order`; its granule index.
    pub fn alloc(&self, order: u32) -> Option<u64> {
        Slab::new(&self.region, &self.geo)
            .alloc(order, &self.me)
            .expect("not corrupt")
    }

    /// Frees a block.
    pub fn free(&self, granule: u64, order: u32) {
        Slab::new(&self.region, &self.geo).free(granule, order, &self.me)
    }

    /// Writes `v` into word 1 of a block the caller owns.
    pub fn write(&self, granule: u64, order: u32, v: u64) {
        let w = Slab::new(&self.region, &self.geo)
            .block(granule, order)
            .expect("block");
        w[1].store(v, crate::sync::Ordering::Relaxed);
    }

    /// Reads word 1 of a block the caller owns.
    pub fn read(&self, granule: u64, order: u32) -> u64 {
        let w = Slab::new(&self.region, &self.geo)
            .block(granule, order)
            .expect("block");
        w[1].load(crate::sync::Ordering::Relaxed)
    }
}

/// The lock of an `Array` segment (`rwlock.rs`) on a heap region, with
/// attached handles (one "process" each), and `len` elements of data in
/// loom cells: loom reports any two accesses to an element that the lock
/// fails to order (a write racing with a read or a write), which is the
/// soundness of the guards' slices.
///
/// Loom's SeqCst fences are stronger than the memory model's (each one
/// synchronizes with every earlier one), and its search only reorders
/// conflicting atomic accesses, so two holds that wrongly overlap can
/// go unnoticed by the cells alone. The guards therefore also count
/// the holders of each kind, and of each element, with Relaxed
/// read-modify-writes (which conflict, so loom explores their orders,
/// but order nothing) and assert that no two conflicting holds coexist.
#[derive(Debug)]
pub struct ArrayLock {
    region: Region,
    handles: Vec<crate::prim::Local>,
    data: Box<[loom::cell::UnsafeCell<u64>]>,
    /// Holders: exclusive (`ONE_WRITER`), read mode, chunk mode.
    holders: loom::sync::atomic::AtomicU64,
    /// Per element: holders of a range (or the whole array) covering it.
    owners: Box<[loom::sync::atomic::AtomicU64]>,
}

const ONE_WRITER: u64 = 1;
const ONE_READER: u64 = 1 << 16;
const ONE_CHUNK: u64 = 1 << 32;
const COUNT: u64 = 0xffff;

/// A model-level census of holds (see [`ArrayLock`]).
fn enter(counter: &loom::sync::atomic::AtomicU64, unit: u64, conflicts: u64, what: &str) {
    // Relaxed: only a census; it must not add synchronization.
    let before = counter.fetch_add(unit, crate::sync::Ordering::Relaxed);
    assert!(
        before & conflicts == 0,
        "{what} granted while conflicting holds exist: {before:#x}"
    );
}

fn leave(counter: &loom::sync::atomic::AtomicU64, unit: u64) {
    // Relaxed: as in `enter`.
    counter.fetch_sub(unit, crate::sync::Ordering::Relaxed);
}

// SAFETY: the cells are accessed only through the guards below, each of
// which holds the lock in a mode that admits the access; loom checks
// every access for races (which is what the models test).
unsafe impl Sync for ArrayLock {}

/// What a handle held when its process was killed.
#[derive(Debug, Clone)]
pub enum Hold {
    /// The exclusive lock (`Array::write`).
    Write,
    /// A shared hold in read mode (`Array::read`).
    Read,
    /// A shared hold in chunk mode and a claim of the range.
    Chunk(std::ops::Range<usize>),
}

impl ArrayLock {
    /// `len` zero elements and `handles` attached handles (at most 3:
    /// loom's attach table has 4 entries, one kept for a killed handle).
    pub fn new(len: usize, handles: usize) -> ArrayLock {
        let region = Region::heap(crate::prim::DATA_OFF as usize);
        let handles = (0..handles)
            .map(|_| crate::prim::attach_handle(&region, 1).expect("attach"))
            .collect();
        let data = (0..len).map(|_| loom::cell::UnsafeCell::new(0)).collect();
        let owners = (0..len)
            .map(|_| loom::sync::atomic::AtomicU64::new(0))
            .collect();
        ArrayLock {
            region,
            handles,
            data,
            holders: loom::sync::atomic::AtomicU64::new(0),
            owners,
        }
    }

    /// Attaches one more handle, takes `hold` with it through the real
    /// acquisition code, and "kills its process": its attach entry names
    /// a dead process and its process-local state is gone. (A dead
    /// process's data writes may be half done; the elements are not
    /// touched here.)
    pub fn kill_holder(&self, hold: Hold) {
        let r = &self.region;
        let dead =
            crate::prim::attach_handle(r, crate::shm::attach::LOOM_DEAD_IDENTITY).expect("attach");
        match hold {
            Hold::Write => {
                crate::shm::rwlock::acquire_exclusive(r, &dead);
            }
            Hold::Read => {
                crate::shm::rwlock::acquire_shared(r, &dead, crate::shm::rwlock::Mode::Read);
            }
            Hold::Chunk(range) => {
                crate::shm::rwlock::acquire_range(r, &dead, range.start as u64, range.end as u64)
                    .expect("a free claim slot");
            }
        }
    }

    /// `Array::read` by handle `h`.
    pub fn read(&self, h: usize) -> ReadGuard<'_> {
        let recovered = crate::shm::rwlock::acquire_shared(
            &self.region,
            &self.handles[h],
            crate::shm::rwlock::Mode::Read,
        );
        enter(
            &self.holders,
            ONE_READER,
            COUNT * (ONE_WRITER | ONE_CHUNK),
            "read",
        );
        ReadGuard {
            lock: self,
            h,
            recovered,
        }
    }

    /// `Array::write` by handle `h`.
    pub fn write(&self, h: usize) -> WriteGuard<'_> {
        let recovered = crate::shm::rwlock::acquire_exclusive(&self.region, &self.handles[h]);
        enter(&self.holders, ONE_WRITER, u64::MAX, "write");
        WriteGuard {
            lock: self,
            h,
            recovered,
        }
    }

    /// `Array::range_mut` by handle `h`; `None` if the claim table is
    /// full.
    pub fn range_mut(&self, h: usize, range: std::ops::Range<usize>) -> Option<ChunkGuard<'_>> {
        let (slot, recovered) = crate::shm::rwlock::acquire_range(
            &self.region,
            &self.handles[h],
            range.start as u64,
            range.end as u64,
        )
        .ok()?;
        enter(
            &self.holders,
            ONE_CHUNK,
            COUNT * (ONE_WRITER | ONE_READER),
            "chunk",
        );
        for i in range.clone() {
            enter(&self.owners[i], 1, u64::MAX, "overlapping chunk");
        }
        Some(ChunkGuard {
            lock: self,
            h,
            range,
            slot,
            recovered,
        })
    }

    fn load(&self, i: usize) -> u64 {
        // SAFETY: called by a guard whose hold admits reading element
        // `i`; loom panics instead if another access races with this.
        self.data[i].with(|p| unsafe { *p })
    }

    fn store(&self, i: usize, v: u64) {
        // SAFETY: called by a guard whose hold admits writing element
        // `i`; loom panics instead if another access races with this.
        self.data[i].with_mut(|p| unsafe { *p = v })
    }
}

/// A shared hold in read mode.
#[derive(Debug)]
pub struct ReadGuard<'a> {
    lock: &'a ArrayLock,
    h: usize,
    recovered: bool,
}

impl ReadGuard<'_> {
    /// Element `i`.
    pub fn get(&self, i: usize) -> u64 {
        self.lock.load(i)
    }
    /// Whether the acquisition found a dead holder.
    pub fn recovered(&self) -> bool {
        self.recovered
    }
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        leave(&self.lock.holders, ONE_READER);
        crate::shm::rwlock::release_shared(&self.lock.region, &self.lock.handles[self.h]);
    }
}

/// The exclusive hold.
#[derive(Debug)]
pub struct WriteGuard<'a> {
    lock: &'a ArrayLock,
    h: usize,
    recovered: bool,
}

impl WriteGuard<'_> {
    /// Element `i`.
    pub fn get(&self, i: usize) -> u64 {
        self.lock.load(i)
    }
    /// Sets element `i`.
    pub fn set(&self, i: usize, v: u64) {
        self.lock.store(i, v)
    }
    /// Whether the acquisition found a dead holder.
    pub fn recovered(&self) -> bool {
        self.recovered
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        leave(&self.lock.holders, ONE_WRITER);
        crate::shm::rwlock::release_exclusive(&self.lock.region, &self.lock.handles[self.h]);
    }
}

/// A shared hold in chunk mode and the claim of a range.
#[derive(Debug)]
pub struct ChunkGuard<'a> {
    lock: &'a ArrayLock,
    h: usize,
    range: std::ops::Range<usize>,
    slot: Option<u64>,
    recovered: bool,
}

impl ChunkGuard<'_> {
    /// Element `i` of the array (which must be in the guard's range).
    pub fn get(&self, i: usize) -> u64 {
        assert!(self.range.contains(&i), "{i} outside {:?}", self.range);
        self.lock.load(i)
    }
    /// Sets element `i` of the array (which must be in the range).
    pub fn set(&self, i: usize, v: u64) {
        assert!(self.range.contains(&i), "{i} outside {:?}", self.range);
        self.lock.store(i, v)
    }
    /// Whether the acquisition found a dead holder.
    pub fn recovered(&self) -> bool {
        self.recovered
    }
}

impl Drop for ChunkGuard<'_> {
    fn drop(&mut self) {
        for i in self.range.clone() {
            leave(&self.lock.owners[i], 1);
        }
        leave(&self.lock.holders, ONE_CHUNK);
        crate::shm::rwlock::release_range(&self.lock.region, &self.lock.handles[self.h], self.slot);
    }
}

/// A double-buffered `Value` of three words on a heap region, holding
/// `[init; 3]`; the model's threads share its one handle.
pub fn value(init: u64) -> crate::Value<[u64; 3]> {
    crate::Value::on_heap([init; 3])
}

/// A handle of `v`'s segment takes the writers' lock word, writes
/// `garbage` into the first word of the spare slot, and its process is
/// killed: what a writer killed in the middle of `publish` leaves.
pub fn kill_value_writer(v: &crate::Value<[u64; 3]>, garbage: u64) {
    let r = &v.segment().region;
    let dead =
        crate::prim::attach_handle(r, crate::shm::attach::LOOM_DEAD_IDENTITY).expect("attach");
    crate::shm::rwlock::lock_word(r, &dead);
    let seq = crate::prim::word(r, crate::prim::P_SEQ).load(crate::sync::Ordering::Relaxed);
    let spare = crate::prim::DATA_OFF + ((seq + 1) & 1) * 24;
    r.word(spare)
        .expect("slot")
        .store(garbage, crate::sync::Ordering::Relaxed);
}

// ---------------------------------------------------------------------------
// Borrowed reads (`shm/epoch.rs`).
// ---------------------------------------------------------------------------

/// The byte every value word of a recycled block is overwritten with by
/// [`Borrowing::recycle`]: a pinned read that returns it read a block
/// that was freed under its pin.
pub const POISON: u8 = 0xdd;

/// A dictionary on the heap for the models of borrowed reads, with the
/// model's view of who reads and writes each arena block's bytes.
///
/// `Reader::get` (`dict/borrow.rs`, not compiled under loom) hands out the
/// value's bytes as a plain `&[u8]`: the reads a `Reader`'s user makes are
/// not atomic, so a recycling write that does not *happen after* them is a
/// data race even if the reader never sees the new bytes. Loom cannot
/// show that through values alone (it explores no load buffering: a load
/// never returns a store that runs later in its schedule). So every
/// granule of the arena has a shadow loom cell: [`Pinned::get`] reads the
/// cell of the block it returns, [`Borrowing::recycle`] writes it, and
/// loom fails the model ("causality violation") when the write is not
/// ordered after the read, as it would be by an unpin that an advance saw.
#[derive(Debug)]
pub struct Borrowing {
    dict: crate::ShmDict,
    shadow: Box<[loom::cell::UnsafeCell<()>]>,
}

// SAFETY: the shadow cells hold `()` and are only passed to loom's
// `with`/`with_mut`, never dereferenced; loom checks every access for
// races, which is what the models test. The dictionary is `Sync`.
unsafe impl Sync for Borrowing {}

impl std::ops::Deref for Borrowing {
    type Target = crate::ShmDict;
    fn deref(&self) -> &crate::ShmDict {
        &self.dict
    }
}

impl Borrowing {
    /// A dictionary as [`dict`] makes, with a shadow cell per granule.
    pub fn new(capacity: u64, arena_bytes: u64) -> Borrowing {
        Borrowing::with(dict(capacity, arena_bytes))
    }

    /// A dictionary as [`growing_dict`] makes, with a shadow cell per
    /// granule.
    pub fn growing(capacity: u64, arena_bytes: u64, reserve: u64) -> Borrowing {
        Borrowing::with(growing_dict(capacity, arena_bytes, reserve))
    }

    fn with(dict: crate::ShmDict) -> Borrowing {
        let granules = dict.geo.arena_bytes / crate::shm::layout::GRANULE;
        let shadow = (0..granules)
            .map(|_| loom::cell::UnsafeCell::new(()))
            .collect();
        Borrowing { dict, shadow }
    }

    fn alive(&self) -> impl Fn(u64) -> bool + '_ {
        |i| self.dict.entry_alive(i)
    }

    /// A pin of this handle's stash, preferring slot `hint`, as
    /// `ShmDict::reader` takes one. Released when dropped.
    pub fn pin(&self, hint: u64) -> Pinned<'_> {
        let index = self.dict.registration().expect("attached").index;
        let pin = self.dict.epochs().pin(index, hint).expect("sound");
        Pinned { b: self, pin }
    }

    /// The first granule of the block that `key`'s entry names now.
    pub fn granule_of(&self, key: &[u8]) -> Option<u64> {
        let hash = crate::shm::layout::hash_key(key);
        let loc = self.dict.index().find(key, hash, None).expect("sound")?;
        Some(loc.entry.granule() as u64)
    }

    /// One `Epochs::try_advance`, with this handle's view of liveness.
    pub fn advance(&self) -> bool {
        self.dict
            .epochs()
            .try_advance(&self.alive())
            .expect("sound")
    }

    /// `Epochs::reclaim_everywhere` (what a writer short of room runs):
    /// the bytes it freed.
    pub fn reclaim(&self) -> u64 {
        self.dict
            .epochs()
            .reclaim_everywhere(&self.dict.me, &self.alive())
            .expect("sound")
    }

    /// First granules of every block the stashes hold (retired blocks and
    /// spill bags): exact while no other thread retires.
    pub fn held(&self) -> Vec<u64> {
        let mut held = Vec::new();
        self.dict
            .epochs()
            .for_each_held(|g, _| held.push(g))
            .expect("sound");
        held
    }

    /// What a writer that takes the freed order-0 block at `granule` from
    /// the arena does to it: overwrites its words after the free-list link
    /// (word 0, which the free itself wrote) with [`POISON`], as a write
    /// of its shadow cell. Call only for a block the caller saw freed.
    pub fn recycle(&self, granule: u64) {
        self.shadow[granule as usize].with_mut(|_| ());
        let words = self.dict.slab().block(granule, 0).expect("a block");
        for w in &words[1..] {
            // Relaxed: a writer's block writes before it publishes; what
            // the models check is that no pinned read sees them.
            w.store(
                u64::from_ne_bytes([POISON; 8]),
                crate::sync::Ordering::Relaxed,
            );
        }
    }

    /// Attaches another handle, as another process, pins its stash (slot
    /// 0), and leaves the pin held: a process holding a `Reader`. If
    /// `alive` is false the process is dead (its entry names
    /// `attach::LOOM_DEAD_IDENTITY`, as
    /// a process killed while pinned leaves it); else it lives (stopped,
    /// say). Returns its attach index.
    pub fn foreign_pin(&self, alive: bool) -> u64 {
        let r = &self.dict.region;
        // Any identity but the dead one is a live process under loom.
        let ident = if alive {
            2
        } else {
            crate::shm::attach::LOOM_DEAD_IDENTITY
        };
        let (index, _) = crate::shm::attach::attach(r, crate::shm::attach::LockFd::NONE, ident)
            .expect("a free attach entry");
        crate::shm::livecount::note_entry(r, index);
        let pin = self.dict.epochs().pin(index, 0).expect("sound");
        assert_eq!(pin.slot, 0);
        index
    }

    /// Releases the pin [`Borrowing::foreign_pin`] took for entry `index`.
    pub fn foreign_unpin(&self, index: u64) {
        self.dict.epochs().unpin(crate::shm::epoch::Pin {
            stash: index,
            slot: 0,
        });
    }
}

/// A pin held by a model thread: a `Reader`.
#[derive(Debug)]
pub struct Pinned<'a> {
    b: &'a Borrowing,
    pin: crate::shm::epoch::Pin,
}

impl Pinned<'_> {
    /// The slot this pin holds (or joined).
    pub fn slot(&self) -> u64 {
        self.pin.slot
    }

    /// `Reader::get` under loom: the same lookup (`Index::find_pinned`: the
    /// slot's entry, then the block's lengths and key, with no seqlock),
    /// then the value bytes, loaded a word at a time (the real reader reads
    /// them as plain bytes: see [`Borrowing`] for the shadow read that
    /// stands for that). Panics if the block no longer holds a value.
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.lookup(key, false)
    }

    /// As [`Pinned::get`], with the reader descheduled between finding the
    /// entry and reading the block (a yield: loom runs the other threads
    /// there, to the end if they can, at no cost in preemptions).
    pub fn get_descheduled(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.lookup(key, true)
    }

    fn lookup(&self, key: &[u8], deschedule: bool) -> Option<Vec<u8>> {
        let d = &self.b.dict;
        let hash = crate::shm::layout::hash_key(key);
        let (e, start, len) = d.index().find_pinned(key, hash).expect(
            "a pinned block holds a whole key and value (it was not freed under the pin)",
        )?;
        if deschedule {
            loom::thread::yield_now();
        }
        self.b.shadow[e.granule() as usize].with(|_| ());
        let words = d
            .region
            .words(start, len.div_ceil(8) as u64)
            .expect("the value lies in the region");
        let mut out = Vec::with_capacity(len);
        for w in words {
            // Relaxed: under the pin; the bytes of a published block were
            // written before its publication, which the lookup acquired.
            out.extend_from_slice(&w.load(crate::sync::Ordering::Relaxed).to_ne_bytes());
        }
        out.truncate(len);
        Some(out)
    }
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        self.b.dict.epochs().unpin(self.pin);
    }
}
