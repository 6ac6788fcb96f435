// Cross-entropy of the LM head's logits z = h · Wᵀ (h [T, d] after the final norm, W [vocab, d])
// against targets, over the rows the mask counts, and its gradient with respect to h, with the
// vocabulary processed in chunks of columns so that [T, vocab] logits are never held:
//   loss = (1 / count) sum_{counted t} (lse_t - z[t, target_t]),  lse_t = log sum_v exp(z[t, v])
//   dh[t] = (1 / count) sum_v (softmax(z[t])_v - [v == target_t]) W[v]   (0 for rows not counted)
// The products are the forward's and the backward's linear kernels on the chunk's rows of W
// (`matmul`, `matmul_xw`, see `kernels::cross_entropy`); this file holds the rest. One pass over
// the chunks: the logits product, ce_update (online logsumexp: running max m and sum l per row,
// and the factor exp(m_old - m_new) by which the running max moved); with the gradient also
// ce_prob (the chunk's logits become exp(z - m_new) in place, and the running sum
// S[t] = sum_v exp(z[t, v] - m_t) W[v] is rescaled by that factor) and the product S += the
// scratch · W_chunk. Then ce_finish (lse per row, count, loss) and, with the gradient, the
// targets' rows of W gathered by the embedding kernel and ce_dh: dh[t] (+)= (S[t] / l_t -
// W[target_t]) / count. The softmax-weighted sum is the online-softmax rescaling of Milakov and
// Gimelshein (2018) applied to the gradient's sum, so each chunk's logits are computed once.
//
// Entry points (each uses bindings 0..n in order; names differ because the bindings differ):
//   ce_update: 1 targets [T] u32, 2 mask [T] u32, 3 stats [T + 1] vec4, 4 logits_in [T, cols] f32
//   ce_finish: 1 targets, 2 mask, 3 stats, 4 loss [1] f32
//   ce_prob:   1 targets, 2 mask, 3 stats, 4 grad (= the logits scratch) [T, cols] f32,
//              5 dh_sum [T, d] f32
//   ce_dh:     1 targets, 2 mask, 3 stats, 4 dh [T, d] f32, 5 dh_sum, 6 w_target [T, d] f32
// stats[t] = (m, l, z[t, target_t], exp(m_old - m)) for a counted row t during the chunks, the
// last field lse_t after ce_finish; stats[T] = (1 / count, count, 0, 0).

struct CeParams {
    rows: u32,        // T
    vocab: u32,       // rows of the whole W
    col0: u32,        // vocabulary index of this chunk's first column
    cols: u32,        // columns in this chunk (the row stride of the logits scratch)
    dim: u32,         // d: columns of h, W, dh
    accumulate: u32,  // ce_dh: 1 adds into dh
    _pad0: u32,
    _pad1: u32,
};

@group(0) @binding(0) var<uniform> p: CeParams;

@group(0) @binding(1) var<storage, read> targets: array<u32>;
@group(0) @binding(2) var<storage, read> mask: array<u32>;
@group(0) @binding(3) var<storage, read_write> stats: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> logits_in: array<f32>;
@group(0) @binding(4) var<storage, read_write> loss: array<f32>;
@group(0) @binding(4) var<storage, read_write> grad: array<f32>;
@group(0) @binding(4) var<storage, read_write> dh: array<f32>;
@group(0) @binding(5) var<storage, read_write> dh_sum: array<f32>;
@group(0) @binding(6) var<storage, read> w_target: array<f32>;

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
    stats[t] = vec4<f32>(m, l, zt, exp(s.x - m));
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

// Over [T, max(cols, d)]: grad[t, c] = exp(z[t, col0 + c] - m_t) for counted rows whose target
// is in the vocabulary (the rows ce_dh fills), else 0; and dh_sum[t, :] *= exp(m_old - m_t) (set
// to 0 on the first chunk and for the other rows).
@compute @workgroup_size(64)
fn ce_prob(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = linear_index(gid, nwg);
    if (idx < p.rows * p.cols) {
        let t = idx / p.cols;
        var g = 0.0;
        if (mask[t] != 0u && targets[t] < p.vocab) {
            g = exp(grad[idx] - stats[t].x);
        }
        grad[idx] = g;
    }
    if (idx < p.rows * p.dim) {
        let t = idx / p.dim;
        var a = 0.0;
        if (mask[t] != 0u && targets[t] < p.vocab && p.col0 != 0u) {
            a = dh_sum[idx] * stats[t].w;
        }
        dh_sum[idx] = a;
    }
}

// dh[t, j] (+)= (dh_sum[t, j] / l_t - w_target[t, j]) / count for counted rows whose target is in
// the vocabulary; other rows get 0 (or keep dh with accumulate). A counted row with a target
// outside the vocabulary has made the loss NaN already.
@compute @workgroup_size(64)
fn ce_dh(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = linear_index(gid, nwg);
    if (idx >= p.rows * p.dim) {
        return;
    }
    let t = idx / p.dim;
    var g = 0.0;
    if (mask[t] != 0u && targets[t] < p.vocab) {
        g = (dh_sum[idx] / stats[t].y - w_target[idx]) * stats[p.rows].x;
    }
    if (p.accumulate != 0u) {
        g += dh[idx];
    }
    dh[idx] = g;
}
