//! Weight matrices on the GPU, split by rows over several buffers when one binding cannot hold
//! them (lavapipe binds at most 128 MiB; a 128k x 2048 f16 embedding table is 512 MiB).

use super::{DType, GpuContext, GpuError, GpuTensor};

/// Rows `row0 .. row0 + rows` of a matrix, in one buffer: `[rows, cols]` of the matrix dtype.
#[derive(Debug, Clone)]
pub struct MatrixChunk {
    /// The chunk's rows, `[rows, cols]` of the matrix dtype.
    pub tensor: GpuTensor,
    /// Index of the chunk's first row in the matrix.
    pub row0: usize,
    /// Rows in the chunk.
    pub rows: usize,
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
    /// Element type (f32 or f16).
    pub dtype: DType,
    /// Row chunks in order, covering `0..rows`; each fits the context's `max_binding`.
    pub chunks: Vec<MatrixChunk>,
}

impl GpuMatrix {
    /// Upload `data` (`rows * cols` f32 values) converted to `dtype`, split so that every chunk
    /// fits `ctx.max_binding`. Chunk row counts are multiples of 4 where possible.
    pub fn upload(ctx: &GpuContext, label: &str, rows: usize, cols: usize, data: &[f32], dtype: DType) -> Result<GpuMatrix, GpuError> {
        assert_eq!(data.len(), rows * cols, "{label}: [{rows}, {cols}] vs {} values", data.len());
        let row_bytes = (cols * dtype.size()) as u64;
        let max_rows = (ctx.max_binding / row_bytes.max(1)) as usize;
        if max_rows == 0 {
            return Err(GpuError::BufferTooLarge {
                label: format!("{label} (one row)"),
                needed: Some(row_bytes),
                limit: ctx.max_binding,
                limit_name: "max_storage_buffer_binding_size",
            });
        }
        let per_chunk = if max_rows >= rows { rows } else { (max_rows / 4 * 4).max(1) };
        let mut chunks = Vec::new();
        let mut row0 = 0;
        while row0 < rows {
            let n = per_chunk.min(rows - row0);
            let name = if per_chunk == rows { label.to_string() } else { format!("{label}[{row0}..{}]", row0 + n) };
            let tensor = GpuTensor::from_f32_as(ctx, &name, &[n, cols], &data[row0 * cols..(row0 + n) * cols], dtype)?;
            chunks.push(MatrixChunk { tensor, row0, rows: n });
            row0 += n;
        }
        Ok(GpuMatrix { label: label.to_string(), rows, cols, dtype, chunks })
    }

    /// Bytes of weights (what one full read of the matrix costs).
    pub fn byte_len(&self) -> u64 {
        (self.rows * self.cols * self.dtype.size()) as u64
    }
}
