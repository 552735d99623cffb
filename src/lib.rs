#![doc = include_str!("../README.md")]
// Loom builds compile out the OS layer (segments, names, liveness), so parts
// of the format code that only it uses are unused there.
#![cfg_attr(loom, allow(dead_code, unused_imports))]
#[cfg(not(target_os = "linux"))]
compile_error!("shmdict supports Linux only (it relies on /dev/shm, /proc and futexes)");
#[cfg(not(target_has_atomic = "64"))]
compile_error!("shmdict needs 64-bit atomics");

#[cfg(not(loom))]
mod array;
mod attach;
#[cfg(not(loom))]
mod backend;
mod block;
mod check;
mod dict;
mod error;
mod gate;
mod index;
mod layout;
#[cfg(not(loom))]
mod locks;
mod lockword;
mod name;
#[cfg(not(loom))]
pub mod pool;
mod prim;
mod region;
#[cfg(not(loom))]
mod robust;
mod rwlock;
pub mod segments;
mod seqlock;
mod slab;
#[cfg(not(loom))]
pub mod space;
mod sync;
#[cfg(not(loom))]
mod sys;
mod typed;
mod value;
#[cfg(not(loom))]
mod wait;

#[cfg(not(loom))]
pub use array::{Array, ArrayOptions, ChunkGuard, ReadGuard, WriteGuard};
#[cfg(all(not(loom), feature = "redis"))]
pub use backend::redis::{RedisDict, RedisLock, RedisOptions};
#[cfg(not(loom))]
pub use backend::{connect, Dict, DictLock};
pub use check::CheckReport;
pub use dict::{Options, ShmDict, Stats};
pub use error::{Error, Result};
#[cfg(not(loom))]
pub use locks::{DictGuard, KeysGuard};
pub use typed::Typed;
pub use value::{Value, ValueOptions};
#[cfg(not(loom))]
pub use wait::Version;

/// Entry points for the loom models in `tests/loom.rs`; not part of the API.
///
/// Under `--cfg loom` the real algorithms run on a heap buffer of loom
/// atomics instead of a shared mapping (see `region.rs`).
#[cfg(loom)]
#[doc(hidden)]
pub mod __loom {
    use crate::layout::Geometry;
    use crate::region::Region;
    use crate::slab::Slab;

    /// A dictionary on the heap with the given geometry.
    pub fn dict(capacity: u64, arena_bytes: u64) -> crate::ShmDict {
        crate::ShmDict::on_heap(capacity, arena_bytes)
    }

    /// The home bucket of `key` in `dict`.
    pub fn home_bucket(dict: &crate::ShmDict, key: &[u8]) -> u64 {
        crate::layout::hash_key(key) & (dict.nbuckets() - 1)
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
        use crate::layout::SLOTS_PER_BUCKET;
        use crate::sync::Ordering;
        let home = crate::layout::hash_key(key) & (dict.geo.nbuckets - 1);
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
        let home = crate::layout::hash_key(key) & (dict.geo.nbuckets - 1);
        dict.index()
            .bucket_word(home, crate::layout::B_LOCK)
            .store(crate::lockword::HELD | 3, Ordering::Relaxed);
    }

    /// The bare slab allocator on a heap region.
    #[derive(Debug)]
    pub struct Arena {
        region: Region,
        geo: Geometry,
        me: crate::attach::Holder,
    }

    impl Arena {
        /// An arena of at least `bytes` bytes.
        pub fn new(bytes: u64) -> Arena {
            let geo = Geometry::new(1, bytes).expect("geometry");
            Arena {
                region: Region::heap(geo.total_bytes as usize),
                geo,
                me: crate::attach::Holder::new(crate::attach::Token(1)),
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
                crate::prim::attach_handle(r, crate::attach::LOOM_DEAD_IDENTITY).expect("attach");
            match hold {
                Hold::Write => {
                    crate::rwlock::acquire_exclusive(r, &dead);
                }
                Hold::Read => {
                    crate::rwlock::acquire_shared(r, &dead, crate::rwlock::Mode::Read);
                }
                Hold::Chunk(range) => {
                    crate::rwlock::acquire_range(r, &dead, range.start as u64, range.end as u64)
                        .expect("a free claim slot");
                }
            }
        }

        /// `Array::read` by handle `h`.
        pub fn read(&self, h: usize) -> ReadGuard<'_> {
            let recovered = crate::rwlock::acquire_shared(
                &self.region,
                &self.handles[h],
                crate::rwlock::Mode::Read,
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
            let recovered = crate::rwlock::acquire_exclusive(&self.region, &self.handles[h]);
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
            let (slot, recovered) = crate::rwlock::acquire_range(
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
            crate::rwlock::release_shared(&self.lock.region, &self.lock.handles[self.h]);
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
            crate::rwlock::release_exclusive(&self.lock.region, &self.lock.handles[self.h]);
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
            crate::rwlock::release_range(&self.lock.region, &self.lock.handles[self.h], self.slot);
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
            crate::prim::attach_handle(r, crate::attach::LOOM_DEAD_IDENTITY).expect("attach");
        crate::rwlock::lock_word(r, &dead);
        let seq = crate::prim::word(r, crate::prim::P_SEQ).load(crate::sync::Ordering::Relaxed);
        let spare = crate::prim::DATA_OFF + ((seq + 1) & 1) * 24;
        r.word(spare)
            .expect("slot")
            .store(garbage, crate::sync::Ordering::Relaxed);
    }
}
