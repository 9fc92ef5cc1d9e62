//! The backup file format, shared by the CLI that writes backups (`raftpg backup`) and the node
//! that is seeded from one (`raftpg-node --restore-from`).
//!
//! A backup file is a fixed-size header block followed by the archive:
//!
//! ```text
//! RAFTPG-BACKUP 1\n                 magic line (16 bytes)
//! {"format":1,...}   \n            BackupHeader as JSON, padded with spaces to HEADER_BYTES
//! <pg_dump custom-format archive>  the user database at header.log_index
//! ```
//!
//! The header is human-readable (`head -c 4096 FILE`). It is written last: a writer reserves
//! the block, streams the archive while hashing it, checks the SHA-256 against the one the node
//! sent, and only then fills in the header and renames the file into place. A file with a
//! blank header block is therefore an unfinished backup; a file whose archive does not hash to
//! `header.sha256` is corrupt. Both are refused when read.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The first line of every backup file.
pub const MAGIC: &[u8] = b"RAFTPG-BACKUP 1\n";

/// Size of the header block (magic line included); the archive starts at this offset.
pub const HEADER_BYTES: usize = 4096;

/// The version of this format.
pub const FORMAT: u32 = 1;

/// What a backup holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupHeader {
    /// [`FORMAT`].
    pub format: u32,
    /// The node that made the copy.
    pub node_id: u64,
    /// The log position the copy corresponds to: every entry up to `log_index` is in it, no
    /// later one. `log_term` and `log_leader` complete the Raft log id.
    pub log_index: u64,
    pub log_term: u64,
    pub log_leader: u64,
    /// The voters of the cluster when the copy was made (informational).
    pub voters: Vec<u64>,
    /// `server_version_num` of the PostgreSQL that made the archive (pg_restore of a newer
    /// major version can read it, an older one cannot).
    pub postgres_version_num: u32,
    /// When the node made the copy (milliseconds since the Unix epoch).
    pub created_unix_ms: u64,
    /// Size of the archive in bytes.
    pub bytes: u64,
    /// SHA-256 of the archive, hex (filled in by the writer once the node's checksum matched).
    #[serde(default)]
    pub sha256: String,
}

/// Why a backup could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a raftpg backup ({why})")]
    NotABackup { path: PathBuf, why: String },
    #[error("{path} is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("the backup stream is corrupt: {0}")]
    Stream(String),
}

/// SHA-256 as lowercase hex.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A SHA-256 computed over data as it passes.
#[derive(Default, Clone)]
pub struct Checksum(Sha256);

impl Checksum {
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The hex digest of everything passed so far.
    pub fn hex(&self) -> String {
        hex(&self.0.clone().finalize())
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a backup file: [`BackupWriter::create`], [`BackupWriter::write`] the archive as it
/// arrives, then [`BackupWriter::finish`]. Until `finish` the data is in `<path>.partial`;
/// dropping an unfinished writer removes it.
pub struct BackupWriter {
    path: PathBuf,
    partial: PathBuf,
    file: Option<File>,
    sum: Checksum,
    bytes: u64,
}

impl BackupWriter {
    /// Starts `path` (written as `<path>.partial` until finished).
    pub fn create(path: &Path) -> Result<Self, BackupError> {
        let mut name = path.as_os_str().to_owned();
        name.push(".partial");
        let partial = PathBuf::from(name);
        let mut file = File::create(&partial).map_err(io(&partial))?;
        file.write_all(&[b'\n'; HEADER_BYTES])
            .map_err(io(&partial))?;
        Ok(BackupWriter {
            path: path.to_path_buf(),
            partial,
            file: Some(file),
            sum: Checksum::default(),
            bytes: 0,
        })
    }

    /// Appends a piece of the archive.
    pub fn write(&mut self, data: &[u8]) -> Result<(), BackupError> {
        let file = self.file.as_mut().expect("not finished");
        file.write_all(data).map_err(io(&self.partial))?;
        self.sum.update(data);
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// Bytes of archive written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Checks the archive against the header's size and the node's checksum `sha256`, writes
    /// the header, syncs and renames the file into place. Returns the header as written.
    pub fn finish(
        mut self,
        mut header: BackupHeader,
        sha256: &str,
    ) -> Result<BackupHeader, BackupError> {
        let got = self.sum.hex();
        if got != sha256 {
            return Err(BackupError::Stream(format!(
                "the archive received hashes to {got}, the node sent {sha256}"
            )));
        }
        if self.bytes != header.bytes {
            return Err(BackupError::Stream(format!(
                "received {} bytes of archive, the node announced {}",
                self.bytes, header.bytes
            )));
        }
        header.sha256 = got;
        let block = header_block(&header).map_err(BackupError::Stream)?;
        let mut file = self.file.take().expect("not finished");
        file.seek(SeekFrom::Start(0)).map_err(io(&self.partial))?;
        file.write_all(&block).map_err(io(&self.partial))?;
        file.sync_all().map_err(io(&self.partial))?;
        drop(file);
        std::fs::rename(&self.partial, &self.path).map_err(io(&self.path))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(header)
    }
}

impl Drop for BackupWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// The header block of `header`: magic line, JSON, padding.
fn header_block(header: &BackupHeader) -> Result<Vec<u8>, String> {
    let json = serde_json::to_vec(header).map_err(|e| e.to_string())?;
    let mut block = MAGIC.to_vec();
    block.extend_from_slice(&json);
    if block.len() + 1 > HEADER_BYTES {
        return Err(format!(
            "the header ({} bytes) does not fit in {HEADER_BYTES}",
            block.len()
        ));
    }
    block.resize(HEADER_BYTES - 1, b' ');
    block.push(b'\n');
    Ok(block)
}

/// Reads the header of the backup at `path` (without checking the archive).
pub fn read_header(path: &Path) -> Result<BackupHeader, BackupError> {
    let mut file = File::open(path).map_err(io(path))?;
    read_header_from(path, &mut file)
}

fn read_header_from(path: &Path, file: &mut File) -> Result<BackupHeader, BackupError> {
    let mut block = vec![0u8; HEADER_BYTES];
    let not_a_backup = |why: &str| BackupError::NotABackup {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    file.read_exact(&mut block)
        .map_err(|_| not_a_backup("shorter than its header"))?;
    if block.iter().all(|b| *b == b'\n') {
        return Err(BackupError::Corrupt {
            path: path.to_path_buf(),
            why: "its header was never written (an unfinished backup)".into(),
        });
    }
    if !block.starts_with(MAGIC) {
        return Err(not_a_backup("no RAFTPG-BACKUP 1 line"));
    }
    let json = std::str::from_utf8(&block[MAGIC.len()..])
        .map_err(|_| not_a_backup("the header is not text"))?
        .trim_end();
    let header: BackupHeader =
        serde_json::from_str(json).map_err(|e| not_a_backup(&format!("unreadable header: {e}")))?;
    if header.format != FORMAT {
        return Err(not_a_backup(&format!(
            "format {} (this raftpg reads format {FORMAT})",
            header.format
        )));
    }
    Ok(header)
}

/// Reads the whole backup at `path`, checks its size and checksum, and copies the archive to
/// `archive_to` when given. Returns the header.
pub fn verify(path: &Path, archive_to: Option<&Path>) -> Result<BackupHeader, BackupError> {
    let mut file = File::open(path).map_err(io(path))?;
    let header = read_header_from(path, &mut file)?;
    let mut out = match archive_to {
        Some(p) => Some((File::create(p).map_err(io(p))?, p)),
        None => None,
    };
    let mut sum = Checksum::default();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        sum.update(&buf[..n]);
        bytes += n as u64;
        if let Some((f, p)) = out.as_mut() {
            f.write_all(&buf[..n]).map_err(io(p))?;
        }
    }
    let corrupt = |why: String| BackupError::Corrupt {
        path: path.to_path_buf(),
        why,
    };
    if bytes != header.bytes {
        return Err(corrupt(format!(
            "{bytes} bytes of archive, the header says {}",
            header.bytes
        )));
    }
    let got = sum.hex();
    if got != header.sha256 {
        return Err(corrupt(format!(
            "the archive hashes to {got}, the header says {}",
            header.sha256
        )));
    }
    if let Some((f, p)) = out {
        f.sync_all().map_err(io(p))?;
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(bytes: u64) -> BackupHeader {
        BackupHeader {
            format: FORMAT,
            node_id: 2,
            log_index: 42,
            log_term: 3,
            log_leader: 1,
            voters: vec![1, 2, 3],
            postgres_version_num: 150_018,
            created_unix_ms: 1,
            bytes,
            sha256: String::new(),
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("raftpg-backup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    #[test]
    fn a_written_backup_verifies_and_a_flipped_byte_does_not() {
        let path = scratch("ok.backup");
        let data = b"PGDMP pretend archive".repeat(1000);
        let mut w = BackupWriter::create(&path).unwrap();
        for piece in data.chunks(777) {
            w.write(piece).unwrap();
        }
        let mut sum = Checksum::default();
        sum.update(&data);
        let written = w.finish(header(data.len() as u64), &sum.hex()).unwrap();
        let copy = scratch("ok.archive");
        assert_eq!(verify(&path, Some(&copy)).unwrap(), written);
        assert_eq!(std::fs::read(&copy).unwrap(), data);
        assert_eq!(read_header(&path).unwrap().log_index, 42);

        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_BYTES + 5] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            verify(&path, None),
            Err(BackupError::Corrupt { .. })
        ));
        std::fs::write(&path, b"hello").unwrap();
        assert!(matches!(
            read_header(&path),
            Err(BackupError::NotABackup { .. })
        ));
    }

    #[test]
    fn a_stream_that_does_not_match_the_nodes_checksum_leaves_no_file() {
        let path = scratch("bad.backup");
        let mut w = BackupWriter::create(&path).unwrap();
        w.write(b"abc").unwrap();
        let e = w.finish(header(3), "00").unwrap_err();
        assert!(matches!(e, BackupError::Stream(_)), "{e}");
        assert!(!path.exists());
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        assert!(!PathBuf::from(partial).exists());
    }
}
