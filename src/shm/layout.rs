//! The byte layout of a dictionary segment: header fields, geometry, and the
//! encoding of index entries. `docs/design.md` draws the same layout.
//!
//! ```text
//! 0        4096          266240            274432           290816          294912   4489216        4534272  arena_off    total
//! | header | attach table | free-list table | key-lock table | futex channels | stashes | commit table | index  | arena |
//! ```
//!
//! Everything here is plain arithmetic: no shared memory is touched except in
//! [`Geometry::write_header`] and [`Geometry::read_header`], both through a
//! bounds-checked [`Region`].

use crate::shm::region::Region;
use crate::sync::Ordering;

/// `b"SHMDICT\0"` read as a little-endian u64.
pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"SHMDICT\0");
/// Bumped whenever the byte layout or the hash changes.
/// Version 3: attach entries are claimed by OFD locks and record the pid
/// namespace (word 3); words 4 and 5 hold each handle's key count and
/// pending change (`livecount.rs`), word 6 the swept generation epoch; lock
/// words carry 62-bit tokens; free-list heads are 16 bytes (top and a 64-bit
/// tag); tuple-space claims name attach tokens. A version-2 process would
/// misread all of these.
/// Version 4: borrowed reads (issue 11), and a commit table (memory is
/// given by /dev/shm before first use: `commit.rs`). Each attach entry has a stash
/// (pin slots, retired blocks: `epoch.rs`), the header an epoch word, and a
/// block's value starts 16-aligned (`block.rs`). A version-3 process would
/// free blocks that borrowed readers of this version still read.
/// Version 5: growth while attached (issue 12, `grow.rs`). The file is a
/// reservation: the arena extends to the most the dictionary may take, and
/// index tables of later generations are carved from it; the header names
/// the current table (`H_TABLES`) and keeps a growth log, a commit budget
/// (`H_MAX_BYTES`, `H_COMMITTED`), and the arena's commit bitmap is 32 KiB.
/// A version-4 process would look keys up in the first table only.
pub(crate) const FORMAT_VERSION: u32 = 5;
/// Segment kinds that share the namespace.
pub(crate) const KIND_DICT: u32 = 1;
/// The index hash: xxh3-64 with seed 0 over the key bytes (see `hash_key`).
pub(crate) const HASH_XXH3_64_SEED0: u64 = 1;

/// Header size; the attach table starts here.
pub(crate) const HEADER_BYTES: u64 = 4096;
/// Entries in the attach table (one per attached handle). Loom models use a
/// tiny table (and the other loom sizes below) to keep their state small.
#[cfg(not(loom))]
pub(crate) const ATTACH_ENTRIES: u64 = 4096;
#[cfg(loom)]
pub(crate) const ATTACH_ENTRIES: u64 = 4;
/// Alignment of the index and the arena.
#[cfg(not(loom))]
pub(crate) const PAGE: u64 = 4096;
#[cfg(loom)]
pub(crate) const PAGE: u64 = 64;
/// Bytes per attach entry: identity word, generation word, count of write
/// operations in flight (see `gate.rs`), padding to a cache line of its own.
pub(crate) const ATTACH_ENTRY_BYTES: u64 = 64;
/// The free-list table: one head per (order, shard), each on its own cache
/// line (two words, 16-aligned: see `slab.rs`), after the attach table. A handle pushes to and pops from the shard
/// of its attach index first, so processes writing at once do not contend
/// on one head.
pub(crate) const FREE_OFF: u64 = HEADER_BYTES + ATTACH_ENTRIES * ATTACH_ENTRY_BYTES;
#[cfg(not(loom))]
pub(crate) const FREE_SHARDS: u64 = 4;
#[cfg(loom)]
pub(crate) const FREE_SHARDS: u64 = 2;
/// The key-lock table (`lock_keys`): robust mutexes, one per stripe, each
/// on its own cache line, after the free-list table.
pub(crate) const KEYLOCK_OFF: u64 = FREE_OFF + MAX_ORDERS * FREE_SHARDS * 64;
const _: () = assert!(FREE_OFF % 16 == 0, "free-list heads are 16-aligned pairs");
#[cfg(not(loom))]
pub(crate) const KEYLOCK_STRIPES: u64 = 256;
#[cfg(loom)]
pub(crate) const KEYLOCK_STRIPES: u64 = 1;
pub(crate) const KEYLOCK_BYTES: u64 = 64;
/// Waiting (`wait.rs`): `WAIT_CHANNELS` futex channels of one 32-bit word
/// each, after the key-lock table. These bytes are only ever accessed as
/// 32-bit words. Many channels keep writes to unrelated keys from finding a
/// waiter's flag set on their channel.
pub(crate) const WAIT_OFF: u64 = KEYLOCK_OFF + KEYLOCK_STRIPES * KEYLOCK_BYTES;
#[cfg(not(loom))]
pub(crate) const WAIT_CHANNELS: u64 = 1024;
#[cfg(loom)]
pub(crate) const WAIT_CHANNELS: u64 = 16;
pub(crate) const WAIT_CHANNEL_BYTES: u64 = 4;
/// The stash table (`epoch.rs`): one stash per attach entry, holding the
/// entry's pin slots and the blocks it retired, after the futex channels.
/// Pages of stashes nobody uses are never touched.
pub(crate) const STASH_OFF: u64 = WAIT_OFF + WAIT_CHANNELS * WAIT_CHANNEL_BYTES;
#[cfg(not(loom))]
pub(crate) const STASH_BYTES: u64 = 1024;
#[cfg(loom)]
pub(crate) const STASH_BYTES: u64 = 256;
/// The commit table (`commit.rs`): bitmaps of the parts of the segment
/// whose memory /dev/shm has given (`fallocate`), after the stashes: one
/// bit per page of stashes, then one per unit of the first index table,
/// then one per arena unit (units of at least 64 KiB; at most 65,536 index
/// units and 262,144 arena units).
pub(crate) const COMMIT_OFF: u64 = STASH_OFF + ATTACH_ENTRIES * STASH_BYTES;
pub(crate) const COMMIT_STASH_OFF: u64 = COMMIT_OFF;
pub(crate) const COMMIT_INDEX_OFF: u64 = COMMIT_OFF + COMMIT_STASH_BYTES;
pub(crate) const COMMIT_ARENA_OFF: u64 = COMMIT_INDEX_OFF + COMMIT_INDEX_BYTES;
/// Bytes of each bitmap. (Loom models commit nothing: tiny bitmaps keep
/// their heap regions small.)
#[cfg(not(loom))]
const COMMIT_STASH_BYTES: u64 = 4096;
#[cfg(not(loom))]
const COMMIT_INDEX_BYTES: u64 = 8192;
#[cfg(not(loom))]
const COMMIT_ARENA_BYTES: u64 = 32768;
#[cfg(loom)]
const COMMIT_STASH_BYTES: u64 = 64;
#[cfg(loom)]
const COMMIT_INDEX_BYTES: u64 = 64;
#[cfg(loom)]
const COMMIT_ARENA_BYTES: u64 = 64;
/// Units per bitmap, at most.
pub(crate) const COMMIT_INDEX_UNITS: u64 = COMMIT_INDEX_BYTES * 8;
pub(crate) const COMMIT_ARENA_UNITS: u64 = COMMIT_ARENA_BYTES * 8;
/// log2 of the smallest commit unit (64 KiB).
pub(crate) const COMMIT_MIN_SHIFT: u32 = 16;
/// First byte of the index: after the commit table, page aligned.
pub(crate) const INDEX_OFF: u64 = COMMIT_ARENA_OFF + COMMIT_ARENA_BYTES;
const _: () = assert!((STASH_BYTES * ATTACH_ENTRIES).div_ceil(PAGE) <= COMMIT_STASH_BYTES * 8);
/// The bytes every new segment commits at creation: the header and the
/// tables before the stashes, and the commit table.
pub(crate) const COMMITTED_AT_CREATION: [(u64, u64); 2] =
    [(0, STASH_OFF), (COMMIT_OFF, INDEX_OFF - COMMIT_OFF)];
const _: () = assert!(STASH_OFF % 64 == 0);

/// One bucket: overflow count, home lock, three slots of (ctrl, entry).
pub(crate) const BUCKET_BYTES: u64 = 64;
pub(crate) const SLOTS_PER_BUCKET: u64 = 3;
/// Offsets inside a bucket.
pub(crate) const B_OVERFLOW: u64 = 0;
pub(crate) const B_LOCK: u64 = 8;
pub(crate) const B_SLOTS: u64 = 16;
pub(crate) const SLOT_BYTES: u64 = 16;
/// Target maximum load of the index, as slots used per 4 slots.
const MAX_LOAD_NUM: u64 = 3;
const MAX_LOAD_DEN: u64 = 4;

/// Smallest arena block, and the arena's addressing unit.
pub(crate) const GRANULE: u64 = 64;
/// Bytes of a block's header: lengths word and hash word.
pub(crate) const BLOCK_HEADER: u64 = 16;
/// Keys of up to this size always fit (the contract's promise).
#[cfg(not(loom))]
pub(crate) const MAX_GUARANTEED_KEY: u64 = 4096;
#[cfg(loom)]
pub(crate) const MAX_GUARANTEED_KEY: u64 = 64;
/// Number of size classes (block orders) with free lists.
#[cfg(not(loom))]
pub(crate) const MAX_ORDERS: u64 = 32;
#[cfg(loom)]
pub(crate) const MAX_ORDERS: u64 = 8;

// Header fields (byte offsets). Immutable after creation unless noted.
pub(crate) const H_MAGIC: u64 = 0;
pub(crate) const H_VERSION_KIND: u64 = 8; // version (low 32) | kind (high 32)
pub(crate) const H_HEADER_BYTES: u64 = 16;
pub(crate) const H_TOTAL_BYTES: u64 = 24;
pub(crate) const H_CAPACITY: u64 = 32;
pub(crate) const H_NBUCKETS: u64 = 40;
pub(crate) const H_INDEX_OFF: u64 = 48;
pub(crate) const H_ARENA_OFF: u64 = 56;
pub(crate) const H_ARENA_BYTES: u64 = 64;
pub(crate) const H_CHUNK_ORDER: u64 = 72;
pub(crate) const H_ATTACH_OFF: u64 = 80;
pub(crate) const H_ATTACH_LEN: u64 = 88;
pub(crate) const H_HASH_ID: u64 = 96;
/// The last index generation the reservation has room for (`grow.rs`).
pub(crate) const H_MAX_GEN: u64 = 104;
/// The most bytes the dictionary may commit (0: no limit but the
/// reservation and /dev/shm).
pub(crate) const H_MAX_BYTES: u64 = 112;
// Mutable counters, each on its own cache line.
/// Live keys (mutable).
pub(crate) const H_LIVE: u64 = 128;
/// Arena chunks carved so far (mutable).
pub(crate) const H_CHUNKS_CARVED: u64 = 192;
/// Defragmentation lock word and epoch (mutable).
pub(crate) const H_DEFRAG_LOCK: u64 = 256;
pub(crate) const H_DEFRAG_EPOCH: u64 = 264;
/// The write gate of `check()`: a lock word (mutable; see `gate.rs`).
pub(crate) const H_GATE: u64 = 320;
/// Attach high-water mark (mutable): entries `0..hwm` may hold a key count
/// (`livecount.rs`), so `len()` reads only those.
pub(crate) const H_ATTACH_HWM: u64 = 384;
/// The global epoch of borrowed reads (mutable; see `epoch.rs`).
pub(crate) const H_EPOCH: u64 = 448;
/// The current index table (mutable; see `grow.rs`): its generation, and
/// whether the table before it is sealed.
pub(crate) const H_TABLES: u64 = 512;
/// Bytes committed so far (mutable; see `commit.rs`), against `H_MAX_BYTES`.
pub(crate) const H_COMMITTED: u64 = 576;
/// The robust process-shared mutex behind `lock()` (64 bytes at 1024), only
/// ever accessed by libc's pthread functions.
pub(crate) const DICT_LOCK_OFF: u64 = 1024;
/// The growth log (`grow.rs`): one record of `GROWTH_RECORD_BYTES` per
/// index generation, 64 generations.
pub(crate) const H_GROWTH_LOG: u64 = 2048;
pub(crate) const GROWTH_RECORD_BYTES: u64 = 32;
pub(crate) const MAX_GENERATIONS: u64 = 64;
const _: () = assert!(H_GROWTH_LOG + GROWTH_RECORD_BYTES * MAX_GENERATIONS <= HEADER_BYTES);
// 640..1024 and 1088..2048: reserved.
const _: () = assert!(INDEX_OFF % PAGE == 0);
const _: () = assert!(B_SLOTS + SLOTS_PER_BUCKET * SLOT_BYTES == BUCKET_BYTES);

/// The arena size whose eighth a dictionary that grows accepts as a value
/// from the start, whatever its initial arena (if its reservation is that
/// large): growing never changes the largest block.
#[cfg(not(loom))]
pub(crate) const GROWN_ARENA: u64 = 8 << 20;
#[cfg(loom)]
pub(crate) const GROWN_ARENA: u64 = 1024;

/// Defaults for `ShmDict::open` without options.
pub(crate) const DEFAULT_CAPACITY: u64 = 1 << 20;
pub(crate) const DEFAULT_ARENA_BYTES: u64 = 1 << 30;
/// Limits imposed by the encodings below.
pub(crate) const MAX_CAPACITY: u64 = 1 << 32;
pub(crate) const MAX_ARENA_BYTES: u64 = 1 << 37;
#[cfg(not(loom))]
pub(crate) const MIN_ARENA_BYTES: u64 = 64 * 1024;
#[cfg(loom)]
pub(crate) const MIN_ARENA_BYTES: u64 = 1024;

/// The geometry of a segment: everything needed to find any structure in it.
/// Computed at creation, stored in the header, validated on attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) capacity: u64,
    pub(crate) nbuckets: u64,
    pub(crate) index_off: u64,
    pub(crate) arena_off: u64,
    pub(crate) arena_bytes: u64,
    /// log2(chunk size / GRANULE): the largest block order.
    pub(crate) chunk_order: u32,
    pub(crate) total_bytes: u64,
    /// log2 of the commit units of the index and the arena (`commit.rs`),
    /// derived from the sizes above.
    pub(crate) index_unit_shift: u32,
    pub(crate) arena_unit_shift: u32,
    /// The last index generation (`grow.rs`): 0 for a fixed-size
    /// dictionary. Generation `g` holds `capacity << g` keys in
    /// `nbuckets << g` buckets; `capacity` and `nbuckets` are generation
    /// 0's, and `arena_bytes` is the whole reservation.
    pub(crate) max_gen: u32,
    /// The most bytes the dictionary may commit; 0: no limit but the
    /// reservation and /dev/shm.
    pub(crate) max_bytes: u64,
}

impl Geometry {
    /// Geometry for a new segment holding `capacity` live keys and at least
    /// `arena_bytes` of key and value room. `None` if out of range.
    pub(crate) fn new(capacity: u64, arena_bytes: u64) -> Option<Geometry> {
        Geometry::growable(capacity, arena_bytes, 0, 0)
    }

    /// Geometry for a new segment that starts with `capacity` keys and
    /// `arena_bytes` of room and, unless `reserve` is 0, may grow: its
    /// arena is reserved up to `reserve` bytes (rounded down to whole
    /// chunks), and it commits at most `max_bytes` (0: no limit). `None` if
    /// out of range.
    pub(crate) fn growable(
        capacity: u64,
        arena_bytes: u64,
        reserve: u64,
        max_bytes: u64,
    ) -> Option<Geometry> {
        if capacity == 0 || capacity > MAX_CAPACITY || arena_bytes > MAX_ARENA_BYTES {
            return None;
        }
        let grows = reserve > 0;
        let reserve = reserve.clamp(MIN_ARENA_BYTES, MAX_ARENA_BYTES);
        // A dictionary that grows starts no larger than its reservation.
        let arena_req = if grows {
            arena_bytes.min(reserve)
        } else {
            arena_bytes
        }
        .max(MIN_ARENA_BYTES);
        let slots = capacity.checked_mul(MAX_LOAD_DEN)?.div_ceil(MAX_LOAD_NUM);
        let nbuckets = slots.div_ceil(SLOTS_PER_BUCKET).next_power_of_two().max(2);
        // A chunk is the largest block: it must hold a maximal key plus a value
        // of 1/8 of the arena (of `GROWN_ARENA` for a dictionary that grows,
        // if the reservation has room for that much).
        let basis = if grows {
            arena_req.max(GROWN_ARENA.min(reserve))
        } else {
            arena_req
        };
        let largest = BLOCK_HEADER + MAX_GUARANTEED_KEY + basis / 8;
        let chunk_bytes = largest.next_power_of_two().max(GRANULE);
        let chunk_order = (chunk_bytes / GRANULE).trailing_zeros();
        let initial = arena_req.div_ceil(chunk_bytes) * chunk_bytes;
        let arena = if grows {
            (reserve / chunk_bytes * chunk_bytes).max(initial)
        } else {
            initial
        };
        // Generations until the index could hold a key per granule of the
        // arena (the most keys it can ever hold), within the encodings.
        let mut max_gen = 0u32;
        if grows {
            while (capacity << max_gen) < arena / GRANULE
                && (capacity << (max_gen + 1)) <= MAX_CAPACITY
                && (max_gen as u64 + 1) < MAX_GENERATIONS
                && (nbuckets << (max_gen + 1)) * BUCKET_BYTES <= arena
            {
                max_gen += 1;
            }
        }
        let index_bytes = nbuckets.checked_mul(BUCKET_BYTES)?;
        let arena_off = (INDEX_OFF + index_bytes).next_multiple_of(PAGE);
        let total = arena_off.checked_add(arena)?;
        let g = Geometry {
            capacity,
            nbuckets,
            index_off: INDEX_OFF,
            arena_off,
            arena_bytes: arena,
            chunk_order,
            total_bytes: total,
            index_unit_shift: 0,
            arena_unit_shift: 0,
            max_gen,
            max_bytes,
        }
        .with_units();
        g.check().ok().map(|()| g)
    }

    /// Whether the dictionary may grow.
    pub(crate) fn grows(&self) -> bool {
        self.max_gen > 0
    }

    /// Buckets of the index table of generation `gen`.
    pub(crate) fn table_buckets(&self, gen: u32) -> u64 {
        self.nbuckets << gen
    }

    /// Keys the index table of generation `gen` holds.
    pub(crate) fn table_capacity(&self, gen: u32) -> u64 {
        self.capacity << gen
    }

    /// Consistency rules every geometry obeys; applied to untrusted headers.
    fn check(&self) -> Result<(), String> {
        let bad = |s: &str| Err(s.to_owned());
        if !self.nbuckets.is_power_of_two() || self.nbuckets > (1 << 32) {
            return bad("bucket count is not a power of two in range");
        }
        if self.capacity == 0 || self.capacity > self.nbuckets * SLOTS_PER_BUCKET {
            return bad("capacity does not fit the index");
        }
        if self.index_off != INDEX_OFF {
            return bad("index offset");
        }
        let index_end = self.index_off + self.nbuckets * BUCKET_BYTES;
        if self.arena_off < index_end || self.arena_off % PAGE != 0 {
            return bad("arena offset");
        }
        if self.chunk_order as u64 >= MAX_ORDERS {
            return bad("chunk order");
        }
        let chunk = GRANULE << self.chunk_order;
        if self.arena_bytes == 0
            || self.arena_bytes % chunk != 0
            || self.arena_bytes > MAX_ARENA_BYTES
        {
            return bad("arena size");
        }
        if self.arena_bytes / GRANULE > u32::MAX as u64 {
            return bad("arena size exceeds the granule index");
        }
        if self.arena_off.checked_add(self.arena_bytes) != Some(self.total_bytes) {
            return bad("total size");
        }
        if self.max_gen as u64 >= MAX_GENERATIONS
            || (self.capacity << self.max_gen) > MAX_CAPACITY
            || (self.nbuckets << self.max_gen) > (1 << 33)
        {
            return bad("index generations");
        }
        Ok(())
    }

    /// Sets the commit units from the sizes: at least 64 KiB, and at most
    /// [`COMMIT_INDEX_UNITS`] and [`COMMIT_ARENA_UNITS`] units.
    fn with_units(mut self) -> Geometry {
        self.index_unit_shift = unit_shift(
            self.nbuckets.saturating_mul(BUCKET_BYTES),
            COMMIT_INDEX_UNITS,
        );
        self.arena_unit_shift = unit_shift(self.arena_bytes, COMMIT_ARENA_UNITS);
        self
    }

    /// Number of chunks the arena is carved into.
    pub(crate) fn nchunks(&self) -> u64 {
        self.arena_bytes >> (self.chunk_order + GRANULE.trailing_zeros())
    }

    /// Largest key + value payload a block can hold.
    pub(crate) fn max_payload(&self) -> u64 {
        (GRANULE << self.chunk_order) - BLOCK_HEADER
    }

    /// Writes the immutable header of a fresh (all-zero) segment.
    pub(crate) fn write_header(&self, r: &Region) -> Option<()> {
        let put = |off: u64, v: u64| -> Option<()> {
            // Relaxed: the segment is not yet visible to any other process;
            // publication (link into /dev/shm) orders these writes.
            r.word(off)?.store(v, Ordering::Relaxed);
            Some(())
        };
        put(
            H_VERSION_KIND,
            FORMAT_VERSION as u64 | (KIND_DICT as u64) << 32,
        )?;
        put(H_HEADER_BYTES, HEADER_BYTES)?;
        put(H_TOTAL_BYTES, self.total_bytes)?;
        put(H_CAPACITY, self.capacity)?;
        put(H_NBUCKETS, self.nbuckets)?;
        put(H_INDEX_OFF, self.index_off)?;
        put(H_ARENA_OFF, self.arena_off)?;
        put(H_ARENA_BYTES, self.arena_bytes)?;
        put(H_CHUNK_ORDER, self.chunk_order as u64)?;
        put(H_ATTACH_OFF, HEADER_BYTES)?;
        put(H_ATTACH_LEN, ATTACH_ENTRIES)?;
        put(H_HASH_ID, HASH_XXH3_64_SEED0)?;
        put(H_MAX_GEN, self.max_gen as u64)?;
        put(H_MAX_BYTES, self.max_bytes)?;
        put(H_COMMITTED, committed_at_creation())?;
        crate::shm::grow::log_creation(r)?;
        put(H_MAGIC, MAGIC)
    }

    /// Reads and validates the header of an untrusted segment of `file_len`
    /// bytes. Errors say which check failed; `Incompatible` vs `Corrupt` is
    /// decided by the caller from [`HeaderError`].
    pub(crate) fn read_header(r: &Region, file_len: u64) -> Result<Geometry, HeaderError> {
        let get = |off: u64| -> Result<u64, HeaderError> {
            r.word(off)
                .map(|w| w.load(Ordering::Relaxed)) // Relaxed: immutable after publication.
                .ok_or(HeaderError::Corrupt(
                    "segment is shorter than a header".into(),
                ))
        };
        if file_len < HEADER_BYTES {
            return Err(HeaderError::Corrupt(format!(
                "segment is {file_len} bytes, shorter than the {HEADER_BYTES}-byte header"
            )));
        }
        if get(H_MAGIC)? != MAGIC {
            return Err(HeaderError::Corrupt(
                "bad magic: not a shmdict segment".into(),
            ));
        }
        let vk = get(H_VERSION_KIND)?;
        let (version, kind) = (vk as u32, (vk >> 32) as u32);
        if version != FORMAT_VERSION {
            return Err(HeaderError::Incompatible(format!(
                "format version {version}, this build reads version {FORMAT_VERSION}"
            )));
        }
        if kind != KIND_DICT {
            return Err(HeaderError::Incompatible(format!(
                "it holds a {}, not a dictionary",
                kind_name(kind)
            )));
        }
        if get(H_HASH_ID)? != HASH_XXH3_64_SEED0 {
            return Err(HeaderError::Incompatible("unknown hash function".into()));
        }
        if get(H_HEADER_BYTES)? != HEADER_BYTES
            || get(H_ATTACH_OFF)? != HEADER_BYTES
            || get(H_ATTACH_LEN)? != ATTACH_ENTRIES
        {
            return Err(HeaderError::Corrupt("header or attach table size".into()));
        }
        let chunk_order = get(H_CHUNK_ORDER)?;
        let g = Geometry {
            capacity: get(H_CAPACITY)?,
            nbuckets: get(H_NBUCKETS)?,
            index_off: get(H_INDEX_OFF)?,
            arena_off: get(H_ARENA_OFF)?,
            arena_bytes: get(H_ARENA_BYTES)?,
            chunk_order: u32::try_from(chunk_order).unwrap_or(u32::MAX),
            total_bytes: get(H_TOTAL_BYTES)?,
            index_unit_shift: 0,
            arena_unit_shift: 0,
            max_gen: u32::try_from(get(H_MAX_GEN)?).unwrap_or(u32::MAX),
            max_bytes: get(H_MAX_BYTES)?,
        }
        .with_units();
        g.check()
            .map_err(|m| HeaderError::Corrupt(format!("bad geometry: {m}")))?;
        if g.total_bytes != file_len {
            return Err(HeaderError::Corrupt(format!(
                "header says {} bytes but the segment is {file_len} bytes",
                g.total_bytes
            )));
        }
        Ok(g)
    }
}

/// The commit unit for `bytes` of memory in at most `units` units: see
/// `Geometry::index_unit_shift`.
fn unit_shift(bytes: u64, units: u64) -> u32 {
    let need = bytes.div_ceil(units).max(1).next_power_of_two();
    need.trailing_zeros().max(COMMIT_MIN_SHIFT)
}

/// The bytes [`COMMITTED_AT_CREATION`] commits.
pub(crate) fn committed_at_creation() -> u64 {
    COMMITTED_AT_CREATION.iter().map(|&(_, len)| len).sum()
}

/// Why a header was rejected.
#[derive(Debug)]
pub(crate) enum HeaderError {
    Corrupt(String),
    Incompatible(String),
}

/// Human name of a segment kind, for messages.
pub(crate) fn kind_name(kind: u32) -> String {
    match kind {
        KIND_DICT => "dictionary".into(),
        2 => "Value".into(),
        3 => "Array".into(),
        k => format!("segment of unknown kind {k}"),
    }
}

/// The index hash. Part of the format: xxh3-64, seed 0, over the key bytes.
#[inline]
pub(crate) fn hash_key(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

/// An index entry word: where a key's block lives.
///
/// | bits   | field                                   |
/// |--------|-----------------------------------------|
/// | 0..32  | granule index of the block in the arena |
/// | 32..38 | order: block size is `GRANULE << order` |
/// | 38..54 | tag: bits 48..64 of the key's hash      |
/// | 63     | present (so no live entry is 0)         |
///
/// `0` is an empty slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry(pub(crate) u64);

const ENTRY_PRESENT: u64 = 1 << 63;

impl Entry {
    pub(crate) const EMPTY: u64 = 0;

    pub(crate) fn new(granule: u32, order: u32, hash: u64) -> Entry {
        Entry(ENTRY_PRESENT | (hash >> 48) << 38 | (order as u64 & 0x3f) << 32 | granule as u64)
    }
    pub(crate) fn granule(self) -> u32 {
        self.0 as u32
    }
    pub(crate) fn order(self) -> u32 {
        ((self.0 >> 32) & 0x3f) as u32
    }
    pub(crate) fn tag(self) -> u64 {
        (self.0 >> 38) & 0xffff
    }
    pub(crate) fn tag_of(hash: u64) -> u64 {
        hash >> 48
    }
}

/// Block order needed for a key and value: the smallest `o` with
/// `GRANULE << o >= BLOCK_HEADER + pad16(key) + value` (values start
/// 16-aligned: `block.rs`).
pub(crate) fn order_for(key_len: usize, value_len: usize) -> Option<u32> {
    let need = BLOCK_HEADER
        .checked_add((key_len as u64).checked_next_multiple_of(16)?)?
        .checked_add(value_len as u64)?;
    let blocks = need.div_ceil(GRANULE).next_power_of_two();
    Some(blocks.trailing_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_holds_capacity_and_big_values() {
        for (cap, arena) in [(1, 0), (1000, 1 << 20), (1 << 20, 1 << 30), (3, 100_000)] {
            let g = Geometry::new(cap, arena).unwrap();
            assert!(g.nbuckets * SLOTS_PER_BUCKET * 3 >= cap * 4, "{g:?}");
            assert!(g.arena_bytes >= arena);
            let k = MAX_GUARANTEED_KEY as usize;
            let v = (g.arena_bytes / 8) as usize;
            assert!(
                order_for(k, v.min(arena.max(MIN_ARENA_BYTES) as usize / 8)).unwrap()
                    <= g.chunk_order
            );
            assert_eq!(g.check(), Ok(()));
        }
        assert!(Geometry::new(0, 1 << 20).is_none());
        assert!(Geometry::new(MAX_CAPACITY + 1, 1 << 20).is_none());
    }

    #[test]
    fn entry_round_trips() {
        let e = Entry::new(0xdead_beef, 17, 0xabcd_0000_0000_0000);
        assert_eq!(e.granule(), 0xdead_beef);
        assert_eq!(e.order(), 17);
        assert_eq!(e.tag(), 0xabcd);
        assert_ne!(Entry::new(0, 0, 0).0, Entry::EMPTY);
    }

    #[test]
    fn orders() {
        assert_eq!(order_for(0, 0), Some(0));
        assert_eq!(order_for(16, 32), Some(0));
        assert_eq!(order_for(16, 33), Some(1));
        assert_eq!(order_for(8, 32), Some(0));
        assert_eq!(order_for(8, 33), Some(1), "the key is padded to 16 bytes");
        assert_eq!(order_for(16, 64), Some(1));
        assert_eq!(order_for(16, 1024), Some(5));
    }

    #[test]
    fn hash_is_pinned() {
        // The hash is part of the on-segment format: this value must never change.
        assert_eq!(hash_key(b""), 0x2d06800538d394c2);
    }

    #[test]
    fn header_round_trip_and_rejects_garbage() {
        let g = Geometry::new(100, 1 << 16).unwrap();
        let r = Region::heap(HEADER_BYTES as usize);
        g.write_header(&r).unwrap();
        assert_eq!(Geometry::read_header(&r, g.total_bytes).unwrap(), g);
        assert!(matches!(
            Geometry::read_header(&r, g.total_bytes - 4096),
            Err(HeaderError::Corrupt(_))
        ));
        r.word(H_NBUCKETS).unwrap().store(3, Ordering::Relaxed);
        assert!(matches!(
            Geometry::read_header(&r, g.total_bytes),
            Err(HeaderError::Corrupt(_))
        ));
        r.word(H_VERSION_KIND).unwrap().store(2, Ordering::Relaxed);
        assert!(matches!(
            Geometry::read_header(&r, g.total_bytes),
            Err(HeaderError::Incompatible(_))
        ));
        // A segment of the previous format (before growth) is refused,
        // naming both versions.
        r.word(H_NBUCKETS)
            .unwrap()
            .store(g.nbuckets, Ordering::Relaxed);
        r.word(H_VERSION_KIND)
            .unwrap()
            .store(4 | (KIND_DICT as u64) << 32, Ordering::Relaxed);
        match Geometry::read_header(&r, g.total_bytes) {
            Err(HeaderError::Incompatible(m)) => {
                assert!(m.contains("version 4") && m.contains("version 5"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }
}
