//! The segment of a [`Value`](crate::Value) or an [`Array`](crate::Array):
//! its header, race-free creation, validation on attach, and the few
//! `unsafe` views of its data area.
//!
//! Both kinds share the dictionary's header prefix (magic, version and kind,
//! header size, file size), so tools list any shmdict segment, and its attach
//! table, so every handle has an owner [`Token`](crate::shm::attach::Token) for
//! the lock words it takes.
//!
//! ```text
//! 0        4096                         266240 (DATA_OFF, page aligned)      total
//! | header | attach table (4096 x 64 B) | data: the value's word or two slots,
//! |        |                            |       or the array's elements      |
//! ```
//!
//! Header fields (byte offsets; 8-byte little-endian words unless noted):
//!
//! | offset     | field                                                        |
//! |------------|--------------------------------------------------------------|
//! | 0          | magic `b"SHMDICT\0"`, written last at creation              |
//! | 8          | format version (low 32) \| kind << 32: 2 = Value, 3 = Array |
//! | 16         | header bytes (4096)                                          |
//! | 24         | total bytes (the file size)                                  |
//! | 32         | element size in bytes                                        |
//! | 40         | element alignment                                            |
//! | 48         | type tag: xxh3-64 (seed 0) of `std::any::type_name::<T>()`   |
//! | 56         | length in elements (1 for a Value)                           |
//! | 64         | data offset (`DATA_OFF`)                                     |
//! | 72         | data bytes                                                   |
//! | 80, 88     | attach table offset (4096) and entries (4096)               |
//! | 96         | representation (Value: 1 atomic word, 2 double buffer)       |
//! | 104        | layout version of these fields (`PRIM_VERSION`)              |
//! | 112        | length of the stored type name                               |
//! | 128        | exclusive lock word (`lockword` format: 0 or HELD \| token)  |
//! | 192        | Value double buffer: sequence; the current slot is `seq & 1` |
//! | 256        | Array: mode of the shared holders (0 read, 1 chunk)          |
//! | 264        | attach high-water mark: entries `0..hwm` may hold a count    |
//! | 320        | Array: lock word of the chunk claim table                    |
//! | 384, 388   | futex words (32-bit only): wake sequence, sleepers           |
//! | 512..1088  | unused (a dictionary's wait channels and mutex live there)   |
//! | 1152..2048 | the type name's bytes (at most 896), for error messages      |
//! | 2048..4096 | Array: 64 chunk claims of 32 bytes: owner word, start, end   |
//!
//! Attach entries use words 0..3 as for a dictionary (identity, generation);
//! word 4 (byte 32) counts the shared holds of an Array handle (see
//! `rwlock.rs`).
//!
//! Type names come from the compiler and may change between compiler
//! versions: two builds that name a type differently get
//! `Error::Incompatible`, never a silent reinterpretation of the bytes.

#[cfg(not(loom))]
use crate::sync::mapped::{
    AtomicI16, AtomicI32, AtomicI64, AtomicI8, AtomicIsize, AtomicU16, AtomicU32, AtomicU8,
    AtomicUsize,
};

use bytemuck::Pod;

use crate::error::{Error, Result};
use crate::name;
use crate::shm::attach::{self, Holder, LockFd, Token};
use crate::shm::layout::{
    self, ATTACH_ENTRIES, ATTACH_ENTRY_BYTES, FORMAT_VERSION, HEADER_BYTES, H_HEADER_BYTES,
    H_MAGIC, H_TOTAL_BYTES, H_VERSION_KIND, MAGIC, PAGE,
};
use crate::shm::region::Region;
use crate::shm::registration::{Owner, Registration};
use crate::sync::{AtomicU64, Ordering};
#[cfg(not(loom))]
use crate::sys;

/// Segment kinds (the numbers `layout::kind_name` knows).
pub(crate) const KIND_VALUE: u32 = 2;
pub(crate) const KIND_ARRAY: u32 = 3;
/// Version of the fields below; bumped when they change.
pub(crate) const PRIM_VERSION: u64 = 1;

pub(crate) const P_ELEM_SIZE: u64 = 32;
pub(crate) const P_ELEM_ALIGN: u64 = 40;
pub(crate) const P_TYPE_TAG: u64 = 48;
pub(crate) const P_LEN: u64 = 56;
pub(crate) const P_DATA_OFF: u64 = 64;
pub(crate) const P_DATA_BYTES: u64 = 72;
pub(crate) const P_ATTACH_OFF: u64 = 80;
pub(crate) const P_ATTACH_LEN: u64 = 88;
pub(crate) const P_REPR: u64 = 96;
pub(crate) const P_PRIM_VERSION: u64 = 104;
pub(crate) const P_TYPE_NAME_LEN: u64 = 112;
/// Mutable words, each on a cache line of its own.
pub(crate) const P_LOCK: u64 = 128;
pub(crate) const P_SEQ: u64 = 192;
pub(crate) const P_MODE: u64 = 256;
pub(crate) const P_HWM: u64 = 264;
pub(crate) const P_CLAIM_LOCK: u64 = 320;
/// 32-bit futex words; 384..448 is only ever accessed as 32-bit words.
pub(crate) const P_FUTEX_SEQ: u64 = 384;
pub(crate) const P_FUTEX_SLEEPERS: u64 = 388;
pub(crate) const P_TYPE_NAME: u64 = 1152;
pub(crate) const TYPE_NAME_MAX: u64 = 896;
/// The chunk claim table.
pub(crate) const P_CLAIMS: u64 = 2048;
#[cfg(not(loom))]
pub(crate) const CLAIM_SLOTS: u64 = 64;
/// Loom models use a few slots, to keep their state small.
#[cfg(loom)]
pub(crate) const CLAIM_SLOTS: u64 = 4;
pub(crate) const CLAIM_BYTES: u64 = 32;
/// Byte offset, inside an attach entry, of the handle's shared-hold count.
pub(crate) const E_SHARED: u64 = 32;
/// Where the data starts: the first page after the attach table.
pub(crate) const DATA_OFF: u64 = HEADER_BYTES + ATTACH_ENTRIES * ATTACH_ENTRY_BYTES;
/// Largest data area accepted (64 TiB): far beyond any /dev/shm, and small
/// enough that no offset arithmetic overflows.
pub(crate) const MAX_DATA_BYTES: u64 = 1 << 46;

const _: () = assert!(DATA_OFF % PAGE == 0);
const _: () = assert!(P_TYPE_NAME + TYPE_NAME_MAX <= P_CLAIMS);
const _: () = assert!(P_CLAIMS + CLAIM_SLOTS * CLAIM_BYTES <= HEADER_BYTES);
const _: () = assert!(E_SHARED + 8 <= ATTACH_ENTRY_BYTES);
const _: () = assert!(P_FUTEX_SLEEPERS + 4 <= 448 && 448 <= 512);

/// What a handle expects of a segment, and what a new one is created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Spec {
    pub(crate) kind: u32,
    pub(crate) elem_size: u64,
    pub(crate) elem_align: u64,
    pub(crate) type_tag: u64,
    pub(crate) type_name: &'static str,
    pub(crate) len: u64,
    pub(crate) repr: u64,
    pub(crate) data_bytes: u64,
}

impl Spec {
    /// The spec of a segment of `len` elements of `T` with `data_bytes`
    /// bytes of data; `InvalidArgument` if it does not fit the format.
    pub(crate) fn of<T: Pod>(
        name: &str,
        kind: u32,
        len: u64,
        repr: u64,
        data_bytes: Option<u64>,
    ) -> Result<Spec> {
        let type_name = std::any::type_name::<T>();
        let invalid = |reason: String| Error::InvalidArgument {
            segment: name.to_owned(),
            reason,
        };
        let align = std::mem::align_of::<T>() as u64;
        if align > PAGE {
            return Err(invalid(format!(
                "{type_name} needs {align}-byte alignment; at most {PAGE} is supported"
            )));
        }
        let data_bytes = data_bytes.filter(|&b| b <= MAX_DATA_BYTES).ok_or_else(|| {
            invalid(format!(
                "{len} elements of {type_name} exceed the {MAX_DATA_BYTES}-byte limit"
            ))
        })?;
        Ok(Spec {
            kind,
            elem_size: std::mem::size_of::<T>() as u64,
            elem_align: align,
            type_tag: layout::hash_key(type_name.as_bytes()),
            type_name,
            len,
            repr,
            data_bytes,
        })
    }

    /// File size: header, attach table, data rounded up to whole words.
    pub(crate) fn total_bytes(&self) -> u64 {
        // Cannot overflow: data_bytes <= MAX_DATA_BYTES.
        DATA_OFF + self.data_bytes.next_multiple_of(8)
    }

    fn what(&self) -> String {
        format!(
            "{} of {} x {} ({} bytes, align {})",
            layout::kind_name(self.kind),
            self.len,
            self.type_name,
            self.elem_size,
            self.elem_align
        )
    }

    /// Writes the header of a fresh (all-zero, unpublished) segment; the
    /// magic last.
    fn write_header(&self, r: &Region) {
        // Relaxed (all): the segment is not visible to any other process
        // yet; publication (linkat) orders these writes before any open.
        let put = |off: u64, v: u64| word(r, off).store(v, Ordering::Relaxed);
        put(
            H_VERSION_KIND,
            FORMAT_VERSION as u64 | (self.kind as u64) << 32,
        );
        put(H_HEADER_BYTES, HEADER_BYTES);
        put(H_TOTAL_BYTES, self.total_bytes());
        put(P_ELEM_SIZE, self.elem_size);
        put(P_ELEM_ALIGN, self.elem_align);
        put(P_TYPE_TAG, self.type_tag);
        put(P_LEN, self.len);
        put(P_DATA_OFF, DATA_OFF);
        put(P_DATA_BYTES, self.data_bytes);
        put(P_ATTACH_OFF, HEADER_BYTES);
        put(P_ATTACH_LEN, ATTACH_ENTRIES);
        put(P_REPR, self.repr);
        put(P_PRIM_VERSION, PRIM_VERSION);
        let name = &self.type_name.as_bytes()[..self.type_name.len().min(TYPE_NAME_MAX as usize)];
        put(P_TYPE_NAME_LEN, name.len() as u64);
        for (i, chunk) in name.chunks(8).enumerate() {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            put(P_TYPE_NAME + 8 * i as u64, u64::from_le_bytes(b));
        }
        put(H_MAGIC, MAGIC);
    }

    /// Checks the header of an untrusted segment of `file_len` bytes against
    /// this spec: `Corrupt` if it is not a valid header, `Incompatible` if
    /// it is one for another kind, version, type or length.
    fn check_header(&self, seg: &str, r: &Region, file_len: u64) -> Result<()> {
        let corrupt = |m: String| Err(Error::corrupt(seg, m));
        let incompatible = |m: String| Err(Error::incompatible(seg, m));
        // Relaxed (all): immutable after publication, which the open
        // (shm_open after linkat) orders before these reads.
        let get = |off: u64| word(r, off).load(Ordering::Relaxed);
        if get(H_MAGIC) != MAGIC {
            return corrupt("bad magic: not a shmdict segment".into());
        }
        let vk = get(H_VERSION_KIND);
        let (version, kind) = (vk as u32, (vk >> 32) as u32);
        if version != FORMAT_VERSION {
            return incompatible(format!(
                "format version {version}, this build reads version {FORMAT_VERSION}"
            ));
        }
        if kind != self.kind {
            return incompatible(format!(
                "it holds a {}, not a {}",
                layout::kind_name(kind),
                layout::kind_name(self.kind)
            ));
        }
        if get(P_PRIM_VERSION) != PRIM_VERSION {
            return incompatible(format!(
                "{} layout version {}, this build reads version {PRIM_VERSION}",
                layout::kind_name(kind),
                get(P_PRIM_VERSION)
            ));
        }
        if get(H_HEADER_BYTES) != HEADER_BYTES
            || get(P_ATTACH_OFF) != HEADER_BYTES
            || get(P_ATTACH_LEN) != ATTACH_ENTRIES
            || get(P_DATA_OFF) != DATA_OFF
        {
            return corrupt("header, attach table or data offset field".into());
        }
        let (size, align, tag, len) = (
            get(P_ELEM_SIZE),
            get(P_ELEM_ALIGN),
            get(P_TYPE_TAG),
            get(P_LEN),
        );
        if size != self.elem_size || align != self.elem_align || tag != self.type_tag {
            return incompatible(format!(
                "opened as {}, but the segment holds elements of `{}` ({size} bytes, align {align}, \
                 type tag {tag:#018x}); type names can also differ between compiler versions",
                self.what(),
                stored_type_name(r)
            ));
        }
        if len != self.len {
            return incompatible(format!(
                "opened as {}, but the segment holds {len} elements",
                self.what()
            ));
        }
        if get(P_REPR) != self.repr {
            return corrupt(format!("representation field {}", get(P_REPR)));
        }
        if get(P_DATA_BYTES) != self.data_bytes {
            return corrupt(format!(
                "data size field is {}, expected {} for {}",
                get(P_DATA_BYTES),
                self.data_bytes,
                self.what()
            ));
        }
        let total = get(H_TOTAL_BYTES);
        if total != self.total_bytes() || total != file_len {
            return corrupt(format!(
                "header says {total} bytes, the layout needs {}, the file has {file_len}",
                self.total_bytes()
            ));
        }
        Ok(())
    }
}

/// The type name stored in a header (lossy; untrusted bytes).
fn stored_type_name(r: &Region) -> String {
    // Relaxed: immutable after publication.
    let n = word(r, P_TYPE_NAME_LEN)
        .load(Ordering::Relaxed)
        .min(TYPE_NAME_MAX) as usize;
    let bytes: Vec<u8> = (0..n.div_ceil(8) as u64)
        .flat_map(|i| {
            word(r, P_TYPE_NAME + 8 * i)
                .load(Ordering::Relaxed)
                .to_le_bytes()
        })
        .take(n)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A header word. Header offsets are constants below `DATA_OFF`, and every
/// region of a Value or Array is at least `DATA_OFF` bytes long (checked
/// before the region is used), so the lookup cannot fail.
#[inline]
pub(crate) fn word(r: &Region, off: u64) -> &AtomicU64 {
    r.word(off)
        .expect("header words lie inside every validated Value/Array segment")
}

/// A 32-bit futex word of the header; see [`word`].
#[cfg(not(loom))]
#[inline]
pub(crate) fn word32(r: &Region, off: u64) -> &AtomicU32 {
    r.word32(off)
        .expect("header words lie inside every validated Value/Array segment")
}

/// Creation options shared by values and arrays.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Create {
    pub(crate) mode: u32,
    /// Create the segment if it is missing (`false`: `NotFound`).
    pub(crate) create: bool,
    pub(crate) create_new: bool,
    /// Attach an existing segment whatever its owner and mode.
    pub(crate) allow_other_owner: bool,
}

impl Default for Create {
    fn default() -> Create {
        Create {
            mode: 0o600,
            create: true,
            create_new: false,
            allow_other_owner: false,
        }
    }
}

/// An attached Value or Array segment: the mapping and this handle's attach
/// entry and process-local lock state. Detaches when dropped.
pub(crate) struct Segment {
    pub(crate) name: String,
    pub(crate) region: Region,
    /// This handle's attach entries; `&self.local` is the current process's
    /// [`Local`] (see `shm/registration.rs`).
    pub(crate) local: Owner<Local>,
}

/// A handle's process-local lock state (never in the segment).
#[derive(Debug)]
pub(crate) struct Local {
    /// This handle's attach entry.
    pub(crate) index: u64,
    /// Holds of the exclusive lock word by this handle's threads.
    pub(crate) x: Holder,
    /// Holds of the claim-table lock word.
    pub(crate) claim_lock: Holder,
    /// Shared holds of this handle's threads: mirrors the count at
    /// `E_SHARED` of the attach entry, but is what this process trusts.
    pub(crate) shared: AtomicU64,
    /// Bit `k`: claim slot `k` is held by one of this handle's guards.
    pub(crate) claimed: AtomicU64,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("name", &self.name)
            .field("bytes", &self.region.len())
            .field("attach_index", &self.local.index)
            .finish()
    }
}

impl Segment {
    /// The registration this process acts under, claimed first in a forked
    /// child that has not used the handle yet (see `shm/registration.rs`). If the
    /// attach table is full then, the inherited one (as before fork-aware
    /// handles: what it takes then looks like the parent's).
    pub(crate) fn enter(&self) -> &Registration<Local> {
        self.local
            .current(&self.region)
            .unwrap_or_else(|| self.local.home())
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.local.detach(&self.region);
    }
}

/// Attaches to the segment `name` if it exists and matches `spec`, or
/// creates it (header, then `init` on the data, then publication).
#[cfg(not(loom))]
pub(crate) fn open(
    name: &str,
    spec: &Spec,
    opts: Create,
    init: impl Fn(&Region),
) -> Result<Segment> {
    name::validate(name)?;
    if opts.mode & !0o7777 != 0 {
        return Err(Error::InvalidArgument {
            segment: name.to_owned(),
            reason: format!("mode {:#o} has bits outside 0o7777", opts.mode),
        });
    }
    let access = sys::access::Access {
        mode: opts.mode,
        allow_other_owner: opts.allow_other_owner,
    };
    if !opts.create {
        if opts.create_new {
            return Err(Error::InvalidArgument {
                segment: name.to_owned(),
                reason: "create_new(true) contradicts create(false)".into(),
            });
        }
        let (file, len) = sys::access::open_existing_checked(name, access)?;
        return attach_file(name, spec, file, len);
    }
    sys::access::create_or_attach_checked(
        name,
        access,
        spec.total_bytes(),
        opts.create_new,
        |r| {
            if r.len() < spec.total_bytes() {
                return Err(Error::corrupt(name, "new segment shorter than its layout"));
            }
            // The data first: the header's magic publishes the whole.
            init(r);
            spec.write_header(r);
            Ok(())
        },
        |file, region| attach_region(name, region, Some(file)),
        |file, len| attach_file(name, spec, file, len),
    )
}

#[cfg(not(loom))]
fn attach_file(name: &str, spec: &Spec, file: std::fs::File, len: u64) -> Result<Segment> {
    if len < DATA_OFF {
        // Too short for our layout. Report a foreign kind as such if the
        // header prefix is readable.
        if len >= HEADER_BYTES {
            let region = sys::map(name, &file, HEADER_BYTES)?;
            let vk = word(&region, H_VERSION_KIND).load(Ordering::Relaxed); // Relaxed: immutable.
            if word(&region, H_MAGIC).load(Ordering::Relaxed) == MAGIC
                && (vk >> 32) as u32 != spec.kind
            {
                return Err(Error::incompatible(
                    name,
                    format!(
                        "it holds a {}, not a {}",
                        layout::kind_name((vk >> 32) as u32),
                        layout::kind_name(spec.kind)
                    ),
                ));
            }
        }
        return Err(Error::corrupt(
            name,
            format!(
                "segment is {len} bytes, shorter than a {} header and attach table ({DATA_OFF} bytes)",
                layout::kind_name(spec.kind)
            ),
        ));
    }
    let region = sys::map(name, &file, len)?;
    spec.check_header(name, &region, len)?;
    attach_region(name, region, Some(file))
}

pub(crate) fn attach_region(
    name: &str,
    region: Region,
    #[cfg(not(loom))] file: Option<std::fs::File>,
    #[cfg(loom)] _file: Option<()>,
) -> Result<Segment> {
    let local = Owner::new(
        &region,
        #[cfg(not(loom))]
        file,
        Box::new(make_local),
    )
    .ok_or_else(|| Error::full(name, "attach table (4096 live handles)"))?;
    Ok(Segment {
        name: name.to_owned(),
        region,
        local,
    })
}

/// Prepares the attach entry `index` just claimed (with `token`) for shared
/// holds, and the handle's process-local lock state.
pub(crate) fn make_local(r: &Region, index: u64, token: Token, lock_fd: LockFd) -> Local {
    // A dead previous owner of the entry may have died holding shared
    // holds. Release: a drainer that reads this count and then our identity
    // sees the identity (see `rwlock::drain`).
    word(r, attach::entry_off(index) + E_SHARED).store(0, Ordering::Release);
    // SeqCst: ordered before any shared hold of this handle, and read
    // (SeqCst) by a drainer after it took the exclusive word: a drainer
    // either scans this entry or we see its lock word held.
    word(r, P_HWM).fetch_max(index + 1, Ordering::SeqCst);
    Local {
        index,
        x: Holder::with_lock_fd(token, lock_fd),
        claim_lock: Holder::with_lock_fd(token, lock_fd),
        shared: AtomicU64::new(0),
        claimed: AtomicU64::new(0),
    }
}

/// Claims an entry for a handle of the process `ident`, without a file
/// (loom models).
#[cfg(loom)]
pub(crate) fn attach_handle(r: &Region, ident: u64) -> Option<Local> {
    let (index, token) = attach::attach(r, LockFd::NONE, ident)?;
    Some(make_local(r, index, token, LockFd::NONE))
}

/// Validates a name and removes it.
#[cfg(not(loom))]
pub(crate) fn unlink(name: &str) -> Result<()> {
    name::validate(name)?;
    sys::unlink(name)
}

// ---------------------------------------------------------------------------
// Typed views of the data area. The only `unsafe` of Value and Array.
// ---------------------------------------------------------------------------

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
fn elems_ptr<T: Pod>(r: &Region, total: u64, start: u64, len: u64) -> Option<(*mut T, usize)> {
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

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_checks() {
        let spec = Spec::of::<u64>("t", KIND_ARRAY, 10, 0, Some(80)).unwrap();
        let r = Region::heap(spec.total_bytes() as usize);
        spec.write_header(&r);
        spec.check_header("t", &r, spec.total_bytes()).unwrap();
        assert_eq!(stored_type_name(&r), "u64");
        let other = Spec::of::<i64>("t", KIND_ARRAY, 10, 0, Some(80)).unwrap();
        let e = other.check_header("t", &r, spec.total_bytes()).unwrap_err();
        assert!(matches!(e, Error::Incompatible { .. }), "{e}");
        assert!(e.to_string().contains("`u64`"), "{e}");
        let longer = Spec::of::<u64>("t", KIND_ARRAY, 11, 0, Some(88)).unwrap();
        assert!(matches!(
            longer.check_header("t", &r, spec.total_bytes()),
            Err(Error::Incompatible { .. })
        ));
        let value = Spec::of::<u64>("t", KIND_VALUE, 10, 0, Some(80)).unwrap();
        assert!(matches!(
            value.check_header("t", &r, spec.total_bytes()),
            Err(Error::Incompatible { .. })
        ));
        assert!(matches!(
            spec.check_header("t", &r, spec.total_bytes() + 8),
            Err(Error::Corrupt { .. })
        ));
        word(&r, P_DATA_BYTES).store(1 << 60, Ordering::Relaxed);
        assert!(matches!(
            spec.check_header("t", &r, spec.total_bytes()),
            Err(Error::Corrupt { .. })
        ));
        word(&r, H_MAGIC).store(0, Ordering::Relaxed);
        assert!(matches!(
            spec.check_header("t", &r, spec.total_bytes()),
            Err(Error::Corrupt { .. })
        ));
    }

    #[test]
    fn element_ranges_are_bounds_checked() {
        let r = Region::heap((DATA_OFF + 64) as usize);
        assert!(elems_ptr::<u64>(&r, 8, 0, 8).is_some());
        assert!(elems_ptr::<u64>(&r, 8, 8, 0).is_some());
        assert!(elems_ptr::<u64>(&r, 8, 4, 5).is_none());
        assert!(
            elems_ptr::<u64>(&r, 9, 0, 1).is_none(),
            "total beyond the region"
        );
        assert!(elems_ptr::<u64>(&r, 8, u64::MAX, 2).is_none());
        assert!(elems_ptr::<[u8; 3]>(&r, 21, 20, 1).is_some());
    }

    #[test]
    fn spec_limits() {
        assert!(Spec::of::<u8>("t", KIND_ARRAY, 0, 0, None).is_err());
        assert!(Spec::of::<u8>("t", KIND_ARRAY, 0, 0, Some(MAX_DATA_BYTES + 1)).is_err());
        #[derive(Clone, Copy)]
        #[repr(C, align(8192))]
        struct Huge([u8; 8192]);
        // SAFETY: (test) a byte array: no padding, any bit pattern is valid.
        unsafe impl bytemuck::Zeroable for Huge {}
        // SAFETY: as above.
        unsafe impl Pod for Huge {}
        assert!(Spec::of::<Huge>("t", KIND_ARRAY, 1, 0, Some(8192)).is_err());
    }
}
