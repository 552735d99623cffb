//! A full /dev/shm gives `Error::Full`, never SIGBUS, in every process.
//!
//! Regression: segments are sparse files in /dev/shm, and a page got its
//! memory when first touched; with /dev/shm full, that first touch (an
//! insert into a fresh index unit or arena chunk, a new `Value`'s header)
//! killed the process with SIGBUS. Seen failing before `commit.rs`: the
//! filler processes died of signal 7.
//!
//! Growable dictionaries too (issue 12): several of them, with default
//! options and with small initial capacities, filled by several processes
//! at once until every insert says `Full`: no process dies of a signal,
//! every acknowledged key reads back, nothing else is there, and removing
//! keys makes room again for inserts from other processes.
//!
//! The trials need root: each mounts a 4 MiB tmpfs on /dev/shm in a private
//! mount namespace (`unshare -m`), so the machine's /dev/shm is untouched.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::acked::{assert_keyed, keyed_value, read_log, AckDir, AckLog};
use common::{Proc, WATCHDOG};
use shmdict::{Array, Error, ShmDict, Value};

fn main() {
    common::run(
        vec![
            (
                "a_full_dev_shm_gives_full_never_sigbus",
                a_full_dev_shm_gives_full_never_sigbus,
            ),
            (
                "growable_dictionaries_fill_dev_shm_give_full_never_sigbus",
                growable_dictionaries_fill_dev_shm,
            ),
        ],
        child,
    );
}

fn child(role: &str, args: &[String]) {
    match role {
        "namespace" => namespace(),
        "filler" => filler(&args[0], false),
        "namespace-growable" => namespace_growable(),
        "grow-filler" => grow_filler(&args[0], args[1].parse().unwrap()),
        "grow-refiller" => grow_refiller(&args[0], args[1].parse().unwrap()),
        other => panic!("unknown role {other}"),
    }
}

/// Whether this machine lets us mount a tmpfs in a new mount namespace.
fn can_unshare_mounts() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return false;
    }
    Command::new("unshare")
        .args(["-m", "--propagation", "private", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

fn a_full_dev_shm_gives_full_never_sigbus() {
    in_private_namespace("namespace");
}

fn growable_dictionaries_fill_dev_shm() {
    in_private_namespace("namespace-growable");
}

/// Runs the child `role` in a private mount namespace, where it mounts a
/// small /dev/shm of its own.
fn in_private_namespace(role: &str) {
    assert!(
        can_unshare_mounts(),
        "this trial needs root and `unshare -m` (CI runs as root)"
    );
    let exe = std::env::current_exe().unwrap();
    let mut p = Proc::spawn_program(
        role,
        "unshare",
        &[
            "-m".to_owned(),
            "--propagation".to_owned(),
            "private".to_owned(),
            exe.display().to_string(),
            common::CHILD_FLAG.to_owned(),
            role.to_owned(),
        ],
    );
    p.wait_ok();
}

fn mount_small_dev_shm() {
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs", "/dev/shm"])
        .status()
        .expect("mount");
    assert!(st.success(), "mount a small tmpfs on /dev/shm");
}

/// In the private mount namespace: a small /dev/shm, and fillers in two
/// processes at once. Each must end normally (a SIGBUS would show as
/// death by signal 7).
fn namespace() {
    mount_small_dev_shm();
    let mut procs: Vec<Proc> = (0..2)
        .map(|i| Proc::spawn(format!("filler {i}"), "filler", &[format!("f{i}")]))
        .collect();
    for p in &mut procs {
        p.wait_ok();
    }
    // Then this process, on an emptied /dev/shm (the others' Arrays and
    // Values stay behind otherwise, and may leave no room for a dictionary
    // with keys): it must fill it and make room again by removing keys.
    for entry in std::fs::read_dir("/dev/shm").expect("read /dev/shm") {
        let path = entry.expect("entry").path();
        std::fs::remove_file(&path).unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
    }
    filler("f2", true);
}

/// Fills /dev/shm with dictionaries, Values and Arrays until every
/// creation and every insert says `Full`; then makes room by removing
/// keys and checks the room is usable (`must_store`: this process must
/// have stored keys; a filler racing another may find no room at all).
fn filler(tag: &str, must_store: bool) {
    let mut dicts = Vec::new();
    let mut stored: Vec<Vec<String>> = Vec::new();
    let mut full_creations = 0;
    for k in 0..64 {
        let name = format!("full-{tag}-{k}");
        // A big index (units of it commit as they are used) and the default
        // arena (a quarter of the free /dev/shm).
        let d = match ShmDict::options().capacity(200_000).open(&name) {
            Ok(d) => d,
            Err(Error::Full { .. }) => {
                full_creations += 1;
                if full_creations > 3 {
                    break;
                }
                continue;
            }
            Err(e) => panic!("create {name}: {e}"),
        };
        let mut keys = Vec::new();
        for i in 0.. {
            let key = format!("{tag}-{k}-{i:07}");
            // Values of varying sizes, so arena chunks of every order split.
            let value = vec![i as u8; 16 + (i % 7) * 300];
            match d.insert(&key, &value) {
                Ok(()) => keys.push(key),
                Err(Error::Full { .. }) => break,
                Err(e) => panic!("insert {key}: {e}"),
            }
        }
        dicts.push(d);
        stored.push(keys);
    }
    // A filler racing another may find no room even for one dictionary.
    assert!(
        !dicts.is_empty() || !must_store,
        "{tag}: no dictionary could be created at all"
    );
    // Values and Arrays: Full when there is no room for them either.
    let mut prims = 0;
    for k in 0..64 {
        match Array::<u64>::open(&format!("full-{tag}-a{k}"), 64 * 1024) {
            Ok(a) => {
                a.write()[0] = 1;
                std::mem::forget(a);
                prims += 1;
            }
            Err(Error::Full { .. }) => break,
            Err(e) => panic!("array: {e}"),
        }
        match Value::<u64>::open(&format!("full-{tag}-v{k}"), 0) {
            Ok(v) => {
                v.store(7);
                std::mem::forget(v);
            }
            Err(Error::Full { .. }) => {}
            Err(e) => panic!("value: {e}"),
        }
    }
    eprintln!(
        "{tag}: {} dictionaries, {} keys, {prims} arrays before Full",
        dicts.len(),
        stored.iter().map(Vec::len).sum::<usize>()
    );
    // Everything stored reads back.
    for (d, keys) in dicts.iter().zip(&stored) {
        for (i, key) in keys.iter().enumerate() {
            let want = vec![i as u8; 16 + (i % 7) * 300];
            assert_eq!(d.get(key).unwrap().as_deref(), Some(&want[..]), "{key}");
        }
    }
    // Removing keys makes room again, in the same dictionary.
    match dicts.iter().zip(&stored).rev().find(|(_, k)| k.len() >= 4) {
        Some((d, keys)) => {
            for key in &keys[..keys.len() / 2] {
                assert!(d.remove(key).unwrap());
            }
            for key in &keys[..keys.len() / 4] {
                d.insert(key, b"again")
                    .unwrap_or_else(|e| panic!("after removals, {key}: {e}"));
            }
        }
        None => assert!(!must_store, "{tag}: no dictionary took keys"),
    }
    for k in 0..64 {
        let _ = ShmDict::unlink(&format!("full-{tag}-{k}"));
    }
}

// --- Growable dictionaries filled by several processes ---

/// The growable dictionaries and how each is created: default options, or
/// a small initial capacity and arena.
const GROWABLE: [(&str, Option<usize>); 4] = [
    ("grow-default-0", None),
    ("grow-default-1", None),
    ("grow-small-8", Some(8)),
    ("grow-small-100", Some(100)),
];
const FILLERS: u64 = 3;

fn grow_key(f: u64, i: u64) -> String {
    format!("f{f}-{i:06}")
}

/// A log record: dictionary `k`, key `i` of the filler.
fn rec(k: usize, i: u64) -> u64 {
    (k as u64) << 32 | i
}

/// Waits for `path` to exist (a file barrier: /dev/shm is full, so the
/// barrier lives in the ack directory).
fn await_file(path: &Path, procs: &mut [Proc]) {
    let deadline = Instant::now() + WATCHDOG;
    while !path.exists() {
        for p in procs.iter_mut() {
            p.assert_running();
        }
        assert!(Instant::now() < deadline, "watchdog: no {}", path.display());
        thread::sleep(Duration::from_millis(1));
    }
}

/// The keys each dictionary must hold, from the fillers' logs.
fn acknowledged(dir: &str) -> Vec<BTreeSet<String>> {
    let mut want = vec![BTreeSet::new(); GROWABLE.len()];
    for f in 0..FILLERS {
        let mut next = vec![0u64; GROWABLE.len()];
        for r in read_log(Path::new(dir).join(format!("filler-{f}.acks"))) {
            let (k, i) = ((r >> 32) as usize, r & 0xffff_ffff);
            assert_eq!(i, next[k], "filler {f}: acknowledgements out of order");
            next[k] += 1;
            want[k].insert(grow_key(f, i));
        }
    }
    want
}

/// Exactly `want[k]` is in dictionary `k`, each key with its value.
fn assert_holds(dicts: &[ShmDict], want: &[BTreeSet<String>], when: &str) {
    for (d, want) in dicts.iter().zip(want) {
        let keys: BTreeSet<String> = d
            .keys()
            .expect("keys")
            .into_iter()
            .map(|k| String::from_utf8(k).expect("utf-8 key"))
            .collect();
        let lost: Vec<&String> = want.difference(&keys).take(5).collect();
        let extra: Vec<&String> = keys.difference(want).take(5).collect();
        assert!(
            lost.is_empty() && extra.is_empty(),
            "{when}, {}: acknowledged keys lost {lost:?}, unacknowledged keys present {extra:?}",
            d.name()
        );
        assert_eq!(d.len(), want.len(), "{when}, {}: len()", d.name());
        for key in want {
            let v = d.get(key).expect("get").expect("listed key");
            assert_keyed(key.as_bytes(), &v, when);
        }
        let r = d.check().expect("check");
        assert!(r.is_ok() && !r.repaired(), "{when}: {r}");
    }
}

/// In the private mount namespace: the growable dictionaries are created,
/// three processes fill them at once until every insert is `Full`; what
/// they acknowledged is there; after removals, three other processes put
/// removed keys back, and every one fits.
fn namespace_growable() {
    mount_small_dev_shm();
    let dicts: Vec<ShmDict> = GROWABLE
        .iter()
        .map(|&(name, cap)| {
            let o = ShmDict::options().create_new(true);
            let o = match cap {
                Some(c) => o.capacity(c).arena_bytes(64 << 10),
                None => o,
            };
            o.open(name)
                .unwrap_or_else(|e| panic!("create {name} on an empty /dev/shm: {e}"))
        })
        .collect();
    let initial: Vec<usize> = dicts.iter().map(ShmDict::capacity).collect();
    let acks = AckDir::new("shm-full-growable");
    let dir = acks.path();

    let mut procs: Vec<Proc> = (0..FILLERS)
        .map(|f| {
            Proc::spawn(
                format!("filler {f}"),
                "grow-filler",
                &[dir.clone(), f.to_string()],
            )
        })
        .collect();
    for f in 0..FILLERS {
        await_file(&Path::new(&dir).join(format!("ready-{f}")), &mut procs);
    }
    std::fs::write(Path::new(&dir).join("go"), b"").unwrap();
    // `wait_ok` fails on a death by signal: SIGBUS would be signal 7.
    common::wait_all(&mut procs);

    let mut want = acknowledged(&dir);
    for ((d, w), init) in dicts.iter().zip(&want).zip(&initial) {
        assert!(!w.is_empty(), "{}: no filler stored a key", d.name());
        eprintln!(
            "{}: {} keys until Full, capacity {init} -> {}, {:?}",
            d.name(),
            w.len(),
            d.capacity(),
            d.stats()
        );
    }
    // The small ones grew before /dev/shm was full.
    for (k, &(name, cap)) in GROWABLE.iter().enumerate() {
        if cap.is_some() {
            assert!(
                dicts[k].capacity() > initial[k] && dicts[k].stats().generation > 0,
                "{name} never grew: capacity {}",
                dicts[k].capacity()
            );
        }
    }
    assert_holds(&dicts, &want, "after filling");

    // Half the keys of each dictionary go; other processes put back half of
    // those (the same keys: the same sizes of blocks).
    let mut back = Vec::new();
    for (d, w) in dicts.iter().zip(want.iter_mut()) {
        let removed: Vec<String> = w.iter().step_by(2).cloned().collect();
        for key in &removed {
            assert!(d.remove(key).expect("remove"), "remove {key}");
            w.remove(key);
        }
        let half = removed[..removed.len() / 2].to_vec();
        w.extend(half.iter().cloned());
        back.push(half);
    }
    for (k, keys) in back.iter().enumerate() {
        std::fs::write(Path::new(&dir).join(format!("back-{k}")), keys.join("\n")).unwrap();
    }
    let mut procs: Vec<Proc> = (0..FILLERS)
        .map(|f| {
            Proc::spawn(
                format!("refiller {f}"),
                "grow-refiller",
                &[dir.clone(), f.to_string()],
            )
        })
        .collect();
    common::wait_all(&mut procs);
    assert_holds(&dicts, &want, "after removals and re-inserts");
    drop(dicts);
    for (name, _) in GROWABLE {
        ShmDict::unlink(name).expect("unlink");
    }
}

/// Opens every growable dictionary, waits for the others, then inserts
/// into each in turn until each says `Full`, acknowledging every insert
/// that returned `Ok` before the next.
fn grow_filler(dir: &str, f: u64) {
    let dicts: Vec<ShmDict> = GROWABLE
        .iter()
        .map(|&(name, _)| ShmDict::options().create(false).open(name).expect("open"))
        .collect();
    let mut log = AckLog::create(&format!("{dir}/filler-{f}.acks"));
    std::fs::write(format!("{dir}/ready-{f}"), b"").unwrap();
    let go = Path::new(dir).join("go");
    let deadline = Instant::now() + WATCHDOG;
    while !go.exists() {
        assert!(Instant::now() < deadline, "filler {f}: no go");
        thread::sleep(Duration::from_millis(1));
    }
    let mut next = vec![0u64; dicts.len()];
    let mut full = vec![false; dicts.len()];
    while full.contains(&false) {
        for (k, d) in dicts.iter().enumerate() {
            if full[k] {
                continue;
            }
            let key = grow_key(f, next[k]);
            match d.insert(&key, keyed_value(key.as_bytes())) {
                Ok(()) => {
                    log.record(rec(k, next[k]));
                    next[k] += 1;
                }
                Err(Error::Full { segment, .. }) => {
                    assert_eq!(segment, d.name());
                    full[k] = true;
                }
                Err(e) => panic!("filler {f}: insert {key} into {}: {e}", d.name()),
            }
        }
    }
    eprintln!("filler {f}: {next:?} keys before Full");
}

/// Puts back its share of the removed keys: each must fit.
fn grow_refiller(dir: &str, f: u64) {
    for (k, &(name, _)) in GROWABLE.iter().enumerate() {
        let d = ShmDict::options()
            .create(false)
            .open(name)
            .unwrap_or_else(|e| panic!("refiller {f}: open {name}: {e}"));
        let keys = std::fs::read_to_string(format!("{dir}/back-{k}")).unwrap();
        for key in keys.lines().skip(f as usize).step_by(FILLERS as usize) {
            d.insert(key, keyed_value(key.as_bytes()))
                .unwrap_or_else(|e| {
                    panic!("refiller {f}: after removals, re-insert {key} into {name}: {e}")
                });
        }
    }
}
