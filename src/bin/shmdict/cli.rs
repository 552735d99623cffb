//! The commands of the `shmdict` tool (see `shmdict.rs`).

use std::io::{self, BufRead, BufWriter, IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use shmdict::segments::{self, SegmentInfo, SegmentKind};
use shmdict::{Dict, Error, ShmDict};

use crate::enc::{self, Enc};

const EXIT_ERROR: u8 = 1;
const EXIT_NO_KEY: u8 = 3;

const MAIN_HELP: &str = "\
Examples:
  shmdict ls                        every segment: memory used, keys, attached processes
  shmdict stat jobs                 memory, capacity, arena use, growth history of 'jobs'
  shmdict set jobs job/7 done --create
  shmdict set small k v --create --capacity 1000 --max-bytes 64MiB
  shmdict get jobs job/7
  shmdict dump jobs > jobs.jsonl    and back: shmdict load copy --create < jobs.jsonl
  shmdict gc --dry-run              segments whose processes all died
  shmdict get redis://10.0.0.5:6379/jobs job/7
                                    get, set, del, keys, dump, load and watch also take a
                                    Redis target (redis://HOST:PORT/NAME or
                                    redis+cluster://HOST:PORT,HOST:PORT/NAME) in place of
                                    the segment name (a build with the `redis` feature)

Inspecting commands never create a segment. `set` and `load` create one only
with --create.

/dev/shm is shared by every user. Inspecting commands (ls, stat, get, keys,
dump, watch) read any segment they can open, and say whose it is when it is
another user's or open to others. Writing commands (set, del, load, check,
rm) refuse a segment that another user owns, or (set, del, load, check) one
whose mode grants anybody but its owner access, unless --allow-other-owner
is given.

Exit codes: 0 success, 1 error, 2 usage error, 3 key not found (get, del).";

/// Inspect and edit shmdict dictionaries in shared memory (/dev/shm).
#[derive(Parser, Debug)]
#[command(name = "shmdict", version, after_help = MAIN_HELP)]
struct Cli {
    /// Let writing commands (set, del, load, check, rm) use a segment that
    /// another user owns, or whose mode grants more than 0600.
    #[arg(long, global = true)]
    allow_other_owner: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List every shmdict segment: memory used, keys, fill level, format
    /// version, attached processes.
    ///
    /// Lists the segments in /dev/shm this user can read. IN MEMORY is the
    /// memory a segment takes (what `du` shows); MAX the most it may take:
    /// a dictionary's max_bytes, else its file's size. A dictionary that
    /// grows (the default) has a file as large as the most it may ever
    /// take, up to the size of /dev/shm: the file is sparse, a reservation
    /// of address space that becomes memory only as it is used, so `ls -l
    /// /dev/shm` shows large files that cost nothing (`du`, or this
    /// command, shows the memory). KEYS is live keys; FILL is live keys
    /// over the current index's capacity (a dictionary that grows doubles
    /// its index when it is full); OWNER is the owner's uid and MODE the
    /// permission bits (another user's segment, or one open to others, is
    /// not private to you). A segment whose header fails a check is flagged
    /// DAMAGED with the reason.
    #[command(after_help = "Example:\n  shmdict ls --prefix jobs-")]
    Ls(LsArgs),
    /// Show a dictionary's file and memory (committed, reserved, max_bytes),
    /// capacity, load factor, arena use per size class, free and retired
    /// bytes, borrowed reads held, attached processes and growth history.
    ///
    /// A dictionary is one file in /dev/shm. Unless created with
    /// --fixed-size, it grows while processes stay attached: its file
    /// reserves the most it may take (max_bytes, or the size of /dev/shm),
    /// and memory is committed as it is used. Its index doubles when a new
    /// key finds it full: each doubling is a generation, listed with when
    /// it happened (UTC), the process that did it and the keys present.
    ///
    /// Retired bytes are replaced or removed values waiting until no
    /// borrowed read (a `Reader` or `ValueRef` of any process) can see
    /// them; writers reuse them as they need room. A borrowed read held for
    /// long (see the oldest's age) keeps everything replaced since from
    /// being reused.
    #[command(after_help = "Example:\n  shmdict stat jobs")]
    Stat(StatArgs),
    /// Print the value of a key (exit code 3 if the key is absent).
    ///
    /// The value is printed as UTF-8 text followed by a newline; a value that
    /// is not UTF-8 is an error unless --hex, --base64, --raw or --json is
    /// given.
    #[command(after_help = "Examples:\n  shmdict get jobs job/7\n  \
        shmdict get jobs job/7 --hex\n  shmdict get jobs job/7 --raw > value.bin")]
    Get(GetArgs),
    /// Set a key to a value, creating or overwriting it.
    ///
    /// The value comes from VALUE, or from standard input (all of it, as is)
    /// if VALUE is left out. The segment must exist unless --create is given.
    #[command(after_help = "Examples:\n  shmdict set jobs job/7 done\n  \
        shmdict set jobs blob 00ff10 --hex\n  shmdict set jobs report < report.pdf\n  \
        shmdict set new-dict k v --create --capacity 10000")]
    Set(SetArgs),
    /// Remove a key (exit code 3 if it was absent).
    #[command(after_help = "Example:\n  shmdict del jobs job/7")]
    Del(DelArgs),
    /// List the keys of a dictionary, sorted, one per line.
    #[command(after_help = "Examples:\n  shmdict keys jobs --prefix job/\n  \
        shmdict keys jobs --json")]
    Keys(KeysArgs),
    /// Write every key and value as JSON lines, one object per key.
    ///
    /// Each line is {"key": K, "value": V}; a key or value that is not UTF-8
    /// is written as "key_b64" or "value_b64" in base64 instead. Keys written
    /// or removed while the dump runs may or may not be included.
    #[command(after_help = "Example:\n  shmdict dump jobs > jobs.jsonl")]
    Dump(DumpArgs),
    /// Insert the JSON lines of a dump read from standard input.
    ///
    /// The whole input is checked first: a malformed line is reported with
    /// its number and nothing is loaded. If an insert then fails (for example
    /// the dictionary is full), the lines before it stay loaded and the error
    /// says how many. Existing keys are overwritten.
    #[command(after_help = "Example:\n  shmdict load jobs-copy --create < jobs.jsonl")]
    Load(LoadArgs),
    /// Print the value of a key each time it is written, until interrupted.
    ///
    /// The current value is printed first, if the key is present. Each write
    /// prints the value (writes in quick succession may be seen as one: the
    /// latest value is always printed). A removal prints a note on stderr (or
    /// a null value with --json). Sleeps between changes; does not poll.
    #[command(after_help = "Example:\n  shmdict watch jobs job/7")]
    Watch(WatchArgs),
    /// Remove a segment (processes still attached keep working on it).
    ///
    /// Removes the name; the memory is freed when the last attached process
    /// detaches. Refuses a file that is not a shmdict segment unless --force.
    #[command(after_help = "Example:\n  shmdict rm jobs")]
    Rm(RmArgs),
    /// Remove segments left behind by crashed processes: those whose
    /// attached processes are all dead.
    ///
    /// A segment nobody is attached to at all is kept (it may be waiting for
    /// its next user) unless --all-detached is given. Only your own segments
    /// are considered. A process attaching while gc runs keeps working, but
    /// what it writes is lost: run gc when the segments' users are stopped.
    /// Prints the names removed.
    #[command(after_help = "Examples:\n  shmdict gc --dry-run\n  shmdict gc --prefix myapp-")]
    Gc(GcArgs),
    /// Check a dictionary's consistency, repair what crashed processes left
    /// behind, and report corruption (exit code 1 if any).
    ///
    /// Repaired: slots and locks still held by dead processes, counters an
    /// interrupted operation left off, arena blocks taken or retired but
    /// never published or freed. Readers are not stopped; writers in all
    /// processes pause while the check runs (milliseconds for small
    /// dictionaries, about a second per GiB of arena).
    #[command(after_help = "Example:\n  shmdict check jobs")]
    Check(CheckArgs),
}

/// Encoding of a KEY argument.
#[derive(Args, Debug)]
struct KeyEnc {
    /// KEY is hexadecimal.
    #[arg(long, conflicts_with = "key_base64")]
    key_hex: bool,
    /// KEY is base64.
    #[arg(long)]
    key_base64: bool,
}

impl KeyEnc {
    fn enc(&self) -> Enc {
        Enc::from_flags(self.key_hex, self.key_base64)
    }
    fn key(&self, k: &str) -> Result<Vec<u8>, Failure> {
        self.enc().decode(k, "key").map_err(Failure::msg)
    }
}

/// Creation of a missing segment (`set`, `load`).
#[derive(Args, Debug)]
struct CreateArgs {
    /// Create the dictionary if it does not exist.
    #[arg(long)]
    create: bool,
    /// With --create: live keys the new dictionary's index holds at first
    /// (it doubles as keys are added; with --fixed-size, the maximum)
    /// [default: 1048576].
    #[arg(long, requires = "create")]
    capacity: Option<usize>,
    /// With --create: bytes for keys and values at first (with
    /// --fixed-size, all there is) [default: 1 GiB, at most a quarter of
    /// the free space in /dev/shm].
    #[arg(long, requires = "create")]
    arena_bytes: Option<usize>,
    /// With --create: the most /dev/shm memory the new dictionary may
    /// take, all of it (writes beyond it fail with "full"); a number of
    /// bytes, or with a suffix: 64MiB, 2GiB, 512KiB [default: no limit but
    /// the size of /dev/shm].
    #[arg(long, requires = "create", value_parser = parse_bytes)]
    max_bytes: Option<u64>,
    /// With --create: the new dictionary never grows (full at --capacity
    /// keys or when its --arena-bytes are used).
    #[arg(long, requires = "create")]
    fixed_size: bool,
}

/// A byte count: digits, optionally followed by B, KiB, MiB, GiB or TiB
/// (also K, M, G, T, KB, MB, GB, TB: powers of 1024 all).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes (like 67108864 or 64MiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("{s:?}: unknown unit (use B, KiB, MiB, GiB or TiB)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[derive(Args, Debug)]
struct LsArgs {
    /// Only segments whose names start with this.
    #[arg(long, default_value = "", hide_default_value = true)]
    prefix: String,
    /// Print a JSON array of objects.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct StatArgs {
    /// The dictionary.
    name: String,
    /// Print a JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct GetArgs {
    /// The dictionary.
    name: String,
    /// The key.
    key: String,
    #[command(flatten)]
    key_enc: KeyEnc,
    /// Print the value in hexadecimal.
    #[arg(long, group = "out")]
    hex: bool,
    /// Print the value in base64.
    #[arg(long, group = "out")]
    base64: bool,
    /// Write the value's bytes exactly, with no newline.
    #[arg(long, group = "out")]
    raw: bool,
    /// Print {"key": …, "value": …} ("value": null if absent).
    #[arg(long, group = "out")]
    json: bool,
}

#[derive(Args, Debug)]
struct SetArgs {
    /// The dictionary.
    name: String,
    /// The key.
    key: String,
    /// The value; read from standard input if left out.
    value: Option<String>,
    #[command(flatten)]
    key_enc: KeyEnc,
    /// VALUE is hexadecimal.
    #[arg(long, conflicts_with = "base64")]
    hex: bool,
    /// VALUE is base64.
    #[arg(long)]
    base64: bool,
    #[command(flatten)]
    create: CreateArgs,
}

#[derive(Args, Debug)]
struct DelArgs {
    /// The dictionary.
    name: String,
    /// The key.
    key: String,
    #[command(flatten)]
    key_enc: KeyEnc,
}

#[derive(Args, Debug)]
struct KeysArgs {
    /// The dictionary.
    name: String,
    /// Only keys that start with this (encoded like the output: text, or
    /// hexadecimal with --hex, base64 with --base64).
    #[arg(long)]
    prefix: Option<String>,
    /// Print keys in hexadecimal.
    #[arg(long, group = "out")]
    hex: bool,
    /// Print keys in base64.
    #[arg(long, group = "out")]
    base64: bool,
    /// Print a JSON array of {"key": …} objects ("key_b64" for non-UTF-8 keys).
    #[arg(long, group = "out")]
    json: bool,
}

#[derive(Args, Debug)]
struct DumpArgs {
    /// The dictionary.
    name: String,
}

#[derive(Args, Debug)]
struct LoadArgs {
    /// The dictionary.
    name: String,
    #[command(flatten)]
    create: CreateArgs,
}

#[derive(Args, Debug)]
struct WatchArgs {
    /// The dictionary.
    name: String,
    /// The key.
    key: String,
    #[command(flatten)]
    key_enc: KeyEnc,
    /// Print values in hexadecimal.
    #[arg(long, group = "out")]
    hex: bool,
    /// Print values in base64.
    #[arg(long, group = "out")]
    base64: bool,
    /// Print one JSON object per line ({"key": …, "value": …}).
    #[arg(long, group = "out")]
    json: bool,
    /// Stop after printing this many values.
    #[arg(long)]
    count: Option<u64>,
}

#[derive(Args, Debug)]
struct RmArgs {
    /// The segment.
    name: String,
    /// Remove the name even if the file is not a shmdict segment.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
struct GcArgs {
    /// Only print what would be removed.
    #[arg(long)]
    dry_run: bool,
    /// Also remove segments nobody is attached to.
    #[arg(long)]
    all_detached: bool,
    /// Only segments whose names start with this.
    #[arg(long, default_value = "", hide_default_value = true)]
    prefix: String,
    /// Print a JSON array of names.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct CheckArgs {
    /// The dictionary.
    name: String,
}

/// Why a command failed: an exit code and, unless already reported, a
/// one-line message.
#[derive(Debug)]
struct Failure {
    code: u8,
    msg: Option<String>,
}

impl Failure {
    fn msg(msg: impl Into<String>) -> Failure {
        Failure {
            code: EXIT_ERROR,
            msg: Some(msg.into()),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::msg(e.to_string())
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        if e.kind() == io::ErrorKind::BrokenPipe {
            // The reader went away (`shmdict keys x | head`): not an error.
            Failure { code: 0, msg: None }
        } else {
            Failure::msg(format!("output: {e}"))
        }
    }
}

type Outcome = Result<(), Failure>;

pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    let allow = cli.allow_other_owner;
    let result = match cli.cmd {
        Cmd::Ls(a) => ls(a),
        Cmd::Stat(a) => stat(a),
        Cmd::Get(a) => get(a),
        Cmd::Set(a) => set(a, allow),
        Cmd::Del(a) => del(a, allow),
        Cmd::Keys(a) => keys(a),
        Cmd::Dump(a) => dump(a),
        Cmd::Load(a) => load(a, allow),
        Cmd::Watch(a) => watch(a),
        Cmd::Rm(a) => rm(a, allow),
        Cmd::Gc(a) => gc(a),
        Cmd::Check(a) => check(a, allow),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if let Some(m) = f.msg {
                // One line, whatever the message holds.
                eprintln!("shmdict: {}", m.replace('\n', " "));
            }
            ExitCode::from(f.code)
        }
    }
}

/// The description of an existing segment; a clear error if there is none.
fn existing(name: &str) -> Result<SegmentInfo, Failure> {
    segments::info(name).map_err(|e| match e {
        Error::NotFound { .. } => Failure::msg(format!("no segment named {name:?}")),
        e => e.into(),
    })
}

/// Whose a segment is, when that is worth a note: another user's, or open
/// to users other than its owner.
fn foreign(info: &SegmentInfo) -> Option<String> {
    let me = rustix::process::geteuid().as_raw();
    let open_to_others = info.mode & 0o077 != 0;
    (info.uid != me || open_to_others).then(|| {
        format!(
            "segment '{}' belongs to uid {}{} and has mode {:04o}",
            info.name,
            info.uid,
            if info.uid == me { " (you)" } else { "" },
            info.mode
        )
    })
}

/// Attaches to an existing dictionary to read it, whoever owns it (saying
/// so on stderr if it is not private to us); never creates one (even if the
/// name is removed between the check and the open).
fn open_for_reading(name: &str) -> Result<ShmDict, Failure> {
    let info = existing(name)?;
    if let Some(note) = foreign(&info) {
        eprintln!("shmdict: note: {note}");
    }
    Ok(ShmDict::options()
        .create(false)
        .allow_other_owner(true)
        .open(name)?)
}

/// Attaches to an existing dictionary to change it: another user's
/// segment, or one whose mode grants more than 0600, only with
/// --allow-other-owner (`PermissionDenied` otherwise). Never creates one.
fn open_existing(name: &str, allow_other_owner: bool) -> Result<ShmDict, Failure> {
    existing(name)?;
    Ok(ShmDict::options()
        .create(false)
        .allow_other_owner(allow_other_owner)
        .open(name)?)
}

/// Whether NAME is a Redis target (`redis://HOST:PORT/NAME`,
/// `redis+cluster://HOST:PORT,…/NAME`) rather than a segment name.
fn is_remote(name: &str) -> bool {
    name.starts_with("redis://") || name.starts_with("redis+cluster://")
}

/// A segment to read (whoever owns it, see [`open_for_reading`]) or a Redis
/// target.
fn open_dict_for_reading(name: &str) -> Result<Box<dyn Dict>, Failure> {
    if is_remote(name) {
        // Without the `redis` feature: a clear InvalidArgument.
        return Ok(shmdict::connect(name)?);
    }
    Ok(Box::new(open_for_reading(name)?))
}

/// A segment to change (attached, never created; see [`open_existing`]) or
/// a Redis target.
fn open_dict(name: &str, allow_other_owner: bool) -> Result<Box<dyn Dict>, Failure> {
    if is_remote(name) {
        return Ok(shmdict::connect(name)?);
    }
    Ok(Box::new(open_existing(name, allow_other_owner)?))
}

/// A segment (created only with --create) or a Redis target (where a
/// dictionary exists once it has a key, so --create changes nothing).
fn open_dict_for_writing(
    name: &str,
    c: &CreateArgs,
    allow_other_owner: bool,
) -> Result<Box<dyn Dict>, Failure> {
    if is_remote(name) {
        return Ok(shmdict::connect(name)?);
    }
    Ok(Box::new(open_for_writing(name, c, allow_other_owner)?))
}

/// Attaches to a dictionary to change it, creating it only with --create.
fn open_for_writing(
    name: &str,
    c: &CreateArgs,
    allow_other_owner: bool,
) -> Result<ShmDict, Failure> {
    match existing(name) {
        Ok(_) => Ok(ShmDict::options()
            .create(false)
            .allow_other_owner(allow_other_owner)
            .open(name)?),
        Err(_) if c.create => {
            let mut o = ShmDict::options();
            if let Some(n) = c.capacity {
                o = o.capacity(n);
            }
            if let Some(n) = c.arena_bytes {
                o = o.arena_bytes(n);
            }
            if let Some(n) = c.max_bytes {
                o = o.max_bytes(n);
            }
            Ok(o.fixed_size(c.fixed_size).open(name)?)
        }
        Err(Failure { msg: Some(m), .. }) if m.starts_with("no segment named") => {
            Err(Failure::msg(format!("{m} (add --create to create it)")))
        }
        Err(f) => Err(f),
    }
}

fn no_key(name: &str, key: &[u8]) -> Failure {
    Failure {
        code: EXIT_NO_KEY,
        msg: Some(format!(
            "shmdict segment '{name}' has no key {}",
            printable(key)
        )),
    }
}

/// A key for messages: quoted text, or hex if it is not UTF-8.
fn printable(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => format!("{s:?}"),
        Err(_) => format!("0x{}", enc::hex_encode(b)),
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.1}%", part as f64 * 100.0 / whole as f64)
    }
}

fn attached_text(info: &SegmentInfo) -> String {
    match info.attached {
        Some(a) => format!("{} live, {} dead", a.live, a.dead),
        None => "?".into(),
    }
}

fn kind_json(k: SegmentKind) -> &'static str {
    match k {
        SegmentKind::Dict => "dictionary",
        SegmentKind::Value => "value",
        SegmentKind::Array => "array",
        _ => "unknown",
    }
}

fn info_json(s: &SegmentInfo) -> Value {
    json!({
        "name": s.name,
        "kind": kind_json(s.kind),
        "size": s.size,
        "allocated": s.allocated,
        "committed": s.committed,
        "max_bytes": s.max_bytes,
        "grows": s.grows,
        "generation": s.generation,
        "uid": s.uid,
        "mode": format!("{:04o}", s.mode),
        "version": s.version,
        "supported": s.supported,
        "attached": s.attached.map(|a| json!({"live": a.live, "dead": a.dead})),
        "len": s.len,
        "capacity": s.capacity,
        "error": s.error,
    })
}

fn print_json(v: &Value) -> Outcome {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v).map_err(io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

fn ls(a: LsArgs) -> Outcome {
    let all: Vec<SegmentInfo> = segments::list()?
        .into_iter()
        .filter(|s| s.name.starts_with(&a.prefix))
        .collect();
    if a.json {
        return print_json(&Value::Array(all.iter().map(info_json).collect()));
    }
    if all.is_empty() {
        let matching = if a.prefix.is_empty() {
            String::new()
        } else {
            format!(" named {}*", a.prefix)
        };
        eprintln!("shmdict: no shmdict segments{matching} in /dev/shm");
        return Ok(());
    }
    let mut rows = vec![[
        "NAME".to_string(),
        "KIND".into(),
        "IN MEMORY".into(),
        "MAX".into(),
        "KEYS".into(),
        "FILL".into(),
        "VERSION".into(),
        "OWNER".into(),
        "MODE".into(),
        "ATTACHED".into(),
    ]];
    for s in &all {
        let version = if s.supported {
            s.version.to_string()
        } else {
            format!("{} (unsupported)", s.version)
        };
        rows.push([
            s.name.clone(),
            s.kind.to_string(),
            human(s.allocated),
            human(s.max_bytes.map_or(s.size, |m| m.min(s.size))),
            s.len.map_or("-".into(), |n| n.to_string()),
            match (s.len, s.capacity) {
                (Some(n), Some(c)) => percent(n, c),
                _ => "-".into(),
            },
            version,
            s.uid.to_string(),
            format!("{:04o}", s.mode),
            attached_text(s),
        ]);
    }
    let mut widths = [0usize; 10];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = io::stdout().lock();
    for (i, r) in rows.iter().enumerate() {
        let mut line = String::new();
        for (j, (c, w)) in r.iter().zip(widths).enumerate() {
            if j + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  "));
            }
        }
        if let Some(e) = i.checked_sub(1).and_then(|i| all[i].error.as_ref()) {
            line.push_str(&format!("  DAMAGED: {e}"));
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

fn stat(a: StatArgs) -> Outcome {
    let info = existing(&a.name)?;
    let d = open_for_reading(&a.name)?;
    let st = d.stats();
    let in_use = segments::blocks_in_use(&a.name)?;
    let slots = st.buckets as u64 * 3;
    let block = |o: usize| 64u64 << o;
    let classes = st.free_blocks.len().max(in_use.len());
    let used_bytes: u64 = (0..classes)
        .map(|o| in_use.get(o).copied().unwrap_or(0) * block(o))
        .sum();
    let free_block_bytes: u64 = (0..classes)
        .map(|o| st.free_blocks.get(o).copied().unwrap_or(0) * block(o))
        .sum();
    let free_bytes = free_block_bytes + st.arena_untouched_bytes as u64;
    let arena = st.arena_bytes as u64;
    // Index tables after the first are taken from the arena (a power of two
    // of bytes: one block or whole chunks) and kept for good.
    let index_bytes: u64 = st
        .growth
        .iter()
        .filter(|g| g.generation > 0)
        .map(|g| g.buckets * BUCKET_BYTES)
        .sum();
    let unaccounted =
        arena.saturating_sub(used_bytes + free_bytes + st.retired_bytes + index_bytes);
    let oldest_pin_ms = st.oldest_pin_age.map(|a| a.as_millis() as u64);
    // The census taken before attaching: other processes only.
    let att = info.attached.unwrap_or_default();
    let path = format!("/dev/shm/{}", a.name);
    if a.json {
        let per_class: Vec<Value> = (0..classes)
            .map(|o| {
                json!({
                    "block_bytes": block(o),
                    "in_use": in_use.get(o).copied().unwrap_or(0),
                    "free": st.free_blocks.get(o).copied().unwrap_or(0),
                })
            })
            .collect();
        let growth: Vec<Value> = st
            .growth
            .iter()
            .map(|g| {
                json!({
                    "generation": g.generation,
                    "capacity": g.capacity,
                    "buckets": g.buckets,
                    "at": iso8601(g.at),
                    "pid": g.pid,
                    "keys": g.keys,
                })
            })
            .collect();
        return print_json(&json!({
            "name": a.name,
            "file": path,
            "version": info.version,
            "size": info.size,
            "allocated": info.allocated,
            "committed_bytes": st.committed_bytes,
            "reserved_bytes": st.reserved_bytes,
            "max_bytes": st.max_bytes,
            "grows": st.grows,
            "generation": st.generation,
            "mode": format!("{:04o}", info.mode),
            "uid": info.uid,
            "len": st.len,
            "capacity": st.capacity,
            "buckets": st.buckets,
            "slots": slots,
            "load_factor": st.len as f64 / slots.max(1) as f64,
            "tombstones": 0,
            "arena_bytes": arena,
            "arena_in_use_bytes": used_bytes,
            "arena_index_bytes": index_bytes,
            "arena_free_bytes": free_bytes,
            "arena_untouched_bytes": st.arena_untouched_bytes,
            "arena_retired_bytes": st.retired_bytes,
            "arena_unaccounted_bytes": unaccounted,
            "pins": st.pins,
            "oldest_pin_age_ms": oldest_pin_ms,
            "size_classes": per_class,
            "attached": {"live": att.live, "dead": att.dead},
            "growth": growth,
        }));
    }
    let mut out = io::stdout().lock();
    writeln!(out, "segment:      {}", a.name)?;
    writeln!(
        out,
        "file:         {path} (its only file), format version {}, mode {:04o}, owner uid {}",
        info.version, info.mode, info.uid
    )?;
    writeln!(
        out,
        "memory:       {} committed ({} bytes; {} allocated in /dev/shm) of {} reserved \
         ({} bytes: the file's size, sparse)",
        human(st.committed_bytes),
        st.committed_bytes,
        human(info.allocated),
        human(st.reserved_bytes),
        st.reserved_bytes
    )?;
    let limit = match st.max_bytes {
        Some(m) => format!("max_bytes {} ({m} bytes)", human(m)),
        None => "no max_bytes: up to the size of /dev/shm".into(),
    };
    if st.grows {
        writeln!(out, "growth:       grows while attached; {limit}")?;
    } else {
        writeln!(out, "growth:       fixed size (never grows); {limit}")?;
    }
    writeln!(
        out,
        "keys:         {} of capacity {} ({} full{})",
        st.len,
        st.capacity,
        percent(st.len as u64, st.capacity as u64),
        if st.grows {
            "; the index doubles when a new key finds it full"
        } else {
            ""
        }
    )?;
    writeln!(
        out,
        "load factor:  {} of {} slots ({} buckets x 3)",
        percent(st.len as u64, slots),
        slots,
        st.buckets
    )?;
    if st.generation > 0 {
        writeln!(
            out,
            "index:        generation {} (doubled {} time{}), tables of {} taken from the arena",
            st.generation,
            st.generation,
            if st.generation == 1 { "" } else { "s" },
            human(index_bytes)
        )?;
    }
    writeln!(
        out,
        "tombstones:   0 (none by design: removals empty their slot)"
    )?;
    let index_part = if index_bytes > 0 {
        format!(", {} index tables", human(index_bytes))
    } else {
        String::new()
    };
    writeln!(
        out,
        "arena:        {} ({} bytes{}): {} in use{index_part}, {} free ({} never used), {} retired",
        human(arena),
        arena,
        if st.grows { ", reserved" } else { "" },
        human(used_bytes),
        human(free_bytes),
        human(st.arena_untouched_bytes as u64),
        human(st.retired_bytes)
    )?;
    if unaccounted > 0 {
        writeln!(
            out,
            "              {} neither in use, free nor retired (blocks in flight, or leaked by crashed writers)",
            human(unaccounted)
        )?;
    }
    match st.oldest_pin_age {
        Some(age) => writeln!(
            out,
            "borrowed:     {} read{} held by live processes, the oldest for {:.1} s \
             (values replaced since wait for it)",
            st.pins,
            if st.pins == 1 { "" } else { "s" },
            age.as_secs_f64(),
        )?,
        None => writeln!(out, "borrowed:     none held")?,
    }
    writeln!(
        out,
        "size classes: {:>10}  {:>10}  {:>10}",
        "block", "in use", "free"
    )?;
    for o in 0..classes {
        let (u, f) = (
            in_use.get(o).copied().unwrap_or(0),
            st.free_blocks.get(o).copied().unwrap_or(0),
        );
        if u > 0 || f > 0 {
            writeln!(
                out,
                "              {:>10}  {u:>10}  {f:>10}",
                human(block(o))
            )?;
        }
    }
    writeln!(out, "counters:     live keys {}", st.len)?;
    writeln!(
        out,
        "attached:     {} live, {} dead (not counting this command)",
        att.live, att.dead
    )?;
    // One line per index generation: generation 0 is the creation.
    writeln!(
        out,
        "generations:  {:>3}  {:>12}  {:>12}  {:<24}  {:>8}  {:>12}",
        "gen", "capacity", "buckets", "current since (UTC)", "by pid", "keys then"
    )?;
    for g in &st.growth {
        writeln!(
            out,
            "              {:>3}  {:>12}  {:>12}  {:<24}  {:>8}  {:>12}",
            g.generation,
            g.capacity,
            g.buckets,
            iso8601(g.at),
            g.pid,
            g.keys
        )?;
    }
    Ok(())
}

/// Bytes of an index bucket (three slots: see docs/design.md).
const BUCKET_BYTES: u64 = 64;

/// `t` in UTC as ISO 8601 with milliseconds: `2026-12-07T21:39:01.123Z`.
fn iso8601(t: std::time::SystemTime) -> String {
    let d = t
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// The proleptic Gregorian date `days` days after 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March first
    let day = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

fn get(a: GetArgs) -> Outcome {
    let key = a.key_enc.key(&a.key)?;
    let d = open_dict_for_reading(&a.name)?;
    let value = d.get(&key)?;
    if a.json {
        print_json(&enc::key_value(&key, value.as_deref()))?;
        return match value {
            Some(_) => Ok(()),
            None => Err(Failure {
                code: EXIT_NO_KEY,
                msg: None,
            }),
        };
    }
    let Some(value) = value else {
        return Err(no_key(&a.name, &key));
    };
    let mut out = io::stdout().lock();
    if a.raw {
        out.write_all(&value)?;
    } else {
        let s = Enc::from_flags(a.hex, a.base64)
            .encode(&value, &format!("the value of {}", printable(&key)))
            .map_err(Failure::msg)?;
        writeln!(out, "{s}")?;
    }
    out.flush()?;
    Ok(())
}

fn set(a: SetArgs, allow: bool) -> Outcome {
    let key = a.key_enc.key(&a.key)?;
    let enc = Enc::from_flags(a.hex, a.base64);
    let value = match &a.value {
        Some(v) => enc.decode(v, "value").map_err(Failure::msg)?,
        None => {
            let mut buf = Vec::new();
            io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| Failure::msg(format!("reading the value from stdin: {e}")))?;
            if enc == Enc::Text {
                buf
            } else {
                let text = String::from_utf8(buf)
                    .map_err(|_| Failure::msg("the value on stdin is not hex or base64"))?;
                enc.decode(&text, "value").map_err(Failure::msg)?
            }
        }
    };
    let d = open_dict_for_writing(&a.name, &a.create, allow)?;
    d.insert(&key, &value)?;
    Ok(())
}

fn del(a: DelArgs, allow: bool) -> Outcome {
    let key = a.key_enc.key(&a.key)?;
    let d = open_dict(&a.name, allow)?;
    if d.remove(&key)? {
        Ok(())
    } else {
        Err(no_key(&a.name, &key))
    }
}

fn keys(a: KeysArgs) -> Outcome {
    let enc = Enc::from_flags(a.hex, a.base64);
    let prefix = match &a.prefix {
        Some(p) => enc.decode(p, "prefix").map_err(Failure::msg)?,
        None => Vec::new(),
    };
    let d = open_dict_for_reading(&a.name)?;
    let mut keys: Vec<Vec<u8>> = d
        .keys()?
        .into_iter()
        .filter(|k| k.starts_with(&prefix))
        .collect();
    keys.sort();
    if a.json {
        let arr = keys
            .iter()
            .map(|k| {
                let mut obj = serde_json::Map::new();
                enc::put_bytes(&mut obj, "key", k);
                Value::Object(obj)
            })
            .collect();
        return print_json(&Value::Array(arr));
    }
    // Encode everything first: a non-UTF-8 key fails before any output.
    let lines = keys
        .iter()
        .map(|k| enc.encode(k, &format!("key {}", printable(k))))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Failure::msg)?;
    let mut out = BufWriter::new(io::stdout().lock());
    for l in lines {
        writeln!(out, "{l}")?;
    }
    out.flush()?;
    Ok(())
}

/// A progress bar on stderr when it is a terminal; hidden otherwise.
fn progress(len: u64, what: &str) -> ProgressBar {
    if !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{wide_bar}] {pos}/{len} ({eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
}

fn dump(a: DumpArgs) -> Outcome {
    let d = open_dict_for_reading(&a.name)?;
    let mut keys = d.keys()?;
    keys.sort();
    let pb = progress(keys.len() as u64, "dump");
    let mut out = BufWriter::new(io::stdout().lock());
    for k in &keys {
        // A key removed since the scan is skipped.
        if let Some(value) = d.get(k)? {
            serde_json::to_writer(&mut out, &enc::key_value(k, Some(&value)))
                .map_err(io::Error::from)?;
            writeln!(out)?;
        }
        pb.inc(1);
    }
    out.flush()?;
    pb.finish_and_clear();
    Ok(())
}

fn load(a: LoadArgs, allow: bool) -> Outcome {
    // Parse everything first, so a malformed line loads nothing.
    let mut entries = Vec::new();
    for (i, line) in io::stdin().lock().lines().enumerate() {
        let line = line.map_err(|e| Failure::msg(format!("reading stdin, line {}: {e}", i + 1)))?;
        if line.trim().is_empty() {
            continue;
        }
        let (k, v) = enc::parse_entry(&line).map_err(|e| {
            Failure::msg(format!(
                "line {} of the input: {e}; nothing was loaded into '{}'",
                i + 1,
                a.name
            ))
        })?;
        entries.push((i + 1, k, v));
    }
    let d = open_dict_for_writing(&a.name, &a.create, allow)?;
    let pb = progress(entries.len() as u64, "load");
    for (n, (line, k, v)) in entries.iter().enumerate() {
        if let Err(e) = d.insert(k, v) {
            pb.finish_and_clear();
            return Err(Failure::msg(format!(
                "{e} (at input line {line}; the {n} entries before it were loaded)"
            )));
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(())
}

fn watch(a: WatchArgs) -> Outcome {
    let key = a.key_enc.key(&a.key)?;
    let enc = Enc::from_flags(a.hex, a.base64);
    if is_remote(&a.name) {
        return watch_remote(&a, &key, enc);
    }
    let d = open_for_reading(&a.name)?;
    let mut out = io::stdout().lock();
    let mut printed = 0u64;
    let mut emit = |value: Option<&[u8]>, out: &mut io::StdoutLock<'_>| -> Result<bool, Failure> {
        if a.json {
            serde_json::to_writer(&mut *out, &enc::key_value(&key, value))
                .map_err(io::Error::from)?;
            writeln!(out)?;
        } else {
            match value {
                Some(v) => {
                    let s = enc
                        .encode(v, &format!("the value of {}", printable(&key)))
                        .map_err(Failure::msg)?;
                    writeln!(out, "{s}")?;
                }
                None => eprintln!("shmdict: key {} was removed", printable(&key)),
            }
        }
        out.flush()?;
        printed += 1;
        Ok(a.count.is_some_and(|c| printed >= c))
    };
    // Sleeps in `wait_change` until the key is written; the timeout only
    // bounds each sleep.
    let (value, mut version) = d.get_versioned(&key)?;
    if value.is_some() && emit(value.as_deref(), &mut out)? {
        return Ok(());
    }
    loop {
        if let Some((value, v)) = d.wait_change(&key, version, Duration::from_secs(60))? {
            version = v;
            if emit(value.as_deref(), &mut out)? {
                return Ok(());
            }
        }
    }
}

/// `watch` on a Redis target: blocks in Redis between writes.
#[cfg(feature = "redis")]
fn watch_remote(a: &WatchArgs, key: &[u8], enc: Enc) -> Outcome {
    let d = shmdict::RedisDict::open_target(&a.name)?;
    let mut out = io::stdout().lock();
    let mut printed = 0u64;
    let mut first = true;
    let mut failure = None;
    d.watch(key, |value| {
        let initial = std::mem::take(&mut first);
        if initial && value.is_none() {
            return Ok(false);
        }
        let r = (|| -> Result<bool, Failure> {
            if a.json {
                serde_json::to_writer(&mut out, &enc::key_value(key, value.as_deref()))
                    .map_err(io::Error::from)?;
                writeln!(out)?;
            } else {
                match &value {
                    Some(v) => {
                        let s = enc
                            .encode(v, &format!("the value of {}", printable(key)))
                            .map_err(Failure::msg)?;
                        writeln!(out, "{s}")?;
                    }
                    None => eprintln!("shmdict: key {} was removed", printable(key)),
                }
            }
            out.flush()?;
            printed += 1;
            Ok(a.count.is_some_and(|c| printed >= c))
        })();
        match r {
            Ok(stop) => Ok(stop),
            Err(f) => {
                failure = Some(f);
                Ok(true)
            }
        }
    })?;
    failure.map_or(Ok(()), Err)
}

#[cfg(not(feature = "redis"))]
fn watch_remote(a: &WatchArgs, _key: &[u8], _enc: Enc) -> Outcome {
    // Gives the clear "no Redis support in this build" error.
    shmdict::connect(&a.name)?;
    Ok(())
}

fn rm(a: RmArgs, allow: bool) -> Outcome {
    match existing(&a.name) {
        Ok(info) => {
            let me = rustix::process::geteuid().as_raw();
            if info.uid != me && !allow {
                return Err(Error::PermissionDenied {
                    segment: a.name.clone(),
                    owner_uid: info.uid,
                    mode: info.mode,
                    reason: format!("it belongs to uid {}, not to you (uid {me})", info.uid),
                }
                .into());
            }
            ShmDict::unlink(&a.name)?;
            if let Some(att) = info.attached.filter(|att| att.live > 0) {
                eprintln!(
                    "shmdict: removed '{}'; {} attached process(es) keep using it until they detach",
                    a.name, att.live
                );
            }
            Ok(())
        }
        Err(Failure { msg: Some(m), .. }) if m.contains("not a shmdict segment") && !a.force => {
            Err(Failure::msg(format!(
                "{m}; use --force to remove it anyway"
            )))
        }
        Err(_) if a.force => Ok(ShmDict::unlink(&a.name)?),
        Err(f) => Err(f),
    }
}

fn gc(a: GcArgs) -> Outcome {
    let names = segments::Gc::new()
        .dry_run(a.dry_run)
        .all_detached(a.all_detached)
        .prefix(&a.prefix)
        .run()?;
    // Damaged segments are never removed by gc: say so.
    for s in segments::list()? {
        if let (true, Some(e)) = (s.name.starts_with(&a.prefix), &s.error) {
            eprintln!(
                "shmdict: kept damaged segment '{}' ({e}); remove it with `shmdict rm`",
                s.name
            );
        }
    }
    if a.json {
        return print_json(&json!(names));
    }
    let mut out = io::stdout().lock();
    for n in &names {
        writeln!(out, "{n}")?;
    }
    let verb = if a.dry_run { "would remove" } else { "removed" };
    eprintln!("shmdict: {verb} {} segment(s)", names.len());
    Ok(())
}

fn check(a: CheckArgs, allow: bool) -> Outcome {
    let d = open_existing(&a.name, allow)?;
    let report = d.check()?;
    let mut out = io::stdout().lock();
    let text = report.to_string();
    writeln!(out, "{}", text.trim_end())?;
    out.flush()?;
    if report.is_ok() {
        Ok(())
    } else {
        Err(Failure {
            code: EXIT_ERROR,
            msg: Some(format!(
                "shmdict segment '{}' is corrupt: {} problem(s) found",
                a.name,
                report.problems.len()
            )),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_iso_8601() {
        let at =
            |s: u64, ms: u64| iso8601(std::time::UNIX_EPOCH + Duration::from_millis(s * 1000 + ms));
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_709_251_199, 999), "2024-02-29T23:59:59.999Z");
        assert_eq!(at(1_735_689_600, 0), "2025-01-01T00:00:00.000Z");
        assert_eq!(at(4_102_444_799, 0), "2099-12-31T23:59:59.000Z");
    }

    #[test]
    fn byte_counts_take_units() {
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("2g"), Ok(2 << 30));
        assert_eq!(parse_bytes("512 KiB"), Ok(512 << 10));
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("99999999999TiB").is_err());
    }
}
