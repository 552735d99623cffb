//! The header of a `Value`/`Array` segment: its fields, what a handle
//! expects of it ([`Spec`]), writing it at creation and checking it on
//! attach.

use super::*;

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
    pub(super) fn write_header(&self, r: &Region) {
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
    pub(super) fn check_header(&self, seg: &str, r: &Region, file_len: u64) -> Result<()> {
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
pub(super) fn stored_type_name(r: &Region) -> String {
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
