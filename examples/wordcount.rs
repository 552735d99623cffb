//! Word counting with a process pool, as in sharedmem's README: the
//! parallelism is per line, workers count words in their lines, and the
//! parent reduces the counts as they arrive.
//!
//! ```sh
//! cargo run --release --example wordcount            # counts this file
//! cargo run --release --example wordcount -- FILE    # counts FILE
//! ```
//!
//! Two ways to combine the counts, checked against each other and against
//! a sequential count:
//!
//! - `reduce` in the parent: each line's counts come back (encoded with
//!   postcard) and are added to a local map, like sharedmem's `reduce`;
//! - a shared dictionary: workers also add their counts to counters in a
//!   `ShmDict` with the atomic typed `update`, which never loses an
//!   increment however many processes run it at once.
//!
//! The text (the items) is captured by the forked workers, never
//! serialized; the dictionary is opened again by name in each worker
//! (`map_init`), since a handle must not cross a fork.

use std::collections::BTreeMap;
use std::error::Error;

use shmdict::pool::Pool;
use shmdict::ShmDict;

/// The words counted (sharedmem counts 'sharedmem' and 'pool').
const WORDS: [&str; 4] = ["sharedmem", "pool", "the", "worker"];

fn count(line: &str) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for word in line
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let word = word.to_lowercase();
        if WORDS.contains(&word.as_str()) {
            *counts.entry(word).or_insert(0) += 1;
        }
    }
    counts
}

/// Unlinks the dictionary when dropped.
struct Unlink(String);

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = ShmDict::unlink(&self.0);
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let text = match std::env::args().nth(1) {
        Some(path) => std::fs::read_to_string(path)?,
        None => include_str!("wordcount.rs").to_owned(),
    };
    let lines: Vec<&str> = text.lines().collect();

    let name = Unlink(format!("shmdict-wordcount-{}", std::process::id()));
    let shared = ShmDict::options().capacity(1024).open(&name.0)?;

    let pool = Pool::default();
    let mut reduced: BTreeMap<String, u64> = BTreeMap::new();
    pool.map_init(
        lines.iter().copied(),
        |_worker| ShmDict::open(&name.0).expect("open the dictionary in the worker"),
        |dict, _worker, line| {
            let counts = count(line);
            for (word, n) in &counts {
                dict.typed::<u64>()
                    .update(word, |old| Some(old.unwrap_or(0) + n))
                    .expect("update a shared counter");
            }
            counts
        },
        |_index, counts| {
            for (word, n) in counts {
                *reduced.entry(word).or_insert(0) += n;
            }
        },
    )?;

    // Ground truth from a sequential count.
    let mut sequential: BTreeMap<String, u64> = BTreeMap::new();
    for line in &lines {
        for (word, n) in count(line) {
            *sequential.entry(word).or_insert(0) += n;
        }
    }
    let mut in_dict = BTreeMap::new();
    for word in WORDS {
        if let Some(n) = shared.typed::<u64>().get(word)? {
            in_dict.insert(word.to_owned(), n);
        }
    }

    println!("{} lines, {} worker processes", lines.len(), pool.workers());
    for word in WORDS {
        println!(
            "  {word:<10} reduce: {:>3}   shared dict: {:>3}   sequential: {:>3}",
            reduced.get(word).unwrap_or(&0),
            in_dict.get(word).unwrap_or(&0),
            sequential.get(word).unwrap_or(&0)
        );
    }
    if reduced != sequential || in_dict != sequential {
        return Err("the parallel counts differ from the sequential count".into());
    }
    println!("ok: parallel counts match the sequential count");
    Ok(())
}
