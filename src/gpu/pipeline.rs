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
use std::sync::{Arc, Mutex};

use super::{DType, GpuContext, GpuError};

/// How a kernel reads a weight matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightKind {
    /// `array<vec4<f32>>`.
    F32,
    /// `array<vec4<f16>>` through SHADER_F16.
    F16,
    /// f16 pairs in `array<vec2<u32>>`, unpacked with `unpack2x16float` (no SHADER_F16 needed).
    F16Packed,
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

    /// The kind's name in errors, bench rows and the kernel choice (`f32`, `f16`, `f16packed`).
    pub fn name(self) -> &'static str {
        match self {
            WeightKind::F32 => "f32",
            WeightKind::F16 => "f16",
            WeightKind::F16Packed => "f16packed",
        }
    }

    /// The dtype of the weights this kind reads.
    pub fn dtype(self) -> DType {
        match self {
            WeightKind::F32 => DType::F32,
            WeightKind::F16 | WeightKind::F16Packed => DType::F16,
        }
    }

    /// WGSL declaring read-only storage `var_name` at `binding` with two accessors:
    /// `{var_name}_4(i) -> vec4<f32>` (the i-th group of 4 elements) and
    /// `{var_name}_1(i) -> f32` (the i-th element).
    pub fn declare(self, binding: u32, var_name: &str) -> String {
        let v = var_name;
        match self {
            WeightKind::F32 => format!(
                "@group(0) @binding({binding}) var<storage, read> {v}: array<vec4<f32>>;\n\
                 fn {v}_4(i: u32) -> vec4<f32> {{ return {v}[i]; }}\n\
                 fn {v}_1(i: u32) -> f32 {{ return {v}[i >> 2u][i & 3u]; }}\n"
            ),
            WeightKind::F16 => format!(
                "@group(0) @binding({binding}) var<storage, read> {v}: array<vec4<f16>>;\n\
                 fn {v}_4(i: u32) -> vec4<f32> {{ return vec4<f32>({v}[i]); }}\n\
                 fn {v}_1(i: u32) -> f32 {{ return f32({v}[i >> 2u][i & 3u]); }}\n"
            ),
            WeightKind::F16Packed => format!(
                "@group(0) @binding({binding}) var<storage, read> {v}: array<vec2<u32>>;\n\
                 fn {v}_4(i: u32) -> vec4<f32> {{ let p = {v}[i]; return vec4<f32>(unpack2x16float(p.x), unpack2x16float(p.y)); }}\n\
                 fn {v}_1(i: u32) -> f32 {{ let p = {v}[i >> 2u]; let w = select(p.x, p.y, (i & 2u) != 0u); \
                 return unpack2x16float(w)[i & 1u]; }}\n"
            ),
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
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(variant.family),
            source: wgpu::ShaderSource::Wgsl(text.into()),
        });
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&key),
            layout: None,
            module: &module,
            entry_point: Some(variant.entry),
            compilation_options: wgpu::PipelineCompilationOptions::default(),
            cache: None,
        });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Device(format!("building pipeline {key}: {err}")));
        }
        let layout = pipeline.get_bind_group_layout(0);
        let p = Arc::new(Pipeline { pipeline, layout, key: key.clone(), family: variant.family, warm: AtomicBool::new(false) });
        log::debug!("pipeline built: {key}");
        self.pipelines.pipelines.lock().unwrap_or_else(|p| p.into_inner()).insert(key, p.clone());
        Ok(p)
    }
}
