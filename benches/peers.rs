//! shmdict beside the stores a user might use instead, on the same keys in
//! the same run.
//!
//! 100,000 keys of 16 bytes, values of 64 bytes and of 1 KiB, visited in one
//! pre-shuffled random order (`benches/common`). One criterion group per
//! workload and value size, `peers_{get,insert,remove_insert}/{64B,1KiB}`,
//! each with these functions:
//!
//! | function         | what it is                                                        |
//! |------------------|-------------------------------------------------------------------|
//! | `shmdict`        | a shmdict segment in /dev/shm (`get`: `get_into`, a copy)         |
//! | `shmdict_reader` | `get` only: `Reader::get` under one long-lived `Reader` (zero-copy) |
//! | `shmdict_ref`    | `get` only: `get_ref` per read (a pin per read, zero-copy)        |
//! | `rwlock_hashmap` | `RwLock<HashMap<Vec<u8>, Vec<u8>>>`, in-process, no IPC            |
//! | `dashmap`        | `DashMap<Vec<u8>, Vec<u8>>`, in-process, sharded locks, no IPC     |
//! | `lmdb`           | LMDB through `heed`, env in /dev/shm, `NO_SYNC \| WRITE_MAP`, one transaction per operation |
//! | `lmdb_txn`       | `get` only: LMDB reads under one reused read transaction (zero-copy, its best case) |
//! | `seqlock_floor`  | the fixed-slot seqlock table of `benches/floor` (64-byte values only) |
//! | `redis`          | Redis on 127.0.0.1 through the `redis` crate, one round trip per operation |
//! | `redis_pipe100`  | the same, 100 commands per pipelined round trip                   |
//!
//! The workloads: `get` copies a present key's value into a reused buffer
//! (shmdict `get_into`; Redis `GET` returns an owned `Vec`), except the
//! zero-copy functions (`shmdict_reader`, `shmdict_ref`, `lmdb_txn`), which
//! borrow the value in place and read its first and last bytes (so both
//! ends of it are loaded, as a user of the value would); `insert`
//! overwrites a present key with a value of the same length (the in-process
//! maps overwrite their `Vec` in place, without allocating); `remove_insert`
//! removes a key and inserts it again (criterion's time is per pair).
//!
//! Redis rows need a server: `bash benches/redis.sh` installs and starts one
//! on 127.0.0.1:6399 (`SHMDICT_REDIS_PORT` overrides the port). Without one
//! the bench prints that it skips Redis and runs everything else. The Redis
//! functions run with a shorter measurement (0.5 s warm-up, 2 s, 10 samples)
//! because each round trip takes tens of microseconds.
//!
//! Every segment, table and LMDB directory is removed at the end (also on
//! panic); the Redis keys are deleted. Results: `docs/performance.md`; chart:
//! `cargo bench --bench chart`.

mod common;
mod floor;

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{keys, value, Baseline, Cursor, Segment, KEYS, KEY_LEN};
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use dashmap::DashMap;
use floor::Floor;
use heed::types::Bytes;
use heed::{CommitOrAbort, Database, EnvFlags, EnvOpenOptions};

/// Commands per pipelined Redis round trip.
const PIPELINE: usize = 100;

/// An LMDB environment in a fresh directory under /dev/shm, removed on drop.
struct LmdbEnv {
    env: heed::Env,
    dir: PathBuf,
}

impl LmdbEnv {
    fn create(label: &str, value_len: usize) -> heed::Result<LmdbEnv> {
        let dir = PathBuf::from(format!(
            "/dev/shm/shmdict-bench-{}-lmdb-{label}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir)?;
        let mut options = EnvOpenOptions::new();
        // Room for several copies of the data: LMDB's copy-on-write B-tree
        // keeps freed pages until no reader can see them.
        options.map_size((8 * KEYS * (value_len + 64)).max(256 << 20));
        // SAFETY: NO_SYNC only gives up durability across a crash, which a
        // benchmark on /dev/shm does not have anyway; WRITE_MAP is safe as no
        // other code writes through the map.
        unsafe { options.flags(EnvFlags::NO_SYNC | EnvFlags::WRITE_MAP) };
        // SAFETY: the directory is new and private to this process, and this
        // process opens it once.
        let env = unsafe { options.open(&dir) }?;
        Ok(LmdbEnv { env, dir })
    }

    /// The unnamed database, created if needed.
    fn database(&self) -> heed::Result<Lmdb<'_>> {
        let txn = self.env.write_txn()?;
        let db = self
            .env
            .create_databases_and_commit(txn, |opener, txn| {
                opener
                    .create_database::<Bytes, Bytes>(txn, None)
                    .map(CommitOrAbort::<_, ()>::Commit)
            })?
            .unwrap_commit();
        Ok(Lmdb { env: &self.env, db })
    }
}

impl Drop for LmdbEnv {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The database of an `LmdbEnv`, one transaction per operation.
struct Lmdb<'e> {
    env: &'e heed::Env,
    db: Database<'e, Bytes, Bytes>,
}

impl Lmdb<'_> {
    fn put(&self, key: &[u8], value: &[u8]) {
        let mut txn = self.env.write_txn().unwrap();
        self.db.put(&mut txn, key, value).unwrap();
        txn.commit().unwrap();
    }

    fn delete(&self, key: &[u8]) -> bool {
        let mut txn = self.env.write_txn().unwrap();
        let found = self.db.delete(&mut txn, key).unwrap();
        txn.commit().unwrap();
        found
    }

    fn get_into(&self, key: &[u8], buf: &mut Vec<u8>) -> bool {
        let txn = self.env.read_txn().unwrap();
        match self.db.get(&txn, key).unwrap() {
            Some(v) => {
                buf.clear();
                buf.extend_from_slice(v);
                true
            }
            None => false,
        }
    }

    /// A read transaction to reuse for many reads (`lmdb_txn`).
    fn read_txn(&self) -> heed::RoTxn<'_, heed::WithTls> {
        self.env.read_txn().unwrap()
    }

    /// The value of `key` under `txn`, borrowed from LMDB's map.
    fn get_in<'t>(&self, txn: &'t heed::RoTxn<'_>, key: &[u8]) -> Option<&'t [u8]> {
        self.db.get(txn, key).unwrap()
    }

    fn len(&self) -> u64 {
        let txn = self.env.read_txn().unwrap();
        self.db.len(&txn).unwrap()
    }
}

/// A connection to the benchmark's Redis server, if one answers.
struct Redis {
    con: redis::Connection,
}

impl Redis {
    fn connect() -> Option<Redis> {
        let port = std::env::var("SHMDICT_REDIS_PORT").unwrap_or_else(|_| "6399".into());
        let url = format!("redis://127.0.0.1:{port}/");
        let attempt = redis::Client::open(url.as_str()).and_then(|client| {
            let mut con = client.get_connection_with_timeout(Duration::from_millis(500))?;
            redis::cmd("PING").query::<String>(&mut con)?;
            Ok(con)
        });
        match attempt {
            Ok(con) => Some(Redis { con }),
            Err(e) => {
                println!(
                    "\n*** Redis is ABSENT: no server answers on 127.0.0.1:{port} ({e}).\n\
                     *** Skipping the `redis` and `redis_pipe100` rows; \
                     run `bash benches/redis.sh` to install and start one.\n"
                );
                None
            }
        }
    }

    /// Sets every key to its value, in pipelines of 1,000.
    fn populate(&mut self, keys: &[[u8; KEY_LEN]], value_len: usize) {
        for (n, chunk) in keys.chunks(1000).enumerate() {
            let mut p = redis::pipe();
            for (i, k) in chunk.iter().enumerate() {
                p.cmd("SET")
                    .arg(&k[..])
                    .arg(value(value_len, n * 1000 + i))
                    .ignore();
            }
            p.query::<()>(&mut self.con).expect("populate Redis");
        }
    }

    fn delete_all(&mut self, keys: &[[u8; KEY_LEN]]) {
        for chunk in keys.chunks(1000) {
            let mut p = redis::pipe();
            for k in chunk {
                p.cmd("DEL").arg(&k[..]).ignore();
            }
            let _ = p.query::<()>(&mut self.con);
        }
    }
}

/// Times `iters` operations issued `PIPELINE` commands per round trip;
/// `add` appends the commands of one operation (`per_op` commands).
fn pipelined(
    con: &mut redis::Connection,
    cur: &mut Cursor<'_>,
    iters: u64,
    per_op: usize,
    mut add: impl FnMut(&mut redis::Pipeline, &[u8]),
) -> Duration {
    let ops_per_trip = (PIPELINE / per_op) as u64;
    let mut p = redis::pipe();
    let start = Instant::now();
    let mut left = iters;
    while left > 0 {
        let n = left.min(ops_per_trip);
        p.clear();
        for _ in 0..n {
            add(&mut p, cur.next_key());
        }
        black_box(p.query::<redis::Value>(con).expect("Redis pipeline"));
        left -= n;
    }
    start.elapsed()
}

/// Everything measured at one value size, filled with the same keys.
struct Peers<'e> {
    seg: Segment,
    base: Baseline,
    dash: DashMap<Vec<u8>, Vec<u8>>,
    lmdb: Lmdb<'e>,
    floor: Option<Floor>,
}

impl<'e> Peers<'e> {
    fn new(lmdb: Lmdb<'e>, label: &str, value_len: usize, inserted: &[[u8; KEY_LEN]]) -> Peers<'e> {
        let seg = Segment::create(&format!("peers-{label}"), value_len);
        let base = seg.populate(inserted, value_len);
        let dash = DashMap::with_capacity(KEYS);
        let floor = (value_len == floor::VALUE_LEN).then(|| {
            let name = format!("shmdict-bench-{}-floor-{label}", std::process::id());
            Floor::create(&name, 2 * KEYS).expect("create the floor table")
        });
        for (i, k) in inserted.iter().enumerate() {
            let v = value(value_len, i);
            dash.insert(k.to_vec(), v.clone());
            lmdb.put(k, &v);
            if let Some(f) = &floor {
                f.insert(k, v.as_slice().try_into().expect("64 bytes"));
            }
        }
        Peers {
            seg,
            base,
            dash,
            lmdb,
            floor,
        }
    }
}

fn group<'c>(c: &'c mut Criterion, workload: &str, label: &str) -> BenchmarkGroup<'c, WallTime> {
    let mut g = c.benchmark_group(format!("peers_{workload}/{label}"));
    g.throughput(Throughput::Elements(if workload == "remove_insert" {
        2
    } else {
        1
    }));
    g
}

/// Shorter runs for the Redis functions, whose round trips take tens of
/// microseconds each.
fn redis_timing(g: &mut BenchmarkGroup<'_, WallTime>) {
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(10);
}

/// What the zero-copy reads do with a borrowed value: load its first and
/// last bytes (both ends of it), so the value's memory is really read.
#[inline(always)]
fn touch(v: &[u8]) -> u8 {
    black_box(v[0].wrapping_add(v[v.len() - 1]))
}

fn bench_get(
    c: &mut Criterion,
    label: &str,
    p: &Peers,
    redis: Option<&mut Redis>,
    visited: &[[u8; KEY_LEN]],
) {
    let value_len = p.base.read().unwrap().values().next().map_or(0, Vec::len);
    let mut g = group(c, "get", label);
    let d = p.seg.dict();
    g.bench_function("shmdict", |b| {
        let (mut cur, mut buf) = (Cursor::new(visited), Vec::with_capacity(value_len));
        b.iter(|| {
            assert!(d.get_into(cur.next_key(), &mut buf).unwrap());
            black_box(buf.as_slice());
        })
    });
    g.bench_function("shmdict_reader", |b| {
        let mut cur = Cursor::new(visited);
        let reader = d.reader().unwrap();
        b.iter(|| touch(reader.get(cur.next_key()).unwrap().expect("present")))
    });
    g.bench_function("shmdict_ref", |b| {
        let mut cur = Cursor::new(visited);
        b.iter(|| touch(&d.get_ref(cur.next_key()).unwrap().expect("present")))
    });
    g.bench_function("rwlock_hashmap", |b| {
        let (mut cur, mut buf) = (Cursor::new(visited), Vec::with_capacity(value_len));
        b.iter(|| {
            let k = cur.next_key();
            let map = p.base.read().unwrap();
            let v = map.get(&k[..]).expect("present");
            buf.clear();
            buf.extend_from_slice(v);
            drop(map);
            black_box(buf.as_slice());
        })
    });
    g.bench_function("dashmap", |b| {
        let (mut cur, mut buf) = (Cursor::new(visited), Vec::with_capacity(value_len));
        b.iter(|| {
            let k = cur.next_key();
            let v = p.dash.get(&k[..]).expect("present");
            buf.clear();
            buf.extend_from_slice(&v);
            drop(v);
            black_box(buf.as_slice());
        })
    });
    g.bench_function("lmdb", |b| {
        let (mut cur, mut buf) = (Cursor::new(visited), Vec::with_capacity(value_len));
        b.iter(|| {
            assert!(p.lmdb.get_into(cur.next_key(), &mut buf));
            black_box(buf.as_slice());
        })
    });
    g.bench_function("lmdb_txn", |b| {
        let mut cur = Cursor::new(visited);
        let txn = p.lmdb.read_txn();
        b.iter(|| touch(p.lmdb.get_in(&txn, cur.next_key()).expect("present")))
    });
    if let Some(f) = &p.floor {
        g.bench_function("seqlock_floor", |b| {
            let (mut cur, mut buf) = (Cursor::new(visited), [0u8; floor::VALUE_LEN]);
            b.iter(|| {
                assert!(f.get_into(cur.next_key(), &mut buf));
                black_box(&buf);
            })
        });
    }
    if let Some(r) = redis {
        redis_timing(&mut g);
        g.bench_function("redis", |b| {
            let mut cur = Cursor::new(visited);
            b.iter(|| {
                let v: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(&cur.next_key()[..])
                    .query(&mut r.con)
                    .unwrap();
                black_box(v.expect("present"));
            })
        });
        g.bench_function("redis_pipe100", |b| {
            let mut cur = Cursor::new(visited);
            b.iter_custom(|iters| {
                pipelined(&mut r.con, &mut cur, iters, 1, |p, k| {
                    p.cmd("GET").arg(k);
                })
            })
        });
    }
    g.finish();
}

fn bench_insert(
    c: &mut Criterion,
    label: &str,
    p: &Peers,
    redis: Option<&mut Redis>,
    visited: &[[u8; KEY_LEN]],
    new_value: &[u8],
) {
    let mut g = group(c, "insert", label);
    let d = p.seg.dict();
    g.bench_function("shmdict", |b| {
        let mut cur = Cursor::new(visited);
        b.iter(|| d.insert(cur.next_key(), new_value).unwrap())
    });
    g.bench_function("rwlock_hashmap", |b| {
        let mut cur = Cursor::new(visited);
        b.iter(|| {
            let k = cur.next_key();
            let mut map = p.base.write().unwrap();
            let v = map.get_mut(&k[..]).expect("present");
            v.clear();
            v.extend_from_slice(new_value);
        })
    });
    g.bench_function("dashmap", |b| {
        let mut cur = Cursor::new(visited);
        b.iter(|| {
            let k = cur.next_key();
            let mut v = p.dash.get_mut(&k[..]).expect("present");
            v.clear();
            v.extend_from_slice(new_value);
        })
    });
    g.bench_function("lmdb", |b| {
        let mut cur = Cursor::new(visited);
        b.iter(|| p.lmdb.put(cur.next_key(), new_value))
    });
    if let Some(f) = &p.floor {
        let v: &[u8; floor::VALUE_LEN] = new_value.try_into().expect("64 bytes");
        g.bench_function("seqlock_floor", |b| {
            let mut cur = Cursor::new(visited);
            b.iter(|| f.insert(cur.next_key(), v))
        });
    }
    if let Some(r) = redis {
        redis_timing(&mut g);
        g.bench_function("redis", |b| {
            let mut cur = Cursor::new(visited);
            b.iter(|| {
                redis::cmd("SET")
                    .arg(&cur.next_key()[..])
                    .arg(new_value)
                    .query::<()>(&mut r.con)
                    .unwrap()
            })
        });
        g.bench_function("redis_pipe100", |b| {
            let mut cur = Cursor::new(visited);
            b.iter_custom(|iters| {
                pipelined(&mut r.con, &mut cur, iters, 1, |p, k| {
                    p.cmd("SET").arg(k).arg(new_value);
                })
            })
        });
    }
    g.finish();
}

fn bench_remove_insert(
    c: &mut Criterion,
    label: &str,
    p: &Peers,
    redis: Option<&mut Redis>,
    visited: &[[u8; KEY_LEN]],
    new_value: &[u8],
) {
    let mut g = group(c, "remove_insert", label);
    let d = p.seg.dict();
    g.bench_function("shmdict", |b| {
        let mut cur = Cursor::new(visited);
        b.iter(|| {
            let k = cur.next_key();
            assert!(d.remove(k).unwrap());
            d.insert(k, new_value).unwrap();
        })
    });
    g.bench_function("rwlock_hashmap", |b| {
        let mut cur = Cursor::new(visited);
        b.iter(|| {
            let k = cur.next_key();
            black_box(p.base.write().unwrap().remove(&k[..]).expect("present"));
            p.base
                .write()
                .unwrap()
                .insert(k.to_vec(), new_value.to_vec());
        })
    });
    g.bench_function("dashmap", |b| {
        let mut cur = Cursor::new(visited);
        b.iter(|| {
            let k = cur.next_key();
            black_box(p.dash.remove(&k[..]).expect("present"));
            p.dash.insert(k.to_vec(), new_value.to_vec());
        })
    });
    g.bench_function("lmdb", |b| {
        let mut cur = Cursor::new(visited);
        b.iter(|| {
            let k = cur.next_key();
            assert!(p.lmdb.delete(k));
            p.lmdb.put(k, new_value);
        })
    });
    if let Some(f) = &p.floor {
        let v: &[u8; floor::VALUE_LEN] = new_value.try_into().expect("64 bytes");
        g.bench_function("seqlock_floor", |b| {
            let mut cur = Cursor::new(visited);
            b.iter(|| {
                let k = cur.next_key();
                assert!(f.remove(k));
                f.insert(k, v);
            })
        });
    }
    if let Some(r) = redis {
        redis_timing(&mut g);
        g.bench_function("redis", |b| {
            let mut cur = Cursor::new(visited);
            b.iter(|| {
                let k = &cur.next_key()[..];
                let n: u64 = redis::cmd("DEL").arg(k).query(&mut r.con).unwrap();
                assert_eq!(n, 1);
                redis::cmd("SET")
                    .arg(k)
                    .arg(new_value)
                    .query::<()>(&mut r.con)
                    .unwrap();
            })
        });
        g.bench_function("redis_pipe100", |b| {
            let mut cur = Cursor::new(visited);
            b.iter_custom(|iters| {
                pipelined(&mut r.con, &mut cur, iters, 2, |p, k| {
                    p.cmd("DEL").arg(k);
                    p.cmd("SET").arg(k).arg(new_value);
                })
            })
        });
    }
    g.finish();
}

fn bench_size(c: &mut Criterion, label: &str, value_len: usize, redis: &mut Option<Redis>) {
    let (inserted, visited) = keys();
    let lmdb = LmdbEnv::create(label, value_len).expect("create the LMDB environment");
    let db = lmdb.database().expect("create the LMDB database");
    let peers = Peers::new(db, label, value_len, &inserted);
    if let Some(r) = redis.as_mut() {
        r.populate(&inserted, value_len);
    }
    let new_value = value(value_len, 7);

    bench_get(c, label, &peers, redis.as_mut(), &visited);
    bench_insert(c, label, &peers, redis.as_mut(), &visited, &new_value);
    bench_remove_insert(c, label, &peers, redis.as_mut(), &visited, &new_value);

    // Every workload leaves every key present, with a value of this size.
    assert_eq!(peers.seg.dict().len(), KEYS);
    assert_eq!(peers.base.read().unwrap().len(), KEYS);
    assert_eq!(peers.dash.len(), KEYS);
    assert_eq!(peers.lmdb.len(), KEYS as u64);
    if let Some(r) = redis.as_mut() {
        r.delete_all(&inserted);
    }
}

fn benches(c: &mut Criterion) {
    let mut redis = Redis::connect();
    bench_size(c, "64B", 64, &mut redis);
    bench_size(c, "1KiB", 1024, &mut redis);
}

criterion_group! {
    name = peers;
    config = common::config();
    targets = benches
}
criterion_main!(peers);
