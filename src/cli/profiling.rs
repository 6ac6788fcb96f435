//! `--profile`, `--trace FILE.json` and `--capture`, shared by `run` and `bench`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use firstrt::gpu::GpuContext;
use firstrt::runtime::Profiler;

#[derive(Args, Debug, Clone, Default)]
pub struct ProfileArgs {
    /// Time every GPU dispatch (timestamp queries) and print per kernel family, operation and
    /// layer tables on stderr at the end, prefill and decode apart.
    #[arg(long)]
    pub profile: bool,
    /// Write a Chrome trace (open in Perfetto or chrome://tracing) with GPU kernel spans and host
    /// spans (encode, submit, wait, sample, detokenise).
    #[arg(long, value_name = "FILE.json")]
    pub trace: Option<PathBuf>,
    /// Wrap the prefill and the first decode step in a graphics-debugger capture (RenderDoc,
    /// Xcode with MTL_CAPTURE_ENABLED=1); also FIRSTRT_CAPTURE=1.
    #[arg(long, env = "FIRSTRT_CAPTURE")]
    pub capture: bool,
}

impl ProfileArgs {
    /// Before any work: the `--trace` file can be written (see [`super::check_output`]).
    pub fn check(&self) -> Result<()> {
        self.trace.as_deref().map_or(Ok(()), |path| super::check_output("--trace", path))
    }

    /// A profiler when --profile or --trace asks for one; None otherwise (no query set at all).
    pub fn profiler(&self, ctx: &std::sync::Arc<GpuContext>) -> Result<Option<Profiler>> {
        if !self.profile && self.trace.is_none() {
            return Ok(None);
        }
        let p = Profiler::new(ctx).context("--profile/--trace")?;
        log::info!("profiling with {:?}", p.mode());
        Ok(Some(p))
    }

    /// Read back what is outstanding, print the tables, write the trace.
    pub fn finish(&self, profiler: Option<Profiler>) -> Result<()> {
        let Some(mut p) = profiler else { return Ok(()) };
        p.flush().context("reading back the GPU timestamps")?;
        if self.profile {
            eprint!("{}", p.report());
            for phase in p.summary() {
                // Not a check: timing noise moves it, more so in PassPerDispatch mode, where the
                // gaps between passes count in the span.
                eprintln!(
                    "{}: kernel time / GPU span = {:.3} (below 1: GPU idle between dispatches; above 1: dispatches overlapped)",
                    phase.phase,
                    phase.kernel_s / phase.gpu_span_s.max(1e-30)
                );
            }
        }
        if let Some(path) = &self.trace {
            p.write_trace(path)?;
            eprintln!("trace written to {}", path.display());
        }
        Ok(())
    }
}

/// A graphics-debugger capture, open from `start` until `stop` (or drop).
pub struct Capture {
    device: Option<wgpu::Device>,
}

impl Capture {
    pub fn start(ctx: &GpuContext, enabled: bool) -> Capture {
        if !enabled {
            return Capture { device: None };
        }
        eprintln!("capturing the prefill and the first decode step (RenderDoc / Xcode must be attached)");
        // SAFETY: no other capture is active (this is the only place that starts one, once per
        // run), and the capture is stopped exactly once by `stop` or drop.
        unsafe { ctx.device.start_graphics_debugger_capture() };
        Capture { device: Some(ctx.device.clone()) }
    }

    pub fn stop(&mut self) {
        if let Some(device) = self.device.take() {
            // Submitted work has finished: each step waits for its read-back before returning.
            // SAFETY: the capture started in `start` is still active.
            unsafe { device.stop_graphics_debugger_capture() };
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop();
    }
}
