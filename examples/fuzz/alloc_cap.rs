//! A global allocator that turns a runaway allocation into a crash.
//!
//! Two limits: one allocation larger than [`MAX_ALLOCATION`] (256 MiB), or more than
//! [`MAX_LIVE`] (1 GiB) allocated and not yet freed. Both are far above anything a parser needs
//! for the inputs the harness makes (at most 256 KiB): reaching them means a size read from the
//! file was trusted. On a violation the allocator records it (see [`set_report`]), prints one
//! line to stderr and aborts; the supervisor then saves the input.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write as _;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

/// Largest single allocation, in bytes.
pub const MAX_ALLOCATION: usize = 256 << 20;
/// Largest total of live allocations, in bytes.
pub const MAX_LIVE: usize = 1 << 30;

/// Why the allocator aborted, as recorded in the report slots.
pub const REASON_TOO_LARGE: u64 = 2;
/// Live total over [`MAX_LIVE`].
pub const REASON_LIVE: u64 = 3;

static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Two u64 slots (reason, bytes) in memory the supervisor reads; null when there is none.
static REPORT: AtomicPtr<u64> = AtomicPtr::new(std::ptr::null_mut());

/// Where to record a violation: `slots` points at two u64 (reason, bytes) that outlive the
/// process's allocations (the shared map of `main.rs`).
pub fn set_report(slots: *mut u64) {
    REPORT.store(slots, Ordering::Release);
}

/// The capped allocator; install it with `#[global_allocator]`.
pub struct CappedAllocator;

impl CappedAllocator {
    fn check(size: usize) {
        let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
        let (reason, what, limit) = if size > MAX_ALLOCATION {
            (REASON_TOO_LARGE, "one allocation of", MAX_ALLOCATION)
        } else if live > MAX_LIVE {
            (REASON_LIVE, "live allocations reached", MAX_LIVE)
        } else {
            return;
        };
        let slots = REPORT.load(Ordering::Acquire);
        if !slots.is_null() {
            // SAFETY: set_report's contract: two u64 slots valid for the process's lifetime.
            unsafe {
                slots.write_volatile(reason);
                slots.add(1).write_volatile(if reason == REASON_TOO_LARGE { size } else { live } as u64);
            }
        }
        // No allocation from here on: integer formatting into the unbuffered stderr.
        let bytes = if reason == REASON_TOO_LARGE { size } else { live };
        let _ = writeln!(std::io::stderr(), "fuzz: {what} {bytes} bytes is over the cap of {limit} bytes");
        std::process::abort();
    }
}

// SAFETY: every call forwards to the system allocator with the same layout; the bookkeeping
// only adds and subtracts sizes.
unsafe impl GlobalAlloc for CappedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::check(layout.size());
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::check(layout.size());
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        Self::check(new_size);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
