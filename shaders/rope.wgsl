// RoPE on the q and k parts of a fused QKV projection, writing q to q_out and k, v into the KV
// cache at the step's positions (HF LLaMA rotate-half layout):
//   for each head, x1 = x[0..hd/2], x2 = x[hd/2..]
//   out1 = x1 * cos - x2 * sin,  out2 = x2 * cos + x1 * sin
// cos/sin come from CPU-computed tables, so no transcendental functions run here.
// One invocation per (t, head slot, i < hd/2): head slots are n_heads q heads, then n_kv_heads k
// heads (rotated), then n_kv_heads v heads (copied); each invocation moves the pair (i, i + hd/2).
// RopeParams (the uniform p) comes with rope_write, in the ROPE_WRITE placeholder.

{{STEP_PARAMS}}

@group(0) @binding(0) var<uniform> p: RopeParams;
@group(0) @binding(1) var<uniform> step: StepParams;
@group(0) @binding(2) var<storage, read> qkv: array<f32>;            // [row0 + T, (n_heads + 2*n_kv_heads) * head_dim]
@group(0) @binding(3) var<storage, read> cos_t: array<f32>;          // [max_pos, head_dim/2]
@group(0) @binding(4) var<storage, read> sin_t: array<f32>;          // [max_pos, head_dim/2]
@group(0) @binding(5) var<storage, read_write> q_out: array<f32>;    // [row0 + T, n_heads * head_dim]
@group(0) @binding(6) var<storage, read_write> k_cache: array<f32>;  // [max_pos, n_kv_heads * head_dim]
@group(0) @binding(7) var<storage, read_write> v_cache: array<f32>;  // [max_pos, n_kv_heads * head_dim]

{{ROPE_INDEX}}

{{ROPE_WRITE}}

@compute @workgroup_size(64)
fn rope_qkv(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let item = rope_item(gid.x + gid.y * nwg.x * 64u);
    if (!item.valid) {
        return;
    }
    let r = p.row0 + item.t;
    let src = r * rope_slots() * p.head_dim + item.slot * p.head_dim + item.i;
    rope_write(p, r, item.pos, item.slot, item.i, qkv[src], qkv[src + p.half_dim]);
}
