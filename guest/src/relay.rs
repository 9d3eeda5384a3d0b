//! The per-message stages of the relay world: `accept` (cleanup of a claimed
//! pickup file) and `deliver` (one attempt for the pending recipients).
//!
//! Both run against [`Capabilities`], the host's imports seen as a trait, so
//! that the whole dialogue is tested natively with a scripted host.

use crate::bounce::{self, Action, BounceRequest, DsnRecipient};
use crate::cleanup;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use crate::client::{Sessions, Target, deliver_to_target, not_delivered};
use crate::date;
use crate::envelope::{self, Envelope};
use crate::message;
use crate::reactor::{self, Waiter};
use crate::retry::Schedule;
use crate::route::{self, AddressAnswer, Failure, MxAnswer};
use crate::route::{RouteChoice, Routing, TlsMode};
use crate::smtp::{self, Connection};
use crate::validate::Finding;
use crate::validate::{self, Limits, Severity};

/// Log levels of the host's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

/// Why a file of the Queue folder could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// Bigger than the host lets the component read.
    TooLarge(u64),
    /// Missing or unreadable: worth another try later.
    Unavailable(String),
}

/// What the host provides, as the component sees it. Waiting on
/// connections ([`Waiter`]) is part of it.
pub trait Capabilities: Waiter {
    type Conn: Connection;
    fn read_queue_file(&mut self, name: &str) -> Result<Vec<u8>, ReadError>;
    /// At most `max_bytes` from the start of a queue file.
    fn read_queue_head(&mut self, name: &str, max_bytes: u64) -> Result<Vec<u8>, ReadError>;
    fn lookup_mx(&mut self, domain: &str) -> MxAnswer;
    fn lookup_ip(&mut self, host: &str) -> AddressAnswer;
    fn connect(
        &mut self,
        address: &str,
        port: u16,
        timeout_ms: u32,
    ) -> Result<Self::Conn, smtp::SocketError>;
    /// Write a new file into the Drop folder; its name, or why not.
    fn write_drop(&mut self, content: &[u8]) -> Result<String, String>;
    fn now_ms(&mut self) -> u64;
    fn log(&mut self, level: Level, message: &str);
    /// The attempt on message `index` of a batch is over: record it now.
    fn record_attempt(&mut self, index: usize, report: DeliveryReport);
    /// More messages for the batch under way, if the host has them; their
    /// indexes follow the batch's last one.
    fn more_messages(&mut self) -> Vec<QueuedMessage>;
}

/// SMTP client timeouts in milliseconds (RFC 5321 4.5.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: u32,
    pub greeting: u32,
    pub mail: u32,
    pub rcpt: u32,
    pub data_init: u32,
    pub data_block: u32,
    pub data_end: u32,
}

impl Default for Timeouts {
    /// RFC 5321 4.5.3.2, with Postfix's 30 s connect timeout.
    fn default() -> Self {
        const MINUTE: u32 = 60_000;
        Timeouts {
            connect: 30_000,
            greeting: 5 * MINUTE,
            mail: 5 * MINUTE,
            rcpt: 5 * MINUTE,
            data_init: 2 * MINUTE,
            data_block: 3 * MINUTE,
            data_end: 10 * MINUTE,
        }
    }
}

/// Settings passed with every call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub hostname: String,
    pub smtp_port: u16,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub retry: Schedule,
    /// Local domains, routes, smart host, TLS policy, masquerading.
    pub routing: Routing,
    /// Most recipients in one transaction (100).
    pub max_recipients_per_transaction: u32,
}

/// A message ready for the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub envelope: Envelope,
    pub message: Vec<u8>,
    pub warnings: Vec<String>,
}

/// Why a file was refused at pickup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: String,
    pub text: String,
    /// The file could not be read now; it stays where it is for another try.
    pub temporary: bool,
    /// A DSN to queue for the sender (oversized messages).
    pub notice: Option<Notice>,
}

/// A DSN to queue, from the null sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The original sender.
    pub recipient: String,
    pub message: Vec<u8>,
}

/// What the queue knows of a message before an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueState {
    pub queue_id: String,
    /// Attempts made before this one.
    pub attempts: u32,
    pub arrival_ms: u64,
    pub delay_notice_sent: bool,
}

/// What one attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryReport {
    /// One per recipient offered; expired ones fail with 4.4.7.
    pub outcomes: Vec<RecipientOutcome>,
    /// When to try the pending recipients again.
    pub next_attempt_ms: Option<u64>,
    /// DSNs to queue.
    pub notices: Vec<Notice>,
    /// A delay notice is among `notices`.
    pub delay_notice_sent: bool,
    /// Recipients failed permanently in this attempt: the reason for the
    /// Badmail copy (it says whether a DSN was sent).
    pub badmail: Option<String>,
}

/// What the relay would do with one recipient's domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientRoute {
    pub via: String,
    pub hosts: Vec<String>,
    pub port: u16,
    pub tls: TlsMode,
    pub failure: Option<Failure>,
}

/// What the relay would do with a pickup file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub envelope: Result<Envelope, String>,
    pub findings: Vec<Finding>,
    pub routes: Vec<(String, RecipientRoute)>,
}

/// Header bytes read from a file too large to read whole.
const HEAD_BYTES: u64 = 64 * 1024;

/// The result for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientResult {
    Delivered(String),
    NotDelivered(Failure),
}

/// What happened to one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientOutcome {
    pub recipient: String,
    pub result: RecipientResult,
    pub remote_mta: Option<String>,
}

/// Clean up the claimed file `file` of the Queue folder.
pub fn accept<C: Capabilities>(
    caps: &mut C,
    file: &str,
    queue_id: &str,
    options: &Options,
) -> Result<Accepted, Rejection> {
    let raw = match caps.read_queue_file(file) {
        Ok(raw) => raw,
        Err(ReadError::TooLarge(size)) => {
            let text = format!(
                "the message is {size} bytes; the limit is {} bytes",
                options.limits.max_message_bytes
            );
            let head = caps.read_queue_head(file, HEAD_BYTES).unwrap_or_default();
            let notice = oversize_notice(caps, &head, queue_id, &text, options);
            return Err(Rejection {
                code: "too-large".into(),
                text,
                temporary: false,
                notice,
            });
        }
        Err(ReadError::Unavailable(why)) => {
            return Err(Rejection {
                code: "unreadable".into(),
                text: why,
                temporary: true,
                notice: None,
            });
        }
    };
    let findings = validate::validate(&raw, &options.limits);
    let (rejections, warnings): (Vec<_>, Vec<_>) = findings
        .into_iter()
        .partition(|f| f.severity == Severity::Reject);
    if let Some(first) = rejections.first() {
        let text = rejections
            .iter()
            .map(|f| f.text.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        let notice = if first.code == "too-large" {
            let head = raw.get(..HEAD_BYTES as usize).unwrap_or(&raw);
            oversize_notice(caps, head, queue_id, &text, options)
        } else {
            None
        };
        return Err(Rejection {
            code: first.code.clone(),
            text,
            temporary: false,
            notice,
        });
    }
    let rejected = |text: String| Rejection {
        code: "unparseable".into(),
        text,
        temporary: false,
        notice: None,
    };
    let parsed = message::parse(&raw).map_err(|e| rejected(e.to_string()))?;
    let envelope = envelope::from_parsed(&parsed).map_err(|e| rejected(e.to_string()))?;
    let envelope = masquerade(envelope, &options.routing);
    let now_ms = caps.now_ms();
    let ctx = cleanup::Context {
        queue_id,
        hostname: &options.hostname,
        now_ms,
        sender: &envelope.sender,
    };
    let message = cleanup::cleanup(&parsed, &ctx);
    Ok(Accepted {
        envelope,
        message,
        warnings: warnings.into_iter().map(|f| f.text).collect(),
    })
}

/// A DSN with the headers only, for a message refused as too large, when
/// its head still names a sender (never for the null sender).
fn oversize_notice<C: Capabilities>(
    caps: &mut C,
    head: &[u8],
    queue_id: &str,
    why: &str,
    options: &Options,
) -> Option<Notice> {
    // The head is cut at an arbitrary byte: parse only its header section.
    let (_, message) = message::split_pickup_lines(head).ok()?;
    let end = message::header_section(message).ok()?.body_start;
    let mut headers = head
        .get(..head.len().saturating_sub(message.len()).saturating_add(end))?
        .to_vec();
    headers.extend_from_slice(b"\r\n");
    let envelope = envelope::derive(&headers).ok()?;
    if envelope.sender.is_empty() {
        return None;
    }
    let now_ms = caps.now_ms();
    let recipients = envelope
        .recipients
        .iter()
        .map(|r| DsnRecipient {
            recipient: r.clone(),
            action: Action::Failed,
            status: "5.3.4".into(),
            remote_mta: None,
            diagnostic: Some(format!("message too big for this relay: {why}")),
        })
        .collect();
    let dsn = bounce::build_bounce(&BounceRequest {
        reporting_mta: options.hostname.clone(),
        original_sender: envelope.sender.clone(),
        arrival_date: date::rfc5322(now_ms),
        date: date::rfc5322(now_ms),
        message_id: format!("{queue_id}-toobig@{}", options.hostname),
        will_retry_until: None,
        recipients,
        original: message.get(..end).unwrap_or_default().to_vec(),
    });
    Some(Notice {
        recipient: envelope.sender,
        message: dsn,
    })
}

/// [`Capabilities`] with DNS answers remembered for the life of a batch.
struct DnsMemo<'a, C> {
    inner: &'a mut C,
    mx: std::collections::HashMap<String, MxAnswer>,
    ip: std::collections::HashMap<String, AddressAnswer>,
}

impl<'a, C> DnsMemo<'a, C> {
    fn new(inner: &'a mut C) -> Self {
        DnsMemo {
            inner,
            mx: Default::default(),
            ip: Default::default(),
        }
    }
}

impl<C: Capabilities> Waiter for DnsMemo<'_, C> {
    fn monotonic_ms(&mut self) -> u64 {
        self.inner.monotonic_ms()
    }
    fn wait(&mut self, timeout_ms: u32) -> Vec<u64> {
        self.inner.wait(timeout_ms)
    }
}

impl<C: Capabilities> Capabilities for DnsMemo<'_, C> {
    type Conn = C::Conn;
    fn read_queue_file(&mut self, name: &str) -> Result<Vec<u8>, ReadError> {
        self.inner.read_queue_file(name)
    }
    fn read_queue_head(&mut self, name: &str, max_bytes: u64) -> Result<Vec<u8>, ReadError> {
        self.inner.read_queue_head(name, max_bytes)
    }
    fn lookup_mx(&mut self, domain: &str) -> MxAnswer {
        if let Some(answer) = self.mx.get(domain) {
            return answer.clone();
        }
        let answer = self.inner.lookup_mx(domain);
        self.mx.insert(domain.to_string(), answer.clone());
        answer
    }
    fn lookup_ip(&mut self, host: &str) -> AddressAnswer {
        if let Some(answer) = self.ip.get(host) {
            return answer.clone();
        }
        let answer = self.inner.lookup_ip(host);
        self.ip.insert(host.to_string(), answer.clone());
        answer
    }
    fn connect(
        &mut self,
        address: &str,
        port: u16,
        timeout_ms: u32,
    ) -> Result<Self::Conn, smtp::SocketError> {
        self.inner.connect(address, port, timeout_ms)
    }
    fn write_drop(&mut self, content: &[u8]) -> Result<String, String> {
        self.inner.write_drop(content)
    }
    fn now_ms(&mut self) -> u64 {
        self.inner.now_ms()
    }
    fn log(&mut self, level: Level, message: &str) {
        self.inner.log(level, message)
    }
    fn record_attempt(&mut self, index: usize, report: DeliveryReport) {
        self.inner.record_attempt(index, report)
    }
    fn more_messages(&mut self) -> Vec<QueuedMessage> {
        self.inner.more_messages()
    }
}

/// One message of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    pub file: String,
    pub sender: String,
    pub recipients: Vec<String>,
    pub state: QueueState,
}

/// One delivery attempt for each message of a batch, then the decisions
/// that follow from it: when to retry, whether the sender must hear of it
/// (one DSN for the recipients that failed in this attempt, one delay notice
/// once), and whether the message has expired. Each report goes to
/// [`Capabilities::record_attempt`] as soon as its message is done.
///
/// The recipients of the batch are grouped by domain, and every domain is a
/// task of its own: the domains are delivered concurrently (each waiting on
/// its own server, see [`reactor`]), the messages of one domain in turn over
/// the same connection, with an RSET between them.
///
/// The batch grows while it runs: the host hands over more messages
/// ([`Capabilities::more_messages`]) as its connections free up, and they
/// start beside the ones still waiting on slow servers.
pub fn deliver_batch<C: Capabilities>(
    caps: &mut C,
    messages: Vec<QueuedMessage>,
    options: &Options,
) {
    // The messages of a batch mostly share destinations: ask DNS once per
    // name per batch (the reference host adds work to a call for a minute at
    // most, below any useful TTL).
    let mut memo = DnsMemo::new(caps);
    let caps = RefCell::new(&mut memo);
    let seed = caps.borrow_mut().now_ms();
    let progress = RefCell::new(Vec::new());
    let first = domain_tasks(&caps, &progress, messages, seed, options);
    // The host hands over more messages while the call runs (the lanes it
    // let this call take on); their indexes continue the batch's.
    let mut more = || {
        let messages = caps.borrow_mut().more_messages();
        domain_tasks(&caps, &progress, messages, seed, options)
    };
    reactor::run_growing(&caps, first, &mut more);
}

/// The tasks for `messages`, which continue the batch: one per domain, and
/// one for each message without recipients (it only needs its report).
fn domain_tasks<'a, C: Capabilities>(
    caps: &'a RefCell<&mut C>,
    progress: &'a RefCell<Vec<InProgress>>,
    messages: Vec<QueuedMessage>,
    seed: u64,
    options: &'a Options,
) -> Vec<reactor::Task<'a, ()>> {
    let mut tasks: Vec<reactor::Task<'a, ()>> = Vec::new();
    let mut domains: Vec<(String, Vec<DomainItem>)> = Vec::new();
    let mut domain_index: HashMap<String, usize> = HashMap::new();
    for m in messages {
        let m = Rc::new(m);
        let groups = route::group_by_domain(&m.recipients);
        let index = {
            let mut progress = progress.borrow_mut();
            progress.push(InProgress {
                bytes: None,
                outcomes: Vec::new(),
                domains_left: groups.len().max(1),
            });
            progress.len() - 1
        };
        if groups.is_empty() {
            tasks.push(Box::pin(async move {
                finish_part(caps, progress, &m, index, Vec::new(), options)
            }));
            continue;
        }
        for (domain, group) in groups {
            let item = (index, m.clone(), group);
            match domain_index.get(&domain).and_then(|&i| domains.get_mut(i)) {
                Some((_, items)) => items.push(item),
                None => {
                    domain_index.insert(domain.clone(), domains.len());
                    domains.push((domain, vec![item]));
                }
            }
        }
    }
    for (domain, items) in domains {
        tasks.push(Box::pin(deliver_domain(
            caps, progress, domain, items, seed, options,
        )));
    }
    tasks
}

/// One message's recipients at one domain: the message's index in the
/// batch, the message and the recipients.
type DomainItem = (usize, Rc<QueuedMessage>, Vec<String>);

/// A message of a batch while its domains are being delivered.
struct InProgress {
    /// The message, read by the first domain that needs it and released
    /// once its report is recorded.
    bytes: Option<Result<Rc<Vec<u8>>, Failure>>,
    outcomes: Vec<RecipientOutcome>,
    /// Domains still to finish.
    domains_left: usize,
}

/// The task of one domain: its recipients in every message of the batch.
async fn deliver_domain<C: Capabilities>(
    caps: &RefCell<&mut C>,
    progress: &RefCell<Vec<InProgress>>,
    domain: String,
    items: Vec<DomainItem>,
    seed: u64,
    options: &Options,
) {
    let resolved = resolve_target(
        &mut **caps.borrow_mut(),
        &domain,
        &options.routing,
        options.smtp_port,
        seed,
    );
    if let Err(failure) = &resolved {
        caps.borrow_mut()
            .log(Level::Info, &format!("{domain}: {}", failure.text));
    }
    let mut sessions = Sessions::default();
    let last = items.len().saturating_sub(1);
    for (position, (index, queued, recipients)) in items.into_iter().enumerate() {
        let message = message_bytes(caps, progress, index, &queued.file);
        let outcomes = match (&message, &resolved) {
            (Err(failure), _) | (Ok(_), Err(failure)) => recipients
                .iter()
                .map(|r| not_delivered(r, failure, None))
                .collect(),
            (Ok(bytes), Ok(Destination::Drop)) => {
                drop_locally(&mut **caps.borrow_mut(), &queued.sender, &recipients, bytes)
            }
            (Ok(bytes), Ok(Destination::Remote(target))) => {
                deliver_to_target(
                    caps,
                    &mut sessions,
                    target,
                    &queued.sender,
                    &recipients,
                    bytes,
                    options,
                )
                .await
            }
        };
        drop(message);
        if position == last {
            // Closed before the last report: the host counts the connection
            // as free once that report is in.
            std::mem::take(&mut sessions).close_all();
        }
        finish_part(caps, progress, &queued, index, outcomes, options);
    }
}

/// The bytes of message `index`, read once for all its domains.
fn message_bytes<C: Capabilities>(
    caps: &RefCell<&mut C>,
    progress: &RefCell<Vec<InProgress>>,
    index: usize,
    file: &str,
) -> Result<Rc<Vec<u8>>, Failure> {
    if let Some(Some(known)) = progress.borrow().get(index).map(|p| p.bytes.clone()) {
        return known;
    }
    let read = caps.borrow_mut().read_queue_file(file);
    let read = read.map(Rc::new).map_err(|e| {
        let why = match e {
            ReadError::TooLarge(size) => {
                format!("the queued message is {size} bytes, more than the host allows")
            }
            ReadError::Unavailable(why) => format!("the queued message cannot be read: {why}"),
        };
        Failure::temporary("4.3.0", why)
    });
    if let Some(entry) = progress.borrow_mut().get_mut(index) {
        entry.bytes = Some(read.clone());
    }
    read
}

/// Add one domain's outcomes to message `index`; when it was the last,
/// decide what follows and record the report.
fn finish_part<C: Capabilities>(
    caps: &RefCell<&mut C>,
    progress: &RefCell<Vec<InProgress>>,
    queued: &QueuedMessage,
    index: usize,
    outcomes: Vec<RecipientOutcome>,
    options: &Options,
) {
    let mut all = progress.borrow_mut();
    let Some(entry) = all.get_mut(index) else {
        return;
    };
    entry.outcomes.extend(outcomes);
    entry.domains_left = entry.domains_left.saturating_sub(1);
    if entry.domains_left > 0 {
        return;
    }
    let mut outcomes = std::mem::take(&mut entry.outcomes);
    let bytes = entry.bytes.take();
    drop(all);
    outcomes.sort_by_key(|o| {
        queued
            .recipients
            .iter()
            .position(|r| *r == o.recipient)
            .unwrap_or(usize::MAX)
    });
    let message = match &bytes {
        Some(Ok(bytes)) => bytes.as_slice(),
        _ => &[],
    };
    let report = finish_report(&mut **caps.borrow_mut(), queued, outcomes, message, options);
    caps.borrow_mut().record_attempt(index, report);
}

/// The decisions that follow an attempt: retry time, expiry, DSNs.
fn finish_report<C: Capabilities>(
    caps: &mut C,
    queued: &QueuedMessage,
    mut outcomes: Vec<RecipientOutcome>,
    message: &[u8],
    options: &Options,
) -> DeliveryReport {
    let (sender, state) = (queued.sender.as_str(), &queued.state);
    let now_ms = caps.now_ms();
    let mut report = DeliveryReport {
        outcomes: Vec::new(),
        next_attempt_ms: None,
        notices: Vec::new(),
        delay_notice_sent: false,
        badmail: None,
    };
    let is_pending = |o: &RecipientOutcome| matches!(&o.result, RecipientResult::NotDelivered(f) if !f.permanent);
    if outcomes.iter().any(is_pending) {
        let decision = options.retry.decide(
            state.attempts.saturating_add(1),
            state.arrival_ms,
            now_ms,
            state.delay_notice_sent,
        );
        if decision.expired {
            let days = f64::from(options.retry.give_up_after) / 86_400.0;
            for outcome in outcomes.iter_mut().filter(|o| is_pending(o)) {
                if let RecipientResult::NotDelivered(f) = &mut outcome.result {
                    *f = Failure::permanent(
                        "4.4.7",
                        format!(
                            "gave up after {days:.1} days in the queue; last error: {}",
                            f.text
                        ),
                    );
                }
            }
        } else {
            report.next_attempt_ms = decision.next_attempt_ms;
            if decision.delay_notice_due && !sender.is_empty() {
                let delayed: Vec<RecipientOutcome> =
                    outcomes.iter().filter(|o| is_pending(o)).cloned().collect();
                let until = date::rfc5322(decision.give_up_ms);
                report.notices.push(notice(
                    options,
                    state,
                    sender,
                    now_ms,
                    message,
                    &delayed,
                    Action::Delayed,
                    Some(until),
                ));
                report.delay_notice_sent = true;
            }
        }
    }
    let failed: Vec<RecipientOutcome> = outcomes
        .iter()
        .filter(|o| matches!(&o.result, RecipientResult::NotDelivered(f) if f.permanent))
        .cloned()
        .collect();
    if !failed.is_empty() {
        let list: Vec<String> = failed
            .iter()
            .map(|o| format!("<{}>: {}", o.recipient, failure_text(o)))
            .collect();
        let dsn = if sender.is_empty() {
            // Never bounce to <>: bounces must not loop (RFC 5321 4.5.5).
            "the sender is the null sender, so no DSN was sent".to_string()
        } else {
            report.notices.push(notice(
                options,
                state,
                sender,
                now_ms,
                message,
                &failed,
                Action::Failed,
                None,
            ));
            format!("a DSN was sent to <{sender}>")
        };
        report.badmail = Some(format!(
            "delivery failed permanently for {} recipient(s): {}; {dsn}",
            failed.len(),
            list.join("; ")
        ));
    }
    report.outcomes = outcomes;
    report
}

fn failure_text(outcome: &RecipientOutcome) -> &str {
    match &outcome.result {
        RecipientResult::NotDelivered(f) => &f.text,
        RecipientResult::Delivered(reply) => reply,
    }
}

/// One DSN for `outcomes`, all with the same action.
#[allow(clippy::too_many_arguments)]
fn notice(
    options: &Options,
    state: &QueueState,
    sender: &str,
    now_ms: u64,
    message: &[u8],
    outcomes: &[RecipientOutcome],
    action: Action,
    will_retry_until: Option<String>,
) -> Notice {
    let kind = if action == Action::Delayed {
        "delay"
    } else {
        "bounce"
    };
    let dsn = bounce::build_bounce(&BounceRequest {
        reporting_mta: options.hostname.clone(),
        original_sender: sender.to_string(),
        arrival_date: date::rfc5322(state.arrival_ms),
        date: date::rfc5322(now_ms),
        message_id: format!(
            "{}-{}-{kind}@{}",
            state.queue_id,
            state.attempts.saturating_add(1),
            options.hostname
        ),
        will_retry_until,
        recipients: outcomes
            .iter()
            .map(|o| {
                let (status, diagnostic) = match &o.result {
                    RecipientResult::NotDelivered(f) => (f.status.clone(), f.text.clone()),
                    RecipientResult::Delivered(reply) => ("2.0.0".to_string(), reply.clone()),
                };
                DsnRecipient {
                    recipient: o.recipient.clone(),
                    action,
                    status,
                    remote_mta: o.remote_mta.clone(),
                    diagnostic: Some(diagnostic),
                }
            })
            .collect(),
        original: message.to_vec(),
    });
    Notice {
        recipient: sender.to_string(),
        message: dsn,
    }
}

/// Where the mail of one domain goes, resolved as far as DNS allows.
enum Destination {
    Drop,
    Remote(Target),
}

/// Apply the routing table, then look up MX records when the route says MX.
fn resolve_target<C: Capabilities>(
    caps: &mut C,
    domain: &str,
    routing: &Routing,
    mx_port: u16,
    seed: u64,
) -> Result<Destination, Failure> {
    let (tls, credentials) = match route::choose_route(domain, routing) {
        RouteChoice::LocalDrop => return Ok(Destination::Drop),
        RouteChoice::Fixed(_, hop) => {
            return Ok(Destination::Remote(Target {
                domain: domain.to_string(),
                hosts: hop.hosts,
                port: hop.port,
                tls: hop.tls,
                credentials: hop.credentials,
                implicit_mx: false,
            }));
        }
        RouteChoice::Mx(tls) => (tls, None),
    };
    // An address literal (`user@[192.0.2.1]`) names its host directly.
    if let Some(literal) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
        let ip = literal.strip_prefix("IPv6:").unwrap_or(literal).to_string();
        return Ok(Destination::Remote(Target {
            domain: domain.to_string(),
            hosts: vec![ip],
            port: mx_port,
            tls,
            credentials,
            implicit_mx: false,
        }));
    }
    let answer = caps.lookup_mx(domain);
    let plan = route::plan_delivery(domain, &answer, seed)?;
    Ok(Destination::Remote(Target {
        domain: plan.domain,
        hosts: plan.hosts,
        port: mx_port,
        tls,
        credentials,
        implicit_mx: plan.implicit_mx,
    }))
}

/// Write the message for local recipients into Drop, IIS style: envelope
/// lines first, so whatever reads Drop knows sender and recipients.
fn drop_locally<C: Capabilities>(
    caps: &mut C,
    sender: &str,
    recipients: &[String],
    message: &[u8],
) -> Vec<RecipientOutcome> {
    let mut content = format!("x-sender: <{sender}>\r\n").into_bytes();
    for recipient in recipients {
        content.extend_from_slice(format!("x-receiver: <{recipient}>\r\n").as_bytes());
    }
    content.extend_from_slice(message);
    match caps.write_drop(&content) {
        Ok(name) => recipients
            .iter()
            .map(|r| {
                caps.log(
                    Level::Info,
                    &format!("to=<{r}> relay=local status=sent (written to Drop/{name})"),
                );
                RecipientOutcome {
                    recipient: r.clone(),
                    result: RecipientResult::Delivered(format!("written to Drop/{name}")),
                    remote_mta: None,
                }
            })
            .collect(),
        Err(why) => {
            let failure =
                Failure::temporary("4.3.0", format!("cannot write to the Drop folder: {why}"));
            recipients
                .iter()
                .map(|r| not_delivered(r, &failure, None))
                .collect()
        }
    }
}

/// What the relay would do with `raw`, without sending anything.
pub fn explain<C: Capabilities>(caps: &mut C, raw: &[u8], options: &Options) -> Explanation {
    let findings = validate::validate(raw, &options.limits);
    let envelope = envelope::derive(raw)
        .map(|e| masquerade(e, &options.routing))
        .map_err(|e| e.to_string());
    let mut routes = Vec::new();
    if let Ok(env) = &envelope {
        let seed = caps.now_ms();
        for (domain, group) in route::group_by_domain(&env.recipients) {
            let choice = route::choose_route(&domain, &options.routing);
            let via = match &choice {
                RouteChoice::LocalDrop => "local (Drop)".to_string(),
                RouteChoice::Fixed(rule, _) => rule.clone(),
                RouteChoice::Mx(_) => "MX".to_string(),
            };
            let route =
                match resolve_target(caps, &domain, &options.routing, options.smtp_port, seed) {
                    Ok(Destination::Drop) => RecipientRoute {
                        via,
                        hosts: Vec::new(),
                        port: 0,
                        tls: TlsMode::None,
                        failure: None,
                    },
                    Ok(Destination::Remote(t)) => {
                        let via = if t.implicit_mx {
                            "implicit MX (A/AAAA)".to_string()
                        } else {
                            via
                        };
                        RecipientRoute {
                            via,
                            hosts: t.hosts,
                            port: t.port,
                            tls: t.tls,
                            failure: None,
                        }
                    }
                    Err(failure) => {
                        let tls = match choice {
                            RouteChoice::Mx(tls) => tls,
                            _ => TlsMode::None,
                        };
                        RecipientRoute {
                            via,
                            hosts: Vec::new(),
                            port: options.smtp_port,
                            tls,
                            failure: Some(failure),
                        }
                    }
                };
            routes.extend(
                group
                    .into_iter()
                    .map(|recipient| (recipient, route.clone())),
            );
        }
    }
    Explanation {
        envelope,
        findings,
        routes,
    }
}

/// Rewrite the sender's domain to the masquerade domain (never the null sender).
fn masquerade(mut envelope: Envelope, routing: &Routing) -> Envelope {
    if let (Some(domain), Some((local, _))) =
        (&routing.masquerade_domain, envelope.sender.rsplit_once('@'))
    {
        envelope.sender = format!("{local}@{domain}");
    }
    envelope
}

#[cfg(test)]
mod tests;
