//! The relay: the stages around the queue, run as a pipeline.
//!
//! Pickup workers claim and accept files and hand the messages to the
//! active queue ([`crate::qmgr`]); the queue scan adds the queued messages
//! that are due; delivery workers take batches of lanes from the active
//! queue, one component call per batch. The stages overlap: the first
//! messages are on their way while later files are still being claimed.
//! `--once` runs the pipeline until Pickup and the due queue are drained;
//! `serve` keeps it running, listing Pickup every poll interval and scanning
//! the queue when a deferred message falls due.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clock::{Clock, SystemClock};
use crate::delivery::{self, Attempt};
use crate::dns::Resolver;
use crate::logging;
use crate::mailroot::Mailroot;
use crate::pickup::{Pickup, sleep_unless};
use crate::qmgr::{self, ActiveQueue, Admission, Message};
use crate::queue::{Queue, QueueEntry};
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
}

/// A running relay on one mailroot.
pub struct Relay {
    pub(crate) settings: Settings,
    pub(crate) mailroot: Mailroot,
    pub(crate) queue: Queue,
    pub(crate) runtime: Runtime,
    pub(crate) options: RelayOptions,
    pub(crate) clock: Arc<dyn Clock>,
    /// See [`delivery::Spool::next_due_ms`].
    pub(crate) next_due_ms: Arc<AtomicU64>,
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
            instances: settings
                .workers
                .saturating_add(ACCEPT_THREADS)
                .saturating_add(8),
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
            next_due_ms: Arc::new(AtomicU64::new(u64::MAX)),
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
            max_component_failures: self.settings.max_component_failures,
            next_due_ms: self.next_due_ms.clone(),
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

    /// One pass over Pickup and the queue: every settled file in Pickup, and
    /// every queued message that is due (every one when `force`), until all
    /// have been attempted once (with the DSNs they queued).
    pub fn run_pass(&self, force: bool) -> PassReport {
        self.run(&AtomicBool::new(false), false, force)
    }

    /// Run until `stop` is set, then return the totals.
    pub fn serve(&self, stop: &AtomicBool) -> PassReport {
        logging::info(&format!(
            "serving {} as {}",
            self.mailroot.root().display(),
            self.settings.hostname
        ));
        let total = self.run(stop, true, false);
        logging::info("stopped");
        total
    }

    /// The limits of the active queue, from the settings.
    fn active_limits(&self) -> qmgr::Limits {
        let s = &self.settings;
        let workers = s.workers.max(1);
        let max_connections = s.max_connections.max(1);
        qmgr::Limits {
            max_connections,
            max_per_destination: s.max_per_destination.max(1),
            // The connections are shared out among the workers, so that
            // they are all in use even when every lane is slow.
            lanes_per_call: max_connections
                .div_ceil(workers)
                .clamp(1, MAX_LANES_PER_CALL),
            messages_per_lane: MESSAGES_PER_LANE,
            bytes_per_call: BYTES_PER_CALL,
            max_waiting: ACTIVE_MESSAGES,
            max_memory: ACTIVE_BYTES,
        }
    }

    /// The pipeline: pickup workers, the queue scan, delivery workers.
    /// `repeat` keeps it going until `stop` (serve); otherwise it ends once
    /// what was there at the start is done.
    fn run(&self, stop: &AtomicBool, repeat: bool, force: bool) -> PassReport {
        let active = Arc::new(ActiveQueue::new(self.active_limits()));
        let pickup = Pickup::new(self, active.clone(), repeat);
        // Claimed files left in the queue go first: crash leftovers, and
        // files an earlier pass could not accept. (The due messages are
        // scanned in a thread of their own: the active queue may fill up.)
        self.scan_queue(&active, &pickup, Scan::Claimed);
        let report = Mutex::new(PassReport::default());
        // Producers are counted before any worker can find the queue empty.
        for _ in 0..ACCEPT_THREADS + 1 {
            active.producer_started();
        }
        std::thread::scope(|scope| {
            for _ in 0..ACCEPT_THREADS {
                scope.spawn(|| {
                    let counts = pickup.run(stop);
                    active.producer_done();
                    let mut report = lock(&report);
                    report.claimed += counts.claimed;
                    report.queued += counts.queued;
                    report.rejected += counts.rejected;
                    report.retry += counts.retry;
                });
            }
            scope.spawn(|| {
                self.scan_queue(&active, &pickup, Scan::Due { force });
                if repeat {
                    self.scan_queue_until(stop, &active, &pickup);
                }
                active.producer_done();
            });
            for _ in 0..self.settings.workers.max(1) {
                scope.spawn(|| {
                    while let Some(lanes) = active.next_batch() {
                        let attempts = delivery::attempt_batch(self, &active, lanes);
                        active.batch_done();
                        let mut report = lock(&report);
                        for attempt in attempts {
                            match attempt {
                                Attempt::Delivered => report.delivered += 1,
                                Attempt::Failed => report.failed += 1,
                                Attempt::Deferred => report.deferred += 1,
                                Attempt::Error => report.retry += 1,
                            }
                        }
                    }
                });
            }
            if repeat {
                scope.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    active.stop();
                });
            }
        });
        report.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    /// Scan the queue again whenever a deferred message falls due, and
    /// every [`QUEUE_RESCAN`] for claimed files left to retry.
    fn scan_queue_until(&self, stop: &AtomicBool, active: &ActiveQueue, pickup: &Pickup<'_>) {
        let mut last_full = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            sleep_unless(stop, self.settings.poll_interval);
            let due = self.next_due_ms.load(Ordering::Relaxed) <= self.clock.now_ms();
            let full = last_full.elapsed() >= QUEUE_RESCAN;
            if !due && !full {
                continue;
            }
            if full {
                last_full = Instant::now();
                self.scan_queue(active, pickup, Scan::Claimed);
            }
            self.scan_queue(active, pickup, Scan::Due { force: false });
        }
    }

    /// Look through the Queue folder: hand the claimed files nobody works
    /// on to `pickup`, or queue the due messages that are not active yet
    /// (the control files' dates say which records are worth reading).
    fn scan_queue(&self, active: &ActiveQueue, pickup: &Pickup<'_>, scan: Scan) {
        let force = match scan {
            Scan::Claimed => {
                let scanned = self.queue.scan(|entry| {
                    if let QueueEntry::Claimed(name) = entry {
                        pickup.add_leftover(&name);
                    }
                });
                if let Err(e) = scanned {
                    logging::error(&format!("cannot list the queue: {e}"));
                }
                return;
            }
            Scan::Due { force } => force,
        };
        // Deferrals from now on are noted again; the scan sees the older ones.
        self.next_due_ms.store(u64::MAX, Ordering::Relaxed);
        let now_ms = self.clock.now_ms();
        let mut later = u64::MAX;
        let scanned = self.queue.scan(|entry| match entry {
            QueueEntry::Claimed(_) => {}
            QueueEntry::Queued { queue_id, due_ms } => {
                if active.contains(&queue_id) {
                    return;
                }
                if !force && due_ms > now_ms {
                    later = later.min(due_ms);
                    return;
                }
                match self.queue.load(&queue_id) {
                    Ok(control) if force || delivery::is_due(&control, now_ms) => {
                        let destination = qmgr::destination(&control);
                        let message = Message {
                            control,
                            fresh: None,
                        };
                        active.push(destination, message, Admission::Scanned);
                    }
                    Ok(control) => later = later.min(control.next_attempt_ms),
                    // Written meanwhile, or removed: the next scan sees it.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        logging::error(&format!("{queue_id}: cannot read the control file: {e}"))
                    }
                }
            }
        });
        if let Err(e) = scanned {
            logging::error(&format!("cannot list the queue: {e}"));
        }
        self.next_due_ms.fetch_min(later, Ordering::Relaxed);
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
    let (ids, markers) = queue.interrupted_attempts().unwrap_or_default();
    let mut claimed = Vec::new();
    let _ = queue.scan(|entry| {
        if let QueueEntry::Claimed(name) = entry {
            claimed.push(name);
        }
    });
    for id in ids {
        if let Ok(control) = queue.load(&id) {
            let pending = control.pending();
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
        } else if let Some(file) = claimed.iter().find(|n| n.starts_with(&format!("{id}-"))) {
            logging::warn(&format!(
                "{id}: the relay stopped while delivering {file}, which is accepted again; its recipients may receive the message twice"
            ));
        }
    }
    for marker in markers {
        let _ = queue.clear_in_flight(&marker);
    }
}

/// What [`Relay::scan_queue`] looks for.
#[derive(Debug, Clone, Copy)]
enum Scan {
    /// Claimed pickup files nobody works on.
    Claimed,
    /// Queued messages that are due (all of them when `force`).
    Due { force: bool },
}

/// Threads of the pickup stage: accepting is mostly the component's CPU
/// time, and a second thread overlaps one's file operations with the
/// other's parsing.
const ACCEPT_THREADS: usize = 2;

/// Most lanes (connections) in one component call.
const MAX_LANES_PER_CALL: usize = 128;
/// Most messages one lane carries over its connection in one call.
const MESSAGES_PER_LANE: usize = 32;
/// Most bytes of messages in one component call (beyond the first message).
const BYTES_PER_CALL: u64 = 64 << 20;
/// Most messages waiting in the active queue.
const ACTIVE_MESSAGES: usize = 10_000;
/// Most bytes of fresh messages waiting in memory.
const ACTIVE_BYTES: usize = 64 << 20;
/// How often `serve` looks at the whole queue even when nothing is due:
/// claimed files to accept again, files put there by hand.
const QUEUE_RESCAN: Duration = Duration::from_secs(60);

/// A poisoned lock only means another worker panicked; the data is still sound.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
