//! `shmdict::pool`: the cost of `Pool::map` against a sequential loop.
//!
//! | group               | `pool`                                      | baseline                        |
//! |---------------------|---------------------------------------------|---------------------------------|
//! | `pool_fixed`        | `map` of 1 item with 2 workers              | (the fixed cost: segment, fork, reap) |
//! | `pool_tiny_10k`     | `map` of 10,000 items of `x * 2`, 2 workers | the same loop in this process   |
//! | `pool_cpu_32x2ms`   | `map` of 32 CPU-bound items (~2 ms each), 1 and 2 workers | the same loop in this process |
//!
//! `pool_tiny_10k` shows the overhead per item (coordination through the
//! pool's segment, result encoding, the fixed cost spread over the items);
//! `pool_cpu_32x2ms` the speed-up on CPU-bound items (2 workers on a
//! 2-core machine: at most 2x). Criterion runs the benchmarks on the main
//! thread of a single-threaded process, as the pool requires.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shmdict::pool::Pool;

/// CPU-bound work: `rounds` steps of an xorshift generator.
fn burn(seed: u64, rounds: u64) -> u64 {
    let mut x = seed | 1;
    for _ in 0..rounds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}

/// Rounds of `burn` that take about `target` on this machine.
fn calibrate(target: Duration) -> u64 {
    let mut rounds = 1 << 16;
    loop {
        let t = std::time::Instant::now();
        black_box(burn(black_box(1), rounds));
        let e = t.elapsed();
        if e >= Duration::from_millis(20) {
            return (rounds as f64 * target.as_secs_f64() / e.as_secs_f64()) as u64;
        }
        rounds *= 2;
    }
}

fn fixed(c: &mut Criterion) {
    let mut g = c.benchmark_group("pool_fixed");
    let pool = Pool::new(2);
    g.bench_function("map_1_item_2_workers", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            pool.map([1u64], |_, x| x * 2, |_, r: u64| sum += r)
                .expect("map");
            black_box(sum)
        })
    });
    g.finish();
}

fn tiny(c: &mut Criterion) {
    const N: u64 = 10_000;
    let mut g = c.benchmark_group("pool_tiny_10k");
    g.throughput(Throughput::Elements(N));
    g.bench_function("sequential", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for x in 0..N {
                sum += black_box(x) * 2;
            }
            black_box(sum)
        })
    });
    let pool = Pool::new(2);
    g.bench_function("pool_2_workers", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            pool.map(0..N, |_, x| black_box(x) * 2, |_, r: u64| sum += r)
                .expect("map");
            black_box(sum)
        })
    });
    g.finish();
}

fn cpu(c: &mut Criterion) {
    const ITEMS: u64 = 32;
    let rounds = calibrate(Duration::from_millis(2));
    let mut g = c.benchmark_group("pool_cpu_32x2ms");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Elements(ITEMS));
    g.bench_function("sequential", |b| {
        b.iter(|| {
            let mut acc = 0u64;
            for i in 0..ITEMS {
                acc ^= burn(black_box(i), rounds);
            }
            black_box(acc)
        })
    });
    for workers in [1, 2] {
        let pool = Pool::new(workers);
        g.bench_function(format!("pool_{workers}_workers"), |b| {
            b.iter(|| {
                let mut acc = 0u64;
                pool.map(
                    0..ITEMS,
                    |_, i| burn(black_box(i), rounds),
                    |_, r: u64| acc ^= r,
                )
                .expect("map");
                black_box(acc)
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = fixed, tiny, cpu
}
criterion_main!(benches);
