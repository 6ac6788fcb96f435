// Cross-entropy of the LM head's logits z = h · Wᵀ (h [T, d] after the final norm, W [vocab, d])
// against targets, over the rows the mask counts, and its gradient with respect to h, with the
// vocabulary processed in chunks of columns so that [T, vocab] logits are never held:
//   loss = (1 / count) sum_{counted t} (lse_t - z[t, target_t]),  lse_t = log sum_v exp(z[t, v])
//   dh[t] = (1 / count) sum_v (softmax(z[t])_v - [v == target_t]) W[v]   (0 for rows not counted)
// The products are the forward's and the backward's linear kernels on the chunk's rows of W
// (`matmul`, `matmul_xw`, see `kernels::cross_entropy`); this file holds the rest. Pass 1, per
// chunk: the logits product, ce_update (online logsumexp: running max m and sum l per row). Then
// ce_finish (lse per row, count, loss). Pass 2, per chunk: the logits product again, ce_grad (the
// chunk's logits become the gradient of the logits, in place), the product dh (+)= grad · W_chunk.
//
// Entry points (each uses bindings 0..n in order; names differ because the bindings differ):
//   ce_update: 1 targets [T] u32, 2 mask [T] u32, 3 stats [T + 1] vec4, 4 logits_in [T, cols] f32
//   ce_finish: 1 targets, 2 mask, 3 stats, 4 loss [1] f32
//   ce_grad:   1 targets, 2 mask, 3 stats, 4 grad (= the logits scratch) [T, cols] f32
// stats[t] = (m, l, z[t, target_t], lse_t) for a counted row t; stats[T] = (1 / count, count, 0, 0).

struct CeParams {
    rows: u32,    // T
    vocab: u32,   // rows of the whole W
    col0: u32,    // vocabulary index of this chunk's first column
    cols: u32,    // columns in this chunk (the row stride of the logits scratch)
};

@group(0) @binding(0) var<uniform> p: CeParams;

@group(0) @binding(1) var<storage, read> targets: array<u32>;
@group(0) @binding(2) var<storage, read> mask: array<u32>;
@group(0) @binding(3) var<storage, read_write> stats: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> logits_in: array<f32>;
@group(0) @binding(4) var<storage, read_write> loss: array<f32>;
@group(0) @binding(4) var<storage, read_write> grad: array<f32>;

const NEG_BIG: f32 = -3.0e38;

fn linear_index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 64u;
}

// Online logsumexp over this chunk for each counted row; the first chunk (col0 = 0) starts afresh.
@compute @workgroup_size(64)
fn ce_update(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = linear_index(gid, nwg);
    if (t >= p.rows || mask[t] == 0u) {
        return;
    }
    var s = vec4<f32>(NEG_BIG, 0.0, 0.0, 0.0);
    if (p.col0 != 0u) {
        s = stats[t];
    }
    let lb = t * p.cols;
    var cm = NEG_BIG;
    for (var c = 0u; c < p.cols; c++) {
        cm = max(cm, logits_in[lb + c]);
    }
    let m = max(s.x, cm);
    var l = s.y * exp(s.x - m);
    for (var c = 0u; c < p.cols; c++) {
        l += exp(logits_in[lb + c] - m);
    }
    var zt = s.z;
    let tgt = targets[t];
    if (tgt >= p.col0 && tgt - p.col0 < p.cols) {
        zt = logits_in[lb + tgt - p.col0];
    }
    stats[t] = vec4<f32>(m, l, zt, 0.0);
}

// One invocation: lse per counted row, the count and the mean loss (NaN when a counted row's
// target is outside the vocabulary; 0 when no row counts).
@compute @workgroup_size(1)
fn ce_finish() {
    var count = 0u;
    var sum = 0.0;
    var bad = false;
    for (var t = 0u; t < p.rows; t++) {
        if (mask[t] == 0u) {
            continue;
        }
        let s = stats[t];
        let lse = s.x + log(s.y);
        stats[t].w = lse;
        count += 1u;
        sum += lse - s.z;
        bad = bad || targets[t] >= p.vocab;
    }
    var inv = 0.0;
    if (count > 0u) {
        inv = 1.0 / f32(count);
    }
    stats[p.rows] = vec4<f32>(inv, f32(count), 0.0, 0.0);
    var nan_bits = 0x7fc00000u;
    loss[0] = select(sum * inv, bitcast<f32>(nan_bits), bad);
}

// grad[t, c] = (softmax(z[t])_{col0 + c} - [col0 + c == target_t]) / count for counted rows, else 0.
@compute @workgroup_size(64)
fn ce_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = linear_index(gid, nwg);
    let t = idx / p.cols;
    let c = idx - t * p.cols;
    if (t >= p.rows) {
        return;
    }
    let i = t * p.cols + c;
    if (mask[t] == 0u) {
        grad[i] = 0.0;
        return;
    }
    var g = exp(grad[i] - stats[t].w);
    if (p.col0 + c == targets[t]) {
        g -= 1.0;
    }
    grad[i] = g * stats[p.rows].x;
}
