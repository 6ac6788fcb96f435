//! A prepared dispatch: pipeline, bind group and workgroup counts, built once and recorded into
//! any compute pass as often as needed (this is what "recorded" means under wgpu, which cannot
//! resubmit a command buffer).

use std::sync::Arc;

use super::GpuContext;
use super::pipeline::Pipeline;

/// Work done by one dispatch, for GFLOP/s and GB/s figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    pub flops: u64,
    /// Bytes read plus bytes written.
    pub bytes: u64,
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

#[derive(Debug, Clone)]
pub struct Dispatch {
    /// Where it sits, e.g. `decode/layer.3/mlp.down`.
    pub label: String,
    pipeline: Arc<Pipeline>,
    bind_group: wgpu::BindGroup,
    groups: Groups,
    pub cost: Cost,
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
    /// Bind `resources` to bindings 0.. of `pipeline`'s group 0.
    pub fn new(
        ctx: &GpuContext,
        pipeline: &Arc<Pipeline>,
        label: impl Into<String>,
        resources: &[wgpu::BindingResource<'_>],
        workgroups: [u32; 3],
        cost: Cost,
    ) -> Dispatch {
        let label = label.into();
        let entries: Vec<wgpu::BindGroupEntry<'_>> =
            resources.iter().enumerate().map(|(i, r)| wgpu::BindGroupEntry { binding: i as u32, resource: r.clone() }).collect();
        let bind_group =
            ctx.device.create_bind_group(&wgpu::BindGroupDescriptor { label: Some(&label), layout: &pipeline.layout, entries: &entries });
        Dispatch { label, pipeline: pipeline.clone(), bind_group, groups: Groups::Direct(workgroups), cost }
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

    pub fn workgroups(&self) -> Option<[u32; 3]> {
        match self.groups {
            Groups::Direct(g) => Some(g),
            Groups::Indirect { .. } => None,
        }
    }

    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        match &self.groups {
            Groups::Direct([x, y, z]) => pass.dispatch_workgroups(*x, *y, *z),
            Groups::Indirect { buffer, offset } => pass.dispatch_workgroups_indirect(buffer, *offset),
        }
    }
}
