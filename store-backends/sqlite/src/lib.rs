//! `sqlite`: configuration backups in a SQLite database.
//!
//! ```toml
//! [backup]
//! store = "sqlite"
//! config = { path = "/var/lib/outpost/backup.db" }
//! ```
//!
//! One table, `outpost_generations (scope, generation, saved_unix_ms, data)`, primary key
//! `(scope, generation)`. The database runs in WAL mode with `synchronous = FULL`: a save is one
//! transaction, durable when it returns, and readers (other gateways sharing the file) never
//! block it or see half of it. `busy_timeout_ms` (default 5000) is how long a call waits for
//! another process's write lock before failing.
//!
//! SQLite is compiled in (the `bundled` build of `rusqlite`): the plugin needs no system
//! library.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{export_plugin, Error, Store, StoredGeneration};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

/// `sqlite` configuration.
#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct Config {
    /// The database file (created when missing; its directory must exist).
    pub path: PathBuf,
    /// How long to wait for another writer.
    #[serde(default = "default_busy_ms")]
    pub busy_timeout_ms: u64,
}

fn default_busy_ms() -> u64 {
    5000
}

/// The store.
pub struct SqliteStore {
    db: Mutex<Connection>,
    path: PathBuf,
}

fn db_error(path: &std::path::Path, e: rusqlite::Error) -> Error {
    use rusqlite::ErrorCode::*;
    let msg = format!("{}: {e}", path.display());
    match e.sqlite_error_code() {
        Some(DatabaseCorrupt | NotADatabase) => Error::corrupt(msg),
        Some(DatabaseBusy | DatabaseLocked) => Error::timeout(msg),
        _ => Error::unavailable(msg),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl SqliteStore {
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T, Error> {
        let mut db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut db).map_err(|e| db_error(&self.path, e))
    }
}

impl Store for SqliteStore {
    type Config = Config;

    fn new(c: Config) -> Result<Self, String> {
        {
            // Private from its creation: snapshots hold secrets.
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&c.path);
        }
        let open = || -> rusqlite::Result<Connection> {
            let db = Connection::open_with_flags(
                &c.path,
                OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_CREATE
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            db.busy_timeout(Duration::from_millis(c.busy_timeout_ms))?;
            db.pragma_update(None, "journal_mode", "WAL")?;
            db.pragma_update(None, "synchronous", "FULL")?;
            db.execute_batch(
                "CREATE TABLE IF NOT EXISTS outpost_generations (
                     scope TEXT NOT NULL,
                     generation INTEGER NOT NULL,
                     saved_unix_ms INTEGER NOT NULL,
                     data BLOB NOT NULL,
                     PRIMARY KEY (scope, generation)
                 ) WITHOUT ROWID;",
            )?;
            Ok(db)
        };
        let db = open().map_err(|e| format!("cannot open {}: {e}", c.path.display()))?;
        Ok(SqliteStore {
            db: Mutex::new(db),
            path: c.path,
        })
    }

    fn save(&self, scope: &str, generation: u64, data: &[u8]) -> Result<(), Error> {
        let generation =
            i64::try_from(generation).map_err(|_| Error::from("generation too large"))?;
        self.with(|db| {
            db.execute(
                "INSERT OR REPLACE INTO outpost_generations (scope, generation, saved_unix_ms, data)
                 VALUES (?1, ?2, ?3, ?4)",
                params![scope, generation, now_ms() as i64, data],
            )
            .map(|_| ())
        })
    }

    fn load(&self, scope: &str, generation: u64) -> Result<Option<Vec<u8>>, Error> {
        let Ok(generation) = i64::try_from(generation) else {
            return Ok(None);
        };
        self.with(|db| {
            db.query_row(
                "SELECT data FROM outpost_generations WHERE scope = ?1 AND generation = ?2",
                params![scope, generation],
                |row| row.get::<_, Vec<u8>>(0),
            )
            .optional()
        })
    }

    fn list(&self, scope: &str) -> Result<Vec<StoredGeneration>, Error> {
        self.with(|db| {
            let mut stmt = db.prepare_cached(
                "SELECT generation, saved_unix_ms, length(data) FROM outpost_generations
                 WHERE scope = ?1 ORDER BY generation DESC",
            )?;
            let rows = stmt.query_map(params![scope], |row| {
                Ok(StoredGeneration {
                    generation: row.get::<_, i64>(0)? as u64,
                    saved_unix_ms: row.get::<_, i64>(1)? as u64,
                    size: row.get::<_, i64>(2)? as u64,
                })
            })?;
            rows.collect()
        })
    }

    fn prune(&self, scope: &str, keep: u32) -> Result<u32, Error> {
        self.with(|db| {
            let removed = db.execute(
                "DELETE FROM outpost_generations WHERE scope = ?1 AND generation NOT IN (
                     SELECT generation FROM outpost_generations WHERE scope = ?1
                     ORDER BY generation DESC LIMIT ?2)",
                params![scope, i64::from(keep)],
            )?;
            Ok(removed as u32)
        })
    }
}

export_plugin! {
    name: "store-sqlite",
    version: env!("CARGO_PKG_VERSION"),
    stores: ["sqlite" => SqliteStore],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_a_database_is_refused_with_the_reason() {
        let dir = std::env::temp_dir().join(format!("outpost-sqlite-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("garbage.db");
        std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
        let err = outpost_plugin_sdk::testing::store::<SqliteStore>(&format!(
            r#"{{"path": "{}"}}"#,
            path.display()
        ))
        .err()
        .expect("refused");
        assert!(err.message.contains("not a database"), "{}", err.message);
        assert!(outpost_plugin_sdk::testing::store::<SqliteStore>(
            r#"{"path": "/nonexistent-dir/x.db"}"#
        )
        .is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
