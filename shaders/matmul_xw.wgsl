// The backward form of the linear product (`LinearForm::XW`): y[t, y_col0 + k] (+)= scale *
// sum_n x[t, row0 + n] * w[n, k] for t < p.t, k < p.k over the rows n < p.n of one chunk of a
// weight matrix W [N, K] ([out, in], read as stored, not transposed). With x = dY and y = dX this
// is the input gradient dX = dY * W of Y = X * W^T. Accumulation is in f32. The reduction runs
// over W's rows: a matrix in several chunks is several dispatches, all but the first adding into y.
//
// Placeholders (filled from Rust): X_DECL / W_DECL declare x (f32) and the chunk's weights with
// accessors x_1 and w_4, w_1 (any WeightKind: f32, f16, the wide kinds, quantised blocks); ALIGNED
// is true when K % 4 == 0 (rows of w start on a group of 4); XVEC is true when every chunk's
// first column of x is on a group of 4 (N % 4 == 0 and every row0 % 4 == 0), so that x is read
// four values of n per load; WG is the workgroup size.

struct MatmulXwParams {
    t: u32,         // rows of x and y (tokens)
    n: u32,         // rows of this chunk of w (the reduction length of this dispatch)
    k: u32,         // columns of w: outputs per row of y
    row0: u32,      // first row of the chunk in W: the first column of x it reads
    x_stride: u32,  // elements between rows of x (N, the rows of the whole matrix)
    y_stride: u32,  // elements between rows of y
    y_col0: u32,    // first column of y written
    flags: u32,     // bit 0: accumulate into y; bit 2: multiply the product by scale
    scale: f32,     // used with flag bit 2, before accumulation
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
};

@group(0) @binding(0) var<uniform> p: MatmulXwParams;
{{X_DECL}}  // binding 1, x: [t, x_stride] f32
{{W_DECL}}  // binding 2, w: [n, k] (this chunk)
@group(0) @binding(3) var<storage, read_write> y: array<f32>;  // [t, y_stride]

const ALIGNED: bool = {{ALIGNED}};
const XVEC: bool = {{XVEC}};
const WG: u32 = {{WG}}u;
const TM: u32 = 4u;  // rows of x per invocation (`matmul_xw::XW_TM`)

// w[n, k0 .. k0 + 4]; columns past the end are clamped to the last one (their outputs are not
// stored).
fn w_row4(n: u32, k0: u32) -> vec4<f32> {
    if (ALIGNED) {
        return w_4((n * p.k + k0) / 4u);
    }
    let e = n * p.k;
    let last = p.k - 1u;
    return vec4<f32>(w_1(e + min(k0, last)), w_1(e + min(k0 + 1u, last)), w_1(e + min(k0 + 2u, last)),
                     w_1(e + min(k0 + 3u, last)));
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

// Each invocation computes TM rows of y times 4 consecutive columns: per row n of w one group
// of 4 weights (w_4, or four w_1 when K % 4 != 0) and TM values of x feed 4 TM multiply-adds.
// With XVEC, four rows of w at a time against one x_4 load per row of x (TM + 4 loads for 16 TM
// multiply-adds instead of 4 TM + 4: on CPU drivers the cost is per load), the rest of the
// chunk's rows one at a time.
// Consecutive invocations take consecutive groups of columns (the lanes of a SIMD group read
// consecutive weights and the same x values). Rows of x past the end are clamped.
@compute @workgroup_size(WG)
fn matmul_xw(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let inv = gid.x + gid.y * nwg.x * WG;
    let kg = (p.k + 3u) / 4u;
    let tb = (p.t + TM - 1u) / TM;
    if (inv >= kg * tb) {
        return;
    }
    let k0 = (inv % kg) * 4u;
    let t0 = (inv / kg) * TM;
    let xb0 = min(t0, p.t - 1u) * p.x_stride + p.row0;
    let xb1 = min(t0 + 1u, p.t - 1u) * p.x_stride + p.row0;
    let xb2 = min(t0 + 2u, p.t - 1u) * p.x_stride + p.row0;
    let xb3 = min(t0 + 3u, p.t - 1u) * p.x_stride + p.row0;
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    var n_done = 0u;
    if (XVEC) {
        let n4 = p.n / 4u;
        for (var nn = 0u; nn < n4; nn++) {
            let n = nn * 4u;
            let w0 = w_row4(n, k0);
            let w1 = w_row4(n + 1u, k0);
            let w2 = w_row4(n + 2u, k0);
            let w3 = w_row4(n + 3u, k0);
            let x0 = x_4(xb0 / 4u + nn);
            let x1 = x_4(xb1 / 4u + nn);
            let x2 = x_4(xb2 / 4u + nn);
            let x3 = x_4(xb3 / 4u + nn);
            a0 = fma(vec4<f32>(x0.w), w3, fma(vec4<f32>(x0.z), w2, fma(vec4<f32>(x0.y), w1, fma(vec4<f32>(x0.x), w0, a0))));
            a1 = fma(vec4<f32>(x1.w), w3, fma(vec4<f32>(x1.z), w2, fma(vec4<f32>(x1.y), w1, fma(vec4<f32>(x1.x), w0, a1))));
            a2 = fma(vec4<f32>(x2.w), w3, fma(vec4<f32>(x2.z), w2, fma(vec4<f32>(x2.y), w1, fma(vec4<f32>(x2.x), w0, a2))));
            a3 = fma(vec4<f32>(x3.w), w3, fma(vec4<f32>(x3.z), w2, fma(vec4<f32>(x3.y), w1, fma(vec4<f32>(x3.x), w0, a3))));
        }
        n_done = n4 * 4u;
    }
    for (var n = n_done; n < p.n; n++) {
        let w = w_row4(n, k0);
        a0 = fma(vec4<f32>(x_1(xb0 + n)), w, a0);
        a1 = fma(vec4<f32>(x_1(xb1 + n)), w, a1);
        a2 = fma(vec4<f32>(x_1(xb2 + n)), w, a2);
        a3 = fma(vec4<f32>(x_1(xb3 + n)), w, a3);
    }
    var acc = array<vec4<f32>, 4>(a0, a1, a2, a3);
    for (var i = 0u; i < TM; i++) {
        if (t0 + i < p.t) {
            for (var j = 0u; j < 4u; j++) {
                if (k0 + j < p.k) {
                    store(t0 + i, k0 + j, acc[i][j]);
                }
            }
        }
    }
}
