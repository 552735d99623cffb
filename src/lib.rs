#![doc = include_str!("../README.md")]
#[cfg(not(target_os = "linux"))]
compile_error!("shmdict supports Linux only (it relies on /dev/shm, /proc and futexes)");
#[cfg(not(target_has_atomic = "64"))]
compile_error!("shmdict needs 64-bit atomics");

mod attach;
mod block;
mod dict;
mod error;
mod index;
mod layout;
mod lockword;
mod name;
mod region;
mod seqlock;
mod slab;
mod sync;
#[cfg(not(loom))]
mod sys;
mod typed;

pub use dict::{Options, ShmDict, Stats};
pub use error::{Error, Result};
pub use typed::Typed;
