//! Model-based property test: random sequences of operations on a
//! dictionary, checked step by step against a `HashMap`.
//!
//! Capacities are small (1 to 64 keys) and arenas small (64 to 256 KiB), and
//! values range up to 20 KiB, so sequences hit `Full` both for keys and for
//! bytes. On `Full` the model is unchanged and every key in the model must
//! still read back equal. Operations go through two handles on the same
//! segment, one of which is sometimes dropped and attached again.
//!
//! `PROPTEST_CASES` overrides the number of cases (default 256).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use shmdict::{Error, ShmDict};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Unlinks the segment when dropped, also when a case fails.
struct Segment(String);

impl Segment {
    fn new() -> Segment {
        Segment(format!(
            "shmdict-test-model-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ))
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        let _ = ShmDict::unlink(&self.0);
    }
}

/// Key `k` of the key space: the empty key, short keys, and some long ones.
fn key_bytes(k: u8) -> Vec<u8> {
    match k {
        0 => Vec::new(),
        k if k % 7 == 3 => {
            let mut v = vec![k; 300];
            v[0] = b'L';
            v
        }
        k => format!("k{k}-").repeat(1 + k as usize % 4).into_bytes(),
    }
}

/// A value of `len` bytes derived from `seed`.
fn value_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add(i as u8) ^ (i >> 8) as u8)
        .collect()
}

/// The `update` used as "+1": a deterministic function of the old value.
fn plus_one(old: Option<&[u8]>) -> Vec<u8> {
    let n = match old {
        None => 0,
        Some(b) if b.len() == 8 => u64::from_le_bytes(b.try_into().unwrap()),
        Some(b) => b.len() as u64,
    };
    (n + 1).to_le_bytes().to_vec()
}

#[derive(Debug, Clone)]
enum Op {
    Insert {
        key: u8,
        len: usize,
        seed: u8,
    },
    Get(u8),
    GetInto(u8),
    Remove(u8),
    /// `update` with +1.
    Incr(u8),
    /// `update` returning `None`.
    Delete(u8),
    /// `update` returning the old value unchanged.
    Keep(u8),
    ContainsKey(u8),
    Len,
    Keys,
    /// Drop the second handle and attach again by name.
    Reattach,
}

/// An operation and which of the two handles runs it.
#[derive(Debug, Clone)]
struct Step {
    second_handle: bool,
    op: Op,
}

#[derive(Debug, Clone)]
struct Case {
    capacity: usize,
    arena_bytes: usize,
    steps: Vec<Step>,
}

fn value_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..=16,
        3 => 17usize..=500,
        2 => 500usize..=5000,
        1 => 5000usize..=20_000,
    ]
}

fn op(keys: u8) -> impl Strategy<Value = Op> {
    let key = move || 0..keys;
    prop_oneof![
        6 => (key(), value_len(), any::<u8>()).prop_map(|(key, len, seed)| Op::Insert { key, len, seed }),
        3 => key().prop_map(Op::Get),
        1 => key().prop_map(Op::GetInto),
        3 => key().prop_map(Op::Remove),
        3 => key().prop_map(Op::Incr),
        1 => key().prop_map(Op::Delete),
        1 => key().prop_map(Op::Keep),
        1 => key().prop_map(Op::ContainsKey),
        1 => Just(Op::Len),
        1 => Just(Op::Keys),
        1 => Just(Op::Reattach),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        1usize..=64,
        prop_oneof![Just(64 << 10), Just(128 << 10), Just(256 << 10)],
        1u8..=80,
    )
        .prop_flat_map(|(capacity, arena_bytes, keys)| {
            let steps = prop::collection::vec(
                (any::<bool>(), op(keys))
                    .prop_map(|(second_handle, op)| Step { second_handle, op }),
                1..200,
            );
            (Just(capacity), Just(arena_bytes), steps).prop_map(|(capacity, arena_bytes, steps)| {
                Case {
                    capacity,
                    arena_bytes,
                    steps,
                }
            })
        })
}

/// Generous upper bound on the arena bytes a key and value occupy (block
/// header and power-of-two rounding included).
fn block_estimate(key: &[u8], value: &[u8]) -> usize {
    (64 + key.len() + value.len())
        .div_ceil(64)
        .next_power_of_two()
        * 64
}

struct Harness {
    seg: Segment,
    capacity: usize,
    arena: usize,
    first: ShmDict,
    second: ShmDict,
    model: HashMap<Vec<u8>, Vec<u8>>,
    fulls: usize,
}

impl Harness {
    fn handle(&self, second: bool) -> &ShmDict {
        if second {
            &self.second
        } else {
            &self.first
        }
    }

    fn used_estimate(&self) -> usize {
        self.model.iter().map(|(k, v)| block_estimate(k, v)).sum()
    }

    /// A `Full` for writing `value` to `key` is a bug if the key has room in
    /// the index and the entry is tiny while at most half the arena is in use.
    fn full_is_plausible(&self, key: &[u8], value: &[u8]) -> Result<(), TestCaseError> {
        let index_full = !self.model.contains_key(key) && self.model.len() >= self.capacity;
        let tiny = key.len() + value.len() <= 48;
        let used = self.used_estimate();
        prop_assert!(
            index_full || !tiny || used > self.arena / 2,
            "Full for a {}-byte key and {}-byte value with {} of {} keys and about {used} of \
             {} arena bytes in use",
            key.len(),
            value.len(),
            self.model.len(),
            self.capacity,
            self.arena
        );
        Ok(())
    }

    /// Every key of the model reads back equal, through both handles, and
    /// nothing else is present.
    fn verify_all(&self) -> Result<(), TestCaseError> {
        for d in [&self.first, &self.second] {
            for (k, v) in &self.model {
                let got = d.get(k).unwrap();
                prop_assert_eq!(got.as_ref(), Some(v), "key {:?}", k);
            }
            prop_assert_eq!(d.len(), self.model.len());
            let mut keys = d.keys().unwrap();
            keys.sort();
            let mut expected: Vec<Vec<u8>> = self.model.keys().cloned().collect();
            expected.sort();
            prop_assert_eq!(keys, expected);
        }
        Ok(())
    }

    fn after_full(&mut self, e: Error, key: &[u8], value: &[u8]) -> Result<(), TestCaseError> {
        prop_assert!(matches!(e, Error::Full { .. }), "unexpected error {:?}", e);
        self.fulls += 1;
        self.full_is_plausible(key, value)?;
        self.verify_all()
    }

    fn step(&mut self, step: &Step) -> Result<(), TestCaseError> {
        let d = self.handle(step.second_handle);
        match step.op {
            Op::Insert { key, len, seed } => {
                let (k, v) = (key_bytes(key), value_bytes(len, seed));
                match d.insert(&k, &v) {
                    Ok(()) => {
                        self.model.insert(k, v);
                    }
                    Err(e) => self.after_full(e, &k, &v)?,
                }
            }
            Op::Get(key) => {
                let k = key_bytes(key);
                let got = d.get(&k).unwrap();
                prop_assert_eq!(got.as_ref(), self.model.get(&k));
            }
            Op::GetInto(key) => {
                let k = key_bytes(key);
                let mut buf = vec![0xAB; 40];
                let found = d.get_into(&k, &mut buf).unwrap();
                prop_assert_eq!(found, self.model.contains_key(&k));
                if found {
                    prop_assert_eq!(Some(&buf), self.model.get(&k));
                }
            }
            Op::Remove(key) => {
                let k = key_bytes(key);
                let removed = d.remove(&k).unwrap();
                prop_assert_eq!(removed, self.model.remove(&k).is_some());
            }
            Op::Incr(key) => {
                let k = key_bytes(key);
                let expected = plus_one(self.model.get(&k).map(Vec::as_slice));
                match d.update(&k, |old| Some(plus_one(old))) {
                    Ok(stored) => {
                        prop_assert_eq!(stored.as_ref(), Some(&expected));
                        self.model.insert(k, expected);
                    }
                    Err(e) => self.after_full(e, &k, &expected)?,
                }
            }
            Op::Delete(key) => {
                let k = key_bytes(key);
                let mut saw = None;
                let stored = d
                    .update(&k, |old| {
                        saw = Some(old.map(<[u8]>::to_vec));
                        None
                    })
                    .unwrap();
                prop_assert_eq!(stored, None);
                prop_assert_eq!(saw, Some(self.model.remove(&k)));
            }
            Op::Keep(key) => {
                let k = key_bytes(key);
                match d.update(&k, |old| old.map(<[u8]>::to_vec)) {
                    Ok(stored) => prop_assert_eq!(stored.as_ref(), self.model.get(&k)),
                    // Rewriting an existing value needs a second block.
                    Err(e) => {
                        let v = self.model.get(&k).cloned().unwrap_or_default();
                        self.after_full(e, &k, &v)?
                    }
                }
            }
            Op::ContainsKey(key) => {
                let k = key_bytes(key);
                prop_assert_eq!(d.contains_key(&k).unwrap(), self.model.contains_key(&k));
            }
            Op::Len => {
                prop_assert_eq!(d.len(), self.model.len());
                prop_assert_eq!(d.is_empty(), self.model.is_empty());
            }
            Op::Keys => {
                let mut keys = d.keys().unwrap();
                keys.sort();
                let mut expected: Vec<Vec<u8>> = self.model.keys().cloned().collect();
                expected.sort();
                prop_assert_eq!(keys, expected);
            }
            Op::Reattach => {
                self.second = ShmDict::options()
                    .capacity(1000)
                    .arena_bytes(1 << 20)
                    .open(&self.seg.0)
                    .unwrap();
                prop_assert_eq!(self.second.capacity(), self.capacity);
            }
        }
        Ok(())
    }
}

impl Harness {
    /// A fresh segment for `case`, opened through two handles.
    fn new(case: &Case) -> Harness {
        let seg = Segment::new();
        let first = ShmDict::options()
            .capacity(case.capacity)
            .arena_bytes(case.arena_bytes)
            .fixed_size(true)
            .create_new(true)
            .open(&seg.0)
            .unwrap();
        let second = ShmDict::open(&seg.0).unwrap();
        let arena = first.stats().arena_bytes;
        Harness {
            seg,
            capacity: case.capacity,
            arena,
            first,
            second,
            model: HashMap::new(),
            fulls: 0,
        }
    }
}

fn run(case: &Case) -> Result<(), TestCaseError> {
    let mut h = Harness::new(case);
    for step in &case.steps {
        h.step(step)?;
    }
    h.verify_all()?;
    // Freeing everything makes room for the largest promised entry: a 4 KiB
    // key with a value of 1/8 of the arena_bytes asked for.
    let keys: Vec<Vec<u8>> = h.model.keys().cloned().collect();
    for k in keys {
        prop_assert!(h.first.remove(&k).unwrap());
        h.model.remove(&k);
    }
    prop_assert!(h.first.is_empty() && h.second.is_empty());
    let big_key = vec![b'B'; 4096];
    let big_value = value_bytes(case.arena_bytes / 8, 7);
    h.second
        .insert(&big_key, &big_value)
        .map_err(|e| TestCaseError::fail(format!("largest promised entry after freeing: {e}")))?;
    prop_assert_eq!(h.first.get(&big_key).unwrap(), Some(big_value));
    Ok(())
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    ProptestConfig::with_cases(cases)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn dictionary_matches_a_hashmap_model(case in case()) {
        run(&case)?;
    }
}

/// Not a property, a sanity check of the generator: the sequences above do
/// reach `Full`, by capacity and by arena bytes.
#[test]
fn sequences_reach_full() {
    let by_capacity = Case {
        capacity: 3,
        arena_bytes: 64 << 10,
        steps: (0..6)
            .map(|key| Step {
                second_handle: key % 2 == 1,
                op: Op::Insert {
                    key,
                    len: 5,
                    seed: key,
                },
            })
            .collect(),
    };
    let by_arena = Case {
        capacity: 64,
        arena_bytes: 64 << 10,
        steps: (1..30)
            .map(|key| Step {
                second_handle: false,
                op: Op::Insert {
                    key,
                    len: 9000,
                    seed: key,
                },
            })
            .collect(),
    };
    for case in [by_capacity, by_arena] {
        let mut h = Harness::new(&case);
        for step in &case.steps {
            h.step(step).unwrap();
        }
        assert!(h.fulls > 0, "{case:?} never hit Full");
        h.verify_all().unwrap();
    }
}
