// Decode GEMV with W read through uniform windows (`matvec::MatvecVariant::Windows`): the same
// product, parameters and epilogues as matvec.wgsl's `matvec_rows`, but each workgroup reads one
// window of whole rows of W bound as a uniform buffer of at most the adapter's uniform binding
// size. On lavapipe a uniform load whose offset varies by lane is a branchless gather, where a
// storage load is a loop over the lanes with a bounds branch per component (BENCHMARKS.md,
// Kernels, "W through uniform windows"). The windows are cut from W's copy in the eight-row
// interleaved layout (shaders/interleave8.wgsl), so the eight invocations' loads at one step are
// adjacent in memory.
//
// Placeholders (filled from Rust, `matvec_windows`): X_VEC4, the vec4 of x; EPILOGUE_DECL as in
// matvec.wgsl; WINDOW_DECLS, the window bindings `wa{c}` (and `wb{c}` for the epilogues that
// pair two rows per output) from binding `5 + epilogue bindings`; WINDOWS_ENTRY, the generated
// entry point `matvec_windows` (`matvec_windows::windows_entry`).

{{MATVEC_STORE}}
@group(0) @binding(1) var<uniform> x: array<vec4<f32>, {{X_VEC4}}>;  // [k] f32

// This dispatch's windows: window wg.x of the dispatch is window win0 + wg.x of the op, whose
// outputs are counted up to nout (the chunk's rows, or half of them when outputs pair rows).
struct WindowParams {
    win0: u32,
    nout: u32,
    _pad1: u32,
    _pad2: u32,
};
@group(0) @binding(2) var<uniform> wp: WindowParams;

{{SIGMOID}}

{{EPILOGUE_DECL}}

// Eight values of a row of f16 weights (a vec4<u32> of halves) against eight of x.
fn dot8_f16(w: vec4<u32>, xa: vec4<f32>, xb: vec4<f32>) -> f32 {
    return dot(vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)), xa)
        + dot(vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w)), xb);
}

{{WINDOW_DECLS}}

{{WINDOWS_ENTRY}}
