// Backward of the FiRST router gate (shaders/router.wgsl): from dp = dL/dp (dp[slot]) it adds
// the gradients of the router's parameters and, optionally, of the hidden states h [rows, d].
// With m = mean_t h[t], s = inverseSqrt(mean(m^2) + eps), x = m * s * norm,
// a = w1 . x + b1, z = w2 . silu(a) + b2 (z = a[0] when r = 0), p = sigmoid(z):
//   dz = dp * sigmoid(z) * sigmoid(-z)
//   dw2[j] += dz * silu(a[j]);  db2 += dz;  da[j] = dz * w2[j] * silu'(a[j])   (r > 0)
//   da[0] = dz                                                                  (r = 0)
//   db1[j] += da[j];  dw1[j, c] += da[j] * x[c];  dx[c] = sum_j da[j] * w1[j, c]
//   dnorm[c] += dx[c] * m[c] * s;  g[c] = dx[c] * norm[c]
//   dm[c] = s * g[c] - m[c] * s^3 * (sum_k g[k] * m[k]) / d;  dh[t, c] += dm[c] / rows
// silu'(a) = sigmoid(a) * (1 + a * sigmoid(-a)).
//
// Entry points, in the order they run (each uses bindings 0..n in order; names differ where
// the bindings differ). scratch holds the column-sum partials [blocks, d] (router_colsum of
// router.wgsl) and then m, x, dm [d] each, a, da [nh] each and s, at the offsets in the uniform.
//   router_backward_forward (1 workgroup): 1 scratch, 2 h [rows, d], 3 norm [d], 4 w1 [nh, d], 5 b1 [nh]
//   router_backward_units (1 workgroup, r > 0): 1 scratch, 2 dp, 3 db1 [r], 4 w2 [r], 5 b2 [1], 6 dw2 [r], 7 db2 [1]
//   router_backward_linear (1 invocation, r = 0): 1 scratch, 2 dp, 3 db1 [1]
//   router_backward_norm (1 workgroup): 1 scratch, 2 dnorm [d], 3 norm, 4 w1
//   router_backward_dw1 (nh * d invocations): 1 scratch, 2 grad = dw1 [nh, d]
//   router_backward_dh (rows * d invocations): 1 scratch, 2 grad = dh [rows, d]
// Every sum runs in a fixed order (no atomics): results repeat bit for bit.

struct RouterBackwardParams {
    rows: u32,    // rows of h averaged
    dim: u32,     // d
    blocks: u32,  // blocks of column-sum partials in scratch; 0: the forward sums h itself
    r: u32,       // rank; 0: linear router
    nh: u32,      // max(r, 1)
    slot: u32,    // index into dp
    eps: f32,     // RMSNorm epsilon
    s_at: u32,    // scratch offset of s
    m_at: u32,    // scratch offset of m [d]
    x_at: u32,    // scratch offset of x [d]
    dm_at: u32,   // scratch offset of dm [d]
    a_at: u32,    // scratch offset of a [nh]
    da_at: u32,   // scratch offset of da [nh]
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
};

@group(0) @binding(0) var<uniform> p: RouterBackwardParams;
@group(0) @binding(1) var<storage, read_write> scratch: array<f32>;

@group(0) @binding(2) var<storage, read> h: array<f32>;
@group(0) @binding(3) var<storage, read> norm: array<f32>;
@group(0) @binding(4) var<storage, read> w1: array<f32>;
@group(0) @binding(5) var<storage, read> b1: array<f32>;

@group(0) @binding(2) var<storage, read> dp: array<f32>;
@group(0) @binding(3) var<storage, read_write> db1: array<f32>;
@group(0) @binding(4) var<storage, read> w2: array<f32>;
@group(0) @binding(5) var<storage, read> b2: array<f32>;
@group(0) @binding(6) var<storage, read_write> dw2: array<f32>;
@group(0) @binding(7) var<storage, read_write> db2: array<f32>;

@group(0) @binding(2) var<storage, read_write> dnorm: array<f32>;
@group(0) @binding(2) var<storage, read_write> grad: array<f32>;

{{ROUTER_GROUPS}}

{{TREE_SUM}}

{{SIGMOID}}

// The forward up to the hidden units' pre-activations: m, s, x and a into scratch.
@compute @workgroup_size(256)
fn router_backward_forward(@builtin(local_invocation_index) tid: u32) {
    let d = p.dim;
    let inv_rows = 1.0 / f32(p.rows);
    var ss = 0.0;
    for (var c = tid; c < d; c += 256u) {
        var sum = 0.0;
        if (p.blocks == 0u) {
            for (var t = 0u; t < p.rows; t++) {
                sum += h[t * d + c];
            }
        } else {
            for (var b = 0u; b < p.blocks; b++) {
                sum += scratch[b * d + c];
            }
        }
        let m = sum * inv_rows;
        scratch[p.m_at + c] = m;
        ss += m * m;
    }
    red[tid] = ss;
    tree_sum(tid);
    let s = inverseSqrt(red[0] / f32(d) + p.eps);
    // Each invocation scales the columns it wrote itself.
    for (var c = tid; c < d; c += 256u) {
        scratch[p.x_at + c] = scratch[p.m_at + c] * s * norm[c];
    }
    if (tid == 0u) {
        scratch[p.s_at] = s;
    }
    storageBarrier();

    // Group g handles units j = g, g + GROUPS, ...; lane l columns l, l + LANES, ...
    let g = tid / LANES;
    let lane = tid % LANES;
    let rounds = (p.nh + GROUPS - 1u) / GROUPS;
    for (var k = 0u; k < rounds; k++) {
        let j = k * GROUPS + g;
        var part = 0.0;
        if (j < p.nh) {
            for (var c = lane; c < d; c += LANES) {
                part += w1[j * d + c] * scratch[p.x_at + c];
            }
        }
        workgroupBarrier(); // red is free again
        red[tid] = part;
        workgroupBarrier();
        if (lane == 0u && j < p.nh) {
            var a = b1[j];
            for (var l = 0u; l < LANES; l++) {
                a += red[tid + l];
            }
            scratch[p.a_at + j] = a;
        }
    }
}

// r > 0: z, dz, then per unit dw2, db1 and da (into scratch); db2.
@compute @workgroup_size(256)
fn router_backward_units(@builtin(local_invocation_index) tid: u32) {
    var z = 0.0;
    for (var j = tid; j < p.r; j += 256u) {
        let a = scratch[p.a_at + j];
        z += w2[j] * a * sigmoid(a);
    }
    red[tid] = z;
    tree_sum(tid);
    let zt = red[0] + b2[0];
    let dz = dp[p.slot] * sigmoid(zt) * sigmoid(-zt);
    for (var j = tid; j < p.r; j += 256u) {
        let a = scratch[p.a_at + j];
        let sg = sigmoid(a);
        dw2[j] += dz * a * sg;
        let da = dz * w2[j] * sg * (1.0 + a * sigmoid(-a));
        scratch[p.da_at + j] = da;
        db1[j] += da;
    }
    if (tid == 0u) {
        db2[0] += dz;
    }
}

// r = 0: z = a[0], da[0] = dz.
@compute @workgroup_size(1)
fn router_backward_linear() {
    let z = scratch[p.a_at];
    let dz = dp[p.slot] * sigmoid(z) * sigmoid(-z);
    scratch[p.da_at] = dz;
    db1[0] += dz;
}

// dx, dnorm and the RMSNorm backward to dm (into scratch).
@compute @workgroup_size(256)
fn router_backward_norm(@builtin(local_invocation_index) tid: u32) {
    let d = p.dim;
    let s = scratch[p.s_at];
    var dot = 0.0;
    for (var c = tid; c < d; c += 256u) {
        var dx = 0.0;
        for (var j = 0u; j < p.nh; j++) {
            dx += scratch[p.da_at + j] * w1[j * d + c];
        }
        let m = scratch[p.m_at + c];
        dnorm[c] += dx * m * s;
        let gc = dx * norm[c];
        scratch[p.dm_at + c] = gc;
        dot += gc * m;
    }
    red[tid] = dot;
    tree_sum(tid);
    let k = s * s * s * red[0] / f32(d);
    // Each invocation rewrites the columns it wrote itself.
    for (var c = tid; c < d; c += 256u) {
        scratch[p.dm_at + c] = s * scratch[p.dm_at + c] - k * scratch[p.m_at + c];
    }
}

@compute @workgroup_size(256)
fn router_backward_dw1(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.nh * p.dim) {
        return;
    }
    let j = i / p.dim;
    grad[i] += scratch[p.da_at + j] * scratch[p.x_at + i - j * p.dim];
}

@compute @workgroup_size(256)
fn router_backward_dh(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.rows * p.dim) {
        return;
    }
    grad[i] += scratch[p.dm_at + i % p.dim] / f32(p.rows);
}
