//! Typed views of a `Value`/`Array` segment's data area: the only `unsafe`
//! of `Value` and `Array`.

use super::*;

/// A standard atomic integer type that may be placed over segment bytes.
///
/// # Safety
/// `Self` must have the size and alignment of `BYTES` bytes and be
/// accessible through a shared reference from any thread (a std atomic).
#[cfg(not(loom))]
pub(crate) unsafe trait AtomicView: Sync {
    const BYTES: u64;
}

#[cfg(not(loom))]
macro_rules! atomic_view {
    ($($a:ty),*) => {$(
        // SAFETY: a std atomic integer has the size and alignment of its
        // integer (documented for every `AtomicN` on platforms that have it),
        // and is Sync.
        unsafe impl AtomicView for $a {
            const BYTES: u64 = std::mem::size_of::<$a>() as u64;
        }
        const _: () = assert!(std::mem::align_of::<$a>() == std::mem::size_of::<$a>());
    )*};
}
#[cfg(not(loom))]
atomic_view!(
    AtomicU8,
    AtomicU16,
    AtomicU32,
    AtomicU64,
    AtomicUsize,
    AtomicI8,
    AtomicI16,
    AtomicI32,
    AtomicI64,
    AtomicIsize
);

/// The atomic of type `A` over the first bytes of the data area.
///
/// This is how a `Value` of 1, 2, 4 or 8 bytes is accessed: `DATA_OFF` is
/// page aligned, so any width is aligned there. Those bytes are only ever
/// accessed through atomics of this one width (the header records the
/// element size, and a handle whose `T` has another size is refused at
/// open), by every process.
#[cfg(not(loom))]
#[inline]
pub(crate) fn data_atomic<A: AtomicView>(r: &Region) -> &A {
    let ptr = r
        .raw(DATA_OFF, A::BYTES.max(8))
        .expect("the data word lies inside every validated Value segment");
    // SAFETY: `raw` checked that `DATA_OFF..DATA_OFF + 8` lies inside the
    // mapping, which `r` keeps alive for the returned borrow. The address is
    // page aligned (mapping base and DATA_OFF both are), so aligned for `A`
    // (`AtomicView`: size = alignment <= 8). Every access to these bytes, in
    // every process, is an atomic operation of width `A::BYTES` (see above),
    // so the reference never aliases a non-atomic or mixed-size access.
    unsafe { &*ptr.cast::<A>() }
}

/// Elements `start..start + len` of an array of `total` elements of `T`.
///
/// # Safety
/// For as long as the returned borrow lives, no thread of any process may
/// write these bytes, and nothing may access them as atomics: the caller
/// holds the array's lock in a mode that excludes every writer of them
/// (`rwlock.rs`), and every process follows the same protocol.
#[cfg(not(loom))]
#[inline]
pub(crate) unsafe fn elems<T: Pod>(r: &Region, total: u64, start: u64, len: u64) -> Option<&[T]> {
    let (ptr, len) = elems_ptr::<T>(r, total, start, len)?;
    // SAFETY: `elems_ptr` checked that the range lies inside the mapping
    // (kept alive by `r` for the borrow) and is aligned for `T`; any bytes
    // are a valid `T` (`Pod`); the caller guarantees no concurrent writes.
    Some(unsafe { std::slice::from_raw_parts(ptr.cast_const(), len) })
}

/// Elements `start..start + len` of an array of `total` elements, mutably.
///
/// # Safety
/// For as long as the returned borrow lives, no other thread of any
/// process may read or write these bytes: the caller holds the array's
/// lock in a mode that makes it the only accessor of this range
/// (`rwlock.rs`: the exclusive lock, or a chunk claim), and every process
/// follows the same protocol. Two borrows of the same range must never be
/// live at once.
#[cfg(not(loom))]
#[inline]
#[allow(clippy::mut_from_ref)] // Exclusivity comes from the lock, as for a Mutex.
pub(crate) unsafe fn elems_mut<T: Pod>(
    r: &Region,
    total: u64,
    start: u64,
    len: u64,
) -> Option<&mut [T]> {
    let (ptr, len) = elems_ptr::<T>(r, total, start, len)?;
    // SAFETY: as in `elems`; the caller guarantees that this is the only
    // access to the range while the borrow lives.
    Some(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

/// A pointer to element `start` and the element count, bounds-checked.
#[cfg(not(loom))]
#[inline]
pub(super) fn elems_ptr<T: Pod>(
    r: &Region,
    total: u64,
    start: u64,
    len: u64,
) -> Option<(*mut T, usize)> {
    let size = std::mem::size_of::<T>() as u64;
    let end = start.checked_add(len)?;
    if end > total || std::mem::align_of::<T>() as u64 > PAGE {
        return None;
    }
    let bytes = total.checked_mul(size)?;
    // In bounds of the mapping: DATA_OFF..DATA_OFF + total * size.
    let base = r.raw(DATA_OFF, bytes)?;
    let len = usize::try_from(len).ok()?;
    let off = usize::try_from(start.checked_mul(size)?).ok()?;
    // SAFETY: `start * size <= total * size`, which `raw` found inside the
    // mapping, so the offset pointer stays in the same allocation. The base
    // is page aligned (the mapping and DATA_OFF are) and `start * size` is a
    // multiple of `align_of::<T>() <= PAGE`, so the result is aligned for T.
    let ptr = unsafe { base.add(off) }.cast::<T>();
    Some((ptr, len))
}
