//! The per-message stages of the relay world: `accept` (cleanup of a claimed
//! pickup file) and `deliver` (one attempt for the pending recipients).
//!
//! Both run against [`Capabilities`], the host's imports seen as a trait, so
//! that the whole dialogue is tested natively with a scripted host.

use crate::bounce::{self, Action, BounceRequest, DsnRecipient};
use crate::cleanup;
use crate::date;
use crate::envelope::{self, Envelope};
use crate::message;
use crate::retry::Schedule;
use crate::route::{self, AddressAnswer, Failure, MxAnswer};
use crate::smtp::{self, Connection, DialogueError, Extensions, Reply, ReplyReader};
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

/// What the host provides, as the component sees it.
pub trait Capabilities {
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
    fn now_ms(&mut self) -> u64;
    fn log(&mut self, level: Level, message: &str);
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
    /// Recipients failed for a null-sender message: the Badmail reason.
    pub badmail: Option<String>,
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

/// One delivery attempt of the queued message `file` to `recipients`, then
/// the decisions that follow from it: when to retry, whether the sender must
/// hear of it (one DSN for the recipients that failed in this attempt, one
/// delay notice once), and whether the message has expired.
pub fn deliver<C: Capabilities>(
    caps: &mut C,
    file: &str,
    sender: &str,
    recipients: &[String],
    state: &QueueState,
    options: &Options,
) -> DeliveryReport {
    let (mut outcomes, message) = attempt(caps, file, sender, recipients, options);
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
                    &message,
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
                &message,
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

/// The attempt itself: one outcome per recipient, and the message bytes.
fn attempt<C: Capabilities>(
    caps: &mut C,
    file: &str,
    sender: &str,
    recipients: &[String],
    options: &Options,
) -> (Vec<RecipientOutcome>, Vec<u8>) {
    let message = match caps.read_queue_file(file) {
        Ok(message) => message,
        Err(e) => {
            let why = match e {
                ReadError::TooLarge(size) => {
                    format!("the queued message is {size} bytes, more than the host allows")
                }
                ReadError::Unavailable(why) => format!("the queued message cannot be read: {why}"),
            };
            let failure = Failure::temporary("4.3.0", why);
            return (
                recipients
                    .iter()
                    .map(|r| not_delivered(r, &failure, None))
                    .collect(),
                Vec::new(),
            );
        }
    };
    let seed = caps.now_ms();
    let mut outcomes = Vec::with_capacity(recipients.len());
    for (domain, group) in route::group_by_domain(recipients) {
        let answer = caps.lookup_mx(&domain);
        match route::plan_delivery(&domain, &answer, seed) {
            Err(failure) => {
                caps.log(Level::Info, &format!("{domain}: {}", failure.text));
                outcomes.extend(group.iter().map(|r| not_delivered(r, &failure, None)));
            }
            Ok(plan) => outcomes.extend(deliver_to_domain(
                caps, &plan, sender, &group, &message, options,
            )),
        }
    }
    (outcomes, message)
}

fn not_delivered(recipient: &str, failure: &Failure, remote_mta: Option<&str>) -> RecipientOutcome {
    RecipientOutcome {
        recipient: recipient.to_string(),
        result: RecipientResult::NotDelivered(failure.clone()),
        remote_mta: remote_mta.map(str::to_string),
    }
}

/// Try the hosts of `plan` in order until every recipient has a final answer;
/// recipients that only got temporary failures move on to the next host.
fn deliver_to_domain<C: Capabilities>(
    caps: &mut C,
    plan: &route::DeliveryPlan,
    sender: &str,
    recipients: &[String],
    message: &[u8],
    options: &Options,
) -> Vec<RecipientOutcome> {
    let mut done: Vec<RecipientOutcome> = Vec::new();
    let mut pending: Vec<RecipientOutcome> = recipients
        .iter()
        .map(|r| {
            not_delivered(
                r,
                &Failure::temporary(
                    "4.4.1",
                    format!("no exchanger of {} could be reached", plan.domain),
                ),
                None,
            )
        })
        .collect();
    'hosts: for host in &plan.hosts {
        let addresses = match caps.lookup_ip(host) {
            AddressAnswer::Addresses(list) if !list.is_empty() => list,
            AddressAnswer::Addresses(_) | AddressAnswer::NoRecords => {
                set_failure(
                    &mut pending,
                    &Failure::temporary("4.4.3", format!("{host} has no A or AAAA record")),
                    None,
                );
                continue;
            }
            AddressAnswer::NxDomain if plan.implicit_mx => {
                let failure = Failure::permanent(
                    "5.1.2",
                    format!(
                        "the domain {} has neither MX nor address records",
                        plan.domain
                    ),
                );
                set_failure(&mut pending, &failure, None);
                done.append(&mut pending);
                break;
            }
            AddressAnswer::NxDomain => {
                set_failure(
                    &mut pending,
                    &Failure::temporary("4.4.3", format!("the exchanger {host} does not exist")),
                    None,
                );
                continue;
            }
            AddressAnswer::Temporary(why) => {
                set_failure(
                    &mut pending,
                    &Failure::temporary(
                        "4.4.3",
                        format!("address lookup for {host} failed: {why}"),
                    ),
                    None,
                );
                continue;
            }
        };
        for address in addresses {
            let remote = format!("{host} [{address}]");
            let rcpts: Vec<String> = pending.iter().map(|o| o.recipient.clone()).collect();
            match transaction(caps, &address, host, sender, &rcpts, message, options) {
                Err(failure) => {
                    caps.log(Level::Info, &format!("{remote}: {}", failure.text));
                    set_failure(&mut pending, &failure, Some(&remote));
                    if failure.permanent {
                        done.append(&mut pending);
                        break 'hosts;
                    }
                }
                Ok(results) => {
                    for (outcome, result) in pending.iter_mut().zip(results) {
                        outcome.result = result;
                        outcome.remote_mta = Some(host.clone());
                    }
                    let (finished, retry): (Vec<_>, Vec<_>) =
                        pending.into_iter().partition(|o| match &o.result {
                            RecipientResult::Delivered(_) => true,
                            RecipientResult::NotDelivered(f) => f.permanent,
                        });
                    for outcome in &finished {
                        log_outcome(caps, outcome, &remote);
                    }
                    done.extend(finished);
                    pending = retry;
                    if pending.is_empty() {
                        break 'hosts;
                    }
                    // Temporary failures go on to the next exchanger, not the
                    // next address of the one that just answered.
                    continue 'hosts;
                }
            }
        }
    }
    done.extend(pending);
    let order = |o: &RecipientOutcome| {
        recipients
            .iter()
            .position(|r| *r == o.recipient)
            .unwrap_or(usize::MAX)
    };
    done.sort_by_key(order);
    done
}

fn set_failure(pending: &mut [RecipientOutcome], failure: &Failure, remote: Option<&str>) {
    for outcome in pending {
        outcome.result = RecipientResult::NotDelivered(failure.clone());
        outcome.remote_mta = remote.map(str::to_string).or(outcome.remote_mta.take());
    }
}

fn log_outcome<C: Capabilities>(caps: &mut C, outcome: &RecipientOutcome, remote: &str) {
    match &outcome.result {
        RecipientResult::Delivered(reply) => caps.log(
            Level::Info,
            &format!(
                "to=<{}> relay={remote} status=sent ({reply})",
                outcome.recipient
            ),
        ),
        RecipientResult::NotDelivered(f) => caps.log(
            Level::Info,
            &format!(
                "to=<{}> relay={remote} status=bounced ({})",
                outcome.recipient, f.text
            ),
        ),
    }
}

/// A failed exchange: 4xx and broken connections are temporary, 5xx permanent.
fn reply_failure(stage: &str, reply: &Reply) -> Failure {
    let text = format!("{stage}: {reply}");
    if reply.is_permanent() {
        Failure::permanent(&reply.status(), text)
    } else {
        Failure::temporary(&transient_status(reply), text)
    }
}

/// A status for a reply treated as temporary: its own 4.x.x, a 5.x.x made
/// 4.x.x, or 4.5.0 (protocol error) for a reply that was not an error at all.
fn transient_status(reply: &Reply) -> String {
    let status = reply.status();
    match status.split_once('.') {
        Some(("4", _)) => status,
        Some(("5", rest)) => format!("4.{rest}"),
        _ => "4.5.0".to_string(),
    }
}

fn dialogue_failure(stage: &str, e: &DialogueError) -> Failure {
    Failure::temporary("4.4.2", format!("{stage}: {e}"))
}

/// One connection, one transaction: returns the result of each recipient,
/// in order, or a failure that applies to all of them.
fn transaction<C: Capabilities>(
    caps: &mut C,
    address: &str,
    host: &str,
    sender: &str,
    recipients: &[String],
    message: &[u8],
    options: &Options,
) -> Result<Vec<RecipientResult>, Failure> {
    let t = &options.timeouts;
    let mut conn = caps
        .connect(address, options.smtp_port, t.connect)
        .map_err(|e| {
            Failure::temporary(
                "4.4.1",
                format!("connect to {host} [{address}]:{}: {e}", options.smtp_port),
            )
        })?;
    let mut reader = ReplyReader::default();
    let mut exchange =
        |conn: &mut C::Conn, stage: &str, command: &[u8], timeout: u32| -> Result<Reply, Failure> {
            if !command.is_empty() {
                conn.send(command, timeout)
                    .map_err(|e| dialogue_failure(stage, &DialogueError::Socket(e)))?;
            }
            reader
                .read(conn, timeout)
                .map_err(|e| dialogue_failure(stage, &e))
        };

    let greeting = exchange(&mut conn, "greeting", b"", t.greeting)?;
    if greeting.code != 220 {
        // A 5xx greeting only says this host will not talk to us: try the next one.
        return Err(Failure::temporary(
            &transient_status(&greeting),
            format!("greeting: {greeting}"),
        ));
    }
    let ehlo = exchange(
        &mut conn,
        "EHLO",
        format!("EHLO {}\r\n", options.hostname).as_bytes(),
        t.mail,
    )?;
    let extensions = if ehlo.is_positive() {
        Extensions::from_ehlo(&ehlo)
    } else {
        let helo = exchange(
            &mut conn,
            "HELO",
            format!("HELO {}\r\n", options.hostname).as_bytes(),
            t.mail,
        )?;
        if !helo.is_positive() {
            return Err(reply_failure("HELO", &helo).into_temporary());
        }
        Extensions::default()
    };

    let stats = message::line_stats(message);
    let needs_utf8 =
        !sender.is_ascii() || recipients.iter().any(|r| !r.is_ascii()) || header_has_utf8(message);
    if let Some(failure) = unsendable(
        &extensions,
        stats.has_eight_bit,
        needs_utf8,
        message.len() as u64,
        host,
    ) {
        let _ = conn.send(b"QUIT\r\n", t.mail);
        return Ok(recipients
            .iter()
            .map(|_| RecipientResult::NotDelivered(failure.clone()))
            .collect());
    }
    let mut mail = format!("MAIL FROM:<{sender}>");
    if extensions.size.is_some() {
        mail.push_str(&format!(" SIZE={}", message.len()));
    }
    if stats.has_eight_bit && extensions.eight_bit_mime {
        mail.push_str(" BODY=8BITMIME");
    }
    if needs_utf8 {
        mail.push_str(" SMTPUTF8");
    }
    mail.push_str("\r\n");
    let rcpt_commands: Vec<String> = recipients
        .iter()
        .map(|r| format!("RCPT TO:<{r}>\r\n"))
        .collect();

    // With PIPELINING, MAIL and every RCPT leave in one write (RFC 2920).
    let (mail_reply, rcpt_replies) = if extensions.pipelining {
        let mut batch = mail.clone().into_bytes();
        for command in &rcpt_commands {
            batch.extend_from_slice(command.as_bytes());
        }
        let mail_reply = exchange(&mut conn, "MAIL FROM", &batch, t.mail)?;
        let mut replies = Vec::with_capacity(rcpt_commands.len());
        for _ in &rcpt_commands {
            replies.push(exchange(&mut conn, "RCPT TO", b"", t.rcpt)?);
        }
        (mail_reply, replies)
    } else {
        let mail_reply = exchange(&mut conn, "MAIL FROM", mail.as_bytes(), t.mail)?;
        let mut replies = Vec::with_capacity(rcpt_commands.len());
        if mail_reply.is_positive() {
            for command in &rcpt_commands {
                replies.push(exchange(&mut conn, "RCPT TO", command.as_bytes(), t.rcpt)?);
            }
        }
        (mail_reply, replies)
    };
    if !mail_reply.is_positive() {
        let failure = reply_failure("MAIL FROM", &mail_reply);
        let _ = conn.send(b"QUIT\r\n", t.mail);
        if failure.permanent {
            return Ok(recipients
                .iter()
                .map(|_| RecipientResult::NotDelivered(failure.clone()))
                .collect());
        }
        return Err(failure);
    }
    let mut results: Vec<Option<RecipientResult>> = rcpt_replies
        .iter()
        .map(|reply| {
            (!reply.is_positive())
                .then(|| RecipientResult::NotDelivered(reply_failure("RCPT TO", reply)))
        })
        .collect();
    if results.iter().all(Option::is_some) {
        let _ = conn.send(b"QUIT\r\n", t.mail);
        return Ok(results.into_iter().flatten().collect());
    }
    let data = exchange(&mut conn, "DATA", b"DATA\r\n", t.data_init)?;
    let final_reply = if data.is_intermediate() {
        let block = smtp::data_block(message);
        exchange(
            &mut conn,
            "end of data",
            &block,
            t.data_block.max(t.data_end),
        )?
    } else {
        data
    };
    let accepted = if final_reply.is_positive() {
        RecipientResult::Delivered(final_reply.to_string())
    } else {
        RecipientResult::NotDelivered(reply_failure("DATA", &final_reply))
    };
    for slot in results.iter_mut().filter(|slot| slot.is_none()) {
        *slot = Some(accepted.clone());
    }
    // QUIT is a courtesy; the mail is already accepted or refused.
    let _ = exchange(&mut conn, "QUIT", b"QUIT\r\n", t.mail.min(10_000));
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| accepted.clone()))
        .collect())
}

impl Failure {
    fn into_temporary(mut self) -> Self {
        self.permanent = false;
        self
    }
}

fn header_has_utf8(message: &[u8]) -> bool {
    let end = message::header_section(message)
        .map(|h| h.body_start)
        .unwrap_or(0);
    !message.get(..end).unwrap_or_default().is_ascii()
}

/// Refuse to send what the server said it cannot take, rather than alter it.
fn unsendable(
    ext: &Extensions,
    eight_bit: bool,
    needs_utf8: bool,
    size: u64,
    host: &str,
) -> Option<Failure> {
    if let Some(limit) = ext.size.filter(|&limit| limit > 0 && size > limit) {
        return Some(Failure::permanent(
            "5.3.4",
            format!("the message is {size} bytes; {host} accepts at most {limit}"),
        ));
    }
    if needs_utf8 && !ext.smtputf8 {
        return Some(Failure::permanent(
            "5.6.7",
            format!(
                "the message needs SMTPUTF8 (UTF-8 addresses or headers) and {host} does not offer it"
            ),
        ));
    }
    if eight_bit && !ext.eight_bit_mime && !ext.smtputf8 {
        return Some(Failure::permanent(
            "5.6.3",
            format!("the message has 8-bit content and {host} does not offer 8BITMIME"),
        ));
    }
    None
}

#[cfg(test)]
mod tests;
