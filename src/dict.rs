//! `ShmDict`: the safe, public face of a dictionary segment.

use std::fmt;

use crate::attach::{self, Holder};
use crate::block;
use crate::error::{Error, Result};
use crate::index::{Index, Loc, NewKey};
#[cfg(not(loom))]
use crate::layout::HeaderError;
use crate::layout::{self, hash_key, Entry, Geometry, GRANULE};
use crate::region::Region;
use crate::slab::{Corrupt, Slab};
use crate::typed::Typed;
#[cfg(not(loom))]
use crate::{name, sys};

/// A dictionary of byte strings in a named shared-memory segment.
///
/// Any process that opens the same name sees the same dictionary. Every
/// single-key operation is atomic and linearizable across all processes;
/// readers take no lock and never wait for writers. `ShmDict` is `Send +
/// Sync`: share `&ShmDict` between threads.
///
/// Dropping a `ShmDict` detaches this handle; the segment and its contents
/// stay until [`ShmDict::unlink`] removes the name and the last process
/// detaches.
///
/// After `fork`, open the dictionary again in the child rather than using a
/// handle inherited from the parent: locks a handle holds name the process
/// that opened it.
pub struct ShmDict {
    pub(crate) name: String,
    pub(crate) region: Region,
    pub(crate) geo: Geometry,
    pub(crate) me: Holder,
    pub(crate) attach_index: u64,
    ident: u64,
}

/// How to open or create a dictionary: see [`ShmDict::options`].
#[derive(Debug, Clone)]
pub struct Options {
    capacity: Option<usize>,
    arena_bytes: Option<usize>,
    create: bool,
    create_new: bool,
    mode: u32,
}

/// What a new value replaces the old with, in a read-modify-write.
#[derive(Debug)]
pub(crate) enum Op {
    /// Store these bytes.
    Set(Vec<u8>),
    /// Remove the key.
    Remove,
}

/// A snapshot of a dictionary's occupancy.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Live keys.
    pub len: usize,
    /// Maximum live keys.
    pub capacity: usize,
    /// Index buckets (three slots each).
    pub buckets: usize,
    /// Arena size in bytes.
    pub arena_bytes: usize,
    /// Arena bytes never handed out yet (untouched chunks).
    pub arena_untouched_bytes: usize,
    /// Free blocks per order: block size is `64 << order` bytes.
    pub free_blocks: Vec<u64>,
    /// Attached handles whose process runs, and entries left by dead ones.
    pub attached: (u64, u64),
}

impl Default for Options {
    fn default() -> Options {
        Options {
            capacity: None,
            arena_bytes: None,
            create: true,
            create_new: false,
            mode: 0o600,
        }
    }
}

impl Options {
    /// Maximum number of live keys (default 1,048,576). Ignored when
    /// attaching to an existing segment.
    pub fn capacity(mut self, max_live_keys: usize) -> Options {
        self.capacity = Some(max_live_keys);
        self
    }

    /// Bytes of room for keys and values (default 1 GiB, or a quarter of the
    /// free space in /dev/shm if that is less; at least 64 KiB). Pages are
    /// committed only when first written. Ignored when attaching.
    pub fn arena_bytes(mut self, bytes: usize) -> Options {
        self.arena_bytes = Some(bytes);
        self
    }

    /// Whether a missing segment is created (default `true`). With `false`,
    /// `open` only attaches: `Error::NotFound` if there is no segment of that
    /// name (for workers that must not start on an empty dictionary after
    /// the name was removed).
    pub fn create(mut self, yes: bool) -> Options {
        self.create = yes;
        self
    }

    /// Insist on creating a fresh segment: `Error::AlreadyExists` if the name
    /// is taken.
    pub fn create_new(mut self, yes: bool) -> Options {
        self.create_new = yes;
        self
    }

    /// Permission bits of a new segment, applied exactly (not filtered by the
    /// umask). Default `0o600`. Ignored when attaching.
    pub fn mode(mut self, unix_mode: u32) -> Options {
        self.mode = unix_mode;
        self
    }

    /// Attaches to the segment `name`, or creates it with these options.
    #[cfg(not(loom))]
    ///
    /// Creation is race-free: processes opening the same new name at once
    /// all end up on one segment, and none sees it half-initialized.
    pub fn open(self, name: &str) -> Result<ShmDict> {
        name::validate(name)?;
        if self.mode & !0o7777 != 0 {
            return Err(Error::InvalidArgument {
                segment: name.to_owned(),
                reason: format!("mode {:#o} has bits outside 0o7777", self.mode),
            });
        }
        if self.create_new && !self.create {
            return Err(Error::InvalidArgument {
                segment: name.to_owned(),
                reason: "create_new(true) contradicts create(false)".into(),
            });
        }
        if !self.create_new {
            // Attach first: the options' geometry is ignored (and not even
            // validated) when the segment exists.
            match sys::open_existing(name) {
                Ok((file, len)) => return ShmDict::attach_file(name, &file, len),
                Err(Error::NotFound { .. }) if self.create => {}
                Err(e) => return Err(e),
            }
        }
        let geo = self.geometry(name)?;
        sys::create_or_attach(
            name,
            self.mode,
            geo.total_bytes,
            self.create_new,
            |r| {
                crate::locks::init(r).map_err(|rc| {
                    Error::io(
                        name,
                        "pthread_mutex_init",
                        std::io::Error::from_raw_os_error(rc),
                    )
                })?;
                geo.write_header(r)
                    .ok_or_else(|| Error::corrupt(name, "new segment too small for its header"))
            },
            |region| ShmDict::attach_region(name, region, geo),
            |file, len| ShmDict::attach_file(name, file, len),
        )
    }

    #[cfg(not(loom))]
    fn geometry(&self, name: &str) -> Result<Geometry> {
        let capacity = self.capacity.map_or(layout::DEFAULT_CAPACITY, |c| c as u64);
        let arena = match self.arena_bytes {
            Some(a) => a as u64,
            None => {
                let avail = sys::shm_available_bytes().unwrap_or(u64::MAX);
                layout::DEFAULT_ARENA_BYTES.min(avail / 4)
            }
        };
        Geometry::new(capacity, arena).ok_or_else(|| Error::InvalidArgument {
            segment: name.to_owned(),
            reason: format!(
                "capacity must be 1..={} keys and arena_bytes at most {} (got {capacity} keys, {arena} bytes)",
                layout::MAX_CAPACITY,
                layout::MAX_ARENA_BYTES
            ),
        })
    }
}

impl ShmDict {
    /// Attaches to the dictionary `name`, creating it with default sizing if
    /// it does not exist.
    #[cfg(not(loom))]
    pub fn open(name: &str) -> Result<ShmDict> {
        Options::default().open(name)
    }

    /// Options for opening or creating a dictionary.
    pub fn options() -> Options {
        Options::default()
    }

    /// Removes the name `name`. Processes already attached keep working on
    /// the segment; it is freed when the last one detaches.
    #[cfg(not(loom))]
    pub fn unlink(name: &str) -> Result<()> {
        name::validate(name)?;
        sys::unlink(name)
    }

    #[cfg(not(loom))]
    fn attach_file(name: &str, file: &std::fs::File, len: u64) -> Result<ShmDict> {
        if len < layout::HEADER_BYTES {
            return Err(Error::corrupt(
                name,
                format!(
                    "segment is {len} bytes, shorter than the {}-byte header",
                    layout::HEADER_BYTES
                ),
            ));
        }
        let region = sys::map(name, file, len)?;
        let geo = Geometry::read_header(&region, len).map_err(|e| match e {
            HeaderError::Corrupt(m) => Error::corrupt(name, m),
            HeaderError::Incompatible(m) => Error::incompatible(name, m),
        })?;
        ShmDict::attach_region(name, region, geo)
    }

    fn attach_region(name: &str, region: Region, geo: Geometry) -> Result<ShmDict> {
        let ident = attach::process_identity();
        let (attach_index, token) = attach::attach(&region, ident)
            .ok_or_else(|| Error::full(name, "attach table (4096 live handles)"))?;
        Ok(ShmDict {
            name: name.to_owned(),
            region,
            geo,
            me: Holder::new(token),
            attach_index,
            ident,
        })
    }

    /// Builds a dictionary on a heap region (loom models and unit tests).
    #[cfg(any(loom, test))]
    pub(crate) fn on_heap(capacity: u64, arena_bytes: u64) -> ShmDict {
        let geo = Geometry::new(capacity, arena_bytes).expect("test geometry");
        let region = Region::heap(geo.total_bytes as usize);
        #[cfg(not(loom))]
        crate::locks::init(&region).expect("mutexes");
        geo.write_header(&region).expect("header fits");
        ShmDict::attach_region("heap", region, geo).expect("attach")
    }

    /// Buckets in the index (loom models place keys by home bucket).
    #[cfg(loom)]
    pub(crate) fn nbuckets(&self) -> u64 {
        self.geo.nbuckets
    }

    /// Enters the write gate (see `gate.rs`) for one write operation.
    #[inline]
    fn enter_write(&self) -> crate::gate::InFlight<'_> {
        crate::gate::enter(&self.region, self.attach_index, &self.me)
    }

    /// Wakes processes waiting on keys of this hash's channel (`wait.rs`).
    #[inline]
    fn notify(&self, hash: u64) {
        #[cfg(not(loom))]
        crate::wait::notify(&self.region, hash);
        #[cfg(loom)]
        let _ = hash;
    }

    pub(crate) fn index(&self) -> Index<'_> {
        Index::new(&self.region, &self.geo)
    }

    pub(crate) fn slab(&self) -> Slab<'_> {
        Slab::new(&self.region, &self.geo)
    }

    fn corrupt(&self, c: Corrupt) -> Error {
        Error::corrupt(&self.name, c.0)
    }

    /// The segment's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Maximum number of live keys.
    pub fn capacity(&self) -> usize {
        self.geo.capacity as usize
    }

    /// Returns the value of `key`, if present.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>> {
        let mut out = Vec::new();
        Ok(self.get_into(key, &mut out)?.then_some(out))
    }

    /// Copies the value of `key` into `out` (replacing its contents) and
    /// returns `true`, or returns `false` and leaves `out` unspecified if the
    /// key is absent. Reusing `out` makes lookups allocation-free.
    pub fn get_into(&self, key: impl AsRef<[u8]>, out: &mut Vec<u8>) -> Result<bool> {
        let key = key.as_ref();
        let found = self
            .index()
            .find(key, hash_key(key), Some(out))
            .map_err(|c| self.corrupt(c))?;
        Ok(found.is_some())
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        let key = key.as_ref();
        let found = self
            .index()
            .find(key, hash_key(key), None)
            .map_err(|c| self.corrupt(c))?;
        Ok(found.is_some())
    }

    /// Sets `key` to `value`, creating or overwriting it.
    ///
    /// `Error::Full` if there is no room for the key or the value; nothing
    /// stored before is lost.
    pub fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<()> {
        let (key, value) = (key.as_ref(), value.as_ref());
        let hash = hash_key(key);
        let _op = self.enter_write();
        let new = self.prepare(key, hash, value, &mut None)?;
        let index = self.index();
        let result = loop {
            let found = match index.find(key, hash, None) {
                Ok(found) => found,
                Err(c) => break Err(self.corrupt(c)),
            };
            match self.publish(key, hash, new, found) {
                Ok(true) => {
                    self.notify(hash);
                    break Ok(());
                }
                Ok(false) => {}
                Err(e) => break Err(e),
            }
        };
        if result.is_err() {
            self.release(new);
        }
        result
    }

    /// Publishes the prepared block `new` as the value of `key`: over the
    /// entry `found` by a lookup, or, if the lookup found nothing, as a new
    /// key. `Ok(false)`: another writer changed the key since the lookup;
    /// nothing was published. Unless `Ok(true)`, `new` is still the caller's.
    fn publish(&self, key: &[u8], hash: u64, new: Entry, found: Option<Loc>) -> Result<bool> {
        let index = self.index();
        match found {
            Some(loc) => {
                let replaced = index.try_replace(&loc, new, &self.me);
                if replaced {
                    self.release(loc.entry);
                }
                Ok(replaced)
            }
            None => match index
                .insert_new(key, hash, new, &self.me)
                .map_err(|c| self.corrupt(c))?
            {
                NewKey::Inserted => Ok(true),
                NewKey::Exists => Ok(false),
                NewKey::Full => Err(self.index_full()),
            },
        }
    }

    /// Removes `key`; `true` if it was present.
    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        let key = key.as_ref();
        let hash = hash_key(key);
        let index = self.index();
        let _op = self.enter_write();
        loop {
            match index.find(key, hash, None).map_err(|c| self.corrupt(c))? {
                None => return Ok(false),
                Some(loc) => {
                    if index.try_remove(&loc, hash, &self.me) {
                        self.release(loc.entry);
                        self.notify(hash);
                        return Ok(true);
                    }
                }
            }
        }
    }

    /// Atomically replaces the value of `key` with `f(current)`; `None` from
    /// `f` removes the key. Returns what was stored (`None` if removed or
    /// left absent).
    ///
    /// `f` may run more than once (when another process changes the key
    /// between the read and the write); only its last result is stored. No
    /// lock is held while `f` runs.
    pub fn update<F>(&self, key: impl AsRef<[u8]>, mut f: F) -> Result<Option<Vec<u8>>>
    where
        F: FnMut(Option<&[u8]>) -> Option<Vec<u8>>,
    {
        self.read_modify_write(key.as_ref(), |old| {
            Ok(match f(old) {
                Some(v) => Op::Set(v),
                None => Op::Remove,
            })
        })
    }

    /// Like [`update`](ShmDict::update), but `f` may refuse: an `Err` from
    /// `f` aborts the operation with nothing written, and comes back as the
    /// inner `Err` (for callers whose `f` can fail, such as a Python
    /// callable raising an exception). The outer `Result` carries the
    /// dictionary's own errors.
    ///
    /// ```
    /// # let name = format!("doc-try-update-{}", std::process::id());
    /// let dict = shmdict::ShmDict::open(&name)?;
    /// dict.insert("n", "1")?;
    /// let r = dict.try_update("n", |_| Err::<Option<Vec<u8>>, _>("no"))?;
    /// assert_eq!(r, Err("no"));
    /// assert_eq!(dict.get("n")?.as_deref(), Some(&b"1"[..]));
    /// let r = dict.try_update("n", |old| Ok::<_, &str>(old.map(|v| [v, b"2"].concat())))?;
    /// assert_eq!(r, Ok(Some(b"12".to_vec())));
    /// assert_eq!(dict.get("n")?.as_deref(), Some(&b"12"[..]));
    /// # shmdict::ShmDict::unlink(&name)?;
    /// # Ok::<(), shmdict::Error>(())
    /// ```
    #[allow(clippy::type_complexity)]
    pub fn try_update<F, E>(
        &self,
        key: impl AsRef<[u8]>,
        mut f: F,
    ) -> Result<std::result::Result<Option<Vec<u8>>, E>>
    where
        F: FnMut(Option<&[u8]>) -> std::result::Result<Option<Vec<u8>>, E>,
    {
        let mut refused = None;
        let r = self.read_modify_write(key.as_ref(), |old| match f(old) {
            Ok(Some(v)) => Ok(Op::Set(v)),
            Ok(None) => Ok(Op::Remove),
            Err(e) => {
                refused = Some(e);
                // Only a marker: replaced by `e` below.
                Err(Error::InvalidArgument {
                    segment: self.name.clone(),
                    reason: "update refused by its function".into(),
                })
            }
        });
        match refused {
            Some(e) => Ok(Err(e)),
            None => r.map(Ok),
        }
    }

    /// The read-modify-write behind `update` and the typed API. `f` decides
    /// from the current value; an error from `f` aborts with nothing written.
    /// Returns the value present afterwards.
    pub(crate) fn read_modify_write(
        &self,
        key: &[u8],
        mut f: impl FnMut(Option<&[u8]>) -> Result<Op>,
    ) -> Result<Option<Vec<u8>>> {
        let hash = hash_key(key);
        let index = self.index();
        let _op = self.enter_write();
        let mut current = Vec::new();
        // A block prepared in an earlier round that lost a race, kept for reuse.
        let mut spare: Option<Entry> = None;
        let result = loop {
            let found = match index.find(key, hash, Some(&mut current)) {
                Ok(found) => found,
                Err(c) => break Err(self.corrupt(c)),
            };
            let op = match f(found.as_ref().map(|_| current.as_slice())) {
                Ok(op) => op,
                Err(e) => break Err(e),
            };
            match (found, op) {
                (None, Op::Remove) => break Ok(None),
                (Some(loc), Op::Remove) => {
                    if index.try_remove(&loc, hash, &self.me) {
                        self.release(loc.entry);
                        self.notify(hash);
                        break Ok(None);
                    }
                }
                (found, Op::Set(value)) => {
                    let new = match self.prepare(key, hash, &value, &mut spare) {
                        Ok(new) => new,
                        Err(e) => break Err(e),
                    };
                    // Publish only over the state `f` saw: if it changed,
                    // run `f` again on the new state.
                    match self.publish(key, hash, new, found) {
                        Ok(true) => {
                            self.notify(hash);
                            break Ok(Some(value));
                        }
                        Ok(false) => spare = Some(new),
                        Err(e) => {
                            spare = Some(new);
                            break Err(e);
                        }
                    }
                }
            }
        };
        // Whatever ended the loop, a prepared block not published goes back.
        if let Some(e) = spare {
            self.release(e);
        }
        result
    }

    /// Writes `key` and `value` into a block that is not yet published,
    /// reusing `spare` if it has the right size.
    fn prepare(
        &self,
        key: &[u8],
        hash: u64,
        value: &[u8],
        spare: &mut Option<Entry>,
    ) -> Result<Entry> {
        let order = layout::order_for(key.len(), value.len())
            .filter(|&o| o <= self.geo.chunk_order)
            .ok_or_else(|| {
                Error::full(
                    &self.name,
                    format!(
                        "arena: a {}-byte key with a {}-byte value exceeds the largest block ({} bytes)",
                        key.len(),
                        value.len(),
                        self.geo.max_payload()
                    ),
                )
            })?;
        let granule = match spare.take() {
            Some(e) if e.order() == order => e.granule() as u64,
            other => {
                if let Some(e) = other {
                    self.release(e);
                }
                self.slab()
                    .alloc(order, &self.me)
                    .map_err(|c| self.corrupt(c))?
                    .ok_or_else(|| {
                        Error::full(
                            &self.name,
                            format!(
                                "arena ({} bytes) for a {}-byte block",
                                self.geo.arena_bytes,
                                GRANULE << order
                            ),
                        )
                    })?
            }
        };
        let words = self
            .slab()
            .block(granule, order)
            .ok_or_else(|| self.corrupt(Corrupt("allocator returned an invalid block")))?;
        block::write(words, key, hash, value)
            .ok_or_else(|| self.corrupt(Corrupt("block too small")))?;
        Ok(Entry::new(granule as u32, order, hash))
    }

    /// Frees the block of an entry that is no longer (or never was) published.
    fn release(&self, e: Entry) {
        self.slab().free(e.granule() as u64, e.order(), &self.me);
    }

    fn index_full(&self) -> Error {
        Error::full(
            &self.name,
            format!("index (capacity {} keys)", self.geo.capacity),
        )
    }

    /// Number of live keys.
    pub fn len(&self) -> usize {
        self.index().len() as usize
    }

    /// Whether there are no live keys.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All live keys, each exactly once, in no particular order. Keys inserted
    /// or removed while the scan runs may or may not be included. Takes time
    /// proportional to the capacity.
    pub fn keys(&self) -> Result<Vec<Vec<u8>>> {
        self.index().keys().map_err(|c| self.corrupt(c))
    }

    /// A view that stores `T` values encoded with postcard.
    pub fn typed<T>(&self) -> Typed<'_, T>
    where
        T: serde::Serialize + serde::de::DeserializeOwned,
    {
        Typed::new(self)
    }

    /// Occupancy figures (a snapshot; exact only when the segment is quiet).
    pub fn stats(&self) -> Stats {
        let slab = self.slab();
        let chunk = GRANULE << self.geo.chunk_order;
        Stats {
            len: self.len(),
            capacity: self.capacity(),
            buckets: self.geo.nbuckets as usize,
            arena_bytes: self.geo.arena_bytes as usize,
            arena_untouched_bytes: ((self.geo.nchunks() - slab.chunks_carved()) * chunk) as usize,
            free_blocks: slab.free_counts(),
            attached: attach::census(&self.region),
        }
    }
}

impl Drop for ShmDict {
    fn drop(&mut self) {
        attach::detach(&self.region, self.attach_index, self.ident);
    }
}

impl fmt::Debug for ShmDict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShmDict")
            .field("name", &self.name)
            .field("len", &self.len())
            .field("capacity", &self.geo.capacity)
            .field("arena_bytes", &self.geo.arena_bytes)
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    //! Regression: a fuzzed segment whose slot control word or insert lock word
    //! named the waiting handle's own token made `insert` wait forever for
    //! itself (found by `fuzz/` as libFuzzer timeouts).

    use super::*;
    use crate::layout::{hash_key, BUCKET_BYTES, B_LOCK, B_SLOTS, SLOTS_PER_BUCKET, SLOT_BYTES};
    use crate::{lockword, seqlock};
    use std::sync::Arc;
    use std::time::Duration;

    /// Runs `f` on a thread; fails if it does not finish (a watchdog, not a
    /// timing assertion: the limit is far beyond any normal run).
    fn finishes(what: &str, f: impl FnOnce() + Send + 'static) {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            f();
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{what} did not finish: it waits for a bogus hold"));
    }

    fn bucket_of(d: &ShmDict, key: &[u8]) -> u64 {
        d.geo.index_off + (hash_key(key) & (d.geo.nbuckets - 1)) * BUCKET_BYTES
    }

    #[test]
    fn a_slot_held_in_our_own_name_by_nobody_is_released() {
        let d = Arc::new(ShmDict::on_heap(16, 1 << 16));
        d.insert("k", "old").unwrap();
        let bucket = bucket_of(&d, b"k");
        let slot = (0..SLOTS_PER_BUCKET)
            .map(|s| bucket + B_SLOTS + s * SLOT_BYTES)
            .find(|&off| {
                d.region
                    .word(off + 8)
                    .unwrap()
                    .load(crate::sync::Ordering::Relaxed)
                    != 0
            })
            .expect("k is in its home bucket");
        let ctrl = d.region.word(slot).unwrap();
        // Take the slot as this handle would, then forget it: the state a
        // corrupted segment can present.
        seqlock::try_lock(ctrl, seqlock::read_begin(ctrl), &d.me).unwrap();
        d.me.end_hold();
        assert_eq!(
            d.get("k").unwrap().as_deref(),
            Some(&b"old"[..]),
            "readers never wait"
        );
        let d2 = d.clone();
        finishes("insert over a bogus WRITING slot", move || {
            d2.insert("k", "new").unwrap()
        });
        assert_eq!(d.get("k").unwrap().as_deref(), Some(&b"new"[..]));
    }

    #[test]
    fn an_insert_lock_held_in_our_own_name_by_nobody_is_taken_over() {
        let d = Arc::new(ShmDict::on_heap(16, 1 << 16));
        let lock = d.region.word(bucket_of(&d, b"fresh") + B_LOCK).unwrap();
        assert!(lockword::try_lock(lock, &d.me));
        d.me.end_hold();
        let d2 = d.clone();
        finishes("insert under a bogus insert lock", move || {
            d2.insert("fresh", "v").unwrap()
        });
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn holds_of_another_thread_of_ours_are_waited_for() {
        let d = Arc::new(ShmDict::on_heap(16, 1 << 16));
        let lock = d.region.word(bucket_of(&d, b"fresh") + B_LOCK).unwrap();
        assert!(lockword::try_lock(lock, &d.me), "held for real: count 1");
        let d2 = d.clone();
        let t = std::thread::spawn(move || d2.insert("fresh", "v").unwrap());
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(d.len(), 0, "the insert waits while the lock is really held");
        lockword::unlock(lock, &d.me);
        t.join().unwrap();
        assert_eq!(d.len(), 1);
    }
}
