//! Training FiRST routers and LoRA adapters (`firstrt train`): the host side.
//!
//! - [`checkpoint`]: checkpoint files (parameters, AdamW moments, step, options, model
//!   identity, loss history) written atomically and checked on load, for `--resume`.
//!
//! This module sits above [`crate::runtime`]; nothing below depends on it.

pub mod checkpoint;
