//! Operating-system calls: POSIX shared-memory objects, mappings and process
//! liveness. Linux only; `/dev/shm` is where shm_open keeps its objects.
//!
//! A new segment is never visible half-initialized: it is created unnamed
//! (`O_TMPFILE` in /dev/shm, or under a private temporary name where that is
//! not supported), sized, initialized through the caller's closure, and only
//! then given its name with `linkat`, which fails with `EEXIST` instead of
//! replacing a segment another process published first.
//!
//! Every handle's descriptor holds a shared OFD lock on the segment's open
//! byte (`ofd.rs`) from before it can be seen by `segments::gc` (before
//! `linkat` for a new segment, right after `shm_open` for an existing one)
//! until it is closed, so `gc` never removes a segment that is being opened.

pub(crate) mod fork;
pub(crate) mod ofd;
pub(crate) mod robust_mutex;

use crate::sync::local::{AtomicU64 as StdAtomicU64, Ordering as StdOrdering};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use rustix::fs::{AtFlags, Mode, OFlags, CWD};

use crate::error::{Error, Result};
use crate::shm::region::Region;

pub(crate) mod access;
pub(crate) mod child;

const SHM_DIR: &str = "/dev/shm";
/// Prefix of the temporary names used where O_TMPFILE is unavailable.
pub(crate) const TEMP_PREFIX: &str = ".shmdict-tmp-";

fn shm_path(name: &str) -> String {
    format!("{SHM_DIR}/{name}")
}

/// Opens an existing segment for reading and writing, for a handle: takes
/// the shared open lock (waiting while `segments::gc` decides about the
/// segment), then makes sure the name still refers to the file opened (`gc`
/// may have removed it meanwhile). Returns the file with its size.
pub(crate) fn open_existing(name: &str) -> Result<(File, u64)> {
    for _ in 0..16 {
        let fd = rustix::shm::open(
            format!("/{name}").as_str(),
            rustix::shm::OFlags::RDWR,
            Mode::empty(),
        )
        .map_err(|e| match e {
            rustix::io::Errno::NOENT => Error::NotFound {
                segment: name.to_owned(),
            },
            e => Error::io(name, "shm_open", e),
        })?;
        let file = File::from(fd);
        let st = rustix::fs::fstat(&file).map_err(|e| Error::io(name, "fstat", e))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(Error::corrupt(name, "not a regular file"));
        }
        ofd::lock_wait(file.as_fd(), ofd::OPEN_BYTE, false)
            .map_err(|e| Error::io(name, "fcntl(F_OFD_SETLKW)", e))?;
        match rustix::fs::stat(shm_path(name).as_str()) {
            Ok(now) if now.st_dev == st.st_dev && now.st_ino == st.st_ino => {
                return Ok((file, st.st_size as u64));
            }
            // Removed (by gc or unlink) after we opened it, or replaced:
            // open the name again.
            Ok(_) | Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(Error::io(name, "stat", e)),
        }
    }
    Err(Error::io(
        name,
        "open",
        io::Error::other("the name was removed and created repeatedly by other processes"),
    ))
}

/// Maps `len` bytes of `file` shared and read-write.
/// Allocates `len` bytes at `off` of a /dev/shm file (`fallocate`), so
/// that touching them later cannot fail with SIGBUS. `ENOSPC` (or any
/// error) means the memory is not there.
pub(crate) fn commit(fd: std::os::fd::BorrowedFd<'_>, off: u64, len: u64) -> io::Result<()> {
    loop {
        match rustix::fs::fallocate(fd, rustix::fs::FallocateFlags::empty(), off, len) {
            Err(rustix::io::Errno::INTR) => continue,
            r => return r.map_err(io::Error::from),
        }
    }
}

/// Maps `len` bytes of `file`. The region commits pages through `file`'s
/// descriptor: the caller keeps `file` open for as long as the region
/// lives (handles keep their file; see `Region::set_commit_fd`).
pub(crate) fn map(name: &str, file: &File, len: u64) -> Result<Region> {
    let len_usize =
        usize::try_from(len).map_err(|_| Error::corrupt(name, "size exceeds the address space"))?;
    let map = memmap2::MmapOptions::new()
        .len(len_usize)
        .map_raw(file)
        .map_err(|e| Error::io(name, "mmap", e))?;
    let mut region =
        Region::from_map(map).ok_or_else(|| Error::corrupt(name, "mapping is misaligned"))?;
    {
        use std::os::fd::AsRawFd;
        region.set_commit_fd(file.as_raw_fd());
    }
    Ok(region)
}

/// Creates a segment of `len` bytes with permission bits exactly `mode`,
/// initializes it with `init`, and publishes it as `name`.
///
/// Returns `Ok(None)` if a segment of that name already exists (nothing is
/// left behind in that case).
pub(crate) fn create_segment(
    name: &str,
    mode: u32,
    len: u64,
    init: impl FnOnce(&Region) -> Result<()>,
) -> Result<Option<(File, Region)>> {
    let (fd, temp_name) = create_unnamed(name)?;
    // From here on a temporary name, if any, must be removed on every path.
    let result = (|| {
        let file = File::from(fd);
        rustix::fs::fchmod(&file, Mode::from_raw_mode(mode))
            .map_err(|e| Error::io(name, "fchmod", e))?;
        rustix::fs::ftruncate(&file, len).map_err(|e| Error::io(name, "ftruncate", e))?;
        let region = map(name, &file, len)?;
        init(&region)?;
        // Before the name exists, so `gc` can never see the segment unopened.
        ofd::lock_wait(file.as_fd(), ofd::OPEN_BYTE, false)
            .map_err(|e| Error::io(name, "fcntl(F_OFD_SETLKW)", e))?;
        let linked = match &temp_name {
            None => {
                let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
                rustix::fs::linkat(
                    CWD,
                    proc_path.as_str(),
                    CWD,
                    shm_path(name).as_str(),
                    AtFlags::SYMLINK_FOLLOW,
                )
            }
            Some(t) => rustix::fs::linkat(
                CWD,
                shm_path(t).as_str(),
                CWD,
                shm_path(name).as_str(),
                AtFlags::empty(),
            ),
        };
        match linked {
            Ok(()) => Ok(Some((file, region))),
            Err(rustix::io::Errno::EXIST) => Ok(None),
            Err(e) => Err(Error::io(name, "linkat", e)),
        }
    })();
    if let Some(t) = temp_name {
        let _ = rustix::shm::unlink(format!("/{t}").as_str());
    }
    result
}

/// Opens the segment `name`, creating it first if it does not exist (or,
/// with `create_new`, only creating it: `AlreadyExists` if it exists).
///
/// A new segment is `len` bytes with permission bits `mode`, initialized by
/// `init` before publication (see [`create_segment`]) and handed to
/// `created`; an existing one is handed to `existing` with its size. A name
/// can be removed between a failed creation and the open that follows; a few
/// rounds settle any such race.
pub(crate) fn create_or_attach<T>(
    name: &str,
    mode: u32,
    len: u64,
    create_new: bool,
    init: impl Fn(&Region) -> Result<()>,
    created: impl FnOnce(File, Region) -> Result<T>,
    existing: impl FnOnce(File, u64) -> Result<T>,
) -> Result<T> {
    if !create_new {
        match open_existing(name) {
            Ok((file, size)) => return existing(file, size),
            Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    for _ in 0..16 {
        if let Some((file, region)) = create_segment(name, mode, len, &init)? {
            return created(file, region);
        }
        if create_new {
            return Err(Error::AlreadyExists {
                segment: name.to_owned(),
            });
        }
        match open_existing(name) {
            Ok((file, size)) => return existing(file, size),
            Err(Error::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Error::io(
        name,
        "open",
        io::Error::other("the name was created and removed repeatedly by other processes"),
    ))
}

/// An unnamed file in /dev/shm, or one with a private temporary name.
fn create_unnamed(name: &str) -> Result<(OwnedFd, Option<String>)> {
    // Create with no permissions: fchmod sets `mode` exactly afterwards, so the
    // process umask does not filter it.
    match rustix::fs::openat(
        CWD,
        SHM_DIR,
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) if proc_self_fd_works(&fd) => return Ok((fd, None)),
        Ok(_) => {}
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::ISDIR | rustix::io::Errno::INVAL) => {
        }
        Err(e) => return Err(Error::io(name, "open O_TMPFILE in /dev/shm", e)),
    }
    static COUNTER: StdAtomicU64 = StdAtomicU64::new(0);
    loop {
        let t = format!(
            "{TEMP_PREFIX}{}-{}-{}",
            std::process::id(),
            // Relaxed: only uniqueness within this process matters.
            COUNTER.fetch_add(1, StdOrdering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        );
        let flags =
            rustix::shm::OFlags::CREATE | rustix::shm::OFlags::EXCL | rustix::shm::OFlags::RDWR;
        match rustix::shm::open(format!("/{t}").as_str(), flags, Mode::empty()) {
            Ok(fd) => return Ok((fd, Some(t))),
            Err(rustix::io::Errno::EXIST) => continue,
            Err(e) => return Err(Error::io(name, "shm_open (create)", e)),
        }
    }
}

fn proc_self_fd_works(fd: &OwnedFd) -> bool {
    rustix::fs::statat(
        CWD,
        format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()).as_str(),
        AtFlags::empty(),
    )
    .is_ok()
}

/// Removes the name of a segment. Processes already attached keep working.
pub(crate) fn unlink(name: &str) -> Result<()> {
    rustix::shm::unlink(format!("/{name}").as_str()).map_err(|e| match e {
        rustix::io::Errno::NOENT => Error::NotFound {
            segment: name.to_owned(),
        },
        e => Error::io(name, "shm_unlink", e),
    })
}

/// Bytes still available to unprivileged users in /dev/shm.
pub(crate) fn shm_available_bytes() -> Option<u64> {
    let s = rustix::fs::statvfs(SHM_DIR).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

/// The size of the file system holding /dev/shm: no dictionary can hold
/// more, so a growing one reserves no more than this (`grow.rs`).
pub(crate) fn shm_total_bytes() -> Option<u64> {
    let s = rustix::fs::statvfs(SHM_DIR).ok()?;
    Some(s.f_blocks.saturating_mul(s.f_frsize))
}

/// This process's pid and start time (clock ticks after boot), read once.
pub(crate) fn self_identity() -> (u32, u64) {
    let pid = std::process::id();
    let start = proc_stat(pid).map(|s| s.start_ticks).unwrap_or(0);
    (pid, start)
}

struct ProcStat {
    #[cfg_attr(not(test), allow(dead_code))]
    zombie: bool,
    start_ticks: u64,
}

fn proc_stat(pid: u32) -> io::Result<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses: parse after
    // the last ')'. Then field 3 is the state and field 22 the start time.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad /proc stat"))?;
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next().unwrap_or("");
    let start_ticks = fields
        .nth(18)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad /proc stat"))?;
    Ok(ProcStat {
        zombie: state == "Z" || state == "X",
        start_ticks,
    })
}

/// The inode number of this process's pid namespace (`/proc/self/ns/pid`),
/// or 0 if it cannot be read. Two processes with the same non-zero number
/// number their processes the same way.
#[allow(clippy::unnecessary_cast)] // `st_ino`'s type differs between targets.
pub(crate) fn pid_namespace() -> u64 {
    rustix::fs::stat("/proc/self/ns/pid").map_or(0, |st| st.st_ino as u64)
}

/// Whether the process `pid`, started at `start_ticks` (truncated by the
/// caller to `start_mask`), in the pid namespace `ns`, has provably exited.
///
/// Only a fact counts: the pid must be in our own pid namespace (else the
/// number may name another process, or none, while the original runs), and
/// then either no process has that pid (`kill(pid, 0)` fails with `ESRCH`,
/// which hidden /proc entries do not affect) or the process with that pid
/// started at another time (the pid was reused; read from /proc only when
/// /proc shows our own pid namespace). A zombie, an exited thread-group
/// leader or an unreadable /proc entry is *not* proof: `false`.
pub(crate) fn process_gone(pid: u32, start_ticks: u64, start_mask: u64, ns: u64) -> bool {
    if pid == 0 || ns == 0 || ns != pid_namespace() {
        return false;
    }
    let Some(p) = rustix::process::Pid::from_raw(pid as i32) else {
        return false;
    };
    if rustix::process::test_kill_process(p) == Err(rustix::io::Errno::SRCH) {
        return true;
    }
    if !proc_is_ours() {
        return false;
    }
    match proc_stat(pid) {
        Ok(s) => (s.start_ticks & start_mask) != start_ticks,
        Err(_) => false,
    }
}

/// Whether a thread with kernel thread id `tid` exists in this pid
/// namespace. A signal-0 probe: `EPERM` means it exists. Meaningless for
/// threads of other pid namespaces: callers make sure there are none.
pub(crate) fn thread_exists(tid: u32) -> bool {
    match rustix::process::Pid::from_raw(tid as i32) {
        Some(p) => rustix::process::test_kill_process(p) != Err(rustix::io::Errno::SRCH),
        None => false,
    }
}

/// The process (thread-group id) of thread `tid`, from /proc when it shows
/// our own pid namespace; `None` if that cannot be read.
pub(crate) fn thread_group(tid: u32) -> Option<u32> {
    if !proc_is_ours() {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Whether /proc is mounted for our own pid namespace (then `/proc/PID`
/// names the process we would call PID).
fn proc_is_ours() -> bool {
    std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str().and_then(|s| s.parse::<u32>().ok()))
        == Some(std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_exit_facts() {
        let (pid, start) = self_identity();
        assert_eq!(pid, std::process::id());
        assert!(start > 0);
        let ns = pid_namespace();
        assert_ne!(ns, 0);
        assert!(!process_gone(pid, start, u64::MAX, ns));
        assert!(
            process_gone(pid, start + 1, u64::MAX, ns),
            "a reused pid is not the original"
        );
        assert!(
            !process_gone(pid, start + 1, u64::MAX, ns + 1),
            "another namespace's pid proves nothing"
        );
        assert!(
            !process_gone(pid, start + 1, u64::MAX, 0),
            "unknown namespace"
        );
        assert!(!process_gone(0, 0, u64::MAX, ns));
    }

    #[test]
    fn a_zombie_is_not_proof_but_a_reaped_process_is() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Wait until it has exited but is not yet reaped.
        let start = loop {
            match proc_stat(pid) {
                Ok(s) if s.zombie => break s.start_ticks,
                Ok(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
                Err(e) => panic!("{e}"),
            }
        };
        let ns = pid_namespace();
        assert!(!process_gone(pid, start, u64::MAX, ns), "zombie: not proof");
        child.wait().unwrap();
        assert!(process_gone(pid, start, u64::MAX, ns));
    }
}
