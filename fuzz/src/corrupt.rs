//! Databases as a bug, a disk or a hand could leave them, for the storage
//! targets: a real database, made once per process, with the fuzzer's
//! changes applied to a fresh copy for each input.

use std::path::{Path, PathBuf};

use crate::Bytes;

/// A scratch directory of this process for the target `name`.
pub fn scratch_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("p2pchat-fuzz-{name}-{}", std::process::id()))
}

/// Where a target makes its template database: `dir`, emptied first.
pub fn template_path(dir: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("a scratch directory");
    dir.join("template.db")
}

/// The bytes of the database at `path`, its WAL folded in, as one file.
pub fn snapshot(path: &Path) -> Vec<u8> {
    let conn = rusqlite::Connection::open(path).expect("the template");
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); PRAGMA journal_mode = DELETE;").expect("a checkpoint");
    drop(conn);
    std::fs::read(path).expect("the template's bytes")
}

/// A fresh copy of `template` in `dir`, corrupted as `input` says; `None`
/// if the corruption itself failed (nothing to test then).
pub fn corrupted_copy(template: &[u8], dir: &Path, input: &mut Bytes<'_>) -> Option<PathBuf> {
    let path = dir.join("input.db");
    let _ = std::fs::remove_file(path.with_extension("db-wal"));
    let _ = std::fs::remove_file(path.with_extension("db-shm"));
    std::fs::write(&path, template).expect("the scratch database");
    let conn = rusqlite::Connection::open(&path).expect("the scratch database opens");
    corrupt(&conn, input).ok()?;
    drop(conn);
    Some(path)
}

/// Corrupts a database as a bug, a disk or a hand could: one to four
/// changes, each moving `user_version` (back or forward), deleting a row, or
/// overwriting one cell of a row with NULL, an integer, text or a blob.
pub fn corrupt(conn: &rusqlite::Connection, input: &mut Bytes<'_>) -> rusqlite::Result<()> {
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for _ in 0..1 + input.below(4) {
        match input.byte() % 8 {
            0 => {
                let version = i64::from(input.byte()) - 4;
                conn.execute_batch(&format!("PRAGMA user_version = {version}"))?;
            }
            1 => {
                let table = &tables[input.below(tables.len())];
                let offset = input.below(8);
                conn.execute(
                    &format!("DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} LIMIT 1 OFFSET ?1)"),
                    [offset],
                )?;
            }
            _ => {
                let table = &tables[input.below(tables.len())];
                let columns: Vec<String> = conn
                    .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))?
                    .query_map([], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                if columns.is_empty() {
                    continue;
                }
                let column = &columns[input.below(columns.len())];
                let offset = input.below(8);
                let len = input.below(64);
                let bytes: Vec<u8> = (0..len).map(|_| input.byte()).collect();
                let value: rusqlite::types::Value = match input.byte() % 4 {
                    0 => rusqlite::types::Value::Null,
                    1 => rusqlite::types::Value::Integer(i64::from_le_bytes({
                        let mut b = [0u8; 8];
                        for (d, s) in b.iter_mut().zip(&bytes) {
                            *d = *s;
                        }
                        b
                    })),
                    2 => rusqlite::types::Value::Text(String::from_utf8_lossy(&bytes).into_owned()),
                    _ => rusqlite::types::Value::Blob(bytes),
                };
                // Constraint failures are what the schema is for; they are
                // not findings.
                let _ = conn.execute(
                    &format!("UPDATE {table} SET \"{column}\" = ?1 WHERE rowid IN (SELECT rowid FROM {table} LIMIT 1 OFFSET ?2)"),
                    rusqlite::params![value, offset],
                );
            }
        }
    }
    Ok(())
}
