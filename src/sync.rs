//! The one place that chooses between `std` and `loom` atomics.
//!
//! Every module that touches shared words imports them from here, so the same
//! algorithms run on the real mapping and, under `RUSTFLAGS="--cfg loom"`, on a
//! heap buffer of loom atomics whose interleavings loom explores.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU64, Ordering};
/// A 16-byte atomic with a lock-free compare-and-swap where the CPU has one
/// (`cmpxchg16b` on x86_64, found at run time; `casp`/`ldxp`+`stxp` on
/// AArch64). Only the free-list heads use it (`slab.rs`), and only after
/// checking [`AtomicU128::is_lock_free`]: the crate's fallback is a
/// process-local lock, which would not exclude other processes. Loom has
/// no 16-byte atomic; under loom the heads are modelled on one word.
#[cfg(not(loom))]
pub(crate) use portable_atomic::AtomicU128;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU64, Ordering};

/// A hint that the caller is busy-waiting on another agent.
///
/// Under loom this yields to the model scheduler, which is how loom learns that
/// the spinning thread cannot make progress on its own.
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}

/// Gives up the CPU while waiting on another process.
#[inline]
pub(crate) fn yield_now() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::thread::yield_now();
}

/// Process-local atomics (never in shared memory, so loom need not model
/// them): caches, per-handle bookkeeping, fork generations.
pub(crate) mod local {
    #[cfg(feature = "redis")]
    pub(crate) use std::sync::atomic::AtomicBool;
    #[cfg(test)]
    pub(crate) use std::sync::atomic::AtomicU32;
    pub(crate) use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
}

/// `std` atomics of other widths over mapped memory, in code that loom does
/// not model (it is compiled out under `cfg(loom)`): futex words, the words
/// of pthread mutexes, and `Value<T>`s of 1, 2, 4 and pointer-sized types.
#[cfg(not(loom))]
pub(crate) mod mapped {
    pub(crate) use std::sync::atomic::{
        AtomicI16, AtomicI32, AtomicI64, AtomicI8, AtomicIsize, AtomicU16, AtomicU32, AtomicU8,
        AtomicUsize, Ordering,
    };
}
