// In-place add: acc[i] += x[i] for i < n. One invocation per element.

struct AddParams {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
};

@group(0) @binding(0) var<uniform> p: AddParams;
@group(0) @binding(1) var<storage, read_write> acc: array<f32>; // [n] f32
@group(0) @binding(2) var<storage, read> x: array<f32>;         // [n] f32

@compute @workgroup_size(256)
fn add_inplace(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) {
        return;
    }
    acc[i] = acc[i] + x[i];
}
