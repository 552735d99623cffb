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
//! counted write, settled concurrently by a writer and an adopter.
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
