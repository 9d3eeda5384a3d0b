//! The relay: the stages around the queue, run in passes.
//!
//! A pass accepts claimed files (crash leftovers first), claims new files
//! from Pickup, accepts them, and attempts delivery of every queued message
//! that is due. Work is spread over `workers` threads; each message gets its
//! own component instance, so one slow destination holds one worker only.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::clock::{Clock, SystemClock};
use crate::delivery::{self, Attempt};
use crate::dns::Resolver;
use crate::logging;
use crate::mailroot::Mailroot;
use crate::pickup::{self, Acceptance, Claimed};
use crate::queue::Queue;
use crate::runtime::bindings::exports::mailroot::relay::stages::Explanation;
use crate::runtime::bindings::exports::mailroot::relay::stages::{RelayOptions, Timeouts};
use crate::runtime::bindings::mailroot::relay::types::{
    EnvelopeSource, Limits, RetrySchedule, Severity, TlsMode,
};
use crate::runtime::{Capabilities, ComponentLimits, Runtime};
use crate::settings::Settings;
use crate::sockets::TlsSettings;

/// The relay component built into this binary (the `relay` world).
pub const RELAY_COMPONENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mailroot_relay.wasm"));
/// The plug-in component (the `plugin` world: pure functions, WASI only).
pub const PLUGIN_COMPONENT: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/mailroot_plugin.wasm"));

/// Why the relay could not start.
#[derive(Debug)]
pub enum StartError {
    Mailroot(std::io::Error),
    Resolver(std::io::Error),
    Tls(std::io::Error),
    ComponentFile(std::path::PathBuf, std::io::Error),
    Component(String),
    RetryProfile(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Mailroot(e) => write!(f, "cannot open the mailroot: {e}"),
            StartError::Resolver(e) => write!(f, "cannot set up DNS: {e}"),
            StartError::Tls(e) => write!(f, "cannot load the TLS trust store: {e}"),
            StartError::ComponentFile(path, e) => {
                write!(f, "cannot read the component {}: {e}", path.display())
            }
            StartError::Component(e) => write!(f, "cannot load the component: {e}"),
            StartError::RetryProfile(name) => {
                write!(f, "unknown retry profile {name:?} (known: postfix, iis)")
            }
        }
    }
}

impl std::error::Error for StartError {}

/// What a pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassReport {
    pub claimed: usize,
    pub queued: usize,
    pub rejected: usize,
    pub delivered: usize,
    pub failed: usize,
    pub deferred: usize,
    /// Files and messages left for a later pass because of an error.
    pub retry: usize,
}

impl PassReport {
    /// Nothing was rejected, failed, deferred or left behind.
    pub fn all_delivered(&self) -> bool {
        self.rejected == 0 && self.failed == 0 && self.deferred == 0 && self.retry == 0
    }

    fn add(&mut self, other: &PassReport) {
        self.claimed += other.claimed;
        self.queued += other.queued;
        self.rejected += other.rejected;
        self.delivered += other.delivered;
        self.failed += other.failed;
        self.deferred += other.deferred;
        self.retry += other.retry;
    }
}

/// A running relay on one mailroot.
pub struct Relay {
    pub(crate) settings: Settings,
    pub(crate) mailroot: Mailroot,
    pub(crate) queue: Queue,
    pub(crate) runtime: Runtime,
    pub(crate) options: RelayOptions,
    pub(crate) clock: Arc<dyn Clock>,
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl Relay {
    /// Open the mailroot (creating its folders) and load the component.
    pub fn new(settings: Settings) -> Result<Self, StartError> {
        Self::with_clock(settings, Arc::new(SystemClock))
    }

    /// As [`Relay::new`], with the clock the component and queue see.
    pub fn with_clock(settings: Settings, clock: Arc<dyn Clock>) -> Result<Self, StartError> {
        let mailroot = Mailroot::open(&settings.root).map_err(StartError::Mailroot)?;
        let resolver = match settings.dns_server {
            Some(server) => Resolver::with_server(server),
            None => Resolver::from_system().map_err(StartError::Resolver)?,
        };
        let tls = TlsSettings::new(settings.ca_file.as_deref()).map_err(StartError::Tls)?;
        let bytes = match &settings.component {
            Some(path) => {
                std::fs::read(path).map_err(|e| StartError::ComponentFile(path.clone(), e))?
            }
            None => RELAY_COMPONENT.to_vec(),
        };
        let capabilities = Capabilities {
            mailroot: mailroot.clone(),
            resolver: Arc::new(resolver),
            tls,
            clock: clock.clone(),
            // Room to read an oversized file and report its size, no more.
            max_read_bytes: settings
                .max_message_bytes
                .saturating_mul(2)
                .saturating_add(1 << 20),
        };
        let started = Instant::now();
        // Compiled code is cached in the mailroot's own hidden `.cache`.
        let cache_dir = mailroot.root().join(".cache");
        // One instance slot per worker, and a few for start-up and `check`.
        let limits = ComponentLimits {
            instances: settings.workers.saturating_add(8),
            ..settings.component_limits
        };
        let runtime = Runtime::new(&bytes, capabilities, limits, Some(&cache_dir))
            .map_err(|e| StartError::Component(format!("{e:#}")))?;
        logging::debug(&format!("component compiled in {:?}", started.elapsed()));
        let t = &settings.smtp_timeouts;
        let options = RelayOptions {
            hostname: settings.hostname.clone(),
            smtp_port: settings.smtp_port,
            limits: Limits {
                max_message_bytes: settings.max_message_bytes,
                max_recipients: settings.max_recipients,
            },
            timeouts: Timeouts {
                connect: millis(t.connect),
                greeting: millis(t.greeting),
                mail: millis(t.mail),
                rcpt: millis(t.rcpt),
                data_init: millis(t.data_init),
                data_block: millis(t.data_block),
                data_end: millis(t.data_end),
            },
            retry: retry_schedule(&runtime, &settings)?,
            routing: settings.routing.clone(),
            max_recipients_per_transaction: settings.max_recipients_per_transaction,
        };
        recover_interrupted_attempts(&Queue::new(mailroot.clone()));
        Ok(Relay {
            queue: Queue::new(mailroot.clone()),
            mailroot,
            runtime,
            options,
            clock,
            settings,
        })
    }

    /// The mailroot.
    pub fn mailroot(&self) -> &Mailroot {
        &self.mailroot
    }

    /// The queue, folders and clock, for the stages that record attempts.
    pub(crate) fn spool(&self) -> delivery::Spool {
        delivery::Spool {
            queue: self.queue.clone(),
            mailroot: self.mailroot.clone(),
            clock: self.clock.clone(),
        }
    }

    /// Count a component failure on a message; true when it is time to give
    /// up on it. A count that cannot be stored never gives up: the message
    /// stays queued rather than be judged on a guess.
    pub(crate) fn component_failed(&self, queue_id: &str) -> bool {
        match self.queue.record_component_failure(queue_id) {
            Ok(count) => count >= self.settings.max_component_failures,
            Err(e) => {
                logging::error(&format!(
                    "{queue_id}: cannot record the component failure: {e}"
                ));
                false
            }
        }
    }

    /// One pass over Pickup and the queue. `force` attempts every queued
    /// message, due or not.
    pub fn run_pass(&self, force: bool) -> PassReport {
        let mut report = PassReport::default();
        let (_, leftovers) = self.queue.scan().unwrap_or_else(|e| {
            logging::error(&format!("cannot list the queue: {e}"));
            (Vec::new(), Vec::new())
        });
        let mut claimed: Vec<Claimed> = leftovers
            .iter()
            .filter_map(|name| Claimed::from_queue_name(name))
            .collect();
        match pickup::claim_pickup_files(self) {
            Ok(new) => {
                report.claimed = new.len();
                claimed.extend(new);
            }
            Err(e) => logging::error(&format!("cannot scan Pickup: {e}")),
        }
        let results = Mutex::new(Vec::new());
        // Accepting waits on fsync: enough threads to overlap the syncs (the
        // journal commits them together), few enough not to spin on the
        // Queue directory's lock (perf showed both ends).
        let chunks: Vec<Vec<Claimed>> = claimed
            .chunks(ACCEPT_CHUNK)
            .map(<[Claimed]>::to_vec)
            .collect();
        self.parallel(chunks, ACCEPT_THREADS, |chunk| {
            let chunk_results = pickup::accept_claimed(self, &chunk);
            lock(&results).extend(chunk_results);
        });
        for result in results.into_inner().unwrap_or_default() {
            match result {
                Acceptance::Queued => report.queued += 1,
                Acceptance::Rejected => report.rejected += 1,
                Acceptance::Retry => report.retry += 1,
            }
        }
        // DSNs queued by an attempt are due at once: deliver them in the same
        // pass. They come from the null sender and never cause further DSNs,
        // so this ends; the bound is only a guard.
        let mut queued = self.queue.scan().map(|(ids, _)| ids).unwrap_or_default();
        for _ in 0..4 {
            if queued.is_empty() {
                break;
            }
            let (attempts, notices) = self.deliver_due(queued, force);
            for attempt in attempts {
                match attempt {
                    Attempt::NotDue => {}
                    Attempt::Delivered => report.delivered += 1,
                    Attempt::Failed => report.failed += 1,
                    Attempt::Deferred => report.deferred += 1,
                    Attempt::Error => report.retry += 1,
                }
            }
            queued = notices;
        }
        report
    }

    /// Run passes until `stop` is set, then return the totals.
    pub fn serve(&self, stop: &AtomicBool) -> PassReport {
        let mut total = PassReport::default();
        logging::info(&format!(
            "serving {} as {}",
            self.mailroot.root().display(),
            self.settings.hostname
        ));
        while !stop.load(Ordering::Relaxed) {
            let report = self.run_pass(false);
            total.add(&report);
            let idle_until = Instant::now() + self.settings.poll_interval;
            while !stop.load(Ordering::Relaxed) && Instant::now() < idle_until {
                std::thread::sleep(Duration::from_millis(50).min(self.settings.poll_interval));
            }
        }
        logging::info("stopped");
        total
    }

    /// Attempt the due messages among `ids` with up to `workers` threads, at
    /// most `max_per_destination` at once for one destination, so that a slow
    /// or dead destination never holds up the others. Returns the attempts
    /// and the queue ids of the DSNs they queued.
    fn deliver_due(&self, ids: Vec<String>, force: bool) -> (Vec<Attempt>, Vec<String>) {
        let now_ms = self.clock.now_ms();
        let mut due = VecDeque::new();
        let mut attempts = Vec::new();
        for id in ids {
            match self.queue.load(&id) {
                Ok(control) if force || delivery::is_due(&control, now_ms) => {
                    due.push_back(control)
                }
                Ok(_) => {}
                Err(e) => {
                    logging::error(&format!("{id}: cannot read the control file: {e}"));
                    attempts.push(Attempt::Error);
                }
            }
        }
        struct Shared {
            waiting: VecDeque<crate::queue::Control>,
            in_flight: HashMap<String, usize>,
            attempts: Vec<Attempt>,
            notices: Vec<String>,
        }
        let workers = self.settings.workers.clamp(1, due.len().max(1));
        let shared = Mutex::new(Shared {
            waiting: due,
            in_flight: HashMap::new(),
            attempts,
            notices: Vec::new(),
        });
        let changed = Condvar::new();
        let limit = self.settings.max_per_destination.max(1);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    let mut state = lock(&shared);
                    loop {
                        let position = state.waiting.iter().position(|c| {
                            state
                                .in_flight
                                .get(&delivery::destination(c))
                                .copied()
                                .unwrap_or(0)
                                < limit
                        });
                        let Some(first) = position.and_then(|p| state.waiting.remove(p)) else {
                            if state.waiting.is_empty() {
                                break;
                            }
                            // Everything left waits on a busy destination.
                            state = changed
                                .wait(state)
                                .unwrap_or_else(|poisoned| poisoned.into_inner());
                            continue;
                        };
                        let key = delivery::destination(&first);
                        // More messages for the same destination ride on the
                        // same component call and connections.
                        let mut batch = vec![first];
                        while batch.len() < BATCH {
                            let Some(p) = state
                                .waiting
                                .iter()
                                .position(|c| delivery::destination(c) == key)
                            else {
                                break;
                            };
                            let Some(next) = state.waiting.remove(p) else {
                                break;
                            };
                            batch.push(next);
                        }
                        *state.in_flight.entry(key.clone()).or_insert(0) += 1;
                        drop(state);
                        let results = delivery::attempt_batch(self, batch);
                        state = lock(&shared);
                        if let Some(count) = state.in_flight.get_mut(&key) {
                            *count -= 1;
                        }
                        for (attempt, notices) in results {
                            state.attempts.push(attempt);
                            state.notices.extend(notices);
                        }
                        changed.notify_all();
                    }
                });
            }
        });
        let shared = shared
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (shared.attempts, shared.notices)
    }

    /// Run `work` on every item with up to `threads` threads (at most `workers`).
    fn parallel<T: Send>(&self, items: Vec<T>, threads: usize, work: impl Fn(T) + Sync) {
        let workers = threads
            .min(self.settings.workers)
            .clamp(1, items.len().max(1));
        let queue = Mutex::new(VecDeque::from(items));
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    loop {
                        let Some(item) = lock(&queue).pop_front() else {
                            break;
                        };
                        work(item);
                    }
                });
            }
        });
    }
}

impl Relay {
    /// What the relay would do with the pickup file `raw` (`mailroot check`).
    pub fn explain(&self, raw: &[u8]) -> Result<Explanation, crate::runtime::CallError> {
        self.runtime.explain(raw, &self.options)
    }
}

fn tls_name(tls: TlsMode) -> &'static str {
    match tls {
        TlsMode::None => "none",
        TlsMode::Opportunistic => "opportunistic",
        TlsMode::Required => "required",
        TlsMode::Verify => "verify",
    }
}

/// The text `mailroot check` prints, and whether the file would be relayed
/// (no rejection, and no recipient failing).
pub fn format_explanation(file: &std::path::Path, e: &Explanation) -> (String, bool) {
    let mut out = format!("file: {}\n", file.display());
    let mut relayable = true;
    match &e.envelope {
        Ok(envelope) => {
            let source = match envelope.source {
                EnvelopeSource::PickupLines => "x-sender/x-receiver lines",
                EnvelopeSource::ResentHeaders => "Resent- headers",
                EnvelopeSource::Headers => "headers",
            };
            out.push_str(&format!(
                "envelope (from {source}):\n  MAIL FROM:<{}>\n",
                envelope.sender
            ));
            for recipient in &envelope.recipients {
                out.push_str(&format!("  RCPT TO:<{recipient}>\n"));
            }
        }
        Err(why) => {
            relayable = false;
            out.push_str(&format!("envelope: none: {why}\n"));
        }
    }
    out.push_str("findings:\n");
    if e.findings.is_empty() {
        out.push_str("  none\n");
    }
    for f in &e.findings {
        let severity = match f.severity {
            Severity::Reject => {
                relayable = false;
                "reject"
            }
            Severity::Warning => "warning",
        };
        out.push_str(&format!("  {severity} {}: {}\n", f.code, f.text));
    }
    out.push_str("routes:\n");
    for r in &e.routes {
        match &r.failure {
            Some(failure) => {
                relayable &= !failure.permanent;
                let kind = if failure.permanent {
                    "fails"
                } else {
                    "deferred"
                };
                out.push_str(&format!(
                    "  <{}>: {}: {kind} ({}): {}\n",
                    r.recipient, r.via, failure.status, failure.text
                ));
            }
            None if r.hosts.is_empty() => {
                out.push_str(&format!("  <{}>: {}\n", r.recipient, r.via))
            }
            None => out.push_str(&format!(
                "  <{}>: {}: {} (port {}, TLS {})\n",
                r.recipient,
                r.via,
                r.hosts.join(", "),
                r.port,
                tls_name(r.tls)
            )),
        }
    }
    out.push_str(if relayable {
        "verdict: would be relayed\n"
    } else {
        "verdict: would not be relayed (Badmail or bounce)\n"
    });
    (out, relayable)
}

/// The component's schedule for the configured profile, with the
/// operator's overrides.
fn retry_schedule(runtime: &Runtime, settings: &Settings) -> Result<RetrySchedule, StartError> {
    let mut schedule = runtime
        .retry_profile(&settings.retry_profile)
        .map_err(|e| StartError::Component(e.to_string()))?
        .ok_or_else(|| StartError::RetryProfile(settings.retry_profile.clone()))?;
    let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
    if let Some(notice) = settings.delay_notice_after {
        schedule.delay_notice_after = notice.map(secs);
    }
    if let Some(give_up) = settings.give_up_after {
        schedule.give_up_after = secs(give_up);
    }
    Ok(schedule)
}

/// Attempts that were in flight when the relay last stopped: their
/// recipients are still pending, and those that the server had already
/// accepted will get the message a second time. Say so, once.
fn recover_interrupted_attempts(queue: &Queue) {
    match queue.remove_orphans() {
        Ok(removed) if !removed.is_empty() => logging::info(&format!(
            "removed {} files left incomplete by a crash: {}",
            removed.len(),
            removed.join(", ")
        )),
        Ok(_) => {}
        Err(e) => logging::warn(&format!("cannot clean the queue after a crash: {e}")),
    }
    for id in queue.interrupted_attempts().unwrap_or_default() {
        let pending = queue.load(&id).map(|c| c.pending()).unwrap_or_default();
        if !pending.is_empty() {
            logging::warn(&format!(
                "{id}: the relay stopped during a delivery attempt; these recipients may receive the message twice: {}",
                pending
                    .iter()
                    .map(|r| format!("<{r}>"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let _ = queue.clear_in_flight(&id);
    }
}

/// Threads for the accept stage.
const ACCEPT_THREADS: usize = 16;
/// Claimed files accepted and committed together (one filesystem sync).
const ACCEPT_CHUNK: usize = 64;

/// Most messages for one destination delivered in one component call.
const BATCH: usize = 32;

/// A poisoned lock only means another worker panicked; the data is still sound.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
