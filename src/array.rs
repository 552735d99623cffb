//! `Array<T>`: a fixed-length array of plain-data elements in a named
//! segment, read and written in place, zero-copy, by any number of
//! processes.
//!
//! Every access to the elements is covered by the segment's robust lock
//! (`rwlock.rs`), which has three ways in:
//!
//! | access                      | lock mode                 | what it gives              |
//! |-----------------------------|---------------------------|----------------------------|
//! | [`Array::read`], [`Array::get`] | shared, read mode     | `&[T]` over the whole array |
//! | [`Array::write`], [`Array::set`] | exclusive            | `&mut [T]` over the whole array |
//! | [`Array::chunk_mut`], [`Array::range_mut`] | shared, chunk mode + a claim of the range | `&mut [T]` over that range |
//!
//! Readers share with readers, chunk holders with chunk holders of other
//! ranges, and nothing shares with an exclusive holder. So while a guard's
//! slice lives, nobody else writes the bytes it covers (and for a `&mut`
//! slice, nobody else reads them either): the slices point straight into
//! the mapping without being data races, which is why `get`/`set` take the
//! lock too (an unlocked atomic `set` would race with another process's
//! `&[T]`). `get` costs two uncontended atomic increments on a cache line of
//! this handle's own; `set` takes the exclusive lock. For bulk work, hold a
//! guard.
//!
//! A process killed while holding any guard does not block the others: the
//! next acquisition that needs the lock finds the holder dead, takes over,
//! and says so through `recovered()` on its guard (the data the dead holder
//! was writing may be half-written).

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut, Range};

use bytemuck::Pod;

use crate::error::{Error, Result};
use crate::prim::{self, Create, Local, Segment, Spec, KIND_ARRAY};
use crate::shm::registration::Registration;
use crate::shm::rwlock::{self, ClaimError, Mode};

/// Header value of `P_REPR` for arrays.
const REPR_ARRAY: u64 = 0;

/// A fixed-length array of a plain-data type `T` in a named shared-memory
/// segment.
///
/// Every process that opens the same name with the same `T` and length
/// shares the same elements, zero-filled on creation. Accesses are
/// synchronized by a robust reader-writer lock in the segment:
///
/// - [`get`](Array::get) / [`set`](Array::set): one element, under the
///   lock; never torn.
/// - [`read`](Array::read): a guard giving `&[T]` (shared with other
///   readers), without copying.
/// - [`write`](Array::write): a guard giving `&mut [T]` (exclusive).
/// - [`chunk_mut`](Array::chunk_mut): a guard giving `&mut [T]` over chunk
///   `i` of `n`, so `n` worker processes each fill their own part at full
///   memory speed without sharing any lock with each other (sharedmem's
///   pattern). Chunk guards exclude readers and writers of the whole array.
///
/// ```
/// use shmdict::Array;
/// # let name = format!("doc-array-{}", std::process::id());
/// let a = Array::<f64>::open(&name, 1000)?;
/// for (j, x) in a.chunk_mut(0, 2)?.iter_mut().enumerate() {
///     *x = j as f64; // elements 0..500, claimed for this process
/// }
/// a.set(999, 1.0);
/// let sum: f64 = a.read().iter().sum();
/// assert_eq!(sum, (0..500).sum::<i32>() as f64 + 1.0);
/// Array::<f64>::unlink(&name)?;
/// # Ok::<(), shmdict::Error>(())
/// ```
///
/// A killed process never blocks the others: locks and claims it held are
/// taken over, and the guard that did so reports [`recovered`](WriteGuard::recovered).
///
/// A thread must not ask for access that conflicts with a guard it holds
/// itself (for example `get` or `write` while it holds a
/// [`WriteGuard`] or a [`ChunkGuard`] of the same array, or two overlapping
/// chunks): like `std::sync::RwLock`, that waits for itself forever. Use the
/// guard's slice instead.
///
/// Opening an existing array with another `T` (size, alignment or type
/// name) or another length is [`Error::Incompatible`]. `Array<T>` is
/// `Send + Sync`.
///
/// After `fork`, open the name again in the child rather than using a
/// handle inherited from the parent: the locks a handle takes name the
/// process that opened it.
pub struct Array<T> {
    seg: Segment,
    len: u64,
    _t: PhantomData<T>,
}

/// How to open or create an [`Array`]: see [`Array::options`].
pub struct ArrayOptions<T> {
    create: Create,
    _t: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for ArrayOptions<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArrayOptions")
            .field("mode", &format_args!("{:#o}", self.create.mode))
            .field("create_new", &self.create.create_new)
            .field("allow_other_owner", &self.create.allow_other_owner)
            .finish()
    }
}

impl<T> Clone for ArrayOptions<T> {
    fn clone(&self) -> ArrayOptions<T> {
        ArrayOptions {
            create: self.create,
            _t: PhantomData,
        }
    }
}

impl<T: Pod> ArrayOptions<T> {
    /// Permission bits of a new segment, applied exactly (not filtered by
    /// the umask). Default `0o600`. When attaching, the most an existing
    /// segment may grant: see [`Options::mode`](crate::Options::mode).
    pub fn mode(mut self, unix_mode: u32) -> ArrayOptions<T> {
        self.create.mode = unix_mode;
        self
    }

    /// Attach to an existing segment even if another user owns it or its
    /// mode grants more than [`mode`](ArrayOptions::mode) (default `false`:
    /// `Error::PermissionDenied`); see
    /// [`Options::allow_other_owner`](crate::Options::allow_other_owner).
    pub fn allow_other_owner(mut self, yes: bool) -> ArrayOptions<T> {
        self.create.allow_other_owner = yes;
        self
    }

    /// Whether a missing segment is created (default `true`). With `false`,
    /// `open` only attaches: `Error::NotFound` if there is no segment of that
    /// name.
    pub fn create(mut self, yes: bool) -> ArrayOptions<T> {
        self.create.create = yes;
        self
    }

    /// Insist on creating a fresh segment: `Error::AlreadyExists` if the
    /// name is taken.
    pub fn create_new(mut self, yes: bool) -> ArrayOptions<T> {
        self.create.create_new = yes;
        self
    }

    /// Attaches to the array `name`, or creates it with `len` zero elements.
    ///
    /// The file is sparse: pages are committed only when first written.
    /// Creation is race-free, as for dictionaries.
    pub fn open(self, name: &str, len: usize) -> Result<Array<T>> {
        let len = len as u64;
        let bytes = len.checked_mul(std::mem::size_of::<T>() as u64);
        let spec = Spec::of::<T>(name, KIND_ARRAY, len, REPR_ARRAY, bytes)?;
        // A fresh file is all zero bytes: nothing to initialize.
        let seg = prim::open(name, &spec, self.create, |_| {})?;
        Ok(Array {
            seg,
            len,
            _t: PhantomData,
        })
    }
}

impl<T: Pod> Array<T> {
    /// Attaches to the array `name`, or creates it with `len` elements, all
    /// zero. Default mode `0o600`.
    pub fn open(name: &str, len: usize) -> Result<Array<T>> {
        Array::options().open(name, len)
    }

    /// Options for opening or creating an array.
    pub fn options() -> ArrayOptions<T> {
        ArrayOptions {
            create: Create::default(),
            _t: PhantomData,
        }
    }

    /// Removes the name `name`. Processes already attached keep working on
    /// the segment; it is freed when the last one detaches.
    /// `Error::NotFound` if there is no such name.
    pub fn unlink(name: &str) -> Result<()> {
        prim::unlink(name)
    }

    /// The segment's name.
    pub fn name(&self) -> &str {
        &self.seg.name
    }

    /// Number of elements (fixed at creation).
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Element `i`, read under the shared lock (never torn).
    ///
    /// # Panics
    /// If `i >= len()`, as slice indexing does.
    pub fn get(&self, i: usize) -> T {
        self.check_index(i);
        self.read()[i]
    }

    /// Sets element `i` to `v`, under the exclusive lock (never torn).
    ///
    /// # Panics
    /// If `i >= len()`, as slice indexing does.
    pub fn set(&self, i: usize, v: T) {
        self.check_index(i);
        self.write()[i] = v;
    }

    fn check_index(&self, i: usize) {
        if i >= self.len() {
            panic!(
                "index out of bounds: the len is {} but the index is {i} (shmdict array '{}')",
                self.len(),
                self.name()
            );
        }
    }

    /// A copy of all elements, taken under the shared lock.
    pub fn to_vec(&self) -> Vec<T> {
        self.read().to_vec()
    }

    /// Shared access to all elements, without copying: waits while a
    /// writer or chunk holder is active, then shares with other readers.
    pub fn read(&self) -> ReadGuard<'_, T> {
        let reg = self.seg.enter();
        let (r, l) = (&self.seg.region, &reg.local);
        let recovered = rwlock::acquire_shared(r, l, Mode::Read);
        // SAFETY: we hold a shared hold in read mode until the guard drops
        // it, after the slice's last use (the guard owns both and hands out
        // only borrows of itself). In read mode no process holds the
        // exclusive lock or a chunk, the only ways to write elements, so
        // these bytes are not written while the slice lives; other readers
        // only read them (rwlock.rs).
        let data = unsafe { prim::elems::<T>(r, self.len, 0, self.len) };
        ReadGuard {
            array: self,
            reg,
            data: data.unwrap_or(&[]),
            recovered,
        }
    }

    /// Exclusive access to all elements, without copying: waits until no
    /// other guard is held anywhere.
    pub fn write(&self) -> WriteGuard<'_, T> {
        let reg = self.seg.enter();
        let (r, l) = (&self.seg.region, &reg.local);
        let recovered = rwlock::acquire_exclusive(r, l);
        // SAFETY: we hold the exclusive lock until the guard releases it,
        // after the slice's last use. While it is held no other shared or
        // exclusive hold exists in any process (rwlock.rs), so nobody else
        // reads or writes these bytes, and this is the only slice over them.
        let data = unsafe { prim::elems_mut::<T>(r, self.len, 0, self.len) };
        WriteGuard {
            array: self,
            reg,
            data: data.unwrap_or(&mut []),
            recovered,
        }
    }

    /// The range of chunk `i` of `n` near-equal chunks:
    /// `i * len / n .. (i + 1) * len / n`. `None` if `n == 0` or `i >= n`.
    pub fn chunk_range(&self, i: usize, n: usize) -> Option<Range<usize>> {
        if n == 0 || i >= n {
            return None;
        }
        let at = |k: usize| (k as u128 * self.len as u128 / n as u128) as usize;
        Some(at(i)..at(i + 1))
    }

    /// Exclusive access to chunk `i` of `n` (see [`Array::chunk_range`]),
    /// for one of `n` workers filling the array in parallel.
    ///
    /// See [`Array::range_mut`]. `Error::InvalidArgument` if `n == 0` or
    /// `i >= n`.
    pub fn chunk_mut(&self, i: usize, n: usize) -> Result<ChunkGuard<'_, T>> {
        let range = self
            .chunk_range(i, n)
            .ok_or_else(|| Error::InvalidArgument {
                segment: self.name().to_owned(),
                reason: format!("chunk {i} of {n} does not exist"),
            })?;
        self.range_mut(range)
    }

    /// Exclusive access to the elements in `range`, without copying.
    ///
    /// Holders of disjoint ranges work at the same time, each on its own
    /// slice, without any shared lock or cache line between them (so a
    /// process per chunk runs at memory speed). The range is claimed in the
    /// segment: a holder of an overlapping range is waited for (or, if its
    /// process died, taken over: see [`ChunkGuard::recovered`]). Chunk
    /// guards exclude [`read`](Array::read)/[`write`](Array::write) guards
    /// (and `get`/`set`): those wait until every chunk guard is dropped.
    ///
    /// `Error::InvalidArgument` if the range is not within `0..len()`;
    /// `Error::Full` if 64 chunk guards are held at once (the claim table's
    /// size).
    pub fn range_mut(&self, range: Range<usize>) -> Result<ChunkGuard<'_, T>> {
        if range.start > range.end || range.end > self.len() {
            return Err(Error::InvalidArgument {
                segment: self.name().to_owned(),
                reason: format!(
                    "range {range:?} is not within the array's {} elements",
                    self.len()
                ),
            });
        }
        let reg = self.seg.enter();
        let (r, l) = (&self.seg.region, &reg.local);
        let (start, end) = (range.start as u64, range.end as u64);
        let (slot, recovered) = match rwlock::acquire_range(r, l, start, end) {
            Ok(held) => held,
            Err(ClaimError::Full) => {
                return Err(Error::full(
                    self.name(),
                    "chunk claim table (64 chunk guards held at once)",
                ))
            }
        };
        // SAFETY: we hold a shared hold in chunk mode and a claim of
        // `start..end` until the guard releases them, after the slice's last
        // use. In chunk mode nobody holds the exclusive lock or a read hold,
        // and the claim table admits no other live claim overlapping this
        // range (rwlock.rs), so no other thread of any process reads or
        // writes these elements, and this is the only slice over them. (An
        // empty range has no bytes to protect.)
        let data = unsafe { prim::elems_mut::<T>(r, self.len, start, end - start) };
        Ok(ChunkGuard {
            array: self,
            reg,
            data: data.unwrap_or(&mut []),
            start: range.start,
            slot,
            recovered,
        })
    }
}

impl<T> fmt::Debug for Array<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Array")
            .field("name", &self.seg.name)
            .field("type", &std::any::type_name::<T>())
            .field("len", &self.len)
            .finish()
    }
}

/// Shared access to all elements of an [`Array`]: derefs to `&[T]`, which
/// points into the shared mapping. Releases the shared lock when dropped.
pub struct ReadGuard<'a, T> {
    array: &'a Array<T>,
    /// The registration the lock was taken under: a copy of the guard
    /// inherited through `fork` releases nothing (see `shm/registration.rs`).
    reg: &'a Registration<Local>,
    data: &'a [T],
    recovered: bool,
}

impl<T> ReadGuard<'_, T> {
    /// Whether this acquisition found that a holder of the lock had died
    /// holding it (an exclusive writer, whose writes may be incomplete).
    pub fn recovered(&self) -> bool {
        self.recovered
    }
}

impl<T> Deref for ReadGuard<'_, T> {
    type Target = [T];
    #[inline]
    fn deref(&self) -> &[T] {
        self.data
    }
}

impl<T> Drop for ReadGuard<'_, T> {
    fn drop(&mut self) {
        if self.reg.is_ours() {
            rwlock::release_shared(&self.array.seg.region, &self.reg.local);
        }
    }
}

impl<T> fmt::Debug for ReadGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadGuard")
            .field("array", &self.array.seg.name)
            .field("len", &self.data.len())
            .field("recovered", &self.recovered)
            .finish()
    }
}

/// Exclusive access to all elements of an [`Array`]: derefs to `&mut [T]`,
/// which points into the shared mapping. Releases the lock when dropped.
pub struct WriteGuard<'a, T> {
    array: &'a Array<T>,
    /// The registration the lock was taken under: a copy of the guard
    /// inherited through `fork` releases nothing (see `shm/registration.rs`).
    reg: &'a Registration<Local>,
    data: &'a mut [T],
    recovered: bool,
}

impl<T> WriteGuard<'_, T> {
    /// Whether this acquisition found that a holder of the lock had died
    /// holding it (a writer or chunk holder whose writes may be incomplete,
    /// or a reader).
    pub fn recovered(&self) -> bool {
        self.recovered
    }
}

impl<T> Deref for WriteGuard<'_, T> {
    type Target = [T];
    #[inline]
    fn deref(&self) -> &[T] {
        self.data
    }
}

impl<T> DerefMut for WriteGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [T] {
        self.data
    }
}

impl<T> Drop for WriteGuard<'_, T> {
    fn drop(&mut self) {
        if self.reg.is_ours() {
            rwlock::release_exclusive(&self.array.seg.region, &self.reg.local);
        }
    }
}

impl<T> fmt::Debug for WriteGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteGuard")
            .field("array", &self.array.seg.name)
            .field("len", &self.data.len())
            .field("recovered", &self.recovered)
            .finish()
    }
}

/// Exclusive access to one range of an [`Array`] (see
/// [`Array::chunk_mut`]): derefs to `&mut [T]` over that range, indexed
/// from 0. Releases the claim and the shared lock when dropped.
pub struct ChunkGuard<'a, T> {
    array: &'a Array<T>,
    /// The registration the lock was taken under: a copy of the guard
    /// inherited through `fork` releases nothing (see `shm/registration.rs`).
    reg: &'a Registration<Local>,
    data: &'a mut [T],
    start: usize,
    slot: Option<u64>,
    recovered: bool,
}

impl<T> ChunkGuard<'_, T> {
    /// The range of the array this guard covers.
    pub fn range(&self) -> Range<usize> {
        self.start..self.start + self.data.len()
    }

    /// Index in the array of the guard's element 0.
    pub fn start(&self) -> usize {
        self.start
    }

    /// Whether this acquisition took over from a holder that had died
    /// holding an overlapping range or the whole array (its writes may be
    /// incomplete).
    pub fn recovered(&self) -> bool {
        self.recovered
    }
}

impl<T> Deref for ChunkGuard<'_, T> {
    type Target = [T];
    #[inline]
    fn deref(&self) -> &[T] {
        self.data
    }
}

impl<T> DerefMut for ChunkGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [T] {
        self.data
    }
}

impl<T> Drop for ChunkGuard<'_, T> {
    fn drop(&mut self) {
        if self.reg.is_ours() {
            rwlock::release_range(&self.array.seg.region, &self.reg.local, self.slot);
        }
    }
}

impl<T> fmt::Debug for ChunkGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkGuard")
            .field("array", &self.array.seg.name)
            .field("range", &self.range())
            .field("recovered", &self.recovered)
            .finish()
    }
}
