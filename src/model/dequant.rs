//! Dequantisation of ggml tensor data to f32, following ggml's block layouts.
//!
//! Supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K.
//! All multi-byte fields are little-endian. Block layouts (bytes):
//!
//! ```text
//! Q4_0 (32 values, 18 B): d f16 | qs[16]           x[j] = (lo(qs[j]) - 8) d, x[j+16] = (hi(qs[j]) - 8) d
//! Q4_1 (32 values, 20 B): d f16 | m f16 | qs[16]   x[j] = lo(qs[j]) d + m,   x[j+16] = hi(qs[j]) d + m
//! Q5_0 (32 values, 22 B): d f16 | qh u32 | qs[16]  5th bit of x[j] is bit j of qh, of x[j+16] bit j+16
//! Q5_1 (32 values, 24 B): d f16 | m f16 | qh u32 | qs[16]
//! Q8_0 (32 values, 34 B): d f16 | qs[32] i8        x[j] = qs[j] d
//! Q4_K (256 values, 144 B): d f16 | dmin f16 | scales[12] (8 x 6-bit scale, 8 x 6-bit min) | qs[128]
//! Q5_K (256 values, 176 B): d f16 | dmin f16 | scales[12] | qh[32] | qs[128]
//! Q6_K (256 values, 210 B): ql[128] | qh[64] | scales[16] i8 | d f16
//! ```

use half::{bf16, f16};

use super::error::ModelError;
use super::gguf::GgmlType;

/// Dequantises `n_elements` values of type `ty` from `bytes`, which must hold exactly the
/// blocks for that many elements. `tensor` names the tensor in errors.
pub fn dequantize(tensor: &str, ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>, ModelError> {
    let unsupported = || ModelError::UnsupportedType { tensor: tensor.to_owned(), ty: ty.to_string() };
    let block_fn: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => dequant_f32,
        GgmlType::F16 => dequant_f16,
        GgmlType::BF16 => dequant_bf16,
        GgmlType::Q4_0 => dequant_q4_0,
        GgmlType::Q4_1 => dequant_q4_1,
        GgmlType::Q5_0 => dequant_q5_0,
        GgmlType::Q5_1 => dequant_q5_1,
        GgmlType::Q8_0 => dequant_q8_0,
        GgmlType::Q4_K => dequant_q4_k,
        GgmlType::Q5_K => dequant_q5_k,
        GgmlType::Q6_K => dequant_q6_k,
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Other(_) => return Err(unsupported()),
    };
    let layout = ty.block_layout().ok_or_else(unsupported)?;
    let (block_elems, block_bytes) = (layout.elements as usize, layout.bytes as usize);
    if !n_elements.is_multiple_of(block_elems) {
        return Err(ModelError::BadTensor {
            tensor: tensor.to_owned(),
            what: format!("{n_elements} elements are not whole {block_elems}-element {ty} blocks"),
        });
    }
    let n_blocks = n_elements / block_elems;
    let expected_bytes = n_blocks.checked_mul(block_bytes);
    if expected_bytes != Some(bytes.len()) {
        return Err(ModelError::BadTensor {
            tensor: tensor.to_owned(),
            what: format!("{} bytes of {ty} data for {n_elements} elements (expected {expected_bytes:?})", bytes.len()),
        });
    }
    let mut out = vec![0f32; n_elements];
    for (block, values) in bytes.chunks_exact(block_bytes).zip(out.chunks_exact_mut(block_elems)) {
        block_fn(block, values);
    }
    Ok(out)
}

// Each block function receives a block of exactly the type's byte size and an output slice of
// exactly its element count (guaranteed by `chunks_exact` above), so constant indices below the
// block size cannot go out of bounds.

fn f16_at(block: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

fn dequant_f32(block: &[u8], out: &mut [f32]) {
    out[0] = f32::from_le_bytes([block[0], block[1], block[2], block[3]]);
}

fn dequant_f16(block: &[u8], out: &mut [f32]) {
    out[0] = f16_at(block, 0);
}

fn dequant_bf16(block: &[u8], out: &mut [f32]) {
    out[0] = bf16::from_le_bytes([block[0], block[1]]).to_f32();
}

/// block: d f16 | qs[16]; out: [32]
fn dequant_q4_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let qs = &block[2..18];
    for (j, &q) in qs.iter().enumerate() {
        out[j] = (i32::from(q & 0x0F) - 8) as f32 * d;
        out[j + 16] = (i32::from(q >> 4) - 8) as f32 * d;
    }
}

/// block: d f16 | m f16 | qs[16]; out: [32]
fn dequant_q4_1(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let m = f16_at(block, 2);
    let qs = &block[4..20];
    for (j, &q) in qs.iter().enumerate() {
        out[j] = f32::from(q & 0x0F) * d + m;
        out[j + 16] = f32::from(q >> 4) * d + m;
    }
}

/// The 5-bit values of a Q5_0/Q5_1 block: low nibbles from qs[16], fifth bits from qh.
fn five_bit_values(qh: u32, qs: &[u8]) -> [u8; 32] {
    let mut v = [0u8; 32];
    for (j, &q) in qs.iter().enumerate() {
        let high_lo = ((qh >> j) & 1) as u8;
        let high_hi = ((qh >> (j + 16)) & 1) as u8;
        v[j] = (q & 0x0F) | (high_lo << 4);
        v[j + 16] = (q >> 4) | (high_hi << 4);
    }
    v
}

/// block: d f16 | qh u32 | qs[16]; out: [32]
fn dequant_q5_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
    let values = five_bit_values(qh, &block[6..22]);
    for (o, &v) in out.iter_mut().zip(values.iter()) {
        *o = (i32::from(v) - 16) as f32 * d;
    }
}

/// block: d f16 | m f16 | qh u32 | qs[16]; out: [32]
fn dequant_q5_1(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let m = f16_at(block, 2);
    let qh = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
    let values = five_bit_values(qh, &block[8..24]);
    for (o, &v) in out.iter_mut().zip(values.iter()) {
        *o = f32::from(v) * d + m;
    }
}

/// block: d f16 | qs[32] i8; out: [32]
fn dequant_q8_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    for (o, &q) in out.iter_mut().zip(block[2..34].iter()) {
        *o = f32::from(q as i8) * d;
    }
}

/// The 6-bit (scale, min) pair of sub-block `j` (0..8) from the 12 packed bytes of Q4_K/Q5_K.
/// Sub-blocks 0..4 keep theirs in the low 6 bits of bytes j (scale) and j+4 (min); sub-blocks
/// 4..8 take their low 4 bits from the nibbles of byte j+4 and their top 2 bits from the top
/// bits of bytes j-4 (scale) and j (min).
fn k_quant_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 0x3F, scales[j + 4] & 0x3F)
    } else {
        let scale = (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4);
        let min = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
        (scale, min)
    }
}

/// block: d f16 | dmin f16 | scales[12] | qs[128]; out: [256]
/// Four chunks of 64 values; chunk c uses qs[32c..32c+32]: low nibbles with sub-block 2c,
/// high nibbles with sub-block 2c+1. x = d * scale * q - dmin * min.
fn dequant_q4_k(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let dmin = f16_at(block, 2);
    let scales = &block[4..16];
    let qs = &block[16..144];
    for (chunk, (q, y)) in qs.chunks_exact(32).zip(out.chunks_exact_mut(64)).enumerate() {
        let (sc_lo, m_lo) = k_quant_scale_min(scales, 2 * chunk);
        let (sc_hi, m_hi) = k_quant_scale_min(scales, 2 * chunk + 1);
        let (d_lo, min_lo) = (d * f32::from(sc_lo), dmin * f32::from(m_lo));
        let (d_hi, min_hi) = (d * f32::from(sc_hi), dmin * f32::from(m_hi));
        for (l, &b) in q.iter().enumerate() {
            y[l] = d_lo * f32::from(b & 0x0F) - min_lo;
            y[l + 32] = d_hi * f32::from(b >> 4) - min_hi;
        }
    }
}

/// block: d f16 | dmin f16 | scales[12] | qh[32] | qs[128]; out: [256]
/// Like Q4_K, with the fifth bit of value l in chunk c taken from bit 2c (low nibble) or
/// bit 2c+1 (high nibble) of qh[l].
fn dequant_q5_k(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let dmin = f16_at(block, 2);
    let scales = &block[4..16];
    let qh = &block[16..48];
    let qs = &block[48..176];
    for (chunk, (q, y)) in qs.chunks_exact(32).zip(out.chunks_exact_mut(64)).enumerate() {
        let (sc_lo, m_lo) = k_quant_scale_min(scales, 2 * chunk);
        let (sc_hi, m_hi) = k_quant_scale_min(scales, 2 * chunk + 1);
        let (d_lo, min_lo) = (d * f32::from(sc_lo), dmin * f32::from(m_lo));
        let (d_hi, min_hi) = (d * f32::from(sc_hi), dmin * f32::from(m_hi));
        for (l, (&b, &h)) in q.iter().zip(qh.iter()).enumerate() {
            let hi_lo = ((h >> (2 * chunk)) & 1) << 4;
            let hi_hi = ((h >> (2 * chunk + 1)) & 1) << 4;
            y[l] = d_lo * f32::from((b & 0x0F) | hi_lo) - min_lo;
            y[l + 32] = d_hi * f32::from((b >> 4) | hi_hi) - min_hi;
        }
    }
}

/// block: ql[128] | qh[64] | scales[16] i8 | d f16; out: [256]
/// Two halves of 128 values, each using ql[64], qh[32], scales[8]. For l in 0..32 of a half:
/// value l     = lo(ql[l])    | bits 0-1 of qh[l] << 4
/// value l+32  = lo(ql[l+32]) | bits 2-3 of qh[l] << 4
/// value l+64  = hi(ql[l])    | bits 4-5 of qh[l] << 4
/// value l+96  = hi(ql[l+32]) | bits 6-7 of qh[l] << 4
/// each minus 32, times d and the i8 scale of its 16-value group.
fn dequant_q6_k(block: &[u8], out: &mut [f32]) {
    let ql_all = &block[0..128];
    let qh_all = &block[128..192];
    let scales_all = &block[192..208];
    let d = f16_at(block, 208);
    for (half, y) in out.chunks_exact_mut(128).enumerate() {
        let ql = &ql_all[64 * half..64 * half + 64];
        let qh = &qh_all[32 * half..32 * half + 32];
        let sc = &scales_all[8 * half..8 * half + 8];
        for l in 0..32 {
            let group = l / 16;
            let h = qh[l];
            let q1 = i32::from((ql[l] & 0x0F) | ((h & 3) << 4)) - 32;
            let q2 = i32::from((ql[l + 32] & 0x0F) | (((h >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((ql[l] >> 4) | (((h >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((ql[l + 32] >> 4) | (((h >> 6) & 3) << 4)) - 32;
            let scale = |k: usize| d * f32::from(sc[group + k] as i8);
            y[l] = scale(0) * q1 as f32;
            y[l + 32] = scale(2) * q2 as f32;
            y[l + 64] = scale(4) * q3 as f32;
            y[l + 96] = scale(6) * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random numbers for tests (xorshift64*), in [-1, 1).
    struct TestRng(u64);
    impl TestRng {
        fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn next_f32(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    fn f16_bytes(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    /// Test quantiser for Q8_0: d = max|x| / 127, q = round(x / d).
    fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for block in x.chunks(32) {
            let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = f16::from_f32(amax / 127.0).to_f32();
            let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            for &v in block {
                out.push(((v * inv).round().clamp(-127.0, 127.0) as i8) as u8);
            }
        }
        out
    }

    /// Test quantiser for Q4_0 with a symmetric step d = max|x| / 7, q = round(x / d) + 8
    /// (so q stays within 1..=15 and no value clamps).
    fn quantize_q4_0(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
        let mut out = Vec::new();
        let mut steps = Vec::new();
        for block in x.chunks(32) {
            let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = f16::from_f32(amax / 7.0).to_f32();
            let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            let q = |v: f32| ((v * inv).round() + 8.0).clamp(0.0, 15.0) as u8;
            for j in 0..16 {
                out.push(q(block[j]) | (q(block[j + 16]) << 4));
            }
            steps.push(d);
        }
        (out, steps)
    }

    /// Test quantiser for Q4_1: m = min, d = (max - min) / 15, q = round((x - m) / d).
    fn quantize_q4_1(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
        let mut out = Vec::new();
        let mut steps = Vec::new();
        for block in x.chunks(32) {
            let min = block.iter().fold(f32::INFINITY, |a, &v| a.min(v));
            let max = block.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            let d = f16::from_f32((max - min) / 15.0).to_f32();
            let m = f16::from_f32(min).to_f32();
            let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
            out.extend_from_slice(&f16_bytes(d));
            out.extend_from_slice(&f16_bytes(m));
            let q = |v: f32| ((v - m) * inv).round().clamp(0.0, 15.0) as u8;
            for j in 0..16 {
                out.push(q(block[j]) | (q(block[j + 16]) << 4));
            }
            steps.push(d);
        }
        (out, steps)
    }

    #[test]
    fn f32_f16_bf16_are_exact() {
        let values = [0.0f32, 1.0, -2.5, 65504.0, 1.0e-3];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(dequantize("t", GgmlType::F32, &bytes, 5).unwrap(), values);

        let halfs = [0.0f32, 1.0, -2.5, 65504.0, 0.333_251_95];
        let bytes: Vec<u8> = halfs.iter().flat_map(|&v| f16_bytes(v)).collect();
        assert_eq!(dequantize("t", GgmlType::F16, &bytes, 5).unwrap(), halfs);

        // bf16 1.0 = 0x3F80, -2.0 = 0xC000, 3.140625 = 0x4049
        let bytes = [0x80, 0x3F, 0x00, 0xC0, 0x49, 0x40];
        assert_eq!(dequantize("t", GgmlType::BF16, &bytes, 3).unwrap(), [1.0, -2.0, 3.140625]);
    }

    #[test]
    fn q8_0_hand_block() {
        let mut block = f16_bytes(0.5).to_vec();
        block.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let out = dequantize("t", GgmlType::Q8_0, &block, 32).unwrap();
        for (j, v) in out.iter().enumerate() {
            assert_eq!(*v, (j as f32 - 16.0) * 0.5, "value {j}");
        }
    }

    #[test]
    fn q4_0_hand_block() {
        // qs[j] = low nibble j % 16, high nibble 15 - j % 16
        let mut block = f16_bytes(2.0).to_vec();
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let out = dequantize("t", GgmlType::Q4_0, &block, 32).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], (j as f32 - 8.0) * 2.0);
            assert_eq!(out[j + 16], ((15 - j) as f32 - 8.0) * 2.0);
        }
    }

    #[test]
    fn q4_1_hand_block() {
        let mut block = f16_bytes(0.25).to_vec();
        block.extend_from_slice(&f16_bytes(-1.0));
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let out = dequantize("t", GgmlType::Q4_1, &block, 32).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], j as f32 * 0.25 - 1.0);
            assert_eq!(out[j + 16], (15 - j) as f32 * 0.25 - 1.0);
        }
    }

    #[test]
    fn q5_0_and_q5_1_hand_blocks() {
        // nibbles all 3; fifth bit set for even j in the first half and for j = 16 + 1.
        let qh: u32 = 0x0000_5555 | (1 << 17);
        let mut q50 = f16_bytes(1.0).to_vec();
        q50.extend_from_slice(&qh.to_le_bytes());
        q50.extend(std::iter::repeat_n(0x33u8, 16));
        let out = dequantize("t", GgmlType::Q5_0, &q50, 32).unwrap();
        for (j, v) in out.iter().enumerate() {
            let fifth = (qh >> j) & 1;
            assert_eq!(*v, (3 + 16 * fifth) as f32 - 16.0, "q5_0 value {j}");
        }

        let mut q51 = f16_bytes(0.5).to_vec();
        q51.extend_from_slice(&f16_bytes(10.0));
        q51.extend_from_slice(&qh.to_le_bytes());
        q51.extend(std::iter::repeat_n(0x33u8, 16));
        let out = dequantize("t", GgmlType::Q5_1, &q51, 32).unwrap();
        for (j, v) in out.iter().enumerate() {
            let fifth = (qh >> j) & 1;
            assert_eq!(*v, (3 + 16 * fifth) as f32 * 0.5 + 10.0, "q5_1 value {j}");
        }
    }

    /// Packs 8 (scale, min) 6-bit pairs the way Q4_K/Q5_K store them.
    fn pack_k_scales(scales: [u8; 8], mins: [u8; 8]) -> [u8; 12] {
        let mut p = [0u8; 12];
        for j in 0..4 {
            p[j] = scales[j] | ((scales[j + 4] >> 4) << 6);
            p[j + 4] = mins[j] | ((mins[j + 4] >> 4) << 6);
            p[j + 8] = (scales[j + 4] & 0x0F) | ((mins[j + 4] & 0x0F) << 4);
        }
        p
    }

    #[test]
    fn k_scale_packing_round_trips() {
        let scales = [1, 63, 17, 32, 5, 48, 33, 62];
        let mins = [0, 7, 63, 21, 60, 9, 16, 47];
        let packed = pack_k_scales(scales, mins);
        for j in 0..8 {
            assert_eq!(k_quant_scale_min(&packed, j), (scales[j], mins[j]), "sub-block {j}");
        }
    }

    #[test]
    fn q4_k_hand_block() {
        let scales = [1, 2, 3, 4, 40, 50, 60, 63];
        let mins = [0, 1, 2, 3, 20, 30, 40, 63];
        let (d, dmin) = (0.5f32, 0.25f32);
        let mut block = f16_bytes(d).to_vec();
        block.extend_from_slice(&f16_bytes(dmin));
        block.extend_from_slice(&pack_k_scales(scales, mins));
        // quant of value i: (i * 7) % 16; stored in chunk c = i / 64, low nibble for the first 32
        let quant = |i: usize| ((i * 7) % 16) as u8;
        for c in 0..4 {
            for l in 0..32 {
                block.push(quant(64 * c + l) | (quant(64 * c + 32 + l) << 4));
            }
        }
        assert_eq!(block.len(), 144);
        let out = dequantize("t", GgmlType::Q4_K, &block, 256).unwrap();
        for (i, v) in out.iter().enumerate() {
            let sub = i / 32;
            let expected = d * scales[sub] as f32 * quant(i) as f32 - dmin * mins[sub] as f32;
            assert_eq!(*v, expected, "value {i}");
        }
    }

    #[test]
    fn q5_k_hand_block() {
        let scales = [3, 5, 7, 9, 11, 13, 15, 63];
        let mins = [63, 1, 0, 4, 8, 16, 32, 2];
        let (d, dmin) = (0.125f32, 0.5f32);
        let quant = |i: usize| ((i * 11 + 3) % 32) as u8; // 5-bit values
        let mut qh = [0u8; 32];
        let mut qs = [0u8; 128];
        for i in 0..256 {
            let (c, within) = (i / 64, i % 64);
            let (l, high_nibble) = (within % 32, within >= 32);
            let q = quant(i);
            let bit = 2 * c + usize::from(high_nibble);
            qh[l] |= (q >> 4) << bit;
            qs[32 * c + l] |= if high_nibble { (q & 0x0F) << 4 } else { q & 0x0F };
        }
        let mut block = f16_bytes(d).to_vec();
        block.extend_from_slice(&f16_bytes(dmin));
        block.extend_from_slice(&pack_k_scales(scales, mins));
        block.extend_from_slice(&qh);
        block.extend_from_slice(&qs);
        let out = dequantize("t", GgmlType::Q5_K, &block, 256).unwrap();
        for (i, v) in out.iter().enumerate() {
            let sub = i / 32;
            let expected = d * scales[sub] as f32 * quant(i) as f32 - dmin * mins[sub] as f32;
            assert_eq!(*v, expected, "value {i}");
        }
    }

    #[test]
    fn q6_k_hand_block() {
        let d = 0.5f32;
        let scales: [i8; 16] = [1, -2, 3, -4, 5, -6, 7, -8, 9, -10, 11, -12, 13, -14, 127, -128];
        let quant = |i: usize| ((i * 13 + 5) % 64) as u8; // 6-bit values, minus 32 when read
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for i in 0..256 {
            let (half, within) = (i / 128, i % 128);
            let (quarter, l) = (within / 32, within % 32);
            let q = quant(i);
            // quarter 0: lo(ql[l]), 1: lo(ql[l+32]), 2: hi(ql[l]), 3: hi(ql[l+32])
            let ql_index = 64 * half + l + if quarter % 2 == 1 { 32 } else { 0 };
            ql[ql_index] |= if quarter >= 2 { (q & 0x0F) << 4 } else { q & 0x0F };
            qh[32 * half + l] |= (q >> 4) << (2 * quarter);
        }
        let mut block = ql.to_vec();
        block.extend_from_slice(&qh);
        block.extend(scales.iter().map(|&s| s as u8));
        block.extend_from_slice(&f16_bytes(d));
        assert_eq!(block.len(), 210);
        let out = dequantize("t", GgmlType::Q6_K, &block, 256).unwrap();
        for (i, v) in out.iter().enumerate() {
            let expected = d * scales[i / 16] as f32 * (quant(i) as f32 - 32.0);
            assert_eq!(*v, expected, "value {i}");
        }
    }

    #[test]
    fn q8_0_round_trip_within_half_step() {
        let mut rng = TestRng(0x1234_5678);
        let x: Vec<f32> = (0..32 * 8).map(|_| rng.next_f32() * 3.0).collect();
        let bytes = quantize_q8_0(&x);
        let y = dequantize("t", GgmlType::Q8_0, &bytes, x.len()).unwrap();
        for (b, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
            let d = f16::from_le_bytes([bytes[34 * b], bytes[34 * b + 1]]).to_f32();
            for (a, c) in xs.iter().zip(ys) {
                assert!((a - c).abs() <= d * 0.5 + 1e-6, "block {b}: {a} vs {c} (step {d})");
            }
        }
    }

    #[test]
    fn q4_0_and_q4_1_round_trip_within_half_step() {
        let mut rng = TestRng(0xDEAD_BEEF);
        let x: Vec<f32> = (0..32 * 8).map(|_| rng.next_f32() + 0.3).collect();
        let (bytes, steps) = quantize_q4_0(&x);
        let y = dequantize("t", GgmlType::Q4_0, &bytes, x.len()).unwrap();
        for (b, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
            for (a, c) in xs.iter().zip(ys) {
                assert!((a - c).abs() <= steps[b] * 0.5 + 1e-6, "q4_0 block {b}: {a} vs {c}");
            }
        }
        let (bytes, steps) = quantize_q4_1(&x);
        let y = dequantize("t", GgmlType::Q4_1, &bytes, x.len()).unwrap();
        for (b, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
            for (a, c) in xs.iter().zip(ys) {
                // m is rounded to f16, which can shift values by a little more than half a step
                assert!((a - c).abs() <= steps[b] * 0.5 + 2e-3, "q4_1 block {b}: {a} vs {c}");
            }
        }
    }

    /// Random blocks of every quantised type and their dequantisation by gguf-py
    /// (generated by scripts/gen-dequant-fixture.py; see its docstring for provenance).
    const GGUF_PY_FIXTURE: &[u8] = include_bytes!("../../tests/data/dequant_fixture.bin");

    #[test]
    fn matches_gguf_py_on_random_blocks() {
        let mut pos = 0usize;
        let mut take = |n: usize| {
            let head = &GGUF_PY_FIXTURE[pos..pos + n];
            pos += n;
            head
        };
        let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap());
        let mut seen = Vec::new();
        let mut remaining_types = 10;
        while remaining_types > 0 {
            remaining_types -= 1;
            let ty = GgmlType::from_id(u32_at(take(4)));
            let n = u32_at(take(4)) as usize;
            let n_bytes = u32_at(take(4)) as usize;
            let blocks = take(n_bytes);
            let expected: Vec<f32> = take(4 * n).chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            let got = dequantize("fixture", ty, blocks, n).unwrap();
            for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                // gguf-py computes in f32 or f64 with a different operation order
                let tol = 1e-6 * e.abs().max(1.0);
                assert!((g - e).abs() <= tol, "{ty} value {i}: got {g}, gguf-py {e}");
            }
            seen.push(ty);
        }
        assert_eq!(take(0).as_ptr(), GGUF_PY_FIXTURE[GGUF_PY_FIXTURE.len()..].as_ptr(), "fixture has trailing data");
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::F16,
            GgmlType::BF16,
        ] {
            assert!(seen.contains(&ty), "fixture lacks {ty}");
        }
    }

    #[test]
    fn wrong_lengths_and_types_are_errors() {
        let bytes = [0u8; 34];
        assert!(matches!(
            dequantize("w", GgmlType::Q8_0, &bytes, 31),
            Err(ModelError::BadTensor { tensor, .. }) if tensor == "w"
        ));
        assert!(matches!(dequantize("w", GgmlType::Q8_0, &bytes[..33], 32), Err(ModelError::BadTensor { .. })));
        assert!(matches!(
            dequantize("w", GgmlType::Q2_K, &[0u8; 84], 256),
            Err(ModelError::UnsupportedType { tensor, ty }) if tensor == "w" && ty == "Q2_K"
        ));
        assert!(matches!(
            dequantize("w", GgmlType::Other(99), &[], 0),
            Err(ModelError::UnsupportedType { ty, .. }) if ty.contains("99")
        ));
    }
}
