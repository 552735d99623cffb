//! Borrowed (zero-copy) reads: [`Reader`] and [`ValueRef`].
//!
//! A read under a pin (`shm/epoch.rs`) finds the key with the same seqlocked
//! lookup as `get`, but instead of copying the value it returns the value's
//! bytes in the mapping: published blocks are never written, and a block
//! unpublished while the pin lives is not recycled until the pin is gone.

use std::fmt;
use std::ops::Deref;

use crate::dict::ShmDict;
use crate::error::Result;
use crate::shm::attach::Holder;
use crate::shm::block;
use crate::shm::epoch::Pin;
use crate::shm::layout::{hash_key, GRANULE};
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
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, Ordering};
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
    fn lookup(&self, key: &[u8]) -> Result<Option<&'d [u8]>> {
        let d = self.dict;
        let corrupt = |c: Corrupt| d.corrupt(c);
        let Some(loc) = d.index().find(key, hash_key(key), None).map_err(corrupt)? else {
            return Ok(None);
        };
        let e = loc.entry;
        let words = d
            .index()
            .block_of(e)
            .ok_or_else(|| corrupt(Corrupt("index entry names an invalid block")))?;
        let (off, len) = block::value_span(words)
            .ok_or_else(|| corrupt(Corrupt("a block's lengths exceed the block")))?;
        let start = d.geo.arena_off + e.granule() as u64 * GRANULE + off as u64;
        // SAFETY: `find` validated (seqlock) that the slot held this entry
        // after our pin was visible (`pin`'s SeqCst fence precedes the
        // lookup), so the block was published then and is not recycled
        // before the pin is released (`epoch.rs`); published blocks are
        // never written. The span lies inside the block (`value_span`
        // checked it against the block's words) and the block inside the
        // arena (`block_of`).
        let bytes = unsafe { d.region.frozen_bytes(start, len as u64) }
            .ok_or_else(|| corrupt(Corrupt("value outside the segment")))?;
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
