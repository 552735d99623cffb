//! What only the Redis backend has: failures of the server (closed port,
//! frozen by SIGSTOP, killed mid-run), name rules in targets, isolation of
//! dictionaries on one server, lease renewal and expiry with fencing
//! tokens, waiting without polling, threads sharing a handle, a real
//! three-master cluster, and the CLI on `redis://` targets.
//!
//! Every server is a private `redis-server` started by the trial on a free
//! loopback port (see `redis_server`), killed when the trial ends.

mod common;
mod redis_server;

use std::io::ErrorKind;
use std::process::Command;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use common::{incr, u64_of, Proc};
use redis_server::{free_port, RedisCluster, RedisServer};
use shmdict::{Dict, Error, RedisDict};

const TRIALS: &[(&str, fn())] = &[
    ("closed_port_is_io_naming_the_server", closed_port),
    ("frozen_server_is_io_timeout_then_recovers", frozen_server),
    (
        "server_killed_mid_run_is_io_in_every_process",
        killed_mid_run,
    ),
    ("invalid_names_in_targets", invalid_names),
    ("dictionaries_are_isolated_and_unlink", isolation),
    ("renewal_keeps_a_live_holders_lease", renewal),
    (
        "paused_holder_loses_lease_fencing_token_grows",
        paused_holder,
    ),
    (
        "get_or_insert_with_computer_killed_is_replaced",
        memo_killed,
    ),
    ("reentrant_lock_and_memo_are_refused_not_hung", reentrant),
    ("wait_for_blocks_in_redis_without_polling", no_polling),
    (
        "threads_and_processes_update_without_loss",
        threads_and_processes,
    ),
    ("cluster_three_masters", cluster),
    ("cli_on_redis_targets", cli),
];

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(common::CHILD_FLAG) {
        child(&argv[2], &argv[3..]);
        return;
    }
    let mut args = libtest_mimic::Arguments::from_args();
    if args.test_threads.is_none() {
        args.test_threads = Some(1);
    }
    let trials = TRIALS
        .iter()
        .map(|&(name, f)| {
            libtest_mimic::Trial::test(name, move || {
                common::with_watchdog(name, f);
                Ok(())
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

fn open(url: &str, name: &str) -> RedisDict {
    RedisDict::open(url, name).unwrap_or_else(|e| panic!("open {url} {name}: {e}"))
}

/// Asserts `r` is `Error::Io` naming `host:port` (and returns its kind).
fn assert_io<T>(r: shmdict::Result<T>, hostport: &str, what: &str) -> ErrorKind {
    match r {
        Err(e @ Error::Io { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(hostport),
                "{what}: {msg:?} does not name {hostport}"
            );
            let Error::Io { source, .. } = &e else {
                unreachable!()
            };
            source.kind()
        }
        Err(e) => panic!("{what}: expected Error::Io naming {hostport}, got {e:?}"),
        Ok(_) => panic!("{what}: expected Error::Io naming {hostport}, got Ok"),
    }
}

fn closed_port() {
    let port = free_port();
    let hostport = format!("127.0.0.1:{port}");
    let t = Instant::now();
    let kind = assert_io(
        shmdict::connect(&format!("redis://{hostport}/jobs")),
        &hostport,
        "connect",
    );
    assert_eq!(kind, ErrorKind::ConnectionRefused);
    assert_io(
        RedisDict::open(&format!("redis://{hostport}"), "jobs"),
        &hostport,
        "open",
    );
    assert_io(
        RedisDict::unlink(&format!("redis://{hostport}"), "jobs"),
        &hostport,
        "unlink",
    );
    eprintln!("closed port: three refusals in {:?}", t.elapsed());
}

fn frozen_server() {
    let server = RedisServer::start();
    let hostport = format!("127.0.0.1:{}", server.port);
    let timeout = Duration::from_millis(500);
    let d = RedisDict::options()
        .timeout(timeout)
        .open(&server.url(), "frozen")
        .expect("open");
    d.insert(b"k", b"v").expect("insert");
    server.signal(libc::SIGSTOP);
    let t = Instant::now();
    let kind = assert_io(d.get(b"k"), &hostport, "get on a frozen server");
    assert_eq!(kind, ErrorKind::TimedOut, "the socket timeout fired");
    assert!(
        t.elapsed() >= timeout,
        "failed before the timeout: {:?}",
        t.elapsed()
    );
    assert_io(d.insert(b"k", b"w"), &hostport, "insert on a frozen server");
    assert_io(
        d.wait_for(b"absent", Duration::from_millis(200)),
        &hostport,
        "wait_for on a frozen server",
    );
    assert_io(d.lock().map(|_| ()), &hostport, "lock on a frozen server");
    // A new handle: connecting succeeds (the kernel accepts), PING times out.
    assert_io(
        RedisDict::options()
            .timeout(timeout)
            .open(&server.url(), "frozen"),
        &hostport,
        "open on a frozen server",
    );
    server.signal(libc::SIGCONT);
    // The handle reconnects; the writes sent while frozen may or may not
    // have taken effect (they reached the server's socket buffer).
    let v = d.get(b"k").expect("get after SIGCONT");
    assert!(matches!(v.as_deref(), Some(b"v") | Some(b"w")), "{v:?}");
    d.insert(b"k2", b"x").expect("insert after SIGCONT");
    assert_eq!(d.get(b"k2").expect("get").as_deref(), Some(&b"x"[..]));
}

fn killed_mid_run() {
    let mut server = RedisServer::start();
    let hostport = format!("127.0.0.1:{}", server.port);
    let target = server.target("killed");
    let d = open(&server.url(), "killed");
    let mut procs: Vec<Proc> = (0..4)
        .map(|i| {
            Proc::spawn(
                format!("updater {i}"),
                "update_until_error",
                &[&target, &hostport],
            )
        })
        .collect();
    // Wait until every child has made progress, then kill the server.
    let deadline = Instant::now() + common::WATCHDOG;
    while d.get(b"ctr").expect("get").map_or(0, |v| u64_of(&v)) < 200 {
        for p in procs.iter_mut() {
            p.assert_running();
        }
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    server.kill();
    // Each child exits 0 only after an Io error naming the server.
    common::wait_all(&mut procs);
    assert_io(d.get(b"ctr"), &hostport, "get after the kill");
}

fn invalid_names() {
    let server = RedisServer::start();
    let url = server.url();
    let long = "x".repeat(201);
    for name in ["", "a b", "a/b", "..", ".", "é", "{x}", long.as_str()] {
        let e = shmdict::connect(&format!("{url}/{name}")).err();
        assert!(
            matches!(e, Some(Error::InvalidName { .. })),
            "connect {url}/{name:?}: {e:?}"
        );
        let e = RedisDict::open(&url, name).err();
        assert!(
            matches!(e, Some(Error::InvalidName { .. })),
            "open {name:?}: {e:?}"
        );
        let e = RedisDict::unlink(&url, name).err();
        assert!(
            matches!(e, Some(Error::InvalidName { .. })),
            "unlink {name:?}: {e:?}"
        );
    }
    // The name is checked before any network use: also with no server.
    let e = shmdict::connect(&format!("redis://127.0.0.1:{}/a%b", free_port())).err();
    assert!(matches!(e, Some(Error::InvalidName { .. })), "{e:?}");
    // Bad server parts are InvalidArgument.
    for bad in ["redis://:1/x", "redis://h:99999/x", "redis://a:1,b:2/x"] {
        let e = shmdict::connect(bad).err();
        assert!(
            matches!(e, Some(Error::InvalidArgument { .. })),
            "{bad}: {e:?}"
        );
    }
    // The longest valid name works.
    let d = open(&url, &"x".repeat(200));
    d.insert(b"k", b"v").expect("insert");
    assert_eq!(d.len().expect("len"), 1);
}

fn isolation() {
    let server = RedisServer::start();
    let url = server.url();
    let a = open(&url, "alpha");
    let b = open(&url, "alpha2");
    let c = open(&url, "Alpha");
    a.insert(b"k", b"a").expect("insert");
    b.insert(b"k", b"b").expect("insert");
    b.insert(b"only-b", b"b").expect("insert");
    assert_eq!(c.get(b"k").expect("get"), None, "names are case-sensitive");
    assert_eq!(a.get(b"k").expect("get").as_deref(), Some(&b"a"[..]));
    assert_eq!(b.get(b"k").expect("get").as_deref(), Some(&b"b"[..]));
    assert_eq!(a.len().expect("len"), 1);
    assert_eq!(b.len().expect("len"), 2);
    assert_eq!(a.keys().expect("keys"), vec![b"k".to_vec()]);
    let g = a.lock().expect("lock a");
    // b's lock is another lock: taken at once while a's is held.
    let gb = b.lock().expect("lock b while a is locked");
    drop((g, gb));
    RedisDict::unlink(&url, "alpha").expect("unlink");
    assert_eq!(a.len().expect("len"), 0, "unlink removed alpha's keys");
    assert_eq!(a.get(b"k").expect("get"), None);
    assert_eq!(b.len().expect("len"), 2, "alpha2 untouched");
    RedisDict::unlink(&url, "never-used").expect("unlink of a name with no keys is Ok");
    // The handle still works after unlink.
    a.insert(b"again", b"1").expect("insert after unlink");
    assert_eq!(a.len().expect("len"), 1);
}

fn renewal() {
    let server = RedisServer::start();
    let lease = Duration::from_millis(1000);
    let open_short = || {
        RedisDict::options()
            .lease(lease)
            .open(&server.url(), "renew")
            .expect("open")
    };
    let a = open_short();
    let b = open_short();
    let held = a.lock_lease().expect("lock");
    let token_a = held.token();
    let released_at = Arc::new(Mutex::new(None::<Instant>));
    let start = Barrier::new(2);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            start.wait();
            let g = b.lock_lease().expect("lock b");
            (Instant::now(), g.recovered(), g.token())
        });
        start.wait();
        // Hold for three leases: only renewals keep it.
        std::thread::sleep(3 * lease);
        assert!(held.still_held(), "renewals kept the lease");
        *released_at.lock().expect("mutex") = Some(Instant::now());
        drop(held);
        let (acquired_at, recovered, token_b) = waiter.join().expect("waiter");
        let released = released_at.lock().expect("mutex").expect("set");
        assert!(
            acquired_at >= released,
            "b got the lock {:?} before a released it",
            released - acquired_at
        );
        assert!(!recovered, "a released; nothing to recover");
        assert!(
            token_b > token_a,
            "fencing tokens grow: {token_a} then {token_b}"
        );
    });
}

fn paused_holder() {
    let server = RedisServer::start();
    let target = server.target("paused");
    let d = RedisDict::options()
        .lease(Duration::from_millis(1000))
        .open(&server.url(), "paused")
        .expect("open");
    let mut holder = Proc::spawn("holder", "hold_lock_1s_lease", &[&target]);
    let deadline = Instant::now() + common::WATCHDOG;
    let token = loop {
        if let Some(t) = d.get(b"token").expect("get") {
            break u64_of(&t);
        }
        holder.assert_running();
        assert!(Instant::now() < deadline, "holder never took the lock");
        std::thread::sleep(Duration::from_millis(10));
    };
    // A stopped holder cannot renew: after its lease, the lock is taken
    // from it (unlike the shared-memory lock). The fencing token says so.
    common::signal(&holder, libc::SIGSTOP);
    let g = d.lock_lease().expect("lock");
    assert!(
        g.recovered(),
        "the paused holder's lease expired without release"
    );
    assert!(g.token() > token, "a newer token: {} > {token}", g.token());
    assert_eq!(d.last_fencing_token().expect("fence"), g.token());
    common::signal(&holder, libc::SIGCONT);
    holder.kill();
}

fn memo_killed() {
    let server = RedisServer::start();
    let target = server.target("memo");
    let lease = Duration::from_millis(1000);
    let d = RedisDict::options()
        .lease(lease)
        .open(&server.url(), "memo")
        .expect("open");
    let mut computer = Proc::spawn("computer", "memo_forever", &[&target]);
    let deadline = Instant::now() + common::WATCHDOG;
    while d.get(b"computing").expect("get").is_none() {
        computer.assert_running();
        assert!(
            Instant::now() < deadline,
            "the child never started computing"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // While the child computes, its renewed lease keeps us waiting, for
    // well over the lease.
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let mut ran = false;
            let v = d
                .get_or_insert_with(b"memo", &mut || {
                    ran = true;
                    b"ours".to_vec()
                })
                .expect("get_or_insert_with");
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            (ran, v)
        });
        std::thread::sleep(3 * lease);
        assert!(
            !done.load(std::sync::atomic::Ordering::SeqCst),
            "f ran here while the live computer held its lease"
        );
        let killed = Instant::now();
        computer.kill();
        let (ran, v) = waiter.join().expect("waiter");
        assert!(ran, "after the computer died, this caller computed");
        assert_eq!(v, b"ours");
        eprintln!(
            "took over {:?} after the kill (lease {lease:?})",
            killed.elapsed()
        );
    });
    assert_eq!(d.get(b"memo").expect("get").as_deref(), Some(&b"ours"[..]));
}

fn reentrant() {
    let server = RedisServer::start();
    let d = open(&server.url(), "reentrant");
    let same = open(&server.url(), "reentrant");
    {
        let _g = d.lock().expect("lock");
        // Through another handle too: it is the same lock.
        let e = same.lock().err();
        assert!(matches!(e, Some(Error::InvalidArgument { .. })), "{e:?}");
        // Other operations (and another dictionary's lock) work meanwhile.
        d.insert(b"k", b"v").expect("insert under the lock");
        drop(open(&server.url(), "other").lock().expect("another lock"));
    }
    drop(d.lock().expect("lock again after the release"));
    let mut inner_err = None;
    let v = d
        .get_or_insert_with(b"memo", &mut || {
            inner_err = same
                .get_or_insert_with(b"memo", &mut || b"inner".to_vec())
                .err();
            // Other keys, and the other operations, are fine inside f.
            let o = d
                .get_or_insert_with(b"other", &mut || b"o".to_vec())
                .expect("another key inside f");
            assert_eq!(o, b"o");
            b"outer".to_vec()
        })
        .expect("get_or_insert_with");
    assert_eq!(v, b"outer");
    assert!(
        matches!(inner_err, Some(Error::InvalidArgument { .. })),
        "{inner_err:?}"
    );
    // Another thread is not refused: it waits, then gets the value.
    std::thread::scope(|s| {
        let g = d.lock().expect("lock");
        let t = s.spawn(|| same.lock().map(|g| g.recovered()));
        std::thread::sleep(Duration::from_millis(200));
        drop(g);
        assert!(!t.join().expect("thread").expect("lock in another thread"));
    });
}

fn no_polling() {
    let server = RedisServer::start();
    let d = open(&server.url(), "quiet");
    d.insert(b"warm", b"up").expect("insert");
    // Warm up: the connection is set up and the script loaded.
    assert_eq!(
        d.wait_for(b"absent", Duration::from_millis(1))
            .expect("wait"),
        None
    );
    let sent = || -> u64 {
        // Not HGET: the scripts' own HGETs count there too.
        ["evalsha", "eval", "xread", "ping"]
            .iter()
            .map(|c| server.calls(c))
            .sum()
    };
    let before = sent();
    let t = Instant::now();
    assert_eq!(
        d.wait_for(b"absent", Duration::from_secs(3)).expect("wait"),
        None
    );
    assert!(t.elapsed() >= Duration::from_secs(3));
    // The wait: a check script, one blocking read (and a final HGET).
    let used = sent() - before;
    assert!(
        used <= 2,
        "{used} scripts and reads in a 3 s wait: polling?"
    );
    assert!(server.calls("xread") >= 1, "it blocked in XREAD");
    eprintln!("a 3 s wait_for sent {used} commands");
}

fn threads_and_processes() {
    let server = RedisServer::start();
    let target = server.target("mixed");
    let shared = open(&server.url(), "mixed");
    let mut procs: Vec<Proc> = (0..2)
        .map(|i| Proc::spawn(format!("proc {i}"), "incr", &[&target, "200"]))
        .collect();
    std::thread::scope(|s| {
        for t in 0..6 {
            let shared = &shared;
            let url = server.url();
            s.spawn(move || {
                let own;
                // Half the threads share one handle, half have their own.
                let d: &RedisDict = if t % 2 == 0 {
                    shared
                } else {
                    own = open(&url, "mixed");
                    &own
                };
                for _ in 0..200 {
                    d.update(b"ctr", &mut |v| incr(v)).expect("update");
                }
            });
        }
    });
    common::wait_all(&mut procs);
    let total = shared.get(b"ctr").expect("get").map(|v| u64_of(&v));
    assert_eq!(total, Some(8 * 200), "lost increments");
    eprintln!(
        "{} compare-and-set conflicts retried in this process",
        RedisDict::update_retries()
    );
}

fn cluster() {
    let cluster = RedisCluster::start();
    let url = cluster.url();
    // Dictionaries spread over the masters; each lives on one.
    let mut owners = std::collections::HashSet::new();
    for i in 0..12 {
        let name = format!("dict{i}");
        let d = open(&url, &name);
        for k in 0..20u32 {
            d.insert(format!("k{k}").as_bytes(), &k.to_le_bytes())
                .expect("insert");
        }
        assert!(d.remove(b"k0").expect("remove"));
        assert_eq!(d.len().expect("len"), 19);
        assert_eq!(d.keys().expect("keys").len(), 19);
        d.update(b"k1", &mut |_| Some(b"one".to_vec()))
            .expect("update");
        assert_eq!(d.get(b"k1").expect("get").as_deref(), Some(&b"one"[..]));
        drop(d.lock().expect("lock"));
        let target = d.target();
        let port = target
            .rsplit_once(':')
            .and_then(|(_, p)| p.split('/').next())
            .expect("port in target")
            .to_owned();
        owners.insert(port);
    }
    assert!(
        owners.len() >= 2,
        "12 dictionaries all on one master: {owners:?}"
    );
    // The shared suite's concurrency checks, on the cluster.
    let target = cluster.target("busy");
    let mut procs: Vec<Proc> = (0..4)
        .map(|i| Proc::spawn(format!("cluster incr {i}"), "incr", &[&target, "150"]))
        .collect();
    let d = open(&url, "busy");
    let waiter = std::thread::spawn({
        let url = url.clone();
        move || open(&url, "busy").wait_for(b"done", Duration::from_secs(60))
    });
    common::wait_all(&mut procs);
    d.insert(b"done", b"yes").expect("insert");
    let got = waiter.join().expect("waiter").expect("wait_for");
    assert_eq!(got.as_deref(), Some(&b"yes"[..]));
    assert_eq!(d.get(b"ctr").expect("get").map(|v| u64_of(&v)), Some(600));
    // Move a dictionary's slot to another master under an open handle: its
    // next call is answered MOVED, follows it, and finds every key there.
    let mover = open(&url, "mover");
    for k in 0..50u32 {
        mover
            .insert(format!("k{k}").as_bytes(), b"v")
            .expect("insert");
    }
    let from_port: u16 = port_of(&mover.target());
    let to = cluster
        .nodes
        .iter()
        .find(|n| n.port != from_port)
        .expect("another master");
    migrate_slot(&cluster, "shmdict:{mover}:h", from_port, to.port);
    // First a pipelined write (its MOVED error carries no address: the
    // handle asks the cluster), then, after a move back, a read.
    mover.insert(b"k50", b"v").expect("insert after the move");
    assert_eq!(
        port_of(&mover.target()),
        to.port,
        "the handle follows MOVED"
    );
    assert_eq!(mover.len().expect("len"), 51);
    migrate_slot(&cluster, "shmdict:{mover}:h", to.port, from_port);
    let v = mover.get(b"k7").expect("get after the move back");
    assert_eq!(v.as_deref(), Some(&b"v"[..]));
    assert_eq!(
        port_of(&mover.target()),
        from_port,
        "the handle follows MOVED back"
    );
    assert_eq!(mover.len().expect("len"), 51);
    // A seed list with a dead node first still finds the dictionary.
    let dead = free_port();
    let with_dead = url.replacen(
        "redis+cluster://",
        &format!("redis+cluster://127.0.0.1:{dead},"),
        1,
    );
    let d2 = open(&with_dead, "busy");
    assert_eq!(d2.get(b"done").expect("get").as_deref(), Some(&b"yes"[..]));
}

/// The port in a `…://HOST:PORT/NAME` target.
fn port_of(target: &str) -> u16 {
    target
        .rsplit_once(':')
        .and_then(|(_, p)| p.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {target}"))
}

/// Moves the slot of `key` from the master on `from` to the one on `to`,
/// keys included, as `redis-cli --cluster reshard` does for one slot.
fn migrate_slot(cluster: &RedisCluster, key: &str, from: u16, to: u16) {
    use redis_server::raw_command;
    let cmd = |port: u16, c: &str| {
        let r = raw_command(port, c).unwrap_or_else(|| panic!("no reply to {c}"));
        assert!(!r.starts_with('-'), "{c} on {port}: {r}");
        r
    };
    let id = |port: u16| {
        let r = cmd(port, "CLUSTER MYID");
        r.lines().nth(1).expect("bulk reply").trim().to_owned()
    };
    let slot: u16 = cmd(from, &format!("CLUSTER KEYSLOT {key}"))
        .trim_start_matches(':')
        .trim()
        .parse()
        .expect("slot");
    let (from_id, to_id) = (id(from), id(to));
    cmd(to, &format!("CLUSTER SETSLOT {slot} IMPORTING {from_id}"));
    cmd(from, &format!("CLUSTER SETSLOT {slot} MIGRATING {to_id}"));
    let keys = cmd(from, &format!("CLUSTER GETKEYSINSLOT {slot} 1000"));
    let keys: Vec<&str> = keys
        .lines()
        .filter(|l| !l.starts_with('*') && !l.starts_with('$') && !l.is_empty())
        .collect();
    assert!(!keys.is_empty(), "the slot holds the dictionary's keys");
    cmd(
        from,
        &format!("MIGRATE 127.0.0.1 {to} \"\" 0 5000 KEYS {}", keys.join(" ")),
    );
    for n in &cluster.nodes {
        cmd(n.port, &format!("CLUSTER SETSLOT {slot} NODE {to_id}"));
    }
}

fn cli() {
    let server = RedisServer::start();
    let t = server.target("cli");
    let bin = env!("CARGO_BIN_EXE_shmdict");
    let run = |args: &[&str], stdin: Option<&str>| {
        let mut c = Command::new(bin);
        c.args(args);
        let out = if let Some(input) = stdin {
            use std::io::Write;
            let mut child = c
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn shmdict");
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write stdin");
            child.wait_with_output().expect("wait")
        } else {
            c.output().expect("run shmdict")
        };
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(run(&["set", &t, "job/7", "done"], None).0, Some(0));
    assert_eq!(run(&["set", &t, "job/8", "queued"], None).0, Some(0));
    let (code, out, _) = run(&["get", &t, "job/7"], None);
    assert_eq!((code, out.as_str()), (Some(0), "done\n"));
    let (code, out, _) = run(&["keys", &t], None);
    assert_eq!((code, out.as_str()), (Some(0), "job/7\njob/8\n"));
    let (code, dump, _) = run(&["dump", &t], None);
    assert_eq!(code, Some(0));
    assert_eq!(
        dump,
        "{\"key\":\"job/7\",\"value\":\"done\"}\n{\"key\":\"job/8\",\"value\":\"queued\"}\n"
    );
    let copy = server.target("cli-copy");
    assert_eq!(run(&["load", &copy], Some(&dump)).0, Some(0));
    let d = open(&server.url(), "cli-copy");
    assert_eq!(d.len().expect("len"), 2);
    assert_eq!(run(&["del", &t, "job/7"], None).0, Some(0));
    let (code, _, err) = run(&["get", &t, "job/7"], None);
    assert_eq!(code, Some(3), "absent key: exit 3 ({err})");
    assert_eq!(run(&["del", &t, "job/7"], None).0, Some(3));
    // watch: the current value, then each write.
    let watcher = Command::new(bin)
        .args(["watch", &t, "w", "--count", "3"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn watch");
    let src = open(&server.url(), "cli");
    src.insert(b"w", b"first").expect("insert");
    // Let the watcher print "first" (from its check or from the stream).
    let deadline = Instant::now() + Duration::from_secs(30);
    for v in [&b"second"[..], b"third"] {
        std::thread::sleep(Duration::from_millis(300));
        assert!(Instant::now() < deadline);
        src.insert(b"w", v).expect("insert");
    }
    let out = watcher.wait_with_output().expect("watch output");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "first\nsecond\nthird\n"
    );
    // Errors name the server.
    let port = free_port();
    let (code, _, err) = run(&["get", &format!("redis://127.0.0.1:{port}/x"), "k"], None);
    assert_eq!(code, Some(1));
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
}

fn child(role: &str, args: &[String]) {
    match role {
        "incr" => {
            let d = shmdict::connect(&args[0]).expect("connect");
            let n: u64 = args[1].parse().expect("count");
            for i in 0..n {
                d.update(b"ctr", &mut |v| {
                    common::widen_race_window(i);
                    incr(v)
                })
                .expect("update");
            }
        }
        "update_until_error" => {
            let d = shmdict::connect(&args[0]).expect("connect");
            let hostport = &args[1];
            loop {
                match d.update(b"ctr", &mut |v| incr(v)) {
                    Ok(_) => {}
                    Err(e @ Error::Io { .. }) if e.to_string().contains(hostport.as_str()) => {
                        return;
                    }
                    Err(e) => panic!("not an Io error naming {hostport}: {e}"),
                }
            }
        }
        "memo_forever" => {
            let (url, name) = args[0].rsplit_once('/').expect("target");
            let d = RedisDict::options()
                .lease(Duration::from_millis(1000))
                .open(url, name)
                .expect("open");
            d.get_or_insert_with(b"memo", &mut || {
                d.insert(b"computing", b"1").expect("insert");
                std::thread::sleep(common::WATCHDOG);
                b"never".to_vec()
            })
            .expect("get_or_insert_with");
        }
        "hold_lock_1s_lease" => {
            let (url, name) = args[0].rsplit_once('/').expect("target");
            let d = RedisDict::options()
                .lease(Duration::from_millis(1000))
                .open(url, name)
                .expect("open");
            let g = d.lock_lease().expect("lock");
            d.insert(b"token", &g.token().to_le_bytes())
                .expect("insert");
            std::thread::sleep(common::WATCHDOG);
            drop(g);
        }
        other => panic!("unknown role {other}"),
    }
}
