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
//! Attach entries use words 0..3 as for a dictionary (identity,
//! generation, writes in flight, pid namespace); word 4 (byte 32) counts the
//! shared holds of an Array handle (see `shm/rwlock.rs`).
//!
//! | file        | what                                                  |
//! |-------------|-------------------------------------------------------|
//! | `mod.rs`    | opening and attaching a segment, a handle's entries    |
//! | `header.rs` | the header fields, [`Spec`], writing and checking them |
//! | `view.rs`   | typed views of the data area (the `unsafe` part)       |
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

mod header;
mod view;

pub(crate) use header::*;
pub(crate) use view::*;

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
            // All of a Value's or an Array's memory, before the first write
            // touches it: a full /dev/shm is `Full` here, not a SIGBUS in
            // some process later.
            if !r.commit(0, spec.total_bytes()) {
                return Err(Error::full(
                    name,
                    format!(
                        "/dev/shm has no room for the {} bytes of a new {} (fallocate failed: the file system is full)",
                        spec.total_bytes(),
                        crate::shm::layout::kind_name(spec.kind)
                    ),
                ));
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
