//! Shader variants and the pipeline cache: each (shader, entry point, defines) pipeline is built
//! once per process and shared.
//!
//! Building a pipeline is not all of its cost: some drivers (Mesa's lavapipe and its GL driver
//! among them) translate the shader to machine code at its first dispatch, which takes from tens
//! of milliseconds to a second per pipeline without the driver's own shader cache.
//! [`GpuContext::warm_up`](super::GpuContext::warm_up) runs each pipeline once ahead of the timed
//! work; [`Pipeline::is_warm`] says whether that happened.
//!
//! WGSL sources live in `shaders/`, one file per kernel family. A source may contain `{{NAME}}`
//! placeholders that a variant fills in (workgroup sizes, tile sizes, the weight declaration).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::{DType, GpuContext, GpuError};
use crate::model::quant::QuantType;

/// How a kernel reads a weight matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightKind {
    /// `array<vec4<f32>>`.
    F32,
    /// `array<vec4<f16>>` through SHADER_F16.
    F16,
    /// f16 pairs in `array<vec2<u32>>`, unpacked with `unpack2x16float` (no SHADER_F16 needed).
    F16Packed,
    /// f32 in `array<vec4<u64>>` through SHADER_INT64: eight elements per load. On CPU drivers
    /// (lavapipe) every storage load is a per-lane loop whose cost is per load and per component,
    /// not per byte, so fewer, wider loads are what makes a product faster there. Kernels use it
    /// only where K % 8 == 0 ([`WeightKind::for_k`]).
    F32Wide,
    /// f16 in `array<vec2<u64>>` through SHADER_INT64 (eight elements per load, unpacked with
    /// `unpack2x16float`); K % 8 == 0 as for [`WeightKind::F32Wide`].
    F16Wide,
    /// f16 in `array<vec4<u64>>` through SHADER_INT64: sixteen elements per load, twice
    /// [`WeightKind::F16Wide`]'s, so that f16 weights take half the loads of
    /// [`WeightKind::F32Wide`] for the same K (a load's cost on lavapipe is per load, not per
    /// byte). Only the decode GEMV's `rows` kernel reads it, as its form of `F16Wide` where
    /// K % 16 == 0 ([`WeightKind::for_k`]); the buffer is the same. Besides `_16` it declares
    /// `_8`, `_4` and `_1`.
    F16Wide16,
    /// ggml blocks of a [`QuantType`] in `array<u32>` (the GPU layout of
    /// [`crate::model::quant`]), dequantised in registers; K is a multiple of the block size.
    /// Besides `_4` and `_1` it declares `{v}_dot32(b, x0, .., x7)` (unit b of 32 values against
    /// eight vec4, scales applied once) and the unit accessors of the prefill body,
    /// [`super::quant::declare`].
    Quant(QuantType),
}

impl WeightKind {
    /// The kind a kernel uses for weights of `dtype` on this adapter.
    pub fn for_dtype(ctx: &GpuContext, dtype: DType) -> WeightKind {
        match dtype {
            DType::F32 | DType::U32 => WeightKind::F32,
            DType::F16 if ctx.has_f16() => WeightKind::F16,
            DType::F16 => WeightKind::F16Packed,
        }
    }

    /// The kind's name in errors, bench rows and the kernel choice (`f32`, `f16`, `f16packed`,
    /// `f32wide`, `f16wide`).
    pub fn name(self) -> &'static str {
        match self {
            WeightKind::F32 => "f32",
            WeightKind::F16 => "f16",
            WeightKind::F16Packed => "f16packed",
            WeightKind::F32Wide => "f32wide",
            WeightKind::F16Wide => "f16wide",
            WeightKind::F16Wide16 => "f16wide16",
            WeightKind::Quant(q) => q.name(),
        }
    }

    /// Whether the kind needs SHADER_INT64 (the wide kinds).
    pub fn needs_int64(self) -> bool {
        matches!(self, WeightKind::F32Wide | WeightKind::F16Wide | WeightKind::F16Wide16)
    }

    /// The kind to read rows of `k` elements with: a wide kind needs K % 8 == 0 and falls back to
    /// its 4-element sibling (f32, packed f16) otherwise.
    pub fn for_k(self, k: usize) -> WeightKind {
        match self {
            WeightKind::F32Wide if !k.is_multiple_of(8) => WeightKind::F32,
            WeightKind::F16Wide if !k.is_multiple_of(8) => WeightKind::F16Packed,
            WeightKind::F16Wide16 if !k.is_multiple_of(16) => WeightKind::F16Wide.for_k(k),
            other => other,
        }
    }

    /// How many elements a kernel walks per step of K with this kind for rows of `k` elements:
    /// 32 (quantised kinds, one unit), 16 ([`WeightKind::F16Wide16`]), 8 (the other wide kinds),
    /// 4 (K % 4 == 0) or 1.
    pub fn step(self, k: usize) -> usize {
        match self.for_k(k) {
            WeightKind::Quant(_) => 32,
            WeightKind::F16Wide16 => 16,
            WeightKind::F32Wide | WeightKind::F16Wide => 8,
            _ if k.is_multiple_of(4) => 4,
            _ => 1,
        }
    }

    /// The kind that reads f32 activations (x) alongside weights read as `self`: wide when the
    /// weights are wide, so that a step of K loads both with one access each; plain f32 for the
    /// quantised kinds (a unit's x is eight `x_4` loads).
    pub fn activations(self) -> WeightKind {
        if self.needs_int64() { WeightKind::F32Wide } else { WeightKind::F32 }
    }

    /// The kind that reads f32 activations (x) alongside weights read as `self` on `ctx`:
    /// [`WeightKind::activations`], except that quantised weights read x eight values per load
    /// (`F32Wide`) where the adapter has SHADER_INT64 (a unit's x loads are most of a quantised
    /// product's loads).
    pub fn activations_on(self, ctx: &GpuContext) -> WeightKind {
        match self {
            WeightKind::Quant(_) if ctx.has_int64() => WeightKind::F32Wide,
            other => other.activations(),
        }
    }

    /// The dtype of the weights this kind reads (u32 words for the quantised kinds).
    pub fn dtype(self) -> DType {
        match self {
            WeightKind::F32 | WeightKind::F32Wide => DType::F32,
            WeightKind::F16 | WeightKind::F16Packed | WeightKind::F16Wide | WeightKind::F16Wide16 => DType::F16,
            WeightKind::Quant(_) => DType::U32,
        }
    }

    /// WGSL declaring read-only storage `var_name` at `binding` with two accessors:
    /// `{var_name}_4(i) -> vec4<f32>` (the i-th group of 4 elements) and
    /// `{var_name}_1(i) -> f32` (the i-th element); the wide kinds add
    /// `{var_name}_8(i) -> array<vec4<f32>, 2>` (the i-th group of 8 elements).
    pub fn declare(self, binding: u32, var_name: &str) -> String {
        self.declare_in(binding, var_name, None)
    }

    /// Bytes of the uniform binding that holds a vector of `k` f32 values read as this kind
    /// ([`WeightKind::declare_uniform`]): `⌈k/4⌉` vec4 for `F32`, `k/8` `vec4<u64>` for
    /// `F32Wide` (K % 8 == 0); `None` for the other kinds, which are never activations. At most
    /// the f32 tensor's own padded size, so the binding stays inside its buffer.
    pub fn uniform_bytes(self, k: usize) -> Option<u64> {
        match self {
            WeightKind::F32 => Some(k.div_ceil(4) as u64 * 16),
            WeightKind::F32Wide if k.is_multiple_of(8) => Some(k as u64 * 4),
            _ => None,
        }
    }

    /// [`WeightKind::declare`] of a vector of `k` f32 values as a uniform binding
    /// (`var<uniform> {var_name}: array<.., n>`, [`WeightKind::uniform_bytes`] bytes) with the
    /// same accessors. On lavapipe a load from it inside a loop is a branchless gather, where
    /// a storage load is a per-lane loop with a bounds branch per component (see `matvec`);
    /// `None` where [`WeightKind::uniform_bytes`] is.
    pub fn declare_uniform(self, binding: u32, var_name: &str, k: usize) -> Option<String> {
        let elems = self.uniform_bytes(k)? / if self == WeightKind::F32Wide { 32 } else { 16 };
        Some(self.declare_in(binding, var_name, Some(elems)))
    }

    /// The declaration of `var_name` as read-only storage (`uniform_len` `None`), or as a
    /// uniform array of `uniform_len` elements, with the accessors of [`WeightKind::declare`].
    fn declare_in(self, binding: u32, var_name: &str, uniform_len: Option<u64>) -> String {
        let v = var_name;
        let head = |elem: &str| match uniform_len {
            None => format!("@group(0) @binding({binding}) var<storage, read> {v}: array<{elem}>;\n"),
            Some(n) => format!("@group(0) @binding({binding}) var<uniform> {v}: array<{elem}, {n}>;\n"),
        };
        match self {
            WeightKind::F32 => format!(
                "{}\
                 fn {v}_4(i: u32) -> vec4<f32> {{ return {v}[i]; }}\n\
                 fn {v}_1(i: u32) -> f32 {{ return {v}[i >> 2u][i & 3u]; }}\n",
                head("vec4<f32>")
            ),
            WeightKind::F16 => format!(
                "{}\
                 fn {v}_4(i: u32) -> vec4<f32> {{ return vec4<f32>({v}[i]); }}\n\
                 fn {v}_1(i: u32) -> f32 {{ return f32({v}[i >> 2u][i & 3u]); }}\n",
                head("vec4<f16>")
            ),
            WeightKind::F16Packed => format!(
                "{}\
                 fn {v}_4(i: u32) -> vec4<f32> {{ let p = {v}[i]; return vec4<f32>(unpack2x16float(p.x), unpack2x16float(p.y)); }}\n\
                 fn {v}_1(i: u32) -> f32 {{ let p = {v}[i >> 2u]; let w = select(p.x, p.y, (i & 2u) != 0u); \
                 return unpack2x16float(w)[i & 1u]; }}\n",
                head("vec2<u32>")
            ),
            WeightKind::F32Wide => format!(
                "{}\
                 fn {v}_f32x2(a: u64) -> vec2<f32> {{ return bitcast<vec2<f32>>(vec2<u32>(u32(a), u32(a >> 32u))); }}\n\
                 fn {v}_8(i: u32) -> array<vec4<f32>, 2> {{ let a = {v}[i]; \
                 return array(vec4<f32>({v}_f32x2(a.x), {v}_f32x2(a.y)), vec4<f32>({v}_f32x2(a.z), {v}_f32x2(a.w))); }}\n\
                 fn {v}_4(i: u32) -> vec4<f32> {{ let a = {v}[i >> 1u]; let h = select(a.xy, a.zw, (i & 1u) != 0u); \
                 return vec4<f32>({v}_f32x2(h.x), {v}_f32x2(h.y)); }}\n\
                 fn {v}_1(i: u32) -> f32 {{ let a = {v}[i >> 3u][(i >> 1u) & 3u]; return bitcast<f32>(u32(a >> (32u * (i & 1u)))); }}\n",
                head("vec4<u64>")
            ),
            WeightKind::F16Wide => format!(
                "{}\
                 fn {v}_f16x4(a: u64) -> vec4<f32> {{ return vec4<f32>(unpack2x16float(u32(a)), unpack2x16float(u32(a >> 32u))); }}\n\
                 fn {v}_8(i: u32) -> array<vec4<f32>, 2> {{ let a = {v}[i]; return array({v}_f16x4(a.x), {v}_f16x4(a.y)); }}\n\
                 fn {v}_4(i: u32) -> vec4<f32> {{ return {v}_f16x4({v}[i >> 1u][i & 1u]); }}\n\
                 fn {v}_1(i: u32) -> f32 {{ let a = {v}[i >> 3u][(i >> 2u) & 1u]; \
                 return unpack2x16float(u32(a >> (32u * ((i >> 1u) & 1u))))[i & 1u]; }}\n",
                head("vec2<u64>")
            ),
            WeightKind::F16Wide16 => format!(
                "{}\
                 fn {v}_f16x4(a: u64) -> vec4<f32> {{ return vec4<f32>(unpack2x16float(u32(a)), unpack2x16float(u32(a >> 32u))); }}\n\
                 fn {v}_16(i: u32) -> array<vec4<f32>, 4> {{ let a = {v}[i]; \
                 return array({v}_f16x4(a.x), {v}_f16x4(a.y), {v}_f16x4(a.z), {v}_f16x4(a.w)); }}\n\
                 fn {v}_8(i: u32) -> array<vec4<f32>, 2> {{ let a = {v}[i >> 1u]; let h = select(a.xy, a.zw, (i & 1u) != 0u); \
                 return array({v}_f16x4(h.x), {v}_f16x4(h.y)); }}\n\
                 fn {v}_4(i: u32) -> vec4<f32> {{ return {v}_f16x4({v}[i >> 2u][i & 3u]); }}\n\
                 fn {v}_1(i: u32) -> f32 {{ let a = {v}[i >> 4u][(i >> 2u) & 3u]; \
                 return unpack2x16float(u32(a >> (32u * ((i >> 1u) & 1u))))[i & 1u]; }}\n",
                head("vec4<u64>")
            ),
            WeightKind::Quant(q) => super::quant::declare(q, binding, v),
        }
    }
}

/// One concrete shader: a source, an entry point and the values of its placeholders.
#[derive(Debug, Clone)]
pub struct ShaderVariant {
    /// The kernel family (the file stem in `shaders/`).
    pub family: &'static str,
    /// The WGSL text with its `{{NAME}}` placeholders.
    pub source: &'static str,
    /// The entry point.
    pub entry: &'static str,
    /// `{{NAME}}` -> value.
    pub defines: Vec<(&'static str, String)>,
    /// Prepend `enable f16;`.
    pub f16: bool,
}

impl ShaderVariant {
    /// The variant of `source`'s `entry` with no placeholder filled in yet.
    pub fn new(family: &'static str, source: &'static str, entry: &'static str) -> Self {
        ShaderVariant { family, source, entry, defines: Vec::new(), f16: false }
    }

    /// Fill the placeholder `{{name}}` with `value`.
    pub fn define(mut self, name: &'static str, value: impl ToString) -> Self {
        self.defines.push((name, value.to_string()));
        self
    }

    /// Declare a weight binding named `var_name` for `kind` under the placeholder `placeholder`.
    pub fn weights(mut self, placeholder: &'static str, kind: WeightKind, binding: u32, var_name: &str) -> Self {
        self.defines.push((placeholder, kind.declare(binding, var_name)));
        self.f16 |= kind == WeightKind::F16;
        self
    }

    /// The pipeline-cache key: family, entry point, every define and the f16 flag.
    pub fn key(&self) -> String {
        let mut key = format!("{}::{}", self.family, self.entry);
        for (k, v) in &self.defines {
            key.push_str(&format!("|{k}={v}"));
        }
        if self.f16 {
            key.push_str("|f16");
        }
        key
    }

    /// The WGSL text with every placeholder filled in.
    ///
    /// # Errors
    /// [`GpuError::Device`] naming the first placeholder left without a value (a kernel bug).
    pub fn expand(&self) -> Result<String, GpuError> {
        let mut text = String::new();
        if self.f16 {
            text.push_str("enable f16;\n");
        }
        text.push_str(self.source);
        for (k, v) in &self.defines {
            text = text.replace(&format!("{{{{{k}}}}}"), v);
        }
        if let Some(start) = text.find("{{") {
            let end = text[start..].find("}}").map_or(text.len(), |e| start + e + 2);
            return Err(GpuError::Device(format!("shader {}: placeholder {} has no value", self.family, &text[start..end])));
        }
        Ok(text)
    }
}

/// A compute pipeline and the layout of its bind group 0.
#[derive(Debug)]
pub struct Pipeline {
    /// The compiled pipeline.
    pub pipeline: wgpu::ComputePipeline,
    /// Layout of bind group 0, derived from the shader.
    pub layout: wgpu::BindGroupLayout,
    /// The variant's [`ShaderVariant::key`].
    pub key: String,
    /// The kernel family (the file stem in `shaders/`).
    pub family: &'static str,
    /// Set once [`GpuContext::warm_up`](super::GpuContext::warm_up) has dispatched it.
    warm: AtomicBool,
    /// The expanded WGSL and its entry point, for the compile helper
    /// ([`super::compile_helper`]), which builds the same pipeline on its own device.
    pub(super) source: String,
    /// See `source`.
    pub(super) entry: &'static str,
    /// Bytes bound at each binding (0, 1, ..) by the first dispatch built on the pipeline
    /// ([`super::Dispatch::new`]); the compile helper binds buffers of these sizes (at most
    /// [`super::compile_helper::MAX_BINDING_BYTES`]).
    pub(super) binding_sizes: OnceLock<Vec<u64>>,
}

impl Pipeline {
    /// True once [`GpuContext::warm_up`](super::GpuContext::warm_up) has dispatched this
    /// pipeline (so that the driver has compiled it).
    pub fn is_warm(&self) -> bool {
        self.warm.load(Ordering::Relaxed)
    }

    /// Record that the pipeline has been dispatched.
    pub(super) fn mark_warm(&self) {
        self.warm.store(true, Ordering::Relaxed);
    }
}

/// The compute pipeline of entry point `entry` of the WGSL `source` on `device`, its bind group
/// layout derived from the shader, labelled `family` (the module) and `key` (the pipeline).
/// Validation errors go to the device's error scope, which the caller opens and reads.
pub(super) fn create_compute_pipeline(device: &wgpu::Device, family: &str, key: &str, source: &str, entry: &str) -> wgpu::ComputePipeline {
    let module =
        device.create_shader_module(wgpu::ShaderModuleDescriptor { label: Some(family), source: wgpu::ShaderSource::Wgsl(source.into()) });
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(key),
        layout: None,
        module: &module,
        entry_point: Some(entry),
        compilation_options: wgpu::PipelineCompilationOptions::default(),
        cache: None,
    })
}

/// Pipelines by variant key; created once per process.
#[derive(Default)]
pub struct PipelineCache {
    pipelines: Mutex<HashMap<String, Arc<Pipeline>>>,
}

impl PipelineCache {
    /// Pipelines built so far.
    pub fn len(&self) -> usize {
        self.pipelines.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// True before the first pipeline is built.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pipelines built so far that [`GpuContext::warm_up`] has not dispatched: those the driver
    /// may still compile at their first real dispatch.
    pub fn cold_len(&self) -> usize {
        self.pipelines.lock().map(|p| p.values().filter(|p| !p.is_warm()).count()).unwrap_or(0)
    }
}

impl GpuContext {
    /// The pipeline of `variant`, compiled on first use. A WGSL error is returned, not raised.
    ///
    /// # Errors
    /// [`GpuError::Device`] when a placeholder has no value or WGSL validation fails.
    pub fn pipeline(&self, variant: &ShaderVariant) -> Result<Arc<Pipeline>, GpuError> {
        let key = variant.key();
        if let Some(p) = self.pipelines.pipelines.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(p.clone());
        }
        let text = variant.expand()?;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let pipeline = create_compute_pipeline(&self.device, variant.family, &key, &text, variant.entry);
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Device(format!("building pipeline {key}: {err}")));
        }
        let layout = pipeline.get_bind_group_layout(0);
        let p = Arc::new(Pipeline {
            pipeline,
            layout,
            key: key.clone(),
            family: variant.family,
            warm: AtomicBool::new(false),
            source: text,
            entry: variant.entry,
            binding_sizes: OnceLock::new(),
        });
        log::debug!("pipeline built: {key}");
        self.pipelines.pipelines.lock().unwrap_or_else(|p| p.into_inner()).insert(key, p.clone());
        Ok(p)
    }
}
