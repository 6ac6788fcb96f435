//! Quantised weight blocks kept as stored: the ggml block types the GPU kernels read
//! ([`QuantType`]), a matrix of such blocks on the host ([`HostBlocks`]), the 4-byte-aligned
//! layout the GPU reads them in ([`QuantType::gpu_words`]) and ggml's reference round-to-nearest
//! quantisers for Q8_0 and Q4_0 ([`quantize`]).
//!
//! GPU layout, one block after another, each a whole number of 32-bit words (ggml's bytes,
//! little-endian, with padding only where the ggml block is not a multiple of 4 bytes):
//!
//! ```text
//! Q8_0  9 words (ggml 34 B): d f16 | pad 2 B | qs[32] i8
//! Q4_0  5 words (ggml 18 B): d f16 | pad 2 B | qs[16]
//! Q4_1  5 words (ggml 20 B): d f16 | m f16 | qs[16]                  (as stored)
//! Q4_K 36 words (ggml 144 B): d f16 | dmin f16 | scales[12] | qs[128] (as stored)
//! Q6_K 53 words (ggml 210 B): ql[128] | qh[64] | scales[16] | d f16 | pad 2 B
//! ```

use half::f16;

use super::dequant::dequantize;
use super::error::ModelError;
use super::gguf::GgmlType;

/// A ggml block type that the GPU kernels read without dequantising at load.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// 32 values: f16 scale, 32 i8. 8.5 bits per weight.
    Q8_0,
    /// 32 values: f16 scale, 32 4-bit values offset by 8. 4.5 bits per weight.
    Q4_0,
    /// 32 values: f16 scale and minimum, 32 4-bit values. 5 bits per weight.
    Q4_1,
    /// 256 values in 8 sub-blocks of 32 with 6-bit scales and minimums. 4.5 bits per weight.
    Q4_K,
    /// 256 values in 16 groups of 16 with i8 scales, 6-bit values. 6.5625 bits per weight.
    Q6_K,
}

impl QuantType {
    /// Every type, in the order `--dtype` lists them.
    pub const ALL: [QuantType; 5] = [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1, QuantType::Q4_K, QuantType::Q6_K];

    /// The type's name on the command line and in kernel names (`q8_0`, `q4_0`, `q4_1`, `q4_k`,
    /// `q6_k`).
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q8_0 => "q8_0",
            QuantType::Q4_0 => "q4_0",
            QuantType::Q4_1 => "q4_1",
            QuantType::Q4_K => "q4_k",
            QuantType::Q6_K => "q6_k",
        }
    }

    /// The type called `s` ([`QuantType::name`], any case), if any.
    pub fn parse(s: &str) -> Option<QuantType> {
        QuantType::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(s))
    }

    /// The ggml type.
    pub fn ggml(self) -> GgmlType {
        match self {
            QuantType::Q8_0 => GgmlType::Q8_0,
            QuantType::Q4_0 => GgmlType::Q4_0,
            QuantType::Q4_1 => GgmlType::Q4_1,
            QuantType::Q4_K => GgmlType::Q4_K,
            QuantType::Q6_K => GgmlType::Q6_K,
        }
    }

    /// The kernel-readable type of ggml type `ty`, if it is one.
    pub fn from_ggml(ty: GgmlType) -> Option<QuantType> {
        QuantType::ALL.into_iter().find(|t| t.ggml() == ty)
    }

    /// Values per block: 32, or 256 for the k-quants.
    pub fn block_elems(self) -> usize {
        match self {
            QuantType::Q4_K | QuantType::Q6_K => 256,
            _ => 32,
        }
    }

    /// Bytes per block as ggml stores it (34, 18, 20, 144, 210).
    pub fn block_bytes(self) -> usize {
        match self {
            QuantType::Q8_0 => 34,
            QuantType::Q4_0 => 18,
            QuantType::Q4_1 => 20,
            QuantType::Q4_K => 144,
            QuantType::Q6_K => 210,
        }
    }

    /// 32-bit words per block in the GPU layout (the module docs): 9, 5, 5, 36, 53.
    pub fn gpu_block_words(self) -> usize {
        match self {
            QuantType::Q8_0 => 9,
            QuantType::Q4_0 | QuantType::Q4_1 => 5,
            QuantType::Q4_K => 36,
            QuantType::Q6_K => 53,
        }
    }

    /// Bits per weight on the GPU (with the layout's padding): 9, 5, 5, 4.5, 6.625.
    pub fn gpu_bits_per_weight(self) -> f64 {
        (self.gpu_block_words() * 32) as f64 / self.block_elems() as f64
    }

    /// Rewrites ggml blocks of this type (`bytes`, a whole number of blocks) into the GPU layout
    /// of the module docs, one block after another.
    ///
    /// # Panics
    /// When `bytes` is not a whole number of blocks (callers check sizes first, as
    /// [`HostBlocks::new`] does).
    pub fn gpu_words(self, bytes: &[u8]) -> Vec<u32> {
        let bb = self.block_bytes();
        assert!(bytes.len().is_multiple_of(bb), "{} bytes are not whole {} blocks", bytes.len(), self.name());
        let words = self.gpu_block_words();
        let mut out = Vec::with_capacity(bytes.len() / bb * words);
        let mut block = vec![0u8; words * 4];
        for src in bytes.chunks_exact(bb) {
            block.fill(0);
            match self {
                // d, then two bytes of padding, then the quants on a word boundary.
                QuantType::Q8_0 | QuantType::Q4_0 => {
                    block[..2].copy_from_slice(&src[..2]);
                    block[4..4 + bb - 2].copy_from_slice(&src[2..]);
                }
                _ => block[..bb].copy_from_slice(src),
            }
            out.extend(block.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])));
        }
        out
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A `[rows, cols]` row-major matrix of quantised blocks on the host, in Hugging Face layout
/// (`[out, in]` for a linear weight): row r is `cols / block_elems` blocks, bytes
/// `r * row_bytes .. (r + 1) * row_bytes`.
#[derive(Debug, Clone, PartialEq)]
pub struct HostBlocks {
    /// Canonical (Hugging Face) name.
    pub name: String,
    /// Rows (outputs of a linear layer; the vocabulary of an embedding table).
    pub rows: usize,
    /// Columns (inputs; d_model of an embedding table), a multiple of the block size.
    pub cols: usize,
    /// The block type.
    pub ty: QuantType,
    /// `rows * cols / block_elems` ggml blocks, row-major.
    pub data: Vec<u8>,
}

impl HostBlocks {
    /// Checks that `data` holds exactly the blocks of a `[rows, cols]` matrix of `ty`.
    ///
    /// # Errors
    /// [`ModelError::BadTensor`] naming `name` when `cols` is not a multiple of the block size
    /// (a row would split a block) or `data` is not `rows * cols / block_elems` blocks.
    pub fn new(name: &str, rows: usize, cols: usize, ty: QuantType, data: Vec<u8>) -> Result<HostBlocks, ModelError> {
        let bad = |what: String| ModelError::BadTensor { tensor: name.to_owned(), what };
        if !cols.is_multiple_of(ty.block_elems()) {
            return Err(bad(format!("rows of {cols} values are not whole {}-value {} blocks", ty.block_elems(), ty.ggml())));
        }
        let want = rows.checked_mul(cols / ty.block_elems()).and_then(|b| b.checked_mul(ty.block_bytes()));
        if want != Some(data.len()) {
            return Err(bad(format!("{} bytes of {} data for [{rows}, {cols}] (expected {want:?})", data.len(), ty.ggml())));
        }
        Ok(HostBlocks { name: name.to_owned(), rows, cols, ty, data })
    }

    /// Bytes of one row of blocks.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_elems() * self.ty.block_bytes()
    }

    /// The values as f32 (`[rows, cols]` row-major), through [`dequantize`].
    ///
    /// # Errors
    /// Those of [`dequantize`] (none for a matrix built by [`HostBlocks::new`]).
    pub fn dequantize(&self) -> Result<Vec<f32>, ModelError> {
        dequantize(&self.name, self.ty.ggml(), &self.data, self.rows * self.cols)
    }

    /// Rows reordered: row `i` of the result is row `src_row(i)` of `self` (a permutation of
    /// `0..rows`; the q/k head order of llama.cpp's converter is one).
    pub fn reorder_rows(&self, src_row: impl Fn(usize) -> usize) -> HostBlocks {
        let rb = self.row_bytes();
        let mut data = Vec::with_capacity(self.data.len());
        for i in 0..self.rows {
            let s = src_row(i);
            data.extend_from_slice(&self.data[s * rb..(s + 1) * rb]);
        }
        HostBlocks { data, ..self.clone() }
    }
}

/// Quantises a `[rows, cols]` f32 matrix (`data` row-major) to `ty` the way ggml's reference
/// quantisers do (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`): per block of 32, Q8_0 takes
/// `d = max|x| / 127`, `q = round(x / d)`; Q4_0 takes the value of largest magnitude `m`,
/// `d = m / -8`, `q = min(15, trunc(x / d + 8.5))`.
///
/// # Errors
/// [`ModelError::BadTensor`] naming `name` when `ty` is not Q8_0 or Q4_0 (the k-quants need
/// ggml's search for scales, which firstrt does not do), `cols` is not a multiple of 32 or
/// `data` is not `rows * cols` values.
pub fn quantize(name: &str, ty: QuantType, data: &[f32], rows: usize, cols: usize) -> Result<HostBlocks, ModelError> {
    let bad = |what: String| ModelError::BadTensor { tensor: name.to_owned(), what };
    if rows.checked_mul(cols) != Some(data.len()) {
        return Err(bad(format!("{} values are not [{rows}, {cols}]", data.len())));
    }
    if !cols.is_multiple_of(32) {
        return Err(bad(format!("rows of {cols} values are not whole 32-value {} blocks", ty.ggml())));
    }
    let mut out = Vec::with_capacity(data.len() / 32 * ty.block_bytes());
    match ty {
        QuantType::Q8_0 => {
            for x in data.chunks_exact(32) {
                let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
            }
        }
        QuantType::Q4_0 => {
            for x in data.chunks_exact(32) {
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in x {
                    if amax < v.abs() {
                        amax = v.abs();
                        max = v;
                    }
                }
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
                out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
            }
        }
        other => {
            return Err(bad(format!(
                "quantising to {other} at load is not supported (only q8_0 and q4_0; --dtype native keeps the file's own block types)"
            )));
        }
    }
    HostBlocks::new(name, rows, cols, ty, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn quantize_round_trips_within_half_a_step() {
        for ty in [QuantType::Q8_0, QuantType::Q4_0] {
            let x = values(4 * 64, 3);
            let b = quantize("t", ty, &x, 4, 64).unwrap();
            assert_eq!(b.data.len(), 4 * 2 * ty.block_bytes());
            let y = b.dequantize().unwrap();
            for (blk, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                let step = if ty == QuantType::Q8_0 { amax / 127.0 } else { amax / 8.0 };
                for (a, b) in xs.iter().zip(ys) {
                    // Q4_0 has 15 steps for 16 levels: the end opposite the largest magnitude clips by up to a step.
                    let tol = if ty == QuantType::Q4_0 { step } else { step * 0.5 };
                    assert!((a - b).abs() <= tol + 1e-3 * amax, "{ty} block {blk}: {a} vs {b} (step {step})");
                }
            }
        }
    }

    #[test]
    fn quantize_q8_0_matches_ggml_reference_values() {
        // d = 127/127 = 1, q = round(x): hand-checked against quantize_row_q8_0_ref.
        let mut x = vec![0f32; 32];
        x[0] = 127.0;
        x[1] = -3.4;
        x[2] = 2.5;
        let b = quantize("t", QuantType::Q8_0, &x, 1, 32).unwrap();
        assert_eq!(&b.data[..2], &f16::from_f32(1.0).to_le_bytes());
        assert_eq!(b.data[2], 127);
        assert_eq!(b.data[3] as i8, -3);
        assert_eq!(b.data[4], 3); // roundf rounds half away from zero
        // Q4_0: largest magnitude -16 gives d = 2, q = trunc(x / 2 + 8.5).
        let mut x = vec![0f32; 32];
        x[0] = -16.0;
        x[16] = 5.0;
        let b = quantize("t", QuantType::Q4_0, &x, 1, 32).unwrap();
        assert_eq!(&b.data[..2], &f16::from_f32(2.0).to_le_bytes());
        // x[0] -> trunc(-8 + 8.5) = 0 (low nibble), x[16] -> trunc(2.5 + 8.5) = 11 (high nibble).
        assert_eq!(b.data[2], 11 << 4);
        assert_eq!(b.data[3], 0x88); // zeros -> trunc(8.5) = 8 in both nibbles
    }

    #[test]
    fn quantize_rejects_k_quants_and_bad_shapes() {
        let x = values(64, 1);
        let e = quantize("w", QuantType::Q4_K, &x, 1, 64).unwrap_err().to_string();
        assert!(e.contains("w") && e.contains("q4_k"), "{e}");
        assert!(quantize("w", QuantType::Q8_0, &x, 2, 32).is_ok());
        assert!(quantize("w", QuantType::Q8_0, &x, 4, 16).unwrap_err().to_string().contains("32-value"));
        assert!(quantize("w", QuantType::Q8_0, &x, 3, 32).is_err());
    }

    #[test]
    fn host_blocks_checks_sizes_and_reorders_rows() {
        let e = HostBlocks::new("m", 2, 48, QuantType::Q8_0, vec![0; 2 * 34]).unwrap_err().to_string();
        assert!(e.contains("'m'") || e.contains("m"), "{e}");
        assert!(e.contains("48"), "{e}");
        let e = HostBlocks::new("m", 2, 32, QuantType::Q8_0, vec![0; 67]).unwrap_err().to_string();
        assert!(e.contains("67 bytes"), "{e}");
        let b = quantize("m", QuantType::Q8_0, &values(3 * 32, 5), 3, 32).unwrap();
        let r = b.reorder_rows(|i| 2 - i);
        let (x, y) = (b.dequantize().unwrap(), r.dequantize().unwrap());
        assert_eq!(&x[64..96], &y[0..32]);
        assert_eq!(&x[0..32], &y[64..96]);
    }

    #[test]
    fn gpu_words_keep_the_bytes_and_pad_to_words() {
        for ty in QuantType::ALL {
            let bb = ty.block_bytes();
            let bytes: Vec<u8> = (0..2 * bb).map(|i| (i * 7 + 1) as u8).collect();
            let w = ty.gpu_words(&bytes);
            assert_eq!(w.len(), 2 * ty.gpu_block_words(), "{ty}");
            let flat: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
            let stride = ty.gpu_block_words() * 4;
            for b in 0..2 {
                let (src, dst) = (&bytes[b * bb..(b + 1) * bb], &flat[b * stride..(b + 1) * stride]);
                match ty {
                    QuantType::Q8_0 | QuantType::Q4_0 => {
                        assert_eq!(&dst[..2], &src[..2]);
                        assert_eq!(&dst[4..4 + bb - 2], &src[2..]);
                    }
                    _ => assert_eq!(&dst[..bb], src),
                }
            }
        }
    }
}
