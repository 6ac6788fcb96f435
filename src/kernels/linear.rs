//! One description of a linear product, `y = x · Wᵀ` with its options, that both linear kernels
//! take: [`matmul`](crate::kernels::matmul::matmul) (prefill, many rows) and
//! [`matvec`](crate::kernels::matvec::matvec) (decode GEMV, one row). The argument checks of
//! both live in [`LinearOp::check`].
//!
//! What a new product needs is a new case here, not a new wrapper: a quantised weight format is
//! a new [`WeightKind`] (Q8_0 or Q4_K blocks decoded by the kernel's weight accessor), a
//! transposed or backward product of a weight a new [`LinearForm`] (the input gradient
//! `dX = dY · W` is [`LinearForm::XW`]).

use std::sync::Arc;

use bytemuck::Pod;

use crate::gpu::buffer::uniform;
use crate::gpu::pipeline::Pipeline;
use crate::gpu::{Cost, DType, Dispatch, GpuContext, GpuError, GpuMatrix, GpuTensor, MatrixChunk, WeightKind};
use crate::kernels::checks::{check_f32, check_weight_kind, invalid};

/// Uniform `flags` bit of both linear shaders: add into y instead of overwriting it.
pub const FLAG_ACCUMULATE: u32 = 1;
/// Uniform `flags` bit of both linear shaders: add the bias.
pub const FLAG_BIAS: u32 = 2;
/// Uniform `flags` bit of both linear shaders: multiply the product by `scale` (before bias and
/// accumulation).
pub const FLAG_SCALE: u32 = 4;

/// Which product of x and W a [`LinearOp`] computes, and so how W is laid out for it.
///
/// The forward product `x · Wᵀ` and the input gradient of the backward pass, `dX = dY · W`
/// (also LoRA's `da = s · dY · B`). LoRA's weight gradients `dA = daᵀ · x` and `dB = s · dYᵀ · a`
/// are products of two activations (no weight matrix, the reduction over tokens):
/// [`crate::kernels::matmul_tn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinearForm {
    /// `y[t, n] = sum_k x[t, k] · W[n, k]`: x `[rows, K]`, W `[N, K]` (Hugging Face's `[out, in]`
    /// layout of a linear layer's weight, so W is read transposed), y `[rows, N]`.
    #[default]
    XWt,
    /// `y[t, k] = sum_n x[t, n] · W[n, k]`: x `[rows, N]`, W `[N, K]` read as stored, y
    /// `[rows, K]`. The input gradient of `Y = X · Wᵀ` is `dX = dY · W` (x = dY, y = dX); the
    /// reduction runs over W's rows, so over its chunks: every chunk after the first adds into
    /// y. No bias. Kernel: [`crate::kernels::matmul_xw`], reached through `matmul` and `matvec`.
    XW,
}

/// One linear product `y[t, y_col0 + n] (+)= scale · sum_k x[t, k] · W[n, k] (+ bias[n])` for
/// `t < rows`, `n < N` (or, in the [`LinearForm::XW`] form, `y[t, y_col0 + k] (+)= scale ·
/// sum_n x[t, n] · W[n, k]` for `k < K`), with every operand and option named.
///
/// Build it with [`LinearOp::new`] (no bias, overwrite, no scale, y rows packed, the adapter's
/// weight kind) and the builder methods, then pass it to `matmul` or `matvec`.
#[derive(Debug, Clone, Copy)]
pub struct LinearOp<'a> {
    /// The input, `[rows, K]` f32 row-major with row stride K (K = `w.cols`); in the
    /// [`LinearForm::XW`] form `[rows, N]` with row stride N (N = `w.rows`).
    pub x: &'a GpuTensor,
    /// Rows of x (tokens) to multiply; at least 1 (`matvec` takes exactly 1).
    pub rows: usize,
    /// The weight, `[N, K]` (N = `w.rows`) in f32 or f16 or quantised blocks, possibly split
    /// into row chunks.
    pub w: &'a GpuMatrix,
    /// How the kernel reads `w`; `None`: the adapter's choice for `w.dtype`
    /// ([`crate::kernels::choice::weight_kind`]).
    pub kind: Option<WeightKind>,
    /// Which product of x and W: the forward `x · Wᵀ` or the backward `x · W`.
    pub form: LinearForm,
    /// Optional bias `[N]` f32, added after the scale (forward form only).
    pub bias: Option<&'a GpuTensor>,
    /// The output, f32: row t's outputs are `y[t * stride + y_col0 ..][..N]` (`[..K]` in the
    /// [`LinearForm::XW`] form).
    pub y: &'a GpuTensor,
    /// Row stride of y in elements; `None`: `y_col0 + N` (rows packed). Must be at least
    /// `y_col0 + N`.
    pub y_stride: Option<usize>,
    /// First output column of y that the product writes (e.g. a slice of a fused buffer).
    pub y_col0: usize,
    /// Add into y instead of overwriting it (fuses the residual add, or LoRA's delta).
    pub accumulate: bool,
    /// Multiply the product by this before bias and accumulation (LoRA's `s = S · alpha / r`
    /// applied to `a · Bᵀ`). It lives in the dispatch's uniform: a new scale means preparing the
    /// dispatch again, not re-uploading W.
    pub scale: Option<f32>,
    /// `Some((start, len))`: only rows `start .. start + len` of W take part, as if W were that
    /// block of rows (one vocabulary chunk of the LM head): N is `len`, the outputs (or, in the
    /// [`LinearForm::XW`] form, the columns of x) are numbered from `start`, and a bias has
    /// `len` values. `None`: all of W. Taken by `matmul` and the XW form; `matvec`'s forward
    /// form rejects it.
    pub w_rows: Option<(usize, usize)>,
}

/// The part of one chunk of W that a [`LinearOp`] reads (the whole chunk unless
/// [`LinearOp::w_rows`] cuts it): rows `w_row0 .. w_row0 + rows` of the chunk's tensor, which are
/// rows `row0 .. row0 + rows` of the product's N.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChunkPart<'a> {
    /// The chunk.
    pub chunk: &'a MatrixChunk,
    /// First row of the chunk's tensor read.
    pub w_row0: usize,
    /// Index of that row in the product's N (output column, or XW form's column of x).
    pub row0: usize,
    /// Rows read.
    pub rows: usize,
}

impl ChunkPart<'_> {
    /// Bytes of the chunk's tensor that the part reads (the tensor's share for its rows).
    pub fn byte_len(&self) -> u64 {
        (self.chunk.tensor.byte_len() as u128 * self.rows as u128 / self.chunk.rows.max(1) as u128) as u64
    }
}

impl<'a> LinearOp<'a> {
    /// `y = x · Wᵀ` over `rows` rows of x (`[rows, K]` f32) into y (`[rows, N]` f32, packed), with
    /// no bias, no scale, overwriting y, W read the adapter's way.
    pub fn new(x: &'a GpuTensor, rows: usize, w: &'a GpuMatrix, y: &'a GpuTensor) -> LinearOp<'a> {
        LinearOp {
            x,
            rows,
            w,
            kind: None,
            form: LinearForm::XWt,
            bias: None,
            y,
            y_stride: None,
            y_col0: 0,
            accumulate: false,
            scale: None,
            w_rows: None,
        }
    }

    /// `y = x · W` (the [`LinearForm::XW`] form: x `[rows, N]` f32, y `[rows, K]` f32 packed,
    /// W `[N, K]`), with no scale, overwriting y, W read the adapter's way: the input gradient
    /// `dX = dY · W` of the forward product `Y = X · Wᵀ`.
    pub fn new_xw(x: &'a GpuTensor, rows: usize, w: &'a GpuMatrix, y: &'a GpuTensor) -> LinearOp<'a> {
        LinearOp { form: LinearForm::XW, ..LinearOp::new(x, rows, w, y) }
    }

    /// Adds `bias` (`[N]` f32) when it is `Some`.
    pub fn bias(self, bias: Option<&'a GpuTensor>) -> Self {
        LinearOp { bias, ..self }
    }

    /// Sets y's row stride (elements, at least `y_col0 + N`).
    pub fn y_stride(self, stride: usize) -> Self {
        LinearOp { y_stride: Some(stride), ..self }
    }

    /// Writes the outputs from column `col0` of each row of y.
    pub fn y_col0(self, col0: usize) -> Self {
        LinearOp { y_col0: col0, ..self }
    }

    /// Adds into y when `accumulate` is true.
    pub fn accumulate(self, accumulate: bool) -> Self {
        LinearOp { accumulate, ..self }
    }

    /// Multiplies the product by `scale` (before bias and accumulation).
    pub fn scale(self, scale: f32) -> Self {
        LinearOp { scale: Some(scale), ..self }
    }

    /// Uses only rows `start .. start + len` of W (see [`LinearOp::w_rows`]).
    pub fn w_rows(self, start: usize, len: usize) -> Self {
        LinearOp { w_rows: Some((start, len)), ..self }
    }

    /// Reads W as `kind` instead of the adapter's choice (tests and benches cover every kind).
    pub fn kind(self, kind: WeightKind) -> Self {
        LinearOp { kind: Some(kind), ..self }
    }

    /// The reduction length K and the output count N of the product.
    pub fn k_n(&self) -> (usize, usize) {
        let n = self.w_rows.map_or(self.w.rows, |(_, len)| len);
        match self.form {
            LinearForm::XWt => (self.w.cols, n),
            LinearForm::XW => (n, self.w.cols),
        }
    }

    /// Row stride of y in elements: the one set, else `y_col0 + N`.
    pub fn y_row_stride(&self) -> usize {
        self.y_stride.unwrap_or(self.y_col0 + self.k_n().1)
    }

    /// The uniform `flags` word ([`FLAG_ACCUMULATE`], [`FLAG_BIAS`], [`FLAG_SCALE`]).
    pub fn flags(&self) -> u32 {
        (if self.accumulate { FLAG_ACCUMULATE } else { 0 })
            | if self.bias.is_some() { FLAG_BIAS } else { 0 }
            | if self.scale.is_some() { FLAG_SCALE } else { 0 }
    }

    /// Checks every operand and option of the op `label` and returns the weight kind the kernel
    /// reads W as (a wide kind falls back to its 4-element sibling when W's row length
    /// `w.cols` is not a multiple of 8, [`WeightKind::for_k`]).
    ///
    /// # Errors
    /// [`GpuError::InvalidArgument`] naming `label` when: x, y or the bias is not f32; W is not
    /// f32 or f16; the product is empty (no rows, N or K of 0); x has fewer than `rows` times the
    /// reduction length elements; the y stride is below `y_col0` plus the outputs per row or y
    /// is too small for `rows` rows of it; the bias has fewer than N elements or is given to the
    /// [`LinearForm::XW`] form; an index does not fit in u32; a chunk of W does not match the
    /// matrix; the weight kind cannot read W's dtype or needs SHADER_F16 that the adapter lacks.
    pub fn check(&self, ctx: &GpuContext, label: &str) -> Result<WeightKind, GpuError> {
        let (w, rows) = (self.w, self.rows);
        let (k, n) = self.k_n();
        if self.x.dtype != DType::F32 || self.y.dtype != DType::F32 {
            return Err(invalid(label, format!("x and y must be f32 (got {} and {})", self.x.dtype, self.y.dtype)));
        }
        if w.dtype == DType::U32 {
            return Err(invalid(label, "the dtype of dense weights must be f32 or f16"));
        }
        if n == 0 || k == 0 || rows == 0 {
            return Err(invalid(label, format!("empty product: {rows} rows times [{}, {}]", w.rows, w.cols)));
        }
        if let Some((start, len)) = self.w_rows
            && start.checked_add(len).is_none_or(|end| end > w.rows)
        {
            return Err(invalid(label, format!("rows {start} + {len} of W are past its {} rows", w.rows)));
        }
        if self.x.numel() < rows * k {
            return Err(invalid(label, format!("x has {} elements, needs {rows} x {k}", self.x.numel())));
        }
        let stride = self.y_row_stride();
        if stride < self.y_col0 + n {
            return Err(invalid(label, format!("y stride {stride} < y_col0 {} + {n} outputs", self.y_col0)));
        }
        let y_end = (rows - 1) * stride + self.y_col0 + n;
        if self.y.numel() < y_end {
            return Err(invalid(label, format!("y has {} elements, too few for {rows} rows of stride {stride}", self.y.numel())));
        }
        if let Some(b) = self.bias {
            if self.form == LinearForm::XW {
                return Err(invalid(label, "the x · W form takes no bias"));
            }
            check_f32(label, b, n, "bias")?;
        }
        if rows * k > u32::MAX as usize || y_end > u32::MAX as usize {
            return Err(invalid(label, "tensor too large for 32-bit indexing"));
        }
        for c in &w.chunks {
            if !c.fits(w.cols, w.dtype) {
                return Err(invalid(label, format!("chunk at row {} does not match the matrix", c.row0)));
            }
        }
        // An explicit quantised kind only asserts what the chunks hold; dense chunks (if any)
        // are read the adapter's way.
        let kind = match self.kind {
            Some(WeightKind::Quant(q)) => {
                if let Some(c) = w.chunks.iter().find(|c| c.quant != Some(q)) {
                    return Err(invalid(label, format!("chunk at row {} is not {q} blocks", c.row0)));
                }
                crate::kernels::choice::dense_kind(ctx, w)
            }
            Some(kind) => kind,
            None => crate::kernels::choice::dense_kind(ctx, w),
        };
        check_weight_kind(ctx, label, kind, w.dtype)?;
        Ok(kind.for_k(w.cols))
    }

    /// The parts of W's chunks that the product reads, in order: every chunk, or with
    /// [`LinearOp::w_rows`] the chunks that hold some of those rows, each cut to them.
    pub(crate) fn chunk_parts(&self) -> Vec<ChunkPart<'a>> {
        let (start, len) = self.w_rows.unwrap_or((0, self.w.rows));
        self.w
            .chunks
            .iter()
            .filter_map(|c| {
                let (lo, hi) = (start.max(c.row0), (start + len).min(c.row0 + c.rows));
                (lo < hi).then_some(ChunkPart { chunk: c, w_row0: lo - c.row0, row0: lo - start, rows: hi - lo })
            })
            .collect()
    }

    /// One dispatch per chunk of W that the product reads ([`ChunkPart`]: all of them unless
    /// [`LinearOp::w_rows`] cuts W), named `label` (or `label[row0]`, row0 the part's first row
    /// in N, when W is split), with
    /// bindings params, x, the chunk's weights, bias, y (the [`LinearForm::XW`] form, which has
    /// no bias: params, x, the chunk's weights, y). A chunk is read as its block type, else
    /// as `dense` (the kind [`LinearOp::check`] returned); `pipeline` gives the pipeline for a
    /// kind (called once per kind) and `per_chunk` a part's uniform parameters, workgroup
    /// counts and cost. x is bound whole as storage. Call after [`LinearOp::check`].
    pub(crate) fn chunk_dispatches<P: Pod>(
        &self,
        ctx: &GpuContext,
        label: &str,
        dense: WeightKind,
        pipeline: impl Fn(WeightKind) -> Result<Arc<Pipeline>, GpuError>,
        per_chunk: impl Fn(&ChunkPart, WeightKind) -> (P, [u32; 3], Cost),
    ) -> Result<Vec<Dispatch>, GpuError> {
        self.chunk_dispatches_each(
            ctx,
            label,
            dense,
            &[],
            |kind, ()| pipeline(kind),
            |part, kind| {
                let (params, workgroups, cost) = per_chunk(part, kind);
                vec![((), params, workgroups, cost, XBinding::Storage)]
            },
        )
    }

    /// The most general form of [`LinearOp::chunk_dispatches`]: `per_chunk` gives any number of
    /// dispatches for a part (e.g. one per window of x rows), each with a pipeline selector `S`
    /// (`pipeline(kind, selector)` builds its pipeline, once per kind and selector), its own
    /// uniform parameters, workgroup counts, cost and binding of x ([`XBinding`]). A part's
    /// dispatches follow each other in the order given, parts in the order of W's rows; the second
    /// and later of a part are named `name#2`, `name#3`, ... `extra` are bound after y, in
    /// order, in every dispatch: an epilogue's operands.
    pub(crate) fn chunk_dispatches_each<P: Pod, S: Copy + PartialEq>(
        &self,
        ctx: &GpuContext,
        label: &str,
        dense: WeightKind,
        extra: &[wgpu::BindingResource<'_>],
        pipeline: impl Fn(WeightKind, S) -> Result<Arc<Pipeline>, GpuError>,
        per_chunk: impl Fn(&ChunkPart, WeightKind) -> Vec<(S, P, [u32; 3], Cost, XBinding)>,
    ) -> Result<Vec<Dispatch>, GpuError> {
        // An absent bias is never read (its flag is clear); bind x in its place.
        let bias = (self.form == LinearForm::XWt).then(|| self.bias.unwrap_or(self.x));
        let mut pipelines: Vec<((WeightKind, S), Arc<Pipeline>)> = Vec::new();
        let parts = self.chunk_parts();
        let mut out = Vec::with_capacity(parts.len());
        for part in &parts {
            let c = part.chunk;
            let kind = c.kind(dense);
            let name = if self.w.chunks.len() == 1 { label.to_string() } else { format!("{label}[{}]", part.row0) };
            let dispatches = per_chunk(part, kind);
            let repeated = dispatches.len() > 1;
            for (i, (selector, params, workgroups, cost, x)) in dispatches.into_iter().enumerate() {
                // Several dispatches of one part are numbered from the second (`name#2`), which
                // the profiler counts as the operation itself (`Dispatch::op_name`).
                let name = if repeated && i > 0 { format!("{name}#{}", i + 1) } else { name.clone() };
                let pipe = match pipelines.iter().find(|(key, _)| *key == (kind, selector)) {
                    Some((_, p)) => p.clone(),
                    None => {
                        let p = pipeline(kind, selector)?;
                        pipelines.push(((kind, selector), p.clone()));
                        p
                    }
                };
                let u = uniform(ctx, label, &params);
                let x = match x {
                    XBinding::Uniform { offset, size } => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &self.x.buffer,
                        offset,
                        size: wgpu::BufferSize::new(size),
                    }),
                    XBinding::Storage => self.x.buffer.as_entire_binding(),
                };
                let mut bindings = vec![u.as_entire_binding(), x, c.tensor.buffer.as_entire_binding()];
                bindings.extend(bias.map(|b| b.buffer.as_entire_binding()));
                bindings.push(self.y.buffer.as_entire_binding());
                bindings.extend(extra.iter().cloned());
                out.push(Dispatch::new(ctx, &pipe, name, &bindings, workgroups, cost));
            }
        }
        Ok(out)
    }
}

/// How one dispatch of a [`LinearOp`] binds x (binding 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum XBinding {
    /// The whole buffer, as read-only storage.
    Storage,
    /// `size` bytes from byte `offset`, as a uniform buffer (the pipeline declares x with
    /// [`WeightKind::declare_uniform`]); `offset` is a multiple of the adapter's
    /// `min_uniform_buffer_offset_alignment` and the range lies inside the buffer.
    Uniform {
        /// First byte bound.
        offset: u64,
        /// Bytes bound.
        size: u64,
    },
}
