//! Cross-process workloads: separate processes on one dictionary.
//!
//! `cargo bench --bench xproc` creates a segment with the 100,000 keys of
//! `benches/common` (16-byte keys, 64-byte or 1 KiB values), then starts
//! copies of its own executable as reader and writer processes, each of
//! which opens the segment by name:
//!
//! | scenario        | processes                                                    | reported |
//! |-----------------|--------------------------------------------------------------|----------|
//! | `1_reader`      | one reader alone (the reference)                             | reader throughput, p50/p99/p99.9 latency |
//! | `reader+writer` | one reader, and one writer overwriting the same keys         | reader throughput and latency; writer throughput |
//! | `2_readers`     | two readers at once                                          | aggregate throughput (ideally 2x `1_reader`), each reader's latency |
//!
//! Each runs for shmdict with 64-byte and 1 KiB values and for the
//! fixed-slot seqlock floor of `benches/floor` (64-byte values only).
//!
//! A reader first reads every key once (so that its page faults are not
//! measured) and says `ready`; when every process is ready the parent says
//! `go`. The reader then runs `get_into` over the shuffled keys for a fixed
//! time (3 s, or `SHMDICT_XPROC_SECS`) to measure throughput, then times
//! 1,000,000 more reads one by one with `Instant` for the latency
//! percentiles (the cost of the two clock reads, measured and reported as
//! `timer`, is included). Each scenario runs 3 times (`SHMDICT_XPROC_REPS`)
//! and the run with the median reader throughput is reported. The writer overwrites keys until the parent closes
//! its standard input. Results come back as one line on each child's
//! standard output.
//!
//! Children are killed and reaped if the parent fails (a guard per child),
//! and they stop on their own if the parent dies (their standard input
//! closes). Segments are unlinked at the end, also on panic. Results:
//! `docs/performance.md`.

mod common;
mod floor;

use std::collections::HashMap;
use std::hint::black_box;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::{keys, value, Cursor, Segment, KEYS};
use floor::Floor;
use shmdict::ShmDict;

/// Environment variable that makes the executable a child; its value is
/// the role, `reader` or `writer`.
const ROLE: &str = "SHMDICT_XPROC_ROLE";
/// Reads timed one by one for the percentiles.
const LATENCY_SAMPLES: usize = 1_000_000;

/// What a child opens.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Shmdict,
    Floor,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Shmdict => "shmdict",
            Kind::Floor => "seqlock_floor",
        }
    }

    fn parse(s: &str) -> Kind {
        match s {
            "shmdict" => Kind::Shmdict,
            "seqlock_floor" => Kind::Floor,
            _ => panic!("unknown store {s}"),
        }
    }
}

/// A store opened by name in a child process.
enum Store {
    Shmdict(Box<ShmDict>),
    Floor(Floor),
}

impl Store {
    fn open(kind: Kind, name: &str) -> Store {
        match kind {
            Kind::Shmdict => {
                Store::Shmdict(Box::new(ShmDict::open(name).expect("open the segment")))
            }
            Kind::Floor => Store::Floor(Floor::open(name).expect("open the floor table")),
        }
    }

    #[inline]
    fn read(&self, key: &[u8; 16], buf: &mut Vec<u8>, fixed: &mut [u8; floor::VALUE_LEN]) {
        let found = match self {
            Store::Shmdict(d) => d.get_into(key, buf).expect("get_into"),
            Store::Floor(f) => f.get_into(key, fixed),
        };
        assert!(found, "every key is present");
        black_box((buf.as_slice(), &fixed));
    }

    #[inline]
    fn write(&self, key: &[u8; 16], value: &[u8]) {
        match self {
            Store::Shmdict(d) => d.insert(key, value).expect("insert"),
            Store::Floor(f) => f.insert(key, value.try_into().expect("64-byte values")),
        }
    }
}

/// The child's side: `reader` or `writer`, from the environment.
fn child(role: &str) {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is set for a child"));
    let kind = Kind::parse(&var("SHMDICT_XPROC_KIND"));
    let store = Store::open(kind, &var("SHMDICT_XPROC_NAME"));
    let value_len: usize = var("SHMDICT_XPROC_VALUE").parse().unwrap();
    let start: usize = var("SHMDICT_XPROC_START").parse().unwrap();
    let secs: f64 = var("SHMDICT_XPROC_SECS").parse().unwrap();
    let (_, visited) = keys();
    let mut cur = Cursor::starting_at(&visited, start);
    let (mut buf, mut fixed) = (Vec::with_capacity(value_len), [0u8; floor::VALUE_LEN]);

    // Touch every key once so that page faults on the new mapping are not
    // measured, then wait for the parent's `go`.
    for k in &visited {
        store.read(k, &mut buf, &mut fixed);
    }
    let mut out = std::io::stdout();
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    let mut stdin = BufReader::new(std::io::stdin());
    let mut line = String::new();
    stdin.read_line(&mut line).unwrap();
    if line.trim() != "go" {
        return; // The parent went away.
    }

    match role {
        "writer" => {
            // Write until the parent closes our standard input.
            let stop = Arc::new(AtomicBool::new(false));
            let watcher = {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let _ = stdin.read_to_end(&mut Vec::new());
                    stop.store(true, Ordering::Relaxed);
                })
            };
            let new_value = value(value_len, 7);
            let t0 = Instant::now();
            let mut ops = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..256 {
                    store.write(cur.next_key(), &new_value);
                }
                ops += 256;
            }
            let elapsed = t0.elapsed().as_secs_f64();
            watcher.join().unwrap();
            writeln!(out, "result ops={ops} secs={elapsed}").unwrap();
        }
        "reader" => {
            // Throughput: reads for `secs`, the clock checked every 1,024.
            let t0 = Instant::now();
            let mut ops = 0u64;
            loop {
                for _ in 0..1024 {
                    store.read(cur.next_key(), &mut buf, &mut fixed);
                }
                ops += 1024;
                if t0.elapsed().as_secs_f64() >= secs {
                    break;
                }
            }
            let elapsed = t0.elapsed().as_secs_f64();
            // The cost of timing nothing, for reference.
            let mut empty: Vec<u32> = (0..100_000)
                .map(|_| {
                    let t = Instant::now();
                    t.elapsed().as_nanos() as u32
                })
                .collect();
            empty.sort_unstable();
            // Latency: each read timed on its own.
            let mut lat: Vec<u32> = Vec::with_capacity(LATENCY_SAMPLES);
            for _ in 0..LATENCY_SAMPLES {
                let k = cur.next_key();
                let t = Instant::now();
                store.read(k, &mut buf, &mut fixed);
                lat.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
            }
            lat.sort_unstable();
            let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
            writeln!(
                out,
                "result ops={ops} secs={elapsed} p50={} p99={} p999={} max={} timer={}",
                q(0.50),
                q(0.99),
                q(0.999),
                lat[lat.len() - 1],
                empty[empty.len() / 2]
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
    fn spawn(role: &str, kind: Kind, name: &str, value_len: usize, start: usize, secs: f64) -> Kid {
        let mut proc = Command::new(std::env::current_exe().expect("own executable"))
            .env(ROLE, role)
            .env("SHMDICT_XPROC_KIND", kind.as_str())
            .env("SHMDICT_XPROC_NAME", name)
            .env("SHMDICT_XPROC_VALUE", value_len.to_string())
            .env("SHMDICT_XPROC_START", start.to_string())
            .env("SHMDICT_XPROC_SECS", secs.to_string())
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
            what: format!("{role} ({})", kind.as_str()),
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

    /// Closes the child's stdin (a writer stops), returns its result line
    /// parsed into `key=value` pairs, and reaps it.
    fn finish(mut self) -> HashMap<String, f64> {
        drop(self.stdin.take());
        let line = self.line();
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
        // Harmless after `finish` has reaped the child.
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

/// One scenario's figures.
struct Row {
    store: String,
    value: &'static str,
    scenario: &'static str,
    /// Reads per second: the reader's, or the sum over readers.
    reads_per_sec: f64,
    /// Latency percentiles per reader: p50, p99, p99.9, max (ns).
    latency: Vec<[f64; 4]>,
    timer_ns: f64,
    writes_per_sec: Option<f64>,
}

/// Runs `readers` reader processes, beside a writer if `writer`.
fn scenario(
    kind: Kind,
    name: &str,
    value_len: usize,
    readers: usize,
    writer: bool,
    secs: f64,
) -> Row {
    let mut w = writer.then(|| Kid::spawn("writer", kind, name, value_len, KEYS / 2, secs));
    let mut rs: Vec<Kid> = (0..readers)
        .map(|i| Kid::spawn("reader", kind, name, value_len, i * KEYS / 2, secs))
        .collect();
    for kid in w.iter_mut().chain(rs.iter_mut()) {
        let line = kid.line();
        assert_eq!(line, "ready", "{} says {line}", kid.what);
    }
    for kid in w.iter_mut().chain(rs.iter_mut()) {
        kid.say("go");
    }
    let results: Vec<_> = rs.into_iter().map(Kid::finish).collect();
    let writes = w.map(|w| {
        let r = w.finish();
        r["ops"] / r["secs"]
    });
    Row {
        store: kind.as_str().to_string(),
        value: if value_len == 64 { "64B" } else { "1KiB" },
        scenario: match (readers, writer) {
            (1, false) => "1_reader",
            (1, true) => "reader+writer",
            _ => "2_readers",
        },
        reads_per_sec: results.iter().map(|r| r["ops"] / r["secs"]).sum(),
        latency: results
            .iter()
            .map(|r| [r["p50"], r["p99"], r["p999"], r["max"]])
            .collect(),
        timer_ns: results.iter().map(|r| r["timer"]).fold(0.0, f64::max),
        writes_per_sec: writes,
    }
}

/// Runs the three scenarios `reps` times each, keeping for each the run
/// with the median reader throughput.
fn run_all(kind: Kind, name: &str, value_len: usize, secs: f64, reps: usize, rows: &mut Vec<Row>) {
    for (readers, writer) in [(1, false), (1, true), (2, false)] {
        let mut runs: Vec<Row> = (0..reps)
            .map(|_| scenario(kind, name, value_len, readers, writer, secs))
            .collect();
        runs.sort_by(|a, b| a.reads_per_sec.total_cmp(&b.reads_per_sec));
        let all: Vec<String> = runs
            .iter()
            .map(|r| format!("{:.2}", r.reads_per_sec / 1e6))
            .collect();
        let row = runs.swap_remove(reps / 2);
        eprintln!(
            "xproc: {} {} {}: M reads/s per run {} -> median {:.2}",
            row.store,
            row.value,
            row.scenario,
            all.join(", "),
            row.reads_per_sec / 1e6
        );
        rows.push(row);
    }
}

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        child(&role);
        return;
    }
    // `cargo bench` passes `--bench`; this harness has no options.
    let secs: f64 = std::env::var("SHMDICT_XPROC_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let reps: usize = std::env::var("SHMDICT_XPROC_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    let (inserted, _) = keys();
    let mut rows = Vec::new();

    for value_len in [64, 1024] {
        let seg = Segment::create(&format!("xproc-{value_len}"), value_len);
        drop(seg.populate(&inserted, value_len));
        run_all(Kind::Shmdict, seg.name(), value_len, secs, reps, &mut rows);
    }
    {
        let name = format!("shmdict-bench-{}-xproc-floor", std::process::id());
        let table = Floor::create(&name, 2 * KEYS).expect("create the floor table");
        for (i, k) in inserted.iter().enumerate() {
            let v = value(floor::VALUE_LEN, i);
            table.insert(k, v.as_slice().try_into().unwrap());
        }
        run_all(Kind::Floor, &name, floor::VALUE_LEN, secs, reps, &mut rows);
    }

    let one_reader: HashMap<(String, &str), f64> = rows
        .iter()
        .filter(|r| r.scenario == "1_reader")
        .map(|r| ((r.store.clone(), r.value), r.reads_per_sec))
        .collect();
    println!();
    println!(
        "Cross-process reads, {secs} s per throughput run, median of {reps} runs, \
         {LATENCY_SAMPLES} timed reads per reader:"
    );
    println!();
    println!("| store | value | scenario | reads/s (M) | vs 1_reader | reader p50 / p99 / p99.9 ns | writes/s (M) |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        let base = one_reader[&(r.store.clone(), r.value)];
        let lat: Vec<String> = r
            .latency
            .iter()
            .map(|l| format!("{:.0} / {:.0} / {:.0}", l[0], l[1], l[2]))
            .collect();
        println!(
            "| {} | {} | {} | {:.2} | {:.2}x | {} | {} |",
            r.store,
            r.value,
            r.scenario,
            r.reads_per_sec / 1e6,
            r.reads_per_sec / base,
            lat.join("; "),
            r.writes_per_sec
                .map_or("-".to_string(), |w| format!("{:.2}", w / 1e6)),
        );
    }
    let timer = rows.iter().map(|r| r.timer_ns).fold(0.0, f64::max);
    println!();
    println!("Latencies include the two clock reads around each read (median cost of timing nothing: {timer:.0} ns).");
}
