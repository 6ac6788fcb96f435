// Rearranges a row-major matrix of 32-bit words, [rows, row_words], into the decode GEMV's
// eight-row interleaved layout (kernels/matvec_windows.rs, `interleave8`): rows in groups of
// eight, each group stored chunk by chunk (a chunk: eight values, `chunk_words` words), the
// eight rows' chunk c side by side. Word w of row r goes to
//   (r / 8) * 8 * row_words + (w / cw) * 8 * cw + (r % 8) * cw + w % cw.
// One invocation per word of src; rows % 8 == 0 and row_words % cw == 0 (checked in Rust).

struct InterleaveParams {
    n: u32,            // words of src: rows * row_words
    row_words: u32,    // words per row
    chunk_words: u32,  // words per chunk of eight values: 8 (f32) or 4 (f16)
    _pad: u32,
};

@group(0) @binding(0) var<uniform> p: InterleaveParams;
@group(0) @binding(1) var<storage, read> src: array<u32>;        // [rows * row_words]
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;  // [rows * row_words]

@compute @workgroup_size(64)
fn interleave8(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i < p.n) {
        let r = i / p.row_words;
        let w = i % p.row_words;
        let cw = p.chunk_words;
        dst[(r / 8u) * 8u * p.row_words + (w / cw) * 8u * cw + (r % 8u) * cw + w % cw] = src[i];
    }
}
