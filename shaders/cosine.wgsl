// Cosine similarity of matching rows: out[out_offset + r] = dot(a[r], b[r]) / (max(|a[r]|, EPS) * max(|b[r]|, EPS)),
// the definition of torch.nn.functional.cosine_similarity (eps = 1e-8). One invocation per row
// (rows are short: d_model); f32 accumulation. ShortGPT's block influence reads it per layer.

struct CosineParams {
    rows: u32,
    dim: u32,
    out_offset: u32, // element of out that row 0's cosine goes to
    _pad0: u32,
};

@group(0) @binding(0) var<uniform> p: CosineParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;           // [rows, dim]
@group(0) @binding(2) var<storage, read> b: array<f32>;           // [rows, dim]
@group(0) @binding(3) var<storage, read_write> out: array<f32>;   // [>= out_offset + rows]

const EPS: f32 = 1e-8;

@compute @workgroup_size(64)
fn cosine(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if (r >= p.rows) {
        return;
    }
    let base = r * p.dim;
    var ab = 0.0;
    var aa = 0.0;
    var bb = 0.0;
    for (var i = 0u; i < p.dim; i++) {
        let x = a[base + i];
        let y = b[base + i];
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    out[p.out_offset + r] = ab / (max(sqrt(aa), EPS) * max(sqrt(bb), EPS));
}
