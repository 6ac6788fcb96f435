//! Which kernel variant to use on this adapter, decided once per process per family.
//!
//! In order: the environment variable `FIRSTRT_KERNEL` (e.g. `matmul=tiled,matvec=reduce`, or a
//! bare variant name such as `tiled`, `regblock`, `rows`, `reduce`); the on-disk cache
//! `$FIRSTRT_CACHE/kernel-choice.json` (default `~/.cache/firstrt`) keyed by
//! [`GpuContext::adapter_key`] and the candidate variants; else a short measurement of every variant on a representative
//! shape, whose result is written to the cache. The choice is kept in `ctx.kernel_choices`.
//!
//! Besides the matmul and matvec variants, the family `f16read` chooses how kernels read f16
//! weights where SHADER_F16 exists: `native` ([`WeightKind::F16`]) or `packed`
//! ([`WeightKind::F16Packed`]); on lavapipe the packed form is faster (it loads 32-bit words).

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
    /// `f16read=native|packed`.
    pub f16read: Option<WeightKind>,
}

/// The `f16read` names of the two ways of reading f16 weights.
fn f16read_name(kind: WeightKind) -> &'static str {
    if kind == WeightKind::F16 { "native" } else { "packed" }
}

fn f16read_parse(s: &str) -> Option<WeightKind> {
    match s {
        "native" => Some(WeightKind::F16),
        "packed" => Some(WeightKind::F16Packed),
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
            match f16read_parse(name) {
                Some(k) => {
                    f.f16read = Some(k);
                    continue;
                }
                None => return Err(format!("FIRSTRT_KERNEL: unknown entry {item:?} (expected f16read=native|packed)")),
            }
        }
        match (family, MatmulVariant::parse(name), MatvecVariant::parse(name)) {
            (None | Some("matmul"), Some(v), _) => f.matmul = Some(v),
            (None | Some("matvec"), _, Some(v)) => f.matvec = Some(v),
            _ => {
                return Err(format!(
                    "FIRSTRT_KERNEL: unknown entry {item:?} (expected matmul=regblock|tiled, matvec=rows|reduce, f16read=native|packed)"
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
    let mut choices = ctx.kernel_choices.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(v) = choices.get(family) {
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
    choices.insert(family, chosen.clone());
    chosen
}

/// The on-disk cache key: the adapter and driver, and the candidates of every family, so that a
/// choice measured before a variant existed is measured again.
fn cache_key(ctx: &GpuContext) -> String {
    let names = |v: &[&str]| v.join(",");
    format!(
        "{}|matmul={}|matvec={}|f16read=native,packed",
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

/// How kernels read weights of `dtype` on this adapter: f32 as [`WeightKind::F32`]; f16 as
/// [`WeightKind::F16Packed`] without SHADER_F16, else as the measured (or forced, or cached)
/// `f16read` choice.
pub fn weight_kind(ctx: &GpuContext, dtype: DType) -> WeightKind {
    let plain = WeightKind::for_dtype(ctx, dtype);
    if plain != WeightKind::F16 {
        return plain;
    }
    let forced = forced_from_env().f16read.map(f16read_name);
    let name = choose(ctx, "f16read", forced, cache_path().as_deref(), || measure_f16read(ctx).map(f16read_name), "native");
    f16read_parse(&name).unwrap_or(WeightKind::F16)
}

/// Time matvec (the `Rows` variant) 3072x576 and 576x1536 with f16 weights read natively and
/// packed, alternating the two kinds over several rounds (other load on the machine then hits both
/// alike); the smaller best time wins.
fn measure_f16read(ctx: &GpuContext) -> Result<WeightKind, GpuError> {
    let kinds = [WeightKind::F16, WeightKind::F16Packed];
    let mut programs: Vec<Vec<Vec<Dispatch>>> = vec![Vec::new(), Vec::new()];
    for (n, k) in [(3072, 576), (576, 1536)] {
        let w = GpuMatrix::upload(ctx, "choice.w", n, k, &pseudo_random(n * k), DType::F16)?;
        let x = GpuTensor::from_f32(ctx, "choice.x", &[k], &pseudo_random(k))?;
        let y = GpuTensor::zeros(ctx, "choice.y", DType::F32, &[n])?;
        for (slot, &kind) in programs.iter_mut().zip(&kinds) {
            slot.push(matvec(ctx, "choice.f16read", &LinearOp::new(&x, 1, &w, &y).kind(kind), MatvecVariant::Rows)?);
        }
    }
    let mut best = [Duration::MAX; 2];
    for _round in 0..4 {
        for (b, prog) in best.iter_mut().zip(&programs) {
            let list: Vec<&Dispatch> = prog.iter().flat_map(|ds| ds.iter().cycle().take(4 * ds.len())).collect();
            *b = (*b).min(time_dispatches(ctx, &list, 2)?);
        }
    }
    log::debug!("kernel choice: f16read native took {:?}, packed {:?}", best[0], best[1]);
    Ok(if best[1] < best[0] { WeightKind::F16Packed } else { WeightKind::F16 })
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
            Forced { matmul: Some(MatmulVariant::Tiled), matvec: Some(MatvecVariant::Reduce), f16read: None }
        );
        assert_eq!(parse_forced("tiled").unwrap(), Forced { matmul: Some(MatmulVariant::Tiled), matvec: None, f16read: None });
        assert_eq!(parse_forced(" Rows ").unwrap(), Forced { matmul: None, matvec: Some(MatvecVariant::Rows), f16read: None });
        assert_eq!(
            parse_forced("regblock, matvec = rows").unwrap(),
            Forced { matmul: Some(MatmulVariant::RegBlock), matvec: Some(MatvecVariant::Rows), f16read: None }
        );
        assert_eq!(parse_forced("").unwrap(), Forced::default());
        assert!(parse_forced("matmul=rows").is_err());
        assert!(parse_forced("matvec=tiled").is_err());
        assert!(parse_forced("fast").is_err());
        assert_eq!(parse_forced("f16read=packed").unwrap().f16read, Some(WeightKind::F16Packed));
        assert_eq!(parse_forced("rows,f16read=native").unwrap().f16read, Some(WeightKind::F16));
        assert!(parse_forced("f16read=rows").is_err());
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
        if ctx.has_f16() {
            measure_f16read(&ctx).unwrap();
        }
    }

    #[test]
    fn weight_kind_reads_each_dtype() {
        let ctx = test_context();
        assert_eq!(weight_kind(&ctx, DType::F32), WeightKind::F32);
        let k = weight_kind(&ctx, DType::F16);
        assert_eq!(k.dtype(), DType::F16);
        if !ctx.has_f16() {
            assert_eq!(k, WeightKind::F16Packed);
        }
    }
}
