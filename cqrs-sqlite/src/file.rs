//! Checks of the database file before SQLite opens it, so a damaged file is refused with a
//! clear error instead of being half-read (or written to).

use std::io::Read;
use std::path::{Path, PathBuf};

use cqrs_core::StoreError;

use crate::error::SqliteError;

/// The 16 bytes every SQLite database starts with.
const MAGIC: &[u8; 16] = b"SQLite format 3\0";
/// The size of the database header.
const HEADER: usize = 100;

/// Refuses a file that is not an SQLite database, or that is shorter than its header says
/// (truncated) while no write-ahead log could complete it. A missing or empty file is fine: it
/// becomes a new database.
pub(crate) async fn check(path: &Path) -> Result<(), StoreError> {
    let owned = path.to_path_buf();
    let checked = tokio::task::spawn_blocking(move || inspect(&owned))
        .await
        .map_err(|e| StoreError::Backend(Box::new(e)))?;
    match checked {
        Ok(()) => Ok(()),
        Err(Problem::Io(error)) => Err(StoreError::Connection(Box::new(error))),
        Err(Problem::Damaged(detail)) => {
            Err(StoreError::Backend(Box::new(SqliteError::NotADatabase {
                path: path.to_path_buf(),
                detail,
            })))
        }
    }
}

enum Problem {
    Io(std::io::Error),
    Damaged(String),
}

fn inspect(path: &Path) -> Result<(), Problem> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(Problem::Io(error)),
    };
    let length = file.metadata().map_err(Problem::Io)?.len();
    if length == 0 {
        return Ok(());
    }
    let mut header = [0u8; HEADER];
    let mut read = 0;
    while read < HEADER {
        match file.read(&mut header[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(error) => return Err(Problem::Io(error)),
        }
    }
    if read < MAGIC.len() || header[..MAGIC.len()] != MAGIC[..] {
        return Err(Problem::Damaged(
            "it does not start with the SQLite header".into(),
        ));
    }
    if read < HEADER {
        return Err(Problem::Damaged(format!(
            "it is {length} bytes long, shorter than the SQLite header"
        )));
    }
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536,
        size => u64::from(size),
    };
    let pages = u64::from(u32::from_be_bytes([
        header[28], header[29], header[30], header[31],
    ]));
    // The page count is valid only when "version-valid-for" matches the change counter (always,
    // for files written by SQLite 3.7.0 and later).
    let counted = header[24..28] == header[92..96];
    let expected = page_size.saturating_mul(pages);
    if counted && length < expected && !has_wal(path) {
        return Err(Problem::Damaged(format!(
            "it is truncated: its header counts {pages} pages of {page_size} bytes \
             ({expected} bytes), but it has {length}"
        )));
    }
    Ok(())
}

/// Whether a non-empty write-ahead log sits next to the file (then it may hold pages the
/// file does not have yet, and SQLite recovers them on open).
fn has_wal(path: &Path) -> bool {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    std::fs::metadata(PathBuf::from(wal)).is_ok_and(|m| m.len() > 0)
}
