//! The host's log: one line per event on standard error, with a UTC
//! timestamp, like Postfix's maillog. This module also implements the `log`
//! import; component lines are tagged with the queue id they concern.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::clock::{Clock, SystemClock};
use crate::runtime::HostState;
use crate::runtime::bindings::mailroot::relay::log;

/// Longest line accepted from the component; the rest is cut.
const MAX_COMPONENT_LINE: usize = 4096;

static VERBOSITY: AtomicU8 = AtomicU8::new(1);

/// Log `debug` lines too (`--verbose`).
pub fn set_verbose(verbose: bool) {
    VERBOSITY.store(if verbose { 0 } else { 1 }, Ordering::Relaxed);
}

fn write(rank: u8, level: &str, message: &str) {
    if rank < VERBOSITY.load(Ordering::Relaxed) {
        return;
    }
    let now = SystemClock.now_ms();
    let line = format!(
        "{}.{:03} mailroot {level}: {message}\n",
        now / 1000,
        now % 1000
    );
    // A closed stderr must not stop the relay.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

pub fn debug(message: &str) {
    write(0, "debug", message);
}
pub fn info(message: &str) {
    write(1, "info", message);
}
pub fn warn(message: &str) {
    write(2, "warning", message);
}
pub fn error(message: &str) {
    write(3, "error", message);
}

impl log::Host for HostState {
    fn write(&mut self, level: log::Level, message: String) {
        let mut end = message.len().min(MAX_COMPONENT_LINE);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let text: String = message
            .get(..end)
            .unwrap_or_default()
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let line = format!("{}: {text}", self.log_context);
        match level {
            log::Level::Debug => debug(&line),
            log::Level::Info => info(&line),
            log::Level::Warn => warn(&line),
            log::Level::Error => error(&line),
        }
    }
}
