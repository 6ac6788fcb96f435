//! Weight matrices on the GPU, split by rows over several buffers when one binding cannot hold
//! them (lavapipe binds at most 128 MiB; a 128k x 2048 f16 embedding table is 512 MiB).

use std::sync::{Arc, OnceLock};

use super::{DType, GpuContext, GpuError, GpuTensor, WeightKind};
use crate::model::quant::{HostBlocks, QuantType};

/// Rows `row0 .. row0 + rows` of a matrix, in one buffer: `[rows, cols]` of the matrix dtype,
/// or, when `quant` is set, `rows * cols / block_elems` blocks of that type as u32 words (the GPU
/// layout of [`crate::model::quant`]).
#[derive(Debug, Clone)]
pub struct MatrixChunk {
    /// The chunk's rows: `[rows, cols]` of the matrix dtype, or `[words]` u32 of blocks.
    pub tensor: GpuTensor,
    /// Index of the chunk's first row in the matrix.
    pub row0: usize,
    /// Rows in the chunk.
    pub rows: usize,
    /// The block type when the chunk holds quantised blocks; `None` for f32/f16 values.
    pub quant: Option<QuantType>,
    /// A second copy of a dense chunk in the decode GEMV's eight-row interleaved layout, built on
    /// the first use of the windows GEMV (`kernels::matvec_windows::interleaved8`); empty until
    /// then and for every other kernel. Shared by the chunk's clones.
    pub interleaved8: Arc<OnceLock<GpuTensor>>,
}

impl MatrixChunk {
    /// How a kernel reads this chunk: its block type, else `dense` (the op's kind for the
    /// matrix dtype).
    pub fn kind(&self, dense: WeightKind) -> WeightKind {
        self.quant.map_or(dense, WeightKind::Quant)
    }

    /// Whether the chunk's tensor holds its rows of a matrix of `cols` columns whose values are
    /// `dense`: `rows * cols` values of `dense`, or, for blocks, u32 words of whole blocks
    /// ([`QuantType::gpu_words_len`]) with `cols` a multiple of the block size.
    pub fn fits(&self, cols: usize, dense: DType) -> bool {
        match self.quant {
            None => self.tensor.dtype == dense && self.tensor.numel() == self.rows * cols,
            Some(q) => {
                self.tensor.dtype == DType::U32
                    && cols.is_multiple_of(q.block_elems())
                    && self.tensor.numel() == q.gpu_words_len(self.rows * (cols / q.block_elems()))
            }
        }
    }
}

/// One part of a stacked matrix for [`GpuMatrix::upload_parts`]: `[rows, cols]` values
/// converted to the matrix dtype, or quantised blocks kept as they are.
#[derive(Debug, Clone, Copy)]
pub enum MatrixPart<'a> {
    /// `rows * cols` f32 values, row-major.
    Dense {
        /// Rows of the part.
        rows: usize,
        /// The values.
        data: &'a [f32],
    },
    /// A `[rows, cols]` matrix of ggml blocks.
    Blocks(&'a HostBlocks),
}

impl MatrixPart<'_> {
    fn rows(&self) -> usize {
        match self {
            MatrixPart::Dense { rows, .. } => *rows,
            MatrixPart::Blocks(b) => b.rows,
        }
    }
}

/// Consecutive parts of one format, concatenated (rows of values, or ggml blocks row-major).
enum Run {
    Dense { rows: usize, data: Vec<f32> },
    Blocks { ty: QuantType, rows: usize, data: Vec<u8> },
}

/// A `[rows, cols]` row-major matrix (Hugging Face's `[out, in]` for a linear layer's weight).
#[derive(Debug, Clone)]
pub struct GpuMatrix {
    /// Name (the tensor's); chunks are named `label[row0..row1]` when the matrix is split.
    pub label: String,
    /// Rows (N, a linear layer's outputs; the vocabulary of an embedding table).
    pub rows: usize,
    /// Columns (K, a linear layer's inputs; d_model of an embedding table).
    pub cols: usize,
    /// Element type of the dense chunks (f32 or f16); chunks with [`MatrixChunk::quant`] hold
    /// blocks instead.
    pub dtype: DType,
    /// Row chunks in order, covering `0..rows`; each fits the context's `max_binding`.
    pub chunks: Vec<MatrixChunk>,
}

impl GpuMatrix {
    /// Upload `data` (`rows * cols` f32 values) converted to `dtype`, split so that every chunk
    /// fits `ctx.max_binding`. Chunk row counts are multiples of 4 where possible.
    ///
    /// # Errors
    /// [`GpuError::BufferTooLarge`] when one row exceeds a binding; buffer creation errors.
    pub fn upload(ctx: &GpuContext, label: &str, rows: usize, cols: usize, data: &[f32], dtype: DType) -> Result<GpuMatrix, GpuError> {
        Self::upload_parts(ctx, label, cols, &[MatrixPart::Dense { rows, data }], dtype)
    }

    /// Upload `parts` stacked by rows (`[sum of part rows, cols]`): dense parts converted to
    /// `dtype`, quantised parts as their blocks in the GPU layout. Consecutive parts of one
    /// format are joined, then split into chunks that fit `ctx.max_binding` (row counts
    /// multiples of 4 where possible); no chunk mixes formats, so a stack of different block
    /// types (Q4_K q and k with Q6_K v) is read chunk by chunk.
    ///
    /// # Errors
    /// [`GpuError::BufferTooLarge`] when one row exceeds a binding; buffer creation errors.
    ///
    /// # Panics
    /// When a dense part is not `rows * cols` values or a block part has other columns (callers
    /// build the parts from checked tensors).
    pub fn upload_parts(ctx: &GpuContext, label: &str, cols: usize, parts: &[MatrixPart], dtype: DType) -> Result<GpuMatrix, GpuError> {
        let total: usize = parts.iter().map(MatrixPart::rows).sum();
        // Consecutive parts of one format become one run (one buffer unless a binding cannot
        // hold it), so that stacking costs no extra dispatch: q, k and v of one type are one
        // product.
        let mut runs: Vec<Run> = Vec::new();
        for part in parts {
            match part {
                MatrixPart::Dense { rows, data } => {
                    assert_eq!(data.len(), rows * cols, "{label}: [{rows}, {cols}] vs {} values", data.len());
                    match runs.last_mut() {
                        Some(Run::Dense { rows: r, data: d }) => {
                            *r += rows;
                            d.extend_from_slice(data);
                        }
                        _ => runs.push(Run::Dense { rows: *rows, data: data.to_vec() }),
                    }
                }
                MatrixPart::Blocks(b) => {
                    assert_eq!(b.cols, cols, "{label}: a part of {} columns in a matrix of {cols}", b.cols);
                    match runs.last_mut() {
                        Some(Run::Blocks { ty, rows: r, data: d }) if *ty == b.ty => {
                            *r += b.rows;
                            d.extend_from_slice(&b.data);
                        }
                        _ => runs.push(Run::Blocks { ty: b.ty, rows: b.rows, data: b.data.clone() }),
                    }
                }
            }
        }
        let mut pieces = Vec::new();
        let mut row0 = 0;
        for (i, run) in runs.iter().enumerate() {
            // Bytes per row, and bytes a chunk may need beyond its rows' (a block type's last
            // tile is padded to whole tiles).
            let (rows, row_bytes, slack) = match run {
                Run::Dense { rows, .. } => (*rows, (cols * dtype.size()) as u64, 0),
                Run::Blocks { ty, rows, .. } => {
                    let per_row = (cols / ty.block_elems() * ty.gpu_tile_words() * 4).div_ceil(ty.gpu_tile_blocks());
                    (*rows, per_row as u64, (ty.gpu_tile_words() * 4) as u64)
                }
            };
            let max_rows = (ctx.max_binding.saturating_sub(slack) / row_bytes.max(1)) as usize;
            if max_rows == 0 {
                return Err(GpuError::BufferTooLarge {
                    label: format!("{label} (one row)"),
                    needed: Some(row_bytes),
                    limit: ctx.max_binding,
                    limit_name: "max_storage_buffer_binding_size",
                });
            }
            let per_chunk = if max_rows >= rows { rows } else { (max_rows / 4 * 4).max(1) };
            let mut r = 0;
            while r < rows {
                let n = per_chunk.min(rows - r);
                pieces.push((i, r, row0 + r, n));
                r += n;
            }
            row0 += rows;
        }
        let single = pieces.len() == 1;
        let mut chunks = Vec::with_capacity(pieces.len());
        for (i, r, row0, n) in pieces {
            let name = if single { label.to_string() } else { format!("{label}[{row0}..{}]", row0 + n) };
            let (tensor, quant) = match &runs[i] {
                Run::Dense { data, .. } => (GpuTensor::from_f32_as(ctx, &name, &[n, cols], &data[r * cols..(r + n) * cols], dtype)?, None),
                Run::Blocks { ty, data, .. } => {
                    let rb = cols / ty.block_elems() * ty.block_bytes();
                    let words = ty.gpu_words(&data[r * rb..(r + n) * rb]);
                    (GpuTensor::from_u32(ctx, &name, &[words.len()], &words)?, Some(*ty))
                }
            };
            chunks.push(MatrixChunk { tensor, row0, rows: n, quant, interleaved8: Arc::default() });
        }
        Ok(GpuMatrix { label: label.to_string(), rows: total, cols, dtype, chunks })
    }

    /// What the matrix is stored as: its dtype, its block type, or the types of its parts
    /// joined by `+` (e.g. `q4_k+q6_k`), in chunk order without repeats.
    pub fn format(&self) -> String {
        let mut names: Vec<String> = Vec::new();
        for c in &self.chunks {
            let n = c.quant.map_or_else(|| self.dtype.to_string(), |q| q.name().to_string());
            if !names.contains(&n) {
                names.push(n);
            }
        }
        names.join("+")
    }

    /// Bytes of weights (what one full read of the matrix costs).
    pub fn byte_len(&self) -> u64 {
        self.chunks.iter().map(|c| c.tensor.byte_len() as u64).sum()
    }

    /// Bytes of the chunks' interleaved copies built so far ([`MatrixChunk::interleaved8`]): 0
    /// until the windows GEMV first reads the matrix, then as much again as [`GpuMatrix::byte_len`].
    pub fn interleaved_bytes(&self) -> u64 {
        self.chunks.iter().filter_map(|c| c.interleaved8.get()).map(|t| t.byte_len() as u64).sum()
    }
}
