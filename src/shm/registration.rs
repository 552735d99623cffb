//! A handle's attach entries, one per process that uses it.
//!
//! A handle (a `ShmDict`, a `Value`, an `Array`) claims an attach entry when
//! it is opened, under its process's identity. After `fork` the child has a
//! copy of the handle. The copy must not act under the parent's entry (what
//! it took would look like the parent's, and its drop would detach the
//! parent), so the first time the child uses the handle for anything that
//! takes a slot or a lock word, it claims an entry of its own
//! ([`Owner::current`]); its drop releases only the entries its own process
//! claimed.
//!
//! A process learns that it is a fork child from `sys::fork::generation`,
//! which a `pthread_atfork` handler increases in every child: checking it is
//! one process-local load, on the write path only (readers use no entry).

use std::sync::Mutex;

use crate::shm::attach::{self, LockFd, Token};
use crate::shm::region::Region;
use crate::sync::local::{AtomicPtr, Ordering};

/// This process's fork generation (see the module doc).
#[inline]
fn generation() -> u64 {
    #[cfg(not(loom))]
    {
        crate::sys::fork::generation()
    }
    #[cfg(loom)]
    {
        1
    }
}

/// One process's claim of an attach entry for a handle.
#[derive(Debug)]
pub(crate) struct Registration<L> {
    /// The fork generation of the process that claimed it.
    generation: u64,
    /// The attach entry.
    pub(crate) index: u64,
    /// The identity word written into the entry.
    pub(crate) ident: u64,
    /// How this registration asks the kernel about other entries.
    pub(crate) lock_fd: LockFd,
    /// What the handle keeps per registration (its holders and counts).
    pub(crate) local: L,
}

impl<L> Registration<L> {
    /// Whether this process claimed it (not a parent before a fork).
    pub(crate) fn is_ours(&self) -> bool {
        self.generation == generation()
    }
}

/// Builds a registration's local state from its entry index, token and
/// lock descriptor (and may prepare kind-specific words of the entry).
pub(crate) type MakeLocal<L> = Box<dyn Fn(&Region, u64, Token, LockFd) -> L + Send + Sync>;

/// The attach entries of one handle: see the module doc.
pub(crate) struct Owner<L> {
    /// The handle's own open file description of the segment (none for heap
    /// regions): its OFD locks are the handle's liveness.
    #[cfg(not(loom))]
    file: Option<std::fs::File>,
    make: MakeLocal<L>,
    home: Registration<L>,
    /// Registrations of forked children (boxed: `current` hands out
    /// references that live as long as the handle).
    children: Mutex<Vec<Box<Registration<L>>>>,
    /// The newest of `children`, or null: the fast path of `current`.
    newest: AtomicPtr<Registration<L>>,
}

impl<L> std::fmt::Debug for Owner<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owner")
            .field("index", &self.home.index)
            .finish_non_exhaustive()
    }
}

fn register<L>(r: &Region, raw_fd: Option<i32>, make: &MakeLocal<L>) -> Option<Registration<L>> {
    let ident = crate::shm::attach::process_identity();
    let probe = |own| {
        #[cfg(not(loom))]
        if let Some(fd) = raw_fd {
            return LockFd::new(fd, own);
        }
        let _ = (own, raw_fd);
        LockFd::NONE
    };
    let (index, token) = attach::attach(r, probe(u64::MAX), ident)?;
    let lock_fd = if raw_fd.is_some() {
        probe(index)
    } else {
        LockFd::NONE
    };
    Some(Registration {
        generation: generation(),
        index,
        ident,
        lock_fd,
        local: make(r, index, token, lock_fd),
    })
}

impl<L> Owner<L> {
    /// Claims an entry of `r` for a new handle whose descriptor is `file`.
    /// `None` if every entry belongs to a live handle.
    pub(crate) fn new(
        r: &Region,
        #[cfg(not(loom))] file: Option<std::fs::File>,
        make: MakeLocal<L>,
    ) -> Option<Owner<L>> {
        #[cfg(not(loom))]
        let raw_fd = file.as_ref().map(|f| {
            use std::os::fd::AsRawFd;
            // Before the claim: a fork after it must give the child a
            // description of its own (`sys::fork`).
            crate::sys::fork::register(f.as_raw_fd());
            f.as_raw_fd()
        });
        #[cfg(loom)]
        let raw_fd = None;
        let Some(home) = register(r, raw_fd, &make) else {
            #[cfg(not(loom))]
            if let Some(fd) = raw_fd {
                crate::sys::fork::unregister(fd);
            }
            return None;
        };
        Some(Owner {
            #[cfg(not(loom))]
            file,
            make,
            home,
            children: Mutex::new(Vec::new()),
            newest: AtomicPtr::new(std::ptr::null_mut()),
        })
    }

    /// The registration this process claimed, or, in a forked child that
    /// has not claimed one yet, the one it inherited (which it must not act
    /// under: see [`Owner::current`]).
    #[inline]
    pub(crate) fn registered(&self) -> &Registration<L> {
        let g = generation();
        if self.home.generation == g {
            return &self.home;
        }
        // Acquire: pairs with the Release store in `current_slow`, so the
        // registration it points to is initialized.
        let p = self.newest.load(Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: non-null values of `newest` point into boxes owned by
            // `children`, which are never removed before the Owner drops.
            let reg = unsafe { &*p };
            if reg.generation == g {
                return reg;
            }
        }
        &self.home
    }

    /// The registration this process acts under, claiming one first if this
    /// is a forked child that has not used the handle yet. `None` if the
    /// attach table is full.
    #[inline]
    pub(crate) fn current(&self, r: &Region) -> Option<&Registration<L>> {
        let reg = self.registered();
        if reg.is_ours() {
            return Some(reg);
        }
        self.current_slow(r)
    }

    #[cold]
    fn current_slow(&self, r: &Region) -> Option<&Registration<L>> {
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        let g = generation();
        if let Some(reg) = children.iter().find(|c| c.generation == g) {
            let p: *const Registration<L> = &**reg;
            // SAFETY: as in `current`: the box outlives `&self`.
            return Some(unsafe { &*p });
        }
        #[cfg(not(loom))]
        let raw_fd = self.file.as_ref().map(|f| {
            use std::os::fd::AsRawFd;
            f.as_raw_fd()
        });
        #[cfg(loom)]
        let raw_fd = None;
        let reg = Box::new(register(r, raw_fd, &self.make)?);
        let p: *mut Registration<L> = &*reg as *const _ as *mut _;
        children.push(reg);
        // Release: pairs with the Acquire in `current`.
        self.newest.store(p, Ordering::Release);
        // SAFETY: the box was just moved into `children` (moving a Box does
        // not move its contents) and lives as long as `self`.
        Some(unsafe { &*p })
    }

    /// The registration of the process that opened the handle (for
    /// statistics; it may be a parent's).
    pub(crate) fn home(&self) -> &Registration<L> {
        &self.home
    }

    /// Releases the entries this process claimed for the handle, leaving a
    /// parent's alone. Called once, from the handle's `Drop`.
    pub(crate) fn detach(&mut self, r: &Region) {
        let regs = std::iter::once(&self.home).chain(
            self.children
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|b| &**b),
        );
        for reg in regs {
            if reg.is_ours() {
                attach::detach(r, reg.lock_fd, reg.index, reg.ident);
            }
        }
        #[cfg(not(loom))]
        if let Some(f) = &self.file {
            use std::os::fd::AsRawFd;
            crate::sys::fork::unregister(f.as_raw_fd());
        }
    }
}

/// `&owner` coerces to the local state of [`Owner::registered`]: what the
/// algorithms take (`&Holder`, `&Local`). Operations call
/// [`Owner::current`] first, so that in a forked child this is the child's
/// own registration.
impl<L> std::ops::Deref for Owner<L> {
    type Target = L;
    #[inline]
    fn deref(&self) -> &L {
        &self.registered().local
    }
}
