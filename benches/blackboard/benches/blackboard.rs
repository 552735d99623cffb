//! shmdict beside iceoryx2's blackboard, the strongest zero-copy
//! shared-memory peer in Rust whose model fits a dictionary: a fixed set of
//! keys, declared when the blackboard is created, one writer.
//!
//! ```sh
//! cargo bench --manifest-path benches/blackboard/Cargo.toml   # about 6 min, 3 of them setup
//! ```
//!
//! The same 100,000 keys of 16 bytes and values of 64 bytes and 1 KiB as
//! `benches/peers.rs` (`benches/common`), visited in the same shuffled
//! order, in groups `blackboard_{get,insert}/{64B,1KiB}`:
//!
//! | function              | what it is                                                       |
//! |-----------------------|------------------------------------------------------------------|
//! | `iceoryx2_blackboard` | `get`: `EntryHandle::get()` (a copy of the value) on a handle made in advance for each key; `insert`: `EntryHandleMut::update_with_copy` on the writer's handle |
//! | `shmdict_reader`      | `get` only: `Reader::get` under one long-lived `Reader`, zero-copy |
//! | `shmdict`             | `get`: `get_into` (a copy); `insert`: an overwrite               |
//! | `seqlock_floor`       | the fixed-slot seqlock table of `benches/floor` (64 B only)      |
//!
//! Reads touch the first and last bytes of the value, as in `peers.rs`.
//!
//! What the blackboard can and cannot do, beside these numbers: its keys
//! are fixed when it is created (no insert of a new key, no removal), each
//! key's value has one `Copy` type of fixed size, and a service has one
//! writer. Reads are copies (`UnrestrictedAtomic`: the writer fills a spare
//! cell and publishes it), not borrows. Looking a key up
//! (`Reader::entry`) scans the key table: at 100,000 keys it took about
//! 200 µs per lookup here, so the benchmark makes one handle per key in
//! advance (about 20 s for 100,000), and creating a blackboard of 100,000
//! keys took about 40 s (each `add` compares with the keys before it). So
//! it is measured only at what it is built for: reading and writing
//! known entries through handles, with no lookup by key at all.
//!
//! Everything is removed at the end: the dictionary segment, the floor's
//! table, and the blackboard's service (when the node is dropped). iceoryx2
//! itself leaves its machine-wide bookkeeping behind, shared by all its
//! processes: a `/dev/shm/iox2_*global_mgmt` file and `/tmp/iceoryx2/`;
//! remove them by hand when no iceoryx2 process runs.

#[path = "../../common/mod.rs"]
mod common;
#[path = "../../floor/mod.rs"]
mod floor;

use std::hint::black_box;

use common::{keys, value, Cursor, Segment, KEYS, KEY_LEN};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use floor::Floor;
use iceoryx2::prelude::*;

/// What the reads do with a value: load its first and last bytes.
#[inline(always)]
fn touch(v: &[u8]) -> u8 {
    black_box(v[0].wrapping_add(v[v.len() - 1]))
}

/// The position of each key in `inserted`, for the visited order.
fn positions(inserted: &[[u8; KEY_LEN]], visited: &[[u8; KEY_LEN]]) -> Vec<usize> {
    let at: std::collections::HashMap<&[u8; KEY_LEN], usize> =
        inserted.iter().enumerate().map(|(i, k)| (k, i)).collect();
    visited.iter().map(|k| at[k]).collect()
}

fn bench_size<const N: usize>(c: &mut Criterion, label: &str) {
    let (inserted, visited) = keys();
    let order = positions(&inserted, &visited);
    let seg = Segment::create(&format!("blackboard-{label}"), N);
    seg.populate(&inserted, N);
    let d = seg.dict();
    let floor = (N == floor::VALUE_LEN).then(|| {
        let name = format!("shmdict-bench-{}-bbfloor-{label}", std::process::id());
        let f = Floor::create(&name, 2 * KEYS).expect("create the floor table");
        for (i, k) in inserted.iter().enumerate() {
            f.insert(k, value(N, i).as_slice().try_into().expect("64 bytes"));
        }
        f
    });

    let node = NodeBuilder::new()
        .create::<ipc::Service>()
        .expect("an iceoryx2 node");
    let name = format!("shmdict-bench-{}-blackboard-{label}", std::process::id());
    let mut builder = node
        .service_builder(&name.as_str().try_into().expect("a service name"))
        .blackboard_creator::<[u8; KEY_LEN]>();
    for (i, k) in inserted.iter().enumerate() {
        let v: [u8; N] = value(N, i).try_into().expect("N bytes");
        builder = builder.add::<[u8; N]>(*k, v);
    }
    let service = builder.create().expect("create the blackboard");
    let reader = service.reader_builder().create().expect("a reader");
    let writer = service.writer_builder().create().expect("the writer");
    let read_handles: Vec<_> = inserted
        .iter()
        .map(|k| reader.entry::<[u8; N]>(k).expect("an entry handle"))
        .collect();
    let write_handles: Vec<_> = inserted
        .iter()
        .map(|k| writer.entry::<[u8; N]>(k).expect("an entry handle"))
        .collect();

    let mut g = c.benchmark_group(format!("blackboard_get/{label}"));
    g.throughput(Throughput::Elements(1));
    g.bench_function("iceoryx2_blackboard", |b| {
        let mut i = 0;
        b.iter(|| {
            let v = read_handles[order[i]].get();
            i = if i + 1 == order.len() { 0 } else { i + 1 };
            touch(&*v)
        })
    });
    g.bench_function("shmdict_reader", |b| {
        let mut cur = Cursor::new(&visited);
        let r = d.reader().unwrap();
        b.iter(|| touch(r.get(cur.next_key()).unwrap().expect("present")))
    });
    g.bench_function("shmdict", |b| {
        let (mut cur, mut buf) = (Cursor::new(&visited), Vec::with_capacity(N));
        b.iter(|| {
            assert!(d.get_into(cur.next_key(), &mut buf).unwrap());
            touch(&buf)
        })
    });
    if let Some(f) = &floor {
        g.bench_function("seqlock_floor", |b| {
            let (mut cur, mut buf) = (Cursor::new(&visited), [0u8; floor::VALUE_LEN]);
            b.iter(|| {
                assert!(f.get_into(cur.next_key(), &mut buf));
                touch(&buf)
            })
        });
    }
    g.finish();

    let new_value: [u8; N] = value(N, 7).try_into().expect("N bytes");
    let mut g = c.benchmark_group(format!("blackboard_insert/{label}"));
    g.throughput(Throughput::Elements(1));
    g.bench_function("iceoryx2_blackboard", |b| {
        let mut i = 0;
        b.iter(|| {
            write_handles[order[i]].update_with_copy(new_value);
            i = if i + 1 == order.len() { 0 } else { i + 1 };
        })
    });
    g.bench_function("shmdict", |b| {
        let mut cur = Cursor::new(&visited);
        b.iter(|| d.insert(cur.next_key(), new_value).unwrap())
    });
    if let Some(f) = &floor {
        let v: &[u8; floor::VALUE_LEN] = new_value[..].try_into().expect("64 bytes");
        g.bench_function("seqlock_floor", |b| {
            let mut cur = Cursor::new(&visited);
            b.iter(|| f.insert(cur.next_key(), v))
        });
    }
    g.finish();

    // The writes reached the readers of both stores.
    let probe = inserted[12_345];
    assert_eq!(read_handles[12_345].get()[..], new_value[..]);
    assert_eq!(d.get(probe).unwrap().as_deref(), Some(&new_value[..]));
}

fn benches(c: &mut Criterion) {
    bench_size::<64>(c, "64B");
    bench_size::<1024>(c, "1KiB");
}

criterion_group! {
    name = blackboard;
    config = common::config();
    targets = benches
}
criterion_main!(blackboard);
