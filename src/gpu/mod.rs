//! The GPU context: instance, adapter choice, device with the adapter's own limits, the optional
//! features firstrt can use, a pipeline cache and the error sink.
//!
//! Every other module reaches the GPU through an `Arc<GpuContext>`.

pub mod buffer;
pub mod compile_helper;
pub mod dispatch;
pub mod matrix;
pub mod notice;
pub mod pipeline;
pub mod quant;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

pub use buffer::{DType, GpuTensor};
pub use compile_helper::CompileHelperCounts;
pub use dispatch::{Cost, Dispatch, Phase, Tag};
pub use matrix::{GpuMatrix, MatrixChunk, MatrixPart};
pub use pipeline::{PipelineCache, ShaderVariant, WeightKind};

/// Optional adapter features that firstrt uses when present and never requires.
pub const OPTIONAL_FEATURES: [(wgpu::Features, &str); 5] = [
    (wgpu::Features::SHADER_F16, "SHADER_F16"),
    (wgpu::Features::SHADER_INT64, "SHADER_INT64"),
    (wgpu::Features::SUBGROUP, "SUBGROUP"),
    (wgpu::Features::TIMESTAMP_QUERY, "TIMESTAMP_QUERY"),
    (wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES, "TIMESTAMP_QUERY_INSIDE_PASSES"),
];

/// How to install a GPU driver when none is found; used by every "no adapter" message.
pub const DRIVER_HINT: &str = "no GPU adapter found. On Debian/Ubuntu install the software Vulkan driver \
(lavapipe) with `apt-get install -y mesa-vulkan-drivers`, or install your GPU vendor's Vulkan/Metal/DX12 driver; \
`firstrt devices` lists what wgpu sees";

/// Errors of the GPU layer and of kernel preparation.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// wgpu sees no adapter for the chosen backends.
    #[error("{DRIVER_HINT} (backends tried: {backends})")]
    NoAdapter {
        /// The backends tried (wgpu's `Backends` flags).
        backends: String,
    },
    /// No adapter name contains the requested substring.
    #[error("no adapter matches {wanted:?}; available adapters: {available}")]
    AdapterNotFound {
        /// The substring asked for (`--adapter` or WGPU_ADAPTER_NAME).
        wanted: String,
        /// Names of the adapters seen, comma-separated.
        available: String,
    },
    /// `--backend` or WGPU_BACKEND names no backend.
    #[error("unknown backend {0:?}: expected one of vulkan, metal, dx12, gl")]
    UnknownBackend(String),
    /// The adapter refused to open a device.
    #[error("could not open a device on adapter {adapter}: {source}")]
    RequestDevice {
        /// The adapter's name.
        adapter: String,
        /// wgpu's reason.
        source: wgpu::RequestDeviceError,
    },
    /// An error that the device reported (validation, out of memory, lost device) or a pipeline
    /// that failed to build.
    #[error("GPU error: {0}")]
    Device(String),
    /// Mapping a buffer for read-back failed.
    #[error("reading back buffer {label}: {message}")]
    Readback {
        /// The buffer's label.
        label: String,
        /// wgpu's reason.
        message: String,
    },
    /// A tensor larger than a device limit: `max_buffer_size` for any buffer,
    /// `max_storage_buffer_binding_size` for one that a kernel binds whole.
    #[error("tensor {label} needs {} bytes in one buffer, over the device's limit of {limit} bytes ({limit_name})", byte_count(*needed))]
    BufferTooLarge {
        /// The tensor's label.
        label: String,
        /// Bytes it needs; `None` when the count overflows a u64.
        needed: Option<u64>,
        /// The device's limit in bytes.
        limit: u64,
        /// The wgpu limit's name (`max_buffer_size`, `max_storage_buffer_binding_size`).
        limit_name: &'static str,
    },
    /// A kernel was asked for shapes or sizes it does not support (or that do not match): the
    /// text starts with the op's dispatch label and says what is wrong.
    #[error("invalid kernel arguments: {0}")]
    InvalidArgument(String),
}

/// A byte count for messages: the number, or "more than 2^64" for a count that overflowed.
pub fn byte_count(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "more than 2^64".to_string(), |b| b.to_string())
}

/// What the user asked for when choosing an adapter.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// `vulkan`, `metal`, `dx12` or `gl`; falls back to WGPU_BACKEND, then all backends.
    pub backend: Option<String>,
    /// A case-insensitive substring of the adapter name; falls back to WGPU_ADAPTER_NAME.
    pub adapter: Option<String>,
    /// Pretend the adapter's max_storage_buffer_binding_size is this small (tests of split
    /// weights use it); never raises the real limit.
    pub max_binding_override: Option<u64>,
}

/// One adapter as `firstrt devices` reports it.
#[derive(Debug, Clone)]
pub struct AdapterReport {
    /// Name, backend, device type, driver.
    pub info: wgpu::AdapterInfo,
    /// The [`OPTIONAL_FEATURES`] it offers, by name.
    pub features: Vec<&'static str>,
    /// Its own limits.
    pub limits: wgpu::Limits,
}

impl std::fmt::Display for AdapterReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = &self.info;
        writeln!(f, "{}", i.name)?;
        writeln!(f, "  backend:      {:?}", i.backend)?;
        writeln!(f, "  device type:  {:?}", i.device_type)?;
        writeln!(f, "  driver:       {} {}", i.driver, i.driver_info)?;
        let feats = if self.features.is_empty() { "(none)".to_string() } else { self.features.join(", ") };
        writeln!(f, "  features:     {feats}")?;
        let l = &self.limits;
        writeln!(f, "  max_storage_buffer_binding_size:       {}", l.max_storage_buffer_binding_size)?;
        writeln!(f, "  max_uniform_buffer_binding_size:       {}", l.max_uniform_buffer_binding_size)?;
        writeln!(f, "  max_buffer_size:                       {}", l.max_buffer_size)?;
        writeln!(f, "  max_compute_workgroup_storage_size:    {}", l.max_compute_workgroup_storage_size)?;
        write!(f, "  max_compute_invocations_per_workgroup: {}", l.max_compute_invocations_per_workgroup)
    }
}

fn feature_names(features: wgpu::Features) -> Vec<&'static str> {
    OPTIONAL_FEATURES.iter().filter(|(f, _)| features.contains(*f)).map(|(_, n)| *n).collect()
}

fn parse_backends(options: &GpuOptions) -> Result<wgpu::Backends, GpuError> {
    let wanted = options.backend.clone().or_else(|| std::env::var("WGPU_BACKEND").ok());
    let Some(name) = wanted else { return Ok(wgpu::Backends::all()) };
    match name.trim().to_ascii_lowercase().as_str() {
        "vulkan" | "vk" => Ok(wgpu::Backends::VULKAN),
        "metal" | "mtl" => Ok(wgpu::Backends::METAL),
        "dx12" | "d3d12" => Ok(wgpu::Backends::DX12),
        "gl" | "gles" | "opengl" => Ok(wgpu::Backends::GL),
        _ => Err(GpuError::UnknownBackend(name)),
    }
}

fn new_instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    wgpu::Instance::new(desc)
}

/// Every adapter that wgpu sees for the chosen backends.
///
/// # Errors
/// [`GpuError::UnknownBackend`] when the backend option or WGPU_BACKEND names none.
pub fn list_adapters(options: &GpuOptions) -> Result<Vec<AdapterReport>, GpuError> {
    let backends = parse_backends(options)?;
    let instance = new_instance(backends);
    let adapters = pollster::block_on(instance.enumerate_adapters(backends));
    Ok(adapters.iter().map(|a| AdapterReport { info: a.get_info(), features: feature_names(a.features()), limits: a.limits() }).collect())
}

/// Rank adapters: a real GPU before a software one, discrete before integrated, and on a tie
/// Vulkan, Metal and DX12 before GL (which lacks SHADER_F16).
fn adapter_rank(info: &wgpu::AdapterInfo) -> (u32, u32) {
    let backend = u32::from(info.backend == wgpu::Backend::Gl);
    let device = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    (device, backend)
}

/// Errors that wgpu reports outside an error scope land here instead of panicking.
#[derive(Default)]
struct ErrorSink {
    first: Mutex<Option<String>>,
}

/// Bytes of GPU buffers created as `GpuTensor` (weights, KV caches, activations, logits) that
/// are alive now, and the most that were alive at once since the last `reset_peak`. Small
/// uniforms and read-back staging buffers are not counted.
#[derive(Debug, Default)]
pub struct GpuMemory {
    live: Arc<AtomicU64>,
    peak: Arc<AtomicU64>,
}

/// One buffer's share of `GpuMemory`, given back on drop.
#[derive(Debug)]
pub struct MemoryHold {
    bytes: u64,
    live: Arc<AtomicU64>,
}

impl Drop for MemoryHold {
    fn drop(&mut self) {
        self.live.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl GpuMemory {
    fn hold(&self, bytes: u64) -> Arc<MemoryHold> {
        let now = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
        Arc::new(MemoryHold { bytes, live: self.live.clone() })
    }

    /// Bytes held now.
    pub fn live_bytes(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    /// The most bytes held at once since the context was opened or `reset_peak` was called.
    pub fn peak_bytes(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Start a new peak from what is held now.
    pub fn reset_peak(&self) {
        self.peak.store(self.live_bytes(), Ordering::Relaxed);
    }
}

/// The device, queue and caches that every kernel uses.
pub struct GpuContext {
    /// The device every buffer and pipeline lives on.
    pub device: wgpu::Device,
    /// Its queue (submissions, buffer writes).
    pub queue: wgpu::Queue,
    /// The adapter's name, backend, device type and driver.
    pub info: wgpu::AdapterInfo,
    /// The optional features that were enabled on the device.
    pub features: wgpu::Features,
    /// The device's limits (the adapter's own).
    pub limits: wgpu::Limits,
    /// Largest storage binding a kernel may use: the adapter's limit, or a lower test override.
    pub max_binding: u64,
    /// Pipelines built so far, by variant key.
    pub pipelines: PipelineCache,
    /// Kernel variant chosen per family (e.g. "matvec" -> "matvec_rows4"), measured once per
    /// process or read from the on-disk cache; see `kernels::choice`.
    pub kernel_choices: Mutex<HashMap<&'static str, String>>,
    /// Bytes held by `GpuTensor` buffers (for `firstrt bench`'s peak GPU memory).
    pub memory: GpuMemory,
    errors: Arc<ErrorSink>,
    /// The adapter the device was opened on (the compile helper opens a second device on it).
    adapter: wgpu::Adapter,
    /// The compile helper's device, opened at the first warm-up that can use it; None where it
    /// is not used ([`GpuContext::compile_helper`]).
    helper: OnceLock<Option<compile_helper::CompileHelper>>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuContext({} on {:?})", self.info.name, self.info.backend)
    }
}

impl GpuContext {
    /// Choose an adapter as the options (and WGPU_BACKEND / WGPU_ADAPTER_NAME) say and open it.
    ///
    /// # Errors
    /// [`GpuError::UnknownBackend`], [`GpuError::NoAdapter`], [`GpuError::AdapterNotFound`] or
    /// [`GpuError::RequestDevice`].
    pub fn new(options: &GpuOptions) -> Result<Arc<GpuContext>, GpuError> {
        let backends = parse_backends(options)?;
        let instance = new_instance(backends);
        let mut adapters = pollster::block_on(instance.enumerate_adapters(backends));
        if adapters.is_empty() {
            return Err(GpuError::NoAdapter { backends: format!("{backends:?}") });
        }
        let wanted = options.adapter.clone().or_else(|| std::env::var("WGPU_ADAPTER_NAME").ok());
        if let Some(wanted) = &wanted {
            let needle = wanted.to_lowercase();
            let available = adapters.iter().map(|a| a.get_info().name).collect::<Vec<_>>().join(", ");
            adapters.retain(|a| a.get_info().name.to_lowercase().contains(&needle));
            if adapters.is_empty() {
                return Err(GpuError::AdapterNotFound { wanted: wanted.clone(), available });
            }
        }
        adapters.sort_by_key(|a| adapter_rank(&a.get_info()));
        let adapter = adapters.swap_remove(0);
        Self::open(adapter, options)
    }

    fn open(adapter: wgpu::Adapter, options: &GpuOptions) -> Result<Arc<GpuContext>, GpuError> {
        let info = adapter.get_info();
        let mut features = wgpu::Features::empty();
        for (f, _) in OPTIONAL_FEATURES {
            if adapter.features().contains(f) {
                features |= f;
            }
        }
        if std::env::var("FIRSTRT_NO_F16").is_ok_and(|v| v == "1") {
            features.remove(wgpu::Features::SHADER_F16);
        }
        // The adapter's own limits: wgpu's defaults would cap a binding at 128 MiB and a buffer at 256 MiB.
        let limits = adapter.limits();
        let desc = wgpu::DeviceDescriptor {
            label: Some("firstrt"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc))
            .map_err(|source| GpuError::RequestDevice { adapter: info.name.clone(), source })?;
        let errors = Arc::new(ErrorSink::default());
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let text = e.to_string();
            log::error!("wgpu: {text}");
            let mut first = sink.first.lock().unwrap_or_else(|p| p.into_inner());
            if first.is_none() {
                *first = Some(text);
            }
        }));
        let limit = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        let max_binding = options.max_binding_override.map_or(limit, |o| o.min(limit));
        log::info!(
            "adapter: {} ({:?}, {:?}, {} {}), features {:?}, max binding {} bytes",
            info.name,
            info.backend,
            info.device_type,
            info.driver,
            info.driver_info,
            feature_names(features),
            max_binding
        );
        Ok(Arc::new(GpuContext {
            device,
            queue,
            info,
            features,
            limits,
            max_binding,
            pipelines: PipelineCache::default(),
            kernel_choices: Mutex::new(HashMap::new()),
            memory: GpuMemory::default(),
            errors,
            adapter,
            helper: OnceLock::new(),
        }))
    }

    /// True when WGSL can use `f16` directly.
    pub fn has_f16(&self) -> bool {
        self.features.contains(wgpu::Features::SHADER_F16)
    }

    /// Whether shaders may use 64-bit integers (SHADER_INT64), which the wide weight kinds
    /// ([`WeightKind::F32Wide`], [`WeightKind::F16Wide`]) need.
    pub fn has_int64(&self) -> bool {
        self.features.contains(wgpu::Features::SHADER_INT64)
    }

    /// Whether the adapter is a CPU (lavapipe, llvmpipe, SwiftShader): kernels there take the
    /// variants measured fast on CPU SIMD lanes, and first runs compile with LLVM.
    pub fn is_cpu(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// The second device that compiles part of a warm-up's pipelines meanwhile
    /// ([`compile_helper`]): opened on first use on a CPU adapter under Vulkan with two cores or
    /// more, where the environment allows it ([`compile_helper::allowed_by_env`]); None elsewhere.
    fn compile_helper(&self) -> Option<&compile_helper::CompileHelper> {
        self.helper
            .get_or_init(|| {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                let wanted = self.is_cpu() && self.info.backend == wgpu::Backend::Vulkan && cores >= 2 && compile_helper::allowed_by_env();
                wanted.then(|| compile_helper::CompileHelper::open(&self.adapter, self.features, &self.limits)).flatten()
            })
            .as_ref()
    }

    /// What the compile helper has done for this context ([`compile_helper`]: a second device
    /// that compiles part of each warm-up's pipelines on a CPU adapter), opening it if this
    /// adapter and environment use one; None where they do not.
    pub fn compile_helper_counts(&self) -> Option<CompileHelperCounts> {
        self.compile_helper().map(compile_helper::CompileHelper::counts)
    }

    /// Whether shaders may use subgroup operations and builtins (SUBGROUP), which
    /// [`crate::kernels::matvec::MatvecVariant::Subgroup`] needs.
    pub fn has_subgroups(&self) -> bool {
        self.features.contains(wgpu::Features::SUBGROUP)
    }

    /// A key naming this adapter and driver, for on-disk caches of measured choices.
    pub fn adapter_key(&self) -> String {
        let i = &self.info;
        format!("{}|{:?}|{}|{}|f16={}", i.name, i.backend, i.driver, i.driver_info, self.has_f16())
    }

    /// Returns the first GPU error reported since the last call, if any.
    ///
    /// # Errors
    /// That error, as [`GpuError::Device`].
    pub fn take_error(&self) -> Result<(), GpuError> {
        let mut first = self.errors.first.lock().unwrap_or_else(|p| p.into_inner());
        match first.take() {
            Some(text) => Err(GpuError::Device(text)),
            None => Ok(()),
        }
    }

    /// Query sets alive on the device (wgpu's internal counter; the `counters` feature is on).
    pub fn query_sets_alive(&self) -> isize {
        self.device.get_internal_counters().hal.query_sets.read()
    }

    /// Block until all submitted work is done.
    ///
    /// # Errors
    /// [`GpuError::Device`] when polling fails or the device reported an error.
    pub fn wait(&self) -> Result<(), GpuError> {
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| GpuError::Device(format!("waiting for the GPU: {e}")))?;
        self.take_error()
    }

    /// Record `dispatches` into one compute pass, submit and wait: the simple path tests use.
    ///
    /// # Errors
    /// As [`GpuContext::wait`].
    pub fn run(&self, label: &str, dispatches: &[&Dispatch]) -> Result<(), GpuError> {
        let mut encoder = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(label), timestamp_writes: None });
            for d in dispatches {
                d.record(&mut pass);
            }
        }
        self.queue.submit([encoder.finish()]);
        self.wait()
    }
}

/// A context shared by the tests of one process, on the default adapter. Panics with the
/// driver installation hint when there is no adapter: tests must not pass without a GPU.
pub fn test_context() -> Arc<GpuContext> {
    static CTX: std::sync::OnceLock<Arc<GpuContext>> = std::sync::OnceLock::new();
    CTX.get_or_init(|| {
        let _ = env_logger::builder().is_test(true).try_init();
        match GpuContext::new(&GpuOptions::default()) {
            Ok(ctx) => ctx,
            Err(e) => panic!("{e}"),
        }
    })
    .clone()
}
