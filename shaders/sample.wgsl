// Reductions over the logits for sampling; only a few words are read back per token.
//
// Both entries reduce a list of entries (value, index): the logits themselves (from_logits = 1,
// index = position) or (index, f32 bits) pairs from an earlier pass. Each workgroup writes its
// result pairs to dst; the host chains passes until one workgroup is left.
// Order: larger value first, equal values by lower index (like torch.argmax / a stable sort).
// NaN logits count as -inf. Padding beyond n is (-inf, 0xffffffff) and sorts after every entry.
//
// Non-finite flag: a workgroup that read a NaN or infinite logit (or a pair flagged by an earlier
// pass) sets bit 31 (NON_FINITE) of the index word of every pair it writes. Indices are below
// 2^31 - 1, so the bit is free, and the padding index (all ones) stays the padding index. The
// host reads the flag from the pairs it reads back anyway; the order never looks at the bit.

struct SampleParams {
    n: u32,           // entries in the input list
    k: u32,           // top_k: pairs written per workgroup (argmax: 1)
    from_logits: u32, // 1: read logits; 0: read src pairs
    aux: u32,         // top_k_select: u32 words of fallback dispatch arguments; else unused
};

@group(0) @binding(0) var<uniform> p: SampleParams;
@group(0) @binding(1) var<storage, read> logits: array<f32>;          // [n] f32 (from_logits = 1)
@group(0) @binding(2) var<storage, read> src: array<vec2<u32>>;       // [n] (index, f32 bits) (from_logits = 0)
@group(0) @binding(3) var<storage, read_write> dst: array<vec2<u32>>; // [workgroups * k] (index, f32 bits)

const PAD_INDEX: u32 = 0xffffffffu;
const NON_FINITE: u32 = 0x80000000u;

struct Entry {
    v: f32,
    i: u32,
    bad: u32, // 1: a non-finite logit, or a pair flagged NON_FINITE by an earlier pass
};

fn neg_inf() -> f32 {
    return bitcast<f32>(0xff800000u);
}

fn load(i: u32) -> Entry {
    if (i >= p.n) {
        return Entry(neg_inf(), PAD_INDEX, 0u);
    }
    var bits: u32;
    var idx: u32;
    var bad = 0u;
    if (p.from_logits != 0u) {
        bits = bitcast<u32>(logits[i]);
        idx = i;
        bad = select(0u, 1u, (bits & 0x7f800000u) == 0x7f800000u); // NaN or +-inf
    } else {
        let e = src[i];
        bits = e.y;
        idx = e.x;
        if (idx != PAD_INDEX) {
            bad = idx >> 31u;
            idx &= ~NON_FINITE;
        }
    }
    if ((bits & 0x7fffffffu) > 0x7f800000u) { // NaN
        bits = 0xff800000u;
    }
    return Entry(bitcast<f32>(bits), idx, bad);
}

// The index word of a written pair: the index, with NON_FINITE when `bad` is not 0.
fn flagged(i: u32, bad: u32) -> u32 {
    return select(i, i | NON_FINITE, bad != 0u);
}

// True when (va, ia) comes strictly before (vb, ib).
fn before(va: f32, ia: u32, vb: f32, ib: u32) -> bool {
    return va > vb || (va == vb && ia < ib);
}

// ---- argmax: each workgroup reduces AM_ITEMS * 256 entries to one pair ----

const AM_ITEMS: u32 = 16u;

var<workgroup> rv: array<f32, 256>;
var<workgroup> ri: array<u32, 256>;
var<workgroup> rb: array<u32, 256>; // non-finite flags, OR-reduced with the pairs

@compute @workgroup_size(256)
fn argmax(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let w = wg.x + wg.y * nwg.x;
    let base = w * 256u * AM_ITEMS;
    var bv = neg_inf();
    var bi = PAD_INDEX;
    var bb = 0u;
    for (var q = 0u; q < AM_ITEMS; q++) {
        let e = load(base + q * 256u + tid);
        bb |= e.bad;
        if (before(e.v, e.i, bv, bi)) {
            bv = e.v;
            bi = e.i;
        }
    }
    rv[tid] = bv;
    ri[tid] = bi;
    rb[tid] = bb;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (tid < s) {
            rb[tid] |= rb[tid + s];
            if (before(rv[tid + s], ri[tid + s], rv[tid], ri[tid])) {
                rv[tid] = rv[tid + s];
                ri[tid] = ri[tid + s];
            }
        }
        workgroupBarrier();
    }
    if (tid == 0u) {
        dst[w] = vec2<u32>(flagged(ri[0], rb[0]), bitcast<u32>(rv[0]));
    }
}

// ---- top_k: each workgroup sorts a tile of TILE entries (bitonic) and keeps the first k ----

const TILE: u32 = 1024u;

var<workgroup> sv: array<f32, 1024>;
var<workgroup> si: array<u32, 1024>;
var<workgroup> tile_bad: atomic<u32>; // top_k, top_k_select: the workgroup read a non-finite entry

@compute @workgroup_size(256)
fn top_k(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let w = wg.x + wg.y * nwg.x;
    let base = w * TILE;
    if (tid == 0u) {
        atomicStore(&tile_bad, 0u);
    }
    var bad = 0u;
    for (var q = 0u; q < TILE / 256u; q++) {
        let l = q * 256u + tid;
        let e = load(base + l);
        sv[l] = e.v;
        si[l] = e.i;
        bad |= e.bad;
    }
    workgroupBarrier();
    if (bad != 0u) {
        atomicOr(&tile_bad, 1u);
    }
    for (var size = 2u; size <= TILE; size <<= 1u) {
        for (var stride = size >> 1u; stride > 0u; stride >>= 1u) {
            for (var q = 0u; q < TILE / 512u; q++) {
                let pair = q * 256u + tid;
                let a = ((pair & ~(stride - 1u)) << 1u) | (pair & (stride - 1u));
                let b = a + stride;
                let va = sv[a];
                let ia = si[a];
                let vb = sv[b];
                let ib = si[b];
                // Runs with (a & size) == 0 end in "before" order, the others reversed.
                let forward = (a & size) == 0u;
                if (before(vb, ib, va, ia) == forward) {
                    sv[a] = vb;
                    si[a] = ib;
                    sv[b] = va;
                    si[b] = ia;
                }
            }
            workgroupBarrier();
        }
    }
    let tile_flag = atomicLoad(&tile_bad); // the sort's barriers order it after every atomicOr
    for (var l = tid; l < p.k; l += 256u) {
        dst[w * p.k + l] = vec2<u32>(flagged(si[l], tile_flag), bitcast<u32>(sv[l]));
    }
}

// ---- top_k_select: one workgroup, exact, without sorting all entries ----
//
// 1. Invocation t finds the best entry of its strided subset {t, t + 256, ..}: 256 disjoint
//    subsets' maxima. 2. Their k-th in the order (ranks are distinct: indices are) is a threshold
//    T: the k subset maxima up to T are k distinct entries not after T, so the true top k are not
//    after T either. 3. Entries not after T (at least k, at most k subsets) are compacted into
//    workgroup memory; when they fit (SEL_CAP), each one's rank among them is counted and the
//    first k are written to dst. Otherwise nothing is written here and the fallback tile passes
//    (dispatched indirectly from `fb_args`, zero workgroups in the common case) do the work.

const SEL_CAP: u32 = 1024u; // = TILE: the candidates live in sv / si

@group(0) @binding(4) var<storage, read> fb_full: array<u32>;        // [aux] dispatch args of the fallback passes
@group(0) @binding(5) var<storage, read_write> fb_args: array<u32>;  // [aux] the args used: fb_full or zero workgroups

var<workgroup> mv: array<f32, 256>;
var<workgroup> mi: array<u32, 256>;
var<workgroup> thr_v: f32;
var<workgroup> thr_i: u32;
var<workgroup> n_cand: atomic<u32>;

@compute @workgroup_size(256)
fn top_k_select(@builtin(local_invocation_index) tid: u32) {
    var bv = neg_inf();
    var bi = PAD_INDEX;
    var bad = 0u;
    for (var i = tid; i < p.n; i += 256u) {
        let e = load(i);
        bad |= e.bad;
        if (before(e.v, e.i, bv, bi)) {
            bv = e.v;
            bi = e.i;
        }
    }
    mv[tid] = bv;
    mi[tid] = bi;
    if (tid == 0u) {
        atomicStore(&n_cand, 0u);
        atomicStore(&tile_bad, 0u);
    }
    workgroupBarrier();
    if (bad != 0u) {
        atomicOr(&tile_bad, 1u);
    }
    // Subsets without entries (n < 256) rank after every real entry, and k <= n: the invocation
    // of rank k - 1 holds a real entry and is the only one with that rank.
    var rank = 0u;
    for (var s = 0u; s < 256u; s++) {
        if (before(mv[s], mi[s], bv, bi)) {
            rank++;
        }
    }
    if (rank == p.k - 1u) {
        thr_v = bv;
        thr_i = bi;
    }
    workgroupBarrier();
    let tv = thr_v;
    let ti = thr_i;
    for (var i = tid; i < p.n; i += 256u) {
        let e = load(i);
        if (!before(tv, ti, e.v, e.i)) {
            let at = atomicAdd(&n_cand, 1u);
            if (at < SEL_CAP) {
                sv[at] = e.v;
                si[at] = e.i;
            }
        }
    }
    workgroupBarrier();
    let c = atomicLoad(&n_cand);
    let sel_flag = atomicLoad(&tile_bad);
    let fits = c <= SEL_CAP;
    if (fits) {
        for (var a = tid; a < c; a += 256u) {
            let va = sv[a];
            let ia = si[a];
            var r = 0u;
            for (var b = 0u; b < c; b++) {
                if (before(sv[b], si[b], va, ia)) {
                    r++;
                }
            }
            if (r < p.k) {
                dst[r] = vec2<u32>(flagged(ia, sel_flag), bitcast<u32>(va));
            }
        }
    }
    // Fallback arguments are (x, y, z) triples: zero x workgroups when done here.
    for (var w = tid; w < p.aux; w += 256u) {
        fb_args[w] = select(fb_full[w], 0u, fits && w % 3u == 0u);
    }
}
