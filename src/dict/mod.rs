//! `ShmDict`: the safe, public face of a dictionary segment.

#[cfg(not(loom))]
pub(crate) mod borrow;
pub(crate) mod check;
#[cfg(not(loom))]
pub(crate) mod locks;
mod options;
pub(crate) mod typed;
#[cfg(not(loom))]
pub(crate) mod wait;

use std::fmt;

use crate::dict::typed::Typed;
use crate::error::{Error, Result};
use crate::shm::attach::{self, Holder};
use crate::shm::block;
use crate::shm::epoch::Epochs;
use crate::shm::gate::{self, Busy};
use crate::shm::grow::{self, Step, Stop};
use crate::shm::index::{Index, Loc, NewKey};
#[cfg(not(loom))]
use crate::shm::layout::HeaderError;
use crate::shm::layout::{self, hash_key, Entry, Geometry, GRANULE};
use crate::shm::region::Region;
use crate::shm::registration::Owner;
use crate::shm::slab::{Corrupt, Slab};
#[cfg(not(loom))]
use crate::{name, sys};
pub use options::Options;

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
/// A handle inherited through `fork` works in the child as if the child had
/// opened it: the child's first write registers it under the child's own
/// identity, and dropping it in either process leaves the other's alone.
pub struct ShmDict {
    pub(crate) name: String,
    pub(crate) region: Region,
    pub(crate) geo: Geometry,
    /// This handle's attach entries; `&self.me` is the current process's
    /// [`Holder`] (see `shm/registration.rs`).
    pub(crate) me: Owner<Holder>,
    /// The `mode` and `allow_other_owner` this handle was opened with:
    /// processes this crate forks to attach the same segment again (pool
    /// `spawn`, space `eval`) accept what this handle accepted.
    pub(crate) opened_with: (u32, bool),
}

/// What [`ShmDict::publish`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Publish {
    /// The value is published.
    Done,
    /// Another writer changed the key since the lookup: nothing published.
    Changed,
    /// A new key found the index table of this generation full and the
    /// dictionary may grow: nothing published; leave the write gate, grow
    /// ([`ShmDict::grow`]) and try again.
    Grow(u32),
}

/// What a new value replaces the old with, in a read-modify-write.
#[derive(Debug)]
pub(crate) enum Op {
    /// Store these bytes.
    Set(Vec<u8>),
    /// Remove the key.
    Remove,
}

/// An arena block written by `prepare` and not yet published: returned to
/// the arena when dropped, so an error or an unwind between taking a block
/// and publishing it leaks nothing. [`Prepared::published`] disarms it.
struct Prepared<'d> {
    dict: &'d ShmDict,
    entry: Entry,
    armed: bool,
}

impl Prepared<'_> {
    /// The block is now an index entry: no longer ours to free.
    fn published(mut self) {
        self.armed = false;
    }
}

impl Drop for Prepared<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.dict.release(self.entry);
        }
    }
}

/// A snapshot of a dictionary's occupancy.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Live keys.
    pub len: usize,
    /// Live keys the current index holds (it grows past them unless the
    /// dictionary is of fixed size).
    pub capacity: usize,
    /// Index buckets (three slots each) of the current index.
    pub buckets: usize,
    /// Arena size in bytes: for a dictionary that grows, the most its
    /// reservation can hold (committed as it is used).
    pub arena_bytes: usize,
    /// Arena bytes never handed out yet (untouched chunks).
    pub arena_untouched_bytes: usize,
    /// Free blocks per order: block size is `64 << order` bytes.
    pub free_blocks: Vec<u64>,
    /// Attached handles whose process runs, and entries left by dead ones.
    pub attached: (u64, u64),
    /// Borrowed reads ([`Reader`](crate::Reader)s and
    /// [`ValueRef`](crate::ValueRef)s) held by live processes.
    pub pins: u64,
    /// How long the oldest of them has been held: while it lives, memory of
    /// values replaced since cannot be reused.
    pub oldest_pin_age: Option<std::time::Duration>,
    /// Arena bytes of replaced or removed values waiting until no borrowed
    /// read can see them, with the bags that list them (freed as writers
    /// need room). Free, untouched, retired and in-use bytes add up to the
    /// arena.
    pub retired_bytes: u64,
    /// The index's generation: how many times it has doubled.
    pub generation: u32,
    /// Bytes of /dev/shm memory the dictionary has taken (committed).
    pub committed_bytes: u64,
    /// The size of its segment file: the address space it reserves, of
    /// which only `committed_bytes` is memory.
    pub reserved_bytes: u64,
    /// The most memory it may take (`Options::max_bytes`), if limited.
    pub max_bytes: Option<u64>,
    /// Whether it grows (`Options::fixed_size(false)`, the default).
    pub grows: bool,
    /// Its growth history: one record per index generation.
    pub growth: Vec<crate::Growth>,
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
    fn attach_file(name: &str, file: std::fs::File, len: u64) -> Result<ShmDict> {
        if len < layout::HEADER_BYTES {
            return Err(Error::corrupt(
                name,
                format!(
                    "segment is {len} bytes, shorter than the {}-byte header",
                    layout::HEADER_BYTES
                ),
            ));
        }
        let region = sys::map(name, &file, len)?;
        let geo = Geometry::read_header(&region, len).map_err(|e| match e {
            HeaderError::Corrupt(m) => Error::corrupt(name, m),
            HeaderError::Incompatible(m) => Error::incompatible(name, m),
        })?;
        ShmDict::attach_region(name, region, geo, Some(file))
    }

    fn attach_region(
        name: &str,
        region: Region,
        geo: Geometry,
        #[cfg(not(loom))] file: Option<std::fs::File>,
        #[cfg(loom)] _file: Option<()>,
    ) -> Result<ShmDict> {
        #[cfg(not(loom))]
        if !crate::shm::slab::heads_lock_free() {
            return Err(Error::incompatible(
                name,
                "this CPU has no lock-free 16-byte compare-and-swap (cmpxchg16b), which the free lists need",
            ));
        }
        let me = Owner::new(
            &region,
            #[cfg(not(loom))]
            file,
            Box::new(move |r: &Region, index, token, lock_fd| {
                // A dead previous owner of the entry may have died between
                // publishing a new key or a removal and counting it: settle
                // that before this handle uses the entry's count (see
                // `livecount.rs`). Also for the entry a forked child claims.
                crate::shm::livecount::note_entry(r, index);
                crate::shm::livecount::adopt(r, index, token);
                // Before the token is used (issue 10, item 5): see the
                // hook's docs.
                crate::shm::index::sweep_slots_on_attach(r, &geo, index, token);
                // Pins a dead previous owner left hold nothing any more; its
                // retired blocks are ours to free now (`epoch.rs`).
                crate::shm::epoch::Epochs::new(r, &geo).reset_pins(index);
                Holder::with_lock_fd(token, lock_fd)
            }),
        )
        .ok_or_else(|| attach_table_full(name))?;
        Ok(ShmDict {
            name: name.to_owned(),
            region,
            geo,
            me,
            opened_with: (0o600, false),
        })
    }

    /// Options that attach (never create) this handle's segment again,
    /// accepting the owner and mode it accepted.
    #[cfg(not(loom))]
    pub(crate) fn reattach_options(&self) -> Options {
        let (mode, allow) = self.opened_with;
        ShmDict::options()
            .create(false)
            .mode(mode)
            .allow_other_owner(allow)
    }

    /// Builds a dictionary on a heap region (loom models and unit tests).
    #[cfg(any(loom, test))]
    pub(crate) fn on_heap(capacity: u64, arena_bytes: u64) -> ShmDict {
        let geo = Geometry::new(capacity, arena_bytes).expect("test geometry");
        let region = Region::heap(geo.total_bytes as usize);
        #[cfg(not(loom))]
        crate::dict::locks::init(&region).expect("mutexes");
        geo.write_header(&region).expect("header fits");
        ShmDict::attach_region("heap", region, geo, None).expect("attach")
    }

    /// Builds a dictionary that grows on a heap region: `capacity` keys and
    /// `arena_bytes` to start with, an arena reserved up to `reserve`
    /// bytes (loom models and unit tests).
    #[cfg(any(loom, test))]
    pub(crate) fn on_heap_growing(capacity: u64, arena_bytes: u64, reserve: u64) -> ShmDict {
        let geo = Geometry::growable(capacity, arena_bytes, reserve, 0).expect("test geometry");
        assert!(geo.grows(), "the reservation leaves room to grow");
        let region = Region::heap(geo.total_bytes as usize);
        #[cfg(not(loom))]
        crate::dict::locks::init(&region).expect("mutexes");
        geo.write_header(&region).expect("header fits");
        ShmDict::attach_region("heap", region, geo, None).expect("attach")
    }

    /// Buckets in the index (loom models place keys by home bucket).
    #[cfg(loom)]
    pub(crate) fn nbuckets(&self) -> u64 {
        self.geo.nbuckets
    }

    /// Enters the write gate (see `gate.rs`) for one write operation, under
    /// this process's own registration (claimed now in a forked child).
    ///
    /// If a grower was killed after making a new index table current and
    /// before sealing the old one, this seals it first (`grow.rs`): no
    /// write may happen before the old table is sealed.
    #[inline]
    fn enter_write(&self) -> Result<gate::InFlight<'_>> {
        let reg = self.registration()?;
        let op = gate::enter(&self.region, reg.index, &reg.local);
        if grow::tables_word(&self.region) & grow::UNSEALED != 0 {
            self.step().seal_if_needed().map_err(|c| self.corrupt(c))?;
        }
        Ok(op)
    }

    fn step(&self) -> Step<'_> {
        Step {
            r: &self.region,
            g: &self.geo,
        }
    }

    /// Grows the index from generation `from` (`grow.rs`): closes the write
    /// gate, waiting for the writes in flight to finish, makes the growth
    /// step and reopens the gate. Returns at once if another process made
    /// the step meanwhile. Call outside the write gate.
    ///
    /// A live process stopped inside a write operation (which never runs
    /// user code) delays growth until it continues.
    fn grow(&self, from: u32) -> Result<()> {
        let reg = self.registration()?;
        let live = |i: u64| attach::entry_alive(&self.region, reg.lock_fd, i);
        let mut backoff = crate::shm::lockword::Backoff::new();
        loop {
            match gate::close(&self.region, &reg.local, live, GROW_WAIT_STEPS) {
                Ok(closed) => {
                    // With the gate closed no live writer holds a place in
                    // the capacity counter, so it must equal the exact key
                    // count; a killed writer (or corruption) leaves it
                    // high, and a corrupted one would make every insert
                    // double the index up to its last generation. Growth
                    // goes by the exact count, and repairs the counter.
                    let count = self.index().len();
                    if let Some(w) = self.region.word(layout::H_LIVE) {
                        // Relaxed: a counter; the gate is closed.
                        w.store(count, crate::sync::Ordering::Relaxed);
                    }
                    let result = self
                        .step()
                        .grow_locked(from, count, |source| self.take_table(source));
                    drop(closed);
                    return match result {
                        Ok(_) => Ok(()),
                        Err(Stop::Last) => Err(self.index_full()),
                        Err(Stop::NoChunks) => Err(self.arena_full(&format!(
                            "the index's next table ({} keys)",
                            self.geo.table_capacity(from + 1)
                        ))),
                        Err(Stop::NoMemory) => Err(self.no_room("index")),
                        Err(Stop::Corrupt(c)) => Err(self.corrupt(c)),
                    };
                }
                Err(Busy::OtherChecker | Busy::Writer(_)) => {
                    // Another process is growing (or checking): once it has
                    // grown past `from`, there is nothing left to do.
                    if Index::new(&self.region, &self.geo).table().gen != from {
                        return Ok(());
                    }
                    backoff.snooze();
                }
            }
        }
    }

    /// This process's registration of the handle: see `shm/registration.rs`.
    #[inline]
    pub(crate) fn registration(&self) -> Result<&crate::shm::registration::Registration<Holder>> {
        self.me
            .current(&self.region)
            .ok_or_else(|| attach_table_full(&self.name))
    }

    /// Wakes processes waiting on keys of this hash's channel (`wait.rs`).
    #[inline]
    fn notify(&self, hash: u64) {
        #[cfg(not(loom))]
        crate::dict::wait::notify(&self.region, hash);
        #[cfg(loom)]
        let _ = hash;
    }

    #[inline]
    pub(crate) fn index(&self) -> Index<'_> {
        Index::new(&self.region, &self.geo)
    }

    pub(crate) fn slab(&self) -> Slab<'_> {
        Slab::new(&self.region, &self.geo)
    }

    pub(crate) fn epochs(&self) -> Epochs<'_> {
        Epochs::new(&self.region, &self.geo)
    }

    /// Whether attach entry `i`'s owner is alive, as this process's
    /// registration asks the kernel (`attach::entry_alive`).
    pub(crate) fn entry_alive(&self, i: u64) -> bool {
        attach::entry_alive(&self.region, self.me.registered().lock_fd, i)
    }

    /// Makes sure a block this write unpublishes can be retired without
    /// new memory (`Epochs::ensure_spare`), freeing retired blocks that no
    /// borrowed read can see if the arena is short. For a write that stores
    /// a value that is `Full` if even that fails, before anything is
    /// published. A removal goes ahead regardless (removing keys must
    /// always make room): if its retire then finds no room to record the
    /// block, the block is leaked until `check()`.
    #[inline]
    fn ensure_spare(&self, removal: bool) -> Result<()> {
        let reg = self.me.registered();
        let ep = self.epochs();
        let corrupt = |c| self.corrupt(c);
        let alive = |i: u64| self.entry_alive(i);
        if ep
            .ensure_spare(reg.index, &reg.local, &alive)
            .map_err(corrupt)?
        {
            return Ok(());
        }
        ep.reclaim_everywhere(&reg.local, &alive).map_err(corrupt)?;
        if ep
            .ensure_spare(reg.index, &reg.local, &alive)
            .map_err(corrupt)?
            || removal
        {
            return Ok(());
        }
        Err(self.arena_full("a record of the replaced value"))
    }

    /// `Full` for an arena with no room for `what`, saying which limit was
    /// reached: `max_bytes`, the reservation of a dictionary that grows,
    /// or the size of a fixed one.
    fn arena_full(&self, what: &str) -> Error {
        let g = &self.geo;
        let why = match (g.grows(), g.max_bytes) {
            (true, 0) => format!(
                "arena: its reservation ({} bytes, the size of /dev/shm when it was created) has no room for {what}",
                g.arena_bytes
            ),
            (true, max) => format!("max_bytes ({max} bytes) reached: the arena has no room for {what}"),
            (false, _) => format!("arena ({} bytes, fixed size) has no room for {what}", g.arena_bytes),
        };
        Error::full(&self.name, why)
    }

    /// Retires the block of an entry this process just unpublished (it is
    /// freed once no borrowed read can see it: `epoch.rs`), and wakes the
    /// processes waiting on keys of `hash`'s channel (`wait.rs`).
    ///
    /// Both need a SeqCst fence between the unpublication and a read (of
    /// the epoch, of the channel's waiter flag); one fence serves both.
    fn retire_and_notify(&self, e: Entry, hash: u64) {
        // SeqCst: the fence of `Epochs::retire` and of `wait::notify` (see
        // there for what each pairs with), after the unpublication.
        crate::sync::fence(crate::sync::Ordering::SeqCst);
        let reg = self.me.registered();
        let alive = |i: u64| self.entry_alive(i);
        // An error is a corrupted stash: the block is leaked (until
        // `check()`), never freed early; the write itself has happened.
        let _ = self
            .epochs()
            .retire_after_fence(reg.index, e, &reg.local, &alive);
        #[cfg(not(loom))]
        crate::dict::wait::notify_after_fence(&self.region, hash);
        #[cfg(loom)]
        let _ = hash;
    }

    fn corrupt(&self, c: Corrupt) -> Error {
        if c.0 == crate::shm::epoch::NO_ROOM {
            return self.no_room("handle's stash");
        }
        if c.0 == crate::shm::epoch::TOO_MANY_PINS {
            return Error::full(&self.name, format!("pin slots: {}", c.0));
        }
        Error::corrupt(&self.name, c.0)
    }

    /// The segment's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The number of live keys the current index holds. A dictionary that
    /// grows (the default) doubles its index when a new key finds it full,
    /// so this is its current size, not a limit.
    pub fn capacity(&self) -> usize {
        self.index().table().capacity as usize
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
        loop {
            match self.insert_once(key, hash, value)? {
                None => return Ok(()),
                Some(from) => self.grow(from)?,
            }
        }
    }

    /// One attempt of `insert`: `Some(generation)` if the index must grow
    /// from that generation first (nothing was published).
    #[inline]
    fn insert_once(&self, key: &[u8], hash: u64, value: &[u8]) -> Result<Option<u32>> {
        // The lookup below needs the key's bucket and, for an overwrite,
        // its old block (two dependent cache misses): start both now, so
        // that they arrive while the gate is entered and the new block is
        // taken and written, work that does not depend on them. (A hint:
        // the table may change before the gate is entered.)
        self.index().prefetch_bucket(hash);
        let _op = self.enter_write()?;
        // Inside the gate the current table cannot change.
        let index = self.index();
        self.ensure_spare(false)?;
        index.prefetch_blocks(hash);
        // Declared after `_op`: an unpublished block is freed inside the gate.
        let new = self.prepare(key, hash, value)?;
        loop {
            let found = index.find(key, hash, None).map_err(|c| self.corrupt(c))?;
            match self.publish(&index, key, hash, new.entry, found)? {
                Publish::Done => {
                    new.published();
                    return Ok(None);
                }
                Publish::Changed => {}
                Publish::Grow(from) => return Ok(Some(from)),
            }
        }
    }

    /// Publishes the prepared block `new` as the value of `key`: over the
    /// entry `found` by a lookup, or, if the lookup found nothing, as a new
    /// key, and wakes the key's waiters. Unless `Publish::Done`, `new` is
    /// still the caller's. `index` is the current table, taken inside the
    /// write gate.
    fn publish(
        &self,
        index: &Index<'_>,
        key: &[u8],
        hash: u64,
        new: Entry,
        found: Option<Loc>,
    ) -> Result<Publish> {
        match found {
            Some(loc) => {
                let replaced = index.try_replace(&loc, new, &self.me);
                if replaced {
                    self.retire_and_notify(loc.entry, hash);
                    return Ok(Publish::Done);
                }
                Ok(Publish::Changed)
            }
            None => match index
                .insert_new(key, hash, new, &self.me)
                .map_err(|c| self.corrupt(c))?
            {
                NewKey::Inserted => {
                    self.notify(hash);
                    Ok(Publish::Done)
                }
                NewKey::Exists => Ok(Publish::Changed),
                NewKey::Full if self.geo.grows() => Ok(Publish::Grow(index.table().gen)),
                NewKey::Full => Err(self.index_full()),
                NewKey::NoRoom => Err(self.no_room("index")),
            },
        }
    }

    /// Removes `key`; `true` if it was present.
    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        let key = key.as_ref();
        let hash = hash_key(key);
        let _op = self.enter_write()?;
        let index = self.index();
        self.ensure_spare(true)?;
        loop {
            match index.find(key, hash, None).map_err(|c| self.corrupt(c))? {
                None => return Ok(false),
                Some(loc) => {
                    if index.try_remove(&loc, hash, &self.me) {
                        self.retire_and_notify(loc.entry, hash);
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
    /// between the read and the write); only its last result is stored.
    /// Nothing is held while `f` runs: no lock, no slot, no arena block, and
    /// not the write gate, so a slow `f` delays neither other writers nor
    /// [`check`](ShmDict::check), and a panic in `f` propagates and leaves
    /// nothing behind.
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

    /// The read-modify-write behind `update`, the typed API and the tuple
    /// space. `f` decides from the current value; an error from `f` aborts
    /// with nothing written. Returns the value present afterwards.
    ///
    /// `f` is user code: it runs outside the write gate with nothing held.
    /// Only then does the write enter the gate, take a block and publish it,
    /// if the key is still in the state `f` saw (the slot's version, or the
    /// key's absence, is re-validated by the publication); otherwise the
    /// block is freed, the gate left, and `f` runs again on the new state.
    pub(crate) fn read_modify_write(
        &self,
        key: &[u8],
        mut f: impl FnMut(Option<&[u8]>) -> Result<Op>,
    ) -> Result<Option<Vec<u8>>> {
        let hash = hash_key(key);
        let mut current = Vec::new();
        loop {
            let found = self
                .index()
                .find(key, hash, Some(&mut current))
                .map_err(|c| self.corrupt(c))?;
            let op = f(found.as_ref().map(|_| current.as_slice()))?;
            let grow_from = match (found, op) {
                // Absent when read, and to stay absent: linearized at the read.
                (None, Op::Remove) => return Ok(None),
                (Some(loc), Op::Remove) => {
                    let _op = self.enter_write()?;
                    self.ensure_spare(true)?;
                    // A lookup in a table replaced since fails here, and
                    // `f` runs again on what the current table holds.
                    if self.index().try_remove(&loc, hash, &self.me) {
                        self.retire_and_notify(loc.entry, hash);
                        return Ok(None);
                    }
                    continue;
                }
                (found, Op::Set(value)) => {
                    let _op = self.enter_write()?;
                    let index = self.index();
                    self.ensure_spare(false)?;
                    // Declared after `_op`: freed inside the gate unless
                    // published.
                    let new = self.prepare(key, hash, &value)?;
                    // Publish only over the state `f` saw: if it changed,
                    // run `f` again on the new state.
                    match self.publish(&index, key, hash, new.entry, found)? {
                        Publish::Done => {
                            new.published();
                            return Ok(Some(value));
                        }
                        Publish::Changed => continue,
                        Publish::Grow(from) => from,
                    }
                }
            };
            // Outside the gate (the block went back when `new` dropped).
            self.grow(grow_from)?;
        }
    }

    /// A read-modify-write that does not need new room: like
    /// [`read_modify_write`](ShmDict::read_modify_write), but if the arena
    /// is full, the block of `reserve` (another key the caller keeps for
    /// this purpose, with a value at least as large) is taken over: the
    /// reserve key is removed and the new value of `key` is written into
    /// its block. Returns the value stored and whether the reserve was used
    /// (the caller then re-creates it, which the block `key` gave up makes
    /// room for).
    ///
    /// A process killed between removing the reserve and publishing leaks
    /// the block until [`check`](ShmDict::check) reclaims it, as any
    /// unpublished block.
    pub(crate) fn read_modify_write_reserved(
        &self,
        key: &[u8],
        reserve: &[u8],
        mut f: impl FnMut(Option<&[u8]>) -> Result<Op>,
    ) -> Result<(Option<Vec<u8>>, bool)> {
        match self.read_modify_write(key, &mut f) {
            Err(Error::Full { .. }) => {}
            other => return other.map(|v| (v, false)),
        }
        let hash = hash_key(key);
        let rhash = hash_key(reserve);
        let _op = self.enter_write()?;
        let index = self.index();
        let mut current = Vec::new();
        // The reserve's block, once removed from the index: ours.
        let mut block: Option<Entry> = None;
        let result = loop {
            let found = match index.find(key, hash, Some(&mut current)) {
                Ok(found) => found,
                Err(c) => break Err(self.corrupt(c)),
            };
            let op = match f(found.as_ref().map(|_| current.as_slice())) {
                Ok(op) => op,
                Err(e) => break Err(e),
            };
            let value = match (found, op) {
                (None, Op::Remove) => break Ok((None, block.is_some())),
                (Some(loc), Op::Remove) => {
                    if index.try_remove(&loc, hash, &self.me) {
                        self.retire_and_notify(loc.entry, hash);
                        break Ok((None, block.is_some()));
                    }
                    continue;
                }
                (_, Op::Set(value)) => value,
            };
            let need = layout::order_for(key.len(), value.len());
            let e = match block {
                Some(e) => e,
                None => match self.take_reserve(reserve, rhash) {
                    // The reserve's block was in the index until now: a
                    // borrowed read may hold its bytes. It is ours to
                    // rewrite only once no pin can see it; otherwise it is
                    // retired like any replaced block, and the write is
                    // `Full` (a live holder may cause that, never a wrong
                    // value).
                    Ok(Some(e)) => match self.epochs().quiesce(&|i| self.entry_alive(i)) {
                        Ok(true) => *block.insert(e),
                        Ok(false) => {
                            self.retire_and_notify(e, rhash);
                            break Err(Error::full(
                                &self.name,
                                "arena, and the reserve block is held by a borrowed read",
                            ));
                        }
                        Err(c) => {
                            self.retire_and_notify(e, rhash);
                            break Err(self.corrupt(c));
                        }
                    },
                    Ok(None) => {
                        break Err(Error::full(
                            &self.name,
                            "arena, and no reserve block to draw on",
                        ))
                    }
                    Err(e) => break Err(e),
                },
            };
            if need.is_none_or(|o| o > e.order()) {
                break Err(Error::full(
                    &self.name,
                    format!(
                        "arena, and the reserve block ({} bytes) is too small for {} bytes",
                        GRANULE << e.order(),
                        value.len()
                    ),
                ));
            }
            let Some(words) = self.slab().block(e.granule() as u64, e.order()) else {
                break Err(self.corrupt(Corrupt("reserve entry names an invalid block")));
            };
            // Release fence: as after taking a block off a free list (see
            // `slab.rs`, "Memory ordering rule for recycled blocks"): readers
            // of the reserve key that still read this block pair with it in
            // `seqlock::read_validate` and retry.
            crate::sync::fence(crate::sync::Ordering::Release);
            if block::write(words, key, hash, &value).is_none() {
                break Err(self.corrupt(Corrupt("block too small")));
            }
            let new = Entry::new(e.granule(), e.order(), hash);
            match self.publish(&index, key, hash, new, found) {
                Ok(Publish::Done) => {
                    block = None;
                    break Ok((Some(value), true));
                }
                Ok(Publish::Changed) => {} // `key` changed: run `f` again, same block
                // The arena is full, and so is the index: growing it needs
                // arena room.
                Ok(Publish::Grow(_)) => break Err(self.index_full()),
                Err(e) => break Err(e),
            }
        };
        // A reserve block taken but not published goes back to the arena.
        if let Some(e) = block {
            self.release(e);
        }
        result
    }

    /// Removes `reserve` from the index and returns its entry (the block is
    /// then the caller's), or `None` if there is no such key.
    fn take_reserve(&self, reserve: &[u8], rhash: u64) -> Result<Option<Entry>> {
        let index = self.index();
        loop {
            match index
                .find(reserve, rhash, None)
                .map_err(|c| self.corrupt(c))?
            {
                None => return Ok(None),
                Some(loc) => {
                    if index.try_remove(&loc, rhash, &self.me) {
                        self.notify(rhash);
                        return Ok(Some(loc.entry));
                    }
                }
            }
        }
    }

    /// The block order of `key`'s value (its size class), if present.
    pub(crate) fn value_order(&self, key: &[u8]) -> Result<Option<u32>> {
        Ok(self
            .index()
            .find(key, hash_key(key), None)
            .map_err(|c| self.corrupt(c))?
            .map(|loc| loc.entry.order()))
    }

    /// Writes `key` and `value` into a block that is not yet published. Call
    /// inside the write gate, and publish or drop the result before leaving
    /// it: `check()` reclaims blocks that nobody inside the gate accounts for.
    fn prepare(&self, key: &[u8], hash: u64, value: &[u8]) -> Result<Prepared<'_>> {
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
        let granule = self
            .alloc(order)
            .map_err(|c| self.corrupt(c))?
            .ok_or_else(|| {
                if crate::shm::slab::short_of_shm() {
                    return self.no_room("arena");
                }
                self.arena_full(&format!("a {}-byte block", GRANULE << order))
            })?;
        // From here on the block goes back to the arena if anything fails
        // (or unwinds) before it is published.
        let new = Prepared {
            dict: self,
            entry: Entry::new(granule as u32, order, hash),
            armed: true,
        };
        let words = self
            .slab()
            .block(granule, order)
            .ok_or_else(|| self.corrupt(Corrupt("allocator returned an invalid block")))?;
        block::write(words, key, hash, value)
            .ok_or_else(|| self.corrupt(Corrupt("block too small")))?;
        Ok(new)
    }

    /// Takes a block of `order`; before giving up, frees every retired
    /// block that no borrowed read can see, in every process's stash.
    fn alloc(&self, order: u32) -> std::result::Result<Option<u64>, Corrupt> {
        if let Some(g) = self.slab().alloc(order, &self.me)? {
            return Ok(Some(g));
        }
        let alive = |i: u64| self.entry_alive(i);
        let ep = self.epochs();
        // A borrowed read in progress (its process preempted between pin
        // and unpin, on a loaded machine) can hold the epoch for a moment:
        // retry a few times, about a millisecond in all, before `Full`. A
        // reader that holds its pin longer (a stopped one) makes this
        // write fail, never wait longer.
        for round in 0..RECLAIM_ROUNDS {
            if ep.reclaim_everywhere(&self.me, &alive)? > 0 {
                if let Some(g) = self.slab().alloc(order, &self.me)? {
                    return Ok(Some(g));
                }
            }
            if ep.held(&alive).pins == 0 {
                break;
            }
            if round < RECLAIM_ROUNDS / 2 {
                crate::sync::yield_now();
            } else {
                #[cfg(not(loom))]
                std::thread::sleep(std::time::Duration::from_micros(100));
                #[cfg(loom)]
                crate::sync::yield_now();
            }
        }
        Ok(None)
    }

    /// Takes the arena memory of a new index table (`grow.rs`): a block,
    /// or a run of fresh chunks. Its granule, or `None` if the arena has no
    /// room.
    pub(crate) fn take_table(
        &self,
        source: grow::Source,
    ) -> std::result::Result<Option<u64>, Corrupt> {
        match source {
            grow::Source::Block(order) => self.alloc(order),
            grow::Source::Chunks(n) => Ok(self.slab().carve_run(n)),
        }
    }

    /// Frees the block of an entry that was never published (no reader can
    /// have seen it).
    fn release(&self, e: Entry) {
        self.slab().free(e.granule() as u64, e.order(), &self.me);
    }

    /// /dev/shm could not give the memory a write needs (`commit.rs`).
    ///
    /// Says whether the dictionary's `max_bytes` or /dev/shm itself ran
    /// out (`commit::last_shortage`).
    pub(crate) fn no_room(&self, what: &str) -> Error {
        if crate::shm::commit::last_shortage() == crate::shm::commit::Shortage::Budget {
            return Error::full(
                &self.name,
                format!(
                    "max_bytes ({} bytes) reached: no room for more of the {what}",
                    self.geo.max_bytes
                ),
            );
        }
        Error::full(
            &self.name,
            format!("/dev/shm has no room for more of the {what} (fallocate failed: the file system is full)"),
        )
    }

    fn index_full(&self) -> Error {
        let t = self.index().table();
        let why = if self.geo.grows() {
            format!(
                "index (capacity {} keys at its last generation, {})",
                t.capacity, t.gen
            )
        } else {
            format!("index (capacity {} keys, fixed size)", t.capacity)
        };
        Error::full(&self.name, why)
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
        let held = self.epochs().held(&|i| self.entry_alive(i));
        let t = self.index().table();
        let commits = crate::shm::commit::Commits::new(&self.region, &self.geo);
        Stats {
            len: self.len(),
            capacity: t.capacity as usize,
            buckets: t.nbuckets as usize,
            arena_bytes: self.geo.arena_bytes as usize,
            arena_untouched_bytes: ((self.geo.nchunks() - slab.chunks_carved()) * chunk) as usize,
            free_blocks: slab.free_counts(),
            attached: attach::census(&self.region, self.me.registered().lock_fd),
            pins: held.pins,
            oldest_pin_age: held.oldest_pin_age(),
            retired_bytes: held.retired_bytes,
            generation: t.gen,
            committed_bytes: commits.committed(),
            reserved_bytes: self.geo.total_bytes,
            max_bytes: (self.geo.max_bytes != 0).then_some(self.geo.max_bytes),
            grows: self.geo.grows(),
            growth: grow::history(&self.region, &self.geo),
        }
    }
}

/// Backoff steps a grower waits for the writes in flight before it looks
/// again whether another process grew the index meanwhile (about a second).
const GROW_WAIT_STEPS: u32 = 2048 + 5000;

/// Rounds of reclamation a writer short of room tries while borrowed reads
/// are held (see `ShmDict::alloc`).
const RECLAIM_ROUNDS: u32 = 16;

fn attach_table_full(name: &str) -> Error {
    Error::full(name, "attach table (4096 live handles)")
}

impl Drop for ShmDict {
    fn drop(&mut self) {
        let reg = self.me.registered();
        if reg.is_ours() {
            // Inside the write gate, as every write: releasing the stash
            // moves blocks from it to the free lists, and a `check()` that
            // saw one in neither place would take it for leaked (and own it
            // while we free it).
            let _op = crate::shm::gate::enter(&self.region, reg.index, &reg.local);
            let alive = |i: u64| self.entry_alive(i);
            self.epochs().release_stash(reg.index, &reg.local, &alive);
        }
        self.me.detach(&self.region);
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
    use crate::shm::layout::{
        hash_key, BUCKET_BYTES, B_LOCK, B_SLOTS, SLOTS_PER_BUCKET, SLOT_BYTES,
    };
    use crate::shm::{lockword, seqlock};
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

#[cfg(all(test, not(loom)))]
mod reserve_tests {
    //! Regression (issue 11): `read_modify_write_reserved` (the tuple
    //! space's way to write when the arena is full) removed the reserve key
    //! and wrote the new value into its block at once. A `Reader` that had
    //! borrowed the reserve key's value saw its bytes change under it (the
    //! snapshot guarantee broken), and a block taken that way and then not
    //! used was freed at once, not retired.

    use super::*;

    #[test]
    fn a_reserve_block_a_reader_holds_is_not_rewritten() {
        let d = ShmDict::on_heap(64, 64 * 1024);
        d.insert("reserve", vec![7u8; 1000]).unwrap();
        let r = d.reader().unwrap();
        let held = r.get("reserve").unwrap().unwrap();
        let mut n = 0;
        loop {
            match d.insert(format!("fill{n}"), vec![1u8; 1000]) {
                Ok(()) => n += 1,
                Err(Error::Full { .. }) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(n > 0);
        let result =
            d.read_modify_write_reserved(b"k", b"reserve", |_| Ok(Op::Set(vec![9u8; 900])));
        assert!(
            held.iter().all(|&b| b == 7),
            "the reserve's bytes, borrowed by a Reader, were rewritten"
        );
        assert!(
            matches!(result, Err(Error::Full { .. })),
            "while the reserve's block is borrowed, the write is Full: {result:?}"
        );
        assert_eq!(d.get("reserve").unwrap(), None, "the reserve was taken");
        drop(r);
        // Once nobody holds it, a reserve's block serves again: fill the
        // room the retired block left, then write through a reserve.
        while d.insert(format!("fill{n}"), vec![1u8; 1000]).is_ok() {
            n += 1;
        }
        let (stored, used) = d
            .read_modify_write_reserved(b"k2", b"fill0", |_| Ok(Op::Set(vec![9u8; 900])))
            .unwrap();
        assert_eq!(stored.as_deref(), Some(&[9u8; 900][..]));
        assert!(used, "the reserve was used");
        assert_eq!(d.get("k2").unwrap().as_deref(), Some(&[9u8; 900][..]));
        assert_eq!(d.get("fill0").unwrap(), None);
    }
}
