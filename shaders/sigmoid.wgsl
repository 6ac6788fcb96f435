// The logistic sigmoid 1 / (1 + exp(-x)), pasted into the SIGMOID placeholder of a kernel
// (`kernels::snippet_variant`). It never overflows: exp runs on a non-positive value only.
fn sigmoid(x: f32) -> f32 {
    let e = exp(-abs(x));
    return select(e / (1.0 + e), 1.0 / (1.0 + e), x >= 0.0);
}
