//! Single-key operations of `ShmDict` beside `RwLock<HashMap<Vec<u8>, Vec<u8>>>`.
//!
//! 100,000 keys of 16 bytes, with values of 64 bytes and of 1 KiB, each key
//! set accessed in one pre-shuffled random order that the benchmark cycles
//! through. Every criterion group holds one workload at one value size, with
//! shmdict and the baseline measured in the same run:
//!
//! | group             | `shmdict`                  | `rwlock_hashmap`                                 |
//! |-------------------|----------------------------|--------------------------------------------------|
//! | `get/*`           | `get` -> owned `Vec`       | read lock, `get`, `clone` the value              |
//! | `get_into/*`      | `get_into` a reused `Vec`  | read lock, `get`, copy into a reused `Vec`       |
//! | `insert/*`        | `insert` over an existing key | write lock, overwrite the value `Vec` in place |
//! | `update/*`        | `update`: +1 on the counter in the first 8 bytes | write lock, `get_mut`, +1 in place |
//! | `remove_insert/*` | `remove`, then `insert`    | `remove`, then `insert(k.to_vec(), v.to_vec())`, each under its own write lock |
//!
//! `insert/*` also has `rwlock_hashmap_alloc`, the idiomatic
//! `insert(k.to_vec(), v.to_vec())`, for reference; the in-place overwrite is
//! the (stronger) baseline the ratios use.
//!
//! Throughput is in elements: one per operation, so a `remove_insert`
//! iteration counts two. Everything is single-threaded and in one process;
//! the baseline's lock is never contended. The segment is unlinked when the
//! benchmark ends (also on panic). Results and the command that reproduces
//! them: `docs/performance.md`.

use std::hint::black_box;

mod common;

use common::{bump, keys, value, Cursor, Segment, KEYS};
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};

fn group<'c>(c: &'c mut Criterion, workload: &str, label: &str) -> BenchmarkGroup<'c, WallTime> {
    c.benchmark_group(format!("{workload}/{label}"))
}

fn bench_size(c: &mut Criterion, label: &str, value_len: usize) {
    let (inserted, visited) = keys();
    let seg = Segment::create(label, value_len);
    let d = seg.dict();
    let base = seg.populate(&inserted, value_len);
    drop(inserted);
    let new_value = value(value_len, 7);
    let new_value = new_value.as_slice();

    // get: an owned copy of the value.
    let mut g = group(c, "get", label);
    g.throughput(Throughput::Elements(1));
    g.bench_function("shmdict", |b| {
        let mut cur = Cursor::new(&visited);
        b.iter(|| black_box(d.get(cur.next_key()).unwrap()))
    });
    g.bench_function("rwlock_hashmap", |b| {
        let mut cur = Cursor::new(&visited);
        b.iter(|| {
            let k = cur.next_key();
            black_box(base.read().unwrap().get(&k[..]).cloned())
        })
    });
    g.finish();

    // get_into: a copy into a reused buffer, no allocation.
    let mut g = group(c, "get_into", label);
    g.throughput(Throughput::Elements(1));
    g.bench_function("shmdict", |b| {
        let mut cur = Cursor::new(&visited);
        let mut buf = Vec::with_capacity(value_len);
        b.iter(|| {
            let found = d.get_into(cur.next_key(), &mut buf).unwrap();
            black_box((found, buf.as_slice()));
        })
    });
    g.bench_function("rwlock_hashmap", |b| {
        let mut cur = Cursor::new(&visited);
        let mut buf = Vec::with_capacity(value_len);
        b.iter(|| {
            let k = cur.next_key();
            let found = match base.read().unwrap().get(&k[..]) {
                Some(v) => {
                    buf.clear();
                    buf.extend_from_slice(v);
                    true
                }
                None => false,
            };
            black_box((found, buf.as_slice()));
        })
    });
    g.finish();

    // insert: overwrite an existing key with a value of the same length.
    let mut g = group(c, "insert", label);
    g.throughput(Throughput::Elements(1));
    g.bench_function("shmdict", |b| {
        let mut cur = Cursor::new(&visited);
        b.iter(|| d.insert(cur.next_key(), new_value).unwrap())
    });
    g.bench_function("rwlock_hashmap", |b| {
        let mut cur = Cursor::new(&visited);
        b.iter(|| {
            let k = cur.next_key();
            let mut map = base.write().unwrap();
            match map.get_mut(&k[..]) {
                Some(v) => {
                    v.clear();
                    v.extend_from_slice(new_value);
                }
                None => {
                    map.insert(k.to_vec(), new_value.to_vec());
                }
            }
        })
    });
    g.bench_function("rwlock_hashmap_alloc", |b| {
        let mut cur = Cursor::new(&visited);
        b.iter(|| {
            let k = cur.next_key();
            black_box(base.write().unwrap().insert(k.to_vec(), new_value.to_vec()));
        })
    });
    g.finish();

    // update: read-modify-write of the counter, keeping the length.
    let mut g = group(c, "update", label);
    g.throughput(Throughput::Elements(1));
    g.bench_function("shmdict", |b| {
        let mut cur = Cursor::new(&visited);
        b.iter(|| {
            d.update(cur.next_key(), |old| {
                let mut v = old?.to_vec();
                bump(&mut v);
                Some(v)
            })
            .unwrap()
        })
    });
    g.bench_function("rwlock_hashmap", |b| {
        let mut cur = Cursor::new(&visited);
        b.iter(|| {
            let k = cur.next_key();
            if let Some(v) = base.write().unwrap().get_mut(&k[..]) {
                bump(v);
            }
        })
    });
    g.finish();

    // remove + insert: a pair of operations on the same key.
    let mut g = group(c, "remove_insert", label);
    g.throughput(Throughput::Elements(2));
    g.bench_function("shmdict", |b| {
        let mut cur = Cursor::new(&visited);
        b.iter(|| {
            let k = cur.next_key();
            black_box(d.remove(k).unwrap());
            d.insert(k, new_value).unwrap();
        })
    });
    g.bench_function("rwlock_hashmap", |b| {
        let mut cur = Cursor::new(&visited);
        b.iter(|| {
            let k = cur.next_key();
            black_box(base.write().unwrap().remove(&k[..]));
            base.write().unwrap().insert(k.to_vec(), new_value.to_vec());
        })
    });
    g.finish();

    assert_eq!(d.len(), KEYS, "every workload leaves all keys present");
    assert_eq!(base.read().unwrap().len(), KEYS);
}

fn benches(c: &mut Criterion) {
    bench_size(c, "64B", 64);
    bench_size(c, "1KiB", 1024);
}

criterion_group! {
    name = core;
    config = common::config();
    targets = benches
}
criterion_main!(core);
