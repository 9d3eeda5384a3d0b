//! The clock the component sees, injectable so tests can drive time.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::runtime::HostState;
use crate::runtime::bindings::mailroot::relay::clock;

/// Wall-clock time in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

impl clock::Host for HostState {
    fn now_ms(&mut self) -> u64 {
        self.clock.now_ms()
    }
    fn monotonic_ms(&mut self) -> u64 {
        crate::sockets::monotonic_ms()
    }
}
