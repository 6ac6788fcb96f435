// Cross-entropy of the LM head's logits z = h · Wᵀ (h [T, d] after the final norm, W [vocab, d])
// against targets, over the rows the mask counts, and its gradient with respect to h, with the
// vocabulary processed in chunks of columns so that [T, vocab] logits are never held:
//   loss = (1 / count) sum_{counted t} (lse_t - z[t, target_t]),  lse_t = log sum_v exp(z[t, v])
//   dh[t] = (1 / count) sum_v (softmax(z[t])_v - [v == target_t]) W[v]   (0 for rows not counted)
// Pass 1, per chunk: ce_logits, ce_update (online logsumexp: running max m and sum l per row).
// Then ce_finish (lse per row, count, loss). Pass 2, per chunk: ce_logits again, ce_grad (the
// chunk's logits become the gradient of the logits, in place), ce_dh (dh (+)= grad · W_chunk).
//
// Entry points (each uses bindings 0..n in order; names differ because the bindings differ):
//   ce_logits: 1 h [T, d] f32 (H_DECL: accessors h_4, h_1), 2 w (W_DECL: the weight chunk), 3 logits [T, chunk] f32
//   ce_update: 1 targets [T] u32, 2 mask [T] u32, 3 stats [T + 1] vec4, 4 logits_in
//   ce_finish: 1 targets, 2 mask, 3 stats, 4 loss [1] f32
//   ce_grad:   1 targets, 2 mask, 3 stats, 4 grad (= the logits scratch)
//   ce_dh:     1 grad_in (= the logits scratch), 2 w, 3 dh [T, d] f32
// stats[t] = (m, l, z[t, target_t], lse_t) for a counted row t; stats[T] = (1 / count, count, 0, 0).
// W is read through the accessors w_4 (ALIGNED: d % 4 == 0, so rows start on a vec4 boundary)
// and w_1, for any weight kind; the chunk's column c is row w_row0 + c of the weight chunk.

struct CeParams {
    rows: u32,    // T
    dim: u32,     // d
    vocab: u32,   // rows of the whole W
    col0: u32,    // vocabulary index of this chunk's first column
    cols: u32,    // columns in this chunk
    w_row0: u32,  // row of the weight chunk (buffer) holding column col0
    chunk: u32,   // row stride of the logits scratch
    flags: u32,   // bit 0: ce_dh adds into dh instead of overwriting it
};

@group(0) @binding(0) var<uniform> p: CeParams;

{{H_DECL}}
{{W_DECL}}
@group(0) @binding(3) var<storage, read_write> logits: array<f32>;

@group(0) @binding(1) var<storage, read> targets: array<u32>;
@group(0) @binding(2) var<storage, read> mask: array<u32>;
@group(0) @binding(3) var<storage, read_write> stats: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> logits_in: array<f32>;
@group(0) @binding(4) var<storage, read_write> loss: array<f32>;
@group(0) @binding(4) var<storage, read_write> grad: array<f32>;

@group(0) @binding(1) var<storage, read> grad_in: array<f32>;
@group(0) @binding(3) var<storage, read_write> dh: array<f32>;

const ALIGNED: bool = {{ALIGNED}};
const NEG_BIG: f32 = -3.0e38;

fn linear_index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 64u;
}

// Values 4j .. 4j+3 of row r of the weight chunk (zero past d).
fn w_row4(r: u32, j: u32) -> vec4<f32> {
    if (ALIGNED) {
        return w_4(r * (p.dim / 4u) + j);
    }
    var v = vec4<f32>(0.0);
    let n = min(p.dim - 4u * j, 4u);
    for (var k = 0u; k < n; k++) {
        v[k] = w_1(r * p.dim + 4u * j + k);
    }
    return v;
}

// Values 4j .. 4j+3 of row t of h (zero past d).
fn h_row4(t: u32, j: u32) -> vec4<f32> {
    if (ALIGNED) {
        return h_4(t * (p.dim / 4u) + j);
    }
    var v = vec4<f32>(0.0);
    let n = min(p.dim - 4u * j, 4u);
    for (var k = 0u; k < n; k++) {
        v[k] = h_1(t * p.dim + 4u * j + k);
    }
    return v;
}

// logits[t, c] = h[t] · W[col0 + c] for t < T, c < cols. Each invocation computes a block of
// 4 rows x 4 columns (16 named accumulators: 8 loads per 16 dot products); rows and columns
// past the end are clamped for the loads and skipped at the stores.
@compute @workgroup_size(64)
fn ce_logits(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = linear_index(gid, nwg);
    let col_blocks = (p.cols + 3u) / 4u;
    let t0 = (idx / col_blocks) * 4u;
    let c0 = (idx % col_blocks) * 4u;
    if (t0 >= p.rows) {
        return;
    }
    let r0 = min(t0, p.rows - 1u);
    let r1 = min(t0 + 1u, p.rows - 1u);
    let r2 = min(t0 + 2u, p.rows - 1u);
    let r3 = min(t0 + 3u, p.rows - 1u);
    let w0r = p.w_row0 + min(c0 + 0u, p.cols - 1u);
    let w1r = p.w_row0 + min(c0 + 1u, p.cols - 1u);
    let w2r = p.w_row0 + min(c0 + 2u, p.cols - 1u);
    let w3r = p.w_row0 + min(c0 + 3u, p.cols - 1u);
    var a00 = 0.0;
    var a01 = 0.0;
    var a02 = 0.0;
    var a03 = 0.0;
    var a10 = 0.0;
    var a11 = 0.0;
    var a12 = 0.0;
    var a13 = 0.0;
    var a20 = 0.0;
    var a21 = 0.0;
    var a22 = 0.0;
    var a23 = 0.0;
    var a30 = 0.0;
    var a31 = 0.0;
    var a32 = 0.0;
    var a33 = 0.0;
    let groups = (p.dim + 3u) / 4u;
    for (var j = 0u; j < groups; j++) {
        let x0 = h_row4(r0, j);
        let x1 = h_row4(r1, j);
        let x2 = h_row4(r2, j);
        let x3 = h_row4(r3, j);
        let w0 = w_row4(w0r, j);
        let w1 = w_row4(w1r, j);
        let w2 = w_row4(w2r, j);
        let w3 = w_row4(w3r, j);
        a00 += dot(x0, w0);
        a01 += dot(x0, w1);
        a02 += dot(x0, w2);
        a03 += dot(x0, w3);
        a10 += dot(x1, w0);
        a11 += dot(x1, w1);
        a12 += dot(x1, w2);
        a13 += dot(x1, w3);
        a20 += dot(x2, w0);
        a21 += dot(x2, w1);
        a22 += dot(x2, w2);
        a23 += dot(x2, w3);
        a30 += dot(x3, w0);
        a31 += dot(x3, w1);
        a32 += dot(x3, w2);
        a33 += dot(x3, w3);
    }
    if (t0 + 0u < p.rows) {
        let b = (t0 + 0u) * p.chunk + c0;
        if (c0 + 0u < p.cols) { logits[b + 0u] = a00; }
        if (c0 + 1u < p.cols) { logits[b + 1u] = a01; }
        if (c0 + 2u < p.cols) { logits[b + 2u] = a02; }
        if (c0 + 3u < p.cols) { logits[b + 3u] = a03; }
    }
    if (t0 + 1u < p.rows) {
        let b = (t0 + 1u) * p.chunk + c0;
        if (c0 + 0u < p.cols) { logits[b + 0u] = a10; }
        if (c0 + 1u < p.cols) { logits[b + 1u] = a11; }
        if (c0 + 2u < p.cols) { logits[b + 2u] = a12; }
        if (c0 + 3u < p.cols) { logits[b + 3u] = a13; }
    }
    if (t0 + 2u < p.rows) {
        let b = (t0 + 2u) * p.chunk + c0;
        if (c0 + 0u < p.cols) { logits[b + 0u] = a20; }
        if (c0 + 1u < p.cols) { logits[b + 1u] = a21; }
        if (c0 + 2u < p.cols) { logits[b + 2u] = a22; }
        if (c0 + 3u < p.cols) { logits[b + 3u] = a23; }
    }
    if (t0 + 3u < p.rows) {
        let b = (t0 + 3u) * p.chunk + c0;
        if (c0 + 0u < p.cols) { logits[b + 0u] = a30; }
        if (c0 + 1u < p.cols) { logits[b + 1u] = a31; }
        if (c0 + 2u < p.cols) { logits[b + 2u] = a32; }
        if (c0 + 3u < p.cols) { logits[b + 3u] = a33; }
    }
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
    let lb = t * p.chunk;
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
    let i = t * p.chunk + c;
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

// dh[t, 4j .. 4j+3] (+)= sum_c grad[t, c] W[col0 + c, 4j .. 4j+3] for rows t0 .. t0+3 of one
// invocation (one load of W per four rows; rows past the end clamped for loads, skipped at stores).
@compute @workgroup_size(64)
fn ce_dh(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = linear_index(gid, nwg);
    let groups = (p.dim + 3u) / 4u;
    let t0 = (idx / groups) * 4u;
    let j = idx % groups;
    if (t0 >= p.rows) {
        return;
    }
    let g0 = min(t0, p.rows - 1u) * p.chunk;
    let g1 = min(t0 + 1u, p.rows - 1u) * p.chunk;
    let g2 = min(t0 + 2u, p.rows - 1u) * p.chunk;
    let g3 = min(t0 + 3u, p.rows - 1u) * p.chunk;
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    for (var c = 0u; c < p.cols; c++) {
        let w = w_row4(p.w_row0 + c, j);
        a0 = fma(vec4<f32>(grad_in[g0 + c]), w, a0);
        a1 = fma(vec4<f32>(grad_in[g1 + c]), w, a1);
        a2 = fma(vec4<f32>(grad_in[g2 + c]), w, a2);
        a3 = fma(vec4<f32>(grad_in[g3 + c]), w, a3);
    }
    store_dh(t0, j, a0);
    store_dh(t0 + 1u, j, a1);
    store_dh(t0 + 2u, j, a2);
    store_dh(t0 + 3u, j, a3);
}

// dh[t, 4j .. 4j+3] (+)= v for a row t < T, the lanes below d.
fn store_dh(t: u32, j: u32, v: vec4<f32>) {
    if (t >= p.rows) {
        return;
    }
    let n = min(p.dim - 4u * j, 4u);
    let ob = t * p.dim + 4u * j;
    for (var k = 0u; k < n; k++) {
        var x = v[k];
        if ((p.flags & 1u) != 0u) {
            x += dh[ob + k];
        }
        dh[ob + k] = x;
    }
}
