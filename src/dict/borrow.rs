//! Borrowed (zero-copy) reads: [`Reader`] and [`ValueRef`].
//!
//! A read under a pin (`shm/epoch.rs`) finds the key as `get` does but
//! without the seqlock (`Index::find_pinned` says why none is needed), and
//! instead of copying the value it returns the value's bytes in the
//! mapping: published blocks are never written, and a block unpublished
//! while the pin lives is not recycled until the pin is gone.

use std::fmt;
use std::ops::Deref;

use crate::dict::ShmDict;
use crate::error::Result;
use crate::shm::attach::Holder;
use crate::shm::epoch::Pin;
use crate::shm::layout::hash_key;
use crate::shm::registration::Registration;
use crate::shm::slab::Corrupt;

/// Many zero-copy reads under one pin, like an LMDB read transaction that
/// blocks nobody.
///
/// Each [`Reader::get`] is a linearizable read of one key (not a snapshot
/// of the whole dictionary), and the bytes it returns stay valid and
/// unchanged for as long as the `Reader` lives, whatever any process does
/// to the key meanwhile.
///
/// While a `Reader` (or a [`ValueRef`]) lives, memory of values replaced or
/// removed after it was taken cannot be reused, in any process: keep it for
/// a batch of reads, not forever. A reader never makes anyone wait; if one
/// is held long enough while others overwrite, writers get `Error::Full`
/// (see [`Stats::oldest_pin_age`](crate::Stats::oldest_pin_age)). A
/// process that dies holding one stops holding memory as soon as another
/// process needs it.
///
/// A `Reader` inherited through `fork` is a copy of the parent's: dropping
/// it in the child releases nothing, and the child must not rely on its
/// bytes after the parent drops the original.
///
/// ```
/// # let name = format!("doc-reader-{}", std::process::id());
/// let dict = shmdict::ShmDict::open(&name)?;
/// dict.insert("a", "1")?;
/// dict.insert("b", "2")?;
/// let reader = dict.reader()?;
/// let a = reader.get("a")?.unwrap();
/// dict.insert("a", "changed")?; // the borrowed bytes do not change
/// assert_eq!(a, b"1");
/// assert_eq!(reader.get("a")?, Some(&b"changed"[..])); // a new read sees it
/// assert_eq!(reader.get("c")?, None);
/// # drop(reader);
/// # shmdict::ShmDict::unlink(&name)?;
/// # Ok::<(), shmdict::Error>(())
/// ```
pub struct Reader<'d> {
    dict: &'d ShmDict,
    reg: &'d Registration<Holder>,
    pin: Pin,
}

/// One value's bytes in the shared mapping, borrowed, not copied
/// (`Deref<Target = [u8]>`). They never change while the `ValueRef` lives.
/// See [`ShmDict::get_ref`] and [`Reader`] for what holding one costs.
pub struct ValueRef<'d> {
    bytes: &'d [u8],
    _reader: Reader<'d>,
}

/// A preferred pin slot for the calling thread: threads of one process
/// spread over the slots of their handle's stash.
fn slot_hint() -> u64 {
    use crate::sync::local::{AtomicU64, Ordering};
    use std::cell::Cell;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static HINT: Cell<u64> = const { Cell::new(u64::MAX) };
    }
    HINT.with(|h| {
        if h.get() == u64::MAX {
            // Relaxed: a counter handing out distinct numbers.
            h.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        h.get()
    })
}

impl ShmDict {
    /// Starts a batch of zero-copy reads: see [`Reader`].
    ///
    /// `Error::Full` if this handle already holds 2^31 `Reader`s and
    /// [`ValueRef`]s at once on one pin slot (or its pin slots are
    /// corrupted so that they say so).
    pub fn reader(&self) -> Result<Reader<'_>> {
        let reg = self.registration()?;
        let pin = self
            .epochs()
            .pin(reg.index, slot_hint())
            .map_err(|c| self.corrupt(c))?;
        Ok(Reader {
            dict: self,
            reg,
            pin,
        })
    }

    /// The value of `key`, borrowed from the mapping instead of copied, if
    /// present. The bytes never change while the [`ValueRef`] lives.
    ///
    /// Holding a `ValueRef` pins memory as a [`Reader`] does; for many
    /// reads, one `Reader` is cheaper than a `get_ref` each.
    ///
    /// ```
    /// # let name = format!("doc-get-ref-{}", std::process::id());
    /// let dict = shmdict::ShmDict::open(&name)?;
    /// dict.insert("k", "v1")?;
    /// let v = dict.get_ref("k")?.unwrap();
    /// dict.remove("k")?;
    /// assert_eq!(&*v, b"v1");
    /// # drop(v);
    /// # shmdict::ShmDict::unlink(&name)?;
    /// # Ok::<(), shmdict::Error>(())
    /// ```
    pub fn get_ref(&self, key: impl AsRef<[u8]>) -> Result<Option<ValueRef<'_>>> {
        let reader = self.reader()?;
        Ok(reader.lookup(key.as_ref())?.map(|bytes| ValueRef {
            bytes,
            _reader: reader,
        }))
    }
}

impl<'d> Reader<'d> {
    /// The value of `key`, borrowed for as long as this `Reader` lives.
    #[inline]
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<&[u8]>> {
        self.lookup(key.as_ref())
    }

    /// The lookup behind `get`, with the bytes borrowed for the dictionary's
    /// lifetime: only sound while this reader's pin lives, which `get`'s
    /// signature and `ValueRef` (which owns the reader) ensure.
    #[inline]
    fn lookup(&self, key: &[u8]) -> Result<Option<&'d [u8]>> {
        let d = self.dict;
        let Some((_, start, len)) = d
            .index()
            .find_pinned(key, hash_key(key))
            .map_err(|c| d.corrupt(c))?
        else {
            return Ok(None);
        };
        // SAFETY: `find_pinned` found the value in a block it loaded from
        // the index after our pin was visible (`pin`'s SeqCst fence precedes
        // the lookup), so the block was published then and is not recycled
        // before the pin is released (`epoch.rs`; the argument is in
        // `Index::find_pinned`); published blocks are never written. The
        // span lies inside the block (`match_value` checked it against the
        // block's words) and the block inside the arena (`block_of`).
        let bytes = unsafe { d.region.frozen_bytes(start, len as u64) }
            .ok_or_else(|| d.corrupt(Corrupt("value outside the segment")))?;
        Ok(Some(bytes))
    }
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        // A copy inherited through fork is not this process's pin.
        if self.reg.is_ours() {
            self.dict.epochs().unpin(self.pin);
        }
    }
}

impl fmt::Debug for Reader<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader")
            .field("dict", &self.dict.name)
            .finish_non_exhaustive()
    }
}

impl Deref for ValueRef<'_> {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

impl AsRef<[u8]> for ValueRef<'_> {
    fn as_ref(&self) -> &[u8] {
        self.bytes
    }
}

impl ValueRef<'_> {
    /// The value viewed as a `T`, without a copy: `None` if its length is
    /// not `size_of::<T>()` or it is not aligned for `T` (values start
    /// 16-aligned in the mapping, so every `T` of alignment up to 16 is).
    /// Any bytes are a valid `T` (`Pod`); nothing else is checked.
    ///
    /// ```
    /// # let name = format!("doc-as-pod-{}", std::process::id());
    /// let dict = shmdict::ShmDict::open(&name)?;
    /// dict.insert("xy", bytemuck::bytes_of(&[1.5f64, -2.0]))?;
    /// let v = dict.get_ref("xy")?.unwrap();
    /// assert_eq!(v.as_pod::<[f64; 2]>(), Some(&[1.5, -2.0]));
    /// assert_eq!(v.as_pod::<u32>(), None); // wrong size
    /// # drop(v);
    /// # shmdict::ShmDict::unlink(&name)?;
    /// # Ok::<(), shmdict::Error>(())
    /// ```
    pub fn as_pod<T: bytemuck::Pod>(&self) -> Option<&T> {
        bytemuck::try_from_bytes(self.bytes).ok()
    }
}

#[cfg(feature = "rkyv")]
impl ValueRef<'_> {
    /// The value read in place as an [rkyv](https://docs.rs/rkyv/0.8)
    /// archive of a `T`, after validating it (feature `rkyv`): the
    /// `Archived<T>` at the archive's root, without a copy, or
    /// [`Error::Archive`](crate::Error::Archive) if the bytes are not a
    /// valid archive of a `T`.
    ///
    /// Any process that can open the segment can have written the value,
    /// so nothing in it is trusted: the whole archive is checked with
    /// rkyv's `bytecheck` validation (`rkyv::access`) before a reference is
    /// made. It checks that every relative pointer (of strings, vectors,
    /// boxes, ...) stays inside the value, is aligned for what it points to,
    /// and claims no bytes another pointer claims; that every length fits;
    /// that every `bool`, `char`, enum tag and `NonZero` holds a valid
    /// value, and every string valid UTF-8. Validation costs a pass over
    /// the archive (about as much as reading it); the bytes are not copied.
    ///
    /// What is trusted, and not checked:
    /// - That the bytes do not change while the `ValueRef` lives. Every
    ///   process that writes through shmdict keeps that promise (a held
    ///   value is never rewritten or recycled: see [`Reader`]); a process
    ///   that writes into the shared mapping directly, outside the
    ///   protocol, could change the bytes after they were validated, as with
    ///   any shared memory.
    /// - That the bytes were meant as a `T`. Validation proves the bytes
    ///   are *a* valid `Archived<T>`, not that a `T` was serialized: the
    ///   archive of another type with the same layout (a `u32` read as an
    ///   `f32`, or two structs with the same field types) passes. Keep one
    ///   type per key, or put a tag in the type.
    /// - That the writer used rkyv 0.8's format with the same format
    ///   features (default: little-endian, aligned, 32-bit relative
    ///   pointers). Another format fails validation or, where it happens to
    ///   be valid, reads as different values.
    ///
    /// Alignment: values start 16-aligned in the mapping, and rkyv
    /// serializes with the root and every field aligned relative to the
    /// start of the archive, so any archive whose types need at most 16
    /// (everything but `#[repr(align(32))]` and above) is aligned in place.
    /// A type that needs more is reported as invalid, never read misaligned.
    ///
    /// ```
    /// use rkyv::{rancor, Archive, Serialize};
    ///
    /// #[derive(Archive, Serialize)]
    /// struct Job {
    ///     id: u64,
    ///     name: String,
    ///     tags: Vec<u32>,
    /// }
    ///
    /// # let name = format!("doc-archived-{}", std::process::id());
    /// let dict = shmdict::ShmDict::open(&name)?;
    /// let job = Job { id: 7, name: "resize".into(), tags: vec![1, 2] };
    /// let bytes = rkyv::to_bytes::<rancor::Error>(&job).expect("serializes");
    /// dict.insert("job:7", &bytes)?;
    ///
    /// let v = dict.get_ref("job:7")?.unwrap();
    /// let job = v.access_archived::<Job>()?; // &ArchivedJob, in the mapping
    /// assert_eq!(job.id, 7);
    /// assert_eq!(job.name, "resize");
    /// assert_eq!(job.tags.as_slice(), [1, 2]);
    ///
    /// dict.insert("junk", [0xff; 8])?;
    /// let junk = dict.get_ref("junk")?.unwrap();
    /// assert!(matches!(
    ///     junk.access_archived::<Job>(),
    ///     Err(shmdict::Error::Archive { .. })
    /// ));
    /// # drop((v, junk));
    /// # shmdict::ShmDict::unlink(&name)?;
    /// # Ok::<(), shmdict::Error>(())
    /// ```
    pub fn access_archived<T>(&self) -> Result<&rkyv::Archived<T>>
    where
        T: rkyv::Archive,
        rkyv::Archived<T>: rkyv::Portable
            + for<'a> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>,
            >,
    {
        rkyv::access::<rkyv::Archived<T>, rkyv::rancor::Error>(self.bytes).map_err(|source| {
            crate::Error::Archive {
                segment: self._reader.dict.name.clone(),
                source,
            }
        })
    }
}

impl fmt::Debug for ValueRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ValueRef").field(&self.bytes).finish()
    }
}

impl PartialEq<[u8]> for ValueRef<'_> {
    fn eq(&self, other: &[u8]) -> bool {
        self.bytes == other
    }
}

impl PartialEq<&[u8]> for ValueRef<'_> {
    fn eq(&self, other: &&[u8]) -> bool {
        self.bytes == *other
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use crate::dict::ShmDict;

    /// The pinned lookup (no seqlock) finds what `get` finds, also keys
    /// that probed past full buckets, and misses what is absent; bytes it
    /// returned stay as they were while the key is overwritten and removed.
    #[test]
    fn pinned_lookups_agree_with_get_and_hold_their_bytes() {
        let d = ShmDict::on_heap(600, 1 << 20);
        let keys: Vec<Vec<u8>> = (0..600u32)
            .map(|i| i.to_le_bytes().repeat(i as usize % 7 + 1))
            .collect();
        for (i, k) in keys.iter().enumerate() {
            d.insert(k, vec![i as u8; i % 100]).unwrap();
        }
        let r = d.reader().unwrap();
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(
                r.get(k).unwrap(),
                Some(&vec![i as u8; i % 100][..]),
                "key {i}"
            );
            assert_eq!(d.get(k).unwrap().as_deref(), r.get(k).unwrap());
        }
        assert_eq!(r.get(b"absent").unwrap(), None);
        let held = r.get(&keys[5]).unwrap().unwrap();
        for n in 0..200u8 {
            d.insert(&keys[5], [n; 40]).unwrap();
            assert_eq!(r.get(&keys[5]).unwrap(), Some(&[n; 40][..]));
        }
        d.remove(&keys[5]).unwrap();
        assert_eq!(r.get(&keys[5]).unwrap(), None);
        assert_eq!(held, &[5u8; 5][..], "the borrowed bytes did not change");
    }
}
