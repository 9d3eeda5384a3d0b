//! The delivery stage (Postfix's qmgr and smtp): one attempt for the pending
//! recipients of a queued message, and the bookkeeping of the outcome.
//!
//! The component decides what each reply means; the host records it. A
//! recipient that was delivered is never offered again. Recipients that
//! failed permanently are reported in Badmail with the server's reply; the
//! others wait `retry_delay` for the next attempt.

use crate::badmail::{self, FailedRecipient, Reason};
use crate::logging;
use crate::mailroot::Folder;
use crate::queue::{self, Control, State};
use crate::relay::Relay;
use crate::runtime::bindings::exports::mailroot::relay::stages::RecipientResult;

/// What one attempt did to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Not due yet.
    NotDue,
    /// Every recipient delivered; the message left the queue.
    Delivered,
    /// Every recipient is final and some failed: reported in Badmail.
    Failed,
    /// Some recipients wait for another attempt.
    Deferred,
    /// The queue files could not be read or written.
    Error,
}

/// Attempt delivery of `queue_id` if it is due (or if `force`).
pub fn attempt_delivery(relay: &Relay, queue_id: &str, force: bool) -> Attempt {
    let mut control = match relay.queue.load(queue_id) {
        Ok(control) => control,
        Err(e) => {
            logging::error(&format!("{queue_id}: cannot read the control file: {e}"));
            return Attempt::Error;
        }
    };
    let now_ms = relay.clock.now_ms();
    if !force && control.next_attempt_ms > now_ms {
        return Attempt::NotDue;
    }
    let pending = control.pending();
    if pending.is_empty() {
        return finish(relay, &control);
    }
    let file = queue::message_file(queue_id);
    let outcomes =
        match relay
            .runtime
            .deliver(&file, queue_id, &control.sender, &pending, &relay.options)
        {
            Ok(outcomes) => outcomes,
            Err(e) => {
                logging::error(&format!("{queue_id}: {e}; the message stays queued"));
                if relay.component_failed(queue_id) {
                    let reason = Reason::new(
                        &control.original_name,
                        Some(queue_id),
                        "component-failed",
                        format!("the relay component failed on this message repeatedly: {e}"),
                        now_ms,
                    );
                    return match badmail::move_to_badmail(
                        &relay.mailroot,
                        Folder::Queue,
                        &file,
                        &reason,
                    ) {
                        Ok(_) => finish(relay, &control),
                        Err(e) => {
                            logging::error(&format!("{queue_id}: cannot move to Badmail: {e}"));
                            Attempt::Error
                        }
                    };
                }
                return reschedule(relay, &mut control, now_ms);
            }
        };
    let mut failed_now = Vec::new();
    for outcome in outcomes {
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
                    failed_now.push(recipient.clone());
                }
            }
        }
    }
    control.attempts = control.attempts.saturating_add(1);
    if !failed_now.is_empty() {
        report_failures(relay, &control, &failed_now, now_ms);
    }
    if control.pending().is_empty() {
        return finish(relay, &control);
    }
    reschedule(relay, &mut control, now_ms)
}

fn reschedule(relay: &Relay, control: &mut Control, now_ms: u64) -> Attempt {
    let delay = u64::try_from(relay.settings.retry_delay.as_millis()).unwrap_or(u64::MAX);
    control.next_attempt_ms = now_ms.saturating_add(delay);
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
    match relay.queue.write_control(control) {
        Ok(()) => Attempt::Deferred,
        Err(e) => {
            logging::error(&format!(
                "{}: cannot update the control file: {e}",
                control.queue_id
            ));
            Attempt::Error
        }
    }
}

/// Every recipient is final: the message leaves the queue.
fn finish(relay: &Relay, control: &Control) -> Attempt {
    let failed = control.recipients.iter().any(|r| r.state == State::Failed);
    if let Err(e) = relay.queue.remove(&control.queue_id) {
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

/// Put a copy of the message in Badmail with the failed recipients and their
/// replies. A copy, not a move: other recipients may still be pending, and a
/// crash before the control file is updated only repeats the report.
fn report_failures(relay: &Relay, control: &Control, failed: &[queue::Recipient], now_ms: u64) {
    let id = &control.queue_id;
    let summary: Vec<String> = failed
        .iter()
        .map(|r| {
            format!(
                "<{}>: {}",
                r.address,
                r.last_reply.as_deref().unwrap_or("failed")
            )
        })
        .collect();
    let mut reason = Reason::new(
        &control.original_name,
        Some(id),
        "delivery-failed",
        format!(
            "delivery failed permanently for {} recipient(s): {}",
            failed.len(),
            summary.join("; ")
        ),
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
    let message = relay
        .mailroot
        .read(Folder::Queue, &queue::message_file(id), u64::MAX);
    let copied = message
        .map_err(std::io::Error::other)
        .and_then(|m| badmail::copy_to_badmail(&relay.mailroot, &m, &reason));
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
