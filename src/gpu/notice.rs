//! The one-line notice that a run is about to prepare its kernels for a while (issue 10 §5: a
//! new user's first run must say, once, what it is doing), and the record of the pipelines that
//! have been compiled on each adapter, which tells a first run from a later one.
//!
//! The notice is given at most once per process, before the first kernel measurement
//! ([`crate::kernels::choice`]) or the first warm-up that dispatches a pipeline this adapter has
//! not compiled before ([`super::GpuContext::warm_up`]). What was compiled is recorded per
//! adapter ([`super::GpuContext::adapter_key`]) in `$FIRSTRT_CACHE/compiled-pipelines.json`
//! (default `~/.cache/firstrt`), as a 64-bit FNV-1a hash of each pipeline's cache key (module,
//! entry point and definitions): the driver's own cache (Mesa's on-disk shader cache) cannot be
//! asked what it holds, so this record stands for it. A record that is lost or unreadable costs
//! one notice more, never an error.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use super::GpuContext;

/// Where the notice goes ([`on_first_run`]).
static NOTICE: OnceLock<fn(&str)> = OnceLock::new();
/// Set once the notice has been given in this process.
static GIVEN: AtomicBool = AtomicBool::new(false);

/// Have `say` receive the one-line notice given once per process before a first run on an
/// adapter measures kernels or compiles shaders, e.g. to print it on stderr. Without it the
/// notice goes to the log at info level. The first call wins.
pub fn on_first_run(say: fn(&str)) {
    let _ = NOTICE.set(say);
}

/// How long a first run on `ctx`'s adapter prepares, as the notices say it: a CPU driver such as
/// lavapipe compiles every shader with LLVM, 30-31 s for the README question with the test model
/// on a slow 2-core machine with the compile helper (more without it or on a loaded machine;
/// `serve` has its own, [`serve_first_run_wait`]) (BENCHMARKS.md, "First run on an adapter");
/// a GPU's driver takes seconds.
pub fn first_run_wait(ctx: &GpuContext) -> &'static str {
    if ctx.is_cpu() { "up to a minute on a CPU driver (the next runs reuse the compiled shaders)" } else { "a few seconds" }
}

/// [`first_run_wait`] for `serve`'s start-up, which prepares prefills from 1 to 128 tokens and so
/// compiles more: 55 s with lavapipe on 2 cores with the compile helper, 96 s without
/// (BENCHMARKS.md, "First run on an adapter"), seconds on a GPU.
pub fn serve_first_run_wait(ctx: &GpuContext) -> &'static str {
    if ctx.is_cpu() { "up to two minutes on a CPU driver (the next starts reuse the compiled shaders)" } else { "a few seconds" }
}

/// Give the notice (once per process): a first run on `ctx`'s adapter is `doing` (e.g.
/// "compiling shaders"), for [`first_run_wait`].
pub(crate) fn give(ctx: &GpuContext, doing: &str) {
    if GIVEN.swap(true, Ordering::Relaxed) {
        return;
    }
    let text = format!("first run on {} ({:?}): {doing}, {}…", ctx.info.name, ctx.info.backend, first_run_wait(ctx));
    match NOTICE.get() {
        Some(say) => say(&text),
        None => log::info!("{text}"),
    }
}

/// firstrt's cache folder: `$FIRSTRT_CACHE`, default `~/.cache/firstrt`; None without either
/// variable.
pub fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os("FIRSTRT_CACHE") {
        Some(d) => Some(PathBuf::from(d)),
        None => Some(PathBuf::from(std::env::var_os("HOME")?).join(".cache").join("firstrt")),
    }
}

/// The JSON file at `path` as a `T`; `T::default()` where it is missing or unreadable.
pub(crate) fn read_json_file<T: serde::de::DeserializeOwned + Default>(path: &Path) -> T {
    std::fs::read_to_string(path).ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default()
}

/// Read the JSON file at `path` ([`read_json_file`]), `update` it and write it back (pretty
/// printed), creating its folder where missing.
///
/// # Errors
/// Creating the folder or writing the file.
pub(crate) fn update_json_file<T>(path: &Path, update: impl FnOnce(&mut T)) -> std::io::Result<()>
where
    T: serde::de::DeserializeOwned + serde::Serialize + Default,
{
    let mut value: T = read_json_file(path);
    update(&mut value);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(&value).map_err(std::io::Error::other)?;
    std::fs::write(path, text)
}

/// The record file: adapter key -> hashes of the pipelines compiled on it (16 hex digits each).
type Record = BTreeMap<String, BTreeSet<String>>;

fn record_path() -> Option<PathBuf> {
    Some(cache_dir()?.join("compiled-pipelines.json"))
}

fn read_record() -> Record {
    record_path().map(|p| read_json_file(&p)).unwrap_or_default()
}

/// 64-bit FNV-1a of `key`, as 16 hex digits.
fn key_hash(key: &str) -> String {
    let h = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{h:016x}")
}

/// Whether any of the pipeline cache keys `keys` has not been recorded as compiled on `ctx`'s
/// adapter.
pub(crate) fn any_unrecorded<'a>(ctx: &GpuContext, keys: impl IntoIterator<Item = &'a str>) -> bool {
    let record = read_record();
    let known = record.get(&ctx.adapter_key());
    keys.into_iter().any(|k| known.is_none_or(|set| !set.contains(&key_hash(k))))
}

/// Record the pipeline cache keys `keys` as compiled on `ctx`'s adapter, keeping every other
/// entry. A failure is logged, not returned: it costs a later run one notice more.
pub(crate) fn record_compiled<'a>(ctx: &GpuContext, keys: impl IntoIterator<Item = &'a str>) {
    let Some(path) = record_path() else { return };
    let written = update_json_file(&path, |record: &mut Record| {
        record.entry(ctx.adapter_key()).or_default().extend(keys.into_iter().map(key_hash));
    });
    if let Err(e) = written {
        log::warn!("could not record the compiled pipelines in {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hash_is_fnv1a_64() {
        // FNV-1a 64 of the empty string is its offset basis; of "a", the published test vector.
        assert_eq!(key_hash(""), "cbf29ce484222325");
        assert_eq!(key_hash("a"), "af63dc4c8601ec8c");
    }
}
