//! Work spread over the machine's cores, for the few places where one change means thousands
//! of independent computations (a first read, a first plan, every node's rule set after a
//! controller restart). Small batches stay on the calling thread: threads cost more than they
//! save there.

use std::sync::LazyLock;
use std::thread;

/// Below this many items per thread, the work runs on the calling thread.
const MIN_PER_THREAD: usize = 256;

/// The machine's cores (or the cgroup's quota), looked up once: the lookup reads files, and
/// every change asks.
static CORES: LazyLock<usize> =
    LazyLock::new(|| thread::available_parallelism().map_or(1, |n| n.get()));

fn threads_for(items: usize) -> usize {
    let most = items / MIN_PER_THREAD;
    if most < 2 {
        return 1;
    }
    most.min(*CORES)
}

/// `f` of every item, in order.
pub fn map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = threads_for(items.len());
    if threads == 1 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    thread::scope(|scope| {
        let workers: Vec<_> = items
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(f).collect::<Vec<R>>()))
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// Runs `f` on every item.
pub fn for_each_mut<T: Send>(items: &mut [T], f: impl Fn(&mut T) + Sync) {
    let threads = threads_for(items.len());
    if threads == 1 {
        items.iter_mut().for_each(f);
        return;
    }
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    thread::scope(|scope| {
        for part in items.chunks_mut(chunk) {
            scope.spawn(move || part.iter_mut().for_each(f));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_keep_their_order_and_every_item_is_visited_once() {
        for n in [0, 1, 255, 256, 1000, 4099] {
            let items: Vec<usize> = (0..n).collect();
            assert_eq!(
                map(&items, |i| i * 2),
                (0..n).map(|i| i * 2).collect::<Vec<_>>()
            );
            let mut counts = vec![0u32; n];
            for_each_mut(&mut counts, |c| *c += 1);
            assert!(counts.iter().all(|&c| c == 1), "n = {n}");
        }
    }
}
