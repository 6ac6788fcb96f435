// RMSNorm over the rows of x: y[r, :] = x[r, :] * inverseSqrt(mean(x[r, :]^2) + eps) * w.
// One invocation per row (rows are short: d_model); f32 accumulation.

struct RmsNormParams {
    rows: u32,
    dim: u32,
    eps: f32,
    x_offset: u32, // first element of row 0 in x (lets decode normalise one row of a block)
};

@group(0) @binding(0) var<uniform> p: RmsNormParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;        // [rows, dim] (from x_offset)
@group(0) @binding(2) var<storage, read> w: array<f32>;        // [dim]
@group(0) @binding(3) var<storage, read_write> y: array<f32>;  // [rows, dim]

@compute @workgroup_size(64)
fn rmsnorm(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if (r >= p.rows) {
        return;
    }
    let base = p.x_offset + r * p.dim;
    var ss = 0.0;
    for (var i = 0u; i < p.dim; i++) {
        let v = x[base + i];
        ss += v * v;
    }
    let scale = inverseSqrt(ss / f32(p.dim) + p.eps);
    let out = r * p.dim;
    for (var i = 0u; i < p.dim; i++) {
        y[out + i] = x[base + i] * scale * w[i];
    }
}
