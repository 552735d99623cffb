//! One suite of `Dict` semantics, run through `Box<dyn Dict>` against every
//! backend: shared memory (`shm:NAME`) always, and with the `redis` feature
//! a private Redis server (`redis://127.0.0.1:PORT/NAME`) started by the
//! test. Every trial is named `BACKEND::TEST`.
//!
//! Children are this binary re-executed (see `common`); they open the same
//! target string. Redis dictionaries are opened with a 1.5 s lease (instead
//! of 10 s) so that the lease-expiry trials stay short.

mod common;
#[cfg(feature = "redis")]
mod redis_server;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::{incr, u64_of, Proc, Rng};
use shmdict::Dict;

/// Lease of the Redis dictionaries opened here.
#[cfg(feature = "redis")]
const TEST_LEASE: Duration = Duration::from_millis(1500);

/// Opens a target as a `Box<dyn Dict>` (Redis: with the test lease).
fn open(target: &str) -> Box<dyn Dict> {
    #[cfg(feature = "redis")]
    if target.starts_with("redis") {
        let (server, name) = target.rsplit_once('/').expect("redis://HOST:PORT/NAME");
        return Box::new(
            shmdict::RedisDict::options()
                .lease(TEST_LEASE)
                .open(server, name)
                .unwrap_or_else(|e| panic!("open {target}: {e}")),
        );
    }
    shmdict::connect(target).unwrap_or_else(|e| panic!("connect {target}: {e}"))
}

/// A fresh dictionary of one backend, and what keeps it alive (a segment
/// name unlinked on drop, or a Redis server killed on drop).
struct Fresh {
    target: String,
    _keep: Box<dyn std::any::Any>,
}

fn fresh_shm() -> Fresh {
    let seg = common::Segment::new("conf");
    Fresh {
        target: format!("shm:{}", seg.name()),
        _keep: Box::new(seg),
    }
}

#[cfg(feature = "redis")]
fn fresh_redis() -> Fresh {
    let server = redis_server::RedisServer::start();
    Fresh {
        target: server.target("conf"),
        _keep: Box::new(server),
    }
}

type Test = fn(&str);
/// A backend: its trial-name prefix and how to get a fresh dictionary.
type Backend = (&'static str, fn() -> Fresh);

const TESTS: &[(&str, Test)] = &[
    ("semantics", semantics),
    ("update_no_lost_increments_4_processes", no_lost_updates),
    ("same_key_races_leave_one_value", same_key_races),
    ("get_or_insert_with_runs_f_once", get_or_insert_once),
    ("wait_for_wakes_and_times_out", wait_for_wakes),
    ("wait_for_write_right_after_check", wait_for_race),
    ("lock_excludes_processes", lock_excludes),
    ("lock_holder_killed_is_replaced", lock_holder_killed),
    ("linearizable_3_process_histories", linearizable),
];

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(common::CHILD_FLAG) {
        child(&argv[2], &argv[3..]);
        return;
    }
    let backends: Vec<Backend> = vec![
        ("shm", fresh_shm),
        #[cfg(feature = "redis")]
        ("redis", fresh_redis),
    ];
    let mut args = libtest_mimic::Arguments::from_args();
    if args.test_threads.is_none() {
        args.test_threads = Some(1);
    }
    let mut trials = Vec::new();
    for (b, make) in backends {
        for &(t, test) in TESTS {
            let name = format!("{b}::{t}");
            let what = name.clone();
            trials.push(libtest_mimic::Trial::test(name, move || {
                let fresh = make();
                let target = fresh.target.clone();
                common::with_watchdog(&what, move || test(&target));
                drop(fresh);
                Ok(())
            }));
        }
    }
    libtest_mimic::run(&args, trials).exit();
}

// --- the tests ---

fn semantics(target: &str) {
    let d = open(target);
    assert_eq!(d.len().expect("len"), 0);
    assert!(d.is_empty().expect("is_empty"));
    assert_eq!(d.get(b"a").expect("get"), None);
    assert!(!d.contains_key(b"a").expect("contains"));
    d.insert(b"a", b"1").expect("insert");
    d.insert(b"a", b"2").expect("overwrite");
    assert_eq!(d.len().expect("len"), 1, "an overwrite is one key");
    assert_eq!(d.get(b"a").expect("get").as_deref(), Some(&b"2"[..]));
    assert!(d.contains_key(b"a").expect("contains"));
    // Binary keys and values, an empty value, a large value.
    let bin_key = [0u8, 255, b'{', b'}', b'*', b'\n'];
    d.insert(&bin_key, &[0, 0, 7]).expect("binary");
    d.insert(b"empty", b"").expect("empty value");
    let big: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
    d.insert(b"big", &big).expect("1 MiB value");
    assert_eq!(
        d.get(&bin_key).expect("get").as_deref(),
        Some(&[0u8, 0, 7][..])
    );
    assert_eq!(d.get(b"empty").expect("get").as_deref(), Some(&b""[..]));
    assert_eq!(d.get(b"big").expect("get"), Some(big));
    assert_eq!(d.len().expect("len"), 4);
    let mut keys = d.keys().expect("keys");
    keys.sort();
    let mut want = vec![
        b"a".to_vec(),
        bin_key.to_vec(),
        b"empty".to_vec(),
        b"big".to_vec(),
    ];
    want.sort();
    assert_eq!(keys, want, "each live key exactly once");
    // update: absent -> stored, present -> changed, None -> removed.
    assert_eq!(
        d.update(b"n", &mut |v| incr(v)).expect("update"),
        Some(1u64.to_le_bytes().to_vec())
    );
    assert_eq!(
        d.update(b"n", &mut |v| incr(v)).expect("update"),
        Some(2u64.to_le_bytes().to_vec())
    );
    assert_eq!(d.update(b"n", &mut |_| None).expect("update"), None);
    assert!(!d.contains_key(b"n").expect("contains"));
    assert_eq!(d.update(b"absent", &mut |_| None).expect("update"), None);
    assert!(!d.contains_key(b"absent").expect("contains"));
    // remove says whether the key was present.
    assert!(d.remove(b"a").expect("remove"));
    assert!(!d.remove(b"a").expect("remove again"));
    assert_eq!(d.len().expect("len"), 3);
    // Many keys: len and keys stay exact.
    for i in 0..500u32 {
        d.insert(format!("k{i}").as_bytes(), &i.to_le_bytes())
            .expect("insert");
    }
    for i in (0..500u32).step_by(2) {
        assert!(d.remove(format!("k{i}").as_bytes()).expect("remove"));
    }
    assert_eq!(d.len().expect("len"), 3 + 250);
    let keys = d.keys().expect("keys");
    assert_eq!(keys.len(), 253);
    assert_eq!(
        keys.iter().collect::<HashSet<_>>().len(),
        253,
        "no duplicates"
    );
    // get_or_insert_with: present -> f not called.
    let v = d
        .get_or_insert_with(b"k1", &mut || panic!("f must not run for a present key"))
        .expect("present");
    assert_eq!(v, 1u32.to_le_bytes());
    let v = d
        .get_or_insert_with(b"memo", &mut || b"computed".to_vec())
        .expect("absent");
    assert_eq!(v, b"computed");
    assert_eq!(
        d.get(b"memo").expect("get").as_deref(),
        Some(&b"computed"[..])
    );
    // The lock: a first acquisition on a fresh dictionary did not recover.
    let g = d.lock().expect("lock");
    assert!(!g.recovered());
    drop(g);
    let g = d.lock().expect("lock again");
    assert!(!g.recovered(), "a released lock is not a recovery");
}

const INCREMENTS: u64 = 300;

fn no_lost_updates(target: &str) {
    let mut procs: Vec<Proc> = (0..4)
        .map(|i| {
            Proc::spawn(
                format!("incrementer {i}"),
                "incr",
                &[target, &INCREMENTS.to_string()],
            )
        })
        .collect();
    common::wait_all(&mut procs);
    let d = open(target);
    let total = d.get(b"ctr").expect("get").map(|v| u64_of(&v));
    assert_eq!(total, Some(4 * INCREMENTS), "lost (or doubled) increments");
    assert_eq!(d.len().expect("len"), 1);
}

fn same_key_races(target: &str) {
    // 4 processes insert and remove the same 50 keys with their own values.
    let mut procs: Vec<Proc> = (0..4)
        .map(|i| Proc::spawn(format!("racer {i}"), "race", &[target, &i.to_string()]))
        .collect();
    common::wait_all(&mut procs);
    let d = open(target);
    let keys = d.keys().expect("keys");
    assert_eq!(d.len().expect("len"), keys.len(), "len exact after races");
    assert_eq!(
        keys.len(),
        50,
        "every key ends inserted (the last op of each racer)"
    );
    for k in &keys {
        let v = d.get(k).expect("get").expect("present");
        assert!(
            v.len() == 9 && v[..8] == k[..] && v[8] < 4,
            "one whole value a racer wrote for this key, never a mix: {k:?} = {v:?}"
        );
    }
}

fn get_or_insert_once(target: &str) {
    let mut procs: Vec<Proc> = (0..4)
        .map(|i| Proc::spawn(format!("memoizer {i}"), "memo", &[target, &i.to_string()]))
        .collect();
    common::wait_all(&mut procs);
    let d = open(target);
    let calls = d.get(b"calls").expect("get").map(|v| u64_of(&v));
    assert_eq!(calls, Some(1), "f ran in exactly one process");
    let memo = d.get(b"memo").expect("get").expect("memo stored");
    for i in 0..4 {
        let seen = d
            .get(format!("seen-{i}").as_bytes())
            .expect("get")
            .expect("each memoizer reports");
        assert_eq!(seen, memo, "memoizer {i} got another value");
    }
}

fn wait_for_wakes(target: &str) {
    let d = open(target);
    // Timeout: None, and not before the timeout.
    let t = Instant::now();
    assert_eq!(
        d.wait_for(b"never", Duration::from_millis(300))
            .expect("wait"),
        None
    );
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    // Present: at once.
    d.insert(b"here", b"v").expect("insert");
    assert_eq!(
        d.wait_for(b"here", Duration::ZERO)
            .expect("wait")
            .as_deref(),
        Some(&b"v"[..])
    );
    // Written by another process while we wait.
    let target2 = target.to_owned();
    let waiter = std::thread::spawn(move || {
        let d = open(&target2);
        d.wait_for(b"later", Duration::from_secs(60))
    });
    std::thread::sleep(Duration::from_millis(300));
    // Writes of other keys do not satisfy the wait.
    d.insert(b"other", b"x").expect("insert");
    let mut writer = Proc::spawn("writer", "write", &[target, "later", "result"]);
    writer.wait_ok();
    let got = waiter.join().expect("waiter").expect("wait_for");
    assert_eq!(got.as_deref(), Some(&b"result"[..]));
}

fn wait_for_race(target: &str) {
    // The write lands at staggered moments (0-400 µs) after the waiter
    // starts, over many rounds: some fall between its check and its sleep
    // (on Redis: between the check script and the blocking XREAD, one round
    // trip apart). None may be missed: a miss waits the full 20 s and fails
    // the round.
    let d = open(target);
    let waiter_dict: std::sync::Arc<dyn Dict> = open(target).into();
    for round in 0..200u64 {
        let key = format!("r{round}");
        let w = waiter_dict.clone();
        let key2 = key.clone();
        let waiter = std::thread::spawn(move || {
            let t = Instant::now();
            let v = w.wait_for(key2.as_bytes(), Duration::from_secs(20));
            (v, t.elapsed())
        });
        let delay = Duration::from_micros(round * 37 % 400);
        let t = Instant::now();
        while t.elapsed() < delay {
            std::hint::spin_loop();
        }
        d.insert(key.as_bytes(), b"x").expect("insert");
        let (v, took) = waiter.join().expect("waiter");
        assert_eq!(
            v.expect("wait_for").as_deref(),
            Some(&b"x"[..]),
            "round {round}"
        );
        assert!(
            took < Duration::from_secs(10),
            "round {round}: woke after {took:?}"
        );
    }
}

fn lock_excludes(target: &str) {
    // A non-atomic read-modify-write under the lock, from 3 processes.
    let mut procs: Vec<Proc> = (0..3)
        .map(|i| Proc::spawn(format!("locker {i}"), "locked_incr", &[target, "40"]))
        .collect();
    common::wait_all(&mut procs);
    let d = open(target);
    assert_eq!(d.get(b"c").expect("get").map(|v| u64_of(&v)), Some(120));
}

fn lock_holder_killed(target: &str) {
    let d = open(target);
    let mut holder = Proc::spawn("lock holder", "hold_lock", &[target]);
    let deadline = Instant::now() + common::WATCHDOG;
    while d.get(b"holding").expect("get").is_none() {
        holder.assert_running();
        assert!(Instant::now() < deadline, "holder never took the lock");
        std::thread::sleep(Duration::from_millis(10));
    }
    holder.kill();
    let g = d.lock().expect("lock after the holder died");
    assert!(
        g.recovered(),
        "the dead holder's lock is reported as recovered"
    );
    drop(g);
    let g = d.lock().expect("lock");
    assert!(!g.recovered());
}

// --- linearizability of recorded histories ---

/// One recorded operation on one key.
#[derive(Clone, Debug)]
struct Op {
    start: u64,
    end: u64,
    kind: OpKind,
}

#[derive(Clone, Debug, PartialEq)]
enum OpKind {
    /// get -> observed value
    Get(Option<u64>),
    /// insert(v)
    Insert(u64),
    /// remove -> was present
    Remove(bool),
    /// update(+1) -> stored value
    Incr(u64),
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Applies `op` to the register state; `None` if the recorded result is
/// impossible from `state`.
fn step(state: Option<u64>, op: &OpKind) -> Option<Option<u64>> {
    match *op {
        OpKind::Get(v) => (v == state).then_some(state),
        OpKind::Insert(v) => Some(Some(v)),
        OpKind::Remove(was) => (was == state.is_some()).then_some(None),
        OpKind::Incr(v) => (v == state.unwrap_or(0) + 1).then_some(Some(v)),
    }
}

/// Wing-Gong search with memoization: is there an order of `ops`, each
/// placed between its start and end, in which every result is what a
/// sequential register gives?
fn linearizable_register(ops: &[Op]) -> bool {
    assert!(ops.len() <= 128, "history too long for the checker");
    fn search(
        ops: &[Op],
        done: u128,
        state: Option<u64>,
        seen: &mut HashSet<(u128, Option<u64>)>,
    ) -> bool {
        if done.count_ones() as usize == ops.len() {
            return true;
        }
        if !seen.insert((done, state)) {
            return false;
        }
        // An op may go next only if it started before every pending op ended.
        let min_end = (0..ops.len())
            .filter(|i| done & (1 << i) == 0)
            .map(|i| ops[i].end)
            .min()
            .unwrap_or(u64::MAX);
        for i in 0..ops.len() {
            if done & (1 << i) != 0 || ops[i].start > min_end {
                continue;
            }
            if let Some(next) = step(state, &ops[i].kind) {
                if search(ops, done | 1 << i, next, seen) {
                    return true;
                }
            }
        }
        false
    }
    search(ops, 0, None, &mut HashSet::new())
}

const LIN_KEYS: u64 = 3;
const LIN_OPS: u64 = 40;

fn linearizable(target: &str) {
    let dir = std::env::temp_dir();
    let files: Vec<std::path::PathBuf> = (0..3)
        .map(|i| {
            dir.join(format!(
                "shmdict-lin-{}-{i}-{}",
                std::process::id(),
                now_ns()
            ))
        })
        .collect();
    let mut procs: Vec<Proc> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            Proc::spawn(
                format!("recorder {i}"),
                "record",
                &[target, &i.to_string(), f.to_str().expect("utf-8 path")],
            )
        })
        .collect();
    common::wait_all(&mut procs);
    let mut per_key: HashMap<u64, Vec<Op>> = HashMap::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("history file");
        let _ = std::fs::remove_file(f);
        for line in text.lines() {
            let w: Vec<&str> = line.split(' ').collect();
            let n = |i: usize| w[i].parse::<u64>().expect("number");
            let kind = match w[3] {
                "get" => OpKind::Get((w[4] != "-").then(|| n(4))),
                "insert" => OpKind::Insert(n(4)),
                "remove" => OpKind::Remove(w[4] == "1"),
                "incr" => OpKind::Incr(n(4)),
                other => panic!("bad history line {other}"),
            };
            per_key.entry(n(0)).or_default().push(Op {
                start: n(1),
                end: n(2),
                kind,
            });
        }
    }
    assert_eq!(
        per_key.values().map(Vec::len).sum::<usize>() as u64,
        3 * LIN_OPS,
        "every operation recorded"
    );
    // Linearizability is local: the map is linearizable iff each key is.
    for (k, ops) in &per_key {
        assert!(
            linearizable_register(ops),
            "key {k}: history not linearizable: {ops:#?}"
        );
    }
    // The checker itself rejects an impossible history.
    let bad = [
        Op {
            start: 0,
            end: 1,
            kind: OpKind::Insert(5),
        },
        Op {
            start: 2,
            end: 3,
            kind: OpKind::Get(None),
        },
    ];
    assert!(!linearizable_register(&bad), "checker accepts a stale read");
}

// --- children ---

fn child(role: &str, args: &[String]) {
    let d = open(&args[0]);
    match role {
        "incr" => {
            let n: u64 = args[1].parse().expect("count");
            for i in 0..n {
                d.update(b"ctr", &mut |v| {
                    common::widen_race_window(i);
                    incr(v)
                })
                .expect("update");
            }
        }
        "race" => {
            let me: u8 = args[1].parse().expect("index");
            for round in 0..3 {
                for k in 0..50u64 {
                    let key = format!("key-{k:04}");
                    let mut v = key.as_bytes()[..8].to_vec();
                    v.push(me);
                    if round == 1 {
                        d.remove(key.as_bytes()).expect("remove");
                    } else {
                        d.insert(key.as_bytes(), &v).expect("insert");
                    }
                }
            }
        }
        "memo" => {
            let me = &args[1];
            let v = d
                .get_or_insert_with(b"memo", &mut || {
                    // f may use the dictionary's other operations.
                    d.update(b"calls", &mut |v| incr(v))
                        .expect("count the call");
                    std::thread::sleep(Duration::from_millis(300));
                    format!("computed by {me}").into_bytes()
                })
                .expect("get_or_insert_with");
            d.insert(format!("seen-{me}").as_bytes(), &v)
                .expect("report");
        }
        "write" => {
            d.insert(args[1].as_bytes(), args[2].as_bytes())
                .expect("insert");
        }
        "locked_incr" => {
            let n: u64 = args[1].parse().expect("count");
            for i in 0..n {
                let _g = d.lock().expect("lock");
                let c = d.get(b"c").expect("get").map_or(0, |v| u64_of(&v));
                common::widen_race_window(i);
                std::thread::yield_now();
                d.insert(b"c", &(c + 1).to_le_bytes()).expect("insert");
            }
        }
        "hold_lock" => {
            let g = d.lock().expect("lock");
            d.insert(b"holding", b"1").expect("insert");
            std::thread::sleep(common::WATCHDOG);
            drop(g);
        }
        "record" => {
            let me: u64 = args[1].parse().expect("index");
            let mut rng = Rng(me.wrapping_mul(0x9E37_79B9) ^ now_ns());
            let mut out = String::new();
            for i in 0..LIN_OPS {
                let k = rng.below(LIN_KEYS);
                let key = format!("lin-{k}");
                let key = key.as_bytes();
                let start = now_ns();
                let (name, res) = match rng.below(4) {
                    0 => {
                        let v = d.get(key).expect("get").map(|v| u64_of(&v));
                        ("get", v.map_or("-".to_string(), |v| v.to_string()))
                    }
                    1 => {
                        let v = 1000 * (me + 1) + i;
                        d.insert(key, &v.to_le_bytes()).expect("insert");
                        ("insert", v.to_string())
                    }
                    2 => {
                        let was = d.remove(key).expect("remove");
                        ("remove", (was as u8).to_string())
                    }
                    _ => {
                        let v = d.update(key, &mut |v| incr(v)).expect("update");
                        ("incr", u64_of(&v.expect("stored")).to_string())
                    }
                };
                let end = now_ns();
                out.push_str(&format!("{k} {start} {end} {name} {res}\n"));
            }
            std::fs::write(&args[2], out).expect("write history");
        }
        other => panic!("unknown role {other}"),
    }
}
