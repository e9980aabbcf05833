//! Handing freed memory back to the system after a burst.
//!
//! A first sync decodes, renders and writes the whole rule set at once. glibc keeps the pages
//! freed afterwards in its arenas (it returns memory to the system only from the top of a
//! heap), so without this the agent would stay resident at that peak for its whole life.

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
