//! The delivery stage (Postfix's qmgr and smtp): one attempt for the pending
//! recipients of a queued message, and the bookkeeping of its report.
//!
//! The component decides what each reply means, when to retry, and which
//! DSNs the sender gets; the host stores the outcome, queues the DSNs as new
//! messages from the null sender, and keeps a Badmail copy of every message
//! with permanently failed recipients. A recipient that was delivered is
//! never offered again.

use std::sync::Arc;
use std::time::Duration;

use crate::badmail::{self, FailedRecipient, Reason};
use crate::clock::Clock;
use crate::logging;
use crate::mailroot::Folder;
use crate::mailroot::Mailroot;
use crate::queue::Queue;
use crate::queue::{self, Control, Recipient, State};
use crate::relay::Relay;
use crate::runtime::bindings::mailroot::relay::types::{
    DeliveryReport, QueueState, QueuedMessage, RecipientResult,
};

/// Wait after a component failure (trap or CPU stop) before the next try:
/// the retry schedule lives in the component, which just failed.
const COMPONENT_FAILURE_DELAY: Duration = Duration::from_secs(60);

/// What one attempt did to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// Not due yet.
    NotDue,
    /// Every recipient delivered; the message left the queue.
    Delivered,
    /// Every recipient is final and some failed.
    Failed,
    /// Some recipients wait for another attempt.
    Deferred,
    /// The queue files could not be read or written.
    Error,
}

/// Whether a queued message is due at `now_ms`.
pub fn is_due(control: &Control, now_ms: u64) -> bool {
    control.next_attempt_ms <= now_ms
}

/// The scheduling key of a message: the domain of its first pending
/// recipient. The per-destination connection limit counts messages by it.
pub fn destination(control: &Control) -> String {
    control
        .recipients
        .iter()
        .find(|r| r.state == State::Pending)
        .and_then(|r| r.address.rsplit_once('@'))
        .map(|(_, domain)| domain.to_ascii_lowercase())
        .unwrap_or_default()
}

/// Attempt a batch of due messages (for one destination) in one component
/// call, so that they share connections. Returns, per message, the attempt
/// and the queue ids of the DSNs it queued.
pub fn attempt_batch(relay: &Relay, controls: Vec<Control>) -> Vec<(Attempt, Vec<String>)> {
    let mut results = Vec::with_capacity(controls.len());
    let mut batch = Vec::with_capacity(controls.len());
    for control in controls {
        if control.pending().is_empty() {
            // Every recipient was final already (a crash after the last attempt).
            results.push((finish(&relay.spool(), &control), Vec::new()));
            continue;
        }
        batch.push(control);
    }
    if batch.is_empty() {
        return results;
    }
    let messages: Vec<QueuedMessage> = batch
        .iter()
        .map(|c| QueuedMessage {
            file: queue::message_file(&c.queue_id),
            sender: c.sender.clone(),
            recipients: c.pending(),
            state: QueueState {
                queue_id: c.queue_id.clone(),
                attempts: c.attempts,
                arrival_ms: c.first_seen_ms,
                delay_notice_sent: c.delay_notice_sent,
            },
        })
        .collect();
    let recorder = Recorder::new(
        relay.spool(),
        batch
            .iter()
            .zip(&messages)
            .map(|(c, m)| (c.clone(), m.recipients.clone()))
            .collect(),
    );
    let (recorder, outcome) = relay.runtime.deliver(&messages, &relay.options, recorder);
    let now_ms = relay.clock.now_ms();
    for (mut control, recorded) in batch.into_iter().zip(recorder.results) {
        match (recorded, &outcome) {
            (Some(result), _) => results.push(result),
            (None, Err(e)) => results.push((
                component_failed(relay, &mut control, &e.to_string(), now_ms),
                Vec::new(),
            )),
            (None, Ok(())) => {
                let error = "the component returned without reporting this message";
                results.push((
                    component_failed(relay, &mut control, error, now_ms),
                    Vec::new(),
                ));
            }
        }
    }
    results
}

/// The queue, the folders and the clock: what recording an attempt needs.
#[derive(Clone)]
pub struct Spool {
    pub queue: Queue,
    pub mailroot: Mailroot,
    pub clock: Arc<dyn Clock>,
}

/// Stores each report of a `deliver` call as the component hands it over
/// (`queue.record-attempt`), while the call goes on.
pub struct Recorder {
    spool: Spool,
    batch: Vec<Option<(Control, Vec<String>)>>,
    results: Vec<Option<(Attempt, Vec<String>)>>,
}

impl Recorder {
    /// For a batch of messages and the recipients offered for each.
    pub fn new(spool: Spool, batch: Vec<(Control, Vec<String>)>) -> Self {
        let results = batch.iter().map(|_| None).collect();
        let recorder = Recorder {
            spool,
            batch: batch.into_iter().map(Some).collect(),
            results,
        };
        recorder.mark_all_in_flight();
        recorder
    }

    /// The component delivers the domains of a batch concurrently, so any
    /// message of it may be in flight: mark them all.
    fn mark_all_in_flight(&self) {
        for (control, _) in self.batch.iter().flatten() {
            if let Err(e) = self.spool.queue.mark_in_flight(&control.queue_id) {
                logging::warn(&format!(
                    "{}: cannot mark the attempt in flight: {e}",
                    control.queue_id
                ));
            }
        }
    }

    /// Store the report for message `index`; a second report for the same
    /// message, or one for no message, is ignored.
    pub fn record(&mut self, index: u32, report: DeliveryReport) {
        let index = index as usize;
        let Some((control, pending)) = self.batch.get_mut(index).and_then(Option::take) else {
            logging::warn(&format!(
                "the component reported on message {index}, which it was not given or already reported"
            ));
            return;
        };
        if let Some(slot) = self.results.get_mut(index) {
            *slot = Some(apply_report(&self.spool, control, &pending, report));
        }
    }
}

/// Record what one attempt did to one message.
fn apply_report(
    spool: &Spool,
    mut control: Control,
    pending: &[String],
    report: DeliveryReport,
) -> (Attempt, Vec<String>) {
    let now_ms = spool.clock.now_ms();
    for outcome in report.outcomes {
        // Only recipients that were offered can change: a broken component
        // cannot add or resurrect recipients.
        let Some(recipient) = control.recipients.iter_mut().find(|r| {
            r.state == State::Pending
                && r.address == outcome.recipient
                && pending.contains(&r.address)
        }) else {
            continue;
        };
        recipient.remote_mta = outcome.remote_mta;
        match outcome.result {
            RecipientResult::Delivered(reply) => {
                recipient.state = State::Delivered;
                recipient.status = Some("2.0.0".into());
                recipient.last_reply = Some(reply);
            }
            RecipientResult::NotDelivered(failure) => {
                recipient.status = Some(failure.status);
                recipient.last_reply = Some(failure.text);
                if failure.permanent {
                    recipient.state = State::Failed;
                }
            }
        }
    }
    control.attempts = control.attempts.saturating_add(1);
    control.delay_notice_sent |= report.delay_notice_sent;
    // DSNs and the Badmail copy come before the control update: a crash in
    // between repeats them, never loses them.
    let notices: Vec<String> = report
        .notices
        .into_iter()
        .filter_map(|notice| {
            queue_notice(
                spool,
                &control.original_name,
                &notice.recipient,
                &notice.message,
            )
        })
        .collect();
    if let Some(reason) = report.badmail {
        copy_failed_to_badmail(spool, &control, reason, pending, now_ms);
    }
    let attempt = if control.pending().is_empty() {
        finish(spool, &control)
    } else {
        let fallback = now_ms.saturating_add(duration_ms(COMPONENT_FAILURE_DELAY));
        control.next_attempt_ms = report.next_attempt_ms.unwrap_or(fallback);
        log_deferred(&control);
        write_control(spool, &control, Attempt::Deferred)
    };
    let _ = spool.queue.clear_in_flight(&control.queue_id);
    (attempt, notices)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn write_control(spool: &Spool, control: &Control, success: Attempt) -> Attempt {
    match spool.queue.write_control(control) {
        Ok(()) => success,
        Err(e) => {
            logging::error(&format!(
                "{}: cannot update the control file: {e}",
                control.queue_id
            ));
            Attempt::Error
        }
    }
}

fn log_deferred(control: &Control) {
    for r in control
        .recipients
        .iter()
        .filter(|r| r.state == State::Pending)
    {
        logging::info(&format!(
            "{}: to=<{}> status=deferred ({})",
            control.queue_id,
            r.address,
            r.last_reply.as_deref().unwrap_or("no attempt completed")
        ));
    }
}

/// The component trapped or ran out of CPU: try later, and after repeated
/// failures move the message to Badmail.
fn component_failed(relay: &Relay, control: &mut Control, error: &str, now_ms: u64) -> Attempt {
    let id = control.queue_id.clone();
    logging::error(&format!("{id}: {error}; the message stays queued"));
    let _ = relay.queue.clear_in_flight(&id);
    if relay.component_failed(&id) {
        let reason = Reason::new(
            &control.original_name,
            Some(&id),
            "component-failed",
            format!("the relay component failed on this message repeatedly: {error}"),
            now_ms,
        );
        return match badmail::move_to_badmail(
            &relay.mailroot,
            Folder::Queue,
            &queue::message_file(&id),
            &reason,
        ) {
            Ok(_) => finish(&relay.spool(), control),
            Err(e) => {
                logging::error(&format!("{id}: cannot move to Badmail: {e}"));
                Attempt::Error
            }
        };
    }
    control.next_attempt_ms = now_ms.saturating_add(duration_ms(COMPONENT_FAILURE_DELAY));
    write_control(&relay.spool(), control, Attempt::Deferred)
}

/// Every recipient is final: the message leaves the queue.
fn finish(spool: &Spool, control: &Control) -> Attempt {
    let failed = control.recipients.iter().any(|r| r.state == State::Failed);
    if let Err(e) = spool.queue.remove(&control.queue_id) {
        logging::error(&format!(
            "{}: cannot remove the queue files: {e}",
            control.queue_id
        ));
        return Attempt::Error;
    }
    logging::info(&format!("{}: removed", control.queue_id));
    if failed {
        Attempt::Failed
    } else {
        Attempt::Delivered
    }
}

/// Queue a DSN from the null sender to `to`; returns its queue id.
pub(crate) fn queue_notice(spool: &Spool, about: &str, to: &str, dsn: &[u8]) -> Option<String> {
    let now_ms = spool.clock.now_ms();
    let queue_id = queue::new_queue_id(now_ms);
    let control = Control {
        queue_id: queue_id.clone(),
        original_name: format!("{about}.dsn"),
        sender: String::new(),
        recipients: vec![Recipient {
            address: to.to_string(),
            state: State::Pending,
            status: None,
            last_reply: None,
            remote_mta: None,
        }],
        attempts: 0,
        first_seen_ms: now_ms,
        next_attempt_ms: now_ms,
        delay_notice_sent: false,
    };
    match spool.queue.commit(&control, dsn) {
        Ok(()) => {
            logging::info(&format!(
                "{queue_id}: from=<> to=<{to}> size={} (delivery status notification for {about})",
                dsn.len()
            ));
            Some(queue_id)
        }
        Err(e) => {
            logging::error(&format!("cannot queue the DSN for {about} to <{to}>: {e}"));
            None
        }
    }
}

/// Put a copy of the message in Badmail with the recipients that failed in
/// this attempt and their replies. A copy, not a move: other recipients may
/// still be pending.
fn copy_failed_to_badmail(
    spool: &Spool,
    control: &Control,
    reason_text: String,
    offered: &[String],
    now_ms: u64,
) {
    let id = &control.queue_id;
    let failed: Vec<&Recipient> = control
        .recipients
        .iter()
        .filter(|r| r.state == State::Failed && offered.contains(&r.address))
        .collect();
    let mut reason = Reason::new(
        &control.original_name,
        Some(id),
        "delivery-failed",
        reason_text,
        now_ms,
    );
    reason.sender = Some(control.sender.clone());
    reason.recipients = failed
        .iter()
        .map(|r| FailedRecipient {
            address: r.address.clone(),
            status: r.status.clone().unwrap_or_default(),
            reply: r.last_reply.clone().unwrap_or_default(),
            remote_mta: r.remote_mta.clone(),
        })
        .collect();
    let message = spool
        .mailroot
        .read(Folder::Queue, &queue::message_file(id), u64::MAX);
    let copied = message
        .map_err(std::io::Error::other)
        .and_then(|m| badmail::copy_to_badmail(&spool.mailroot, &m, &reason));
    match copied {
        Ok(path) => logging::warn(&format!(
            "{id}: {} (copy in {})",
            reason.reason,
            path.display()
        )),
        Err(e) => logging::error(&format!(
            "{id}: {}; the Badmail copy failed: {e}",
            reason.reason
        )),
    }
}
