//! A bounds-checked view of shared memory as 64-bit atomic words.
//!
//! All of shmdict's shared-memory algorithms (the index, the slab, the attach
//! table) read and write the segment only through [`Region`]. A region is
//! either a live mapping of a segment or, for tests and loom models, a heap
//! buffer of atomics. Every access names a byte offset and is checked against
//! the region's length, so an offset read from a corrupted segment can produce
//! `None` (and from there `Error::Corrupt`) but never an access outside the
//! mapping.
//!
//! This module holds the one `unsafe` conversion of mapped bytes into atomics.

#[cfg(not(loom))]
use crate::sync::mapped::AtomicU32;
#[cfg(not(loom))]
use crate::sync::AtomicU128;
use crate::sync::AtomicU64;

/// Heap regions outside loom are built of these, so that 16-byte pairs
/// ([`Region::pair`]) are aligned as they are in a (page-aligned) mapping.
#[cfg(all(test, not(loom)))]
#[repr(C, align(16))]
struct HeapPair([AtomicU64; 2]);
#[cfg(all(test, not(loom)))]
const _: () = assert!(std::mem::size_of::<HeapPair>() == 16);

/// Who keeps the memory behind a [`Region`] alive.
enum Backing {
    #[cfg(not(loom))]
    Map(#[allow(dead_code)] memmap2::MmapRaw),
    #[cfg(loom)]
    Heap(#[allow(dead_code)] Box<[AtomicU64]>),
    #[cfg(all(test, not(loom)))]
    Heap(#[allow(dead_code)] Box<[HeapPair]>),
}

/// Shared memory seen as an array of `AtomicU64`, addressed by byte offset.
pub(crate) struct Region {
    /// First word. Valid for `len_words` words while `_backing` lives.
    base: *const AtomicU64,
    len_words: usize,
    _backing: Backing,
    /// The descriptor through which pages are committed ([`Region::commit`]):
    /// the handle's own file, which the handle keeps open for as long as
    /// the region lives (not owned here: after `fork`, `sys::fork` gives
    /// the child a fresh description under the same number, and a
    /// duplicate kept here would keep the parent's locks alive).
    #[cfg(not(loom))]
    commit_fd: Option<std::os::fd::RawFd>,
}

// SAFETY: a Region only hands out `&AtomicU64`, which is Sync; the backing
// memory (a shared mapping or a boxed slice) is not tied to a thread.
unsafe impl Send for Region {}
// SAFETY: as above: every access through a Region is an atomic operation.
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("bytes", &self.len())
            .finish()
    }
}

impl Region {
    /// Views a shared mapping as atomic words.
    ///
    /// Returns `None` if the mapping is not 16-byte aligned (mmap returns
    /// page-aligned addresses, so this does not happen in practice).
    #[cfg(not(loom))]
    pub(crate) fn from_map(map: memmap2::MmapRaw) -> Option<Region> {
        let ptr = map.as_ptr();
        if (ptr as usize) % std::mem::align_of::<AtomicU128>() != 0 {
            return None;
        }
        Some(Region {
            base: ptr.cast::<AtomicU64>(),
            len_words: map.len() / 8,
            _backing: Backing::Map(map),
            commit_fd: None,
        })
    }

    /// A zero-filled region on the heap (tests and loom models).
    #[cfg(loom)]
    pub(crate) fn heap(bytes: usize) -> Region {
        let words: Box<[AtomicU64]> = (0..bytes / 8).map(|_| AtomicU64::new(0)).collect();
        Region {
            base: words.as_ptr(),
            len_words: words.len(),
            _backing: Backing::Heap(words),
        }
    }

    /// A zero-filled, 16-byte aligned region on the heap (tests).
    #[cfg(all(test, not(loom)))]
    pub(crate) fn heap(bytes: usize) -> Region {
        let pairs: Box<[HeapPair]> = (0..bytes.div_ceil(16))
            .map(|_| HeapPair([AtomicU64::new(0), AtomicU64::new(0)]))
            .collect();
        Region {
            // A HeapPair is two AtomicU64 with no padding (asserted above),
            // so the pairs are a contiguous array of words.
            base: pairs.as_ptr().cast::<AtomicU64>(),
            len_words: bytes / 8,
            _backing: Backing::Heap(pairs),
            commit_fd: None,
        }
    }

    /// Length of the region in bytes (a multiple of 8).
    #[inline]
    pub(crate) fn len(&self) -> u64 {
        self.len_words as u64 * 8
    }

    /// The word at byte offset `off`, if `off` is 8-aligned and in bounds.
    #[inline]
    pub(crate) fn word(&self, off: u64) -> Option<&AtomicU64> {
        self.words(off, 1).map(|w| &w[0])
    }

    /// `n` consecutive words starting at byte offset `off`, if 8-aligned and
    /// entirely in bounds.
    #[inline]
    pub(crate) fn words(&self, off: u64, n: u64) -> Option<&[AtomicU64]> {
        if off % 8 != 0 {
            return None;
        }
        let first = usize::try_from(off / 8).ok()?;
        let n = usize::try_from(n).ok()?;
        let end = first.checked_add(n)?;
        if end > self.len_words {
            return None;
        }
        // SAFETY: `first..end` lies within the `len_words` words starting at
        // `base`, which `_backing` keeps allocated (and, for a mapping, mapped)
        // for as long as `self` lives; the returned borrow is tied to `self`.
        // `base` is aligned for AtomicU64 (checked in `from_map`; a boxed
        // slice is aligned by construction). For a mapping, AtomicU64 has the
        // same size and alignment as u64, and shmdict never accesses the mapped
        // bytes other than through atomics, so no non-atomic access races with
        // these. Other processes' accesses are atomic operations too.
        Some(unsafe { std::slice::from_raw_parts(self.base.add(first), n) })
    }

    /// The 16-byte pair of words at byte offset `off`, if 16-aligned and in
    /// bounds, as one 16-byte atomic: for the free-list heads (`slab.rs`).
    /// Those 16 bytes must never be accessed through [`Region::word`]: the
    /// layout keeps each head on a cache line of its own.
    #[cfg(not(loom))]
    #[inline]
    pub(crate) fn pair(&self, off: u64) -> Option<&AtomicU128> {
        if off % 16 != 0 || off.checked_add(16)? > self.len() {
            return None;
        }
        let off = usize::try_from(off).ok()?;
        // SAFETY: `off..off + 16` lies inside the region (checked above),
        // which `_backing` keeps alive for the borrow's lifetime; `base` is
        // 16-aligned (checked in `from_map`; heap regions are built of
        // 16-aligned pairs) and `off` is a multiple of 16, so the pointer is
        // aligned for AtomicU128, which has the size of two words. These
        // bytes are only ever accessed as AtomicU128, by us and by other
        // processes, all atomically (the caller checks that the operations
        // are lock-free, i.e. real 16-byte instructions).
        Some(unsafe { &*self.base.cast::<u8>().add(off).cast::<AtomicU128>() })
    }

    /// The 32-bit word at byte offset `off`, if 4-aligned and in bounds: for
    /// futex words, which the kernel reads as 32 bits. A futex word's 8-byte
    /// neighbourhood must never be accessed through [`Region::word`]: the
    /// layout keeps 32-bit words in areas of their own.
    #[cfg(not(loom))]
    #[inline]
    pub(crate) fn word32(&self, off: u64) -> Option<&AtomicU32> {
        if off % 4 != 0 || off.checked_add(4)? > self.len() {
            return None;
        }
        let off = usize::try_from(off).ok()?;
        // SAFETY: `off..off + 4` lies inside the region (checked above), which
        // `_backing` keeps alive for the borrow's lifetime; `base` is 8-aligned
        // and `off` 4-aligned, so the pointer is aligned for AtomicU32. These
        // bytes are only ever accessed as AtomicU32, by us, other processes and
        // the kernel's futex code, all atomically.
        Some(unsafe { &*self.base.cast::<u8>().add(off).cast::<AtomicU32>() })
    }

    /// Asks the CPU to bring the cache line of `w` into the cache, without
    /// waiting for it: a hint, with no effect on what any load returns. A
    /// writer issues it for lines it will need after work that does not
    /// depend on them (the bucket and the old block of a key it is about
    /// to overwrite, while it prepares the new block). A software prefetch
    /// is not ordered by fences or locked instructions, so the line comes
    /// in while those run.
    #[inline]
    pub(crate) fn prefetch(w: &AtomicU64) {
        #[cfg(all(target_arch = "x86_64", not(loom)))]
        // SAFETY: `_mm_prefetch` only needs SSE, which every x86_64 CPU
        // has (it is in the target's baseline). A prefetch accesses no
        // memory architecturally and cannot fault; the address is that of
        // a live reference anyway.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().cast::<i8>());
        }
        #[cfg(not(all(target_arch = "x86_64", not(loom))))]
        let _ = w;
    }

    /// Commits through `fd` from now on (see [`Region::commit`]). The caller
    /// keeps `fd` open for as long as the region lives.
    #[cfg(not(loom))]
    pub(crate) fn set_commit_fd(&mut self, fd: std::os::fd::RawFd) {
        self.commit_fd = Some(fd);
    }

    /// Gives the bytes `off..off + len` of the segment memory in /dev/shm
    /// before anything touches them (`fallocate`), so that a full /dev/shm
    /// is an error here rather than a SIGBUS at the first touch. `false` if
    /// the file system has no room. Regions without a file (heap regions in
    /// tests, loom models) have all their memory already.
    #[cfg(not(loom))]
    pub(crate) fn commit(&self, off: u64, len: u64) -> bool {
        let Some(fd) = self.commit_fd else {
            return true;
        };
        let end = off.saturating_add(len).min(self.len());
        if end <= off {
            return true;
        }
        // SAFETY: the handle that set `commit_fd` keeps that descriptor open
        // for as long as this region lives (`set_commit_fd`).
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        crate::sys::commit(fd, off, end - off).is_ok()
    }

    #[cfg(loom)]
    pub(crate) fn commit(&self, _off: u64, _len: u64) -> bool {
        true
    }

    /// The `len` bytes at `off`, as plain bytes, if in bounds.
    ///
    /// # Safety
    ///
    /// No process may write these bytes while the returned slice lives. The
    /// only caller reads a published arena block under a pin: published
    /// blocks are never written, and a pinned block is not recycled
    /// (`epoch.rs`). A process that breaks the protocol (a corrupted or
    /// hostile writer) can change the bytes a reader sees, as with any
    /// shared mapping, and the reader may then see torn data.
    #[cfg(not(loom))]
    #[inline]
    pub(crate) unsafe fn frozen_bytes(&self, off: u64, len: u64) -> Option<&[u8]> {
        let p = self.raw(off, len)?;
        let len = usize::try_from(len).ok()?;
        // SAFETY: in bounds (`raw`), alive as long as `self`, and unchanged
        // while borrowed (the caller's obligation above). `u8` has no
        // alignment or validity requirement.
        Some(unsafe { std::slice::from_raw_parts(p.cast_const(), len) })
    }

    /// A raw pointer to `len` bytes at offset `off`, if 8-aligned and in
    /// bounds: for the process-shared pthread mutexes (`sys/robust_mutex.rs`), which
    /// libc accesses with its own atomics. Those bytes are never accessed
    /// through [`Region::word`].
    #[cfg(not(loom))]
    #[inline]
    pub(crate) fn raw(&self, off: u64, len: u64) -> Option<*mut u8> {
        if off % 8 != 0 || off.checked_add(len)? > self.len() {
            return None;
        }
        let off = usize::try_from(off).ok()?;
        // SAFETY: in bounds (checked above) of the allocation `base` points
        // into, so `add` stays inside it. Creating the pointer is safe; its
        // users state their own obligations.
        Some(unsafe { self.base.cast::<u8>().add(off) }.cast_mut())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::Ordering;

    #[test]
    fn bounds_are_checked() {
        let r = Region::heap(64);
        assert_eq!(r.len(), 64);
        assert!(r.word(0).is_some());
        assert!(r.word(56).is_some());
        assert!(r.word(64).is_none(), "one past the end");
        assert!(r.word(4).is_none(), "misaligned");
        assert!(r.words(8, 7).is_some());
        assert!(r.words(8, 8).is_none());
        assert!(r.words(u64::MAX - 7, 2).is_none(), "overflowing offset");
        r.word(8).unwrap().store(7, Ordering::Relaxed);
        assert_eq!(r.words(0, 2).unwrap()[1].load(Ordering::Relaxed), 7);
    }
}
