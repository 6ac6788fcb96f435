//! The fuzz harness's inputs under `cargo test`: every seed is a valid file that its parser
//! accepts, and every saved regression input (`fuzz/regressions/TARGET/*`, each one a crash the
//! fuzzer once found) now gives `Ok` or an error: no panic, no allocation over the harness's
//! cap (the same capped allocator is installed here), no hang (each run must end within 20 s).

// Shared with the harness, which also uses its report slots (`set_report`); here a violation
// only prints and aborts.
#[allow(dead_code)]
#[path = "../examples/fuzz/alloc_cap.rs"]
mod alloc_cap;
#[path = "../examples/fuzz/targets.rs"]
mod targets;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use firstrt::testdata::TempDir;
use targets::{Format, TARGETS, Target};

#[global_allocator]
static ALLOCATOR: alloc_cap::CappedAllocator = alloc_cap::CappedAllocator;

/// Longest time one regression input may take.
const RUN_LIMIT: Duration = Duration::from_secs(20);

#[test]
fn seeds_are_valid_files_that_parse() {
    let dir = TempDir::new("fuzz-seeds");
    for target in &TARGETS {
        let seeds = target.seeds();
        for part in 0..target.parts.len() {
            assert!(seeds.iter().any(|s| target.part_of(s) == part), "{}: no seed for {}", target.name, target.parts[part].file);
        }
        for (i, seed) in seeds.iter().enumerate() {
            let part = &target.parts[target.part_of(seed)];
            match part.format {
                Format::Json => assert!(serde_json::from_slice::<serde_json::Value>(&seed[1..]).is_ok(), "{} seed {i}", target.name),
                Format::Jinja => assert!(std::str::from_utf8(&seed[1..]).is_ok(), "{} seed {i}", target.name),
                Format::Binary => {}
            }
            if let Err(e) = target.run(&dir.path, seed) {
                panic!("{} seed {i} ({}) fails: {e}", target.name, part.file);
            }
        }
    }
}

/// Runs `input` on a thread of its own and waits at most [`RUN_LIMIT`].
fn run_bounded(target: &'static Target, file: &Path, input: Vec<u8>) {
    let (done, finished) = mpsc::channel();
    let name = file.display().to_string();
    std::thread::spawn(move || {
        let dir = TempDir::new("fuzz-regression");
        let result = std::panic::catch_unwind(|| target.run(&dir.path, &input));
        let _ = done.send(result.is_ok());
    });
    match finished.recv_timeout(RUN_LIMIT) {
        Ok(true) => {}
        Ok(false) => panic!("{name}: the {} target panicked", target.name),
        Err(_) => panic!("{name}: the {} target ran over {RUN_LIMIT:?}", target.name),
    }
}

#[test]
fn regression_inputs_give_ok_or_an_error() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut count = 0;
    for entry in std::fs::read_dir(&root).expect("fuzz/regressions exists") {
        let dir = entry.expect("listing fuzz/regressions").path();
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let target = Target::by_name(&name).unwrap_or_else(|| panic!("{}: not a fuzz target's name", dir.display()));
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(&dir).expect("listing a regression folder").map(|e| e.expect("entry").path()).collect();
        files.sort();
        for file in files {
            let input = std::fs::read(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
            run_bounded(target, &file, input);
            count += 1;
        }
    }
    assert!(count > 0, "no regression inputs under {}", root.display());
}
