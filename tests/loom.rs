//! Loom models of shmdict's concurrency protocols.
//!
//! Run with `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test --release
//! --test loom`. Under `cfg(loom)` the real index, seqlock, slab, write-gate,
//! Array-lock and Value code runs on a heap buffer of loom atomics (see
//! `src/region.rs`), and loom explores the interleavings of the threads below,
//! including the weak-memory outcomes of the orderings the code uses.
//!
//! Models: the dictionary's seqlock and copy-on-write publication, slot claim,
//! read-modify-write, overflow counts, free lists, carving and
//! defragmentation; recovery from dead writers, dead inserters and leaked
//! blocks (`check()` against a live writer); the Array lock (exclusive vs
//! shared, read vs chunk mode, claims) and its recovery from dead holders; the
//! double buffer of large `Value`s and its recovery from a dead writer; the
//! exact key count (`len()`) across a writer killed at each step of a
//! counted write, settled concurrently by a writer and an adopter; borrowed
//! reads (the epoch of `shm/epoch.rs`): a pinned read against an overwrite
//! or removal and reclamation, readers sharing a pin slot, an advance made
//! by another thread than the frees, and pins of dead and live processes.
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use shmdict::__loom::{adopt_entry, dict, home_bucket, kill_counted_write, Arena};

/// Small geometry: 2 buckets of 3 slots, a 1 KiB arena.
fn small() -> shmdict::ShmDict {
    dict(4, 1024)
}

/// Seqlock + copy-on-write publication + block recycling: a reader racing
/// with two overwrites sees exactly one of the three complete values, never a
/// mix. The second overwrite has the same size as the first value, so it
/// reuses the block the reader may still be reading.
#[test]
fn reader_never_sees_a_torn_or_recycled_value() {
    loom::model(|| {
        let d = Arc::new(small());
        // Multi-word values: a torn read would mix words of two values.
        let v0 = vec![0xa0; 24];
        let v1 = vec![0xb1; 40];
        let v2 = vec![0xc2; 24];
        d.insert("k", &v0).unwrap();
        let w = {
            let d = d.clone();
            let (v1, v2) = (v1.clone(), v2.clone());
            thread::spawn(move || {
                d.insert("k", &v1).unwrap();
                d.insert("k", &v2).unwrap();
            })
        };
        let got = d.get("k").unwrap().expect("the key is always present");
        assert!(got == v0 || got == v1 || got == v2, "torn read: {got:?}");
        w.join().unwrap();
        assert_eq!(d.get("k").unwrap(), Some(v2));
    });
}

/// Slot claim: two threads inserting the same new key leave exactly one
/// entry, holding one of the two values.
#[test]
fn concurrent_inserts_of_a_new_key_leave_one_entry() {
    loom::model(|| {
        let d = Arc::new(small());
        let t = {
            let d = d.clone();
            thread::spawn(move || d.insert("new", "one").unwrap())
        };
        d.insert("new", "two").unwrap();
        t.join().unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d.keys().unwrap(), vec![b"new".to_vec()]);
        let v = d.get("new").unwrap().unwrap();
        assert!(v == b"one" || v == b"two");
    });
}

/// Read-modify-write: two concurrent increments both land.
#[test]
fn concurrent_updates_lose_nothing() {
    loom::model(|| {
        let d = Arc::new(small());
        let incr = |d: &shmdict::ShmDict| {
            d.update("n", |old| Some(vec![old.map_or(0, |b| b[0]) + 1]))
                .unwrap();
        };
        let t = {
            let d = d.clone();
            thread::spawn(move || incr(&d))
        };
        incr(&d);
        t.join().unwrap();
        assert_eq!(d.get("n").unwrap(), Some(vec![2]));
    });
}

/// Keys that share a home bucket and overflow past it: removing one while
/// another thread looks up the one that overflowed never hides the latter
/// (the overflow count is decremented only after the slot is cleared).
#[test]
fn removal_never_hides_an_overflowed_key() {
    loom::model(|| {
        let d = Arc::new(small());
        // Four keys with the same home bucket: three fill it, one overflows.
        let keys: Vec<Vec<u8>> = (0u8..=255)
            .map(|i| vec![i])
            .filter(|k| home_bucket(&d, k) == 0)
            .take(4)
            .collect();
        for k in &keys {
            d.insert(k, k).unwrap();
        }
        let t = {
            let d = d.clone();
            let first = keys[0].clone();
            thread::spawn(move || assert!(d.remove(&first).unwrap()))
        };
        assert_eq!(d.get(&keys[3]).unwrap().as_ref(), Some(&keys[3]));
        t.join().unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d.get(&keys[0]).unwrap(), None);
    });
}

/// Insert of a new key racing with removal of another key in the same
/// bucket chain: both outcomes are visible afterwards, counts are exact.
#[test]
fn insert_and_remove_in_one_chain() {
    loom::model(|| {
        let d = Arc::new(small());
        let keys: Vec<Vec<u8>> = (0u8..=255)
            .map(|i| vec![i])
            .filter(|k| home_bucket(&d, k) == 1)
            .take(4)
            .collect();
        for k in &keys[..3] {
            d.insert(k, "x").unwrap();
        }
        let t = {
            let d = d.clone();
            let k = keys[3].clone();
            thread::spawn(move || d.insert(&k, "y").unwrap())
        };
        assert!(d.remove(&keys[1]).unwrap());
        t.join().unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d.get(&keys[3]).unwrap(), Some(b"y".to_vec()));
        assert_eq!(d.get(&keys[1]).unwrap(), None);
        assert_eq!(d.get(&keys[0]).unwrap(), Some(b"x".to_vec()));
    });
}

/// Free list: blocks held at the same time by two threads never overlap,
/// and what a thread writes into its block is what it reads back.
#[test]
fn free_list_hands_each_block_to_one_owner() {
    loom::model(|| {
        let a = Arc::new(Arena::new(1024));
        // Prime the order-0 list with two blocks.
        let b0 = a.alloc(0).unwrap();
        let b1 = a.alloc(0).unwrap();
        a.free(b0, 0);
        a.free(b1, 0);
        let worker = |a: &Arena, tag: u64| {
            let b = a.alloc(0).expect("a block");
            a.write(b, 0, tag);
            let back = a.read(b, 0);
            a.free(b, 0);
            assert_eq!(back, tag, "block {b} shared by two owners");
        };
        let t = {
            let a = a.clone();
            thread::spawn(move || worker(&a, 1))
        };
        worker(&a, 2);
        t.join().unwrap();
    });
}

/// Splitting and carving under contention: two threads allocating blocks of
/// different orders from a fresh arena get disjoint blocks.
#[test]
fn carve_and_split_give_disjoint_blocks() {
    loom::model(|| {
        let a = Arc::new(Arena::new(1024));
        let t = {
            let a = a.clone();
            thread::spawn(move || a.alloc(1).map(|g| (g, 2u64)))
        };
        let mine = a.alloc(0).map(|g| (g, 1u64));
        let theirs = t.join().unwrap();
        if let (Some((g0, n0)), Some((g1, n1))) = (mine, theirs) {
            assert!(
                g0 + n0 <= g1 || g1 + n1 <= g0,
                "blocks {g0}+{n0} and {g1}+{n1} overlap"
            );
        } else {
            panic!("a fresh arena has room for both");
        }
    });
}

/// Defragmentation: with the arena carved entirely into small free blocks,
/// two threads that each need a whole chunk both get one: the thread that
/// finds the lists empty while the other is merging waits for it instead of
/// reporting `Full`.
#[test]
fn defragmentation_never_causes_a_spurious_full() {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(1);
    builder.check(|| {
        let a = Arc::new(Arena::new(1024));
        let top = a.max_order();
        let mut small = Vec::new();
        while let Some(g) = a.alloc(top - 1) {
            small.push(g);
        }
        for g in small {
            a.free(g, top - 1);
        }
        let t = {
            let a = a.clone();
            thread::spawn(move || a.alloc(top))
        };
        let mine = a.alloc(top);
        let theirs = t.join().unwrap();
        assert!(
            mine.is_some() && theirs.is_some(),
            "spurious Full: {mine:?} {theirs:?}"
        );
        assert_ne!(mine, theirs);
    });
}

/// Recovery of a slot left WRITING by a dead writer, racing with live
/// operations: two threads updating the key both wait for the slot, find
/// its holder dead, release it (only one release takes effect) and both
/// increments land. A reader meanwhile sees the old value, whole.
#[test]
fn a_dead_writers_slot_is_released_once_and_no_update_is_lost() {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(1);
    builder.check(|| {
        let d = Arc::new(small());
        d.insert("n", [5u8]).unwrap();
        shmdict::__loom::forge_dead_writer(&d, b"n");
        let incr = |d: &shmdict::ShmDict| {
            d.update("n", |old| Some(vec![old.map_or(0, |b| b[0]) + 1]))
                .unwrap();
        };
        let t = {
            let d = d.clone();
            thread::spawn(move || incr(&d))
        };
        let seen = d.get("n").unwrap().unwrap();
        assert!(seen == [5] || seen == [6] || seen == [7], "{seen:?}");
        incr(&d);
        t.join().unwrap();
        assert_eq!(d.get("n").unwrap(), Some(vec![7]));
    });
}

/// Recovery of a bucket insert lock left held by a dead inserter, racing
/// with two live inserts of the same new key: exactly one entry results.
#[test]
fn a_dead_inserters_lock_is_taken_over_and_keys_stay_unique() {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(1);
    builder.check(|| {
        let d = Arc::new(small());
        shmdict::__loom::forge_dead_insert_lock(&d, b"new");
        let t = {
            let d = d.clone();
            thread::spawn(move || d.insert("new", "one").unwrap())
        };
        d.insert("new", "two").unwrap();
        t.join().unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d.keys().unwrap(), vec![b"new".to_vec()]);
    });
}

/// `check()` racing with a live writer: the write gate keeps it from
/// mistaking the writer's block in flight (taken, not yet published; or
/// retired, not yet freed) for a leak. It reclaims exactly the block a
/// "dead" process leaked, and a final check finds every granule in exactly
/// one place (a block reclaimed while in flight would be both published and
/// free, which the final check reports).
#[test]
fn check_reclaims_leaks_but_never_a_block_in_flight() {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(1);
    builder.check(|| {
        let d = Arc::new(small());
        d.insert("k", [1u8; 24]).unwrap();
        shmdict::__loom::leak_block(&d, 0);
        let t = {
            let d = d.clone();
            thread::spawn(move || d.insert("k", [2u8; 40]).unwrap())
        };
        let report = d.check().unwrap();
        t.join().unwrap();
        assert!(report.is_ok(), "{report}");
        if report.skipped.is_none() {
            assert_eq!(report.leaked_bytes_reclaimed, 64, "{report}");
        }
        let last = d.check().unwrap();
        assert!(last.is_ok(), "{last}");
        assert!(last.skipped.is_none());
        assert_eq!(last.keys, 1);
        assert_eq!(d.get("k").unwrap(), Some(vec![2u8; 40]));
    });
}

/// Issue 10, item 2: threads of one handle share its owner token, so a
/// lock word held by one of them names the token of the others too. A
/// waiter must never clear such a word while another thread of its handle
/// holds it. The bug: the waiter read its handle's hold count as 0 between
/// the other thread's unlock and relock, then cleared the relocked word
/// (same value, so the CAS succeeded): two holders, a lost increment.
/// Three preemptions: with the fix's exclusion removed (`begin_hold`
/// ignoring `CLEARING`) the steal needs three.
#[test]
fn threads_of_one_handle_never_steal_a_lock_word() {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(|| {
        let l = Arc::new(shmdict::__loom::LockWord::new());
        let t = {
            let l = l.clone();
            thread::spawn(move || {
                l.increment();
                l.increment();
            })
        };
        l.increment();
        t.join().unwrap();
        assert_eq!(l.get(), 3, "an increment was lost");
    });
}

// ---------------------------------------------------------------------------
// The robust lock of Array segments (`rwlock.rs`) and the double buffer of
// large Values (`value.rs`). The elements of `ArrayLock` are loom cells:
// loom fails a model if two accesses to an element, one of them a write,
// are not ordered by the lock (see `shmdict::__loom::ArrayLock`).
// ---------------------------------------------------------------------------

use shmdict::__loom::{ArrayLock, Hold};

/// Exclusive vs shared (Dekker between the shared holder's count and the
/// exclusive side's lock word): a writer of two handles' worth of elements
/// and a reader on another handle never overlap; the reader sees both
/// elements of one write.
#[test]
fn array_writer_and_reader_never_overlap() {
    loom::model(|| {
        let a = Arc::new(ArrayLock::new(2, 2));
        let w = {
            let a = a.clone();
            thread::spawn(move || {
                for v in 1..=2 {
                    let g = a.write(0);
                    g.set(0, v);
                    g.set(1, v);
                    assert!(!g.recovered());
                }
            })
        };
        let g = a.read(1);
        let (x, y) = (g.get(0), g.get(1));
        assert_eq!(x, y, "torn read");
        assert!(x <= 2);
        assert!(!g.recovered());
        drop(g);
        w.join().unwrap();
    });
}

/// As above, with the writer and the reader threads of one handle: the
/// drain trusts the handle's process-local count for its own entry.
#[test]
fn array_writer_and_reader_of_one_handle_never_overlap() {
    loom::model(|| {
        let a = Arc::new(ArrayLock::new(2, 1));
        let w = {
            let a = a.clone();
            thread::spawn(move || {
                let g = a.write(0);
                g.set(0, 1);
                g.set(1, 1);
            })
        };
        let g = a.read(0);
        assert_eq!(g.get(0), g.get(1), "torn read");
        drop(g);
        w.join().unwrap();
    });
}

/// Read mode vs chunk mode: a reader of the whole array and a chunk holder
/// never overlap (each acquisition that changes the mode drains the other).
#[test]
fn array_read_mode_and_chunk_mode_never_overlap() {
    loom::model(|| {
        let a = Arc::new(ArrayLock::new(2, 2));
        let c = {
            let a = a.clone();
            thread::spawn(move || {
                let g = a.range_mut(0, 0..2).expect("a claim slot");
                g.set(0, 1);
                g.set(1, 1);
            })
        };
        let g = a.read(1);
        assert_eq!(g.get(0), g.get(1), "torn read");
        drop(g);
        c.join().unwrap();
    });
}

/// Chunk holders of disjoint ranges hold their guards at the same time:
/// each waits, while holding its guard, for the other to hold its own (a
/// model in which either had to wait for the other would never end).
#[test]
fn array_disjoint_chunks_proceed_together() {
    use loom::sync::atomic::{AtomicBool, Ordering};
    loom::model(|| {
        let a = Arc::new(ArrayLock::new(2, 2));
        let held = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
        let worker = |a: &ArrayLock, held: &[AtomicBool; 2], me: usize| {
            let g = a.range_mut(me, me..me + 1).expect("a claim slot");
            g.set(me, 1);
            held[me].store(true, Ordering::SeqCst);
            while !held[1 - me].load(Ordering::SeqCst) {
                thread::yield_now();
            }
            assert_eq!(g.get(me), 1);
        };
        let t = {
            let (a, held) = (a.clone(), held.clone());
            thread::spawn(move || worker(&a, &held, 1))
        };
        worker(&a, &held, 0);
        t.join().unwrap();
    });
}

/// Overlapping claims are never granted together: the second waits for the
/// first's release, and then sees its writes.
#[test]
fn array_overlapping_chunks_are_serialized() {
    loom::model(|| {
        let a = Arc::new(ArrayLock::new(3, 2));
        let worker = |a: &ArrayLock, h: usize, range: std::ops::Range<usize>| {
            let g = a.range_mut(h, range).expect("a claim slot");
            let seen = g.get(1);
            g.set(1, seen + 1);
        };
        let t = {
            let a = a.clone();
            thread::spawn(move || worker(&a, 1, 1..3))
        };
        worker(&a, 0, 0..2);
        t.join().unwrap();
        assert_eq!(a.read(0).get(1), 2, "an increment was lost");
    });
}

/// A writer killed holding the exclusive lock word: a live writer and a
/// live reader both get through; exactly one of them took the word over.
#[test]
fn array_dead_writers_lock_is_taken_over_once() {
    loom::model(|| {
        let a = Arc::new(ArrayLock::new(2, 2));
        a.kill_holder(Hold::Write);
        let w = {
            let a = a.clone();
            thread::spawn(move || {
                let g = a.write(0);
                g.set(0, 1);
                g.set(1, 1);
                g.recovered()
            })
        };
        let g = a.read(1);
        assert_eq!(g.get(0), g.get(1), "torn read");
        let mine = g.recovered();
        drop(g);
        let theirs = w.join().unwrap();
        assert!(mine ^ theirs, "recovered: reader {mine}, writer {theirs}");
        assert!(!a.write(0).recovered(), "recovered twice");
    });
}

/// A reader killed holding a shared hold: its count is found dead (and its
/// attach entry freed) by exactly one of the acquisitions that drain, a
/// writer and a chunk holder (which drains to switch to chunk mode).
#[test]
fn array_dead_readers_count_is_recovered_once() {
    loom::model(|| {
        let a = Arc::new(ArrayLock::new(2, 2));
        a.kill_holder(Hold::Read);
        let w = {
            let a = a.clone();
            thread::spawn(move || {
                let g = a.write(0);
                g.set(0, g.get(0) + 1);
                g.recovered()
            })
        };
        let g = a.range_mut(1, 0..1).expect("a claim slot");
        g.set(0, g.get(0) + 1);
        let mine = g.recovered();
        drop(g);
        let theirs = w.join().unwrap();
        assert!(mine ^ theirs, "recovered: chunk {mine}, writer {theirs}");
        let g = a.write(0);
        assert!(!g.recovered(), "recovered twice");
        assert_eq!(g.get(0), 2);
    });
}

/// A chunk holder killed holding a claim: two live chunk holders of
/// disjoint ranges that both overlap the dead claim both get through, and
/// exactly one of them cleared it. The dead handle's shared count is then
/// found by the next writer.
#[test]
fn array_dead_chunk_claim_is_taken_over_once() {
    loom::model(|| {
        let a = Arc::new(ArrayLock::new(2, 2));
        a.kill_holder(Hold::Chunk(0..2));
        let worker = |a: &ArrayLock, h: usize| {
            let g = a.range_mut(h, h..h + 1).expect("a claim slot");
            g.set(h, 1);
            g.recovered()
        };
        let t = {
            let a = a.clone();
            thread::spawn(move || worker(&a, 1))
        };
        let mine = worker(&a, 0);
        let theirs = t.join().unwrap();
        assert!(mine ^ theirs, "recovered: {mine} and {theirs}");
        let g = a.write(0);
        assert!(g.recovered(), "the dead chunk holder's count");
        assert_eq!((g.get(0), g.get(1)), (1, 1));
        drop(g);
        assert!(!a.write(0).recovered(), "recovered twice");
    });
}

/// The double buffer of a large `Value`: a reader racing with two stores
/// sees one complete value (the second store rewrites the slot the reader
/// may be copying).
#[test]
fn value_reader_sees_one_complete_value() {
    loom::model(|| {
        let v = Arc::new(shmdict::__loom::value(0));
        let w = {
            let v = v.clone();
            thread::spawn(move || {
                v.store([1; 3]);
                v.store([2; 3]);
            })
        };
        let got = v.load();
        assert!(got == [0; 3] || got == [1; 3] || got == [2; 3], "{got:?}");
        w.join().unwrap();
        assert_eq!(v.load(), [2; 3]);
    });
}

/// As above with the two stores made by two threads (two writers, so the
/// second one's slot writes are ordered after the first publication only by
/// the lock word and the fences of `publish`).
#[test]
fn value_reader_racing_two_writers_sees_one_complete_value() {
    loom::model(|| {
        let v = Arc::new(shmdict::__loom::value(0));
        let writers: Vec<_> = (1..=2)
            .map(|x| {
                let v = v.clone();
                thread::spawn(move || v.store([x; 3]))
            })
            .collect();
        let got = v.load();
        assert!(got == [0; 3] || got == [1; 3] || got == [2; 3], "{got:?}");
        for w in writers {
            w.join().unwrap();
        }
        let last = v.load();
        assert!(last == [1; 3] || last == [2; 3], "{last:?}");
    });
}

/// `update` of a large `Value` (copy, compute unlocked, publish under the
/// lock word if unchanged) from two threads: both increments land.
#[test]
fn value_updates_lose_nothing() {
    loom::model(|| {
        let v = Arc::new(shmdict::__loom::value(0));
        let t = {
            let v = v.clone();
            thread::spawn(move || v.update(|x| x.map(|w| w + 1)))
        };
        v.update(|x| x.map(|w| w + 1));
        t.join().unwrap();
        assert_eq!(v.load(), [2; 3]);
    });
}

/// A writer killed in the middle of a store leaves the lock word held and
/// the spare slot half-written: readers never see that garbage, and the
/// next writers take the lock over.
#[test]
fn value_dead_writer_neither_blocks_nor_misleads() {
    loom::model(|| {
        let v = Arc::new(shmdict::__loom::value(0));
        shmdict::__loom::kill_value_writer(&v, 0xdead);
        let w = {
            let v = v.clone();
            thread::spawn(move || v.store([1; 3]))
        };
        let got = v.load();
        assert!(got == [0; 3] || got == [1; 3], "{got:?}");
        w.join().unwrap();
        assert_eq!(v.load(), [1; 3]);
    });
}

/// `len()` is exact after a kill (issue 10, item 9). A writer is killed at
/// each step of a new-key insert or a removal (before recording its count
/// change, after recording it, after storing the entry word, after applying
/// the change); right after, `len()` equals the keys present with nothing
/// run in between. Then a live writer takes the dead writer's slot over
/// (settling its record before releasing the slot), and another "process"
/// claims the dead handle's attach entry (settling it too): either after
/// the writer is done, or racing with it. The change is applied exactly
/// once. (The sequential variant fails if `seqlock::wait_unlocked` releases
/// the slot without settling first: the claimant then finds the record
/// naming a released slot and drops a change that was published.)
#[test]
fn len_is_exact_after_a_writer_is_killed_at_any_step() {
    for adopt_races in [false, true] {
        for insert in [true, false] {
            for step in 1..=4 {
                loom::model(move || killed_writer_then_settle(insert, step, adopt_races));
            }
        }
    }
}

fn killed_writer_then_settle(insert: bool, step: u32, adopt_races: bool) {
    let what = format!("insert {insert}, step {step}, adopt races {adopt_races}");
    let d = Arc::new(small());
    d.insert("b", "stays").unwrap();
    if !insert {
        d.insert("a", "x").unwrap();
    }
    let dead = {
        let d = d.clone();
        thread::spawn(move || kill_counted_write(&d, b"a", insert, step))
            .join()
            .unwrap()
    };
    let present = d.keys().unwrap().len();
    assert_eq!(d.len(), present, "{what}: right after the kill");
    let t = {
        let d = d.clone();
        thread::spawn(move || {
            d.insert("a", "new").unwrap();
            assert!(d.remove("a").unwrap());
        })
    };
    if adopt_races {
        adopt_entry(&d, dead);
        t.join().unwrap();
    } else {
        t.join().unwrap();
        assert_eq!(d.len(), 1, "{what}: after the takeover");
        adopt_entry(&d, dead);
    }
    assert_eq!(d.keys().unwrap().len(), 1);
    assert_eq!(d.len(), 1, "{what}: after settling");
}

// ---------------------------------------------------------------------------
// Borrowed reads (`shm/epoch.rs`): pins, retirement and reclamation. The
// reader is `Reader::get` under loom (`shmdict::__loom::Pinned::get`); a
// block freed by reclamation is recycled at once (`Borrowing::recycle`:
// poison bytes, and a write of the block's shadow loom cell, which loom
// reports if it is not ordered after a pinned reader's read of the block).
//
// Each model below lists the mutations of `src/shm/epoch.rs` it was run
// against, one at a time, and whether it failed (it must). What loom 0.7.3
// (the version in Cargo.lock) can and cannot show here:
// - `fence(SeqCst)` is modelled as an AcqRel fence that also joins one
//   global clock both ways (`rt/thread.rs`, `seq_cst_fence`): every SeqCst
//   fence happens after every earlier one. That is stronger than the
//   language's model, where SeqCst fences create no happens-before and only
//   constrain which stores later loads may read. So a protocol that relied
//   on a SeqCst fence for happens-before would pass here and be wrong. The
//   epoch's SeqCst fences are only used for what the language does give
//   (a pin whose fence precedes an advance's is seen by its scan; an
//   unpublication whose fence precedes a pin's is seen by the reader; a
//   retire reads an epoch no older than a pin whose fence preceded it);
//   the happens-before its frees need comes from Release/Acquire pairs (the
//   unpin and the advance's Acquire fence; the advance's CAS and the
//   reclaimer's Acquire load), and each of those, weakened, is caught by
//   some model below without a SeqCst fence standing in (M2's one miss
//   is a real acquire, see there). Every removal or weakening of one of
//   the three SeqCst fences was caught.
// - SeqCst *accesses* are modelled as AcqRel (loom's README): weaker, so
//   false alarms, never missed bugs; the epoch code has none.
// - Loom explores no load buffering: a load never returns a store that runs
//   later in its schedule. A reader's reads that are not ordered before a
//   recycling write can then still return the old bytes, which is why the
//   shadow cells are there: with them a missing Release on the unpin is
//   caught; with the poison check alone it is not.
// ---------------------------------------------------------------------------

use shmdict::__loom::{Borrowing, POISON};

/// 4 keys, a 1 KiB arena (as `small`), with the models' view of block
/// reads and writes.
fn borrowing() -> Borrowing {
    Borrowing::new(4, 1024)
}

/// Pin, then read (the slot's entry, then the block's bytes) against
/// retire, then reclaim: a reader pinned before or during an overwrite or
/// a removal reads the old value or the new one (or none), whole, and
/// never a block recycled under its pin; once it is gone, the old block
/// is freed.
///
/// A writer replaces the value or removes the key (the real `insert` and
/// `remove`: `try_replace` or `try_remove`, then `retire`); the main
/// thread first moves the epoch once (so that the writer's read of the
/// epoch can be stale), then reclaims as a writer short of room does
/// (`reclaim_everywhere`: up to three advances, then the frees) and
/// recycles what it freed. The reader is descheduled between finding the
/// entry and reading the block.
///
/// Fails (each mutation made in `src/shm/epoch.rs`, the model run alone
/// with `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2
/// CARGO_TARGET_DIR=target/loom cargo test --release --test loom --
/// a_pinned_reader`, then reverted):
/// - `pin`: its `fence(SeqCst)` removed, or made `AcqRel`: caught.
/// - `retire`: its `fence(SeqCst)` removed, or made `AcqRel`: caught.
/// - `try_advance`: its `fence(SeqCst)` removed, made `AcqRel`, or moved
///   after the scan of the pin words: caught.
/// - `try_advance`: its `fence(Acquire)` removed: caught.
/// - `try_advance`: the `pin_epoch(v) != epoch` check dropped (pins never
///   block), or weakened to `pin_epoch(v) + 1 < epoch` (a pin one epoch
///   behind ignored): caught.
/// - `reclaim_locked`: frees at `s + 1` instead of `s + 2`: caught (also by
///   the poison check alone: the reader finds the free-list link).
/// - `unpin`: `Release` made `Relaxed`: caught, by the shadow cell only (see
///   `shmdict::__loom::Borrowing`; with it removed this mutation passes).
/// - Not caught here: the `Release` of the advance's CAS or the `Acquire`
///   load of `reclaim_locked` made `Relaxed` (this model's reclaimer is its
///   own advancer); `an_advance_elsewhere_orders_the_frees_after_the_reads`
///   catches both.
///
/// The removal variant alone (with `[true]` as the loop's list) catches
/// the `pin`, `retire` and `try_advance` fence removals and `s + 1` too.
#[test]
fn a_pinned_reader_never_sees_its_block_recycled() {
    for remove in [false, true] {
        loom::model(move || pinned_read_against_retire_and_reclaim(remove));
    }
}

fn pinned_read_against_retire_and_reclaim(remove: bool) {
    let d = Arc::new(borrowing());
    let (v0, v1) = (vec![0xa0; 24], vec![0xb1; 24]);
    d.insert("k", &v0).unwrap();
    let old = d.granule_of(b"k").unwrap();
    let r = {
        let d = d.clone();
        let (v0, v1) = (v0.clone(), v1.clone());
        thread::spawn(move || {
            let pin = d.pin(0);
            match pin.get_descheduled(b"k") {
                Some(got) => {
                    assert!(!got.contains(&POISON), "read a recycled block: {got:?}");
                    assert!(got == v0 || (!remove && got == v1), "torn read: {got:?}");
                }
                None => assert!(remove, "the key is always present"),
            }
        })
    };
    let w = {
        let d = d.clone();
        thread::spawn(move || {
            if remove {
                assert!(d.remove("k").unwrap());
            } else {
                d.insert("k", &v1).unwrap();
            }
        })
    };
    d.advance();
    let mut freed = d.reclaim();
    if freed > 0 {
        assert_eq!(freed, 64, "only the unpublished block was retired");
        d.recycle(old);
    }
    r.join().unwrap();
    w.join().unwrap();
    freed += d.reclaim();
    assert_eq!(freed, 64, "the unpublished block is freed once unpinned");
}

/// Pin joining: two readers of one handle share a pin slot (the third pin
/// of a handle whose stash has two slots under loom: the main thread holds
/// the other one while it writes). The slot keeps the epoch of its oldest
/// pin, so the reader that joined later protects the earlier one's block,
/// and one reader's unpin, racing with an advance, leaves the other's pin
/// in place.
///
/// Reader 1 pins at epoch 0 and may read the first value's block `b0`;
/// the main thread replaces it (retiring `b0` at 0) and moves the epoch
/// to 1; reader 2 pins at 1 on the same pin line (it must not join reader
/// 1's sub-slot, which counts pins at 0: it claims the line's other one),
/// and may read the second value's block `b1`; the main thread replaces that too (retiring
/// `b1` at 1), drops its own pin and reclaims, recycling whatever was
/// freed, while the readers unpin. The readers wait for nothing; the main
/// thread waits for each reader to have pinned (a Relaxed census, which
/// orders nothing).
///
/// Fails (each mutation made in `src/shm/epoch.rs`, the model run alone
/// with `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2
/// CARGO_TARGET_DIR=target/loom cargo test --release --test loom --
/// readers_sharing`, then reverted):
/// - `try_pin`: joining a busy sub-slot whatever its epoch and setting
///   its epoch to the joiner's (`epoch << 32 | n + 1`, the analogue of the
///   old design's `join` mutation): caught (the earlier reader's block is
///   recycled under it: loom reports the shadow cell's causality
///   violation).
/// - `unpin`: clearing the slot's count (`v & !COUNT_MASK`) instead of
///   decrementing it: caught (the later reader's block is freed).
/// - `unpin`: `Release` made `Relaxed`: caught.
/// - `pin`: its `fence(SeqCst)` removed: caught.
/// - Not caught here: `try_advance`'s `fence(Acquire)` removed. The next
///   advance of the same `reclaim_everywhere` begins with a SeqCst fence,
///   which is an acquire fence too (in the language's model as in loom's),
///   so the frees are still ordered after the unpin; the other models
///   catch it.
#[test]
fn readers_sharing_a_pin_slot_protect_each_other() {
    use loom::sync::atomic::{AtomicU64, Ordering};
    loom::model(|| {
        let d = Arc::new(borrowing());
        let (v0, v1, v2) = (vec![0xa0; 24], vec![0xb1; 24], vec![0xc2; 24]);
        d.insert("k", &v0).unwrap();
        let b0 = d.granule_of(b"k").unwrap();
        let census = Arc::new(AtomicU64::new(0));
        let reader = |expect: [Vec<u8>; 2]| {
            let (d, census) = (d.clone(), census.clone());
            thread::spawn(move || {
                let pin = d.pin(0);
                assert_eq!(pin.slot() / 2, 0, "pin line 1 is the main thread's");
                // Relaxed: a census, not a synchronization.
                census.fetch_add(1, Ordering::Relaxed);
                let got = pin
                    .get_descheduled(b"k")
                    .expect("the key is always present");
                assert!(!got.contains(&POISON), "read a recycled block: {got:?}");
                assert!(expect.contains(&got), "torn read: {got:?}");
            })
        };
        let wait_for = |n: u64| {
            // Relaxed: as in the readers.
            while census.load(Ordering::Relaxed) < n {
                thread::yield_now();
            }
        };
        let mine = d.pin(1);
        assert_eq!(mine.slot() / 2, 1);
        let r1 = reader([v0.clone(), v1.clone()]);
        wait_for(1);
        d.insert("k", &v1).unwrap();
        let b1 = d.granule_of(b"k").unwrap();
        assert!(d.advance(), "every pin is at epoch 0");
        let r2 = reader([v1.clone(), v2.clone()]);
        wait_for(2);
        d.insert("k", &v2).unwrap();
        drop(mine);
        d.reclaim();
        let held = d.held();
        for b in [b0, b1] {
            if !held.contains(&b) {
                d.recycle(b);
            }
        }
        r1.join().unwrap();
        r2.join().unwrap();
        d.reclaim();
        let held = d.held();
        assert!(
            !held.contains(&b0) && !held.contains(&b1),
            "both replaced blocks are freed once unpinned: {held:?}"
        );
    });
}

/// The epoch moved by one thread (another process's writer, which saw the
/// reader unpin), the block freed by another (whose own advance still saw
/// the pin): the frees are ordered after the reader's reads through the
/// advance's Release and the reclaimer's Acquire load of the epoch.
///
/// The main thread is the reader: it starts the writer (which replaces
/// the value, then reclaims) and the advancer (which tries to move the
/// epoch twice), then pins and reads once. Neither of them joins a thread
/// before it acts: whatever orders the frees after the reads is the
/// protocol's.
///
/// Fails (each mutation made in `src/shm/epoch.rs`, the model run alone
/// with `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2
/// CARGO_TARGET_DIR=target/loom cargo test --release --test loom --
/// an_advance_elsewhere`, then reverted):
/// - `reclaim_locked`: the `Acquire` load of the epoch made `Relaxed`:
///   caught.
/// - `try_advance`: the `Release` of the CAS made `Relaxed`: caught.
/// - `try_advance`: its `fence(Acquire)` removed: caught.
#[test]
fn an_advance_elsewhere_orders_the_frees_after_the_reads() {
    loom::model(|| {
        let d = Arc::new(borrowing());
        let (v0, v1) = (vec![0xa0; 24], vec![0xb1; 24]);
        d.insert("k", &v0).unwrap();
        let old = d.granule_of(b"k").unwrap();
        let w = {
            let (d, v1) = (d.clone(), v1.clone());
            thread::spawn(move || {
                d.insert("k", &v1).unwrap();
                let freed = d.reclaim();
                if freed > 0 {
                    assert_eq!(freed, 64, "only the replaced block was retired");
                    d.recycle(old);
                }
                freed
            })
        };
        let a = {
            let d = d.clone();
            thread::spawn(move || {
                d.advance();
                d.advance();
            })
        };
        let pin = d.pin(0);
        let got = pin.get(b"k").expect("the key is always present");
        assert!(!got.contains(&POISON), "read a recycled block: {got:?}");
        assert!(got == v0 || got == v1, "torn read: {got:?}");
        drop(pin);
        let freed = w.join().unwrap() + d.reclaim();
        a.join().unwrap();
        assert_eq!(
            freed + d.reclaim(),
            64,
            "the replaced block is freed once unpinned"
        );
    });
}

/// A dead pinner: another process pinned its stash (so it may read the
/// block being replaced) and was killed, or lives on (stopped, say),
/// while this handle's reader pins and reads and this handle replaces the
/// value and reclaims. A dead process's pin holds nothing: the replaced
/// block is freed (once this handle's own reader is gone). A live one's
/// pin holds it until that pin is released, however long.
///
/// Fails (each mutation made in `src/shm/epoch.rs`, the model run alone
/// with `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2
/// CARGO_TARGET_DIR=target/loom cargo test --release --test loom --
/// a_dead_pinner`, then reverted):
/// - `try_advance`: `blocked && alive(i)` made `blocked` (every owner taken
///   for alive): caught ("a dead process's pin holds nothing").
/// - made `blocked && alive(i) && i == 0` (every other process taken for
///   dead): caught ("freed under a live process's pin").
/// - made `blocked && false` (every owner taken for dead): caught (the
///   reader's own block is recycled under it).
#[test]
fn a_dead_pinner_holds_nothing_a_live_one_holds_on() {
    for other_alive in [false, true] {
        loom::model(move || {
            let d = Arc::new(borrowing());
            let (v0, v1) = (vec![0xa0; 24], vec![0xb1; 24]);
            d.insert("k", &v0).unwrap();
            let old = d.granule_of(b"k").unwrap();
            let other = d.foreign_pin(other_alive);
            let r = {
                let d = d.clone();
                let (v0, v1) = (v0.clone(), v1.clone());
                thread::spawn(move || {
                    let pin = d.pin(0);
                    let got = pin
                        .get_descheduled(b"k")
                        .expect("the key is always present");
                    assert!(!got.contains(&POISON), "read a recycled block: {got:?}");
                    assert!(got == v0 || got == v1, "torn read: {got:?}");
                })
            };
            d.insert("k", &v1).unwrap();
            let mut freed = d.reclaim();
            if freed > 0 {
                assert!(!other_alive, "freed under a live process's pin");
                assert_eq!(freed, 64, "only the replaced block was retired");
                d.recycle(old);
            }
            r.join().unwrap();
            freed += d.reclaim();
            if other_alive {
                assert_eq!(freed, 0, "freed under a live process's pin");
                d.foreign_unpin(other);
                assert_eq!(d.reclaim(), 64, "freed once the live pin is released");
            } else {
                assert_eq!(freed, 64, "a dead process's pin holds nothing");
            }
        });
    }
}

// ---------------------------------------------------------------------------
// Growth while attached (`src/shm/grow.rs`): the growth step a reader can
// observe (a lookup while the index is copied, flipped and sealed, and the
// old value's block then recycled), and a grower killed at each step.
// ---------------------------------------------------------------------------

use shmdict::__loom::{block_of, generation, growing_dict, kill_grower, recycle_block};

/// A copying reader (`get`: the seqlock) looks a key up while another
/// process grows the index, and the main thread then overwrites the key
/// and recycles the old value's block (a copying reader holds no pin, so
/// only the seqlock and the `MOVED` marks protect it). The reader sees the
/// old or the new value, whole, never nothing and never the recycled
/// bytes. The grower is killed at kill point `step` (0: never; 10: after
/// copying, before the flip, so the step is rolled back and the next
/// grower reuses its half-made table; 11: after the flip, before the seal,
/// so the next writer seals first): the dictionary ends with both keys,
/// the new value, and one growth.
///
/// Fails (each mutation made in `src/shm/`, the model run alone with
/// `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2
/// CARGO_TARGET_DIR=target/loom cargo test --release --test loom --
/// growth`, then reverted): see the list in `docs/design.md`, "Growth";
/// each is recorded in the commit that added this model.
fn copying_reader_across_growth(step: u32) {
    let d = Arc::new(growing_dict(1, 1024, 4096));
    let (v0, v1) = (vec![0xa0; 24], vec![0xb1; 24]);
    d.insert("A", &v0).unwrap();
    let (granule, order) = block_of(&d, b"A").unwrap();
    let r = {
        let d = d.clone();
        let (v0, v1) = (v0.clone(), v1.clone());
        thread::spawn(move || {
            let got = d.get("A").unwrap().expect("the key is always present");
            assert!(!got.contains(&POISON), "read a recycled block: {got:?}");
            assert!(got == v0 || got == v1, "torn read: {got:?}");
        })
    };
    kill_grower(&d, 0, step);
    d.insert("A", &v1).unwrap();
    recycle_block(&d, granule, order);
    d.insert("B", &v0).unwrap();
    r.join().unwrap();
    assert_eq!(generation(&d), 1);
    assert_eq!(d.get("A").unwrap(), Some(v1));
    assert_eq!(d.get("B").unwrap(), Some(v0));
    assert_eq!(d.len(), 2);
    // Exactly these entries in the current table (a half-made table reused
    // without zeroing would still hold the first grower's copy of A, whose
    // block was recycled since: a second entry naming a block in use).
    let mut keys = d.keys().unwrap();
    keys.sort();
    assert_eq!(keys, [b"A".to_vec(), b"B".to_vec()]);
    let report = d.check().unwrap();
    assert!(report.problems.is_empty(), "{report:?}");
    assert_eq!(report.keys, 2, "{report:?}");
}

/// A model of a growth step runs long (the copy, the seal, a `check()`):
/// more branch points than loom's default bound of 1,000 in one execution.
fn long_model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.max_branches = 20_000;
    builder.check(f);
}

#[test]
fn growth_a_copying_reader_sees_a_whole_value() {
    long_model(|| copying_reader_across_growth(0));
}

#[test]
fn growth_a_grower_killed_before_the_flip_is_rolled_back() {
    long_model(|| copying_reader_across_growth(10));
}

#[test]
fn growth_a_grower_killed_after_the_flip_is_rolled_forward() {
    long_model(|| copying_reader_across_growth(11));
}

/// A borrowed reader (`Reader::get`: `Index::find_pinned`, no seqlock)
/// pinned while the index grows (by a new key's insert, the real path:
/// `Publish::Grow`, the gate closed, the step), the key is then
/// overwritten and the old block reclaimed and recycled: the pin keeps
/// the block (the reader's load of the generation comes after its pin's
/// fence), so the reader reads the old or the new value, whole.
#[test]
fn growth_a_pinned_reader_keeps_its_block() {
    loom::model(|| {
        let d = Arc::new(Borrowing::growing(1, 1024, 4096));
        let (v0, v1) = (vec![0xa0; 24], vec![0xb1; 24]);
        d.insert("A", &v0).unwrap();
        let old = d.granule_of(b"A").unwrap();
        let r = {
            let d = d.clone();
            let (v0, v1) = (v0.clone(), v1.clone());
            thread::spawn(move || {
                let pin = d.pin(0);
                let got = pin
                    .get_descheduled(b"A")
                    .expect("the key is always present");
                assert!(!got.contains(&POISON), "read a recycled block: {got:?}");
                assert!(got == v0 || got == v1, "torn read: {got:?}");
            })
        };
        d.insert("B", &v0).unwrap();
        d.insert("A", &v1).unwrap();
        if d.reclaim() > 0 {
            d.recycle(old);
        }
        r.join().unwrap();
        assert_eq!(generation(&d), 1);
        assert_eq!(d.get("A").unwrap(), Some(v1));
    });
}
