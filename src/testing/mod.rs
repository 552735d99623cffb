//! Test entry points compiled only for model checking.

pub mod loom;
