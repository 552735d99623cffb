//! Growth while attached (issue 12): what it costs a writer and a reader.
//!
//! `cargo bench --bench growth` runs three parts; a first argument runs
//! only the parts whose name contains it (`cargo bench --bench growth --
//! growth_latency`), and is also criterion's filter:
//!
//! | part             | what it measures | harness |
//! |------------------|------------------|---------|
//! | `growth_insert`  | 1,000,000 distinct keys (8-16 bytes, values of 16-64 bytes) inserted into a fresh dictionary created with `capacity(1000)` and growing (`from_1000`: default arena; `from_1000_arena_64k`: a 64 KiB arena as well), against one created with `capacity(1_000_000)` (`presized`) | criterion, `iter_custom`, 10 flat samples of one fill each |
//! | `growth_latency` | the latency of a reader *process* reading 1,000 pre-inserted keys in a loop while a writer *process* inserts 1,000,000 new keys into a dictionary created with `capacity(1000)` (`growth`: ten doublings) or with room for them all (`no_growth`) | its own: reads timed in batches of 16 with `Instant`, p50/p99/p99.9 printed |
//! | `growth_pause`   | the writer's pause: the one insert that doubles a full index of 10,000, 100,000 and 1,000,000 keys | its own: each insert timed with `Instant`, p50/max printed |
//!
//! `growth_insert`: each iteration creates a fresh segment, times only the
//! inserts (creation is lazy, microseconds), then unlinks it. Every insert
//! must succeed (`Full` panics: growth is on). Besides criterion's report, a
//! table gives the median of every timed fill (warm-up fills included) and
//! the ratio `from_1000 / presized` (target: at most 1.5x).
//!
//! `growth_latency`: the parent creates the dictionary and inserts the 1,000
//! keys the reader reads, then starts copies of this executable as the
//! reader and the writer, each of which opens the dictionary by name. The
//! reader touches its keys once and says `ready`; the parent says `go` to the
//! reader, then to the writer, and `stop` to the reader as soon as the writer
//! reports that its inserts are done (so the reader's samples cover the
//! writer's run, give or take a pipe round trip). The reader visits its keys
//! in a fixed shuffled order and times each batch of 16 reads (one read is
//! about 100 ns, near the clock's resolution and cost): `get_into` into a
//! reused buffer, or (`reader_get`) one `reader()` per batch and 16
//! `Reader::get`s; each read checks that the key is present with its value's
//! length. Scenarios are interleaved (`no_growth` then `growth`, each read
//! mode, `SHMDICT_GROWTH_REPS` rounds, default 3); the table gives the median
//! over rounds of each percentile and the ratio of the p99s (target: growth
//! at most 2x no growth).
//!
//! `growth_pause`: a dictionary created with `capacity(N)` is filled one
//! insert at a time, each timed, until `capacity()` changes: the insert that
//! changed it did the doubling. Fresh segments, 20/10/5 repetitions for
//! N = 10k/100k/1M (`SHMDICT_GROWTH_PAUSE_REPS` overrides all three).
//!
//! Knobs: `SHMDICT_GROWTH_SECS` (criterion measurement time per function,
//! default 10 s: about one fill per sample), `SHMDICT_GROWTH_REPS`,
//! `SHMDICT_GROWTH_LAT_KEYS` (keys the writer inserts, default 1,000,000),
//! `SHMDICT_GROWTH_PAUSE_REPS`. The whole bench takes about a minute on a
//! quiet machine (two when other work shares the cores).
//! Children are killed and reaped if the parent fails, and stop on their own
//! if it dies (their standard input closes). Segments are unlinked at the
//! end, also on panic. Results: `docs/performance.md`, "Growth (issue 12)".

mod common;

use std::collections::HashMap;
use std::hint::black_box;
use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::SplitMix;
use criterion::{Criterion, SamplingMode, Throughput};
use shmdict::{Options, ShmDict};

/// Environment variable that makes the executable a child; its value is
/// the role, `reader` or `writer`.
const ROLE: &str = "SHMDICT_GROWTH_ROLE";
/// Keys inserted by `growth_insert`.
const FILL: usize = 1_000_000;
/// The initial capacity of a growing dictionary, and the keys the latency
/// reader reads.
const SMALL: usize = 1000;
/// Reads timed together in `growth_latency`.
const BATCH: usize = 16;

fn env_or<T: std::str::FromStr>(var: &str, default: T) -> T {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Keys and values number `start..start + n`, in one buffer: key `i` is
/// 8 to 16 bytes (its first 8 a bijection of `i`, so keys are distinct
/// across every range), its value 16 to 64 bytes.
struct Items {
    bytes: Vec<u8>,
    /// Offset of the key, key length, value length.
    spans: Vec<(u32, u8, u8)>,
}

impl Items {
    fn new(start: usize, n: usize) -> Items {
        let mut bytes = Vec::with_capacity(n * 54);
        let mut spans = Vec::with_capacity(n);
        for i in start..start + n {
            // SplitMix's step is a bijection of its state: distinct `i`,
            // distinct first 8 bytes.
            let head = SplitMix(i as u64).next();
            let tail = SplitMix(head ^ 0x6a09_e667_f3bc_c908).next();
            let key_len = 8 + (tail % 9) as usize;
            let value_len = 16 + ((tail >> 8) % 49) as usize;
            spans.push((bytes.len() as u32, key_len as u8, value_len as u8));
            bytes.extend_from_slice(&head.to_le_bytes());
            bytes.extend((8..key_len).map(|j| (tail >> (j * 3)) as u8));
            bytes.extend((0..value_len).map(|j| (i + j) as u8));
        }
        Items { bytes, spans }
    }

    fn len(&self) -> usize {
        self.spans.len()
    }

    /// Key and value `i` (counted from the range's start).
    #[inline]
    fn get(&self, i: usize) -> (&[u8], &[u8]) {
        let (off, k, v) = self.spans[i];
        let (off, k, v) = (off as usize, k as usize, v as usize);
        (&self.bytes[off..off + k], &self.bytes[off + k..off + k + v])
    }
}

/// A segment name unlinked when dropped (also on panic).
struct Unlink(String);

impl Unlink {
    fn new(label: &str) -> Unlink {
        let name = format!("shmdict-bench-{}-growth-{label}", std::process::id());
        let _ = ShmDict::unlink(&name);
        Unlink(name)
    }
}

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = ShmDict::unlink(&self.0);
    }
}

/// Inserts `items[range]`, panicking on any error (growth is on: `Full`
/// would mean it failed).
fn insert_all(d: &ShmDict, items: &Items, range: std::ops::Range<usize>) {
    for i in range {
        let (k, v) = items.get(i);
        if let Err(e) = d.insert(k, v) {
            panic!(
                "insert {i} of {} into {} (capacity {}): {e}",
                items.len(),
                d.name(),
                d.capacity()
            );
        }
    }
}

/// The `q` quantile of sorted samples.
fn quantile<T: Copy>(sorted: &[T], q: f64) -> T {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

// ---------------------------------------------------------------------------
// growth_insert

/// How a `growth_insert` dictionary is created.
fn insert_options(case: &str) -> Options {
    let o = ShmDict::options().create_new(true);
    match case {
        "presized" => o.capacity(FILL),
        "from_1000" => o.capacity(SMALL),
        "from_1000_arena_64k" => o.capacity(SMALL).arena_bytes(64 << 10),
        _ => unreachable!("unknown case {case}"),
    }
}

/// One fill of a fresh segment; returns the time the inserts took.
fn fill_once(case: &str, items: &Items) -> Duration {
    let name = Unlink::new(case);
    let d = insert_options(case)
        .open(&name.0)
        .expect("create the benchmark segment");
    let t = Instant::now();
    insert_all(&d, items, 0..items.len());
    let took = t.elapsed();
    assert_eq!(d.len(), items.len(), "{case}: every key is in");
    let generation = d.stats().generation;
    if case == "presized" {
        assert_eq!(generation, 0, "{case}: no growth");
    } else {
        assert!(generation >= 10, "{case}: ten doublings, not {generation}");
    }
    drop(d);
    took
}

fn bench_insert(c: &mut Criterion, items: &Items) {
    let cases = ["presized", "from_1000", "from_1000_arena_64k"];
    let log: Mutex<HashMap<&str, Vec<f64>>> = Mutex::new(HashMap::new());
    let mut g = c.benchmark_group("growth_insert");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs_f64(env_or("SHMDICT_GROWTH_SECS", 10.0)))
        .throughput(Throughput::Elements(FILL as u64));
    for case in cases {
        g.bench_function(case, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let took = fill_once(case, items);
                    log.lock()
                        .unwrap()
                        .entry(case)
                        .or_default()
                        .push(took.as_secs_f64());
                    total += took;
                }
                total
            })
        });
    }
    g.finish();

    let mut log = log.into_inner().unwrap();
    if log.is_empty() {
        return; // Filtered out.
    }
    let mut medians = HashMap::new();
    println!();
    println!(
        "growth_insert: {FILL} keys into a fresh dictionary, every timed fill (warm-up included):"
    );
    println!();
    println!("| case | fills | median s | min s | max s | ns per insert | vs presized |");
    println!("|---|---|---|---|---|---|---|");
    for case in cases {
        let Some(runs) = log.get_mut(case) else {
            continue;
        };
        let m = median(runs);
        medians.insert(case, m);
        let ratio = medians
            .get("presized")
            .map_or("-".to_string(), |p| format!("{:.2}x", m / p));
        println!(
            "| {case} | {} | {m:.3} | {:.3} | {:.3} | {:.0} | {ratio} |",
            runs.len(),
            runs[0],
            runs[runs.len() - 1],
            m * 1e9 / FILL as f64,
        );
    }
    println!();
}

// ---------------------------------------------------------------------------
// growth_latency

/// The child's side, from the environment.
fn child(role: &str) {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is set for a child"));
    let d = ShmDict::options()
        .create(false)
        .open(&var("SHMDICT_GROWTH_NAME"))
        .expect("open the segment");
    let mut out = std::io::stdout();
    let mut stdin = BufReader::new(std::io::stdin());
    let mut line = String::new();
    match role {
        "writer" => {
            let start: usize = var("SHMDICT_GROWTH_START").parse().unwrap();
            let n: usize = var("SHMDICT_GROWTH_COUNT").parse().unwrap();
            let items = Items::new(start, n);
            writeln!(out, "ready").unwrap();
            out.flush().unwrap();
            stdin.read_line(&mut line).unwrap();
            if line.trim() != "go" {
                return; // The parent went away.
            }
            let cap0 = d.capacity();
            let t = Instant::now();
            insert_all(&d, &items, 0..n);
            let secs = t.elapsed().as_secs_f64();
            writeln!(
                out,
                "result secs={secs} capacity_before={cap0} capacity_after={} generation={}",
                d.capacity(),
                d.stats().generation
            )
            .unwrap();
        }
        "reader" => {
            let get_into = var("SHMDICT_GROWTH_MODE") == "get_into";
            let items = Items::new(0, SMALL);
            // A fixed shuffled visiting order.
            let mut order: Vec<usize> = (0..items.len()).collect();
            let mut rng = SplitMix(0x5eed);
            for i in (1..order.len()).rev() {
                order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
            }
            let keys: Vec<(&[u8], usize)> = order
                .iter()
                .map(|&i| {
                    let (k, v) = items.get(i);
                    (k, v.len())
                })
                .collect();
            let mut buf = Vec::with_capacity(64);
            let mut pos = 0;
            let mut batch = |pos: &mut usize| {
                if get_into {
                    for _ in 0..BATCH {
                        let (k, len) = keys[*pos];
                        *pos = (*pos + 1) % keys.len();
                        let found = d.get_into(k, &mut buf).expect("get_into");
                        assert!(found && buf.len() == len, "key {k:?} present");
                        black_box(buf.as_slice());
                    }
                } else {
                    let r = d.reader().expect("reader");
                    for _ in 0..BATCH {
                        let (k, len) = keys[*pos];
                        *pos = (*pos + 1) % keys.len();
                        let v = r.get(k).expect("get").expect("key present");
                        assert_eq!(v.len(), len, "key {k:?}");
                        black_box(v);
                    }
                }
            };
            // Touch every key (page faults are not what is measured).
            for _ in 0..keys.len().div_ceil(BATCH) {
                batch(&mut pos);
            }
            writeln!(out, "ready").unwrap();
            out.flush().unwrap();
            stdin.read_line(&mut line).unwrap();
            if line.trim() != "go" {
                return;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let watcher = {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    // `stop`, or the end of input if the parent died.
                    let _ = stdin.read_line(&mut String::new());
                    // Relaxed: a flag polled between batches; nothing is
                    // published with it.
                    stop.store(true, Ordering::Relaxed);
                })
            };
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 22);
            // Relaxed: see the store.
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                batch(&mut pos);
                lat.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
            }
            watcher.join().unwrap();
            // The cost of timing nothing, for reference.
            let mut empty: Vec<u32> = (0..100_000)
                .map(|_| {
                    let t = Instant::now();
                    t.elapsed().as_nanos() as u32
                })
                .collect();
            empty.sort_unstable();
            lat.sort_unstable();
            writeln!(
                out,
                "result batches={} p50={} p99={} p999={} max={} timer={}",
                lat.len(),
                quantile(&lat, 0.50),
                quantile(&lat, 0.99),
                quantile(&lat, 0.999),
                lat[lat.len() - 1],
                quantile(&empty, 0.5),
            )
            .unwrap();
        }
        _ => panic!("unknown role {role}"),
    }
    out.flush().unwrap();
}

/// A child process, killed and reaped when dropped.
struct Kid {
    proc: std::process::Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    what: String,
}

impl Kid {
    fn spawn(role: &str, env: &[(&str, String)]) -> Kid {
        let mut cmd = Command::new(std::env::current_exe().expect("own executable"));
        cmd.env(ROLE, role);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut proc = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a child process");
        let stdin = proc.stdin.take();
        let stdout = BufReader::new(proc.stdout.take().expect("piped stdout"));
        Kid {
            proc,
            stdin,
            stdout,
            what: role.to_string(),
        }
    }

    /// The next line the child prints; panics if it exited instead.
    fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .expect("read a child's output");
        assert!(n > 0, "the {} process exited early", self.what);
        line.trim().to_string()
    }

    fn say(&mut self, what: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{what}").expect("write to a child");
        stdin.flush().expect("write to a child");
    }

    /// Reads the child's result line, parsed into `key=value` pairs, and
    /// reaps it.
    fn result(mut self) -> Fields {
        let line = self.line();
        drop(self.stdin.take());
        let status = self.proc.wait().expect("reap a child");
        assert!(
            status.success(),
            "the {} process failed: {status}",
            self.what
        );
        let fields = line.strip_prefix("result ").expect("a result line");
        fields
            .split_whitespace()
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("key=value");
                (k.to_string(), v.parse().expect("a number"))
            })
            .collect()
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        // Harmless after `result` has reaped the child.
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

/// A child's result line: `key=value` pairs.
type Fields = HashMap<String, f64>;
/// One reader-and-writer run: the reader's and the writer's results.
type Run = (Fields, Fields);

fn latency_once(mode: &str, grow: bool, new_keys: usize) -> Run {
    let name = Unlink::new("latency");
    let capacity = if grow { SMALL } else { SMALL + new_keys };
    let d = ShmDict::options()
        .capacity(capacity)
        .create_new(true)
        .open(&name.0)
        .expect("create the benchmark segment");
    insert_all(&d, &Items::new(0, SMALL), 0..SMALL);
    let env = |extra: &[(&'static str, String)]| {
        let mut v = vec![("SHMDICT_GROWTH_NAME", name.0.clone())];
        v.extend_from_slice(extra);
        v
    };
    let mut reader = Kid::spawn("reader", &env(&[("SHMDICT_GROWTH_MODE", mode.into())]));
    let mut writer = Kid::spawn(
        "writer",
        &env(&[
            ("SHMDICT_GROWTH_START", SMALL.to_string()),
            ("SHMDICT_GROWTH_COUNT", new_keys.to_string()),
        ]),
    );
    for kid in [&mut reader, &mut writer] {
        let line = kid.line();
        assert_eq!(line, "ready", "{} says {line}", kid.what);
    }
    reader.say("go");
    writer.say("go");
    let w = writer.result();
    reader.say("stop");
    let r = reader.result();
    assert_eq!(d.len(), SMALL + new_keys, "every key is in");
    if grow {
        assert!(w["capacity_after"] > w["capacity_before"], "the index grew");
    } else {
        assert_eq!(w["capacity_after"], w["capacity_before"], "no growth");
    }
    (r, w)
}

fn bench_latency() {
    let reps: usize = env_or("SHMDICT_GROWTH_REPS", 3).max(1);
    let new_keys: usize = env_or("SHMDICT_GROWTH_LAT_KEYS", FILL);
    let modes = ["get_into", "reader_get"];
    // (mode, grow) -> each round's reader and writer results.
    let mut runs: HashMap<(&str, bool), Vec<Run>> = HashMap::new();
    for round in 0..reps {
        for mode in modes {
            for grow in [false, true] {
                let (r, w) = latency_once(mode, grow, new_keys);
                eprintln!(
                    "growth_latency: round {round} {mode} {}: batch p50/p99/p999/max \
                     {}/{}/{}/{} ns over {} batches; writer {:.3} s, capacity {} -> {} \
                     (generation {})",
                    if grow { "growth" } else { "no_growth" },
                    r["p50"],
                    r["p99"],
                    r["p999"],
                    r["max"],
                    r["batches"],
                    w["secs"],
                    w["capacity_before"],
                    w["capacity_after"],
                    w["generation"],
                );
                runs.entry((mode, grow)).or_default().push((r, w));
            }
        }
    }
    let med =
        |runs: &[Run], f: &dyn Fn(&Run) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
    println!();
    println!(
        "growth_latency: a reader process reads {SMALL} keys in batches of {BATCH} while a \
         writer process inserts {new_keys} new keys; median over {reps} rounds \
         (ns per batch of {BATCH} reads):"
    );
    println!();
    println!("| read | case | p50 | p99 | p99.9 | max | batches | writer s | p99 vs no_growth |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut timer = 0.0f64;
    for mode in modes {
        let base = med(&runs[&(mode, false)], &|x| x.0["p99"]);
        for grow in [false, true] {
            let rs = &runs[&(mode, grow)];
            let p99 = med(rs, &|x| x.0["p99"]);
            timer = timer.max(med(rs, &|x| x.0["timer"]));
            println!(
                "| {mode} | {} | {:.0} | {p99:.0} | {:.0} | {:.0} | {:.0} | {:.3} | {:.2}x |",
                if grow { "growth" } else { "no_growth" },
                med(rs, &|x| x.0["p50"]),
                med(rs, &|x| x.0["p999"]),
                med(rs, &|x| x.0["max"]),
                med(rs, &|x| x.0["batches"]),
                med(rs, &|x| x.1["secs"]),
                p99 / base,
            );
        }
    }
    println!();
    println!("Each batch's time includes two clock reads (median cost of timing nothing: {timer:.0} ns).");
    println!();
}

// ---------------------------------------------------------------------------
// growth_pause

/// Fills a fresh dictionary of capacity `n` until an insert changes its
/// capacity; returns that insert's time, the median of the others, and the
/// number of keys before it.
fn pause_once(n: usize, items: &Items) -> (Duration, Duration, usize) {
    let name = Unlink::new("pause");
    let d = ShmDict::options()
        .capacity(n)
        .create_new(true)
        .open(&name.0)
        .expect("create the benchmark segment");
    let cap0 = d.capacity();
    let mut times = Vec::with_capacity(n + n / 4);
    for i in 0..items.len() {
        let (k, v) = items.get(i);
        let t = Instant::now();
        let res = d.insert(k, v);
        let took = t.elapsed();
        if let Err(e) = res {
            panic!("insert {i} into a dictionary of capacity {cap0}: {e}");
        }
        if d.capacity() != cap0 {
            times.sort_unstable();
            return (took, times[times.len() / 2], i);
        }
        times.push(took);
    }
    panic!(
        "{} inserts into a dictionary of capacity {cap0} did not grow it",
        items.len()
    );
}

fn bench_pause() {
    let sizes = [(10_000, 20), (100_000, 10), (1_000_000, 5)];
    let items = Items::new(0, 2 * sizes[sizes.len() - 1].0 + 1000);
    println!();
    println!("growth_pause: the insert that doubles a full index, fresh dictionary each time:");
    println!();
    println!(
        "| capacity | keys before | runs | pause p50 ms | pause max ms | other inserts p50 ns |"
    );
    println!("|---|---|---|---|---|---|");
    for (n, reps) in sizes {
        let reps: usize = env_or("SHMDICT_GROWTH_PAUSE_REPS", reps).max(1);
        let runs: Vec<_> = (0..reps).map(|_| pause_once(n, &items)).collect();
        let mut pauses: Vec<Duration> = runs.iter().map(|r| r.0).collect();
        pauses.sort_unstable();
        let mut others: Vec<f64> = runs.iter().map(|r| r.1.as_nanos() as f64).collect();
        eprintln!("growth_pause: capacity {n}: pauses {pauses:?}");
        println!(
            "| {n} | {} | {reps} | {:.2} | {:.2} | {:.0} |",
            runs[0].2,
            quantile(&pauses, 0.5).as_secs_f64() * 1e3,
            pauses[pauses.len() - 1].as_secs_f64() * 1e3,
            median(&mut others),
        );
    }
    println!();
}

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        child(&role);
        return;
    }
    // `cargo bench` passes `--bench`; the first other argument filters.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let want = |part: &str| filter.as_deref().is_none_or(|f| part.contains(f));

    // Criterion's own filter picks among `growth_insert/*`.
    let mut c = common::config().configure_from_args();
    if want("growth_insert") || !(want("growth_latency") || want("growth_pause")) {
        let items = Items::new(0, FILL);
        bench_insert(&mut c, &items);
    }
    if want("growth_latency") {
        bench_latency();
    }
    if want("growth_pause") {
        bench_pause();
    }
    c.final_summary();
}
