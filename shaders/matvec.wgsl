// Matrix-vector product for decode (one token): y[y_col0 + row0 + n] (+)= dot(w[n, :], x) (+ bias[row0 + n])
// for the rows n < p.rows of one chunk of a weight matrix. Accumulation is in f32.
//
// Placeholders (filled from Rust): W_DECL / X_DECL declare the weights / input with accessors w_4, w_1,
// x_4, x_1 (and w_8, x_8 for the wide kinds; w_dot32 for the quantised ones, for which QUANT is
// true and REDUCE_UNITS the reduce variant's loop over units); ALIGNED is true when K % 4 == 0
// (rows start on a vec4 boundary); WG is the workgroup size; R the outputs per invocation and
// ROWS_BODY the generated body of matvec_rows (with the SwiGLU or RoPE epilogue,
// `matvec::MatvecEpilogue`, an output takes two rows of w; with the norm epilogue, one).
// EPILOGUE_DECL is empty, the RoPE epilogue's bindings and `rope_pair` (`matvec::ROPE_DECL`), or
// the norm epilogue's bindings and `norm_hand_off` (`matvec::norm_decl`).

{{MATVEC_STORE}}
{{X_DECL}}  // binding 1, x: [k] f32
{{W_DECL}}  // binding 2, w: [rows, k] f32 or f16 (this chunk)

{{SIGMOID}}

const ALIGNED: bool = {{ALIGNED}};
const QUANT: bool = {{QUANT}};
const WG: u32 = {{WG}}u;
const R: u32 = {{R}}u;

{{EPILOGUE_DECL}}

// Each invocation owns R consecutive rows; consecutive invocations own consecutive row groups.
// No workgroup memory. ROWS_BODY is generated from Rust (`matvec::rows_body`): it walks K in
// steps of 8 (wide kinds), 4 or 1 element with one vec4 (or f32) accumulator per row in named
// registers, and writes the guarded stores out straight (see matmul_regblock for why).
@compute @workgroup_size(WG)
fn matvec_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let first = (gid.x + gid.y * nwg.x * WG) * R;
    if (first >= p.rows) {
        return;
    }
{{ROWS_BODY}}
}

// One workgroup per row: the invocations stride over K, then reduce through workgroup memory.
var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn matvec_reduce(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let n = wg.x + wg.y * nwg.x; // uniform across the workgroup
    let row = min(n, p.rows - 1u);
    var acc = vec4<f32>(0.0);
    if (QUANT) {
        // Quantised weights: each invocation takes whole 32-value units, so that a block's
        // scales are decoded once per unit, not once per vec4 (generated: empty for f32/f16).
{{REDUCE_UNITS}}
    } else if (ALIGNED) {
        let base = row * p.k / 4u;
        let k4 = p.k / 4u;
        for (var i = lid; i < k4; i += WG) {
            acc = fma(w_4(base + i), x_4(i), acc);
        }
    } else {
        let base = row * p.k;
        for (var i = lid; i < p.k; i += WG) {
            acc.x = fma(w_1(base + i), x_1(i), acc.x);
        }
    }
    partial[lid] = (acc.x + acc.y) + (acc.z + acc.w);
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            partial[lid] += partial[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u && n < p.rows) {
        store(n, partial[0]);
    }
}

// Subgroup variant (generated from Rust, `matvec::subgroup_entry`; empty in the other variants,
// so that adapters without subgroups compile this module).
{{SUBGROUP_ENTRY}}
