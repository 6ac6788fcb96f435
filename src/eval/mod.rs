//! Task evaluation for FiRST: task data (JSONL), scores, and the runs that compare plans.
//!
//! - [`data`]: the task files of `../shared/data` (and any file of the same shape): one JSON
//!   object per line with a user `prompt` and the assistant's `completion` (train) or
//!   `references` (test).
//! - [`rouge`]: ROUGE-1/2/L/Lsum F-measures as the `rouge-score` package computes them (with
//!   NLTK's Porter stemmer), and exact match.
//! - [`stats`]: the mean of per-example scores and its percentile-bootstrap 95% interval.
//!
//! This module sits above [`crate::generate`]: it drives sessions and the token loop, and
//! nothing below depends on it.

pub mod data;
pub mod rouge;
pub mod stats;
