// The sum over one workgroup of 256 invocations, pasted into the TREE_SUM placeholder of a kernel
// (`kernels::snippet_variant`): each invocation stores its value in red[lane], then all of them
// call tree_sum(lane) in uniform control flow; the sum is then in red[0] for every invocation
// (the loop ends with a barrier). The additions run in a fixed order, so results repeat bit for
// bit.
var<workgroup> red: array<f32, 256>;

fn tree_sum(lane: u32) {
    workgroupBarrier();
    for (var k = 128u; k > 0u; k >>= 1u) {
        if (lane < k) {
            red[lane] += red[lane + k];
        }
        workgroupBarrier();
    }
}
