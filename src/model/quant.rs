//! Quantised weight blocks kept as stored: the ggml block types the GPU kernels read
//! ([`QuantType`]), a matrix of such blocks on the host ([`HostBlocks`]), the 16-byte-aligned
//! layout the GPU reads them in ([`QuantType::gpu_words`]) and ggml's reference round-to-nearest
//! quantisers for Q8_0 and Q4_0 ([`quantize`]).
//!
//! GPU layout (u32 words, read by the kernels as `array<vec4<u32>>`, so that one load brings 16
//! bytes): every group of values a kernel reads together starts on a 16-byte boundary.
//!
//! ```text
//! Q8_0, Q4_0, Q4_1: tiles of 8 blocks (the last one padded with zero blocks), each
//!   [scales of the 8 blocks][quants of block 0] .. [quants of block 7]
//!   Q8_0 68 words: 8 x d f16 (4 words) | 8 x qs[32] (8 words each)   34 B per block
//!   Q4_0 36 words: 8 x d f16 (4 words) | 8 x qs[16] (4 words each)   18 B per block
//!   Q4_1 40 words: 8 x (d f16, m f16) (8 words) | 8 x qs[16]          20 B per block
//! Q4_K 36 words per block: d f16 | dmin f16 | scales[12] | qs[128] (as stored, 144 B)
//! Q6_K 56 words per block: ql[128] | qh[64] | scales[16] | d f16 | 14 B of padding (224 B)
//! ```
//!
//! Blocks are numbered over the whole chunk (row-major), so a tile may hold the end of one row
//! and the start of the next.

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

    /// Blocks per tile of the GPU layout (the module docs): 8 for Q8_0, Q4_0 and Q4_1, 1 for the
    /// k-quants.
    pub fn gpu_tile_blocks(self) -> usize {
        match self {
            QuantType::Q4_K | QuantType::Q6_K => 1,
            _ => 8,
        }
    }

    /// 32-bit words per tile of the GPU layout: 68, 36, 40, 36, 56 (all multiples of 4).
    pub fn gpu_tile_words(self) -> usize {
        match self {
            QuantType::Q8_0 => 4 + 8 * 8,
            QuantType::Q4_0 => 4 + 8 * 4,
            QuantType::Q4_1 => 8 + 8 * 4,
            QuantType::Q4_K => 36,
            QuantType::Q6_K => 56,
        }
    }

    /// 32-bit words the GPU layout takes for `blocks` blocks (whole tiles).
    pub fn gpu_words_len(self, blocks: usize) -> usize {
        blocks.div_ceil(self.gpu_tile_blocks()) * self.gpu_tile_words()
    }

    /// Bits per weight on the GPU, tile padding aside: 8.5, 4.5, 5, 4.5, 7.
    pub fn gpu_bits_per_weight(self) -> f64 {
        (self.gpu_tile_words() * 32) as f64 / (self.gpu_tile_blocks() * self.block_elems()) as f64
    }

    /// Rewrites ggml blocks of this type (`bytes`, a whole number of blocks) into the GPU layout
    /// of the module docs: [`QuantType::gpu_words_len`] words.
    ///
    /// # Panics
    /// When `bytes` is not a whole number of blocks (callers check sizes first, as
    /// [`HostBlocks::new`] does).
    pub fn gpu_words(self, bytes: &[u8]) -> Vec<u32> {
        let bb = self.block_bytes();
        assert!(bytes.len().is_multiple_of(bb), "{} bytes are not whole {} blocks", bytes.len(), self.name());
        let blocks = bytes.len() / bb;
        let mut out = vec![0u8; self.gpu_words_len(blocks) * 4];
        let tile_bytes = self.gpu_tile_words() * 4;
        for (b, src) in bytes.chunks_exact(bb).enumerate() {
            match self {
                QuantType::Q4_K | QuantType::Q6_K => out[b * tile_bytes..b * tile_bytes + bb].copy_from_slice(src),
                _ => {
                    let (tile, slot) = (b / 8 * tile_bytes, b % 8);
                    // The scale fields (d, or d and m) go to the tile's head, the quants after it.
                    let scale = if self == QuantType::Q4_1 { 4 } else { 2 };
                    let head = if self == QuantType::Q4_1 { 32 } else { 16 };
                    let quants = bb - scale;
                    out[tile + slot * scale..tile + (slot + 1) * scale].copy_from_slice(&src[..scale]);
                    let q0 = tile + head + slot * quants;
                    out[q0..q0 + quants].copy_from_slice(&src[scale..]);
                }
            }
        }
        out.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect()
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
    fn gpu_words_keep_every_field_in_its_place() {
        for ty in QuantType::ALL {
            let bb = ty.block_bytes();
            // 11 blocks: one whole tile and a padded one for the tiled types.
            let n = 11;
            let bytes: Vec<u8> = (0..n * bb).map(|i| (i * 7 + 1) as u8).collect();
            let w = ty.gpu_words(&bytes);
            assert_eq!(w.len(), ty.gpu_words_len(n), "{ty}");
            assert!(w.len().is_multiple_of(4), "{ty}: whole vec4s");
            let flat: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
            let tile = ty.gpu_tile_words() * 4;
            for b in 0..n {
                let src = &bytes[b * bb..(b + 1) * bb];
                match ty {
                    QuantType::Q4_K | QuantType::Q6_K => assert_eq!(&flat[b * tile..b * tile + bb], src, "{ty} block {b}"),
                    _ => {
                        let (t, s) = (b / 8 * tile, b % 8);
                        let (scale, head) = if ty == QuantType::Q4_1 { (4, 32) } else { (2, 16) };
                        assert_eq!(&flat[t + s * scale..t + (s + 1) * scale], &src[..scale], "{ty} block {b} scales");
                        let q = t + head + s * (bb - scale);
                        assert_eq!(&flat[q..q + bb - scale], &src[scale..], "{ty} block {b} quants");
                        assert_eq!(q % 16, 0, "{ty} block {b}: quants on a 16-byte boundary");
                    }
                }
            }
        }
        assert_eq!(QuantType::Q4_0.gpu_bits_per_weight(), 4.5);
        assert_eq!(QuantType::Q8_0.gpu_bits_per_weight(), 8.5);
        assert_eq!(QuantType::Q6_K.gpu_bits_per_weight(), 7.0);
    }
}
