//! Work spread over the machine's cores ([`map`], [`for_each_mut`], from the pure core), and
//! work moved off the async runtime's workers.

pub use kubenft_plan::cores::{for_each_mut, map};

/// Runs `f` on a blocking thread, off the async runtime's workers (which keep serving agents
/// and health checks meanwhile); a panic in `f` resumes here. `None` if the runtime is
/// shutting down.
pub async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(out) => Some(out),
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => None,
        },
    }
}
