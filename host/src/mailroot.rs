//! The mailroot folders (the IIS layout): `Pickup`, `Queue`, `Badmail`, `Drop`.
//!
//! Every path is built from the root and a plain file name checked by
//! [`valid_file_name`]; files are opened with `O_NOFOLLOW` and only regular
//! files are listed, so nothing outside the root is reachable through a name
//! or a symbolic link. This module also implements the `folders` import.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use crate::runtime::HostState;
use crate::runtime::bindings::mailroot::relay::folders;

/// One folder of the mailroot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Folder {
    /// Applications drop message files here.
    Pickup,
    /// Claimed and accepted messages waiting for delivery.
    Queue,
    /// Rejected and undeliverable messages, each with a reason file.
    Badmail,
    /// Mail for local domains, written as files.
    Drop,
}

impl Folder {
    /// Every folder, in the order they are created.
    pub const ALL: [Folder; 4] = [Folder::Pickup, Folder::Queue, Folder::Badmail, Folder::Drop];

    /// The folder's name under the root.
    pub fn name(self) -> &'static str {
        match self {
            Folder::Pickup => "Pickup",
            Folder::Queue => "Queue",
            Folder::Badmail => "Badmail",
            Folder::Drop => "Drop",
        }
    }
}

/// A file found by [`Mailroot::scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub size: u64,
    pub modified_ms: u64,
}

/// A folder being listed (see [`Mailroot::list`]).
#[derive(Debug)]
pub struct Listing {
    dir: fs::ReadDir,
}

impl Listing {
    /// The next regular files, at most `max`, without hidden and `.tmp`
    /// files, oldest first within the slice; empty at the end. Files
    /// renamed away meanwhile may still be listed, and files added may be
    /// missed (readdir(3)); a later listing finds those.
    pub fn next_slice(&mut self, max: usize) -> io::Result<Vec<Entry>> {
        let mut entries = Vec::new();
        while entries.len() < max {
            let Some(dirent) = self.dir.next() else {
                break;
            };
            let dirent = dirent?;
            let Ok(name) = dirent.file_name().into_string() else {
                continue;
            };
            if is_ignored(&name) {
                continue;
            }
            // `DirEntry::metadata` does not follow symbolic links.
            let Ok(meta) = dirent.metadata() else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            let modified_ms = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            entries.push(Entry {
                name,
                size: meta.len(),
                modified_ms,
            });
        }
        entries.sort_by(|a, b| (a.modified_ms, &a.name).cmp(&(b.modified_ms, &b.name)));
        Ok(entries)
    }
}

/// Why a folder operation failed.
#[derive(Debug)]
pub enum FolderError {
    NotFound,
    InvalidName,
    TooLarge(u64),
    Io(io::Error),
}

impl std::fmt::Display for FolderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FolderError::NotFound => f.write_str("no such file"),
            FolderError::InvalidName => f.write_str("not a plain file name inside the folder"),
            FolderError::TooLarge(size) => write!(f, "the file is too large ({size} bytes)"),
            FolderError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for FolderError {}

impl From<io::Error> for FolderError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::NotFound => FolderError::NotFound,
            _ if e.raw_os_error() == Some(libc::ELOOP) => FolderError::InvalidName,
            _ => FolderError::Io(e),
        }
    }
}

/// A plain file name: not empty, no `/` or NUL, not `.`/`..`, at most 255 bytes.
pub fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0'])
}

/// Files writers are still busy with, by convention: hidden files and `*.tmp`.
pub fn is_ignored(name: &str) -> bool {
    name.starts_with('.') || name.ends_with(".tmp")
}

/// A mailroot directory.
#[derive(Debug, Clone)]
pub struct Mailroot {
    root: PathBuf,
}

impl Mailroot {
    /// Open `root`, creating it and its four folders when missing. A folder
    /// that exists as a symbolic link or a file is refused.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root)?;
        for folder in Folder::ALL {
            let path = root.join(folder.name());
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(io::Error::other(format!(
                        "{} is not a directory (symbolic links are refused)",
                        path.display()
                    )));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(&path)?,
                Err(e) => return Err(e),
            }
        }
        Ok(Mailroot { root })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of `folder`.
    pub fn dir(&self, folder: Folder) -> PathBuf {
        self.root.join(folder.name())
    }

    /// The path of `name` in `folder`, when `name` is a plain file name.
    pub fn file(&self, folder: Folder, name: &str) -> Result<PathBuf, FolderError> {
        if !valid_file_name(name) {
            return Err(FolderError::InvalidName);
        }
        Ok(self.dir(folder).join(name))
    }

    /// The regular files of `folder`, without hidden and `.tmp` files,
    /// oldest first.
    pub fn scan(&self, folder: Folder) -> io::Result<Vec<Entry>> {
        let mut entries = Vec::new();
        let mut listing = self.list(folder)?;
        loop {
            let slice = listing.next_slice(usize::MAX)?;
            if slice.is_empty() {
                break;
            }
            entries.extend(slice);
        }
        entries.sort_by(|a, b| (a.modified_ms, &a.name).cmp(&(b.modified_ms, &b.name)));
        Ok(entries)
    }

    /// A listing of `folder` read a slice at a time, for folders too large
    /// to hold in memory whole.
    pub fn list(&self, folder: Folder) -> io::Result<Listing> {
        Ok(Listing {
            dir: fs::read_dir(self.dir(folder))?,
        })
    }

    /// Open `name` in `folder` for reading, never through a symbolic link.
    pub fn open_file(&self, folder: Folder, name: &str) -> Result<File, FolderError> {
        let path = self.file(folder, name)?;
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        if !file.metadata()?.is_file() {
            return Err(FolderError::InvalidName);
        }
        Ok(file)
    }

    /// At most `max_bytes` from the start of `name` in `folder`.
    pub fn read_head(
        &self,
        folder: Folder,
        name: &str,
        max_bytes: u64,
    ) -> Result<Vec<u8>, FolderError> {
        let file = self.open_file(folder, name)?;
        let mut bytes = Vec::new();
        file.take(max_bytes).read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    /// The whole of `name` in `folder`, refused when larger than `max_bytes`.
    pub fn read(&self, folder: Folder, name: &str, max_bytes: u64) -> Result<Vec<u8>, FolderError> {
        let mut file = self.open_file(folder, name)?;
        let size = file.metadata()?.len();
        if size > max_bytes {
            return Err(FolderError::TooLarge(size));
        }
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        // `take` bounds the read even if the file grows meanwhile.
        (&mut file)
            .take(max_bytes.saturating_add(1))
            .read_to_end(&mut bytes)?;
        if bytes.len() as u64 > max_bytes {
            return Err(FolderError::TooLarge(bytes.len() as u64));
        }
        Ok(bytes)
    }
}

fn folder_of(folder: folders::Folder) -> Folder {
    match folder {
        folders::Folder::Pickup => Folder::Pickup,
        folders::Folder::Queue => Folder::Queue,
        folders::Folder::Badmail => Folder::Badmail,
        folders::Folder::Drop => Folder::Drop,
    }
}

impl From<FolderError> for folders::FolderError {
    fn from(e: FolderError) -> Self {
        match e {
            FolderError::NotFound => folders::FolderError::NotFound,
            FolderError::InvalidName => folders::FolderError::InvalidName,
            FolderError::TooLarge(size) => folders::FolderError::TooLarge(size),
            FolderError::Io(e) => folders::FolderError::Io(e.to_string()),
        }
    }
}

impl HostState {
    /// A Queue file of the `deliver` call under way that is only in memory
    /// (a message fresh from pickup).
    fn staged(&self, folder: folders::Folder, name: &str) -> Option<&std::sync::Arc<[u8]>> {
        match folder {
            folders::Folder::Queue => self.recorder()?.staged(name),
            _ => None,
        }
    }
}

impl folders::Host for HostState {
    fn scan(
        &mut self,
        folder: folders::Folder,
    ) -> Result<Vec<folders::Entry>, folders::FolderError> {
        self.blocking(|state| {
            let entries = state
                .mailroot
                .scan(folder_of(folder))
                .map_err(FolderError::from)?;
            Ok(entries
                .into_iter()
                .map(|e| folders::Entry {
                    name: e.name,
                    size: e.size,
                    modified_ms: e.modified_ms,
                })
                .collect())
        })
    }

    fn read(
        &mut self,
        folder: folders::Folder,
        name: String,
    ) -> Result<Vec<u8>, folders::FolderError> {
        if let Some(staged) = self.staged(folder, &name) {
            return Ok(staged.to_vec());
        }
        self.blocking(|state| {
            Ok(state
                .mailroot
                .read(folder_of(folder), &name, state.max_read_bytes)?)
        })
    }

    fn read_head(
        &mut self,
        folder: folders::Folder,
        name: String,
        max_bytes: u64,
    ) -> Result<Vec<u8>, folders::FolderError> {
        let max_bytes = max_bytes.min(self.max_read_bytes);
        if let Some(staged) = self.staged(folder, &name) {
            let head = usize::try_from(max_bytes).unwrap_or(usize::MAX);
            return Ok(staged.get(..head).unwrap_or(staged).to_vec());
        }
        self.blocking(|state| {
            Ok(state
                .mailroot
                .read_head(folder_of(folder), &name, max_bytes)?)
        })
    }

    fn write_drop(&mut self, content: Vec<u8>) -> Result<String, folders::FolderError> {
        let name = format!("{}.eml", crate::queue::new_queue_id(self.clock.now_ms()));
        self.blocking(|state| {
            let dir = state.mailroot.dir(Folder::Drop);
            crate::queue::write_atomic(&dir, &name, &content)
                .and_then(|()| crate::queue::sync_dir(&dir))
                .map_err(FolderError::from)?;
            Ok(name)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_confined_to_the_folder() {
        assert!(valid_file_name("message.eml"));
        for bad in ["", ".", "..", "../x", "a/b", "x\0y"] {
            assert!(!valid_file_name(bad), "{bad:?}");
        }
        assert!(is_ignored(".hidden") && is_ignored("half.tmp") && !is_ignored("done.eml"));
    }

    #[test]
    fn symbolic_links_are_not_followed() {
        let dir = std::env::temp_dir().join(format!("mailroot-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let root = Mailroot::open(&dir).unwrap();
        let secret = dir.join("secret.txt");
        fs::write(&secret, b"outside").unwrap();
        std::os::unix::fs::symlink(&secret, root.dir(Folder::Pickup).join("link.eml")).unwrap();
        fs::write(root.dir(Folder::Pickup).join("real.eml"), b"x").unwrap();
        let names: Vec<String> = root
            .scan(Folder::Pickup)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, vec!["real.eml"]);
        assert!(matches!(
            root.read(Folder::Pickup, "link.eml", 100),
            Err(FolderError::InvalidName)
        ));
        assert!(matches!(
            root.read(Folder::Pickup, "../secret.txt", 100),
            Err(FolderError::InvalidName)
        ));
        assert!(matches!(
            root.read(Folder::Pickup, "real.eml", 0),
            Err(FolderError::TooLarge(1))
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
