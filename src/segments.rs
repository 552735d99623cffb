//! Finding shmdict segments and cleaning up after crashed processes.
//!
//! Every shmdict segment is a file in `/dev/shm` whose first bytes carry the
//! shmdict magic. [`list`] finds them all, [`info`] describes one, and [`gc`]
//! removes the ones left behind by processes that died without detaching.
//! None of these functions attaches to a segment or writes to it: they read
//! the header and the attach table through a read-only mapping, so they work
//! on segments of any kind and never change what they inspect.
//!
//! ```no_run
//! for seg in shmdict::segments::list()? {
//!     // `size` is the file's size, for a dictionary that grows a sparse
//!     // reservation; `allocated` is the memory it takes.
//!     println!("{} ({}): {} bytes in memory", seg.name, seg.kind, seg.allocated);
//! }
//! // Remove dictionaries whose users all crashed.
//! let removed = shmdict::segments::gc(false)?;
//! # Ok::<(), shmdict::Error>(())
//! ```
//!
//! What `gc` removes: a segment whose attach table has at least one entry and
//! whose attached processes are *all* dead. Such entries are what a process
//! leaves when it is killed or exits without dropping its handles, so nobody
//! is using the segment and its last users crashed. A segment with no entry at
//! all is *not* removed by default: it is a dictionary (or value, or array)
//! that its users closed properly and that waits for its next user, like a
//! file; [`Gc::all_detached`] removes those too.

#![cfg(not(loom))]

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};

use crate::error::{Error, Result};
use crate::shm::attach;
use crate::shm::layout::{
    Entry, Geometry, HeaderError, ATTACH_ENTRIES, ATTACH_ENTRY_BYTES, BUCKET_BYTES, B_SLOTS,
    FORMAT_VERSION, HEADER_BYTES, H_HEADER_BYTES, H_MAGIC, H_TOTAL_BYTES, H_VERSION_KIND,
    KIND_DICT, MAGIC, SLOTS_PER_BUCKET, SLOT_BYTES,
};
use crate::shm::region::Region;
use crate::sync::Ordering;
use crate::{name, sys};

const SHM_DIR: &str = "/dev/shm";

/// What a segment holds, from the kind field of its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SegmentKind {
    /// A dictionary ([`ShmDict`](crate::ShmDict)).
    Dict,
    /// A shared typed value.
    Value,
    /// A shared typed array.
    Array,
    /// A kind this build does not know (from a newer or foreign build).
    Unknown(u32),
}

impl SegmentKind {
    fn from_raw(kind: u32) -> SegmentKind {
        // The numbers are those of `layout::kind_name`.
        match kind {
            KIND_DICT => SegmentKind::Dict,
            2 => SegmentKind::Value,
            3 => SegmentKind::Array,
            k => SegmentKind::Unknown(k),
        }
    }
}

impl fmt::Display for SegmentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SegmentKind::Dict => f.write_str("dictionary"),
            SegmentKind::Value => f.write_str("value"),
            SegmentKind::Array => f.write_str("array"),
            SegmentKind::Unknown(k) => write!(f, "unknown kind {k}"),
        }
    }
}

/// Processes attached to a segment, from its attach table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Attached {
    /// Handles whose process still runs.
    pub live: u64,
    /// Entries of processes that died (or exited) without detaching.
    pub dead: u64,
}

/// A description of one shmdict segment, as found by [`list`] or [`info`].
///
/// Figures are a snapshot: other processes may change them at any time.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SegmentInfo {
    /// The segment's name (its file name in /dev/shm).
    pub name: String,
    /// What it holds.
    pub kind: SegmentKind,
    /// Size of the segment's file in bytes. Most of it is usually sparse:
    /// for a dictionary that grows it is a reservation (up to its
    /// `max_bytes`, or the size of /dev/shm, at most 128 GiB), of which only
    /// [`allocated`](Self::allocated) bytes are memory.
    pub size: u64,
    /// Bytes of memory the segment really occupies: the pages /dev/shm has
    /// given it so far (`st_blocks` × 512, what `du` shows).
    pub allocated: u64,
    /// Dictionaries: bytes of memory committed, by the dictionary's own
    /// count (the figure `max_bytes` limits; see
    /// [`Stats::committed_bytes`](crate::Stats)).
    pub committed: Option<u64>,
    /// Dictionaries: the most memory it may take, if limited
    /// (`Options::max_bytes`).
    pub max_bytes: Option<u64>,
    /// Dictionaries: whether it grows while attached (`false`: created
    /// with `Options::fixed_size(true)`).
    pub grows: Option<bool>,
    /// Dictionaries: the generation of the current index (how many times
    /// it has doubled).
    pub generation: Option<u32>,
    /// User id of the segment's owner.
    pub uid: u32,
    /// Permission bits.
    pub mode: u32,
    /// Format version recorded in the header.
    pub version: u32,
    /// Whether this build reads that format version. Only the magic, version
    /// and kind are reported for a segment it does not.
    pub supported: bool,
    /// Processes attached; `None` if the attach table could not be read (an
    /// unsupported version, or a segment too short to hold one).
    pub attached: Option<Attached>,
    /// Dictionaries: live keys. Arrays: elements (Values: 1).
    pub len: Option<u64>,
    /// Dictionaries: live keys the current index holds (for a dictionary
    /// that grows, the index doubles when a new key finds it full).
    pub capacity: Option<u64>,
    /// Why the segment is damaged, if its header fails a validity check.
    pub error: Option<String>,
}

/// A probed segment: its description and the open file it was read from.
struct Probe {
    info: SegmentInfo,
    file: File,
    /// The header and attach table, mapped read-only; `None` when they could
    /// not be read.
    region: Option<Region>,
}

/// Every shmdict segment in /dev/shm, sorted by name.
///
/// A file counts as a shmdict segment if it is a regular file with a valid
/// shmdict name that this process can read and whose first bytes carry the
/// shmdict magic. Files that cannot be opened (another user's, for
/// example) and temporary files of segments being created are skipped. A
/// segment whose header is damaged is listed with [`SegmentInfo::error`] set.
///
/// Errors only if /dev/shm itself cannot be read.
pub fn list() -> Result<Vec<SegmentInfo>> {
    Ok(probe_all()?.into_iter().map(|p| p.info).collect())
}

/// Describes the segment `name`.
///
/// `Error::NotFound` if there is no such file, `Error::Corrupt` if the file
/// is not a shmdict segment, `Error::Io` if it cannot be read.
pub fn info(name: &str) -> Result<SegmentInfo> {
    name::validate(name)?;
    match probe(name)? {
        Some(p) => Ok(p.info),
        None => Err(Error::corrupt(
            name,
            "not a shmdict segment (no shmdict magic at its start)",
        )),
    }
}

/// Removes the segments that processes left behind when they died: those
/// whose attach table has at least one entry and only entries of dead
/// processes. Returns their names (with `dry_run`, the names it would remove,
/// removing nothing). Shorthand for `Gc::new().dry_run(dry_run).run()`; see
/// [`Gc`] for the rules and the options.
pub fn gc(dry_run: bool) -> Result<Vec<String>> {
    Gc::new().dry_run(dry_run).run()
}

/// Options for removing crash leftovers: see [`gc`].
///
/// A segment is removed when all of these hold:
/// - it carries the magic and a format version this build reads, and its
///   header passes the validity checks (damaged segments are left for a
///   person to look at; remove them with [`ShmDict::unlink`](crate::ShmDict::unlink));
/// - it belongs to the current user (root: any user);
/// - no live process is attached, and at least one dead one is (or, with
///   [`Gc::all_detached`], nobody is attached at all);
/// - its name starts with [`Gc::prefix`], if one is set.
///
/// **Race.** A process may attach to a segment between the moment `gc`
/// checks its attach table and the moment it removes the name. `gc` narrows
/// that window by checking the table a second time and checking that the
/// name still refers to the file it inspected, just before removing it; it
/// cannot close it. Removing a name is safe for processes already attached
/// (they keep working on the segment until they detach, as after
/// [`ShmDict::unlink`](crate::ShmDict::unlink)), but what such a late
/// process writes is lost when it detaches, and a process opening the name
/// afterwards gets a new segment. Run `gc` when the segments' users are
/// stopped or known not to be starting.
#[derive(Debug, Clone, Default)]
pub struct Gc {
    dry_run: bool,
    all_detached: bool,
    prefix: String,
}

impl Gc {
    /// Removes crash leftovers of the current user; nothing else.
    pub fn new() -> Gc {
        Gc::default()
    }

    /// Only report what would be removed.
    pub fn dry_run(mut self, yes: bool) -> Gc {
        self.dry_run = yes;
        self
    }

    /// Also remove segments that nobody is attached to, even if their users
    /// detached cleanly. Such segments may be waiting for their next user:
    /// use this only when no program expects to find them.
    pub fn all_detached(mut self, yes: bool) -> Gc {
        self.all_detached = yes;
        self
    }

    /// Only consider segments whose names start with `prefix`.
    pub fn prefix(mut self, prefix: &str) -> Gc {
        self.prefix = prefix.to_owned();
        self
    }

    fn removable(&self, info: &SegmentInfo, a: Attached, euid: u32) -> bool {
        info.name.starts_with(&self.prefix)
            && info.supported
            && info.error.is_none()
            && (euid == 0 || info.uid == euid)
            && a.live == 0
            && (a.dead > 0 || self.all_detached)
    }

    /// Removes (or, with [`Gc::dry_run`], lists) the segments these options
    /// select; returns their names, sorted.
    ///
    /// Stops at the first segment that cannot be removed, with an error that
    /// names it; segments removed before it stay removed.
    pub fn run(&self) -> Result<Vec<String>> {
        let euid = rustix::process::geteuid().as_raw();
        let mut removed = Vec::new();
        for p in probe_all()? {
            let (Some(region), Some(a)) = (&p.region, p.info.attached) else {
                continue;
            };
            if !self.removable(&p.info, a, euid) {
                continue;
            }
            // Hold the segment's open byte exclusively while deciding and
            // unlinking: every handle holds it shared from before it can be
            // found by name until it closes, so while we hold it nobody has
            // the segment open, and an opener that found the name waits,
            // then sees it removed and opens the name again (see
            // `sys::open_existing`). The lock needs a writable descriptor.
            let Some(exclusive) = open_exclusive(&p.info.name, &p.file)? else {
                continue; // Open somewhere, or no longer this file.
            };
            // Look again, under the lock.
            let (live, dead) = attach::census(region, lock_fd(&exclusive));
            if !self.removable(&p.info, Attached { live, dead }, euid) {
                continue;
            }
            if !same_file(&p.info.name, &p.file) {
                continue; // The name was removed or now holds another segment.
            }
            if !self.dry_run {
                match sys::unlink(&p.info.name) {
                    Ok(()) => {}
                    Err(Error::NotFound { .. }) => continue, // Someone else removed it.
                    Err(e) => return Err(e),
                }
            }
            removed.push(p.info.name);
        }
        Ok(removed)
    }
}

/// Blocks of the dictionary `name`'s arena that hold a published key and
/// value, per order: entry `o` counts blocks of `64 << o` bytes.
///
/// Counted from the index entries alone, through a read-only mapping: no
/// handle is attached and no key or value is read. A snapshot; entries that
/// name an impossible block size are not counted.
pub fn blocks_in_use(name: &str) -> Result<Vec<u64>> {
    name::validate(name)?;
    let (file, meta) = open_read_only(name)?.ok_or_else(|| {
        Error::corrupt(
            name,
            "not a shmdict segment (no shmdict magic at its start)",
        )
    })?;
    let size = meta.size();
    if size < HEADER_BYTES {
        return Err(Error::corrupt(name, "shorter than a header"));
    }
    let header = map_read_only(name, &file, HEADER_BYTES)?;
    let geo = Geometry::read_header(&header, size).map_err(|e| header_error(name, e))?;
    // `read_header` checked that the file is as large as the header says.
    // The whole reservation is mapped (address space only); the current
    // index table may lie anywhere in it (`grow.rs`), and only memory the
    // commit table marks is read.
    let r = map_read_only(name, &file, geo.total_bytes)?;
    let table = crate::shm::grow::current(&r, &geo).map_err(|c| Error::corrupt(name, c.0))?;
    let commits = crate::shm::commit::Commits::new(&r, &geo);
    let mut counts = vec![0u64; geo.chunk_order as usize + 1];
    for bucket in 0..table.nbuckets {
        if table.gen == 0 && !commits.bucket_ready(bucket) {
            continue; // Never written: empty.
        }
        for s in 0..SLOTS_PER_BUCKET {
            // The entry word is a slot's second word (see `Index::slot`).
            let off = table.off + bucket * BUCKET_BYTES + B_SLOTS + s * SLOT_BYTES + 8;
            let Some(w) = r.word(off) else {
                return Err(Error::corrupt(name, "index outside the segment"));
            };
            let e = Entry(w.load(Ordering::Relaxed)); // Relaxed: a statistic.
            if e.0 != Entry::EMPTY {
                if let Some(c) = counts.get_mut(e.order() as usize) {
                    *c += 1;
                }
            }
        }
    }
    Ok(counts)
}

fn header_error(name: &str, e: HeaderError) -> Error {
    match e {
        HeaderError::Corrupt(m) => Error::corrupt(name, m),
        HeaderError::Incompatible(m) => Error::incompatible(name, m),
    }
}

/// Probes every candidate file in /dev/shm.
fn probe_all() -> Result<Vec<Probe>> {
    let dir = std::fs::read_dir(SHM_DIR).map_err(|e| Error::Io {
        segment: None,
        op: "read /dev/shm",
        source: e,
    })?;
    let mut found = Vec::new();
    for entry in dir {
        let Ok(entry) = entry else { continue };
        let Ok(name) = entry.file_name().into_string() else {
            continue; // Not UTF-8: not a shmdict name.
        };
        if name.starts_with(sys::TEMP_PREFIX) || name::validate(&name).is_err() {
            continue;
        }
        // Unreadable files and files removed meanwhile are not ours to list.
        if let Ok(Some(p)) = probe(&name) {
            found.push(p);
        }
    }
    found.sort_by(|a, b| a.info.name.cmp(&b.info.name));
    Ok(found)
}

/// Opens /dev/shm/`name` for reading without following symlinks or blocking
/// on FIFOs. `Ok(None)` if it is not a regular file.
fn open_read_only(name: &str) -> Result<Option<(File, std::fs::Metadata)>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(format!("{SHM_DIR}/{name}"));
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::NotFound {
                segment: name.to_owned(),
            })
        }
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(None), // a symlink
        Err(e) => return Err(Error::io(name, "open", e)),
    };
    let meta = file.metadata().map_err(|e| Error::io(name, "fstat", e))?;
    Ok(meta.file_type().is_file().then_some((file, meta)))
}

/// Maps the first `len` bytes of `file` read-only. The caller has checked
/// that the file is at least that long.
fn map_read_only(name: &str, file: &File, len: u64) -> Result<Region> {
    let len = usize::try_from(len).map_err(|_| Error::corrupt(name, "too large to map"))?;
    let map = memmap2::MmapOptions::new()
        .len(len)
        .map_raw_read_only(file)
        .map_err(|e| Error::io(name, "mmap", e))?;
    Region::from_map(map).ok_or_else(|| Error::corrupt(name, "mapping is misaligned"))
}

/// Reads the segment `name` without attaching. `Ok(None)`: the file exists
/// but is not a shmdict segment.
fn probe(name: &str) -> Result<Option<Probe>> {
    let Some((file, meta)) = open_read_only(name)? else {
        return Ok(None);
    };
    let size = meta.size();
    let mut head = [0u8; 16];
    if size < head.len() as u64 {
        return Ok(None);
    }
    match file.read_exact_at(&mut head, H_MAGIC) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None), // shrunk meanwhile
        Err(e) => return Err(Error::io(name, "read", e)),
    }
    let word = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
    if word(0) != MAGIC {
        return Ok(None);
    }
    let vk = word(H_VERSION_KIND as usize);
    let (version, kind) = (vk as u32, (vk >> 32) as u32);
    let mut info = SegmentInfo {
        name: name.to_owned(),
        kind: SegmentKind::from_raw(kind),
        size,
        allocated: meta.blocks().saturating_mul(512),
        uid: meta.uid(),
        mode: meta.mode() & 0o7777,
        version,
        supported: version == FORMAT_VERSION,
        attached: None,
        len: None,
        capacity: None,
        committed: None,
        max_bytes: None,
        grows: None,
        generation: None,
        error: None,
    };
    if !info.supported {
        return Ok(Some(Probe {
            info,
            file,
            region: None,
        }));
    }
    // Every kind of segment starts with the same header prefix and has its
    // attach table right after the header.
    let table_end = HEADER_BYTES + ATTACH_ENTRIES * ATTACH_ENTRY_BYTES;
    if size < table_end {
        info.error = Some(format!(
            "segment is {size} bytes, shorter than its header and attach table ({table_end} bytes)"
        ));
        return Ok(Some(Probe {
            info,
            file,
            region: None,
        }));
    }
    let region = map_read_only(name, &file, table_end)?;
    // Relaxed: immutable after publication.
    let load = |off: u64| region.word(off).map_or(0, |w| w.load(Ordering::Relaxed));
    if load(H_HEADER_BYTES) != HEADER_BYTES {
        info.error = Some(format!(
            "header size field is {}, expected {HEADER_BYTES}",
            load(H_HEADER_BYTES)
        ));
    } else if load(H_TOTAL_BYTES) > size {
        info.error = Some(format!(
            "header says {} bytes, the file has {size}",
            load(H_TOTAL_BYTES)
        ));
    } else {
        let (live, dead) = attach::census(&region, lock_fd(&file));
        info.attached = Some(Attached { live, dead });
    }
    if info.kind == SegmentKind::Dict {
        match Geometry::read_header(&region, size) {
            Ok(geo) => {
                // Only header words are read: the current generation and
                // its growth record, and the committed count. The
                // reservation beyond the attach table is never touched.
                match crate::shm::grow::current(&region, &geo) {
                    Ok(table) => {
                        info.capacity = Some(table.capacity);
                        info.generation = Some(table.gen);
                    }
                    Err(c) => {
                        info.error.get_or_insert_with(|| c.0.to_owned());
                    }
                }
                info.committed = Some(crate::shm::commit::Commits::new(&region, &geo).committed());
                info.max_bytes = (geo.max_bytes != 0).then_some(geo.max_bytes);
                info.grows = Some(geo.grows());
                // The per-entry key counts (`livecount.rs`). Only the
                // header and attach table are mapped here, so a change that a
                // writer is publishing (or died publishing) right now is
                // not added; `ShmDict::len` adds it.
                info.len = Some(crate::shm::livecount::len(&region));
            }
            Err(HeaderError::Corrupt(m) | HeaderError::Incompatible(m)) => {
                info.error.get_or_insert(m);
            }
        }
    }
    if matches!(info.kind, SegmentKind::Value | SegmentKind::Array) {
        // The element count of Value and Array segments (a statistic only,
        // shown as read).
        info.len = Some(load(crate::prim::P_LEN));
    }
    Ok(Some(Probe {
        info,
        file,
        region: Some(region),
    }))
}

/// How an inspecting process (attached to nothing) asks about entries.
fn lock_fd(file: &File) -> attach::LockFd {
    use std::os::fd::AsRawFd;
    attach::LockFd::new(file.as_raw_fd(), u64::MAX)
}

/// Opens /dev/shm/`name` for writing and takes its open byte exclusively
/// (see `Gc::run`). `Ok(None)` if a handle has it open, or the name no
/// longer names `file`. The lock lasts until the returned file is dropped.
fn open_exclusive(name: &str, file: &File) -> Result<Option<File>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(format!("{SHM_DIR}/{name}"));
    let f = match f {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(name, "open for writing", e)),
    };
    let (Ok(a), Ok(b)) = (f.metadata(), file.metadata()) else {
        return Ok(None);
    };
    if a.dev() != b.dev() || a.ino() != b.ino() {
        return Ok(None);
    }
    use std::os::fd::AsFd;
    match sys::ofd::try_lock(f.as_fd(), sys::ofd::OPEN_BYTE, true) {
        Ok(true) => Ok(Some(f)),
        Ok(false) => Ok(None),
        Err(e) => Err(Error::io(name, "fcntl(F_OFD_SETLK)", e)),
    }
}

/// Whether /dev/shm/`name` is still the file `file`.
fn same_file(name: &str, file: &File) -> bool {
    let (Ok(now), Ok(then)) = (
        std::fs::symlink_metadata(format!("{SHM_DIR}/{name}")),
        file.metadata(),
    ) else {
        return false;
    };
    now.dev() == then.dev() && now.ino() == then.ino()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::local::{AtomicU32, Ordering as O};
    use crate::ShmDict;

    /// Removes a test segment on every exit path.
    struct Unlink(String);
    impl Drop for Unlink {
        fn drop(&mut self) {
            let _ = sys::unlink(&self.0);
        }
    }

    fn unique(tag: &str) -> Unlink {
        static N: AtomicU32 = AtomicU32::new(0);
        Unlink(format!(
            "segtest-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, O::Relaxed)
        ))
    }

    fn small(name: &str) -> ShmDict {
        ShmDict::options()
            .capacity(1024)
            .arena_bytes(1 << 20)
            .open(name)
            .unwrap()
    }

    const CHILD_ENV: &str = "SHMDICT_SEGMENTS_TEST_CHILD";

    /// Child role: opens the dictionary named in the environment and exits
    /// without dropping it, leaving a dead attach entry. Does nothing (and
    /// passes) in a normal test run.
    #[test]
    fn child_attach_and_exit() {
        if let Ok(name) = std::env::var(CHILD_ENV) {
            let d = small(&name);
            d.insert("child", "was here").unwrap();
            std::mem::forget(d);
            std::process::exit(0);
        }
    }

    /// Runs [`child_attach_and_exit`] in a new process attached to `name`.
    fn crash_child(name: &str) {
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "segments::tests::child_attach_and_exit"])
            .env(CHILD_ENV, name)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn find(name: &str) -> Option<SegmentInfo> {
        list().unwrap().into_iter().find(|s| s.name == name)
    }

    #[test]
    fn list_and_info_describe_a_dictionary() {
        let seg = unique("list");
        let d = small(&seg.0);
        d.insert("a", "1").unwrap();
        d.insert("b", "2").unwrap();
        let s = find(&seg.0).expect("listed");
        assert_eq!(s.kind, SegmentKind::Dict);
        assert!(s.supported && s.error.is_none(), "{s:?}");
        assert_eq!(s.version, FORMAT_VERSION);
        assert_eq!((s.len, s.capacity), (Some(2), Some(1024)));
        assert_eq!(s.attached, Some(Attached { live: 1, dead: 0 }));
        assert_eq!(s.mode, 0o600);
        assert!(s.size >= HEADER_BYTES && s.allocated > 0);
        let i = info(&seg.0).unwrap();
        assert_eq!((i.name, i.len), (seg.0.clone(), Some(2)));
        let used = blocks_in_use(&seg.0).unwrap();
        assert_eq!(used.iter().sum::<u64>(), 2);
        drop(d);
        assert_eq!(info(&seg.0).unwrap().attached, Some(Attached::default()));
    }

    /// A dictionary that grew: `info` reports the current index (not the
    /// one it was created with) and the memory it takes, read from the
    /// header alone; `blocks_in_use` reads the current table.
    #[test]
    fn info_follows_growth() {
        let seg = unique("grown");
        let d = ShmDict::options()
            .capacity(16)
            .arena_bytes(64 << 10)
            .open(&seg.0)
            .unwrap();
        for i in 0..1000 {
            d.insert(format!("key-{i}"), [7u8; 40]).unwrap();
        }
        let st = d.stats();
        assert!(st.generation >= 6, "{st:?}");
        let s = info(&seg.0).unwrap();
        assert!(s.error.is_none(), "{s:?}");
        assert_eq!(s.len, Some(1000));
        assert_eq!(s.generation, Some(st.generation));
        assert_eq!(s.capacity, Some(st.capacity as u64));
        assert!(s.capacity.unwrap() >= 1000, "{s:?}");
        assert_eq!((s.grows, s.max_bytes), (Some(true), None));
        assert_eq!(s.committed, Some(d.stats().committed_bytes));
        // The file is a reservation; memory is what was committed.
        assert_eq!(s.size, st.reserved_bytes);
        let committed = s.committed.unwrap();
        assert!(committed < 8 << 20 && committed < s.size, "{s:?}");
        assert!(s.allocated <= committed + (64 << 10), "{s:?}");
        assert_eq!(blocks_in_use(&seg.0).unwrap().iter().sum::<u64>(), 1000);

        let fixed = unique("fixed");
        let f = ShmDict::options()
            .capacity(100)
            .arena_bytes(1 << 20)
            .fixed_size(true)
            .max_bytes(8 << 20)
            .open(&fixed.0)
            .unwrap();
        f.insert("k", "v").unwrap();
        let s = info(&fixed.0).unwrap();
        assert_eq!(s.grows, Some(false));
        assert_eq!(s.generation, Some(0));
        assert_eq!(s.capacity, Some(100));
        assert_eq!(s.max_bytes, Some(8 << 20));
    }

    #[test]
    fn info_rejects_missing_bad_and_foreign_files() {
        assert!(matches!(info("no/such"), Err(Error::InvalidName { .. })));
        let seg = unique("missing");
        assert!(matches!(info(&seg.0), Err(Error::NotFound { .. })));
        std::fs::write(format!("{SHM_DIR}/{}", seg.0), b"hello, not a segment").unwrap();
        assert!(matches!(info(&seg.0), Err(Error::Corrupt { .. })));
        assert!(find(&seg.0).is_none(), "a foreign file is not listed");
        assert!(matches!(blocks_in_use(&seg.0), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn damaged_headers_are_reported_not_trusted() {
        let write = |name: &str, bytes: &[u8]| {
            std::fs::write(format!("{SHM_DIR}/{name}"), bytes).unwrap();
        };
        let mut head = MAGIC.to_le_bytes().to_vec();
        head.extend_from_slice(&(FORMAT_VERSION as u64 | (KIND_DICT as u64) << 32).to_le_bytes());
        // Magic and version only: too short for a header.
        let short = unique("short");
        write(&short.0, &head);
        let s = info(&short.0).unwrap();
        assert!(s.error.is_some() && s.attached.is_none(), "{s:?}");
        // A header of zeros after the magic, with room for the attach table.
        let zeros = unique("zeros");
        let mut bytes = head.clone();
        bytes.resize(
            (HEADER_BYTES + ATTACH_ENTRIES * ATTACH_ENTRY_BYTES) as usize,
            0,
        );
        write(&zeros.0, &bytes);
        let s = info(&zeros.0).unwrap();
        assert!(s.error.is_some(), "{s:?}");
        assert!(matches!(
            blocks_in_use(&zeros.0),
            Err(Error::Corrupt { .. } | Error::Incompatible { .. })
        ));
        // Another format version: reported, not interpreted.
        let future = unique("future");
        let mut bytes = MAGIC.to_le_bytes().to_vec();
        bytes.extend_from_slice(&(99u64 | 7 << 32).to_le_bytes());
        write(&future.0, &bytes);
        let s = info(&future.0).unwrap();
        assert_eq!((s.version, s.supported), (99, false));
        assert_eq!(s.kind, SegmentKind::Unknown(7));
        // None of them is ever collected.
        for all in [false, true] {
            let prefix = format!("segtest-{}-", std::process::id());
            let removed = Gc::new()
                .prefix(&prefix)
                .all_detached(all)
                .dry_run(true)
                .run();
            let removed = removed.unwrap();
            for seg in [&short, &zeros, &future] {
                assert!(!removed.contains(&seg.0));
            }
        }
    }

    #[test]
    fn gc_removes_only_segments_whose_users_all_died() {
        let crashed = unique("gc-crashed");
        let busy = unique("gc-busy");
        let idle = unique("gc-idle");
        drop(small(&crashed.0));
        crash_child(&crashed.0);
        let _held = small(&busy.0);
        crash_child(&busy.0);
        drop(small(&idle.0));
        assert_eq!(
            info(&crashed.0).unwrap().attached,
            Some(Attached { live: 0, dead: 1 })
        );
        assert_eq!(
            info(&busy.0).unwrap().attached,
            Some(Attached { live: 1, dead: 1 })
        );
        // Only look at this test's segments: others may be running tests.
        let prefix = format!("segtest-{}-gc-", std::process::id());
        let gc = Gc::new().prefix(&prefix);
        assert_eq!(
            gc.clone().dry_run(true).run().unwrap(),
            vec![crashed.0.clone()]
        );
        assert!(find(&crashed.0).is_some(), "a dry run removes nothing");
        assert_eq!(gc.run().unwrap(), vec![crashed.0.clone()]);
        assert!(find(&crashed.0).is_none());
        assert!(find(&busy.0).is_some() && find(&idle.0).is_some());
        assert!(gc.run().unwrap().is_empty());
        // With all_detached, the cleanly closed one goes too; the busy one stays.
        let all = gc.all_detached(true);
        assert_eq!(all.run().unwrap(), vec![idle.0.clone()]);
        assert!(find(&busy.0).is_some());
    }
}
