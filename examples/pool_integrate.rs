//! Rectangle-rule integration with a process pool, as in sharedmem's
//! README: workers fill chunks of one shared array in place, add their
//! partial sums to a shared total inside a `critical` section, and return
//! them to the parent's `reduce`.
//!
//! ```sh
//! cargo run --release --example pool_integrate            # 2^24 rectangles
//! cargo run --release --example pool_integrate -- 1000000 # any count
//! ```
//!
//! The integral of 4 / (1 + x^2) over [0, 1] is pi. Three totals are
//! compared, as in the reference: the direct sum of the shared array
//! `xdx`, the total `shmsum` accumulated in critical sections, and the sum
//! of the partial sums collected by `reduce`. (`examples/integrate.rs` does
//! the same with re-executed worker processes and no pool.)

use std::error::Error;
use std::time::Instant;

use shmdict::pool::Pool;
use shmdict::Array;

/// Rectangles per work item (sharedmem's `chunksize`).
const CHUNK: usize = 1 << 20;

fn f(x: f64) -> f64 {
    4.0 / (1.0 + x * x)
}

/// Unlinks the arrays when dropped.
struct Names {
    xdx: String,
    shmsum: String,
}

impl Drop for Names {
    fn drop(&mut self) {
        let _ = Array::<f64>::unlink(&self.xdx);
        let _ = Array::<f64>::unlink(&self.shmsum);
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let n: usize = match std::env::args().nth(1) {
        Some(s) => s
            .parse()
            .map_err(|_| format!("not a rectangle count: {s}"))?,
        None => 1 << 24,
    };
    if n == 0 {
        return Err("at least one rectangle".into());
    }
    let names = Names {
        xdx: format!("shmdict-pool-integrate-xdx-{}", std::process::id()),
        shmsum: format!("shmdict-pool-integrate-sum-{}", std::process::id()),
    };
    let xdx = Array::<f64>::options()
        .create_new(true)
        .open(&names.xdx, n)?;
    let shmsum = Array::<f64>::options()
        .create_new(true)
        .open(&names.shmsum, 1)?;

    let pool = Pool::default();
    let started = Instant::now();
    let mut partial_sums = Vec::new();
    pool.map_init(
        (0..n).step_by(CHUNK),
        // Each worker opens the arrays once, by name.
        |_worker| {
            let xdx = Array::<f64>::open(&names.xdx, n).expect("open xdx");
            let shmsum = Array::<f64>::open(&names.shmsum, 1).expect("open shmsum");
            (xdx, shmsum)
        },
        |(xdx, shmsum), worker, start| {
            let end = (start + CHUNK).min(n);
            let dx = 1.0 / n as f64;
            // My slice of the shared array, written in place.
            let mut chunk = xdx.range_mut(start..end).expect("claim the chunk");
            for (j, y) in chunk.iter_mut().enumerate() {
                *y = f(((start + j) as f64 + 0.5) * dx) * dx;
            }
            let a: f64 = chunk.iter().sum();
            drop(chunk);
            // get + set is not atomic: the critical section makes it so.
            worker.critical(|| shmsum.set(0, shmsum.get(0) + a));
            a
        },
        |_index, a: f64| partial_sums.push(a),
    )?;
    let elapsed = started.elapsed();

    let direct: f64 = xdx.read().iter().sum();
    let critical = shmsum.get(0);
    let reduced: f64 = partial_sums.iter().sum();
    let pi = std::f64::consts::PI;
    let nf = n as f64;
    // Midpoint rule error bound plus rounding (see examples/integrate.rs).
    let tolerance = 1.0 / (3.0 * nf * nf) + 4.0 * nf * f64::EPSILON;
    println!(
        "{n} rectangles in {} items, {} worker processes, {:.1} ms",
        partial_sums.len(),
        pool.workers(),
        elapsed.as_secs_f64() * 1e3
    );
    println!("  direct sum of xdx       = {direct:.15}");
    println!("  critical-section total  = {critical:.15}");
    println!("  sum of partial sums     = {reduced:.15}");
    println!("  pi                      = {pi:.15}");
    let agree = 16.0 * nf * f64::EPSILON;
    for (what, x) in [
        ("critical-section total", critical),
        ("sum of partial sums", reduced),
    ] {
        if (x - direct).abs() > agree {
            return Err(format!("{what} {x} differs from the direct sum {direct}").into());
        }
    }
    if (direct - pi).abs() > tolerance {
        return Err(format!("{direct} is not pi within {tolerance:e}").into());
    }
    drop((xdx, shmsum));
    drop(names);
    println!("ok: the three totals agree and equal pi; segments unlinked");
    Ok(())
}
