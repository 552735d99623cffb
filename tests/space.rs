//! The tuple space (`shmdict::space`) with real, unrelated processes.
//!
//! Like `tests/crash.rs`, the test binary re-executes itself as child
//! processes: `argv[1] == "--shmdict-child"` selects a child role (see
//! [`child_main`]); otherwise `main` runs the scenarios as libtest-mimic
//! trials. What is shown:
//!
//! - patterns select by exact value, kind, predicate and arity; `read` does
//!   not remove; `take` is FIFO within a first field; the index keeps a
//!   search away from other arities and other first fields (counted with
//!   `stats().examined`);
//! - blocked `take`/`read` wake when a matching tuple arrives, across
//!   threads and processes, time out otherwise, and are not woken by
//!   unrelated tuples (counted with `stats().scans`);
//! - producers and consumers in separate processes: every tuple is taken
//!   exactly once, none is lost;
//! - takers SIGKILLed at random moments inside `take_into` lose no tuple:
//!   each is still in the space, or in exactly one inbox, or was recorded
//!   by its taker, and none twice; with plain `take`, nothing is duplicated
//!   and at most the one tuple a taker held when killed is gone;
//! - `eval` workers run a function with the space, and one that panics
//!   posts an error tuple; `eval` refuses a multi-threaded caller.
//!
//! Every segment has a unique name and is unlinked by a guard; every child
//! is killed and reaped by a guard; whatever could hang runs under a
//! watchdog; no test asserts a maximum duration.

use std::collections::{BTreeSet, HashSet};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

mod common;

use common::*;
use shmdict::space::{Field, FieldKind, Match, Space, Tuple, Worker, PANIC_EXIT_CODE};
use shmdict::{pattern, tuple, Error, ShmDict};

fn main() {
    let trials: Vec<(&str, fn())> = vec![
        (
            "patterns_select_by_value_kind_predicate_and_arity",
            patterns_select,
        ),
        (
            "index_keeps_searches_to_their_arity_and_first_field",
            index_limits_searches,
        ),
        (
            "blocked_take_and_read_wake_across_threads_and_time_out",
            blocking_in_process,
        ),
        (
            "blocked_take_wakes_only_for_matching_tuples_across_processes",
            wakes_only_for_matching,
        ),
        (
            "concurrent_takers_in_processes_take_each_tuple_exactly_once",
            exactly_once_across_processes,
        ),
        (
            "takers_sigkilled_inside_take_into_lose_no_tuple",
            sigkilled_take_into,
        ),
        (
            "takers_sigkilled_inside_take_never_duplicate",
            sigkilled_plain_take,
        ),
        ("eval_workers_run_and_report_panics", eval_workers),
        (
            "eval_workers_exit_when_their_parent_is_sigkilled",
            eval_parent_killed,
        ),
        ("eval_on_an_unlinked_name_is_an_error", eval_unlinked),
        (
            "a_full_arena_drains_by_take_and_take_into",
            full_arena_drains,
        ),
        (
            "take_into_whose_finish_finds_no_room_leaves_no_hidden_claim",
            take_into_finish_without_room,
        ),
        (
            "a_space_grows_past_its_initial_size_and_stops_at_max_bytes",
            space_grows,
        ),
    ];
    common::run(trials, child_main);
}

// ---------------------------------------------------------------------------
// Guards and helpers
// ---------------------------------------------------------------------------

fn create_space(seg: &Segment) -> Space {
    let dict = ShmDict::options()
        .capacity(4096)
        .arena_bytes(64 << 20)
        .create_new(true)
        .open(seg.name())
        .unwrap_or_else(|e| panic!("create {}: {e}", seg.name()));
    Space::from_dict(dict)
}

fn create_ctl(seg: &Segment) -> ShmDict {
    ShmDict::options()
        .capacity(1 << 14)
        .arena_bytes(16 << 20)
        .create_new(true)
        .open(seg.name())
        .unwrap_or_else(|e| panic!("create {}: {e}", seg.name()))
}

fn u64_at(ctl: &ShmDict, key: &str) -> u64 {
    ctl.typed::<u64>().get(key).expect("get").unwrap_or(0)
}

fn job_value(t: &Tuple) -> i64 {
    assert_eq!(t.str(0), Some("job"), "not a job tuple: {t:?}");
    t.i64(1)
        .unwrap_or_else(|| panic!("job without an integer: {t:?}"))
}

// ---------------------------------------------------------------------------
// Child roles
// ---------------------------------------------------------------------------

fn child_main(role: &str, args: &[String]) {
    let arg = |i: usize| {
        args.get(i)
            .unwrap_or_else(|| panic!("{role}: argument {i}"))
    };
    let num = |i: usize| -> i64 { arg(i).parse().expect("numeric argument") };
    match role {
        "produce" => child_produce(arg(0), num(1), num(2)),
        "consume" => child_consume(arg(0), arg(1), arg(2)),
        "take-one" => child_take_one(arg(0), arg(1), arg(2)),
        "take-loop" => child_take_loop(arg(0), arg(1), arg(2), arg(3) == "into"),
        "eval-driver" => child_eval_driver(arg(0)),
        "eval-parent" => child_eval_parent(arg(0)),
        "eval-unlinked" => child_eval_unlinked(arg(0)),
        "take-n" => child_take_n(arg(0), num(1)),
        other => panic!("unknown child role {other}"),
    }
}

fn open_space(name: &str) -> Space {
    Space::open(name).unwrap_or_else(|e| panic!("open space {name}: {e}"))
}

fn open_ctl(name: &str) -> ShmDict {
    ShmDict::open(name).unwrap_or_else(|e| panic!("open ctl {name}: {e}"))
}

/// Posts `("job", first + i)` for `i` in `0..n`.
fn child_produce(space: &str, first: i64, n: i64) {
    let s = open_space(space);
    for i in 0..n {
        s.out(tuple!("job", first + i)).expect("out");
    }
}

/// Takes jobs until it takes `("job", -1)`; stores what it took in
/// `ctl[taken-<tag>]`.
fn child_consume(space: &str, ctl: &str, tag: &str) {
    let (s, ctl) = (open_space(space), open_ctl(ctl));
    let mut taken = Vec::new();
    loop {
        let t = s
            .take(&pattern!("job", FieldKind::I64), WATCHDOG)
            .expect("take")
            .expect("watchdog: no job came");
        match job_value(&t) {
            -1 => break,
            v => taken.push(v),
        }
    }
    ctl.typed::<Vec<i64>>()
        .insert(format!("taken-{tag}"), &taken)
        .expect("record");
}

/// Blocks on `(tag, _)`; stores the value and its search count.
fn child_take_one(space: &str, ctl: &str, tag: &str) {
    let (s, ctl) = (open_space(space), open_ctl(ctl));
    ctl.insert(format!("waiting-{tag}"), b"").expect("announce");
    let t = s
        .take(&pattern!(tag, _), WATCHDOG)
        .expect("take")
        .expect("watchdog: nothing came");
    let got = (t.i64(1).expect("integer"), s.stats().scans);
    ctl.typed::<(i64, u64)>()
        .insert(format!("got-{tag}"), &got)
        .expect("record");
}

/// Takes jobs (with `take_into(.., inbox)` or plain `take`) until killed,
/// recording each in `ctl[done-<v>]`; a job taken twice is reported in
/// `ctl[dup-<v>]` and fails the child.
fn child_take_loop(space: &str, ctl: &str, inbox: &str, into: bool) {
    let (s, ctl) = (open_space(space), open_ctl(ctl));
    // Jobs are spread over 32 first fields: a wildcard take over 64 buckets.
    let p = pattern!(FieldKind::I64, FieldKind::I64);
    let mut reported = 0;
    loop {
        let t = (if into {
            s.take_into(&p, WATCHDOG, inbox).expect("take_into")
        } else {
            s.take(&p, WATCHDOG).expect("take")
        })
        .expect("watchdog: no job came (the parent should have killed us)");
        let v = t.i64(1).expect("a job");
        let mut seen = false;
        ctl.update(format!("done-{v}"), |old| {
            seen = old.is_some();
            Some(inbox.as_bytes().to_vec())
        })
        .expect("record");
        if seen {
            ctl.insert(format!("dup-{v}"), inbox).expect("record dup");
            panic!("job {v} taken twice");
        }
        ctl.typed::<u64>()
            .update(format!("progress-{inbox}"), |n| Some(n.unwrap_or(0) + 1))
            .expect("progress");
        // Claims of killed takers this one resolved (a diagnostic).
        let resolved = s.stats().recovered_claims;
        if resolved > reported {
            ctl.typed::<u64>()
                .update("resolved", |n| Some(n.unwrap_or(0) + resolved - reported))
                .expect("resolved");
            reported = resolved;
        }
    }
}

/// Kills a worker on drop (and reaps it), so a failing driver leaves none.
struct KillOnDrop(Worker);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.join();
    }
}

/// Runs in a single-threaded child: `eval` forks it.
fn child_eval_driver(space: &str) {
    let s = open_space(space);
    let minute = Duration::from_secs(60);

    // A worker that squares a number it takes from the space.
    let mut squarer = KillOnDrop(
        s.eval(move |ts| {
            let t = ts
                .take(&pattern!("n", FieldKind::I64), minute)
                .unwrap()
                .expect("n");
            let n = t.i64(1).unwrap();
            ts.out(tuple!("sq", n * n)).unwrap();
        })
        .expect("eval"),
    );
    // A worker that panics.
    let mut failing = KillOnDrop(s.eval(|_| panic!("deliberate failure 42")).expect("eval"));
    s.out(tuple!("n", 7)).unwrap();
    assert_eq!(
        s.take(&pattern!("sq", _), minute).unwrap(),
        Some(tuple!("sq", 49))
    );
    assert!(squarer.0.join().unwrap().success());
    let status = failing.0.join().unwrap();
    assert_eq!(status.code(), Some(PANIC_EXIT_CODE), "{status}");
    let err = s
        .take(&pattern!("error", FieldKind::Str), minute)
        .unwrap()
        .expect("error tuple");
    let msg = err.str(1).unwrap();
    assert!(msg.contains("deliberate failure 42"), "{msg}");
    assert!(msg.contains(&failing.0.pid().to_string()), "{msg}");

    // A worker blocked forever can be killed.
    let mut blocked = KillOnDrop(
        s.eval(|ts| {
            ts.out(tuple!("blocked-ready")).unwrap();
            let _ = ts.take(&pattern!("never"), Duration::MAX);
        })
        .expect("eval"),
    );
    // Once it has attached (and said so), it blocks.
    assert!(s
        .take(&pattern!("blocked-ready"), minute)
        .unwrap()
        .is_some());
    assert_eq!(blocked.0.try_join().unwrap(), None, "still blocked");
    blocked.0.kill().unwrap();
    let status = blocked.0.join().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    assert_eq!(s.len().unwrap(), 0, "the space is empty again");
    // Forked workers attach under their own identity, not their parent's:
    // the killed one's attach entry counts as dead (with the parent's
    // identity, what it held would look alive while the parent lives).
    let (live, dead) = s.dict().stats().attached;
    assert!(
        dead >= 1,
        "workers that exited without detaching count as dead: {live} live, {dead} dead"
    );

    // With another thread running, eval refuses to fork.
    let (tx, rx) = mpsc::channel::<()>();
    let t = thread::spawn(move || {
        let _ = rx.recv();
    });
    match s.eval(|_| {}) {
        Err(Error::InvalidArgument { reason, .. }) => {
            assert!(reason.contains("threads"), "{reason}")
        }
        other => panic!("eval in a 2-thread process: {other:?}"),
    }
    drop(tx);
    t.join().unwrap();
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Job {
    id: u32,
    owner: String,
}

fn patterns_select() {
    let seg = Segment::new("patterns");
    let s = create_space(&seg);
    s.out(tuple!("a", 1)).unwrap();
    s.out(tuple!("a", 2.5)).unwrap();
    s.out(tuple!("b", 1)).unwrap();
    s.out(tuple!(1, 2, 3)).unwrap();
    let job = Job {
        id: 7,
        owner: "alice".into(),
    };
    s.out(tuple!("opaque", Field::opaque(&job).unwrap()))
        .unwrap();
    assert_eq!(s.len().unwrap(), 5);

    // read does not remove; kinds select.
    assert_eq!(
        s.try_read(&pattern!("a", FieldKind::F64)).unwrap(),
        Some(tuple!("a", 2.5))
    );
    assert_eq!(s.len().unwrap(), 5);
    // FIFO within a first field.
    assert_eq!(s.try_take(&pattern!("a", _)).unwrap(), Some(tuple!("a", 1)));
    assert_eq!(
        s.try_take(&pattern!("a", _)).unwrap(),
        Some(tuple!("a", 2.5))
    );
    assert_eq!(s.try_take(&pattern!("a", _)).unwrap(), None);
    // Arity must match.
    assert_eq!(s.try_take(&pattern!("b")).unwrap(), None);
    assert_eq!(s.try_take(&pattern!("b", _, _)).unwrap(), None);
    // A wildcard first field.
    assert_eq!(s.try_take(&pattern!(_, 1)).unwrap(), Some(tuple!("b", 1)));
    // Predicates run here, on any field.
    let p = pattern!(
        FieldKind::I64,
        Match::pred(|f| f.as_i64() == Some(2)),
        Match::pred(|f| f.as_i64().is_some_and(|v| v > 2))
    );
    assert_eq!(
        s.try_read(&pattern!(_, _, Match::pred(|_| false))).unwrap(),
        None
    );
    assert_eq!(s.try_take(&p).unwrap(), Some(tuple!(1, 2, 3)));
    // Serde values travel opaquely.
    let t = s
        .try_take(&pattern!("opaque", FieldKind::Opaque))
        .unwrap()
        .unwrap();
    assert_eq!(t.decode::<Job>(1), Some(job));
    assert!(s.is_empty().unwrap());

    // Floats match bitwise; the empty tuple is a tuple.
    s.out(tuple!("f", 0.0)).unwrap();
    assert_eq!(s.try_take(&pattern!("f", -0.0)).unwrap(), None);
    assert_eq!(
        s.try_take(&pattern!("f", 0.0)).unwrap(),
        Some(tuple!("f", 0.0))
    );
    s.out(tuple!()).unwrap();
    assert_eq!(s.try_take(&pattern!()).unwrap(), Some(tuple!()));
    // Bytes and strings are different kinds.
    s.out(tuple!(b"k", "v")).unwrap();
    assert_eq!(s.try_take(&pattern!("k", _)).unwrap(), None);
    assert_eq!(
        s.try_take(&pattern!(b"k", "v")).unwrap(),
        Some(tuple!(b"k", "v"))
    );

    // Many first fields share 64 buckets: each is still found exactly.
    for i in 0..300 {
        s.out(tuple!(format!("k{i}"), i)).unwrap();
    }
    for i in (0..300).rev() {
        let t = s.try_take(&pattern!(format!("k{i}"), _)).unwrap();
        assert_eq!(t, Some(tuple!(format!("k{i}"), i)));
    }
    assert!(s.is_empty().unwrap());

    // Limits are errors, not panics.
    let big = Tuple::new(vec![Field::from(0); 256]);
    assert!(matches!(s.out(big), Err(Error::InvalidArgument { .. })));
    assert!(matches!(
        s.take_into(&pattern!("x"), Duration::ZERO, ""),
        Err(Error::InvalidArgument { .. })
    ));
}

fn index_limits_searches() {
    let seg = Segment::new("index");
    let s = create_space(&seg);
    for i in 0..1000 {
        s.out(tuple!(format!("noise{i}"), i, i)).unwrap(); // arity 3
        s.out(tuple!("noise", i)).unwrap(); // arity 2, one first field
    }
    for i in 0..5 {
        s.out(tuple!("x", i)).unwrap();
    }
    s.out(tuple!(true, 1)).unwrap();

    // An exact first field: one bucket. "noise" could share it (with
    // probability 1/64; then 1000 more tuples would be examined); it does
    // not: the hash is fixed, so this is deterministic.
    let before = s.stats().examined;
    assert_eq!(s.try_take(&pattern!("x", 4)).unwrap(), Some(tuple!("x", 4)));
    let examined = s.stats().examined - before;
    assert!(
        examined <= 5,
        "an exact first field examined {examined} tuples"
    );

    // A wildcard first field: only tuples of that arity (2), never the
    // 1000 of arity 3; the ("noise", i) may be examined, as candidates.
    let before = s.stats().examined;
    assert_eq!(
        s.try_take(&pattern!(FieldKind::Bool, _)).unwrap(),
        Some(tuple!(true, 1))
    );
    let examined = s.stats().examined - before;
    assert!(
        (1..=1000 + 5).contains(&examined),
        "a wildcard over arity 2 examined {examined} tuples (arity 3 has 1000)"
    );
    assert_eq!(s.len().unwrap(), 1000 + 1000 + 4);

    // Arity 4 was never posted: nothing is examined at all.
    let before = s.stats().examined;
    assert_eq!(s.try_take(&pattern!(_, _, _, _)).unwrap(), None);
    assert_eq!(s.stats().examined, before);
}

fn blocking_in_process() {
    let seg = Segment::new("blocking");
    let s = Arc::new(create_space(&seg));

    // Timeout: None, after at least the timeout.
    let start = Instant::now();
    let got = s
        .take(&pattern!("none", _), Duration::from_millis(50))
        .unwrap();
    assert_eq!(got, None);
    assert!(start.elapsed() >= Duration::from_millis(50));

    let s2 = s.clone();
    with_watchdog("blocked take and reads", move || {
        let s = s2;
        // Two readers and one taker block on ("x", _).
        let spawn_wait = |take: bool| {
            let s = s.clone();
            thread::spawn(move || {
                let p = pattern!("x", _);
                if take {
                    s.take(&p, WATCHDOG).unwrap()
                } else {
                    s.read(&p, WATCHDOG).unwrap()
                }
            })
        };
        let readers = [spawn_wait(false), spawn_wait(false)];
        thread::sleep(Duration::from_millis(50));
        // The readers see the tuple and leave it for the taker.
        s.out(tuple!("x", 1)).unwrap();
        for r in readers {
            assert_eq!(r.join().unwrap(), Some(tuple!("x", 1)));
        }
        let taker = spawn_wait(true);
        assert_eq!(taker.join().unwrap(), Some(tuple!("x", 1)));
        assert!(s.is_empty().unwrap());

        // Two takers, one tuple: exactly one gets it; the other times out.
        let takers: Vec<_> = (0..2)
            .map(|_| {
                let s = s.clone();
                thread::spawn(move || {
                    s.take(&pattern!("y", _), Duration::from_millis(800))
                        .unwrap()
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(50));
        s.out(tuple!("y", 2)).unwrap();
        let got: Vec<_> = takers.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(got.iter().filter(|g| g.is_some()).count(), 1, "{got:?}");
    });
}

fn wakes_only_for_matching() {
    let (seg, ctl_seg) = (Segment::new("wake"), Segment::new("wake-ctl"));
    let s = create_space(&seg);
    let ctl = create_ctl(&ctl_seg);
    let mut a = Proc::spawn("taker a", "take-one", &[seg.name(), ctl_seg.name(), "a"]);
    let mut b = Proc::spawn("taker b", "take-one", &[seg.name(), ctl_seg.name(), "b"]);
    await_key(&ctl, "waiting-a", &mut a);
    await_key(&ctl, "waiting-b", &mut b);
    thread::sleep(Duration::from_millis(100)); // let them fall asleep

    // Many unrelated tuples: same arity, other first fields.
    const UNRELATED: i64 = 300;
    for i in 0..UNRELATED {
        s.out(tuple!("c", i)).unwrap();
        thread::sleep(Duration::from_micros(200));
    }
    a.assert_running();
    b.assert_running();
    assert!(!ctl.contains_key("got-a").unwrap());

    s.out(tuple!("a", 7)).unwrap();
    a.wait_ok();
    let (v, scans) = ctl.typed::<(i64, u64)>().get("got-a").unwrap().unwrap();
    assert_eq!(v, 7);
    // Woken by each unrelated tuple, it would have searched ~300 times;
    // it searched once before sleeping, once per wake-up, plus about one
    // per second of the sleep cap.
    assert!(scans <= 20, "a blocked take searched {scans} times");
    b.assert_running();
    s.out(tuple!("b", 8)).unwrap();
    b.wait_ok();
    assert_eq!(
        ctl.typed::<(i64, u64)>().get("got-b").unwrap().unwrap().0,
        8
    );
    assert_eq!(s.len().unwrap(), UNRELATED as usize);
}

fn exactly_once_across_processes() {
    let (seg, ctl_seg) = (Segment::new("once"), Segment::new("once-ctl"));
    let s = create_space(&seg);
    let ctl = create_ctl(&ctl_seg);
    const PER_PRODUCER: i64 = 500;
    const CONSUMERS: usize = 3;
    let mut consumers: Vec<Proc> = (0..CONSUMERS)
        .map(|c| {
            let tag = c.to_string();
            Proc::spawn(
                format!("consumer {c}"),
                "consume",
                &[seg.name(), ctl_seg.name(), tag.as_str()],
            )
        })
        .collect();
    let mut producers: Vec<Proc> = (0..2)
        .map(|p| {
            let first = (p as i64 * PER_PRODUCER).to_string();
            let n = PER_PRODUCER.to_string();
            Proc::spawn(
                format!("producer {p}"),
                "produce",
                &[seg.name(), first.as_str(), n.as_str()],
            )
        })
        .collect();
    wait_all(&mut producers);
    for _ in 0..CONSUMERS {
        s.out(tuple!("job", -1)).unwrap();
    }
    wait_all(&mut consumers);

    let mut all = Vec::new();
    for c in 0..CONSUMERS {
        let taken = ctl
            .typed::<Vec<i64>>()
            .get(format!("taken-{c}"))
            .unwrap()
            .expect("consumer record");
        all.extend(taken);
    }
    let distinct: HashSet<i64> = all.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "a tuple was taken twice");
    assert_eq!(
        distinct,
        (0..2 * PER_PRODUCER).collect::<HashSet<_>>(),
        "a tuple was lost"
    );
    assert!(s.is_empty().unwrap());
}

/// The kill scenarios: posts jobs, kills pairs of racing takers
/// (`take_into` if `into`, else plain `take`) at random moments, then
/// accounts for every job.
fn kill_rounds(into: bool) {
    let tag = if into { "kill-into" } else { "kill-take" };
    let (seg, ctl_seg) = (Segment::new(tag), Segment::new(&format!("{tag}-ctl")));
    let s = create_space(&seg);
    let ctl = create_ctl(&ctl_seg);
    const JOBS: i64 = 6000;
    const ROUNDS: u64 = 25;
    for v in 0..JOBS {
        s.out(tuple!(v % 32, v)).unwrap();
    }
    let mut rng = Rng(if into { 17 } else { 23 });
    let mut inboxes = Vec::new();
    let mut kills = 0;
    let job = pattern!(FieldKind::I64, FieldKind::I64);
    for round in 0..ROUNDS {
        if s.try_read(&job).unwrap().is_none() {
            break; // all taken (plain takes are fast)
        }
        // Two takers race each other, then both are killed mid-loop.
        let mut procs: Vec<Proc> = (0..2)
            .map(|k| {
                let inbox = format!("w{round}-{k}");
                inboxes.push(inbox.clone());
                let mode = if into { "into" } else { "plain" };
                Proc::spawn(
                    format!("taker {inbox}"),
                    "take-loop",
                    &[seg.name(), ctl_seg.name(), inbox.as_str(), mode],
                )
            })
            .collect();
        for (k, p) in procs.iter_mut().enumerate() {
            let inbox = &inboxes[inboxes.len() - 2 + k];
            // Wait until it is inside its loop, then let it run a little.
            let deadline = Instant::now() + WATCHDOG;
            while u64_at(&ctl, &format!("progress-{inbox}")) == 0 {
                if s.try_read(&job).unwrap().is_none() {
                    break;
                }
                p.assert_running();
                assert!(
                    Instant::now() < deadline,
                    "watchdog: {} took nothing",
                    p.label
                );
                thread::sleep(Duration::from_micros(100));
            }
        }
        thread::sleep(Duration::from_micros(rng.below(1000)));
        for p in procs.iter_mut() {
            p.assert_running(); // a duplicate would have failed it
            p.kill();
            kills += 1;
        }
    }
    assert!(
        ctl.keys().unwrap().iter().all(|k| !k.starts_with(b"dup-")),
        "a job was taken twice"
    );

    // Everything still in the space can be taken (dead claims resolved).
    let mut drained = BTreeSet::new();
    while let Some(t) = s.try_take(&job).unwrap() {
        assert!(drained.insert(t.i64(1).unwrap()), "drained twice: {t:?}");
    }
    assert!(s.is_empty().unwrap(), "tuples left behind");
    let done: BTreeSet<i64> = ctl
        .keys()
        .unwrap()
        .iter()
        .filter_map(|k| k.strip_prefix(b"done-"))
        .map(|v| std::str::from_utf8(v).unwrap().parse().unwrap())
        .collect();
    assert!(
        done.is_disjoint(&drained),
        "taken and still in the space: {:?}",
        done.intersection(&drained).collect::<Vec<_>>()
    );
    assert!(!done.is_empty(), "the takers took nothing");
    let mut accounted: BTreeSet<i64> = done.union(&drained).copied().collect();
    if into {
        // What each killed taker held is in its inbox; nothing is lost.
        for inbox in &inboxes {
            if let Some(t) = s.clear_inbox(inbox).unwrap() {
                let v = t.i64(1).unwrap();
                assert!(
                    !drained.contains(&v),
                    "job {v} in an inbox and in the space"
                );
                accounted.insert(v);
            }
        }
        assert_eq!(
            accounted,
            (0..JOBS).collect::<BTreeSet<_>>(),
            "lost: {:?}",
            (0..JOBS)
                .filter(|v| !accounted.contains(v))
                .collect::<Vec<_>>()
        );
    } else {
        // A plain take killed after removing a tuple but before the taker
        // recorded it took it (and then died): at most one per kill.
        let lost = JOBS as usize - accounted.len();
        assert!(
            lost <= kills,
            "{lost} jobs unaccounted for after {kills} kills"
        );
    }
    eprintln!(
        "{tag}: {kills} kills, {} recorded, {} left in the space, {} only in an inbox, \
         {} claims of killed takers resolved",
        done.len(),
        drained.len(),
        accounted.len() - done.len() - drained.len(),
        s.stats().recovered_claims + u64_at(&ctl, "resolved")
    );
}

fn sigkilled_take_into() {
    kill_rounds(true);
}

fn sigkilled_plain_take() {
    kill_rounds(false);
}

fn eval_workers() {
    let seg = Segment::new("eval");
    let s = create_space(&seg);
    let mut driver = Proc::spawn("eval driver", "eval-driver", &[seg.name()]);
    driver.wait_ok();
    assert!(s.is_empty().unwrap());
}

/// Starts an `eval` worker that posts its pid and blocks in a `take`
/// forever, then waits to be killed.
fn child_eval_parent(space: &str) {
    let s = open_space(space);
    let worker = s
        .eval(|ts| {
            ts.out(tuple!("worker-pid", i64::from(std::process::id())))
                .unwrap();
            let _ = ts.take(&pattern!("never"), Duration::MAX);
        })
        .expect("eval");
    std::mem::forget(worker);
    s.out(tuple!("parent-ready")).unwrap();
    thread::sleep(Duration::from_secs(3600));
}

/// `eval` on a space whose name was unlinked: `NotFound`, and no new
/// segment of that name.
fn child_eval_unlinked(space: &str) {
    let s = open_space(space);
    Space::unlink(space).expect("unlink");
    let r = s.eval(|ts| {
        let _ = ts.out(tuple!("created a new space"));
    });
    let exists = std::path::Path::new(&format!("/dev/shm/{space}")).exists();
    match r {
        Err(Error::NotFound { segment }) => assert_eq!(segment, space),
        other => panic!("eval on an unlinked name: expected NotFound, got {other:?}"),
    }
    assert!(!exists, "eval created a new segment named {space}");
}

/// Whether process `pid` has ended (gone, or a zombie nobody reaped yet).
fn process_ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// Regression (issue 10, item 6): an `eval` worker blocked in `take` kept
/// running forever after its parent was SIGKILLed. Now it gets SIGKILL
/// with its parent (parent-death signal).
fn eval_parent_killed() {
    let seg = Segment::new("eval-orphan");
    let s = create_space(&seg);
    let mut parent = Proc::spawn("eval parent", "eval-parent", &[seg.name()]);
    let minute = Duration::from_secs(60);
    let t = s
        .read(&pattern!("worker-pid", FieldKind::I64), minute)
        .unwrap()
        .expect("the worker started");
    let worker = t.i64(1).unwrap() as u32;
    assert!(s.read(&pattern!("parent-ready"), minute).unwrap().is_some());
    assert!(!process_ended(worker), "the worker runs before the kill");
    parent.kill();
    // A generous bound turns a worker that outlives its parent into a
    // failure; no duration is asserted otherwise.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !process_ended(worker) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    let outlived = !process_ended(worker);
    if outlived {
        // Kill it ourselves, or the parent's stderr pipe never closes.
        signal_pid(worker, libc::SIGKILL);
    }
    assert!(
        !outlived,
        "eval worker {worker} still ran 20 s after its parent was SIGKILLed"
    );
}

fn signal_pid(pid: u32, sig: i32) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("pid");
    let _ = rustix::process::kill_process(
        pid,
        rustix::process::Signal::from_named_raw(sig).expect("signal"),
    );
}

fn eval_unlinked() {
    let seg = Segment::new("eval-unlinked");
    let _s = create_space(&seg);
    let mut p = Proc::spawn("eval on an unlinked name", "eval-unlinked", &[seg.name()]);
    p.wait_ok();
}

/// A small space (64 KiB arena) for the full-arena trials.
fn small_space(seg: &Segment) -> Space {
    let dict = ShmDict::options()
        .capacity(4096)
        .arena_bytes(64 << 10)
        .fixed_size(true)
        .create_new(true)
        .open(seg.name())
        .unwrap_or_else(|e| panic!("create {}: {e}", seg.name()));
    Space::from_dict(dict)
}

/// Posts `(i % 16, i, payload)` until `out` says `Full`; returns how many
/// were posted. Any other error fails the trial.
fn fill_with_tuples(s: &Space, payload: usize) -> i64 {
    let mut n = 0i64;
    loop {
        match s.out(tuple!(n % 16, n, vec![n as u8; payload])) {
            Ok(()) => n += 1,
            Err(Error::Full { .. }) => return n,
            Err(e) => panic!("out #{n}: {e}"),
        }
        assert!(n < 100_000, "a 64 KiB arena never filled");
    }
}

/// Regression (issue 10, item 7): in a full arena, `take` failed with
/// `Full`: removing a tuple rewrites its bucket smaller, and copy-on-write
/// needs a new block for that. A full space could not be drained. Now each
/// bucket keeps a reserve block that such a write draws on.
fn full_arena_drains() {
    let seg = Segment::new("full-drain");
    let s = small_space(&seg);
    let any = pattern!(FieldKind::I64, FieldKind::I64, FieldKind::Bytes);
    // An inbox keeps a reserve as large as the largest record it held: use
    // it once (with a tuple larger than those below) before the arena fills.
    // (`clear_inbox` would drop that reserve: the inbox just keeps its
    // last record between rounds.)
    s.out(tuple!(0, -1, vec![0u8; 400])).unwrap();
    assert!(s
        .take_into(&any, Duration::ZERO, "drain")
        .unwrap()
        .is_some());
    for round in 0..3 {
        let posted = fill_with_tuples(&s, 40 + 60 * round);
        assert!(posted > 16, "round {round}: only {posted} tuples fit");
        assert_eq!(s.len().unwrap(), posted as usize);
        // `out` failed for one bucket's growth; smaller blocks may still be
        // free. Take those too, so that no block of any size is left.
        let fillers = fill_arena(s.dict(), 4);
        let mut seen = BTreeSet::new();
        for k in 0..posted {
            // Alternate: plain takes and moves into an inbox.
            let t = if k % 2 == 0 {
                s.try_take(&any)
            } else {
                s.take_into(&any, Duration::ZERO, "drain")
            };
            let t = t
                .unwrap_or_else(|e| {
                    panic!("round {round}: taking tuple {k} of {posted} from a full arena: {e}")
                })
                .unwrap_or_else(|| panic!("round {round}: tuple {k} of {posted} not found"));
            if k % 2 == 1 {
                assert_eq!(s.inbox("drain").unwrap().as_ref(), Some(&t));
            }
            assert!(seen.insert(t.i64(1).unwrap()), "taken twice: {t:?}");
        }
        assert_eq!(seen.len() as i64, posted, "round {round}");
        assert!(s.is_empty().unwrap(), "round {round}");
        for k in fillers.iter().flatten() {
            assert!(s.dict().remove(k).unwrap());
        }
    }
}

/// Fills the rest of the arena with keys `f/<order>/<i>` whose values take
/// one block of each order, largest first, so that no block of any order is
/// left free. Returns the keys, by order.
fn fill_arena(d: &ShmDict, top: u32) -> Vec<Vec<String>> {
    let mut keys = vec![Vec::new(); top as usize + 1];
    for order in (0..=top).rev() {
        // A block of `order` holds 16 header bytes, the key rounded up to 8,
        // and the value: fill it to the brim.
        let value = vec![0xAB; (64usize << order) - 16 - 16];
        for i in 0.. {
            let key = format!("f/{order}/{i:06}");
            match d.insert(&key, &value) {
                Ok(()) => keys[order as usize].push(key),
                Err(Error::Full { .. }) => break,
                Err(e) => panic!("filler {key}: {e}"),
            }
        }
    }
    let stats = d.stats();
    assert_eq!(stats.arena_untouched_bytes, 0, "the arena is all carved");
    assert!(
        stats.free_blocks.iter().all(|&n| n == 0),
        "no free block is left: {:?}",
        stats.free_blocks
    );
    keys
}

/// Regression (issue 10, item 7): a `take_into` whose last step (removing
/// the claimed entry from its bucket) found no room returned `Full` and
/// left the tuple claimed by its live caller: counted by `len()`, invisible
/// to every take and read until the caller died.
///
/// The arena is arranged so that exactly that happens on the old code: one
/// free block of 1 KiB and nothing else. The claim (a long inbox name makes
/// the bucket outgrow its 512-byte block) takes the 1 KiB block and frees
/// the bucket's old 512-byte block; the inbox record takes that; removing
/// the claimed entry then needs a 512-byte block and none is free.
fn take_into_finish_without_room() {
    let seg = Segment::new("finish-full");
    let s = small_space(&seg);
    // Two tuples in one bucket (same first field): a 512-byte bucket value.
    let t1 = tuple!("t", vec![1u8; 100]);
    let t2 = tuple!("t", vec![2u8; 240]);
    s.out(t1.clone()).unwrap();
    s.out(t2.clone()).unwrap();
    let inbox = "i".repeat(300);
    let fillers = fill_arena(s.dict(), 4);
    // Free exactly one 1 KiB block.
    let one = fillers[4].last().expect("a 1 KiB filler");
    assert!(s.dict().remove(one).unwrap());
    let r = s.take_into(&pattern!("t", _), Duration::ZERO, &inbox);
    eprintln!(
        "take_into in the arranged arena: {:?}",
        r.as_ref().map(|t| t.is_some())
    );
    // Room again for whatever the checks below need.
    for k in fillers.iter().flatten() {
        s.dict().remove(k).unwrap();
    }
    let counted = s.len().unwrap();
    let mut visible = Vec::new();
    while let Some(t) = s.try_take(&pattern!("t", _)).unwrap() {
        visible.push(t);
    }
    assert_eq!(
        visible.len(),
        counted,
        "len() counted {counted} tuples but takes found only {visible:?}: \
         a tuple is claimed by this live process and hidden"
    );
    let in_inbox = s.inbox(&inbox).unwrap();
    match r {
        Ok(Some(t)) => {
            assert_eq!(t, t1);
            assert_eq!(in_inbox, Some(t1.clone()));
            assert_eq!(visible, vec![t2.clone()]);
        }
        Ok(None) => panic!("the pattern matches two tuples"),
        Err(e) => {
            // Failed: the tuple must be back in the space, not in the inbox.
            assert!(matches!(e, Error::Full { .. }), "{e}");
            assert_eq!(in_inbox, None, "a failed take_into recorded nothing");
            assert_eq!(visible, vec![t1.clone(), t2.clone()]);
        }
    }
}

/// Issue 12: a space inherits its dictionary's growth. Created with room
/// for 16 keys and a 64 KiB arena, it holds 3,000 tuples of 1 KiB (several
/// index generations, an arena of several MiB) that a taker in another
/// process takes exactly once; one capped by `max_bytes` fills up with `Full` and
/// no tuple lost, and taking makes room again.
fn space_grows() {
    let seg = Segment::new("space-grows");
    let dict = ShmDict::options()
        .capacity(16)
        .arena_bytes(64 << 10)
        .create_new(true)
        .open(seg.name())
        .unwrap();
    let s = Space::from_dict(dict);
    const N: i64 = 3_000;
    let payload = "p".repeat(1000);
    for i in 0..N {
        s.out(tuple!(format!("g{}", i % 64), i, payload.as_str()))
            .unwrap_or_else(|e| panic!("out {i}: {e}"));
    }
    assert_eq!(s.len().unwrap(), N as usize);
    let grown = s.dict().stats();
    assert!(
        grown.generation > 0 && grown.committed_bytes > 2 << 20,
        "{grown:?}"
    );
    let mut taker = Proc::spawn("taker", "take-n", &[seg.arg(), N.to_string()]);
    taker.wait_ok();
    assert_eq!(s.len().unwrap(), 0);
    drop(s);

    let capped = Segment::new("space-capped");
    let dict = ShmDict::options()
        .capacity(16)
        .arena_bytes(64 << 10)
        .max_bytes(2 << 20)
        .create_new(true)
        .open(capped.name())
        .unwrap();
    let s = Space::from_dict(dict);
    let mut n = 0i64;
    let err = loop {
        match s.out(tuple!(format!("c{}", n % 64), n, payload.as_str())) {
            Ok(()) => n += 1,
            Err(e) => break e,
        }
        assert!(n < 1_000_000, "never Full under max_bytes");
    };
    assert!(matches!(err, Error::Full { .. }), "{err}");
    assert!(n > 300, "only {n} tuples of 1 KiB in 2 MiB");
    let st = s.dict().stats();
    assert!(st.committed_bytes <= 2 << 20, "{st:?}");
    assert_eq!(s.len().unwrap(), n as usize, "no tuple lost at Full");
    for i in 0..64 {
        s.take(&pattern!(format!("c{i}"), FieldKind::I64, _), WATCHDOG)
            .unwrap()
            .expect("a tuple");
    }
    s.out(tuple!("c0", -1, payload.as_str()))
        .expect("taking made room");
}

/// Takes the `n` tuples `("g<i % 64>", i, _)`, each exactly once.
fn child_take_n(space: &str, n: i64) {
    let s = open_space(space);
    let mut seen = vec![false; n as usize];
    for k in 0..n {
        let t = s
            .take(
                &pattern!(format!("g{}", k % 64), FieldKind::I64, _),
                WATCHDOG,
            )
            .expect("take")
            .expect("watchdog: a tuple is missing");
        let i = t.i64(1).expect("integer") as usize;
        assert!(
            !std::mem::replace(&mut seen[i], true),
            "tuple {i} taken twice"
        );
    }
}
