//! `RedisDict` against raw redis-rs on the same private Redis server, and
//! the same workload through `Box<dyn Dict>` on shared memory (what one
//! machine buys), in one run (feature `redis`):
//!
//! | group    | `redis_dict`                         | `raw_redis`                                  | `shm_dyn`               |
//! |----------|--------------------------------------|----------------------------------------------|-------------------------|
//! | `get`    | `Dict::get` (HGET)                   | `GET`                                        | `Dict::get` on `shm:`   |
//! | `insert` | `Dict::insert` (HSET + EXISTS of the waiters' flag, pipelined) | `SET`                  | `Dict::insert` on `shm:` |
//! | `update` | `Dict::update` +1 (HGET, then a CAS script) | `WATCH`, `GET`, `MULTI` `SET` `EXEC` (+1) | `Dict::update` on `shm:` |
//!
//! 1,000 keys of 16 bytes, values of 64 bytes, one client, loopback. The
//! benchmark starts its own `redis-server` (persistence off) on a free
//! loopback port and kills it at the end. Results: `docs/performance.md`.

#[path = "../tests/redis_server/mod.rs"]
mod redis_server;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shmdict::{Dict, RedisDict};

const KEYS: usize = 1000;

fn key(i: usize) -> Vec<u8> {
    format!("bench-key-{i:06}").into_bytes()
}

fn incr(v: Option<&[u8]>) -> Option<Vec<u8>> {
    let mut out = v.map_or_else(|| vec![0u8; 64], <[u8]>::to_vec);
    let n = u64::from_le_bytes(out[..8].try_into().unwrap_or([0; 8])) + 1;
    out[..8].copy_from_slice(&n.to_le_bytes());
    Some(out)
}

fn benches(c: &mut Criterion) {
    let server = redis_server::RedisServer::start();
    let rd = RedisDict::open(&server.url(), "bench").expect("open RedisDict");
    let client = redis::Client::open(format!("{}/", server.url())).expect("client");
    let mut raw = client.get_connection().expect("raw connection");
    let shm_name = format!("shmdict-bench-backends-{}", std::process::id());
    let shm = shmdict::connect(&format!("shm:{shm_name}")).expect("shm");
    struct Unlink(String);
    impl Drop for Unlink {
        fn drop(&mut self) {
            let _ = shmdict::ShmDict::unlink(&self.0);
        }
    }
    let _unlink = Unlink(shm_name);
    let value = vec![7u8; 64];
    for i in 0..KEYS {
        rd.insert(&key(i), &value).expect("populate");
        shm.insert(&key(i), &value).expect("populate");
        redis::cmd("SET")
            .arg(key(i))
            .arg(&value)
            .query::<()>(&mut raw)
            .expect("populate");
    }

    let mut g = c.benchmark_group("get");
    g.throughput(Throughput::Elements(1));
    let mut i = 0;
    g.bench_function("redis_dict", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(rd.get(&key(i)).expect("get"))
        })
    });
    g.bench_function("raw_redis", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(
                redis::cmd("GET")
                    .arg(key(i))
                    .query::<Option<Vec<u8>>>(&mut raw)
                    .expect("GET"),
            )
        })
    });
    g.bench_function("shm_dyn", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(shm.get(&key(i)).expect("get"))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("insert");
    g.throughput(Throughput::Elements(1));
    g.bench_function("redis_dict", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            rd.insert(&key(i), &value).expect("insert")
        })
    });
    g.bench_function("raw_redis", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            redis::cmd("SET")
                .arg(key(i))
                .arg(&value)
                .query::<()>(&mut raw)
                .expect("SET")
        })
    });
    g.bench_function("shm_dyn", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            shm.insert(&key(i), &value).expect("insert")
        })
    });
    g.finish();

    let mut g = c.benchmark_group("update");
    g.throughput(Throughput::Elements(1));
    g.bench_function("redis_dict", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(rd.update(&key(i), &mut incr).expect("update"))
        })
    });
    g.bench_function("raw_redis_watch_multi", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            let k = key(i);
            loop {
                redis::cmd("WATCH")
                    .arg(&k)
                    .query::<()>(&mut raw)
                    .expect("WATCH");
                let cur: Option<Vec<u8>> = redis::cmd("GET").arg(&k).query(&mut raw).expect("GET");
                let new = incr(cur.as_deref()).unwrap_or_default();
                let r: Option<()> = redis::pipe()
                    .atomic()
                    .cmd("SET")
                    .arg(&k)
                    .arg(&new)
                    .ignore()
                    .query(&mut raw)
                    .expect("MULTI/EXEC");
                if r.is_some() {
                    break;
                }
            }
        })
    });
    g.bench_function("shm_dyn", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(shm.update(&key(i), &mut incr).expect("update"))
        })
    });
    g.finish();
    drop(server);
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
}

criterion_group! {
    name = backends;
    config = config();
    targets = benches
}
criterion_main!(backends);
