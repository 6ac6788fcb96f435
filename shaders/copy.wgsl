// Plain copy dst[i] = src[i] over vec4<f32> elements: the bandwidth reference of the kernel bench.
// Each invocation copies PER consecutive vec4s (fewer invocations: cheaper on CPU drivers).

struct CopyParams {
    n4: u32,  // vec4 elements to copy
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
};

@group(0) @binding(0) var<uniform> p: CopyParams;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;        // [n4] vec4
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<f32>>;  // [>= n4] vec4

const PER: u32 = 8u;

@compute @workgroup_size(64)
fn copy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i0 = (gid.x + gid.y * nwg.x * 64u) * PER;
    if (i0 + PER <= p.n4) {
        for (var j = 0u; j < PER; j++) {
            dst[i0 + j] = src[i0 + j];
        }
    } else {
        for (var i = i0; i < p.n4; i++) {
            dst[i] = src[i];
        }
    }
}
