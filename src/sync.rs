//! The one place that chooses between `std` and `loom` atomics.
//!
//! Every module that touches shared words imports them from here, so the same
//! algorithms run on the real mapping and, under `RUSTFLAGS="--cfg loom"`, on a
//! heap buffer of loom atomics whose interleavings loom explores.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU64, Ordering};
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
/// them): caches and per-handle bookkeeping.
pub(crate) mod local {
    pub(crate) use std::sync::atomic::{AtomicPtr, Ordering};
}
