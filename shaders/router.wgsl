// FiRST router gate: p = sigmoid(w2 . silu(w1 . rmsnorm(mean_t h[t, :]) + b1) + b2), or
// sigmoid(w1 . rmsnorm(mean) + b1) when r = 0; p goes to probs[slot].
//
// router_colsum (only when rows > BLOCK_ROWS): one invocation per (column, block of BLOCK_ROWS
//   rows) writes the block's column sum to partial[block, c]; blocks run in parallel.
// router_mlp (one workgroup of 256): column means (from the partial sums, or straight from h
//   when blocks = 0), RMSNorm into a scratch row of `partial`, the hidden layer with groups of
//   32 lanes per hidden unit (coalesced reads of w1), and the output unit.

struct RouterParams {
    rows: u32,       // T
    dim: u32,        // d
    blocks: u32,     // blocks of partial sums; 0: router_mlp sums h itself
    block_rows: u32, // rows per block
    r: u32,          // hidden units; 0: a single linear unit
    slot: u32,       // index into probs
    eps: f32,
    _pad0: u32,
};

@group(0) @binding(0) var<uniform> p: RouterParams;
@group(0) @binding(1) var<storage, read> h: array<f32>;              // [T, d] f32
@group(0) @binding(2) var<storage, read_write> partial: array<f32>;  // [blocks, d] sums, then [d] scratch
@group(0) @binding(3) var<storage, read> norm: array<f32>;           // [d] f32
@group(0) @binding(4) var<storage, read> w1: array<f32>;             // [max(r, 1), d] f32
@group(0) @binding(5) var<storage, read> b1: array<f32>;             // [max(r, 1)] f32
@group(0) @binding(6) var<storage, read> w2: array<f32>;             // [r] f32 (unused when r = 0)
@group(0) @binding(7) var<storage, read> b2: array<f32>;             // [1] f32 (unused when r = 0)
@group(0) @binding(8) var<storage, read_write> probs: array<f32>;    // [n_layers] f32

@compute @workgroup_size(64)
fn router_colsum(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let c = gid.x;
    let b = wg.y;
    if (c >= p.dim || b >= p.blocks) {
        return;
    }
    let t0 = b * p.block_rows;
    let t1 = min(t0 + p.block_rows, p.rows);
    var s = 0.0;
    for (var t = t0; t < t1; t++) {
        s += h[t * p.dim + c];
    }
    partial[b * p.dim + c] = s;
}

{{ROUTER_GROUPS}}

{{TREE_SUM}}

{{SIGMOID}}

@compute @workgroup_size(256)
fn router_mlp(@builtin(local_invocation_index) tid: u32) {
    let d = p.dim;
    let xoff = p.blocks * d; // the scratch row after the partial sums
    let inv_rows = 1.0 / f32(p.rows);
    var ss = 0.0;
    for (var c = tid; c < d; c += 256u) {
        var s = 0.0;
        if (p.blocks == 0u) {
            for (var t = 0u; t < p.rows; t++) {
                s += h[t * d + c];
            }
        } else {
            for (var b = 0u; b < p.blocks; b++) {
                s += partial[b * d + c];
            }
        }
        let m = s * inv_rows;
        partial[xoff + c] = m;
        ss += m * m;
    }
    red[tid] = ss;
    tree_sum(tid);
    let scale = inverseSqrt(red[0] / f32(d) + p.eps);
    // Each invocation rescales the columns it wrote itself.
    for (var c = tid; c < d; c += 256u) {
        partial[xoff + c] = partial[xoff + c] * scale * norm[c];
    }
    storageBarrier();

    // Hidden layer: group g handles units j = g, g + GROUPS, ...; lane l columns l, l + LANES, ...
    let g = tid / LANES;
    let lane = tid % LANES;
    let nh = max(p.r, 1u);
    let rounds = (nh + GROUPS - 1u) / GROUPS;
    var out = 0.0; // this invocation's share of the output unit's pre-activation (lane 0 only)
    for (var k = 0u; k < rounds; k++) {
        let j = k * GROUPS + g;
        var part = 0.0;
        if (j < nh) {
            for (var c = lane; c < d; c += LANES) {
                part += w1[j * d + c] * partial[xoff + c];
            }
        }
        workgroupBarrier(); // red is free again
        red[tid] = part;
        workgroupBarrier();
        if (lane == 0u && j < nh) {
            var a = b1[j];
            for (var l = 0u; l < LANES; l++) {
                a += red[tid + l];
            }
            if (p.r > 0u) {
                out += w2[j] * a * sigmoid(a);
            } else {
                out += a;
            }
        }
    }
    workgroupBarrier();
    red[tid] = out;
    tree_sum(tid);
    if (tid == 0u) {
        var z = red[0];
        if (p.r > 0u) {
            z += b2[0];
        }
        probs[p.slot] = sigmoid(z);
    }
}
