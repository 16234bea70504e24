//! The node's report spool: every record bound for the control plane is appended here
//! (fsync'd) before it is sent, and dropped only once the control plane acknowledged it. So a
//! control plane that is away, or a node that restarts, loses nothing while the spool has
//! room; past `max_bytes` new records are dropped, counted, and a `loss` record with the count
//! goes out as soon as there is room again.
//!
//! Layout: `meta.json` (the epoch), `acked` (the highest acknowledged record id) and segment
//! files named by their first record id, each a JSON line per record (`{"rid":..,"record":..}`).

use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::{self, BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
};

use super::Reported;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("report spool {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("report spool {path}: {message}")]
    Corrupt { path: PathBuf, message: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug)]
struct Segment {
    first_rid: u64,
    /// 0 while empty.
    last_rid: u64,
    path: PathBuf,
    bytes: u64,
}

/// Where reading continues: a segment (by its first id), a byte offset in it, and the id of
/// the record that starts there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    segment: u64,
    offset: u64,
    rid: u64,
}

/// Records read for sending, and where reading goes on once they are acknowledged.
pub struct Batch {
    pub records: Vec<Reported>,
    pub end: Cursor,
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    pub epoch: u64,
    next_rid: u64,
    acked: u64,
    segments: VecDeque<Segment>,
    bytes: u64,
    /// Records dropped since the last loss record went in.
    lost_pending: u64,
    /// Records dropped since the node started.
    pub lost_total: u64,
    read: Option<Cursor>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    epoch: u64,
}

fn random_u63() -> u64 {
    let mut b = [0u8; 8];
    let got = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    let n = if got.is_ok() {
        u64::from_le_bytes(b)
    } else {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    };
    // SQLite integers are signed.
    (n >> 1).max(1)
}

impl Spool {
    /// Opens (or creates) the spool in `dir`. A record cut short by a crash is removed; every
    /// whole record not yet acknowledged is kept.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let meta_path = dir.join("meta.json");
        let epoch = match std::fs::read_to_string(&meta_path) {
            Ok(t) => {
                serde_json::from_str::<Meta>(&t)
                    .map_err(|e| SpoolError::Corrupt {
                        path: meta_path.clone(),
                        message: e.to_string(),
                    })?
                    .epoch
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let m = Meta {
                    epoch: random_u63(),
                };
                crate::files::write_atomic(&meta_path, &serde_json::to_vec(&m).expect("meta"))
                    .map_err(io_err(&meta_path))?;
                m.epoch
            }
            Err(e) => return Err(io_err(&meta_path)(e)),
        };
        let acked_path = dir.join("acked");
        let acked = match std::fs::read_to_string(&acked_path) {
            Ok(t) => t.trim().parse().map_err(|e| SpoolError::Corrupt {
                path: acked_path.clone(),
                message: format!("{t:?}: {e}"),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err(&acked_path)(e)),
        };
        // At its full width now, so that every later ack writes in place.
        write_cursor(dir, acked)?;
        let mut firsts: Vec<u64> = std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".jsonl")?.parse().ok())
            .collect();
        firsts.sort_unstable();
        let segment_bytes = (max_bytes / 8).clamp(4096, 4 << 20);
        let mut s = Self {
            dir: dir.to_owned(),
            max_bytes,
            segment_bytes,
            epoch,
            next_rid: acked + 1,
            acked,
            segments: VecDeque::new(),
            bytes: 0,
            lost_pending: 0,
            lost_total: 0,
            read: None,
        };
        for first in firsts {
            let path = s.segment_path(first);
            let (last_rid, bytes) = Self::recover(&path)?;
            // Empty, or acknowledged in full.
            if last_rid <= acked {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            s.next_rid = s.next_rid.max(last_rid + 1);
            s.bytes += bytes;
            s.segments.push_back(Segment {
                first_rid: first,
                last_rid,
                path,
                bytes,
            });
        }
        Ok(s)
    }

    fn segment_path(&self, first: u64) -> PathBuf {
        self.dir.join(format!("{first:020}.jsonl"))
    }

    /// The last whole record's id and the length up to it; a cut-short tail is removed.
    fn recover(path: &Path) -> Result<(u64, u64), SpoolError> {
        let file = File::open(path).map_err(io_err(path))?;
        let mut reader = BufReader::new(file);
        let (mut good, mut last) = (0u64, 0u64);
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line).map_err(io_err(path))?;
            if n == 0 || !line.ends_with('\n') {
                break;
            }
            match serde_json::from_str::<Reported>(&line) {
                Ok(r) => last = r.rid,
                Err(_) => break,
            }
            good += n as u64;
        }
        let len = std::fs::metadata(path).map_err(io_err(path))?.len();
        if len != good {
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io_err(path))?;
            f.set_len(good).map_err(io_err(path))?;
            f.sync_all().map_err(io_err(path))?;
        }
        Ok((last, good))
    }

    /// Records waiting to be sent.
    pub fn pending(&self) -> u64 {
        self.next_rid - 1 - self.acked
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Appends records in order and syncs them to disk. Records that do not fit are dropped
    /// and counted; the next append that has room writes a loss record first.
    pub fn append(&mut self, records: Vec<serde_json::Value>) -> Result<(), SpoolError> {
        if records.is_empty() && self.lost_pending == 0 {
            return Ok(());
        }
        let mut lines: Vec<(u64, String)> = Vec::with_capacity(records.len() + 1);
        let mut rid = self.next_rid;
        let mut room = self.max_bytes.saturating_sub(self.bytes);
        let line_of = |rid: u64, v: &serde_json::Value| {
            let mut l = format!("{{\"rid\":{rid},\"record\":{v}}}");
            l.push('\n');
            l
        };
        if self.lost_pending > 0 {
            let loss = serde_json::json!({
                "kind": "loss",
                "time": crate::clock::now_rfc3339(),
                "spool_records_lost": self.lost_pending,
            });
            let l = line_of(rid, &loss);
            if (l.len() as u64) <= room {
                room -= l.len() as u64;
                lines.push((rid, l));
                rid += 1;
            }
        }
        let with_loss = !lines.is_empty();
        for r in &records {
            let l = line_of(rid, r);
            // A record the control plane would refuse (and with it every batch it is in) is
            // a counted loss here instead.
            let record_bytes = l.len() - format!("{{\"rid\":{rid},\"record\":}}\n").len();
            if (l.len() as u64) > room || record_bytes > super::MAX_RECORD_BYTES {
                continue;
            }
            room -= l.len() as u64;
            lines.push((rid, l));
            rid += 1;
        }
        // Records that did not fit and records whose write failed (a full disk) are a
        // counted loss alike; a loss record that could not be written is owed still.
        let (written, failed) = self.write_lines(&lines);
        let loss_in = with_loss && written > 0;
        if loss_in {
            self.lost_pending = 0;
        }
        let lost = (records.len() + usize::from(loss_in) - written) as u64;
        self.lost_pending += lost;
        self.lost_total += lost;
        failed.map_or(Ok(()), Err)
    }

    /// Writes lines in order, syncing each segment's part; how many were written, and the
    /// error that stopped the rest.
    fn write_lines(&mut self, lines: &[(u64, String)]) -> (usize, Option<SpoolError>) {
        let mut i = 0;
        while i < lines.len() {
            let need_new = self
                .segments
                .back()
                .is_none_or(|s| s.bytes >= self.segment_bytes);
            if need_new {
                let first = lines[i].0;
                self.segments.push_back(Segment {
                    first_rid: first,
                    last_rid: 0,
                    path: self.segment_path(first),
                    bytes: 0,
                });
            }
            let seg = self.segments.back_mut().expect("a segment");
            let mut buf = String::new();
            let mut last = seg.last_rid;
            let start = i;
            while i < lines.len() && seg.bytes + (buf.len() as u64) < self.segment_bytes {
                buf.push_str(&lines[i].1);
                last = lines[i].0;
                i += 1;
            }
            let path = seg.path.clone();
            let file = OpenOptions::new().create(true).append(true).open(&path);
            let result = file.and_then(|mut f| {
                let r = f.write_all(buf.as_bytes()).and_then(|()| f.sync_data());
                if r.is_ok() {
                    return Ok(None);
                }
                // Cut back to the last whole record, so the file stays readable, then keep
                // as many whole records as still fit (a disk that filled up mid-chunk).
                f.set_len(seg.bytes)?;
                let mut kept = 0u64;
                let mut n = 0;
                for (_, l) in &lines[start..i] {
                    if f.write_all(l.as_bytes()).is_err() {
                        let _ = f.set_len(seg.bytes + kept);
                        break;
                    }
                    kept += l.len() as u64;
                    n += 1;
                }
                f.sync_data()?;
                Ok(Some((n, kept, r.expect_err("the chunk failed"))))
            });
            match result {
                Ok(None) => {
                    seg.bytes += buf.len() as u64;
                    seg.last_rid = last;
                    self.bytes += buf.len() as u64;
                    self.next_rid = last + 1;
                }
                Ok(Some((n, kept, e))) => {
                    if n > 0 {
                        seg.bytes += kept;
                        seg.last_rid = lines[start + n - 1].0;
                        self.bytes += kept;
                        self.next_rid = seg.last_rid + 1;
                    } else if seg.last_rid == 0 {
                        let _ = std::fs::remove_file(&path);
                        self.segments.pop_back();
                    }
                    return (start + n, Some(io_err(&path)(e)));
                }
                Err(e) => {
                    if seg.last_rid == 0 {
                        let _ = std::fs::remove_file(&path);
                        self.segments.pop_back();
                    }
                    return (start, Some(io_err(&path)(e)));
                }
            }
        }
        (i, None)
    }

    /// Counts `n` records lost after they were spooled (refused by the control plane for
    /// good): the next loss record carries them.
    pub fn count_lost(&mut self, n: u64) {
        self.lost_pending += n;
        self.lost_total += n;
    }

    /// Up to `max` records after the acknowledged ones, oldest first.
    pub fn peek(&mut self, max: usize) -> Result<Batch, SpoolError> {
        let start = match self.read {
            Some(c) if c.rid == self.acked + 1 => c,
            _ => self.locate(self.acked + 1)?,
        };
        let mut records = Vec::new();
        let mut cur = start;
        let from = cur.segment;
        for seg in self.segments.iter().filter(|s| s.first_rid >= from) {
            if seg.first_rid != cur.segment {
                cur = Cursor {
                    segment: seg.first_rid,
                    offset: 0,
                    rid: seg.first_rid,
                };
            }
            read_records(seg, cur.offset, |offset, len, r| {
                if records.len() >= max {
                    return false;
                }
                cur.offset = offset + len;
                cur.rid = r.rid + 1;
                records.push(r);
                true
            })?;
            if records.len() >= max {
                break;
            }
        }
        Ok(Batch { records, end: cur })
    }

    /// Where the record `rid` starts.
    fn locate(&self, rid: u64) -> Result<Cursor, SpoolError> {
        let Some(seg) = self
            .segments
            .iter()
            .rev()
            .find(|s| s.first_rid <= rid)
            .or(self.segments.front())
        else {
            return Ok(Cursor {
                segment: rid,
                offset: 0,
                rid,
            });
        };
        let mut found = None;
        let mut end = 0;
        read_records(seg, 0, |offset, len, r| {
            end = offset + len;
            if r.rid >= rid {
                found = Some(Cursor {
                    segment: seg.first_rid,
                    offset,
                    rid: r.rid,
                });
                return false;
            }
            true
        })?;
        Ok(found.unwrap_or(Cursor {
            segment: seg.first_rid,
            offset: end,
            rid,
        }))
    }

    /// The control plane has everything before `end`: forget it. The cursor is on disk
    /// before any segment goes: were it the other way round, a crash in between would leave
    /// an old cursor and no records after it, and the next start would number new records
    /// with ids the control plane already holds (and drops as duplicates).
    pub fn ack(&mut self, end: Cursor) -> Result<(), SpoolError> {
        let acked = end.rid - 1;
        write_cursor(&self.dir, acked)?;
        self.acked = acked;
        self.read = Some(end);
        while let Some(seg) = self.segments.front() {
            if seg.last_rid == 0 || seg.last_rid > self.acked {
                break;
            }
            let _ = std::fs::remove_file(&seg.path);
            self.bytes -= seg.bytes;
            self.segments.pop_front();
        }
        Ok(())
    }
}

/// Writes the acknowledged id into `dir/acked`, in place and synced, at one width (a u64
/// in decimal, zero-padded, and a newline): it works on a full disk.
fn write_cursor(dir: &Path, acked: u64) -> Result<(), SpoolError> {
    let path = dir.join("acked");
    crate::files::write_in_place(&path, format!("{acked:020}\n").as_bytes()).map_err(io_err(&path))
}

/// Reads the whole records of `seg` from byte `from` on, handing each (with its offset and
/// length) to `each` until it returns false.
fn read_records(
    seg: &Segment,
    from: u64,
    mut each: impl FnMut(u64, u64, Reported) -> bool,
) -> Result<(), SpoolError> {
    let mut f = File::open(&seg.path).map_err(io_err(&seg.path))?;
    f.seek(SeekFrom::Start(from)).map_err(io_err(&seg.path))?;
    let mut reader = BufReader::new(f.take(seg.bytes.saturating_sub(from)));
    let (mut offset, mut line) = (from, String::new());
    loop {
        line.clear();
        let n = reader.read_line(&mut line).map_err(io_err(&seg.path))? as u64;
        if n == 0 {
            return Ok(());
        }
        let r: Reported = serde_json::from_str(&line).map_err(|e| SpoolError::Corrupt {
            path: seg.path.clone(),
            message: format!("at byte {offset}: {e}"),
        })?;
        if !each(offset, n, r) {
            return Ok(());
        }
        offset += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u64) -> serde_json::Value {
        serde_json::json!({ "kind": "decision", "verdict": "deny", "n": i })
    }

    fn drain(s: &mut Spool, max: usize) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        loop {
            let b = s.peek(max).unwrap();
            if b.records.is_empty() {
                return out;
            }
            for r in &b.records {
                out.push(serde_json::from_str(r.record.get()).unwrap());
            }
            s.ack(b.end).unwrap();
        }
    }

    #[test]
    fn records_come_out_in_order_across_segments_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 64 << 10).unwrap();
        let epoch = s.epoch;
        s.append((1..=300).map(rec).collect()).unwrap();
        let first = s.peek(100).unwrap();
        assert_eq!(first.records[0].rid, 1);
        s.ack(first.end).unwrap();
        drop(s);
        // A torn write at the tail is cut off on open.
        let last = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .max()
            .unwrap();
        OpenOptions::new()
            .append(true)
            .open(&last)
            .unwrap()
            .write_all(b"{\"rid\":301,\"rec")
            .unwrap();
        let mut s = Spool::open(dir.path(), 64 << 10).unwrap();
        assert_eq!(s.epoch, epoch);
        assert_eq!(s.pending(), 200);
        s.append(vec![rec(301)]).unwrap();
        let got = drain(&mut s, 37);
        let ns: Vec<u64> = got.iter().map(|r| r["n"].as_u64().unwrap()).collect();
        assert_eq!(ns, (101..=301).collect::<Vec<_>>());
        assert_eq!(s.pending(), 0);
        assert!(s.bytes() < 64 << 10);
    }

    #[test]
    fn a_full_spool_counts_its_loss_and_reports_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 8192).unwrap();
        s.append((1..=1000).map(rec).collect()).unwrap();
        let kept = s.pending();
        assert!(kept > 50 && kept < 1000, "{kept}");
        assert_eq!(s.lost_total, 1000 - kept);
        let got = drain(&mut s, 1000);
        assert_eq!(got.len() as u64, kept);
        s.append(vec![rec(1001)]).unwrap();
        let got = drain(&mut s, 1000);
        assert_eq!(got[0]["kind"], "loss");
        assert_eq!(got[0]["spool_records_lost"], 1000 - kept);
        assert_eq!(got[1]["n"], 1001);
    }
}
