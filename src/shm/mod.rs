//! The shared-memory algorithms, written over a [`Region`](region::Region)
//! of atomic words so that the same code runs on a segment's mapping and,
//! under `--cfg loom`, on a heap buffer whose interleavings loom explores.
//!
//! Nothing here calls the operating system, except where a handle's
//! liveness is asked of the kernel (`attach`, through `sys`, compiled out
//! under loom).
//!
//! | module         | concept                                                   |
//! |----------------|-----------------------------------------------------------|
//! | `region`       | bounds-checked view of shared memory as atomic words      |
//! | `commit`       | memory given by /dev/shm before first touch (no SIGBUS)   |
//! | `layout`       | the dictionary segment's format: header, offsets, sizes   |
//! | `attach`       | the attach table: entries, tokens, who is alive           |
//! | `registration` | a handle's entries, one per process (fork-aware)          |
//! | `lockword`     | owner-tagged lock words and the waiting backoff           |
//! | `seqlock`      | an index slot's control word: writers' lock, readers' check |
//! | `index`        | the open-addressing hash index of seqlocked slots         |
//! | `block`        | a key-value block's bytes in the arena                    |
//! | `slab`         | the arena allocator: buddy-aligned blocks, free lists     |
//! | `epoch`        | borrowed reads: pins, the epoch, retired blocks           |
//! | `gate`         | the write gate that lets `check()` pause writers          |
//! | `grow`         | growth while attached: index generations, the growth step |
//! | `rwlock`       | the `Array` lock: shared, exclusive and chunk holds       |

pub(crate) mod attach;
pub(crate) mod block;
pub(crate) mod commit;
pub(crate) mod epoch;
pub(crate) mod gate;
pub(crate) mod grow;
pub(crate) mod index;
pub(crate) mod layout;
pub(crate) mod livecount;
pub(crate) mod lockword;
pub(crate) mod region;
pub(crate) mod registration;
pub(crate) mod rwlock;
pub(crate) mod seqlock;
pub(crate) mod slab;
