//! Which kernel variant to use on this adapter, decided once per process per family.
//!
//! In order: the environment variable `FIRSTRT_KERNEL` (e.g. `matmul=tiled,matvec=reduce`, or a
//! bare variant name such as `tiled`, `regblock`, `rows`, `reduce`); the on-disk cache
//! `$FIRSTRT_CACHE/kernel-choice.json` (default `~/.cache/firstrt`) keyed by
//! [`GpuContext::adapter_key`] and the candidate variants; else a short measurement of every variant on a representative
//! shape, whose result is written to the cache. The choice is kept in `ctx.kernel_choices`.
//!
//! Besides the matmul and matvec variants, the families `f32read` and `f16read` choose how
//! kernels read weights ([`read_candidates`]): f32 `plain` ([`WeightKind::F32`]) or `wide`
//! ([`WeightKind::F32Wide`], where SHADER_INT64 exists); f16 `native` ([`WeightKind::F16`], where
//! SHADER_F16 exists), `packed` ([`WeightKind::F16Packed`]) or `wide` ([`WeightKind::F16Wide`]).
//! On lavapipe the wide forms are faster: every load is a per-lane loop there, so fewer, wider
//! loads win.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::gpu::{DType, Dispatch, GpuContext, GpuError, GpuMatrix, GpuTensor, WeightKind};
use crate::kernels::linear::LinearOp;
use crate::kernels::matmul::{MatmulVariant, matmul};
use crate::kernels::matvec::{MatvecVariant, matvec};

/// Variants forced through `FIRSTRT_KERNEL`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forced {
    /// `matmul=regblock|tiled|xbcast` (or the bare name).
    pub matmul: Option<MatmulVariant>,
    /// `matvec=rows|reduce` (or the bare name).
    pub matvec: Option<MatvecVariant>,
    /// `f16read=native|packed|wide`.
    pub f16read: Option<WeightKind>,
    /// `f32read=plain|wide`.
    pub f32read: Option<WeightKind>,
}

/// The name of a way of reading weights in the `f32read` / `f16read` families.
fn read_name(kind: WeightKind) -> &'static str {
    match kind {
        WeightKind::F32 => "plain",
        WeightKind::F16 => "native",
        WeightKind::F16Packed => "packed",
        WeightKind::F32Wide | WeightKind::F16Wide => "wide",
    }
}

/// The way of reading weights of `dtype` called `s` ([`read_name`]), if any.
fn read_parse(dtype: DType, s: &str) -> Option<WeightKind> {
    match (dtype, s) {
        (DType::F32, "plain") => Some(WeightKind::F32),
        (DType::F32, "wide") => Some(WeightKind::F32Wide),
        (DType::F16, "native") => Some(WeightKind::F16),
        (DType::F16, "packed") => Some(WeightKind::F16Packed),
        (DType::F16, "wide") => Some(WeightKind::F16Wide),
        _ => None,
    }
}

/// Parse a `FIRSTRT_KERNEL` value: a comma list of `family=variant` or bare variant names.
/// Unknown entries are returned as an error naming them.
pub fn parse_forced(spec: &str) -> Result<Forced, String> {
    let mut f = Forced::default();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let item = item.to_ascii_lowercase();
        let (family, name) = match item.split_once('=') {
            Some((a, b)) => (Some(a.trim()), b.trim()),
            None => (None, item.as_str()),
        };
        if family == Some("f16read") {
            match read_parse(DType::F16, name) {
                Some(k) => {
                    f.f16read = Some(k);
                    continue;
                }
                None => return Err(format!("FIRSTRT_KERNEL: unknown entry {item:?} (expected f16read=native|packed|wide)")),
            }
        }
        if family == Some("f32read") {
            match read_parse(DType::F32, name) {
                Some(k) => {
                    f.f32read = Some(k);
                    continue;
                }
                None => return Err(format!("FIRSTRT_KERNEL: unknown entry {item:?} (expected f32read=plain|wide)")),
            }
        }
        match (family, MatmulVariant::parse(name), MatvecVariant::parse(name)) {
            (None | Some("matmul"), Some(v), _) => f.matmul = Some(v),
            (None | Some("matvec"), _, Some(v)) => f.matvec = Some(v),
            _ => {
                return Err(format!(
                    "FIRSTRT_KERNEL: unknown entry {item:?} (expected matmul=regblock|tiled|xbcast, matvec=rows|reduce, \
                     f32read=plain|wide, f16read=native|packed|wide)"
                ));
            }
        }
    }
    Ok(f)
}

fn forced_from_env() -> Forced {
    match std::env::var("FIRSTRT_KERNEL") {
        Ok(spec) => parse_forced(&spec).unwrap_or_else(|e| {
            log::warn!("{e}; ignoring it");
            Forced::default()
        }),
        Err(_) => Forced::default(),
    }
}

/// `$FIRSTRT_CACHE/kernel-choice.json`, default `~/.cache/firstrt/kernel-choice.json`.
pub fn cache_path() -> Option<PathBuf> {
    let dir = match std::env::var_os("FIRSTRT_CACHE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache").join("firstrt"),
    };
    Some(dir.join("kernel-choice.json"))
}

/// The cache file: adapter key -> family -> variant name.
type CacheFile = BTreeMap<String, BTreeMap<String, String>>;

/// The cached variant of `family` for adapter `key` in the cache file at `path`, if any.
pub fn read_cache_at(path: &Path, key: &str, family: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let cache: CacheFile = serde_json::from_str(&text).ok()?;
    cache.get(key)?.get(family).cloned()
}

/// Record `variant` for (`key`, `family`) in the cache file at `path`, keeping other entries.
pub fn write_cache_at(path: &Path, key: &str, family: &str, variant: &str) -> std::io::Result<()> {
    let mut cache: CacheFile = std::fs::read_to_string(path).ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default();
    cache.entry(key.to_string()).or_default().insert(family.to_string(), variant.to_string());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(&cache).map_err(std::io::Error::other)?;
    std::fs::write(path, text)
}

/// The choice for `family`: forced, cached in memory or on disk, or measured by `measure`.
fn choose(
    ctx: &GpuContext,
    family: &'static str,
    forced: Option<&'static str>,
    cache: Option<&Path>,
    measure: impl FnOnce() -> Result<&'static str, GpuError>,
    fallback: &'static str,
) -> String {
    // The lock is not held while measuring: a measurement may itself ask for another family's
    // choice (a matmul variant's kernels read weights the `f32read` way).
    if let Some(v) = ctx.kernel_choices.lock().unwrap_or_else(|p| p.into_inner()).get(family) {
        return v.clone();
    }
    let key = cache_key(ctx);
    let chosen = if let Some(v) = forced {
        log::info!("kernel choice: {family} = {v} (forced by FIRSTRT_KERNEL)");
        v.to_string()
    } else if let Some(v) = cache.and_then(|p| read_cache_at(p, &key, family)) {
        log::info!(
            "kernel choice: {family} = {v} (cached for this adapter in {})",
            cache.map_or(String::new(), |p| p.display().to_string())
        );
        v
    } else {
        match measure() {
            Ok(v) => {
                log::info!("kernel choice: {family} = {v} (measured)");
                if let Some(path) = cache {
                    if let Err(e) = write_cache_at(path, &key, family, v) {
                        log::warn!("could not write the kernel choice cache {}: {e}", path.display());
                    }
                }
                v.to_string()
            }
            Err(e) => {
                log::warn!("kernel choice: measuring {family} failed ({e}); using {fallback}");
                fallback.to_string()
            }
        }
    };
    // Two threads may have measured at once: the first choice stored wins, for both.
    ctx.kernel_choices.lock().unwrap_or_else(|p| p.into_inner()).entry(family).or_insert(chosen).clone()
}

/// The on-disk cache key: the adapter and driver, and the candidates of every family, so that a
/// choice measured before a variant existed is measured again.
fn cache_key(ctx: &GpuContext) -> String {
    let names = |v: &[&str]| v.join(",");
    format!(
        "{}|matmul={}|matvec={}|f32read=plain,wide|f16read=native,packed,wide",
        ctx.adapter_key(),
        names(&MatmulVariant::ALL.map(MatmulVariant::name)),
        names(&MatvecVariant::ALL.map(MatvecVariant::name)),
    )
}

fn is_cpu(ctx: &GpuContext) -> bool {
    ctx.info.device_type == wgpu::DeviceType::Cpu
}

/// The matmul variant for this adapter (decided once per process).
pub fn matmul_variant(ctx: &GpuContext) -> MatmulVariant {
    let fallback = if is_cpu(ctx) { MatmulVariant::RegBlock } else { MatmulVariant::Tiled };
    let forced = forced_from_env().matmul.map(MatmulVariant::name);
    let name = choose(ctx, "matmul", forced, cache_path().as_deref(), || measure_matmul(ctx).map(MatmulVariant::name), fallback.name());
    MatmulVariant::parse(&name).unwrap_or(fallback)
}

/// The matvec variant for this adapter (decided once per process).
pub fn matvec_variant(ctx: &GpuContext) -> MatvecVariant {
    let fallback = if is_cpu(ctx) { MatvecVariant::Rows } else { MatvecVariant::Reduce };
    let forced = forced_from_env().matvec.map(MatvecVariant::name);
    let name = choose(ctx, "matvec", forced, cache_path().as_deref(), || measure_matvec(ctx).map(MatvecVariant::name), fallback.name());
    MatvecVariant::parse(&name).unwrap_or(fallback)
}

/// The ways this adapter can read weights of `dtype`, the default first: f32 plain, then wide
/// with SHADER_INT64; f16 native with SHADER_F16 (else packed), then packed, then wide with
/// SHADER_INT64.
pub fn read_candidates(ctx: &GpuContext, dtype: DType) -> Vec<WeightKind> {
    let mut kinds = vec![WeightKind::for_dtype(ctx, dtype)];
    if dtype == DType::F16 && kinds[0] == WeightKind::F16 {
        kinds.push(WeightKind::F16Packed);
    }
    if ctx.has_int64() {
        kinds.push(if dtype == DType::F16 { WeightKind::F16Wide } else { WeightKind::F32Wide });
    }
    kinds
}

/// How kernels read weights of `dtype` on this adapter: the only candidate of
/// [`read_candidates`], else the forced, cached or measured `f32read` / `f16read` choice.
pub fn weight_kind(ctx: &GpuContext, dtype: DType) -> WeightKind {
    let candidates = read_candidates(ctx, dtype);
    if candidates.len() == 1 || dtype == DType::U32 {
        return candidates[0];
    }
    let (family, forced) = match dtype {
        DType::F16 => ("f16read", forced_from_env().f16read),
        _ => ("f32read", forced_from_env().f32read),
    };
    let forced = forced.filter(|k| candidates.contains(k)).map(read_name);
    let measure = || measure_read(ctx, dtype, &candidates).map(read_name);
    let name = choose(ctx, family, forced, cache_path().as_deref(), measure, read_name(candidates[0]));
    read_parse(dtype, &name).filter(|k| candidates.contains(k)).unwrap_or(candidates[0])
}

/// Time matvec (the `Rows` variant) 3072x576 and 576x1536 with weights of `dtype` read as each
/// of `kinds`, alternating the kinds over several rounds (other load on the machine then hits all
/// alike); the smallest best time wins.
fn measure_read(ctx: &GpuContext, dtype: DType, kinds: &[WeightKind]) -> Result<WeightKind, GpuError> {
    let mut programs: Vec<Vec<Vec<Dispatch>>> = vec![Vec::new(); kinds.len()];
    for (n, k) in [(3072, 576), (576, 1536)] {
        let w = GpuMatrix::upload(ctx, "choice.w", n, k, &pseudo_random(n * k), dtype)?;
        let x = GpuTensor::from_f32(ctx, "choice.x", &[k], &pseudo_random(k))?;
        let y = GpuTensor::zeros(ctx, "choice.y", DType::F32, &[n])?;
        for (slot, &kind) in programs.iter_mut().zip(kinds) {
            slot.push(matvec(ctx, "choice.read", &LinearOp::new(&x, 1, &w, &y).kind(kind), MatvecVariant::Rows)?);
        }
    }
    let mut best = vec![Duration::MAX; kinds.len()];
    for _round in 0..4 {
        for (b, prog) in best.iter_mut().zip(&programs) {
            let list: Vec<&Dispatch> = prog.iter().flat_map(|ds| ds.iter().cycle().take(4 * ds.len())).collect();
            *b = (*b).min(time_dispatches(ctx, &list, 2)?);
        }
    }
    for (kind, t) in kinds.iter().zip(&best) {
        log::debug!("kernel choice: {dtype} read {} took {t:?}", read_name(*kind));
    }
    let i = (0..kinds.len()).min_by_key(|&i| best[i]).unwrap_or(0);
    Ok(kinds[i])
}

/// Best-of-`reps` wall time of running `dispatches` in one pass (after one warm-up run).
pub fn time_dispatches(ctx: &GpuContext, dispatches: &[&Dispatch], reps: usize) -> Result<Duration, GpuError> {
    ctx.run("choice warm-up", dispatches)?;
    let mut best = Duration::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        ctx.run("choice", dispatches)?;
        best = best.min(t.elapsed());
    }
    Ok(best)
}

fn pseudo_random(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect()
}

/// Time matvec 1536x576 and 576x1536 (f32) with each variant; the fastest total wins.
fn measure_matvec(ctx: &GpuContext) -> Result<MatvecVariant, GpuError> {
    let shapes = [(1536, 576), (576, 1536)];
    let mut best = (Duration::MAX, MatvecVariant::Rows);
    for variant in MatvecVariant::ALL {
        let mut total = Duration::ZERO;
        for (n, k) in shapes {
            let w = GpuMatrix::upload(ctx, "choice.w", n, k, &pseudo_random(n * k), DType::F32)?;
            let x = GpuTensor::from_f32(ctx, "choice.x", &[k], &pseudo_random(k))?;
            let y = GpuTensor::zeros(ctx, "choice.y", DType::F32, &[n])?;
            let ds = matvec(ctx, "choice.matvec", &LinearOp::new(&x, 1, &w, &y), variant)?;
            let list: Vec<&Dispatch> = ds.iter().cycle().take(8 * ds.len()).collect();
            total += time_dispatches(ctx, &list, 3)?;
        }
        log::debug!("kernel choice: matvec {} took {total:?}", variant.name());
        if total < best.0 {
            best = (total, variant);
        }
    }
    Ok(best.1)
}

/// Time matmul T=64 on 576x576 (f32) with each variant.
/// Time each matmul variant on short and long prompts (T = 12 and T = 96) over a 1536x576
/// matrix, alternating variants round by round so that other load on the machine hits all alike;
/// the smallest total of best times wins. Short prompts matter: a 64x64 tile wastes most of its
/// work at T = 12.
fn measure_matmul(ctx: &GpuContext) -> Result<MatmulVariant, GpuError> {
    let (n, k) = (1536, 576);
    let w = GpuMatrix::upload(ctx, "choice.w", n, k, &pseudo_random(n * k), DType::F32)?;
    let mut programs: Vec<Vec<Vec<Dispatch>>> = vec![Vec::new(); MatmulVariant::ALL.len()];
    let mut buffers = Vec::new();
    for t in [12, 96] {
        let x = GpuTensor::from_f32(ctx, "choice.x", &[t, k], &pseudo_random(t * k))?;
        let y = GpuTensor::zeros(ctx, "choice.y", DType::F32, &[t, n])?;
        for (slot, variant) in programs.iter_mut().zip(MatmulVariant::ALL) {
            slot.push(matmul(ctx, "choice.matmul", &LinearOp::new(&x, t, &w, &y), variant)?);
        }
        buffers.push((x, y));
    }
    let mut best = vec![Duration::MAX; MatmulVariant::ALL.len()];
    for _round in 0..2 {
        for (i, shapes) in programs.iter().enumerate() {
            let mut total = Duration::ZERO;
            for ds in shapes {
                let list: Vec<&Dispatch> = ds.iter().collect();
                total += time_dispatches(ctx, &list, 2)?;
            }
            best[i] = best[i].min(total);
        }
    }
    let (i, took) = best.iter().enumerate().min_by_key(|(_, t)| **t).map(|(i, t)| (i, *t)).unwrap_or((0, Duration::ZERO));
    for (v, t) in MatmulVariant::ALL.iter().zip(&best) {
        log::debug!("kernel choice: matmul {} took {t:?}", v.name());
    }
    log::debug!("kernel choice: matmul best {took:?}");
    Ok(MatmulVariant::ALL[i])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_context;
    use crate::testdata::TempDir;

    #[test]
    fn forced_variants_parse() {
        assert_eq!(
            parse_forced("matmul=tiled,matvec=reduce").unwrap(),
            Forced { matmul: Some(MatmulVariant::Tiled), matvec: Some(MatvecVariant::Reduce), ..Forced::default() }
        );
        assert_eq!(parse_forced("tiled").unwrap(), Forced { matmul: Some(MatmulVariant::Tiled), ..Forced::default() });
        assert_eq!(parse_forced(" Rows ").unwrap(), Forced { matvec: Some(MatvecVariant::Rows), ..Forced::default() });
        assert_eq!(
            parse_forced("regblock, matvec = rows").unwrap(),
            Forced { matmul: Some(MatmulVariant::RegBlock), matvec: Some(MatvecVariant::Rows), ..Forced::default() }
        );
        assert_eq!(parse_forced("").unwrap(), Forced::default());
        assert!(parse_forced("matmul=rows").is_err());
        assert!(parse_forced("matvec=tiled").is_err());
        assert!(parse_forced("fast").is_err());
        assert_eq!(parse_forced("f16read=packed").unwrap().f16read, Some(WeightKind::F16Packed));
        assert_eq!(parse_forced("rows,f16read=native").unwrap().f16read, Some(WeightKind::F16));
        assert!(parse_forced("f16read=rows").is_err());
        assert_eq!(parse_forced("f16read=wide").unwrap().f16read, Some(WeightKind::F16Wide));
        assert_eq!(parse_forced("f32read=wide").unwrap().f32read, Some(WeightKind::F32Wide));
        assert_eq!(parse_forced("f32read=plain").unwrap().f32read, Some(WeightKind::F32));
        assert!(parse_forced("f32read=packed").is_err());
        assert!(parse_forced("packed").is_err());
    }

    #[test]
    fn forced_choice_wins_and_sticks() {
        let ctx = test_context();
        // A private context entry: choose() with a forced value stores it, later calls reuse it.
        let v = choose(&ctx, "test-forced", Some("b"), None, || Ok("a"), "c");
        assert_eq!(v, "b");
        let again = choose(&ctx, "test-forced", None, None, || panic!("must not measure twice"), "c");
        assert_eq!(again, "b");
    }

    #[test]
    fn measured_choice_goes_to_the_cache_and_back() {
        let ctx = test_context();
        let dir = TempDir::new("choice");
        let path = dir.join("kernel-choice.json");
        let v = choose(&ctx, "test-measured", None, Some(&path), || Ok("fast"), "slow");
        assert_eq!(v, "fast");
        assert_eq!(read_cache_at(&path, &cache_key(&ctx), "test-measured").as_deref(), Some("fast"));
        assert_eq!(read_cache_at(&path, "another adapter", "test-measured"), None);
        // A fresh process (here: a fresh family name) reads it back instead of measuring.
        write_cache_at(&path, &cache_key(&ctx), "test-cached", "tiled").unwrap();
        let c = choose(&ctx, "test-cached", None, Some(&path), || panic!("cached: must not measure"), "slow");
        assert_eq!(c, "tiled");
        // The first entry survived the second write.
        assert_eq!(read_cache_at(&path, &cache_key(&ctx), "test-measured").as_deref(), Some("fast"));
        // A failed measurement falls back.
        let f = choose(&ctx, "test-failed", None, None, || Err(GpuError::Device("no".into())), "slow");
        assert_eq!(f, "slow");
    }

    #[test]
    fn measured_variants_are_valid() {
        let ctx = test_context();
        // The measurement itself (not its outcome, which depends on the machine) must work.
        measure_matvec(&ctx).unwrap();
        measure_matmul(&ctx).unwrap();
        for dtype in [DType::F32, DType::F16] {
            let kinds = read_candidates(&ctx, dtype);
            assert!(kinds.contains(&measure_read(&ctx, dtype, &kinds).unwrap()));
        }
    }

    #[test]
    fn weight_kind_reads_each_dtype() {
        let ctx = test_context();
        for dtype in [DType::F32, DType::F16] {
            let k = weight_kind(&ctx, dtype);
            assert_eq!(k.dtype(), dtype);
            assert!(read_candidates(&ctx, dtype).contains(&k), "{dtype} read as {k:?}");
        }
        assert_eq!(read_candidates(&ctx, DType::F32)[0], WeightKind::F32);
        if !ctx.has_f16() {
            assert_eq!(read_candidates(&ctx, DType::F16)[0], WeightKind::F16Packed);
        }
    }
}
