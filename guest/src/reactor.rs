//! Many SMTP sessions in one component call, without threads.
//!
//! Each destination's dialogue is an `async fn`; [`run_all`] polls them in
//! turn. A session that finds nothing to read registers its connection's
//! token and its deadline here and yields. When every session waits, one
//! host call ([`Waiter::wait`]) sleeps until a connection has input or the
//! earliest deadline passes, and only the sessions it concerns run again.
//! A thousand slow servers thus cost a thousand sockets and one instance.
//!
//! The component is single-threaded and runs one executor at a time, so the
//! registry of waits is a thread-local and the wakers do nothing: the
//! executor knows which task it is polling.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::smtp::{Connection, SocketError};

/// What the executor needs from the host.
pub trait Waiter {
    /// Milliseconds on a clock that only moves forward.
    fn monotonic_ms(&mut self) -> u64;
    /// Sleep until a watched connection can be read or `timeout_ms` passes;
    /// the tokens of the connections ready.
    fn wait(&mut self, timeout_ms: u32) -> Vec<u64>;
}

/// What a pending task waits for.
#[derive(Debug, Clone, Copy)]
struct Wait {
    token: u64,
    deadline_ms: u64,
}

#[derive(Default)]
struct Registry {
    /// The task being polled.
    current: usize,
    /// The time the executor last read, for deadlines.
    now_ms: u64,
    /// What each task waits for, by task index.
    waits: Vec<Option<Wait>>,
}

thread_local! {
    static REGISTRY: RefCell<Registry> = RefCell::new(Registry::default());
}

fn now_ms() -> u64 {
    REGISTRY.with(|r| r.borrow().now_ms)
}

fn register(wait: Wait) {
    REGISTRY.with(|r| {
        let mut r = r.borrow_mut();
        let current = r.current;
        if let Some(slot) = r.waits.get_mut(current) {
            *slot = Some(wait);
        }
    });
}

/// The next bytes from `conn`, waiting at most `timeout_ms` for them.
pub async fn receive<C: Connection>(conn: &mut C, timeout_ms: u32) -> Result<Vec<u8>, SocketError> {
    let deadline_ms = now_ms().saturating_add(u64::from(timeout_ms));
    std::future::poll_fn(|_| match conn.try_receive() {
        Ok(Some(bytes)) => Poll::Ready(Ok(bytes)),
        Err(e) => Poll::Ready(Err(e)),
        Ok(None) if now_ms() >= deadline_ms => Poll::Ready(Err(SocketError::TimedOut)),
        Ok(None) => {
            register(Wait {
                token: conn.token(),
                deadline_ms,
            });
            Poll::Pending
        }
    })
    .await
}

/// A task of [`run_all`].
pub type Task<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Run every task to completion, concurrently; their results in order.
///
/// `waiter` is borrowed only between polls, so the tasks may borrow it too
/// (never across an `.await`).
pub fn run_all<'a, T, W: Waiter + ?Sized>(
    waiter: &RefCell<&mut W>,
    tasks: Vec<Task<'a, T>>,
) -> Vec<T> {
    run(waiter, tasks, None)
}

/// How often a growing run asks for more tasks while all of its tasks wait
/// (a task that finishes makes it ask at once).
pub const ASK_INTERVAL_MS: u64 = 50;

/// As [`run_all`], and the work may grow while it runs: `more` is asked for
/// further tasks whenever a task has finished or [`ASK_INTERVAL_MS`] passed,
/// at a moment when every task waits. The run ends when every task is done
/// and `more` has nothing left. This is how one call keeps its connections
/// busy: a slow destination holds a socket, and the call takes on new
/// destinations beside it instead of a worker waiting for it.
pub fn run_growing<'a, T, W: Waiter + ?Sized>(
    waiter: &RefCell<&mut W>,
    tasks: Vec<Task<'a, T>>,
    more: &mut dyn FnMut() -> Vec<Task<'a, T>>,
) -> Vec<T> {
    run(waiter, tasks, Some(more))
}

fn run<'a, T, W: Waiter + ?Sized>(
    waiter: &RefCell<&mut W>,
    tasks: Vec<Task<'a, T>>,
    mut more: Option<&mut dyn FnMut() -> Vec<Task<'a, T>>>,
) -> Vec<T> {
    let count = tasks.len();
    let mut tasks: Vec<Option<Task<'a, T>>> = tasks.into_iter().map(Some).collect();
    let mut results: Vec<Option<T>> = (0..count).map(|_| None).collect();
    let started = waiter.borrow_mut().monotonic_ms();
    REGISTRY.with(|r| {
        *r.borrow_mut() = Registry {
            current: 0,
            now_ms: started,
            waits: vec![None; count],
        }
    });
    let mut runnable: Vec<usize> = (0..count).collect();
    let mut context = Context::from_waker(Waker::noop());
    let mut left = count;
    let mut asked_ms = started;
    let mut finished_since_ask = false;
    loop {
        for index in runnable.drain(..) {
            let Some(Some(task)) = tasks.get_mut(index) else {
                continue;
            };
            REGISTRY.with(|r| {
                let mut r = r.borrow_mut();
                r.current = index;
                if let Some(slot) = r.waits.get_mut(index) {
                    *slot = None;
                }
            });
            if let Poll::Ready(value) = task.as_mut().poll(&mut context) {
                if let (Some(slot), Some(result)) = (tasks.get_mut(index), results.get_mut(index)) {
                    *slot = None;
                    *result = Some(value);
                }
                left -= 1;
                finished_since_ask = true;
            }
        }
        if let Some(more) = more.as_mut() {
            let now = now_ms();
            if left == 0 || finished_since_ask || now >= asked_ms.saturating_add(ASK_INTERVAL_MS) {
                asked_ms = now;
                finished_since_ask = false;
                let added = more();
                if !added.is_empty() {
                    let first = tasks.len();
                    left += added.len();
                    for task in added {
                        tasks.push(Some(task));
                        results.push(None);
                    }
                    REGISTRY.with(|r| r.borrow_mut().waits.resize(tasks.len(), None));
                    runnable = (first..tasks.len()).collect();
                    continue;
                }
            }
        }
        if left == 0 {
            break;
        }
        let waits: Vec<(usize, Wait)> = REGISTRY.with(|r| {
            r.borrow()
                .waits
                .iter()
                .enumerate()
                .filter_map(|(index, wait)| wait.map(|w| (index, w)))
                .collect()
        });
        let now = now_ms();
        let earliest = waits.iter().map(|(_, w)| w.deadline_ms).min();
        // A growing run wakes in time to ask again.
        let earliest = match (earliest, more.is_some()) {
            (Some(deadline), true) => Some(deadline.min(asked_ms.saturating_add(ASK_INTERVAL_MS))),
            (deadline, _) => deadline,
        };
        let ready = match earliest {
            Some(deadline) => {
                let timeout = u32::try_from(deadline.saturating_sub(now)).unwrap_or(u32::MAX);
                waiter.borrow_mut().wait(timeout)
            }
            // A task pending without waiting on a connection would never be
            // woken: poll them all again rather than stall.
            None => Vec::new(),
        };
        let now = waiter.borrow_mut().monotonic_ms();
        REGISTRY.with(|r| r.borrow_mut().now_ms = now);
        runnable = if waits.is_empty() {
            (0..tasks.len())
                .filter(|&i| tasks.get(i).is_some_and(Option::is_some))
                .collect()
        } else {
            waits
                .iter()
                .filter(|(_, w)| ready.contains(&w.token) || w.deadline_ms <= now)
                .map(|(index, _)| *index)
                .collect()
        };
    }
    results.into_iter().flatten().collect()
}

/// Run one future to completion.
pub fn block_on<'a, T, W: Waiter + ?Sized>(
    waiter: &RefCell<&mut W>,
    future: impl Future<Output = T> + 'a,
) -> Option<T> {
    run_all(waiter, vec![Box::pin(future)]).pop()
}
