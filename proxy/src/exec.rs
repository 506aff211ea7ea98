//! Spawning tasks: tokio's, with large futures moved to the heap first.
//!
//! tokio moves a future it spawns by value several times on the way into its task (and
//! `Stage` writes copy the whole slot when the task ends), so a future of some KiB, such as
//! the one hyper spawns for every HTTP/2 stream with the request's whole service future in
//! it, costs several copies of itself per request. A boxed one is moved as a pointer, for one
//! copy into the heap. Small futures are spawned as they are: a box would only add an
//! allocation.

use std::future::Future;

/// Futures larger than this are boxed before they are spawned.
const BOX_ABOVE: usize = 512;

/// Whether [`spawn`] boxes a future of type `F`.
pub const fn boxes<F>() -> bool {
    std::mem::size_of::<F>() > BOX_ABOVE
}

/// `tokio::spawn`, boxing a large future first.
pub fn spawn<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    if boxes::<F>() {
        tokio::spawn(Box::pin(fut))
    } else {
        tokio::spawn(fut)
    }
}

/// hyper's executor (for HTTP/2's per-stream tasks and connection tasks), through [`spawn`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Exec;

impl<F> hyper::rt::Executor<F> for Exec
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        spawn(fut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_only_large_futures() {
        assert!(!boxes::<std::future::Ready<u64>>());
        assert!(boxes::<std::future::Ready<[u8; 4096]>>());
    }

    #[tokio::test]
    async fn large_and_small_futures_run_to_their_output() {
        let big = [7u8; 4096];
        let large = spawn(async move { big.iter().map(|&b| u64::from(b)).sum::<u64>() });
        let small = spawn(async { 3u64 });
        assert_eq!(large.await.unwrap(), 7 * 4096);
        assert_eq!(small.await.unwrap(), 3);
    }

    #[tokio::test]
    async fn hyper_executor_runs_what_it_is_given() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let big = [1u8; 2048];
        hyper::rt::Executor::execute(&Exec, async move {
            tx.send(big.len()).unwrap();
        });
        assert_eq!(rx.await.unwrap(), 2048);
    }
}
