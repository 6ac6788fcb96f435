//! Kernel profiling: GPU timestamps around every dispatch, host spans around encoding, submit,
//! wait, sampling and detokenising, a per-kernel report and a Chrome trace.
//!
//! A session profiles only when it holds a `Profiler` (`Session::set_profiler`); without one no
//! query set exists and `execute` records exactly what it always did.
//!
//! Two ways to time a dispatch, chosen by what the adapter offers:
//! - `ProfileMode::InsidePasses` (TIMESTAMP_QUERY_INSIDE_PASSES: Vulkan, DX12, lavapipe): the step
//!   stays one compute pass, with a timestamp before and after each dispatch, and the pass itself
//!   timed by its `timestamp_writes` (the "measured around the same work" figure).
//! - `ProfileMode::PassPerDispatch` (TIMESTAMP_QUERY only, e.g. Apple Silicon): each dispatch in
//!   its own pass, timed by that pass's `timestamp_writes`. Passes end in barriers, so this mode
//!   adds more overhead than the first.
//!
//! Queries come from `wgpu_profiler`, which resolves them into a QUERY_RESOLVE buffer, copies
//! them into a MAP_READ buffer per frame (one frame = one step here) and maps it asynchronously.
//! Results are collected without blocking when a later step ends; only when `RING` steps are
//! still unread does the profiler wait for the GPU. `flush` waits for the rest.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use wgpu_profiler::{GpuProfiler, GpuProfilerSettings};

use crate::gpu::dispatch::record_grouped;
use crate::gpu::{Cost, Dispatch, GpuContext, GpuError, Phase, Tag};

/// Steps whose timestamps may be in flight before the profiler waits for the oldest.
pub const RING: usize = 4;

/// Label of the query around a whole pass (InsidePasses mode).
const PASS_QUERY: &str = "#pass";

/// Everything that can go wrong while profiling.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The adapter has no timestamp queries.
    #[error("profiling needs GPU timestamp queries (TIMESTAMP_QUERY), which adapter {adapter} does not offer")]
    Unsupported {
        /// The adapter's name.
        adapter: String,
    },
    /// [`ProfileMode::InsidePasses`] on an adapter without timestamps inside passes.
    #[error("adapter {adapter} cannot write timestamps inside a pass (TIMESTAMP_QUERY_INSIDE_PASSES); use ProfileMode::PassPerDispatch")]
    InsidePassesUnsupported {
        /// The adapter's name.
        adapter: String,
    },
    /// `FIRSTRT_PROFILE_MODE` holds neither `inside` nor `passes`.
    #[error("unknown profile mode {0:?}: expected `inside` or `passes`")]
    UnknownMode(String),
    /// `wgpu_profiler` refused its settings.
    #[error("GPU profiler: {0}")]
    Create(#[source] wgpu_profiler::CreationError),
    /// `wgpu_profiler` could not close a step's frame (queries left open or unresolved).
    #[error("GPU profiler: {0}")]
    EndFrame(#[source] wgpu_profiler::EndFrameError),
    /// Waiting for the GPU to read timestamps back failed.
    #[error("GPU profiler: {0}")]
    Gpu(#[source] GpuError),
    /// [`Profiler::flush`] was called while a step was being recorded.
    #[error("GPU profiler: flush while a step is being recorded")]
    FlushWhileRecording,
    /// Steps whose timestamps never came back after waiting for the GPU.
    #[error("GPU profiler: {steps} steps never came back from the GPU")]
    LostSteps {
        /// How many.
        steps: usize,
    },
    /// The Chrome trace file could not be written.
    #[error("writing the trace {path}: {source}")]
    Trace {
        /// The trace file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// How dispatches are timed; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileMode {
    /// One pass per step, timestamps written inside it around each dispatch.
    InsidePasses,
    /// One pass per dispatch, timed by the pass's own timestamp writes.
    PassPerDispatch,
}

impl ProfileMode {
    /// The best mode the context supports: InsidePasses where possible. `FIRSTRT_PROFILE_MODE`
    /// (`inside` or `passes`) overrides it.
    pub fn for_context(ctx: &GpuContext) -> Result<ProfileMode, ProfileError> {
        if let Ok(v) = std::env::var("FIRSTRT_PROFILE_MODE") {
            return match v.as_str() {
                "inside" => Ok(ProfileMode::InsidePasses),
                "passes" => Ok(ProfileMode::PassPerDispatch),
                _ => Err(ProfileError::UnknownMode(v)),
            };
        }
        if ctx.features.contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES) {
            Ok(ProfileMode::InsidePasses)
        } else {
            Ok(ProfileMode::PassPerDispatch)
        }
    }
}

/// One dispatch as the GPU ran it.
#[derive(Debug, Clone)]
pub struct KernelSpan {
    /// Index into `Profiler::steps`.
    pub step: usize,
    /// The dispatch label, e.g. `decode/layer.3/mlp.down`.
    pub label: String,
    /// Where the dispatch sits (phase, layer, op); None for an untagged dispatch.
    pub tag: Option<Tag>,
    /// The operation as the tables name it ([`Dispatch::op_name`]), e.g. `mlp.down`, `lm_head`.
    pub op: String,
    /// Kernel family (shader file stem), e.g. `matvec`.
    pub family: &'static str,
    /// Work done by the dispatch.
    pub cost: Cost,
    /// Start on the GPU clock, seconds; only differences mean anything.
    pub start_s: f64,
    /// End on the GPU clock, seconds.
    pub end_s: f64,
}

impl KernelSpan {
    /// GPU seconds the dispatch took (0 if the clock went backwards).
    pub fn seconds(&self) -> f64 {
        (self.end_s - self.start_s).max(0.0)
    }
}

/// One step: a prefill or one decode token.
#[derive(Debug, Clone)]
pub struct StepRecord {
    /// Prefill or decode.
    pub phase: Phase,
    /// Host seconds since the profiler's epoch when the step started encoding.
    pub host_start_s: f64,
    /// Host seconds since the profiler's epoch of the step's first submit (NaN until then).
    pub submit_host_s: f64,
    /// GPU seconds around the step's work: the pass timestamps (InsidePasses), or from the first
    /// dispatch's start to the last one's end (PassPerDispatch). 0 until read back.
    pub gpu_span_s: f64,
    /// Sum of the step's dispatch times, seconds. 0 until read back.
    pub kernel_s: f64,
    /// GPU clock (s) of the step's first timestamp.
    pub gpu_start_s: f64,
    /// True once the step's timestamps have been read back.
    pub resolved: bool,
}

/// A host-side span on the trace's host track.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostSpan {
    /// What the host did: `prefill`/`decode` (the step), `encode`, `submit`, `wait`, `sample`,
    /// `detokenise`.
    pub name: String,
    /// Start, seconds since the profiler's epoch.
    pub start_s: f64,
    /// End, seconds since the profiler's epoch.
    pub end_s: f64,
}

/// Records host spans; cloned into code that does not own the session (the generation loop's sampling and detokenising spans).
#[derive(Debug, Clone)]
pub struct HostClock {
    epoch: Instant,
    spans: Arc<Mutex<Vec<HostSpan>>>,
}

impl HostClock {
    fn new() -> HostClock {
        HostClock { epoch: Instant::now(), spans: Arc::new(Mutex::new(Vec::new())) }
    }

    /// Seconds since the epoch at `t`.
    pub fn at(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.epoch).as_secs_f64()
    }

    /// Record `name` from `start` until now.
    pub fn span(&self, name: &str, start: Instant) {
        self.span_between(name, start, Instant::now());
    }

    /// Record `name` from `start` to `end`.
    pub fn span_between(&self, name: &str, start: Instant, end: Instant) {
        self.push(HostSpan { name: name.to_string(), start_s: self.at(start), end_s: self.at(end) });
    }

    fn push(&self, span: HostSpan) {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).push(span);
    }

    /// Every span recorded so far, in recording order.
    pub fn spans(&self) -> Vec<HostSpan> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What a query measures, in the order queries close within a frame: a dispatch, or (None) the
/// whole pass (InsidePasses mode).
struct Meta {
    kernel: Option<KernelMeta>,
}

/// A dispatch as the profiler keeps it until its time comes back.
struct KernelMeta {
    label: String,
    tag: Option<Tag>,
    op: String,
    family: &'static str,
    cost: Cost,
}

impl Meta {
    fn of(d: &Dispatch) -> Meta {
        Meta {
            kernel: Some(KernelMeta { label: d.label.clone(), tag: d.tag, op: d.op_name().into_owned(), family: d.family(), cost: d.cost }),
        }
    }
}

struct Frame {
    step: usize,
    metas: Vec<Meta>,
}

/// GPU timestamps around every dispatch and host spans around every step: see the module docs.
pub struct Profiler {
    gpu: GpuProfiler,
    mode: ProfileMode,
    ctx: Arc<GpuContext>,
    host: HostClock,
    /// Frames submitted and not yet read back, oldest first.
    pending: VecDeque<Frame>,
    /// The step being recorded (between its first record and `end_step`).
    open: Option<Frame>,
    /// Frames whose results did not match their queries (should stay 0).
    pub lost_frames: usize,
    /// Every dispatch read back so far, in recording order.
    pub kernels: Vec<KernelSpan>,
    /// Every step recorded so far.
    pub steps: Vec<StepRecord>,
}

impl std::fmt::Debug for Profiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Profiler({:?}, {} steps, {} kernels)", self.mode, self.steps.len(), self.kernels.len())
    }
}

impl Profiler {
    /// A profiler in the best mode for `ctx` (see `ProfileMode::for_context`).
    pub fn new(ctx: &Arc<GpuContext>) -> Result<Profiler, ProfileError> {
        Profiler::with_mode(ctx, ProfileMode::for_context(ctx)?)
    }

    /// A profiler in `mode`. Errors: `Unsupported` without TIMESTAMP_QUERY,
    /// `InsidePassesUnsupported` for InsidePasses without TIMESTAMP_QUERY_INSIDE_PASSES,
    /// `Profiler` when `wgpu_profiler` fails to start.
    pub fn with_mode(ctx: &Arc<GpuContext>, mode: ProfileMode) -> Result<Profiler, ProfileError> {
        let adapter = ctx.info.name.clone();
        if !ctx.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            return Err(ProfileError::Unsupported { adapter });
        }
        if mode == ProfileMode::InsidePasses && !ctx.features.contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES) {
            return Err(ProfileError::InsidePassesUnsupported { adapter });
        }
        // Our own debug groups (one per layer) stay; the profiler adds none per dispatch.
        let settings = GpuProfilerSettings { enable_timer_queries: true, enable_debug_groups: false, max_num_pending_frames: RING };
        let gpu = GpuProfiler::new(&ctx.device, settings).map_err(ProfileError::Create)?;
        Ok(Profiler {
            gpu,
            mode,
            ctx: ctx.clone(),
            host: HostClock::new(),
            pending: VecDeque::new(),
            open: None,
            lost_frames: 0,
            kernels: Vec::new(),
            steps: Vec::new(),
        })
    }

    /// How dispatches are timed.
    pub fn mode(&self) -> ProfileMode {
        self.mode
    }

    /// A handle for recording host spans from elsewhere (sampling, detokenising).
    pub fn host_clock(&self) -> HostClock {
        self.host.clone()
    }

    fn open_frame(&mut self, phase: Phase, encode_start: Instant) -> &mut Frame {
        if self.open.is_none() {
            let at = self.host.at(encode_start);
            self.steps.push(StepRecord {
                phase,
                host_start_s: at,
                submit_host_s: f64::NAN,
                gpu_span_s: 0.0,
                kernel_s: 0.0,
                gpu_start_s: 0.0,
                resolved: false,
            });
            self.open = Some(Frame { step: self.steps.len() - 1, metas: Vec::new() });
        }
        self.open.as_mut().expect("opened above")
    }

    /// Record `program` into `encoder` with timestamps, under pass label `pass_label`
    /// (`prefill` / `decode` / `prefill.segment`) and a debug group per layer, as a step of
    /// `phase` (several calls before `end_step` make one step). `encode_start` is when the
    /// caller began encoding (the step's start on the host track).
    pub fn record(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        phase: Phase,
        pass_label: &str,
        program: &[Dispatch],
        encode_start: Instant,
    ) {
        self.open_frame(phase, encode_start);
        let mut metas = Vec::with_capacity(program.len() + 1);
        match self.mode {
            ProfileMode::InsidePasses => {
                let pass_query = self.gpu.begin_pass_query(PASS_QUERY, encoder);
                {
                    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some(pass_label),
                        timestamp_writes: pass_query.compute_pass_timestamp_writes(),
                    });
                    let gpu = &self.gpu;
                    record_grouped(&mut pass, program, |pass, d| {
                        let q = gpu.begin_query(d.label.as_str(), pass);
                        d.record(pass);
                        gpu.end_query(pass, q);
                        metas.push(Meta::of(d));
                    });
                }
                self.gpu.end_query(encoder, pass_query);
                metas.push(Meta { kernel: None });
            }
            ProfileMode::PassPerDispatch => {
                for run in program.chunk_by(|a, b| a.layer_group() == b.layer_group()) {
                    let group = run[0].tag.and_then(|t| t.layer_label());
                    if let Some(name) = &group {
                        encoder.push_debug_group(name);
                    }
                    for d in run {
                        let q = self.gpu.begin_pass_query(d.label.as_str(), encoder);
                        {
                            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                                label: Some(&d.label),
                                timestamp_writes: q.compute_pass_timestamp_writes(),
                            });
                            d.record(&mut pass);
                        }
                        self.gpu.end_query(encoder, q);
                        metas.push(Meta::of(d));
                    }
                    if group.is_some() {
                        encoder.pop_debug_group();
                    }
                }
            }
        }
        self.open.as_mut().expect("opened by open_frame").metas.extend(metas);
    }

    /// Before the step's last submit: resolve its queries into `encoder`.
    pub fn resolve(&mut self, encoder: &mut wgpu::CommandEncoder) {
        self.gpu.resolve_queries(encoder);
    }

    /// Just before a submit of the open step (the first one sets its GPU-to-host alignment).
    pub fn mark_submit(&mut self, at: Instant) {
        let t = self.host.at(at);
        if let Some(f) = &self.open {
            let s = &mut self.steps[f.step];
            if s.submit_host_s.is_nan() {
                s.submit_host_s = t;
            }
        }
    }

    /// After the step's last submit: hand its queries to the read-back ring and collect any
    /// finished steps without blocking (blocking only when `RING` steps are unread).
    pub fn end_step(&mut self) -> Result<(), ProfileError> {
        let Some(frame) = self.open.take() else { return Ok(()) };
        self.collect();
        if self.pending.len() >= RING {
            // The oldest step still has not been read: wait rather than let the ring drop a frame.
            self.ctx.wait().map_err(ProfileError::Gpu)?;
            self.collect();
        }
        self.gpu.end_frame().map_err(ProfileError::EndFrame)?;
        self.pending.push_back(frame);
        Ok(())
    }

    /// Read back every step whose buffers are mapped (never blocks).
    pub fn collect(&mut self) {
        let period = self.ctx.queue.get_timestamp_period();
        while !self.pending.is_empty() {
            let Some(results) = self.gpu.process_finished_frame(period) else { break };
            let frame = self.pending.pop_front().expect("checked non-empty");
            if results.len() != frame.metas.len() {
                self.lost_frames += 1;
                continue;
            }
            let mut pass_span = 0.0;
            let mut first = f64::INFINITY;
            let mut last = f64::NEG_INFINITY;
            let mut sum = 0.0;
            for (r, m) in results.iter().zip(frame.metas) {
                let Some(time) = &r.time else { continue };
                let Some(m) = m.kernel else {
                    pass_span += (time.end - time.start).max(0.0);
                    first = first.min(time.start);
                    continue;
                };
                first = first.min(time.start);
                last = last.max(time.end);
                let span = KernelSpan {
                    step: frame.step,
                    label: m.label,
                    tag: m.tag,
                    op: m.op,
                    family: m.family,
                    cost: m.cost,
                    start_s: time.start,
                    end_s: time.end,
                };
                sum += span.seconds();
                self.kernels.push(span);
            }
            let s = &mut self.steps[frame.step];
            s.kernel_s = sum;
            s.gpu_start_s = if first.is_finite() { first } else { 0.0 };
            s.gpu_span_s = match self.mode {
                ProfileMode::InsidePasses => pass_span,
                ProfileMode::PassPerDispatch => (last - first).max(0.0),
            };
            s.resolved = true;
        }
    }

    /// Wait for the GPU and read back every outstanding step.
    pub fn flush(&mut self) -> Result<(), ProfileError> {
        if self.open.is_some() {
            return Err(ProfileError::FlushWhileRecording);
        }
        for _ in 0..RING + 1 {
            if self.pending.is_empty() {
                break;
            }
            self.ctx.wait().map_err(ProfileError::Gpu)?;
            self.collect();
        }
        if !self.pending.is_empty() {
            return Err(ProfileError::LostSteps { steps: self.pending.len() });
        }
        Ok(())
    }

    /// The host spans of the step just ended: encoding from `t0`, submit from `t1`, waiting for
    /// the read-back from `t2` until `t3`, under a `phase` span from the step's start.
    pub fn host_step(&self, phase: Phase, t0: Instant, t1: Instant, t2: Instant, t3: Instant) {
        let start = self.steps.last().map_or(self.host.at(t0), |s| s.host_start_s);
        self.host.push(HostSpan { name: phase.as_str().to_string(), start_s: start, end_s: self.host.at(t3) });
        self.host.span_between("encode", t0, t1);
        self.host.span_between("submit", t1, t2);
        self.host.span_between("wait", t2, t3);
    }

    /// Host spans recorded so far.
    pub fn host_spans(&self) -> Vec<HostSpan> {
        self.host.spans()
    }

    /// Per-phase totals and tables (call `flush` first).
    pub fn summary(&self) -> Vec<PhaseSummary> {
        let mut out = Vec::new();
        for phase in Phase::ALL {
            let steps: Vec<usize> = (0..self.steps.len()).filter(|&i| self.steps[i].phase == phase && self.steps[i].resolved).collect();
            if steps.is_empty() {
                continue;
            }
            let kernels: Vec<&KernelSpan> = self.kernels.iter().filter(|k| self.steps[k.step].phase == phase).collect();
            // Groups in the order of their (order, name) key.
            let group = |key: &dyn Fn(&KernelSpan) -> (usize, String)| {
                let mut m: BTreeMap<(usize, String), GroupStat> = BTreeMap::new();
                for k in &kernels {
                    let (order, name) = key(k);
                    let g = m.entry((order, name.clone())).or_insert_with(|| GroupStat { name, ..GroupStat::default() });
                    g.calls += 1;
                    g.total_s += k.seconds();
                    g.flops += k.cost.flops;
                    g.bytes += k.cost.bytes;
                }
                m.into_values().collect::<Vec<GroupStat>>()
            };
            let by_time = |mut v: Vec<GroupStat>| {
                v.sort_by(|a, b| b.total_s.total_cmp(&a.total_s));
                v
            };
            out.push(PhaseSummary {
                phase,
                steps: steps.len(),
                kernel_s: steps.iter().map(|&i| self.steps[i].kernel_s).sum(),
                gpu_span_s: steps.iter().map(|&i| self.steps[i].gpu_span_s).sum(),
                families: by_time(group(&|k| (0, k.family.to_string()))),
                ops: by_time(group(&|k| (0, k.op.clone()))),
                layers: group(&|k| match k.tag.and_then(|t| t.layer) {
                    Some(l) => (l, format!("layer.{l}")),
                    None => (usize::MAX, "(outside layers)".to_string()),
                }),
            });
        }
        out
    }

    /// The tables `--profile` prints on stderr.
    pub fn report(&self) -> String {
        let mut s = String::new();
        for p in self.summary() {
            s.push_str(&format!(
                "\n== {}: {} step(s), GPU {:.3} ms in kernels ({:.3} ms/step), {:.3} ms around them ({:?})\n",
                p.phase,
                p.steps,
                1e3 * p.kernel_s,
                1e3 * p.kernel_s / p.steps as f64,
                1e3 * p.gpu_span_s,
                self.mode
            ));
            for (title, rows) in [("kernel family", &p.families), ("operation", &p.ops), ("layer", &p.layers)] {
                s.push_str(&format!(
                    "{:<22} {:>7} {:>11} {:>10} {:>11} {:>7} {:>8} {:>9}\n",
                    title, "calls", "total ms", "ms/step", "mean us", "share", "GB/s", "GFLOP/s"
                ));
                for g in rows.iter() {
                    s.push_str(&format!(
                        "{:<22} {:>7} {:>11.3} {:>10.3} {:>11.1} {:>6.1}% {:>8.2} {:>9.2}\n",
                        g.name,
                        g.calls,
                        1e3 * g.total_s,
                        1e3 * g.total_s / p.steps as f64,
                        1e6 * g.total_s / g.calls.max(1) as f64,
                        100.0 * g.total_s / p.kernel_s.max(1e-30),
                        g.gb_s(),
                        g.gflop_s()
                    ));
                }
            }
        }
        if self.lost_frames > 0 {
            s.push_str(&format!("warning: {} step(s) lost by the profiler\n", self.lost_frames));
        }
        s
    }

    /// Chrome trace event format (`{"traceEvents": [...]}`, "X" events, microseconds): GPU
    /// spans on tid 1 (step > layer > dispatch), host spans on tid 2.
    ///
    /// GPU and host clocks differ, so each step's GPU spans are shifted to start when the step
    /// was submitted on the host (or when the previous step's GPU spans end, if later): the GPU
    /// really starts a little after the submit, so GPU spans are drawn slightly early. Dispatches
    /// that overlapped on the GPU are drawn back to back so that the track nests.
    pub fn trace_json(&self) -> serde_json::Value {
        const GPU: u32 = 1;
        const HOST: u32 = 2;
        let pid = std::process::id();
        let mut events = vec![
            serde_json::json!({"ph": "M", "name": "process_name", "pid": pid, "tid": GPU, "args": {"name": "firstrt"}}),
            serde_json::json!({"ph": "M", "name": "thread_name", "pid": pid, "tid": GPU, "args": {"name": "GPU"}}),
            serde_json::json!({"ph": "M", "name": "thread_name", "pid": pid, "tid": HOST, "args": {"name": "host"}}),
        ];
        let x = |name: &str, cat: &str, tid: u32, ts: f64, dur: f64, args: serde_json::Value| serde_json::json!({"ph": "X", "name": name, "cat": cat, "pid": pid, "tid": tid, "ts": ts, "dur": dur.max(0.0), "args": args});
        let mut by_step: Vec<Vec<&KernelSpan>> = vec![Vec::new(); self.steps.len()];
        for k in &self.kernels {
            by_step[k.step].push(k);
        }
        let mut gpu_free = f64::NEG_INFINITY; // us: where the previous step's GPU spans end
        for (i, step) in self.steps.iter().enumerate() {
            if !step.resolved || by_step[i].is_empty() {
                continue;
            }
            let base = (1e6 * step.submit_host_s).max(gpu_free);
            let mut cursor = base;
            let mut placed: Vec<(&KernelSpan, f64, f64)> = Vec::new();
            for k in &by_step[i] {
                let ts = (base + 1e6 * (k.start_s - step.gpu_start_s)).max(cursor);
                let end = ts + 1e6 * k.seconds();
                placed.push((k, ts, end));
                cursor = end;
            }
            let step_end = cursor.max(base + 1e6 * step.gpu_span_s);
            events.push(x(step.phase.as_str(), "gpu.step", GPU, base, step_end - base, serde_json::json!({"step": i})));
            // Layer spans around runs of dispatches of the same layer.
            for run in placed.chunk_by(|a, b| layer_group(a.0) == layer_group(b.0)) {
                if let Some(name) = run[0].0.tag.and_then(|t| t.layer_label()) {
                    let (start, end) = (run[0].1, run[run.len() - 1].2);
                    events.push(x(&name, "gpu.layer", GPU, start, end - start, serde_json::json!({})));
                }
            }
            for (k, ts, end) in placed {
                let args = serde_json::json!({"family": k.family, "flops": k.cost.flops, "bytes": k.cost.bytes});
                events.push(x(&k.label, "gpu.kernel", GPU, ts, end - ts, args));
            }
            gpu_free = step_end;
        }
        for h in self.host.spans() {
            events.push(x(&h.name, "host", HOST, 1e6 * h.start_s, 1e6 * (h.end_s - h.start_s), serde_json::json!({})));
        }
        // Parents before children: by start, then longest first.
        let key = |e: &serde_json::Value| (e["ts"].as_f64().unwrap_or(f64::NEG_INFINITY), -e["dur"].as_f64().unwrap_or(0.0));
        events.sort_by(|a, b| {
            let (ta, da) = key(a);
            let (tb, db) = key(b);
            ta.total_cmp(&tb).then(da.total_cmp(&db))
        });
        serde_json::json!({"traceEvents": events, "displayTimeUnit": "ms"})
    }

    /// Write [`Profiler::trace_json`] to `path`. Errors: `ProfileError::Trace`.
    pub fn write_trace(&self, path: &Path) -> Result<(), ProfileError> {
        let text = serde_json::to_string(&self.trace_json()).expect("a JSON value serialises");
        std::fs::write(path, text).map_err(|source| ProfileError::Trace { path: path.display().to_string(), source })
    }
}

/// Totals of one group of dispatches (a kernel family, an operation or a layer).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GroupStat {
    /// The family (`matvec`), operation (`mlp.down`) or layer (`layer.3`, `(outside layers)`).
    pub name: String,
    /// Dispatches in the group over all steps.
    pub calls: usize,
    /// GPU seconds summed over the calls.
    pub total_s: f64,
    /// Floating-point operations summed over the calls.
    pub flops: u64,
    /// Bytes read plus written, summed over the calls.
    pub bytes: u64,
}

impl GroupStat {
    /// Achieved bandwidth, GB/s (10^9 bytes per second); 0 without time.
    pub fn gb_s(&self) -> f64 {
        if self.total_s > 0.0 { self.bytes as f64 / self.total_s / 1e9 } else { 0.0 }
    }

    /// Achieved compute, GFLOP/s (10^9 floating-point operations per second); 0 without time.
    pub fn gflop_s(&self) -> f64 {
        if self.total_s > 0.0 { self.flops as f64 / self.total_s / 1e9 } else { 0.0 }
    }
}

/// One phase's profile, over all its steps.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PhaseSummary {
    /// Prefill or decode.
    pub phase: Phase,
    /// Steps of the phase read back.
    pub steps: usize,
    /// Sum of all dispatch times, seconds.
    pub kernel_s: f64,
    /// GPU time around the same work (see `StepRecord::gpu_span_s`), seconds.
    pub gpu_span_s: f64,
    /// Sorted by total time, largest first.
    pub families: Vec<GroupStat>,
    /// By operation ([`Dispatch::op_name`]: `attn.qkv`, `lm_head`, ...), largest first.
    pub ops: Vec<GroupStat>,
    /// `layer.N` in layer order, then `(outside layers)`.
    pub layers: Vec<GroupStat>,
}

/// The layer run a timed dispatch belongs to (as [`Dispatch::layer_group`]).
fn layer_group(k: &KernelSpan) -> Option<(Phase, usize)> {
    k.tag.and_then(|t| t.layer.map(|l| (t.phase, l)))
}
