//! Argument checks that several kernels share. Every failure is a [`GpuError::InvalidArgument`]
//! whose text starts with the dispatch label (which names the op, e.g. `decode/layer.3/attn.o`)
//! and then says what is wrong.

use std::fmt::Display;

use crate::gpu::{DType, GpuContext, GpuError, GpuTensor, WeightKind};

/// The argument error of the op `label`: `"{label}: {problem}"`.
pub(crate) fn invalid(label: &str, problem: impl Display) -> GpuError {
    GpuError::InvalidArgument(format!("{label}: {problem}"))
}

/// `t` (the operand called `what`) must be f32 with at least `min_numel` elements.
pub(crate) fn check_f32(label: &str, t: &GpuTensor, min_numel: usize, what: &str) -> Result<(), GpuError> {
    if t.dtype != DType::F32 || t.numel() < min_numel {
        return Err(invalid(label, format!("{what} ({}) needs at least {min_numel} f32 values, has {} {}", t.label, t.numel(), t.dtype)));
    }
    Ok(())
}

/// At least one row: a kernel over zero rows would write nothing and hide a caller's mistake.
pub(crate) fn check_rows(label: &str, rows: usize) -> Result<(), GpuError> {
    if rows == 0 {
        return Err(invalid(label, "rows must be at least 1"));
    }
    Ok(())
}

/// `n` (an element count or index bound called `what`) must fit the kernels' u32 indexing.
pub(crate) fn check_u32(label: &str, n: usize, what: &str) -> Result<(), GpuError> {
    if n > u32::MAX as usize {
        return Err(invalid(label, format!("{what} ({n}) is too large for 32-bit indexing")));
    }
    Ok(())
}

/// Rows of a KV cache `[max_pos, kv_dim]` f32 (the operand called `what`), from its element
/// count; it must be f32, non-empty and a whole number of rows.
pub(crate) fn cache_rows(label: &str, cache: &GpuTensor, kv_dim: usize, what: &str) -> Result<usize, GpuError> {
    if cache.dtype != DType::F32 || cache.numel() == 0 || !cache.numel().is_multiple_of(kv_dim) {
        return Err(invalid(
            label,
            format!("{what} ({}): expected [max_pos, {kv_dim}] f32, got {:?} {}", cache.label, cache.shape, cache.dtype),
        ));
    }
    Ok(cache.numel() / kv_dim)
}

/// A kernel can read weights of `dtype` as `kind`, and the adapter supports `kind`.
pub(crate) fn check_weight_kind(ctx: &GpuContext, label: &str, kind: WeightKind, dtype: DType) -> Result<(), GpuError> {
    if kind.dtype() != dtype {
        return Err(invalid(label, format!("weight kind {} cannot read {dtype} weights", kind.name())));
    }
    if kind == WeightKind::F16 && !ctx.has_f16() {
        return Err(invalid(label, "WeightKind::F16 needs SHADER_F16"));
    }
    if kind.needs_int64() && !ctx.has_int64() {
        return Err(invalid(label, format!("WeightKind::{} needs SHADER_INT64", kind.name())));
    }
    Ok(())
}
