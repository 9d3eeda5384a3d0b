//! The pickup stage: claim finished files from Pickup by an atomic rename
//! into the queue, then let the component accept them (Postfix's pickup and
//! cleanup).
//!
//! A file is left alone while it is still being written: when it changed
//! within the settle time, or when another process holds it open for
//! writing (detected with a Linux read lease, which the kernel refuses while
//! any writer has the file open). Writers that write then rename, or use
//! hidden or `.tmp` names meanwhile, never race with the relay.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use crate::badmail::{self, Reason};
use crate::logging;
use crate::mailroot::{Entry, Folder};
use crate::queue::{self, Control, Recipient, State, new_queue_id, sync_dir};
use crate::relay::Relay;

/// A pickup file moved into the queue, not yet accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub queue_id: String,
    /// The name it had in Pickup.
    pub original: String,
    /// Its name in the Queue folder.
    pub file: String,
}

impl Claimed {
    /// A claimed file found in the queue (left by a crash or claimed earlier).
    pub fn from_queue_name(file: &str) -> Option<Self> {
        let (queue_id, original) = queue::parse_claimed(file)?;
        Some(Claimed {
            queue_id,
            original,
            file: file.to_string(),
        })
    }
}

/// True when some process has `file` open for writing. Filesystems without
/// lease support answer as if nobody had: the settle time still applies.
fn open_for_writing_elsewhere(file: &File) -> bool {
    // SAFETY: fcntl on a descriptor we own; F_SETLEASE takes an int argument.
    let taken = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
    if taken == 0 {
        // SAFETY: as above; releasing the lease we just took.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
        return false;
    }
    io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN)
}

/// Claim every finished file in Pickup.
pub fn claim_pickup_files(relay: &Relay) -> io::Result<Vec<Claimed>> {
    let mailroot = &relay.mailroot;
    let now_ms = relay.clock.now_ms();
    let settle_ms = u64::try_from(relay.settings.settle_time.as_millis()).unwrap_or(u64::MAX);
    let mut claimed = Vec::new();
    for entry in mailroot.scan(Folder::Pickup)? {
        if entry.modified_ms.saturating_add(settle_ms) > now_ms {
            continue;
        }
        match claim_one(relay, &entry, now_ms) {
            Ok(Some(c)) => claimed.push(c),
            Ok(None) => {}
            Err(e) => logging::warn(&format!("cannot claim Pickup/{}: {e}", entry.name)),
        }
    }
    if !claimed.is_empty() {
        sync_dir(&mailroot.dir(Folder::Queue))?;
        sync_dir(&mailroot.dir(Folder::Pickup))?;
    }
    Ok(claimed)
}

fn claim_one(relay: &Relay, entry: &Entry, now_ms: u64) -> io::Result<Option<Claimed>> {
    let mailroot = &relay.mailroot;
    let source = mailroot
        .file(Folder::Pickup, &entry.name)
        .map_err(io::Error::other)?;
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&source)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if open_for_writing_elsewhere(&file) {
        logging::debug(&format!(
            "Pickup/{} is still open for writing; left for later",
            entry.name
        ));
        return Ok(None);
    }
    let queue_id = new_queue_id(now_ms);
    let name = queue::claimed_file(&queue_id, &entry.name);
    match fs::rename(&source, mailroot.dir(Folder::Queue).join(&name)) {
        // Another relay on the same mailroot was faster.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
        Ok(()) => {
            logging::info(&format!(
                "{queue_id}: claimed Pickup/{} ({} bytes)",
                entry.name, entry.size
            ));
            Ok(Some(Claimed {
                queue_id,
                original: entry.name.clone(),
                file: name,
            }))
        }
    }
}

/// What became of a claimed file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acceptance {
    /// Committed to the queue.
    Queued,
    /// Refused: now in Badmail.
    Rejected,
    /// Left in place for the next pass.
    Retry,
}

/// Let the component accept a claimed file; commit it, or send it to Badmail.
/// A claimed file after the component looked at it.
enum Prepared {
    /// Rejected, or left for later.
    Done(Acceptance),
    /// Ready to commit: its control record and its cleaned message.
    Ready(Control, Vec<u8>),
}

/// Accept a chunk of claimed files and commit the accepted ones together:
/// one filesystem sync for the chunk instead of three fsyncs per message
/// (group commit, as databases do).
pub fn accept_claimed(relay: &Relay, chunk: &[Claimed]) -> Vec<Acceptance> {
    let mut results = Vec::with_capacity(chunk.len());
    let mut ready = Vec::new();
    for claimed in chunk {
        match prepare(relay, claimed) {
            Prepared::Done(acceptance) => results.push(acceptance),
            Prepared::Ready(control, message) => ready.push((claimed, control, message)),
        }
    }
    if ready.is_empty() {
        return results;
    }
    let entries: Vec<(&Control, &[u8])> = ready
        .iter()
        .map(|(_, control, message)| (control, message.as_slice()))
        .collect();
    if let Err(e) = relay.queue.commit_batch(&entries) {
        logging::error(&format!(
            "cannot write the queue files of {} messages: {e}; will try again",
            ready.len()
        ));
        results.extend(ready.iter().map(|_| Acceptance::Retry));
        return results;
    }
    for (claimed, control, message) in ready {
        let id = &control.queue_id;
        if let Err(e) = relay
            .queue
            .remove_claimed(&claimed.file)
            .and_then(|()| relay.queue.clear_component_failures(id))
        {
            logging::warn(&format!(
                "{id}: committed, but {} is left behind: {e}",
                claimed.file
            ));
        }
        logging::info(&format!(
            "{id}: from=<{}> nrcpt={} size={}",
            control.sender,
            control.recipients.len(),
            message.len()
        ));
        results.push(Acceptance::Queued);
    }
    results
}

fn prepare(relay: &Relay, claimed: &Claimed) -> Prepared {
    let now_ms = relay.clock.now_ms();
    let id = &claimed.queue_id;
    let rejected = |code: &str, text: String| {
        logging::warn(&format!(
            "{id}: Pickup/{} rejected ({code}): {text}",
            claimed.original
        ));
        let reason = Reason::new(&claimed.original, Some(id), code, text, now_ms);
        match badmail::move_to_badmail(&relay.mailroot, Folder::Queue, &claimed.file, &reason) {
            Ok(_) => {
                let _ = relay.queue.clear_component_failures(id);
                Prepared::Done(Acceptance::Rejected)
            }
            Err(e) => {
                logging::error(&format!(
                    "{id}: cannot move to Badmail, kept in the queue: {e}"
                ));
                Prepared::Done(Acceptance::Retry)
            }
        }
    };
    if relay.queue.is_committed(id) {
        // Committed before the relay stopped; only the claimed file was left.
        return match relay.queue.remove_claimed(&claimed.file) {
            Ok(()) => Prepared::Done(Acceptance::Queued),
            Err(e) => {
                logging::error(&format!("{id}: cannot remove {}: {e}", claimed.file));
                Prepared::Done(Acceptance::Retry)
            }
        };
    }
    let accepted = match relay.runtime.accept(&claimed.file, id, &relay.options) {
        Err(e) => {
            logging::error(&format!("{id}: {e}; the file stays queued"));
            if relay.component_failed(id) {
                return rejected(
                    "component-failed",
                    format!("the relay component failed on this message repeatedly: {e}"),
                );
            }
            return Prepared::Done(Acceptance::Retry);
        }
        Ok(Err(rejection)) if rejection.temporary => {
            logging::warn(&format!("{id}: {}; will try again", rejection.text));
            return Prepared::Done(Acceptance::Retry);
        }
        Ok(Err(rejection)) => {
            if let Some(notice) = &rejection.notice {
                crate::delivery::queue_notice(
                    &relay.spool(),
                    &claimed.original,
                    &notice.recipient,
                    &notice.message,
                );
            }
            return rejected(&rejection.code, rejection.text);
        }
        Ok(Ok(accepted)) => accepted,
    };
    for warning in &accepted.warnings {
        logging::info(&format!("{id}: {warning}"));
    }
    let control = Control {
        delay_notice_sent: false,
        queue_id: id.clone(),
        original_name: claimed.original.clone(),
        sender: accepted.envelope.sender.clone(),
        recipients: accepted
            .envelope
            .recipients
            .iter()
            .map(|address| Recipient {
                address: address.clone(),
                state: State::Pending,
                status: None,
                last_reply: None,
                remote_mta: None,
            })
            .collect(),
        attempts: 0,
        first_seen_ms: now_ms,
        next_attempt_ms: now_ms,
    };
    Prepared::Ready(control, accepted.message)
}
