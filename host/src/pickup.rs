//! The pickup stage: claim finished files from Pickup by an atomic rename
//! into the queue, then let the component accept them (Postfix's pickup and
//! cleanup), and hand the accepted messages to the active queue.
//!
//! A file is left alone while it is still being written: when it changed
//! within the settle time, or when another process holds it open for
//! writing (detected with a Linux read lease, which the kernel refuses while
//! any writer has the file open). Writers that write then rename, or use
//! hidden or `.tmp` names meanwhile, never race with the relay.
//!
//! Pickup is read a slice at a time and claimed a chunk at a time, and the
//! active queue makes the stage wait when it is full, so memory stays flat
//! whatever the backlog: 100,000 files are listed once, not held.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::badmail::{self, Reason};
use crate::delivery;
use crate::logging;
use crate::mailroot::{Entry, Folder, Listing};
use crate::qmgr::{self, ActiveQueue, Admission, Fresh, Message};
use crate::queue::{self, Control, Recipient, State, new_queue_id};
use crate::relay::Relay;
use crate::runtime::CallError;
use crate::runtime::bindings::exports::mailroot::relay::stages::{
    Accepted, ClaimedFile, Rejection,
};

/// Files claimed and accepted together: one component call, and for the
/// messages written to the queue, one filesystem sync.
const CHUNK_FILES: usize = 64;
/// Bytes claimed together at most (beyond the first file), as a share of
/// the component's memory limit: the call holds each file, its parse and
/// its cleaned copy, and every result until it returns.
const CHUNK_MEMORY_SHARE: u64 = 8;
/// Files read from the Pickup listing at a time.
const LISTING_SLICE: usize = 1024;
/// Messages up to this size are held in memory until delivered (the
/// active queue bounds how many); larger ones are written to the queue first.
const FRESH_MAX_BYTES: usize = 1 << 20;

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

/// What became of a claimed file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acceptance {
    /// Accepted: in the active queue, or committed to the queue.
    Queued,
    /// Refused: now in Badmail.
    Rejected,
    /// Left in place for a later try.
    Retry,
}

/// The pickup stage of one run: where its work comes from.
pub struct Pickup<'a> {
    relay: &'a Relay,
    active: Arc<ActiveQueue>,
    /// In serve mode, Pickup is listed again once a listing is done.
    repeat: bool,
    source: Mutex<Source>,
}

/// Work not yet taken by an accept worker.
struct Source {
    /// Claimed files found in the Queue folder: crash leftovers, and files
    /// an earlier try could not accept.
    leftovers: VecDeque<Claimed>,
    /// The listing of Pickup being worked through.
    listing: Option<Listing>,
    /// Entries read from the listing, not yet claimed.
    entries: VecDeque<Entry>,
    /// When the last listing ended (serve mode lists again a poll later).
    listed: Option<Instant>,
}

/// A chunk of work for one accept call.
enum Work {
    Leftovers(Vec<Claimed>),
    Entries(Vec<Entry>),
}

impl<'a> Pickup<'a> {
    pub fn new(relay: &'a Relay, active: Arc<ActiveQueue>, repeat: bool) -> Self {
        Pickup {
            relay,
            active,
            repeat,
            source: Mutex::new(Source {
                leftovers: VecDeque::new(),
                listing: None,
                entries: VecDeque::new(),
                listed: None,
            }),
        }
    }

    fn source(&self) -> std::sync::MutexGuard<'_, Source> {
        self.source
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Take over a claimed file of the Queue folder unless it is already
    /// being worked on; true when taken.
    pub fn add_leftover(&self, file: &str) -> bool {
        let Some(claimed) = Claimed::from_queue_name(file) else {
            return false;
        };
        if !self.active.reserve(&claimed.queue_id) {
            return false;
        }
        self.source().leftovers.push_back(claimed);
        true
    }

    /// Accept work until there is none (once), or until `stop` (serve).
    /// Returns what became of each file.
    pub fn run(&self, stop: &AtomicBool) -> Counts {
        let mut counts = Counts::default();
        while !stop.load(Ordering::Relaxed) {
            match self.next_work() {
                Some(Work::Leftovers(claimed)) => {
                    counts.add(&self.accept(&claimed));
                }
                Some(Work::Entries(entries)) => {
                    let claimed = self.claim(&entries);
                    counts.claimed += claimed.len();
                    counts.add(&self.accept(&claimed));
                }
                None if self.repeat => sleep_unless(stop, self.relay.settings.poll_interval),
                None => break,
            }
        }
        counts
    }

    /// The next chunk: leftovers first, then Pickup.
    fn next_work(&self) -> Option<Work> {
        let mut source = self.source();
        if !source.leftovers.is_empty() {
            let mut chunk = Vec::new();
            while chunk.len() < CHUNK_FILES {
                let Some(claimed) = source.leftovers.pop_front() else {
                    break;
                };
                chunk.push(claimed);
            }
            return Some(Work::Leftovers(chunk));
        }
        if source.entries.is_empty() {
            self.refill(&mut source);
        }
        let chunk_bytes =
            self.relay.settings.component_limits.memory_bytes as u64 / CHUNK_MEMORY_SHARE;
        let mut chunk = Vec::new();
        let mut bytes = 0;
        while chunk.len() < CHUNK_FILES {
            let Some(entry) = source.entries.front() else {
                break;
            };
            if !chunk.is_empty() && bytes + entry.size > chunk_bytes {
                break;
            }
            bytes += entry.size;
            if let Some(entry) = source.entries.pop_front() {
                chunk.push(entry);
            }
        }
        (!chunk.is_empty()).then_some(Work::Entries(chunk))
    }

    /// Read the next settled files of the Pickup listing, starting a new
    /// listing when none is open (once per run, or a poll after the last).
    fn refill(&self, source: &mut Source) {
        let relay = self.relay;
        let now_ms = relay.clock.now_ms();
        let settle_ms = u64::try_from(relay.settings.settle_time.as_millis()).unwrap_or(u64::MAX);
        loop {
            if source.listing.is_none() {
                let again = match source.listed {
                    None => true,
                    Some(ended) => self.repeat && ended.elapsed() >= relay.settings.poll_interval,
                };
                if !again {
                    return;
                }
                match relay.mailroot.list(Folder::Pickup) {
                    Ok(listing) => source.listing = Some(listing),
                    Err(e) => {
                        logging::error(&format!("cannot scan Pickup: {e}"));
                        source.listed = Some(Instant::now());
                        return;
                    }
                }
            }
            let Some(listing) = source.listing.as_mut() else {
                return;
            };
            let slice = match listing.next_slice(LISTING_SLICE) {
                Ok(slice) => slice,
                Err(e) => {
                    logging::error(&format!("cannot scan Pickup: {e}"));
                    Vec::new()
                }
            };
            if slice.is_empty() {
                source.listing = None;
                source.listed = Some(Instant::now());
                return;
            }
            source.entries.extend(
                slice
                    .into_iter()
                    .filter(|e| e.modified_ms.saturating_add(settle_ms) <= now_ms),
            );
            if !source.entries.is_empty() {
                return;
            }
        }
    }

    /// Claim the files of `entries` that are finished.
    ///
    /// The files are flushed to disk first, one `syncfs` for the chunk: an
    /// accepted message is delivered from its claimed file, so it must be
    /// durable before it leaves Pickup, whatever its writer did (Postfix's
    /// postdrop fsyncs every file it drops).
    fn claim(&self, entries: &[Entry]) -> Vec<Claimed> {
        let pickup = self.relay.mailroot.dir(Folder::Pickup);
        if let Err(e) = queue::sync_filesystem(&pickup) {
            logging::error(&format!(
                "cannot flush Pickup to disk: {e}; its files are left for later"
            ));
            return Vec::new();
        }
        let now_ms = self.relay.clock.now_ms();
        entries
            .iter()
            .filter_map(|entry| match claim_pickup_file(self.relay, entry, now_ms) {
                Ok(Some(claimed)) => {
                    // A fresh queue id is never taken; the reservation keeps
                    // the queue scan away from the claimed file.
                    self.active.reserve(&claimed.queue_id);
                    Some(claimed)
                }
                Ok(None) => None,
                Err(e) => {
                    logging::warn(&format!("cannot claim Pickup/{}: {e}", entry.name));
                    None
                }
            })
            .collect()
    }

    /// Accept a chunk of claimed files. Small messages go to the active
    /// queue in memory; large ones are written to the queue together (one
    /// filesystem sync, as databases commit groups) and then queued.
    fn accept(&self, chunk: &[Claimed]) -> Vec<Acceptance> {
        let relay = self.relay;
        let mut results = Vec::with_capacity(chunk.len());
        let mut fresh = Vec::new();
        let mut written = Vec::new();
        for (claimed, prepared) in chunk.iter().zip(prepare_chunk(relay, &self.active, chunk)) {
            match prepared {
                Prepared::Done(acceptance) => {
                    self.active.release(&claimed.queue_id);
                    results.push(acceptance);
                }
                Prepared::Committed(control) => {
                    if delivery::is_due(&control, relay.clock.now_ms()) {
                        let size = usize::try_from(control.size).unwrap_or(usize::MAX);
                        self.queue(control, size, None);
                    } else {
                        self.active.release(&claimed.queue_id);
                    }
                    results.push(Acceptance::Queued);
                }
                Prepared::Ready(control, message) if message.len() <= FRESH_MAX_BYTES => {
                    fresh.push((claimed, control, message))
                }
                Prepared::Ready(control, message) => written.push((claimed, control, message)),
            }
        }
        if !written.is_empty() {
            let entries: Vec<(&Control, &[u8])> = written
                .iter()
                .map(|(_, control, message)| (control, message.as_slice()))
                .collect();
            match relay.queue.commit_batch(&entries) {
                Ok(()) => {
                    for (claimed, control, message) in written {
                        if let Err(e) = relay.queue.remove_claimed(&claimed.file) {
                            logging::warn(&format!(
                                "{}: committed, but {} is left behind: {e}",
                                control.queue_id, claimed.file
                            ));
                        }
                        self.queue(control, message.len(), None);
                        results.push(Acceptance::Queued);
                    }
                }
                Err(e) => {
                    logging::error(&format!(
                        "cannot write the queue files of {} messages: {e}; will try again",
                        written.len()
                    ));
                    for (claimed, _, _) in written {
                        self.active.release(&claimed.queue_id);
                        results.push(Acceptance::Retry);
                    }
                }
            }
        }
        for (claimed, control, message) in fresh {
            let size = message.len();
            let fresh = Fresh {
                claimed: claimed.file.clone(),
                message: message.into(),
            };
            self.queue(control, size, Some(fresh));
            results.push(Acceptance::Queued);
        }
        results
    }

    fn queue(&self, control: Control, size: usize, fresh: Option<Fresh>) {
        let id = &control.queue_id;
        logging::info(&format!(
            "{id}: from=<{}> nrcpt={} size={size}",
            control.sender,
            control.recipients.len(),
        ));
        let _ = self.relay.queue.clear_component_failures(id);
        let destination = qmgr::destination(&control);
        self.active
            .push(destination, Message { control, fresh }, Admission::Reserved);
    }
}

/// What a run of the pickup stage did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub claimed: usize,
    pub queued: usize,
    pub rejected: usize,
    pub retry: usize,
}

impl Counts {
    fn add(&mut self, results: &[Acceptance]) {
        for result in results {
            match result {
                Acceptance::Queued => self.queued += 1,
                Acceptance::Rejected => self.rejected += 1,
                Acceptance::Retry => self.retry += 1,
            }
        }
    }
}

/// Sleep for `time`, waking early when `stop` is set.
pub(crate) fn sleep_unless(stop: &AtomicBool, time: Duration) {
    let until = Instant::now() + time;
    while !stop.load(Ordering::Relaxed) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
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

/// Claim one finished file of Pickup: rename it into the Queue folder under
/// a new queue id. `None` when it is still being written or already gone.
pub fn claim_pickup_file(relay: &Relay, entry: &Entry, now_ms: u64) -> io::Result<Option<Claimed>> {
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
    // The rename needs no sync of its own: until the message is delivered
    // or committed, the file is in Pickup or in Queue, whichever the disk
    // kept, and is found again either way.
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

/// A claimed file after the component looked at it.
enum Prepared {
    /// Rejected, or left for later.
    Done(Acceptance),
    /// Committed before the relay stopped; only the claimed file was left.
    Committed(Control),
    /// Accepted: its control record and its cleaned message.
    Ready(Control, Vec<u8>),
}

/// The component's verdicts on a chunk of claimed files, in order: one
/// call for the chunk, and one call per file when that call fails, so that
/// a file that makes the component fail is found and counted alone.
fn prepare_chunk(relay: &Relay, active: &ActiveQueue, chunk: &[Claimed]) -> Vec<Prepared> {
    let mut prepared: Vec<Option<Prepared>> = chunk
        .iter()
        .map(|claimed| take_over_committed(relay, claimed))
        .collect();
    let (indexes, files): (Vec<usize>, Vec<ClaimedFile>) = chunk
        .iter()
        .enumerate()
        .filter(|(index, _)| prepared.get(*index).is_some_and(Option::is_none))
        .map(|(index, claimed)| {
            let file = ClaimedFile {
                file: claimed.file.clone(),
                queue_id: claimed.queue_id.clone(),
            };
            (index, file)
        })
        .unzip();
    let verdicts = match relay.runtime.accept(&files, &relay.options) {
        Ok(verdicts) => verdicts.into_iter().map(Ok).collect(),
        Err(e) if files.len() == 1 => vec![Err(e)],
        Err(e) => {
            logging::warn(&format!(
                "the component failed on a chunk of {} files ({e}); trying them one by one",
                files.len()
            ));
            files
                .iter()
                .map(|file| {
                    relay
                        .runtime
                        .accept(std::slice::from_ref(file), &relay.options)
                        .and_then(|mut one| {
                            one.pop().ok_or_else(|| CallError::Trap("no result".into()))
                        })
                })
                .collect()
        }
    };
    for (index, verdict) in indexes.into_iter().zip(verdicts) {
        if let (Some(slot), Some(claimed)) = (prepared.get_mut(index), chunk.get(index)) {
            *slot = Some(judge(relay, active, claimed, verdict));
        }
    }
    prepared
        .into_iter()
        .map(|p| p.unwrap_or(Prepared::Done(Acceptance::Retry)))
        .collect()
}

/// A claimed file whose message was committed before the relay stopped:
/// only the claimed file was left. `None` for a file still to accept.
fn take_over_committed(relay: &Relay, claimed: &Claimed) -> Option<Prepared> {
    let id = &claimed.queue_id;
    if !relay.queue.is_committed(id) {
        return None;
    }
    Some(
        match relay
            .queue
            .remove_claimed(&claimed.file)
            .and_then(|()| relay.queue.load(id))
        {
            Ok(control) => Prepared::Committed(control),
            Err(e) => {
                logging::error(&format!("{id}: cannot take over {}: {e}", claimed.file));
                Prepared::Done(Acceptance::Retry)
            }
        },
    )
}

/// What the component's verdict on one claimed file means for it.
fn judge(
    relay: &Relay,
    active: &ActiveQueue,
    claimed: &Claimed,
    verdict: Result<Result<Accepted, Rejection>, CallError>,
) -> Prepared {
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
    let accepted = match verdict {
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
            if let Some(notice) = &rejection.notice
                && let Some(control) = delivery::queue_notice(
                    &relay.spool(),
                    &claimed.original,
                    &notice.recipient,
                    &notice.message,
                )
            {
                let destination = qmgr::destination(&control);
                let message = Message {
                    control,
                    fresh: None,
                };
                active.push(destination, message, Admission::Notice);
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
        size: accepted.message.len() as u64,
    };
    Prepared::Ready(control, accepted.message)
}
