// AdamW (Loshchilov and Hutter 2019, decoupled weight decay; the update of PyTorch's
// torch.optim.AdamW), one invocation per parameter, in place:
//   g = grad[i] * clip[scale_index]           (the global-norm clipping scale, 1 without clipping)
//   m = beta1 * m + (1 - beta1) * g
//   v = beta2 * v + (1 - beta2) * g^2
//   param = param * (1 - lr * weight_decay) - step_size * m / (sqrt(v) / bias2_sqrt + eps)
// with step_size = lr / (1 - beta1^t) and bias2_sqrt = sqrt(1 - beta2^t) computed on the CPU in f64.

struct AdamWParams {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    t: u32,          // the step, from 1 (bias corrections below)
    step_size: f32,  // lr / (1 - beta1^t)
    bias2_sqrt: f32, // sqrt(1 - beta2^t)
};

struct AdamWSize {
    n: u32,           // parameters
    scale_index: u32, // element of clip holding the gradient scale
    _pad0: u32,
    _pad1: u32,
};

@group(0) @binding(0) var<uniform> h: AdamWParams;                   // per step, shared by every parameter buffer
@group(0) @binding(1) var<uniform> size: AdamWSize;                  // per dispatch
@group(0) @binding(2) var<storage, read> clip: array<f32>;           // gradient scale at scale_index
@group(0) @binding(3) var<storage, read> grad: array<f32>;           // [n]
@group(0) @binding(4) var<storage, read_write> param: array<f32>;    // [n]
@group(0) @binding(5) var<storage, read_write> m: array<f32>;        // [n] first moment
@group(0) @binding(6) var<storage, read_write> v: array<f32>;        // [n] second moment

@compute @workgroup_size(256)
fn adamw(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= size.n) {
        return;
    }
    let g = grad[i] * clip[size.scale_index];
    let mi = h.beta1 * m[i] + (1.0 - h.beta1) * g;
    let vi = h.beta2 * v[i] + (1.0 - h.beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    param[i] = param[i] * (1.0 - h.lr * h.weight_decay) - h.step_size * mi / (sqrt(vi) / h.bias2_sqrt + h.eps);
}
