// Global-norm gradient clipping of the gradients times grad_scale (1 / batch for a batch mean of
// summed gradients): norm = grad_scale * sqrt(sum over every gradient buffer of sum g^2),
// scale = grad_scale * (max_norm / norm when norm > max_norm, else exactly 1).
// grad_sumsq (one dispatch per gradient buffer, `groups` workgroups of 256): workgroup wg sums
//   g[i]^2 over i = wg * 256 + lane + k * groups * 256 and writes it to sums[first + wg].
// clip_scale (one workgroup of 256): sums sums[0..slots], writes sums[slots] = scale and
//   sums[slots + 1] = norm.
// Every sum runs in a fixed order (lane strides, then a tree), so results repeat bit for bit.

struct ClipParams {
    n: u32,         // grad_sumsq: elements of this gradient buffer
    first: u32,     // grad_sumsq: first slot of this buffer's partial sums
    groups: u32,    // grad_sumsq: workgroups of this dispatch
    slots: u32,     // clip_scale: partial sums in all
    max_norm: f32,  // clip_scale: the clipping threshold (> 0)
    grad_scale: f32, // clip_scale: the factor the buffers' gradients are taken times (> 0)
    _pad1: u32,
    _pad2: u32,
};

@group(0) @binding(0) var<uniform> p: ClipParams;
@group(0) @binding(1) var<storage, read_write> sums: array<f32>;  // [slots + 2]: partial sums | scale | norm
@group(0) @binding(2) var<storage, read> grad: array<f32>;        // [n] (grad_sumsq only)

{{TREE_SUM}}

@compute @workgroup_size(256)
fn grad_sumsq(@builtin(local_invocation_index) lane: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    var s = 0.0;
    for (var i = wg.x * 256u + lane; i < p.n; i += p.groups * 256u) {
        let g = grad[i];
        s += g * g;
    }
    red[lane] = s;
    tree_sum(lane);
    if (lane == 0u) {
        sums[p.first + wg.x] = red[0];
    }
}

@compute @workgroup_size(256)
fn clip_scale(@builtin(local_invocation_index) lane: u32) {
    var s = 0.0;
    for (var i = lane; i < p.slots; i += 256u) {
        s += sums[i];
    }
    red[lane] = s;
    tree_sum(lane);
    if (lane == 0u) {
        let norm = p.grad_scale * sqrt(red[0]);
        sums[p.slots] = p.grad_scale * select(1.0, p.max_norm / norm, norm > p.max_norm);
        sums[p.slots + 1u] = norm;
    }
}
