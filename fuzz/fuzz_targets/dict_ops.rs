//! Differential fuzzing of `ShmDict` against a `HashMap` model, with injected
//! faults.
//!
//! Each input is a small dictionary geometry and a list of operations over a
//! key space of eight keys (empty, short, 100-byte and 4 KiB keys) with values
//! of random lengths. The capacity (1 to 8 keys) and the arena (64 to 127 KiB)
//! are small, so both kinds of `Full` are hit often. Half the inputs (the
//! high bit of `capacity`) use a dictionary that grows instead (issue 12):
//! the same sizes are then its initial ones, so its index doubles and its
//! arena extends many times, under the same faults and borrowed reads.
//!
//! Until the first fault, every result must agree with the model:
//! - `Full` leaves the model unchanged, and, for a fixed size, a new key
//!   beyond `capacity` must be `Full` (a growing dictionary gives `Full` only
//!   while borrowed reads hold memory);
//! - after removing every key, a 4 KiB key with a value of 1/8 of the arena
//!   must fit (the contract's size promise; exercises defragmentation).
//!
//! Borrowed reads run beside all of it: `get_ref`, `Reader::get` through a
//! `Reader` that stays pinned across other operations (on a second handle
//! of the same segment), a window of held `ValueRef`s whose bytes must not
//! change whatever is written, and a `ValueRef` held across an overwrite
//! of its own key by its own handle. While anything is pinned, memory of
//! replaced values waits for it, so a write may be `Full` (which leaves the
//! model unchanged); `check()` must still repair nothing.
//!
//! A fault overwrites bytes of the segment file `/dev/shm/<name>` behind the
//! library's back (through `std::fs`, which the mapping sees). From then on
//! results are not compared: operations keep running and may return any
//! error (`Corrupt`, `Full`, `Codec`, ...), but must not panic, crash or hang.
//! Faults also hit the stashes of the first handles (pin slots, retired
//! blocks), so borrowed reads and pins run on garbage too.
//!
//! The segment is unlinked at the end of every input, and also if the target
//! panics (so a crash found by the fuzzer leaves nothing in /dev/shm).
#![no_main]

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use shmdict::{Error, Reader, ShmDict, ValueRef};

/// Number of distinct keys.
const KEYS: u8 = 8;
/// The longest key the contract promises always fits.
const MAX_KEY: usize = 4096;
/// Where the stash table starts in the current format (header 4 KiB, attach
/// table 256 KiB, free-list table 8 KiB, key-lock table 16 KiB, futex
/// channels 4 KiB), and where the index starts (after 4,096 stashes of 1 KiB).
/// Only used to aim faults; nothing depends on them being right.
const STASH_OFF_HINT: u64 = 4096 + 4096 * 64 + 32 * 4 * 64 + 256 * 64 + 1024 * 4;
const INDEX_OFF_HINT: u64 = STASH_OFF_HINT + 4096 * 1024;
/// The stashes faults aim at: those of the first eight attach entries (the
/// handles one input opens).
const STASHES_HINT: u64 = 8 * 1024;
/// `ValueRef`s held at once across operations (more than a handle's four
/// pin slots, so pins join busy slots).
const HELD_REFS: usize = 6;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Capacity is `1 + capacity % 8`; the dictionary grows if
    /// `capacity >= 128`, else it has a fixed size.
    capacity: u8,
    /// Arena is `64 + arena_kib % 64` KiB.
    arena_kib: u8,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Insert {
        key: u8,
        value: Value,
    },
    Get {
        key: u8,
    },
    GetInto {
        key: u8,
        junk: u8,
    },
    Remove {
        key: u8,
    },
    Contains {
        key: u8,
    },
    Update {
        key: u8,
        how: How,
    },
    /// `typed::<u64>().update(+1)`, then `typed::<u64>().get`.
    Counter {
        key: u8,
    },
    Len,
    Keys,
    Stats,
    /// Opens a second handle by name and continues with it (the first is
    /// dropped afterwards).
    Reopen,
    /// Removes every key, then inserts the 4 KiB key with a value of 1/8 of
    /// the arena: that must fit.
    ClearThenBig,
    /// Overwrites bytes of the segment file.
    Fault(Fault),
    /// `check()`: on an intact segment it must find nothing to repair (a
    /// leaked block or a wrong counter would be a bug in an error path).
    Check,
    /// `lock()`, then `lock_keys` of two keys, an overwrite under them.
    Locked {
        a: u8,
        b: u8,
        value: Value,
    },
    /// `wait_for` with a zero timeout: the same as `get`.
    WaitFor {
        key: u8,
    },
    /// `get_or_insert_with`.
    Memo {
        key: u8,
        value: Value,
    },
    /// `get_ref`: the same bytes as the model.
    GetRef {
        key: u8,
    },
    /// `Reader::get` through the pinned `Reader` if there is one (see
    /// `Pin`), else through a new one.
    ReaderGet {
        key: u8,
    },
    /// Takes the pinned `Reader` (on the second handle), or drops it.
    Pin,
    /// Holds a `ValueRef` (on the second handle) across the operations that
    /// follow; the oldest is dropped past `HELD_REFS`. Their bytes must
    /// never change.
    HoldRef {
        key: u8,
    },
    /// Drops every held `ValueRef`.
    DropRefs,
    /// `get_ref`, an overwrite of the same key by the same handle, and the
    /// ref's bytes unchanged.
    RefAcrossWrite {
        key: u8,
        value: Value,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Len {
    Tiny(u8),
    Small(u16),
    Large(u16),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Value {
    len: Len,
    fill: u8,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum How {
    Remove,
    Keep,
    Set(Value),
    Append(Value),
    Truncate(u16),
}

#[derive(Arbitrary, Debug)]
enum Area {
    Header,
    AttachTable,
    Index,
    Arena,
    Anywhere,
    /// The stashes of the first handles (pin slots, retired-block rings).
    Stashes,
}

#[derive(Arbitrary, Debug)]
enum Fault {
    /// Writes up to 16 arbitrary bytes at a byte offset in `area`.
    Bytes {
        area: Area,
        offset: u32,
        bytes: Vec<u8>,
    },
    /// Writes one 8-byte-aligned word, shaped like the words the segment
    /// holds (lengths, offsets, lock words owned by a token).
    Word { area: Area, offset: u32, word: Word },
}

#[derive(Arbitrary, Debug)]
enum Word {
    Raw(u64),
    Small(u8),
    /// Bit 63 (a lock word's HELD) with a 23-bit owner token.
    HeldBy(u32),
    /// Bit 0 (a slot's WRITING) with a token in bits 1..24 and a version.
    WritingBy(u32, u16),
    /// Two 32-bit halves, like a block's key and value lengths.
    Lengths(u16, u16),
}

impl Len {
    fn get(self) -> usize {
        match self {
            Len::Tiny(n) => usize::from(n % 64),
            Len::Small(n) => usize::from(n % 1024),
            // Up to ~20 KB: beyond the largest block of the smallest arena.
            Len::Large(n) => usize::from(n) % 20_000,
        }
    }
}

impl Value {
    fn bytes(self) -> Vec<u8> {
        let n = self.len.get();
        (0..n)
            .map(|i| self.fill.wrapping_add((i as u8).wrapping_mul(31)))
            .collect()
    }
}

impl How {
    /// The update closure's decision, applied identically to the dictionary
    /// and the model.
    fn apply(self, old: Option<&[u8]>) -> Option<Vec<u8>> {
        match self {
            How::Remove => None,
            How::Keep => old.map(<[u8]>::to_vec),
            How::Set(v) => Some(v.bytes()),
            How::Append(v) => {
                let mut out = old.map(<[u8]>::to_vec).unwrap_or_default();
                out.extend(v.bytes());
                Some(out)
            }
            How::Truncate(n) => old.map(|o| o[..o.len().min(usize::from(n))].to_vec()),
        }
    }
}

fn key(k: u8) -> Vec<u8> {
    match k % KEYS {
        0 => Vec::new(),
        6 => (0..100u8).collect(),
        7 => vec![b'K'; MAX_KEY],
        i => format!("key-{i}").into_bytes(),
    }
}

/// How `Typed<u64>` decodes a stored value: postcard, and nothing may follow
/// the encoded value.
fn decode_u64(bytes: &[u8]) -> Result<u64, postcard::Error> {
    match postcard::take_from_bytes::<u64>(bytes)? {
        (n, []) => Ok(n),
        _ => Err(postcard::Error::DeserializeBadEncoding),
    }
}

/// The segment of the input being run, so a panic can unlink it.
static CURRENT: Mutex<Option<String>> = Mutex::new(None);
static HOOK: Once = Once::new();
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Chains a panic hook in front of libfuzzer-sys's (which aborts): unlink the
/// current segment first.
fn install_unlink_hook() {
    HOOK.call_once(|| {
        let next = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(cur) = CURRENT.try_lock() {
                if let Some(name) = cur.as_deref() {
                    let _ = ShmDict::unlink(name);
                }
            }
            next(info);
        }));
    });
}

fn is_full(r: &Result<impl Sized, Error>) -> bool {
    matches!(r, Err(Error::Full { .. }))
}

struct Run {
    name: String,
    dict: ShmDict,
    model: HashMap<Vec<u8>, Vec<u8>>,
    capacity: usize,
    arena_bytes: usize,
    /// Set by the first fault: stop comparing with the model.
    faulted: bool,
    file: Option<File>,
    segment_len: u64,
    buckets: u64,
    /// The arena's real size (the requested size rounded up to whole
    /// chunks; for a growing dictionary, its reservation).
    arena_real: u64,
    /// Whether the dictionary grows (`fixed_size(false)`).
    grows: bool,
}

impl Run {
    /// Checks a write that may create `k`: `Full` only leaves the model
    /// unchanged, and a new key beyond capacity must be `Full`.
    fn check_new_key_full<T: std::fmt::Debug>(&self, k: &[u8], r: &Result<T, Error>) {
        if !self.grows && !self.model.contains_key(k) && self.model.len() >= self.capacity {
            assert!(
                is_full(r),
                "new key past capacity {}: expected Full, got {r:?}",
                self.capacity
            );
        }
    }

    fn step(&mut self, op: Op) {
        if self.faulted {
            self.step_unchecked(op);
            return;
        }
        match op {
            Op::Insert { key: k, value } => {
                let (k, v) = (key(k), value.bytes());
                let r = self.dict.insert(&k, &v);
                self.check_new_key_full(&k, &r);
                match r {
                    Ok(()) => {
                        self.model.insert(k, v);
                    }
                    Err(Error::Full { .. }) => {}
                    Err(e) => panic!("insert: unexpected error {e}"),
                }
            }
            Op::Get { key: k } => {
                let k = key(k);
                let got = self.dict.get(&k).expect("get");
                assert_eq!(got.as_ref(), self.model.get(&k), "get");
            }
            Op::GetInto { key: k, junk } => {
                let k = key(k);
                let mut buf = vec![junk; usize::from(junk)];
                let found = self.dict.get_into(&k, &mut buf).expect("get_into");
                match self.model.get(&k) {
                    Some(v) => assert!(found && &buf == v, "get_into"),
                    None => assert!(!found, "get_into found a removed key"),
                }
            }
            Op::Remove { key: k } => {
                let k = key(k);
                let was = self.dict.remove(&k).expect("remove");
                assert_eq!(was, self.model.remove(&k).is_some(), "remove");
            }
            Op::Contains { key: k } => {
                let k = key(k);
                let has = self.dict.contains_key(&k).expect("contains_key");
                assert_eq!(has, self.model.contains_key(&k), "contains_key");
            }
            Op::Update { key: k, how } => {
                let k = key(k);
                let expected_old = self.model.get(&k).cloned();
                let mut decided = None;
                let r = self.dict.update(&k, |old| {
                    assert_eq!(old, expected_old.as_deref(), "update saw another value");
                    decided = Some(how.apply(old));
                    decided.clone().unwrap()
                });
                let decided = decided.expect("update never called its closure");
                if decided.is_some() {
                    self.check_new_key_full(&k, &r);
                }
                match r {
                    Ok(stored) => {
                        assert_eq!(stored, decided, "update returned another value");
                        match decided {
                            Some(v) => self.model.insert(k, v),
                            None => self.model.remove(&k),
                        };
                    }
                    Err(Error::Full { .. }) => {
                        assert!(decided.is_some(), "update: Full while removing")
                    }
                    Err(e) => panic!("update: unexpected error {e}"),
                }
            }
            Op::Counter { key: k } => {
                let k = key(k);
                let typed = self.dict.typed::<u64>();
                let old = self.model.get(&k).map(|b| decode_u64(b));
                let r = typed.update(&k, |v| Some(v.unwrap_or(0).wrapping_add(1)));
                match old {
                    Some(Err(_)) => {
                        assert!(
                            matches!(r, Err(Error::Codec { .. })),
                            "counter over a non-u64 value: {r:?}"
                        );
                    }
                    Some(Ok(_)) | None => {
                        self.check_new_key_full(&k, &r);
                        let n = old.map_or(0, |o| o.unwrap()).wrapping_add(1);
                        match r {
                            Ok(stored) => {
                                assert_eq!(stored, Some(n), "counter");
                                self.model
                                    .insert(k.clone(), postcard::to_allocvec(&n).unwrap());
                            }
                            Err(Error::Full { .. }) => {}
                            Err(e) => panic!("counter: unexpected error {e}"),
                        }
                    }
                }
                let expect = self.model.get(&k).map(|b| decode_u64(b));
                match (typed.get(&k), expect) {
                    (Ok(got), None) => assert_eq!(got, None, "typed get"),
                    (Ok(got), Some(Ok(n))) => assert_eq!(got, Some(n), "typed get"),
                    (Err(Error::Codec { .. }), Some(Err(_))) => {}
                    (got, expect) => panic!("typed get: {got:?}, model {expect:?}"),
                }
            }
            Op::Len => {
                assert_eq!(self.dict.len(), self.model.len(), "len");
                assert_eq!(self.dict.is_empty(), self.model.is_empty(), "is_empty");
            }
            Op::Keys => {
                let mut got = self.dict.keys().expect("keys");
                got.sort();
                let mut want: Vec<_> = self.model.keys().cloned().collect();
                want.sort();
                assert_eq!(got, want, "keys");
            }
            Op::Stats => {
                let s = self.dict.stats();
                assert_eq!(s.len, self.model.len(), "stats.len");
                if self.grows {
                    assert!(s.capacity >= self.capacity, "stats.capacity");
                    assert!(s.len <= s.capacity, "stats.len within capacity");
                } else {
                    assert_eq!(s.capacity, self.capacity, "stats.capacity");
                }
            }
            Op::Reopen => {
                let other = ShmDict::open(&self.name).expect("reopen");
                assert_eq!(other.len(), self.model.len(), "len after reopen");
                self.dict = other;
            }
            Op::ClearThenBig => {
                let keys: Vec<_> = self.model.keys().cloned().collect();
                for k in keys {
                    assert!(self.dict.remove(&k).expect("remove"), "remove a live key");
                }
                self.model.clear();
                assert!(self.dict.is_empty(), "empty after removing every key");
                let (k, v) = (key(7), vec![0xA5; self.arena_bytes / 8]);
                if let Err(e) = self.dict.insert(&k, &v) {
                    panic!(
                        "a {}-byte key and a {}-byte value must fit an empty arena of {} bytes: {e}",
                        k.len(),
                        v.len(),
                        self.arena_bytes
                    );
                }
                self.model.insert(k, v);
            }
            Op::Fault(f) => self.fault(f),
            Op::Check => {
                let r = self.dict.check().expect("check");
                assert!(r.is_ok(), "check of an intact segment: {r}");
                assert!(r.skipped.is_none(), "check skipped: {r}");
                assert!(!r.repaired(), "check repaired an intact segment: {r}");
                assert_eq!(r.keys as usize, self.model.len(), "check: keys");
            }
            Op::Locked { a, b, value } => {
                let g = self.dict.lock().expect("lock");
                assert!(!g.recovered(), "nobody died holding the lock");
                let keys = self.dict.lock_keys(&[key(a), key(b)]).expect("lock_keys");
                assert!(!keys.recovered(), "nobody died holding key locks");
                let k = key(a);
                let r = self.dict.insert(&k, value.bytes());
                self.check_new_key_full(&k, &r);
                match r {
                    Ok(()) => {
                        self.model.insert(k, value.bytes());
                    }
                    Err(Error::Full { .. }) => {}
                    Err(e) => panic!("insert under locks: {e}"),
                }
            }
            Op::WaitFor { key: k } => {
                let k = key(k);
                let got = self.dict.wait_for(&k, Duration::ZERO).expect("wait_for");
                assert_eq!(got.as_ref(), self.model.get(&k), "wait_for");
            }
            Op::GetRef { .. }
            | Op::ReaderGet { .. }
            | Op::Pin
            | Op::HoldRef { .. }
            | Op::DropRefs
            | Op::RefAcrossWrite { .. } => unreachable!("run by Borrows::step"),
            Op::Memo { key: k, value } => {
                let k = key(k);
                let r = self.dict.get_or_insert_with(&k, || value.bytes());
                match (r, self.model.get(&k)) {
                    (Ok(got), Some(v)) => assert_eq!(&got, v, "memo of a present key"),
                    (Ok(got), None) => {
                        assert_eq!(got, value.bytes(), "memo computed");
                        self.model.insert(k, got);
                    }
                    (Err(Error::Full { .. }), None) => {}
                    (r, m) => panic!("memo: {r:?} with model {m:?}"),
                }
            }
        }
    }

    /// After a fault: run the operation, accept any result.
    fn step_unchecked(&mut self, op: Op) {
        match op {
            Op::Insert { key: k, value } => {
                let _ = self.dict.insert(key(k), value.bytes());
            }
            Op::Get { key: k } => {
                let _ = self.dict.get(key(k));
            }
            Op::GetInto { key: k, junk } => {
                let mut buf = vec![junk; usize::from(junk)];
                let _ = self.dict.get_into(key(k), &mut buf);
            }
            Op::Remove { key: k } => {
                let _ = self.dict.remove(key(k));
            }
            Op::Contains { key: k } => {
                let _ = self.dict.contains_key(key(k));
            }
            Op::Update { key: k, how } => {
                let _ = self.dict.update(key(k), |old| how.apply(old));
            }
            Op::Counter { key: k } => {
                let typed = self.dict.typed::<u64>();
                let _ = typed.update(key(k), |v| Some(v.unwrap_or(0).wrapping_add(1)));
                let _ = typed.get(key(k));
            }
            Op::Len => {
                let _ = (self.dict.len(), self.dict.is_empty());
            }
            Op::Keys => {
                let _ = self.dict.keys();
            }
            Op::Stats => {
                let _ = self.dict.stats();
            }
            Op::Reopen => {
                if let Ok(other) = ShmDict::open(&self.name) {
                    let _ = other.len();
                    self.dict = other;
                }
            }
            Op::ClearThenBig => {
                if let Ok(keys) = self.dict.keys() {
                    for k in keys {
                        let _ = self.dict.remove(k);
                    }
                }
                let _ = self.dict.insert(key(7), vec![0xA5; self.arena_bytes / 8]);
            }
            Op::Fault(f) => self.fault(f),
            Op::Check => {
                let _ = self.dict.check();
            }
            Op::Locked { a, b, value } => {
                if let Ok(_g) = self.dict.lock() {
                    if let Ok(_k) = self.dict.lock_keys(&[key(a), key(b)]) {
                        let _ = self.dict.insert(key(a), value.bytes());
                    }
                }
            }
            Op::WaitFor { key: k } => {
                let _ = self.dict.wait_for(key(k), Duration::ZERO);
            }
            Op::Memo { key: k, value } => {
                let _ = self.dict.get_or_insert_with(key(k), || value.bytes());
            }
            Op::GetRef { .. }
            | Op::ReaderGet { .. }
            | Op::Pin
            | Op::HoldRef { .. }
            | Op::DropRefs
            | Op::RefAcrossWrite { .. } => unreachable!("run by Borrows::step"),
        }
    }

    fn fault(&mut self, f: Fault) {
        self.faulted = true;
        let file = self.file.get_or_insert_with(|| {
            File::options()
                .write(true)
                .open(format!("/dev/shm/{}", self.name))
                .expect("open the segment file")
        });
        let (area, at, bytes) = match f {
            Fault::Bytes {
                area,
                offset,
                mut bytes,
            } => {
                bytes.truncate(16);
                (area, u64::from(offset), bytes)
            }
            Fault::Word { area, offset, word } => {
                let w = match word {
                    Word::Raw(w) => w,
                    Word::Small(n) => u64::from(n),
                    Word::HeldBy(t) => 1 << 63 | u64::from(t & 0x7f_ffff),
                    Word::WritingBy(t, v) => 1 | u64::from(t & 0x7f_ffff) << 1 | u64::from(v) << 24,
                    Word::Lengths(k, v) => u64::from(k) | u64::from(v) << 32,
                };
                (area, u64::from(offset) & !7, w.to_ne_bytes().to_vec())
            }
        };
        let (start, size) = Run::area_of(self.segment_len, self.buckets, self.arena_real, &area);
        let at = start + at % size;
        // Never write past the end: growing the file is not the fault under test.
        let room = (self.segment_len - at) as usize;
        let bytes = &bytes[..bytes.len().min(room)];
        file.write_all_at(bytes, at)
            .expect("write the segment file");
    }

    /// The byte range (start, size) of an area of a segment of `len` bytes.
    fn area_of(len: u64, buckets: u64, arena: u64, area: &Area) -> (u64, u64) {
        let index_len = buckets * 64;
        let arena_off = len.saturating_sub(arena);
        let (start, size) = match area {
            Area::Header => (0, 4096),
            Area::AttachTable => (4096, STASH_OFF_HINT - 4096),
            Area::Stashes => (STASH_OFF_HINT, STASHES_HINT),
            Area::Index => (INDEX_OFF_HINT, index_len),
            Area::Arena => (arena_off, arena),
            Area::Anywhere => (0, len),
        };
        let start = start.min(len - 1);
        (start, size.clamp(1, len - start))
    }
}

/// The borrowed reads held across operations: a pinned `Reader` and a
/// window of `ValueRef`s, on a second handle of the segment (so that
/// `Reopen` can replace the first while they live).
struct Borrows<'p> {
    handle: &'p ShmDict,
    pinned: Option<Reader<'p>>,
    /// Key, the held ref, and a copy of its bytes when taken.
    held: VecDeque<(Vec<u8>, ValueRef<'p>, Vec<u8>)>,
}

impl<'p> Borrows<'p> {
    fn step(&mut self, run: &mut Run, op: Op) {
        let faulted = run.faulted;
        // Before the first fault: any error is a bug.
        let ok = |what: &str, e: Error| {
            if !faulted {
                panic!("{what}: unexpected error {e}");
            }
        };
        match op {
            Op::GetRef { key: k } => {
                let k = key(k);
                match run.dict.get_ref(&k) {
                    Ok(got) if !faulted => {
                        assert_eq!(
                            got.as_deref(),
                            run.model.get(&k).map(Vec::as_slice),
                            "get_ref"
                        )
                    }
                    Ok(_) => {}
                    Err(e) => ok("get_ref", e),
                }
            }
            Op::ReaderGet { key: k } => {
                let k = key(k);
                let copy = |b: Option<&[u8]>| b.map(<[u8]>::to_vec);
                let got = match &self.pinned {
                    Some(r) => r.get(&k).map(copy),
                    None => run.dict.reader().and_then(|r| r.get(&k).map(copy)),
                };
                match got {
                    Ok(got) if !faulted => {
                        assert_eq!(got.as_ref(), run.model.get(&k), "Reader::get")
                    }
                    Ok(_) => {}
                    Err(e) => ok("Reader::get", e),
                }
            }
            Op::Pin => {
                if self.pinned.take().is_none() {
                    match self.handle.reader() {
                        Ok(r) => self.pinned = Some(r),
                        Err(e) => ok("reader", e),
                    }
                }
            }
            Op::HoldRef { key: k } => {
                let k = key(k);
                match self.handle.get_ref(&k) {
                    Ok(Some(v)) => {
                        if !faulted {
                            assert_eq!(Some(&*v), run.model.get(&k).map(Vec::as_slice), "held ref");
                        }
                        let copy = v.to_vec();
                        self.held.push_back((k, v, copy));
                        if self.held.len() > HELD_REFS {
                            self.held.pop_front();
                        }
                    }
                    Ok(None) => assert!(faulted || !run.model.contains_key(&k), "held ref: none"),
                    Err(e) => ok("get_ref to hold", e),
                }
            }
            Op::DropRefs => {
                self.verify(faulted);
                self.held.clear();
            }
            Op::RefAcrossWrite { key: k, value } => {
                let (k, v) = (key(k), value.bytes());
                match run.dict.get_ref(&k) {
                    Ok(r) => {
                        let before = r.as_deref().map(<[u8]>::to_vec);
                        let w = run.dict.insert(&k, &v);
                        if !faulted {
                            run.check_new_key_full(&k, &w);
                            match w {
                                Ok(()) => {
                                    run.model.insert(k.clone(), v);
                                }
                                Err(Error::Full { .. }) => {}
                                Err(e) => panic!("insert under its own ref: {e}"),
                            }
                            assert_eq!(
                                r.as_deref().map(<[u8]>::to_vec),
                                before,
                                "a ref changed when its own handle overwrote its key"
                            );
                        }
                    }
                    Err(e) => ok("get_ref", e),
                }
            }
            other => unreachable!("{other:?} is run by Run::step"),
        }
    }

    /// The held refs' bytes never changed (compared only before the first
    /// fault: a fault may overwrite the very bytes a ref holds).
    fn verify(&self, faulted: bool) {
        if faulted {
            return;
        }
        for (k, v, copy) in &self.held {
            assert_eq!(
                &v[..],
                &copy[..],
                "a held ref of a {}-byte key changed",
                k.len()
            );
        }
    }

    /// Drops every pin (before an operation that needs all memory back).
    fn release(&mut self, faulted: bool) {
        self.verify(faulted);
        self.held.clear();
        self.pinned = None;
    }

    fn pins(&self) -> u64 {
        u64::from(self.pinned.is_some()) + self.held.len() as u64
    }
}

fuzz_target!(|input: Input| {
    install_unlink_hook();
    let name = format!(
        "shmdict-fuzz-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    *CURRENT.lock().unwrap() = Some(name.clone());
    let capacity = 1 + usize::from(input.capacity % 8);
    let grows = input.capacity >= 128;
    let arena_bytes = (64 + usize::from(input.arena_kib % 64)) * 1024;
    let dict = ShmDict::options()
        .capacity(capacity)
        .arena_bytes(arena_bytes)
        .fixed_size(!grows)
        .create_new(true)
        .open(&name)
        .expect("create a fresh segment");
    let stats = dict.stats();
    let segment_len = std::fs::metadata(format!("/dev/shm/{name}"))
        .expect("segment file")
        .len();
    let mut run = Run {
        name: name.clone(),
        dict,
        model: HashMap::new(),
        capacity,
        arena_bytes,
        faulted: false,
        file: None,
        segment_len,
        buckets: stats.buckets as u64,
        arena_real: stats.arena_bytes as u64,
        grows,
    };
    let second = ShmDict::open(&name).expect("a second handle");
    let mut borrows = Borrows {
        handle: &second,
        pinned: None,
        held: VecDeque::new(),
    };
    for op in input.ops {
        let stats = matches!(op, Op::Stats);
        match op {
            Op::GetRef { .. }
            | Op::ReaderGet { .. }
            | Op::Pin
            | Op::HoldRef { .. }
            | Op::DropRefs
            | Op::RefAcrossWrite { .. } => borrows.step(&mut run, op),
            Op::ClearThenBig => {
                // Its size promise holds with nothing pinned.
                borrows.release(run.faulted);
                run.step(op);
            }
            op => run.step(op),
        }
        borrows.verify(run.faulted);
        if stats && !run.faulted {
            assert_eq!(run.dict.stats().pins, borrows.pins(), "stats.pins");
        }
    }
    drop(borrows);
    drop(second);
    drop(run);
    ShmDict::unlink(&name).expect("unlink");
    *CURRENT.lock().unwrap() = None;
});
