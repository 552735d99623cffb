//! `shmdict::pool`: `Pool::map`, `critical`, `ordered`, failures, `spawn`,
//! with real worker processes.
//!
//! A pool forks, and refuses to fork a multi-threaded process. So each trial
//! runs in a fresh, single-threaded process: the test binary re-executes
//! itself (`argv[1] == "--pool-trial"`, `argv[2]` = the trial) in a process
//! group of its own. The runner (libtest-mimic, which may use threads: it
//! never forks) is the watchdog: a trial that does not finish in
//! [`WATCHDOG`] has its whole process group (the trial and its workers)
//! killed and fails. After every trial the runner checks that no segment
//! named after the trial's pid is left in /dev/shm (the pool's private
//! segments and the trial's own), and removes any it finds.
//!
//! There are no timing assertions: waits are bounded only by the watchdog
//! or by generous timeouts whose expiry is itself the failure.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use shmdict::pool::{self, Pool, PoolError};
use shmdict::ShmDict;

const TRIAL_FLAG: &str = "--pool-trial";
/// Turns a hang into a failure; far beyond a normal run.
const WATCHDOG: Duration = Duration::from_secs(60);

type TrialFn = fn();

fn trials() -> Vec<(&'static str, TrialFn)> {
    vec![
        (
            "map_reduces_every_result_with_its_index",
            map_reduces_every_result,
        ),
        ("collect_returns_results_in_item_order", collect_in_order),
        ("empty_map_forks_nothing", empty_map),
        (
            "reduce_runs_in_the_parent_as_results_arrive",
            reduce_runs_as_results_arrive,
        ),
        (
            "worker_panic_is_an_error_naming_the_item",
            worker_panic_names_item,
        ),
        ("panic_in_init_is_reported", init_panic),
        (
            "sigkilled_worker_is_reported_with_item_and_signal",
            sigkilled_worker,
        ),
        (
            "worker_killed_from_outside_is_reported",
            worker_killed_from_outside,
        ),
        ("worker_exiting_mid_item_is_reported", worker_exits_mid_item),
        (
            "busy_worker_killed_at_random_moments_never_hangs",
            busy_worker_killed_at_random,
        ),
        (
            "critical_sections_lose_no_increment",
            critical_loses_nothing,
        ),
        (
            "worker_killed_inside_critical_releases_it",
            killed_inside_critical,
        ),
        ("ordered_sections_run_in_item_order", ordered_in_order),
        (
            "ordered_with_skipped_items_and_guided_chunks",
            ordered_with_skips,
        ),
        (
            "ordered_waiters_are_released_when_a_predecessor_dies",
            ordered_predecessor_dies,
        ),
        ("pool_is_usable_after_a_failed_map", usable_after_failure),
        ("misused_sections_fail_the_item", misused_sections),
        ("panic_in_reduce_reaps_every_worker", reduce_panics),
        ("multithreaded_caller_is_refused", multithreaded_refused),
        (
            "shared_array_and_value_across_workers",
            shared_array_and_value,
        ),
        ("spawn_and_join", spawn_and_join),
        (
            "spawned_child_panic_is_an_error_with_its_message",
            spawn_panic,
        ),
        ("spawned_child_killed_is_reported", spawn_killed),
        (
            "a_killed_childs_handle_names_the_child",
            killed_child_handle_is_dead,
        ),
        (
            "workers_exit_and_no_segment_is_left_when_the_parent_is_sigkilled",
            parent_killed_workers_exit,
        ),
        (
            "spawn_on_an_unlinked_name_is_an_error",
            spawn_on_unlinked_name,
        ),
        (
            "spawned_child_accepts_the_mode_its_parent_accepted",
            spawn_accepts_parent_mode,
        ),
    ]
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(TRIAL_FLAG) {
        let name = argv.get(2).expect("trial name");
        let f = trials()
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no trial {name}"))
            .1;
        f();
        return;
    }
    let mut args = Arguments::from_args();
    if args.test_threads.is_none() {
        args.test_threads = Some(1);
    }
    let trials = trials()
        .into_iter()
        .map(|(name, _)| Trial::test(name, move || run_isolated(name)))
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

/// Runs trial `name` in a fresh process group under the watchdog, then
/// checks for (and removes) leftover segments.
fn run_isolated(name: &str) -> Result<(), Failed> {
    let mut child = Command::new(std::env::current_exe().expect("current_exe"))
        .args([TRIAL_FLAG, name])
        .process_group(0)
        .spawn()
        .map_err(|e| format!("spawning the trial: {e}"))?;
    let pid = child.id();
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break Some(st);
        }
        if started.elapsed() > WATCHDOG {
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let leftovers = leftover_segments(pid);
    for f in &leftovers {
        let _ = std::fs::remove_file(format!("/dev/shm/{f}"));
    }
    let Some(status) = status else {
        if let Some(group) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        let _ = child.wait();
        for f in leftover_segments(pid) {
            let _ = std::fs::remove_file(format!("/dev/shm/{f}"));
        }
        return Err(format!("trial hung: killed after {WATCHDOG:?}").into());
    };
    if !status.success() {
        return Err(format!("trial process failed: {status}").into());
    }
    if !leftovers.is_empty() {
        return Err(format!("segments left in /dev/shm: {leftovers:?}").into());
    }
    Ok(())
}

/// Segments of the pool (`shmdict-pool-<pid>-*`, `shmdict-spawn-<pid>-*`)
/// or of a trial (`shmdict-test-pool-<pid>-*`) of process `pid`.
fn leftover_segments(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/dev/shm") {
        for e in dir.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let p = format!("-{pid}-");
            if (n.starts_with("shmdict-pool-")
                || n.starts_with("shmdict-spawn-")
                || n.starts_with("shmdict-test-pool-"))
                && n.contains(&p)
            {
                out.push(n);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Helpers for trials (run in the trial process).
// ---------------------------------------------------------------------------

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique segment name, unlinked (as any kind) when dropped.
struct Name(String);

impl Name {
    fn new(tag: &str) -> Name {
        Name(format!(
            "shmdict-test-pool-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ))
    }
}

impl Drop for Name {
    fn drop(&mut self) {
        let _ = ShmDict::unlink(&self.0);
    }
}

fn square(x: u64) -> u64 {
    x * x + 1
}

/// Kills the calling (worker) process with SIGKILL.
fn die() -> ! {
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    unreachable!("SIGKILL cannot be caught")
}

// ---------------------------------------------------------------------------
// Trials
// ---------------------------------------------------------------------------

fn map_reduces_every_result() {
    let items: Vec<u64> = (0..500).map(|i| i * 7).collect();
    let parent = std::process::id();
    let mut seen = vec![None; items.len()];
    let mut pids = BTreeSet::new();
    Pool::new(3)
        .map(
            items.clone(),
            |w, x| {
                assert_eq!(items[w.index()], x, "the item matches its index");
                (square(x), std::process::id())
            },
            |i, (r, pid): (u64, u32)| {
                assert_eq!(std::process::id(), parent, "reduce runs in the parent");
                assert!(seen[i].is_none(), "item {i} reduced twice");
                seen[i] = Some(r);
                pids.insert(pid);
            },
        )
        .expect("map");
    for (i, r) in seen.iter().enumerate() {
        assert_eq!(*r, Some(square(items[i])), "item {i}");
    }
    assert!(!pids.contains(&parent), "work ran in worker processes");
    assert!(pids.len() <= 3, "at most 3 workers: {pids:?}");
}

fn collect_in_order() {
    let words: Vec<String> = (0..100).map(|i| format!("w{i}")).collect();
    let out = Pool::new(2)
        .chunk_size(3)
        .collect(0..words.len(), |_, i| words[i].to_uppercase())
        .expect("collect");
    let expected: Vec<String> = words.iter().map(|w| w.to_uppercase()).collect();
    assert_eq!(out, expected);
}

fn empty_map() {
    let mut calls = 0;
    Pool::new(2)
        .map(Vec::<u8>::new(), |_, x| x, |_, _: u8| calls += 1)
        .expect("empty map");
    assert_eq!(calls, 0);
}

fn reduce_runs_as_results_arrive() {
    // Items 1.. wait in the workers until the parent has reduced item 0: if
    // reduce ran only after all results were in, they would wait forever
    // (their 30 s timeout is then the failure).
    let name = Name::new("arrive");
    let dict = ShmDict::open(&name.0).expect("open");
    let mut order = Vec::new();
    Pool::new(2)
        .chunk_size(1)
        .map_init(
            0..6u64,
            |_| ShmDict::open(&name.0).expect("open in worker"),
            |d, _, i| {
                if i > 0 {
                    d.wait_for("reduced-0", Duration::from_secs(30))
                        .expect("wait_for")
                        .expect("item 0 was reduced while the map still ran");
                }
                i
            },
            |i, r: u64| {
                assert_eq!(i as u64, r);
                if i == 0 {
                    dict.insert("reduced-0", "yes").expect("insert");
                }
                order.push(i);
            },
        )
        .expect("map");
    assert_eq!(order[0], 0, "item 0 is reduced before the others finish");
    assert_eq!(order.len(), 6);
}

fn worker_panic_names_item() {
    let err = Pool::new(2)
        .map(
            0..50u64,
            |_, i| {
                if i == 17 {
                    panic!("boom on seventeen");
                }
                i
            },
            |_, _: u64| {},
        )
        .expect_err("a panicking item fails the map");
    match &err {
        PoolError::Panicked { item, message } => {
            assert_eq!(*item, Some(17));
            assert!(message.contains("boom on seventeen"), "{message}");
            assert!(message.contains("pool.rs"), "location: {message}");
        }
        other => panic!("expected Panicked, got {other:?}"),
    }
    assert!(err.to_string().contains("item 17"), "{err}");
}

fn init_panic() {
    let err = Pool::new(2)
        .map_init(
            0..4u8,
            |_| -> u8 { panic!("init failed here") },
            |_, _, x| x,
            |_, _: u8| {},
        )
        .expect_err("init panic");
    match err {
        PoolError::Panicked {
            item: None,
            message,
        } => {
            assert!(message.contains("init failed here"), "{message}")
        }
        other => panic!("expected Panicked in init, got {other:?}"),
    }
}

fn sigkilled_worker() {
    let mut reduced = BTreeSet::new();
    let err = Pool::new(2)
        .chunk_size(1)
        .map(
            0..40u64,
            |_, i| {
                if i == 5 {
                    die();
                }
                i
            },
            |i, _: u64| {
                reduced.insert(i);
            },
        )
        .expect_err("a killed worker fails the map");
    match &err {
        PoolError::Killed { item, signal, pid } => {
            assert_eq!(*item, Some(5));
            assert_eq!(*signal, libc::SIGKILL);
            assert_ne!(*pid, std::process::id());
        }
        other => panic!("expected Killed, got {other:?}"),
    }
    assert!(!reduced.contains(&5), "the killed item has no result");
    let msg = err.to_string();
    assert!(msg.contains("SIGKILL") && msg.contains("item 5"), "{msg}");
}

fn worker_killed_from_outside() {
    // Item 3 publishes its pid and sleeps; a spawned killer process waits
    // for the pid and SIGKILLs it.
    let name = Name::new("outside");
    let dict = ShmDict::open(&name.0).expect("open");
    let killer = pool::spawn(&dict, |d| {
        let pid = d
            .typed::<u32>()
            .get("victim")
            .ok()
            .flatten()
            .or_else(|| {
                d.wait_for("victim", Duration::from_secs(30))
                    .ok()
                    .flatten()?;
                d.typed::<u32>().get("victim").ok().flatten()
            })
            .expect("the victim published its pid");
        // Let the victim finish its insert and go to sleep.
        std::thread::sleep(Duration::from_millis(100));
        let pid = rustix::process::Pid::from_raw(pid as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill");
    })
    .expect("spawn killer");
    let err = Pool::new(2)
        .chunk_size(1)
        .map_init(
            0..8u32,
            |_| ShmDict::open(&name.0).expect("open in worker"),
            |d, _, i| {
                if i == 3 {
                    d.typed::<u32>()
                        .insert("victim", &std::process::id())
                        .expect("publish");
                    loop {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                i
            },
            |_, _: u32| {},
        )
        .expect_err("killed from outside");
    killer.join().expect("killer");
    let victim: u32 = dict.typed().get("victim").unwrap().unwrap();
    match err {
        PoolError::Killed { item, signal, pid } => {
            assert_eq!(item, Some(3));
            assert_eq!(signal, libc::SIGKILL);
            assert_eq!(pid, victim);
        }
        other => panic!("expected Killed, got {other:?}"),
    }
}

fn worker_exits_mid_item() {
    let err = Pool::new(2)
        .chunk_size(1)
        .map(
            0..10u8,
            |_, i| {
                if i == 4 {
                    std::process::exit(0);
                }
                i
            },
            |_, _: u8| {},
        )
        .expect_err("an item that exits is not silently dropped");
    match err {
        PoolError::Exited { item, code, .. } => {
            assert_eq!(item, Some(4));
            assert_eq!(code, Some(0));
        }
        other => panic!("expected Exited, got {other:?}"),
    }
}

/// A read-modify-write of a counter that is not atomic: `get`, pause,
/// `insert`.
fn racy_increment(d: &ShmDict) {
    let t = d.typed::<u64>();
    let v = t.get("counter").expect("get").unwrap_or(0);
    std::thread::yield_now();
    t.insert("counter", &(v + 1)).expect("insert");
}

fn critical_loses_nothing() {
    let name = Name::new("critical");
    let dict = ShmDict::open(&name.0).expect("open");
    Pool::new(4)
        .chunk_size(1)
        .map_init(
            0..400u32,
            |_| ShmDict::open(&name.0).expect("open in worker"),
            |d, w, _| w.critical(|| racy_increment(d)),
            |_, ()| {},
        )
        .expect("map");
    assert_eq!(dict.typed::<u64>().get("counter").unwrap(), Some(400));
}

fn killed_inside_critical() {
    let name = Name::new("critical-kill");
    let dict = ShmDict::open(&name.0).expect("open");
    let err = Pool::new(3)
        .chunk_size(1)
        .map_init(
            0..60u32,
            |_| ShmDict::open(&name.0).expect("open in worker"),
            |d, w, i| {
                w.critical(|| {
                    if i == 10 {
                        die();
                    }
                    racy_increment(d)
                })
            },
            |_, ()| {},
        )
        .expect_err("the death is reported");
    assert!(
        matches!(
            err,
            PoolError::Killed {
                item: Some(10),
                signal: libc::SIGKILL,
                ..
            }
        ),
        "{err:?}"
    );
    // The dead worker held the section; other workers entered it after.
    let count = dict.typed::<u64>().get("counter").unwrap().unwrap_or(0);
    assert!(count >= 10, "items 0..10 ran their sections: {count}");
    // And the next map can take the lock at once (a fresh segment).
    Pool::new(2)
        .map(0..4u8, |w, x| w.critical(|| x), |_, _: u8| {})
        .expect("next map");
}

fn append_in_order(name: &str, with_skips: bool, pool: Pool) {
    let dict = ShmDict::open(name).expect("open");
    let n = 60u64;
    pool.map_init(
        0..n,
        |_| ShmDict::open(name).expect("open in worker"),
        |d, w, i| {
            // Uneven work so that items finish out of order.
            std::thread::sleep(Duration::from_micros((i * 7919) % 5 * 300));
            if with_skips && i % 3 == 0 {
                return i;
            }
            w.ordered(|| {
                let log = d.typed::<Vec<u64>>();
                let mut v = log.get("log").expect("get").unwrap_or_default();
                std::thread::yield_now();
                v.push(i);
                log.insert("log", &v).expect("insert");
            });
            i
        },
        |_, _: u64| {},
    )
    .expect("map");
    let log = dict.typed::<Vec<u64>>().get("log").unwrap().unwrap();
    let expected: Vec<u64> = (0..n).filter(|i| !with_skips || i % 3 != 0).collect();
    assert_eq!(log, expected);
}

fn ordered_in_order() {
    let name = Name::new("ordered");
    append_in_order(&name.0, false, Pool::new(3).chunk_size(1));
}

fn ordered_with_skips() {
    let a = Name::new("ordered-skip1");
    append_in_order(&a.0, true, Pool::new(3).chunk_size(1));
    let b = Name::new("ordered-skip-guided");
    append_in_order(&b.0, true, Pool::new(3));
    let c = Name::new("ordered-skip-chunk4");
    append_in_order(&c.0, true, Pool::new(2).chunk_size(4));
}

fn ordered_predecessor_dies() {
    let err = Pool::new(3)
        .chunk_size(1)
        .map(
            0..12u8,
            |w, i| {
                if i == 2 {
                    std::thread::sleep(Duration::from_millis(200));
                    die();
                }
                w.ordered(|| i)
            },
            |_, _: u8| {},
        )
        .expect_err("the death is reported, the waiters released");
    assert!(
        matches!(err, PoolError::Killed { item: Some(2), .. }),
        "{err:?}"
    );
}

fn usable_after_failure() {
    let pool = Pool::new(2);
    assert!(pool
        .map(
            0..10u8,
            |_, i| if i == 3 { die() } else { i },
            |_, _: u8| {}
        )
        .is_err());
    assert!(pool
        .map(
            0..10u8,
            |_, i| if i == 3 { panic!("no") } else { i },
            |_, _: u8| {}
        )
        .is_err());
    let out = pool.collect(0..10u8, |_, i| i * 2).expect("collect");
    assert_eq!(out, (0..10u8).map(|i| i * 2).collect::<Vec<_>>());
}

fn multithreaded_refused() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        let _ = rx.recv();
    });
    let err = Pool::new(2)
        .map(0..4u8, |_, x| x, |_, _: u8| {})
        .expect_err("refused");
    match &err {
        PoolError::MultiThreaded { threads } => assert_eq!(*threads, 2),
        other => panic!("expected MultiThreaded, got {other:?}"),
    }
    assert!(err.to_string().contains("single-threaded"), "{err}");
    let name = Name::new("mt");
    let dict = ShmDict::open(&name.0).expect("open");
    assert!(matches!(
        pool::spawn(&dict, |_| 1u8),
        Err(PoolError::MultiThreaded { .. })
    ));
    drop(tx);
    t.join().unwrap();
    // With the thread gone, the same calls work.
    assert_eq!(
        Pool::new(2).collect(0..4u8, |_, x| x).unwrap(),
        vec![0, 1, 2, 3]
    );
}

fn shared_array_and_value() {
    let a = Name::new("array");
    let v = Name::new("value");
    let n = 1000usize;
    let array = shmdict::Array::<u64>::open(&a.0, n).expect("array");
    let total = shmdict::Value::<u64>::open(&v.0, 0).expect("value");
    Pool::new(2)
        .map_init(
            0..10usize,
            |_| {
                (
                    shmdict::Array::<u64>::open(&a.0, n).expect("array in worker"),
                    shmdict::Value::<u64>::open(&v.0, 0).expect("value in worker"),
                )
            },
            |(array, total), _, chunk| {
                let mut part = array.chunk_mut(chunk, 10).expect("chunk");
                let start = part.start();
                for (j, x) in part.iter_mut().enumerate() {
                    *x = (start + j) as u64;
                }
                let s: u64 = part.iter().sum();
                drop(part);
                total.fetch_add(s);
            },
            |_, ()| {},
        )
        .expect("map");
    let expected: u64 = (0..n as u64).sum();
    assert_eq!(array.read().iter().sum::<u64>(), expected);
    assert_eq!(total.load(), expected);
    drop((array, total));
    shmdict::Array::<u64>::unlink(&a.0).unwrap();
    shmdict::Value::<u64>::unlink(&v.0).unwrap();
}

fn spawn_and_join() {
    let name = Name::new("spawn");
    let dict = ShmDict::open(&name.0).expect("open");
    let captured: Vec<u64> = (1..=3).collect(); // heap data: the child's copy
    let child = pool::spawn(&dict, |d| {
        d.typed::<u32>()
            .insert("child-pid", &std::process::id())
            .expect("insert");
        captured.iter().sum::<u64>()
    })
    .expect("spawn");
    let child_pid = child.pid();
    assert_eq!(child.join().expect("join"), 6);
    assert_eq!(
        dict.typed::<u32>().get("child-pid").unwrap(),
        Some(child_pid)
    );
    assert_ne!(child_pid, std::process::id());
    // Dropped without join: still reaped, no segment left (checked by the
    // runner).
    drop(pool::spawn(&dict, |_| 0u8).expect("spawn"));
}

fn spawn_panic() {
    let name = Name::new("spawn-panic");
    let dict = ShmDict::open(&name.0).expect("open");
    let err = pool::spawn(&dict, |_| -> u8 { panic!("child gave up: {}", 42) })
        .expect("spawn")
        .join()
        .expect_err("panic");
    match err {
        PoolError::Panicked {
            item: None,
            message,
        } => {
            assert!(message.contains("child gave up: 42"), "{message}")
        }
        other => panic!("expected Panicked, got {other:?}"),
    }
}

fn spawn_killed() {
    let name = Name::new("spawn-kill");
    let dict = ShmDict::open(&name.0).expect("open");
    let child = pool::spawn(&dict, |_| -> u8 { die() }).expect("spawn");
    let pid = child.pid();
    match child.join() {
        Err(PoolError::Killed { signal, pid: p, .. }) => {
            assert_eq!(signal, libc::SIGKILL);
            assert_eq!(p, pid);
        }
        other => panic!("expected Killed, got {other:?}"),
    }
}

fn misused_sections() {
    let err = Pool::new(2)
        .map(0..6u8, |w, i| w.ordered(|| w.ordered(|| i)), |_, _: u8| {})
        .expect_err("ordered twice");
    match err {
        PoolError::Worker { item, reason } => {
            assert_eq!(item, Some(0));
            assert!(reason.contains("twice"), "{reason}");
        }
        other => panic!("expected Worker, got {other:?}"),
    }
    let err = Pool::new(2)
        .map(
            0..6u8,
            |w, i| w.critical(|| w.critical(|| i)),
            |_, _: u8| {},
        )
        .expect_err("nested critical");
    assert!(
        matches!(&err, PoolError::Worker { reason, .. } if reason.contains("critical")),
        "{err:?}"
    );
}

fn reduce_panics() {
    let pool = Pool::new(2).chunk_size(1);
    let r = std::panic::catch_unwind(|| {
        pool.map(
            0..20u8,
            |_, i| i,
            |i, _: u8| {
                if i == 3 {
                    panic!("reduce gave up");
                }
            },
        )
    });
    assert!(r.is_err(), "the panic propagates");
    // Every worker was reaped on the way out: this process has no children.
    match rustix::process::waitpid(None, rustix::process::WaitOptions::NOHANG) {
        Err(rustix::io::Errno::CHILD) => {}
        other => panic!("a child is left: {other:?}"),
    }
}

/// Regression: the process identity that handles record was cached before a
/// fork and inherited by the child, so a killed child's handle (and anything
/// it held) looked alive for as long as the parent lived.
fn killed_child_handle_is_dead() {
    let name = Name::new("ident");
    // Opened first, so this process's identity is cached before forking.
    let dict = ShmDict::open(&name.0).expect("open");
    assert_eq!(dict.stats().attached, (1, 0));
    let child = pool::spawn(&dict, |d| -> u8 {
        d.insert("child", "was here").expect("insert");
        die()
    })
    .expect("spawn");
    assert!(matches!(child.join(), Err(PoolError::Killed { .. })));
    assert_eq!(
        dict.get("child").unwrap().as_deref(),
        Some(&b"was here"[..])
    );
    assert_eq!(
        dict.stats().attached,
        (1, 1),
        "the killed child's handle is seen dead (it names the child, not this process)"
    );
}

/// A worker busy with dictionary writes, `critical` and `ordered` sections
/// is SIGKILLed at a different moment in each round (possibly in the middle
/// of a write or holding a section). Each map either completes (the kill
/// came too late) or reports the kill; none hangs (the runner's watchdog),
/// and the dictionary stays usable.
fn busy_worker_killed_at_random() {
    let mut killed = 0;
    for round in 0..12u64 {
        let name = Name::new("busy");
        let dict = ShmDict::open(&name.0).expect("open");
        let delay = Duration::from_micros(500 + (round * 7919) % 20_000);
        let killer = pool::spawn(&dict, move |d| {
            d.wait_for("victim", Duration::from_secs(30))
                .expect("wait_for")
                .expect("the victim published its pid");
            std::thread::sleep(delay);
            let pid: u32 = d.typed().get("victim").unwrap().unwrap();
            let pid = rustix::process::Pid::from_raw(pid as i32).expect("pid");
            // The map may be over (and the victim reaped) by now.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        })
        .expect("spawn killer");
        let mut results = 0;
        let r = Pool::new(2).chunk_size(1).map_init(
            0..400u64,
            |w| {
                let d = ShmDict::open(&name.0).expect("open in worker");
                if w.id() == 0 {
                    d.typed::<u32>()
                        .insert("victim", &std::process::id())
                        .expect("publish");
                }
                d
            },
            |d, w, i| {
                for _ in 0..20 {
                    d.typed::<u64>()
                        .update("updates", |n| Some(n.unwrap_or(0) + 1))
                        .expect("update");
                }
                w.critical(|| racy_increment(d));
                w.ordered(|| d.insert("last", i.to_le_bytes()).expect("insert"));
                i
            },
            |_, _: u64| results += 1,
        );
        let victim: u32 = dict.typed().get("victim").unwrap().unwrap();
        killer.join().expect("killer");
        match r {
            Ok(()) => assert_eq!(results, 400),
            Err(PoolError::Killed { pid, signal, .. }) => {
                assert_eq!(pid, victim);
                assert_eq!(signal, libc::SIGKILL);
                killed += 1;
            }
            Err(e) => panic!("round {round}: unexpected {e:?}"),
        }
        // Whatever the victim held is taken over: every operation works.
        dict.insert("updates", 0u64.to_le_bytes()).expect("insert");
        dict.insert("last", "x").expect("insert");
        racy_increment(&dict);
        drop(dict.lock().expect("lock"));
    }
    eprintln!("busy_worker_killed_at_random_moments: {killed} of 12 maps lost a worker");
    assert!(killed > 0, "at least one round killed a worker mid-map");
}

/// The pool segments (`shmdict-pool-<pid>-*`) of process `pid` in /dev/shm.
fn pool_segments_of(pid: u32) -> Vec<String> {
    let prefix = format!("shmdict-pool-{pid}-");
    std::fs::read_dir("/dev/shm")
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Regression (issue 10, item 6): a map whose parent is SIGKILLed left its
/// workers running forever (the ones waiting in `ordered` for a turn that
/// never comes, the one in a long item until it ends) and its coordination
/// segment in /dev/shm. Now workers die with their parent (parent-death
/// signal) and the parent drops the segment's name once every worker has
/// attached.
///
/// The map runs in a spawned child (the "parent" of the workers), which
/// this trial SIGKILLs. The trial is a child subreaper, so the orphaned
/// workers become its children: it reaps each one and checks how it ended.
fn parent_killed_workers_exit() {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).expect("subreaper");
    let name = Name::new("orphans");
    let dict = ShmDict::open(&name.0).expect("open");
    let dict_name = name.0.clone();
    let parent = pool::spawn(&dict, move |_| {
        let _ = Pool::new(3).chunk_size(1).map(
            0..3u64,
            |w, i| {
                let d = ShmDict::open(&dict_name).expect("open in the worker");
                d.typed::<u32>()
                    .insert(format!("pid/{i}"), &std::process::id())
                    .expect("publish the pid");
                if i == 0 {
                    // A long item: items 1 and 2 wait in `ordered` for it.
                    std::thread::sleep(Duration::from_secs(3600));
                }
                w.ordered(|| ());
                i
            },
            |_, _: u64| {},
        );
    })
    .expect("spawn the map's parent");
    let parent_pid = parent.pid();
    let deadline = Instant::now() + Duration::from_secs(30);
    let pids: Vec<u32> = loop {
        let pids: Vec<Option<u32>> = (0..3)
            .map(|i| dict.typed::<u32>().get(format!("pid/{i}")).unwrap())
            .collect();
        if pids.iter().all(Option::is_some) {
            break pids.into_iter().flatten().collect();
        }
        assert!(Instant::now() < deadline, "the workers never started");
        std::thread::sleep(Duration::from_millis(5));
    };
    // Every worker has attached: the parent drops the segment's name as soon
    // as it sees that. Give it a moment (the old code never drops it).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pool_segments_of(parent_pid).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let ppid = rustix::process::Pid::from_raw(parent_pid as i32).expect("pid");
    rustix::process::kill_process(ppid, rustix::process::Signal::KILL).expect("kill the parent");
    match parent.join() {
        Err(PoolError::Killed { signal, .. }) => assert_eq!(signal, libc::SIGKILL),
        other => panic!("expected the parent killed, got {other:?}"),
    }
    // Every worker must end on its own, promptly; a generous bound turns a
    // worker that outlives its parent into a failure (then it is killed).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut alive: Vec<u32> = Vec::new();
    for &pid in &pids {
        let p = rustix::process::Pid::from_raw(pid as i32).expect("pid");
        loop {
            match rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG) {
                Ok(Some((_, st))) => {
                    assert_eq!(
                        st.terminating_signal(),
                        Some(libc::SIGKILL),
                        "worker {pid} ended by its parent-death signal"
                    );
                    break;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    alive.push(pid);
                    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                    let _ =
                        rustix::process::waitpid(Some(p), rustix::process::WaitOptions::empty());
                    break;
                }
                Err(e) => panic!("worker {pid} is not our child after its parent died: {e}"),
            }
        }
    }
    let left = pool_segments_of(parent_pid);
    for f in &left {
        let _ = std::fs::remove_file(format!("/dev/shm/{f}"));
    }
    assert!(
        alive.is_empty(),
        "workers {alive:?} were still running 20 s after their parent was SIGKILLed"
    );
    assert!(
        left.is_empty(),
        "the killed parent's coordination segment was left in /dev/shm: {left:?}"
    );
}

/// Regression (issue 10, item 6): a spawned child opened its dictionary
/// with create-or-attach, so spawning on a dictionary whose name had been
/// unlinked created a new, empty segment of that name in the child (and
/// left it behind). Now the child attaches only, and `spawn` reports that
/// the name is gone.
fn spawn_on_unlinked_name() {
    let name = Name::new("unlinked");
    let dict = ShmDict::open(&name.0).expect("open");
    ShmDict::unlink(&name.0).expect("unlink");
    let r = pool::spawn(&dict, |d| {
        d.insert("k", "v").expect("insert");
        1u8
    })
    .and_then(|c| c.join());
    let exists = std::path::Path::new(&format!("/dev/shm/{}", name.0)).exists();
    match r {
        Err(PoolError::Shm(shmdict::Error::NotFound { .. })) => {}
        other => panic!("expected NotFound for an unlinked name, got {other:?}"),
    }
    assert!(!exists, "spawn created a new segment named {}", name.0);
}

/// The spawned child attaches the dictionary with the `mode` (and
/// `allow_other_owner`) its parent's handle was opened with: a 0644
/// dictionary the parent opened with `mode(0o644)` is not refused in the
/// child for being more open than the default 0600.
fn spawn_accepts_parent_mode() {
    let name = Name::new("mode");
    let dict = ShmDict::options()
        .capacity(64)
        .arena_bytes(1 << 16)
        .mode(0o644)
        .open(&name.0)
        .expect("create 0644");
    assert!(matches!(
        ShmDict::open(&name.0),
        Err(shmdict::Error::PermissionDenied { .. })
    ));
    let child = pool::spawn(&dict, |d| {
        d.insert("from", "child").expect("insert");
        7u8
    })
    .expect("spawn");
    assert_eq!(child.join().expect("join"), 7);
    assert_eq!(dict.get("from").unwrap().as_deref(), Some(&b"child"[..]));
}
