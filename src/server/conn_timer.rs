//! The timer behind hyper's HTTP/1 header-read timeout, one per connection.
//!
//! hyper arms that timeout whenever it waits for a request head, so on a keep-alive connection
//! it starts and drops one sleep per request. With hyper-util's `TokioTimer` each is a new
//! entry in tokio's timer wheel, registered and removed under its lock: about a microsecond
//! of a pass-through request's ~25. Here a connection's sleeps share one tokio sleep instead.
//! Deadlines on a connection only move later (now + the same timeout), so the shared sleep,
//! armed at the first one, is still due no later than any new one: a new sleep only reads the
//! clock. When the shared sleep fires before the current deadline (the request it was armed
//! for was answered meanwhile), it is re-armed at that deadline: once per timeout period, not
//! once per request.
//!
//! The semantics are `TokioTimer`'s: a sleep is ready once its own deadline has passed, and
//! the connection's task is woken by then.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

/// The timer of one connection (give each connection its own: see the module notes).
#[derive(Clone, Default)]
pub struct ConnTimer {
    shared: Arc<Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>,
}

impl ConnTimer {
    pub fn new() -> ConnTimer {
        ConnTimer::default()
    }
}

impl hyper::rt::Timer for ConnTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until((Instant::now() + duration).into_std())
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(ConnSleep {
            deadline: Instant::from_std(deadline),
            shared: self.shared.clone(),
        })
    }
}

struct ConnSleep {
    deadline: Instant,
    shared: Arc<Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>,
}

impl hyper::rt::Sleep for ConnSleep {}

impl Future for ConnSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            return Poll::Ready(());
        }
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let sleep = shared.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(self.deadline)));
        if sleep.deadline() > self.deadline {
            sleep.as_mut().reset(self.deadline);
        }
        loop {
            match sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                // Due at or after this deadline: it has passed.
                Poll::Ready(()) if sleep.deadline() >= self.deadline => return Poll::Ready(()),
                // Armed for an earlier deadline: re-arm at this one.
                Poll::Ready(()) => sleep.as_mut().reset(self.deadline),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    /// A sleep of `d` from now on tokio's clock (paused here; hyper reads the same clock).
    fn sleep(timer: &ConnTimer, d: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        timer.sleep_until((Instant::now() + d).into_std())
    }

    #[tokio::test(start_paused = true)]
    async fn sleeps_end_at_their_own_deadlines() {
        let timer = ConnTimer::new();
        let start = Instant::now();
        // The first sleep arms the shared one; it is dropped before its deadline (the request
        // head arrived), and the next sleeps end at their own deadlines, not the first's.
        let first = sleep(&timer, Duration::from_secs(10));
        let polled = tokio::time::timeout(Duration::from_secs(1), first).await;
        assert!(polled.is_err());
        tokio::time::sleep(Duration::from_secs(4)).await;
        let second = sleep(&timer, Duration::from_secs(10));
        second.await;
        assert_eq!(start.elapsed(), Duration::from_secs(15));
        // A shorter deadline than the armed one is honoured too.
        let long = sleep(&timer, Duration::from_secs(60));
        let short = sleep(&timer, Duration::from_secs(2));
        let t = Instant::now();
        short.await;
        assert_eq!(t.elapsed(), Duration::from_secs(2));
        let t = Instant::now();
        long.await;
        assert_eq!(t.elapsed(), Duration::from_secs(58));
    }
}
