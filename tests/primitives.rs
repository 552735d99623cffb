//! `Value<T>` and `Array<T>` across real, unrelated processes.
//!
//! The test binary re-executes itself (`std::env::current_exe()`) as child
//! processes: `argv[1] == "--shmdict-child"` selects a child role (see
//! [`child_main`]); otherwise `main` runs the scenarios as libtest-mimic
//! trials. Children start together behind a barrier made of two `Value`s.
//!
//! Every segment has a unique name (pid and counter) and is unlinked by a
//! guard, also when a trial fails; every child is killed and reaped by a
//! guard. Anything that could hang runs under a watchdog ([`WATCHDOG`])
//! that turns a hang into a failure. No trial asserts a maximum runtime.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

mod common;

use common::*;
use shmdict::{Array, Error, ShmDict, Value};

/// Worker processes in the parallel trials.
const WORKERS: u64 = 4;
/// `fetch_add`s per worker.
const ADDS: u64 = 100_000;
/// Elements of the chunk-filled array.
const FILL_LEN: usize = 1 << 21;

fn main() {
    let trials: Vec<(&str, fn())> = vec![
        (
            "value_fetch_add_from_many_processes_loses_nothing",
            value_fetch_add_loses_nothing,
        ),
        (
            "value_update_of_a_large_type_from_many_processes_loses_nothing",
            value_large_update_loses_nothing,
        ),
        (
            "value_of_32_bytes_never_tears_across_processes",
            value_of_32_bytes_never_tears,
        ),
        (
            "array_chunks_filled_by_many_processes_sum_exactly",
            array_chunks_filled_by_many_processes,
        ),
        (
            "wrong_type_length_or_kind_is_incompatible",
            wrong_type_length_or_kind_is_incompatible,
        ),
        (
            "simultaneous_open_of_a_new_value_shares_one_segment",
            simultaneous_open_shares_one_segment,
        ),
        ("sigkilled_write_holder_is_recovered", || {
            sigkilled_holder_is_recovered("write")
        }),
        ("sigkilled_read_holder_is_recovered", || {
            sigkilled_holder_is_recovered("read")
        }),
        (
            "sigkilled_chunk_holder_is_recovered",
            sigkilled_chunk_holder_is_recovered,
        ),
        (
            "sigkilled_large_value_writer_blocks_nobody",
            sigkilled_value_writer_blocks_nobody,
        ),
        (
            "garbage_and_corrupted_segments_are_corrupt",
            garbage_and_corrupted_segments_are_corrupt,
        ),
        ("value_api_in_one_process", value_api_in_one_process),
        ("array_api_in_one_process", array_api_in_one_process),
        (
            "guards_exclude_each_other_across_handles",
            guards_exclude_each_other,
        ),
    ];
    common::run(trials, child_main);
}

/// Waits until `cond` holds, failing the trial after [`WATCHDOG`] or if a
/// child exits early.
fn wait_for(what: &str, procs: &mut [Proc], mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WATCHDOG;
    while !cond() {
        for p in procs.iter_mut() {
            if p.poll().is_some() {
                panic!("while waiting for {what}: {}", p.describe_failure());
            }
        }
        assert!(Instant::now() < deadline, "watchdog: {what} never happened");
        thread::sleep(Duration::from_millis(1));
    }
}

/// Start barrier: `ready` counts children in, `go` lets them run.
struct Barrier {
    ready: Segment,
    go: Segment,
}

impl Barrier {
    fn new() -> Barrier {
        let b = Barrier {
            ready: Segment::new("ready"),
            go: Segment::new("go"),
        };
        Value::<u64>::open(b.ready.name(), 0).expect("ready");
        Value::<u64>::open(b.go.name(), 0).expect("go");
        b
    }
    fn args(&self) -> [String; 2] {
        [self.ready.arg(), self.go.arg()]
    }
    /// Parent side: wait until `n` children are ready, then let them go.
    fn release(&self, n: u64, procs: &mut [Proc]) {
        let ready = Value::<u64>::open(self.ready.name(), 0).expect("ready");
        wait_for("children ready", procs, || ready.load() == n);
        Value::<u64>::open(self.go.name(), 0).expect("go").store(1);
    }
}

/// Child side of [`Barrier`].
fn child_barrier(ready: &str, go: &str) {
    let go = Value::<u64>::open(go, 0).expect("go");
    Value::<u64>::open(ready, 0).expect("ready").fetch_add(1);
    let deadline = Instant::now() + WATCHDOG;
    while go.load() == 0 {
        assert!(Instant::now() < deadline, "barrier: no go");
        thread::yield_now();
    }
}

fn is_incompatible<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    match r {
        Err(e @ Error::Incompatible { .. }) => e.to_string(),
        other => panic!("expected Incompatible, got {other:?}"),
    }
}

fn is_corrupt<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    match r {
        Err(e @ Error::Corrupt { .. }) => e.to_string(),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Child roles
// ---------------------------------------------------------------------------

fn child_main(role: &str, args: &[String]) {
    let arg = |i: usize| -> &str {
        args.get(i)
            .unwrap_or_else(|| panic!("{role}: argument {i}"))
            .as_str()
    };
    let num = |i: usize| -> u64 { arg(i).parse().expect("number") };
    match role {
        "fetch_add" => {
            let v = Value::<u64>::open(arg(0), 0).expect("open");
            child_barrier(arg(1), arg(2));
            for i in 0..num(3) {
                v.fetch_add(1);
                if i % 4096 == 0 {
                    thread::yield_now(); // interleave even on one core
                }
            }
        }
        "update_large" => {
            let v = Value::<[u64; 5]>::open(arg(0), [0; 5]).expect("open");
            child_barrier(arg(1), arg(2));
            for i in 0..num(3) {
                v.update(|mut a| {
                    for (k, x) in a.iter_mut().enumerate() {
                        *x += k as u64 + 1;
                    }
                    a
                });
                if i % 1024 == 0 {
                    thread::yield_now();
                }
            }
        }
        "torn_writer" => {
            let v = Value::<[u64; 4]>::open(arg(0), [0; 4]).expect("open");
            let stop = Value::<u64>::open(arg(1), 0).expect("stop");
            let id = num(2);
            let mut k = id << 48;
            while stop.load() == 0 {
                k += 1;
                v.store([k; 4]);
                if k % 256 == 0 {
                    thread::yield_now();
                }
            }
        }
        "torn_reader" => {
            let v = Value::<[u64; 4]>::open(arg(0), [0; 4]).expect("open");
            let stop = Value::<u64>::open(arg(1), 0).expect("stop");
            let reads = Value::<u64>::open(arg(2), 0).expect("reads");
            let changes = Value::<u64>::open(arg(3), 0).expect("changes");
            let mut last = [0u64; 4];
            let (mut n, mut c) = (0, 0);
            while stop.load() == 0 {
                let x = v.load();
                assert!(x.iter().all(|&w| w == x[0]), "torn read: {x:x?}");
                if x != last {
                    c += 1;
                    last = x;
                }
                n += 1;
            }
            reads.fetch_add(n);
            changes.fetch_add(c);
        }
        "fill_chunk" => {
            let a = Array::<f64>::open(arg(0), FILL_LEN).expect("open");
            let (i, n) = (num(3) as usize, num(4) as usize);
            child_barrier(arg(1), arg(2));
            let mut chunk = a.chunk_mut(i, n).expect("chunk");
            let start = chunk.start();
            for (j, x) in chunk.iter_mut().enumerate() {
                *x = (start + j) as f64;
            }
        }
        "open_wrong" => {
            let name = arg(0);
            is_incompatible(Array::<u64>::open(name, 16));
            is_incompatible(Array::<f32>::open(name, 16));
            is_incompatible(Array::<[u8; 8]>::open(name, 16));
            is_incompatible(Array::<f64>::open(name, 17));
            is_incompatible(Array::<f64>::open(name, 0));
            is_incompatible(Value::<f64>::open(name, 0.0));
            is_incompatible(ShmDict::open(name));
            assert_eq!(
                Array::<f64>::open(name, 16).expect("right type").get(3),
                3.0
            );
        }
        "open_race" => {
            let v = Value::<u64>::open(arg(0), 1000 * num(3)).expect("open");
            child_barrier(arg(1), arg(2));
            let v2 = Value::<u64>::open(arg(0), 0).expect("open again");
            v2.fetch_add(1);
            drop(v);
        }
        "hold" => {
            let a = Array::<u64>::open(arg(0), 1000).expect("open");
            let held = Value::<u64>::open(arg(1), 0).expect("held");
            match arg(2) {
                "write" => {
                    let mut g = a.write();
                    g[..500].fill(7); // half done when killed
                    held.store(1);
                    thread::sleep(WATCHDOG * 2);
                }
                "read" => {
                    let g = a.read();
                    held.store(1);
                    thread::sleep(WATCHDOG * 2);
                    drop(g);
                }
                "chunk" => {
                    let mut g = a.chunk_mut(1, 4).expect("chunk");
                    g.fill(9);
                    held.store(1);
                    thread::sleep(WATCHDOG * 2);
                }
                other => panic!("hold {other}?"),
            }
        }
        "value_writer" => {
            let v = Value::<[u64; 4]>::open(arg(0), [0; 4]).expect("open");
            let held = Value::<u64>::open(arg(1), 0).expect("held");
            let mut k = 0u64;
            loop {
                k += 1;
                v.store([k; 4]);
                if k == 1000 {
                    held.store(1);
                }
            }
        }
        other => panic!("unknown child role {other}"),
    }
}

// ---------------------------------------------------------------------------
// Trials
// ---------------------------------------------------------------------------

fn value_fetch_add_loses_nothing() {
    let seg = Segment::new("adds");
    let v = Value::<u64>::options()
        .create_new(true)
        .open(seg.name(), 0)
        .expect("create");
    let b = Barrier::new();
    let [ready, go] = b.args();
    let mut procs: Vec<Proc> = (0..WORKERS)
        .map(|i| {
            Proc::spawn(
                format!("adder {i}"),
                "fetch_add",
                &[seg.arg(), ready.clone(), go.clone(), ADDS.to_string()],
            )
        })
        .collect();
    b.release(WORKERS, &mut procs);
    wait_all(&mut procs);
    assert_eq!(v.load(), WORKERS * ADDS, "lost increments");
}

fn value_large_update_loses_nothing() {
    const UPDATES: u64 = 20_000;
    let seg = Segment::new("upd");
    let v = Value::<[u64; 5]>::open(seg.name(), [0; 5]).expect("create");
    assert!(!v.is_lock_free());
    let b = Barrier::new();
    let [ready, go] = b.args();
    let mut procs: Vec<Proc> = (0..WORKERS)
        .map(|i| {
            Proc::spawn(
                format!("updater {i}"),
                "update_large",
                &[seg.arg(), ready.clone(), go.clone(), UPDATES.to_string()],
            )
        })
        .collect();
    b.release(WORKERS, &mut procs);
    wait_all(&mut procs);
    let n = WORKERS * UPDATES;
    assert_eq!(v.load(), [n, 2 * n, 3 * n, 4 * n, 5 * n], "lost updates");
}

fn value_of_32_bytes_never_tears() {
    let seg = Segment::new("torn");
    let stop = Segment::new("stop");
    let reads = Segment::new("reads");
    let changes = Segment::new("changes");
    let v = Value::<[u64; 4]>::open(seg.name(), [0; 4]).expect("create");
    let stop_v = Value::<u64>::open(stop.name(), 0).expect("stop");
    let reads_v = Value::<u64>::open(reads.name(), 0).expect("reads");
    let changes_v = Value::<u64>::open(changes.name(), 0).expect("changes");
    let mut procs = vec![
        Proc::spawn(
            "writer 1",
            "torn_writer",
            &[seg.arg(), stop.arg(), "1".into()],
        ),
        Proc::spawn(
            "writer 2",
            "torn_writer",
            &[seg.arg(), stop.arg(), "2".into()],
        ),
        Proc::spawn(
            "reader 1",
            "torn_reader",
            &[seg.arg(), stop.arg(), reads.arg(), changes.arg()],
        ),
        Proc::spawn(
            "reader 2",
            "torn_reader",
            &[seg.arg(), stop.arg(), reads.arg(), changes.arg()],
        ),
    ];
    // The parent reads too, for about a second after the writers started.
    wait_for("the first write", &mut procs, || v.load() != [0; 4]);
    let until = Instant::now() + Duration::from_secs(1);
    let mut mine = 0u64;
    while Instant::now() < until {
        let x = v.load();
        assert!(x.iter().all(|&w| w == x[0]), "torn read in parent: {x:x?}");
        mine += 1;
    }
    stop_v.store(1);
    wait_all(&mut procs);
    let (n, c) = (reads_v.load(), changes_v.load());
    eprintln!("  {n} child reads ({c} changes seen), {mine} parent reads, no torn value");
    assert!(n > 0 && c > 1, "the readers saw the value change");
}

fn array_chunks_filled_by_many_processes() {
    let seg = Segment::new("fill");
    let a = Array::<f64>::open(seg.name(), FILL_LEN).expect("create");
    let b = Barrier::new();
    let [ready, go] = b.args();
    let mut procs: Vec<Proc> = (0..WORKERS)
        .map(|i| {
            Proc::spawn(
                format!("filler {i}"),
                "fill_chunk",
                &[
                    seg.arg(),
                    ready.clone(),
                    go.clone(),
                    i.to_string(),
                    WORKERS.to_string(),
                ],
            )
        })
        .collect();
    b.release(WORKERS, &mut procs);
    wait_all(&mut procs);
    let g = with_watchdog("read after the fill", {
        let name = seg.arg();
        move || {
            let a = Array::<f64>::open(&name, FILL_LEN).expect("open");
            let g = a.read();
            assert!(!g.recovered());
            let sum: f64 = g.iter().sum();
            let wrong = g.iter().enumerate().position(|(j, &x)| x != j as f64);
            (sum, wrong)
        }
    });
    let n = FILL_LEN as f64;
    assert_eq!(g.1, None, "an element was not written by its chunk's owner");
    // Every partial sum is an integer below 2^53: exact in f64.
    assert_eq!(g.0, n * (n - 1.0) / 2.0);
    assert_eq!(a.get(FILL_LEN - 1), n - 1.0);
}

fn wrong_type_length_or_kind_is_incompatible() {
    let seg = Segment::new("wrong");
    let a = Array::<f64>::open(seg.name(), 16).expect("create");
    a.set(3, 3.0);
    let mut p = [Proc::spawn("checker", "open_wrong", &[seg.arg()])];
    wait_all(&mut p);
    let msg = is_incompatible(Array::<u64>::open(seg.name(), 16));
    assert!(
        msg.contains(seg.name()) && msg.contains("f64") && msg.contains("u64"),
        "{msg}"
    );
    let msg = is_incompatible(Array::<f64>::open(seg.name(), 3));
    assert!(msg.contains("16 elements"), "{msg}");
    // Each kind refuses the others.
    let v = Segment::new("wrong-v");
    Value::<u64>::open(v.name(), 1).expect("value");
    is_incompatible(Array::<u64>::open(v.name(), 1));
    is_incompatible(Value::<i64>::open(v.name(), 1));
    is_incompatible(Value::<[u8; 8]>::open(v.name(), [0; 8]));
    let msg = is_incompatible(ShmDict::open(v.name()));
    assert!(msg.contains("Value"), "{msg}");
    let d = Segment::new("wrong-d");
    ShmDict::options()
        .capacity(16)
        .arena_bytes(1 << 16)
        .open(d.name())
        .expect("dict");
    let msg = is_incompatible(Value::<u64>::open(d.name(), 0));
    assert!(msg.contains("dictionary"), "{msg}");
    is_incompatible(Array::<u8>::open(d.name(), 10));
}

fn simultaneous_open_shares_one_segment() {
    let seg = Segment::new("race");
    let b = Barrier::new();
    let [ready, go] = b.args();
    let mut procs: Vec<Proc> = (1..=WORKERS)
        .map(|i| {
            Proc::spawn(
                format!("opener {i}"),
                "open_race",
                &[seg.arg(), ready.clone(), go.clone(), i.to_string()],
            )
        })
        .collect();
    b.release(WORKERS, &mut procs);
    wait_all(&mut procs);
    let v = Value::<u64>::open(seg.name(), 0).expect("open");
    let got = v.load();
    let init = got - WORKERS;
    assert!(
        init % 1000 == 0 && (1..=WORKERS).contains(&(init / 1000)),
        "value {got}: not one creator's init plus {WORKERS} increments"
    );
}

fn sigkilled_holder_is_recovered(how: &'static str) {
    let seg = Segment::new("kill");
    let held = Segment::new("held");
    let a = Array::<u64>::open(seg.name(), 1000).expect("create");
    let held_v = Value::<u64>::open(held.name(), 0).expect("held");
    let mut p = [Proc::spawn(
        format!("{how} holder"),
        "hold",
        &[seg.arg(), held.arg(), how.into()],
    )];
    wait_for("the child's guard", &mut p, || held_v.load() == 1);
    p[0].kill();
    let name = seg.arg();
    with_watchdog(
        &format!("write() after the {how} holder's death"),
        move || {
            let a = Array::<u64>::open(&name, 1000).expect("open");
            let mut g = a.write();
            assert!(g.recovered(), "the dead holder is reported");
            if how == "write" {
                assert_eq!(g[499], 7, "the dead writer's half-done work is visible");
                assert_eq!(g[500], 0);
            }
            g.fill(1);
            drop(g);
            let g = a.write();
            assert!(!g.recovered(), "reported once");
            drop(g);
            assert_eq!(a.read().iter().sum::<u64>(), 1000);
        },
    );
    assert_eq!(a.get(999), 1);
}

fn sigkilled_chunk_holder_is_recovered() {
    let seg = Segment::new("killc");
    let held = Segment::new("heldc");
    let _a = Array::<u64>::open(seg.name(), 1000).expect("create");
    let held_v = Value::<u64>::open(held.name(), 0).expect("held");
    let mut p = [Proc::spawn(
        "chunk holder",
        "hold",
        &[seg.arg(), held.arg(), "chunk".into()],
    )];
    wait_for("the child's chunk", &mut p, || held_v.load() == 1);
    p[0].kill();
    let name = seg.arg();
    with_watchdog("chunks after the chunk holder's death", move || {
        let a = Array::<u64>::open(&name, 1000).expect("open");
        let other = a.chunk_mut(0, 4).expect("a disjoint chunk");
        assert!(
            !other.recovered(),
            "a disjoint chunk was not the dead one's"
        );
        let mut g = a.chunk_mut(1, 4).expect("the dead holder's chunk");
        assert!(g.recovered(), "the dead holder's claim is reported");
        assert_eq!(g.range(), 250..500);
        assert!(g.iter().all(|&x| x == 9));
        g.fill(2);
        drop((g, other));
        let r = a.read();
        assert!(r.recovered(), "the dead holder's shared hold is reported");
        assert_eq!(r.iter().sum::<u64>(), 500);
    });
}

fn sigkilled_value_writer_blocks_nobody() {
    for round in 0..3 {
        let seg = Segment::new("killv");
        let held = Segment::new("heldv");
        let v = Value::<[u64; 4]>::open(seg.name(), [0; 4]).expect("create");
        let held_v = Value::<u64>::open(held.name(), 0).expect("held");
        let mut p = [Proc::spawn(
            format!("value writer {round}"),
            "value_writer",
            &[seg.arg(), held.arg()],
        )];
        wait_for("the writer's 1000th store", &mut p, || held_v.load() == 1);
        // Kill at an arbitrary point, possibly holding the writers' lock or
        // in the middle of a slot.
        thread::sleep(Duration::from_micros(100 * round));
        p[0].kill();
        let x = v.load();
        assert!(x.iter().all(|&w| w == x[0]), "torn after kill: {x:?}");
        let name = seg.arg();
        with_watchdog("stores after the writer's death", move || {
            let v = Value::<[u64; 4]>::open(&name, [0; 4]).expect("open");
            v.store([u64::MAX; 4]);
            assert_eq!(v.load(), [u64::MAX; 4]);
            assert_eq!(v.update(|a| a.map(|w| w - 1)), [u64::MAX - 1; 4]);
        });
    }
}

fn garbage_and_corrupted_segments_are_corrupt() {
    let write_file = |name: &str, bytes: &[u8]| {
        let path = format!("/dev/shm/{name}");
        std::fs::write(&path, bytes).expect("write /dev/shm");
        // Private, as shmdict creates segments: otherwise the open is
        // refused (PermissionDenied, 0644 grants more than 0600) before the
        // contents are looked at.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    };
    // Garbage of various sizes.
    let mut state = 0x1234_5678u64;
    let garbage: Vec<u8> = (0..400_000)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            (state >> 33) as u8
        })
        .collect();
    for len in [0, 7, 100, 4096, 300_000, 400_000] {
        let seg = Segment::new("garbage");
        write_file(seg.name(), &garbage[..len]);
        is_corrupt(Array::<u64>::open(seg.name(), 10));
        is_corrupt(Value::<u64>::open(seg.name(), 0));
        is_corrupt(Value::<[u64; 4]>::open(seg.name(), [0; 4]));
    }
    // A valid header with one field damaged at a time.
    const TOTAL: u64 = 24;
    const DATA_OFF: u64 = 64;
    const DATA_BYTES: u64 = 72;
    const ELEM_SIZE: u64 = 32;
    for (field, value, expect_corrupt) in [
        (TOTAL, 1 << 40, true),
        (DATA_OFF, 8, true),
        (DATA_BYTES, u64::MAX, true),
        (0, 0, true),             // magic
        (ELEM_SIZE, 16, false),   // another type: Incompatible
        (8, 99 | 3 << 32, false), // another format version
        (104, 77, false),         // another layout version
        (16, 1 << 62, true),      // header size
    ] {
        let seg = Segment::new("damaged");
        drop(Array::<u64>::open(seg.name(), 100).expect("create"));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/dev/shm/{}", seg.name()))
            .expect("open file");
        f.write_all_at(&value.to_le_bytes(), field).expect("damage");
        let r = Array::<u64>::open(seg.name(), 100);
        if expect_corrupt {
            is_corrupt(r);
        } else {
            is_incompatible(r);
        }
    }
    // Truncated and extended files.
    for new_len in [4096, 266_240, 266_240 + 400, 266_240 + 808] {
        let seg = Segment::new("resized");
        drop(Array::<u64>::open(seg.name(), 100).expect("create"));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/dev/shm/{}", seg.name()))
            .expect("open file");
        f.set_len(new_len).expect("resize");
        is_corrupt(Array::<u64>::open(seg.name(), 100));
    }
}

fn value_api_in_one_process() {
    let seg = Segment::new("api-v");
    let n = seg.name();
    // Integers: wrapping like std.
    let v = Value::<u8>::open(n, 250).expect("u8");
    assert!(v.is_lock_free());
    assert_eq!(v.fetch_add(10), 250);
    assert_eq!(v.load(), 4);
    assert_eq!(v.fetch_sub(5), 4);
    assert_eq!(v.load(), 255);
    assert_eq!(v.fetch_and(0x0f), 255);
    assert_eq!(v.fetch_or(0x30), 0x0f);
    assert_eq!(v.fetch_xor(0xff), 0x3f);
    assert_eq!(v.fetch_max(1), 0xc0);
    assert_eq!(v.fetch_min(1), 0xc0);
    assert_eq!(v.load(), 1);
    drop(v);
    Value::<u8>::unlink(n).expect("unlink");
    let v = Value::<i16>::open(n, -5).expect("i16");
    assert_eq!(v.fetch_max(-7), -5);
    assert_eq!(v.fetch_min(-7), -5);
    assert_eq!(v.load(), -7);
    assert_eq!(v.compare_exchange(-7, 9), Ok(-7));
    assert_eq!(v.compare_exchange(-7, 10), Err(9));
    assert_eq!(v.swap(3), 9);
    assert_eq!(v.update(|x| x * 2), 6);
    drop(v);
    Value::<u8>::unlink(n).expect("unlink");
    // Floats, odd sizes, a zero-sized type.
    let f = Value::<f64>::open(n, 0.5).expect("f64");
    assert_eq!(f.update(|x| x + 0.25), 0.75);
    drop(f);
    Value::<u8>::unlink(n).expect("unlink");
    let odd = Value::<[u8; 3]>::open(n, [1, 2, 3]).expect("[u8; 3]");
    assert!(!odd.is_lock_free());
    assert_eq!(odd.load(), [1, 2, 3]);
    assert_eq!(odd.swap([4, 5, 6]), [1, 2, 3]);
    assert_eq!(odd.compare_exchange([1, 2, 3], [0; 3]), Err([4, 5, 6]));
    assert_eq!(odd.compare_exchange([4, 5, 6], [7; 3]), Ok([4, 5, 6]));
    assert_eq!(odd.update(|a| a.map(|x| x + 1)), [8; 3]);
    let again = Value::<[u8; 3]>::open(n, [0; 3]).expect("attach");
    assert_eq!(again.load(), [8; 3], "init is ignored when attaching");
    drop((odd, again));
    Value::<u8>::unlink(n).expect("unlink");
    let unit = Value::<()>::open(n, ()).expect("()");
    unit.store(());
    assert_eq!(unit.compare_exchange((), ()), Ok(()));
    drop(unit);
    Value::<u8>::unlink(n).expect("unlink");
    // Options, names, unlink.
    let v = Value::<u32>::options()
        .mode(0o640)
        .create_new(true)
        .open(n, 7)
        .expect("create_new");
    let mode = std::fs::metadata(format!("/dev/shm/{n}"))
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o640, "mode applied exactly");
    assert!(matches!(
        Value::<u32>::options().create_new(true).open(n, 0),
        Err(Error::AlreadyExists { .. })
    ));
    assert!(format!("{v:?}").contains(n));
    assert_eq!(v.name(), n);
    Value::<u32>::unlink(n).expect("unlink");
    assert!(matches!(
        Value::<u32>::unlink(n),
        Err(Error::NotFound { .. })
    ));
    assert_eq!(
        v.fetch_add(1),
        7,
        "attached handles keep working after unlink"
    );
    for bad in ["", "a/b", "..", &"x".repeat(201)] {
        assert!(matches!(
            Value::<u32>::open(bad, 0),
            Err(Error::InvalidName { .. })
        ));
        assert!(matches!(
            Array::<u32>::unlink(bad),
            Err(Error::InvalidName { .. })
        ));
    }
    assert!(matches!(
        Value::<u32>::options().mode(0o10000).open(n, 0),
        Err(Error::InvalidArgument { .. })
    ));
}

fn array_api_in_one_process() {
    let seg = Segment::new("api-a");
    let n = seg.name();
    let a = Array::<i32>::open(n, 10).expect("create");
    assert_eq!((a.len(), a.is_empty()), (10, false));
    assert_eq!(a.to_vec(), vec![0; 10], "zero-filled");
    a.set(2, -4);
    assert_eq!(a.get(2), -4);
    {
        let mut w = a.write();
        assert!(!w.recovered());
        w.copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    }
    assert_eq!(a.read().iter().sum::<i32>(), 55);
    // Several readers at once.
    let (r1, r2) = (a.read(), a.read());
    assert_eq!(r1[9] + r2[0], 11);
    drop((r1, r2));
    // Chunks.
    assert_eq!(a.chunk_range(0, 3), Some(0..3));
    assert_eq!(a.chunk_range(2, 3), Some(6..10));
    assert_eq!(a.chunk_range(3, 3), None);
    {
        let mut c0 = a.chunk_mut(0, 2).expect("chunk 0");
        let mut c1 = a.chunk_mut(1, 2).expect("chunk 1");
        assert_eq!((c0.range(), c1.range()), (0..5, 5..10));
        c0.fill(1);
        c1.fill(2);
        let empty = a.range_mut(3..3).expect("an empty range overlaps nothing");
        assert!(empty.is_empty());
        assert!(format!("{c0:?}").contains("0..5"));
    }
    assert_eq!(a.to_vec(), [1, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
    assert!(matches!(
        a.chunk_mut(2, 2),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        a.chunk_mut(0, 0),
        Err(Error::InvalidArgument { .. })
    ));
    #[allow(clippy::reversed_empty_ranges)]
    let backwards = 5..4;
    assert!(matches!(
        a.range_mut(backwards),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        a.range_mut(8..11),
        Err(Error::InvalidArgument { .. })
    ));
    // The claim table holds 64 chunks at once.
    {
        let big = Segment::new("api-big");
        let b = Array::<u8>::open(big.name(), 100).expect("create");
        let guards: Vec<_> = (0..64)
            .map(|i| b.range_mut(i..i + 1).expect("claim"))
            .collect();
        assert!(matches!(b.range_mut(70..71), Err(Error::Full { .. })));
        drop(guards);
        assert!(b.range_mut(70..71).is_ok(), "room again");
    }
    // Out-of-range get/set panic (the one allowed panic), and the lock is
    // released while unwinding.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {})); // expected panics: no noise
    for i in [10, usize::MAX] {
        let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| a.get(i)));
        assert!(got.is_err(), "get({i}) must panic");
        let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| a.set(i, 0)));
        assert!(got.is_err(), "set({i}) must panic");
    }
    std::panic::set_hook(hook);
    a.set(0, 5);
    assert_eq!(a.get(0), 5);
    // Empty arrays and big elements.
    let e = Segment::new("api-empty");
    let empty = Array::<u64>::open(e.name(), 0).expect("empty");
    assert!(empty.is_empty() && empty.read().is_empty() && empty.write().is_empty());
    let w = Segment::new("api-wide");
    let wide = Array::<[u64; 8]>::open(w.name(), 3).expect("wide");
    wide.set(1, [7; 8]);
    assert_eq!(wide.get(1), [7; 8]);
    assert_eq!(wide.get(2), [0; 8]);
    // Huge lengths are refused, not overflowed.
    let h = Segment::new("api-huge");
    assert!(matches!(
        Array::<u64>::open(h.name(), usize::MAX / 2),
        Err(Error::InvalidArgument { .. })
    ));
    // A sparse 1 GiB array costs nothing until written.
    let s = Segment::new("api-sparse");
    let sparse = Array::<u8>::open(s.name(), 1 << 30).expect("sparse");
    sparse.set((1 << 30) - 1, 1);
    assert_eq!(sparse.get((1 << 30) - 1), 1);
}

fn guards_exclude_each_other() {
    let seg = Segment::new("excl");
    let name = seg.arg();
    with_watchdog("guard exclusion", move || {
        let a = Array::<u64>::open(&name, 100).expect("create");
        // Another handle, as another process would have.
        let b = Arc::new(Array::<u64>::open(&name, 100).expect("attach"));
        let acquired = Arc::new(AtomicBool::new(false));
        // Hold a guard in this thread, contend from another handle in
        // another thread: the contender must wait until the guard drops.
        for (hold, contend) in [
            ("write", "read"),
            ("write", "write"),
            ("write", "get"),
            ("read", "write"),
            ("read", "set"),
            ("read", "chunk0"),
            ("chunk0", "read"),
            ("chunk0", "write"),
            ("chunk0", "chunk0"),
            ("chunk0", "get"),
            ("write", "chunk1"),
        ] {
            acquired.store(false, Ordering::SeqCst);
            let (mut w, mut r, mut c) = (None, None, None);
            match hold {
                "write" => w = Some(a.write()),
                "read" => r = Some(a.read()),
                _ => c = Some(a.chunk_mut(0, 2).expect("chunk")),
            }
            let (b2, flag) = (b.clone(), acquired.clone());
            let t = thread::spawn(move || {
                match contend {
                    "read" => drop(b2.read()),
                    "write" => drop(b2.write()),
                    "get" => drop(b2.get(1)),
                    "set" => b2.set(1, 1),
                    "chunk0" => drop(b2.chunk_mut(0, 2).expect("chunk")),
                    _ => drop(b2.chunk_mut(1, 2).expect("chunk")),
                }
                flag.store(true, Ordering::SeqCst);
            });
            thread::sleep(Duration::from_millis(150));
            assert!(
                !acquired.load(Ordering::SeqCst),
                "{contend} was granted while {hold} was held"
            );
            drop((w, r, c));
            t.join().expect("contender");
            assert!(acquired.load(Ordering::SeqCst));
        }
        // Compatible pairs proceed while the first is held.
        let r = a.read();
        drop(b.read());
        assert_eq!(b.get(1), 1);
        drop(r);
        let c = a.chunk_mut(0, 2).expect("chunk");
        drop(b.chunk_mut(1, 2).expect("disjoint chunk"));
        drop(c);
    });
}
