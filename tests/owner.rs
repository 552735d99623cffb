//! Regression (issue 10, item 10): name squatting. /dev/shm is one
//! namespace for every user, and `open` attached without a word to a
//! segment that another user had created first (say `nobody`, with mode
//! 0666), so what the opener stored there was readable by that user. Now
//! attaching refuses (`Error::PermissionDenied`) a segment owned by another
//! user, or whose mode grants more than the opener's `mode`, unless the
//! opener allows it with `allow_other_owner(true)`; for dictionaries,
//! `Value`s, `Array`s and spaces alike.
//!
//! The cross-user trials need root: the segment is created by this test
//! binary re-executed as `nobody` (uid and gid set by `Command`, before
//! `exec`). Run without root, they say so on stderr and check only what a
//! single user can: the mode part.

use std::os::unix::process::CommandExt;
use std::process::Command;

mod common;

use common::*;
use shmdict::space::Space;
use shmdict::{tuple, Array, Error, ShmDict, Value};

const NOBODY: u32 = 65534;

fn main() {
    let trials: Vec<(&str, fn())> = vec![
        (
            "a_segment_more_open_than_asked_is_refused_unless_allowed",
            too_open_refused,
        ),
        (
            "a_dictionary_created_by_another_user_is_refused_unless_allowed",
            other_user_dict,
        ),
        (
            "values_arrays_and_spaces_of_another_user_are_refused_unless_allowed",
            other_user_prims,
        ),
    ];
    common::run(trials, child_main);
}

/// `create <kind> <name> <mode>`: creates a segment of that kind with that
/// mode (and a known content), as whatever user this process runs as.
fn child_main(role: &str, args: &[String]) {
    assert_eq!(role, "create", "unknown role {role}");
    let (kind, name) = (args[0].as_str(), args[1].as_str());
    let mode = u32::from_str_radix(&args[2], 8).expect("octal mode");
    match kind {
        "dict" => {
            let d = ShmDict::options()
                .capacity(64)
                .arena_bytes(1 << 16)
                .mode(mode)
                .create_new(true)
                .open(name)
                .expect("create the dictionary");
            d.insert("planted-by", "nobody").expect("insert");
        }
        "value" => {
            Value::<u64>::options()
                .mode(mode)
                .create_new(true)
                .open(name, 4242)
                .expect("create the value");
        }
        "array" => {
            let a = Array::<u32>::options()
                .mode(mode)
                .create_new(true)
                .open(name, 8)
                .expect("create the array");
            a.set(3, 77);
        }
        "space" => {
            let s = Space::open_with(
                ShmDict::options()
                    .capacity(64)
                    .arena_bytes(1 << 16)
                    .mode(mode)
                    .create_new(true),
                name,
            )
            .expect("create the space");
            s.out(tuple!("planted", 1)).expect("out");
        }
        other => panic!("unknown kind {other}"),
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Creates `name` as a segment of `kind` with `mode`, in a child process
/// running as `nobody`.
fn create_as_nobody(kind: &str, name: &str, mode: u32) {
    let out = Command::new(std::env::current_exe().expect("current_exe"))
        .args([CHILD_FLAG, "create", kind, name, &format!("{mode:o}")])
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .expect("run the creator as nobody");
    assert!(
        out.status.success(),
        "creating {kind} {name} as nobody failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let st = std::fs::metadata(format!("/dev/shm/{name}")).expect("stat");
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&st),
        NOBODY,
        "owned by nobody"
    );
}

/// Asserts that `r` is `PermissionDenied` naming `name`, `owner` and `mode`.
fn assert_denied<T: std::fmt::Debug>(
    what: &str,
    name: &str,
    owner: u32,
    mode: u32,
    r: Result<T, Error>,
) {
    match r {
        Err(e @ Error::PermissionDenied { .. }) => {
            let msg = e.to_string();
            let Error::PermissionDenied {
                segment,
                owner_uid,
                mode: m,
                ..
            } = e
            else {
                unreachable!()
            };
            assert_eq!(segment, name, "{what}");
            assert_eq!(owner_uid, owner, "{what}");
            assert_eq!(m, mode, "{what}");
            assert!(msg.contains(name), "{what}: {msg}");
            assert!(msg.contains("allow_other_owner"), "{what}: {msg}");
            assert!(msg.contains(&format!("{mode:04o}")), "{what}: {msg}");
        }
        other => panic!("{what}: expected PermissionDenied, got {other:?}"),
    }
}

fn too_open_refused() {
    let me = rustix::process::geteuid().as_raw();
    let seg = Segment::new("too-open");
    let d = ShmDict::options()
        .capacity(64)
        .arena_bytes(1 << 16)
        .mode(0o666)
        .open(seg.name())
        .expect("create 0666");
    d.insert("k", "v").unwrap();
    assert_denied(
        "ShmDict::open (0600) of our own 0666 segment",
        seg.name(),
        me,
        0o666,
        ShmDict::open(seg.name()),
    );
    assert_denied(
        "create(false) too",
        seg.name(),
        me,
        0o666,
        ShmDict::options().create(false).open(seg.name()),
    );
    assert_denied(
        "mode 0644 asked for",
        seg.name(),
        me,
        0o666,
        ShmDict::options().mode(0o644).open(seg.name()),
    );
    let same = ShmDict::options().mode(0o666).open(seg.name()).unwrap();
    assert_eq!(same.get("k").unwrap().as_deref(), Some(&b"v"[..]));
    let allowed = ShmDict::options()
        .allow_other_owner(true)
        .open(seg.name())
        .unwrap();
    assert_eq!(allowed.get("k").unwrap().as_deref(), Some(&b"v"[..]));
    // A narrower mode than asked for is fine.
    let seg2 = Segment::new("narrow");
    drop(
        ShmDict::options()
            .capacity(64)
            .arena_bytes(1 << 16)
            .mode(0o400)
            .open(seg2.name()),
    );
    drop(
        ShmDict::options()
            .create(false)
            .open(seg2.name())
            .expect("0400 under 0600"),
    );

    // Value, Array and Space: the same rule.
    let v = Segment::new("too-open-value");
    drop(
        Value::<u64>::options()
            .mode(0o664)
            .open(v.name(), 1)
            .unwrap(),
    );
    assert_denied(
        "Value",
        v.name(),
        me,
        0o664,
        Value::<u64>::open(v.name(), 0),
    );
    let val = Value::<u64>::options()
        .allow_other_owner(true)
        .open(v.name(), 0)
        .unwrap();
    assert_eq!(val.load(), 1);
    let a = Segment::new("too-open-array");
    drop(
        Array::<u32>::options()
            .mode(0o606)
            .open(a.name(), 4)
            .unwrap(),
    );
    assert_denied(
        "Array",
        a.name(),
        me,
        0o606,
        Array::<u32>::open(a.name(), 4),
    );
    assert_eq!(
        Array::<u32>::options()
            .mode(0o606)
            .open(a.name(), 4)
            .unwrap()
            .len(),
        4
    );
    let s = Segment::new("too-open-space");
    drop(Space::open_with(ShmDict::options().mode(0o660), s.name()).unwrap());
    assert_denied("Space", s.name(), me, 0o660, Space::open(s.name()));
    Space::open_with(ShmDict::options().allow_other_owner(true), s.name()).unwrap();
}

fn other_user_dict() {
    if !is_root() {
        eprintln!(
            "other_user_dict: not run as root (euid {}): cannot create a segment as another \
             user; the mode part is checked by too_open_refused",
            rustix::process::geteuid().as_raw()
        );
        return;
    }
    for mode in [0o666, 0o600] {
        let seg = Segment::new("squatted");
        create_as_nobody("dict", seg.name(), mode);
        // Even asking for exactly its mode: another user's segment.
        for opts in [
            ShmDict::options(),
            ShmDict::options().mode(mode),
            ShmDict::options().create(false).mode(0o666),
        ] {
            assert_denied(
                &format!("root opening nobody's {mode:o} dictionary with {opts:?}"),
                seg.name(),
                NOBODY,
                mode,
                opts.open(seg.name()),
            );
        }
        assert_denied(
            "ShmDict::open",
            seg.name(),
            NOBODY,
            mode,
            ShmDict::open(seg.name()),
        );
        // Nothing was stored: the squatter's content is all there is.
        let d = ShmDict::options()
            .allow_other_owner(true)
            .open(seg.name())
            .expect("allowed explicitly");
        assert_eq!(d.keys().unwrap(), vec![b"planted-by".to_vec()]);
    }
}

fn other_user_prims() {
    if !is_root() {
        eprintln!(
            "other_user_prims: not run as root (euid {}): cannot create a segment as another \
             user; the mode part is checked by too_open_refused",
            rustix::process::geteuid().as_raw()
        );
        return;
    }
    let v = Segment::new("squatted-value");
    create_as_nobody("value", v.name(), 0o666);
    assert_denied(
        "Value",
        v.name(),
        NOBODY,
        0o666,
        Value::<u64>::open(v.name(), 0),
    );
    assert_denied(
        "Value with mode 0666",
        v.name(),
        NOBODY,
        0o666,
        Value::<u64>::options().mode(0o666).open(v.name(), 0),
    );
    let val = Value::<u64>::options()
        .allow_other_owner(true)
        .open(v.name(), 0)
        .unwrap();
    assert_eq!(val.load(), 4242);

    let a = Segment::new("squatted-array");
    create_as_nobody("array", a.name(), 0o644);
    assert_denied(
        "Array",
        a.name(),
        NOBODY,
        0o644,
        Array::<u32>::open(a.name(), 8),
    );
    let arr = Array::<u32>::options()
        .allow_other_owner(true)
        .open(a.name(), 8)
        .unwrap();
    assert_eq!(arr.get(3), 77);

    let s = Segment::new("squatted-space");
    create_as_nobody("space", s.name(), 0o666);
    assert_denied("Space", s.name(), NOBODY, 0o666, Space::open(s.name()));
    let space = Space::open_with(ShmDict::options().allow_other_owner(true), s.name()).unwrap();
    assert_eq!(space.len().unwrap(), 1);
}
