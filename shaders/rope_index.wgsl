// The work item of one RoPE invocation, shared by rope_qkv (rope.wgsl) and rope_qkv_backward
// (rope_backward.wgsl) through their ROPE_INDEX placeholder (`kernels::snippet_variant`). It reads
// the kernel's uniforms `p` (rows, n_heads, n_kv_heads, half_dim, max_pos) and `step` (pos0,
// n_tokens). Invocation idx walks [T, slots, half_dim] row-major: step row t, head slot (n_heads
// q heads, then n_kv_heads k heads, then n_kv_heads v heads) and i < half_dim, the pair
// (i, i + half_dim) of that head; pos = pos0 + t. valid is false past the step's rows or the
// tables (pos >= max_pos): such an invocation writes nothing.

struct RopeItem {
    t: u32,
    pos: u32,
    slot: u32,
    i: u32,
    valid: bool,
};

// Head slots per row: n_heads + 2 * n_kv_heads.
fn rope_slots() -> u32 {
    return p.n_heads + 2u * p.n_kv_heads;
}

fn rope_item(idx: u32) -> RopeItem {
    let per_row = rope_slots() * p.half_dim;
    let t = idx / per_row;
    let pos = step.pos0 + t;
    let rem = idx - t * per_row;
    let slot = rem / p.half_dim;
    let valid = t < min(step.n_tokens, p.rows) && pos < p.max_pos;
    return RopeItem(t, pos, slot, rem - slot * p.half_dim, valid);
}
