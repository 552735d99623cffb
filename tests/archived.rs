//! rkyv archives read in place (feature `rkyv`,
//! `ValueRef::access_archived`): written by another process, validated
//! before they are read, refused when they are not valid archives of the
//! type asked for, and unchanged while held however the key is rewritten.
//!
//! Run with `cargo test --features rkyv --test archived`.

mod common;

use common::{Proc, Rng, Segment};
use rkyv::rancor;
use shmdict::{Error, ShmDict};

fn main() {
    common::run(
        vec![
            (
                "an_archive_from_another_process_is_read_in_place",
                an_archive_from_another_process_is_read_in_place,
            ),
            (
                "an_archive_held_survives_rewrites_by_another_process",
                an_archive_held_survives_rewrites_by_another_process,
            ),
            (
                "invalid_archives_from_another_process_are_refused",
                invalid_archives_from_another_process_are_refused,
            ),
            (
                "corrupted_archives_are_refused_or_valid",
                corrupted_archives_are_refused_or_valid,
            ),
        ],
        child,
    );
}

#[derive(rkyv::Archive, rkyv::Serialize, Debug, PartialEq)]
#[rkyv(derive(Debug))]
enum Kind {
    Resize { width: u32, height: u32 },
    Delete,
}

#[derive(rkyv::Archive, rkyv::Serialize, Debug, PartialEq)]
#[rkyv(derive(Debug))]
struct Job {
    id: u64,
    urgent: bool,
    name: String,
    tags: Vec<u32>,
    kind: Kind,
}

fn job(id: u64) -> Job {
    Job {
        id,
        urgent: id % 2 == 1,
        name: format!("job number {id}"),
        tags: (0..(id % 5) as u32).collect(),
        kind: if id % 3 == 0 {
            Kind::Delete
        } else {
            Kind::Resize {
                width: id as u32,
                height: 2 * id as u32,
            }
        },
    }
}

fn archive(j: &Job) -> Vec<u8> {
    rkyv::to_bytes::<rancor::Error>(j)
        .expect("serializes")
        .to_vec()
}

/// Whether an archived job holds `j`'s fields.
fn same(a: &ArchivedJob, j: &Job) -> bool {
    let kind = match (&a.kind, &j.kind) {
        (ArchivedKind::Delete, Kind::Delete) => true,
        (
            ArchivedKind::Resize { width, height },
            Kind::Resize {
                width: w,
                height: h,
            },
        ) => *width == *w && *height == *h,
        _ => false,
    };
    a.id == j.id
        && a.urgent == j.urgent
        && a.name == j.name.as_str()
        && a.tags
            .iter()
            .map(|t| t.to_native())
            .eq(j.tags.iter().copied())
        && kind
}

fn small(seg: &Segment) -> ShmDict {
    common::create(seg, 1024, 1 << 20)
}

fn child(role: &str, args: &[String]) {
    let d = common::open_existing(&args[0]);
    match role {
        "write" => {
            for id in 0..20 {
                d.insert(format!("job:{id}"), archive(&job(id)))
                    .expect("insert");
            }
        }
        "rewrite" => {
            let rounds: u64 = args[1].parse().expect("rounds");
            for i in 0..rounds {
                let key = "held";
                if i % 3 == 2 {
                    d.remove(key).expect("remove");
                } else {
                    d.insert(key, archive(&job(1000 + i))).expect("insert");
                }
            }
        }
        "hostile" => {
            for (key, bytes) in hostile_values() {
                d.insert(key, bytes).expect("insert");
            }
        }
        other => panic!("unknown role {other}"),
    }
}

/// The offset of field `f` of the archived job at the root of `bytes`
/// (a valid archive), from the start of `bytes`.
fn offset_in(bytes: &[u8], f: impl Fn(&ArchivedJob) -> *const u8) -> usize {
    let a = rkyv::access::<ArchivedJob, rancor::Error>(bytes).expect("valid");
    f(a) as usize - bytes.as_ptr() as usize
}

/// Values that are not valid archives of a `Job`, each with what is wrong.
/// Built the same way in the writing child and in the parent.
fn hostile_values() -> Vec<(String, Vec<u8>)> {
    // Serialized into an aligned buffer, so that `offset_in` can access it.
    let good = rkyv::to_bytes::<rancor::Error>(&job(4)).expect("serializes");
    let bool_at = offset_in(&good, |a| &a.urgent as *const _ as *const u8);
    // The string's representation (inline or a relative pointer + length).
    let name_at = offset_in(&good, |a| &a.name as *const _ as *const u8);
    let name_bytes = offset_in(&good, |a| a.name.as_str().as_ptr());
    let tags_at = offset_in(&good, |a| &a.tags as *const _ as *const u8);
    let kind_at = offset_in(&good, |a| &a.kind as *const _ as *const u8);
    let good = good.to_vec();
    let mut out = Vec::new();
    let mut put = |what: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut v = good.clone();
        f(&mut v);
        assert_ne!(v, good, "{what}: not changed");
        out.push((format!("bad:{what}"), v));
    };
    put("bool is 2", &|v| v[bool_at] = 2);
    put("name not UTF-8", &|v| v[name_bytes] = 0xff);
    // A relative pointer (i32, little-endian: rkyv's default format) that
    // sends the string far outside the value.
    put("name points outside", &|v| {
        v[name_at + 4..name_at + 8].copy_from_slice(&0x4000_0000i32.to_le_bytes())
    });
    put("tags point outside", &|v| {
        v[tags_at..tags_at + 4].copy_from_slice(&(-0x4000_0000i32).to_le_bytes())
    });
    put("tags too long", &|v| {
        v[tags_at + 4..tags_at + 8].copy_from_slice(&u32::MAX.to_le_bytes())
    });
    put("enum tag out of range", &|v| v[kind_at] = 9);
    put("truncated", &|v| {
        v.truncate(v.len() - 4);
    });
    put("empty", &|v| v.clear());
    out
}

/// A child process serializes jobs with rkyv and stores them; this process
/// reads each in place: the archived fields are the child's, and they lie
/// inside the value's bytes in the mapping (no copy was made).
fn an_archive_from_another_process_is_read_in_place() {
    let seg = Segment::new("archived-read");
    let d = small(&seg);
    Proc::spawn("writer", "write", &[seg.arg()]).wait_ok();
    for id in 0..20 {
        let v = d.get_ref(format!("job:{id}")).unwrap().expect("stored");
        let a = v.access_archived::<Job>().expect("a valid archive");
        assert!(same(a, &job(id)), "job {id}: {a:?}");
        let range = v.as_ptr_range();
        let at = a as *const ArchivedJob as *const u8;
        assert!(
            range.contains(&at),
            "job {id}: the root is not in the value"
        );
        assert!(
            range.contains(&a.name.as_str().as_ptr()) || a.name.is_empty(),
            "job {id}: the name is not in the value"
        );
        assert_eq!(v.as_ptr() as usize % 16, 0, "values start 16-aligned");
    }
}

/// An archived value held (a `ValueRef`) while another process overwrites
/// and removes its key thousands of times: validated once, it keeps
/// reading as the value it was; each new `get_ref` sees the current one.
fn an_archive_held_survives_rewrites_by_another_process() {
    let seg = Segment::new("archived-held");
    let d = small(&seg);
    let first = job(7);
    d.insert("held", archive(&first)).unwrap();
    let v = d.get_ref("held").unwrap().expect("stored");
    let a = v.access_archived::<Job>().expect("valid");
    let mut writer = Proc::spawn("rewriter", "rewrite", &[seg.arg(), "3000".into()]);
    let mut checks = 0u64;
    while writer.poll().is_none() {
        assert!(same(a, &first), "the held archive changed: {a:?}");
        if let Some(now) = d.get_ref("held").unwrap() {
            let now = now.access_archived::<Job>().expect("every value is valid");
            let id = now.id.to_native();
            assert!(id == 7 || id >= 1000, "{now:?}");
            assert!(same(now, &job(id)), "{now:?}");
        }
        checks += 1;
    }
    writer.wait_ok();
    assert!(same(a, &first), "the held archive changed: {a:?}");
    assert!(checks > 0);
    drop(v);
    // The rewriter's last round (2999, i % 3 == 2) removed the key.
    assert!(d.get_ref("held").unwrap().is_none());
}

/// Values a child process wrote that are not valid archives of a `Job`
/// (a bad `bool`, bad UTF-8, pointers out of the value, a length past the
/// end, an unknown enum tag, truncated, empty) are each refused with
/// `Error::Archive`, naming the segment; a valid one beside them is not.
fn invalid_archives_from_another_process_are_refused() {
    let seg = Segment::new("archived-hostile");
    let d = small(&seg);
    Proc::spawn("hostile writer", "hostile", &[seg.arg()]).wait_ok();
    let hostile = hostile_values();
    assert_eq!(hostile.len(), 8);
    for (key, _) in &hostile {
        let v = d.get_ref(key).unwrap().expect("stored");
        match v.access_archived::<Job>() {
            Err(e @ Error::Archive { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(seg.name()), "{key}: {msg}");
                assert!(std::error::Error::source(&e).is_some(), "{key}");
            }
            Err(e) => panic!("{key}: another error: {e}"),
            Ok(a) => panic!("{key}: accepted as {a:?}"),
        }
    }
    d.insert("good", archive(&job(4))).unwrap();
    let v = d.get_ref("good").unwrap().unwrap();
    assert!(same(v.access_archived::<Job>().unwrap(), &job(4)));
}

/// Thousands of archives with random bytes overwritten: each is either
/// refused, or valid, and then every field reads without a panic (the
/// strings are UTF-8, the vectors inside the value).
fn corrupted_archives_are_refused_or_valid() {
    let seg = Segment::new("archived-corrupt");
    let d = small(&seg);
    let good = archive(&job(8));
    let mut rng = Rng(0x5eed);
    let (mut refused, mut valid) = (0, 0);
    for _ in 0..3000 {
        let mut v = good.clone();
        for _ in 0..1 + rng.below(3) {
            let i = rng.below(v.len() as u64) as usize;
            v[i] = rng.next() as u8;
        }
        d.insert("c", &v).unwrap();
        let r = d.get_ref("c").unwrap().unwrap();
        match r.access_archived::<Job>() {
            Err(Error::Archive { .. }) => refused += 1,
            Err(e) => panic!("another error: {e}"),
            Ok(a) => {
                valid += 1;
                let range = r.as_ptr_range();
                assert!(range.contains(&a.name.as_str().as_ptr()) || a.name.is_empty());
                let _ = (a.id, a.urgent, a.name.len(), a.tags.iter().count());
            }
        }
    }
    assert!(refused > 0, "no corruption was refused");
    assert!(valid > 0, "no corruption left a valid archive");
}
