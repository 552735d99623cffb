//! What a `fork` changes for handles: the child's identity, and the open
//! file descriptions it inherits.
//!
//! A forked child inherits its parent's handles (their memory and their file
//! descriptors). Two things must then change in the child, and a
//! `pthread_atfork` child handler does both before `fork` returns there:
//!
//! - [`generation`] increases, so a handle used in the child sees that it is
//!   in another process and registers under the child's own identity (see
//!   `shm/registration.rs`), and a drop in the child leaves the parent's registration
//!   alone;
//! - every registered handle descriptor is replaced, under the same number,
//!   by a fresh open file description of the same file (`/proc/self/fd/N`
//!   reopened, then `dup3` over `N`). Otherwise the child would share the
//!   parent's description, and with it the parent's OFD locks (`ofd.rs`):
//!   the parent's attach entry would look alive for as long as the child
//!   lives, even after the parent died. The fresh description takes the
//!   shared open-lock byte, as every handle's does.
//!
//! `vfork`/`posix_spawn` children run no handlers, but they only `exec`,
//! which closes our descriptors (all are `O_CLOEXEC`).

use crate::sync::local::{AtomicU64, Ordering};
use std::cell::UnsafeCell;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::Once;

/// Increased in every forked child (process-local).
static GENERATION: AtomicU64 = AtomicU64::new(1);

/// This process's fork generation: differs from the parent's in a child.
#[inline]
pub(crate) fn generation() -> u64 {
    // Relaxed: written only by the child handler, which runs before any other
    // code of the child (a single thread at that point).
    GENERATION.load(Ordering::Relaxed)
}

/// The descriptors of open handles, guarded by a pthread mutex that the
/// prepare handler takes, so no thread is changing the list when the child
/// gets its copy.
struct Registry {
    lock: UnsafeCell<libc::pthread_mutex_t>,
    fds: UnsafeCell<Vec<RawFd>>,
}

// SAFETY: `fds` is only accessed while `lock` is held (see `with`), and a
// pthread mutex may be used from any thread.
unsafe impl Sync for Registry {}

static REGISTRY: Registry = Registry {
    lock: UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER),
    fds: UnsafeCell::new(Vec::new()),
};

fn lock() {
    // SAFETY: a statically initialized default mutex; never moved.
    unsafe { libc::pthread_mutex_lock(REGISTRY.lock.get()) };
}

fn unlock() {
    // SAFETY: as above; called by the thread that locked it (or, in the
    // child handler, by the only thread left, which a default mutex allows).
    unsafe { libc::pthread_mutex_unlock(REGISTRY.lock.get()) };
}

fn with<T>(f: impl FnOnce(&mut Vec<RawFd>) -> T) -> T {
    lock();
    // SAFETY: the mutex is held: nobody else accesses `fds`.
    let r = f(unsafe { &mut *REGISTRY.fds.get() });
    unlock();
    r
}

extern "C" fn prepare() {
    lock();
}

extern "C" fn parent() {
    unlock();
}

extern "C" fn child() {
    // Relaxed: see `generation`.
    GENERATION.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the prepare handler took the mutex before the fork, so the list
    // is consistent; the child has one thread. Only async-signal-safe calls
    // follow (open, fcntl, dup3, close) and no allocation.
    let fds = unsafe { &*REGISTRY.fds.get() };
    for &fd in fds {
        reopen_in_place(fd);
    }
    unlock();
}

/// Replaces descriptor `fd` by a fresh open file description of its file.
/// Leaves it as it is if that cannot be done (then the parent's entry may
/// look alive while this child lives; the pid check of `attach.rs` still
/// finds a dead parent in the same pid namespace).
fn reopen_in_place(fd: RawFd) {
    let mut path = [0u8; 32];
    let prefix = b"/proc/self/fd/";
    path[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 12];
    let (mut n, mut k) = (fd as u32, 0);
    loop {
        digits[k] = b'0' + (n % 10) as u8;
        k += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for j in 0..k {
        path[prefix.len() + j] = digits[k - 1 - j];
    }
    // `path` is NUL-terminated: it was zeroed and is longer than the text.
    // SAFETY: `path` is a NUL-terminated string in a local buffer.
    let new = unsafe { libc::open(path.as_ptr().cast(), libc::O_RDWR | libc::O_CLOEXEC) };
    if new < 0 {
        return;
    }
    // SAFETY: `new` was just opened by us and stays open until closed below.
    let _ = super::ofd::try_lock(
        unsafe { BorrowedFd::borrow_raw(new) },
        super::ofd::OPEN_BYTE,
        false,
    );
    // SAFETY: both descriptors are open; dup3 atomically makes `fd` refer to
    // the new description (closing the inherited reference), then the spare
    // number is closed. Nothing else in this (single-threaded) child uses
    // `fd` meanwhile.
    unsafe {
        libc::dup3(new, fd, libc::O_CLOEXEC);
        libc::close(new);
    }
}

fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: the handlers are `extern "C"` functions with no arguments
        // that live for the whole program. The return value (ENOMEM) is
        // ignored: then forked children keep the parent's descriptions, which
        // only delays finding a dead parent (see `reopen_in_place`).
        unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    });
}

/// Registers the descriptor of an open handle, to be given a fresh open file
/// description in forked children.
pub(crate) fn register(fd: RawFd) {
    install();
    with(|fds| fds.push(fd));
}

/// Forgets a descriptor registered with [`register`] (before closing it).
pub(crate) fn unregister(fd: RawFd) {
    with(|fds| {
        if let Some(i) = fds.iter().rposition(|&f| f == fd) {
            fds.swap_remove(i);
        }
    });
}
