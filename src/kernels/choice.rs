//! Which kernel variant to use on this adapter, decided once per process per family.
//!
//! In order: the environment variable `FIRSTRT_KERNEL` (e.g. `matmul=tiled,matvec=reduce`, or a
//! bare variant name such as `tiled`, `regblock`, `rows`, `reduce`, `subgroup`); the on-disk cache
//! `$FIRSTRT_CACHE/kernel-choice.json` (default `~/.cache/firstrt`) keyed by
//! [`GpuContext::adapter_key`], the candidate variants and the measuring method; else a
//! measurement of every candidate, whose result is written to the cache. The choice is kept in
//! `ctx.kernel_choices`.
//!
//! The measurement runs each candidate's program (a mix of the test model's shapes: its decode
//! GEMVs with the 49152 x 576 LM head, or prefill products, short and long prompts apart) in
//! alternated rounds and compares each candidate's median time relative to the fastest of each
//! round ([`relative_medians`]). Candidates are listed in a fixed preference order (the
//! adapter's fallback first); the first within [`TIE_MARGIN`] of the fastest wins
//! ([`READ_TIE_MARGIN`] for the ways of reading weights), so that variants within noise of each
//! other give the same choice in every fresh run. It takes
//! one to a few seconds on lavapipe, plus the driver's compilation of the candidates when its
//! shader cache is empty; [`crate::gpu::notice`] announces it.
//!
//! Besides the matmul and matvec variants, the families `f32read` and `f16read` choose how
//! kernels read weights ([`read_candidates`]): f32 `plain` ([`WeightKind::F32`]) or `wide`
//! ([`WeightKind::F32Wide`], where SHADER_INT64 exists); f16 `native` ([`WeightKind::F16`], where
//! SHADER_F16 exists), `wide` ([`WeightKind::F16Wide`]) or `packed` ([`WeightKind::F16Packed`]), the default
//! (the first of [`read_candidates`]) preferred on a tie, then the wide form; on a CPU adapter
//! the wide form is preferred ([`measured_read_candidates`]): on lavapipe every load is a
//! per-lane loop, so fewer, wider loads win where the CPU handles 64-bit lanes well, and lose
//! where it does not (AVX2 without AVX-512), which only a measurement tells.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::gpu::notice::{read_json_file, update_json_file};
use crate::gpu::{DType, Dispatch, GpuContext, GpuError, GpuMatrix, GpuTensor, WeightKind};
use crate::kernels::linear::LinearOp;
use crate::kernels::matmul::{MatmulVariant, matmul};
use crate::kernels::matvec::{MatvecVariant, matvec};

/// Variants forced through `FIRSTRT_KERNEL`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forced {
    /// `matmul=regblock|tiled|xbcast` (or the bare name).
    pub matmul: Option<MatmulVariant>,
    /// `matvec=rows|reduce|subgroup` (or the bare name).
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
        WeightKind::F32Wide | WeightKind::F16Wide | WeightKind::F16Wide16 => "wide",
        WeightKind::Quant(q) => q.name(),
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
        let read_family = match family {
            Some("f16read") => Some((DType::F16, "f16read=native|packed|wide")),
            Some("f32read") => Some((DType::F32, "f32read=plain|wide")),
            _ => None,
        };
        if let Some((dtype, expected)) = read_family {
            let kind = read_parse(dtype, name).ok_or_else(|| format!("FIRSTRT_KERNEL: unknown entry {item:?} (expected {expected})"))?;
            *if dtype == DType::F16 { &mut f.f16read } else { &mut f.f32read } = Some(kind);
            continue;
        }
        match (family, MatmulVariant::parse(name), MatvecVariant::parse(name)) {
            (None | Some("matmul"), Some(v), _) => f.matmul = Some(v),
            (None | Some("matvec"), _, Some(v)) => f.matvec = Some(v),
            _ => {
                return Err(format!(
                    "FIRSTRT_KERNEL: unknown entry {item:?} (expected matmul=regblock|tiled|xbcast|xbcast-subgroup, matvec=rows|reduce|subgroup, \
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
    Some(crate::gpu::notice::cache_dir()?.join("kernel-choice.json"))
}

/// The cache file: adapter key -> family -> variant name.
type CacheFile = BTreeMap<String, BTreeMap<String, String>>;

/// The cached variant of `family` for adapter `key` in the cache file at `path`, if any.
pub fn read_cache_at(path: &Path, key: &str, family: &str) -> Option<String> {
    let cache: CacheFile = read_json_file(path);
    cache.get(key)?.get(family).cloned()
}

/// Record `variant` for (`key`, `family`) in the cache file at `path`, keeping other entries.
pub fn write_cache_at(path: &Path, key: &str, family: &str, variant: &str) -> std::io::Result<()> {
    update_json_file(path, |cache: &mut CacheFile| {
        cache.entry(key.to_string()).or_default().insert(family.to_string(), variant.to_string());
    })
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
        log::debug!(
            "kernel choice: {family} = {v} (cached for this adapter in {})",
            cache.map_or(String::new(), |p| p.display().to_string())
        );
        v
    } else {
        crate::gpu::notice::give(ctx, "choosing kernels and compiling shaders");
        let start = Instant::now();
        match measure() {
            Ok(v) => {
                log::info!("kernel choice: {family} = {v} (measured in {:.2} s)", start.elapsed().as_secs_f64());
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

/// The way choices are measured, in the cache key: a choice measured another way (before the
/// alternated medians and the tie margin, or against the windows GEMV before it read the
/// interleaved layout: `il8`) is measured again.
const METHOD: &str = "paired-medians-tie5-read10-short32-xbcast8x8-cpuwide1st-il8";

/// The on-disk cache key: the adapter and driver, the candidates of every family and the
/// measuring [`METHOD`], so that a choice measured before a variant existed is measured again.
fn cache_key(ctx: &GpuContext) -> String {
    let names = |v: &[&str]| v.join(",");
    format!(
        "{}|matmul={}|matvec={}|f32read=plain,wide|f16read=native,wide,packed|{METHOD}",
        ctx.adapter_key(),
        names(&matmul_candidates(ctx).into_iter().map(MatmulVariant::name).collect::<Vec<_>>()),
        names(&matvec_candidates(ctx).into_iter().map(MatvecVariant::name).collect::<Vec<_>>()),
    )
}

/// Prefills of at most this many tokens are short: their products use the `matmul.short`
/// choice, longer ones the `matmul` choice. On lavapipe the best variant at T = 12 and at
/// T = 128 differ, each by about 20%, and one choice over both lengths sat within noise of a
/// tie.
pub const SHORT_PREFILL_ROWS: usize = 32;

/// The matmul variant for a prefill of `rows` tokens on this adapter (decided once per process
/// for short prefills, up to [`SHORT_PREFILL_ROWS`], and once for longer ones).
pub fn matmul_variant(ctx: &GpuContext, rows: usize) -> MatmulVariant {
    let (family, lengths) = if rows <= SHORT_PREFILL_ROWS { ("matmul.short", SHORT_LENGTHS) } else { ("matmul", LONG_LENGTHS) };
    let fallback = if ctx.is_cpu() { MatmulVariant::RegBlock } else { MatmulVariant::Tiled };
    let forced = forced_from_env()
        .matmul
        .filter(|v| {
            let ok = MatmulVariant::available(ctx).contains(v);
            if !ok {
                log::warn!(
                    "FIRSTRT_KERNEL: matmul={} needs SUBGROUP with subgroups of {} lanes, which adapter {} lacks; measuring instead",
                    v.name(),
                    crate::kernels::matmul::XBCAST_WG,
                    ctx.info.name
                );
            }
            ok
        })
        .map(MatmulVariant::name);
    let measure = || measure_matmul(ctx, family, fallback, &lengths).map(MatmulVariant::name);
    let name = choose(ctx, family, forced, cache_path().as_deref(), measure, fallback.name());
    MatmulVariant::parse(&name).unwrap_or(fallback)
}

/// The matmul variant for a prefill of `rows` tokens over the weights `w`: forced
/// (`FIRSTRT_KERNEL`); else `xbcast`, without measuring, where every chunk of `w` is quantised
/// and the adapter is a CPU; else [`matmul_variant`]. Why: the matmul families are measured on
/// f32 weights, whose kernels a quantised model never runs (on lavapipe that measurement
/// compiled the f32 `regblock` and `xbcast` pipelines for 5–8 s of a first run); on quantised
/// weights `xbcast` ran 1.8x as fast as `regblock` at 16 rows and as fast at 37
/// (BENCHMARKS.md, "Quantised weights on `xbcast`"), and past
/// [`crate::kernels::matmul::XBCAST_QUANT_MAX_ROWS`] rows it runs `regblock` itself.
pub fn matmul_variant_for(ctx: &GpuContext, rows: usize, w: &GpuMatrix) -> MatmulVariant {
    if forced_from_env().matmul.is_none() && quantised_on_cpu(ctx, w) {
        return MatmulVariant::XBcast;
    }
    matmul_variant(ctx, rows)
}

/// The matvec variant for a decode product by `w`: forced (`FIRSTRT_KERNEL`); else `rows`,
/// without measuring, where every chunk of `w` is quantised and the adapter is a CPU (`windows`
/// reads no quantised blocks and runs them as `rows`, and its measurement, on f32 weights, would
/// only add 1.5–2.5 s to a quantised model's first run on lavapipe); else [`matvec_variant`].
pub fn matvec_variant_for(ctx: &GpuContext, w: &GpuMatrix) -> MatvecVariant {
    if forced_from_env().matvec.is_none() && quantised_on_cpu(ctx, w) {
        return MatvecVariant::Rows;
    }
    matvec_variant(ctx)
}

/// Whether `w`'s products take a variant on this adapter without a measurement (`xbcast` for
/// prefill, [`matmul_variant_for`]; `rows` for decode, [`matvec_variant_for`]): a CPU adapter
/// and every chunk of `w` quantised.
fn quantised_on_cpu(ctx: &GpuContext, w: &GpuMatrix) -> bool {
    ctx.is_cpu() && !w.chunks.is_empty() && w.chunks.iter().all(|c| c.quant.is_some())
}

/// Decide every kernel choice that the steps over these weights use, measuring what is not
/// cached, so that no measurement falls inside a timed step: how dense weights are read, for
/// each dtype of the dense chunks of `read` (every matrix a step reads, the embedding table
/// included: [`dense_kind`]); the matmul variants of short and of long prefills where a
/// matrix of `multiplied` (those a prefill multiplies by) needs them ([`matmul_variant_for`]);
/// the matvec variant where a matrix of `read` needs it ([`matvec_variant_for`]). A choice that
/// no step needs is not measured: a model whose matrices are all quantised measures no f32
/// reads and, on a CPU adapter, no matmul and no matvec.
pub fn choose_all(ctx: &GpuContext, read: &[&GpuMatrix], multiplied: &[&GpuMatrix]) {
    for m in read {
        dense_kind(ctx, m);
    }
    if multiplied.iter().any(|w| !quantised_on_cpu(ctx, w)) {
        matmul_variant(ctx, 1);
        matmul_variant(ctx, SHORT_PREFILL_ROWS + 1);
    }
    if read.iter().any(|w| !quantised_on_cpu(ctx, w)) {
        matvec_variant(ctx);
    }
}

/// The matvec variant used where none is measured: `rows` on a CPU adapter, else `reduce`.
fn matvec_fallback(ctx: &GpuContext) -> MatvecVariant {
    if ctx.is_cpu() { MatvecVariant::Rows } else { MatvecVariant::Reduce }
}

/// The matvec variants measured on this adapter: those it can run
/// ([`MatvecVariant::available`]); on a CPU adapter only `rows` and `windows`. On lavapipe the
/// subgroup GEMV lost to `rows` on every decode shape of `cargo bench --bench kernels -- matvec`
/// (by up to 1.8x; its lanes split K, which suits a GPU's memory system, not a CPU's SIMD lanes),
/// yet the short measurement picked it in one of three fresh runs; `reduce` (a workgroup
/// reduction through workgroup memory and barriers) took 9-10x as long as `rows` in every fresh
/// run's measurement (251 ms against 26). Both can still be forced there
/// (`FIRSTRT_KERNEL=matvec=subgroup`).
fn matvec_candidates(ctx: &GpuContext) -> Vec<MatvecVariant> {
    let available = MatvecVariant::available(ctx);
    if ctx.is_cpu() {
        return available.into_iter().filter(|v| matches!(v, MatvecVariant::Rows | MatvecVariant::Windows)).collect();
    }
    available
}

/// The matmul variants measured on this adapter: those it can run ([`MatmulVariant::available`]),
/// less two on a CPU adapter. `tiled`: its workgroup memory and barriers made it 4-20x slower
/// than the others in every fresh run's measurement (at T = 12: 207 ms against `xbcast`'s 10.6;
/// at T = 128: 153 against 33). `xbcast` where `xbcast-subgroup` runs: the same windows with
/// fewer loads of x, in `cargo bench --bench kernels` 1.25-3.6x as fast at K = 576 (16-row
/// windows) and 0.86-1.55x at K = 1536 (8-row windows, f16 slightly slower), and end to end
/// 1.8x (f32) and 1.4-1.8x (f16) at 128 tokens (BENCHMARKS.md, "x handed across lanes"), so
/// measuring both would only add its compile to a first run. Both can still be forced
/// (`FIRSTRT_KERNEL=matmul=tiled`, `matmul=xbcast`).
fn matmul_candidates(ctx: &GpuContext) -> Vec<MatmulVariant> {
    let available = MatmulVariant::available(ctx);
    if !ctx.is_cpu() {
        return available;
    }
    let subgroup = available.contains(&MatmulVariant::XBcastSubgroup);
    available.into_iter().filter(|&v| v != MatmulVariant::Tiled && !(v == MatmulVariant::XBcast && subgroup)).collect()
}

/// The matvec variant for this adapter: forced (`FIRSTRT_KERNEL`), the only variant measured on
/// it where there is one (`rows` on a CPU adapter that cannot run `windows`), or measured (once
/// per process, cached on disk).
pub fn matvec_variant(ctx: &GpuContext) -> MatvecVariant {
    let fallback = matvec_fallback(ctx);
    let available = MatvecVariant::available(ctx);
    let forced = forced_from_env().matvec.filter(|v| {
        let ok = available.contains(v);
        if !ok {
            log::warn!("FIRSTRT_KERNEL: matvec={} is not available on adapter {}; measuring instead", v.name(), ctx.info.name);
        }
        ok
    });
    let candidates = matvec_candidates(ctx);
    if let (None, [only]) = (forced, &candidates[..]) {
        return *only;
    }
    let forced = forced.map(MatvecVariant::name);
    let name =
        choose(ctx, "matvec", forced, cache_path().as_deref(), || measure_matvec(ctx, fallback).map(MatvecVariant::name), fallback.name());
    MatvecVariant::parse(&name).unwrap_or(fallback)
}

/// The ways this adapter can read weights of `dtype`, in preference order (the default first):
/// f32 plain, then wide with SHADER_INT64; f16 native with SHADER_F16 (else packed), then wide
/// with SHADER_INT64, then packed; u32 (no weights, only f32 reads): plain f32. The
/// measurement times decode GEMVs, and where wide and packed f16 tie there (within
/// [`READ_TIE_MARGIN`], as on an AMD EPYC under lavapipe: 34.3 against 33.7 ms), the wide form goes
/// first because the prefill matmul reads eight values per load with it against four packed
/// (`firstrt bench --dtype f16 --prompt-len 128`, forced each way, alternated twice: prefill
/// 81.5 and 84.7 tok/s wide, 75.5 and 67.7 packed; decode within noise).
pub fn read_candidates(ctx: &GpuContext, dtype: DType) -> Vec<WeightKind> {
    let mut kinds = vec![WeightKind::for_dtype(ctx, dtype)];
    if ctx.has_int64() {
        match dtype {
            DType::F16 => kinds.push(WeightKind::F16Wide),
            DType::F32 => kinds.push(WeightKind::F32Wide),
            DType::U32 => {}
        }
    }
    if dtype == DType::F16 && kinds[0] == WeightKind::F16 {
        kinds.push(WeightKind::F16Packed);
    }
    kinds
}

/// The ways of reading weights of `dtype` that this adapter measures, in preference order: on a
/// CPU adapter with SHADER_INT64 the wide form first ([`WeightKind::F32Wide`],
/// [`WeightKind::F16Wide`]), then the others of [`read_candidates`]; elsewhere
/// [`read_candidates`] as they are. Why wide first on a CPU: on lavapipe every load is a per-lane
/// loop with a bounds branch per component, so where the CPU handles 64-bit lanes well the wide
/// forms do the fewest loads and win or tie (AMD EPYC with AVX-512, 2026-12-02, `cargo bench
/// --bench kernels -- "matvec rows"`, f16 wide against packed: 3072x576 662 against 1094 us,
/// 49152x576 12.4 against 13.6 ms; the decode measurement's medians 34.3 against 33.7 ms), and a
/// tie must go to them every time. Where it does not (an AMD EPYC, Zen 3: AVX2, no AVX-512,
/// 2026-12-03: f16 wide 1,041 against packed 559 us at 3072x576, decode 9.5 against 16.1 tok/s)
/// the measurement picks the faster form, far outside the tie margin.
pub fn measured_read_candidates(ctx: &GpuContext, dtype: DType) -> Vec<WeightKind> {
    let all = read_candidates(ctx, dtype);
    let wide = match dtype {
        DType::F16 => WeightKind::F16Wide,
        DType::F32 => WeightKind::F32Wide,
        DType::U32 => return all,
    };
    if ctx.is_cpu() && all.contains(&wide) { preference_order(&all, wide) } else { all }
}

/// How kernels read weights of `dtype` on this adapter: the forced `f32read` / `f16read` choice
/// (`FIRSTRT_KERNEL`, any of [`read_candidates`]); else the only candidate of
/// [`measured_read_candidates`]; else the cached or measured choice among them (the first of
/// them where the measurement fails).
pub fn weight_kind(ctx: &GpuContext, dtype: DType) -> WeightKind {
    let candidates = read_candidates(ctx, dtype);
    if candidates.len() == 1 {
        return candidates[0];
    }
    let (family, forced) = match dtype {
        DType::F16 => ("f16read", forced_from_env().f16read),
        _ => ("f32read", forced_from_env().f32read),
    };
    let forced = forced.filter(|k| candidates.contains(k)).map(read_name);
    let measured = measured_read_candidates(ctx, dtype);
    if let (None, [only]) = (forced, &measured[..]) {
        return *only;
    }
    let measure = || measure_read(ctx, family, dtype, &measured).map(read_name);
    let name = choose(ctx, family, forced, cache_path().as_deref(), measure, read_name(measured[0]));
    read_parse(dtype, &name).filter(|k| candidates.contains(k)).unwrap_or(measured[0])
}

/// The kind that reads the dense chunks of `w` ([`weight_kind`] of its dtype), measured only
/// where `w` has a dense chunk: for a matrix of quantised blocks only, the kind is never used to
/// read a value, and the adapter's fallback (the first of [`read_candidates`]) is returned
/// without a measurement.
pub fn dense_kind(ctx: &GpuContext, w: &GpuMatrix) -> WeightKind {
    if w.chunks.iter().any(|c| c.quant.is_none()) { weight_kind(ctx, w.dtype) } else { read_candidates(ctx, w.dtype)[0] }
}

/// Candidates whose median time is within this fraction of the fastest one's count as tied; a
/// tie goes to the candidate earliest in preference order (the fallback first), so that noise
/// between near-equal variants cannot flip the choice from one run to the next.
pub const TIE_MARGIN: f64 = 0.05;

/// The tie margin, instead of [`TIE_MARGIN`], of the ways of reading weights (`f32read`,
/// `f16read`): on a CPU adapter the wide read comes first and keeps a tie up to this margin.
/// Why wider: on an AMD EPYC (Zen 3, 2026-12-03) the `f32read` medians of wide against plain
/// were 33–41 against 38–44 ms (wide 15.2 against 12.7 tok/s decode and 79 against 66 prefill
/// end to end), and one fresh measurement in eleven found plain more than 5% faster and
/// picked it.
pub const READ_TIE_MARGIN: f64 = 0.10;

/// Alternated rounds of timing per candidate; each candidate's median over them, relative to
/// each round's fastest ([`relative_medians`]), is compared.
const ROUNDS: usize = 5;

/// After this many rounds, a candidate whose fastest run so far is [`SLOW_FACTOR`] times the
/// fastest candidate's or more is timed no further (it cannot come within [`TIE_MARGIN`]).
const DROP_AFTER: usize = 2;

/// See [`DROP_AFTER`].
const SLOW_FACTOR: f64 = 2.0;

/// The choice among candidates listed in preference order, from their measured times (any unit,
/// e.g. [`relative_medians`]): the index of the first candidate whose time is at most
/// `(1 + margin)` times the fastest time; None for an empty list.
pub fn pick_within_margin(times: &[f64], margin: f64) -> Option<usize> {
    let fastest = times.iter().copied().reduce(f64::min)?;
    times.iter().position(|&t| t <= fastest * (1.0 + margin))
}

/// Each candidate's median over rounds of its time divided by the fastest time of the same
/// round (`rounds[c][r]`: candidate c's time in round r; a candidate dropped after a few rounds
/// has fewer): 1.0 for a candidate fastest in most rounds. Pairing each time with its own round's
/// cancels a change of the machine's speed from one round to the next (a shared 2-core machine's
/// rounds varied 2x within one measurement), which independent medians do not.
pub fn relative_medians(rounds: &[Vec<Duration>]) -> Vec<f64> {
    let len = rounds.iter().map(Vec::len).max().unwrap_or(0);
    let fastest: Vec<f64> =
        (0..len).map(|r| rounds.iter().filter_map(|t| t.get(r)).map(Duration::as_secs_f64).fold(f64::INFINITY, f64::min)).collect();
    rounds
        .iter()
        .map(|t| {
            let mut ratios: Vec<f64> = t.iter().zip(&fastest).map(|(d, &f)| if f > 0.0 { d.as_secs_f64() / f } else { 1.0 }).collect();
            upper_median(&mut ratios, f64::total_cmp).unwrap_or(f64::INFINITY)
        })
        .collect()
}

/// `all` in preference order: `preferred` first, then the others in their list order.
fn preference_order<T: Copy + PartialEq>(all: &[T], preferred: T) -> Vec<T> {
    std::iter::once(preferred).chain(all.iter().copied().filter(|&v| v != preferred)).collect()
}

/// The median of `times` (the upper one of the middle two for an even count).
fn median(times: &mut [Duration]) -> Duration {
    upper_median(times, Ord::cmp).unwrap_or(Duration::ZERO)
}

/// The middle of `values` after sorting them in place by `cmp`, the upper one of the middle two
/// for an even count; None when empty. The one median rule of [`median`] and
/// [`relative_medians`].
fn upper_median<T: Copy>(values: &mut [T], cmp: impl FnMut(&T, &T) -> std::cmp::Ordering) -> Option<T> {
    values.sort_unstable_by(cmp);
    values.get(values.len() / 2).copied()
}

/// What a candidate's run is timed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clock {
    /// Wall time: the GPU works apart from this process.
    Wall,
    /// This process's CPU time over all its threads: on a CPU adapter (lavapipe) the kernels run
    /// on this process's threads, and their CPU time, unlike wall time, does not grow while
    /// other processes hold the cores.
    ProcessCpu,
}

impl Clock {
    /// [`Clock::ProcessCpu`] for a CPU adapter where the clock exists, else [`Clock::Wall`].
    fn for_adapter(ctx: &GpuContext) -> Clock {
        if ctx.is_cpu() && process_cpu_time().is_some() { Clock::ProcessCpu } else { Clock::Wall }
    }

    /// The clock's reading (from an arbitrary origin).
    fn now(self) -> Duration {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        match self {
            Clock::ProcessCpu => process_cpu_time().unwrap_or_default(),
            Clock::Wall => ORIGIN.get_or_init(Instant::now).elapsed(),
        }
    }
}

/// CPU time used by this process so far, all threads (`CLOCK_PROCESS_CPUTIME_ID`); None where
/// the clock is missing.
fn process_cpu_time() -> Option<Duration> {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes one timespec through a valid pointer.
        if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } == 0 {
            return Some(Duration::new(u64::try_from(ts.tv_sec).ok()?, u32::try_from(ts.tv_nsec).ok()?));
        }
    }
    None
}

/// Time of each candidate's program (one submission of its dispatches, waited for): one
/// [`GpuContext::warm_up`] of every program first (the driver compiles its pipelines there), then up to
/// [`ROUNDS`] rounds that each time every remaining program once, round r starting with
/// candidate `r mod n` so that other load on the machine and the order hit all alike. Returns
/// each candidate's times; candidates far behind after [`DROP_AFTER`] rounds are timed no
/// further (they have fewer).
fn alternated_rounds(ctx: &GpuContext, programs: &[Vec<Dispatch>]) -> Result<Vec<Vec<Duration>>, GpuError> {
    ctx.warm_up(programs.iter().flatten())?;
    let lists: Vec<Vec<&Dispatch>> = programs.iter().map(|p| p.iter().collect()).collect();
    let n = lists.len();
    let clock = Clock::for_adapter(ctx);
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(ROUNDS); n];
    let mut timed = vec![true; n];
    for round in 0..ROUNDS {
        if round == DROP_AFTER {
            let fastest = |t: &[Duration]| t.iter().min().map_or(f64::MAX, Duration::as_secs_f64);
            let best = times.iter().map(|t| fastest(t)).fold(f64::MAX, f64::min);
            for (keep, t) in timed.iter_mut().zip(&times) {
                *keep = fastest(t) < SLOW_FACTOR * best;
            }
        }
        for i in (0..n).map(|j| (j + round) % n).filter(|&i| timed[i]) {
            let start = clock.now();
            ctx.run("choice", &lists[i])?;
            times[i].push(clock.now().saturating_sub(start));
        }
    }
    Ok(times)
}

/// Time `build(candidate)` for every candidate (in preference order) with
/// [`alternated_rounds`], and pick with [`pick_within_margin`] and `margin` ([`TIE_MARGIN`] or
/// [`READ_TIE_MARGIN`]) from the [`relative_medians`] of the rounds.
fn measure_candidates<T: Copy>(
    ctx: &GpuContext,
    family: &str,
    margin: f64,
    candidates: &[T],
    name: impl Fn(T) -> &'static str,
    build: impl Fn(T) -> Result<Vec<Dispatch>, GpuError>,
) -> Result<T, GpuError> {
    // A candidate this adapter's backend cannot build (a shader feature its translation lacks)
    // drops out of the measurement instead of failing the choice.
    let mut built = Vec::with_capacity(candidates.len());
    let mut programs = Vec::with_capacity(candidates.len());
    for &c in candidates {
        match build(c) {
            Ok(p) => {
                built.push(c);
                programs.push(p);
            }
            Err(e) => log::warn!("kernel choice: {family} {} cannot be built on this adapter, left out: {e}", name(c)),
        }
    }
    let candidates = &built[..];
    if candidates.is_empty() {
        return Err(GpuError::Device(format!("kernel choice {family}: no candidate could be built")));
    }
    let mut rounds = alternated_rounds(ctx, &programs)?;
    let ms = |t: &Duration| format!("{:.2}", 1e3 * t.as_secs_f64());
    for (&c, t) in candidates.iter().zip(&rounds) {
        log::debug!("kernel choice: {family} {} rounds (ms): {}", name(c), t.iter().map(ms).collect::<Vec<_>>().join(" "));
    }
    let relative = relative_medians(&rounds);
    let medians: Vec<Duration> = rounds.iter_mut().map(|t| median(t)).collect();
    let i = pick_within_margin(&relative, margin).ok_or_else(|| GpuError::Device(format!("kernel choice {family}: no candidate")))?;
    let line: Vec<String> =
        candidates.iter().zip(medians.iter().zip(&relative)).map(|(&c, (t, r))| format!("{} {} ms ({r:.3}x)", name(c), ms(t))).collect();
    log::debug!(
        "kernel choice: {family} medians and medians relative to each round's fastest, in preference order: {}; picked {}",
        line.join(", "),
        name(candidates[i])
    );
    Ok(candidates[i])
}

/// SmolLM2-135M's decode products `(N, K)`: q/k/v, o, gate/up and down of one layer (each run
/// [`LAYER_REPEATS`] times per program), and the LM head (49152 x 576, once): the mix of a
/// decode step, with small K = 576 GEMVs and one large one.
const DECODE_SHAPES: [(usize, usize); 5] = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)];
/// How often each layer shape of [`DECODE_SHAPES`] runs per timed program.
const LAYER_REPEATS: usize = 4;

/// Weights of [`DECODE_SHAPES`] in `dtype` with their input and output vectors.
struct GemvSet {
    shapes: Vec<(GpuMatrix, GpuTensor, GpuTensor)>,
}

impl GemvSet {
    fn new(ctx: &GpuContext, dtype: DType) -> Result<GemvSet, GpuError> {
        let mut shapes = Vec::new();
        for (n, k) in DECODE_SHAPES {
            let w = GpuMatrix::upload(ctx, "choice.w", n, k, &pseudo_random(n * k), dtype)?;
            let x = GpuTensor::from_f32(ctx, "choice.x", &[k], &pseudo_random(k))?;
            let y = GpuTensor::zeros(ctx, "choice.y", DType::F32, &[n])?;
            shapes.push((w, x, y));
        }
        Ok(GemvSet { shapes })
    }

    /// The timed program: every layer shape [`LAYER_REPEATS`] times, the LM head once.
    fn program(&self, ctx: &GpuContext, kind: WeightKind, variant: MatvecVariant) -> Result<Vec<Dispatch>, GpuError> {
        let mut program = Vec::new();
        let last = self.shapes.len() - 1;
        for (i, (w, x, y)) in self.shapes.iter().enumerate() {
            let ds = matvec(ctx, "choice.matvec", &LinearOp::new(x, 1, w, y).kind(kind), variant)?;
            let repeats = if i == last { 1 } else { LAYER_REPEATS };
            program.extend(std::iter::repeat_n(ds, repeats).flatten());
        }
        Ok(program)
    }
}

/// How to read weights of `dtype`: `kinds` in preference order (the default first), timed on
/// [`DECODE_SHAPES`] (decode reads every weight once per token: where the read mode matters
/// most) with the adapter's fallback matvec variant, not the measured one, whose measurement
/// reads weights the way this choice decides.
fn measure_read(ctx: &GpuContext, family: &str, dtype: DType, kinds: &[WeightKind]) -> Result<WeightKind, GpuError> {
    let set = GemvSet::new(ctx, dtype)?;
    let variant = matvec_fallback(ctx);
    measure_candidates(ctx, family, READ_TIE_MARGIN, kinds, read_name, |kind| set.program(ctx, kind, variant))
}

fn pseudo_random(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect()
}

/// The matvec variant, `preferred` first, timed on [`DECODE_SHAPES`] in f32 read the adapter's
/// way ([`weight_kind`]).
fn measure_matvec(ctx: &GpuContext, preferred: MatvecVariant) -> Result<MatvecVariant, GpuError> {
    let set = GemvSet::new(ctx, DType::F32)?;
    let kind = weight_kind(ctx, DType::F32);
    let order = preference_order(&matvec_candidates(ctx), preferred);
    measure_candidates(ctx, "matvec", TIE_MARGIN, &order, MatvecVariant::name, |v| set.program(ctx, kind, v))
}

/// The prompt lengths `matmul.short` is timed on, each with how often it runs per program.
const SHORT_LENGTHS: [(usize, usize); 1] = [(12, 4)];
/// The prompt lengths `matmul` is timed on (the length `firstrt bench` reports by default).
const LONG_LENGTHS: [(usize, usize); 1] = [(128, 1)];

/// The matmul variant for `family`, `preferred` first, timed on a 1536 x 576 weight (half of
/// gate/up in SmolLM2-135M) in f32 at `lengths` (prompt length T, runs per program).
fn measure_matmul(ctx: &GpuContext, family: &str, preferred: MatmulVariant, lengths: &[(usize, usize)]) -> Result<MatmulVariant, GpuError> {
    let (n, k) = (1536, 576);
    let w = GpuMatrix::upload(ctx, "choice.w", n, k, &pseudo_random(n * k), DType::F32)?;
    let mut buffers = Vec::new();
    for &(t, repeats) in lengths {
        // An activation buffer, as the model's: xbcast binds windows of it at the fixed size,
        // so that the pipeline measured here is the one prefills of any length run.
        let x = GpuTensor::zeros_bound(ctx, "choice.x", DType::F32, &[t, k])?;
        x.write_f32(ctx, &pseudo_random(t * k));
        let y = GpuTensor::zeros(ctx, "choice.y", DType::F32, &[t, n])?;
        buffers.push((t, repeats, x, y));
    }
    let order = preference_order(&matmul_candidates(ctx), preferred);
    measure_candidates(ctx, family, TIE_MARGIN, &order, MatmulVariant::name, |variant| {
        let mut program = Vec::new();
        for (t, repeats, x, y) in &buffers {
            let ds = matmul(ctx, "choice.matmul", &LinearOp::new(x, *t, &w, y), variant)?;
            program.extend(std::iter::repeat_n(ds, *repeats).flatten());
        }
        Ok(program)
    })
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
        measure_matvec(&ctx, MatvecVariant::Rows).unwrap();
        for lengths in [&SHORT_LENGTHS[..], &LONG_LENGTHS[..]] {
            measure_matmul(&ctx, "test-matmul", MatmulVariant::RegBlock, lengths).unwrap();
        }
        for dtype in [DType::F32, DType::F16] {
            let kinds = read_candidates(&ctx, dtype);
            assert!(kinds.contains(&measure_read(&ctx, "test-read", dtype, &kinds).unwrap()));
        }
    }

    /// A CPU adapter measures neither `tiled` nor `reduce` (nor `subgroup`), nor `xbcast` where
    /// it runs `xbcast-subgroup`; of the matvec variants it measures `rows` and `windows` where
    /// it runs `windows`, and no matvec at all where `rows` is the only one; it measures every
    /// way of reading weights, the wide one (with SHADER_INT64) first; any other adapter
    /// measures them all in their default order.
    #[test]
    fn cpu_adapters_measure_only_the_cpu_variants() {
        let ctx = test_context();
        if ctx.is_cpu() {
            // One of the two xbcast forms: the subgroup one where the adapter runs it.
            let xbcast =
                if crate::kernels::matmul::xbcast_lanes(&ctx).is_some() { MatmulVariant::XBcastSubgroup } else { MatmulVariant::XBcast };
            assert_eq!(matmul_candidates(&ctx), [MatmulVariant::RegBlock, xbcast]);
            if MatvecVariant::available(&ctx).contains(&MatvecVariant::Windows) {
                assert_eq!(matvec_candidates(&ctx), [MatvecVariant::Rows, MatvecVariant::Windows]);
            } else {
                assert_eq!(matvec_candidates(&ctx), [MatvecVariant::Rows]);
                if forced_from_env().matvec.is_none() {
                    assert_eq!(matvec_variant(&ctx), MatvecVariant::Rows);
                    let choices = ctx.kernel_choices.lock().unwrap();
                    assert!(!choices.contains_key("matvec"), "matvec must not be measured: {choices:?}");
                }
            }
            for (dtype, wide) in [(DType::F32, WeightKind::F32Wide), (DType::F16, WeightKind::F16Wide)] {
                let all = read_candidates(&ctx, dtype);
                let measured = measured_read_candidates(&ctx, dtype);
                assert_eq!(measured.len(), all.len(), "{dtype}: every way is measured: {measured:?}");
                assert!(all.iter().all(|k| measured.contains(k)), "{dtype}: {measured:?} against {all:?}");
                if ctx.has_int64() {
                    assert_eq!(measured[0], wide, "{dtype}: the wide form goes first on a CPU");
                    assert_eq!(measured[1..], all.iter().copied().filter(|&k| k != wide).collect::<Vec<_>>()[..]);
                } else {
                    assert_eq!(measured, all);
                }
            }
        } else {
            assert_eq!(matmul_candidates(&ctx), MatmulVariant::available(&ctx));
            assert_eq!(matvec_candidates(&ctx), MatvecVariant::available(&ctx));
            for dtype in [DType::F32, DType::F16] {
                assert_eq!(measured_read_candidates(&ctx, dtype), read_candidates(&ctx, dtype));
            }
        }
    }

    #[test]
    fn a_candidate_that_cannot_be_built_is_left_out() {
        let ctx = test_context();
        let set = GemvSet::new(&ctx, DType::F32).unwrap();
        let kind = weight_kind(&ctx, DType::F32);
        let unbuildable = |v: MatvecVariant| v == MatvecVariant::Rows;
        let build = |v: MatvecVariant| {
            if unbuildable(v) { Err(GpuError::Device("no such shader here".into())) } else { set.program(&ctx, kind, v) }
        };
        let picked = measure_candidates(
            &ctx,
            "test-unbuildable",
            TIE_MARGIN,
            &[MatvecVariant::Rows, MatvecVariant::Reduce],
            MatvecVariant::name,
            build,
        );
        assert_eq!(picked.unwrap(), MatvecVariant::Reduce);
        let none = measure_candidates(&ctx, "test-unbuildable", TIE_MARGIN, &[MatvecVariant::Rows], MatvecVariant::name, build);
        assert!(none.is_err());
    }

    /// A slow round slows every candidate timed in it: relative to each round's fastest, the
    /// candidate 10% slower stays 10% slower, where its own median would put it 3.3x behind.
    #[test]
    fn relative_medians_pair_each_time_with_its_round() {
        let ms = |v: &[u64]| v.iter().map(|&t| Duration::from_millis(t)).collect::<Vec<_>>();
        let rounds = [ms(&[10, 10, 10, 30, 30]), ms(&[11, 11, 33, 33, 33]), ms(&[40, 40])];
        let r = relative_medians(&rounds);
        assert!((r[0] - 1.0).abs() < 1e-9 && (r[1] - 1.1).abs() < 1e-9 && (r[2] - 4.0).abs() < 1e-9, "{r:?}");
        assert_eq!(pick_within_margin(&r, 0.05), Some(0));
        assert_eq!(pick_within_margin(&r, 0.10), Some(0));
        assert_eq!(pick_within_margin(&relative_medians(&[ms(&[12, 36]), ms(&[10, 30])]), 0.10), Some(1));
        assert!(relative_medians(&[]).is_empty());
    }

    #[test]
    fn ties_go_to_the_preferred_candidate() {
        let ms = |v: &[u64]| v.iter().map(|&t| t as f64).collect::<Vec<_>>();
        // Within the margin of the fastest: the first in preference order.
        assert_eq!(pick_within_margin(&ms(&[1030, 1000]), 0.05), Some(0));
        assert_eq!(pick_within_margin(&ms(&[1050, 1000, 1010]), 0.05), Some(0));
        assert_eq!(pick_within_margin(&ms(&[2000, 1040, 1000]), 0.05), Some(1));
        // Clearly better: the better one, wherever it stands.
        assert_eq!(pick_within_margin(&ms(&[1100, 1000]), 0.05), Some(1));
        assert_eq!(pick_within_margin(&ms(&[3000, 2000, 1000]), 0.05), Some(2));
        assert_eq!(pick_within_margin(&ms(&[900, 1000]), 0.05), Some(0));
        // No margin: the fastest, the first of equals.
        assert_eq!(pick_within_margin(&ms(&[1030, 1000]), 0.0), Some(1));
        assert_eq!(pick_within_margin(&ms(&[1000, 1000]), 0.0), Some(0));
        assert_eq!(pick_within_margin(&[], 0.05), None);
    }

    #[test]
    fn preference_puts_the_fallback_first() {
        assert_eq!(
            preference_order(&MatmulVariant::ALL, MatmulVariant::Tiled),
            [MatmulVariant::Tiled, MatmulVariant::RegBlock, MatmulVariant::XBcast, MatmulVariant::XBcastSubgroup]
        );
        assert_eq!(preference_order(&MatvecVariant::ALL, MatvecVariant::ALL[0]), MatvecVariant::ALL);
    }

    #[cfg(unix)]
    #[test]
    fn process_cpu_time_counts_this_process_work() {
        let start = process_cpu_time().expect("CLOCK_PROCESS_CPUTIME_ID on unix");
        let wall = Instant::now();
        let mut spins = 0u64;
        while process_cpu_time().unwrap() < start + Duration::from_millis(5) {
            spins = std::hint::black_box(spins + 1);
            assert!(wall.elapsed() < Duration::from_secs(30), "the clock did not advance with {spins} spins");
        }
        assert!(spins > 0);
    }

    #[test]
    fn median_is_the_middle_time() {
        let ms = |v: &[u64]| v.iter().map(|&t| Duration::from_millis(t)).collect::<Vec<_>>();
        assert_eq!(median(&mut ms(&[5, 1, 9, 3, 40])), Duration::from_millis(5));
        assert_eq!(median(&mut ms(&[7])), Duration::from_millis(7));
    }

    /// A model whose matrices are all quantised measures nothing on a CPU adapter: its prefill
    /// products take `xbcast` and no f32 or f16 read is chosen; a dense matrix in `read` or in
    /// `multiplied` brings back the choices it needs.
    #[test]
    fn quantised_weights_need_no_measurement_on_a_cpu() {
        use crate::gpu::{GpuOptions, MatrixPart};
        use crate::kernels::testing::random_blocks;
        use crate::model::QuantType;
        // A context of its own: the shared one holds the choices other tests made.
        let ctx = GpuContext::new(&GpuOptions::default()).unwrap();
        let blocks = random_blocks(QuantType::Q4_1, 64, 64, 3);
        let quant = GpuMatrix::upload_parts(&ctx, "w", 64, &[MatrixPart::Blocks(&blocks)], DType::F32).unwrap();
        let dense = GpuMatrix::upload(&ctx, "d", 8, 64, &pseudo_random(8 * 64), DType::F16).unwrap();
        let forced = forced_from_env();
        let chosen = || ctx.kernel_choices.lock().unwrap().keys().copied().collect::<std::collections::BTreeSet<_>>();
        choose_all(&ctx, &[&quant], &[&quant]);
        if !ctx.is_cpu() {
            assert!(chosen().contains("matmul"), "{:?}", chosen());
            return;
        }
        assert!(chosen().is_empty(), "nothing may be measured for quantised weights: {:?}", chosen());
        if forced.matvec.is_none() {
            assert_eq!(matvec_variant_for(&ctx, &quant), MatvecVariant::Rows);
            assert!(chosen().is_empty(), "{:?}", chosen());
        }
        if forced.matmul.is_none() {
            assert_eq!(matmul_variant_for(&ctx, 12, &quant), MatmulVariant::XBcast);
            assert!(!chosen().contains("matmul.short"), "{:?}", chosen());
        }
        // An f16 table (read, not multiplied: the LM head) needs the f16 read (measured where
        // there is more than one way to measure) and the matvec variant, whose measurement reads
        // f32 weights the adapter's way; no matmul.
        choose_all(&ctx, &[&quant, &dense], &[&quant]);
        let f16_measured = forced.f16read.is_some() || measured_read_candidates(&ctx, DType::F16).len() > 1;
        assert_eq!(chosen().contains("f16read"), f16_measured, "{:?}", chosen());
        let matvec_measured = forced.matvec.is_some() || matvec_candidates(&ctx).len() > 1;
        assert_eq!(chosen().contains("matvec"), matvec_measured, "{:?}", chosen());
        if !matvec_measured {
            assert!(!chosen().contains("f32read"), "{:?}", chosen());
        }
        assert!(!chosen().contains("matmul"), "{:?}", chosen());
        // A dense product needs the matmul choices.
        choose_all(&ctx, &[&dense], &[&quant, &dense]);
        assert!(chosen().contains("matmul.short") && chosen().contains("matmul"), "{:?}", chosen());
        assert_eq!(matmul_variant_for(&ctx, 12, &dense), matmul_variant(&ctx, 12));
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
