//! A second device on the context's adapter that compiles pipelines while the context's own
//! device compiles others: a first run on a CPU driver compiles on two cores instead of one.
//!
//! Why: lavapipe (Mesa's Vulkan driver on the CPU) compiles a pipeline with LLVM at its first
//! dispatch, on its queue's one thread, so a first run on a fresh machine compiled every kernel
//! one after another on one core, 20–30 s for the test model (BENCHMARKS.md, "First run on an
//! adapter"). The compiled code goes to Mesa's on-disk shader cache, which every device of the
//! process reads: once the helper's device has dispatched a pipeline, the context's device finds
//! it there (a prototype: 3.05 s to compile a matmul on one device, then 0.03 s on the other).
//! In [`GpuContext::warm_up`](super::GpuContext::warm_up) both devices take the next cold
//! pipeline from one queue (the longest WGSL first) until none is left, then the context's
//! device dispatches those the helper took. Where the cache misses (disabled, full, not written
//! yet) the context's device compiles those pipelines itself, as it did without the helper: the output is the same either
//! way, only the time differs.
//!
//! The helper is opened only on a CPU adapter under Vulkan, with two cores or more and Mesa's
//! shader cache not disabled (`MESA_SHADER_CACHE_DISABLE`); `FIRSTRT_COMPILE_HELPER=0` turns it
//! off (to measure without it).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::pipeline::{Pipeline, create_compute_pipeline};

/// The most bytes the helper binds at one binding. Storage bindings of the model are larger
/// (weights, caches), but a kernel's bind group layout asks only for one element of a
/// runtime-sized array, and every uniform of firstrt's kernels fits (the adapter's uniform limit
/// is 64 KiB on lavapipe).
pub(crate) const MAX_BINDING_BYTES: u64 = 64 * 1024;

/// The helper's device and queue (see the module docs).
pub(crate) struct CompileHelper {
    device: wgpu::Device,
    queue: wgpu::Queue,
    /// Pipelines dispatched (so compiled) by the helper so far.
    compiled: AtomicUsize,
    /// Pipelines the helper could not build or bind (left to the context's device).
    failed: AtomicUsize,
}

/// What the compile helper of a context has done ([`super::GpuContext::compile_helper_counts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompileHelperCounts {
    /// Pipelines the helper's device compiled (dispatched once) for this context.
    pub compiled: usize,
    /// Pipelines it could not build or bind, which the context's device compiled itself.
    pub failed: usize,
}

/// Whether the environment allows the helper: `FIRSTRT_COMPILE_HELPER` is not `0` and Mesa's
/// shader cache is not disabled (`MESA_SHADER_CACHE_DISABLE` true, as Mesa reads it).
pub(crate) fn allowed_by_env() -> bool {
    let off = |name: &str, values: &[&str]| std::env::var(name).is_ok_and(|v| values.contains(&v.trim().to_ascii_lowercase().as_str()));
    !off("FIRSTRT_COMPILE_HELPER", &["0", "false", "no", "off"]) && !off("MESA_SHADER_CACHE_DISABLE", &["1", "true", "yes", "y"])
}

impl CompileHelper {
    /// A second device on `adapter` with the context's `features` and `limits` (so that every
    /// pipeline the context builds builds here too); None where the adapter refuses it.
    pub(crate) fn open(adapter: &wgpu::Adapter, features: wgpu::Features, limits: &wgpu::Limits) -> Option<CompileHelper> {
        let desc = wgpu::DeviceDescriptor {
            label: Some("firstrt compile helper"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::MemoryUsage,
            trace: wgpu::Trace::Off,
        };
        match pollster::block_on(adapter.request_device(&desc)) {
            Ok((device, queue)) => {
                // An error here costs only the helper's share of a warm-up; it must not panic
                // (wgpu's default for uncaptured errors).
                device.on_uncaptured_error(Arc::new(|e: wgpu::Error| log::debug!("compile helper: {e}")));
                Some(CompileHelper { device, queue, compiled: AtomicUsize::new(0), failed: AtomicUsize::new(0) })
            }
            Err(e) => {
                log::debug!("compile helper: no second device ({e}); compiling on one");
                None
            }
        }
    }

    /// Build `job` on the helper's device from its WGSL, bind zeroed buffers of the sizes its
    /// first dispatch bound (at most [`MAX_BINDING_BYTES`]), dispatch one workgroup and wait.
    /// Every uniform is zero, so the kernel's loops run zero times and it writes nothing past its
    /// first elements: the driver's compile at the dispatch is the point. Returns whether it was
    /// dispatched; a pipeline that cannot be built or bound here is counted as failed (logged at
    /// debug level) and compiled by the context's own device as before.
    pub(crate) fn compile(&self, job: &Pipeline) -> bool {
        let done = self.try_compile(job);
        match &done {
            Ok(()) => self.compiled.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                log::debug!("compile helper: {} left to the context's device: {e}", job.key);
                self.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
        done.is_ok()
    }

    /// [`CompileHelper::compile`] without the counting: why the helper could not, if it could not.
    fn try_compile(&self, job: &Pipeline) -> Result<(), String> {
        let sizes = job.binding_sizes.get().filter(|s| s.iter().all(|&b| b > 0)).ok_or("no recorded buffer bindings")?;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let pipeline = create_compute_pipeline(&self.device, job.family, &job.key, &job.source, job.entry);
        let buffers: Vec<wgpu::Buffer> = sizes
            .iter()
            .map(|&b| {
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("compile helper"),
                    size: b.min(MAX_BINDING_BYTES).next_multiple_of(16),
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::UNIFORM,
                    mapped_at_creation: false,
                })
            })
            .collect();
        let entries: Vec<wgpu::BindGroupEntry<'_>> =
            buffers.iter().enumerate().map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32, resource: b.as_entire_binding() }).collect();
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("compile helper"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(e.to_string());
        }
        let mut encoder = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("compile helper") });
        {
            let mut pass =
                encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("compile helper"), timestamp_writes: None });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(1, 1, 1);
        }
        self.queue.submit([encoder.finish()]);
        self.device.poll(wgpu::PollType::wait_indefinitely()).map(|_| ()).map_err(|e| format!("waiting failed ({e})"))
    }

    /// What the helper has done so far.
    pub(crate) fn counts(&self) -> CompileHelperCounts {
        CompileHelperCounts { compiled: self.compiled.load(Ordering::Relaxed), failed: self.failed.load(Ordering::Relaxed) }
    }
}
