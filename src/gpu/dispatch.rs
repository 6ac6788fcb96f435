//! A prepared dispatch: pipeline, bind group and workgroup counts, built once and recorded into
//! any compute pass as often as needed (this is what "recorded" means under wgpu, which cannot
//! resubmit a command buffer), and the typed [`Tag`] that says where it sits in a step.

use std::borrow::Cow;
use std::sync::Arc;

use super::pipeline::Pipeline;
use super::{GpuContext, GpuError};

/// Work done by one dispatch, for GFLOP/s and GB/s figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    /// Floating-point operations (a multiply-add counts 2).
    pub flops: u64,
    /// Bytes read plus bytes written.
    pub bytes: u64,
}

/// Which pass over the model a step is: the profiler keeps one table per phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Prompt tokens, many rows at once (the matmul kernels).
    Prefill,
    /// One generated token per step (the matrix-vector kernels).
    Decode,
}

impl Phase {
    /// Every phase, in the order the profiler reports them.
    pub const ALL: [Phase; 2] = [Phase::Prefill, Phase::Decode];

    /// `prefill` or `decode`: the first part of a dispatch label and the pass label.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Prefill => "prefill",
            Phase::Decode => "decode",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Phase {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Where a dispatch sits in a step: phase, decoder layer and operation. The profiler groups by
/// it and debug groups follow it; the dispatch label is derived from it ([`Tag::label`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag {
    /// The step's phase.
    pub phase: Phase,
    /// The decoder layer (0-based), None outside the layers (embedding, LM head, sampling).
    pub layer: Option<usize>,
    /// The operation, e.g. `attn.qkv`, `mlp.down`, `attn.qkv.lora_a`, `router`, `lm_head`.
    pub op: &'static str,
}

impl Tag {
    /// A dispatch outside the decoder layers.
    pub fn step(phase: Phase, op: &'static str) -> Tag {
        Tag { phase, layer: None, op }
    }

    /// A dispatch of decoder layer `layer`.
    pub fn layer(phase: Phase, layer: usize, op: &'static str) -> Tag {
        Tag { phase, layer: Some(layer), op }
    }

    /// The label a kernel is given: `decode/layer.12/mlp.down`, `prefill/lm_head`. Kernels that
    /// record several dispatches append their own part (`.split`, `[chunk 1]`).
    pub fn label(&self) -> String {
        match self.layer {
            Some(l) => format!("{}/layer.{l}/{}", self.phase, self.op),
            None => format!("{}/{}", self.phase, self.op),
        }
    }

    /// The debug group and trace span of the tag's layer: `decode/layer.12`; None outside layers.
    pub fn layer_label(&self) -> Option<String> {
        self.layer.map(|l| format!("{}/layer.{l}", self.phase))
    }
}

/// Where the workgroup counts come from.
#[derive(Debug, Clone)]
enum Groups {
    Direct([u32; 3]),
    /// Counts read on the GPU from `buffer` at `offset` (three u32).
    Indirect {
        buffer: wgpu::Buffer,
        offset: u64,
    },
}

/// One kernel launch, ready to record: see the module docs.
#[derive(Debug, Clone)]
pub struct Dispatch {
    /// What debuggers and traces show, e.g. `decode/layer.3/mlp.down`: the tag's label plus the
    /// kernel's own part for multi-dispatch kernels (`decode/lm_head[1]`,
    /// `prefill/layer.0/attn.core.split`).
    pub label: String,
    /// Where it sits in a step; None for a dispatch built outside a step (kernel tests, benches).
    pub tag: Option<Tag>,
    /// Byte offset in `label` where the kernel's own part starts (the label's length if none).
    part_at: usize,
    pipeline: Arc<Pipeline>,
    bind_group: wgpu::BindGroup,
    groups: Groups,
    /// Work done, for the profiler's GFLOP/s and GB/s.
    pub cost: Cost,
    /// Warm up over the whole grid instead of one workgroup ([`Dispatch::warmed_whole`]).
    whole_warm_up: bool,
}

/// Bytes that `resource` binds: a buffer binding's size (the rest of the buffer from its offset
/// when unsized); 0 for anything else (which the compile helper then does not build).
fn binding_bytes(resource: &wgpu::BindingResource<'_>) -> u64 {
    match resource {
        wgpu::BindingResource::Buffer(b) => b.size.map_or(b.buffer.size().saturating_sub(b.offset), |s| s.get()),
        _ => 0,
    }
}

/// The largest workgroup count per dimension that every adapter supports.
pub const MAX_GROUPS_PER_DIM: u32 = 65535;

/// Spread `n` workgroups over x and y so that neither exceeds the per-dimension limit. Kernels
/// recover the linear index as `wg.x + wg.y * num_workgroups.x`.
pub fn grid(n: u32) -> [u32; 3] {
    if n <= MAX_GROUPS_PER_DIM {
        [n.max(1), 1, 1]
    } else {
        let y = n.div_ceil(MAX_GROUPS_PER_DIM);
        [n.div_ceil(y), y, 1]
    }
}

impl Dispatch {
    /// Bind `resources` to bindings 0.. of `pipeline`'s group 0; untagged until [`Dispatch::tagged`].
    pub fn new(
        ctx: &GpuContext,
        pipeline: &Arc<Pipeline>,
        label: impl Into<String>,
        resources: &[wgpu::BindingResource<'_>],
        workgroups: [u32; 3],
        cost: Cost,
    ) -> Dispatch {
        let label = label.into();
        pipeline.binding_sizes.get_or_init(|| resources.iter().map(binding_bytes).collect());
        let entries: Vec<wgpu::BindGroupEntry<'_>> =
            resources.iter().enumerate().map(|(i, r)| wgpu::BindGroupEntry { binding: i as u32, resource: r.clone() }).collect();
        let bind_group =
            ctx.device.create_bind_group(&wgpu::BindGroupDescriptor { label: Some(&label), layout: &pipeline.layout, entries: &entries });
        Dispatch {
            part_at: label.len(),
            label,
            tag: None,
            pipeline: pipeline.clone(),
            bind_group,
            groups: Groups::Direct(workgroups),
            cost,
            whole_warm_up: false,
        }
    }

    /// Have [`GpuContext::warm_up`] dispatch the whole grid of this dispatch, not one workgroup:
    /// for a kernel whose invocations hand state on to the next dispatch (the norm epilogue's
    /// counter of invocations done, `kernels::matvec::MatvecEpilogue::Norm`), which one
    /// workgroup alone would leave part-counted.
    pub fn warmed_whole(mut self) -> Dispatch {
        self.whole_warm_up = true;
        self
    }

    /// Attach `tag`. The kernel was given `tag.label()` as its label; whatever it appended is the
    /// dispatch's own part ([`Dispatch::op_name`]).
    pub fn tagged(mut self, tag: Tag) -> Dispatch {
        let prefix = tag.label();
        self.part_at = if self.label.starts_with(&prefix) { prefix.len() } else { self.label.len() };
        self.tag = Some(tag);
        self
    }

    /// The operation as the profiler's tables name it: the tag's op plus the kernel's own part
    /// (`attn.core.split`, `lm_head[1]`); the whole label for an untagged dispatch. A numbered
    /// repeat of one product (`mlp.down#2`: the matmul's second window of rows of x, see
    /// [`crate::kernels::matmul::xbcast_dispatches`]) counts as the product itself.
    pub fn op_name(&self) -> Cow<'_, str> {
        let part = &self.label[self.part_at..];
        let part = part.find('#').map_or(part, |i| &part[..i]);
        match &self.tag {
            Some(t) if part.is_empty() => Cow::Borrowed(t.op),
            Some(t) => Cow::Owned(format!("{}{part}", t.op)),
            None => Cow::Borrowed(&self.label),
        }
    }

    /// The layer run the dispatch belongs to (phase and layer), None outside layers or untagged.
    pub fn layer_group(&self) -> Option<(Phase, usize)> {
        self.tag.and_then(|t| t.layer.map(|l| (t.phase, l)))
    }

    /// Take the workgroup counts from a GPU buffer instead (three u32 at `offset`).
    pub fn with_indirect(mut self, buffer: &wgpu::Buffer, offset: u64) -> Dispatch {
        self.groups = Groups::Indirect { buffer: buffer.clone(), offset };
        self
    }

    /// The kernel family this dispatch runs (the shader file stem).
    pub fn family(&self) -> &'static str {
        self.pipeline.family
    }

    /// The full pipeline key (family, entry point and variant).
    pub fn kernel(&self) -> &str {
        &self.pipeline.key
    }

    /// The direct workgroup counts; None when they are read from a buffer (indirect).
    pub fn workgroups(&self) -> Option<[u32; 3]> {
        match self.groups {
            Groups::Direct(g) => Some(g),
            Groups::Indirect { .. } => None,
        }
    }

    /// True when [`GpuContext::warm_up`] would dispatch this: its workgroup counts are direct and
    /// its pipeline has not been warmed.
    pub fn is_cold(&self) -> bool {
        matches!(self.groups, Groups::Direct(_)) && !self.pipeline.is_warm()
    }

    /// Set the pipeline and bind group and dispatch into `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        match &self.groups {
            Groups::Direct([x, y, z]) => pass.dispatch_workgroups(*x, *y, *z),
            Groups::Indirect { buffer, offset } => pass.dispatch_workgroups_indirect(buffer, *offset),
        }
    }
}

impl GpuContext {
    /// Have the driver compile every pipeline of `dispatches` that has not been warmed yet, by
    /// dispatching each such pipeline once, with its own bind group, over a single workgroup
    /// (workgroup 0 of its grid: the accesses of a dispatch the kernel already does; the whole
    /// grid for a dispatch [`Dispatch::warmed_whole`]), in one pass; then wait. Dispatches with
    /// indirect workgroup counts are left out (they may be meant to run zero workgroups). Returns
    /// how many pipelines were dispatched.
    ///
    /// Where the compile helper is open (a CPU adapter: [`super::compile_helper`]) and two or more
    /// pipelines are cold, this device and the helper's each take the next cold pipeline (the
    /// longest WGSL first) until none is left, and this device then dispatches those the helper
    /// compiled, finding their code in Mesa's shader cache.
    ///
    /// The single workgroup writes where the full dispatch would: call this only where the
    /// dispatches' outputs are overwritten before they are read (a step's scratch buffers, and
    /// KV-cache rows at or after the positions the next step writes).
    ///
    /// Where a cold pipeline has never been compiled on this adapter by firstrt's record, the
    /// first-run notice is given before (once per process) and the pipelines are recorded after
    /// ([`super::notice`]).
    ///
    /// # Errors
    /// As [`GpuContext::wait`].
    pub fn warm_up<'a>(&self, dispatches: impl IntoIterator<Item = &'a Dispatch>) -> Result<usize, GpuError> {
        let mut seen = std::collections::HashSet::new();
        let cold: Vec<&Dispatch> = dispatches.into_iter().filter(|d| d.is_cold() && seen.insert(Arc::as_ptr(&d.pipeline))).collect();
        if cold.is_empty() {
            return Ok(0);
        }
        // A pipeline never compiled on this adapter (by firstrt's record) may take the driver
        // seconds: say so once before starting, and record them once they ran.
        let unrecorded = super::notice::any_unrecorded(self, cold.iter().map(|d| d.pipeline.key.as_str()));
        if unrecorded {
            super::notice::give(self, "compiling shaders");
        }
        let start = std::time::Instant::now();
        let helper = if cold.len() >= 2 { self.compile_helper() } else { None };
        let mut helped = 0;
        match helper {
            None => self.dispatch_once(&cold)?,
            Some(h) => {
                // Both devices take the next cold pipeline from one queue, the longest WGSL
                // first (a rough measure of its compile time), until none is left; then this
                // device dispatches what the helper took (cache hits).
                let mut queue = cold.clone();
                queue.sort_by_key(|d| std::cmp::Reverse(d.pipeline.source.len()));
                let next = std::sync::atomic::AtomicUsize::new(0);
                let take = || queue.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)).copied();
                let theirs = std::thread::scope(|s| {
                    let job = s.spawn(|| {
                        let mut taken = Vec::new();
                        while let Some(d) = take() {
                            h.compile(&d.pipeline);
                            taken.push(d);
                        }
                        taken
                    });
                    let mut mine = Ok(());
                    while let Some(d) = take() {
                        mine = self.dispatch_once(&[d]);
                        if mine.is_err() {
                            break;
                        }
                    }
                    // Had the helper's thread panicked, what it took is unknown: this device
                    // dispatches every pipeline again (those it compiled are cheap now).
                    let theirs = job.join().unwrap_or_else(|_| queue.clone());
                    mine.map(|()| theirs)
                })?;
                helped = theirs.len();
                self.dispatch_once(&theirs)?;
            }
        }
        for d in &cold {
            d.pipeline.mark_warm();
        }
        if unrecorded {
            super::notice::record_compiled(self, cold.iter().map(|d| d.pipeline.key.as_str()));
        }
        let names: Vec<&str> = cold.iter().map(|d| d.pipeline.key.split('|').next().unwrap_or_default()).collect();
        log::debug!(
            "warmed {} pipelines in {:.2} s ({helped} taken by the compile helper): {}",
            cold.len(),
            start.elapsed().as_secs_f64(),
            names.join(", ")
        );
        Ok(cold.len())
    }

    /// One workgroup of each of `dispatches` in one pass, submitted and waited for (nothing
    /// for an empty list).
    fn dispatch_once(&self, dispatches: &[&Dispatch]) -> Result<(), GpuError> {
        if dispatches.is_empty() {
            return Ok(());
        }
        let mut encoder = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("warm-up") });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("warm-up"), timestamp_writes: None });
            for d in dispatches {
                pass.set_pipeline(&d.pipeline.pipeline);
                pass.set_bind_group(0, &d.bind_group, &[]);
                match d.groups {
                    Groups::Direct([x, y, z]) if d.whole_warm_up => pass.dispatch_workgroups(x, y, z),
                    _ => pass.dispatch_workgroups(1, 1, 1),
                }
            }
        }
        self.queue.submit([encoder.finish()]);
        self.wait()
    }
}

/// Record `program` into `pass` through `each`, inside a debug group per run of dispatches of one
/// layer (`decode/layer.12`), as debuggers show them.
pub fn record_grouped<'p>(
    pass: &mut wgpu::ComputePass<'_>,
    program: &'p [Dispatch],
    mut each: impl FnMut(&mut wgpu::ComputePass<'_>, &'p Dispatch),
) {
    for run in program.chunk_by(|a, b| a.layer_group() == b.layer_group()) {
        let group = run[0].tag.and_then(|t| t.layer_label());
        if let Some(name) = &group {
            pass.push_debug_group(name);
        }
        for d in run {
            each(pass, d);
        }
        if group.is_some() {
            pass.pop_debug_group();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_layer_groups_follow_the_tag() {
        let t = Tag::layer(Phase::Decode, 12, "mlp.down");
        assert_eq!(t.label(), "decode/layer.12/mlp.down");
        assert_eq!(t.layer_label().as_deref(), Some("decode/layer.12"));
        let head = Tag::step(Phase::Prefill, "lm_head");
        assert_eq!(head.label(), "prefill/lm_head");
        assert_eq!(head.layer_label(), None);
        assert!(Phase::Prefill == "prefill");
        assert_eq!(Phase::Decode.to_string(), "decode");
    }
}
