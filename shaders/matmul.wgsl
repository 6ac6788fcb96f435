// Matrix product for prefill: y[t, y_col0 + row0 + n] (+)= sum_k x[t, k] * w[w_row0 + n, k] (+ bias[row0 + n])
// for t < p.t and the rows n < p.n read from one chunk of a weight matrix ([out, in], so this is X * W^T).
// Accumulation is in f32.
//
// Placeholders (filled from Rust): W_DECL / X_DECL declare the weights / input with accessors w_4,
// w_1, x_4, x_1 (and w_8, x_8 for the wide kinds); ALIGNED is true when K % 4 == 0 (rows start on
// a vec4 boundary); WG is the workgroup size of matmul_regblock (and matmul_xbcast), TM x TN its
// block of outputs per invocation and REGBLOCK_BODY its generated body; NB and XBCAST_BODY are
// matmul_xbcast's, XBCAST_SUBGROUP_ENTRY the whole entry point matmul_xbcast_subgroup
// (`matmul::xbcast_subgroup_entry`; each pipeline fills only its own entry point's body).

struct MatmulParams {
    t: u32,         // rows of x (tokens)
    n: u32,         // rows of this chunk of w read
    k: u32,         // columns of x and w
    row0: u32,      // index of the first row read in the product's N (bias index, y column)
    y_stride: u32,  // elements between rows of y
    y_col0: u32,    // y column of row 0 of the whole matrix
    flags: u32,     // bit 0: accumulate into y; bit 1: add bias; bit 2: multiply the product by scale
    scale: f32,     // used with flag bit 2 (LoRA: S * alpha / r), before bias and accumulation
    w_row0: u32,    // first row of the chunk read (a block of W's rows, e.g. a vocabulary chunk)
    t0: u32,        // matmul_xbcast: the window's first row of x (and of y)
    skip: u32,      // matmul_xbcast: the window's first rows, computed but not stored (an earlier window stored them)
    _pad2: u32,
};

@group(0) @binding(0) var<uniform> p: MatmulParams;
{{X_DECL}}  // binding 1, x: [t, k] f32
{{W_DECL}}  // binding 2, w: [n, k] f32 or f16 (this chunk)
@group(0) @binding(3) var<storage, read> bias: array<f32>;     // [rows of the whole matrix] (x when unused)
@group(0) @binding(4) var<storage, read_write> y: array<f32>;  // [t, y_stride]

const ALIGNED: bool = {{ALIGNED}};
const WG: u32 = {{WG}}u;
const TM: u32 = {{TM}}u;
const TN: u32 = {{TN}}u;

fn store(t: u32, n: u32, v: f32) {
    var s = v;
    if ((p.flags & 4u) != 0u) {
        s *= p.scale;
    }
    if ((p.flags & 2u) != 0u) {
        s += bias[p.row0 + n];
    }
    let i = t * p.y_stride + p.y_col0 + p.row0 + n;
    if ((p.flags & 1u) != 0u) {
        s += y[i];
    }
    y[i] = s;
}

// Register blocking: each invocation computes TM rows of x times TN rows of w; consecutive
// invocations take consecutive blocks of x rows (so the lanes of a SIMD group read the same w
// rows: fewer memory streams than the other order, 5-10% faster on lavapipe). REGBLOCK_BODY is
// generated from Rust (`matmul::regblock_body`): it walks K in steps of 8 (wide kinds), 4 or 1
// element, keeps the TM x TN accumulators in named registers and writes the guarded stores out
// straight. On CPU drivers every storage load is a per-lane loop, so what makes this fast is
// how many multiply-adds each load feeds (TM x TN per TM + TN loads) and how wide each load is;
// arrays of accumulators indexed in loops would live in memory there.
@compute @workgroup_size(WG)
fn matmul_regblock(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let inv = gid.x + gid.y * nwg.x * WG;
    let nb = (p.n + TN - 1u) / TN;
    let tb = (p.t + TM - 1u) / TM;
    if (inv >= nb * tb) {
        return;
    }
    let t0 = (inv % tb) * TM;
    let n0 = (inv / tb) * TN;
{{REGBLOCK_BODY}}
}

// Tiled through workgroup memory: a 16 x 16 workgroup computes a 64 x 64 tile of y (4 x 4 per
// invocation), staging 64 x 16 slices of x and w per step of K.
const BT: u32 = 64u;  // tile rows (t)
const BN: u32 = 64u;  // tile columns (n)
const BK: u32 = 16u;  // K per step
var<workgroup> xs: array<vec4<f32>, 256>;  // [BK][BT / 4]: xs[kk * 16 + m / 4][m % 4] = x[t0 + m, k0 + kk]
var<workgroup> ws: array<vec4<f32>, 256>;  // [BK][BN / 4]

fn load_x4(t: u32, k: u32) -> vec4<f32> {
    if (t >= p.t) {
        return vec4<f32>(0.0);
    }
    let e = t * p.k + k;
    if (ALIGNED) {
        if (k < p.k) {
            return x_4(e / 4u);
        }
        return vec4<f32>(0.0);
    }
    var v = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        if (k + j < p.k) {
            v[j] = x_1(e + j);
        }
    }
    return v;
}

fn load_w4(n: u32, k: u32) -> vec4<f32> {
    if (n >= p.n) {
        return vec4<f32>(0.0);
    }
    let e = (p.w_row0 + n) * p.k + k;
    if (ALIGNED) {
        if (k < p.k) {
            return w_4(e / 4u);
        }
        return vec4<f32>(0.0);
    }
    var v = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        if (k + j < p.k) {
            v[j] = w_1(e + j);
        }
    }
    return v;
}

@compute @workgroup_size(16, 16)
fn matmul_tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let tiles_n = (p.n + BN - 1u) / BN;
    let tile = wg.x + wg.y * nwg.x;  // uniform across the workgroup
    let n0 = (tile % tiles_n) * BN;
    let t0 = (tile / tiles_n) * BT;
    let tx = lid % 16u;  // output columns n0 + tx * 4 ..
    let ty = lid / 16u;  // output rows t0 + ty * 4 ..
    let lr = lid / 4u;          // the row of the x / w slice this invocation loads
    let lk = (lid % 4u) * 4u;   // and its first k in the slice
    var acc: array<vec4<f32>, 4>;
    for (var i = 0u; i < 4u; i++) {
        acc[i] = vec4<f32>(0.0);
    }
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        let xv = load_x4(t0 + lr, k0 + lk);
        let wv = load_w4(n0 + lr, k0 + lk);
        for (var j = 0u; j < 4u; j++) {
            xs[(lk + j) * 16u + lr / 4u][lr % 4u] = xv[j];
            ws[(lk + j) * 16u + lr / 4u][lr % 4u] = wv[j];
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let a = xs[kk * 16u + ty];
            let b = ws[kk * 16u + tx];
            acc[0] = fma(vec4<f32>(a.x), b, acc[0]);
            acc[1] = fma(vec4<f32>(a.y), b, acc[1]);
            acc[2] = fma(vec4<f32>(a.z), b, acc[2]);
            acc[3] = fma(vec4<f32>(a.w), b, acc[3]);
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let t = t0 + ty * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let n = n0 + tx * 4u + j;
            if (t < p.t && n < p.n) {
                store(t, n, acc[i][j]);
            }
        }
    }
}

// x broadcast (`matmul::xbcast_body`): windows of TB consecutive rows of x, one or a few per
// dispatch (workgroup y index wy picks the window), which the dispatch binds as a uniform array
// (X_DECL), so every invocation of a workgroup reads the same x
// values at the same time (the access a GPU's constant cache serves, and on lavapipe a branchless
// gather instead of a per-lane loop with a bounds check each). Each invocation owns NB
// consecutive rows of w from n0 and keeps TB x NB accumulators in named registers: per step of
// K, NB loads of w feed TB x NB dot products. TB is the window's length, a constant of the
// pipeline (windows of 8 rows; the last one ends at the last row and skips storing its first
// p.skip rows, which the window before it stored).
const NB: u32 = {{NB}}u;

@compute @workgroup_size(WG)
fn matmul_xbcast(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let n0 = gid.x * NB;
    let wy = wg.y; // the dispatch's window (uniform across the workgroup)
    if (n0 >= p.n) {
        return;
    }
{{XBCAST_BODY}}
}

// x handed across lanes (`matmul::xbcast_subgroup_entry`, `MatmulVariant::XBcastSubgroup`):
// generated whole, as it declares the subgroup builtin that other pipelines' adapters may lack.
{{XBCAST_SUBGROUP_ENTRY}}
