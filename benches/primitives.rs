//! `Value<T>` and `Array<T>` beside their in-process counterparts.
//!
//! | group                    | `shmdict`                              | baseline                              |
//! |--------------------------|----------------------------------------|---------------------------------------|
//! | `value_u64/fetch_add`    | `Value<u64>::fetch_add(1)`             | `AtomicU64::fetch_add(1, SeqCst)`     |
//! | `value_u64/load`         | `Value<u64>::load`                     | `AtomicU64::load(SeqCst)`             |
//! | `value_32b/load`         | `Value<[u64; 4]>::load` (double buffer) | `Mutex<[u64; 4]>`: lock, copy        |
//! | `value_32b/store`        | `Value<[u64; 4]>::store`               | `Mutex<[u64; 4]>`: lock, assign       |
//! | `array_f64_64MiB/write`  | `write()` guard, fill every element    | `Vec<f64>`, same loop                 |
//! | `array_f64_64MiB/write_chunk` | `chunk_mut(0, 1)` guard, same loop | (the `write` baseline)               |
//! | `array_f64_64MiB/sum`    | `read()` guard, `iter().sum()`         | `Vec<f64>`, `iter().sum()`            |
//! | `array_f64/get_set`      | `get(i)` + `set(i, ..)` (locks each)    | `Mutex<Vec<f64>>`: lock per access    |
//!
//! Single-threaded, one process; nothing is contended. The array benches
//! report bytes per second (64 MiB per iteration): streaming writes and
//! reads through the guards are plain slice loops over the mapping, so they
//! should match the `Vec` at memory bandwidth. Segments are unlinked when
//! the benchmark ends (also on panic). Results: `docs/performance.md`.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shmdict::{Array, Value};

/// Unlinks its name when dropped.
struct Name(String);

impl Name {
    fn new(tag: &str) -> Name {
        let n = Name(format!("shmdict-bench-prim-{tag}-{}", std::process::id()));
        let _ = Value::<u8>::unlink(&n.0);
        n
    }
}

impl Drop for Name {
    fn drop(&mut self) {
        let _ = Value::<u8>::unlink(&self.0);
    }
}

const ARRAY_BYTES: usize = 64 << 20;
const ARRAY_LEN: usize = ARRAY_BYTES / 8;

fn values(c: &mut Criterion) {
    let n = Name::new("u64");
    let v = Value::<u64>::open(&n.0, 0).expect("value");
    let base = AtomicU64::new(0);
    let mut g = c.benchmark_group("value_u64");
    g.throughput(Throughput::Elements(1));
    g.bench_function("fetch_add/shmdict", |b| {
        b.iter(|| black_box(v.fetch_add(1)))
    });
    g.bench_function("fetch_add/atomic_u64", |b| {
        b.iter(|| black_box(base.fetch_add(1, Ordering::SeqCst)))
    });
    g.bench_function("load/shmdict", |b| b.iter(|| black_box(v.load())));
    g.bench_function("load/atomic_u64", |b| {
        b.iter(|| black_box(base.load(Ordering::SeqCst)))
    });
    g.finish();

    let n32 = Name::new("32b");
    let w = Value::<[u64; 4]>::open(&n32.0, [0; 4]).expect("value");
    let m = Mutex::new([0u64; 4]);
    let mut g = c.benchmark_group("value_32b");
    g.throughput(Throughput::Elements(1));
    g.bench_function("load/shmdict", |b| b.iter(|| black_box(w.load())));
    g.bench_function("load/mutex", |b| {
        b.iter(|| black_box(*m.lock().expect("mutex")))
    });
    let mut k = 0u64;
    g.bench_function("store/shmdict", |b| {
        b.iter(|| {
            k += 1;
            w.store(black_box([k; 4]))
        })
    });
    g.bench_function("store/mutex", |b| {
        b.iter(|| {
            k += 1;
            *m.lock().expect("mutex") = black_box([k; 4]);
        })
    });
    g.finish();
}

fn fill(s: &mut [f64], k: f64) {
    for (i, x) in s.iter_mut().enumerate() {
        *x = i as f64 + k;
    }
}

fn arrays(c: &mut Criterion) {
    let n = Name::new("f64");
    let a = Array::<f64>::open(&n.0, ARRAY_LEN).expect("array");
    let mut base = vec![0f64; ARRAY_LEN];
    let mut g = c.benchmark_group("array_f64_64MiB");
    g.throughput(Throughput::Bytes(ARRAY_BYTES as u64));
    g.sample_size(10);
    let mut k = 0.0;
    g.bench_function("write/shmdict", |b| {
        b.iter(|| {
            k += 1.0;
            fill(&mut a.write(), k);
        })
    });
    g.bench_function("write_chunk/shmdict", |b| {
        b.iter(|| {
            k += 1.0;
            fill(&mut a.chunk_mut(0, 1).expect("chunk"), k);
        })
    });
    g.bench_function("write/vec", |b| {
        b.iter(|| {
            k += 1.0;
            fill(black_box(&mut base), k);
        })
    });
    g.bench_function("sum/shmdict", |b| {
        b.iter(|| black_box(a.read().iter().sum::<f64>()))
    });
    g.bench_function("sum/vec", |b| {
        b.iter(|| black_box(black_box(&base).iter().sum::<f64>()))
    });
    g.finish();

    let locked = Mutex::new(vec![0f64; 1024]);
    let small = Name::new("f64-small");
    let s = Array::<f64>::open(&small.0, 1024).expect("array");
    let mut g = c.benchmark_group("array_f64");
    g.throughput(Throughput::Elements(2));
    let mut i = 0usize;
    g.bench_function("get_set/shmdict", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            s.set(i, s.get(i) + 1.0);
        })
    });
    g.bench_function("get_set/mutex_vec", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let x = locked.lock().expect("mutex")[i];
            locked.lock().expect("mutex")[i] = x + 1.0;
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = values, arrays
}
criterion_main!(benches);
