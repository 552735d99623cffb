//! A profiling driver for the workloads of `benches/core.rs`, without
//! criterion's machinery around them.
//!
//! ```text
//! cargo build --profile bench --example bench_profile
//! valgrind --tool=callgrind --toggle-collect='bench_profile::run_*' \
//!     target/release/examples/bench_profile get 64 200000
//! ```
//!
//! Arguments: a workload (`get`, `get_into`, `reader` (`Reader::get` under
//! one reader, touching two bytes of each value), `get_ref`, `insert`, `update`,
//! `remove_insert`, or the baseline's `rw_get`, `rw_get_into`, `rw_insert`,
//! `rw_update`, `rw_remove_insert`), a value length in bytes, and the number
//! of operations. It fills a fresh segment and a `RwLock<HashMap>` with
//! 100,000 16-byte keys, then runs only the chosen loop, in a function named
//! `run_*` so a profiler can restrict itself to it. The segment is unlinked
//! at the end.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::RwLock;
use std::time::Instant;

use shmdict::ShmDict;

const KEYS: usize = 100_000;

type Baseline = RwLock<HashMap<Vec<u8>, Vec<u8>>>;

/// SplitMix64, as in the benchmark.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn bump(v: &mut [u8]) {
    let n = u64::from_le_bytes(v[..8].try_into().expect("8 bytes"));
    v[..8].copy_from_slice(&n.wrapping_add(1).to_le_bytes());
}

#[inline(never)]
fn run_get(d: &ShmDict, keys: &[[u8; 16]], n: usize) {
    for k in keys.iter().cycle().take(n) {
        black_box(d.get(k).unwrap());
    }
}

#[inline(never)]
fn run_get_into(d: &ShmDict, keys: &[[u8; 16]], n: usize) {
    let mut buf = Vec::new();
    for k in keys.iter().cycle().take(n) {
        black_box(d.get_into(k, &mut buf).unwrap());
    }
}

#[inline(never)]
fn run_reader(d: &ShmDict, keys: &[[u8; 16]], n: usize) {
    let reader = d.reader().unwrap();
    let mut sum = 0u64;
    for k in keys.iter().cycle().take(n) {
        let v = reader.get(k).unwrap().expect("present");
        sum = sum.wrapping_add(u64::from(v[0]) + u64::from(v[v.len() - 1]));
    }
    black_box(sum);
}

#[inline(never)]
fn run_get_ref(d: &ShmDict, keys: &[[u8; 16]], n: usize) {
    let mut sum = 0u64;
    for k in keys.iter().cycle().take(n) {
        let v = d.get_ref(k).unwrap().expect("present");
        sum = sum.wrapping_add(u64::from(v[0]) + u64::from(v[v.len() - 1]));
    }
    black_box(sum);
}

#[inline(never)]
fn run_insert(d: &ShmDict, keys: &[[u8; 16]], n: usize, v: &[u8]) {
    for k in keys.iter().cycle().take(n) {
        d.insert(k, v).unwrap();
    }
}

#[inline(never)]
fn run_update(d: &ShmDict, keys: &[[u8; 16]], n: usize) {
    for k in keys.iter().cycle().take(n) {
        d.update(k, |old| {
            let mut v = old?.to_vec();
            bump(&mut v);
            Some(v)
        })
        .unwrap();
    }
}

#[inline(never)]
fn run_remove_insert(d: &ShmDict, keys: &[[u8; 16]], n: usize, v: &[u8]) {
    for k in keys.iter().cycle().take(n) {
        black_box(d.remove(k).unwrap());
        d.insert(k, v).unwrap();
    }
}

#[inline(never)]
fn run_rw_get(m: &Baseline, keys: &[[u8; 16]], n: usize) {
    for k in keys.iter().cycle().take(n) {
        black_box(m.read().unwrap().get(&k[..]).cloned());
    }
}

#[inline(never)]
fn run_rw_get_into(m: &Baseline, keys: &[[u8; 16]], n: usize) {
    let mut buf = Vec::new();
    for k in keys.iter().cycle().take(n) {
        if let Some(v) = m.read().unwrap().get(&k[..]) {
            buf.clear();
            buf.extend_from_slice(v);
        }
        black_box(&buf);
    }
}

#[inline(never)]
fn run_rw_insert(m: &Baseline, keys: &[[u8; 16]], n: usize, v: &[u8]) {
    for k in keys.iter().cycle().take(n) {
        if let Some(old) = m.write().unwrap().get_mut(&k[..]) {
            old.clear();
            old.extend_from_slice(v);
        }
    }
}

#[inline(never)]
fn run_rw_update(m: &Baseline, keys: &[[u8; 16]], n: usize) {
    for k in keys.iter().cycle().take(n) {
        if let Some(v) = m.write().unwrap().get_mut(&k[..]) {
            bump(v);
        }
    }
}

#[inline(never)]
fn run_rw_remove_insert(m: &Baseline, keys: &[[u8; 16]], n: usize, v: &[u8]) {
    for k in keys.iter().cycle().take(n) {
        black_box(m.write().unwrap().remove(&k[..]));
        m.write().unwrap().insert(k.to_vec(), v.to_vec());
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: bench_profile WORKLOAD VALUE_LEN OPS");
        std::process::exit(2);
    }
    let workload = args[1].as_str();
    let value_len: usize = args[2].parse().expect("value length");
    let ops: usize = args[3].parse().expect("operation count");

    let mut rng = 0x5eed;
    let inserted: Vec<[u8; 16]> = (0..KEYS as u64)
        .map(|i| {
            let mut k = [0u8; 16];
            k[..8].copy_from_slice(&splitmix(&mut rng).to_le_bytes());
            k[8..].copy_from_slice(&i.to_le_bytes());
            k
        })
        .collect();
    let mut keys = inserted.clone();
    for i in (1..keys.len()).rev() {
        let j = (splitmix(&mut rng) % (i as u64 + 1)) as usize;
        keys.swap(i, j);
    }
    let value = vec![0u8; value_len];

    let name = format!("shmdict-bench-profile-{}", std::process::id());
    let block = (32 + value_len).next_power_of_two().max(64);
    let d = ShmDict::options()
        .capacity(KEYS + KEYS / 4)
        .arena_bytes(2 * KEYS * block + (64 << 20))
        .create_new(true)
        .open(&name)
        .expect("create segment");
    let m: Baseline = RwLock::new(HashMap::with_capacity(KEYS));
    let baseline = workload.starts_with("rw_");
    for k in &inserted {
        if baseline {
            m.write().unwrap().insert(k.to_vec(), value.clone());
        } else {
            d.insert(k, &value).expect("populate");
        }
    }

    let start = Instant::now();
    match workload {
        "get" => run_get(&d, &keys, ops),
        "get_into" => run_get_into(&d, &keys, ops),
        "reader" => run_reader(&d, &keys, ops),
        "get_ref" => run_get_ref(&d, &keys, ops),
        "insert" => run_insert(&d, &keys, ops, &value),
        "update" => run_update(&d, &keys, ops),
        "remove_insert" => run_remove_insert(&d, &keys, ops, &value),
        "rw_get" => run_rw_get(&m, &keys, ops),
        "rw_get_into" => run_rw_get_into(&m, &keys, ops),
        "rw_insert" => run_rw_insert(&m, &keys, ops, &value),
        "rw_update" => run_rw_update(&m, &keys, ops),
        "rw_remove_insert" => run_rw_remove_insert(&m, &keys, ops, &value),
        other => eprintln!("unknown workload {other}"),
    }
    let elapsed = start.elapsed();
    println!(
        "{workload} {value_len}B: {ops} ops in {elapsed:?} ({:.1} ns/op)",
        elapsed.as_nanos() as f64 / ops as f64
    );
    drop(d);
    ShmDict::unlink(&name).expect("unlink");
}
