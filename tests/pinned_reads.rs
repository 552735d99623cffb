//! Borrowed reads beside writers in other processes: the pinned lookup
//! (`Index::find_pinned`, behind `Reader::get` and `get_ref`) reads a block
//! once, with no seqlock validation, on the strength of the epoch alone.
//!
//! Writer processes overwrite, remove and re-insert a few keys as fast as
//! they can, with self-checking values of sizes across the block orders
//! (`common::checked_value`), in an arena small enough that blocks are
//! recycled all the time. Reader processes read the keys through
//! `Reader::get` and `get_ref`: every value must be whole and the key's
//! own, and bytes held under a `Reader` for a few hundred reads must not
//! have changed when the `Reader` is dropped. Without the pin's protection
//! (checked by making `reader()` release its pin at once) the held bytes
//! change within the first run.

mod common;

use std::time::{Duration, Instant};

use common::{check_value, checked_value, open_existing, Proc, Rng, Segment};
use shmdict::Error;

/// Keys are single bytes `0..KEYS`.
const KEYS: u64 = 24;
/// How long the writers and readers run.
const RUN: Duration = Duration::from_secs(3);

fn main() {
    common::run(
        vec![(
            "pinned_reads_see_whole_values_and_keep_them",
            pinned_reads_see_whole_values_and_keep_them,
        )],
        child,
    );
}

fn child(role: &str, args: &[String]) {
    let d = open_existing(&args[0]);
    let seed: u64 = args[1].parse().expect("seed");
    let mut rng = Rng(seed);
    let until = Instant::now() + RUN;
    match role {
        "writer" => {
            let mut seq = seed << 40;
            while Instant::now() < until {
                let k = rng.below(KEYS) as u8;
                seq += 1;
                let r = if rng.below(8) == 0 {
                    d.remove([k]).map(drop)
                } else {
                    d.insert([k], checked_value(k, seq))
                };
                match r {
                    // Readers may hold memory back: writers then wait for
                    // room, as the contract allows.
                    Ok(()) | Err(Error::Full { .. }) => {}
                    Err(e) => panic!("writer: {e}"),
                }
            }
        }
        "reader" => {
            let (mut reads, mut held_checked) = (0u64, 0u64);
            while Instant::now() < until {
                let reader = d.reader().expect("reader");
                let mut held: Vec<(u8, &[u8], Vec<u8>)> = Vec::new();
                for _ in 0..300 {
                    let k = rng.below(KEYS) as u8;
                    if let Some(v) = reader.get([k]).expect("Reader::get") {
                        check_value(k, v).unwrap_or_else(|e| panic!("Reader::get: {e}"));
                        if held.len() < 16 && rng.below(4) == 0 {
                            held.push((k, v, v.to_vec()));
                        }
                    }
                    reads += 1;
                }
                let k = rng.below(KEYS) as u8;
                if let Some(v) = d.get_ref([k]).expect("get_ref") {
                    check_value(k, &v).unwrap_or_else(|e| panic!("get_ref: {e}"));
                }
                for (k, v, copy) in &held {
                    assert!(
                        *v == copy.as_slice(),
                        "bytes of key {k} held under a Reader changed"
                    );
                    held_checked += 1;
                }
                drop(held);
                drop(reader);
            }
            assert!(
                reads > 1000 && held_checked > 0,
                "the reader read too little"
            );
        }
        other => panic!("unknown role {other}"),
    }
}

fn pinned_reads_see_whole_values_and_keep_them() {
    let seg = Segment::new("pinned");
    let d = common::create(&seg, 64, 1 << 20);
    for k in 0..KEYS as u8 {
        d.insert([k], checked_value(k, 0)).expect("fill");
    }
    let mut procs = Vec::new();
    for (i, role) in ["writer", "writer", "reader", "reader"].iter().enumerate() {
        procs.push(Proc::spawn(
            format!("{role} {i}"),
            role,
            &[seg.arg(), (i as u64 + 1).to_string()],
        ));
    }
    common::wait_all(&mut procs);
    // The keys left are whole, and no borrowed read holds anything now.
    for k in 0..KEYS as u8 {
        if let Some(v) = d.get([k]).expect("get") {
            check_value(k, &v).expect("whole at the end");
        }
    }
    assert_eq!(d.stats().pins, 0);
}
