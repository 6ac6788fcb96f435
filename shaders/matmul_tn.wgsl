// Transpose-first product of two f32 activations: c[c_offset + m * c_stride + n] (+)= scale *
// sum_t p[t * p_stride + p_col0 + m] * q[t * q_stride + q_col0 + n] for m < M, n < N, i.e.
// C = scale * P^T Q with the reduction over the T rows (tokens). LoRA's weight gradients:
// dB = s * dY^T a and dA = da^T x. Accumulation is in f32.
//
// Placeholder: WG, the workgroup size.

struct MatmulTnParams {
    t: u32,         // rows of p and q (tokens): the reduction length
    m: u32,         // columns of p used: rows of c
    n: u32,         // columns of q used: columns of c
    p_stride: u32,  // elements between rows of p
    p_col0: u32,    // first column of p read
    q_stride: u32,  // elements between rows of q
    q_col0: u32,    // first column of q read
    c_stride: u32,  // elements between rows of c
    c_offset: u32,  // element of c[0, 0]
    flags: u32,     // bit 0: accumulate into c; bit 2: multiply the product by scale
    scale: f32,     // used with flag bit 2, before accumulation
    _pad0: u32,
};

@group(0) @binding(0) var<uniform> p: MatmulTnParams;
@group(0) @binding(1) var<storage, read> pm: array<f32>;       // [t, p_stride]
@group(0) @binding(2) var<storage, read> qm: array<f32>;       // [t, q_stride]
@group(0) @binding(3) var<storage, read_write> c: array<f32>;  // [m, c_stride] from c_offset

const WG: u32 = {{WG}}u;

fn store(m: u32, n: u32, v: f32) {
    var s = v;
    if ((p.flags & 4u) != 0u) {
        s *= p.scale;
    }
    let i = p.c_offset + m * p.c_stride + n;
    if ((p.flags & 1u) != 0u) {
        s += c[i];
    }
    c[i] = s;
}

// Each invocation computes a 4 x 4 block of c: per row t four values of p and four of q feed 16
// multiply-adds. Consecutive invocations take consecutive blocks of columns (the lanes of a SIMD
// group read neighbouring q values and the same p values). Indices past the end are clamped
// (their outputs are not stored).
@compute @workgroup_size(WG)
fn matmul_tn(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let inv = gid.x + gid.y * nwg.x * WG;
    let nb = (p.n + 3u) / 4u;
    let mb = (p.m + 3u) / 4u;
    if (inv >= nb * mb) {
        return;
    }
    let n0 = (inv % nb) * 4u;
    let m0 = (inv / nb) * 4u;
    let pm0 = p.p_col0 + min(m0, p.m - 1u);
    let pm1 = p.p_col0 + min(m0 + 1u, p.m - 1u);
    let pm2 = p.p_col0 + min(m0 + 2u, p.m - 1u);
    let pm3 = p.p_col0 + min(m0 + 3u, p.m - 1u);
    let qn0 = p.q_col0 + min(n0, p.n - 1u);
    let qn1 = p.q_col0 + min(n0 + 1u, p.n - 1u);
    let qn2 = p.q_col0 + min(n0 + 2u, p.n - 1u);
    let qn3 = p.q_col0 + min(n0 + 3u, p.n - 1u);
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    for (var t = 0u; t < p.t; t++) {
        let pr = t * p.p_stride;
        let qr = t * p.q_stride;
        let qv = vec4<f32>(qm[qr + qn0], qm[qr + qn1], qm[qr + qn2], qm[qr + qn3]);
        a0 = fma(vec4<f32>(pm[pr + pm0]), qv, a0);
        a1 = fma(vec4<f32>(pm[pr + pm1]), qv, a1);
        a2 = fma(vec4<f32>(pm[pr + pm2]), qv, a2);
        a3 = fma(vec4<f32>(pm[pr + pm3]), qv, a3);
    }
    var acc = array<vec4<f32>, 4>(a0, a1, a2, a3);
    for (var i = 0u; i < 4u; i++) {
        if (m0 + i < p.m) {
            for (var j = 0u; j < 4u; j++) {
                if (n0 + j < p.n) {
                    store(m0 + i, n0 + j, acc[i][j]);
                }
            }
        }
    }
}
