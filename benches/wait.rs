//! Waiting: how fast a sleeping process wakes after another process writes,
//! and what waiting costs writers.
//!
//! `cargo bench --bench wait` runs two parts:
//!
//! 1. **Wake-up latency across processes** (printed table, not criterion: it
//!    needs percentiles of single events). This binary re-executes itself as
//!    a waiter process that sleeps in `wait_for` (a new key each round) or
//!    `wait_change` (one key rewritten each round). The parent writes the key
//!    with its CLOCK_MONOTONIC timestamp inside the value; the waiter reads
//!    the clock as soon as the call returns. 2,000 rounds each, with a pause
//!    between rounds so the waiter is asleep in the kernel when the write
//!    comes. Reported: median, p90, p99, max, in microseconds.
//! 2. **`insert` cost with and without waiters** (criterion, group
//!    `insert_with_waiters`): overwrites of 100,000 keys with no waiter, with
//!    a thread sleeping in `wait_for` on an absent key of another wait
//!    channel, and with a thread looping in `wait_change` on one of the
//!    written keys' channel (the worst case: every write there wakes it).
//!
//! Results: `docs/performance.md`.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{keys, value, Cursor, Segment};
use criterion::{Criterion, Throughput};
use shmdict::ShmDict;

const ROUNDS: u64 = 2000;
const CHILD_FLAG: &str = "--wake-waiter";

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes.
fn now_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn stamp_of(v: &[u8]) -> u64 {
    u64::from_le_bytes(v[..8].try_into().expect("8-byte stamp"))
}

/// The waiter process: `mode` is `wait_for` or `wait_change`. Records each
/// latency, then publishes them all under "latencies".
fn waiter(name: &str, mode: &str) {
    let d = ShmDict::open(name).expect("open");
    let mut lat = Vec::with_capacity(ROUNDS as usize);
    let timeout = Duration::from_secs(30);
    let (_, mut seen) = d.get_versioned("k").expect("get_versioned");
    d.insert("waiter-ready", b"").expect("ready");
    for i in 0..ROUNDS {
        let v = if mode == "wait_for" {
            d.wait_for(format!("k-{i}"), timeout)
                .expect("wait_for")
                .expect("written within the timeout")
        } else {
            let (v, version) = d
                .wait_change("k", seen, timeout)
                .expect("wait_change")
                .expect("changed within the timeout");
            seen = version;
            v.expect("present")
        };
        let t = now_ns();
        lat.push(t.saturating_sub(stamp_of(&v)));
        // Tell the writer we are about to sleep again.
        d.insert("acked", i.to_le_bytes()).expect("ack");
    }
    let bytes: Vec<u8> = lat.iter().flat_map(|l| l.to_le_bytes()).collect();
    d.insert("latencies", bytes).expect("publish latencies");
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Runs one waiter process in `mode` and prints its latency percentiles.
fn latency(mode: &str) {
    let seg = Segment::create(&format!("wake-{mode}"), 64);
    let d = seg.dict();
    let mut child = Command::new(std::env::current_exe().expect("current_exe"))
        .args([CHILD_FLAG, seg.name(), mode])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn the waiter");
    let result = (|| {
        d.wait_for("waiter-ready", Duration::from_secs(30))
            .ok()
            .flatten()
            .ok_or("waiter never started")?;
        for i in 0..ROUNDS {
            let (_, mut ack_seen) = d.get_versioned("acked").map_err(|_| "get")?;
            // Let the waiter fall asleep in the kernel before writing.
            std::thread::sleep(Duration::from_micros(300));
            let mut v = now_ns().to_le_bytes().to_vec();
            v.extend_from_slice(&[0u8; 56]);
            if mode == "wait_for" {
                d.insert(format!("k-{i}"), &v).map_err(|_| "insert")?;
            } else {
                d.insert("k", &v).map_err(|_| "insert")?;
            }
            // Wait for the ack (by waiting too: no polling anywhere).
            loop {
                let (ack, ver) = d
                    .wait_change("acked", ack_seen, Duration::from_secs(30))
                    .map_err(|_| "wait ack")?
                    .ok_or("no ack")?;
                ack_seen = ver;
                if ack.is_some_and(|a| a[..] == i.to_le_bytes()) {
                    break;
                }
            }
        }
        let bytes = d
            .wait_for("latencies", Duration::from_secs(30))
            .map_err(|_| "latencies")?
            .ok_or("no latencies")?;
        Ok::<Vec<u64>, &str>(
            bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        )
    })();
    let _ = child.kill();
    let _ = child.wait();
    let mut lat = result.unwrap_or_else(|e| panic!("wake latency ({mode}): {e}"));
    lat.sort_unstable();
    println!(
        "wake latency, {mode:<11} ({} rounds): median {:7.1} us  p90 {:7.1} us  p99 {:7.1} us  max {:8.1} us",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.9),
        percentile(&lat, 0.99),
        *lat.last().unwrap() as f64 / 1000.0,
    );
}

/// Overwrites with no waiter, a waiter on another channel, and a waiter on
/// the written keys' channel.
fn insert_with_waiters(c: &mut Criterion) {
    let (inserted, visited) = keys();
    let seg = Segment::create("wait-insert", 64);
    seg.populate(&inserted, 64);
    let d = seg.dict();
    let v = value(64, 7);
    let mut g = c.benchmark_group("insert_with_waiters");
    g.throughput(Throughput::Elements(1));

    g.bench_function("no_waiter", |b| {
        let mut cur = Cursor::new(&visited);
        b.iter(|| d.insert(cur.next_key(), &v).unwrap())
    });

    // A waiter sleeping on an absent key: only writes to keys on its channel
    // (1 in 128) find its bit set and wake it.
    let stop = Arc::new(AtomicBool::new(false));
    let waiter = {
        let stop = stop.clone();
        let other = seg.open_again();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = other.wait_for("absent-key", Duration::from_millis(50));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(20));
    g.bench_function("waiter_on_absent_key", |b| {
        let mut cur = Cursor::new(&visited);
        b.iter(|| d.insert(cur.next_key(), &v).unwrap())
    });
    stop.store(true, Ordering::Relaxed);
    waiter.join().unwrap();

    // Worst case: a watcher of the very key being rewritten.
    let hot = visited[0];
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        let other = seg.open_again();
        std::thread::spawn(move || {
            let (_, mut seen) = other.get_versioned(hot).unwrap();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Some((_, ver))) = other.wait_change(hot, seen, Duration::from_millis(50))
                {
                    seen = ver;
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(20));
    g.bench_function("watcher_on_the_written_key", |b| {
        b.iter(|| d.insert(hot, &v).unwrap())
    });
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    g.bench_function("no_watcher_same_key", |b| {
        b.iter(|| d.insert(hot, &v).unwrap())
    });
    g.finish();
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(CHILD_FLAG) {
        waiter(&argv[2], &argv[3]);
        return;
    }
    // `cargo bench` passes --bench; `cargo test --benches` does not run us.
    let filter: Option<&String> = argv.iter().skip(1).find(|a| !a.starts_with("--"));
    if filter.is_none_or(|f| "wake_latency".contains(f.as_str())) {
        latency("wait_for");
        latency("wait_change");
    }
    let mut c = common::config().configure_from_args();
    insert_with_waiters(&mut c);
    c.final_summary();
}
