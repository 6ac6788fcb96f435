// Copy n 32-bit words between places in two buffers: dst[dst_off + i] = src[src_off + i], for
// i < n. Moves one row of a batch's activations to a sequence's buffers and back (the batched
// decode step, runtime/batch.rs); any 4-byte dtype, bit for bit.

struct CopyWordsParams {
    n: u32,        // words to copy
    src_off: u32,  // first word read in src
    dst_off: u32,  // first word written in dst
    _pad: u32,
};

@group(0) @binding(0) var<uniform> p: CopyWordsParams;
@group(0) @binding(1) var<storage, read> src: array<u32>;        // [>= src_off + n]
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;  // [>= dst_off + n]

@compute @workgroup_size(64)
fn copy_words(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i < p.n) {
        dst[p.dst_off + i] = src[p.src_off + i];
    }
}
