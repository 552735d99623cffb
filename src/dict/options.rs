//! [`Options`]: how a dictionary is opened or created.

use crate::dict::ShmDict;
use crate::error::{Error, Result};
use crate::shm::layout::{self, Geometry};
#[cfg(not(loom))]
use crate::{name, sys};

/// How to open or create a dictionary: see [`ShmDict::options`].
#[derive(Debug, Clone)]
pub struct Options {
    capacity: Option<usize>,
    arena_bytes: Option<usize>,
    create: bool,
    create_new: bool,
    mode: u32,
    allow_other_owner: bool,
    max_bytes: Option<u64>,
    fixed_size: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            capacity: None,
            arena_bytes: None,
            create: true,
            create_new: false,
            mode: 0o600,
            allow_other_owner: false,
            max_bytes: None,
            fixed_size: false,
        }
    }
}

impl Options {
    /// Live keys the index holds at first (default 1,048,576). A dictionary
    /// that grows (the default) doubles its index when a new key finds it
    /// full; with [`fixed_size(true)`](Options::fixed_size) this is the
    /// maximum. Ignored when attaching to an existing segment.
    pub fn capacity(mut self, max_live_keys: usize) -> Options {
        self.capacity = Some(max_live_keys);
        self
    }

    /// Bytes of room for keys and values at first (default 1 GiB, or a
    /// quarter of the free space in /dev/shm if that is less; at least 64
    /// KiB). A dictionary that grows (the default) takes more as it needs
    /// it; with [`fixed_size(true)`](Options::fixed_size) this is all it
    /// has. Memory is committed only as it is first used. Values of up to
    /// 1/8 of this (of 8 MiB, for a dictionary that grows, if more) always
    /// fit. Ignored when attaching.
    pub fn arena_bytes(mut self, bytes: usize) -> Options {
        self.arena_bytes = Some(bytes);
        self
    }

    /// Whether a missing segment is created (default `true`). With `false`,
    /// `open` only attaches: `Error::NotFound` if there is no segment of that
    /// name (for workers that must not start on an empty dictionary after
    /// the name was removed).
    pub fn create(mut self, yes: bool) -> Options {
        self.create = yes;
        self
    }

    /// Insist on creating a fresh segment: `Error::AlreadyExists` if the name
    /// is taken.
    pub fn create_new(mut self, yes: bool) -> Options {
        self.create_new = yes;
        self
    }

    /// Permission bits of a new segment, applied exactly (not filtered by the
    /// umask). Default `0o600`.
    ///
    /// When attaching, the most an existing segment may grant: one whose
    /// permission bits give anybody more than `unix_mode` would (0666 when
    /// 0600 was asked for), or that another user owns, is refused with
    /// `Error::PermissionDenied` (see [`allow_other_owner`](Options::allow_other_owner)).
    /// It is never changed.
    pub fn mode(mut self, unix_mode: u32) -> Options {
        self.mode = unix_mode;
        self
    }

    /// Attach to an existing segment even if another user owns it or its
    /// mode grants more than [`mode`](Options::mode) (default `false`).
    ///
    /// /dev/shm is one namespace for every user: without this, a name that
    /// someone else created first (say with mode 0666, to read what you
    /// store) is refused with `Error::PermissionDenied` instead of silently
    /// shared. Allow it only for segments meant to be shared that way.
    pub fn allow_other_owner(mut self, yes: bool) -> Options {
        self.allow_other_owner = yes;
        self
    }

    /// The most /dev/shm memory the dictionary may take, all of it: header,
    /// tables, every index generation and the arena together. It never
    /// holds more memory than this; a write that would need more gets
    /// `Error::Full` (which says so), and removing keys makes room again.
    ///
    /// Without it, a dictionary that grows may take up to the size of the
    /// /dev/shm file system (at most 128 GiB), which its segment file
    /// reserves: the file is sparse, and only what is used is memory
    /// ([`Stats::committed_bytes`](crate::Stats)).
    ///
    /// With [`fixed_size(true)`](Options::fixed_size) it also caps the
    /// segment's size: the arena is made as large as fits under `bytes`
    /// (no larger than [`arena_bytes`](Options::arena_bytes) or its
    /// default). `Error::InvalidArgument` if the header, the first index
    /// for [`capacity`](Options::capacity) and a 64 KiB arena do not fit.
    /// Ignored when attaching.
    pub fn max_bytes(mut self, bytes: u64) -> Options {
        self.max_bytes = Some(bytes);
        self
    }

    /// Whether the dictionary keeps its initial size: `true` never grows
    /// (`Full` at [`capacity`](Options::capacity) keys or when the arena is
    /// full).
    ///
    /// `false`, the default: the dictionary grows while every process
    /// stays attached. When a new key finds the index full, the writer
    /// doubles it (readers go on unhindered; writers pause while the keys
    /// are copied: about 0.1 s per million keys, docs/performance.md); the arena extends as
    /// values need room. It is `Full` only at
    /// [`max_bytes`](Options::max_bytes) or when /dev/shm has no room.
    /// Ignored when attaching.
    pub fn fixed_size(mut self, yes: bool) -> Options {
        self.fixed_size = yes;
        self
    }

    #[cfg(not(loom))]
    fn access(&self) -> sys::access::Access {
        sys::access::Access {
            mode: self.mode,
            allow_other_owner: self.allow_other_owner,
        }
    }

    /// Attaches to the segment `name`, or creates it with these options.
    #[cfg(not(loom))]
    ///
    /// Creation is race-free: processes opening the same new name at once
    /// all end up on one segment, and none sees it half-initialized.
    pub fn open(self, name: &str) -> Result<ShmDict> {
        let opened_with = (self.mode, self.allow_other_owner);
        self.open_inner(name).map(|mut d| {
            d.opened_with = opened_with;
            d
        })
    }

    #[cfg(not(loom))]
    fn open_inner(self, name: &str) -> Result<ShmDict> {
        name::validate(name)?;
        if self.mode & !0o7777 != 0 {
            return Err(Error::InvalidArgument {
                segment: name.to_owned(),
                reason: format!("mode {:#o} has bits outside 0o7777", self.mode),
            });
        }
        if self.create_new && !self.create {
            return Err(Error::InvalidArgument {
                segment: name.to_owned(),
                reason: "create_new(true) contradicts create(false)".into(),
            });
        }
        if !self.create_new {
            // Attach first: the options' geometry is ignored (and not even
            // validated) when the segment exists.
            match sys::access::open_existing_checked(name, self.access()) {
                Ok((file, len)) => return ShmDict::attach_file(name, file, len),
                Err(Error::NotFound { .. }) if self.create => {}
                Err(e) => return Err(e),
            }
        }
        let geo = self.geometry(name)?;
        sys::access::create_or_attach_checked(
            name,
            self.access(),
            geo.total_bytes,
            self.create_new,
            |r| {
                // The header and tables get their memory before anything is
                // written (the rest is committed as it is first used).
                if !crate::shm::commit::at_creation(r) {
                    return Err(Error::full(
                        name,
                        "/dev/shm has no room for a new dictionary's header and tables (fallocate failed: the file system is full)",
                    ));
                }
                crate::dict::locks::init(r).map_err(|rc| {
                    Error::io(
                        name,
                        "pthread_mutex_init",
                        std::io::Error::from_raw_os_error(rc),
                    )
                })?;
                geo.write_header(r)
                    .ok_or_else(|| Error::corrupt(name, "new segment too small for its header"))
            },
            |file, region| ShmDict::attach_region(name, region, geo, Some(file)),
            |file, len| ShmDict::attach_file(name, file, len),
        )
    }

    #[cfg(not(loom))]
    fn geometry(&self, name: &str) -> Result<Geometry> {
        let capacity = self.capacity.map_or(layout::DEFAULT_CAPACITY, |c| c as u64);
        let arena = match self.arena_bytes {
            Some(a) => a as u64,
            None => {
                let avail = sys::shm_available_bytes().unwrap_or(u64::MAX);
                layout::DEFAULT_ARENA_BYTES.min(avail / 4)
            }
        };
        let geo = Geometry::new(capacity, arena).ok_or_else(|| Error::InvalidArgument {
            segment: name.to_owned(),
            reason: format!(
                "capacity must be 1..={} keys and arena_bytes at most {} (got {capacity} keys, {arena} bytes)",
                layout::MAX_CAPACITY,
                layout::MAX_ARENA_BYTES
            ),
        })?;
        if !self.fixed_size {
            return self.growable(name, capacity, arena);
        }
        match self.max_bytes {
            Some(max) if geo.total_bytes > max => fit_under(capacity, geo, max).ok_or_else(|| {
                Error::InvalidArgument {
                    segment: name.to_owned(),
                    reason: format!(
                        "max_bytes {max} is less than the {} bytes an index for {capacity} keys and the smallest arena ({} bytes) need",
                        geo.arena_off + layout::MIN_ARENA_BYTES,
                        layout::MIN_ARENA_BYTES
                    ),
                }
            }),
            _ => Ok(geo),
        }
        .map(|g| Geometry {
            max_bytes: self.max_bytes.unwrap_or(0),
            ..g
        })
    }

    /// The geometry of a dictionary that grows: `capacity` and `arena`
    /// are its initial sizes, and its arena is reserved up to the most it
    /// may take: `max_bytes`, or the size of /dev/shm, at most
    /// `MAX_ARENA_BYTES` (see `grow.rs`). `max_bytes` itself is enforced
    /// on the memory committed (`commit.rs`).
    #[cfg(not(loom))]
    fn growable(&self, name: &str, capacity: u64, arena: u64) -> Result<Geometry> {
        let fs = sys::shm_total_bytes().unwrap_or(layout::MAX_ARENA_BYTES);
        let mut reserve = fs.min(layout::MAX_ARENA_BYTES);
        if let Some(max) = self.max_bytes {
            // What creation commits, and a unit of the first index and of
            // the arena: less could not hold a single key. (The budget
            // counts memory committed; the reservation is address space,
            // and the tables before the arena are committed only as
            // handles use them.)
            let least = layout::committed_at_creation() + 2 * (1 << layout::COMMIT_MIN_SHIFT);
            if max < least {
                return Err(Error::InvalidArgument {
                    segment: name.to_owned(),
                    reason: format!(
                        "max_bytes {max} is less than the {least} bytes a dictionary needs to hold one key (its header and tables, and a unit of index and of arena)"
                    ),
                });
            }
            reserve = reserve.min(max);
        }
        Geometry::growable(capacity, arena, reserve, self.max_bytes.unwrap_or(0)).ok_or_else(
            || Error::InvalidArgument {
                segment: name.to_owned(),
                reason: format!(
                    "no valid geometry for {capacity} keys and {arena} arena bytes growing into {reserve} bytes"
                ),
            },
        )
    }
}

/// The geometry for `capacity` keys with the largest arena (no larger than
/// `geo`'s) whose segment fits in `max` bytes.
#[cfg(not(loom))]
fn fit_under(capacity: u64, geo: Geometry, max: u64) -> Option<Geometry> {
    let mut arena = max.checked_sub(geo.arena_off)?.min(geo.arena_bytes);
    while arena >= layout::MIN_ARENA_BYTES {
        let g = Geometry::new(capacity, arena)?;
        if g.total_bytes <= max {
            return Some(g);
        }
        // Rounded up to whole chunks: ask for less.
        arena -= (g.total_bytes - max).max(layout::GRANULE);
    }
    None
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn max_bytes_caps_the_segment() {
        for max in [400_000u64, 1 << 20, 5 << 20, 64 << 20, 1 << 30] {
            let base = Geometry::new(1000, 1 << 30).unwrap();
            match fit_under(1000, base, max) {
                Some(g) => {
                    assert!(g.total_bytes <= max, "{max}: {g:?}");
                    assert!(g.arena_bytes >= layout::MIN_ARENA_BYTES);
                    // Not needlessly small: one more chunk would not fit.
                    let chunk = layout::GRANULE << g.chunk_order;
                    assert!(g.total_bytes + chunk > max, "{max}: {g:?}");
                }
                None => assert!(max < base.arena_off + layout::MIN_ARENA_BYTES, "{max}"),
            }
        }
    }
}
