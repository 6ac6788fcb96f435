// SwiGLU: out[t, j] = silu(gate_up[t, j]) * gate_up[t, ff + j], silu(x) = x * sigmoid(x).
// One invocation per output element; the sigmoid never overflows (exp of a non-positive value).
// swiglu_backward: out is d(gate_up) [rows, 2 * ff], from d_act [rows, ff] (binding 3):
//   d_gate = d_act * up * sigmoid(g) * (1 + g * (1 - sigmoid(g))),  d_up = d_act * silu(g).

struct SwigluParams {
    rows: u32,
    ff: u32,
    _pad0: u32,
    _pad1: u32,
};

@group(0) @binding(0) var<uniform> p: SwigluParams;
@group(0) @binding(1) var<storage, read> gate_up: array<f32>;   // [rows, 2 * ff] f32: gate | up
@group(0) @binding(2) var<storage, read_write> out: array<f32>; // [rows, ff] f32; backward: [rows, 2 * ff]
@group(0) @binding(3) var<storage, read> d_act: array<f32>;     // [rows, ff] f32 (backward only)

{{SIGMOID}}

@compute @workgroup_size(256)
fn swiglu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.rows * p.ff) {
        return;
    }
    let t = i / p.ff;
    let j = i - t * p.ff;
    let base = t * 2u * p.ff;
    let g = gate_up[base + j];
    let u = gate_up[base + p.ff + j];
    out[i] = g * sigmoid(g) * u;
}

@compute @workgroup_size(256)
fn swiglu_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.rows * p.ff) {
        return;
    }
    let t = i / p.ff;
    let j = i - t * p.ff;
    let base = t * 2u * p.ff;
    let g = gate_up[base + j];
    let u = gate_up[base + p.ff + j];
    let s = sigmoid(g);
    let d = d_act[i];
    out[base + j] = d * u * s * (1.0 + g * (1.0 - s));
    out[base + p.ff + j] = d * g * s;
}
