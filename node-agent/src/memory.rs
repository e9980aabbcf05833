//! Handing freed memory back to the system: after a burst, and under sustained churn.
//!
//! A first sync decodes, renders and writes the whole rule set at once. glibc keeps the pages
//! freed afterwards in its arenas (it returns memory to the system only from the top of a
//! heap), so without this the agent would stay resident at that peak for its whole life.
//!
//! Every change also allocates buffers of hundreds of KiB (the state file is the whole applied
//! state, about 500 KiB at 1,000 Services). glibc maps such a buffer and unmaps it when freed,
//! but it then raises its mmap threshold to that size (up to 32 MiB), so from the next change
//! on these buffers are carved from the arenas instead, freed in a different order each time:
//! the arenas fragment and the agent's RSS creeps up for as long as the churn lasts (bench
//! suite 9, 20 changes/s: 19.1 to 23.5 MiB in 4.5 minutes, still rising; with the threshold
//! fixed, 20.0 MiB after the first element verification and 20.3 MiB 3 minutes later).
//! [`keep_large_buffers_mapped`] fixes it at glibc's default.

/// Asks the allocator to return the free pages of every arena to the system. Cheap enough for
/// after a large change (milliseconds), not meant for every change.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_freed() {
    // SAFETY: `malloc_trim` takes no pointers and only rearranges glibc's own free lists,
    // locking each arena while it does; it is not called from a signal handler.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Elsewhere (musl, other systems) the allocator returns memory itself, or has no such call.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_freed() {}

/// glibc's default mmap threshold, kept fixed from start-up.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 128 * 1024;

/// Fixes the allocator's mmap threshold, so that every block of [`MMAP_THRESHOLD`] or more is
/// mapped on its own and returned to the system when freed, however many were freed before.
/// Call once, first thing in `main`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn keep_large_buffers_mapped() {
    // SAFETY: `mallopt` takes no pointers; it sets one of glibc's allocator parameters under
    // the allocator's lock (setting this one also stops glibc from adjusting it and the trim
    // threshold by itself).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Elsewhere there is no such parameter to fix.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn keep_large_buffers_mapped() {}
