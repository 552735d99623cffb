//! Panics in a worker process: where they happened, and how a work
//! function is abandoned.

use super::*;

// ---------------------------------------------------------------------------
// Panics in the child.
// ---------------------------------------------------------------------------

thread_local! {
    /// The location of the last panic in this (child) process.
    static PANIC_AT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Records where panics happen, then reports them as before.
pub(super) fn install_panic_hook() {
    let previous = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if let Some(loc) = info.location() {
            let at = format!("{}:{}:{}", loc.file(), loc.line(), loc.column());
            PANIC_AT.with(|p| *p.borrow_mut() = Some(at));
        }
        previous(info)
    }));
}

/// The message of a panic payload, with the location the hook saw.
pub(super) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let msg = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_owned()
    };
    match PANIC_AT.with(|p| p.borrow_mut().take()) {
        Some(at) => format!("{msg} (at {at})"),
        None => msg,
    }
}

/// Unwinds out of a work function without running the panic hook.
pub(super) enum Abort {
    /// The map failed elsewhere: drop this item quietly.
    Stopped,
    /// The pool's machinery failed on this item.
    Failed(String),
}

pub(super) fn abort(a: Abort) -> ! {
    panic::resume_unwind(Box::new(a))
}

pub(super) fn fail_ordered(e: Error) -> ! {
    abort(Abort::Failed(format!("ordered section: {e}")))
}
