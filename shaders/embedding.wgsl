// Embedding lookup from one row chunk of the table: out[t, :] = table[ids[t], :] for the tokens
// whose id falls in rows row0 .. row0 + chunk_rows of this chunk; other rows of out are left
// untouched (another chunk's dispatch writes them, or the id is invalid). One invocation per
// output element; the table is read through the scalar accessor w_1 because d may be odd.

struct EmbeddingParams {
    rows: u32,       // T: tokens
    dim: u32,        // d
    row0: u32,       // first vocabulary row held by this chunk
    chunk_rows: u32, // vocabulary rows held by this chunk
};

@group(0) @binding(0) var<uniform> p: EmbeddingParams;
@group(0) @binding(1) var<storage, read> ids: array<u32>;       // [T] u32
{{W_DECL}}                                                        // binding 2: [chunk_rows, d] f32 or f16
@group(0) @binding(3) var<storage, read_write> out: array<f32>; // [T, d] f32

@compute @workgroup_size(256)
fn embedding(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.rows * p.dim) {
        return;
    }
    let t = i / p.dim;
    let j = i - t * p.dim;
    let id = ids[t];
    // Unsigned: ids below row0 wrap to a large value and fail the bound check too.
    let local = id - p.row0;
    if (id < p.row0 || local >= p.chunk_rows) {
        return;
    }
    out[i] = w_1(local * p.dim + j);
}
