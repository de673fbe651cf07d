//! A counting global allocator for the allocation tests: [`Counting`] forwards to the
//! system allocator and records process-wide counters (live bytes and their peak, the
//! largest allocation, bytes and calls in all) and per-thread ones (calls, bytes, the
//! largest allocation). No wall-clock.
//!
//! Each test binary includes this file with
//! `#[path = "common/counting_alloc.rs"] mod counting_alloc;` and installs its own
//! `#[global_allocator] static ALLOC: Counting = Counting;`.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The counting allocator: the system allocator plus the counters of this module.
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static TOTAL: AtomicUsize = AtomicUsize::new(0);
static CALLS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Allocation calls made by this thread, the bytes they asked for, and the largest
    /// of them (const-initialised, no destructor: safe to touch from the allocator).
    static THREAD_CALLS: Cell<usize> = const { Cell::new(0) };
    static THREAD_BYTES: Cell<usize> = const { Cell::new(0) };
    static THREAD_LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn record_alloc(size: usize) {
    let _ = THREAD_CALLS.try_with(|c| c.set(c.get() + 1));
    let _ = THREAD_BYTES.try_with(|c| c.set(c.get() + size));
    let _ = THREAD_LARGEST.try_with(|c| c.set(c.get().max(size)));
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
    LARGEST.fetch_max(size, Ordering::Relaxed);
    TOTAL.fetch_add(size, Ordering::Relaxed);
    CALLS.fetch_add(1, Ordering::Relaxed);
}

// SAFETY: forwards to the system allocator; the counters do not affect allocation.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record_alloc(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record_alloc(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        record_alloc(new_size);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// What one measured section allocated in the whole process.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// Peak live bytes above the level at the start.
    pub peak: usize,
    /// Largest single allocation.
    pub largest: usize,
    /// Bytes allocated in all.
    pub total: usize,
    /// Allocation calls.
    pub calls: usize,
}

/// Runs `f` and returns what the whole process allocated meanwhile. The counters are
/// process-wide: callers measure one section at a time.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Usage) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    LARGEST.store(0, Ordering::Relaxed);
    TOTAL.store(0, Ordering::Relaxed);
    CALLS.store(0, Ordering::Relaxed);
    let r = f();
    let usage = Usage {
        peak: PEAK.load(Ordering::Relaxed).saturating_sub(base),
        largest: LARGEST.load(Ordering::Relaxed),
        total: TOTAL.load(Ordering::Relaxed),
        calls: CALLS.load(Ordering::Relaxed),
    };
    (r, usage)
}

/// Allocation calls this thread has made so far.
pub fn thread_calls() -> usize {
    THREAD_CALLS.with(Cell::get)
}

/// Runs `f` and returns the bytes it allocated on this thread and the largest single
/// allocation among them (other threads do not disturb either).
pub fn measure_thread<R>(f: impl FnOnce() -> R) -> (R, usize, usize) {
    let (b0, _) = (
        THREAD_BYTES.with(Cell::get),
        THREAD_LARGEST.with(|c| c.set(0)),
    );
    let r = f();
    (
        r,
        THREAD_BYTES.with(Cell::get) - b0,
        THREAD_LARGEST.with(Cell::get),
    )
}
