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

/// What went wrong in a [`Pool::map`] or a [`spawn`]ed child.
#[derive(Debug)]
#[non_exhaustive]
pub enum PoolError {
    /// The calling process has other threads: forking it could deadlock the
    /// children (see the module docs, "Fork caveats").
    MultiThreaded {
        /// Threads running in the calling process.
        threads: usize,
    },
    /// A work function (or `init`, or a spawned closure) panicked.
    Panicked {
        /// The item it was working on (`None`: in `init` or in a spawned child).
        item: Option<usize>,
        /// The panic message and its location.
        message: String,
    },
    /// A worker process or spawned child was killed by a signal.
    Killed {
        /// The item it was running (`None`: between items, or a spawned child).
        item: Option<usize>,
        /// The signal number (e.g. `libc::SIGKILL`).
        signal: i32,
        /// The process id of the dead process.
        pid: u32,
    },
    /// A worker process exited in the middle of an item (for example a work
    /// function called `std::process::exit`), or without reporting.
    Exited {
        /// The item it was running, if known.
        item: Option<usize>,
        /// Its exit code (`None` if unknown: `SIGCHLD` ignored).
        code: Option<i32>,
        /// Its process id.
        pid: u32,
    },
    /// A worker failed in the pool's machinery (for example its coordination
    /// segment refused a write, or a result could not be encoded).
    Worker {
        /// The item concerned, if any.
        item: Option<usize>,
        /// What happened.
        reason: String,
    },
    /// A shared-memory operation of the pool failed in the calling process.
    Shm(Error),
    /// `fork` or `waitpid` failed.
    Io {
        /// The failed call.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolError::MultiThreaded { threads } => write!(
                f,
                "the pool must be used from a single-threaded process: {threads} threads are \
                 running (fork copies only the calling thread; locks held by the others would \
                 never be released in the children)"
            ),
            PoolError::Panicked {
                item: Some(i),
                message,
            } => write!(f, "the work function panicked on item {i}: {message}"),
            PoolError::Panicked {
                item: None,
                message,
            } => write!(f, "the child process panicked: {message}"),
            PoolError::Killed { item, signal, pid } => write!(
                f,
                "process {pid} was killed by signal {signal} ({}) while running {}",
                signal_name(*signal),
                item_desc(item, "a spawned closure or between items")
            ),
            PoolError::Exited { item, code, pid } => write!(
                f,
                "process {pid} exited (code {}) without reporting {}",
                code.map_or("unknown".to_owned(), |c| c.to_string()),
                item_or(item, "its result")
            ),
            PoolError::Worker { item, reason } => {
                write!(
                    f,
                    "worker failure on {}: {reason}",
                    item_desc(item, "no item")
                )
            }
            PoolError::Shm(e) => write!(f, "pool coordination: {e}"),
            PoolError::Io { op, source } => write!(f, "{op} failed: {source}"),
        }
    }
}

fn item_desc(i: &Option<usize>, none: &str) -> String {
    i.map_or(none.to_owned(), |i| format!("item {i}"))
}

fn item_or(i: &Option<usize>, none: &str) -> String {
    i.map_or(none.to_owned(), |i| format!("the result of item {i}"))
}

impl std::error::Error for PoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PoolError::Shm(e) => Some(e),
            PoolError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<Error> for PoolError {
    fn from(e: Error) -> PoolError {
        PoolError::Shm(e)
    }
}

/// The conventional name of a signal number, for messages.
fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGHUP => "SIGHUP",
        libc::SIGQUIT => "SIGQUIT",
        _ => "signal",
    }
}

// ---------------------------------------------------------------------------
// The raw process layer: the only `unsafe` of the pool.
// ---------------------------------------------------------------------------

/// Refuses unless the calling process runs exactly one thread.
fn check_single_threaded() -> Result<(), PoolError> {
    let count = || -> Result<usize, PoolError> {
        Ok(std::fs::read_dir("/proc/self/task")
            .map_err(|source| PoolError::Io {
                op: "reading /proc/self/task",
                source,
            })?
            .count())
    };
    // A thread that was just joined can stay listed for a moment after
    // `join` returns (it is past all user code by then): look again briefly
    // before refusing.
    for _ in 0..20 {
        if count()? == 1 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    match count()? {
        1 => Ok(()),
        threads => Err(PoolError::MultiThreaded { threads }),
    }
}

/// Forks. In the child, runs `child` and ends the process with its exit
/// code: the child never returns into the caller's code. In the parent,
/// returns the child's pid. Check `check_single_threaded` first.
///
/// The child dies with the calling process: it gets SIGKILL when the parent
/// dies (`PR_SET_PDEATHSIG`), and exits at once if the parent died before
/// that was set up (see [`sys::child::die_with_parent`]).
fn fork_child(child: impl FnOnce() -> i32) -> Result<Pid, PoolError> {
    // Nothing buffered by the parent may be printed again by the child.
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    // Read before the fork: the child compares it with its `getppid`.
    let parent = rustix::process::getpid();
    // SAFETY: fork has no memory-safety preconditions of its own; what makes
    // running Rust code in the child sound is that the process is
    // single-threaded (checked by every caller just before, and nothing
    // between that check and this call starts a thread), so no lock in the
    // child's copy of memory is held by a thread that does not exist there.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(PoolError::Io {
            op: "fork",
            source: io::Error::last_os_error(),
        }),
        0 => {
            sys::child::die_with_parent(parent);
            let code = panic::catch_unwind(AssertUnwindSafe(child)).unwrap_or(EXIT_POST_FAILED);
            exit_now(code)
        }
        pid => Pid::from_raw(pid).ok_or_else(|| PoolError::Io {
            op: "fork",
            source: io::Error::other("fork returned a negative pid"),
        }),
    }
}

/// Ends this (child) process at once with `code`.
fn exit_now(code: i32) -> ! {
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    // SAFETY: `_exit` only ends the process. Unlike `exit` it runs no
    // `atexit` handlers and no destructors, which belong to the parent's
    // copy of the program state: the forked child must not run them.
    unsafe { libc::_exit(code) }
}

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Code(i32),
    Signal(i32),
    /// Reaped by someone else (`SIGCHLD` ignored).
    Unknown,
}

fn ended(st: WaitStatus) -> Option<Ended> {
    if let Some(sig) = st.terminating_signal() {
        Some(Ended::Signal(sig))
    } else {
        st.exit_status().map(Ended::Code)
    }
}

/// Reaps `pid` if it has ended (`block`: waits until it does).
fn reap(pid: Pid, block: bool) -> Result<Option<Ended>, PoolError> {
    let opts = if block {
        WaitOptions::empty()
    } else {
        WaitOptions::NOHANG
    };
    loop {
        match rustix::process::waitpid(Some(pid), opts) {
            Ok(Some((_, st))) => match ended(st) {
                Some(e) => return Ok(Some(e)),
                None => continue, // stopped or continued: not an end
            },
            Ok(None) => return Ok(None),
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::CHILD) => return Ok(Some(Ended::Unknown)),
            Err(e) => {
                return Err(PoolError::Io {
                    op: "waitpid",
                    source: e.into(),
                })
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Private segments and their names.
// ---------------------------------------------------------------------------

static SEGMENTS: AtomicU64 = AtomicU64::new(0);

/// A private dictionary with a unique name, unlinked when dropped (or
/// earlier, by [`Private::drop_name`], once every process that needs it has
/// attached).
struct Private {
    dict: Option<ShmDict>,
    name: String,
    named: Cell<bool>,
}

impl Private {
    fn create(kind: &str) -> Result<Private, PoolError> {
        loop {
            let name = format!(
                "shmdict-{kind}-{}-{}",
                std::process::id(),
                // Relaxed: only uniqueness matters.
                SEGMENTS.fetch_add(1, Ordering::Relaxed)
            );
            match ShmDict::options()
                .capacity(1 << 16)
                .create_new(true)
                .open(&name)
            {
                Ok(dict) => {
                    return Ok(Private {
                        dict: Some(dict),
                        name,
                        named: Cell::new(true),
                    })
                }
                // Left by a dead process whose pid we reuse: take another.
                Err(Error::AlreadyExists { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn dict(&self) -> &ShmDict {
        self.dict.as_ref().expect("present until dropped")
    }

    /// Removes the segment's name now. Processes attached keep using it;
    /// the memory goes when the last of them detaches or dies. So once
    /// every child has attached, a parent SIGKILLed later leaves nothing
    /// in /dev/shm.
    fn drop_name(&self) {
        if self.named.replace(false) {
            let _ = ShmDict::unlink(&self.name);
        }
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        drop(self.dict.take());
        self.drop_name();
    }
}

fn get_u64(d: &ShmDict, key: &str) -> crate::Result<Option<u64>> {
    Ok(d.get(key)?
        .and_then(|v| Some(u64::from_le_bytes(v.try_into().ok()?))))
}

fn set_u64(d: &ShmDict, key: &str, v: u64) -> crate::Result<()> {
    d.insert(key, v.to_le_bytes())
}

fn le(v: Option<&[u8]>) -> u64 {
    v.and_then(|b| Some(u64::from_le_bytes(b.try_into().ok()?)))
        .unwrap_or(0)
}

fn cur_key(w: usize) -> String {
    format!("cur/{w}")
}

fn result_key(w: usize, k: u64) -> String {
    format!("r/{w}/{k}")
}

// ---------------------------------------------------------------------------
// Panics in the child.
// ---------------------------------------------------------------------------

thread_local! {
    /// The location of the last panic in this (child) process.
    static PANIC_AT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Records where panics happen, then reports them as before.
fn install_panic_hook() {
    let previous = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if let Some(loc) = info.location() {
            let at = format!("{}:{}:{}", loc.file(), loc.line(), loc.column());
            PANIC_AT.with(|p| *p.borrow_mut() = Some(at));
        }
        previous(info)
    }));
}

/// The message of a panic payload, with the location the hook saw.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let msg = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_owned()
    };
    match PANIC_AT.with(|p| p.borrow_mut().take()) {
        Some(at) => format!("{msg} (at {at})"),
        None => msg,
    }
}

/// Unwinds out of a work function without running the panic hook.
enum Abort {
    /// The map failed elsewhere: drop this item quietly.
    Stopped,
    /// The pool's machinery failed on this item.
    Failed(String),
}

fn abort(a: Abort) -> ! {
    panic::resume_unwind(Box::new(a))
}

fn fail_ordered(e: Error) -> ! {
    abort(Abort::Failed(format!("ordered section: {e}")))
}

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

// ---------------------------------------------------------------------------
// The worker side.
// ---------------------------------------------------------------------------

/// The context of a work function, in a worker process: the item's index,
/// and the pool's [`critical`](Worker::critical) and
/// [`ordered`](Worker::ordered) sections.
pub struct Worker<'a> {
    dict: &'a ShmDict,
    id: usize,
    n: u64,
    index: Cell<u64>,
    chunk_start: Cell<u64>,
    ordered_done: Cell<bool>,
}

impl fmt::Debug for Worker<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id)
            .field("index", &self.index())
            .finish()
    }
}

impl Worker<'_> {
    /// The index of the item being worked on (in `init`: `usize::MAX`).
    pub fn index(&self) -> usize {
        let i = self.index.get();
        if i < self.n {
            i as usize
        } else {
            usize::MAX
        }
    }

    /// This worker's number, `0..pool.workers()`.
    pub fn id(&self) -> usize {
        self.id
    }

    /// Runs `f` while no other worker of this map runs a `critical` section:
    /// a robust cross-process mutex (OpenMP `critical`, sharedmem's
    /// `with pool.critical`).
    ///
    /// If a worker is killed inside its section, the kernel releases the
    /// mutex: the next worker to enter gets it (it does not wait for the
    /// dead one), and the map ends with [`PoolError::Killed`] naming the dead
    /// worker's item. Data that section was changing may be half updated:
    /// after such an error, treat what the sections protect as suspect.
    ///
    /// Must not be nested (a second `critical` inside `f` fails the item).
    pub fn critical<T>(&self, f: impl FnOnce() -> T) -> T {
        let guard = match self.dict.lock() {
            Ok(g) => g,
            Err(e) => abort(Abort::Failed(format!("critical section: {e}"))),
        };
        let out = f();
        drop(guard);
        out
    }

    /// Runs `f` after the `ordered` sections of all earlier items, and
    /// before those of later items (OpenMP `ordered`): sections run one at a
    /// time in item order, while the rest of each work function runs in
    /// parallel. Items that do not call `ordered` are skipped over once they
    /// finish. At most one `ordered` section per item (a second call fails
    /// the item).
    ///
    /// Waits asleep. If the map fails meanwhile (another item panicked or
    /// its worker died), `ordered` does not run `f`: the item is abandoned
    /// (the work function unwinds, dropping its values) and the map returns
    /// that failure.
    ///
    /// With guided scheduling a worker runs a chunk of consecutive items, so
    /// a later chunk's sections wait for the whole earlier chunk; use
    /// [`Pool::chunk_size`]`(1)` when the work around the sections is long.
    pub fn ordered<T>(&self, f: impl FnOnce() -> T) -> T {
        let k = self.index.get();
        if k >= self.n {
            abort(Abort::Failed("ordered outside a work item".into()));
        }
        if self.ordered_done.replace(true) {
            abort(Abort::Failed(format!("ordered called twice for item {k}")));
        }
        loop {
            let (v, seen) = self
                .dict
                .get_versioned(TURN)
                .unwrap_or_else(|e| fail_ordered(e));
            let t = le(v.as_deref());
            if t == k {
                break;
            }
            if t == ABORTED {
                abort(Abort::Stopped);
            }
            if t > k {
                abort(Abort::Failed(format!(
                    "ordered: the turn ({t}) passed item {k} before its section ran"
                )));
            }
            if t >= self.chunk_start.get() {
                // Items t..k are ours and done: pass over them.
                pass_turn(self.dict, t, k).unwrap_or_else(|e| fail_ordered(e));
                continue;
            }
            let _ = self
                .dict
                .wait_change(TURN, seen, Duration::from_secs(1))
                .unwrap_or_else(|e| fail_ordered(e));
        }
        let out = f();
        pass_turn(self.dict, k, k + 1).unwrap_or_else(|e| fail_ordered(e));
        out
    }
}

/// A worker process's life: open the coordination segment, `init`, then
/// claim chunks and run items until none are left or the map stops.
/// Returns the exit code.
fn worker_main<I, S, R>(
    plan: &Plan<'_>,
    w: usize,
    items: &mut [Option<I>],
    init: &impl Fn(&Worker<'_>) -> S,
    work: &impl Fn(&mut S, &Worker<'_>, I) -> R,
) -> i32
where
    R: Serialize,
{
    // Attach only: if the name is gone, creating a new empty segment under
    // it would leak it and coordinate with nobody.
    let d = match ShmDict::options().create(false).open(plan.name) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("shmdict pool worker {w}: cannot open the coordination segment: {e}");
            return EXIT_NO_SEGMENT;
        }
    };
    // Tell the parent we are attached: once all are, it drops the name.
    if set_u64(&d, &cur_key(w), IDLE)
        .and_then(|_| d.update(PING, |v| Some((le(v) + 1).to_le_bytes().to_vec())))
        .is_err()
    {
        eprintln!("shmdict pool worker {w}: cannot report to the coordination segment");
        return EXIT_POST_FAILED;
    }
    install_panic_hook();
    let worker = Worker {
        dict: &d,
        id: w,
        n: plan.n,
        index: Cell::new(NO_ITEM),
        chunk_start: Cell::new(0),
        ordered_done: Cell::new(false),
    };
    let mut poster = Poster {
        dict: &d,
        w,
        posted: 0,
    };
    let code = match panic::catch_unwind(AssertUnwindSafe(|| init(&worker))) {
        Ok(mut state) => {
            let code = run_items(plan, &worker, &mut poster, items, &mut state, work);
            drop(state);
            code
        }
        Err(p) => {
            let entry = outcome_of_unwind(NO_ITEM, p);
            match entry {
                Some(e) => poster.post(&[e]).map_or(EXIT_POST_FAILED, |_| 0),
                None => 0,
            }
        }
    };
    if code == 0 {
        // Wake the parent, which then waits for our exit.
        let _ = set_u64(&d, &cur_key(w), EXITING);
        let _ = d.update(PING, |v| Some((le(v) + 1).to_le_bytes().to_vec()));
    }
    drop(d);
    code
}

/// The result entry for an item whose work function unwound (`None`: the
/// map was stopped, nothing to report).
fn outcome_of_unwind(i: u64, p: Box<dyn std::any::Any + Send>) -> Option<Entry> {
    match p.downcast::<Abort>() {
        Ok(a) => match *a {
            Abort::Stopped => None,
            Abort::Failed(m) => Some((i, TAG_FAILED, m.into_bytes())),
        },
        Err(p) => Some((i, TAG_PANIC, panic_message(&*p).into_bytes())),
    }
}

struct Poster<'a> {
    dict: &'a ShmDict,
    w: usize,
    posted: u64,
}

impl Poster<'_> {
    /// Posts one batch and wakes the parent.
    fn post(&mut self, batch: &[Entry]) -> crate::Result<()> {
        let bytes = postcard::to_allocvec(batch).map_err(|source| Error::Codec {
            segment: self.dict.name().to_owned(),
            source,
        })?;
        self.dict.insert(result_key(self.w, self.posted), bytes)?;
        self.posted += 1;
        self.dict
            .update(PING, |v| Some((le(v) + 1).to_le_bytes().to_vec()))?;
        Ok(())
    }
}

fn run_items<I, S, R: Serialize>(
    plan: &Plan<'_>,
    worker: &Worker<'_>,
    poster: &mut Poster<'_>,
    items: &mut [Option<I>],
    state: &mut S,
    work: &impl Fn(&mut S, &Worker<'_>, I) -> R,
) -> i32 {
    let d = worker.dict;
    let cur = cur_key(worker.id);
    let report = |e: Error| {
        eprintln!("shmdict pool worker {}: {e}", worker.id);
        EXIT_POST_FAILED
    };
    loop {
        if get_u64(d, STOP).ok().flatten() != Some(0) {
            return 0;
        }
        // Claim a chunk [start, end), recorded as "claiming" meanwhile.
        if let Err(e) = set_u64(d, &cur, CLAIMING) {
            return report(e);
        }
        let claimed = Cell::new((0u64, 0u64));
        let r = d.update(NEXT, |v| {
            let start = le(v).min(plan.n);
            let left = plan.n - start;
            let size = plan
                .chunk
                .unwrap_or_else(|| (left / (4 * plan.workers)).clamp(1, MAX_CHUNK));
            let end = start + size.min(left);
            claimed.set((start, end));
            Some(end.to_le_bytes().to_vec())
        });
        if let Err(e) = r {
            return report(e);
        }
        let (start, end) = claimed.get();
        if start == end {
            return set_u64(d, &cur, IDLE).map_or_else(report, |_| 0);
        }
        worker.chunk_start.set(start);
        let mut batch: Vec<Entry> = Vec::new();
        let mut bytes = 0usize;
        let mut failed = false;
        for i in start..end {
            if i > start && get_u64(d, STOP).ok().flatten() != Some(0) {
                break;
            }
            if let Err(e) = set_u64(d, &cur, i) {
                return report(e);
            }
            worker.index.set(i);
            worker.ordered_done.set(false);
            let Some(item) = items.get_mut(i as usize).and_then(Option::take) else {
                batch.push((i, TAG_FAILED, b"item index out of range".to_vec()));
                failed = true;
                break;
            };
            let entry = match panic::catch_unwind(AssertUnwindSafe(|| work(state, worker, item))) {
                Ok(r) => match postcard::to_allocvec(&r) {
                    Ok(v) => (i, TAG_OK, v),
                    Err(e) => (
                        i,
                        TAG_FAILED,
                        format!("cannot encode the result: {e}").into_bytes(),
                    ),
                },
                Err(p) => match outcome_of_unwind(i, p) {
                    Some(e) => e,
                    None => {
                        // Stopped: the map has failed; report nothing more.
                        return set_u64(d, &cur, IDLE).map_or_else(report, |_| 0);
                    }
                },
            };
            failed = entry.1 != TAG_OK;
            bytes += entry.2.len() + 16;
            batch.push(entry);
            if failed {
                break;
            }
            if bytes >= BATCH_BYTES && i + 1 < end {
                if let Err(e) = poster.post(&batch) {
                    return report(e);
                }
                batch.clear();
                bytes = 0;
            }
        }
        worker.index.set(NO_ITEM);
        // Pass `turn` over this chunk's items, all done, before the parent
        // learns of them (see the module docs).
        if !failed {
            if let Err(e) = pass_turn(d, start, end) {
                return report(e);
            }
        }
        if !batch.is_empty() {
            if let Err(e) = poster.post(&batch) {
                return report(e);
            }
        }
        if let Err(e) = set_u64(d, &cur, IDLE) {
            return report(e);
        }
        if failed {
            return 0;
        }
    }
}

// ---------------------------------------------------------------------------
// spawn
// ---------------------------------------------------------------------------

/// Starts one child process that opens `dict` again by name and runs
/// `f(&dict)` there (remoteD's `newProc`); returns a handle to
/// [`join`](Child::join) it for `f`'s result.
///
/// Like [`Pool::map`], the child is forked: `f` may capture anything (it
/// gets the child's copy), and the calling process must be single-threaded
/// ([`PoolError::MultiThreaded`] otherwise). The result crosses back
/// encoded with postcard, through a private segment whose name is removed
/// as soon as the child has attached it.
///
/// The child attaches `dict` by name
/// ([`Options::create(false)`](crate::Options::create)) and `spawn` returns
/// once it has: if the name
/// was unlinked, `spawn` returns [`PoolError::Shm`]`(`[`Error::NotFound`]`)`
/// instead of the child creating a new, empty dictionary. The child gets
/// SIGKILL when the calling process dies.
///
/// ```
/// use shmdict::{pool, ShmDict};
///
/// let name = format!("doc-spawn-{}", std::process::id());
/// let dict = ShmDict::open(&name)?;
/// let child = pool::spawn(&dict, |shared| {
///     shared.insert("myresult", "Hello World").expect("insert");
///     std::process::id()
/// })?;
/// let child_pid = child.join()?;
/// assert_ne!(child_pid, std::process::id());
/// assert_eq!(dict.get("myresult")?.as_deref(), Some(&b"Hello World"[..]));
/// ShmDict::unlink(&name)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn spawn<R, F>(dict: &ShmDict, f: F) -> Result<Child<R>, PoolError>
where
    R: Serialize + DeserializeOwned,
    F: FnOnce(&ShmDict) -> R,
{
    check_single_threaded()?;
    let out = Private::create("spawn")?;
    let (dict_name, out_name) = (dict.name(), out.name.as_str());
    // The child accepts the segment's owner and mode as `dict` did.
    let reattach = dict.reattach_options();
    let (report_r, report_w) =
        sys::child::report_pipe().map_err(|source| PoolError::Io { op: "pipe", source })?;
    let pid = fork_child(move || {
        // Attach only: an unlinked name is an error, not a new empty
        // segment created (and leaked) under it.
        let (d, o) = match (
            reattach.open(dict_name),
            ShmDict::options().create(false).open(out_name),
        ) {
            (Ok(d), Ok(o)) => (d, o),
            (Err(e), _) | (_, Err(e)) => {
                match e {
                    Error::NotFound { .. } => Attach::NotFound,
                    e => Attach::Failed(e.to_string()),
                }
                .send(report_w);
                return EXIT_NO_SEGMENT;
            }
        };
        Attach::Attached.send(report_w);
        install_panic_hook();
        let entry: Entry = match panic::catch_unwind(AssertUnwindSafe(|| f(&d))) {
            Ok(r) => match postcard::to_allocvec(&r) {
                Ok(v) => (0, TAG_OK, v),
                Err(e) => (
                    0,
                    TAG_FAILED,
                    format!("cannot encode the result: {e}").into_bytes(),
                ),
            },
            Err(p) => (0, TAG_PANIC, panic_message(&*p).into_bytes()),
        };
        let posted = postcard::to_allocvec(&entry)
            .map_err(|e| e.to_string())
            .and_then(|b| o.insert("result", b).map_err(|e| e.to_string()));
        match posted {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("shmdict spawn: cannot post the result: {e}");
                EXIT_POST_FAILED
            }
        }
    })?;
    // The closure (and our copy of the write end) is gone: the read below
    // ends when the child reports or dies.
    let report = Attach::receive(report_r);
    let mut child = Child {
        pid,
        out,
        ended: None,
        _r: PhantomData,
    };
    let failed = match report {
        Attach::Attached => {
            // The child has attached both segments: nobody opens the result
            // segment by name again.
            child.out.drop_name();
            return Ok(child);
        }
        Attach::NotFound => PoolError::Shm(Error::NotFound {
            segment: dict_name.to_owned(),
        }),
        Attach::Failed(reason) => PoolError::Worker { item: None, reason },
        // It died before reporting: `join` says how.
        Attach::Died => return Ok(child),
    };
    child.ended = reap(child.pid, true)?;
    Err(failed)
}

/// A child process started by [`spawn`]. Dropping it without
/// [`join`](Child::join) still waits for the process to end (it is always
/// reaped) and discards its result.
pub struct Child<R> {
    pid: Pid,
    out: Private,
    ended: Option<Ended>,
    _r: PhantomData<fn() -> R>,
}

impl<R> fmt::Debug for Child<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Child")
            .field("pid", &self.pid())
            .field("ended", &self.ended)
            .finish()
    }
}

impl<R> Child<R> {
    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.pid.as_raw_nonzero().get() as u32
    }
}

impl<R: DeserializeOwned> Child<R> {
    /// Waits for the child to end and returns its closure's result, or why
    /// there is none: [`PoolError::Panicked`] with the panic message,
    /// [`PoolError::Killed`] with the signal, [`PoolError::Exited`] if it
    /// ended without posting a result.
    pub fn join(mut self) -> Result<R, PoolError> {
        let ended = reap(self.pid, true)?.unwrap_or(Ended::Unknown);
        self.ended = Some(ended);
        let pid = self.pid();
        if let Ended::Signal(signal) = ended {
            return Err(PoolError::Killed {
                item: None,
                signal,
                pid,
            });
        }
        let d = self.out.dict();
        let Some(bytes) = d.get("result")? else {
            return Err(PoolError::Exited {
                item: None,
                code: match ended {
                    Ended::Code(c) => Some(c),
                    _ => None,
                },
                pid,
            });
        };
        let (_, tag, payload): Entry = decode(d, &bytes)?;
        match tag {
            TAG_OK => decode(d, &payload),
            TAG_PANIC => Err(PoolError::Panicked {
                item: None,
                message: String::from_utf8_lossy(&payload).into_owned(),
            }),
            _ => Err(PoolError::Worker {
                item: None,
                reason: String::from_utf8_lossy(&payload).into_owned(),
            }),
        }
    }
}

impl<R> Drop for Child<R> {
    fn drop(&mut self) {
        if self.ended.is_none() {
            let _ = reap(self.pid, true);
        }
        // `out` unlinks its segment.
    }
}
