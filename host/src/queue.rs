//! The durable queue: the only state shared between stages.
//!
//! Each message is `Queue/ID.eml` (the cleaned message, as transmitted) plus
//! `Queue/ID.json` (the [`Control`] record: envelope, per-recipient state,
//! attempts, times). Both are written to a temporary name, fsynced, renamed
//! into place and the directory fsynced; the control file is written last,
//! so its presence is the commit point. The control file's modification time
//! is set to its next attempt, as Postfix does with its deferred queue, so
//! that the scan for due messages reads only the records that are due.
//!
//! A claimed pickup file, `Queue/ID-NAME.claimed`, exists until its message
//! is delivered or committed; after a crash it is simply accepted again.
//! `Queue/ID.inflight` lists the messages of a delivery attempt in progress.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::mailroot::{Folder, Mailroot};
use crate::runtime::HostState;
use crate::runtime::bindings::mailroot::relay::queue as queue_import;
use crate::runtime::bindings::mailroot::relay::types::{DeliveryReport, QueuedMessage};

/// Suffix of claimed, not yet accepted pickup files.
pub const CLAIMED_SUFFIX: &str = ".claimed";

/// Delivery state of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Delivered,
    Failed,
}

/// One recipient and what happened to it so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    pub address: String,
    pub state: State,
    /// Enhanced status code of the last attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// The last reply or failure text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_mta: Option<String>,
}

/// The control record of a queued message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Control {
    pub queue_id: String,
    /// The name the file had in Pickup.
    pub original_name: String,
    /// Reverse path; empty for the null sender.
    pub sender: String,
    pub recipients: Vec<Recipient>,
    pub attempts: u32,
    pub first_seen_ms: u64,
    pub next_attempt_ms: u64,
    /// The one delay notice was sent.
    #[serde(default)]
    pub delay_notice_sent: bool,
    /// Bytes of the queued message (0 in records written before it was kept).
    #[serde(default)]
    pub size: u64,
}

impl Control {
    /// Recipients still to be delivered.
    pub fn pending(&self) -> Vec<String> {
        self.recipients
            .iter()
            .filter(|r| r.state == State::Pending)
            .map(|r| r.address.clone())
            .collect()
    }
}

/// A new queue id: the time in milliseconds and a per-process sequence, as
/// 16 upper-case hex digits, so ids sort by arrival and never contain `-` or `.`.
pub fn new_queue_id(now_ms: u64) -> String {
    static SEQUENCE: AtomicU32 = AtomicU32::new(0);
    let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let mixed = (sequence ^ (std::process::id() << 12)) & 0xF_FFFF;
    format!("{:011X}{mixed:05X}", now_ms & 0xFFF_FFFF_FFFF)
}

/// File names of a queued message.
pub fn message_file(queue_id: &str) -> String {
    format!("{queue_id}.eml")
}
pub fn control_file(queue_id: &str) -> String {
    format!("{queue_id}.json")
}

/// Marks a delivery attempt in progress (see [`Queue::mark_in_flight`]).
pub fn in_flight_file(batch_id: &str) -> String {
    format!("{batch_id}.inflight")
}

/// Component failures counted for a message (see [`Queue::record_component_failure`]).
pub fn failures_file(queue_id: &str) -> String {
    format!("{queue_id}.failures")
}

/// The claimed name of a pickup file: `ID-NAME.claimed`, cut to fit 255 bytes.
pub fn claimed_file(queue_id: &str, original: &str) -> String {
    let mut name = original.to_string();
    while queue_id.len() + 1 + name.len() + CLAIMED_SUFFIX.len() > 255 {
        name.pop();
    }
    format!("{queue_id}-{name}{CLAIMED_SUFFIX}")
}

/// The queue id and original name of a claimed file name.
pub fn parse_claimed(name: &str) -> Option<(String, String)> {
    let stem = name.strip_suffix(CLAIMED_SUFFIX)?;
    let (id, original) = stem.split_once('-')?;
    Some((id.to_string(), original.to_string()))
}

/// Flush every dirty file of the filesystem that holds `dir` (syncfs(2)):
/// one journal commit for many files.
pub fn sync_filesystem(dir: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let handle = File::open(dir)?;
    // SAFETY: syncfs takes a descriptor we own and has no other effect.
    if unsafe { libc::syncfs(handle.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// fsync a directory, so that renames and unlinks in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Write `bytes` as `dir/name` atomically and durably (temp file, fsync,
/// rename); the caller fsyncs the directory once for a batch of writes.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    write_atomic_dated(dir, name, bytes, None)
}

/// [`write_atomic`], with the file's modification time set to `modified_ms`.
fn write_atomic_dated(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    modified_ms: Option<u64>,
) -> io::Result<()> {
    let temp = dir.join(format!(".{name}.tmp"));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temp)?;
    file.write_all(bytes)?;
    if let Some(ms) = modified_ms {
        file.set_modified(system_time(ms))?;
    }
    file.sync_all()?;
    fs::rename(&temp, dir.join(name))
}

fn system_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What the scan of the Queue folder finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueEntry {
    /// A committed message: its queue id, and when its next attempt is due
    /// according to its control file's modification time.
    Queued { queue_id: String, due_ms: u64 },
    /// A claimed pickup file, by its name in the Queue folder.
    Claimed(String),
}

/// The queue folder.
#[derive(Debug, Clone)]
pub struct Queue {
    mailroot: Mailroot,
}

impl Queue {
    pub fn new(mailroot: Mailroot) -> Self {
        Queue { mailroot }
    }

    fn dir(&self) -> std::path::PathBuf {
        self.mailroot.dir(Folder::Queue)
    }

    /// Commit a new message: message file first, control file last.
    ///
    /// For one message (a DSN, a fresh message deferred) an fsync of each
    /// file costs less than [`Queue::commit_batch`]'s `syncfs`, which flushes
    /// the whole filesystem and pays only when many messages share it.
    pub fn commit(&self, control: &Control, message: &[u8]) -> io::Result<()> {
        let dir = self.dir();
        write_atomic(&dir, &message_file(&control.queue_id), message)?;
        self.write_control(control)
    }

    /// Commit several new messages at once: every message file and every
    /// control record (under a temporary name) is written, one `syncfs`
    /// makes them all durable, the control records are renamed into place,
    /// and one directory fsync makes the renames durable. A crash before the
    /// last step leaves message files without control records, which the
    /// start-up clean-up removes; their claimed files are accepted again.
    pub fn commit_batch(&self, batch: &[(&Control, &[u8])]) -> io::Result<()> {
        let dir = self.dir();
        let mut renames = Vec::with_capacity(batch.len());
        for (control, message) in batch {
            fs::write(dir.join(message_file(&control.queue_id)), message)?;
            let json = serde_json::to_vec_pretty(control).map_err(io::Error::other)?;
            let name = control_file(&control.queue_id);
            let temp = dir.join(format!(".{name}.tmp"));
            fs::write(&temp, json)?;
            File::options()
                .write(true)
                .open(&temp)?
                .set_modified(system_time(control.next_attempt_ms))?;
            renames.push((temp, dir.join(name)));
        }
        sync_filesystem(&dir)?;
        for (temp, name) in renames {
            fs::rename(temp, name)?;
        }
        sync_dir(&dir)
    }

    /// Rewrite the control record after an attempt.
    pub fn write_control(&self, control: &Control) -> io::Result<()> {
        let dir = self.dir();
        let json = serde_json::to_vec_pretty(control).map_err(io::Error::other)?;
        write_atomic_dated(
            &dir,
            &control_file(&control.queue_id),
            &json,
            Some(control.next_attempt_ms),
        )?;
        sync_dir(&dir)
    }

    /// Read a control record.
    pub fn load(&self, queue_id: &str) -> io::Result<Control> {
        let bytes = self
            .mailroot
            .read(Folder::Queue, &control_file(queue_id), 16 << 20)
            .map_err(io::Error::other)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| io::Error::other(format!("{}: {e}", control_file(queue_id))))
    }

    /// Visit the committed messages and the claimed files of the Queue
    /// folder as the directory lists them, without holding the listing:
    /// memory stays flat however long the queue is.
    pub fn scan(&self, mut visit: impl FnMut(QueueEntry)) -> io::Result<()> {
        for dirent in fs::read_dir(self.dir())? {
            let dirent = dirent?;
            let Ok(name) = dirent.file_name().into_string() else {
                continue;
            };
            if let Some(id) = name.strip_suffix(".json") {
                if crate::mailroot::is_ignored(&name) {
                    continue;
                }
                // `DirEntry::metadata` does not follow symbolic links.
                let due_ms = dirent
                    .metadata()
                    .and_then(|m| m.modified())
                    .map_or(0, millis);
                visit(QueueEntry::Queued {
                    queue_id: id.to_string(),
                    due_ms,
                });
            } else if name.ends_with(CLAIMED_SUFFIX) {
                visit(QueueEntry::Claimed(name));
            }
        }
        Ok(())
    }

    /// Remove a finished message: the control file first, so a crash in
    /// between leaves an orphan message file, never a control without message.
    /// Not fsynced: should a power failure undo the removal, the message is
    /// attempted once more (a possible duplicate, never a loss).
    pub fn remove(&self, queue_id: &str) -> io::Result<()> {
        let dir = self.dir();
        remove_if_present(&dir.join(control_file(queue_id)))?;
        remove_if_present(&dir.join(message_file(queue_id)))?;
        remove_if_present(&dir.join(failures_file(queue_id)))
    }

    /// Whether `queue_id` has a committed control file.
    pub fn is_committed(&self, queue_id: &str) -> bool {
        fs::symlink_metadata(self.dir().join(control_file(queue_id))).is_ok()
    }

    /// Mark a delivery attempt in progress: `batch_id` (the queue id of its
    /// first message) names the marker, which lists the queue ids of all its
    /// messages. Not fsynced: it only has to survive the relay being killed
    /// (the page cache survives that), so that a restart can warn that
    /// recipients of this attempt may get the message twice.
    pub fn mark_in_flight<'a>(
        &self,
        batch_id: &str,
        queue_ids: impl IntoIterator<Item = &'a str>,
    ) -> io::Result<()> {
        let mut list = String::new();
        for id in queue_ids {
            list.push_str(id);
            list.push('\n');
        }
        fs::write(self.dir().join(in_flight_file(batch_id)), list)
    }

    /// The attempt is over: every report is recorded.
    pub fn clear_in_flight(&self, batch_id: &str) -> io::Result<()> {
        remove_if_present(&self.dir().join(in_flight_file(batch_id)))
    }

    /// Queue ids whose attempt was in flight when the relay stopped, and the
    /// markers that say so (remove them with [`Queue::clear_in_flight`]).
    pub fn interrupted_attempts(&self) -> io::Result<(Vec<String>, Vec<String>)> {
        let mut ids = Vec::new();
        let mut markers = Vec::new();
        for entry in fs::read_dir(self.dir())? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let Some(batch_id) = name.strip_suffix(".inflight") else {
                continue;
            };
            let list = self
                .mailroot
                .read(Folder::Queue, &name, 1 << 20)
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .unwrap_or_default();
            let listed: Vec<String> = list
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            // An empty marker (an older relay's) names its one message.
            if listed.is_empty() {
                ids.push(batch_id.to_string());
            }
            ids.extend(listed);
            markers.push(batch_id.to_string());
        }
        ids.sort();
        ids.dedup();
        Ok((ids, markers))
    }

    /// Remove what a crash can leave behind and nothing refers to: half
    /// written temporary files, message files whose control file was never
    /// committed (their claimed pickup file is accepted again, or the attempt
    /// that queued them is repeated), and stray failure counters. Run at
    /// start-up only, before any stage writes.
    pub fn remove_orphans(&self) -> io::Result<Vec<String>> {
        let dir = self.dir();
        let names: Vec<String> = fs::read_dir(&dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let has = |name: &str| names.iter().any(|n| n == name);
        let claimed_ids: Vec<String> = names
            .iter()
            .filter_map(|n| parse_claimed(n))
            .map(|(id, _)| id)
            .collect();
        let mut removed = Vec::new();
        for name in &names {
            let orphan = if name.starts_with('.') && name.ends_with(".tmp") {
                true
            } else if let Some(id) = name.strip_suffix(".eml") {
                !has(&control_file(id))
            } else if let Some(id) = name.strip_suffix(".failures") {
                !has(&control_file(id)) && !claimed_ids.iter().any(|c| c == id)
            } else {
                false
            };
            if orphan {
                remove_if_present(&dir.join(name))?;
                removed.push(name.clone());
            }
        }
        if !removed.is_empty() {
            sync_dir(&dir)?;
        }
        Ok(removed)
    }

    /// Count one more component failure (trap or CPU stop) on `queue_id`;
    /// returns the count so far. Kept on disk so that a restart does not
    /// reset it.
    pub fn record_component_failure(&self, queue_id: &str) -> io::Result<u32> {
        let name = failures_file(queue_id);
        let count = self
            .mailroot
            .read(Folder::Queue, &name, 64)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .and_then(|text| text.trim().parse::<u32>().ok())
            .unwrap_or(0)
            .saturating_add(1);
        write_atomic(&self.dir(), &name, count.to_string().as_bytes())?;
        Ok(count)
    }

    /// Forget the component failures of `queue_id`.
    pub fn clear_component_failures(&self, queue_id: &str) -> io::Result<()> {
        remove_if_present(&self.dir().join(failures_file(queue_id)))
    }

    /// Remove a claimed pickup file once its message is committed.
    /// Not fsynced: a claimed file that reappears after a power failure
    /// finds its message committed and is only removed again.
    pub fn remove_claimed(&self, claimed: &str) -> io::Result<()> {
        remove_if_present(&self.dir().join(claimed))
    }
}

/// Unlink `path` if it exists. Looking first is cheaper than it seems: an
/// unlink takes the directory's lock for writing even when the name is
/// missing, and with many workers in one Queue directory that lock is the
/// bottleneck (perf showed most system time spinning on it).
fn remove_if_present(path: &Path) -> io::Result<()> {
    if fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl queue_import::Host for HostState {
    fn record_attempt(&mut self, index: u32, report: DeliveryReport) {
        self.blocking(|state| {
            if let Some(recorder) = state.recorder_mut() {
                recorder.record(index, report);
            }
        });
    }

    fn more_messages(&mut self) -> Vec<QueuedMessage> {
        self.blocking(|state| {
            let open = state.open_connections();
            state
                .recorder_mut()
                .map(|recorder| recorder.more(open))
                .unwrap_or_default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_ids_sort_by_time_and_differ() {
        let a = new_queue_id(1_000);
        let b = new_queue_id(1_000);
        let c = new_queue_id(2_000);
        assert_ne!(a, b);
        assert!(a < c && b < c);
        assert_eq!(a.len(), 16);
        assert!(!a.contains(['-', '.']));
    }

    #[test]
    fn claimed_names_round_trip_and_fit() {
        let name = claimed_file("0123456789ABCDEF", "report-1.eml");
        assert_eq!(
            parse_claimed(&name),
            Some(("0123456789ABCDEF".into(), "report-1.eml".into()))
        );
        let long = claimed_file("0123456789ABCDEF", &"x".repeat(300));
        assert!(long.len() <= 255);
    }
}
