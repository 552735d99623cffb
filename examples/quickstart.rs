//! Several processes share one dictionary by name.
//!
//! ```sh
//! cargo run --release --example quickstart
//! ```
//!
//! The parent creates a uniquely named dictionary, writes the job's settings
//! into it, and starts `WORKERS` copies of this same program as worker
//! processes (`quickstart worker <i> <name>`). Each worker opens the
//! dictionary by name and sleeps in `wait_for("go")` until the parent says
//! go; then it counts the words of its share of a generated text, bumps
//! shared counters with atomic `update`s (one per word and one per line, all
//! processes hitting the same keys at once), and publishes a report under its
//! own key. The parent sleeps in `wait_for` on each report key (no polling:
//! the write wakes it), reads everything back, checks that no increment was
//! lost, prints a summary and unlinks the dictionary (also when something
//! fails).

use std::collections::HashMap;
use std::error::Error;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shmdict::ShmDict;

type Result<T, E = Box<dyn Error>> = std::result::Result<T, E>;

/// Worker processes to start.
const WORKERS: usize = 4;
/// Lines of generated text; worker `i` takes the lines `n` with `n % WORKERS == i`.
const LINES: u64 = 200_000;
/// The text's vocabulary: earlier words are more frequent.
const VOCABULARY: [&str; 16] = [
    "the", "of", "and", "to", "memory", "shared", "process", "key", "value", "lock", "free",
    "page", "segment", "reader", "writer", "atomic",
];

/// What the parent tells the workers, stored under `"config"`.
#[derive(Serialize, Deserialize, Debug)]
struct Config {
    workers: u64,
    lines: u64,
}

/// What each worker publishes under `"result/<i>"`.
#[derive(Serialize, Deserialize, Debug)]
struct Report {
    pid: u32,
    lines: u64,
    words: u64,
    updates: u64,
    micros: u64,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        None => parent(),
        Some("worker") if args.len() == 4 => worker(args[2].parse()?, &args[3]),
        _ => Err(format!("usage: {} [worker <index> <dictionary>]", args[0]).into()),
    }
}

/// The words of line `n`: a deterministic pseudo-random sentence, so the
/// parent can check the workers' totals without sharing the text.
fn line(n: u64) -> impl Iterator<Item = &'static str> {
    // SplitMix64 seeded with the line number.
    let mut state = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let words = 1 + next() % 12;
    (0..words).map(move |_| {
        let (a, b) = (next() % 16, next() % 16);
        VOCABULARY[a.min(b) as usize]
    })
}

fn parent() -> Result<()> {
    let name = format!("shmdict-quickstart-{}", std::process::id());
    let dict = ShmDict::options()
        .capacity(1024)
        .arena_bytes(1 << 20)
        .create_new(true)
        .open(&name)?;
    let result = run(&dict);
    drop(dict);
    // Unlink on every path; the workers have all exited by now.
    let unlinked = ShmDict::unlink(&name);
    result?;
    unlinked?;
    println!("ok: no increment lost; dictionary '{name}' unlinked");
    Ok(())
}

/// Worker processes that are killed and reaped if the parent bails out early,
/// so none outlives the dictionary's unlink.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn run(dict: &ShmDict) -> Result<()> {
    let config = Config {
        workers: WORKERS as u64,
        lines: LINES,
    };
    dict.typed::<Config>().insert("config", &config)?;

    let started = Instant::now();
    let exe = std::env::current_exe()?;
    let mut workers = Workers(Vec::new());
    for i in 0..WORKERS {
        let child = Command::new(&exe)
            .args(["worker", &i.to_string(), dict.name()])
            .spawn()?;
        workers.0.push(child);
    }
    println!(
        "shmdict quickstart: {WORKERS} worker processes share the dictionary '{}'",
        dict.name()
    );
    // The workers sleep in `wait_for("go")` until this insert wakes them.
    dict.insert("go", b"")?;
    // Sleep until each report is published: `wait_for` returns as soon as
    // the key exists. A worker that fails exits without a report, so check
    // the children between waits.
    let reports = dict.typed::<Report>();
    let mut arrived = Vec::new();
    for i in 0..WORKERS {
        let key = format!("result/{i}");
        loop {
            if dict.wait_for(&key, Duration::from_millis(500))?.is_some() {
                arrived.push(started.elapsed());
                break;
            }
            if let Some(status) = workers.0[i].try_wait()? {
                if dict.contains_key(&key)? {
                    continue;
                }
                return Err(format!("worker {i} exited ({status}) without a report").into());
            }
        }
    }
    let elapsed = started.elapsed();
    for (i, child) in workers.0.iter_mut().enumerate() {
        let status = child.wait()?;
        if !status.success() {
            return Err(format!("worker {i} failed: {status}").into());
        }
    }
    workers.0.clear();

    // What the counters must say: count the same text here.
    let mut expected: HashMap<&str, u64> = HashMap::new();
    for n in 0..LINES {
        for w in line(n) {
            *expected.entry(w).or_default() += 1;
        }
    }
    let expected_words: u64 = expected.values().sum();

    let mut updates = 0;
    for (i, seen_after) in arrived.iter().enumerate() {
        let r = reports
            .get(format!("result/{i}"))?
            .ok_or_else(|| format!("worker {i} published no result"))?;
        println!(
            "  worker {i} (pid {:>6}): {:>5} lines, {:>6} words, {:>6} atomic updates in {}; report seen after {}",
            r.pid,
            r.lines,
            r.words,
            r.updates,
            ms(Duration::from_micros(r.micros)),
            ms(*seen_after)
        );
        updates += r.updates;
    }

    let counters = dict.typed::<u64>();
    let lines = counters.get("lines")?.unwrap_or(0);
    let mut words = 0;
    let mut top = Vec::new();
    for (w, &want) in &expected {
        let got = counters.get(format!("word/{w}"))?.unwrap_or(0);
        if got != want {
            return Err(format!("counter 'word/{w}' is {got}, expected {want}").into());
        }
        words += got;
        top.push((got, *w));
    }
    top.sort_unstable_by(|a, b| b.cmp(a));
    let top: Vec<String> = top
        .iter()
        .take(5)
        .map(|(n, w)| format!("{w} {n}"))
        .collect();

    println!(
        "shared counters: lines = {lines} (expected {LINES}), words = {words} (expected {expected_words})"
    );
    println!("most frequent:   {}", top.join(", "));
    println!(
        "{updates} updates by {WORKERS} processes in {} (including process start-up); {} keys in the dictionary",
        ms(elapsed),
        dict.len()
    );
    if lines != LINES || words != expected_words {
        return Err("lost increments".into());
    }
    Ok(())
}

fn worker(index: u64, name: &str) -> Result<()> {
    let dict = ShmDict::open(name)?;
    let Some(config) = dict.typed::<Config>().get("config")? else {
        // Not started by the parent: `open` has just created an empty
        // dictionary; do not leave it behind.
        drop(dict);
        ShmDict::unlink(name)?;
        return Err(format!("'{name}' is not a quickstart dictionary").into());
    };
    // Sleep until the parent says go (a start barrier without polling).
    dict.wait_for("go", Duration::from_secs(60))?
        .ok_or("the parent never said go")?;
    let started = Instant::now();
    let counters = dict.typed::<u64>();
    let bump = |key: &str| counters.update(key, |n| Some(n.unwrap_or(0) + 1));
    let mut report = Report {
        pid: std::process::id(),
        lines: 0,
        words: 0,
        updates: 0,
        micros: 0,
    };
    let mut key = String::new();
    for n in (index..config.lines).step_by(config.workers as usize) {
        for w in line(n) {
            key.clear();
            key.push_str("word/");
            key.push_str(w);
            bump(&key)?;
            report.words += 1;
            report.updates += 1;
        }
        bump("lines")?;
        report.lines += 1;
        report.updates += 1;
    }
    report.micros = started.elapsed().as_micros() as u64;
    dict.typed::<Report>()
        .insert(format!("result/{index}"), &report)?;
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}
