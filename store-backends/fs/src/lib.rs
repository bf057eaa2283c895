//! `fs`: configuration backups as files.
//!
//! ```toml
//! [backup]
//! store = "fs"
//! config = { dir = "/var/lib/outpost/backup" }
//! ```
//!
//! Layout: `<dir>/<scope>/<generation, 20 digits>.snapshot`. A save writes a temporary file in
//! the same directory, fsyncs it, renames it over its final name and fsyncs the directory: after
//! a crash or power loss a generation is either all there or not there. Readers never see a
//! partial file. Temporary files left by a crash are ignored by `list` and removed by `prune`.
//!
//! Several gateways can share the directory (each its own scope); two writers of the same
//! scope write distinct generation numbers, or the later rename wins whole.
//!
//! `fsync = false` skips the syncs (tests, tmpfs); the default is `true`. Directories are
//! created with mode 0700 and files with 0600: snapshots hold secrets.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind as IoKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{export_plugin, Error, Store, StoredGeneration};

/// `fs` configuration.
#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct Config {
    /// The directory (created when missing).
    pub dir: PathBuf,
    /// Sync file and directory on every save.
    #[serde(default = "yes")]
    pub fsync: bool,
}

fn yes() -> bool {
    true
}

/// The store.
pub struct FsStore {
    dir: PathBuf,
    fsync: bool,
}

const SUFFIX: &str = ".snapshot";

/// A scope becomes a directory name: only `[A-Za-z0-9._-]`, not `.` or `..`.
fn scope_dir(root: &Path, scope: &str) -> Result<PathBuf, Error> {
    let ok = !scope.is_empty()
        && scope != "."
        && scope != ".."
        && scope.len() <= 200
        && scope
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(root.join(scope))
    } else {
        Err(Error::new(
            outpost_plugin_sdk::api::ErrorKind::CONFIG,
            format!("scope '{scope}' is not usable as a directory name (letters, digits, '.', '_', '-')"),
        ))
    }
}

/// Creates a directory (and its parents) readable by the owner only: snapshots hold secrets.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn file_name(generation: u64) -> String {
    format!("{generation:020}{SUFFIX}")
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::unavailable(format!("{what} {}: {e}", path.display()))
}

impl FsStore {
    fn entries(&self, scope: &str) -> Result<Vec<(u64, PathBuf)>, Error> {
        let dir = scope_dir(&self.dir, scope)?;
        let read = match fs::read_dir(&dir) {
            Ok(r) => r,
            Err(e) if e.kind() == IoKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("cannot list", &dir, e)),
        };
        let mut out = Vec::new();
        for entry in read {
            let entry = entry.map_err(|e| io("cannot list", &dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(number) = name.strip_suffix(SUFFIX) else {
                continue;
            };
            if number.len() == 20 {
                if let Ok(g) = number.parse::<u64>() {
                    out.push((g, entry.path()));
                }
            }
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.0));
        Ok(out)
    }

    fn sync_dir(&self, dir: &Path) -> Result<(), Error> {
        if self.fsync {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("cannot sync", dir, e))?;
        }
        Ok(())
    }
}

impl Store for FsStore {
    type Config = Config;

    fn new(c: Config) -> Result<Self, String> {
        if c.dir.as_os_str().is_empty() {
            return Err("dir must name a directory".into());
        }
        private_dir(&c.dir).map_err(|e| format!("cannot create {}: {e}", c.dir.display()))?;
        // Writable? Find out now rather than at the first save.
        let probe = c.dir.join(format!(".outpost-probe-{}", std::process::id()));
        File::create(&probe)
            .and_then(|_| fs::remove_file(&probe))
            .map_err(|e| format!("cannot write in {}: {e}", c.dir.display()))?;
        Ok(FsStore {
            dir: c.dir,
            fsync: c.fsync,
        })
    }

    fn save(&self, scope: &str, generation: u64, data: &[u8]) -> Result<(), Error> {
        let dir = scope_dir(&self.dir, scope)?;
        private_dir(&dir).map_err(|e| io("cannot create", &dir, e))?;
        let target = dir.join(file_name(generation));
        let tmp = dir.join(format!(
            ".tmp-{generation}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(data)?;
            if self.fsync {
                f.sync_all()?;
            }
            fs::rename(&tmp, &target)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io("cannot write", &target, e));
        }
        self.sync_dir(&dir)
    }

    fn load(&self, scope: &str, generation: u64) -> Result<Option<Vec<u8>>, Error> {
        let path = scope_dir(&self.dir, scope)?.join(file_name(generation));
        match fs::read(&path) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == IoKind::NotFound => Ok(None),
            Err(e) => Err(io("cannot read", &path, e)),
        }
    }

    fn list(&self, scope: &str) -> Result<Vec<StoredGeneration>, Error> {
        let mut out = Vec::new();
        for (generation, path) in self.entries(scope)? {
            // A file pruned between listing and reading its metadata is simply left out.
            let Ok(m) = fs::metadata(&path) else { continue };
            let saved_unix_ms = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as u64);
            out.push(StoredGeneration {
                generation,
                saved_unix_ms,
                size: m.len(),
            });
        }
        Ok(out)
    }

    fn prune(&self, scope: &str, keep: u32) -> Result<u32, Error> {
        let dir = scope_dir(&self.dir, scope)?;
        let mut removed = 0;
        for (_, path) in self.entries(scope)?.into_iter().skip(keep as usize) {
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == IoKind::NotFound => {}
                Err(e) => return Err(io("cannot remove", &path, e)),
            }
        }
        // Temporary files of saves that never finished (older than a minute: not in flight).
        if let Ok(read) = fs::read_dir(&dir) {
            for entry in read.flatten() {
                let stale = entry
                    .file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(".tmp-"))
                    && entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age.as_secs() > 60);
                if stale {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        if removed > 0 {
            self.sync_dir(&dir)?;
        }
        Ok(removed)
    }
}

export_plugin! {
    name: "store-fs",
    version: env!("CARGO_PKG_VERSION"),
    stores: ["fs" => FsStore],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_that_could_leave_the_directory_are_refused() {
        let root = Path::new("/x");
        for bad in ["", ".", "..", "a/b", "../up", "a b", "é"] {
            assert!(scope_dir(root, bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            scope_dir(root, "gw-1.prod_a").unwrap(),
            root.join("gw-1.prod_a")
        );
    }

    #[test]
    fn unreadable_config_is_refused() {
        assert!(outpost_plugin_sdk::testing::store::<FsStore>(r#"{"dir": ""}"#).is_err());
        assert!(
            outpost_plugin_sdk::testing::store::<FsStore>(r#"{"dir": "/proc/outpost"}"#).is_err()
        );
        assert!(outpost_plugin_sdk::testing::store::<FsStore>(r#"{"path": "/tmp"}"#).is_err());
    }
}
