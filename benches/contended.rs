//! Two threads at once on two cores: what lock-free reads and per-key
//! writes buy over `RwLock<HashMap<Vec<u8>, Vec<u8>>>`.
//!
//! The same 100,000 16-byte keys with 64-byte values as `benches/core.rs`,
//! each thread cycling through the shuffled order from a different start.
//! Throughput is the aggregate of both threads (elements = operations).
//!
//! | group              | `shmdict`                                   | `rwlock_hashmap`                          |
//! |--------------------|---------------------------------------------|-------------------------------------------|
//! | `2_readers`        | two threads `get_into` a reused buffer      | two threads: read lock, copy into a buffer |
//! | `2_writers`        | two threads `insert` (overwrite), each with its own handle, as two processes would | two threads: write lock, overwrite in place |
//! | `reader_beside_writer` | reader thread's `get_into` throughput while another thread overwrites | the same with the read and write locks |
//!
//! Each shmdict thread of the writer groups opens its own handle on the
//! segment, as a separate process would. Results: `docs/performance.md`.

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{keys, value, Cursor, Segment, KEYS};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const VALUE_LEN: usize = 64;

/// Runs `f(thread, ops)` on two threads, `iters / 2` operations each, and
/// returns the wall time of the slower one.
fn two_threads(iters: u64, f: impl Fn(usize, u64) + Sync) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..2 {
            let f = &f;
            s.spawn(move || f(t, iters.div_ceil(2)));
        }
    });
    start.elapsed()
}

/// The reader's wall time for `iters` reads on thread 0 while thread 1
/// writes until the reader is done.
fn reader_beside_writer<'k>(
    iters: u64,
    read: impl Fn(&mut Cursor<'k>, &mut Vec<u8>) + Sync,
    write: impl Fn(&mut Cursor<'k>) + Sync,
    start: impl Fn(usize) -> Cursor<'k> + Sync,
) -> Duration {
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut cur = start(1);
            while !done.load(Ordering::Relaxed) {
                write(&mut cur);
            }
        });
        let (mut cur, mut buf) = (start(0), Vec::with_capacity(VALUE_LEN));
        let t0 = Instant::now();
        for _ in 0..iters {
            read(&mut cur, &mut buf);
        }
        let elapsed = t0.elapsed();
        done.store(true, Ordering::Relaxed);
        elapsed
    })
}

fn benches(c: &mut Criterion) {
    let (inserted, visited) = keys();
    let seg = Segment::create("contended", VALUE_LEN);
    let base = seg.populate(&inserted, VALUE_LEN);
    drop(inserted);
    let handles = [seg.open_again(), seg.open_again()];
    let new_value = value(VALUE_LEN, 7);
    let start = |t: usize| Cursor::starting_at(&visited, t * KEYS / 2);

    // The operations, per side; `t` is the thread (and handle) number.
    let shm_read = |t: usize, cur: &mut Cursor<'_>, buf: &mut Vec<u8>| {
        black_box(handles[t].get_into(cur.next_key(), buf).unwrap());
    };
    let shm_write = |t: usize, cur: &mut Cursor<'_>| {
        handles[t].insert(cur.next_key(), &new_value).unwrap();
    };
    let base_read = |cur: &mut Cursor<'_>, buf: &mut Vec<u8>| {
        let map = base.read().unwrap();
        buf.clear();
        buf.extend_from_slice(map.get(&cur.next_key()[..]).unwrap());
        drop(map);
        black_box(&buf);
    };
    let base_write = |cur: &mut Cursor<'_>| {
        let mut map = base.write().unwrap();
        map.get_mut(&cur.next_key()[..])
            .unwrap()
            .copy_from_slice(&new_value);
    };

    let mut g = c.benchmark_group("2_readers/64B");
    g.throughput(Throughput::Elements(1));
    g.bench_function("shmdict", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, |t, n| {
                let (mut cur, mut buf) = (start(t), Vec::with_capacity(VALUE_LEN));
                (0..n).for_each(|_| shm_read(t, &mut cur, &mut buf));
            })
        })
    });
    g.bench_function("rwlock_hashmap", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, |t, n| {
                let (mut cur, mut buf) = (start(t), Vec::with_capacity(VALUE_LEN));
                (0..n).for_each(|_| base_read(&mut cur, &mut buf));
            })
        })
    });
    g.finish();

    let mut g = c.benchmark_group("2_writers/64B");
    g.throughput(Throughput::Elements(1));
    g.bench_function("shmdict", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, |t, n| {
                let mut cur = start(t);
                (0..n).for_each(|_| shm_write(t, &mut cur));
            })
        })
    });
    g.bench_function("rwlock_hashmap", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, |t, n| {
                let mut cur = start(t);
                (0..n).for_each(|_| base_write(&mut cur));
            })
        })
    });
    g.finish();

    let mut g = c.benchmark_group("reader_beside_writer/64B");
    g.throughput(Throughput::Elements(1));
    g.bench_function("shmdict", |b| {
        b.iter_custom(|iters| {
            reader_beside_writer(
                iters,
                |c, buf| shm_read(0, c, buf),
                |c| shm_write(1, c),
                start,
            )
        })
    });
    g.bench_function("rwlock_hashmap", |b| {
        b.iter_custom(|iters| reader_beside_writer(iters, base_read, base_write, start))
    });
    g.finish();

    assert_eq!(seg.dict().len(), KEYS);
}

criterion_group! {
    name = contended;
    config = common::config();
    targets = benches
}
criterion_main!(contended);
