//! Fuzz harness for firstrt's file parsers, on stable Rust (no coverage instrumentation).
//!
//! ```text
//! cargo run --release --example fuzz -- --target gguf|routers|lora|hf-config|tokenizer|chat-template|all
//!     [--iterations N] [--seconds S] [--seed S] [--timeout-ms MS] [--replay FILE]
//! ```
//!
//! A supervisor process starts a worker (this binary again, with `--worker`) and watches it.
//! The worker mutates the seeds of each target ([`targets`], [`mutate`]) and runs every input
//! through the parser; before each run it copies the input into a file mapping shared with the
//! supervisor. Inputs that give an error message not seen before (digits and quoted names left
//! out) join the corpus, so that inputs which get further into a parser are mutated further.
//!
//! A crash is a panic (caught in the worker), an abort or a signal (a stack overflow, say), an
//! allocation over the cap of [`alloc_cap`] (one allocation over 256 MiB or 1 GiB live), or a
//! hang (one run longer than `--timeout-ms`, 2000 by default, killed by the supervisor). The
//! supervisor then saves the input as `fuzz/crashes/TARGET-<hash>` and exits with status 1,
//! naming the target and the file. `--replay FILE` runs one saved input the same way and
//! prints its result.

mod alloc_cap;
mod mutate;
mod targets;

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use firstrt::testdata::TempDir;
use memmap2::MmapMut;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use targets::{TARGETS, Target};

#[global_allocator]
static ALLOCATOR: alloc_cap::CappedAllocator = alloc_cap::CappedAllocator;

/// Iterations per target when neither `--iterations` nor `--seconds` is given.
const DEFAULT_ITERATIONS: u64 = 10_000;
/// Largest corpus per target (seeds and inputs with a new error message).
const MAX_CORPUS: usize = 512;
/// Exit status of a worker whose run panicked.
const PANIC_STATUS: i32 = 70;
/// Reason slot value for a panic (the allocator's reasons are 2 and 3).
const REASON_PANIC: u64 = 1;

#[derive(Parser, Debug)]
#[command(about = "Fuzz firstrt's parsers: mutated GGUF, router, LoRA, config, tokenizer files and chat templates")]
struct Args {
    /// gguf, routers, lora, hf-config, tokenizer, chat-template or all.
    #[arg(long, default_value = "all")]
    target: String,
    /// Executions per target (default 10000 when --seconds is not given either).
    #[arg(long)]
    iterations: Option<u64>,
    /// Seconds per target; with --iterations, whichever ends first.
    #[arg(long)]
    seconds: Option<f64>,
    /// Seed of the mutations: the same seed gives the same inputs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Longest run of one input, in milliseconds, before it counts as a hang.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Run one saved input (a crash or regression file) and print its result.
    #[arg(long)]
    replay: Option<PathBuf>,
    /// Where crashing inputs are saved.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/crashes"))]
    crash_dir: PathBuf,
    /// Internal: run as the worker over this shared file.
    #[arg(long, hide = true)]
    worker: Option<PathBuf>,
}

impl Args {
    /// The targets to run: the one named by `--target`, every one for `all`, or for `--replay`
    /// (with `--target all`) the one its file name (`TARGET-...`) or folder names.
    fn targets(&self) -> Result<Vec<(usize, &'static Target)>, String> {
        if let Some(file) = self.replay.as_ref().filter(|_| self.target == "all") {
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let dir = file.parent().and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            return TARGETS
                .iter()
                .enumerate()
                .find(|(_, t)| name.starts_with(&format!("{}-", t.name)) || dir == t.name)
                .map(|found| vec![found])
                .ok_or_else(|| format!("cannot tell the target of {}: pass --target", file.display()));
        }
        if self.target == "all" {
            return Ok(TARGETS.iter().enumerate().collect());
        }
        let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
        let target =
            Target::by_name(&self.target).ok_or_else(|| format!("unknown target '{}' (known: {}, all)", self.target, names.join(", ")))?;
        Ok(vec![(names.iter().position(|&n| n == target.name).unwrap_or_default(), target)])
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let targets = match args.targets() {
        Ok(targets) => targets,
        Err(message) => {
            eprintln!("fuzz: {message}");
            return ExitCode::from(2);
        }
    };
    match &args.worker {
        Some(shared) => worker(&args, &targets, shared),
        None => supervise(&args),
    }
}

// ---------------------------------------------------------------------------------------------
// The memory shared by supervisor and worker.

/// Slots (u64 each) at the start of the shared file, then the current input.
mod slot {
    /// Executions finished.
    pub const EXECS: usize = 0;
    /// 1 while an input runs.
    pub const BUSY: usize = 1;
    /// Index in `TARGETS` of the running target.
    pub const TARGET: usize = 2;
    /// Length of the input.
    pub const LEN: usize = 3;
    /// Why the worker stopped (`REASON_*`), then a byte count (two slots, see `alloc_cap`).
    pub const REASON: usize = 4;
}
const HEADER_BYTES: usize = 64;

/// A file mapped by both processes: counters and the input being run.
struct Shared {
    _map: MmapMut,
    base: *mut u8,
}

impl Shared {
    fn open(path: &Path, create: bool) -> std::io::Result<Shared> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(create).truncate(create).open(path)?;
        if create {
            file.set_len((HEADER_BYTES + mutate::MAX_INPUT) as u64)?;
        }
        // SAFETY: the file is private to this harness's two processes, which only access it
        // through the atomics and the input area below.
        let mut map = unsafe { MmapMut::map_mut(&file)? };
        let base = map.as_mut_ptr();
        Ok(Shared { _map: map, base })
    }

    fn slot(&self, index: usize) -> &AtomicU64 {
        // SAFETY: the map is page-aligned and at least HEADER_BYTES long; slots are 8-byte
        // aligned and only ever accessed atomically.
        unsafe { &*(self.base.add(8 * index) as *const AtomicU64) }
    }

    /// Publishes `input` as the one about to run for target `target`.
    fn begin(&self, target: usize, input: &[u8]) {
        let len = input.len().min(mutate::MAX_INPUT);
        // SAFETY: the input area holds MAX_INPUT bytes after the header; only this (worker)
        // process writes it, and the supervisor reads it only once the worker has stopped.
        unsafe { std::ptr::copy_nonoverlapping(input.as_ptr(), self.base.add(HEADER_BYTES), len) };
        self.slot(slot::TARGET).store(target as u64, Ordering::Relaxed);
        self.slot(slot::LEN).store(len as u64, Ordering::Relaxed);
        self.slot(slot::BUSY).store(1, Ordering::Release);
    }

    fn end(&self) {
        self.slot(slot::BUSY).store(0, Ordering::Release);
        self.slot(slot::EXECS).fetch_add(1, Ordering::Release);
    }

    /// The last published input.
    fn input(&self) -> Vec<u8> {
        let len = (self.slot(slot::LEN).load(Ordering::Acquire) as usize).min(mutate::MAX_INPUT);
        // SAFETY: within the input area (see `begin`).
        unsafe { std::slice::from_raw_parts(self.base.add(HEADER_BYTES), len) }.to_vec()
    }
}

// ---------------------------------------------------------------------------------------------
// Supervisor: starts the worker, kills it on a hang, saves the input of a crash.

fn supervise(args: &Args) -> ExitCode {
    let dir = TempDir::new("fuzz-shared");
    let path = dir.join("shared");
    let shared = match Shared::open(&path, true) {
        Ok(shared) => shared,
        Err(e) => {
            eprintln!("fuzz: creating {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("fuzz: cannot find this program's path: {e}");
            return ExitCode::from(2);
        }
    };
    let mut worker = Command::new(exe);
    worker.args(std::env::args_os().skip(1)).arg("--worker").arg(&path);
    // The parsers read files: on a RAM file system they run about 30x faster than on a disk.
    if std::env::var_os("TMPDIR").is_none() && Path::new("/dev/shm").is_dir() {
        worker.env("TMPDIR", "/dev/shm");
    }
    let mut child = match worker.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("fuzz: starting the worker: {e}");
            return ExitCode::from(2);
        }
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    // (execution count, when it was first seen busy)
    let mut busy_since: Option<(u64, Instant)> = None;
    let (status, hang) = loop {
        match child.try_wait() {
            Ok(Some(status)) => break (Some(status), false),
            Ok(None) => {}
            Err(e) => {
                eprintln!("fuzz: waiting for the worker: {e}");
                break (None, false);
            }
        }
        let execs = shared.slot(slot::EXECS).load(Ordering::Acquire);
        if shared.slot(slot::BUSY).load(Ordering::Acquire) == 1 {
            match busy_since {
                Some((n, since)) if n == execs => {
                    if since.elapsed() > timeout {
                        let _ = child.kill();
                        break (child.wait().ok(), true);
                    }
                }
                _ => busy_since = Some((execs, Instant::now())),
            }
        } else {
            busy_since = None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if !hang && status.is_some_and(|s| s.success()) {
        return ExitCode::SUCCESS;
    }
    let reason = shared.slot(slot::REASON).load(Ordering::Acquire);
    let bytes = shared.slot(slot::REASON + 1).load(Ordering::Acquire);
    let what = if hang {
        format!("hang: one run took over {} ms", args.timeout_ms)
    } else if reason == REASON_PANIC {
        "panic".to_owned()
    } else if reason == alloc_cap::REASON_TOO_LARGE {
        format!("one allocation of {bytes} bytes, over the cap of {} bytes", alloc_cap::MAX_ALLOCATION)
    } else if reason == alloc_cap::REASON_LIVE {
        format!("{bytes} bytes allocated at once, over the cap of {} bytes", alloc_cap::MAX_LIVE)
    } else {
        match status {
            Some(s) if s.signal().is_some() => format!("killed by signal {} (abort, stack overflow, ...)", s.signal().unwrap_or_default()),
            Some(s) => format!("worker exited with {s}"),
            None => "worker lost".to_owned(),
        }
    };
    let target = TARGETS.get(shared.slot(slot::TARGET).load(Ordering::Acquire) as usize).map_or("?", |t| t.name);
    if shared.slot(slot::BUSY).load(Ordering::Acquire) == 0 && !hang {
        eprintln!("fuzz: the harness itself failed between runs ({what})");
        return ExitCode::FAILURE;
    }
    if let Some(file) = &args.replay {
        eprintln!("fuzz: target {target} crashed on {} ({what})", file.display());
        return ExitCode::FAILURE;
    }
    let input = shared.input();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    input.hash(&mut hasher);
    let file = args.crash_dir.join(format!("{target}-{:016x}", hasher.finish()));
    if let Err(e) = std::fs::create_dir_all(&args.crash_dir).and_then(|()| std::fs::write(&file, &input)) {
        eprintln!("fuzz: target {target} crashed ({what}); saving the input to {} failed: {e}", file.display());
        return ExitCode::FAILURE;
    }
    eprintln!(
        "fuzz: target {target} crashed ({what}); input saved to {}\nfuzz: replay with: cargo run --release --example fuzz -- --replay {}",
        file.display(),
        file.display()
    );
    ExitCode::FAILURE
}

// ---------------------------------------------------------------------------------------------
// Worker: the mutation loop.

fn worker(args: &Args, targets: &[(usize, &'static Target)], shared_path: &Path) -> ExitCode {
    let shared = match Shared::open(shared_path, false) {
        Ok(shared) => shared,
        Err(e) => {
            eprintln!("fuzz worker: opening {}: {e}", shared_path.display());
            return ExitCode::from(2);
        }
    };
    alloc_cap::set_report(shared.slot(slot::REASON).as_ptr());
    // A panic that a parser catches itself (minijinja's code generator, in `model::chat`) still
    // runs the panic hook. With RUST_BACKTRACE set, the default hook symbolises a backtrace,
    // which took over 2 s the first time in a process (this binary's debug info). That time
    // counted against `--timeout-ms`, and the run was reported as a hang. While fuzzing, the hook
    // prints the message and location only; `--replay` keeps the default hook and its backtrace.
    if args.replay.is_none() {
        std::panic::set_hook(Box::new(|info| eprintln!("{info}")));
    }
    let scratch = TempDir::new("fuzz");
    if let Some(file) = &args.replay {
        let input = match std::fs::read(file) {
            Ok(input) => input,
            Err(e) => {
                eprintln!("fuzz: reading {}: {e}", file.display());
                return ExitCode::from(2);
            }
        };
        let (index, target) = targets[0];
        let runner = Runner { shared: &shared, index, target, dir: &scratch.path };
        let part = target.parts[target.part_of(&input)].file;
        match runner.execute(&input) {
            Ok(()) => println!("{}: {part}: Ok", target.name),
            Err(message) => println!("{}: {part}: Err: {message}", target.name),
        }
        return ExitCode::SUCCESS;
    }
    let iterations = args.iterations.unwrap_or(if args.seconds.is_some() { u64::MAX } else { DEFAULT_ITERATIONS });
    let seconds = args.seconds.map(Duration::from_secs_f64);
    for &(index, target) in targets {
        let mut rng = SmallRng::seed_from_u64(args.seed.wrapping_add((index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        let runner = Runner { shared: &shared, index, target, dir: &scratch.path };
        fuzz_target(&runner, &mut rng, iterations, seconds, args.seed);
    }
    ExitCode::SUCCESS
}

/// One target in the worker: where inputs are published and where its files are written.
struct Runner<'a> {
    shared: &'a Shared,
    /// Index of `target` in `TARGETS`.
    index: usize,
    target: &'static Target,
    /// Scratch folder for the files the parsers read.
    dir: &'a Path,
}

impl Runner<'_> {
    /// Runs one input; a panic ends the worker (after recording it for the supervisor).
    fn execute(&self, input: &[u8]) -> Result<(), String> {
        self.shared.begin(self.index, input);
        match std::panic::catch_unwind(|| self.target.run(self.dir, input)) {
            Ok(result) => {
                self.shared.end();
                result
            }
            Err(_) => {
                // The panic hook has printed the message and location.
                self.shared.slot(slot::REASON).store(REASON_PANIC, Ordering::Release);
                std::process::exit(PANIC_STATUS);
            }
        }
    }
}

/// The outcome with digits and quoted parts left out: inputs that reach a new message are kept.
fn signature(part: usize, result: &Result<(), String>) -> String {
    let Err(message) = result else { return format!("{part}:ok") };
    let mut out = format!("{part}:");
    let mut quote: Option<char> = None;
    for c in message.chars().take(160) {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if matches!(c, '\'' | '"' | '`') => quote = Some(c),
            None if c.is_ascii_digit() => {}
            None => out.push(c),
        }
    }
    out
}

/// Saved regression inputs of `target` (they seed the corpus too).
fn regression_inputs(target: &Target) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions").join(target.name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
    files.sort();
    files.iter().filter_map(|f| std::fs::read(f).ok()).collect()
}

/// Mutates and runs inputs of one target until `iterations` or `seconds` is reached, then
/// prints the figures.
fn fuzz_target(runner: &Runner, rng: &mut SmallRng, iterations: u64, seconds: Option<Duration>, seed: u64) {
    let target = runner.target;
    let mut corpus: Vec<Vec<u8>> = target.seeds();
    corpus.extend(regression_inputs(target));
    let mut seen = HashSet::new();
    for input in &corpus {
        seen.insert(signature(target.part_of(input), &runner.execute(input)));
    }
    let start = Instant::now();
    let mut last_report = start;
    let (mut execs, mut oks) = (0u64, 0u64);
    while execs < iterations && seconds.is_none_or(|s| start.elapsed() < s) {
        let base = &corpus[rng.random_range(0..corpus.len())];
        let part = target.part_of(base);
        let other = &corpus[rng.random_range(0..corpus.len())];
        let other = if target.part_of(other) == part { other.get(1..).unwrap_or_default() } else { &[] };
        let mut payload = base.get(1..).unwrap_or_default().to_vec();
        mutate::mutate(rng, &mut payload, target.parts[part].format, other);
        let selector = if rng.random_ratio(1, 64) { rng.random() } else { base.first().copied().unwrap_or(0) };
        let mut input = Vec::with_capacity(payload.len() + 1);
        input.push(selector);
        input.extend_from_slice(&payload);

        let result = runner.execute(&input);
        execs += 1;
        oks += u64::from(result.is_ok());
        if seen.insert(signature(target.part_of(&input), &result)) && corpus.len() < MAX_CORPUS {
            corpus.push(input);
        }
        if last_report.elapsed() >= Duration::from_secs(30) {
            last_report = Instant::now();
            let t = start.elapsed().as_secs_f64();
            eprintln!("fuzz: {}: {execs} runs in {t:.0} s ({:.0}/s), corpus {}", target.name, execs as f64 / t, corpus.len());
        }
    }
    let t = start.elapsed().as_secs_f64();
    println!(
        "{}: {execs} runs in {t:.1} s ({:.0} runs/s), {oks} Ok, {} outcomes, corpus {}, seed {seed}, no crash",
        target.name,
        execs as f64 / t.max(1e-9),
        seen.len(),
        corpus.len()
    );
}
