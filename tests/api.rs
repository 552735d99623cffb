//! The public contract in one process: names, modes, creation and unlinking,
//! `Full`, the single-key operations, typed values, thread safety, and
//! segments that are garbage, damaged or hostile.
//!
//! Every segment is created under a unique name and unlinked by a guard, also
//! when a test fails. The tests that run operations on damaged segment
//! contents do so in a child process (this test binary, re-executed to run
//! only [`garbage_contents_child_process_entry`]) under a watchdog, so that a
//! crash or a hang is reported as a failure naming the case.

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shmdict::{Error, ShmDict};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique(tag: &str) -> String {
    format!(
        "shmdict-test-api-{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A unique name whose /dev/shm entry (segment, file, directory, FIFO or
/// symlink) is removed when dropped.
struct Segment(String);

impl Segment {
    fn new(tag: &str) -> Segment {
        Segment(unique(tag))
    }
    fn named(name: String) -> Segment {
        Segment(name)
    }
    fn name(&self) -> &str {
        &self.0
    }
    fn path(&self) -> PathBuf {
        shm_path(&self.0)
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        let p = self.path();
        if p.is_dir() && !p.is_symlink() {
            let _ = fs::remove_dir(&p);
        } else {
            let _ = fs::remove_file(&p);
        }
    }
}

fn shm_path(name: &str) -> PathBuf {
    Path::new("/dev/shm").join(name)
}

fn create(seg: &Segment, capacity: usize, arena: usize) -> ShmDict {
    ShmDict::options()
        .capacity(capacity)
        .arena_bytes(arena)
        .create_new(true)
        .open(seg.name())
        .unwrap_or_else(|e| panic!("create {}: {e}", seg.name()))
}

/// A dictionary of fixed size (`Options::fixed_size(true)`): `Full` at
/// `capacity` keys or when the arena is full, for the trials of `Full`.
pub(crate) fn create_fixed(seg: &Segment, capacity: usize, arena: usize) -> ShmDict {
    ShmDict::options()
        .capacity(capacity)
        .arena_bytes(arena)
        .fixed_size(true)
        .create_new(true)
        .open(seg.name())
        .unwrap_or_else(|e| panic!("create {}: {e}", seg.name()))
}

fn perms(name: &str) -> u32 {
    fs::metadata(shm_path(name))
        .expect("segment file")
        .permissions()
        .mode()
        & 0o7777
}

/// Deterministic pseudo-random numbers (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
    fn fill(&mut self, buf: &mut [u8]) {
        buf.iter_mut().for_each(|b| *b = self.next() as u8);
    }
}

fn u64_of(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().expect("8-byte counter"))
}

fn incr(old: Option<&[u8]>) -> Option<Vec<u8>> {
    Some((old.map_or(0, u64_of) + 1).to_le_bytes().to_vec())
}

/// Serializes the tests that change the process umask or depend on it.
static UMASK: Mutex<()> = Mutex::new(());

/// Sets the process umask; restores the previous one on drop.
struct Umask(libc::mode_t);

impl Umask {
    fn set(mask: libc::mode_t) -> Umask {
        // SAFETY: umask has no preconditions; it only swaps the process mask.
        Umask(unsafe { libc::umask(mask) })
    }
}

impl Drop for Umask {
    fn drop(&mut self) {
        // SAFETY: as in `Umask::set`.
        unsafe { libc::umask(self.0) };
    }
}

// ---------------------------------------------------------------------------
// Names, modes, creation and unlinking
// ---------------------------------------------------------------------------

#[test]
fn invalid_names_are_rejected_everywhere() {
    let u = unique("name");
    let long = format!("{u}{}", "x".repeat(201 - u.len()));
    assert_eq!(long.chars().count(), 201);
    let bad = [
        String::new(),
        long,
        format!("{u}/x"),
        format!("/{u}"),
        format!("{u} x"),
        format!("{u}é"),
        format!("{u}\u{1F600}"),
        format!("{u}\0"),
        format!("{u}:x"),
        format!("{u}\n"),
        ".".to_owned(),
        "..".to_owned(),
    ];
    for name in &bad {
        let is_invalid = |r: Result<(), Error>| matches!(r, Err(Error::InvalidName { .. }));
        assert!(
            is_invalid(ShmDict::open(name).map(drop)),
            "open({name:?}) must be InvalidName"
        );
        assert!(
            is_invalid(
                ShmDict::options()
                    .create_new(true)
                    .capacity(4)
                    .open(name)
                    .map(drop)
            ),
            "options().open({name:?}) must be InvalidName"
        );
        assert!(
            is_invalid(ShmDict::unlink(name)),
            "unlink({name:?}) must be InvalidName"
        );
        if !name.contains(['/', '\0']) && !name.is_empty() && name != "." && name != ".." {
            assert!(
                !shm_path(name).exists(),
                "a rejected name left a file: {name:?}"
            );
        }
    }
}

#[test]
fn names_of_200_allowed_characters_are_accepted() {
    let u = unique("name");
    let names = [
        format!("{u}{}", "y".repeat(200 - u.len())),
        format!(".{u}"),
        format!("{u}.A-z_0.9-"),
        format!("-{u}"),
    ];
    assert_eq!(names[0].chars().count(), 200);
    for name in names {
        let seg = Segment::named(name.clone());
        let d = ShmDict::options()
            .capacity(4)
            .arena_bytes(1 << 16)
            .open(&name)
            .unwrap_or_else(|e| panic!("{name:?} is a valid name: {e}"));
        assert_eq!(d.name(), name);
        d.insert("k", "v").unwrap();
        assert!(seg.path().exists(), "segment file of {name:?}");
        ShmDict::unlink(&name).unwrap();
        assert!(!seg.path().exists());
    }
}

#[test]
fn mode_is_applied_exactly_whatever_the_umask() {
    let _lock = UMASK.lock().unwrap_or_else(|e| e.into_inner());
    for mask in [0o077, 0o022, 0o000, 0o777] {
        let _umask = Umask::set(mask);
        for mode in [0o640, 0o604, 0o600, 0o666, 0o400] {
            let seg = Segment::new("mode");
            let d = ShmDict::options()
                .capacity(4)
                .arena_bytes(1 << 16)
                .mode(mode)
                .open(seg.name())
                .unwrap();
            assert_eq!(
                perms(seg.name()),
                mode,
                "mode {mode:o} under umask {mask:03o}"
            );
            drop(d);
        }
        let seg = Segment::new("mode-default");
        let _d = ShmDict::options()
            .capacity(4)
            .arena_bytes(1 << 16)
            .open(seg.name())
            .unwrap();
        assert_eq!(
            perms(seg.name()),
            0o600,
            "default mode under umask {mask:03o}"
        );
        let seg = Segment::new("mode-default-open");
        let _d = ShmDict::open(seg.name()).unwrap();
        assert_eq!(perms(seg.name()), 0o600, "ShmDict::open's mode");
    }
}

#[test]
fn attaching_ignores_capacity_arena_and_mode() {
    let seg = Segment::new("attach");
    let d = ShmDict::options()
        .capacity(10)
        .arena_bytes(1 << 16)
        .mode(0o640)
        .open(seg.name())
        .unwrap();
    d.insert("kept", "yes").unwrap();
    let size = fs::metadata(seg.path()).unwrap().len();
    let again = ShmDict::options()
        .capacity(100_000)
        .arena_bytes(64 << 20)
        .mode(0o666)
        .open(seg.name())
        .unwrap();
    assert_eq!(again.capacity(), 10);
    assert_eq!(again.stats().arena_bytes, d.stats().arena_bytes);
    assert_eq!(again.stats().capacity, 10);
    assert_eq!(fs::metadata(seg.path()).unwrap().len(), size);
    assert_eq!(perms(seg.name()), 0o640);
    assert_eq!(again.get("kept").unwrap().as_deref(), Some(&b"yes"[..]));
    // The default mode (0600) is the most an attached segment may grant:
    // 0640 grants group read, so a plain open refuses it.
    match ShmDict::open(seg.name()) {
        Err(Error::PermissionDenied { mode, .. }) => assert_eq!(mode, 0o640),
        other => panic!("0640 segment opened with the default 0600: {other:?}"),
    }
    let plain = ShmDict::options().mode(0o640).open(seg.name()).unwrap();
    assert_eq!(plain.capacity(), 10);
}

#[test]
fn create_new_on_an_existing_name_is_already_exists() {
    let seg = Segment::new("create-new");
    let d = create(&seg, 8, 1 << 16);
    d.insert("a", "1").unwrap();
    for capacity in [8, 1000] {
        let r = ShmDict::options()
            .capacity(capacity)
            .create_new(true)
            .open(seg.name());
        assert!(
            matches!(r, Err(Error::AlreadyExists { .. })),
            "create_new on an existing name: {r:?}"
        );
    }
    // The existing segment is untouched.
    assert_eq!(d.get("a").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(
        ShmDict::open(seg.name()).unwrap().get("a").unwrap(),
        Some(b"1".to_vec())
    );
}

#[test]
fn create_false_only_attaches() {
    let seg = Segment::new("attach-only");
    let r = ShmDict::options().create(false).open(seg.name());
    assert!(
        matches!(r, Err(Error::NotFound { .. })),
        "attach-only open of a missing name: {r:?}"
    );
    assert!(!seg.path().exists(), "nothing was created");
    let d = create(&seg, 8, 1 << 16);
    d.insert("a", "1").unwrap();
    let again = ShmDict::options().create(false).open(seg.name()).unwrap();
    assert_eq!(again.get("a").unwrap().as_deref(), Some(&b"1"[..]));
    let r = ShmDict::options()
        .create(false)
        .create_new(true)
        .open(seg.name());
    assert!(
        matches!(r, Err(Error::InvalidArgument { .. })),
        "contradictory options: {r:?}"
    );
}

#[test]
fn unlink_of_a_missing_name_is_not_found() {
    let name = unique("missing");
    assert!(matches!(
        ShmDict::unlink(&name),
        Err(Error::NotFound { .. })
    ));
    let seg = Segment::new("twice");
    drop(create(&seg, 4, 1 << 16));
    ShmDict::unlink(seg.name()).unwrap();
    assert!(matches!(
        ShmDict::unlink(seg.name()),
        Err(Error::NotFound { .. })
    ));
}

#[test]
fn unlink_removes_the_name_and_attached_handles_keep_working() {
    let seg = Segment::new("unlink");
    let d = create(&seg, 64, 1 << 16);
    let other = ShmDict::open(seg.name()).unwrap();
    d.insert("before", "1").unwrap();
    ShmDict::unlink(seg.name()).unwrap();
    assert!(!seg.path().exists(), "no file of that name after unlink");
    let leftovers: Vec<_> = fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(seg.name()))
        .collect();
    assert!(leftovers.is_empty(), "files left: {leftovers:?}");
    // Both handles still work on the (now nameless) segment and see each other.
    d.insert("after", "2").unwrap();
    assert_eq!(other.get("after").unwrap(), Some(b"2".to_vec()));
    assert_eq!(
        other.update("before", incr_text).unwrap(),
        Some(b"2".to_vec())
    );
    assert_eq!(d.get("before").unwrap(), Some(b"2".to_vec()));
    assert!(other.remove("after").unwrap());
    assert_eq!(d.len(), 1);
    // The name is free again: opening it creates a new, empty segment.
    let fresh = ShmDict::options()
        .capacity(4)
        .arena_bytes(1 << 16)
        .create_new(true)
        .open(seg.name())
        .unwrap();
    assert!(fresh.is_empty());
    fresh.insert("new", "x").unwrap();
    assert!(!d.contains_key("new").unwrap());
}

fn incr_text(old: Option<&[u8]>) -> Option<Vec<u8>> {
    let n: u64 = std::str::from_utf8(old?).ok()?.parse().ok()?;
    Some((n + 1).to_string().into_bytes())
}

#[test]
fn out_of_range_options_are_invalid_argument_and_leave_no_file() {
    let cases: [(&str, usize, usize); 3] = [
        ("capacity 0", 0, 1 << 16),
        ("capacity usize::MAX", usize::MAX, 1 << 16),
        ("arena usize::MAX", 16, usize::MAX),
    ];
    for (case, capacity, arena) in cases {
        let seg = Segment::new("range");
        let r = ShmDict::options()
            .capacity(capacity)
            .arena_bytes(arena)
            .open(seg.name());
        assert!(
            matches!(r, Err(Error::InvalidArgument { .. })),
            "{case}: {r:?}"
        );
        assert!(!seg.path().exists(), "{case}: a file was left behind");
    }
}

#[test]
fn default_sized_segment_is_sparse() {
    use std::os::unix::fs::MetadataExt;
    let seg = Segment::new("sparse");
    let d = ShmDict::open(seg.name()).unwrap();
    for i in 0..100 {
        d.insert(format!("k{i}"), [i as u8; 100]).unwrap();
    }
    let meta = fs::metadata(seg.path()).unwrap();
    let committed = meta.blocks() * 512;
    assert!(
        committed < 8 << 20,
        "a default-sized dictionary with 100 small keys commits {committed} of {} bytes",
        meta.len()
    );
    assert!(d.capacity() >= 1000, "default capacity {}", d.capacity());
}

#[test]
fn many_open_and_drop_cycles_leak_no_handles() {
    let seg = Segment::new("reopen");
    let d = create(&seg, 16, 1 << 16);
    d.insert("n", 0u64.to_le_bytes()).unwrap();
    // More cycles than the segment has room for attached handles at once.
    for _ in 0..5000 {
        let h = ShmDict::open(seg.name()).unwrap();
        h.update("n", incr).unwrap();
    }
    assert_eq!(u64_of(&d.get("n").unwrap().unwrap()), 5000);
    // Many handles open at the same time work too.
    let handles: Vec<ShmDict> = (0..200)
        .map(|_| ShmDict::open(seg.name()).unwrap())
        .collect();
    for h in &handles {
        h.update("n", incr).unwrap();
    }
    assert_eq!(u64_of(&d.get("n").unwrap().unwrap()), 5200);
}

// ---------------------------------------------------------------------------
// Full
// ---------------------------------------------------------------------------

fn is_full<T: std::fmt::Debug>(r: &Result<T, Error>) -> bool {
    matches!(r, Err(Error::Full { .. }))
}

fn value_for(i: usize, len: usize) -> Vec<u8> {
    let mut v = format!("value-{i}-").into_bytes();
    v.resize(len.max(v.len()), (i % 251) as u8);
    v
}

#[test]
fn full_by_capacity_is_clean_and_freeing_makes_room() {
    let seg = Segment::new("full-cap");
    let cap = 50;
    let d = create_fixed(&seg, cap, 1 << 20);
    let key = |i: usize| format!("key-{i}");
    let mut stored = 0;
    let err = loop {
        match d.insert(key(stored), value_for(stored, 20)) {
            Ok(()) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored <= cap, "more than capacity ({cap}) live keys");
    };
    assert!(matches!(err, Error::Full { .. }), "{err:?}");
    assert_eq!(stored, cap, "exactly `capacity` keys fit");
    let check_all = |n: std::ops::Range<usize>| {
        for i in n {
            assert_eq!(d.get(key(i)).unwrap(), Some(value_for(i, 20)), "key {i}");
        }
    };
    check_all(0..cap);
    assert_eq!(d.len(), cap);
    assert!(
        !d.contains_key(key(cap)).unwrap(),
        "the failed key is absent"
    );
    // A new key by update is Full too, and not created.
    assert!(is_full(&d.update("new-by-update", |_| Some(b"x".to_vec()))));
    assert!(!d.contains_key("new-by-update").unwrap());
    // Existing keys can still be overwritten and updated while full.
    d.insert(key(0), value_for(1000, 300)).unwrap();
    d.update(key(1), |old| {
        assert_eq!(old, Some(value_for(1, 20).as_slice()));
        Some(value_for(1001, 5))
    })
    .unwrap();
    assert_eq!(d.get(key(0)).unwrap(), Some(value_for(1000, 300)));
    assert_eq!(d.get(key(1)).unwrap(), Some(value_for(1001, 5)));
    d.insert(key(0), value_for(0, 20)).unwrap();
    d.insert(key(1), value_for(1, 20)).unwrap();
    check_all(0..cap);
    // Freeing makes room again, repeatedly.
    for round in 0..3 {
        for i in 0..10 {
            assert!(d.remove(key(i)).unwrap());
        }
        for i in 0..10 {
            d.insert(format!("round-{round}-{i}"), "r").unwrap();
        }
        assert!(is_full(&d.insert("one-more", "x")));
        for i in 0..10 {
            assert!(d.remove(format!("round-{round}-{i}")).unwrap());
            d.insert(key(i), value_for(i, 20)).unwrap();
        }
        check_all(0..cap);
    }
}

#[test]
fn full_by_arena_is_clean_and_freeing_makes_room() {
    let seg = Segment::new("full-arena");
    let d = create_fixed(&seg, 10_000, 1 << 16);
    let arena = d.stats().arena_bytes;
    let key = |i: usize| format!("key-{i}");
    let len = 1000;
    let mut stored = 0;
    let err = loop {
        match d.insert(key(stored), value_for(stored, len)) {
            Ok(()) => stored += 1,
            Err(e) => break e,
        }
        assert!(
            stored * len <= arena,
            "more bytes stored than the arena has"
        );
    };
    assert!(matches!(err, Error::Full { .. }), "{err:?}");
    assert!(stored > 0);
    assert!(!d.contains_key(key(stored)).unwrap());
    let check_all = || {
        for i in 0..stored {
            assert_eq!(d.get(key(i)).unwrap(), Some(value_for(i, len)), "key {i}");
        }
    };
    check_all();
    assert_eq!(d.len(), stored);
    // Growing an existing value when there is no room fails and keeps the old one.
    assert!(is_full(&d.insert(key(0), vec![1; arena / 2])));
    assert!(is_full(&d.update(key(0), |_| Some(vec![2; arena / 2]))));
    // A value larger than the arena is Full, never a panic.
    assert!(is_full(&d.insert("huge", vec![0; arena * 2])));
    check_all();
    // Free half and store again.
    for i in (0..stored).step_by(2) {
        assert!(d.remove(key(i)).unwrap());
    }
    for i in (0..stored).step_by(2) {
        d.insert(key(i), value_for(i, len))
            .unwrap_or_else(|e| panic!("re-insert of key {i} after freeing: {e}"));
    }
    check_all();
}

#[test]
fn freed_small_blocks_make_room_for_the_largest_promised_entry() {
    let seg = Segment::new("full-merge");
    let arena_bytes = 1 << 20;
    let d = create_fixed(&seg, 100_000, arena_bytes);
    let big_key = vec![b'K'; 4096];
    let big_value = vec![0xB1; arena_bytes / 8];
    // On the empty arena it fits.
    d.insert(&big_key, &big_value).unwrap();
    assert!(d.remove(&big_key).unwrap());
    // Fill the arena with small values until Full.
    let key = |i: usize| format!("s{i}");
    let mut n = 0;
    loop {
        match d.insert(key(n), [n as u8; 10]) {
            Ok(()) => n += 1,
            Err(Error::Full { .. }) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(n < 100_000, "the arena never filled");
    }
    assert!(n > 1000, "only {n} small values fit in {arena_bytes} bytes");
    for i in 0..n {
        assert_eq!(d.get(key(i)).unwrap(), Some(vec![i as u8; 10]), "key {i}");
    }
    assert!(is_full(&d.insert(&big_key, &big_value)));
    for i in 0..n {
        assert!(d.remove(key(i)).unwrap());
    }
    assert!(d.is_empty());
    // The promise: a 4 KiB key with an arena_bytes/8 value fits when the
    // arena is free, however it was used before.
    d.insert(&big_key, &big_value)
        .expect("4 KiB key + arena/8 value after freeing small blocks");
    assert_eq!(d.get(&big_key).unwrap(), Some(big_value.clone()));
    // And again after overwriting it in place a few times.
    for i in 0..4u8 {
        d.insert(&big_key, vec![i; arena_bytes / 8]).unwrap();
    }
    assert_eq!(d.get(&big_key).unwrap(), Some(vec![3; arena_bytes / 8]));
}

// ---------------------------------------------------------------------------
// Single-key operations
// ---------------------------------------------------------------------------

#[test]
fn len_is_empty_keys_contains_key_and_get_into() {
    let seg = Segment::new("basics");
    let d = create(&seg, 100, 1 << 20);
    assert!(d.is_empty());
    assert_eq!(d.len(), 0);
    assert!(d.keys().unwrap().is_empty());
    assert_eq!(d.get("nope").unwrap(), None);
    let mut buf = b"junk that is longer than any value".to_vec();
    assert!(!d.get_into("nope", &mut buf).unwrap());
    assert!(!d.contains_key("nope").unwrap());
    assert!(!d.remove("nope").unwrap());

    let big_key = vec![0xEE; 4096];
    let entries: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b"".to_vec(), b"empty key".to_vec()),
        (b"empty value".to_vec(), b"".to_vec()),
        (vec![0, 1, 2, 255], vec![0; 9]),
        (b"text".to_vec(), "żółw 🐢".as_bytes().to_vec()),
        (big_key.clone(), vec![7; 5000]),
    ];
    // `&str`, `String`, `&[u8]` and `Vec<u8>` all work as keys and values.
    d.insert("str", "v").unwrap();
    d.insert(String::from("string"), String::from("v")).unwrap();
    d.insert(&b"slice"[..], &b"v"[..]).unwrap();
    let (owned_key, owned_value): (Vec<u8>, Vec<u8>) = (b"vec".into(), b"v".into());
    d.insert(owned_key, owned_value).unwrap();
    for (k, v) in &entries {
        d.insert(k, v).unwrap();
    }
    assert_eq!(d.len(), entries.len() + 4);
    assert!(!d.is_empty());
    for (k, v) in &entries {
        assert_eq!(d.get(k).unwrap().as_ref(), Some(v));
        assert!(d.contains_key(k).unwrap());
        buf = b"junk that is longer than any value".to_vec();
        assert!(d.get_into(k, &mut buf).unwrap());
        assert_eq!(&buf, v, "get_into replaces the buffer's contents");
    }
    // Overwriting does not change len.
    d.insert("str", "w").unwrap();
    assert_eq!(d.get("str").unwrap(), Some(b"w".to_vec()));
    assert_eq!(d.len(), entries.len() + 4);
    let keys = d.keys().unwrap();
    let set: HashSet<Vec<u8>> = keys.iter().cloned().collect();
    assert_eq!(set.len(), keys.len(), "keys() has each key once");
    let mut expected: HashSet<Vec<u8>> = entries.iter().map(|(k, _)| k.clone()).collect();
    for k in ["str", "string", "slice", "vec"] {
        expected.insert(k.as_bytes().to_vec());
    }
    assert_eq!(set, expected);
    assert!(d.remove(&big_key).unwrap());
    assert!(!d.remove(&big_key).unwrap());
    assert!(!d.contains_key(&big_key).unwrap());
    assert_eq!(d.len(), entries.len() + 3);
    assert!(d.remove("").unwrap());
    assert_eq!(d.get("").unwrap(), None);
}

#[test]
fn update_creates_modifies_and_removes() {
    let seg = Segment::new("update");
    let d = create(&seg, 100, 1 << 20);
    // f sees None for an absent key; returning None leaves it absent.
    let mut seen = Vec::new();
    let r = d
        .update("k", |old| {
            seen.push(old.map(<[u8]>::to_vec));
            None
        })
        .unwrap();
    assert_eq!(r, None);
    assert_eq!(seen, vec![None]);
    assert!(!d.contains_key("k").unwrap());
    assert_eq!(d.len(), 0);
    // Returning Some creates it and returns what was stored.
    assert_eq!(
        d.update("k", |_| Some(b"1".to_vec())).unwrap(),
        Some(b"1".to_vec())
    );
    assert_eq!(d.len(), 1);
    // f sees the current value.
    assert_eq!(d.update("k", incr_text).unwrap(), Some(b"2".to_vec()));
    assert_eq!(d.get("k").unwrap(), Some(b"2".to_vec()));
    // A value of another length, then the empty value.
    assert_eq!(
        d.update("k", |_| Some(vec![9; 3000])).unwrap(),
        Some(vec![9; 3000])
    );
    assert_eq!(d.update("k", |_| Some(Vec::new())).unwrap(), Some(vec![]));
    assert_eq!(d.get("k").unwrap(), Some(vec![]));
    // Returning None removes it.
    assert_eq!(
        d.update("k", |old| {
            assert_eq!(old, Some(&[][..]));
            None
        })
        .unwrap(),
        None
    );
    assert!(!d.contains_key("k").unwrap());
    assert_eq!(d.len(), 0);
    assert!(d.keys().unwrap().is_empty());
}

// ---------------------------------------------------------------------------
// Typed values
// ---------------------------------------------------------------------------

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Job {
    id: u64,
    name: String,
    tags: Vec<String>,
    score: Option<f64>,
    blob: Vec<u8>,
    done: bool,
}

fn job(id: u64) -> Job {
    Job {
        id,
        name: format!("job number {id} ✓"),
        tags: vec!["a".into(), "bb".into(), String::new()],
        score: (id % 2 == 0).then_some(id as f64 / 3.0),
        blob: (0..id as u8).collect(),
        done: id % 3 == 0,
    }
}

#[test]
fn typed_values_round_trip_and_decode_errors_are_codec() {
    let seg = Segment::new("typed");
    let d = create(&seg, 100, 1 << 20);
    let jobs = d.typed::<Job>();
    assert_eq!(jobs.get("j").unwrap(), None);
    for id in 0..20 {
        jobs.insert(format!("job-{id}"), &job(id)).unwrap();
    }
    for id in 0..20 {
        assert_eq!(jobs.get(format!("job-{id}")).unwrap(), Some(job(id)));
    }
    // The stored bytes are postcard's encoding.
    assert_eq!(
        d.get("job-7").unwrap().unwrap(),
        postcard::to_allocvec(&job(7)).unwrap()
    );
    let stored = jobs
        .update("job-7", |old| {
            let mut j = old.expect("present");
            j.tags.push("updated".into());
            j.done = true;
            Some(j)
        })
        .unwrap()
        .unwrap();
    assert_eq!(stored.tags.last().map(String::as_str), Some("updated"));
    assert_eq!(jobs.get("job-7").unwrap(), Some(stored));
    assert_eq!(jobs.update("job-7", |_| None).unwrap(), None);
    assert!(!d.contains_key("job-7").unwrap());
    let created = jobs.update("job-new", |old| {
        assert!(old.is_none());
        Some(job(99))
    });
    assert_eq!(created.unwrap(), Some(job(99)));

    let nums = d.typed::<u64>();
    nums.insert("n", &7).unwrap();
    assert_eq!(nums.update("n", |v| v.map(|v| v * 6)).unwrap(), Some(42));
    assert_eq!(nums.get("n").unwrap(), Some(42));

    // Values of another type: decoding fails with Codec, never a panic.
    d.insert("raw-empty", b"").unwrap();
    d.insert("raw-garbage", [0xff; 12]).unwrap();
    let codec = |r: Result<Option<Job>, Error>| matches!(r, Err(Error::Codec { .. }));
    assert!(codec(jobs.get("raw-empty")), "empty bytes as a Job");
    assert!(codec(jobs.get("raw-garbage")), "0xff bytes as a Job");
    assert!(
        matches!(d.typed::<bool>().get("n"), Err(Error::Codec { .. })),
        "42 is not a postcard bool"
    );
    assert!(matches!(
        d.typed::<u64>().get("raw-garbage"),
        Err(Error::Codec { .. })
    ));
    // A typed update over an undecodable value writes nothing.
    let mut called = false;
    let r = jobs.update("raw-garbage", |_| {
        called = true;
        Some(job(1))
    });
    assert!(matches!(r, Err(Error::Codec { .. })), "{r:?}");
    assert!(!called, "f must not run on an undecodable value");
    assert_eq!(d.get("raw-garbage").unwrap(), Some(vec![0xff; 12]));
}

/// A value of another type whose encoding merely starts like a `T` (postcard
/// is not self-describing) must not be silently read as that `T`: the whole
/// stored value has to decode, with no bytes left over.
#[test]
fn typed_get_of_a_longer_value_of_another_type_is_codec() {
    let seg = Segment::new("typed-trailing");
    let d = create(&seg, 16, 1 << 16);
    d.typed::<Job>().insert("job", &job(3)).unwrap();
    d.typed::<String>()
        .insert("text", &"hello".to_owned())
        .unwrap();
    let r = d.typed::<u64>().get("job");
    assert!(
        matches!(r, Err(Error::Codec { .. })),
        "a Job read as u64 gave {r:?}"
    );
    let r = d.typed::<u8>().get("text");
    assert!(
        matches!(r, Err(Error::Codec { .. })),
        "the String \"hello\" read as u8 gave {r:?}"
    );
    let r = d.typed::<u64>().update("job", |v| v.map(|v| v + 1));
    assert!(
        matches!(r, Err(Error::Codec { .. })),
        "update of a Job as u64 gave {r:?}"
    );
    assert_eq!(d.typed::<Job>().get("job").unwrap(), Some(job(3)));
}

// ---------------------------------------------------------------------------
// Threads
// ---------------------------------------------------------------------------

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<ShmDict>();
};

#[test]
fn shared_between_threads_without_losing_updates() {
    let seg = Segment::new("threads");
    let d = create(&seg, 1000, 4 << 20);
    const THREADS: u64 = 4;
    const N: u64 = 5000;
    thread::scope(|s| {
        for t in 0..THREADS {
            let d = &d;
            s.spawn(move || {
                for i in 0..N {
                    d.update("counter", incr).unwrap();
                    d.typed::<u64>()
                        .update("typed", |v| Some(v.unwrap_or(0) + 1))
                        .unwrap();
                    // Each thread also churns keys of its own.
                    let k = format!("t{t}-{}", (i / 2) % 50);
                    if i % 2 == 0 {
                        d.insert(&k, i.to_le_bytes()).unwrap();
                    } else {
                        assert!(d.remove(&k).unwrap(), "thread {t}: own key {k} vanished");
                    }
                }
            });
        }
    });
    assert_eq!(u64_of(&d.get("counter").unwrap().unwrap()), THREADS * N);
    assert_eq!(d.typed::<u64>().get("typed").unwrap(), Some(THREADS * N));
    assert_eq!(d.len(), 2);
    // Send: a handle can move to another thread.
    let moved = ShmDict::open(seg.name()).unwrap();
    let got = thread::spawn(move || moved.get("counter").unwrap())
        .join()
        .unwrap();
    assert_eq!(got.map(|v| u64_of(&v)), Some(THREADS * N));
}

// ---------------------------------------------------------------------------
// Regressions (issue 10, item 3): user closures run outside the write gate
// ---------------------------------------------------------------------------

/// Arena bytes free or untouched.
/// Arena bytes not in use: free, untouched, or retired (waiting for
/// borrowed reads; reusable once none can see them).
fn free_bytes(s: &shmdict::Stats) -> usize {
    let listed: u64 = (0..).zip(&s.free_blocks).map(|(o, n)| n * (64 << o)).sum();
    listed as usize + s.arena_untouched_bytes + s.retired_bytes as usize
}

/// Regression: an `update` closure that panicked after an earlier round of
/// the same `update` had lost a race leaked the block prepared in that
/// round (it was kept for reuse, and the unwind skipped its release), so
/// every such panic cost arena space until `check()` reclaimed it.
#[test]
fn a_panicking_update_closure_leaks_no_arena_block() {
    let seg = Segment::new("upd-panic");
    let d = create(&seg, 64, 1 << 20);
    d.insert("k", vec![1u8; 100]).unwrap();
    let clean = d.check().unwrap();
    assert!(clean.is_ok() && clean.skipped.is_none(), "{clean}");
    let before = d.stats();
    for round in 0..50u32 {
        let mut calls = 0;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            d.update("k", |_old| {
                calls += 1;
                if calls == 1 {
                    // Another write to the key while this closure runs: the
                    // first result cannot be published, so `f` runs again.
                    d.insert("k", round.to_le_bytes()).unwrap();
                    Some(vec![2u8; 100])
                } else {
                    panic!("closure panics in its second run");
                }
            })
        }));
        assert!(r.is_err(), "round {round}: the panic propagates");
    }
    d.insert("k", vec![1u8; 100]).unwrap();
    let after = d.stats();
    let report = d.check().unwrap();
    assert!(report.is_ok() && report.skipped.is_none(), "{report}");
    assert_eq!(
        (
            report.leaked_blocks_reclaimed,
            report.leaked_bytes_reclaimed
        ),
        (0, 0),
        "panicking closures leaked arena blocks:\n{report}"
    );
    assert_eq!(
        free_bytes(&after),
        free_bytes(&before),
        "arena use returns to what it was"
    );
    assert_eq!(d.get("k").unwrap(), Some(vec![1u8; 100]));
}

/// Regression: `update` ran its closure inside the write gate, so `check()`
/// waited for a slow closure (about a second) and then skipped its repairs.
/// Here the closure blocks until `check()` has returned.
#[test]
fn check_does_not_wait_for_a_slow_update_closure() {
    let seg = Segment::new("upd-slow");
    let d = create(&seg, 64, 1 << 20);
    d.insert("k", 1u64.to_le_bytes()).unwrap();
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    thread::scope(|s| {
        let d = &d;
        let updater = s.spawn(move || {
            let mut first = true;
            d.update("k", |old| {
                if first {
                    first = false;
                    entered_tx.send(()).unwrap();
                    // Watchdog: never wait forever if check() never returns.
                    let _ = done_rx.recv_timeout(Duration::from_secs(120));
                }
                incr(old)
            })
            .unwrap()
        });
        entered_rx
            .recv_timeout(Duration::from_secs(120))
            .expect("watchdog: the closure never ran");
        let report = d.check().unwrap();
        done_tx.send(()).unwrap();
        assert!(report.is_ok(), "{report}");
        assert_eq!(
            report.skipped, None,
            "check() waited for a user closure and skipped its repairs"
        );
        let stored = updater.join().unwrap();
        assert_eq!(stored, Some(2u64.to_le_bytes().to_vec()));
    });
    assert_eq!(u64_of(&d.get("k").unwrap().unwrap()), 2);
}

// ---------------------------------------------------------------------------
// Garbage segment files
// ---------------------------------------------------------------------------

/// Byte offsets of header fields, as documented in src/layout.rs.
mod header {
    pub(crate) const MAGIC: u64 = 0;
    pub(crate) const VERSION_KIND: u64 = 8;
    pub(crate) const HEADER_BYTES: u64 = 16;
    pub(crate) const TOTAL_BYTES: u64 = 24;
    pub(crate) const CAPACITY: u64 = 32;
    pub(crate) const NBUCKETS: u64 = 40;
    pub(crate) const INDEX_OFF: u64 = 48;
    pub(crate) const ARENA_OFF: u64 = 56;
    pub(crate) const ARENA_BYTES: u64 = 64;
    pub(crate) const CHUNK_ORDER: u64 = 72;
    pub(crate) const ATTACH_OFF: u64 = 80;
    pub(crate) const ATTACH_LEN: u64 = 88;
    pub(crate) const HASH_ID: u64 = 96;
    /// First mutable header word (live-key counter); the free-list heads
    /// and other mutable words follow up to 4096.
    pub(crate) const MUTABLE: u64 = 128;
    pub(crate) const SIZE: u64 = 4096;
    /// Free-list heads: one 64-byte line per block order.
    pub(crate) const FREE_HEADS: u64 = 2048;
}

fn word(bytes: &[u8], off: u64) -> u64 {
    u64::from_ne_bytes(bytes[off as usize..off as usize + 8].try_into().unwrap())
}

fn set_word(bytes: &mut [u8], off: u64, v: u64) {
    bytes[off as usize..off as usize + 8].copy_from_slice(&v.to_ne_bytes());
}

/// The bytes of a real, populated segment (capacity 100, 64 KiB arena), with
/// free blocks on the free lists.
fn real_segment_bytes() -> Vec<u8> {
    let seg = Segment::new("template");
    // Of fixed size: a dictionary that grows reserves its whole arena in
    // its (sparse) file, too large to read into memory here.
    let d = create_fixed(&seg, 100, 1 << 16);
    for i in 0..80 {
        d.insert(format!("key-{i}"), value_for(i, i * 7 % 300))
            .unwrap();
    }
    for i in (0..80).step_by(3) {
        d.remove(format!("key-{i}")).unwrap();
    }
    drop(d);
    fs::read(seg.path()).unwrap()
}

/// Places `bytes` as the file /dev/shm/<name>.
fn place(tag: &str, bytes: &[u8]) -> Segment {
    let seg = Segment::new(tag);
    // Not while another test has set an umask that would make it unreadable.
    let _lock = UMASK.lock().unwrap_or_else(|e| e.into_inner());
    fs::write(seg.path(), bytes).unwrap();
    // Private, as shmdict creates segments: otherwise the open is refused
    // (PermissionDenied, mode 0644 grants more than 0600) before the
    // contents are looked at.
    fs::set_permissions(seg.path(), fs::Permissions::from_mode(0o600)).unwrap();
    seg
}

/// `open` (both ways) fails with an error accepted by `ok`, and leaves the
/// file as it was.
fn assert_open_fails(case: &str, seg: &Segment, ok: impl Fn(&Error) -> bool) {
    let before = fs::read(seg.path()).ok();
    for how in ["open", "options"] {
        let r = if how == "open" {
            ShmDict::open(seg.name())
        } else {
            ShmDict::options()
                .capacity(10)
                .arena_bytes(1 << 16)
                .open(seg.name())
        };
        match r {
            Ok(d) => panic!("{case}: {how} accepted a bad segment: {d:?}"),
            Err(e) => assert!(ok(&e), "{case}: {how} gave the wrong error: {e:?}"),
        }
    }
    assert_eq!(
        fs::read(seg.path()).ok(),
        before,
        "{case}: open changed the file"
    );
}

fn is_corrupt(e: &Error) -> bool {
    matches!(e, Error::Corrupt { .. })
}

fn is_incompatible(e: &Error) -> bool {
    matches!(e, Error::Incompatible { .. })
}

#[test]
fn garbage_files_are_errors_not_crashes() {
    let mut rng = Rng(0xbad5eed);
    let real = real_segment_bytes();
    let mut random_1m = vec![0; 1 << 20];
    rng.fill(&mut random_1m);
    let mut magic_then_random = random_1m.clone();
    magic_then_random[..8].copy_from_slice(&real[..8]);
    let mut header_then_random = random_1m.clone();
    header_then_random[..4096].copy_from_slice(&real[..4096]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("7 bytes", b"SHMDICT".to_vec()),
        ("100 random bytes", rng.bytes(100)),
        ("1 MiB of random bytes", random_1m),
        ("1 MiB of zeros", vec![0; 1 << 20]),
        ("magic then random", magic_then_random),
        ("real header, random rest", header_then_random),
        ("first 8 KiB of a real segment", real[..8192].to_vec()),
        ("first 4 KiB of a real segment", real[..4096].to_vec()),
        ("first 100 bytes of a real segment", real[..100].to_vec()),
        (
            "real segment less its last page",
            real[..real.len() - 4096].to_vec(),
        ),
        ("real segment plus a page", {
            let mut v = real.clone();
            v.extend_from_slice(&[0; 4096]);
            v
        }),
    ];
    for (case, bytes) in &cases {
        let seg = place("garbage", bytes);
        if *case == "magic then random" {
            // Our magic with an unknown version: either answer is right.
            assert_open_fails(case, &seg, |e| is_corrupt(e) || is_incompatible(e));
        } else {
            assert_open_fails(case, &seg, is_corrupt);
        }
    }
    // Control: an unmodified copy opens and holds the data.
    let copy = place("copy", &real);
    let d = ShmDict::open(copy.name()).expect("an intact copy of a segment opens");
    assert_eq!(d.get("key-1").unwrap(), Some(value_for(1, 7)));
    assert_eq!(d.get("key-0").unwrap(), None);
}

#[test]
fn names_that_are_not_regular_files_are_errors() {
    // A directory.
    let dir = Segment::new("dir");
    fs::create_dir(dir.path()).unwrap();
    assert!(ShmDict::open(dir.name()).is_err());
    assert!(ShmDict::options().capacity(4).open(dir.name()).is_err());
    // A FIFO (opening one must not block).
    let fifo = Segment::new("fifo");
    let path = std::ffi::CString::new(fifo.path().to_str().unwrap()).unwrap();
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    assert!(ShmDict::open(fifo.name()).is_err());
    // A symlink to a device, and one to an intact segment.
    let link = Segment::new("symlink");
    std::os::unix::fs::symlink("/dev/zero", link.path()).unwrap();
    assert!(ShmDict::open(link.name()).is_err());
    let real = Segment::new("symlink-target");
    drop(create(&real, 4, 1 << 16));
    let link2 = Segment::new("symlink2");
    std::os::unix::fs::symlink(real.path(), link2.path()).unwrap();
    // Following it or refusing it are both fine; crashing is not.
    let _ = ShmDict::open(link2.name());
}

#[test]
fn damaged_headers_are_incompatible_or_corrupt() {
    use header as h;
    let real = real_segment_bytes();
    let get = |off| word(&real, off);
    let vk = get(h::VERSION_KIND);
    let (version, kind) = (vk & 0xffff_ffff, vk >> 32);
    let incompatible: Vec<(&str, u64, u64)> = vec![
        ("version + 1", h::VERSION_KIND, kind << 32 | (version + 1)),
        ("version 0", h::VERSION_KIND, kind << 32),
        (
            "version u32::MAX",
            h::VERSION_KIND,
            kind << 32 | 0xffff_ffff,
        ),
        ("kind 2 (a Value)", h::VERSION_KIND, 2 << 32 | version),
        ("kind 3 (an Array)", h::VERSION_KIND, 3 << 32 | version),
        ("kind 0xdead", h::VERSION_KIND, 0xdead << 32 | version),
        ("hash id", h::HASH_ID, get(h::HASH_ID) + 1),
    ];
    for (case, off, v) in incompatible {
        let mut bytes = real.clone();
        set_word(&mut bytes, off, v);
        let seg = place("incompatible", &bytes);
        assert_open_fails(case, &seg, is_incompatible);
    }
    let nb = get(h::NBUCKETS);
    let arena_off = get(h::ARENA_OFF);
    let arena = get(h::ARENA_BYTES);
    let total = get(h::TOTAL_BYTES);
    let corrupt: Vec<(&str, u64, u64)> = vec![
        ("magic", h::MAGIC, get(h::MAGIC) ^ 1),
        ("nbuckets 0", h::NBUCKETS, 0),
        ("nbuckets 3", h::NBUCKETS, 3),
        ("nbuckets doubled", h::NBUCKETS, nb * 2),
        ("nbuckets halved", h::NBUCKETS, nb / 2),
        ("nbuckets 2^40", h::NBUCKETS, 1 << 40),
        ("nbuckets u64::MAX", h::NBUCKETS, u64::MAX),
        ("capacity 0", h::CAPACITY, 0),
        ("capacity above the slots", h::CAPACITY, nb * 3 + 1),
        ("capacity u64::MAX", h::CAPACITY, u64::MAX),
        ("index offset 0", h::INDEX_OFF, 0),
        (
            "index offset + 4096",
            h::INDEX_OFF,
            get(h::INDEX_OFF) + 4096,
        ),
        ("index offset u64::MAX", h::INDEX_OFF, u64::MAX),
        ("arena offset 0", h::ARENA_OFF, 0),
        ("arena offset + 4096", h::ARENA_OFF, arena_off + 4096),
        ("arena offset - 4096", h::ARENA_OFF, arena_off - 4096),
        ("arena offset + 8", h::ARENA_OFF, arena_off + 8),
        ("arena offset u64::MAX", h::ARENA_OFF, u64::MAX),
        ("arena size 0", h::ARENA_BYTES, 0),
        ("arena size doubled", h::ARENA_BYTES, arena * 2),
        ("arena size halved", h::ARENA_BYTES, arena / 2),
        ("arena size + 64", h::ARENA_BYTES, arena + 64),
        ("arena size u64::MAX", h::ARENA_BYTES, u64::MAX),
        ("total size 0", h::TOTAL_BYTES, 0),
        ("total size + 4096", h::TOTAL_BYTES, total + 4096),
        ("total size - 4096", h::TOTAL_BYTES, total - 4096),
        ("total size u64::MAX", h::TOTAL_BYTES, u64::MAX),
        ("chunk order 63", h::CHUNK_ORDER, 63),
        ("chunk order 2^32", h::CHUNK_ORDER, 1 << 32),
        ("chunk order u64::MAX", h::CHUNK_ORDER, u64::MAX),
        ("header size 0", h::HEADER_BYTES, 0),
        ("header size 8192", h::HEADER_BYTES, 8192),
        ("attach table offset 0", h::ATTACH_OFF, 0),
        ("attach table length 2^20", h::ATTACH_LEN, 1 << 20),
    ];
    for (case, off, v) in corrupt {
        let mut bytes = real.clone();
        set_word(&mut bytes, off, v);
        let seg = place("corrupt", &bytes);
        assert_open_fails(case, &seg, is_corrupt);
    }
    // Several fields at once, consistent with each other but with a file
    // that is too short for them.
    let mut bytes = real[..h::SIZE as usize * 2].to_vec();
    set_word(&mut bytes, h::TOTAL_BYTES, 1 << 40);
    set_word(&mut bytes, h::ARENA_BYTES, (1 << 40) - arena_off);
    let seg = place("corrupt", &bytes);
    assert_open_fails("header claims 1 TiB", &seg, |e| {
        is_corrupt(e) || matches!(e, Error::Incompatible { .. })
    });
}

// ---------------------------------------------------------------------------
// Hostile segment contents: operations in a child process under a watchdog
// ---------------------------------------------------------------------------

const CHILD_ENV: &str = "SHMDICT_TEST_GARBAGE_SEGMENT";
const CHILD_TEST: &str = "garbage_contents_child_process_entry";
const CHILD_WATCHDOG: Duration = Duration::from_secs(60);
/// Each kind of damage is applied with this many random seeds.
const DAMAGE_SEEDS: u64 = 3;

/// Runs in the child process only (it does nothing in a normal run): opens
/// the damaged segment named by the environment and runs every operation on
/// it. Each must return Ok or Err; a panic fails this test (exit 101), a crash
/// kills the process, a hang trips the parent's watchdog.
#[test]
fn garbage_contents_child_process_entry() {
    let Ok(name) = std::env::var(CHILD_ENV) else {
        return;
    };
    let step = |s: &str| eprintln!("step: {s}");
    step("open");
    let Ok(d) = ShmDict::open(&name) else {
        return;
    };
    step("len, is_empty, stats, keys");
    let _ = (d.len(), d.is_empty(), d.capacity(), d.name());
    let _ = format!("{:?}", d.stats());
    let _ = d.keys();
    let mut buf = Vec::new();
    for i in 0..120 {
        let key = format!("key-{i}");
        step(&format!("get {key}"));
        let _ = d.get(&key);
        let _ = d.get_into(&key, &mut buf);
        let _ = d.contains_key(&key);
        step(&format!("insert {key}"));
        let _ = d.insert(&key, value_for(i, i * 13 % 700));
        step(&format!("insert new-{i}"));
        let _ = d.insert(format!("new-{i}"), value_for(i, i * 31 % 5000));
        step(&format!("update {key}"));
        let _ = d.update(&key, |old| {
            Some(old.map_or(vec![1], |o| [o, b"+"].concat()))
        });
        let _ = d.typed::<u64>().update(&key, |v| Some(v.unwrap_or(0) + 1));
        let _ = d.typed::<u64>().get(&key);
        step(&format!("remove {key}"));
        let _ = d.remove(&key);
        let _ = d.update(format!("new-{i}"), |_| None);
        if i % 20 == 0 {
            step("keys");
            let _ = d.keys();
            let _ = d.len();
        }
    }
    step("large values");
    let _ = d.insert("big", vec![3; 60_000]);
    let _ = d.insert(vec![b'k'; 4096], vec![4; 8000]);
    let _ = d.get("big");
    step("final keys");
    let _ = d.keys();
    let _ = format!("{:?}", d.stats());
    step("done");
}

/// A way to damage a populated segment's contents (its header geometry is
/// left intact).
type Damage = fn(&mut [u8], &mut Rng);

fn geometry(b: &[u8]) -> (usize, usize, usize) {
    (
        word(b, header::INDEX_OFF) as usize,
        word(b, header::ARENA_OFF) as usize,
        word(b, header::TOTAL_BYTES) as usize,
    )
}

fn damage_cases() -> Vec<(&'static str, Damage)> {
    vec![
        ("index random", |b, r| {
            let (i, a, _) = geometry(b);
            r.fill(&mut b[i..a]);
        }),
        ("arena random", |b, r| {
            let (_, a, t) = geometry(b);
            r.fill(&mut b[a..t]);
        }),
        ("index and arena random", |b, r| {
            let (i, _, t) = geometry(b);
            r.fill(&mut b[i..t]);
        }),
        ("index all ones", |b, _| {
            let (i, a, _) = geometry(b);
            b[i..a].fill(0xff);
        }),
        ("arena all ones", |b, _| {
            let (_, a, t) = geometry(b);
            b[a..t].fill(0xff);
        }),
        ("attach table random", |b, r| {
            let (i, _, _) = geometry(b);
            r.fill(&mut b[header::SIZE as usize..i]);
        }),
        ("mutable header words random", |b, r| {
            r.fill(&mut b[header::MUTABLE as usize..header::SIZE as usize]);
        }),
        ("sparse bit flips", |b, r| {
            let (i, _, t) = geometry(b);
            for _ in 0..400 {
                let at = i + (r.next() as usize % (t - i));
                b[at] ^= 1 << (r.next() % 8);
            }
        }),
        ("entries point elsewhere", |b, r| {
            // Keep each present entry's tag, give it a random block.
            let (i, a, _) = geometry(b);
            for off in (i..a).step_by(8) {
                let w = word(b, off as u64);
                if w >> 63 == 1 {
                    let low = r.next() & ((1 << 38) - 1);
                    set_word(b, off as u64, (w & !((1 << 38) - 1)) | low);
                }
            }
        }),
        ("block length words random", |b, r| {
            let (_, a, t) = geometry(b);
            for off in (a..t).step_by(64) {
                set_word(b, off as u64, r.next());
            }
        }),
        ("free lists form cycles", |b, _| {
            // Every order's list head names block 0, whose link names itself.
            let (_, a, _) = geometry(b);
            for o in 0..32 {
                set_word(b, header::FREE_HEADS + o * 64, 1);
            }
            set_word(b, a as u64, 1);
        }),
    ]
}

#[test]
fn damaged_contents_give_errors_never_crashes_or_hangs() {
    let real = real_segment_bytes();
    let mut children = Vec::new();
    let mut segs = Vec::new();
    for (case, damage) in damage_cases() {
        for seed in 0..DAMAGE_SEEDS {
            let mut bytes = real.clone();
            damage(&mut bytes, &mut Rng(0xd00d + seed));
            assert_eq!(
                &bytes[..header::MUTABLE as usize],
                &real[..header::MUTABLE as usize]
            );
            let seg = place("damaged", &bytes);
            children.push(ChildProc::spawn(format!("{case}, seed {seed}"), seg.name()));
            segs.push(seg);
        }
    }
    let deadline = Instant::now() + CHILD_WATCHDOG;
    let mut failures = Vec::new();
    for child in &mut children {
        if let Some(failure) = child.wait_until(deadline) {
            failures.push(failure);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} damaged segments made an operation fail badly:\n\n{}",
        failures.len(),
        children.len(),
        failures.join("\n\n")
    );
}

/// A child process running [`garbage_contents_child_process_entry`]; killed
/// and reaped on drop.
struct ChildProc {
    case: String,
    child: std::process::Child,
    done: bool,
    output: Option<thread::JoinHandle<String>>,
}

impl ChildProc {
    fn spawn(case: String, segment: &str) -> ChildProc {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, segment)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut pipe = child.stderr.take().unwrap();
        let output = thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            s
        });
        ChildProc {
            case,
            child,
            done: false,
            output: Some(output),
        }
    }

    fn tail(&mut self) -> String {
        let all = self
            .output
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(12)..].join("\n")
    }

    /// `None` if the child exited successfully before `deadline`; otherwise
    /// what went wrong (the child is killed if it still runs).
    fn wait_until(&mut self, deadline: Instant) -> Option<String> {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.done = true;
                if status.success() {
                    return None;
                }
                let tail = self.tail();
                return Some(format!(
                    "case '{}': the child failed ({status}); last output:\n{tail}",
                    self.case
                ));
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.done = true;
                let tail = self.tail();
                return Some(format!(
                    "case '{}': still running after {CHILD_WATCHDOG:?} (hang); killed. \
                     Last output:\n{tail}",
                    self.case
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Regression (found by the Python `view` work): a handle that always held
/// four or more borrowed reads, each short-lived but overlapping the next,
/// stopped all reclamation. Every new pin joined a pin slot still counting
/// an older epoch, so the slot's epoch never moved and neither did the
/// global one; a writer got `Full` after about a thousand overwrites of a
/// 3 KiB value in a 4 MiB arena.
#[test]
fn overlapping_borrowed_reads_do_not_stop_reclamation() {
    let seg = Segment::new("rolling-refs");
    let d = create(&seg, 64, 4 << 20);
    d.insert("k", "v").unwrap();
    let mut refs = std::collections::VecDeque::new();
    for i in 0..20_000u32 {
        refs.push_back(d.get_ref("k").unwrap().unwrap());
        if refs.len() > 6 {
            refs.pop_front();
        }
        d.insert("churn", i.to_le_bytes().repeat(750))
            .unwrap_or_else(|e| panic!("overwrite {i}: {e}; {:?}", d.stats()));
    }
    assert!(refs.iter().all(|r| &r[..] == b"v"));
    drop(refs);
    assert_eq!(d.stats().pins, 0);
}

/// `Options::max_bytes` caps all the /dev/shm memory of a dictionary (its
/// file size); writes past it are `Full`, nothing lost. (Growth is not
/// implemented yet, so the cap sizes the dictionary at creation.)
#[test]
fn max_bytes_caps_the_segment_and_gives_full() {
    let seg = Segment::new("max-bytes");
    let max = 6u64 << 20;
    let d = ShmDict::options()
        .capacity(10_000)
        .max_bytes(max)
        .fixed_size(true)
        .create_new(true)
        .open(seg.name())
        .unwrap();
    let file = std::fs::metadata(format!("/dev/shm/{}", seg.name())).unwrap();
    assert!(file.len() <= max, "{} bytes > max_bytes {max}", file.len());
    let mut n = 0u32;
    let err = loop {
        match d.insert(n.to_le_bytes(), [7u8; 1000]) {
            Ok(()) => n += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, Error::Full { .. }), "{err}");
    assert!(
        n > 500,
        "only {n} values of 1000 bytes fit under {max} bytes"
    );
    for i in 0..n {
        assert_eq!(d.get(i.to_le_bytes()).unwrap(), Some(vec![7u8; 1000]));
    }
    let too_small = ShmDict::options()
        .capacity(10_000)
        .max_bytes(100_000)
        .open(&format!("{}-small", seg.name()));
    assert!(
        matches!(too_small, Err(Error::InvalidArgument { .. })),
        "{too_small:?}"
    );
}
