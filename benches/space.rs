//! The tuple space across processes.
//!
//! `cargo bench --bench space` runs two criterion groups; this executable
//! re-executes itself (`argv[1] == "--space-child"`) for the other
//! processes, which open the space by name:
//!
//! | group              | benchmark                  | what one iteration is |
//! |--------------------|----------------------------|-----------------------|
//! | `space_round_trip` | `pipe_baseline`            | 1 byte to a child over a pipe and back: the kernel's round trip, the baseline |
//! |                    | `out_take_same_process`    | `out(("ping", i))` then `take(("ping", _))` in one process: the operations alone, nobody sleeps |
//! |                    | `out_take_two_processes`   | `out(("ping", i))`; an echo process sleeping in `take` wakes, takes it and posts `("pong", i)`; we `take(("pong", _))` |
//! | `space_throughput` | `<P>p<C>c_shared`          | one tuple moved from one of P producer processes to one of C consumer processes, all on first field `"job"` (one bucket) |
//! |                    | `2p2c_per_pair`            | the same with two pairs, each on its own first field (two buckets) |
//!
//! Throughput runs use `iter_custom`: for a batch of `n` tuples the parent
//! tells each producer how many to post (a `("go", p, count)` tuple), waits
//! for every producer's `("posted", p)`, posts one `("job", -1)` stop tuple
//! per consumer behind the jobs (a bucket is FIFO), and takes every
//! consumer's `("done", c)`. The time from the first `go` to the last
//! `done` is the batch's time; criterion reports tuples per second. A batch
//! is always 2,000 tuples per producer (the time is scaled to criterion's
//! iteration count), so the handshake is a small fixed overhead and the
//! backlog of a bucket stays bounded.
//!
//! Children stop when their standard input closes (the parent's guard
//! closes it, kills and reaps them); segments are unlinked at the end.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use shmdict::space::{FieldKind, Space};
use shmdict::{pattern, tuple, ShmDict};

const CHILD_FLAG: &str = "--space-child";
const LONG: Duration = Duration::from_secs(60);
/// Tuples a producer posts per timed batch.
const BATCH: i64 = 2000;

/// A child process of this executable; killed and reaped on drop.
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Option<ChildStdout>,
}

impl Proc {
    fn spawn(args: &[&str]) -> Proc {
        let mut child = Command::new(std::env::current_exe().expect("current_exe"))
            .arg(CHILD_FLAG)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        Proc {
            child,
            stdin,
            stdout,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A space with a unique name, unlinked on drop.
struct Named(String, Space);

impl Named {
    fn new(tag: &str) -> Named {
        let name = format!("shmdict-bench-space-{tag}-{}", std::process::id());
        let _ = ShmDict::unlink(&name);
        let dict = ShmDict::options()
            .capacity(1 << 12)
            .arena_bytes(256 << 20)
            .create_new(true)
            .open(&name)
            .expect("create space");
        Named(name, Space::from_dict(dict))
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        let _ = ShmDict::unlink(&self.0);
    }
}

/// Child roles. Each leaves when a `take` gives up after [`LONG`], or is
/// killed by the parent's guard.
fn child(args: &[String]) {
    match args[0].as_str() {
        "pipe-echo" => {
            let (mut i, mut o) = (std::io::stdin(), std::io::stdout());
            let mut b = [0u8; 1];
            while i.read_exact(&mut b).is_ok() {
                if o.write_all(&b).and_then(|_| o.flush()).is_err() {
                    break;
                }
            }
        }
        "echo" => {
            let s = Space::open(&args[1]).expect("open");
            let ping = pattern!("ping", FieldKind::I64);
            while let Some(t) = s.take(&ping, LONG).expect("take") {
                s.out(tuple!("pong", t.i64(1).unwrap_or(0))).expect("out");
            }
        }
        "producer" => {
            let s = Space::open(&args[1]).expect("open");
            let (me, first): (i64, &str) = (args[2].parse().expect("id"), &args[3]);
            while let Some(go) = s.take(&pattern!("go", me, _), LONG).expect("take") {
                for i in 0..go.i64(2).unwrap_or(0) {
                    s.out(tuple!(first, i)).expect("out");
                }
                s.out(tuple!("posted", me)).expect("out");
            }
        }
        "consumer" => {
            let s = Space::open(&args[1]).expect("open");
            let (me, first): (i64, &str) = (args[2].parse().expect("id"), &args[3]);
            let job = pattern!(first, FieldKind::I64);
            while let Some(t) = s.take(&job, LONG).expect("take") {
                if t.i64(1) == Some(-1) {
                    s.out(tuple!("done", me)).expect("out");
                }
            }
        }
        other => panic!("unknown role {other}"),
    }
}

fn round_trip(c: &mut Criterion) {
    let mut g = c.benchmark_group("space_round_trip");
    g.throughput(Throughput::Elements(1));

    let mut pipe = Proc::spawn(&["pipe-echo"]);
    let (mut w, mut r) = (pipe.stdin.take().unwrap(), pipe.stdout.take().unwrap());
    g.bench_function("pipe_baseline", |b| {
        let mut buf = [7u8; 1];
        b.iter(|| {
            w.write_all(&buf).unwrap();
            w.flush().unwrap();
            r.read_exact(&mut buf).unwrap();
        })
    });
    drop(pipe);

    let space = Named::new("rt");
    let s = &space.1;
    let ping = pattern!("ping", FieldKind::I64);
    let pong = pattern!("pong", FieldKind::I64);
    g.bench_function("out_take_same_process", |b| {
        let mut i = 0i64;
        b.iter(|| {
            i += 1;
            s.out(tuple!("ping", i)).unwrap();
            s.take(&ping, LONG).unwrap().unwrap()
        })
    });
    let _echo = Proc::spawn(&["echo", space.0.as_str()]);
    g.bench_function("out_take_two_processes", |b| {
        let mut i = 0i64;
        b.iter(|| {
            i += 1;
            s.out(tuple!("ping", i)).unwrap();
            s.take(&pong, LONG).unwrap().unwrap()
        })
    });
    g.finish();
}

/// Moves tuples from `producers` to `consumers` processes; `firsts[k]` is
/// the first field used by producer and consumer `k % firsts.len()`.
fn throughput_case(
    c: &mut Criterion,
    label: &str,
    producers: i64,
    consumers: i64,
    firsts: &[&str],
) {
    let space = Named::new(label);
    let s = &space.1;
    let _procs: Vec<Proc> = (0..producers)
        .map(|p| {
            let first = firsts[p as usize % firsts.len()];
            Proc::spawn(&["producer", space.0.as_str(), p.to_string().as_str(), first])
        })
        .chain((0..consumers).map(|k| {
            let first = firsts[k as usize % firsts.len()];
            Proc::spawn(&["consumer", space.0.as_str(), k.to_string().as_str(), first])
        }))
        .collect();
    let mut g = c.benchmark_group("space_throughput");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    g.bench_function(label, |b| {
        b.iter_custom(|n| {
            // Always BATCH tuples per producer (the time is scaled to `n`):
            // the go/posted/done handshake stays a small fixed overhead,
            // and the backlog a bucket can accumulate is bounded.
            let per = BATCH;
            let start = Instant::now();
            for p in 0..producers {
                s.out(tuple!("go", p, per)).unwrap();
            }
            for p in 0..producers {
                s.take(&pattern!("posted", p), LONG)
                    .unwrap()
                    .expect("producer");
            }
            for k in 0..consumers {
                let first = firsts[k as usize % firsts.len()];
                s.out(tuple!(first, -1)).unwrap();
            }
            // Any consumer may take several stop tuples (and post several
            // `done`s): count them, whoever posted them.
            for _ in 0..consumers {
                s.take(&pattern!("done", _), LONG)
                    .unwrap()
                    .expect("consumer");
            }
            // Per tuple moved: scale to the n criterion asked for.
            start.elapsed().mul_f64(n as f64 / (per * producers) as f64)
        })
    });
    g.finish();
}

fn throughput(c: &mut Criterion) {
    throughput_case(c, "1p1c_shared", 1, 1, &["job"]);
    throughput_case(c, "2p2c_shared", 2, 2, &["job"]);
    throughput_case(c, "2p2c_per_pair", 2, 2, &["job-a", "job-b"]);
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(CHILD_FLAG) {
        child(&argv[2..]);
        return;
    }
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
        .configure_from_args();
    round_trip(&mut c);
    throughput(&mut c);
    c.final_summary();
}
