// Causal attention with GQA over an f32 KV cache. A query of step row t sits at position
// pos = step.pos0 + t and attends to cache rows 0..=pos; query head h reads kv head h / group.
// scale = 1/sqrt(head_dim) is folded into q; softmax is online (running max m, sum l, weighted
// sum acc) in f32.
//
// Entry points (each uses bindings 0..n in order; names differ because the bindings differ):
//   attn_rows:    one invocation per (t, h) over all its keys, writes out directly (prefill).
//   attn_split:   flash-decoding: one invocation per (t, split s, h) over keys
//                 [s*keys_per_split, (s+1)*keys_per_split) ∩ [0, pos], writes partial (m, l, acc).
//   attn_combine: one invocation per (t, h, 4-lane group j of head_dim) merges the partials.
// The placeholder HD is head_dim and HD4 = ceil(head_dim / 4); q/k/v are read through q4/k4/v4 (a vec4
// of head_dim lanes 4j..4j+3 of the head starting at element `base`, zero past head_dim) and out
// written through store_out; the DECLS_* placeholders declare them for the vec4 (head_dim % 4 == 0) or the
// scalar layout.

const HD: u32 = {{HD}}u;
const HD4: u32 = {{HD4}}u;

struct AttnParams {
    rows: u32,            // T the dispatch was prepared for (the step's n_tokens may be smaller)
    n_heads: u32,
    group: u32,           // n_heads / n_kv_heads
    q_stride: u32,        // n_heads * head_dim (row stride of q and out)
    kv_stride: u32,       // n_kv_heads * head_dim (row stride of the caches)
    max_pos: u32,         // rows of the caches
    splits: u32,          // attn_split/attn_combine: splits per query row
    keys_per_split: u32,
    scale: f32,           // 1 / sqrt(head_dim)
    row0: u32,            // step row t reads q row row0 + t and writes out row row0 + t
    _pad1: u32,
    _pad2: u32,
};

struct StepParams {
    pos0: u32,
    n_tokens: u32,
    kv_len: u32,
    _pad: u32,
};

@group(0) @binding(0) var<uniform> p: AttnParams;
@group(0) @binding(1) var<uniform> step: StepParams;

// attn_rows:    2 q [T, n_heads*hd], 3 k_cache [max_pos, n_kv_heads*hd], 4 v_cache (same), 5 out [T, n_heads*hd]
// attn_split:   2 q, 3 k_cache, 4 v_cache, 5 part_ml [T, splits, n_heads] vec2 (m, l),
//               6 part_acc [T, splits, n_heads, HD4] vec4 (unnormalised weighted sum of v)
// attn_combine: 2 c_ml (= part_ml), 3 c_acc (= part_acc), 4 c_out [T, n_heads*hd]
{{DECLS_QKV}}
{{DECLS_OUT}}
@group(0) @binding(5) var<storage, read_write> part_ml: array<vec2<f32>>;   // [T, splits, n_heads]
@group(0) @binding(6) var<storage, read_write> part_acc: array<vec4<f32>>;  // [T, splits, n_heads, HD4]
@group(0) @binding(2) var<storage, read> c_ml: array<vec2<f32>>;            // [T, splits, n_heads]
@group(0) @binding(3) var<storage, read> c_acc: array<vec4<f32>>;           // [T, splits, n_heads, HD4]
{{DECLS_COUT}}

const NEG_BIG: f32 = -3.0e38;

// Online softmax over keys [k0, k1) for query head h of row t; returns (m, l) and fills acc.
// (Tried: fully unrolling the head_dim loops into named vec4 registers; on llvmpipe it was
// 2-3x slower than these loops, presumably register spills, and shader compiles took much longer.)
fn attend(t: u32, h: u32, k0: u32, k1: u32, acc: ptr<function, array<vec4<f32>, HD4>>) -> vec2<f32> {
    let qb = (p.row0 + t) * p.q_stride + h * HD;
    var qv: array<vec4<f32>, HD4>;
    for (var j = 0u; j < HD4; j++) {
        qv[j] = q4(qb, j) * p.scale;
    }
    let kvb = (h / p.group) * HD;
    var m = NEG_BIG;
    var l = 0.0;
    var key = k0;
    // Blocks of four keys: one rescale of acc per block, and each q/acc lane is touched once per
    // four keys.
    for (; key + 4u <= k1; key += 4u) {
        let kb0 = key * p.kv_stride + kvb;
        let kb1 = kb0 + p.kv_stride;
        let kb2 = kb1 + p.kv_stride;
        let kb3 = kb2 + p.kv_stride;
        var s4 = vec4<f32>(0.0);
        for (var j = 0u; j < HD4; j++) {
            let qj = qv[j];
            s4 += vec4<f32>(dot(qj, k4(kb0, j)), dot(qj, k4(kb1, j)), dot(qj, k4(kb2, j)), dot(qj, k4(kb3, j)));
        }
        let m_new = max(m, max(max(s4.x, s4.y), max(s4.z, s4.w)));
        let corr = exp(m - m_new);
        let e = exp(s4 - vec4<f32>(m_new));
        l = l * corr + (e.x + e.y + e.z + e.w);
        for (var j = 0u; j < HD4; j++) {
            (*acc)[j] = (*acc)[j] * corr + e.x * v4(kb0, j) + e.y * v4(kb1, j) + e.z * v4(kb2, j) + e.w * v4(kb3, j);
        }
        m = m_new;
    }
    for (; key < k1; key++) {
        let kb = key * p.kv_stride + kvb;
        var s = 0.0;
        for (var j = 0u; j < HD4; j++) {
            s += dot(qv[j], k4(kb, j));
        }
        let m_new = max(m, s);
        let corr = exp(m - m_new);
        let e = exp(s - m_new);
        l = l * corr + e;
        for (var j = 0u; j < HD4; j++) {
            (*acc)[j] = (*acc)[j] * corr + e * v4(kb, j);
        }
        m = m_new;
    }
    return vec2<f32>(m, l);
}

fn n_rows() -> u32 {
    return min(step.n_tokens, p.rows);
}

fn n_keys(t: u32) -> u32 {
    return min(step.pos0 + t + 1u, p.max_pos);
}

@compute @workgroup_size(64)
fn attn_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 64u;
    let t = idx / p.n_heads;
    let h = idx - t * p.n_heads;
    if (t >= n_rows()) {
        return;
    }
    var acc: array<vec4<f32>, HD4>;
    let ml = attend(t, h, 0u, n_keys(t), &acc);
    let inv = 1.0 / ml.y;
    let ob = (p.row0 + t) * p.q_stride + h * HD;
    for (var j = 0u; j < HD4; j++) {
        store_out(ob, j, acc[j] * inv);
    }
}

@compute @workgroup_size(64)
fn attn_split(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 64u;
    let ts = idx / p.n_heads;           // t * splits + s
    let h = idx - ts * p.n_heads;
    let t = ts / p.splits;
    let s = ts - t * p.splits;
    if (t >= n_rows()) {
        return;
    }
    let k0 = s * p.keys_per_split;
    let k1 = min(k0 + p.keys_per_split, n_keys(t));
    if (k0 >= k1) {
        return;
    }
    var acc: array<vec4<f32>, HD4>;
    part_ml[idx] = attend(t, h, k0, k1, &acc);
    for (var j = 0u; j < HD4; j++) {
        part_acc[idx * HD4 + j] = acc[j];
    }
}

@compute @workgroup_size(64)
fn attn_combine(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 64u;
    let th = idx / HD4;                 // t * n_heads + h
    let j = idx - th * HD4;
    let t = th / p.n_heads;
    let h = th - t * p.n_heads;
    if (t >= n_rows()) {
        return;
    }
    let used = (n_keys(t) + p.keys_per_split - 1u) / p.keys_per_split;
    let base = t * p.splits * p.n_heads + h;
    var m = NEG_BIG;
    for (var s = 0u; s < used; s++) {
        m = max(m, c_ml[base + s * p.n_heads].x);
    }
    var l = 0.0;
    var o = vec4<f32>(0.0);
    for (var s = 0u; s < used; s++) {
        let i = base + s * p.n_heads;
        let w = exp(c_ml[i].x - m);
        l += c_ml[i].y * w;
        o += c_acc[i * HD4 + j] * w;
    }
    store_cout((p.row0 + t) * p.q_stride + h * HD, j, o / l);
}
