//! A full /dev/shm gives `Error::Full`, never SIGBUS, in every process.
//!
//! Regression: segments are sparse files in /dev/shm, and a page got its
//! memory when first touched; with /dev/shm full, that first touch (an
//! insert into a fresh index unit or arena chunk, a new `Value`'s header)
//! killed the process with SIGBUS. Seen failing before `commit.rs`: the
//! filler processes died of signal 7.
//!
//! The trial needs root: it mounts a 4 MiB tmpfs on /dev/shm in a private
//! mount namespace (`unshare -m`), so the machine's /dev/shm is untouched.

mod common;

use std::process::Command;

use common::Proc;
use shmdict::{Array, Error, ShmDict, Value};

fn main() {
    common::run(
        vec![(
            "a_full_dev_shm_gives_full_never_sigbus",
            a_full_dev_shm_gives_full_never_sigbus,
        )],
        child,
    );
}

fn child(role: &str, args: &[String]) {
    match role {
        "namespace" => namespace(),
        "filler" => filler(&args[0], false),
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
    assert!(
        can_unshare_mounts(),
        "this trial needs root and `unshare -m` (CI runs as root)"
    );
    let exe = std::env::current_exe().unwrap();
    let mut p = Proc::spawn_program(
        "namespace",
        "unshare",
        &[
            "-m".to_owned(),
            "--propagation".to_owned(),
            "private".to_owned(),
            exe.display().to_string(),
            common::CHILD_FLAG.to_owned(),
            "namespace".to_owned(),
        ],
    );
    p.wait_ok();
}

/// In the private mount namespace: a small /dev/shm, and fillers in two
/// processes at once. Each must end normally (a SIGBUS would show as
/// death by signal 7).
fn namespace() {
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs", "/dev/shm"])
        .status()
        .expect("mount");
    assert!(st.success(), "mount a small tmpfs on /dev/shm");
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
