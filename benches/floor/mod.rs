//! The floor: a hand-written fixed-slot seqlock hash table in shared memory.
//!
//! It is what a shared-memory dictionary costs with everything that makes
//! shmdict general taken away: 16-byte keys and 64-byte values stored inline
//! in fixed slots (no arena, no allocation, no copy-on-write), open
//! addressing with linear probing, and one sequence word per slot. Readers
//! load the slot's words with atomic loads and retry if the sequence word
//! changed or was odd; a writer makes the sequence odd with a CAS, stores
//! the words, and makes it even again with a release store.
//!
//! It is deliberately not a general dictionary: values are exactly 64
//! bytes, the table never grows, removal leaves a tombstone, and two
//! processes inserting the same *new* key at the same instant could both
//! claim a slot (the benchmarks only overwrite, or remove and re-insert from
//! one writer). A writer killed in the middle of a write leaves its slot
//! locked forever. Those are exactly the things shmdict pays to handle.
#![allow(dead_code)] // Each benchmark uses a different subset.

use std::fs::{File, OpenOptions};
use std::hint::spin_loop;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{fence, AtomicU64, Ordering};

use memmap2::MmapRaw;

/// Value length in bytes: the only one the floor supports.
pub(crate) const VALUE_LEN: usize = 64;
const VALUE_WORDS: usize = VALUE_LEN / 8;

// A slot is 12 words (96 bytes): sequence, state, key (2), value (8).
const SEQ: usize = 0;
const STATE: usize = 1;
const KEY: usize = 2;
const VALUE: usize = 4;
const SLOT_WORDS: usize = VALUE + VALUE_WORDS;

const EMPTY: u64 = 0;
const LIVE: u64 = 1;
const DELETED: u64 = 2;

/// A fixed-slot seqlock table in a /dev/shm file, unlinked on drop by the
/// process that created it.
pub(crate) struct Floor {
    map: MmapRaw,
    /// Number of slots, a power of two.
    slots: usize,
    /// The file to unlink on drop, for the creator only.
    owned: Option<PathBuf>,
}

fn path(name: &str) -> PathBuf {
    PathBuf::from(format!("/dev/shm/{name}"))
}

fn split_key(key: &[u8; 16]) -> (u64, u64) {
    let (a, b) = key.split_at(8);
    (
        u64::from_le_bytes(a.try_into().expect("8 bytes")),
        u64::from_le_bytes(b.try_into().expect("8 bytes")),
    )
}

/// What a consistent read of a slot saw.
struct Snapshot {
    seq: u64,
    state: u64,
    matches: bool,
}

impl Floor {
    /// Creates the table `name` with room for `slots` slots (rounded up to
    /// a power of two); fails if the name exists.
    pub(crate) fn create(name: &str, slots: usize) -> std::io::Result<Floor> {
        let slots = slots.next_power_of_two();
        let path = path(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        // Zero bytes: every slot EMPTY with sequence 0. /dev/shm commits
        // pages only as they are touched.
        file.set_len((slots * SLOT_WORDS * 8) as u64)?;
        let mut floor = Floor::map(&file)?;
        floor.owned = Some(path);
        Ok(floor)
    }

    /// Attaches to the table `name` created by another process.
    pub(crate) fn open(name: &str) -> std::io::Result<Floor> {
        let file = OpenOptions::new().read(true).write(true).open(path(name))?;
        Floor::map(&file)
    }

    fn map(file: &File) -> std::io::Result<Floor> {
        let map = MmapRaw::map_raw(file)?;
        let slots = map.len() / (SLOT_WORDS * 8);
        assert!(slots.is_power_of_two(), "a floor table of whole slots");
        Ok(Floor {
            map,
            slots,
            owned: None,
        })
    }

    /// The words of slot `i`.
    #[inline]
    fn slot(&self, i: usize) -> &[AtomicU64; SLOT_WORDS] {
        assert!(i < self.slots);
        // SAFETY: the mapping is page-aligned and `slots * SLOT_WORDS * 8`
        // bytes long (checked in `map`), so slot `i < slots` is in bounds and
        // 8-byte aligned; `AtomicU64` has the size and alignment of `u64` on
        // the targets shmdict supports (x86-64, aarch64); the mapping lives
        // as long as `self`; and every process touches these bytes only
        // through atomics, so no non-atomic reference to them exists.
        unsafe {
            &*(self
                .map
                .as_mut_ptr()
                .cast::<[AtomicU64; SLOT_WORDS]>()
                .add(i))
        }
    }

    #[inline]
    fn home(&self, key: &[u8; 16]) -> usize {
        xxhash_rust::xxh3::xxh3_64(key) as usize & (self.slots - 1)
    }

    /// Reads slot `i` consistently; copies the value into `out` if the slot
    /// holds `key` and `out` is given.
    #[inline]
    fn snapshot(
        &self,
        i: usize,
        key: (u64, u64),
        mut out: Option<&mut [u8; VALUE_LEN]>,
    ) -> Snapshot {
        let s = self.slot(i);
        loop {
            let seq = s[SEQ].load(Ordering::Acquire);
            if seq & 1 == 1 {
                spin_loop();
                continue;
            }
            let state = s[STATE].load(Ordering::Relaxed);
            let matches = state == LIVE
                && s[KEY].load(Ordering::Relaxed) == key.0
                && s[KEY + 1].load(Ordering::Relaxed) == key.1;
            let mut words = [0u64; VALUE_WORDS];
            if matches && out.is_some() {
                for (w, a) in words.iter_mut().zip(&s[VALUE..]) {
                    *w = a.load(Ordering::Relaxed);
                }
            }
            // Orders the loads above before the check of the sequence.
            fence(Ordering::Acquire);
            if s[SEQ].load(Ordering::Relaxed) != seq {
                continue;
            }
            if matches {
                if let Some(out) = out.as_deref_mut() {
                    for (chunk, w) in out.chunks_exact_mut(8).zip(words) {
                        chunk.copy_from_slice(&w.to_le_bytes());
                    }
                }
            }
            return Snapshot {
                seq,
                state,
                matches,
            };
        }
    }

    /// Locks slot `i` if its sequence is still `seq`, runs `write` on its
    /// words and unlocks it. False if the slot changed since `seq` was read.
    #[inline]
    fn write_if_unchanged(&self, i: usize, seq: u64, write: impl FnOnce(&[AtomicU64])) -> bool {
        let s = self.slot(i);
        if s[SEQ]
            .compare_exchange(seq, seq + 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        // A reader that sees any store below also sees the odd sequence.
        fence(Ordering::Release);
        write(s);
        s[SEQ].store(seq + 2, Ordering::Release);
        true
    }

    /// Copies the value of `key` into `out`; false if absent.
    pub(crate) fn get_into(&self, key: &[u8; 16], out: &mut [u8; VALUE_LEN]) -> bool {
        let k = split_key(key);
        let mut i = self.home(key);
        for _ in 0..self.slots {
            let snap = self.snapshot(i, k, Some(out));
            if snap.matches {
                return true;
            }
            if snap.state == EMPTY {
                return false;
            }
            i = (i + 1) & (self.slots - 1);
        }
        false
    }

    /// Inserts or overwrites `key`. Panics when the table is full.
    pub(crate) fn insert(&self, key: &[u8; 16], value: &[u8; VALUE_LEN]) {
        let k = split_key(key);
        let store_value = |s: &[AtomicU64]| {
            for (a, chunk) in s[VALUE..].iter().zip(value.chunks_exact(8)) {
                a.store(
                    u64::from_le_bytes(chunk.try_into().expect("8 bytes")),
                    Ordering::Relaxed,
                );
            }
        };
        'retry: loop {
            let mut i = self.home(key);
            let mut free = None;
            for _ in 0..self.slots {
                let snap = self.snapshot(i, k, None);
                if snap.matches {
                    if self.write_if_unchanged(i, snap.seq, store_value) {
                        return;
                    }
                    continue 'retry;
                }
                if snap.state == DELETED && free.is_none() {
                    free = Some((i, snap.seq));
                }
                if snap.state == EMPTY {
                    let (j, seq) = free.unwrap_or((i, snap.seq));
                    let claimed = self.write_if_unchanged(j, seq, |s| {
                        s[KEY].store(k.0, Ordering::Relaxed);
                        s[KEY + 1].store(k.1, Ordering::Relaxed);
                        store_value(s);
                        s[STATE].store(LIVE, Ordering::Relaxed);
                    });
                    if claimed {
                        return;
                    }
                    continue 'retry;
                }
                i = (i + 1) & (self.slots - 1);
            }
            panic!("the floor table is full");
        }
    }

    /// Removes `key`, leaving a tombstone; false if absent.
    pub(crate) fn remove(&self, key: &[u8; 16]) -> bool {
        let k = split_key(key);
        'retry: loop {
            let mut i = self.home(key);
            for _ in 0..self.slots {
                let snap = self.snapshot(i, k, None);
                if snap.matches {
                    if self.write_if_unchanged(i, snap.seq, |s| {
                        s[STATE].store(DELETED, Ordering::Relaxed)
                    }) {
                        return true;
                    }
                    continue 'retry;
                }
                if snap.state == EMPTY {
                    return false;
                }
                i = (i + 1) & (self.slots - 1);
            }
            return false;
        }
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        if let Some(path) = self.owned.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}
