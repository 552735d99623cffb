//! Borrowed (zero-copy) reads with real processes: `ShmDict::get_ref`,
//! `ShmDict::reader` and `Reader::get` (CONTRACT.md, "Zero-copy reads";
//! design brief, property 13).
//!
//! Like `tests/crash.rs`, the test binary re-executes itself as child
//! processes (`argv[1] == "--shmdict-child"` selects a role, see
//! [`child_main`]); otherwise `main` runs the trials.
//!
//! What is shown here:
//!
//! - a `ValueRef` and a `Reader` holding values of many keys keep their
//!   bytes exactly while another process overwrites, removes and re-inserts
//!   those keys thousands of times, and the bytes lie inside the mapping of
//!   the segment (`/proc/self/maps`), not in a copy;
//! - a holder SIGKILLed while pinned stops holding memory as soon as a
//!   writer needs it (measured from the kill to the first write that
//!   succeeds: under 2 s, as the contract says);
//! - a SIGSTOPped holder makes writers fail with `Full` at worst, never
//!   hang or return a wrong value; after SIGCONT and its drop, churn
//!   proceeds with no `Full`;
//! - `stats()` and `check()` report pins, the oldest pin's age and retired
//!   bytes; `check()` on an intact segment with pins and retired blocks
//!   repairs nothing; a writer SIGKILLed at random points while churning
//!   under a pinned reader leaves a segment that `check()` repairs, with
//!   every arena byte accounted for, and figures that a second check
//!   confirms;
//! - borrowed and copying reads are linearizable together: a reader
//!   alternating `get`, `get_into`, `Reader::get` and `get_ref` never sees
//!   an incremented counter go backwards;
//! - a `Reader` inherited through `fork` is the parent's: dropping it in
//!   the child releases nothing;
//! - threads of one process holding readers and refs (more than a stash
//!   has pin slots, so pins join slots) while other threads and a process
//!   write;
//! - regressions, each seen failing first (module docs of the trials say
//!   what broke).
//!
//! Every segment has a unique name and is unlinked by a guard; every child
//! is killed and reaped by a guard; whatever could hang runs under a
//! watchdog. The only timing assertions are the contract's 2 s for a dead
//! holder and a lower bound on the oldest pin's age.

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use shmdict::{Error, Reader, ShmDict};

fn main() {
    let trials: Vec<(&str, fn())> = vec![
        (
            "held_bytes_never_change_while_another_process_churns_the_keys",
            held_bytes_never_change,
        ),
        (
            "a_killed_holder_stops_holding_memory_within_2s",
            a_killed_holder_stops_holding_memory,
        ),
        (
            "a_stopped_holder_causes_full_at_worst_and_churn_resumes_after_it_drops",
            a_stopped_holder_causes_full_at_worst,
        ),
        (
            "stats_and_check_report_pins_and_retired_bytes",
            stats_and_check_report_pins,
        ),
        (
            "writer_killed_under_a_pinned_reader_leaves_a_repairable_segment",
            writer_killed_under_a_pinned_reader,
        ),
        (
            "borrowed_and_copying_reads_are_linearizable_together",
            borrowed_and_copying_reads_are_linearizable,
        ),
        (
            "fork_child_dropping_an_inherited_reader_releases_nothing",
            fork_child_dropping_an_inherited_reader,
        ),
        (
            "threads_holding_readers_while_threads_and_a_process_write",
            threads_holding_readers_while_others_write,
        ),
        (
            "a_reader_that_joined_a_busy_pin_slot_keeps_its_bytes",
            a_joined_pin_keeps_its_bytes,
        ),
        (
            "as_pod_views_borrowed_values_in_place",
            as_pod_views_borrowed_values,
        ),
        (
            "three_hundred_thousand_pins_never_hang",
            more_pins_than_slots_can_count,
        ),
        (
            "check_repairs_nothing_while_handles_detach",
            check_repairs_nothing_while_handles_detach,
        ),
        (
            "a_sliding_window_of_refs_never_starves_writers",
            a_sliding_window_of_refs_never_starves_writers,
        ),
    ];
    common::run(trials, child_main);
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// The address ranges at which this process maps the segment file
/// `/dev/shm/<name>`, found by its inode (a segment this process created
/// was mapped before it had its name, so the path in the maps may differ).
fn mapping_ranges(name: &str) -> Vec<(usize, usize)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(format!("/dev/shm/{name}")).expect("stat the segment");
    let dev = format!(
        "{:02x}:{:02x}",
        libc::major(meta.dev()),
        libc::minor(meta.dev())
    );
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    maps.lines()
        .filter_map(|line| {
            // range, perms, offset, device, inode, path.
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 6 || f[3] != dev || f[4] != meta.ino().to_string() {
                return None;
            }
            let (a, b) = f[0].split_once('-')?;
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })
        .collect()
}

/// The bytes lie inside one mapping of the segment `name` (zero-copy: they
/// are the value's bytes in shared memory, not a copy on the heap).
fn assert_in_mapping(name: &str, bytes: &[u8]) {
    let ranges = mapping_ranges(name);
    assert!(
        !ranges.is_empty(),
        "/proc/self/maps has no mapping of {name}"
    );
    let (start, end) = (
        bytes.as_ptr() as usize,
        bytes.as_ptr() as usize + bytes.len(),
    );
    assert!(
        ranges.iter().any(|&(a, b)| a <= start && end <= b),
        "{} bytes at {start:#x} are not inside the mapping of {name} ({ranges:x?})",
        bytes.len()
    );
}

/// The arena's bytes are all accounted for (as in tests/crash.rs).
fn assert_accounting(d: &ShmDict, r: &shmdict::CheckReport) {
    let arena = d.stats().arena_bytes as u64;
    assert_eq!(
        r.bytes_in_use + r.bytes_free + r.bytes_untouched + r.bytes_retired,
        arena,
        "in use + free + untouched + retired != arena:\n{r}"
    );
}

/// `check()` under a watchdog: sound, not skipped, accounting exact.
fn checked(d: &Arc<ShmDict>, what: &str) -> shmdict::CheckReport {
    let d2 = Arc::clone(d);
    let r = with_watchdog(what, move || d2.check().expect("check"));
    assert!(r.is_ok(), "{what}: check found corruption:\n{r}");
    assert!(r.skipped.is_none(), "{what}: repairs skipped:\n{r}");
    assert_accounting(d, &r);
    r
}

/// Waits (with a watchdog) until the u64 in `ctl[key]` is at least `n`,
/// failing early if `p` exits.
fn await_count(ctl: &ShmDict, key: &str, n: u64, p: &mut Proc) {
    let deadline = Instant::now() + WATCHDOG;
    while read_u64(ctl, key) < n {
        p.assert_running();
        assert!(
            Instant::now() < deadline,
            "watchdog: {} never counted {key} to {n}",
            p.label
        );
        thread::sleep(Duration::from_micros(200));
    }
}

/// A value of `len` bytes that names `i` (for the small-arena churns).
fn filler(i: u64, len: usize) -> Vec<u8> {
    let mut v = i.to_le_bytes().to_vec();
    v.resize(len.max(8), i as u8);
    v
}

/// Overwrites `keys` keys round-robin with `len`-byte values until `Full`
/// or `max_ops` writes; returns the writes that succeeded before the first
/// `Full` (None if none came). Any other error fails.
fn churn_until_full(d: &ShmDict, keys: u64, len: usize, max_ops: u64, from: u64) -> Option<u64> {
    for i in 0..max_ops {
        match d.insert(format!("k{}", (from + i) % keys), filler(from + i, len)) {
            Ok(()) => {}
            Err(Error::Full { .. }) => return Some(i),
            Err(e) => panic!("churn: {e}"),
        }
    }
    None
}

/// The arena bytes of a churn that must run without `Full`: ten times the
/// arena, in `len`-byte values.
fn churn_without_full(d: &ShmDict, keys: u64, len: usize, from: u64, what: &str) {
    let arena = d.stats().arena_bytes as u64;
    let ops = 10 * arena / len as u64;
    for i in 0..ops {
        let k = format!("k{}", (from + i) % keys);
        if let Err(e) = d.insert(&k, filler(from + i, len)) {
            panic!("{what}: write {i} of {ops}: {e}\n{:?}", d.stats());
        }
    }
}

fn sleep_forever() -> ! {
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}

// ---------------------------------------------------------------------------
// Child roles
// ---------------------------------------------------------------------------

fn child_main(role: &str, args: &[String]) {
    let arg = |i: usize| {
        args.get(i)
            .unwrap_or_else(|| panic!("{role}: argument {i}"))
            .as_str()
    };
    let num = |i: usize| -> u64 { arg(i).parse().expect("numeric argument") };
    match role {
        "churn-keys" => child_churn_keys(arg(0), arg(1), num(2)),
        "hold" => child_hold(arg(0), arg(1), num(2), arg(3)),
        "churn-forever" => child_churn_forever(arg(0), num(1)),
        "pinned-verifier" => child_pinned_verifier(arg(0), arg(1)),
        "lin-writer" => child_lin_writer(arg(0), num(1)),
        "lin-reader" => child_lin_reader(arg(0), arg(1), arg(2)),
        "open-write-drop" => child_open_write_drop(arg(0), arg(1), num(2)),
        "pin-cycle" => child_pin_cycle(arg(0), arg(1)),
        "overwrite-forever" => child_overwrite_forever(arg(0), num(1)),
        other => panic!("unknown child role {other}"),
    }
}

/// Overwrites, removes and re-inserts `kill-0..kill-15` with self-checking
/// values of changing sizes (so blocks of every class are retired and
/// recycled), `kill-0` in half of them, `total` operations, never past the
/// budget `ctl["budget"]`. Counts its operations in `ctl["done"]`, those
/// on `kill-0` in `ctl["done-0"]`, and the block bytes it wrote in
/// `ctl["bytes"]`. `Full` fails it: the arena is sized for the churn.
fn child_churn_keys(name: &str, ctl: &str, total: u64) {
    let d = open_existing(name);
    let ctl = open_existing(ctl);
    let mut rng = Rng(0xb077_07b0);
    let mut bytes = 0u64;
    let mut on_0 = 0u64;
    let deadline = Instant::now() + WATCHDOG;
    for i in 1..=total {
        while read_u64(&ctl, "budget") < i {
            assert!(Instant::now() < deadline, "no budget for operation {i}");
            thread::sleep(Duration::from_micros(100));
        }
        let k = if rng.below(2) == 0 {
            0
        } else {
            rng.below(KILL_KEYS as u64) as u8
        };
        if k == 0 {
            on_0 += 1;
            ctl.insert("done-0", on_0.to_le_bytes()).expect("ctl");
        }
        let key = kill_key(k);
        let v = checked_value(k, i);
        let block = (16 + 16 + v.len() as u64).next_power_of_two().max(64);
        match rng.below(8) {
            0..=3 => d.insert(&key, &v).expect("insert"),
            4 | 5 => {
                d.update(&key, |_| Some(v.clone())).expect("update");
            }
            6 => {
                d.remove(&key).expect("remove");
                d.insert(&key, &v).expect("re-insert");
            }
            _ => {
                d.remove(&key).expect("remove");
                continue_count(&ctl, i, bytes);
                continue;
            }
        }
        bytes += block;
        continue_count(&ctl, i, bytes);
    }
}

/// The churn writer's progress: operations done, block bytes written.
fn continue_count(ctl: &ShmDict, done: u64, bytes: u64) {
    ctl.insert("bytes", bytes.to_le_bytes()).expect("ctl");
    ctl.insert("done", done.to_le_bytes()).expect("ctl");
}

/// Holds borrowed reads of `k0..k{keys}` (a `Reader` and a `ValueRef`),
/// says `ctl["pinned"]`, then, by `mode`: `sleep` until killed; or `drop`:
/// waits for `ctl["drop"]`, checks that the borrowed bytes did not change,
/// drops them, says `ctl["dropped"]` and sleeps until killed.
fn child_hold(name: &str, ctl: &str, keys: u64, mode: &str) {
    let d = open_existing(name);
    let ctl = open_existing(ctl);
    let reader = d.reader().expect("reader");
    let held: Vec<(&[u8], Vec<u8>)> = (0..keys)
        .filter_map(|k| reader.get(format!("k{k}")).expect("get"))
        .map(|b| (b, b.to_vec()))
        .collect();
    let one = d.get_ref("k0").expect("get_ref");
    let one_copy = one.as_deref().map(<[u8]>::to_vec);
    ctl.insert("pinned", held.len().to_le_bytes()).expect("ctl");
    if mode == "sleep" {
        sleep_forever();
    }
    let deadline = Instant::now() + WATCHDOG;
    while !ctl.contains_key("drop").expect("ctl") {
        assert!(Instant::now() < deadline, "never told to drop");
        thread::sleep(Duration::from_millis(1));
    }
    for (b, copy) in &held {
        assert_eq!(b, copy, "a held value changed while pinned");
    }
    assert_eq!(one.as_deref().map(<[u8]>::to_vec), one_copy);
    drop(one);
    drop(reader);
    ctl.insert("dropped", b"").expect("ctl");
    sleep_forever();
}

/// Inserts, updates and removes `kill-*` keys with self-checking values
/// until killed. `Full` is accepted (a pinned reader may hold memory).
fn child_churn_forever(name: &str, seed: u64) {
    let d = open_existing(name);
    let mut rng = Rng(seed);
    for i in (seed << 32).. {
        let k = rng.below(KILL_KEYS as u64) as u8;
        let key = kill_key(k);
        let v = checked_value(k, i);
        let r = match rng.below(4) {
            0 | 1 => d.insert(&key, &v),
            2 => d.update(&key, |_| Some(v.clone())).map(drop),
            _ => d.remove(&key).map(drop),
        };
        match r {
            Ok(()) | Err(Error::Full { .. }) => {}
            Err(e) => panic!("churn: {e}"),
        }
    }
}

/// Until `ctl["stop"]`: takes a `Reader`, reads every `kill-*` key (each
/// must be a whole self-checking value), holds them a random while, and
/// checks they did not change. Counts rounds in `ctl["verified"]`.
fn child_pinned_verifier(name: &str, ctl: &str) {
    let d = open_existing(name);
    let ctl = open_existing(ctl);
    let mut rng = Rng(0x7e21_f1f1);
    for round in 1u64.. {
        if ctl.contains_key("stop").expect("ctl") {
            return;
        }
        let reader = d.reader().expect("reader");
        let mut held = Vec::new();
        for k in 0..KILL_KEYS {
            if let Some(b) = reader.get(kill_key(k)).expect("get") {
                if let Err(e) = check_value(k, b) {
                    panic!("round {round}: {e}");
                }
                held.push((k, b, b.to_vec()));
            }
        }
        thread::sleep(Duration::from_micros(rng.below(3000)));
        for (k, b, copy) in &held {
            assert_eq!(b, copy, "round {round}: held value of key {k} changed");
        }
        drop(reader);
        ctl.insert("verified", round.to_le_bytes()).expect("ctl");
    }
}

/// `n` increments of `ctr` with `update`.
fn child_lin_writer(name: &str, n: u64) {
    let d = open_existing(name);
    for i in 0..n {
        d.update("ctr", incr).expect("update");
        widen_race_window(i);
    }
}

/// Until `ctl["stop"]`, reads `ctr` by `get`, `get_into`, `Reader::get` (a
/// reader kept for 64 of its reads) and `get_ref`, in turn: the value never
/// goes backwards, and the first slice a reader returned never changes
/// while it lives. Records the reads of each kind and the last value in
/// `ctl`.
fn child_lin_reader(name: &str, ctl: &str, tag: &str) {
    let d = open_existing(name);
    let ctl = open_existing(ctl);
    let value = |b: Option<&[u8]>| b.map_or(0, u64_of);
    let mut last = 0u64;
    let mut counts = [0u64; 4];
    let mut buf = Vec::new();
    let mut i = 0u64;
    while !ctl.contains_key("stop").expect("ctl") {
        let reader = d.reader().expect("reader");
        let mut first: Option<(&[u8], Vec<u8>)> = None;
        for _ in 0..256 {
            let kind = (i % 4) as usize;
            let v = match kind {
                0 => value(d.get("ctr").expect("get").as_deref()),
                1 => {
                    let found = d.get_into("ctr", &mut buf).expect("get_into");
                    value(found.then_some(&buf[..]))
                }
                2 => {
                    let got = reader.get("ctr").expect("Reader::get");
                    if let (None, Some(s)) = (&first, got) {
                        first = Some((s, s.to_vec()));
                    }
                    value(got)
                }
                _ => value(d.get_ref("ctr").expect("get_ref").as_deref()),
            };
            assert!(
                v >= last,
                "{tag}: read {i} ({}) saw {v} after {last}",
                ["get", "get_into", "Reader::get", "get_ref"][kind]
            );
            last = v;
            counts[kind] += 1;
            i += 1;
        }
        if let Some((s, copy)) = first {
            assert_eq!(s, &copy[..], "{tag}: a Reader's slice changed");
        }
    }
    for (kind, n) in counts.iter().enumerate() {
        ctl.insert(format!("{tag}-reads-{kind}"), n.to_le_bytes())
            .expect("ctl");
    }
    ctl.insert(format!("{tag}-last"), last.to_le_bytes())
        .expect("ctl");
}

/// `rounds` times: opens a second handle, overwrites `w-0..w-7` 40 times
/// (so its stash holds retired blocks and, past half a ring, a spare spill
/// bag), and drops it. Counts rounds in `ctl["rounds"]`.
fn child_open_write_drop(name: &str, ctl: &str, rounds: u64) {
    let ctl = open_existing(ctl);
    for round in 1..=rounds {
        let d = open_existing(name);
        for i in 0..40u64 {
            match d.insert(format!("w-{}", i % 8), filler(round << 8 | i, 40)) {
                Ok(()) | Err(Error::Full { .. }) => {}
                Err(e) => panic!("write: {e}"),
            }
        }
        // Drops at any moment, not only right after a write (which a
        // closed write gate holds back).
        thread::sleep(Duration::from_micros(mix(round) % 1500));
        drop(d);
        ctl.insert("rounds", round.to_le_bytes()).expect("ctl");
    }
}

/// Until `ctl["stop"]`: takes a reader, holds it 2 ms, drops it.
fn child_pin_cycle(name: &str, ctl: &str) {
    let d = open_existing(name);
    let ctl = open_existing(ctl);
    while !ctl.contains_key("stop").expect("ctl") {
        let r = d.reader().expect("reader");
        let _ = r.get("w-0").expect("get");
        thread::sleep(Duration::from_millis(2));
        drop(r);
        thread::sleep(Duration::from_micros(500));
    }
}

/// Overwrites `kill-*` keys with self-checking values until killed.
fn child_overwrite_forever(name: &str, seed: u64) {
    let d = open_existing(name);
    let mut rng = Rng(seed);
    for i in (seed << 32).. {
        let k = rng.below(KILL_KEYS as u64) as u8;
        d.insert(kill_key(k), checked_value(k, i)).expect("insert");
    }
}

// ---------------------------------------------------------------------------
// 1. Held bytes never change
// ---------------------------------------------------------------------------

const CHURN_TOTAL: u64 = 40_000;
/// Writes while the first ValueRef and Reader are held: `kill-0`, the
/// ValueRef's key, gets about 2,600 of them.
const CHURN_PINNED: u64 = 5_000;

fn held_bytes_never_change() {
    let seg = Segment::new("borrow-held");
    let ctl_seg = Segment::new("borrow-held-ctl");
    let arena = 32 << 20;
    let d = create_fixed(&seg, 256, arena);
    let ctl = create(&ctl_seg, 64, 1 << 16);
    for k in 0..KILL_KEYS {
        d.insert(kill_key(k), checked_value(k, 0)).unwrap();
    }
    let mut writer = Proc::spawn(
        "churn writer",
        "churn-keys",
        &[seg.arg(), ctl_seg.arg(), CHURN_TOTAL.to_string()],
    );

    // Phase 1: one ValueRef and one Reader over every key, held for
    // thousands of the writer's operations.
    let one = d.get_ref(kill_key(0)).unwrap().expect("kill-0");
    let one_copy = one.to_vec();
    assert_eq!(check_value(0, &one), Ok(0));
    assert_in_mapping(seg.name(), &one);
    let reader = d.reader().unwrap();
    let held: Vec<(u8, &[u8], Vec<u8>)> = (0..KILL_KEYS)
        .map(|k| {
            let b = reader.get(kill_key(k)).unwrap().expect("seeded key");
            assert_in_mapping(seg.name(), b);
            (k, b, b.to_vec())
        })
        .collect();
    assert_eq!(d.stats().pins, 2, "a ValueRef and a Reader");
    let verify = |when: &str| {
        assert_eq!(
            &one[..],
            &one_copy[..],
            "{when}: the ValueRef's bytes changed"
        );
        for (k, b, copy) in &held {
            assert_eq!(b, copy, "{when}: the Reader's bytes of key {k} changed");
        }
    };
    ctl.insert("budget", CHURN_PINNED.to_le_bytes()).unwrap();
    let deadline = Instant::now() + WATCHDOG;
    let mut checks = 0u64;
    while read_u64(&ctl, "done") < CHURN_PINNED {
        writer.assert_running();
        assert!(Instant::now() < deadline, "watchdog: the writer stalled");
        verify("during the churn");
        checks += 1;
        thread::sleep(Duration::from_micros(300));
    }
    verify("after the churn");
    let changed = (0..KILL_KEYS)
        .filter(|&k| d.get(kill_key(k)).unwrap() != Some(held[k as usize].2.clone()))
        .count();
    assert_eq!(
        changed, KILL_KEYS as usize,
        "the writer changed every key while they were held"
    );
    let on_0 = read_u64(&ctl, "done-0");
    assert!(
        on_0 >= 2000,
        "kill-0 overwritten, removed or re-inserted {on_0} times"
    );
    let s = d.stats();
    assert!(
        s.retired_bytes > 0,
        "replaced values wait for the pins: {s:?}"
    );
    eprintln!(
        "phase 1: {checks} checks of 17 held values over {CHURN_PINNED} writes \
         ({on_0} to the ValueRef's key); retired {} bytes",
        s.retired_bytes
    );
    drop(held);
    drop(one);
    drop(reader);
    assert_eq!(d.stats().pins, 0);

    // Phase 2: refs taken and dropped all along (at most four held at once),
    // so that retired blocks are recycled while some are pinned.
    ctl.insert("budget", CHURN_TOTAL.to_le_bytes()).unwrap();
    let mut rng = Rng(0x0005_11d3);
    let mut window: VecDeque<(u8, shmdict::ValueRef<'_>, Vec<u8>)> = VecDeque::new();
    let mut taken = 0u64;
    let deadline = Instant::now() + WATCHDOG;
    while read_u64(&ctl, "done") < CHURN_TOTAL {
        assert!(Instant::now() < deadline, "watchdog: the writer stalled");
        let k = rng.below(KILL_KEYS as u64) as u8;
        if let Some(v) = d.get_ref(kill_key(k)).unwrap() {
            check_value(k, &v).unwrap();
            assert_in_mapping(seg.name(), &v);
            let copy = v.to_vec();
            window.push_back((k, v, copy));
            taken += 1;
        }
        for (k, v, copy) in &window {
            assert_eq!(&v[..], &copy[..], "a ValueRef of key {k} changed");
        }
        while window.len() > 4 {
            window.pop_front();
        }
        if let Some(p) = writer.poll() {
            assert!(p.success(), "{}", writer.describe_failure());
        }
        thread::sleep(Duration::from_micros(200));
    }
    drop(window);
    writer.wait_ok();
    let bytes = read_u64(&ctl, "bytes");
    eprintln!(
        "phase 2: {taken} refs taken; the writer wrote {} MiB of blocks into a {} MiB arena",
        bytes >> 20,
        arena >> 20
    );
    assert!(
        bytes > 2 * arena as u64,
        "the churn must recycle blocks: {bytes} bytes written"
    );
    assert_eq!(d.stats().pins, 0);
    let d = Arc::new(d);
    let r = checked(&d, "after the churn");
    assert!(!r.repaired(), "nobody died:\n{r}");
}

// ---------------------------------------------------------------------------
// 2. A killed holder
// ---------------------------------------------------------------------------

/// A small arena, so that a pinned reader soon holds all of it.
const SMALL_ARENA: usize = 256 << 10;
const SMALL_KEYS: u64 = 8;
/// Values of a 2 KiB block.
const SMALL_VALUE: usize = 1000;

fn small_dict(seg: &Segment) -> ShmDict {
    let d = create_fixed(seg, 64, SMALL_ARENA);
    for k in 0..SMALL_KEYS {
        d.insert(format!("k{k}"), filler(k, SMALL_VALUE)).unwrap();
    }
    d
}

fn spawn_holder(seg: &Segment, ctl_seg: &Segment, ctl: &ShmDict, mode: &str) -> Proc {
    let mut holder = Proc::spawn(
        format!("holder ({mode})"),
        "hold",
        &[
            seg.arg(),
            ctl_seg.arg(),
            SMALL_KEYS.to_string(),
            mode.into(),
        ],
    );
    await_key(ctl, "pinned", &mut holder);
    assert_eq!(
        read_u64(ctl, "pinned"),
        SMALL_KEYS,
        "the holder read every key"
    );
    holder
}

fn a_killed_holder_stops_holding_memory() {
    let seg = Segment::new("borrow-killed");
    let ctl_seg = Segment::new("borrow-killed-ctl");
    let d = Arc::new(small_dict(&seg));
    let ctl = create(&ctl_seg, 64, 1 << 16);
    // Without a holder, ten arenas' worth of overwrites never fill it.
    churn_without_full(&d, SMALL_KEYS, SMALL_VALUE, 0, "before any holder");
    let mut holder = spawn_holder(&seg, &ctl_seg, &ctl, "sleep");
    assert_eq!(d.stats().pins, 2, "the holder's Reader and ValueRef");
    // With it, the writer runs out of room: it needs the pinned memory.
    let max_ops = 4 * SMALL_ARENA as u64 / SMALL_VALUE as u64;
    let d2 = Arc::clone(&d);
    let ok = with_watchdog("churn until Full", move || {
        churn_until_full(&d2, SMALL_KEYS, SMALL_VALUE, max_ops, 1 << 20)
    })
    .unwrap_or_else(|| panic!("{max_ops} overwrites under a pin never got Full"));
    let s = d.stats();
    eprintln!("Full after {ok} overwrites; {s:?}");
    assert!(
        s.retired_bytes as usize > SMALL_ARENA / 2,
        "the pin holds what was replaced: {s:?}"
    );
    // Killed (and reaped): from then on a writer that needs the memory gets
    // it within 2 s.
    let d2 = Arc::clone(&d);
    let t0 = Instant::now();
    holder.kill();
    let (first_ok, attempts) = with_watchdog("write after the holder's death", move || {
        let mut attempts = 0u64;
        loop {
            attempts += 1;
            match d2.insert("k0", filler(7, SMALL_VALUE)) {
                Ok(()) => return (t0.elapsed(), attempts),
                Err(Error::Full { .. }) => thread::sleep(Duration::from_millis(1)),
                Err(e) => panic!("write after the kill: {e}"),
            }
        }
    });
    eprintln!("first write succeeded {first_ok:?} after the kill ({attempts} attempts)");
    assert!(
        first_ok < Duration::from_secs(2),
        "a dead holder held memory for {first_ok:?} after a writer needed it"
    );
    let s = d.stats();
    assert_eq!((s.pins, s.oldest_pin_age), (0, None), "{s:?}");
    churn_without_full(
        &d,
        SMALL_KEYS,
        SMALL_VALUE,
        2 << 20,
        "after the holder's death",
    );
    let r = checked(&d, "after the holder's death");
    assert!(!r.repaired(), "the holder only read:\n{r}");
    assert_eq!(r.handles_dead, 1, "{r}");
}

// ---------------------------------------------------------------------------
// 3. A stopped holder
// ---------------------------------------------------------------------------

fn a_stopped_holder_causes_full_at_worst() {
    let seg = Segment::new("borrow-stopped");
    let ctl_seg = Segment::new("borrow-stopped-ctl");
    let d = Arc::new(small_dict(&seg));
    let ctl = create(&ctl_seg, 64, 1 << 16);
    let mut holder = spawn_holder(&seg, &ctl_seg, &ctl, "drop");
    signal(&holder, libc::SIGSTOP);
    let stopped_at = Instant::now();
    // Writers: Full at worst, never a hang, never a wrong value.
    let ops = 4 * SMALL_ARENA as u64 / SMALL_VALUE as u64;
    let d2 = Arc::clone(&d);
    let fulls = with_watchdog("churn beside a stopped holder", move || {
        let mut stored: Vec<Vec<u8>> = (0..SMALL_KEYS).map(|k| filler(k, SMALL_VALUE)).collect();
        let mut fulls = 0u64;
        for i in 0..ops {
            let k = i % SMALL_KEYS;
            let key = format!("k{k}");
            let v = filler(3 << 20 | i, SMALL_VALUE);
            match d2.insert(&key, &v) {
                Ok(()) => stored[k as usize] = v,
                Err(Error::Full { .. }) => fulls += 1,
                Err(e) => panic!("write beside a stopped holder: {e}"),
            }
            let want = Some(stored[k as usize].as_slice());
            assert_eq!(d2.get(&key).unwrap().as_deref(), want, "get");
            assert_eq!(d2.get_ref(&key).unwrap().as_deref(), want, "get_ref");
            assert_eq!(d2.reader().unwrap().get(&key).unwrap(), want, "Reader::get");
        }
        fulls
    });
    eprintln!("{fulls} of {ops} writes were Full beside the stopped holder");
    assert!(fulls > 0, "the stopped holder's pin held nothing back");
    let s = d.stats();
    assert_eq!(s.pins, 2, "{s:?}");
    let age = s.oldest_pin_age.expect("an oldest pin");
    assert!(
        age + Duration::from_millis(20) >= stopped_at.elapsed(),
        "oldest pin age {age:?}, stopped {:?} ago",
        stopped_at.elapsed()
    );
    // check() does not wait for readers, stopped or not.
    let r = checked(&d, "beside a stopped holder");
    assert!(!r.repaired(), "nobody died:\n{r}");
    assert_eq!(r.pins, 2, "{r}");
    // Continued, and told to drop: then churn proceeds with no Full.
    signal(&holder, libc::SIGCONT);
    ctl.insert("drop", b"").unwrap();
    await_key(&ctl, "dropped", &mut holder);
    let s = d.stats();
    assert_eq!((s.pins, s.oldest_pin_age), (0, None), "{s:?}");
    let d2 = Arc::clone(&d);
    with_watchdog("churn after the holder dropped", move || {
        churn_without_full(&d2, SMALL_KEYS, SMALL_VALUE, 4 << 20, "after the drop")
    });
    holder.assert_running();
}

// ---------------------------------------------------------------------------
// 4. stats() and check()
// ---------------------------------------------------------------------------

fn stats_and_check_report_pins() {
    let seg = Segment::new("borrow-stats");
    let ctl_seg = Segment::new("borrow-stats-ctl");
    let d = Arc::new(create_fixed(&seg, 256, 4 << 20));
    let ctl = create(&ctl_seg, 64, 1 << 16);
    for k in 0..SMALL_KEYS {
        d.insert(format!("k{k}"), filler(k, 100)).unwrap();
    }
    let s = d.stats();
    assert_eq!((s.pins, s.oldest_pin_age), (0, None), "{s:?}");
    let mut holder = spawn_holder(&seg, &ctl_seg, &ctl, "sleep");
    let pinned_at = Instant::now();
    thread::sleep(Duration::from_millis(300));
    // Replaced under the holder's pins: retired, not freed. Enough
    // overwrites that the ring spills into bags.
    for i in 0..200 {
        d.insert(format!("k{}", i % SMALL_KEYS), filler(i, 100))
            .unwrap();
    }
    let s = d.stats();
    assert_eq!(s.pins, 2, "{s:?}");
    let age = s.oldest_pin_age.expect("an oldest pin");
    assert!(
        age >= Duration::from_millis(250) && age <= pinned_at.elapsed() + Duration::from_millis(50),
        "oldest pin age {age:?}, pinned {:?} ago",
        pinned_at.elapsed()
    );
    // 200 blocks of 256 bytes (16-byte header, 16-byte key, 100 bytes).
    assert!(s.retired_bytes >= 200 * 256, "{s:?}");
    let r = checked(&d, "with pins and retired blocks");
    eprintln!("{r}");
    assert!(!r.repaired(), "an intact segment with pins:\n{r}");
    assert_eq!(r.pins, 2, "{r}");
    assert!(r.oldest_pin_age.unwrap() >= age, "{r}");
    assert_eq!(
        r.bytes_retired, s.retired_bytes,
        "check() and stats() disagree on retired bytes:\n{r}"
    );
    let text = r.to_string();
    assert!(
        text.contains("borrowed reads: 2 held, the oldest for"),
        "{text}"
    );
    assert!(
        text.contains(&format!("{} retired", r.bytes_retired)),
        "{text}"
    );
    // This process's own pins count too.
    let mine = d.reader().unwrap();
    assert_eq!(d.stats().pins, 3);
    assert_eq!(checked(&d, "with our pin").pins, 3);
    drop(mine);
    // A dead holder's pins count no more.
    holder.kill();
    let s = d.stats();
    assert_eq!((s.pins, s.oldest_pin_age), (0, None), "{s:?}");
    let r = checked(&d, "after the holder died");
    assert_eq!((r.pins, r.oldest_pin_age), (0, None), "{r}");
    assert!(!r.to_string().contains("borrowed reads"), "{r}");
    assert!(!r.repaired(), "{r}");
    // What they held is freed as writers need it: many arenas' worth of
    // overwrites fit.
    churn_without_full(&d, SMALL_KEYS, 1000, 0, "after the holder died");
}

// ---------------------------------------------------------------------------
// 5. A writer killed under a pinned reader
// ---------------------------------------------------------------------------

const WRITER_KILL_ROUNDS: u64 = 25;

fn writer_killed_under_a_pinned_reader() {
    let seg = Segment::new("borrow-kill");
    let ctl_seg = Segment::new("borrow-kill-ctl");
    let d = Arc::new(create_fixed(&seg, 1024, 32 << 20));
    let ctl = create(&ctl_seg, 64, 1 << 16);
    for k in 0..KILL_KEYS {
        d.insert(kill_key(k), checked_value(k, 0)).unwrap();
    }
    let mut verifier = Proc::spawn(
        "pinned verifier",
        "pinned-verifier",
        &[seg.arg(), ctl_seg.arg()],
    );
    await_count(&ctl, "verified", 1, &mut verifier);
    let mut rng = Rng(0xdead_b0b0);
    let (mut leaked_rounds, mut leaked_bytes) = (0, 0);
    for round in 0..kill_rounds(WRITER_KILL_ROUNDS) {
        // Our own pin, across the kill and the check: what check() retires
        // now stays retired.
        let reader = d.reader().unwrap();
        let pinned = reader.get(kill_key(1)).unwrap().map(|b| (b, b.to_vec()));
        let mut writer = Proc::spawn(
            format!("writer {round}"),
            "churn-forever",
            &[seg.arg(), (round + 1).to_string()],
        );
        thread::sleep(Duration::from_micros(2_000 + rng.below(20_000)));
        writer.assert_running();
        writer.kill();
        verifier.assert_running();
        let r = checked(&d, &format!("round {round}"));
        // A second check right away: nothing left to repair, and the same
        // figures (nothing moved in between: the verifier only reads).
        let again = checked(&d, &format!("round {round}, again"));
        assert!(
            !again.repaired(),
            "round {round}: repaired twice:\n{r}\n{again}"
        );
        assert_eq!(
            (
                again.bytes_in_use,
                again.bytes_free,
                again.bytes_retired,
                again.bytes_untouched
            ),
            (
                r.bytes_in_use,
                r.bytes_free,
                r.bytes_retired,
                r.bytes_untouched
            ),
            "round {round}: the first check's figures are not what it left:\n{r}\n{again}"
        );
        if r.leaked_blocks_reclaimed > 0 {
            leaked_rounds += 1;
            leaked_bytes += r.leaked_bytes_reclaimed;
        }
        if let Some((b, copy)) = pinned {
            assert_eq!(b, &copy[..], "round {round}: our pinned value changed");
        }
        drop(reader);
        // Every key is whole, and can be written again.
        for k in 0..KILL_KEYS {
            if let Some(v) = d.get(kill_key(k)).unwrap() {
                check_value(k, &v).unwrap();
            }
            d.insert(kill_key(k), checked_value(k, round << 8 | k as u64))
                .unwrap();
        }
    }
    eprintln!(
        "{} kills: leaks reclaimed in {leaked_rounds} rounds ({leaked_bytes} bytes); \
         the verifier checked {} rounds",
        kill_rounds(WRITER_KILL_ROUNDS),
        read_u64(&ctl, "verified")
    );
    ctl.insert("stop", b"").unwrap();
    verifier.wait_ok();
    let r = checked(&d, "at the end");
    assert!(!r.repaired(), "{r}");
}

// ---------------------------------------------------------------------------
// 6. Linearizable beside copying reads
// ---------------------------------------------------------------------------

const LIN_INCREMENTS: u64 = 5_000;

fn borrowed_and_copying_reads_are_linearizable() {
    let seg = Segment::new("borrow-lin");
    let ctl_seg = Segment::new("borrow-lin-ctl");
    let d = create_fixed(&seg, 64, 1 << 20);
    let ctl = create(&ctl_seg, 64, 1 << 16);
    let mut readers: Vec<Proc> = ["r0", "r1"]
        .iter()
        .map(|t| {
            Proc::spawn(
                format!("reader {t}"),
                "lin-reader",
                &[seg.arg(), ctl_seg.arg(), (*t).to_owned()],
            )
        })
        .collect();
    let mut writers: Vec<Proc> = (0..2)
        .map(|i| {
            Proc::spawn(
                format!("writer {i}"),
                "lin-writer",
                &[seg.arg(), LIN_INCREMENTS.to_string()],
            )
        })
        .collect();
    wait_all(&mut writers);
    assert_eq!(read_u64(&d, "ctr"), 2 * LIN_INCREMENTS, "no increment lost");
    ctl.insert("stop", b"").unwrap();
    wait_all(&mut readers);
    for t in ["r0", "r1"] {
        let reads: Vec<u64> = (0..4)
            .map(|k| read_u64(&ctl, &format!("{t}-reads-{k}")))
            .collect();
        eprintln!("reader {t}: {reads:?} reads by get, get_into, Reader::get, get_ref");
        assert!(reads.iter().all(|&n| n > 0), "{t}: {reads:?}");
        assert_eq!(read_u64(&ctl, &format!("{t}-last")), 2 * LIN_INCREMENTS);
    }
}

// ---------------------------------------------------------------------------
// 7. fork
// ---------------------------------------------------------------------------

/// Forks; the child runs `f` and leaves with `_exit(code)`. Returns the
/// child's exit code (as tests/ownership.rs).
fn in_forked_child(f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child only runs `f` (our own code, which touches shared
    // memory and drops handles) and `_exit`s; it never returns into the
    // caller.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
        // SAFETY: _exit ends the child at once.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: `pid` is our child; `status` is a valid out-pointer.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid);
    assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
    libc::WEXITSTATUS(status)
}

fn fork_child_dropping_an_inherited_reader() {
    let seg = Segment::new("borrow-fork");
    let d = small_dict(&seg);
    let reader = d.reader().unwrap();
    assert_eq!(reader.get("k0").unwrap(), Some(&filler(0, SMALL_VALUE)[..]));
    assert_eq!(d.stats().pins, 1);
    let cell = std::cell::Cell::new(Some(reader));
    let code = in_forked_child(|| {
        // The child's copy: dropping it releases nothing of the parent's.
        drop(cell.take());
        if d.stats().pins != 1 {
            return 10;
        }
        // The child's own reader is its own pin.
        let mine = d.reader().unwrap();
        let _ = mine.get("k1").unwrap();
        if d.stats().pins != 2 {
            return 11;
        }
        drop(mine);
        if d.stats().pins != 1 {
            return 12;
        }
        0
    });
    assert_eq!(
        code, 0,
        "pins seen by the child (10: after dropping the inherited reader)"
    );
    let reader = cell.take().unwrap();
    assert_eq!(d.stats().pins, 1, "the parent's pin still counts");
    // And still holds: what the parent reads through it now is not
    // recycled by overwrites (which run into Full instead).
    let held = reader.get("k0").unwrap().unwrap();
    let copy = held.to_vec();
    let max_ops = 4 * SMALL_ARENA as u64 / SMALL_VALUE as u64;
    assert!(
        churn_until_full(&d, SMALL_KEYS, SMALL_VALUE, max_ops, 1 << 20).is_some(),
        "the parent's pin held nothing back"
    );
    assert_eq!(held, &copy[..], "the parent's borrowed bytes changed");
    drop(reader);
    assert_eq!(d.stats().pins, 0);
    churn_without_full(
        &d,
        SMALL_KEYS,
        SMALL_VALUE,
        2 << 20,
        "after the parent's drop",
    );
}

// ---------------------------------------------------------------------------
// 8. Threads
// ---------------------------------------------------------------------------

/// Threads holding borrowed reads: three pins each (two `Reader`s and a
/// `ValueRef`), far more than a handle's stash has pin slots, so pins join
/// busy slots.
const READER_THREADS: u64 = 7;
const WRITER_THREADS: u64 = 2;
const READER_ROUNDS: u64 = 300;

/// Reader threads of one handle hold readers and refs (joining pin slots)
/// while writer threads, and a writer process, overwrite, update, remove
/// and re-insert the keys they read: every held value stays whole and
/// unchanged, nobody gets `Full`, and every pin is released at the end.
///
/// Regression: the threads' pins overlap all the time, so a joined slot's
/// count never fell to zero and the epoch stopped; writers got `Full`
/// within a second (see `a_sliding_window_of_refs_never_starves_writers`).
fn threads_holding_readers_while_others_write() {
    let seg = Segment::new("borrow-threads");
    let d = create_fixed(&seg, 256, 32 << 20);
    for k in 0..KILL_KEYS {
        d.insert(kill_key(k), checked_value(k, 0)).unwrap();
    }
    let d = Arc::new(d);
    let mut other = Proc::spawn(
        "writer process",
        "overwrite-forever",
        &[seg.arg(), "9".into()],
    );
    let d2 = Arc::clone(&d);
    let (reads, writes) = with_watchdog("threads", move || {
        let d = &*d2;
        let stop = AtomicBool::new(false);
        let reads = AtomicU64::new(0);
        let writes = AtomicU64::new(0);
        thread::scope(|s| {
            for w in 0..WRITER_THREADS {
                let (stop, writes) = (&stop, &writes);
                s.spawn(move || {
                    let mut rng = Rng(0x77 + w);
                    let mut i = (w + 100) << 32;
                    while !stop.load(Ordering::Relaxed) {
                        let k = rng.below(KILL_KEYS as u64) as u8;
                        let v = checked_value(k, i);
                        let r = match rng.below(3) {
                            0 => d.insert(kill_key(k), &v),
                            1 => d.update(kill_key(k), |_| Some(v.clone())).map(drop),
                            _ => d
                                .remove(kill_key(k))
                                .and_then(|_| d.insert(kill_key(k), &v)),
                        };
                        if let Err(e) = r {
                            panic!("writer thread {w}, write {i}: {e}\n{:?}", d.stats());
                        }
                        i += 1;
                        writes.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            let (tx, rx) = mpsc::channel();
            for t in 0..READER_THREADS {
                let (reads, tx) = (&reads, tx.clone());
                s.spawn(move || {
                    let mut rng = Rng(0x99 + t);
                    for round in 0..READER_ROUNDS {
                        let reader = d.reader().unwrap();
                        let r2 = d.reader().unwrap();
                        let mut held = Vec::new();
                        for _ in 0..4 {
                            let k = rng.below(KILL_KEYS as u64) as u8;
                            let r = if k % 2 == 0 { &reader } else { &r2 };
                            if let Some(b) = r.get(kill_key(k)).unwrap() {
                                check_value(k, b).unwrap();
                                held.push((k, b, b.to_vec()));
                            }
                        }
                        let k = rng.below(KILL_KEYS as u64) as u8;
                        let one = d.get_ref(kill_key(k)).unwrap();
                        let one_copy = one.as_deref().map(<[u8]>::to_vec);
                        if round % 3 == 0 {
                            thread::sleep(Duration::from_micros(rng.below(2000)));
                        } else {
                            thread::yield_now();
                        }
                        for (k, b, copy) in &held {
                            assert_eq!(b, copy, "thread {t}: held value of key {k} changed");
                        }
                        assert_eq!(one.as_deref().map(<[u8]>::to_vec), one_copy);
                        reads.fetch_add(held.len() as u64 + 1, Ordering::Relaxed);
                    }
                    tx.send(()).unwrap();
                });
            }
            drop(tx);
            // Once every reader thread is done, stop the writers.
            for _ in rx.iter() {}
            stop.store(true, Ordering::Relaxed);
        });
        (reads.into_inner(), writes.into_inner())
    });
    eprintln!("{reads} borrowed reads held by {READER_THREADS} threads beside {writes} writes");
    assert!(writes > 0 && reads > 0);
    other.assert_running();
    other.kill();
    let s = d.stats();
    assert_eq!(s.pins, 0, "every pin released: {s:?}");
    // The writer process was killed mid-write: the first check may repair
    // what it left; a second finds nothing.
    checked(&d, "after the threads");
    let r = checked(&d, "after the threads, again");
    assert!(!r.repaired(), "{r}");
    for k in 0..KILL_KEYS {
        check_value(k, &d.get(kill_key(k)).unwrap().unwrap()).unwrap();
    }
}

/// A reader that found every pin slot of its handle busy joined one (its
/// count + 1, the slot's older epoch kept). Once the others are dropped it
/// still protects its bytes, across many times the arena in overwrites.
fn a_joined_pin_keeps_its_bytes() {
    let seg = Segment::new("borrow-join");
    let d = small_dict(&seg);
    let others: Vec<Reader<'_>> = (0..16).map(|_| d.reader().unwrap()).collect();
    // Writes between the pins, so the slots' epochs differ.
    d.insert("k1", filler(1, SMALL_VALUE)).unwrap();
    let joined = d.reader().unwrap();
    let held = joined.get("k0").unwrap().unwrap();
    let copy = held.to_vec();
    assert_eq!(d.stats().pins, 17);
    drop(others);
    assert_eq!(d.stats().pins, 1);
    let max_ops = 4 * SMALL_ARENA as u64 / SMALL_VALUE as u64;
    let full = churn_until_full(&d, SMALL_KEYS, SMALL_VALUE, max_ops, 1 << 20);
    assert!(full.is_some(), "the joined pin held nothing back");
    assert_eq!(held, &copy[..], "the joined reader's bytes changed");
    drop(joined);
    churn_without_full(
        &d,
        SMALL_KEYS,
        SMALL_VALUE,
        2 << 20,
        "after the joined reader",
    );
}

/// `as_pod` views a value in place, aligned for any type of alignment up
/// to 16, and refuses a wrong size.
fn as_pod_views_borrowed_values() {
    let seg = Segment::new("borrow-pod");
    let d = create_fixed(&seg, 64, 1 << 20);
    #[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
    #[repr(C, align(16))]
    struct Point {
        x: f64,
        y: f64,
        id: u64,
        pad: u64,
    }
    // Keys of every length up to 40 bytes: the value's start moves with it.
    for klen in 0..40usize {
        let key = vec![b'k'; klen];
        let p = Point {
            x: klen as f64,
            y: -1.5,
            id: klen as u64,
            pad: 0,
        };
        d.insert(&key, bytemuck::bytes_of(&p)).unwrap();
        let v = d.get_ref(&key).unwrap().unwrap();
        assert_in_mapping(seg.name(), &v);
        assert_eq!(v.as_ptr() as usize % 16, 0, "key of {klen} bytes");
        let view: &Point = v.as_pod().expect("aligned, right size");
        assert_eq!(*view, p);
        assert_eq!(
            view as *const Point as usize,
            v.as_ptr() as usize,
            "in place"
        );
        assert_eq!(v.as_pod::<[u64; 3]>(), None, "wrong size");
        let words: &[u64; 4] = v.as_pod().unwrap();
        assert_eq!(words[2], klen as u64);
    }
}

// ---------------------------------------------------------------------------
// Regressions
// ---------------------------------------------------------------------------

/// Regression: pin slots counted up to 65,535 pins each; with every slot
/// of a handle's stash at that count (262,140 borrowed reads held by one
/// handle), `reader()` and `get_ref` spun forever looking for a slot with
/// room. Sub-slots now count up to 2^31 (more, or a stash full of garbage,
/// is `Full`: see the unit tests in `epoch.rs`), so holding 300,000 is
/// fine, and never a hang.
fn more_pins_than_slots_can_count() {
    let seg = Segment::new("borrow-saturate");
    let d: &'static ShmDict = Box::leak(Box::new(create_fixed(&seg, 64, 1 << 20)));
    d.insert("k", "v").unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut held = Vec::with_capacity(300_000);
        for _ in 0..300_000 {
            held.push(d.reader().unwrap());
        }
        let r = d.get_ref("k").map(|v| v.map(|v| v.to_vec()));
        let pins = d.stats().pins;
        drop(held);
        let _ = tx.send((r, pins, d.stats().pins));
    });
    let (r, pins, after) = rx
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| panic!("300,000 readers: a hang"));
    assert_eq!(r.unwrap().as_deref(), Some(&b"v"[..]));
    assert_eq!(pins, 300_000);
    assert_eq!(after, 0);
}

/// Regression: a handle's drop freed its stash (its spare spill bag, and
/// retired blocks no pin could see) outside the write gate. A `check()`
/// running then could see such a block in neither the stash nor a free
/// list, take it for leaked and retire it, while the dropping handle freed
/// it: one block in two places (and a check of an intact segment that
/// "repaired" it).
fn check_repairs_nothing_while_handles_detach() {
    const DROPPERS: u64 = 2;
    const ROUNDS: u64 = 400;
    let seg = Segment::new("borrow-detach");
    let ctl_seg = Segment::new("borrow-detach-ctl");
    let d = Arc::new(create_fixed(&seg, 4096, 8 << 20));
    let ctl = create(&ctl_seg, 64, 1 << 16);
    // Long free lists of larger blocks, walked after the spill bags' order:
    // the check's walk between the free lists and the stashes takes longer.
    for i in 0..2000u64 {
        d.insert(format!("big-{i}"), filler(i, 2000)).unwrap();
    }
    for i in 0..2000u64 {
        d.remove(format!("big-{i}")).unwrap();
    }
    let mut procs = vec![Proc::spawn(
        "pin cycler",
        "pin-cycle",
        &[seg.arg(), ctl_seg.arg()],
    )];
    for i in 0..DROPPERS {
        procs.push(Proc::spawn(
            format!("dropper {i}"),
            "open-write-drop",
            &[seg.arg(), ctl_seg.arg(), ROUNDS.to_string()],
        ));
    }
    let mut checks = 0u64;
    let deadline = Instant::now() + WATCHDOG;
    loop {
        let r = d.check().unwrap();
        checks += 1;
        assert!(r.is_ok(), "check {checks}:\n{r}");
        assert!(
            r.skipped.is_some() || !r.repaired(),
            "check {checks} repaired an intact segment (nobody died):\n{r}"
        );
        let done = procs[1..].iter_mut().all(|p| p.poll().is_some());
        if done {
            break;
        }
        for p in &mut procs {
            if let Some(s) = p.poll() {
                assert!(s.success(), "{}", p.describe_failure());
            }
        }
        assert!(Instant::now() < deadline, "watchdog: droppers stalled");
        // Writers (and drops) wait while the gate is closed: let them in.
        thread::sleep(Duration::from_micros(300));
    }
    ctl.insert("stop", b"").unwrap();
    wait_all(&mut procs);
    eprintln!("{checks} checks beside {DROPPERS} x {ROUNDS} handle drops");
    let r = checked(&d, "after the drops");
    assert!(!r.repaired(), "{r}");
}

/// Regression: a reader that found every pin slot busy joined the slot its
/// thread prefers, keeping that slot's older epoch. A thread keeping the
/// last five `ValueRef`s it took (one more than a handle has pin slots)
/// joins that slot before its previous pin there is dropped, so the slot's
/// count never reaches zero and its epoch never moves: the global epoch
/// could not advance past it, nothing retired was ever freed again, and
/// every writer got `Full` for good, though each ref lived a few
/// microseconds. (Seven threads holding one reader each did the same.)
fn a_sliding_window_of_refs_never_starves_writers() {
    const WINDOW: usize = 5;
    let seg = Segment::new("borrow-window");
    let d = small_dict(&seg);
    let mut window: VecDeque<(u64, shmdict::ValueRef<'_>, Vec<u8>)> = VecDeque::new();
    let ops = 10 * SMALL_ARENA as u64 / SMALL_VALUE as u64;
    for i in 0..ops {
        let k = i % SMALL_KEYS;
        if let Err(e) = d.insert(format!("k{k}"), filler(i, SMALL_VALUE)) {
            panic!(
                "write {i} of {ops}, with {} refs held: {e}\n{:?}",
                window.len(),
                d.stats()
            );
        }
        let v = d.get_ref(format!("k{k}")).unwrap().unwrap();
        let copy = v.to_vec();
        window.push_back((k, v, copy));
        if window.len() > WINDOW {
            window.pop_front();
        }
        for (k, v, copy) in &window {
            assert_eq!(&v[..], &copy[..], "a held ref of k{k} changed");
        }
    }
    assert_eq!(d.stats().pins, WINDOW as u64);
}
