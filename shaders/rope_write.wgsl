// Writes one rotated pair of a fused QKV row, pasted into the ROPE_WRITE placeholder of rope.wgsl
// and into the decode GEMV's RoPE epilogue (`matvec::MatvecEpilogue::Rope`). `rp` holds the
// shape (RopeParams), r is the row of q_out, pos the position, j the head slot (n_heads q heads,
// then n_kv_heads k heads, then n_kv_heads v heads), i < half_dim the pair (i, i + half_dim) of
// that head, and x1, x2 its two values. q and k are rotated (HF LLaMA rotate-half:
// out1 = x1 * cos - x2 * sin, out2 = x2 * cos + x1 * sin, from the cos_t / sin_t tables); q goes
// to q_out row r, k and v to the caches at row pos. The includer declares cos_t, sin_t, q_out,
// k_cache and v_cache; this snippet declares RopeParams (kernels::rope::RopeParams), the shape's
// uniform, for both.
struct RopeParams {
    rows: u32,       // T the dispatch was prepared for (the step's n_tokens may be smaller)
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    half_dim: u32,   // head_dim / 2
    max_pos: u32,    // rows of the caches and tables; positions at or beyond are not written
    row0: u32,       // step row t reads qkv row row0 + t and writes q_out row row0 + t
    _pad1: u32,
};

fn rope_write(rp: RopeParams, r: u32, pos: u32, j: u32, i: u32, x1: f32, x2: f32) {
    let kv_dim = rp.n_kv_heads * rp.head_dim;
    if (j < rp.n_heads + rp.n_kv_heads) {
        let c = cos_t[pos * rp.half_dim + i];
        let s = sin_t[pos * rp.half_dim + i];
        let o1 = x1 * c - x2 * s;
        let o2 = x2 * c + x1 * s;
        if (j < rp.n_heads) {
            let dst = r * rp.n_heads * rp.head_dim + j * rp.head_dim + i;
            q_out[dst] = o1;
            q_out[dst + rp.half_dim] = o2;
        } else {
            let dst = pos * kv_dim + (j - rp.n_heads) * rp.head_dim + i;
            k_cache[dst] = o1;
            k_cache[dst + rp.half_dim] = o2;
        }
    } else {
        let dst = pos * kv_dim + (j - rp.n_heads - rp.n_kv_heads) * rp.head_dim + i;
        v_cache[dst] = x1;
        v_cache[dst + rp.half_dim] = x2;
    }
}
