// Backward of rope_qkv (rope.wgsl): the forward rotates each pair (x1, x2) = (x[i], x[i + hd/2])
// of a q or k head by the angle a = pos * inv_freq[i]:
//   o1 = x1 * cos - x2 * sin,  o2 = x2 * cos + x1 * sin
// so the gradient w.r.t. (x1, x2) is (do1, do2) rotated by -a (the transposed rotation):
//   dx1 = do1 * cos + do2 * sin,  dx2 = do2 * cos - do1 * sin
// with the same cos/sin tables. v is not rotated: its gradient is copied.
// One invocation per (t, head slot, i < hd/2) as in the forward: slots are n_heads q heads
// (from dq), n_kv_heads k heads (from dk), n_kv_heads v heads (from dv); each writes the pair
// (i, i + hd/2) of d_qkv row t.

struct RopeParams {
    rows: u32,       // T the dispatch was prepared for (the step's n_tokens may be smaller)
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    half_dim: u32,   // head_dim / 2
    max_pos: u32,    // rows of the tables; positions at or beyond are not written
    _pad0: u32,
    _pad1: u32,
};

{{STEP_PARAMS}}

@group(0) @binding(0) var<uniform> p: RopeParams;
@group(0) @binding(1) var<uniform> step: StepParams;
@group(0) @binding(2) var<storage, read> cos_t: array<f32>;          // [max_pos, head_dim/2]
@group(0) @binding(3) var<storage, read> sin_t: array<f32>;          // [max_pos, head_dim/2]
@group(0) @binding(4) var<storage, read> dq: array<f32>;             // [T, n_heads * head_dim]
@group(0) @binding(5) var<storage, read> dk: array<f32>;             // [T, n_kv_heads * head_dim]
@group(0) @binding(6) var<storage, read> dv: array<f32>;             // [T, n_kv_heads * head_dim]
@group(0) @binding(7) var<storage, read_write> d_qkv: array<f32>;    // [T, (n_heads + 2*n_kv_heads) * head_dim]

{{ROPE_INDEX}}

@compute @workgroup_size(64)
fn rope_qkv_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let item = rope_item(gid.x + gid.y * nwg.x * 64u);
    if (!item.valid) {
        return;
    }
    let slots = rope_slots();
    let t = item.t;
    let pos = item.pos;
    let j = item.slot;
    let i = item.i;
    let q_dim = p.n_heads * p.head_dim;
    let kv_dim = p.n_kv_heads * p.head_dim;
    let dst = t * slots * p.head_dim + j * p.head_dim + i;
    if (j < p.n_heads + p.n_kv_heads) {
        var src = 0u;
        var g1 = 0.0;
        var g2 = 0.0;
        if (j < p.n_heads) {
            src = t * q_dim + j * p.head_dim + i;
            g1 = dq[src];
            g2 = dq[src + p.half_dim];
        } else {
            src = t * kv_dim + (j - p.n_heads) * p.head_dim + i;
            g1 = dk[src];
            g2 = dk[src + p.half_dim];
        }
        let c = cos_t[pos * p.half_dim + i];
        let s = sin_t[pos * p.half_dim + i];
        d_qkv[dst] = g1 * c + g2 * s;
        d_qkv[dst + p.half_dim] = g2 * c - g1 * s;
    } else {
        let src = t * kv_dim + (j - p.n_heads - p.n_kv_heads) * p.head_dim + i;
        d_qkv[dst] = dv[src];
        d_qkv[dst + p.half_dim] = dv[src + p.half_dim];
    }
}
