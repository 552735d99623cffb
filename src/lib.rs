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
mod prim;
mod region;
#[cfg(not(loom))]
mod robust;
#[cfg(not(loom))]
mod rwlock;
pub mod segments;
mod seqlock;
mod slab;
mod sync;
#[cfg(not(loom))]
mod sys;
mod typed;
#[cfg(not(loom))]
mod value;
#[cfg(not(loom))]
mod wait;

#[cfg(not(loom))]
pub use array::{Array, ArrayOptions, ChunkGuard, ReadGuard, WriteGuard};
pub use check::CheckReport;
pub use dict::{Options, ShmDict, Stats};
pub use error::{Error, Result};
#[cfg(not(loom))]
pub use locks::{DictGuard, KeysGuard};
pub use typed::Typed;
#[cfg(not(loom))]
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
}
