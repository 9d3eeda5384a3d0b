//! The Badmail folder: every message the relay refuses or cannot deliver is
//! kept here as `NAME.bad`, with `NAME.reason.json` beside it saying what was
//! wrong, in words a person understands, and when (IIS keeps `.BAD` and `.BDR`).

use std::fs;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use crate::mailroot::{Folder, Mailroot};
use crate::queue::{sync_dir, write_atomic};

/// A recipient that could not be delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailedRecipient {
    pub address: String,
    pub status: String,
    /// The server's reply, or the relay's own reason.
    pub reply: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_mta: Option<String>,
}

/// The content of `NAME.reason.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reason {
    /// The file's name in Pickup.
    pub file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_id: Option<String>,
    /// Stable code: `unparseable`, `too-large`, `no-recipients`, `delivery-failed`, ...
    pub code: String,
    /// What was wrong.
    pub reason: String,
    /// When, RFC 3339 UTC.
    pub time: String,
    pub time_unix_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<FailedRecipient>,
}

impl Reason {
    /// A reason stamped with `now_ms`.
    pub fn new(
        file: &str,
        queue_id: Option<&str>,
        code: &str,
        reason: String,
        now_ms: u64,
    ) -> Self {
        Reason {
            file: file.to_string(),
            queue_id: queue_id.map(str::to_string),
            code: code.to_string(),
            reason,
            time: humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(now_ms))
                .to_string(),
            time_unix_ms: now_ms,
            sender: None,
            recipients: Vec::new(),
        }
    }
}

/// Free names `NAME.bad` and `NAME.reason.json`, numbered when taken.
fn free_names(mailroot: &Mailroot, original: &str) -> (String, String) {
    let dir = mailroot.dir(Folder::Badmail);
    let base: String = original.chars().take(200).collect();
    let base = if base.is_empty() || base.starts_with('.') {
        format!("_{base}")
    } else {
        base
    };
    for n in 0u32.. {
        let stem = if n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        };
        let bad = format!("{stem}.bad");
        let reason = format!("{stem}.reason.json");
        if !dir.join(&bad).exists() && !dir.join(&reason).exists() {
            return (bad, reason);
        }
    }
    (format!("{base}.bad"), format!("{base}.reason.json"))
}

fn write_reason(mailroot: &Mailroot, name: &str, reason: &Reason) -> io::Result<()> {
    let json = serde_json::to_vec_pretty(reason).map_err(io::Error::other)?;
    write_atomic(&mailroot.dir(Folder::Badmail), name, &json)
}

/// Move `name` of `folder` into Badmail, reason file first: a crash in
/// between leaves the message where it was, to be judged again.
pub fn move_to_badmail(
    mailroot: &Mailroot,
    folder: Folder,
    name: &str,
    reason: &Reason,
) -> io::Result<PathBuf> {
    let (bad, reason_name) = free_names(mailroot, &reason.file);
    write_reason(mailroot, &reason_name, reason)?;
    let target = mailroot.dir(Folder::Badmail).join(&bad);
    fs::rename(
        mailroot.file(folder, name).map_err(io::Error::other)?,
        &target,
    )?;
    sync_dir(&mailroot.dir(Folder::Badmail))?;
    sync_dir(&mailroot.dir(folder))?;
    Ok(target)
}

/// Write a copy of `message` into Badmail (some recipients failed, others
/// are still queued).
pub fn copy_to_badmail(
    mailroot: &Mailroot,
    message: &[u8],
    reason: &Reason,
) -> io::Result<PathBuf> {
    let (bad, reason_name) = free_names(mailroot, &reason.file);
    let dir = mailroot.dir(Folder::Badmail);
    write_reason(mailroot, &reason_name, reason)?;
    write_atomic(&dir, &bad, message)?;
    sync_dir(&dir)?;
    Ok(dir.join(bad))
}
