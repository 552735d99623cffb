//! Data and helpers shared by the benchmarks: keys, values, a cursor over
//! a shuffled key order, and a segment that is unlinked when dropped.
#![allow(dead_code)] // Each benchmark uses a different subset.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use shmdict::ShmDict;

/// Number of keys.
pub(crate) const KEYS: usize = 100_000;
/// Key length in bytes.
pub(crate) const KEY_LEN: usize = 16;

pub(crate) type Baseline = RwLock<HashMap<Vec<u8>, Vec<u8>>>;

/// SplitMix64: a fixed, dependency-free generator for keys and the shuffle.
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The keys, in the order they are inserted, and the same keys in the
/// shuffled order the benchmarks visit them.
pub(crate) fn keys() -> (Vec<[u8; KEY_LEN]>, Vec<[u8; KEY_LEN]>) {
    let mut rng = SplitMix(0x5eed);
    let inserted: Vec<[u8; KEY_LEN]> = (0..KEYS as u64)
        .map(|i| {
            // Random-looking first half, unique second half.
            let mut k = [0u8; KEY_LEN];
            k[..8].copy_from_slice(&rng.next().to_le_bytes());
            k[8..].copy_from_slice(&i.to_le_bytes());
            k
        })
        .collect();
    let mut visited = inserted.clone();
    for i in (1..visited.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        visited.swap(i, j);
    }
    (inserted, visited)
}

/// A value of `len` bytes: a little-endian counter (0) then filler.
pub(crate) fn value(len: usize, seed: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len).map(|i| (i + seed) as u8).collect();
    v[..8].copy_from_slice(&0u64.to_le_bytes());
    v
}

/// Adds one to the counter in the first 8 bytes.
pub(crate) fn bump(v: &mut [u8]) {
    let n = u64::from_le_bytes(v[..8].try_into().expect("8 bytes"));
    v[..8].copy_from_slice(&n.wrapping_add(1).to_le_bytes());
}

/// Cycles through the shuffled keys.
pub(crate) struct Cursor<'a> {
    keys: &'a [[u8; KEY_LEN]],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(keys: &'a [[u8; KEY_LEN]]) -> Cursor<'a> {
        Cursor { keys, pos: 0 }
    }

    /// A cursor starting at `pos` (so threads visit different keys).
    pub(crate) fn starting_at(keys: &'a [[u8; KEY_LEN]], pos: usize) -> Cursor<'a> {
        Cursor {
            keys,
            pos: pos % keys.len(),
        }
    }

    #[inline]
    pub(crate) fn next_key(&mut self) -> &'a [u8; KEY_LEN] {
        let k = &self.keys[self.pos];
        self.pos += 1;
        if self.pos == self.keys.len() {
            self.pos = 0;
        }
        k
    }
}

/// A dictionary segment unlinked when dropped (also when a benchmark panics).
pub(crate) struct Segment {
    name: String,
    dict: Option<ShmDict>,
}

impl Segment {
    pub(crate) fn create(label: &str, value_len: usize) -> Segment {
        let name = format!("shmdict-bench-{}-{label}", std::process::id());
        let _ = ShmDict::unlink(&name);
        // Power-of-two blocks: 16 (header) + 16 (key) + value, rounded up.
        let block = (32 + value_len).next_power_of_two().max(64);
        let dict = ShmDict::options()
            .capacity(KEYS + KEYS / 4)
            .arena_bytes(2 * KEYS * block + (64 << 20))
            .create_new(true)
            .open(&name)
            .expect("create the benchmark segment");
        Segment {
            name,
            dict: Some(dict),
        }
    }

    /// The segment's name, for another process to open.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn dict(&self) -> &ShmDict {
        self.dict.as_ref().expect("open until dropped")
    }

    /// Another handle on the same segment, as a second process would have.
    pub(crate) fn open_again(&self) -> ShmDict {
        ShmDict::open(&self.name).expect("attach to the benchmark segment")
    }

    /// Fills the dictionary and a baseline map with the same `KEYS` keys.
    pub(crate) fn populate(&self, inserted: &[[u8; KEY_LEN]], value_len: usize) -> Baseline {
        let base: Baseline = RwLock::new(HashMap::with_capacity(KEYS));
        for (i, k) in inserted.iter().enumerate() {
            let v = value(value_len, i);
            self.dict().insert(k, &v).expect("populate shmdict");
            base.write().unwrap().insert(k.to_vec(), v);
        }
        assert_eq!(self.dict().len(), KEYS);
        base
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        drop(self.dict.take());
        let _ = ShmDict::unlink(&self.name);
    }
}

/// Short runs: 1 s warm-up, 3 s measurement, 20 samples.
pub(crate) fn config() -> criterion::Criterion {
    criterion::Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
}
