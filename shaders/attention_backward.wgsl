// Backward pass of causal GQA attention (prefill from position 0: query row t attends to keys
// 0..=t), recomputing the softmax instead of storing the [T, T] probabilities: the
// FlashAttention-2 backward (Dao 2023, Algorithm 2) written as plain loops, in f32.
//
// Per query row t and head h (kv head g = h / group, scale = 1/sqrt(head_dim)):
//   s_j = scale * q_t · k_j,  P_j = exp(s_j - lse_t)  for j <= t,  lse_t = log sum_j exp(s_j)
//   D_t = dO_t · O_t                        (= sum_j P_j dP_j)
//   dP_j = dO_t · v_j,  dS_j = P_j (dP_j - D_t)
//   dq_t = scale * sum_j dS_j k_j
//   dk_j = scale * sum_{h in g} sum_{t >= j} dS_tj q_t,   dv_j = sum_{h in g} sum_{t >= j} P_tj dO_t
//
// Entry points (each uses bindings 0..n in order; names differ because the bindings differ):
//   attn_bwd_q:  one invocation per (t, h): two passes over keys 0..=t (lse, then dq); writes
//                dq and stats[t, h] = (lse, D) for attn_bwd_kv.
//   attn_bwd_kv: one invocation per (key j, kv head g): over the group's heads and rows t >= j,
//                recomputes P and dS from stats; writes dk and dv. No atomics: each invocation
//                owns its output rows.
// HD is head_dim and HD4 = ceil(head_dim / 4); the DECLS_* placeholders declare the accessors
// (`attention::head_access`): q4, k4, v4, do4, o4 read lanes 4j..4j+3 of a head starting at
// element `base` (zero past head_dim), store_dq, store_dk, store_dv write them.

const HD: u32 = {{HD}}u;
const HD4: u32 = {{HD4}}u;

struct AttnBackwardParams {
    rows: u32,       // T: query rows = key rows
    n_heads: u32,
    group: u32,      // n_heads / n_kv_heads
    q_stride: u32,   // n_heads * head_dim (row stride of q, O, dO, dq)
    kv_stride: u32,  // n_kv_heads * head_dim (row stride of K, V, dK, dV)
    scale: f32,      // 1 / sqrt(head_dim)
    _pad0: u32,
    _pad1: u32,
};

@group(0) @binding(0) var<uniform> p: AttnBackwardParams;

// attn_bwd_q:  1 q [T, n_heads*hd], 2 k [>= T, n_kv*hd], 3 v (same), 4 dO [T, n_heads*hd],
//              5 O [T, n_heads*hd], 6 stats [T, n_heads] vec2 (lse, D), 7 dq [T, n_heads*hd]
// attn_bwd_kv: 1 q, 2 k, 3 v, 4 dO, 5 stats_in (= stats), 6 dk [T, n_kv*hd], 7 dv (same)
{{DECLS_IN}}
{{DECLS_Q}}
@group(0) @binding(6) var<storage, read_write> stats: array<vec2<f32>>;  // [T, n_heads]
@group(0) @binding(5) var<storage, read> stats_in: array<vec2<f32>>;     // [T, n_heads]
{{DECLS_KV}}

const NEG_BIG: f32 = -3.0e38;

@compute @workgroup_size(64)
fn attn_bwd_q(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 64u;
    let t = idx / p.n_heads;
    let h = idx - t * p.n_heads;
    if (t >= p.rows) {
        return;
    }
    let qb = t * p.q_stride + h * HD;
    let kvb = (h / p.group) * HD;
    var qv: array<vec4<f32>, HD4>;
    var dov: array<vec4<f32>, HD4>;
    var d_row = 0.0;
    for (var j = 0u; j < HD4; j++) {
        qv[j] = q4(qb, j) * p.scale;
        dov[j] = do4(qb, j);
        d_row += dot(dov[j], o4(qb, j));
    }
    // Pass 1: lse of the scores (online max and sum).
    var m = NEG_BIG;
    var l = 0.0;
    for (var key = 0u; key <= t; key++) {
        let kb = key * p.kv_stride + kvb;
        var s = 0.0;
        for (var j = 0u; j < HD4; j++) {
            s += dot(qv[j], k4(kb, j));
        }
        let m_new = max(m, s);
        l = l * exp(m - m_new) + exp(s - m_new);
        m = m_new;
    }
    let lse = m + log(l);
    // Pass 2: dq = scale * sum_j P_j (dP_j - D) k_j, each key row loaded once (on CPU drivers a
    // storage load costs a per-lane loop; the private copy does not).
    var acc: array<vec4<f32>, HD4>;
    var kr: array<vec4<f32>, HD4>;
    for (var key = 0u; key <= t; key++) {
        let kb = key * p.kv_stride + kvb;
        var s = 0.0;
        var dp = 0.0;
        for (var j = 0u; j < HD4; j++) {
            kr[j] = k4(kb, j);
            s += dot(qv[j], kr[j]);
            dp += dot(dov[j], v4(kb, j));
        }
        let ds = exp(s - lse) * (dp - d_row);
        for (var j = 0u; j < HD4; j++) {
            acc[j] += ds * kr[j];
        }
    }
    for (var j = 0u; j < HD4; j++) {
        store_dq(qb, j, acc[j] * p.scale);
    }
    stats[idx] = vec2<f32>(lse, d_row);
}

@compute @workgroup_size(64)
fn attn_bwd_kv(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 64u;
    let n_kv = p.n_heads / p.group;
    let key = idx / n_kv;
    let g = idx - key * n_kv;
    if (key >= p.rows) {
        return;
    }
    let kb = key * p.kv_stride + g * HD;
    var kv: array<vec4<f32>, HD4>;
    var vv: array<vec4<f32>, HD4>;
    for (var j = 0u; j < HD4; j++) {
        kv[j] = k4(kb, j) * p.scale;
        vv[j] = v4(kb, j);
    }
    var dk: array<vec4<f32>, HD4>;
    var dv: array<vec4<f32>, HD4>;
    // The query row and its dO, each loaded once per (t, h) and used twice.
    var qr: array<vec4<f32>, HD4>;
    var dor: array<vec4<f32>, HD4>;
    for (var hh = 0u; hh < p.group; hh++) {
        let h = g * p.group + hh;
        for (var t = key; t < p.rows; t++) {
            let qb = t * p.q_stride + h * HD;
            let st = stats_in[t * p.n_heads + h];
            var s = 0.0;
            var dp = 0.0;
            for (var j = 0u; j < HD4; j++) {
                qr[j] = q4(qb, j);
                dor[j] = do4(qb, j);
                s += dot(qr[j], kv[j]);
                dp += dot(dor[j], vv[j]);
            }
            let pr = exp(s - st.x);
            let ds = pr * (dp - st.y);
            for (var j = 0u; j < HD4; j++) {
                dv[j] += pr * dor[j];
                dk[j] += ds * qr[j];
            }
        }
    }
    for (var j = 0u; j < HD4; j++) {
        store_dk(kb, j, dk[j] * p.scale);
        store_dv(kb, j, dv[j]);
    }
}
