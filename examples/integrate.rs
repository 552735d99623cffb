//! Rectangle-rule integration by worker processes writing one shared array,
//! as in sharedmem's README, with a `critical` section for the running sum.
//!
//! ```sh
//! cargo run --release --example integrate            # 2^24 rectangles
//! cargo run --release --example integrate -- 1000000 # any count
//! ```
//!
//! The integral of 4 / (1 + x^2) over [0, 1] is pi. The parent creates:
//!
//! - `xdx`: an `Array<f64>` of one element per rectangle, `f(x) dx`;
//! - `shmsum`: an `Array<f64>` of one element, the running total, updated
//!   only inside `shmsum.write()`: the guard is the critical section
//!   (sharedmem's `with pool.critical: shmsum[...] += a`);
//! - `partial`: an `Array<f64>` of one partial sum per worker (the values
//!   sharedmem's `reduce` collects);
//! - `lockfree`: a `Value<f64>` that workers add to with `update`, the
//!   lock-free alternative to the critical section.
//!
//! It then starts `WORKERS` copies of this program as worker processes
//! (`integrate worker <i> <rectangles> <prefix>`). Worker `i` claims chunk
//! `i` of `xdx` with `chunk_mut` and fills it in place, at memory speed,
//! without any lock shared with the other workers; then it adds its partial
//! sum to the totals. The parent checks, like the reference, that the direct
//! sum of `xdx`, the critical-section total and the sum of the partial sums
//! agree, and that they equal pi within the rectangle rule's error bound
//! plus rounding. It unlinks every segment on every path.

use std::error::Error;
use std::process::{Child, Command};
use std::time::Instant;

use shmdict::{Array, Value};

type Result<T, E = Box<dyn Error>> = std::result::Result<T, E>;

/// Worker processes to start.
const WORKERS: usize = 4;
/// Default number of rectangles (a 128 MiB array).
const DEFAULT_RECTANGLES: usize = 1 << 24;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        None => parent(DEFAULT_RECTANGLES),
        Some("worker") if args.len() == 5 => worker(args[2].parse()?, args[3].parse()?, &args[4]),
        Some(n) if args.len() == 2 => match n.parse() {
            Ok(n) if n > 0 => parent(n),
            _ => Err(format!("not a rectangle count: {n}").into()),
        },
        _ => Err(format!(
            "usage: {} [rectangles | worker <i> <rectangles> <prefix>]",
            args[0]
        )
        .into()),
    }
}

/// The integrand.
fn f(x: f64) -> f64 {
    4.0 / (1.0 + x * x)
}

/// The segments of one run, unlinked when dropped.
struct Names(String);

impl Names {
    fn xdx(&self) -> String {
        format!("{}-xdx", self.0)
    }
    fn shmsum(&self) -> String {
        format!("{}-shmsum", self.0)
    }
    fn partial(&self) -> String {
        format!("{}-partial", self.0)
    }
    fn lockfree(&self) -> String {
        format!("{}-lockfree", self.0)
    }
}

impl Drop for Names {
    fn drop(&mut self) {
        let _ = Array::<f64>::unlink(&self.xdx());
        let _ = Array::<f64>::unlink(&self.shmsum());
        let _ = Array::<f64>::unlink(&self.partial());
        let _ = Value::<f64>::unlink(&self.lockfree());
    }
}

/// Worker processes, killed and reaped if the parent bails out early.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn parent(n: usize) -> Result<()> {
    let names = Names(format!("shmdict-integrate-{}", std::process::id()));
    let xdx = Array::<f64>::options()
        .create_new(true)
        .open(&names.xdx(), n)?;
    let shmsum = Array::<f64>::options()
        .create_new(true)
        .open(&names.shmsum(), 1)?;
    let partial = Array::<f64>::options()
        .create_new(true)
        .open(&names.partial(), WORKERS)?;
    let lockfree = Value::<f64>::options()
        .create_new(true)
        .open(&names.lockfree(), 0.0)?;
    println!(
        "integrating 4/(1+x^2) over [0, 1] with {n} rectangles ({} MiB shared array) in {WORKERS} worker processes",
        (n * 8) >> 20
    );

    let started = Instant::now();
    let exe = std::env::current_exe()?;
    let mut workers = Workers(Vec::new());
    for i in 0..WORKERS {
        workers.0.push(
            Command::new(&exe)
                .args(["worker", &i.to_string(), &n.to_string(), &names.0])
                .spawn()?,
        );
    }
    for (i, child) in workers.0.iter_mut().enumerate() {
        let status = child.wait()?;
        if !status.success() {
            return Err(format!("worker {i} failed: {status}").into());
        }
    }
    workers.0.clear();
    let elapsed = started.elapsed();

    // 1. The direct sum of xdx, filled by the workers.
    let direct: f64 = xdx.read().iter().sum();
    // 2. The total accumulated in the critical section.
    let critical = shmsum.get(0);
    // 3. The sum of the workers' partial sums.
    let reduced: f64 = partial.read().iter().sum();
    let lock_free = lockfree.load();

    let pi = std::f64::consts::PI;
    // Midpoint rule: |error| <= max|f''| / (24 n^2) = 1 / (3 n^2); plus the
    // rounding of n additions of terms below 4/n.
    let nf = n as f64;
    let tolerance = 1.0 / (3.0 * nf * nf) + 4.0 * nf * f64::EPSILON;
    println!("  direct sum of xdx       = {direct:.15}");
    println!("  critical-section total  = {critical:.15}");
    println!("  sum of partial sums     = {reduced:.15}");
    println!("  lock-free Value total   = {lock_free:.15}");
    println!("  pi                      = {pi:.15}");
    println!(
        "  |error| = {:.2e} (bound {tolerance:.2e}); {WORKERS} workers took {:.1} ms including process start-up",
        (direct - pi).abs(),
        elapsed.as_secs_f64() * 1e3
    );
    // The three totals add the same numbers in different orders.
    let agree = 4.0 * nf * f64::EPSILON * 4.0;
    for (what, x) in [
        ("critical-section total", critical),
        ("sum of partial sums", reduced),
        ("lock-free total", lock_free),
    ] {
        if (x - direct).abs() > agree {
            return Err(format!("{what} {x} differs from the direct sum {direct}").into());
        }
    }
    if (direct - pi).abs() > tolerance {
        return Err(format!("{direct} is not pi within {tolerance:e}").into());
    }
    drop((xdx, shmsum, partial, lockfree));
    drop(names); // unlinks
    println!("ok: the shared array integrates to pi; segments unlinked");
    Ok(())
}

fn worker(i: usize, n: usize, prefix: &str) -> Result<()> {
    let names = std::mem::ManuallyDrop::new(Names(prefix.to_owned())); // the parent unlinks
    let xdx = Array::<f64>::open(&names.xdx(), n)?;
    let shmsum = Array::<f64>::open(&names.shmsum(), 1)?;
    let partial = Array::<f64>::open(&names.partial(), WORKERS)?;
    let lockfree = Value::<f64>::open(&names.lockfree(), 0.0)?;

    // My chunk of the shared array, written in place.
    let mut chunk = xdx.chunk_mut(i, WORKERS)?;
    let dx = 1.0 / n as f64;
    let start = chunk.start();
    for (j, y) in chunk.iter_mut().enumerate() {
        *y = f(((start + j) as f64 + 0.5) * dx) * dx;
    }
    let a: f64 = chunk.iter().sum();
    drop(chunk);

    // The critical section: one process at a time adds to the total.
    {
        let mut total = shmsum.write();
        total[0] += a;
    }
    partial.set(i, a);
    // Or without a lock: an atomic read-modify-write of a Value.
    lockfree.update(|t| t + a);
    Ok(())
}
