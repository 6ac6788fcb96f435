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

// Output element i = (t, j) of the forward: gate_up's offsets of its gate and up values, and the
// values.
struct GateUp {
    at_gate: u32, // t * 2 * ff + j
    at_up: u32,   // at_gate + ff
    g: f32,
    u: f32,
};

fn gate_up_of(i: u32) -> GateUp {
    let t = i / p.ff;
    let at_gate = t * 2u * p.ff + (i - t * p.ff);
    let at_up = at_gate + p.ff;
    return GateUp(at_gate, at_up, gate_up[at_gate], gate_up[at_up]);
}

@compute @workgroup_size(256)
fn swiglu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.rows * p.ff) {
        return;
    }
    let x = gate_up_of(i);
    out[i] = x.g * sigmoid(x.g) * x.u;
}

@compute @workgroup_size(256)
fn swiglu_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.rows * p.ff) {
        return;
    }
    let x = gate_up_of(i);
    let s = sigmoid(x.g);
    let d = d_act[i];
    out[x.at_gate] = d * x.u * s * (1.0 + x.g * (1.0 - s));
    out[x.at_up] = d * x.g * s;
}
