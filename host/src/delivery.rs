//! The delivery stage (Postfix's smtp): one attempt for the pending
//! recipients of each message of a batch, and the bookkeeping of its report.
//!
//! The component decides what each reply means, when to retry, and which
//! DSNs the sender gets; the host stores the outcome, queues the DSNs as new
//! messages from the null sender, and keeps a Badmail copy of every message
//! with permanently failed recipients. A recipient that was delivered is
//! never offered again.
//!
//! A message fresh from pickup is delivered from memory: it is written to
//! the queue only when some recipient is still pending after the attempt,
//! and its claimed pickup file is removed only once it is delivered or
//! written. Most mail is delivered at the first attempt and never touches
//! the queue files; nothing is lost in between, since the claimed file
//! stays until then.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::badmail::{self, FailedRecipient, Reason};
use crate::clock::Clock;
use crate::logging;
use crate::mailroot::Folder;
use crate::mailroot::Mailroot;
use crate::qmgr::{self, ActiveQueue, Admission, Fresh, Lane, Message};
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
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

/// The queue, the folders and the clock: what recording an attempt needs.
#[derive(Clone)]
pub struct Spool {
    pub queue: Queue,
    pub mailroot: Mailroot,
    pub clock: Arc<dyn Clock>,
    /// Component failures on one message before it goes to Badmail.
    pub max_component_failures: u32,
    /// The earliest next attempt of the messages deferred since the queue
    /// was last scanned (`u64::MAX`: none), so the scan knows when to look.
    pub next_due_ms: Arc<AtomicU64>,
}

/// Messages one call takes on at most, first batch and additions together:
/// the component keeps a little state per message until the call ends.
const MAX_MESSAGES_PER_CALL: usize = 4096;
/// Bytes of messages one call takes on at most: its CPU budget covers them.
const MAX_BYTES_PER_CALL: u64 = 512 << 20;
/// A call takes on nothing new after this long: the component keeps the DNS
/// answers of a call for the call, and a fresh instance starts clean.
const MAX_CALL_AGE: Duration = Duration::from_secs(60);

/// Attempt the lanes of a batch in one component call, so that each lane's
/// messages share a connection and the lanes run concurrently; while it
/// runs, the call takes on more lanes as its own finish (up to its share of
/// the connections). Returns the attempt of every message; lanes are
/// released to `active` as their last message is recorded, and DSNs are
/// queued into it.
pub fn attempt_batch(relay: &Relay, active: &Arc<ActiveQueue>, lanes: Vec<Lane>) -> Vec<Attempt> {
    let mut recorder = Recorder {
        spool: relay.spool(),
        active: active.clone(),
        entries: Vec::new(),
        lanes: Vec::new(),
        open_lanes: 0,
        attempts: Vec::new(),
        staged: HashMap::new(),
        markers: Vec::new(),
        bytes: 0,
        started: Instant::now(),
    };
    let messages = recorder.add_lanes(lanes);
    if messages.is_empty() {
        return recorder.attempts;
    }
    let (mut recorder, outcome) = relay.runtime.deliver(&messages, &relay.options, recorder);
    let now_ms = relay.clock.now_ms();
    // Whatever the component did not report on failed with it.
    let error = match &outcome {
        Err(e) => e.to_string(),
        Ok(()) => "the component returned without reporting this message".to_string(),
    };
    for index in 0..recorder.entries.len() {
        let Some(entry) = recorder.entries.get_mut(index).and_then(Option::take) else {
            continue;
        };
        let attempt = component_failed(&recorder.spool, entry.message, &error, now_ms);
        recorder.finished(entry.lane, attempt);
    }
    for marker in &recorder.markers {
        let _ = recorder.spool.queue.clear_in_flight(marker);
    }
    recorder.attempts
}

/// A message of a batch, until its report is recorded.
struct Entry {
    message: Message,
    /// The recipients offered in this attempt.
    pending: Vec<String>,
    /// Its lane in the batch.
    lane: usize,
}

struct LaneState {
    destination: String,
    /// What the lane counts for in the active queue.
    connections: usize,
    ids: Vec<String>,
    /// Messages not yet recorded.
    left: usize,
}

/// The host's side of one `deliver` call: it hands the component its
/// messages (the first batch, then more as lanes free up), serves the fresh
/// ones from memory, stores each report as the component hands it over
/// (`queue.record-attempt`), and frees each lane's connection in the active
/// queue once its last message is recorded.
pub struct Recorder {
    spool: Spool,
    active: Arc<ActiveQueue>,
    /// By the index the component knows each message by.
    entries: Vec<Option<Entry>>,
    lanes: Vec<LaneState>,
    /// Lanes handed over and not yet done.
    open_lanes: usize,
    attempts: Vec<Attempt>,
    /// Messages only in memory, by their Queue file name, until recorded.
    staged: HashMap<String, Arc<[u8]>>,
    /// The in-flight markers written for this call.
    markers: Vec<String>,
    /// Bytes of the messages handed over.
    bytes: u64,
    started: Instant,
}

impl Recorder {
    /// Take `lanes` into the call: their messages, as the component is to
    /// get them, in the order of their indexes. A message with nothing left
    /// to offer is finished at once.
    fn add_lanes(&mut self, lanes: Vec<Lane>) -> Vec<QueuedMessage> {
        let first = self.entries.len();
        let mut lane_indexes = Vec::with_capacity(lanes.len());
        for lane in lanes {
            let lane_index = self.lanes.len();
            let ids = lane
                .messages
                .iter()
                .map(|m| m.control.queue_id.clone())
                .collect();
            self.lanes.push(LaneState {
                destination: lane.destination,
                connections: lane.connections,
                ids,
                left: 0,
            });
            self.open_lanes += 1;
            lane_indexes.push(lane_index);
            for message in lane.messages {
                if message.control.pending().is_empty() {
                    // Every recipient was final already (a crash after the last attempt).
                    let attempt = finish(&self.spool, &message.control, message.fresh.as_ref());
                    self.attempts.push(attempt);
                    continue;
                }
                if let Some(state) = self.lanes.get_mut(lane_index) {
                    state.left += 1;
                }
                if let Some(fresh) = &message.fresh {
                    self.staged.insert(
                        queue::message_file(&message.control.queue_id),
                        fresh.message.clone(),
                    );
                }
                self.bytes = self.bytes.saturating_add(message.size());
                let pending = message.control.pending();
                self.entries.push(Some(Entry {
                    message,
                    pending,
                    lane: lane_index,
                }));
            }
        }
        for lane in lane_indexes {
            self.release_if_done(lane);
        }
        let added = self.entries.get(first..).unwrap_or_default();
        let messages: Vec<QueuedMessage> = added
            .iter()
            .flatten()
            .map(|e| {
                let c = &e.message.control;
                QueuedMessage {
                    file: queue::message_file(&c.queue_id),
                    sender: c.sender.clone(),
                    recipients: e.pending.clone(),
                    state: QueueState {
                        queue_id: c.queue_id.clone(),
                        attempts: c.attempts,
                        arrival_ms: c.first_seen_ms,
                        delay_notice_sent: c.delay_notice_sent,
                    },
                }
            })
            .collect();
        if let Some(first) = messages.first() {
            let marker = first.state.queue_id.clone();
            let marked = self
                .spool
                .queue
                .mark_in_flight(&marker, messages.iter().map(|m| m.state.queue_id.as_str()));
            if let Err(e) = marked {
                logging::warn(&format!("{marker}: cannot mark the attempt in flight: {e}"));
            }
            self.markers.push(marker);
        }
        messages
    }

    /// More messages for the call (`queue.more-messages`): the lanes the
    /// active queue can spare for it now, within its share of the
    /// connections and its message budget. `open_connections` is what the
    /// call really holds: a message with recipients at several domains
    /// takes a connection for each.
    pub fn more(&mut self, open_connections: usize) -> Vec<QueuedMessage> {
        if self.entries.len() >= MAX_MESSAGES_PER_CALL
            || self.bytes >= MAX_BYTES_PER_CALL
            || self.started.elapsed() >= MAX_CALL_AGE
        {
            return Vec::new();
        }
        let lanes = self
            .active
            .more_lanes(self.open_lanes.max(open_connections));
        if lanes.is_empty() {
            return Vec::new();
        }
        self.add_lanes(lanes)
    }

    /// A message of the call that is only in memory, by its Queue file name.
    pub fn staged(&self, file: &str) -> Option<&Arc<[u8]>> {
        self.staged.get(file)
    }

    /// Store the report for message `index`; a second report for the same
    /// message, or one for no message, is ignored.
    pub fn record(&mut self, index: u32, report: DeliveryReport) {
        let index = index as usize;
        let Some(entry) = self.entries.get_mut(index).and_then(Option::take) else {
            logging::warn(&format!(
                "the component reported on message {index}, which it was not given or already reported"
            ));
            return;
        };
        self.staged
            .remove(&queue::message_file(&entry.message.control.queue_id));
        let (attempt, notices) = apply_report(&self.spool, entry.message, &entry.pending, report);
        for notice in notices {
            let destination = qmgr::destination(&notice);
            let message = Message {
                control: notice,
                fresh: None,
            };
            self.active.push(destination, message, Admission::Notice);
        }
        self.finished(entry.lane, attempt);
    }

    fn finished(&mut self, lane: usize, attempt: Attempt) {
        self.attempts.push(attempt);
        if let Some(state) = self.lanes.get_mut(lane) {
            state.left = state.left.saturating_sub(1);
        }
        self.release_if_done(lane);
    }

    fn release_if_done(&mut self, lane: usize) {
        if let Some(state) = self.lanes.get_mut(lane)
            && state.left == 0
        {
            let ids = std::mem::take(&mut state.ids);
            self.active.lane_done(
                &state.destination,
                state.connections,
                ids.iter().map(String::as_str),
            );
            // Never released twice.
            state.left = usize::MAX;
            self.open_lanes = self.open_lanes.saturating_sub(1);
        }
    }
}

/// Record what one attempt did to one message; returns the attempt and the
/// control records of the DSNs it queued.
fn apply_report(
    spool: &Spool,
    message: Message,
    pending: &[String],
    report: DeliveryReport,
) -> (Attempt, Vec<Control>) {
    let Message { mut control, fresh } = message;
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
    let notices: Vec<Control> = report
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
        copy_failed_to_badmail(spool, &control, fresh.as_ref(), reason, pending, now_ms);
    }
    let attempt = if control.pending().is_empty() {
        finish(spool, &control, fresh.as_ref())
    } else {
        let fallback = now_ms.saturating_add(duration_ms(COMPONENT_FAILURE_DELAY));
        control.next_attempt_ms = report.next_attempt_ms.unwrap_or(fallback);
        log_deferred(&control);
        keep_queued(spool, &control, fresh.as_ref())
    };
    (attempt, notices)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Store the control record of a message that stays queued. A fresh one is
/// written to the queue whole, and only then is its claimed file removed.
fn keep_queued(spool: &Spool, control: &Control, fresh: Option<&Fresh>) -> Attempt {
    let written = match fresh {
        Some(fresh) => spool
            .queue
            .commit(control, &fresh.message)
            .and_then(|()| spool.queue.remove_claimed(&fresh.claimed)),
        None => spool.queue.write_control(control),
    };
    match written {
        Ok(()) => {
            spool
                .next_due_ms
                .fetch_min(control.next_attempt_ms, Ordering::Relaxed);
            Attempt::Deferred
        }
        Err(e) => {
            logging::error(&format!(
                "{}: cannot update the queue files: {e}",
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
/// failures move the message to Badmail. A fresh message is written to the
/// queue first, so that it is kept like any other.
fn component_failed(spool: &Spool, message: Message, error: &str, now_ms: u64) -> Attempt {
    let Message { mut control, fresh } = message;
    let id = control.queue_id.clone();
    logging::error(&format!("{id}: {error}; the message stays queued"));
    let count = match spool.queue.record_component_failure(&id) {
        Ok(count) => count,
        Err(e) => {
            // A count that cannot be stored never gives up: the message
            // stays queued rather than be judged on a guess.
            logging::error(&format!("{id}: cannot record the component failure: {e}"));
            0
        }
    };
    if count >= spool.max_component_failures {
        let reason = Reason::new(
            &control.original_name,
            Some(&id),
            "component-failed",
            format!("the relay component failed on this message repeatedly: {error}"),
            now_ms,
        );
        // A fresh message still has its original: that goes to Badmail.
        let file = match &fresh {
            Some(fresh) => fresh.claimed.clone(),
            None => queue::message_file(&id),
        };
        return match badmail::move_to_badmail(&spool.mailroot, Folder::Queue, &file, &reason) {
            Ok(_) => match fresh {
                Some(_) => {
                    let _ = spool.queue.clear_component_failures(&id);
                    Attempt::Failed
                }
                None => finish(spool, &control, None),
            },
            Err(e) => {
                logging::error(&format!("{id}: cannot move to Badmail: {e}"));
                Attempt::Error
            }
        };
    }
    control.next_attempt_ms = now_ms.saturating_add(duration_ms(COMPONENT_FAILURE_DELAY));
    keep_queued(spool, &control, fresh.as_ref())
}

/// Every recipient is final: the message leaves the queue (a fresh one,
/// never written to it, only leaves its claimed file).
fn finish(spool: &Spool, control: &Control, fresh: Option<&Fresh>) -> Attempt {
    let failed = control.recipients.iter().any(|r| r.state == State::Failed);
    let removed = match fresh {
        Some(fresh) => spool
            .queue
            .remove_claimed(&fresh.claimed)
            .and_then(|()| spool.queue.clear_component_failures(&control.queue_id)),
        None => spool.queue.remove(&control.queue_id),
    };
    if let Err(e) = removed {
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

/// Queue a DSN from the null sender to `to`; returns its control record.
pub(crate) fn queue_notice(spool: &Spool, about: &str, to: &str, dsn: &[u8]) -> Option<Control> {
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
        size: dsn.len() as u64,
    };
    match spool.queue.commit(&control, dsn) {
        Ok(()) => {
            logging::info(&format!(
                "{queue_id}: from=<> to=<{to}> size={} (delivery status notification for {about})",
                dsn.len()
            ));
            Some(control)
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
    fresh: Option<&Fresh>,
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
    let copied = match fresh {
        Some(fresh) => badmail::copy_to_badmail(&spool.mailroot, &fresh.message, &reason),
        None => spool
            .mailroot
            .read(Folder::Queue, &queue::message_file(id), u64::MAX)
            .map_err(std::io::Error::other)
            .and_then(|m| badmail::copy_to_badmail(&spool.mailroot, &m, &reason)),
    };
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
