//! A process pool: sharedmem's `MapReduce`, done safely for Rust.
//!
//! [`Pool::map`] runs a work function on every item in `n` worker
//! processes and hands each result, with its item's index, to a `reduce`
//! function in the calling process as the results arrive. Worker processes
//! are *forked* from the caller, as sharedmem does: the work function sees
//! everything the caller had (captured variables, the items themselves,
//! configuration) without any of it being serialized. Only results cross
//! between processes, so only the result type needs
//! `Serialize + DeserializeOwned` (encoded with postcard).
//!
//! ```
//! use shmdict::pool::Pool;
//!
//! let words = vec!["apple", "banana", "cherry"]; // captured, never serialized
//! let mut total = 0;
//! Pool::new(2).map(
//!     0..words.len(),
//!     |_worker, i| words[i].len(),          // runs in a worker process
//!     |_index, len: usize| total += len,    // runs here, as results arrive
//! )?;
//! assert_eq!(total, 17);
//! # Ok::<(), shmdict::pool::PoolError>(())
//! ```
//!
//! Inside a work function, the [`Worker`] context offers
//! [`critical`](Worker::critical) (a robust cross-process critical section,
//! OpenMP `critical`) and [`ordered`](Worker::ordered) (sections that run in
//! item order, OpenMP `ordered`). Workers share data through
//! [`Array`](crate::Array), [`Value`](crate::Value) and
//! [`ShmDict`] segments that they open *in the worker*, by
//! name, in [`Pool::map_init`]'s `init` function (see "Fork caveats").
//!
//! [`spawn`] starts one child process that shares a dictionary and returns
//! a [`Child`] handle to join it (remoteD's `newProc`).
//!
//! # Failures
//!
//! `map` returns `Ok` only when every item produced a result and every
//! worker exited normally; otherwise it returns a [`PoolError`] and no
//! result is silently dropped:
//!
//! - a work function that panics: [`PoolError::Panicked`] naming the item
//!   and the panic message;
//! - a worker killed by a signal (SIGKILL, SIGSEGV, an abort under
//!   `panic = "abort"`): [`PoolError::Killed`] naming the signal, the
//!   worker's pid and the item it was running;
//! - a worker that exits on its own in the middle of an item (a work
//!   function calling `std::process::exit`): [`PoolError::Exited`].
//!
//! Items are not re-run after a failure: a worker that died may have
//! applied part of its item's side effects (written part of a shared array,
//! been killed inside a `critical` section), so re-running could apply them
//! twice. After the first failure the pool stops handing out items, wakes
//! workers waiting in `ordered`, lets the others finish the item they are
//! running, reaps every worker and returns the error. `reduce` may have
//! seen some results by then. The pool never waits for a dead worker: the
//! parent sleeps on the coordination segment (a futex, woken by every
//! posted result) for at most 100 ms at a time and checks its workers with
//! `waitpid(WNOHANG)` in between. It does wait for a live worker to finish
//! its item: a work function that never returns makes `map` never return,
//! as it would in a sequential loop.
//!
//! # Fork caveats
//!
//! `fork` copies only the calling thread. Locks that other threads held at
//! that instant (the allocator's, stdout's, any `Mutex`) would stay locked
//! forever in the child. So `map`, `map_init`, `collect` and `spawn` refuse
//! with [`PoolError::MultiThreaded`] when the calling process has more than
//! one thread (counted in `/proc/self/task`), instead of risking a deadlock.
//! Call them from the main thread of a program that has not started threads
//! (or whose threads have ended). Consequences:
//!
//! - libtest runs `#[test]` functions on worker threads: test pools in a
//!   `harness = false` test binary (for example with `libtest-mimic` and
//!   one test thread, which runs trials on the main thread), in examples,
//!   or in doctests (each doctest is its own single-threaded process).
//! - Handles to shared memory (`ShmDict`, `Array`, `Value`) opened in the
//!   parent must not be *used* in a worker: the locks and slots a handle
//!   takes are marked with that handle's owner token, and two processes
//!   using one token defeat the crash recovery that tells a live holder
//!   from a dead one. Capture the *names* and open the segments again in
//!   the worker, once per worker, in [`Pool::map_init`]'s `init`.
//!   Everything else may be captured freely: it is the worker's own
//!   copy-on-write copy, and writes to it are not seen by the parent.
//! - The worker ends with `_exit`: it never returns into the caller's code,
//!   never runs the destructors of the caller's values or the process's
//!   `atexit` handlers, and does not flush buffers it did not write
//!   (stdout and stderr are flushed before forking, so nothing buffered is
//!   printed twice). Values created in the worker (the `init` state) are
//!   dropped before it exits.
//! - Workers and spawned children die with the calling process: each sets
//!   `PR_SET_PDEATHSIG` to SIGKILL right after the fork (and exits at once
//!   if the parent is already gone), so a killed parent never leaves
//!   workers waiting in `ordered` forever. The death signal belongs to the
//!   *thread* that forked: a main thread that calls `pthread_exit` while
//!   other threads run on kills the children too.
//! - A process that ignores `SIGCHLD` (`SIG_IGN`) has its children reaped
//!   by the kernel; the pool then cannot see how a worker ended and reports
//!   any item left without a result as lost.
//!
//! # How it works
//!
//! Each `map` creates a private coordination dictionary with a unique
//! name, so no state of an earlier map, failed or not, can leak into the
//! next. Workers attach it by name with
//! [`Options::create(false)`](crate::Options::create) (a name that is gone
//! is an error, never a new empty segment), and the parent unlinks the
//! name as soon as every worker has attached (each sets its `cur/<w>` from
//! "starting" to "idle"), so a parent killed afterwards leaves nothing in
//! /dev/shm; the memory goes with the last attached process. A parent
//! killed before that (within the few milliseconds the workers take to
//! start) leaves a segment with only dead processes attached, which
//! [`segments::gc`](crate::segments::gc) removes. Its keys:
//!
//! | key          | written by          | meaning                                         |
//! |--------------|---------------------|-------------------------------------------------|
//! | `next`       | workers (`update`)  | first item not yet claimed                      |
//! | `cur/<w>`    | worker `w`          | item `w` runs, or starting / idle / claiming / exiting |
//! | `r/<w>/<k>`  | worker `w`          | its `k`-th batch of results; removed when read  |
//! | `ping`       | workers (`update`)  | bumped once attached and after each batch: the parent waits on it |
//! | `turn`       | workers and parent  | the item whose `ordered` section may run next   |
//! | `stop`       | parent              | 1: stop claiming items                          |
//!
//! Workers claim chunks of consecutive items with an atomic `update` of
//! `next` (guided scheduling: a quarter of the remaining items per worker,
//! shrinking to single items at the end; see [`Pool::chunk_size`]), run
//! them in order, and post each chunk's results as one batch. Before each
//! item a worker records it in `cur/<w>`, which is how the parent names the
//! item of a worker that died. `critical` is the coordination dictionary's
//! robust lock ([`ShmDict::lock`](crate::ShmDict::lock)): a worker killed
//! inside it releases it (the kernel marks the mutex, the next holder
//! recovers it), and the map reports the death. `ordered` waits (on a
//! futex, [`ShmDict::wait_change`](crate::ShmDict::wait_change)) until
//! `turn` equals its item, runs, and sets `turn` to the next item. Items
//! that finish without an `ordered` section are passed over: by their own
//! worker (when it reaches an `ordered` section later in the same chunk,
//! or at the end of the chunk) or by the parent when their results arrive.
//! On failure the parent sets `stop` and sets `turn` to a value no item
//! has, which wakes every waiting `ordered` section and makes it abandon
//! its item.

use crate::sync::local::{AtomicU64, Ordering};
use std::cell::{Cell, RefCell};
use std::fmt;
use std::io::{self, Write};
use std::marker::PhantomData;
use std::panic::{self, AssertUnwindSafe};
use std::time::Duration;

use rustix::process::{Pid, WaitOptions, WaitStatus};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::dict::ShmDict;
use crate::error::Error;
use crate::sys;
use crate::sys::child::Attach;

mod error;
mod panics;
mod process;
mod segment;
mod spawn;
mod worker;

pub use error::PoolError;
use panics::*;
use process::*;
use segment::*;
pub use spawn::{spawn, Child};
pub use worker::Worker;
use worker::*;

const NEXT: &str = "next";
const PING: &str = "ping";
const TURN: &str = "turn";
const STOP: &str = "stop";
/// `cur/<w>`: the worker is between items.
const IDLE: u64 = u64::MAX;
/// `cur/<w>`: the worker is claiming a chunk.
const CLAIMING: u64 = u64::MAX - 1;
/// `cur/<w>`: the worker is done and about to exit: the parent may wait for
/// it (`waitpid` without `WNOHANG`) instead of polling.
const EXITING: u64 = u64::MAX - 2;
/// `cur/<w>`: the worker has not attached the coordination segment yet.
const STARTING: u64 = u64::MAX - 3;
/// `turn` after a failure: no item has this index.
const ABORTED: u64 = u64::MAX;
/// Item index of a result entry that concerns no item (a panic in `init`).
const NO_ITEM: u64 = u64::MAX;
/// Result entry tags.
const TAG_OK: u8 = 0;
const TAG_PANIC: u8 = 1;
const TAG_FAILED: u8 = 2;
/// A worker posts its batch early once it holds this many encoded bytes.
const BATCH_BYTES: usize = 256 << 10;
/// Largest chunk guided scheduling hands out.
const MAX_CHUNK: u64 = 4096;
/// How long the parent sleeps between checks of its workers.
const REAP_INTERVAL: Duration = Duration::from_millis(100);
/// Exit codes of a worker that could not report through the segment.
const EXIT_NO_SEGMENT: i32 = 90;
const EXIT_POST_FAILED: i32 = 91;

/// One result entry: item index, tag, payload (postcard of `R`, or a message).
type Entry = (u64, u8, Vec<u8>);

// ---------------------------------------------------------------------------
// The pool.
// ---------------------------------------------------------------------------

/// A pool of worker processes: see the [module docs](self).
///
/// A `Pool` is only a configuration: worker processes exist only while a
/// [`map`](Pool::map) runs, and every one of them is reaped before `map`
/// returns.
///
/// The rectangle rule of sharedmem's README, with the array shared by the
/// workers (this is also the README's example):
///
/// ```
/// use shmdict::{pool::Pool, Array};
///
/// let name = format!("readme-pool-{}", std::process::id());
/// let (n, chunk) = (1_000_000, 100_000);
/// let xdx = Array::<f64>::open(&name, n)?; // one f(x) dx per rectangle, shared
/// let mut total = 0.0;
/// Pool::new(2).map_init(
///     (0..n).step_by(chunk), // the items: where each chunk starts
///     // Once in each worker process: open the array by name.
///     |_worker| Array::<f64>::open(&name, n).expect("open the array"),
///     // In a worker process: fill a chunk in place, return its sum.
///     |xdx, _worker, start| {
///         let mut part = xdx.range_mut(start..start + chunk).expect("claim");
///         for (j, y) in part.iter_mut().enumerate() {
///             let x = ((start + j) as f64 + 0.5) / n as f64;
///             *y = 4.0 / (1.0 + x * x) / n as f64;
///         }
///         part.iter().sum::<f64>()
///     },
///     // Here, in the calling process, as the results arrive.
///     |_index, partial: f64| total += partial,
/// )?;
/// assert!((total - std::f64::consts::PI).abs() < 1e-9);
/// assert!((xdx.read().iter().sum::<f64>() - total).abs() < 1e-9);
/// drop(xdx);
/// Array::<f64>::unlink(&name)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Pool {
    workers: usize,
    chunk: Option<usize>,
}

impl Default for Pool {
    /// One worker per CPU ([`std::thread::available_parallelism`]).
    fn default() -> Pool {
        Pool::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

impl Pool {
    /// A pool of `workers` processes (at least 1; 0 counts as 1).
    pub fn new(workers: usize) -> Pool {
        Pool {
            workers: workers.max(1),
            chunk: None,
        }
    }

    /// Hands out items `n` at a time (`n` at least 1) instead of by guided
    /// scheduling. `chunk_size(1)` gives the finest load balance and lets
    /// [`ordered`](Worker::ordered) sections of neighbouring items run in
    /// different workers; larger chunks cost fewer coordination steps.
    pub fn chunk_size(mut self, n: usize) -> Pool {
        self.chunk = Some(n.max(1));
        self
    }

    /// The number of worker processes.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Runs `work` on every item in the worker processes and `reduce` in the
    /// calling process on each `(index, result)` as results arrive (in no
    /// particular order). Returns `Ok` once every item's result has been
    /// reduced and every worker exited normally, or the first failure (see
    /// the module docs). Refused with [`PoolError::MultiThreaded`] if the
    /// calling process has other threads.
    pub fn map<I, R>(
        &self,
        items: impl IntoIterator<Item = I>,
        work: impl Fn(&Worker<'_>, I) -> R,
        reduce: impl FnMut(usize, R),
    ) -> Result<(), PoolError>
    where
        R: Serialize + DeserializeOwned,
    {
        self.map_init(items, |_| (), |_, w, item| work(w, item), reduce)
    }

    /// Like [`map`](Pool::map), and returns the results in item order.
    pub fn collect<I, R>(
        &self,
        items: impl IntoIterator<Item = I>,
        work: impl Fn(&Worker<'_>, I) -> R,
    ) -> Result<Vec<R>, PoolError>
    where
        R: Serialize + DeserializeOwned,
    {
        let items: Vec<I> = items.into_iter().collect();
        let mut out: Vec<Option<R>> = std::iter::repeat_with(|| None).take(items.len()).collect();
        self.map(items, work, |i, r| out[i] = Some(r))?;
        // `map` returned Ok: every index was reduced exactly once.
        Ok(out.into_iter().flatten().collect())
    }

    /// Like [`map`](Pool::map), with per-worker state: each worker process
    /// calls `init` once, before its first item, and passes the state to
    /// `work`. Open shared segments here (by name; see the module docs on
    /// handles inherited across fork). The state is dropped before the
    /// worker exits.
    ///
    /// ```
    /// use shmdict::{pool::Pool, Value};
    ///
    /// let name = format!("doc-pool-sum-{}", std::process::id());
    /// let total = Value::<u64>::open(&name, 0)?;
    /// Pool::new(2).map_init(
    ///     1..=100u64,
    ///     |_worker| Value::<u64>::open(&name, 0).expect("open in the worker"),
    ///     |total, _worker, x| {
    ///         total.fetch_add(x);
    ///     },
    ///     |_, ()| {},
    /// )?;
    /// assert_eq!(total.load(), 5050);
    /// Value::<u64>::unlink(&name)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn map_init<I, S, R>(
        &self,
        items: impl IntoIterator<Item = I>,
        init: impl Fn(&Worker<'_>) -> S,
        work: impl Fn(&mut S, &Worker<'_>, I) -> R,
        mut reduce: impl FnMut(usize, R),
    ) -> Result<(), PoolError>
    where
        R: Serialize + DeserializeOwned,
    {
        let mut items: Vec<Option<I>> = items.into_iter().map(Some).collect();
        let n = items.len();
        if n == 0 {
            return Ok(());
        }
        check_single_threaded()?;
        let coord = Private::create("pool")?;
        let d = coord.dict();
        let workers = self.workers.min(n);
        // Every key a worker writes except its result batches exists before
        // the workers start: they only overwrite.
        set_u64(d, NEXT, 0)?;
        set_u64(d, PING, 0)?;
        set_u64(d, TURN, 0)?;
        set_u64(d, STOP, 0)?;
        for w in 0..workers {
            set_u64(d, &cur_key(w), STARTING)?;
        }
        let mut run = Run {
            dict: d,
            coord: &coord,
            kids: Vec::with_capacity(workers),
            stopped: false,
        };
        let plan = Plan {
            name: &coord.name,
            workers: workers as u64,
            n: n as u64,
            chunk: self.chunk.map(|c| c as u64),
        };
        for w in 0..workers {
            let pid = fork_child(|| worker_main(&plan, w, &mut items, &init, &work))?;
            run.kids.push(Kid {
                pid,
                ended: None,
                consumed: 0,
            });
        }
        run.collect(n, &mut reduce)
        // `run` drops first (reaping anything left), then `coord` (unlink).
    }
}

/// What every worker of one map knows.
struct Plan<'a> {
    name: &'a str,
    workers: u64,
    n: u64,
    chunk: Option<u64>,
}

struct Kid {
    pid: Pid,
    ended: Option<Ended>,
    /// Result batches read so far.
    consumed: u64,
}

/// The parent's side of one map. Dropping it stops and reaps every worker
/// not yet reaped (also when `reduce` panics).
struct Run<'a> {
    dict: &'a ShmDict,
    /// The coordination segment; its name is dropped once every worker has
    /// attached (or ended).
    coord: &'a Private,
    kids: Vec<Kid>,
    stopped: bool,
}

impl Run<'_> {
    /// Tells the workers to stop: no more claims, `ordered` waiters abandon.
    fn stop(&mut self) {
        if !self.stopped {
            self.stopped = true;
            let _ = set_u64(self.dict, STOP, 1);
            let _ = set_u64(self.dict, TURN, ABORTED);
        }
    }

    fn collect<R: DeserializeOwned>(
        &mut self,
        n: usize,
        reduce: &mut impl FnMut(usize, R),
    ) -> Result<(), PoolError> {
        let d = self.dict;
        let mut done = vec![false; n];
        let mut received = 0usize;
        let mut failure: Option<PoolError> = None;
        loop {
            let (_, seen) = d.get_versioned(PING)?;
            // Reap before reading results: a worker found ended here posted
            // everything it ever will before the reads below.
            let mut newly = Vec::new();
            for (w, kid) in self.kids.iter_mut().enumerate() {
                if kid.ended.is_none() {
                    // A worker that said it is exiting is waited for: it
                    // only detaches and calls `_exit`.
                    let exiting = get_u64(d, &cur_key(w))? == Some(EXITING);
                    if let Some(e) = reap(kid.pid, exiting)? {
                        kid.ended = Some(e);
                        newly.push(w);
                    }
                }
            }
            if self.coord.named.get() {
                let mut all_attached = true;
                for (w, kid) in self.kids.iter().enumerate() {
                    if kid.ended.is_none() && get_u64(d, &cur_key(w))? == Some(STARTING) {
                        all_attached = false;
                    }
                }
                if all_attached {
                    // No worker will open the name again: drop it, so that
                    // nothing is left in /dev/shm if this process is killed.
                    self.coord.drop_name();
                }
            }
            let mut progressed = false;
            for (w, kid) in self.kids.iter_mut().enumerate() {
                loop {
                    let key = result_key(w, kid.consumed);
                    let Some(bytes) = d.get(&key)? else { break };
                    d.remove(&key)?;
                    kid.consumed += 1;
                    progressed = true;
                    if failure.is_some() {
                        continue;
                    }
                    let batch: Vec<Entry> = decode(d, &bytes)?;
                    for (i, tag, payload) in batch {
                        let item = (i != NO_ITEM).then_some(i as usize);
                        let message = || String::from_utf8_lossy(&payload).into_owned();
                        match tag {
                            TAG_OK => {
                                let i = match item {
                                    Some(i) if i < n && !done[i] => i,
                                    _ => {
                                        return Err(Error::corrupt(
                                            d.name(),
                                            format!("result for item {i}, unexpected"),
                                        )
                                        .into())
                                    }
                                };
                                let r: R = decode(d, &payload)?;
                                done[i] = true;
                                received += 1;
                                reduce(i, r);
                            }
                            TAG_PANIC => {
                                failure = Some(PoolError::Panicked {
                                    item,
                                    message: message(),
                                });
                                break;
                            }
                            _ => {
                                failure = Some(PoolError::Worker {
                                    item,
                                    reason: message(),
                                });
                                break;
                            }
                        }
                    }
                }
            }
            for w in newly {
                let kid = &self.kids[w];
                let pid = kid.pid.as_raw_nonzero().get() as u32;
                let cur = get_u64(d, &cur_key(w))?.unwrap_or(IDLE);
                let item = (cur < n as u64).then_some(cur as usize);
                let failed = match kid.ended {
                    Some(Ended::Signal(signal)) => Some(PoolError::Killed { item, signal, pid }),
                    Some(Ended::Code(0)) if cur == IDLE || cur == EXITING => None,
                    Some(Ended::Code(code)) => Some(PoolError::Exited {
                        item,
                        code: Some(code),
                        pid,
                    }),
                    Some(Ended::Unknown) if cur == IDLE || cur == EXITING => None,
                    Some(Ended::Unknown) | None => Some(PoolError::Exited {
                        item,
                        code: None,
                        pid,
                    }),
                };
                if failure.is_none() {
                    failure = failed;
                }
            }
            if failure.is_some() {
                self.stop();
            } else if progressed {
                advance_turn(d, &done)?;
            }
            if self.kids.iter().all(|k| k.ended.is_some()) {
                if let Some(f) = failure {
                    return Err(f);
                }
                if received == n {
                    return Ok(());
                }
                let lost = done.iter().position(|&d| !d);
                return Err(PoolError::Worker {
                    item: lost,
                    reason: format!(
                        "{} items produced no result and no worker reported them",
                        n - received
                    ),
                });
            }
            d.wait_change(PING, seen, REAP_INTERVAL)?;
        }
    }
}

impl Drop for Run<'_> {
    fn drop(&mut self) {
        if self.kids.iter().any(|k| k.ended.is_none()) {
            self.stop();
        }
        for kid in &mut self.kids {
            if kid.ended.is_none() {
                kid.ended = reap(kid.pid, true).ok().flatten().or(Some(Ended::Unknown));
            }
        }
    }
}

fn decode<T: DeserializeOwned>(d: &ShmDict, bytes: &[u8]) -> Result<T, PoolError> {
    postcard::from_bytes(bytes).map_err(|source| {
        PoolError::Shm(Error::Codec {
            segment: d.name().to_owned(),
            source,
        })
    })
}

/// The parent passes `turn` over items whose results arrived.
fn advance_turn(d: &ShmDict, done: &[bool]) -> crate::Result<()> {
    let n = done.len() as u64;
    let passable = |t: u64| t < n && done[t as usize];
    if get_u64(d, TURN)?.is_some_and(passable) {
        d.update(TURN, |cur| {
            let mut t = le(cur);
            while passable(t) {
                t += 1;
            }
            Some(t.to_le_bytes().to_vec())
        })?;
    }
    Ok(())
}

/// Moves `turn` to `to` if it lies in `from..to` (items of this worker that
/// are done). Leaves any other value, `ABORTED` included.
fn pass_turn(d: &ShmDict, from: u64, to: u64) -> crate::Result<()> {
    d.update(TURN, |cur| {
        let t = le(cur);
        Some(
            if (from..to).contains(&t) { to } else { t }
                .to_le_bytes()
                .to_vec(),
        )
    })?;
    Ok(())
}
