// The allocator cap shared by the fuzz crate (through `wal_checks.rs`) and the corpus replays
// under `cargo test` (`wal/tests/fuzz_corpus.rs` through `wal_checks.rs`,
// `engine/tests/fuzz_corpus.rs` directly): one copy, `include!`d. Items only; each includer
// installs it with its own `#[global_allocator]`.

/// The largest single allocation the checks tolerate (TESTING.md S4: none of 64 MiB or more).
/// libFuzzer's `-malloc_limit_mb` needs a sanitizer's malloc hooks, which `--sanitizer none`
/// lacks, so the cap is enforced here: a larger request gets null and the process aborts with
/// "memory allocation of N bytes failed", which libFuzzer records as a crash.
pub const ALLOC_LIMIT: usize = 64 << 20;

/// The system allocator, refusing any single allocation of [`ALLOC_LIMIT`] bytes or more.
pub struct CappedAlloc;

// SAFETY: every call forwards to `System` with the caller's arguments, or returns null, which the
// `GlobalAlloc` contract allows for any request.
unsafe impl std::alloc::GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.size() >= ALLOC_LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller upholds `alloc`'s contract, which is `System.alloc`'s.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.size() >= ALLOC_LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `alloc`.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from `System` (every non-null pointer we hand out does).
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        if new_size >= ALLOC_LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` came from `System`; the caller upholds the rest of the contract.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

