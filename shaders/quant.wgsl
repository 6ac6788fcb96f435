// Quantised weight accessors (declared by `WeightKind::Quant`, see src/gpu/quant.rs): the
// weights are ggml blocks in the GPU layout of src/model/quant.rs (every group of values read
// together on a 16-byte boundary), loaded as vec4<u32> and dequantised in registers. `VAR`
// becomes the variable's name; the binding, the MIN constant and the type's own functions (one
// section per type at the end of this file) are filled in by src/gpu/quant.rs.
//
// Every type is read in units of 32 values: unit b is values 32b .. 32b + 32 of the chunk
// (row-major, rows are whole units since K is a multiple of the block size). Value e of a unit
// (e < 32) is `a_lo * raw[e] + c` for e < 16 and `a_hi * raw[e] + c` for e >= 16, with
// (a_lo, a_hi, c) = VAR_scales(b) and raw the block's integers (offset removed) as floats.
// VAR_words(b) loads the unit's quant words (a few vec4 loads) and VAR_pair_of(words, i) gives
// raw values 4i .. 4i+3 (lo) and 16+4i .. 16+4i+3 (hi) from them, for i < 4.

@group(0) @binding(%BINDING%) var<storage, read> VAR: array<vec4<u32>>;

struct VAR_Pair { lo: vec4<f32>, hi: vec4<f32> };

const VAR_MIN: bool = %MIN%; // whether c can be non-zero

// The four bytes of q as floats, unsigned (byte 0 first).
fn VAR_u8x4(q: u32) -> vec4<f32> {
    return vec4<f32>(vec4<u32>(q, q >> 8u, q >> 16u, q >> 24u) & vec4<u32>(255u));
}

// The low nibbles of the four bytes of q as floats (byte 0 first).
fn VAR_nib(q: u32) -> vec4<f32> {
    return vec4<f32>(vec4<u32>(q, q >> 8u, q >> 16u, q >> 24u) & vec4<u32>(15u));
}

// The four bytes of q as floats, signed.
fn VAR_i8x4(q: u32) -> vec4<f32> {
    return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(q << 24u, q << 16u, q << 8u, q)) >> vec4<u32>(24u));
}

// Byte n of word w, sign-extended.
fn VAR_i8(w: u32, n: u32) -> f32 {
    return f32(bitcast<i32>(w << (24u - 8u * n)) >> 24u);
}

%FORMAT%

// Raw values 4i .. 4i+3 and 16+4i .. 16+4i+3 of unit b.
fn VAR_pair(b: u32, i: u32) -> VAR_Pair {
    return VAR_pair_of(VAR_words(b), i);
}

// Values 4i .. 4i+3 of the chunk, dequantised.
fn VAR_4(i: u32) -> vec4<f32> {
    let b = i >> 3u;
    let k = i & 7u;
    let s = VAR_scales(b);
    let pr = VAR_pair(b, k & 3u);
    let hi = k >= 4u;
    return fma(select(pr.lo, pr.hi, hi), vec4<f32>(select(s.x, s.y, hi)), vec4<f32>(s.z));
}

// Value i of the chunk, dequantised.
fn VAR_1(i: u32) -> f32 {
    return VAR_4(i >> 2u)[i & 3u];
}

// dot(unit b, x0 .. x7) with the scales applied once per half: what a GEMV needs.
fn VAR_dot32(b: u32, x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32>,
             x4: vec4<f32>, x5: vec4<f32>, x6: vec4<f32>, x7: vec4<f32>) -> f32 {
    let s = VAR_scales(b);
    let u = VAR_words(b);
    let p0 = VAR_pair_of(u, 0u);
    let p1 = VAR_pair_of(u, 1u);
    let p2 = VAR_pair_of(u, 2u);
    let p3 = VAR_pair_of(u, 3u);
    let lo = fma(p0.lo, x0, fma(p1.lo, x1, fma(p2.lo, x2, p3.lo * x3)));
    let hi = fma(p0.hi, x4, fma(p1.hi, x5, fma(p2.hi, x6, p3.hi * x7)));
    var r = s.x * ((lo.x + lo.y) + (lo.z + lo.w)) + s.y * ((hi.x + hi.y) + (hi.z + hi.w));
    if (VAR_MIN) {
        let xs = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7));
        r = fma(s.z, (xs.x + xs.y) + (xs.z + xs.w), r);
    }
    return r;
}

//== q8_0
// Q8_0, tiles of 8 blocks in 17 vec4: the 8 scales d (f16), then each block's qs[32] i8 in two vec4.
struct VAR_Words { a: vec4<u32>, b: vec4<u32> };
fn VAR_scales(b: u32) -> vec3<f32> {
    let s = b & 7u;
    let d = unpack2x16float(VAR[(b >> 3u) * 17u][s >> 1u])[s & 1u];
    return vec3<f32>(d, d, 0.0);
}
fn VAR_words(b: u32) -> VAR_Words {
    let o = (b >> 3u) * 17u + 1u + 2u * (b & 7u);
    return VAR_Words(VAR[o], VAR[o + 1u]);
}
fn VAR_pair_of(u: VAR_Words, i: u32) -> VAR_Pair {
    return VAR_Pair(VAR_i8x4(u.a[i]), VAR_i8x4(u.b[i]));
}
//== q4_0
// Q4_0, tiles of 8 blocks in 9 vec4: the 8 scales d (f16), then each block's qs[16] in one vec4;
// value j is lo(qs[j]) - 8, value j+16 hi(qs[j]) - 8.
struct VAR_Words { a: vec4<u32> };
fn VAR_scales(b: u32) -> vec3<f32> {
    let s = b & 7u;
    let d = unpack2x16float(VAR[(b >> 3u) * 9u][s >> 1u])[s & 1u];
    return vec3<f32>(d, d, 0.0);
}
fn VAR_words(b: u32) -> VAR_Words {
    return VAR_Words(VAR[(b >> 3u) * 9u + 1u + (b & 7u)]);
}
fn VAR_pair_of(u: VAR_Words, i: u32) -> VAR_Pair {
    let q = u.a[i];
    return VAR_Pair(VAR_nib(q) - vec4<f32>(8.0), VAR_nib(q >> 4u) - vec4<f32>(8.0));
}
//== q4_1
// Q4_1, tiles of 8 blocks in 10 vec4: the 8 (d, m) f16 pairs, then each block's qs[16] in one
// vec4; value j is d lo(qs[j]) + m, value j+16 d hi(qs[j]) + m.
struct VAR_Words { a: vec4<u32> };
fn VAR_scales(b: u32) -> vec3<f32> {
    let s = b & 7u;
    let dm = unpack2x16float(VAR[(b >> 3u) * 10u + (s >> 2u)][s & 3u]);
    return vec3<f32>(dm.x, dm.x, dm.y);
}
fn VAR_words(b: u32) -> VAR_Words {
    return VAR_Words(VAR[(b >> 3u) * 10u + 2u + (b & 7u)]);
}
fn VAR_pair_of(u: VAR_Words, i: u32) -> VAR_Pair {
    let q = u.a[i];
    return VAR_Pair(VAR_nib(q), VAR_nib(q >> 4u));
}
//== q4_k
// Q4_K, 9 vec4 per block of 256: d f16 | dmin f16 | scales[12] in the first, qs[128] in the
// other 8. Unit j of a block (32 values) reads qs[32 (j / 2) ..][..32] (vec4 1 + 2 (j / 2) and
// the next), low nibbles for even j, high for odd; value = d sc_j q - dmin m_j with the 6-bit
// (sc_j, m_j) packed as in ggml's get_scale_min_k4.
struct VAR_Words { a: vec4<u32>, b: vec4<u32>, sh: u32 };
fn VAR_sbyte(h: vec4<u32>, n: u32) -> u32 {
    return (h[1u + (n >> 2u)] >> (8u * (n & 3u))) & 255u;
}
fn VAR_scales(b: u32) -> vec3<f32> {
    let h = VAR[(b >> 3u) * 9u];
    let j = b & 7u;
    let dm = unpack2x16float(h.x);
    var sc: u32;
    var m: u32;
    if (j < 4u) {
        sc = VAR_sbyte(h, j) & 63u;
        m = VAR_sbyte(h, j + 4u) & 63u;
    } else {
        let hi = VAR_sbyte(h, j + 4u);
        sc = (hi & 15u) | ((VAR_sbyte(h, j - 4u) >> 6u) << 4u);
        m = (hi >> 4u) | ((VAR_sbyte(h, j) >> 6u) << 4u);
    }
    let a = dm.x * f32(sc);
    return vec3<f32>(a, a, -dm.y * f32(m));
}
fn VAR_words(b: u32) -> VAR_Words {
    let j = b & 7u;
    let o = (b >> 3u) * 9u + 1u + 2u * (j >> 1u);
    return VAR_Words(VAR[o], VAR[o + 1u], 4u * (j & 1u));
}
fn VAR_pair_of(u: VAR_Words, i: u32) -> VAR_Pair {
    return VAR_Pair(VAR_nib(u.a[i] >> u.sh), VAR_nib(u.b[i] >> u.sh));
}
//== q6_k
// Q6_K, 14 vec4 per block of 256: ql[128] (vec4 0-7) | qh[64] (8-11) | scales[16] i8 (12) |
// d f16 (13). Unit j of a block is quarter g = j % 4 of half n = j / 4: value l < 32 takes the
// low (g < 2) or high nibble of ql[64n + 32 (g % 2) + l], bits 2g, 2g+1 of qh[32n + l] above
// it, minus 32, times d and the i8 scale scales[8n + 2g + l / 16].
struct VAR_Words { l0: vec4<u32>, l1: vec4<u32>, h0: vec4<u32>, h1: vec4<u32>, lsh: u32, hsh: u32 };
fn VAR_scales(b: u32) -> vec3<f32> {
    let o = (b >> 3u) * 14u;
    let j = b & 7u;
    let g = j & 3u;
    let d = unpack2x16float(VAR[o + 13u].x).x;
    let sw = VAR[o + 12u][2u * (j >> 2u) + (g >> 1u)];
    let byte = 2u * (g & 1u);
    return vec3<f32>(d * VAR_i8(sw, byte), d * VAR_i8(sw, byte + 1u), 0.0);
}
fn VAR_words(b: u32) -> VAR_Words {
    let o = (b >> 3u) * 14u;
    let j = b & 7u;
    let n = j >> 2u;
    let g = j & 3u;
    let l = o + 4u * n + 2u * (g & 1u);
    let h = o + 8u + 2u * n;
    return VAR_Words(VAR[l], VAR[l + 1u], VAR[h], VAR[h + 1u], 4u * (g >> 1u), 2u * g);
}
fn VAR_q6(ql: u32, qh: u32, lsh: u32, hsh: u32) -> vec4<f32> {
    return VAR_u8x4(((ql >> lsh) & 0x0F0F0F0Fu) | (((qh >> hsh) & 0x03030303u) << 4u)) - vec4<f32>(32.0);
}
fn VAR_pair_of(u: VAR_Words, i: u32) -> VAR_Pair {
    return VAR_Pair(VAR_q6(u.l0[i], u.h0[i], u.lsh, u.hsh), VAR_q6(u.l1[i], u.h1[i], u.lsh, u.hsh));
}
