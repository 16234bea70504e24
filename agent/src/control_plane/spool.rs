//! The node's report spool: every record bound for the control plane is appended here
//! (fsync'd) before it is sent, and dropped only once the control plane acknowledged it. So a
//! control plane that is away, or a node that restarts, loses nothing while the spool has
//! room; past `max_bytes` new records are dropped, counted, and a `loss` record with the count
//! goes out as soon as there is room again.
//!
//! Layout: `meta.json` (the epoch), `acked` (the highest acknowledged record id and the last
//! [`Mark`]) and segment files named by their first record id, each a JSON line per record
//! (`{"rid":..,"record":..}`). Every append ends with a mark line (`{"mark":..}`): which audit
//! record it took last and the losses not yet reported. An append is whole once its mark is
//! on disk; records after the newest mark are cut at the next start, and the node reads them
//! back from its audit log (see [`Spool::handled`]), so a crash anywhere neither loses a
//! logged record uncounted nor counts one both lost and sent.

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
    /// The audit seqs those records spanned (first, last), when they came from the log: the
    /// control plane takes a gap in a node's chain as a loss only inside a span reported.
    lost_span: Span,
    /// Records dropped since the node started.
    pub lost_total: u64,
    read: Option<Cursor>,
    /// The seq of the last audit record an append took (written or counted lost).
    handled: Option<u64>,
    /// Marks written so far: the newest mark on disk wins at the next start.
    stamp: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    epoch: u64,
}

/// Where the spool stood after an append (or an acknowledgement): enough to start again
/// from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Mark {
    /// Orders marks: the segments' and the `acked` file's.
    stamp: u64,
    /// The seq of the last audit record taken (0: the log was empty); none: not known.
    handled: Option<u64>,
    /// Records counted lost whose loss record is not written yet.
    lost: u64,
    /// The id the next record gets: records from it on are not part of a whole append.
    next_rid: u64,
    /// The audit seqs of the losses not yet reported (first, last).
    #[serde(default)]
    lost_span: Span,
}

/// A run of audit seqs (first, last).
type Span = Option<(u64, u64)>;

/// `span` widened to hold `seq`.
pub(crate) fn widen(span: Span, seq: Option<u64>) -> Span {
    match (span, seq) {
        (None, Some(q)) => Some((q, q)),
        (Some((a, b)), Some(q)) => Some((a.min(q), b.max(q))),
        (span, None) => span,
    }
}

/// The span holding both.
pub(crate) fn join(a: Span, b: Span) -> Span {
    match b {
        Some((x, y)) => widen(widen(a, Some(x)), Some(y)),
        None => a,
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct MarkLine {
    mark: Mark,
}

/// A line of a segment: a record or a mark.
enum Line {
    Record(Reported),
    Mark(Mark),
}

fn parse_line(line: &str) -> Result<Line, serde_json::Error> {
    if line.starts_with("{\"mark\":") {
        serde_json::from_str::<MarkLine>(line).map(|m| Line::Mark(m.mark))
    } else {
        serde_json::from_str::<Reported>(line).map(Line::Record)
    }
}

/// The seq of `r` in the audit log, if it came from there.
fn audit_seq(r: &serde_json::Value) -> Option<u64> {
    r.get("hash")?;
    r.get("seq")?.as_u64()
}

/// A line to write: its text, and its record id when it is a record (with its audit seq,
/// when it has one).
struct Out {
    rid: Option<u64>,
    seq: Option<u64>,
    text: String,
}

/// What [`Spool::recover`] finds in a segment.
struct Recovered {
    /// The last whole record's id (0: none).
    last_rid: u64,
    /// Bytes of whole lines.
    good: u64,
    /// The last mark.
    mark: Option<Mark>,
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
        // `acked` alone (a spool of an earlier version: whole records are kept as they are),
        // or `acked` and the mark at that time.
        let (acked, acked_mark) = match std::fs::read_to_string(&acked_path) {
            Ok(t) => parse_cursor(&t).ok_or_else(|| SpoolError::Corrupt {
                path: acked_path.clone(),
                message: format!("{:?}: not an acknowledged id and mark", t.trim()),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => (0, None),
            Err(e) => return Err(io_err(&acked_path)(e)),
        };
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
            lost_span: None,
            lost_total: 0,
            read: None,
            handled: None,
            stamp: 0,
        };
        let mut found = Vec::with_capacity(firsts.len());
        let mut newest = acked_mark;
        for first in firsts {
            let path = s.segment_path(first);
            let r = Self::recover(&path)?;
            if let Some(m) = r.mark
                && newest.is_none_or(|n| m.stamp >= n.stamp)
            {
                newest = Some(m);
            }
            found.push((first, path, r));
        }
        // Records after the newest mark are an append cut short: gone, to be read back
        // from the audit log.
        if let Some(m) = newest {
            for (_, path, r) in &mut found {
                if r.last_rid >= m.next_rid {
                    (r.last_rid, r.good) = Self::cut(path, m.next_rid)?;
                }
            }
            s.handled = m.handled;
            s.lost_pending = m.lost;
            s.lost_span = m.lost_span;
            s.stamp = m.stamp;
        }
        for (first, path, r) in found {
            // Empty, or acknowledged in full.
            if r.last_rid <= acked {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            s.next_rid = s.next_rid.max(r.last_rid + 1);
            s.bytes += r.good;
            s.segments.push_back(Segment {
                first_rid: first,
                last_rid: r.last_rid,
                path,
                bytes: r.good,
            });
        }
        if let Some(m) = newest {
            s.next_rid = s.next_rid.max(m.next_rid);
        }
        // At its full width now, so that every later ack writes in place.
        s.write_cursor(acked)?;
        Ok(s)
    }

    /// The seq of the last audit record the spool took, written or counted lost: the node
    /// sends the records after it from its audit log when it starts. `None` for a new spool
    /// until [`Spool::start_at`].
    pub fn handled(&self) -> Option<u64> {
        self.handled
    }

    /// A new spool (or one of an earlier version) takes the audit log from after `head` on,
    /// said on disk at once: a crash before its first append still finds the records written
    /// meanwhile in the log.
    pub fn start_at(&mut self, head: u64) -> Result<(), SpoolError> {
        if self.handled.is_none() {
            self.handled = Some(head);
            self.stamp += 1;
            self.write_cursor(self.acked)?;
        }
        Ok(())
    }

    /// Cuts `path` before its first record with id `from` or more; what is left (last id,
    /// bytes).
    fn cut(path: &Path, from: u64) -> Result<(u64, u64), SpoolError> {
        let file = File::open(path).map_err(io_err(path))?;
        let mut reader = BufReader::new(file);
        let (mut good, mut last) = (0u64, 0u64);
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line).map_err(io_err(path))?;
            if n == 0 {
                break;
            }
            if let Ok(Line::Record(r)) = parse_line(&line) {
                if r.rid >= from {
                    break;
                }
                last = r.rid;
            }
            good += n as u64;
        }
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        f.set_len(good).map_err(io_err(path))?;
        f.sync_all().map_err(io_err(path))?;
        Ok((last, good))
    }

    fn segment_path(&self, first: u64) -> PathBuf {
        self.dir.join(format!("{first:020}.jsonl"))
    }

    /// The last whole record's id, the length up to the last whole line and the last mark;
    /// a cut-short tail is removed.
    fn recover(path: &Path) -> Result<Recovered, SpoolError> {
        let file = File::open(path).map_err(io_err(path))?;
        let mut reader = BufReader::new(file);
        let mut found = Recovered {
            last_rid: 0,
            good: 0,
            mark: None,
        };
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line).map_err(io_err(path))?;
            if n == 0 || !line.ends_with('\n') {
                break;
            }
            match parse_line(&line) {
                Ok(Line::Record(r)) => found.last_rid = r.rid,
                Ok(Line::Mark(m)) => found.mark = Some(m),
                Err(_) => break,
            }
            found.good += n as u64;
        }
        let len = std::fs::metadata(path).map_err(io_err(path))?.len();
        if len != found.good {
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io_err(path))?;
            f.set_len(found.good).map_err(io_err(path))?;
            f.sync_all().map_err(io_err(path))?;
        }
        Ok(found)
    }

    /// Records waiting to be sent.
    pub fn pending(&self) -> u64 {
        self.next_rid - 1 - self.acked
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Appends records in order and syncs them to disk, with a mark. Records that do not fit
    /// are dropped and counted; the next append that has room writes a loss record first.
    pub fn append(&mut self, records: Vec<serde_json::Value>) -> Result<(), SpoolError> {
        if records.is_empty() && self.lost_pending == 0 {
            return Ok(());
        }
        let mut lines: Vec<Out> = Vec::with_capacity(records.len() + 2);
        let mut rid = self.next_rid;
        let mut room = self.max_bytes.saturating_sub(self.bytes);
        let line_of = |rid: u64, v: &serde_json::Value| {
            let mut l = format!("{{\"rid\":{rid},\"record\":{v}}}");
            l.push('\n');
            l
        };
        if self.lost_pending > 0 {
            let mut loss = serde_json::json!({
                "kind": "loss",
                "time": crate::clock::now_rfc3339(),
                "spool_records_lost": self.lost_pending,
            });
            if let Some((a, b)) = self.lost_span {
                loss["spool_seqs_lost"] = serde_json::json!([a, b]);
            }
            let l = line_of(rid, &loss);
            if (l.len() as u64) <= room {
                room -= l.len() as u64;
                lines.push(Out {
                    rid: Some(rid),
                    seq: None,
                    text: l,
                });
                rid += 1;
            }
        }
        let with_loss = !lines.is_empty();
        let mut handled = self.handled;
        let mut dropped = 0u64;
        let mut dropped_span = None;
        for r in &records {
            let seq = audit_seq(r);
            handled = seq.or(handled);
            let l = line_of(rid, r);
            // A record the control plane would refuse (and with it every batch it is in) is
            // a counted loss here instead.
            let record_bytes = l.len() - format!("{{\"rid\":{rid},\"record\":}}\n").len();
            if (l.len() as u64) > room || record_bytes > super::MAX_RECORD_BYTES {
                dropped += 1;
                dropped_span = widen(dropped_span, seq);
                continue;
            }
            room -= l.len() as u64;
            lines.push(Out {
                rid: Some(rid),
                seq,
                text: l,
            });
            rid += 1;
        }
        // The mark as it will be once every line is written: a crash before it is on disk
        // cuts the lines before it at the next start, as if this append never was.
        let mark = Mark {
            stamp: self.stamp + 1,
            handled,
            lost: if with_loss { 0 } else { self.lost_pending } + dropped,
            next_rid: rid,
            lost_span: if with_loss {
                dropped_span
            } else {
                join(self.lost_span, dropped_span)
            },
        };
        lines.push(Out {
            rid: None,
            seq: None,
            text: mark_line(&mark),
        });
        // Records that did not fit and records whose write failed (a full disk) are a
        // counted loss alike; a loss record that could not be written is owed still.
        let (written, marked, failed) = self.write_lines(&lines);
        let loss_in = with_loss && written > 0;
        if loss_in {
            self.lost_pending = 0;
            self.lost_span = None;
        }
        // What a failed write left out counts in the span too.
        let failed_span = lines
            .iter()
            .filter(|l| l.rid.is_some())
            .skip(written)
            .fold(None, |span, l| widen(span, l.seq));
        self.lost_span = join(join(self.lost_span, dropped_span), failed_span);
        let lost = (records.len() + usize::from(loss_in) - written) as u64;
        self.lost_pending += lost;
        self.lost_total += lost;
        self.handled = handled;
        if marked {
            self.stamp = mark.stamp;
        }
        failed.map_or(Ok(()), Err)
    }

    /// Writes lines in order, syncing each segment's part; how many records were written,
    /// whether the last line (the mark) was, and the error that stopped the rest.
    fn write_lines(&mut self, lines: &[Out]) -> (usize, bool, Option<SpoolError>) {
        let mut i = 0;
        let records_in = |ls: &[Out]| ls.iter().filter(|l| l.rid.is_some()).count();
        while i < lines.len() {
            let need_new = self
                .segments
                .back()
                .is_none_or(|s| s.bytes >= self.segment_bytes);
            if need_new {
                // Named by the id its first record has (or will have: a mark comes first
                // only at the end of an append, before the next record).
                let first = lines[i..].iter().find_map(|l| l.rid).unwrap_or(
                    self.next_rid.max(
                        lines[..i]
                            .iter()
                            .filter_map(|l| l.rid)
                            .max()
                            .map_or(0, |r| r + 1),
                    ),
                );
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
                buf.push_str(&lines[i].text);
                if let Some(r) = lines[i].rid {
                    last = r;
                }
                i += 1;
            }
            let path = seg.path.clone();
            let file = OpenOptions::new().create(true).append(true).open(&path);
            let result = file.and_then(|mut f| {
                #[cfg(feature = "failpoints")]
                fail::fail_point!("spool-torn-write", |_| {
                    let _ = f.write_all(&buf.as_bytes()[..buf.len() / 2]);
                    let _ = f.sync_data();
                    crate::crash_here("spool-torn-write")
                });
                crate::failpoint!("spool-before-write");
                let r = f.write_all(buf.as_bytes()).and_then(|()| f.sync_data());
                if r.is_ok() {
                    return Ok(None);
                }
                // Cut back to the last whole line, so the file stays readable, then keep
                // as many whole lines as still fit (a disk that filled up mid-chunk).
                f.set_len(seg.bytes)?;
                let mut kept = 0u64;
                let mut n = 0;
                for l in &lines[start..i] {
                    if f.write_all(l.text.as_bytes()).is_err() {
                        let _ = f.set_len(seg.bytes + kept);
                        break;
                    }
                    kept += l.text.len() as u64;
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
                    if last > 0 {
                        self.next_rid = self.next_rid.max(last + 1);
                    }
                }
                Ok(Some((n, kept, e))) => {
                    let done = &lines[start..start + n];
                    if let Some(r) = done.iter().rev().find_map(|l| l.rid) {
                        seg.last_rid = r;
                        self.next_rid = r + 1;
                    }
                    seg.bytes += kept;
                    self.bytes += kept;
                    if seg.bytes == 0 {
                        let _ = std::fs::remove_file(&path);
                        self.segments.pop_back();
                    }
                    let marked = start + n == lines.len();
                    return (
                        records_in(&lines[..start + n]),
                        marked,
                        Some(io_err(&path)(e)),
                    );
                }
                Err(e) => {
                    if seg.bytes == 0 {
                        let _ = std::fs::remove_file(&path);
                        self.segments.pop_back();
                    }
                    return (records_in(&lines[..start]), false, Some(io_err(&path)(e)));
                }
            }
        }
        crate::failpoint!("spool-after-write");
        (records_in(lines), true, None)
    }

    /// Counts `n` records lost after they were spooled (refused by the control plane for
    /// good): the next loss record carries them.
    pub fn count_lost(&mut self, n: u64, seq: Option<u64>) {
        self.lost_pending += n;
        self.lost_total += n;
        self.lost_span = widen(self.lost_span, seq);
    }

    /// `n` records already counted lost whose loss record did not reach the control plane
    /// (it refused it): the next loss record carries them again.
    pub fn owe_lost(&mut self, n: u64, span: Option<(u64, u64)>) {
        self.lost_pending += n;
        self.lost_span = join(self.lost_span, span);
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
        crate::failpoint!("spool-before-ack");
        self.stamp += 1;
        self.write_cursor(acked)?;
        crate::failpoint!("spool-after-ack");
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

impl Spool {
    /// Writes the acknowledged id and the spool's mark into `dir/acked`, in place and
    /// synced, at one width (u64s in decimal, zero-padded): it works on a full disk.
    fn write_cursor(&self, acked: u64) -> Result<(), SpoolError> {
        let path = self.dir.join("acked");
        let m = Mark {
            stamp: self.stamp,
            handled: self.handled,
            lost: self.lost_pending,
            next_rid: self.next_rid,
            lost_span: self.lost_span,
        };
        // Seqs start at 1: 0 is no span.
        let (from, to) = m.lost_span.unwrap_or((0, 0));
        let text = format!(
            "{acked:020} {:020} {:020} {:020} {:020} {from:020} {to:020}\n",
            m.stamp,
            m.handled.map_or(0, |h| h + 1),
            m.lost,
            m.next_rid
        );
        crate::files::write_in_place(&path, text.as_bytes()).map_err(io_err(&path))
    }
}

/// `acked` and its mark, or `acked` alone (an earlier version's spool).
fn parse_cursor(text: &str) -> Option<(u64, Option<Mark>)> {
    let n: Vec<u64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    match n[..] {
        [acked] => Some((acked, None)),
        [acked, stamp, handled, lost, next_rid, from, to] => Some((
            acked,
            Some(Mark {
                stamp,
                handled: handled.checked_sub(1),
                lost,
                next_rid,
                lost_span: (from > 0 && to >= from).then_some((from, to)),
            }),
        )),
        _ => None,
    }
}

fn mark_line(m: &Mark) -> String {
    let mut l = serde_json::to_string(&MarkLine { mark: *m }).expect("marks serialize");
    l.push('\n');
    l
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
        let r = match parse_line(&line) {
            Ok(Line::Record(r)) => r,
            Ok(Line::Mark(_)) => {
                offset += n;
                continue;
            }
            Err(e) => {
                return Err(SpoolError::Corrupt {
                    path: seg.path.clone(),
                    message: format!("at byte {offset}: {e}"),
                });
            }
        };
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

    fn logged(seq: u64) -> serde_json::Value {
        serde_json::json!({ "kind": "decision", "seq": seq, "hash": format!("h{seq}"), "prev": "p" })
    }

    #[test]
    fn an_append_without_its_mark_is_cut_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.handled(), None);
        s.append((1..=5).map(logged).collect()).unwrap();
        assert_eq!(s.handled(), Some(5));
        drop(s);
        // A second append whose records reached the disk and whose mark did not (the
        // process died in between): as if it never was.
        let seg = dir.path().join(format!("{:020}.jsonl", 1));
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        for seq in 6..=7 {
            writeln!(f, "{{\"rid\":{seq},\"record\":{}}}", logged(seq)).unwrap();
        }
        drop(f);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.handled(), Some(5));
        assert_eq!(s.pending(), 5);
        // Read back from the log, they get the ids the cut ones had.
        s.append((6..=7).map(logged).collect()).unwrap();
        let got: Vec<u64> = drain(&mut s, 100)
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(got, (1..=7).collect::<Vec<_>>());
        drop(s);
        // Everything acknowledged: the mark lives on in `acked`.
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((s.handled(), s.pending()), (Some(7), 0));
    }

    #[test]
    fn losses_not_yet_reported_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 8192).unwrap();
        s.append((1..=1000).map(logged).collect()).unwrap();
        let lost = s.lost_total;
        assert!(lost > 0);
        // Every record the spool took counts as handled, lost or not.
        assert_eq!(s.handled(), Some(1000));
        // Two more refused by the control plane: counted, then acknowledged (as the link does).
        s.count_lost(2, None);
        let kept = drain(&mut s, 10_000).len() as u64;
        drop(s);
        let mut s = Spool::open(dir.path(), 8192).unwrap();
        s.append(vec![logged(1001)]).unwrap();
        let got = drain(&mut s, 10_000);
        assert_eq!(got[0]["spool_records_lost"], lost + 2, "{got:?}");
        assert_eq!(kept + lost, 1000);
        // The seqs they were: what did not fit, the last ones.
        assert_eq!(
            got[0]["spool_seqs_lost"],
            serde_json::json!([kept + 1, 1000])
        );
    }

    #[test]
    fn a_spool_of_an_earlier_version_keeps_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append((1..=3).map(rec).collect()).unwrap();
        drop(s);
        // The earlier layout: `acked` alone, no marks in the segments.
        std::fs::write(dir.path().join("acked"), format!("{:020}\n", 0)).unwrap();
        let seg = dir.path().join(format!("{:020}.jsonl", 1));
        let text = std::fs::read_to_string(&seg).unwrap();
        let records: String = text
            .lines()
            .filter(|l| !l.starts_with("{\"mark\""))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&seg, records).unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((s.handled(), s.pending()), (None, 3));
        assert_eq!(drain(&mut s, 100).len(), 3);
    }
}
