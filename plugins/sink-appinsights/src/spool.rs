//! The on-disk spool: batches the endpoint could not take, one gzip NDJSON file per batch,
//! named `<unix ms>-<sequence>-<items>.ndjson.gz` so that lexical order is age order and the
//! item count is known without reading the file. Bounded in bytes: making room deletes the
//! oldest files and reports how many items went with them.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::{Path, PathBuf};

const SUFFIX: &str = ".ndjson.gz";

/// One spooled batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its file.
    pub path: PathBuf,
    /// File size.
    pub bytes: u64,
    /// Items in it.
    pub items: usize,
}

/// A spool directory.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    entries: VecDeque<Entry>,
    bytes: u64,
    last_ms: u64,
    seq: u64,
}

/// Parses `<ms>-<seq>-<items>.ndjson.gz`.
fn parse_name(name: &str) -> Option<(u64, u64, usize)> {
    let stem = name.strip_suffix(SUFFIX)?;
    let mut parts = stem.split('-');
    let ms = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let items = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((ms, seq, items))
}

impl Spool {
    /// Opens (creating) a spool directory and takes stock of the batches a previous run left,
    /// oldest first. Unfinished writes (`*.tmp`) are removed.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Spool> {
        std::fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            let Some((ms, seq, items)) = parse_name(&name) else {
                continue;
            };
            let bytes = e.metadata()?.len();
            found.push((
                name,
                (ms, seq),
                Entry {
                    path: e.path(),
                    bytes,
                    items,
                },
            ));
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let last = found.last().map_or((0, 0), |f| f.1);
        let entries: VecDeque<Entry> = found.into_iter().map(|f| f.2).collect();
        Ok(Spool {
            dir: dir.to_owned(),
            max_bytes,
            bytes: entries.iter().map(|e| e.bytes).sum(),
            entries,
            last_ms: last.0,
            seq: last.1 + 1,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Batches held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The oldest batch.
    pub fn oldest(&self) -> Option<&Entry> {
        self.entries.front()
    }

    /// Reads a batch's gzip body.
    pub fn read(&self, e: &Entry) -> std::io::Result<Vec<u8>> {
        std::fs::read(&e.path)
    }

    /// Deletes the oldest batch (sent, or unreadable).
    pub fn pop_oldest(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.bytes -= e.bytes;
            let _ = std::fs::remove_file(&e.path);
        }
    }

    /// Deletes oldest batches until `incoming` more bytes fit; answers the items deleted.
    fn make_room(&mut self, incoming: u64) -> usize {
        let mut dropped = 0;
        while self.bytes + incoming > self.max_bytes {
            let Some(e) = self.entries.front() else { break };
            dropped += e.items;
            self.pop_oldest();
        }
        dropped
    }

    fn write(&self, path: &Path, gz: &[u8]) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(gz)?;
        drop(f);
        std::fs::rename(&tmp, path)
    }

    /// Adds a batch as the newest. Answers how many items were dropped to stay within the
    /// bound: older ones deleted, or this batch itself when it alone is larger than the bound.
    pub fn push(&mut self, gz: &[u8], items: usize, now_ms: u64) -> std::io::Result<usize> {
        let size = gz.len() as u64;
        if size > self.max_bytes {
            return Ok(items);
        }
        let dropped = self.make_room(size);
        // Never older than what is already there, even if the clock went back.
        self.last_ms = self.last_ms.max(now_ms);
        let name = format!("{:016}-{:010}-{items}{SUFFIX}", self.last_ms, self.seq);
        self.seq += 1;
        let path = self.dir.join(name);
        self.write(&path, gz)?;
        self.bytes += size;
        self.entries.push_back(Entry {
            path,
            bytes: size,
            items,
        });
        Ok(dropped)
    }

    /// Replaces the oldest batch with what is left of it to send (after a partial success),
    /// keeping its place in line (the batch only shrinks, so the bound holds).
    pub fn shrink_oldest(&mut self, gz: &[u8], items: usize) -> std::io::Result<()> {
        let Some(old) = self.entries.pop_front() else {
            return Ok(());
        };
        self.bytes -= old.bytes;
        let (ms, seq, _) = old
            .path
            .file_name()
            .and_then(|n| parse_name(&n.to_string_lossy()))
            .unwrap_or((self.last_ms, 0, 0));
        let path = self.dir.join(format!("{ms:016}-{seq:010}-{items}{SUFFIX}"));
        self.write(&path, gz)?;
        if path != old.path {
            let _ = std::fs::remove_file(&old.path);
        }
        self.bytes += gz.len() as u64;
        self.entries.push_front(Entry {
            path,
            bytes: gz.len() as u64,
            items,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_bound_deletes_the_oldest_and_counts_their_items() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 250).unwrap();
        assert_eq!(s.push(&[1; 100], 3, 1_000).unwrap(), 0);
        assert_eq!(s.push(&[2; 100], 4, 1_000).unwrap(), 0);
        assert_eq!(s.bytes(), 200);
        // A third batch does not fit: the oldest (3 items) goes.
        assert_eq!(s.push(&[3; 100], 5, 900).unwrap(), 3);
        assert_eq!(s.len(), 2);
        assert_eq!(s.bytes(), 200);
        assert_eq!(s.read(s.oldest().unwrap()).unwrap(), vec![2; 100]);
        // Larger than the whole bound: refused, counted, nothing else lost.
        assert_eq!(s.push(&[4; 300], 9, 2_000).unwrap(), 9);
        assert_eq!(s.len(), 2);
        // Names sort by age even when the clock went back (900 < 1000).
        let n = names(dir.path());
        assert_eq!(n.len(), 2);
        assert!(
            n[0].ends_with("-4.ndjson.gz") && n[1].ends_with("-5.ndjson.gz"),
            "{n:?}"
        );
    }

    #[test]
    fn a_reopened_spool_replays_oldest_first_and_keeps_counting() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Spool::open(dir.path(), 10_000).unwrap();
            for (i, ms) in [(1u8, 5_000), (2, 5_000), (3, 5_001)] {
                s.push(&[i; 10], usize::from(i), ms).unwrap();
            }
        }
        std::fs::write(dir.path().join("x.ndjson.gz.tmp"), b"half").unwrap();
        std::fs::write(dir.path().join("README"), b"not ours").unwrap();
        let mut s = Spool::open(dir.path(), 10_000).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s.bytes(), 30);
        assert!(!dir.path().join("x.ndjson.gz.tmp").exists());
        // New batches come after the old ones, whatever the clock says.
        s.push(&[4; 10], 4, 1).unwrap();
        let mut order = Vec::new();
        while let Some(e) = s.oldest().cloned() {
            order.push((s.read(&e).unwrap()[0], e.items));
            s.pop_oldest();
        }
        assert_eq!(order, [(1, 1), (2, 2), (3, 3), (4, 4)]);
        assert_eq!(s.bytes(), 0);
        assert_eq!(names(dir.path()), ["README"]);
    }

    #[test]
    fn a_partly_sent_batch_keeps_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 10_000).unwrap();
        s.push(&[1; 50], 10, 1).unwrap();
        s.push(&[2; 50], 10, 2).unwrap();
        s.shrink_oldest(&[1; 5], 3).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.bytes(), 55);
        let first = s.oldest().unwrap().clone();
        assert_eq!((first.items, s.read(&first).unwrap()), (3, vec![1; 5]));
        assert_eq!(names(dir.path()).len(), 2);
    }
}
