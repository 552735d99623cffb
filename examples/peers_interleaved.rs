//! Issue 11's speed ratios measured by interleaving, for a machine whose load
//! changes while it runs (other builds on a shared host).
//!
//! ```text
//! cargo run --release --example peers_interleaved -- 64 100
//! cargo run --release --example peers_interleaved -- 1024 100
//! ```
//!
//! Arguments: the value length in bytes (the seqlock floor runs only at 64)
//! and the number of rounds. The stores and keys are those of
//! `benches/peers.rs` (100,000 keys of 16 bytes, one shuffled order). Each
//! round runs every loop below for one batch of 10,000 operations, one loop
//! after the other; a load change then slows every loop of the round
//! alike, where criterion measures one loop for seconds and the next one
//! later. The figure per loop is its median batch (ns per operation), and
//! each ratio is taken per round (the peer's batch time over shmdict's in
//! the same round) and then the median over rounds, with the interquartile
//! range. Batches are timed in the thread's CPU time
//! (`CLOCK_THREAD_CPUTIME_ID`), which leaves out the time the process is
//! descheduled while other processes use the cores (`SHMDICT_WALL=1`: wall
//! time instead); what other processes do to the shared caches still
//! counts.
//!
//! | loop | what it does per operation |
//! |---|---|
//! | `shmdict_reader` | `Reader::get` under one `Reader` per batch; reads the value's first and last bytes |
//! | `shmdict_ref` | `get_ref`, then the same two bytes |
//! | `shmdict` | `get_into` a reused buffer |
//! | `shmdict_insert` | `insert` over a present key (an overwrite) |
//! | `seqlock_floor`, `seqlock_floor_insert` | the floor of `benches/floor`: copy out, overwrite |
//! | `rwlock_hashmap`, `rwlock_hashmap_insert` | `RwLock<HashMap>`: read lock and copy out; write lock and overwrite in place |
//! | `lmdb_txn` | LMDB through heed: one read transaction per batch, the value borrowed, two bytes read |
//!
//! Everything it creates (segment, floor file, LMDB directory) is removed at
//! the end.

#[path = "../benches/common/mod.rs"]
mod common;
#[path = "../benches/floor/mod.rs"]
mod floor;

use std::hint::black_box;
use std::time::Instant;

use common::{keys, value, Baseline, Cursor, Segment, KEYS, KEY_LEN};
use heed::types::Bytes;
use heed::{CommitOrAbort, EnvFlags, EnvOpenOptions};

const BATCH: usize = 10_000;
/// Distance between the loops' starting keys: each loop starts elsewhere in
/// the shuffled order, so that no loop finds the keys it visits in the
/// cache because the loop before it has just visited them (loops of one
/// store share its memory).
const SPREAD: usize = KEYS / 9;

#[inline(always)]
fn touch(v: &[u8]) -> u8 {
    black_box(v[0].wrapping_add(v[v.len() - 1]))
}

/// An LMDB environment in a fresh directory under /dev/shm, removed on drop.
struct Lmdb {
    env: heed::Env,
    dir: std::path::PathBuf,
}

impl Lmdb {
    fn create(value_len: usize) -> Lmdb {
        let dir = std::path::PathBuf::from(format!(
            "/dev/shm/shmdict-interleaved-{}-lmdb",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("LMDB directory");
        let mut options = EnvOpenOptions::new();
        options.map_size((8 * KEYS * (value_len + 64)).max(256 << 20));
        // SAFETY: NO_SYNC gives up durability only, which /dev/shm does not
        // have; WRITE_MAP: no other code writes through the map.
        unsafe { options.flags(EnvFlags::NO_SYNC | EnvFlags::WRITE_MAP) };
        // SAFETY: a new directory, opened once by this process.
        let env = unsafe { options.open(&dir) }.expect("open LMDB");
        Lmdb { env, dir }
    }

    /// The unnamed database, filled with the keys.
    fn fill(
        &self,
        value_len: usize,
        inserted: &[[u8; KEY_LEN]],
    ) -> heed::Database<'_, Bytes, Bytes> {
        let txn = self.env.write_txn().expect("write txn");
        let db = self
            .env
            .create_databases_and_commit(txn, |opener, txn| {
                opener
                    .create_database::<Bytes, Bytes>(txn, None)
                    .map(CommitOrAbort::<_, ()>::Commit)
            })
            .expect("create the database")
            .unwrap_commit();
        let mut txn = self.env.write_txn().expect("write txn");
        for (i, k) in inserted.iter().enumerate() {
            db.put(&mut txn, k, &value(value_len, i)).expect("put");
        }
        txn.commit().expect("commit");
        db
    }
}

impl Drop for Lmdb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One timed loop: runs a batch and returns ns per operation.
type Loop<'a> = Box<dyn FnMut() -> f64 + 'a>;

/// Nanoseconds of CPU time this thread has used (`CLOCK_THREAD_CPUTIME_ID`):
/// unlike wall time, it does not count the time the thread waits for a CPU
/// while other processes run on a shared machine.
fn cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Runs `op` `BATCH` times; ns per operation, in thread CPU time (or wall
/// time with `SHMDICT_WALL=1`).
fn timed(mut op: impl FnMut()) -> f64 {
    let wall = std::env::var_os("SHMDICT_WALL").is_some();
    let (start, cpu) = (Instant::now(), cpu_ns());
    for _ in 0..BATCH {
        op();
    }
    let ns = if wall {
        start.elapsed().as_nanos() as u64
    } else {
        cpu_ns() - cpu
    };
    ns as f64 / BATCH as f64
}

fn quartiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.25), at(0.5), at(0.75))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value_len: usize = args.get(1).map_or(64, |a| a.parse().expect("value length"));
    let rounds: usize = args.get(2).map_or(100, |a| a.parse().expect("rounds"));
    let (inserted, visited) = keys();
    let seg = Segment::create(&format!("interleaved-{value_len}"), value_len);
    let base: Baseline = seg.populate(&inserted, value_len);
    let d = seg.dict();
    let floor = (value_len == floor::VALUE_LEN).then(|| {
        let name = format!("shmdict-interleaved-{}-floor", std::process::id());
        let f = floor::Floor::create(&name, 2 * KEYS).expect("floor table");
        for (i, k) in inserted.iter().enumerate() {
            f.insert(k, value(value_len, i).as_slice().try_into().expect("64"));
        }
        f
    });
    let lmdb = Lmdb::create(value_len);
    let db = lmdb.fill(value_len, &inserted);
    let new_value = value(value_len, 7);

    let mut loops: Vec<(&str, Loop<'_>)> = Vec::new();
    let at = |i: usize| Cursor::starting_at(&visited, i * SPREAD);
    let mut cur = at(0);
    loops.push((
        "shmdict_reader",
        Box::new(move || {
            let r = d.reader().unwrap();
            timed(|| {
                touch(r.get(cur.next_key()).unwrap().expect("present"));
            })
        }),
    ));
    let mut cur = at(1);
    loops.push((
        "shmdict_ref",
        Box::new(move || {
            timed(|| {
                touch(&d.get_ref(cur.next_key()).unwrap().expect("present"));
            })
        }),
    ));
    let (mut cur, mut buf) = (at(2), Vec::with_capacity(value_len));
    loops.push((
        "shmdict",
        Box::new(move || {
            timed(|| {
                assert!(d.get_into(cur.next_key(), &mut buf).unwrap());
                black_box(buf.as_slice());
            })
        }),
    ));
    let mut cur = at(3);
    let nv = &new_value;
    loops.push((
        "shmdict_insert",
        Box::new(move || timed(|| d.insert(cur.next_key(), nv).unwrap())),
    ));
    if let Some(f) = &floor {
        let (mut cur, mut buf) = (at(4), [0u8; floor::VALUE_LEN]);
        loops.push((
            "seqlock_floor",
            Box::new(move || {
                timed(|| {
                    assert!(f.get_into(cur.next_key(), &mut buf));
                    black_box(&buf);
                })
            }),
        ));
        let mut cur = at(5);
        let v: &[u8; floor::VALUE_LEN] = new_value.as_slice().try_into().expect("64");
        loops.push((
            "seqlock_floor_insert",
            Box::new(move || timed(|| f.insert(cur.next_key(), v))),
        ));
    }
    let (mut cur, mut buf) = (at(6), Vec::with_capacity(value_len));
    let b = &base;
    loops.push((
        "rwlock_hashmap",
        Box::new(move || {
            timed(|| {
                let k = cur.next_key();
                let map = b.read().unwrap();
                let v = map.get(&k[..]).expect("present");
                buf.clear();
                buf.extend_from_slice(v);
                drop(map);
                black_box(buf.as_slice());
            })
        }),
    ));
    let mut cur = at(7);
    loops.push((
        "rwlock_hashmap_insert",
        Box::new(move || {
            timed(|| {
                let k = cur.next_key();
                let mut map = b.write().unwrap();
                let v = map.get_mut(&k[..]).expect("present");
                v.clear();
                v.extend_from_slice(nv);
            })
        }),
    ));
    let mut cur = at(8);
    let (env, db) = (&lmdb.env, &db);
    loops.push((
        "lmdb_txn",
        Box::new(move || {
            let txn = env.read_txn().unwrap();
            timed(|| {
                touch(db.get(&txn, cur.next_key()).unwrap().expect("present"));
            })
        }),
    ));

    // One round to warm up, then the measured rounds.
    for (_, f) in loops.iter_mut() {
        f();
    }
    let start_load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); loops.len()];
    for _ in 0..rounds {
        for (i, (_, f)) in loops.iter_mut().enumerate() {
            times[i].push(f());
        }
    }
    let end_load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let names: Vec<&str> = loops.iter().map(|(n, _)| *n).collect();
    drop(loops);

    println!(
        "{value_len}-byte values, {rounds} rounds of {BATCH} operations per loop, {} time; load average {} before, {} after",
        if std::env::var_os("SHMDICT_WALL").is_some() { "wall" } else { "thread CPU" },
        start_load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        end_load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!("\n| loop | median ns/op | quartiles |\n|---|---:|---|");
    for (n, t) in names.iter().zip(&times) {
        let (q1, m, q3) = quartiles(t.clone());
        println!("| `{n}` | {m:.1} | {q1:.1}-{q3:.1} |");
    }
    let series = |n: &str| names.iter().position(|x| *x == n).map(|i| &times[i]);
    println!("\n| ratio (peer ns / shmdict ns, per round) | target | median | quartiles |\n|---|---|---:|---|");
    let ratios: [(&str, &str, &str); 9] = [
        ("shmdict_reader", "seqlock_floor", ">= 0.8x"),
        ("shmdict_reader", "lmdb_txn", ">= 3x"),
        ("shmdict_reader", "rwlock_hashmap", ""),
        ("shmdict_ref", "seqlock_floor", ""),
        ("shmdict_ref", "lmdb_txn", ""),
        ("shmdict", "seqlock_floor", ">= 0.5x"),
        ("shmdict", "rwlock_hashmap", ">= 1.5x"),
        ("shmdict_insert", "seqlock_floor_insert", ">= 0.5x"),
        ("shmdict_insert", "rwlock_hashmap_insert", ">= 1.5x"),
    ];
    for (me, peer, target) in ratios {
        let (Some(a), Some(b)) = (series(me), series(peer)) else {
            continue;
        };
        let r: Vec<f64> = a.iter().zip(b).map(|(m, p)| p / m).collect();
        let (q1, m, q3) = quartiles(r);
        println!("| `{me}` vs `{peer}` | {target} | {m:.2}x | {q1:.2}-{q3:.2} |");
    }
    assert_eq!(d.len(), KEYS);
}
