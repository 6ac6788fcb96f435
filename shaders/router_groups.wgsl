// The router kernels' split of a workgroup of 256 invocations into GROUPS groups of LANES lanes,
// pasted into the ROUTER_GROUPS placeholder (`kernels::snippet_variant`): group g takes the
// hidden units g, g + GROUPS, ..., lane l of a group the columns l, l + LANES, ... (coalesced
// reads of w1's rows).
const LANES: u32 = 32u;
const GROUPS: u32 = 8u; // 256 / LANES
