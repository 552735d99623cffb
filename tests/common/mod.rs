//! The harness shared by the multi-process test binaries: unique segment
//! names unlinked by a guard, child processes (this same test binary
//! re-executed with [`CHILD_FLAG`]) killed and reaped by a guard, watchdogs,
//! start barriers, a deterministic generator and self-checking values.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

pub(crate) mod acked;

use shmdict::ShmDict;

/// `argv[1]` of a child process.
pub(crate) const CHILD_FLAG: &str = "--shmdict-child";
/// How long anything that could hang may take before it is killed and the
/// trial fails. Generous: it only turns a hang into a failure.
pub(crate) const WATCHDOG: Duration = Duration::from_secs(120);

/// Runs `trials` as libtest-mimic trials (one at a time unless
/// `--test-threads` says otherwise), or, when this binary was started as a
/// child (`CHILD_FLAG role args...`), runs `child(role, args)` instead.
pub(crate) fn run(trials: Vec<(&'static str, fn())>, child: fn(&str, &[String])) {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(CHILD_FLAG) {
        let role = argv.get(2).expect("child role").clone();
        child(&role, &argv[3..]);
        return;
    }
    let mut args = libtest_mimic::Arguments::from_args();
    if args.test_threads.is_none() {
        args.test_threads = Some(1);
    }
    let trials = trials
        .into_iter()
        .map(|(name, f)| {
            libtest_mimic::Trial::test(name, move || {
                f();
                Ok(())
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique segment name, unlinked when dropped (if it exists by then).
pub(crate) struct Segment(String);

impl Segment {
    pub(crate) fn new(tag: &str) -> Segment {
        Segment(format!(
            "shmdict-test-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ))
    }
    pub(crate) fn name(&self) -> &str {
        &self.0
    }
    /// The name as a child-process argument.
    pub(crate) fn arg(&self) -> String {
        self.0.clone()
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // Any kind of segment: unlink only removes the name.
        let _ = ShmDict::unlink(&self.0);
    }
}

/// A child process running a role of this binary. Killed (SIGKILL) and reaped
/// on drop if it still runs. Its stderr is collected for failure messages.
pub(crate) struct Proc {
    pub(crate) label: String,
    pub(crate) child: Child,
    status: Option<ExitStatus>,
    stderr: Option<thread::JoinHandle<String>>,
}

impl Proc {
    pub(crate) fn spawn<S: AsRef<std::ffi::OsStr>>(
        label: impl Into<String>,
        role: &str,
        args: &[S],
    ) -> Proc {
        let exe = std::env::current_exe().expect("current_exe");
        let mut all: Vec<std::ffi::OsString> = vec![CHILD_FLAG.into(), role.into()];
        all.extend(args.iter().map(|a| a.as_ref().to_owned()));
        Proc::spawn_program(label, exe, &all)
    }

    /// Starts `program` with `args` (for example this binary under
    /// `unshare`), with the same stdio handling as [`Proc::spawn`].
    pub(crate) fn spawn_program<S: AsRef<std::ffi::OsStr>>(
        label: impl Into<String>,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[S],
    ) -> Proc {
        let label = label.into();
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {label}: {e}"));
        let mut pipe = child.stderr.take().expect("piped stderr");
        let stderr = thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            s
        });
        Proc {
            label,
            child,
            status: None,
            stderr: Some(stderr),
        }
    }

    /// The exit status, if the child has exited (reaps it).
    pub(crate) fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Waits for this child to exit successfully (see [`wait_all`]).
    pub(crate) fn wait_ok(&mut self) {
        wait_all(std::slice::from_mut(self));
    }

    /// Panics with the child's stderr if it has exited (it should not have).
    pub(crate) fn assert_running(&mut self) {
        if self.poll().is_some() {
            panic!("{}", self.describe_failure());
        }
    }

    /// SIGKILL and reap. After this returns the kernel has finished the
    /// child's exit, including releasing the robust mutexes it held.
    pub(crate) fn kill(&mut self) {
        if self.poll().is_none() {
            let _ = self.child.kill();
            self.status = Some(self.child.wait().expect("wait"));
        }
    }

    /// What the child wrote to stderr (only after it exited).
    pub(crate) fn stderr_text(&mut self) -> String {
        self.stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }

    pub(crate) fn describe_failure(&mut self) -> String {
        let status = self
            .status
            .map_or("still running".into(), |s| s.to_string());
        let stderr = self.stderr_text();
        format!("{} failed ({status}); its stderr:\n{stderr}", self.label)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits for every child to exit successfully. Fails (killing the others) as
/// soon as one fails, or if any still runs after [`WATCHDOG`].
pub(crate) fn wait_all(procs: &mut [Proc]) {
    let deadline = Instant::now() + WATCHDOG;
    loop {
        let mut running = 0;
        for i in 0..procs.len() {
            match procs[i].poll() {
                None => running += 1,
                Some(s) if s.success() => {}
                Some(_) => {
                    for p in procs.iter_mut() {
                        p.kill();
                    }
                    panic!("{}", procs[i].describe_failure());
                }
            }
        }
        if running == 0 {
            return;
        }
        if Instant::now() > deadline {
            let mut hung = Vec::new();
            for p in procs.iter_mut() {
                if p.poll().is_none() {
                    hung.push(p.label.clone());
                    p.kill();
                }
            }
            panic!(
                "watchdog: {hung:?} still running after {WATCHDOG:?} (deadlock or livelock?); killed"
            );
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `f` on another thread and fails if it has not finished within
/// [`WATCHDOG`] (a hang in this process becomes a failure, not a stuck run).
pub(crate) fn with_watchdog<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(WATCHDOG) {
        Ok(v) => {
            let _ = handle.join();
            v
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("sender dropped without sending"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("watchdog: {what} did not finish within {WATCHDOG:?} (hang?)")
        }
    }
}

/// Deterministic pseudo-random numbers (SplitMix64).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub(crate) fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub(crate) fn u64_of(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(
        bytes
            .try_into()
            .unwrap_or_else(|_| panic!("counter value has {} bytes, not 8", bytes.len())),
    )
}

pub(crate) fn read_u64(d: &ShmDict, key: &str) -> u64 {
    d.get(key).expect("get").map_or(0, |v| u64_of(&v))
}

/// Every 16th call, gives the CPU away: called between a read and the write
/// that depends on it, so that processes interleave there even when they
/// share one core (a loaded machine), not only where they run in parallel.
pub(crate) fn widen_race_window(i: u64) {
    if i % 16 == 0 {
        thread::yield_now();
    }
}

/// `update` closure: +1 on a u64 LE counter (absent = 0).
pub(crate) fn incr(old: Option<&[u8]>) -> Option<Vec<u8>> {
    Some((old.map_or(0, u64_of) + 1).to_le_bytes().to_vec())
}

pub(crate) fn open_existing(name: &str) -> ShmDict {
    ShmDict::open(name).unwrap_or_else(|e| panic!("open {name}: {e}"))
}

pub(crate) fn create(seg: &Segment, capacity: usize, arena: usize) -> ShmDict {
    ShmDict::options()
        .capacity(capacity)
        .arena_bytes(arena)
        .create_new(true)
        .open(seg.name())
        .unwrap_or_else(|e| panic!("create {}: {e}", seg.name()))
}

/// A dictionary of fixed size (`Options::fixed_size(true)`): `Full` at
/// `capacity` keys or when the arena is full, for the trials of `Full`.
pub(crate) fn create_fixed(seg: &Segment, capacity: usize, arena: usize) -> ShmDict {
    ShmDict::options()
        .capacity(capacity)
        .arena_bytes(arena)
        .fixed_size(true)
        .create_new(true)
        .open(seg.name())
        .unwrap_or_else(|e| panic!("create {}: {e}", seg.name()))
}

// --- Start barrier: children count themselves in, the parent says go. ---

/// Child side: announce readiness, then wait for the parent's go.
pub(crate) fn child_barrier(ctl: &ShmDict, tag: &str) {
    ctl.update(format!("ready-{tag}"), incr)
        .expect("barrier update");
    let go = format!("go-{tag}");
    let deadline = Instant::now() + WATCHDOG;
    while !ctl.contains_key(&go).expect("barrier contains_key") {
        assert!(Instant::now() < deadline, "barrier {tag}: no go");
        thread::yield_now();
    }
}

/// Parent side: wait until `n` children are ready, then let them go.
pub(crate) fn release_barrier(ctl: &ShmDict, tag: &str, n: u64, procs: &mut [Proc]) {
    let deadline = Instant::now() + WATCHDOG;
    loop {
        let ready = read_u64(ctl, &format!("ready-{tag}"));
        assert!(ready <= n, "barrier {tag}: {ready} ready of {n}");
        if ready == n {
            ctl.insert(format!("go-{tag}"), b"").expect("go");
            return;
        }
        for p in procs.iter_mut() {
            if p.poll().is_some() {
                panic!("before barrier {tag}: {}", p.describe_failure());
            }
        }
        assert!(
            Instant::now() < deadline,
            "watchdog: barrier {tag}: only {ready} of {n} children ready"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

// --- Self-checking values ---

/// Lengths of the self-checking values' bodies: across block-size classes.
pub(crate) const LENS: [usize; 16] = [
    0, 1, 7, 8, 9, 15, 47, 48, 49, 63, 200, 1000, 1500, 4000, 4096, 9000,
];

/// A value that says which key it belongs to and which write produced it, and
/// whose whole content follows from those two: `[key][seq LE][body]`.
pub(crate) fn checked_value(key: u8, seq: u64) -> Vec<u8> {
    let h = mix(seq ^ (key as u64) << 56);
    let len = LENS[(h % LENS.len() as u64) as usize];
    let mut v = Vec::with_capacity(9 + len);
    v.push(key);
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend((0..len).map(|j| (h >> ((j % 8) * 8)) as u8 ^ (j / 8) as u8));
    v
}

/// The seq of a self-checking value of `key`, or why it is not one (torn,
/// mixed with another value, or another key's).
pub(crate) fn check_value(key: u8, v: &[u8]) -> Result<u64, String> {
    if v.len() < 9 {
        return Err(format!("value of key {key} is {} bytes: {v:02x?}", v.len()));
    }
    let seq = u64::from_le_bytes(v[1..9].try_into().unwrap());
    let expect = checked_value(key, seq);
    if v != expect.as_slice() {
        let first_diff = v.iter().zip(&expect).position(|(a, b)| a != b);
        return Err(format!(
            "torn or foreign value for key {key}: {} bytes (expected {} for seq {seq}), \
             first difference at byte {first_diff:?}",
            v.len(),
            expect.len()
        ));
    }
    Ok(seq)
}

/// Sends `sig` to a child that has not been reaped yet.
pub(crate) fn signal(p: &Proc, sig: i32) {
    let pid = p.child.id() as libc::pid_t;
    // SAFETY: kill has no memory-safety preconditions; `pid` is our own,
    // not yet reaped child, so it names no other process.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// Waits (polling, with a watchdog) until `key` is present in `d`, failing
/// early if `p` exits. Polls rather than using `wait_for`, so the trials of
/// `wait_for` do not depend on it to set themselves up.
pub(crate) fn await_key(d: &ShmDict, key: &str, p: &mut Proc) {
    let deadline = Instant::now() + WATCHDOG;
    while !d.contains_key(key).expect("contains_key") {
        p.assert_running();
        assert!(
            Instant::now() < deadline,
            "watchdog: {} never wrote {key}",
            p.label
        );
        thread::sleep(Duration::from_micros(200));
    }
}

// --- The keys of the SIGKILL scenarios ---

/// Keys `kill-0..kill-15` hold self-checking values in the kill scenarios.
pub(crate) const KILL_KEYS: u8 = 16;

pub(crate) fn kill_key(k: u8) -> String {
    format!("kill-{k}")
}

/// After a kill: every key can be written again (this waits for, and must
/// recover, any slot or lock word the dead process held); new keys can be
/// inserted and removed. Returns the counter "ctr" after one more increment.
pub(crate) fn write_everything(d: &ShmDict, round: u64) -> u64 {
    let seq = (round + 1) << 48;
    for k in 0..KILL_KEYS {
        let key = kill_key(k);
        let v1 = checked_value(k, seq + k as u64);
        d.insert(&key, &v1).expect("insert after kill");
        let v2 = checked_value(k, seq + 1000 + k as u64);
        let stored = d
            .update(&key, |old| {
                assert_eq!(
                    old,
                    Some(v1.as_slice()),
                    "round {round}: update sees insert"
                );
                Some(v2.clone())
            })
            .expect("update after kill");
        assert_eq!(stored, Some(v2.clone()));
        assert!(d.remove(&key).expect("remove after kill"));
        assert!(!d.contains_key(&key).unwrap());
        d.insert(&key, &v2).expect("re-insert after kill");
        assert_eq!(d.get(&key).unwrap(), Some(v2));
    }
    let ctr = u64_of(&d.update("ctr", incr).expect("update").unwrap());
    d.insert("ctr-seen", ctr.to_le_bytes()).expect("insert");
    for i in 0..64 {
        d.insert(format!("fresh-{round}-{i}"), [i as u8; 100])
            .expect("insert new key after kill");
    }
    for i in 0..64 {
        assert!(d.remove(format!("fresh-{round}-{i}")).expect("remove"));
    }
    ctr
}

/// The number of kill rounds a kill storm runs: `default`, or
/// `SHMDICT_KILL_ROUNDS` from the environment (to run a storm long enough
/// to catch rare interleavings, e.g. 1000).
pub(crate) fn kill_rounds(default: u64) -> u64 {
    std::env::var("SHMDICT_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The control dictionary of a kill storm: room for one `alive-<round>` key
/// per round however many rounds `SHMDICT_KILL_ROUNDS` asks for.
pub(crate) fn ctl_dict(seg: &Segment) -> ShmDict {
    let keys = 256.max(kill_rounds(0) as usize + 64);
    create(seg, keys, (keys * 256).max(1 << 16))
}
