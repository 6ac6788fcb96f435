// Causal attention with GQA over an f32 KV cache. A query of step row t sits at position
// pos = step.pos0 + t and attends to cache rows 0..=pos; query head h reads kv head h / group.
// scale = 1/sqrt(head_dim) is folded into q; softmax is online (running max m, sum l, weighted
// sum acc) in f32.
//
// Entry points (each uses bindings 0..n in order; names differ because the bindings differ):
//   attn_rows:    one invocation per (t, block of GB heads) over all its keys, writes out directly (prefill);
//                 a workgroup's rows walk the same keys (see attn_rows).
//   attn_split:   flash-decoding: one invocation per (t, split s, block of GB heads) over keys
//                 [s*kps, (s+1)*kps) ∩ [0, pos], writes partial (m, l, acc); kps = split_keys(t),
//                 keys_per_split or more when the splits would not cover the keys.
//   attn_combine: one invocation per (t, h, 4-lane group j of head_dim) merges the partials.
// The placeholder HD is head_dim and HD4 = ceil(head_dim / 4); q is read through q4 (a vec4 of
// head_dim lanes 4j..4j+3 of the head starting at element `base`, zero past head_dim), k and v
// through k8/v8 (lanes 8j..8j+7 as two vec4, zero past head_dim) and out written through
// store_out; the DECLS_* placeholders declare them for the vec4 (head_dim % 4 == 0), the scalar
// or, on CPU adapters with 64-bit integers and head_dim % 8 == 0, the wide layout (k and v as
// array<vec4<u64>>: one load per eight lanes, `attention::wide_kv`).

const HD: u32 = {{HD}}u;
const HD4: u32 = {{HD4}}u;
const GB: u32 = {{GB}}u;         // query heads per invocation, sharing one kv head (divides group)
const GBHD4: u32 = {{GBHD4}}u;   // GB * HD4
const HP: u32 = {{HP}}u;         // ceil(HD4 / 2): k and v are read eight lanes (two vec4) at a time
const WG: u32 = {{WG}}u;         // invocations per workgroup (attn_rows: query rows; attn_split)

struct AttnParams {
    rows: u32,            // T the dispatch was prepared for (the step's n_tokens may be smaller)
    n_heads: u32,
    group: u32,           // n_heads / n_kv_heads
    q_stride: u32,        // n_heads * head_dim (row stride of q and out)
    kv_stride: u32,       // n_kv_heads * head_dim (row stride of the caches)
    max_pos: u32,         // rows of the caches
    splits: u32,          // attn_split/attn_combine: splits per query row (the partials' rows)
    keys_per_split: u32,  // the fewest keys a split takes (split_keys)
    scale: f32,           // 1 / sqrt(head_dim)
    row0: u32,            // step row t reads q row row0 + t and writes out row row0 + t
    _pad1: u32,
    _pad2: u32,
};

{{STEP_PARAMS}}

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

// Online softmax over keys [k0, k1) for the GB query heads h0 .. h0 + GB - 1 of row t, which
// share one kv head (GB divides the group): each key's k and v are loaded once for all GB heads
// (grouped-query attention read once per group, as llama.cpp's and FlashAttention-2's GQA
// kernels do). Keys from kl on (kl <= k1) are masked: they weigh 0 (attn_rows walks a
// workgroup's keys in every invocation). Returns (m, l) per head and fills acc (head g's lanes
// at g * HD4 ..). Needs k0 < kl.
// (Tried: fully unrolling the head_dim loops into named vec4 registers; on llvmpipe it was
// 2-3x slower than these loops, presumably register spills, and shader compiles took much longer.)
fn attend(t: u32, h0: u32, k0: u32, k1: u32, kl: u32, acc: ptr<function, array<vec4<f32>, GBHD4>>) -> array<vec2<f32>, GB> {
    var qv: array<vec4<f32>, GBHD4>;
    for (var g = 0u; g < GB; g++) {
        let qb = (p.row0 + t) * p.q_stride + (h0 + g) * HD;
        for (var j = 0u; j < HD4; j++) {
            qv[g * HD4 + j] = q4(qb, j) * p.scale;
        }
    }
    let kvb = (h0 / p.group) * HD;
    var m: array<f32, GB>;
    var l: array<f32, GB>;
    for (var g = 0u; g < GB; g++) {
        m[g] = NEG_BIG;
    }
    var key = k0;
    // Blocks of four keys: one rescale of acc per block, and each q/acc lane is touched once per
    // four keys.
    for (; key + 4u <= k1; key += 4u) {
        let kb0 = key * p.kv_stride + kvb;
        let kb1 = kb0 + p.kv_stride;
        let kb2 = kb1 + p.kv_stride;
        let kb3 = kb2 + p.kv_stride;
        let live = vec4<bool>(key < kl, key + 1u < kl, key + 2u < kl, key + 3u < kl);
        var s4: array<vec4<f32>, GB>;
        for (var jp = 0u; jp < HP; jp++) {
            let c0 = k8(kb0, jp);
            let c1 = k8(kb1, jp);
            let c2 = k8(kb2, jp);
            let c3 = k8(kb3, jp);
            for (var g = 0u; g < GB; g++) {
                let qa = qv[g * HD4 + 2u * jp];
                s4[g] += vec4<f32>(dot(qa, c0[0]), dot(qa, c1[0]), dot(qa, c2[0]), dot(qa, c3[0]));
                if (2u * jp + 1u < HD4) {
                    let qb = qv[g * HD4 + 2u * jp + 1u];
                    s4[g] += vec4<f32>(dot(qb, c0[1]), dot(qb, c1[1]), dot(qb, c2[1]), dot(qb, c3[1]));
                }
            }
        }
        var corr: array<f32, GB>;
        var e: array<vec4<f32>, GB>;
        for (var g = 0u; g < GB; g++) {
            let s = select(vec4<f32>(NEG_BIG), s4[g], live);
            let m_new = max(m[g], max(max(s.x, s.y), max(s.z, s.w)));
            corr[g] = exp(m[g] - m_new);
            e[g] = exp(s - vec4<f32>(m_new));
            l[g] = l[g] * corr[g] + (e[g].x + e[g].y + e[g].z + e[g].w);
            m[g] = m_new;
        }
        for (var jp = 0u; jp < HP; jp++) {
            let v0 = v8(kb0, jp);
            let v1 = v8(kb1, jp);
            let v2 = v8(kb2, jp);
            let v3 = v8(kb3, jp);
            for (var g = 0u; g < GB; g++) {
                let i = g * HD4 + 2u * jp;
                let eg = e[g];
                (*acc)[i] = (*acc)[i] * corr[g] + eg.x * v0[0] + eg.y * v1[0] + eg.z * v2[0] + eg.w * v3[0];
                if (2u * jp + 1u < HD4) {
                    (*acc)[i + 1u] = (*acc)[i + 1u] * corr[g] + eg.x * v0[1] + eg.y * v1[1] + eg.z * v2[1] + eg.w * v3[1];
                }
            }
        }
    }
    for (; key < k1; key++) {
        let kb = key * p.kv_stride + kvb;
        var s: array<f32, GB>;
        for (var jp = 0u; jp < HP; jp++) {
            let c = k8(kb, jp);
            for (var g = 0u; g < GB; g++) {
                s[g] += dot(qv[g * HD4 + 2u * jp], c[0]);
                if (2u * jp + 1u < HD4) {
                    s[g] += dot(qv[g * HD4 + 2u * jp + 1u], c[1]);
                }
            }
        }
        var corr: array<f32, GB>;
        var e: array<f32, GB>;
        for (var g = 0u; g < GB; g++) {
            let sg = select(NEG_BIG, s[g], key < kl);
            let m_new = max(m[g], sg);
            corr[g] = exp(m[g] - m_new);
            e[g] = exp(sg - m_new);
            l[g] = l[g] * corr[g] + e[g];
            m[g] = m_new;
        }
        for (var jp = 0u; jp < HP; jp++) {
            let v = v8(kb, jp);
            for (var g = 0u; g < GB; g++) {
                let i = g * HD4 + 2u * jp;
                (*acc)[i] = (*acc)[i] * corr[g] + e[g] * v[0];
                if (2u * jp + 1u < HD4) {
                    (*acc)[i + 1u] = (*acc)[i + 1u] * corr[g] + e[g] * v[1];
                }
            }
        }
    }
    var ml: array<vec2<f32>, GB>;
    for (var g = 0u; g < GB; g++) {
        ml[g] = vec2<f32>(m[g], l[g]);
    }
    return ml;
}

fn n_rows() -> u32 {
    return min(step.n_tokens, p.rows);
}

fn n_keys(t: u32) -> u32 {
    return min(step.pos0 + t + 1u, p.max_pos);
}

// attn_rows: workgroup (x, y) takes query rows x * WG .. x * WG + WG - 1 (one per
// invocation) of the GB heads from y * GB. Its invocations walk the same keys, up to the last
// row's, each masking the keys past its own position, so that the kv head and the key are the
// same across the workgroup (from workgroup_id and a uniform loop): every lane reads the same k
// and v addresses at once. On lavapipe that ran 1.25-1.35x faster than one invocation per
// (row, head group) in consecutive order (BENCHMARKS.md, "Prefill attention").
@compute @workgroup_size(WG)
fn attn_rows(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let rows = n_rows();
    let first = wg.x * WG;
    if (first >= rows) {
        return;
    }
    let last = min(first + WG, rows) - 1u;
    let t = min(first + lid.x, last);
    let h0 = wg.y * GB;
    var acc: array<vec4<f32>, GBHD4>;
    let ml = attend(t, h0, 0u, n_keys(last), n_keys(t), &acc);
    if (first + lid.x > last) {
        return;
    }
    for (var g = 0u; g < GB; g++) {
        let inv = 1.0 / ml[g].y;
        let ob = (p.row0 + t) * p.q_stride + (h0 + g) * HD;
        for (var j = 0u; j < HD4; j++) {
            store_out(ob, j, acc[g * HD4 + j] * inv);
        }
    }
}

// Keys per split of row t: keys_per_split, or as many more as it takes for p.splits splits to
// cover its n_keys(t) keys (the dispatch's splits may be capped below max_pos / keys_per_split,
// `attention::split_count`). attn_split and attn_combine agree on it.
fn split_keys(t: u32) -> u32 {
    return max(p.keys_per_split, (n_keys(t) + p.splits - 1u) / p.splits);
}

@compute @workgroup_size(WG)
fn attn_split(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * WG;
    let blocks = p.n_heads / GB;
    let ts = idx / blocks;              // t * splits + s
    let h0 = (idx - ts * blocks) * GB;
    let t = ts / p.splits;
    let s = ts - t * p.splits;
    if (t >= n_rows()) {
        return;
    }
    let kps = split_keys(t);
    let k0 = s * kps;
    let k1 = min(k0 + kps, n_keys(t));
    if (k0 >= k1) {
        return;
    }
    var acc: array<vec4<f32>, GBHD4>;
    let ml = attend(t, h0, k0, k1, k1, &acc);
    for (var g = 0u; g < GB; g++) {
        let part = ts * p.n_heads + h0 + g;
        part_ml[part] = ml[g];
        for (var j = 0u; j < HD4; j++) {
            part_acc[part * HD4 + j] = acc[g * HD4 + j];
        }
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
    let kps = split_keys(t);
    let used = (n_keys(t) + kps - 1u) / kps;
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
