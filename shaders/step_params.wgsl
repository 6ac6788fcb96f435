// The step uniform (kernels::step::StepParams), pasted into the STEP_PARAMS placeholder of every
// kernel that reads it (`kernels::snippet_variant`) and into the decode GEMV's RoPE epilogue.
struct StepParams {
    pos0: u32,
    n_tokens: u32,
    kv_len: u32,
    _pad: u32,
};
