//! `shmdict`: see inside shmdict segments, edit them, and clean up after a
//! crash. Run `shmdict --help` for the commands, `shmdict help COMMAND` for
//! one command with an example.
//!
//! Exit codes: 0 success, 1 error (one line on stderr naming the segment and
//! the cause), 2 usage error, 3 key not found (`get`, `del`).

// Loom builds (`--cfg loom`) replace the operating-system layer with heap
// regions, so the library has no segments to inspect: the tool is empty there.
#[cfg(not(loom))]
#[path = "shmdict/cli.rs"]
mod cli;
#[cfg(not(loom))]
#[path = "shmdict/enc.rs"]
mod enc;

#[cfg(not(loom))]
fn main() -> std::process::ExitCode {
    cli::main()
}

#[cfg(loom)]
fn main() {}
