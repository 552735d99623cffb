//! The `shmdict` command-line tool, run as a separate process against real
//! segments.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use shmdict::segments;
use shmdict::ShmDict;

const BIN: &str = env!("CARGO_BIN_EXE_shmdict");

/// A unique segment name, removed when dropped.
struct Seg(String);

impl Seg {
    fn new(tag: &str) -> Seg {
        static N: AtomicU32 = AtomicU32::new(0);
        Seg(format!(
            "clitest-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }
    fn s(&self) -> &str {
        &self.0
    }
    fn path(&self) -> String {
        format!("/dev/shm/{}", self.0)
    }
    /// Creates a small dictionary of this name.
    fn dict(&self) -> ShmDict {
        ShmDict::options()
            .capacity(1024)
            .arena_bytes(1 << 20)
            .open(&self.0)
            .unwrap()
    }
}

impl Drop for Seg {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.path());
    }
}

/// Kills a child process on every exit path.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run_with(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn run(args: &[&str]) -> Output {
    run_with(args, b"")
}

/// Runs a command that must succeed; its stdout.
fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail with `code`; its one-line error message.
fn fails(args: &[&str], code: i32) -> String {
    let out = run(args);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {out:?}");
    one_line_error(&out)
}

fn one_line_error(out: &Output) -> String {
    let err = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("shmdict: "), "{err:?}");
    assert!(!err.contains("panicked"), "{err:?}");
    err
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn ls_shows_a_segment() {
    let seg = Seg::new("ls");
    let d = seg.dict();
    d.insert("a", "1").unwrap();
    let text = ok(&["ls", "--prefix", seg.s()]);
    let row = text.lines().find(|l| l.starts_with(seg.s())).expect(&text);
    assert!(
        row.contains("dictionary") && row.contains("1 live, 0 dead"),
        "{row}"
    );
    let v = json(&ok(&["ls", "--json", "--prefix", seg.s()]));
    let s = &v.as_array().unwrap()[0];
    assert_eq!(s["name"], seg.s());
    assert_eq!(s["kind"], "dictionary");
    assert_eq!(s["len"], 1);
    assert_eq!(s["capacity"], 1024);
    assert_eq!(s["attached"]["live"], 1);
    assert_eq!(s["supported"], true);
    let version = segments::info(seg.s()).unwrap().version;
    assert_eq!(s["version"], version);
    assert!(s["error"].is_null());
}

#[test]
fn stat_reports_occupancy() {
    let seg = Seg::new("stat");
    let d = seg.dict();
    for i in 0..10 {
        d.insert(format!("k{i}"), "v").unwrap();
    }
    let text = ok(&["stat", seg.s()]);
    assert!(text.contains("10 of capacity 1024"), "{text}");
    assert!(
        text.contains("tombstones:   0 (none by design: removals empty their slot)"),
        "{text}"
    );
    assert!(text.contains("attached:     1 live, 0 dead"), "{text}");
    let v = json(&ok(&["stat", seg.s(), "--json"]));
    assert_eq!(v["len"], 10);
    assert_eq!(v["capacity"], 1024);
    let in_use: u64 = v["size_classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["in_use"].as_u64().unwrap())
        .sum();
    assert_eq!(in_use, 10);
}

/// Borrowed reads held by this (live) process while values are replaced:
/// `stat` shows the pins, the oldest's age and the retired bytes, in text
/// and JSON, with every arena byte accounted for; `check` reports the same
/// without repairing anything; once the reads are dropped and the memory
/// reused, both say so.
#[test]
fn stat_and_check_report_borrowed_reads() {
    let seg = Seg::new("borrow");
    let d = seg.dict();
    for i in 0..8 {
        d.insert(format!("k{i}"), [i as u8; 100]).unwrap();
    }
    let text = ok(&["stat", seg.s()]);
    assert!(text.contains("borrowed:     none held"), "{text}");
    assert!(text.contains(", 0 B retired"), "{text}");

    let reader = d.reader().unwrap();
    let held = reader.get("k0").unwrap().unwrap();
    let one = d.get_ref("k1").unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for round in 0..10u8 {
        for i in 0..8 {
            d.insert(format!("k{i}"), [round; 100]).unwrap();
        }
    }
    let retired = d.stats().retired_bytes;
    // 80 replaced values of 256-byte blocks (and the bags that list them).
    assert!(retired >= 80 * 256, "{retired}");
    let text = ok(&["stat", seg.s()]);
    let line = text
        .lines()
        .find(|l| l.starts_with("borrowed:"))
        .expect(&text);
    assert!(
        line.starts_with("borrowed:     2 reads held by live processes, the oldest for "),
        "{line}"
    );
    let secs: f64 = line
        .split("the oldest for ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect(line);
    assert!(secs >= 0.2, "{line}");
    assert!(
        !text.contains("neither in use"),
        "every byte accounted for:\n{text}"
    );
    let v = json(&ok(&["stat", seg.s(), "--json"]));
    assert_eq!(v["pins"], 2);
    assert!(v["oldest_pin_age_ms"].as_u64().unwrap() >= 250, "{v}");
    assert_eq!(v["arena_retired_bytes"].as_u64(), Some(retired));
    assert_eq!(v["arena_unaccounted_bytes"], 0, "{v}");
    let free = v["arena_free_bytes"].as_u64().unwrap();
    let in_use = v["arena_in_use_bytes"].as_u64().unwrap();
    assert_eq!(in_use + free + retired, v["arena_bytes"].as_u64().unwrap());

    let text = ok(&["check", seg.s()]);
    assert!(
        text.starts_with(&format!("segment {}: ok\n", seg.s())),
        "{text}"
    );
    assert!(
        text.contains(&format!("untouched, {retired} retired")),
        "{text}"
    );
    assert!(
        text.contains("  borrowed reads: 2 held, the oldest for "),
        "{text}"
    );
    assert!(
        text.contains("0 leaked blocks (0 bytes) reclaimed"),
        "{text}"
    );
    assert_eq!(&*one, &[1u8; 100][..]);
    assert_eq!(held, &[0u8; 100][..]);
    drop(one);
    drop(reader);

    let v = json(&ok(&["stat", seg.s(), "--json"]));
    assert_eq!(v["pins"], 0);
    assert!(v["oldest_pin_age_ms"].is_null(), "{v}");
    let text = ok(&["check", seg.s()]);
    assert!(!text.contains("borrowed reads"), "{text}");
    // Writers that need room reuse what was retired: six arenas' worth of
    // overwrites fit.
    for round in 0..200u32 {
        for i in 0..8 {
            d.insert(format!("k{i}"), round.to_le_bytes().repeat(1000))
                .unwrap();
        }
    }
    let v = json(&ok(&["stat", seg.s(), "--json"]));
    assert_eq!(v["arena_unaccounted_bytes"], 0, "{v}");
}

#[test]
fn set_get_del_round_trip() {
    let seg = Seg::new("sgd");
    drop(seg.dict());
    ok(&["set", seg.s(), "greeting", "hello"]);
    assert_eq!(ok(&["get", seg.s(), "greeting"]), "hello\n");
    assert_eq!(seg.dict().get("greeting").unwrap().unwrap(), b"hello");
    // From stdin, as is.
    let out = run_with(&["set", seg.s(), "multi"], b"two\nlines");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(seg.dict().get("multi").unwrap().unwrap(), b"two\nlines");
    ok(&["del", seg.s(), "greeting"]);
    let err = fails(&["get", seg.s(), "greeting"], 3);
    assert!(err.contains(seg.s()) && err.contains("greeting"), "{err}");
    fails(&["del", seg.s(), "greeting"], 3);
    let v = json(&{
        let out = run(&["get", seg.s(), "greeting", "--json"]);
        assert_eq!(out.status.code(), Some(3));
        String::from_utf8(out.stdout).unwrap()
    });
    assert!(v["value"].is_null());
}

#[test]
fn binary_values_with_hex_and_base64() {
    let seg = Seg::new("bin");
    drop(seg.dict());
    ok(&["set", seg.s(), "blob", "00ff7f", "--hex"]);
    assert_eq!(ok(&["get", seg.s(), "blob", "--hex"]), "00ff7f\n");
    assert_eq!(ok(&["get", seg.s(), "blob", "--base64"]), "AP9/\n");
    assert_eq!(
        run(&["get", seg.s(), "blob", "--raw"]).stdout,
        [0, 0xff, 0x7f]
    );
    let v = json(&ok(&["get", seg.s(), "blob", "--json"]));
    assert_eq!(v["key"], "blob");
    assert_eq!(v["value_b64"], "AP9/");
    let err = fails(&["get", seg.s(), "blob"], 1);
    assert!(err.contains("--hex"), "{err}");
    // Binary keys.
    ok(&["set", seg.s(), "/wA=", "AQI=", "--key-base64", "--base64"]);
    assert_eq!(
        seg.dict().get([0xff, 0]).unwrap().unwrap(),
        [1, 2],
        "decoded key and value"
    );
    assert_eq!(
        ok(&["get", seg.s(), "ff00", "--key-hex", "--hex"]),
        "0102\n"
    );
    fails(&["set", seg.s(), "k", "xyz", "--hex"], 1);
    // Usage errors are clap's: exit code 2.
    assert_eq!(
        run(&["get", seg.s(), "blob", "--hex", "--base64"])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn keys_with_prefix_and_json() {
    let seg = Seg::new("keys");
    let d = seg.dict();
    for k in ["job/1", "job/2", "user/1"] {
        d.insert(k, "x").unwrap();
    }
    d.insert([b'j', 0xff], "x").unwrap();
    assert_eq!(ok(&["keys", seg.s(), "--prefix", "job/"]), "job/1\njob/2\n");
    let err = fails(&["keys", seg.s()], 1);
    assert!(err.contains("--hex"), "{err}");
    assert_eq!(
        ok(&["keys", seg.s(), "--prefix", "6aff", "--hex"]),
        "6aff\n"
    );
    let v = json(&ok(&["keys", seg.s(), "--json"]));
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 4);
    assert!(arr.iter().any(|o| o["key_b64"] == "av8="), "{v}");
    assert!(arr.iter().any(|o| o["key"] == "user/1"), "{v}");
}

#[test]
fn dump_then_load_into_a_new_name() {
    let src = Seg::new("dump-src");
    let dst = Seg::new("dump-dst");
    let d = src.dict();
    let mut want = vec![
        (b"text".to_vec(), b"value".to_vec()),
        (vec![0, 1, 0xff], vec![0xfe; 300]),
        (b"quote\"\n".to_vec(), vec![]),
        ("ключ".as_bytes().to_vec(), b"\xc3\x28".to_vec()),
    ];
    for (k, v) in &want {
        d.insert(k, v).unwrap();
    }
    let dump = run(&["dump", src.s()]);
    assert!(dump.status.success(), "{dump:?}");
    assert_eq!(
        String::from_utf8(dump.stdout.clone())
            .unwrap()
            .lines()
            .count(),
        4
    );
    // Without --create the target must exist.
    let out = run_with(&["load", dst.s()], &dump.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(one_line_error(&out).contains("--create"));
    let out = run_with(
        &["load", dst.s(), "--create", "--capacity", "100"],
        &dump.stdout,
    );
    assert!(out.status.success(), "{out:?}");
    let copy = ShmDict::open(dst.s()).unwrap();
    assert_eq!(copy.capacity(), 100);
    let mut got: Vec<_> = copy
        .keys()
        .unwrap()
        .into_iter()
        .map(|k| {
            let v = copy.get(&k).unwrap().unwrap();
            (k, v)
        })
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn load_rejects_a_malformed_line_and_loads_nothing() {
    let seg = Seg::new("badload");
    let input = b"{\"key\":\"a\",\"value\":\"1\"}\n{\"key\":\"b\"}\n";
    let out = run_with(&["load", seg.s(), "--create"], input);
    assert_eq!(out.status.code(), Some(1));
    let err = one_line_error(&out);
    assert!(
        err.contains("line 2") && err.contains("nothing was loaded"),
        "{err}"
    );
    assert!(
        !std::path::Path::new(&seg.path()).exists(),
        "nothing was created either"
    );
}

#[test]
fn bad_and_missing_names_are_one_line_errors() {
    let err = fails(&["get", "bad/name", "k"], 1);
    assert!(err.contains("bad/name"), "{err}");
    let seg = Seg::new("missing");
    for args in [
        vec!["stat", seg.s()],
        vec!["get", seg.s(), "k"],
        vec!["keys", seg.s()],
        vec!["dump", seg.s()],
        vec!["check", seg.s()],
        vec!["rm", seg.s()],
        vec!["set", seg.s(), "k", "v"],
    ] {
        let err = fails(&args, 1);
        assert!(
            err.contains(&format!("no segment named \"{}\"", seg.s())),
            "{args:?}: {err}"
        );
    }
    assert!(
        !std::path::Path::new(&seg.path()).exists(),
        "inspecting never creates"
    );
}

#[test]
fn garbage_segments_give_clean_errors() {
    // Random bytes.
    let junk = Seg::new("junk");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..100_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(junk.path(), &bytes).unwrap();
    // The magic and this build's version, then a header of zeros.
    let version = {
        let real = Seg::new("real");
        drop(real.dict());
        segments::info(real.s()).unwrap().version
    };
    let broken = Seg::new("broken");
    let mut b = u64::from_le_bytes(*b"SHMDICT\0").to_le_bytes().to_vec();
    b.extend_from_slice(&(version as u64 | 1 << 32).to_le_bytes());
    b.resize(200_000, 0);
    std::fs::write(broken.path(), &b).unwrap();
    // The magic, then nothing.
    let short = Seg::new("short");
    std::fs::write(short.path(), &b[..16]).unwrap();
    for seg in [&junk, &broken, &short] {
        // Private, as shmdict creates segments (a 0644 file would add a
        // note on whose it is to the one-line error checked below).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(seg.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    for seg in [&junk, &broken, &short] {
        for args in [
            vec!["stat", seg.s()],
            vec!["get", seg.s(), "k"],
            vec!["keys", seg.s()],
            vec!["set", seg.s(), "k", "v"],
            vec!["dump", seg.s()],
            vec!["watch", seg.s(), "k"],
            vec!["check", seg.s()],
        ] {
            let err = fails(&args, 1);
            assert!(err.contains(seg.s()), "{args:?}: {err}");
        }
    }
    let err = fails(&["stat", junk.s()], 1);
    assert!(err.contains("not a shmdict segment"), "{err}");
    // ls skips the junk and flags the damaged ones.
    let prefix = format!("clitest-{}-", std::process::id());
    let text = ok(&["ls", "--prefix", &prefix]);
    assert!(!text.contains(junk.s()), "{text}");
    for seg in [&broken, &short] {
        let row = text.lines().find(|l| l.starts_with(seg.s())).expect(&text);
        assert!(row.contains("DAMAGED"), "{row}");
    }
    // rm refuses a foreign file unless forced.
    let err = fails(&["rm", junk.s()], 1);
    assert!(err.contains("--force"), "{err}");
    ok(&["rm", junk.s(), "--force"]);
    ok(&["rm", broken.s()]);
    assert!(!std::path::Path::new(&junk.path()).exists());
    assert!(!std::path::Path::new(&broken.path()).exists());
}

#[test]
fn check_reports_a_sound_dictionary() {
    let seg = Seg::new("check");
    let d = seg.dict();
    d.insert("a", "1").unwrap();
    let text = ok(&["check", seg.s()]);
    assert!(text.contains(seg.s()) && text.contains("ok"), "{text}");
}

#[test]
fn rm_removes_a_segment() {
    let seg = Seg::new("rm");
    drop(seg.dict());
    ok(&["rm", seg.s()]);
    assert!(!std::path::Path::new(&seg.path()).exists());
    fails(&["rm", seg.s()], 1);
}

/// Starts `shmdict watch` on `seg` and waits until it has attached.
fn attached_watcher(seg: &Seg) -> Kill {
    // Counted before the watcher starts: it may attach before we look.
    let before = segments::info(seg.s()).unwrap().attached.unwrap().live;
    let child = Command::new(BIN)
        .args(["watch", seg.s(), "k"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = Kill(child);
    wait_until("the watcher to attach", || {
        segments::info(seg.s()).unwrap().attached.unwrap().live > before
    });
    child
}

#[test]
fn gc_removes_segments_whose_processes_died() {
    let crashed = Seg::new("gc-crashed");
    let busy = Seg::new("gc-busy");
    let idle = Seg::new("gc-idle");
    drop(crashed.dict());
    drop(idle.dict());
    let _held = busy.dict();
    for seg in [&crashed, &busy] {
        let mut w = attached_watcher(seg);
        w.0.kill().unwrap(); // SIGKILL: no chance to detach.
        w.0.wait().unwrap();
    }
    let a = segments::info(crashed.s()).unwrap().attached.unwrap();
    assert_eq!((a.live, a.dead), (0, 1));
    // Only this test's segments: other tests may be running.
    let prefix = format!("clitest-{}-gc-", std::process::id());
    let out = ok(&["gc", "--dry-run", "--prefix", &prefix]);
    assert_eq!(out, format!("{}\n", crashed.s()));
    assert!(std::path::Path::new(&crashed.path()).exists());
    let v = json(&ok(&["gc", "--prefix", &prefix, "--json"]));
    assert_eq!(v, serde_json::json!([crashed.s()]));
    assert!(!std::path::Path::new(&crashed.path()).exists());
    assert!(std::path::Path::new(&busy.path()).exists());
    assert!(std::path::Path::new(&idle.path()).exists());
    assert_eq!(ok(&["gc", "--prefix", &prefix]), "");
    assert_eq!(
        ok(&["gc", "--prefix", &prefix, "--all-detached"]),
        format!("{}\n", idle.s())
    );
    assert!(std::path::Path::new(&busy.path()).exists());
}

#[test]
fn watch_prints_each_new_value() {
    let seg = Seg::new("watch");
    let d = seg.dict();
    let mut child = Kill(
        Command::new(BIN)
            .args(["watch", seg.s(), "k"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    for v in ["first", "second"] {
        d.insert("k", v).unwrap();
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("watch printed the value");
        assert_eq!(line, v);
    }
    drop(child);
}

#[test]
fn every_subcommand_help_has_an_example() {
    for cmd in [
        "ls", "stat", "get", "set", "del", "keys", "dump", "load", "watch", "rm", "gc", "check",
    ] {
        let text = ok(&[cmd, "--help"]);
        assert!(text.contains("Example"), "{cmd}: {text}");
    }
}

/// Runs a command that must succeed; (stdout, stderr).
fn ok_with_stderr(args: &[&str]) -> (String, String) {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Checks the commands on `seg`, a segment that is not private to us (its
/// owner is `owner`, its mode `mode`): inspecting commands read it and say
/// whose it is; writing commands refuse it unless --allow-other-owner.
fn check_foreign_segment(seg: &Seg, owner: u32, mode: u32) {
    let whose = format!("belongs to uid {owner}");
    let how = format!("mode {mode:04o}");
    for (args, shows) in [
        (vec!["get", seg.s(), "k"], "v"),
        (vec!["keys", seg.s()], "k"),
        (vec!["dump", seg.s()], r#""key":"k""#),
        (vec!["stat", seg.s()], "capacity"),
        (vec!["watch", seg.s(), "k", "--count", "1"], "v"),
    ] {
        let (stdout, stderr) = ok_with_stderr(&args);
        assert!(stdout.contains(shows), "{args:?}: {stdout}");
        assert!(
            stderr.contains(&whose) && stderr.contains(&how),
            "{args:?} says whose the segment is: {stderr:?}"
        );
    }
    let ls = ok(&["ls", "--prefix", seg.s()]);
    let row = ls.lines().find(|l| l.starts_with(seg.s())).expect(&ls);
    assert!(
        row.contains(&format!(" {owner} ")) && row.contains(&format!("{mode:04o}")),
        "{row}"
    );
    let mut writes = vec![
        vec!["set", seg.s(), "k2", "x"],
        vec!["del", seg.s(), "k"],
        vec!["check", seg.s()],
    ];
    if owner != rustix::process::geteuid().as_raw() {
        writes.push(vec!["rm", seg.s()]);
    }
    for args in &writes {
        let err = fails(args, 1);
        assert!(
            err.contains("was not attached") && err.contains("--allow-other-owner"),
            "{args:?}: {err}"
        );
        assert!(
            err.contains(&format!("owner uid {owner}")),
            "{args:?}: {err}"
        );
    }
    let out = run_with(&["load", seg.s()], br#"{"key": "k3", "value": "y"}"#);
    assert_eq!(out.status.code(), Some(1), "load: {out:?}");
    assert!(one_line_error(&out).contains("--allow-other-owner"));
    // Nothing was written.
    assert_eq!(ok(&["keys", seg.s()]).trim(), "k");
    // Allowed explicitly, they work.
    ok(&["set", "--allow-other-owner", seg.s(), "k2", "x"]);
    ok(&["del", seg.s(), "k2", "--allow-other-owner"]);
    ok(&["check", "--allow-other-owner", seg.s()]);
    ok(&["rm", "--allow-other-owner", seg.s()]);
    assert!(!std::path::Path::new(&seg.path()).exists());
}

/// Regression (issue 10, item 10): the CLI wrote into any segment it could
/// open, whoever had created it. Now writing commands refuse a segment of
/// another user, or one open to others, without --allow-other-owner, and
/// inspecting commands say whose it is.
#[test]
fn foreign_segments_are_read_with_a_note_and_written_only_when_allowed() {
    // Our own segment, open to everybody.
    let open = Seg::new("open-to-all");
    ShmDict::options()
        .capacity(64)
        .arena_bytes(1 << 16)
        .mode(0o666)
        .open(open.s())
        .unwrap()
        .insert("k", "v")
        .unwrap();
    check_foreign_segment(&open, rustix::process::geteuid().as_raw(), 0o666);

    // Another user's segment (needs root to create it as `nobody`).
    if !rustix::process::geteuid().is_root() {
        eprintln!(
            "foreign_segments: not root (euid {}): cannot create a segment as another user; \
             only the mode part ran",
            rustix::process::geteuid().as_raw()
        );
        return;
    }
    use std::os::unix::process::CommandExt;
    let theirs = Seg::new("nobodys");
    let out = Command::new(BIN)
        .args(["set", theirs.s(), "k", "v", "--create", "--capacity", "64"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(out.status.success(), "creating as nobody: {out:?}");
    check_foreign_segment(&theirs, 65534, 0o600);
}

/// Keys and their values.
type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// Creates `seg` with a 16-key index and a 64 KiB arena and inserts
/// `n` keys (values of mixed sizes, a few larger than the initial arena),
/// so that both the index and the arena grow while this handle stays
/// attached. Returns the handle and what was inserted.
fn grown(seg: &Seg, n: usize) -> (ShmDict, Entries) {
    let d = ShmDict::options()
        .capacity(16)
        .arena_bytes(64 << 10)
        .open(seg.s())
        .unwrap();
    let mut want = Vec::new();
    for i in 0..n {
        let key = format!("key/{i:05}").into_bytes();
        let len = match i % 500 {
            0 => 100_000 + i, // larger than the whole initial arena
            j => j % 300,
        };
        let value: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
        d.insert(&key, &value).unwrap();
        want.push((key, value));
    }
    (d, want)
}

/// Every key and value of `d`, sorted.
fn contents(d: &ShmDict) -> Entries {
    let mut got: Vec<_> = d
        .keys()
        .unwrap()
        .into_iter()
        .map(|k| {
            let v = d.get(&k).unwrap().unwrap();
            (k, v)
        })
        .collect();
    got.sort();
    got
}

/// `stat` of a dictionary that grew while attached: its one file, the
/// memory committed against the reservation, and one line per index
/// generation (capacity, buckets, when in UTC, the grower's pid, the keys
/// then), in text and JSON, with every arena byte accounted for (index
/// tables of later generations are carved from the arena).
#[test]
fn stat_of_a_grown_dictionary_prints_its_generations() {
    let seg = Seg::new("stat-grown");
    let (d, _) = grown(&seg, 3000);
    let st = d.stats();
    assert!(st.generation >= 7, "{st:?}");
    let text = ok(&["stat", seg.s()]);
    assert!(
        text.contains(&format!("file:         {} (its only file)", seg.path())),
        "{text}"
    );
    assert!(
        text.contains("growth:       grows while attached; no max_bytes"),
        "{text}"
    );
    let memory = text
        .lines()
        .find(|l| l.starts_with("memory:"))
        .expect(&text);
    assert!(
        memory.contains(&format!(
            "({} bytes: the file's size, sparse)",
            st.reserved_bytes
        )),
        "{memory}"
    );
    assert!(
        text.contains(&format!(
            "index:        generation {} (doubled {} times)",
            st.generation, st.generation
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("3000 of capacity {} ", st.capacity)),
        "{text}"
    );
    assert!(!text.contains("neither in use"), "{text}");
    // The history: a header, then generations 0..=current in order.
    let lines: Vec<&str> = text.lines().collect();
    let head = lines
        .iter()
        .position(|l| l.starts_with("generations:"))
        .expect(&text);
    let rows = &lines[head + 1..];
    assert_eq!(rows.len(), st.generation as usize + 1, "{text}");
    let me = std::process::id().to_string();
    for (g, row) in rows.iter().enumerate() {
        let f: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(f.len(), 6, "{row}");
        assert_eq!(f[0], g.to_string(), "{row}");
        assert_eq!(f[1], (16u64 << g).to_string(), "{row}");
        assert_eq!(f[2], st.growth[g].buckets.to_string(), "{row}");
        // 2026-12-07T21:39:11.646Z
        let at = f[3].as_bytes();
        assert!(
            at.len() == 24 && at[4] == b'-' && at[10] == b'T' && at[19] == b'.' && at[23] == b'Z',
            "{row}"
        );
        assert_eq!(f[4], me, "this process created and grew it: {row}");
        // A generation becomes current when a new key finds the previous
        // one full.
        let keys_then = if g == 0 { 0 } else { 16u64 << (g - 1) };
        assert_eq!(f[5], keys_then.to_string(), "{row}");
    }
    // Generations became current in order.
    let times: Vec<&str> = rows
        .iter()
        .map(|r| r.split_whitespace().nth(3).unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");

    let v = json(&ok(&["stat", seg.s(), "--json"]));
    assert_eq!(v["generation"], st.generation);
    assert_eq!(v["grows"], true);
    assert!(v["max_bytes"].is_null());
    assert_eq!(v["reserved_bytes"], st.reserved_bytes);
    assert_eq!(v["size"], st.reserved_bytes);
    let committed = v["committed_bytes"].as_u64().unwrap();
    assert!(committed > 0 && committed < st.reserved_bytes, "{v}");
    let growth = v["growth"].as_array().unwrap();
    assert_eq!(growth.len(), st.generation as usize + 1);
    assert_eq!(growth[1]["keys"], 16);
    assert_eq!(growth[1]["capacity"], 32);
    assert_eq!(growth[0]["pid"], std::process::id());
    let index = v["arena_index_bytes"].as_u64().unwrap();
    assert!(index > 0, "{v}");
    assert_eq!(v["arena_unaccounted_bytes"], 0, "{v}");
    let part = |k: &str| v[k].as_u64().unwrap();
    assert_eq!(
        part("arena_in_use_bytes")
            + part("arena_index_bytes")
            + part("arena_free_bytes")
            + part("arena_retired_bytes"),
        part("arena_bytes"),
        "{v}"
    );

    // A fixed-size dictionary says so, with its limit.
    let fixed = Seg::new("stat-fixed");
    let f = ShmDict::options()
        .capacity(100)
        .arena_bytes(1 << 20)
        .fixed_size(true)
        .max_bytes(16 << 20)
        .open(fixed.s())
        .unwrap();
    f.insert("k", "v").unwrap();
    let text = ok(&["stat", fixed.s()]);
    assert!(
        text.contains(
            "growth:       fixed size (never grows); max_bytes 16.0 MiB (16777216 bytes)"
        ),
        "{text}"
    );
    assert!(!text.contains("index:"), "{text}");
    let v = json(&ok(&["stat", fixed.s(), "--json"]));
    assert_eq!(v["grows"], false);
    assert_eq!(v["generation"], 0);
    assert_eq!(v["max_bytes"], 16 << 20);
    assert_eq!(v["growth"].as_array().unwrap().len(), 1);
}

/// `ls` of a dictionary whose file is a large sparse reservation shows
/// the memory it takes, not the file's size, and its fill against the
/// current index; inspecting it commits no memory (nothing reads the
/// reservation's untouched pages).
#[test]
fn ls_shows_memory_not_the_reservation() {
    let seg = Seg::new("ls-grown");
    let (d, _) = grown(&seg, 2000);
    let st = d.stats();
    let info = segments::info(seg.s()).unwrap();
    assert_eq!(info.size, st.reserved_bytes);
    // The reservation dwarfs the memory (unless /dev/shm is tiny).
    assert!(info.allocated < 16 << 20, "{info:?}");
    let text = ok(&["ls", "--prefix", seg.s()]);
    let header = text.lines().next().unwrap();
    assert!(
        header.starts_with("NAME") && header.contains("IN MEMORY") && header.contains("MAX"),
        "{text}"
    );
    assert!(!header.contains("SIZE"), "{text}");
    let row = text.lines().find(|l| l.starts_with(seg.s())).expect(&text);
    let cols: Vec<&str> = row
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    // NAME KIND IN-MEMORY MAX KEYS FILL VERSION OWNER MODE ATTACHED
    assert_eq!(cols[1], "dictionary", "{row}");
    let (num, unit) = cols[2].split_once(' ').expect(row);
    let num: f64 = num.parse().expect(row);
    let scale = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1048576.0,
        _ => panic!("memory of a small dictionary in {unit}: {row}"),
    };
    let shown = num * scale;
    assert!(
        (shown - info.allocated as f64).abs() <= 0.06 * scale,
        "{row} vs {info:?}"
    );
    assert_eq!(cols[4], "2000", "{row}");
    let fill: f64 = cols[5].trim_end_matches('%').parse().expect(row);
    assert!(fill > 0.0 && fill <= 100.0, "{row}");

    let v = json(&ok(&["ls", "--json", "--prefix", seg.s()]));
    let s = &v.as_array().unwrap()[0];
    assert_eq!(s["capacity"], st.capacity);
    assert_eq!(s["generation"], st.generation);
    assert_eq!(s["grows"], true);
    assert_eq!(s["size"], st.reserved_bytes);
    assert_eq!(s["committed"], d.stats().committed_bytes);
    assert!(s["max_bytes"].is_null());

    // Inspecting commands read only committed memory: of the grown
    // dictionary, and of one whose first index (32 MiB for a million keys)
    // is untouched but for a few buckets.
    let big = Seg::new("ls-big");
    let b = ShmDict::options()
        .capacity(1_000_000)
        .open(big.s())
        .unwrap();
    for i in 0..10 {
        b.insert(format!("key/{i:05}"), "v").unwrap();
    }
    for s in [&seg, &big] {
        let before = segments::info(s.s()).unwrap().allocated;
        ok(&["ls", "--prefix", s.s()]);
        ok(&["stat", s.s()]);
        ok(&["stat", s.s(), "--json"]);
        ok(&["keys", s.s()]);
        ok(&["dump", s.s()]);
        ok(&["get", s.s(), "key/00007", "--hex"]);
        ok(&["check", s.s()]);
        let after = segments::info(s.s()).unwrap().allocated;
        assert!(
            after <= before + (256 << 10),
            "{}: inspecting committed {} bytes",
            s.s(),
            after - before
        );
    }
}

/// `dump` of a dictionary that grew several generations, `load` into a
/// fresh one created with capacity 16 (which grows in turn): the same
/// keys and values. `--fixed-size` and `--max-bytes` make the load stop
/// with a one-line "full" error that says how much was loaded; `rm`
/// removes a grown dictionary's one file.
#[test]
fn dump_and_load_across_growth() {
    let src = Seg::new("grow-src");
    let dst = Seg::new("grow-dst");
    let (d, mut want) = grown(&src, 3000);
    assert!(d.stats().generation >= 7);
    want.sort();
    assert_eq!(contents(&d), want);
    let dump = run(&["dump", src.s()]);
    assert!(dump.status.success(), "{dump:?}");
    assert_eq!(dump.stdout.split(|&b| b == b'\n').count(), 3001);
    let out = run_with(
        &[
            "load",
            dst.s(),
            "--create",
            "--capacity",
            "16",
            "--arena-bytes",
            "65536",
        ],
        &dump.stdout,
    );
    assert!(out.status.success(), "{out:?}");
    let copy = ShmDict::options().create(false).open(dst.s()).unwrap();
    assert_eq!(contents(&copy), want);
    let st = copy.stats();
    assert!(st.grows && st.generation >= 7, "{st:?}");
    assert_eq!(st.growth[0].capacity, 16);
    let v = json(&ok(&["stat", dst.s(), "--json"]));
    assert_eq!(v["len"], 3000);
    assert_eq!(
        v["growth"].as_array().unwrap().len(),
        st.generation as usize + 1
    );
    // And back again, through a third dictionary: identical dumps.
    let again = run(&["dump", dst.s()]);
    assert_eq!(again.stdout, dump.stdout);

    // A fixed-size target stops at its capacity.
    let fixed = Seg::new("grow-fixed");
    let out = run_with(
        &[
            "load",
            fixed.s(),
            "--create",
            "--capacity",
            "100",
            "--fixed-size",
        ],
        &dump.stdout,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = one_line_error(&out);
    assert!(
        err.contains("is full") && err.contains("fixed size"),
        "{err}"
    );
    assert!(
        err.contains("the 100 entries before it were loaded"),
        "{err}"
    );
    let f = ShmDict::options().create(false).open(fixed.s()).unwrap();
    assert_eq!((f.len(), f.stats().grows), (100, false));
    // A target with max_bytes stops there, having taken no more.
    let capped = Seg::new("grow-capped");
    let out = run_with(
        &[
            "load",
            capped.s(),
            "--create",
            "--capacity",
            "16",
            "--max-bytes",
            "1MiB",
        ],
        &dump.stdout,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = one_line_error(&out);
    assert!(
        err.contains("is full") && err.contains("entries before it were loaded"),
        "{err}"
    );
    let c = ShmDict::options().create(false).open(capped.s()).unwrap();
    let cs = c.stats();
    assert_eq!(cs.max_bytes, Some(1 << 20));
    assert!(cs.committed_bytes <= 1 << 20, "{cs:?}");
    assert!(!c.is_empty() && c.len() < 3000, "{}", c.len());
    assert!(segments::info(capped.s()).unwrap().allocated <= 1 << 20);
    // Usage errors: --max-bytes needs --create and a byte count.
    let out = run(&["set", capped.s(), "k", "v", "--max-bytes", "1MiB"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = run(&[
        "set",
        capped.s(),
        "k",
        "v",
        "--create",
        "--max-bytes",
        "lots",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // rm: the one file is gone, and nothing else of that name is left.
    drop(d);
    ok(&["rm", src.s()]);
    let left: Vec<_> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(src.s()))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// `gc` removes a grown dictionary whose processes died.
#[test]
fn gc_removes_a_grown_dictionary() {
    let seg = Seg::new("gcgrown-dead");
    drop(grown(&seg, 500).0);
    let mut w = attached_watcher(&seg);
    w.0.kill().unwrap(); // SIGKILL: no chance to detach.
    w.0.wait().unwrap();
    let prefix = format!("clitest-{}-gcgrown-", std::process::id());
    assert_eq!(ok(&["gc", "--prefix", &prefix]), format!("{}\n", seg.s()));
    assert!(!std::path::Path::new(&seg.path()).exists());
}
