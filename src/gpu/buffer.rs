//! Typed GPU buffers: an element type and a shape over a `wgpu::Buffer`, with upload and readback.

use half::f16;
use wgpu::util::DeviceExt;

use super::{GpuContext, GpuError};

/// Element type of a GPU tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE single floats (4 bytes).
    F32,
    /// IEEE half floats, two to a 32-bit word (read as `f16` or through `unpack2x16float`).
    F16,
    /// Unsigned 32-bit integers (token ids, packed results).
    U32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 => 2,
        }
    }

    /// The float type called `s` (`f32` or `f16`), as the CLI and benches spell it.
    pub fn parse(s: &str) -> Option<DType> {
        match s {
            "f32" => Some(DType::F32),
            "f16" => Some(DType::F16),
            _ => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::U32 => "u32",
        })
    }
}

/// Buffers are padded to 16 bytes so that vec4 loads of the last element stay in bounds.
fn padded_size(bytes: usize) -> u64 {
    (bytes.max(16).div_ceil(16) * 16) as u64
}

/// Bytes of `shape` elements of `dtype`, `None` when the count overflows.
pub fn checked_bytes(dtype: DType, shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
}

/// Bytes after the elements of a [`GpuTensor::zeros_bound`] tensor (an activation): a uniform
/// binding of this size starting at any of its rows stays inside the buffer. 64 KiB: lavapipe's
/// `max_uniform_buffer_binding_size` and WebGPU's default limit. It costs 64 KiB per activation
/// buffer, a few MiB per model.
pub const UNIFORM_WINDOW_BYTES: u64 = 65536;

/// Every tensor is storage, copyable, and bindable as a uniform: the decode GEMV binds its input
/// vector as a uniform (`kernels::matvec::uniform_x_bytes`).
const STORAGE_USAGE: wgpu::BufferUsages =
    wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_SRC).union(wgpu::BufferUsages::COPY_DST).union(wgpu::BufferUsages::UNIFORM);

/// Checks that `shape` elements of `dtype` fit one storage binding (`ctx.max_binding`, the
/// adapter's `max_storage_buffer_binding_size`), with checked arithmetic, before anything is
/// allocated; `label` names the tensor in the error.
///
/// # Errors
/// [`GpuError::BufferTooLarge`] with the bytes needed (`None` when they overflow) and the limit.
pub fn check_binding(ctx: &GpuContext, label: &str, dtype: DType, shape: &[usize]) -> Result<(), GpuError> {
    let needed = checked_bytes(dtype, shape).map(|b| b as u64);
    if needed.is_none_or(|b| b > ctx.max_binding) {
        return Err(GpuError::BufferTooLarge {
            label: label.to_string(),
            needed,
            limit: ctx.max_binding,
            limit_name: "max_storage_buffer_binding_size",
        });
    }
    Ok(())
}

/// A storage buffer holding `shape` elements of `dtype`, row-major.
#[derive(Debug, Clone)]
pub struct GpuTensor {
    /// The storage buffer (STORAGE | COPY_SRC | COPY_DST), padded to a multiple of 16 bytes.
    pub buffer: wgpu::Buffer,
    /// Element type.
    pub dtype: DType,
    /// Shape in elements, row-major (e.g. `[T, d_model]`).
    pub shape: Vec<usize>,
    /// Name in errors and GPU debuggers.
    pub label: String,
    /// Counts this buffer's bytes in the context's `GpuMemory` while any clone is alive.
    _held: std::sync::Arc<super::MemoryHold>,
}

impl GpuTensor {
    /// Elements: the product of the shape.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the elements (without padding).
    pub fn byte_len(&self) -> usize {
        self.numel() * self.dtype.size()
    }

    /// The padded size of `shape` elements of `dtype` plus `slack` bytes, checked against
    /// `max_buffer_size` (with checked arithmetic: a shape whose byte count overflows is too
    /// large, not 0 bytes).
    fn check_size(ctx: &GpuContext, label: &str, dtype: DType, shape: &[usize], slack: u64) -> Result<u64, GpuError> {
        let limit = ctx.limits.max_buffer_size;
        let too_large = |needed| GpuError::BufferTooLarge { label: label.to_string(), needed, limit, limit_name: "max_buffer_size" };
        let bytes = checked_bytes(dtype, shape).filter(|&b| b <= usize::MAX - 32).ok_or_else(|| too_large(None))?;
        let size = padded_size(bytes).checked_add(slack);
        match size {
            Some(size) if size <= limit => Ok(size),
            _ => Err(too_large(size)),
        }
    }

    /// A zero-filled tensor.
    ///
    /// # Errors
    /// [`GpuError::BufferTooLarge`] beyond the adapter's `max_buffer_size` (or when the byte
    /// count of `shape` overflows).
    pub fn zeros(ctx: &GpuContext, label: &str, dtype: DType, shape: &[usize]) -> Result<GpuTensor, GpuError> {
        Self::zeros_with_slack(ctx, label, dtype, shape, 0)
    }

    /// A zero-filled tensor that kernels bind whole (activations, KV cache, logits): its size is
    /// also checked against the device's storage-binding limit (`ctx.max_binding`) before the
    /// buffer is created, so that an oversized binding is an error here and not a wgpu
    /// validation error when a dispatch is built.
    ///
    /// # Errors
    /// [`GpuError::BufferTooLarge`] beyond `max_storage_buffer_binding_size` or `max_buffer_size`.
    ///
    /// The buffer holds [`UNIFORM_WINDOW_BYTES`] more bytes past the last element, so that a
    /// uniform binding of that fixed size can start at any row (the prefill product's windows of
    /// x, `kernels::matmul::matmul_xbcast`).
    pub fn zeros_bound(ctx: &GpuContext, label: &str, dtype: DType, shape: &[usize]) -> Result<GpuTensor, GpuError> {
        check_binding(ctx, label, dtype, shape)?;
        Self::zeros_with_slack(ctx, label, dtype, shape, UNIFORM_WINDOW_BYTES)
    }

    /// [`GpuTensor::zeros`] with `slack` zero bytes after the padded elements.
    fn zeros_with_slack(ctx: &GpuContext, label: &str, dtype: DType, shape: &[usize], slack: u64) -> Result<GpuTensor, GpuError> {
        let bytes = Self::check_size(ctx, label, dtype, shape, slack)?;
        let buffer = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage: STORAGE_USAGE,
            mapped_at_creation: false,
        });
        let _held = ctx.memory.hold(bytes);
        Ok(GpuTensor { buffer, dtype, shape: shape.to_vec(), label: label.to_string(), _held })
    }

    fn from_bytes(ctx: &GpuContext, label: &str, dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<GpuTensor, GpuError> {
        debug_assert_eq!(bytes.len(), shape.iter().product::<usize>() * dtype.size());
        let size = Self::check_size(ctx, label, dtype, shape, 0)?;
        let buffer = if size as usize == bytes.len() {
            ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some(label), contents: bytes, usage: STORAGE_USAGE })
        } else {
            let mut padded = bytes.to_vec();
            padded.resize(size as usize, 0);
            ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some(label), contents: &padded, usage: STORAGE_USAGE })
        };
        let _held = ctx.memory.hold(size);
        Ok(GpuTensor { buffer, dtype, shape: shape.to_vec(), label: label.to_string(), _held })
    }

    /// Upload f32 values (`data.len()` must equal the shape's product).
    ///
    /// # Errors
    /// [`GpuError::BufferTooLarge`] beyond the adapter's `max_buffer_size`.
    pub fn from_f32(ctx: &GpuContext, label: &str, shape: &[usize], data: &[f32]) -> Result<GpuTensor, GpuError> {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "{label}: shape {shape:?} vs {} values", data.len());
        Self::from_bytes(ctx, label, DType::F32, shape, bytemuck::cast_slice(data))
    }

    /// Upload f16 values (`data.len()` must equal the shape's product).
    ///
    /// # Errors
    /// [`GpuError::BufferTooLarge`] beyond the adapter's `max_buffer_size`.
    pub fn from_f16(ctx: &GpuContext, label: &str, shape: &[usize], data: &[f16]) -> Result<GpuTensor, GpuError> {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "{label}: shape {shape:?} vs {} values", data.len());
        Self::from_bytes(ctx, label, DType::F16, shape, bytemuck::cast_slice(data))
    }

    /// Upload u32 values (`data.len()` must equal the shape's product).
    ///
    /// # Errors
    /// [`GpuError::BufferTooLarge`] beyond the adapter's `max_buffer_size`.
    pub fn from_u32(ctx: &GpuContext, label: &str, shape: &[usize], data: &[u32]) -> Result<GpuTensor, GpuError> {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "{label}: shape {shape:?} vs {} values", data.len());
        Self::from_bytes(ctx, label, DType::U32, shape, bytemuck::cast_slice(data))
    }

    /// Upload f32 values converted to `dtype` (F32 or F16).
    pub fn from_f32_as(ctx: &GpuContext, label: &str, shape: &[usize], data: &[f32], dtype: DType) -> Result<GpuTensor, GpuError> {
        match dtype {
            DType::F32 => Self::from_f32(ctx, label, shape, data),
            DType::F16 => {
                let h: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
                Self::from_f16(ctx, label, shape, &h)
            }
            DType::U32 => panic!("{label}: cannot convert f32 data to u32"),
        }
    }

    /// Overwrite the start of the buffer with `data` (queued; visible to the next submission).
    pub fn write_f32(&self, ctx: &GpuContext, data: &[f32]) {
        ctx.queue.write_buffer(&self.buffer, 0, bytemuck::cast_slice(data));
    }

    /// Overwrite the start of the buffer with u32 `data` (queued; visible to the next submission).
    pub fn write_u32(&self, ctx: &GpuContext, data: &[u32]) {
        ctx.queue.write_buffer(&self.buffer, 0, bytemuck::cast_slice(data));
    }

    /// Copy `bytes` bytes from the start of the buffer back to the CPU (blocking).
    pub fn read_bytes(&self, ctx: &GpuContext, bytes: usize) -> Result<Vec<u8>, GpuError> {
        read_buffer(ctx, &self.buffer, 0, bytes, &self.label)
    }

    /// Read every element back as f32 (f16 widened, u32 converted), blocking.
    ///
    /// # Errors
    /// [`GpuError::Readback`] when mapping fails, or a device error reported meanwhile.
    pub fn read_f32(&self, ctx: &GpuContext) -> Result<Vec<f32>, GpuError> {
        match self.dtype {
            DType::F32 => Ok(bytemuck::pod_collect_to_vec(&self.read_bytes(ctx, self.byte_len())?)),
            DType::F16 => {
                let raw = self.read_bytes(ctx, self.byte_len().div_ceil(4) * 4)?;
                let h: Vec<f16> = bytemuck::pod_collect_to_vec(&raw);
                Ok(h[..self.numel()].iter().map(|v| v.to_f32()).collect())
            }
            DType::U32 => Ok(self.read_u32(ctx)?.into_iter().map(|v| v as f32).collect()),
        }
    }

    /// Read every element back as u32 words, blocking.
    ///
    /// # Errors
    /// [`GpuError::Readback`] when mapping fails, or a device error reported meanwhile.
    pub fn read_u32(&self, ctx: &GpuContext) -> Result<Vec<u32>, GpuError> {
        Ok(bytemuck::pod_collect_to_vec(&self.read_bytes(ctx, self.numel() * 4)?))
    }
}

/// Read `len` bytes at `offset` of `buffer` (which must have COPY_SRC) back to the CPU.
pub fn read_buffer(ctx: &GpuContext, buffer: &wgpu::Buffer, offset: u64, len: usize, label: &str) -> Result<Vec<u8>, GpuError> {
    let size = (len.max(4).div_ceil(4) * 4) as u64;
    let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("readback") });
    encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, size);
    ctx.queue.submit([encoder.finish()]);
    map_and_read(ctx, &staging, len, label)
}

/// Map a MAP_READ buffer (after its copy was submitted), wait, and copy `len` bytes out.
pub fn map_and_read(ctx: &GpuContext, staging: &wgpu::Buffer, len: usize, label: &str) -> Result<Vec<u8>, GpuError> {
    let (tx, rx) = std::sync::mpsc::channel();
    staging.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r);
    });
    ctx.wait()?;
    rx.recv()
        .map_err(|e| GpuError::Readback { label: label.to_string(), message: e.to_string() })?
        .map_err(|e| GpuError::Readback { label: label.to_string(), message: e.to_string() })?;
    let out = {
        let view = staging.get_mapped_range(..).map_err(|e| GpuError::Readback { label: label.to_string(), message: e.to_string() })?;
        view[..len].to_vec()
    };
    staging.unmap();
    Ok(out)
}

/// A small uniform buffer holding one `#[repr(C)]` parameter struct.
pub fn uniform<T: bytemuck::Pod>(ctx: &GpuContext, label: &str, value: &T) -> wgpu::Buffer {
    ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: bytemuck::bytes_of(value),
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
    })
}
