// The decode GEMV's parameters, its bindings 0 (p), 3 (bias) and 4 (y), and `store`: pasted into
// matvec.wgsl and matvec_windows.wgsl (`MATVEC_STORE`), which declare bindings 1 and 2 themselves.

struct MatvecParams {
    rows: u32,    // rows (outputs) of this chunk of w
    k: u32,       // columns of w = length of x
    row0: u32,    // first row of the chunk in the whole matrix (bias index, y column)
    y_col0: u32,  // y index of row 0 of the whole matrix
    flags: u32,   // bit 0: accumulate into y; bit 1: add bias; bit 2: multiply the product by scale
    scale: f32,   // used with flag bit 2 (LoRA: S * alpha / r), before bias and accumulation
    _pad1: u32,
    _pad2: u32,
};

@group(0) @binding(0) var<uniform> p: MatvecParams;
@group(0) @binding(3) var<storage, read> bias: array<f32>;       // [rows of the whole matrix] (x when unused)
@group(0) @binding(4) var<storage, read_write> y: array<f32>;    // [>= y_col0 + rows of the whole matrix]

// Stores row n's product (scaled, biased, accumulated as the flags say) and returns what it stored.
fn store(n: u32, v: f32) -> f32 {
    var s = v;
    if ((p.flags & 4u) != 0u) {
        s *= p.scale;
    }
    if ((p.flags & 2u) != 0u) {
        s += bias[p.row0 + n];
    }
    let i = p.y_col0 + p.row0 + n;
    if ((p.flags & 1u) != 0u) {
        s += y[i];
    }
    y[i] = s;
    return s;
}
