// FiRST's gated layer output and its backward (issue 13). The forward mixes the layer's output
// y = layer(h) (residual included) with its input h under a gate g known on the CPU:
//   mix[i] = h[i] + g * (y[i] - h[i])
// and, with dmix = dL/dmix (straight-through for the gate's probability p):
//   dp[slot] += sum_i dmix[i] * (y[i] - h[i]),   dy[i] = g * dmix[i],   dh[i] = (1 - g) * dmix[i]
//
// Entry points (each uses bindings 0..n in order; names differ because the bindings differ):
//   gate_mix:      1 h_mix [n] f32, 2 y_mix [n] f32 (the mix is written over y)
//   gate_backward: 1 h [n], 2 y [n], 3 dh [n] (dmix in, (1 - g) dmix out), 4 dy [n],
//                  5 partial [groups]: one workgroup's sum of dmix * (y - h) each
//   gate_finish:   1 partial_in [groups], 2 dp [slots]
// gate_backward's workgroup wg sums over i = wg * 256 + lane + k * groups * 256, then a tree;
// gate_finish adds the partial sums with lane strides and a tree: a fixed order, so the result
// repeats bit for bit (no atomics).

struct GateParams {
    n: u32,       // elements
    g: f32,       // the gate
    groups: u32,  // workgroups of gate_backward (partial sums)
    slot: u32,    // gate_finish: the element of dp added to
};

@group(0) @binding(0) var<uniform> p: GateParams;

@group(0) @binding(1) var<storage, read> h_mix: array<f32>;
@group(0) @binding(2) var<storage, read_write> y_mix: array<f32>;

@group(0) @binding(1) var<storage, read> h: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read_write> dh: array<f32>;
@group(0) @binding(4) var<storage, read_write> dy: array<f32>;
@group(0) @binding(5) var<storage, read_write> partial: array<f32>;

@group(0) @binding(1) var<storage, read> partial_in: array<f32>;
@group(0) @binding(2) var<storage, read_write> dp: array<f32>;

@compute @workgroup_size(256)
fn gate_mix(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) {
        return;
    }
    let hi = h_mix[i];
    y_mix[i] = hi + p.g * (y_mix[i] - hi);
}

{{TREE_SUM}}

@compute @workgroup_size(256)
fn gate_backward(@builtin(local_invocation_index) lane: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    var s = 0.0;
    for (var i = wg.x * 256u + lane; i < p.n; i += p.groups * 256u) {
        let d = dh[i];
        s += d * (y[i] - h[i]);
        dy[i] = p.g * d;
        dh[i] = (1.0 - p.g) * d;
    }
    red[lane] = s;
    tree_sum(lane);
    if (lane == 0u) {
        partial[wg.x] = red[0];
    }
}

@compute @workgroup_size(256)
fn gate_finish(@builtin(local_invocation_index) lane: u32) {
    var s = 0.0;
    for (var i = lane; i < p.groups; i += 256u) {
        s += partial_in[i];
    }
    red[lane] = s;
    tree_sum(lane);
    if (lane == 0u) {
        dp[p.slot] += red[0];
    }
}
