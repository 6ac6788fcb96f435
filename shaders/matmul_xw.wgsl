// The backward form of the linear product (`LinearForm::XW`): y[t, y_col0 + k] (+)= scale *
// sum_n x[t, row0 + n] * w[w_row0 + n, k] for t < p.t, k < p.k over the rows n < p.n read from one chunk of a
// weight matrix W [N, K] ([out, in], read as stored, not transposed). With x = dY and y = dX this
// is the input gradient dX = dY * W of Y = X * W^T. Accumulation is in f32. The reduction runs
// over W's rows: a matrix in several chunks is several dispatches, all but the first adding into y.
//
// Placeholders (filled from Rust): X_DECL / W_DECL declare x (f32) and the chunk's weights with
// accessors x_4, x_1 and w_4, w_1 (dense kinds) or w_scales, w_words, w_pair_of (quantised
// blocks); ALIGNED is true when K % 4 == 0 (rows of w start on a group of 4); WG is the
// workgroup size; TM x KC the block of outputs per invocation (rows of y x columns of y) and
// XW_BODY its body, generated from Rust (`matmul_xw::xw_body_dense`, `xw_body_quant`).

struct MatmulXwParams {
    t: u32,         // rows of x and y (tokens)
    n: u32,         // rows of this chunk of w read (the reduction length of this dispatch)
    k: u32,         // columns of w: outputs per row of y
    row0: u32,      // index of the first row read in the product's N: the first column of x it reads
    x_stride: u32,  // elements between rows of x (N, the rows of the product)
    y_stride: u32,  // elements between rows of y
    y_col0: u32,    // first column of y written
    flags: u32,     // bit 0: accumulate into y; bit 2: multiply the product by scale
    scale: f32,     // used with flag bit 2, before accumulation
    w_row0: u32,    // first row of the chunk read (a block of W's rows, e.g. a vocabulary chunk)
    _pad1: u32,
    _pad2: u32,
};

@group(0) @binding(0) var<uniform> p: MatmulXwParams;
{{X_DECL}}  // binding 1, x: [t, x_stride] f32
{{W_DECL}}  // binding 2, w: [n, k] (this chunk)
@group(0) @binding(3) var<storage, read_write> y: array<f32>;  // [t, y_stride]

const ALIGNED: bool = {{ALIGNED}};
const WG: u32 = {{WG}}u;
const TM: u32 = {{TM}}u;
const KC: u32 = {{KC}}u;

// w[n, k0 .. k0 + 4] of a dense kind; with K % 4 == 0 one w_4 load (k0 is then clamped by the
// caller to a group inside the row), else four w_1 loads with the columns past the end clamped to
// the last one (their outputs are not stored).
fn w_row4(n: u32, k0: u32) -> vec4<f32> {
    if (ALIGNED) {
        return w_4(((p.w_row0 + n) * p.k + k0) / 4u);
    }
    let e = (p.w_row0 + n) * p.k;
    let last = p.k - 1u;
    return vec4<f32>(w_1(e + min(k0, last)), w_1(e + min(k0 + 1u, last)), w_1(e + min(k0 + 2u, last)),
                     w_1(e + min(k0 + 3u, last)));
}

// The first column of the group of 4 that column k0 starts, kept inside the row when K % 4 == 0.
fn col4(k0: u32) -> u32 {
    if (ALIGNED) {
        return min(k0, p.k - 4u);
    }
    return k0;
}

fn store(t: u32, k: u32, v: f32) {
    var s = v;
    if ((p.flags & 4u) != 0u) {
        s *= p.scale;
    }
    let i = t * p.y_stride + p.y_col0 + k;
    if ((p.flags & 1u) != 0u) {
        s += y[i];
    }
    y[i] = s;
}

// Register blocking, as matmul_regblock: each invocation computes TM rows of y times KC
// consecutive columns, the accumulators in named registers; per row n of w (four at a time where
// x is read four values of n per load) each w load feeds TM multiply-adds per value and each x
// load 4 KC / 4. Consecutive invocations take consecutive blocks of rows of y, so the lanes of a
// SIMD group read the same rows of w. Rows of x past the end are clamped.
@compute @workgroup_size(WG)
fn matmul_xw(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let inv = gid.x + gid.y * nwg.x * WG;
    let kb = (p.k + KC - 1u) / KC;
    let tb = (p.t + TM - 1u) / TM;
    if (inv >= kb * tb) {
        return;
    }
    let t0 = (inv % tb) * TM;
    let k0 = (inv / tb) * KC;
{{XW_BODY}}
}
