//! Who holds what, across `fork`, threads and pid namespaces (issue 10).
//!
//! Regression tests, each of which failed before the ownership layer was
//! rebuilt on OFD locks and fork-aware registrations:
//!
//! - `fork_child_drop_keeps_parent_attached`: a forked child that dropped
//!   an inherited handle cleared the parent's attach entry (`detach` by the
//!   stored identity): the parent's `stats().attached` fell from (1, 0) to
//!   (0, 0) and what it held could be taken over.
//! - `fork_child_cannot_release_parents_array_lock`: the child's copy of an
//!   `Array::write()` guard released the parent's lock on drop, and its
//!   drop of the handle detached the parent; a third process then got
//!   `write()` while the parent still held it.
//! - `pid_namespace_peers_*`: a holder in another pid namespace (a process
//!   started with `unshare --pid --fork`, as a container sharing /dev/shm
//!   would be) was taken for dead after 100 ms: its thread id names nothing
//!   in our namespace, its /proc entry is invisible.
//! - `threads_and_processes_exclude_each_other`: threads of one handle and
//!   other processes, doing non-atomic read-modify-writes under each lock.

mod common;

use std::time::{Duration, Instant};

use common::{Proc, Segment, WATCHDOG};
use shmdict::{Array, ShmDict};

fn main() {
    common::run(
        vec![
            (
                "fork_child_drop_keeps_parent_attached",
                fork_child_drop_keeps_parent_attached,
            ),
            (
                "fork_child_cannot_release_parents_array_lock",
                fork_child_cannot_release_parents_array_lock,
            ),
            (
                "fork_child_registers_under_its_own_identity",
                fork_child_registers_under_its_own_identity,
            ),
            (
                "pid_namespace_peers_dict_lock",
                pid_namespace_peers_dict_lock,
            ),
            (
                "pid_namespace_peers_array_lock",
                pid_namespace_peers_array_lock,
            ),
            (
                "threads_and_processes_exclude_each_other",
                threads_and_processes_exclude_each_other,
            ),
            (
                "gc_never_removes_a_segment_being_opened",
                gc_never_removes_a_segment_being_opened,
            ),
            (
                "a_holder_whose_main_thread_exited_is_alive",
                a_holder_whose_main_thread_exited_is_alive,
            ),
        ],
        child,
    );
}

fn small(seg: &Segment) -> ShmDict {
    common::create(seg, 4096, 1 << 20)
}

/// Forks; the child runs `f` and leaves with `_exit(code)` (no destructors
/// of this process's other state, no test harness). Returns the child's
/// exit code.
fn in_forked_child(f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child only runs `f` (our own code, which drops handles and
    // touches shared memory) and `_exit`s; it never returns into the caller.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
        // SAFETY: _exit ends the child at once.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: `pid` is our child; `status` is a valid out-pointer.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid);
    assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
    libc::WEXITSTATUS(status)
}

fn fork_child_drop_keeps_parent_attached() {
    let seg = Segment::new("own-fork-drop");
    let d = small(&seg);
    assert_eq!(d.stats().attached, (1, 0));
    let d = std::cell::Cell::new(Some(d));
    let code = in_forked_child(|| {
        drop(d.take()); // the child's copy of the handle
        0
    });
    assert_eq!(code, 0);
    let d = d.take().unwrap();
    assert_eq!(
        d.stats().attached,
        (1, 0),
        "the child's drop must not detach the parent"
    );
    // And the parent's writes still work as its own.
    d.insert("k", "v").unwrap();
    assert_eq!(d.check().unwrap().handles_live, 1);
}

fn fork_child_registers_under_its_own_identity() {
    let seg = Segment::new("own-fork-reg");
    let d = small(&seg);
    let code = in_forked_child(|| {
        // Use the inherited handle: the child registers its own entry.
        d.insert("child", "1").unwrap();
        let (live, _) = d.stats().attached;
        // The parent and the child.
        if live == 2 {
            0
        } else {
            10 + live as i32
        }
    });
    assert_eq!(code, 0, "the child should see two live entries");
    assert_eq!(d.get("child").unwrap().as_deref(), Some(&b"1"[..]));
    // The child exited: its entry is dead, the parent's alive.
    assert_eq!(d.stats().attached, (1, 1));
}

fn fork_child_cannot_release_parents_array_lock() {
    let seg = Segment::new("own-fork-array");
    let ctl_seg = Segment::new("own-fork-ctl");
    let ctl = small(&ctl_seg);
    let a = Array::<u64>::open(seg.name(), 16).unwrap();
    let guard = a.write();
    let code = in_forked_child(|| {
        // The child has copies of the handle, the guard and `ctl`. It uses
        // its handles, then drops them all, the guard first.
        let n = a.len();
        ctl.insert("child-was-here", n.to_le_bytes()).unwrap();
        // SAFETY: `guard` and `a` are the child's own copies (fork
        // duplicated the memory); dropping them here is what leaving their
        // scope would do, and the originals are never used again in the
        // child (it `_exit`s).
        drop(unsafe { std::ptr::read(&guard) });
        // SAFETY: as above.
        drop(unsafe { std::ptr::read(&a) });
        0
    });
    assert_eq!(code, 0);
    assert!(ctl.contains_key("child-was-here").unwrap());
    // A third process must not get write() while we hold it.
    let mut p = Proc::spawn("array writer", "array-write", &[seg.arg(), ctl_seg.arg()]);
    common::await_key(&ctl, "writer-started", &mut p);
    std::thread::sleep(Duration::from_millis(1500));
    p.assert_running();
    assert!(
        !ctl.contains_key("writer-got-it").unwrap(),
        "another process got write() while the parent held it"
    );
    let info = shmdict::segments::info(seg.name()).unwrap();
    assert!(
        info.attached.is_some_and(|a| a.live >= 2),
        "the parent is still counted: {:?}",
        info.attached
    );
    drop(guard);
    p.wait_ok();
    assert_eq!(
        ctl.get("writer-got-it").unwrap().as_deref(),
        Some(&b"clean"[..]),
        "the writer took a lock released cleanly, not recovered"
    );
}

// --- Other pid namespaces ---

/// Whether this machine lets us start a process in a new pid namespace.
fn can_unshare() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("pid-namespace trial not run: it needs root (unshare --pid)");
        return false;
    }
    let ok = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("pid-namespace trial not run: `unshare --pid --fork` is not available here");
    }
    ok
}

/// A child role of this binary, run by `unshare` in a new pid namespace
/// (killed with SIGKILL when the returned Proc is killed: --kill-child).
fn spawn_in_new_pid_ns(label: &str, role: &str, args: &[String]) -> Proc {
    let exe = std::env::current_exe().unwrap();
    let mut all = vec![
        "--pid".to_owned(),
        "--fork".to_owned(),
        "--kill-child".to_owned(),
        exe.display().to_string(),
        common::CHILD_FLAG.to_owned(),
        role.to_owned(),
    ];
    all.extend_from_slice(args);
    Proc::spawn_program(label, "unshare", &all)
}

/// Waits (with a watchdog) until `key` is present, polling.
fn await_key(d: &ShmDict, key: &str, p: &mut Proc) {
    common::await_key(d, key, p)
}

/// A holder in one namespace, a waiter in the other: the waiter must wait
/// while the holder lives and recover promptly once it is killed.
fn ns_trial(kind: &str) {
    if !can_unshare() {
        return;
    }
    let seg = Segment::new("own-ns");
    let ctl_seg = Segment::new("own-ns-ctl");
    let ctl = small(&ctl_seg);
    // Create the shared object first (either process attaches).
    let _keep = small(&seg);
    if kind == "array" {
        Array::<u64>::open(&format!("{}-a", seg.name()), 8).unwrap();
    }
    for (holder_in_new_ns, tag) in [(true, "a"), (false, "b")] {
        let args = vec![seg.arg(), ctl_seg.arg(), kind.to_owned(), tag.to_owned()];
        let spawn = |label: &str, role: &str, new_ns: bool| {
            if new_ns {
                spawn_in_new_pid_ns(label, role, &args)
            } else {
                Proc::spawn(label, role, &args)
            }
        };
        let mut holder = spawn("holder", "ns-hold", holder_in_new_ns);
        await_key(&ctl, &format!("held-{tag}"), &mut holder);
        let mut waiter = spawn("waiter", "ns-take", !holder_in_new_ns);
        await_key(&ctl, &format!("waiting-{tag}"), &mut waiter);
        std::thread::sleep(Duration::from_millis(1500));
        waiter.assert_running();
        assert!(
            !ctl.contains_key(format!("got-{tag}")).unwrap(),
            "{kind} ({tag}): a live holder in another pid namespace was taken for dead"
        );
        // Now kill the holder: the waiter must take over, and say so.
        holder.kill();
        let deadline = Instant::now() + WATCHDOG;
        while !ctl.contains_key(format!("got-{tag}")).unwrap() {
            waiter.assert_running();
            assert!(Instant::now() < deadline, "{kind} ({tag}): never recovered");
            std::thread::sleep(Duration::from_millis(2));
        }
        waiter.wait_ok();
        assert_eq!(
            ctl.get(format!("got-{tag}")).unwrap().as_deref(),
            Some(&b"recovered"[..]),
            "{kind} ({tag})"
        );
    }
    let _ = Array::<u64>::unlink(&format!("{}-a", seg.name()));
}

fn pid_namespace_peers_dict_lock() {
    ns_trial("dict");
}

fn pid_namespace_peers_array_lock() {
    ns_trial("array");
}

// --- Threads and processes together ---

const THREADS: u64 = 3;
const PROCS: u64 = 2;
const ROUNDS: u64 = 300;

/// Each of PROCS processes (and this one) runs THREADS threads on one
/// handle, doing non-atomic read-modify-writes under `Array::write()` and
/// under `lock_keys`, and inserting the same new keys.
fn threads_and_processes_exclude_each_other() {
    let seg = Segment::new("own-threads");
    let arr = Segment::new("own-threads-a");
    let d = small(&seg);
    let a = Array::<u64>::open(arr.name(), 4).unwrap();
    let mut procs: Vec<Proc> = (0..PROCS)
        .map(|i| Proc::spawn(format!("worker {i}"), "rmw", &[seg.arg(), arr.arg()]))
        .collect();
    rmw_threads(&d, &a);
    common::wait_all(&mut procs);
    let n = (PROCS + 1) * THREADS * ROUNDS;
    assert_eq!(a.read()[0], n, "Array::write() lost an update");
    assert_eq!(
        common::read_u64(&d, "counter"),
        n,
        "lock_keys lost an update"
    );
    let keys = d.keys().unwrap();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), keys.len(), "a key has two entries");
    assert_eq!(d.len(), keys.len());
    assert_eq!(keys.len(), ROUNDS as usize / 10 + 1);
}

fn rmw_threads(d: &ShmDict, a: &Array<u64>) {
    std::thread::scope(|s| {
        for t in 0..THREADS {
            s.spawn(move || {
                for i in 0..ROUNDS {
                    {
                        let mut w = a.write();
                        let v = w[0];
                        common::widen_race_window(i + t);
                        w[0] = v + 1;
                    }
                    {
                        let _g = d.lock_keys(&["counter"]).unwrap();
                        let v = d.get("counter").unwrap().map_or(0, |b| common::u64_of(&b));
                        common::widen_race_window(i);
                        d.insert("counter", (v + 1).to_le_bytes()).unwrap();
                    }
                    // Same new keys from everyone: exactly one entry each.
                    if i % 10 == 0 {
                        let _ = d.update(format!("same-{i}"), |old| {
                            Some(old.map_or(vec![1], |o| vec![o[0].wrapping_add(1)]))
                        });
                        let k = format!("same-{i}");
                        let _ = d.remove(&k);
                        d.insert(&k, [t as u8]).unwrap();
                    }
                }
            });
        }
    });
}

// --- gc against openers ---

const GC_ROUNDS: u64 = 200;

/// `segments::gc` removes a segment whose attached processes all died. A
/// process between `shm_open` and attaching was not counted, so gc could
/// unlink the segment it was opening: the opener then wrote into a segment
/// nobody else could find. Each round leaves a dead entry in a fresh
/// segment, then races an opener against gc: whoever opened the segment
/// must find its write again by name.
fn gc_never_removes_a_segment_being_opened() {
    let prefix = format!("shmdict-test-gcrace-{}-", std::process::id());
    let mut lost = Vec::new();
    let mut opened = 0;
    for round in 0..GC_ROUNDS {
        let name = format!("{prefix}{round}");
        let seg = ShmDict::options()
            .capacity(64)
            .arena_bytes(64 * 1024)
            .open(&name)
            .unwrap();
        // A dead attach entry: a child that attaches and dies without
        // detaching (its copy of `seg` is dropped too, which detaches
        // nothing of ours).
        let code = in_forked_child(|| {
            let d = common::open_existing(&name);
            std::mem::forget(d);
            0
        });
        assert_eq!(code, 0);
        drop(seg);
        let result = std::thread::scope(|s| {
            let gc = s.spawn(|| shmdict::segments::Gc::new().prefix(&prefix).run().unwrap());
            let opener = s.spawn(|| {
                let d = ShmDict::options().create(false).open(&name).ok()?;
                d.insert("mine", round.to_le_bytes()).unwrap();
                Some(d)
            });
            (gc.join().unwrap(), opener.join().unwrap())
        });
        if let (_, Some(d)) = result {
            opened += 1;
            let found = ShmDict::options()
                .create(false)
                .open(&name)
                .ok()
                .and_then(|again| again.get("mine").unwrap());
            if found.as_deref() != Some(&round.to_le_bytes()[..]) {
                lost.push(round);
            }
            drop(d);
        }
        let _ = ShmDict::unlink(&name);
    }
    eprintln!("gc race: the opener won {opened} of {GC_ROUNDS} rounds");
    assert!(
        lost.is_empty(),
        "rounds where gc removed a segment that was being opened: {lost:?}"
    );
}

// --- A thread-group leader that exited ---

/// A process whose main thread called `pthread_exit` while another thread
/// holds `Array::write()`: /proc shows the process as a zombie (state `Z`),
/// but it runs. It was taken for dead and its lock taken over.
fn a_holder_whose_main_thread_exited_is_alive() {
    let seg = Segment::new("own-leader");
    let ctl_seg = Segment::new("own-leader-ctl");
    let ctl = small(&ctl_seg);
    let _a = Array::<u64>::open(seg.name(), 8).unwrap();
    let mut holder = Proc::spawn("holder", "leader-exits", &[seg.arg(), ctl_seg.arg()]);
    await_key(&ctl, "held", &mut holder);
    let pid = holder.child.id();
    let deadline = Instant::now() + WATCHDOG;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let state = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .next()
            .unwrap();
        if state == "Z" {
            break;
        }
        assert!(Instant::now() < deadline, "the main thread never exited");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut waiter = Proc::spawn(
        "waiter",
        "array-write",
        &[seg.arg(), ctl_seg.arg(), "8".to_owned()],
    );
    await_key(&ctl, "writer-started", &mut waiter);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !ctl.contains_key("writer-got-it").unwrap(),
        "a live holder whose main thread exited was taken for dead"
    );
    holder.kill();
    waiter.wait_ok();
    assert_eq!(
        ctl.get("writer-got-it").unwrap().as_deref(),
        Some(&b"recovered"[..])
    );
}

// --- Child roles ---

fn child(role: &str, args: &[String]) {
    match role {
        "array-write" => {
            let ctl = common::open_existing(&args[1]);
            let len = args.get(2).map_or(16, |l| l.parse().unwrap());
            let a = Array::<u64>::open(&args[0], len).unwrap();
            ctl.insert("writer-started", "1").unwrap();
            let g = a.write();
            let how: &str = if g.recovered() { "recovered" } else { "clean" };
            ctl.insert("writer-got-it", how).unwrap();
        }
        "ns-hold" => {
            let (d, ctl, kind, tag) = (
                common::open_existing(&args[0]),
                common::open_existing(&args[1]),
                &args[2],
                &args[3],
            );
            let hold = || {
                ctl.insert(format!("held-{tag}"), "1").unwrap();
                // Hold until killed.
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                }
            };
            if kind == "array" {
                let a = Array::<u64>::open(&format!("{}-a", args[0]), 8).unwrap();
                let _g = a.write();
                hold()
            } else {
                let _g = d.lock().unwrap();
                hold()
            }
        }
        "ns-take" => {
            let (d, ctl, kind, tag) = (
                common::open_existing(&args[0]),
                common::open_existing(&args[1]),
                &args[2],
                &args[3],
            );
            ctl.insert(format!("waiting-{tag}"), "1").unwrap();
            let recovered = if kind == "array" {
                let a = Array::<u64>::open(&format!("{}-a", args[0]), 8).unwrap();
                let g = a.write();
                g.recovered()
            } else {
                d.lock().unwrap().recovered()
            };
            let how: &str = if recovered { "recovered" } else { "clean" };
            ctl.insert(format!("got-{tag}"), how).unwrap();
        }
        "leader-exits" => {
            let ctl = common::open_existing(&args[1]);
            let name = args[0].clone();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let a = Array::<u64>::open(&name, 8).unwrap();
                let _g = a.write();
                tx.send(()).unwrap();
                ctl.insert("held", "1").unwrap();
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
            rx.recv().unwrap();
            // SAFETY: the raw `exit` system call ends only the calling (main)
            // thread, without unwinding; the process and the holding thread
            // go on. The other thread uses nothing of the main thread's.
            unsafe { libc::syscall(libc::SYS_exit, 0) };
        }
        "rmw" => {
            let d = common::open_existing(&args[0]);
            let a = Array::<u64>::open(&args[1], 4).unwrap();
            rmw_threads(&d, &a);
        }
        other => panic!("unknown role {other}"),
    }
}
