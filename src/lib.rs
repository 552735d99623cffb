#![doc = include_str!("../README.md")]
// Loom builds compile out the OS layer (segments, names, liveness), so parts
// of the format code that only it uses are unused there.
#![cfg_attr(loom, allow(dead_code, unused_imports))]
#[cfg(not(target_os = "linux"))]
compile_error!("shmdict supports Linux only (it relies on /dev/shm, /proc and futexes)");
#[cfg(not(target_has_atomic = "64"))]
compile_error!("shmdict needs 64-bit atomics");

// The layers, bottom up (docs/design.md, "Where things are"):
// - `sys`: operating-system calls (shm objects, mappings, OFD locks, fork,
//   process facts, robust pthread mutexes, futexes); not built under loom.
// - `shm`: the shared-memory algorithms over a `Region`, loom-testable.
// - `dict`, `value`, `array`, `prim`, `segments`: the safe public types.
// - `space`, `pool`: coordination built on them.
mod shm;
mod sync;
#[cfg(not(loom))]
mod sys;

#[cfg(not(loom))]
mod array;
mod dict;
mod error;
mod name;
mod prim;
pub mod segments;
mod value;

#[cfg(not(loom))]
mod backend;
#[cfg(not(loom))]
pub mod pool;
#[cfg(not(loom))]
pub mod space;

#[cfg(not(loom))]
pub use array::{Array, ArrayOptions, ChunkGuard, ReadGuard, WriteGuard};
#[cfg(all(not(loom), feature = "redis"))]
pub use backend::redis::{RedisDict, RedisLock, RedisOptions};
#[cfg(not(loom))]
pub use backend::{connect, Dict, DictLock};
#[cfg(not(loom))]
pub use dict::borrow::{Reader, ValueRef};
pub use dict::check::CheckReport;
#[cfg(not(loom))]
pub use dict::locks::{DictGuard, KeysGuard};
pub use dict::typed::Typed;
#[cfg(not(loom))]
pub use dict::wait::Version;
pub use dict::{Options, ShmDict, Stats};
pub use error::{Error, Result};
pub use shm::grow::Growth;
pub use value::{Value, ValueOptions};

/// Entry points for the loom models in `tests/loom.rs`: see `src/testing/`.
#[cfg(loom)]
mod testing;
#[cfg(loom)]
#[doc(hidden)]
pub use testing::loom as __loom;
