//! Growth while attached (CONTRACT.md, "Growth while attached"; design
//! brief, properties 14 and 15), with real processes.
//!
//! Like `tests/crash.rs`, the test binary re-executes itself as child
//! processes (`argv[1] == "--shmdict-child"` selects a role, see
//! [`child_main`]); otherwise `main` runs the trials.
//!
//! What is shown here:
//!
//! - three processes insert 100,000 keys into a dictionary created with
//!   capacity 1,000 and a 64 KiB arena, while a fourth, which opened it
//!   before the first insert and then sleeps, and a fifth, opened
//!   afterwards, read every key exactly, each once from `keys()`; a sixth
//!   reads acknowledged keys all through the growth (`get`, `Reader::get`,
//!   `get_ref`) and never misses one nor sees a wrong value;
//! - writers SIGKILLed at random moments of growth (at least 200 kills in
//!   fresh small dictionaries: after random delays, soon after a writer
//!   logs that its next insert must grow the index, or right after a
//!   flip): every key whose insert returned `Ok` (each writer logs it to an
//!   append-only file before its next insert) stays, with its value, for a
//!   reader thread during the storm and after it; `len()` is exact;
//!   `check()` repairs what is left, `len()` then equals what `keys()`
//!   lists, a second `check()` finds nothing to repair, and the dictionary
//!   grows on. The trial reports how many kills landed inside a growing
//!   insert, and how many after the killed writer's own flip;
//! - `max_bytes` gives a clean `Full` that names the segment, once about
//!   that much memory is committed (not before) and never more, with every
//!   earlier key readable, and room again after removals, in every
//!   attached process;
//! - `fixed_size(true)` keeps the fixed behaviour: `Full` at capacity (or a
//!   full arena) and nothing lost.
//!
//! Every segment has a unique name and is unlinked by a guard; every child
//! is killed and reaped by a guard; whatever could hang runs under a
//! watchdog. No trial asserts a running time.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use common::acked::{assert_keyed, keyed_value, last_record, read_log, AckDir, AckLog};
use common::*;
use shmdict::{Error, ShmDict};

fn main() {
    let trials: Vec<(&str, fn())> = vec![
        (
            "grow_while_attached_100k_keys_from_capacity_1000",
            grow_while_attached,
        ),
        ("sigkill_during_growth", sigkill_during_growth),
        ("max_bytes_gives_clean_full", max_bytes_gives_clean_full),
        (
            "fixed_size_is_full_at_capacity_and_loses_nothing",
            fixed_size_keeps_the_old_behaviour,
        ),
    ];
    common::run(trials, child_main);
}

/// Runs a child role; any failure panics, so the child exits non-zero with a
/// message on stderr.
fn child_main(role: &str, args: &[String]) {
    let arg = |i: usize| {
        args.get(i)
            .unwrap_or_else(|| panic!("{role}: argument {i}"))
            .as_str()
    };
    let num = |i: usize| -> u64 { arg(i).parse().expect("numeric argument") };
    match role {
        "grow-writer" => child_grow_writer(arg(0), arg(1), num(2)),
        "grow-reader" => child_grow_reader(arg(0), arg(1)),
        "grow-idle" => child_grow_idle(arg(0), arg(1)),
        "grow-late" => verify_all(&open_existing(arg(0)), "the process opened afterwards"),
        "kill-writer" => child_kill_writer(arg(0), arg(1), num(2)),
        "full-observer" => child_full_observer(arg(0), arg(1)),
        "fixed-observer" => child_fixed_observer(arg(0), num(1)),
        other => panic!("unknown child role {other}"),
    }
}

// ---------------------------------------------------------------------------
// Trial 1: 100,000 keys from capacity 1,000, every process attached
// ---------------------------------------------------------------------------

const TOTAL: u64 = 100_000;
const WRITERS: u64 = 3;
/// A writer publishes how many of its keys are acknowledged every this
/// many inserts (and after its last).
const ACK_EVERY: u64 = 8;

/// Writer `w`'s keys are `GROW_KEY(id)` for `id` in `range(w)`.
fn grow_key(id: u64) -> String {
    format!("key-{id:06}")
}

fn range(w: u64) -> std::ops::Range<u64> {
    let per = TOTAL.div_ceil(WRITERS);
    w * per..((w + 1) * per).min(TOTAL)
}

fn ack_key(w: u64) -> String {
    format!("ack-{w}")
}

fn grow_while_attached() {
    let seg = Segment::new("grow");
    let ctl_seg = Segment::new("grow-ctl");
    let d = ShmDict::options()
        .capacity(1000)
        .arena_bytes(64 << 10)
        .create_new(true)
        .open(seg.name())
        .expect("create");
    let ctl = create(&ctl_seg, 256, 1 << 16);
    assert_eq!(d.capacity(), 1000);
    assert_eq!(d.stats().generation, 0);

    // The idle process attaches before the first insert, then sleeps in
    // `wait_for` on the control dictionary until told to verify.
    let mut idle = Proc::spawn("idle process", "grow-idle", &[seg.arg(), ctl_seg.arg()]);
    await_key(&ctl, "idle-opened", &mut idle);
    assert_eq!(
        d.len(),
        0,
        "nothing inserted before the idle process opened"
    );

    let mut procs: Vec<Proc> = (0..WRITERS)
        .map(|w| {
            Proc::spawn(
                format!("writer {w}"),
                "grow-writer",
                &[seg.arg(), ctl_seg.arg(), w.to_string()],
            )
        })
        .collect();
    procs.push(Proc::spawn(
        "concurrent reader",
        "grow-reader",
        &[seg.arg(), ctl_seg.arg()],
    ));
    release_barrier(&ctl, "start", WRITERS + 1, &mut procs);
    let started = Instant::now();
    let mut reader = procs.pop().unwrap();
    wait_all(&mut procs);
    let inserted_in = started.elapsed();
    idle.assert_running();
    ctl.insert("writers-done", b"").unwrap();
    reader.wait_ok();

    let st = d.stats();
    assert_eq!(d.len(), TOTAL as usize);
    assert!(st.generation > 0, "no growth recorded: {st:?}");
    assert!(d.capacity() >= TOTAL as usize, "capacity {}", d.capacity());
    let reads = read_u64(&ctl, "reader-reads");
    let (g0, g1) = (
        read_u64(&ctl, "reader-gen-first"),
        read_u64(&ctl, "reader-gen-last"),
    );
    assert!(reads > 0, "the concurrent reader read nothing");
    assert!(
        g1 > g0,
        "the concurrent reader saw no growth while it read (generations {g0}..{g1})"
    );

    // The idle process wakes with the handle it opened before any insert;
    // a fifth opens now. Both read everything.
    let late = Proc::spawn("process opened afterwards", "grow-late", &[seg.arg()]);
    ctl.insert("verify", b"").unwrap();
    let mut both = [idle, late];
    wait_all(&mut both);
    verify_all(&d, "the creator");
    eprintln!(
        "{TOTAL} keys by {WRITERS} processes in {inserted_in:?}: generation {}, capacity {}, \
         {} buckets, arena {} bytes, {} committed of {} reserved; {} growth steps recorded; \
         the concurrent reader made {reads} checked reads across generations {g0}..={g1}",
        st.generation,
        st.capacity,
        st.buckets,
        st.arena_bytes,
        st.committed_bytes,
        st.reserved_bytes,
        st.growth.len()
    );
}

fn child_grow_writer(name: &str, ctl: &str, w: u64) {
    let d = open_existing(name);
    let ctl = open_existing(ctl);
    child_barrier(&ctl, "start");
    let mut rng = Rng(0x6709 ^ w);
    let r = range(w);
    for id in r.clone() {
        let key = grow_key(id);
        d.insert(&key, keyed_value(key.as_bytes()))
            .unwrap_or_else(|e| panic!("writer {w}: insert {key}: {e}"));
        let done = id + 1 - r.start;
        if done % ACK_EVERY == 0 || id + 1 == r.end {
            ctl.insert(ack_key(w), done.to_le_bytes()).expect("ack");
        }
        // Now and then, a few of its own earlier keys read back.
        if done % 1024 == 0 {
            for _ in 0..32 {
                let k = grow_key(r.start + rng.below(done));
                let v = d.get(&k).expect("get").unwrap_or_else(|| {
                    panic!("writer {w}: its own key {k} vanished ({done} inserted)")
                });
                assert_keyed(k.as_bytes(), &v, "writer");
            }
        }
    }
}

/// Reads acknowledged keys, with all three kinds of read, until the writers
/// are done; holds each `Reader` across a batch of reads and checks at the
/// end of the batch that what it borrowed has not changed.
fn child_grow_reader(name: &str, ctl: &str) {
    let d = open_existing(name);
    let ctl = open_existing(ctl);
    child_barrier(&ctl, "start");
    let mut rng = Rng(0x4ead);
    let mut reads = 0u64;
    let first_gen = d.stats().generation;
    let mut last_gen = first_gen;
    for batch in 0u64.. {
        let done = ctl.contains_key("writers-done").expect("contains_key");
        let acked: Vec<u64> = (0..WRITERS).map(|w| read_u64(&ctl, &ack_key(w))).collect();
        let reader = d.reader().expect("reader");
        let mut held: Vec<(String, &[u8])> = Vec::new();
        for _ in 0..32 {
            let w = rng.below(WRITERS);
            if acked[w as usize] == 0 {
                continue;
            }
            // Often the newest acknowledged key: it is the likeliest to sit
            // in a table being copied.
            let i = if rng.below(4) == 0 {
                acked[w as usize] - 1
            } else {
                rng.below(acked[w as usize])
            };
            let key = grow_key(range(w).start + i);
            let missing = |how: &str| -> ! {
                panic!("acknowledged key {key} missing ({how}, batch {batch})")
            };
            let v = d.get(&key).expect("get").unwrap_or_else(|| missing("get"));
            assert_keyed(key.as_bytes(), &v, "get");
            let b = reader
                .get(&key)
                .expect("Reader::get")
                .unwrap_or_else(|| missing("Reader::get"));
            assert_keyed(key.as_bytes(), b, "Reader::get");
            let r = d
                .get_ref(&key)
                .expect("get_ref")
                .unwrap_or_else(|| missing("get_ref"));
            assert_keyed(key.as_bytes(), &r, "get_ref");
            drop(r);
            held.push((key, b));
            reads += 3;
        }
        for (key, b) in &held {
            assert_keyed(key.as_bytes(), b, "Reader::get, at the end of its batch");
        }
        drop(held);
        drop(reader);
        if batch % 16 == 0 {
            last_gen = d.stats().generation;
        }
        if done {
            break;
        }
    }
    last_gen = last_gen.max(d.stats().generation);
    ctl.insert("reader-reads", reads.to_le_bytes()).unwrap();
    ctl.insert("reader-gen-first", u64::from(first_gen).to_le_bytes())
        .unwrap();
    ctl.insert("reader-gen-last", u64::from(last_gen).to_le_bytes())
        .unwrap();
}

/// Opens before any insert, sleeps until told, then reads everything with
/// the same handle.
fn child_grow_idle(name: &str, ctl: &str) {
    let d = open_existing(name);
    let ctl = open_existing(ctl);
    assert_eq!(d.capacity(), 1000, "the idle process opened before growth");
    assert_eq!(d.stats().generation, 0);
    assert_eq!(d.len(), 0);
    ctl.insert("idle-opened", b"").unwrap();
    ctl.wait_for("verify", WATCHDOG)
        .expect("wait_for")
        .expect("the parent never said verify");
    verify_all(&d, "the idle process opened before growth");
}

/// Every key exactly: `len`, `keys()` (each once), each value by `get`, by
/// a `Reader` and by `get_ref`; the growth is visible through this handle.
fn verify_all(d: &ShmDict, who: &str) {
    assert_eq!(d.len(), TOTAL as usize, "{who}: len()");
    let mut keys = d.keys().expect("keys");
    keys.sort();
    let want: Vec<Vec<u8>> = (0..TOTAL).map(|id| grow_key(id).into_bytes()).collect();
    if keys != want {
        let have: HashSet<&Vec<u8>> = keys.iter().collect();
        let missing = want.iter().filter(|k| !have.contains(k)).count();
        let dups = keys.windows(2).filter(|w| w[0] == w[1]).count();
        panic!(
            "{who}: keys() gave {} keys ({missing} missing, {dups} duplicated), expected {TOTAL}",
            keys.len()
        );
    }
    let reader = d.reader().expect("reader");
    for (id, key) in want.iter().enumerate() {
        let v = d
            .get(key)
            .expect("get")
            .unwrap_or_else(|| panic!("{who}: get({}) missing", grow_key(id as u64)));
        assert_keyed(key, &v, who);
        if id % 3 == 0 {
            let b = reader.get(key).expect("Reader::get").expect("Reader::get");
            assert_keyed(key, b, who);
        }
        if id % 7 == 0 {
            let r = d.get_ref(key).expect("get_ref").expect("get_ref");
            assert_keyed(key, &r, who);
        }
    }
    drop(reader);
    let st = d.stats();
    assert!(st.generation > 0, "{who}: generation 0 after growth");
    assert!(
        d.capacity() >= TOTAL as usize,
        "{who}: capacity {} < {TOTAL}",
        d.capacity()
    );
}

// ---------------------------------------------------------------------------
// Trial 2: writers SIGKILLed at random moments of growth
// ---------------------------------------------------------------------------

/// Kills in all (`SHMDICT_KILL_ROUNDS` overrides).
const KILLS: u64 = 200;
/// Kills of replaced writers per dictionary, before its two last writers
/// are killed too and a fresh one is made: small dictionaries grow often.
const KILLS_PER_DICT: u64 = 4;
const KILL_CAPACITY: usize = 16;

/// Log records of a kill writer (see [`AckLog`]): `i` acknowledges key `i`;
/// [`ALIVE`] is its first record; [`MARK`] `| generation << 32 | i` comes
/// before an insert that may have to grow the index (the index was full or
/// one key short of it).
const ALIVE: u64 = 1 << 62;
const MARK: u64 = 1 << 63;

fn kill_writer_key(wid: u64, i: u64) -> String {
    format!("w{wid}-{i}")
}

fn child_kill_writer(name: &str, log: &str, wid: u64) {
    let d = open_existing(name);
    let mut log = AckLog::create(log);
    log.record(ALIVE);
    for i in 0u64.. {
        if d.len() + 1 >= d.capacity() {
            log.record(MARK | u64::from(d.stats().generation) << 32 | i);
        }
        let key = kill_writer_key(wid, i);
        d.insert(&key, keyed_value(key.as_bytes()))
            .unwrap_or_else(|e| panic!("writer {wid}: insert {key}: {e}"));
        log.record(i);
    }
}

/// A writer's log, parsed: the number of acknowledged keys (they are
/// `0..acked`, in order), and the generation of the growth mark its last
/// record is, if it is one.
struct Acks {
    acked: u64,
    last_mark: Option<u32>,
}

fn parse_log(path: &str, wid: u64) -> Acks {
    let recs = read_log(path);
    assert_eq!(
        recs.first(),
        Some(&ALIVE),
        "writer {wid}: log starts with ALIVE"
    );
    let mut acked = 0;
    let mut last_mark = None;
    for &r in &recs[1..] {
        if r & MARK != 0 {
            assert_eq!(r & 0xffff_ffff, acked, "writer {wid}: mark out of order");
            last_mark = Some(((r & !MARK) >> 32) as u32);
        } else {
            assert_eq!(r, acked, "writer {wid}: acknowledgements out of order");
            acked += 1;
            last_mark = None;
        }
    }
    Acks { acked, last_mark }
}

/// Every acknowledged key of a dead writer is present with its value; the
/// one it was inserting may be (whole) or not; none after it is.
fn verify_dead_writer(d: &ShmDict, wid: u64, acks: &Acks, what: &str) {
    for i in 0..acks.acked {
        let key = kill_writer_key(wid, i);
        let v = d
            .get(&key)
            .expect("get")
            .unwrap_or_else(|| panic!("{what}: acknowledged key {key} is missing"));
        assert_keyed(key.as_bytes(), &v, what);
    }
    let inflight = kill_writer_key(wid, acks.acked);
    if let Some(v) = d.get(&inflight).expect("get") {
        assert_keyed(inflight.as_bytes(), &v, what);
    }
    let after = kill_writer_key(wid, acks.acked + 1);
    assert!(
        !d.contains_key(&after).expect("contains_key"),
        "{what}: {after} present, but its writer never got that far"
    );
}

struct Writer {
    wid: u64,
    log: String,
    proc: Proc,
}

/// Whether `/proc/<pid>/stat` says the process is stopped.
fn is_stopped(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the command name in parentheses.
    stat.rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with(['T', 't']))
}

fn stop(p: &mut Proc) {
    signal(p, libc::SIGSTOP);
    let deadline = Instant::now() + WATCHDOG;
    while !is_stopped(p.child.id()) {
        p.assert_running();
        assert!(
            Instant::now() < deadline,
            "watchdog: {} never stopped",
            p.label
        );
        thread::sleep(Duration::from_micros(50));
    }
}

#[derive(Debug, Default)]
struct KillStats {
    kills: u64,
    dictionaries: u64,
    /// Kills that waited for the writer to reach a growth mark.
    aimed: u64,
    /// Kills whose writer was inside an insert that found the index full
    /// (or one key short of full): growing it, or waiting for another
    /// process's growth step.
    in_growing_insert: u64,
    /// Of those, kills after the writer's own flip (the growth history
    /// names it as the process that made the next generation current):
    /// the step is rolled forward by the next writer.
    after_own_flip: u64,
    /// The others: killed before a flip (carving, copying, waiting for the
    /// gate or for another process's step): rolled back, or never begun.
    before_flip: u64,
    acked_keys: u64,
    inflight_present: u64,
    max_generation: u32,
    checks_that_repaired: u64,
    slots_released: u64,
    locks_released: u64,
    leaked_blocks_reclaimed: u64,
    /// Reads of acknowledged keys made during the storms (each by `get`,
    /// `Reader::get` and `get_ref`).
    storm_reads: u64,
    /// Time spent waiting for growth marks, and checking after the kills.
    aiming: Duration,
    checking: Duration,
}

/// Sets its flag when dropped (on unwinding too).
struct Quit<'a>(&'a AtomicBool);

impl Drop for Quit<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn sigkill_during_growth() {
    let total = kill_rounds(KILLS);
    let dir = AckDir::new("growth-kill");
    let mut rng = Rng(0x9e0e_4711);
    let mut stats = KillStats::default();
    let mut next_wid = 0u64;
    let started = Instant::now();
    while stats.kills < total {
        let seg = Segment::new("growth-kill");
        let d = ShmDict::options()
            .capacity(KILL_CAPACITY)
            .arena_bytes(64 << 10)
            .create_new(true)
            .open(seg.name())
            .expect("create");
        stats.dictionaries += 1;
        // A reader thread checks acknowledged keys all through the storm.
        let logs: Mutex<Vec<(u64, String)>> = Mutex::new(Vec::new());
        let quit = AtomicBool::new(false);
        let dead = thread::scope(|s| {
            let reader = s.spawn(|| read_acknowledged(&d, &logs, &quit));
            // Stops the reader however the storm ends (a failure too).
            let q = Quit(&quit);
            let spawn = |next_wid: &mut u64| {
                let wid = *next_wid;
                *next_wid += 1;
                let log = dir.log(&format!("w{wid}"));
                logs.lock().unwrap().push((wid, log.clone()));
                let proc = Proc::spawn(
                    format!("writer {wid}"),
                    "kill-writer",
                    &[seg.arg(), log.clone(), wid.to_string()],
                );
                Writer { wid, log, proc }
            };
            let mut live = vec![spawn(&mut next_wid), spawn(&mut next_wid)];
            let mut dead: Vec<(u64, Acks)> = Vec::new();
            for k in 0..KILLS_PER_DICT + 2 {
                let last = k >= KILLS_PER_DICT;
                let slot = if last { 0 } else { rng.below(2) as usize };
                let wid = live[slot].wid;
                // Alive (its log says so), then a random moment: after a random
                // delay, or soon after it reaches a growth mark.
                let deadline = Instant::now() + WATCHDOG;
                while read_log(&live[slot].log).is_empty() {
                    live[slot].proc.assert_running();
                    assert!(
                        Instant::now() < deadline,
                        "watchdog: writer {wid} never started"
                    );
                    thread::sleep(Duration::from_micros(100));
                }
                // The other writer is stopped before the kill, so that the
                // growth history read after it is what the killed one left.
                let other = live.len() - 1 - slot;
                let mode = rng.below(3);
                if mode == 0 {
                    thread::sleep(Duration::from_micros(rng.below(15_000)));
                } else {
                    stats.aimed += 1;
                    let t = Instant::now();
                    let until = t + Duration::from_millis(100);
                    while last_record(&live[slot].log).is_none_or(|r| r & MARK == 0)
                        && Instant::now() < until
                    {
                        live[slot].proc.assert_running();
                        thread::sleep(Duration::from_micros(20));
                    }
                    if mode == 1 {
                        // Somewhere in the growth step, or after it.
                        thread::sleep(Duration::from_micros(rng.below(1500)));
                    } else {
                        // Right after a flip: while the old table is sealed.
                        if live.len() == 2 {
                            stop(&mut live[other].proc);
                        }
                        let cap = d.capacity();
                        let until = Instant::now() + Duration::from_millis(100);
                        while d.capacity() == cap && Instant::now() < until {
                            std::hint::spin_loop();
                        }
                    }
                    stats.aiming += t.elapsed();
                }
                if live.len() == 2 && !is_stopped(live[other].proc.child.id()) {
                    stop(&mut live[other].proc);
                }
                live[slot].proc.assert_running();
                let pid = live[slot].proc.child.id();
                live[slot].proc.kill();
                stats.kills += 1;
                let history = d.stats().growth;
                let w = live.remove(slot);
                let acks = parse_log(&w.log, wid);
                let what = format!("kill {} (writer {wid})", stats.kills);
                verify_dead_writer(&d, wid, &acks, &what);
                if let Some(g) = acks.last_mark {
                    stats.in_growing_insert += 1;
                    let flipped = history.iter().any(|h| h.generation > g && h.pid == pid);
                    if flipped {
                        stats.after_own_flip += 1;
                    } else {
                        stats.before_flip += 1;
                    }
                }
                dead.push((wid, acks));
                if !live.is_empty() {
                    signal(&live[0].proc, libc::SIGCONT);
                }
                if !last {
                    live.push(spawn(&mut next_wid));
                }
            }
            drop(q);
            stats.storm_reads += reader.join().expect("reader thread");
            dead
        });
        stats.max_generation = stats.max_generation.max(d.stats().generation);
        let t = Instant::now();
        verify_after_storm(&d, &dead, &mut stats);
        stats.checking += t.elapsed();
    }
    eprintln!(
        "{} kills in {:?}: {stats:?}",
        stats.kills,
        started.elapsed()
    );
    assert!(stats.kills >= total);
    assert!(
        stats.in_growing_insert >= total / 10,
        "too few kills landed inside a growing insert: {stats:?}"
    );
}

/// Until `quit`: reads keys that writers have acknowledged (their logs say
/// how far each got), the newest often, by `get`, `Reader::get` and
/// `get_ref`: none is ever missing or wrong, whatever the kills leave.
/// Returns the number of keys read.
fn read_acknowledged(d: &ShmDict, logs: &Mutex<Vec<(u64, String)>>, quit: &AtomicBool) -> u64 {
    let mut rng = Rng(0x4ead_4ead);
    let mut reads = 0;
    while !quit.load(Ordering::Relaxed) {
        let writers = logs.lock().unwrap().clone();
        for (wid, log) in writers {
            // The number of keys acknowledged (see the record kinds).
            let acked = match last_record(&log) {
                None | Some(ALIVE) => 0,
                Some(r) if r & MARK != 0 => r & 0xffff_ffff,
                Some(r) => r + 1,
            };
            if acked == 0 {
                continue;
            }
            let reader = d.reader().expect("reader");
            for n in 0..4 {
                let i = if n == 0 { acked - 1 } else { rng.below(acked) };
                let key = kill_writer_key(wid, i);
                let missing = |how: &str| -> ! {
                    panic!("during the storm: acknowledged key {key} missing ({how})")
                };
                let v = d.get(&key).expect("get").unwrap_or_else(|| missing("get"));
                assert_keyed(key.as_bytes(), &v, "get during the storm");
                let b = reader
                    .get(&key)
                    .expect("Reader::get")
                    .unwrap_or_else(|| missing("Reader::get"));
                assert_keyed(key.as_bytes(), b, "Reader::get during the storm");
                let r = d
                    .get_ref(&key)
                    .expect("get_ref")
                    .unwrap_or_else(|| missing("get_ref"));
                assert_keyed(key.as_bytes(), &r, "get_ref during the storm");
                reads += 1;
            }
        }
        thread::sleep(Duration::from_micros(200));
    }
    reads
}

/// With every writer of a dictionary dead: exactly the acknowledged keys
/// (and perhaps each writer's key in flight) are present, with their values;
/// `len()` is exact; `check()` repairs the rest and a second finds nothing;
/// the dictionary still grows.
fn verify_after_storm(d: &ShmDict, dead: &[(u64, Acks)], stats: &mut KillStats) {
    let acked: BTreeMap<u64, u64> = dead.iter().map(|(w, a)| (*w, a.acked)).collect();
    let keys = d.keys().expect("keys");
    assert_eq!(d.len(), keys.len(), "len() vs keys() right after the kills");
    let mut inflight = 0;
    for key in &keys {
        let text = String::from_utf8_lossy(key);
        let (wid, i) = text
            .strip_prefix('w')
            .and_then(|t| t.split_once('-'))
            .and_then(|(w, i)| Some((w.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
            .unwrap_or_else(|| panic!("unexpected key {text:?}"));
        let n = *acked
            .get(&wid)
            .unwrap_or_else(|| panic!("key {text} of an unknown writer"));
        assert!(
            i <= n,
            "key {text} beyond writer {wid}'s {n} acknowledged + 1"
        );
        inflight += u64::from(i == n);
        let v = d.get(key).expect("get").expect("listed key readable");
        assert_keyed(key, &v, "after the kills");
    }
    let acked_total: u64 = acked.values().sum();
    assert_eq!(keys.len() as u64, acked_total + inflight);
    stats.acked_keys += acked_total;
    stats.inflight_present += inflight;

    let r = check_and_recheck(d, "after the kills");
    stats.checks_that_repaired += u64::from(r.repaired());
    stats.slots_released += r.slots_released;
    stats.locks_released += r.locks_released;
    stats.leaked_blocks_reclaimed += r.leaked_blocks_reclaimed;

    // It keeps growing after the storm.
    let before = d.len();
    let target = (d.capacity() + 1).max(before + 64);
    for i in 0..target - before {
        let key = format!("after-{i}");
        d.insert(&key, keyed_value(key.as_bytes()))
            .unwrap_or_else(|e| panic!("insert {key} after the kills: {e}"));
    }
    assert_eq!(d.len(), target);
    for i in 0..target - before {
        let key = format!("after-{i}");
        assert_keyed(key.as_bytes(), &d.get(&key).unwrap().unwrap(), "after");
    }
    check_and_recheck(d, "after growing again");
}

/// `check()`, which must find the segment sound (repairing what dead
/// writers left), `len()` equal to what `keys()` lists, and a second
/// `check()`, which must find nothing left to repair.
fn check_and_recheck(d: &ShmDict, what: &str) -> shmdict::CheckReport {
    let r = d.check().expect("check");
    assert!(r.is_ok(), "{what}: check found corruption:\n{r}");
    assert!(r.skipped.is_none(), "{what}: repairs skipped:\n{r}");
    let keys = d.keys().expect("keys");
    assert_eq!(r.keys as usize, keys.len(), "{what}: report vs keys()\n{r}");
    assert_eq!(d.len(), keys.len(), "{what}: len() after check\n{r}");
    let unique: HashSet<&Vec<u8>> = keys.iter().collect();
    assert_eq!(unique.len(), keys.len(), "{what}: keys() lists a key twice");
    let again = d.check().expect("second check");
    assert!(again.is_ok() && again.skipped.is_none(), "{what}:\n{again}");
    assert!(
        !again.repaired(),
        "{what}: a second check still found something to repair:\n{again}"
    );
    assert_eq!(again.keys, r.keys, "{what}: keys changed between checks");
    r
}

// ---------------------------------------------------------------------------
// Trial 3: max_bytes gives a clean Full
// ---------------------------------------------------------------------------

/// Twice the 4 MiB the issue names: a dictionary's file lays out 4.5 MiB
/// before its arena (mostly stashes, committed only when used), and
/// `max_bytes` under that is refused at creation.
const MAX_BYTES: u64 = 8 << 20;

fn full_key(i: u64) -> String {
    format!("full-{i:06}")
}

fn max_bytes_gives_clean_full() {
    let seg = Segment::new("max-bytes");
    let ctl_seg = Segment::new("max-bytes-ctl");
    let d = ShmDict::options()
        .capacity(64)
        .arena_bytes(64 << 10)
        .max_bytes(MAX_BYTES)
        .create_new(true)
        .open(seg.name())
        .expect("create");
    let ctl = create(&ctl_seg, 64, 1 << 16);
    assert_eq!(d.stats().max_bytes, Some(MAX_BYTES));
    // Attached before the first insert; checks each phase from its side.
    let mut observer = Proc::spawn("observer", "full-observer", &[seg.arg(), ctl_seg.arg()]);
    await_key(&ctl, "observer-opened", &mut observer);

    let mut n = 0u64;
    let err = loop {
        let key = full_key(n);
        match d.insert(&key, keyed_value(key.as_bytes())) {
            Ok(()) => n += 1,
            Err(e) => break e,
        }
        assert!(n < 10_000_000, "no Full under max_bytes {MAX_BYTES}");
    };
    match &err {
        Error::Full { segment, .. } => assert_eq!(segment, seg.name(), "{err}"),
        other => panic!("expected Full, got {other}"),
    }
    assert!(err.to_string().contains(seg.name()), "{err}");
    let st = d.stats();
    assert!(st.generation > 0, "it grew before it was full: {st:?}");
    assert!(
        st.committed_bytes <= MAX_BYTES,
        "committed {} > max_bytes {MAX_BYTES}",
        st.committed_bytes
    );
    // And Full comes when the memory is used up to about the cap, not
    // before: what the next step would have needed (a unit of the arena,
    // or the next index table, under a tenth of the whole here) is all
    // that may be left.
    assert!(
        st.committed_bytes >= MAX_BYTES / 4 * 3,
        "Full with only {} of max_bytes {MAX_BYTES} committed ({err}): max_bytes \
         caps the reservation, not the memory",
        st.committed_bytes
    );
    assert_eq!(d.len() as u64, n);
    for i in 0..n {
        let key = full_key(i);
        let v = d.get(&key).unwrap().unwrap_or_else(|| panic!("{key} lost"));
        assert_keyed(key.as_bytes(), &v, "after Full");
    }
    eprintln!(
        "Full after {n} keys at generation {}: {err}; {st:?}",
        st.generation
    );

    // The observer sees the same: every key, and Full for a new one.
    ctl.insert("count", n.to_le_bytes()).unwrap();
    ctl.insert("phase-full", b"").unwrap();
    await_key(&ctl, "observer-saw-full", &mut observer);

    // Removing keys makes room: removed keys fit again, here and in the
    // observer (the same keys, so the same sizes of blocks).
    let removed: Vec<u64> = (0..n).filter(|i| i % 2 == 0).collect();
    for &i in &removed {
        assert!(d.remove(full_key(i)).unwrap(), "remove {}", full_key(i));
    }
    assert_eq!(d.len() as u64, n - removed.len() as u64);
    let quarter = removed.len() / 4;
    for &i in &removed[..quarter] {
        let key = full_key(i);
        d.insert(&key, keyed_value(key.as_bytes()))
            .unwrap_or_else(|e| panic!("after removals, re-insert {key}: {e}"));
    }
    ctl.insert("phase-room", b"").unwrap();
    observer.wait_ok();
    // What both re-inserted is here, and everything kept; nothing else.
    let back: HashSet<u64> = removed[..2 * quarter].iter().copied().collect();
    for i in 0..n {
        let key = full_key(i);
        match d.get(&key).unwrap() {
            Some(v) => {
                assert!(i % 2 == 1 || back.contains(&i), "{key} is back");
                assert_keyed(key.as_bytes(), &v, "after re-inserts");
            }
            None => assert!(i % 2 == 0 && !back.contains(&i), "{key} lost"),
        }
    }
    assert_eq!(d.len(), (n as usize - removed.len()) + 2 * quarter);
    let st = d.stats();
    assert!(st.committed_bytes <= MAX_BYTES, "{st:?}");
    let r = d.check().expect("check");
    assert!(r.is_ok() && !r.repaired(), "{r}");
}

fn child_full_observer(name: &str, ctl: &str) {
    let d = open_existing(name);
    let ctl = open_existing(ctl);
    ctl.insert("observer-opened", b"").unwrap();
    ctl.wait_for("phase-full", WATCHDOG)
        .unwrap()
        .expect("no phase-full");
    let n = read_u64(&ctl, "count");
    assert_eq!(d.len() as u64, n, "observer: len()");
    for i in 0..n {
        let key = full_key(i);
        let v = d
            .get(&key)
            .unwrap()
            .unwrap_or_else(|| panic!("observer: {key} missing"));
        assert_keyed(key.as_bytes(), &v, "observer");
    }
    // A key as big as the biggest kind of value: no room for it.
    match d.insert("observer-extra", vec![7u8; 900]) {
        Err(Error::Full { segment, .. }) => assert_eq!(segment, name),
        other => panic!("observer: expected Full, got {other:?}"),
    }
    let st = d.stats();
    assert!(st.committed_bytes <= MAX_BYTES, "observer: {st:?}");
    assert_eq!(st.max_bytes, Some(MAX_BYTES));
    ctl.insert("observer-saw-full", b"").unwrap();
    ctl.wait_for("phase-room", WATCHDOG)
        .unwrap()
        .expect("no phase-room");
    // The parent removed the even keys and re-inserted the first quarter
    // of them; the second quarter is the observer's.
    let removed: Vec<u64> = (0..n).filter(|i| i % 2 == 0).collect();
    let quarter = removed.len() / 4;
    for &i in &removed[quarter..2 * quarter] {
        let key = full_key(i);
        d.insert(&key, keyed_value(key.as_bytes()))
            .unwrap_or_else(|e| panic!("observer: after removals, re-insert {key}: {e}"));
    }
    let st = d.stats();
    assert!(st.committed_bytes <= MAX_BYTES, "observer: {st:?}");
}

// ---------------------------------------------------------------------------
// Trial 4: fixed_size(true)
// ---------------------------------------------------------------------------

const FIXED_CAPACITY: u64 = 64;

fn fixed_size_keeps_the_old_behaviour() {
    let seg = Segment::new("fixed");
    let d = ShmDict::options()
        .capacity(FIXED_CAPACITY as usize)
        .arena_bytes(1 << 20)
        .fixed_size(true)
        .create_new(true)
        .open(seg.name())
        .expect("create");
    for i in 0..FIXED_CAPACITY {
        let key = format!("fixed-{i}");
        d.insert(&key, keyed_value(key.as_bytes()))
            .unwrap_or_else(|e| panic!("insert {key} below capacity: {e}"));
    }
    let err = d
        .insert("one-too-many", b"x")
        .expect_err("insert beyond a fixed capacity");
    assert!(matches!(err, Error::Full { .. }), "{err}");
    assert_eq!(d.capacity(), FIXED_CAPACITY as usize);
    assert_eq!(d.stats().generation, 0);
    assert_eq!(d.len() as u64, FIXED_CAPACITY);
    // Overwrites of present keys still work.
    d.insert("fixed-0", keyed_value(b"fixed-0")).unwrap();
    let mut observer = Proc::spawn(
        "fixed observer",
        "fixed-observer",
        &[seg.arg(), FIXED_CAPACITY.to_string()],
    );
    observer.wait_ok();
    // The observer removed fixed-0 and inserted its own key in its place.
    assert_keyed(
        b"observer",
        &d.get("observer").unwrap().expect("observer's key"),
        "fixed",
    );
    assert!(d.get("fixed-0").unwrap().is_none());
    assert!(matches!(
        d.insert("one-too-many", b"x"),
        Err(Error::Full { .. })
    ));

    // A fixed arena is Full when its bytes are used, with room for keys
    // left, and loses nothing either.
    let seg2 = Segment::new("fixed-arena");
    let d2 = ShmDict::options()
        .capacity(10_000)
        .arena_bytes(64 << 10)
        .fixed_size(true)
        .create_new(true)
        .open(seg2.name())
        .expect("create");
    let arena = d2.stats().arena_bytes;
    let mut n = 0u64;
    let err = loop {
        match d2.insert(format!("big-{n}"), vec![n as u8; 1000]) {
            Ok(()) => n += 1,
            Err(e) => break e,
        }
        assert!(
            n < 10_000,
            "a 64 KiB fixed arena took {n} values of 1000 bytes"
        );
    };
    assert!(matches!(err, Error::Full { .. }), "{err}");
    assert!(n > 0 && (n as usize) < 10_000);
    let st = d2.stats();
    assert_eq!((st.arena_bytes, st.generation), (arena, 0), "{st:?}");
    assert_eq!(d2.capacity(), 10_000);
    for i in 0..n {
        assert_eq!(
            d2.get(format!("big-{i}")).unwrap(),
            Some(vec![i as u8; 1000]),
            "big-{i}"
        );
    }
}

fn child_fixed_observer(name: &str, capacity: u64) {
    let d = open_existing(name);
    assert_eq!(d.capacity() as u64, capacity);
    assert_eq!(d.len() as u64, capacity);
    for i in 0..capacity {
        let key = format!("fixed-{i}");
        assert_keyed(
            key.as_bytes(),
            &d.get(&key).unwrap().expect("fixed key"),
            "observer",
        );
    }
    assert!(
        matches!(d.insert("observer", b"x"), Err(Error::Full { .. })),
        "observer: insert beyond a fixed capacity"
    );
    assert!(d.remove("fixed-0").unwrap());
    d.insert("observer", keyed_value(b"observer"))
        .expect("observer: insert after a removal");
    assert_eq!(d.stats().generation, 0);
}
