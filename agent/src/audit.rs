//! The audit log: append-only JSONL in which every record carries a sequence number, the hash
//! of the record before it and its own hash, so `agentwall audit verify` finds the first
//! record that was changed, removed, reordered or cut short. Rotation by size keeps the chain
//! going: a new file's first record points at the last record of the previous file.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufRead, BufReader, Write},
    path::{Path, PathBuf},
};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The `prev` of the very first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}:{line}: {message}")]
    Broken {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error(
        "{missing} is missing: the chain has rotated files up to {newest}, so records are gone"
    )]
    MissingFile { missing: PathBuf, newest: PathBuf },
    #[error(
        "{path}:1: the chain does not start at its genesis: the first record is seq {seq} with prev {prev}; earlier records are missing, or name the trusted point they continue with --from SEQ:HASH"
    )]
    NoGenesis {
        path: PathBuf,
        seq: u64,
        prev: String,
    },
    #[error(
        "records were cut off the end: the anchor {anchor} says seq {anchor_seq} was written, and the chain ends at seq {last_seq}"
    )]
    CutOff {
        anchor: PathBuf,
        anchor_seq: u64,
        last_seq: u64,
    },
    #[error(
        "{path}:{line}: record seq {seq} is not the one the anchor {anchor} holds (hash {hash}): the log was rewritten"
    )]
    NotAnchored {
        path: PathBuf,
        line: usize,
        seq: u64,
        anchor: PathBuf,
        hash: String,
    },
    #[error("{path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("{path}:{line}: checkpoint seq {seq}: {message}")]
    BadCheckpoint {
        path: PathBuf,
        line: usize,
        seq: u64,
        message: String,
    },
    #[error(
        "{path}:1: the first record is seq {seq} with prev {prev}, not the record after the trusted point (seq {from_seq}, hash {from_hash})"
    )]
    NotFromPoint {
        path: PathBuf,
        seq: u64,
        prev: String,
        from_seq: u64,
        from_hash: String,
    },
}

/// The chain's head as the node last saw it on disk, kept apart from the log (in
/// `state_dir`): records cut off the end of the log are caught against it. Rewritten in
/// place at a fixed size (see [`crate::files::write_in_place`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Anchor {
    /// The log it anchors.
    pub log: PathBuf,
    pub seq: u64,
    pub hash: String,
}

/// Size of the anchor file: its JSON, padded with spaces.
const ANCHOR_LEN: usize = 512;

impl Anchor {
    /// The anchor at `path`, if there is one.
    pub fn read(path: &Path) -> Result<Option<Self>, AuditError> {
        match fs::read_to_string(path) {
            Ok(t) => serde_json::from_str(t.trim())
                .map(Some)
                .map_err(|e| AuditError::Broken {
                    path: path.to_owned(),
                    line: 1,
                    message: format!("not an audit anchor: {e}"),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    fn write(&self, path: &Path) -> Result<(), AuditError> {
        let mut text = serde_json::to_string(self).expect("anchors serialize");
        if text.len() >= ANCHOR_LEN {
            return Err(AuditError::Broken {
                path: path.to_owned(),
                line: 1,
                message: format!(
                    "the audit log's path is too long for an anchor ({} bytes)",
                    text.len()
                ),
            });
        }
        text.extend(std::iter::repeat_n(' ', ANCHOR_LEN - 1 - text.len()));
        text.push('\n');
        crate::files::write_in_place(path, text.as_bytes()).map_err(io_err(path))
    }
}

/// What a checkpoint signs: the chain's head at that moment. Everything up to it is bound
/// by the hash chain, so one signature covers every record before it.
fn checkpoint_message(seq: u64, hash: &str) -> String {
    format!("agentwall audit checkpoint v1\n{seq}\n{hash}\n")
}

/// Names a key in checkpoints: the first 16 bytes of the sha256 of its raw public key, hex.
fn key_id(public: &[u8]) -> String {
    hex::encode(&Sha256::digest(public)[..16])
}

/// The node's checkpoint key: Ed25519, PKCS#8 PEM (`openssl genpkey -algorithm ed25519`).
pub struct Signer {
    pair: ring::signature::Ed25519KeyPair,
    id: String,
}

impl Signer {
    pub fn load(path: &Path) -> Result<Self, AuditError> {
        let key_err = |message: String| AuditError::Key {
            path: path.to_owned(),
            message,
        };
        let der = crate::pem::key(path).map_err(|e| key_err(e.to_string()))?;
        let rustls_pki_types::PrivateKeyDer::Pkcs8(p8) = der else {
            return Err(key_err(
                "not a PKCS#8 key (an Ed25519 key is PKCS#8)".into(),
            ));
        };
        let pair =
            ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(p8.secret_pkcs8_der())
                .map_err(|e| key_err(format!("not an Ed25519 key: {e}")))?;
        use ring::signature::KeyPair as _;
        let id = key_id(pair.public_key().as_ref());
        Ok(Self { pair, id })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The Ed25519 signature of `message`, hex.
    pub fn sign_hex(&self, message: &[u8]) -> String {
        hex::encode(self.pair.sign(message).as_ref())
    }
}

/// A public key checkpoints are checked against (SPKI PEM, `openssl pkey -pubout`).
pub struct SignerKey {
    raw: Vec<u8>,
    id: String,
}

impl SignerKey {
    pub fn load(path: &Path) -> Result<Self, AuditError> {
        let key_err = |message: String| AuditError::Key {
            path: path.to_owned(),
            message,
        };
        use rustls_pki_types::pem::PemObject as _;
        let spki = rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_file(path)
            .map_err(|e| key_err(format!("not a PUBLIC KEY PEM: {e}")))?;
        use x509_parser::prelude::FromDer as _;
        let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki.as_ref())
            .map_err(|e| key_err(format!("not a public key: {e}")))?;
        // id-Ed25519 (RFC 8410).
        if info.algorithm.algorithm.to_id_string() != "1.3.101.112" {
            return Err(key_err(format!(
                "an {} key, not Ed25519",
                info.algorithm.algorithm.to_id_string()
            )));
        }
        let raw = info.subject_public_key.data.to_vec();
        Ok(Self {
            id: key_id(&raw),
            raw,
        })
    }

    /// The key's id, as signatures name it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether `signature_hex` is this key's Ed25519 signature of `message`.
    pub fn verifies(&self, message: &[u8], signature_hex: &str) -> bool {
        let Ok(sig) = hex::decode(signature_hex) else {
            return false;
        };
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &self.raw)
            .verify(message, &sig)
            .is_ok()
    }
}

/// What [`verify_signed`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    /// The last seq a checkpoint signed (with a signer key given).
    pub signed_through: Option<u64>,
    /// Checkpoints checked.
    pub checkpoints: u64,
    /// The chain's last seq.
    pub last_seq: u64,
}

/// Where a verified chain begins: its genesis, or a point an earlier check trusted (the seq
/// and hash of the last record before the files given).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainStart {
    Genesis,
    After { seq: u64, hash: String },
}

/// Who may read the log: it names identities, command lines and the names agents asked for.
/// Its owner, and with a reader group (`audit_log_group`) that group.
fn log_mode(reader_gid: Option<u32>) -> u32 {
    if reader_gid.is_some() { 0o640 } else { 0o600 }
}

fn open_log(path: &Path, reader_gid: Option<u32>) -> Result<File, AuditError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let want = log_mode(reader_gid);
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(want)
        .open(path)
        .map_err(io_err(path))?;
    if let Some(gid) = reader_gid {
        std::os::unix::fs::fchown(&file, None, Some(gid)).map_err(io_err(path))?;
    }
    // A log made by an earlier version (0644), or under another setting, gets this one's.
    let mode = file.metadata().map_err(io_err(path))?.permissions().mode() & 0o777;
    if mode != want {
        file.set_permissions(fs::Permissions::from_mode(want))
            .map_err(io_err(path))?;
    }
    Ok(file)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_owned(),
        source,
    }
}

/// sha256 over the previous hash and the record's JSON without its `hash` field. Keys are
/// sorted (serde_json's map), so writer and verifier (the node's, or the control plane's for
/// the copies it was sent) produce the same bytes.
pub fn record_hash(record: &Map<String, Value>) -> String {
    // A record being written has no hash yet: hashed as it is, without a copy.
    let text = if record.contains_key("hash") {
        let mut r = record.clone();
        r.remove("hash");
        serde_json::to_string(&r)
    } else {
        serde_json::to_string(record)
    }
    .expect("records serialize");
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// An open audit log.
pub struct AuditLog {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    seq: u64,
    prev: String,
    /// The seq the anchor holds.
    anchored: u64,
    /// The last record there was when the log was opened.
    last: Option<Map<String, Value>>,
    /// The kernel events of the last records there were when the log was opened.
    recent_events: Vec<String>,
    /// The group that may read the log, if any.
    reader_gid: Option<u32>,
    /// The second file records are also written to as OCSF events, if any.
    ocsf: Option<OcsfCopy>,
}

/// The OCSF file of `audit_format = "ocsf"`: a copy for SIEMs that tail files. The native
/// log stays the record of truth; a record the copy could not take is counted.
struct OcsfCopy {
    path: PathBuf,
    file: File,
    size: u64,
    failures: u64,
}

impl AuditLog {
    /// Opens `path` for appending, continuing the chain of what is already there (or of the
    /// newest rotated file when `path` is new); readable by its owner only.
    pub fn open(path: &Path, max_bytes: u64) -> Result<Self, AuditError> {
        Self::open_for(path, max_bytes, None)
    }

    /// [`AuditLog::open`], the log and its rotations also readable by group `reader_gid`.
    pub fn open_for(
        path: &Path,
        max_bytes: u64,
        reader_gid: Option<u32>,
    ) -> Result<Self, AuditError> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let (mut seq, mut prev, mut last) = (0, GENESIS.to_owned(), None);
        let mut recent_events = Vec::new();
        let mut sources: Vec<PathBuf> = rotated(path).into_iter().map(|(_, p)| p).collect();
        sources.push(path.to_owned());
        for p in sources.iter().rev() {
            let Tail {
                last: found,
                events,
            } = tail(p)?;
            if let Some(r) = found {
                recent_events = events;
                seq = r.get("seq").and_then(Value::as_u64).unwrap_or(0);
                prev = r
                    .get("hash")
                    .and_then(Value::as_str)
                    .unwrap_or(GENESIS)
                    .to_owned();
                last = Some(r);
                break;
            }
        }
        let file = open_log(path, reader_gid)?;
        let size = file.metadata().map_err(io_err(path))?.len();
        Ok(Self {
            path: path.to_owned(),
            file,
            size,
            max_bytes,
            seq,
            prev,
            anchored: 0,
            last,
            recent_events,
            reader_gid,
            ocsf: None,
        })
    }

    /// Also writes each record appended from now on to `path` as an OCSF event, one a
    /// line, rotated as the log is (records of kinds OCSF has no class for, such as policy
    /// changes and checkpoints, are in the native log only).
    pub fn copy_as_ocsf(&mut self, path: &Path) -> Result<(), AuditError> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let file = open_log(path, self.reader_gid)?;
        let size = file.metadata().map_err(io_err(path))?.len();
        self.ocsf = Some(OcsfCopy {
            path: path.to_owned(),
            file,
            size,
            failures: 0,
        });
        Ok(())
    }

    /// Records the OCSF file could not take (a full disk, say).
    pub fn ocsf_failures(&self) -> u64 {
        self.ocsf.as_ref().map_or(0, |c| c.failures)
    }

    /// The last record there was when the log was opened.
    pub fn last_record(&self) -> Option<&Map<String, Value>> {
        self.last.as_ref()
    }

    /// The kernel events (see [`crate::flows::FlowRecord::kernel_event`]) of the last
    /// records there were when the log was opened: other records may have been written
    /// between an event's record and the node letting go of it.
    pub fn recent_events(&self) -> &[String] {
        &self.recent_events
    }

    /// The chain's head: the last record's seq and hash.
    pub fn head(&self) -> (u64, &str) {
        (self.seq, &self.prev)
    }

    /// Appends a `checkpoint` record signing the chain's head with `signer`: the record as
    /// written.
    pub fn sign_checkpoint(
        &mut self,
        signer: &Signer,
    ) -> Result<(u64, Map<String, Value>), AuditError> {
        let (seq, hash) = (self.seq, self.prev.clone());
        let signature = signer.sign_hex(checkpoint_message(seq, &hash).as_bytes());
        self.append_record(
            "checkpoint",
            serde_json::json!({
                "signed_seq": seq,
                "signed_hash": hash,
                "key": signer.id,
                "signature": signature,
            }),
        )
    }

    /// Puts what was written on disk, then moves the anchor at `path` to the chain's head.
    /// Nothing to do when the head has not moved since.
    pub fn anchor_to(&mut self, path: &Path) -> Result<(), AuditError> {
        if self.seq == self.anchored {
            return Ok(());
        }
        self.file.sync_data().map_err(io_err(&self.path))?;
        crate::failpoint!("audit-before-anchor");
        Anchor {
            log: self.path.clone(),
            seq: self.seq,
            hash: self.prev.clone(),
        }
        .write(path)?;
        self.anchored = self.seq;
        Ok(())
    }

    /// Appends one record: `kind` plus `fields`, stamped with seq, time, prev and hash.
    pub fn append(&mut self, kind: &str, fields: Value) -> Result<u64, AuditError> {
        self.append_record(kind, fields).map(|(seq, _)| seq)
    }

    /// [`AuditLog::append`], also returning the record as written (what the control plane is
    /// sent, so it can check the chain too).
    pub fn append_record(
        &mut self,
        kind: &str,
        fields: Value,
    ) -> Result<(u64, Map<String, Value>), AuditError> {
        crate::failpoint!("audit-before-append");
        let mut r = match fields {
            Value::Object(m) => m,
            other => {
                let mut m = Map::new();
                m.insert("value".into(), other);
                m
            }
        };
        self.seq += 1;
        r.insert("seq".into(), self.seq.into());
        r.insert("kind".into(), kind.into());
        r.insert("time".into(), crate::clock::now_rfc3339().into());
        r.insert("prev".into(), self.prev.clone().into());
        let hash = record_hash(&r);
        r.insert("hash".into(), hash.clone().into());
        let mut line = serde_json::to_string(&r).expect("records serialize");
        line.push('\n');
        if self.max_bytes > 0 && self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        if let Err(e) = self.file.write_all(line.as_bytes()) {
            // Nothing half-written stays (a full disk, say): cut back to the last whole record
            // and give the sequence number back, so the chain continues intact once writes
            // succeed again and the caller's loss record accounts for the gap.
            let _ = self.file.set_len(self.size);
            self.seq -= 1;
            return Err(io_err(&self.path)(e));
        }
        self.size += line.len() as u64;
        self.prev = hash;
        if let Some(c) = &mut self.ocsf {
            c.write(line.trim_end(), self.max_bytes, self.reader_gid);
        }
        crate::failpoint!("audit-after-append");
        Ok((self.seq, r))
    }

    /// The records after seq `after`, oldest first, at most `max` of them (how many more
    /// there were, and the first and last of their seqs, are returned too): read back from
    /// the files, the current one and as many rotated ones as reach back to `after`. A log
    /// whose head is behind `after` was started again (a new chain): all of its current file
    /// is returned.
    pub fn records_after(&self, after: u64, max: usize) -> Result<RecordsAfter, AuditError> {
        let restarted = self.seq < after;
        let mut files = vec![self.path.clone()];
        if !restarted {
            for (_, p) in rotated(&self.path).into_iter().rev() {
                match first_seq(files.last().expect("one file"))? {
                    Some(first) if first <= after + 1 => break,
                    _ => files.push(p),
                }
            }
        }
        let (mut out, mut more, mut more_span) = (Vec::new(), 0u64, None::<(u64, u64)>);
        for p in files.iter().rev() {
            let f = match File::open(p) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(p)(e)),
            };
            for line in BufReader::new(f).lines() {
                let line = line.map_err(io_err(p))?;
                let Ok(Value::Object(r)) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let seq = r.get("seq").and_then(Value::as_u64).unwrap_or(0);
                if !restarted && seq <= after {
                    continue;
                }
                if out.len() < max {
                    out.push(r);
                } else {
                    more += 1;
                    more_span = crate::control_plane::spool::widen(more_span, Some(seq));
                }
            }
        }
        Ok((out, more, more_span))
    }

    fn rotate(&mut self) -> Result<(), AuditError> {
        self.file.sync_all().map_err(io_err(&self.path))?;
        let to = next_rotated(&self.path);
        crate::failpoint!("audit-before-rotate");
        fs::rename(&self.path, &to).map_err(io_err(&self.path))?;
        crate::failpoint!("audit-after-rotate");
        self.file = open_log(&self.path, self.reader_gid)?;
        self.size = 0;
        Ok(())
    }
}

/// The name `path` is rotated to: after the newest, even if older ones were removed, so
/// numbers are never reused.
fn next_rotated(path: &Path) -> PathBuf {
    let n = rotated(path).last().map_or(0, |(n, _)| *n) + 1;
    PathBuf::from(format!("{}.{n}", path.display()))
}

impl OcsfCopy {
    fn write(&mut self, record: &str, max_bytes: u64, reader_gid: Option<u32>) {
        let Ok(raw) = serde_json::from_str::<&serde_json::value::RawValue>(record) else {
            return;
        };
        let Some(event) = crate::ocsf::event(raw, crate::ocsf::Origin::Log) else {
            return;
        };
        let mut line = serde_json::to_string(&event).expect("events serialize");
        line.push('\n');
        let written = (|| {
            if max_bytes > 0 && self.size > 0 && self.size + line.len() as u64 > max_bytes {
                fs::rename(&self.path, next_rotated(&self.path)).map_err(io_err(&self.path))?;
                self.file = open_log(&self.path, reader_gid)?;
                self.size = 0;
            }
            self.file
                .write_all(line.as_bytes())
                .map_err(io_err(&self.path))
        })();
        match written {
            Ok(()) => self.size += line.len() as u64,
            Err(e) => {
                // Nothing half-written stays: the file is cut back to its last whole event.
                let _ = self.file.set_len(self.size);
                self.failures += 1;
                if self.failures.is_power_of_two() {
                    tracing::error!(error = %e, failures = self.failures,
                        "audit records not written to the OCSF file (counted in agentwall_audit_ocsf_write_failures_total)");
                }
            }
        }
    }
}

/// What [`AuditLog::records_after`] read: the records, how many more there were, and the
/// span of their seqs.
pub type RecordsAfter = (Vec<Map<String, Value>>, u64, Option<(u64, u64)>);

/// Rotated files of `path` (`path.1`, `path.2`, ...) with their numbers, oldest first:
/// every one there is, gaps or not.
pub fn rotated(path: &Path) -> Vec<(u64, PathBuf)> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let mut found: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let n = e
                .file_name()
                .to_str()?
                .strip_prefix(name)?
                .strip_prefix('.')?
                .parse::<u64>()
                .ok()?;
            Some((n, path.with_file_name(format!("{name}.{n}"))))
        })
        .collect();
    found.sort();
    found
}

/// The files of `path`'s whole chain, oldest first: its rotated files, which must run
/// from `path.1` without a gap, then `path` itself.
pub fn chain_files(path: &Path) -> Result<Vec<PathBuf>, AuditError> {
    let rotated = rotated(path);
    let mut files = Vec::with_capacity(rotated.len() + 1);
    for (i, (n, p)) in rotated.iter().enumerate() {
        let want = i as u64 + 1;
        if *n != want {
            return Err(AuditError::MissingFile {
                missing: path.with_file_name(format!(
                    "{}.{want}",
                    path.file_name()
                        .and_then(|f| f.to_str())
                        .unwrap_or_default()
                )),
                newest: rotated.last().map(|(_, p)| p.clone()).unwrap_or_default(),
            });
        }
        files.push(p.clone());
    }
    files.push(path.to_owned());
    Ok(files)
}

/// The seq of the first record of `path`, if it has one.
fn first_seq(path: &Path) -> Result<Option<u64>, AuditError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    for line in BufReader::new(f).lines() {
        let line = line.map_err(io_err(path))?;
        if let Ok(Value::Object(m)) = serde_json::from_str(&line) {
            return Ok(m.get("seq").and_then(Value::as_u64));
        }
    }
    Ok(None)
}

/// Kernel events of a file's last records kept (see [`AuditLog::recent_events`]).
const RECENT_EVENTS: usize = 64;

/// A file's last record, and the `kernel_event`s of its last [`RECENT_EVENTS`] records that
/// name one.
struct Tail {
    last: Option<Map<String, Value>>,
    events: Vec<String>,
}

fn tail(path: &Path) -> Result<Tail, AuditError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Tail {
                last: None,
                events: Vec::new(),
            });
        }
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut last = None;
    let mut events = std::collections::VecDeque::with_capacity(RECENT_EVENTS);
    for line in BufReader::new(f).lines() {
        let line = line.map_err(io_err(path))?;
        if let Ok(Value::Object(m)) = serde_json::from_str(&line) {
            if let Some(e) = m.get("kernel_event").and_then(Value::as_str) {
                if events.len() == RECENT_EVENTS {
                    events.pop_front();
                }
                events.push_back(e.to_owned());
            }
            last = Some(m);
        }
    }
    Ok(Tail {
        last,
        events: events.into(),
    })
}

/// Checks a chain of files (oldest first) that begins at `start` and, with an anchor (and its
/// path), reaches the record it holds. Returns the number of records, or the first broken
/// one with its file and line.
pub fn verify(
    files: &[PathBuf],
    start: &ChainStart,
    anchor: Option<(&Anchor, &Path)>,
) -> Result<u64, AuditError> {
    verify_signed(files, start, anchor, None).map(|v| v.records)
}

/// [`verify`], and with `signer` every `checkpoint` record's signature: each must be made
/// with that key over the record just before it. A chain rewritten by someone without the
/// key (root on the node, a copy edited elsewhere) fails at its first checkpoint after the
/// change.
pub fn verify_signed(
    files: &[PathBuf],
    start: &ChainStart,
    anchor: Option<(&Anchor, &Path)>,
    signer: Option<&SignerKey>,
) -> Result<Verified, AuditError> {
    let mut found = Verified::default();
    let (mut expect_seq, mut prev) = match start {
        ChainStart::Genesis => (Some(1), Some(GENESIS.to_owned())),
        ChainStart::After { seq, hash } => (Some(seq.saturating_add(1)), Some(hash.clone())),
    };
    let mut count = 0;
    for path in files {
        let f = File::open(path).map_err(io_err(path))?;
        for (i, line) in BufReader::new(f).lines().enumerate() {
            let line = line.map_err(io_err(path))?;
            let broken = |message: String| AuditError::Broken {
                path: path.clone(),
                line: i + 1,
                message,
            };
            let Ok(Value::Object(r)) = serde_json::from_str::<Value>(&line) else {
                return Err(broken("not a JSON record (cut short or edited)".into()));
            };
            let seq = r
                .get("seq")
                .and_then(Value::as_u64)
                .ok_or_else(|| broken("record has no seq".into()))?;
            let want = expect_seq.unwrap_or(seq);
            let p = r.get("prev").and_then(Value::as_str).unwrap_or("");
            if count == 0 && (seq != want || Some(p) != prev.as_deref()) {
                return Err(match start {
                    ChainStart::Genesis => AuditError::NoGenesis {
                        path: path.clone(),
                        seq,
                        prev: p.to_owned(),
                    },
                    ChainStart::After { seq: s, hash } => AuditError::NotFromPoint {
                        path: path.clone(),
                        seq,
                        prev: p.to_owned(),
                        from_seq: *s,
                        from_hash: hash.clone(),
                    },
                });
            }
            if seq != want {
                return Err(broken(format!(
                    "record seq {seq} where seq {want} was expected (records missing or reordered)"
                )));
            }
            let stored = r.get("hash").and_then(Value::as_str).unwrap_or("");
            if record_hash(&r) != stored {
                return Err(broken(format!(
                    "record seq {seq} does not match its hash (it was changed)"
                )));
            }
            if let Some(before) = &prev {
                if p != before {
                    return Err(broken(format!(
                        "record seq {seq} does not follow the record before it (prev hash differs)"
                    )));
                }
            }
            if let Some(key) = signer
                && r.get("kind").and_then(Value::as_str) == Some("checkpoint")
            {
                let bad = |message: String| AuditError::BadCheckpoint {
                    path: path.clone(),
                    line: i + 1,
                    seq,
                    message,
                };
                let signed_seq = r.get("signed_seq").and_then(Value::as_u64);
                let signed_hash = r.get("signed_hash").and_then(Value::as_str).unwrap_or("");
                if r.get("key").and_then(Value::as_str) != Some(key.id.as_str()) {
                    return Err(bad(format!(
                        "signed by key {}, not by the key given ({})",
                        r.get("key").and_then(Value::as_str).unwrap_or("?"),
                        key.id
                    )));
                }
                if signed_seq != Some(seq - 1) || signed_hash != p {
                    return Err(bad(
                        "does not sign the record before it (the chain was rewritten around it)"
                            .into(),
                    ));
                }
                let sig = r
                    .get("signature")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if !key.verifies(checkpoint_message(seq - 1, signed_hash).as_bytes(), sig) {
                    return Err(bad(
                        "its signature does not verify (forged, or the records it signs were changed)"
                            .into(),
                    ));
                }
                found.checkpoints += 1;
                found.signed_through = Some(seq - 1);
            }
            if let Some((a, at)) = anchor
                && a.seq == seq
                && a.hash != stored
            {
                return Err(AuditError::NotAnchored {
                    path: path.clone(),
                    line: i + 1,
                    seq,
                    anchor: at.to_owned(),
                    hash: a.hash.clone(),
                });
            }
            prev = Some(stored.to_owned());
            expect_seq = Some(seq + 1);
            count += 1;
        }
    }
    let last_seq = expect_seq.map_or(0, |s| s - 1);
    if let Some((a, at)) = anchor
        && a.seq > last_seq
    {
        return Err(AuditError::CutOff {
            anchor: at.to_owned(),
            anchor_seq: a.seq,
            last_seq,
        });
    }
    found.records = count;
    found.last_seq = last_seq;
    Ok(found)
}

/// A record's top-level fields, read from its text without building the tree below them:
/// what reads records by the page (exports, forwarding) spends on each what the fields it
/// looks at need, however large or deep a hostile node made the rest. A field of another
/// JSON type than asked for reads as absent; of a repeated key, the last counts.
pub struct RecordView<'a> {
    fields: std::collections::HashMap<String, &'a serde_json::value::RawValue>,
}

/// A record's top-level fields, however it is held: parsed ([`serde_json::Value`], as a
/// node reads its own log) or as text ([`RecordView`], as the control plane reads stored
/// records).
pub trait Fields {
    /// A string field.
    fn text(&self, k: &str) -> Option<String>;
    /// A whole number from 0 to 2^64 - 1.
    fn u64(&self, k: &str) -> Option<u64>;
}

impl Fields for Value {
    fn text(&self, k: &str) -> Option<String> {
        self.get(k).and_then(Value::as_str).map(str::to_owned)
    }

    fn u64(&self, k: &str) -> Option<u64> {
        self.get(k).and_then(Value::as_u64)
    }
}

impl Fields for RecordView<'_> {
    fn text(&self, k: &str) -> Option<String> {
        RecordView::text(self, k)
    }

    fn u64(&self, k: &str) -> Option<u64> {
        RecordView::u64(self, k)
    }
}

impl<'a> RecordView<'a> {
    /// None when `text` is not a JSON object.
    pub fn parse(text: &'a str) -> Option<Self> {
        serde_json::from_str(text)
            .ok()
            .map(|fields| Self { fields })
    }

    pub fn has(&self, k: &str) -> bool {
        self.fields.contains_key(k)
    }

    /// A string field.
    pub fn text(&self, k: &str) -> Option<String> {
        serde_json::from_str(self.fields.get(k)?.get()).ok()
    }

    /// A whole number from 0 to 2^64 - 1.
    pub fn u64(&self, k: &str) -> Option<u64> {
        serde_json::from_str(self.fields.get(k)?.get()).ok()
    }

    /// The strings of an array field (its other elements left out).
    pub fn texts(&self, k: &str) -> Vec<String> {
        self.fields
            .get(k)
            .and_then(|v| serde_json::from_str::<Vec<&serde_json::value::RawValue>>(v.get()).ok())
            .into_iter()
            .flatten()
            .filter_map(|v| serde_json::from_str(v.get()).ok())
            .collect()
    }

    /// The string members of an object field, by name (its other members left out).
    pub fn text_map(&self, k: &str) -> Vec<(String, String)> {
        self.fields
            .get(k)
            .and_then(|v| {
                serde_json::from_str::<
                    std::collections::BTreeMap<String, &serde_json::value::RawValue>,
                >(v.get())
                .ok()
            })
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k, serde_json::from_str(v.get()).ok()?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(dir: &Path, n: usize, max: u64) -> PathBuf {
        let p = dir.join("audit.jsonl");
        let mut log = AuditLog::open(&p, max).unwrap();
        for i in 0..n {
            log.append(
                "deny",
                serde_json::json!({ "port": i, "dest": "192.0.2.1" }),
            )
            .unwrap();
        }
        p
    }

    fn lines(p: &Path) -> Vec<String> {
        fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write(p: &Path, l: &[String]) {
        fs::write(p, l.iter().map(|x| format!("{x}\n")).collect::<String>()).unwrap();
    }

    #[test]
    fn chain_verifies_and_continues_after_reopen() {
        let d = tempfile::tempdir().unwrap();
        let p = log_with(d.path(), 5, 0);
        let mut log = AuditLog::open(&p, 0).unwrap();
        assert_eq!(log.append("policy", serde_json::json!({})).unwrap(), 6);
        assert_eq!(verify(&[p], &ChainStart::Genesis, None).unwrap(), 6);
    }

    #[test]
    fn tampering_is_caught_at_the_right_record() {
        let d = tempfile::tempdir().unwrap();
        let p = log_with(d.path(), 5, 0);
        let orig = lines(&p);

        let mut l = orig.clone();
        l[2] = l[2].replace("192.0.2.1", "192.0.2.2");
        write(&p, &l);
        assert_eq!(
            verify(std::slice::from_ref(&p), &ChainStart::Genesis, None)
                .unwrap_err()
                .to_string(),
            format!(
                "{}:3: record seq 3 does not match its hash (it was changed)",
                p.display()
            )
        );

        let mut l = orig.clone();
        l.remove(1);
        write(&p, &l);
        assert_eq!(
            verify(std::slice::from_ref(&p), &ChainStart::Genesis, None)
                .unwrap_err()
                .to_string(),
            format!(
                "{}:2: record seq 3 where seq 2 was expected (records missing or reordered)",
                p.display()
            )
        );

        let mut l = orig.clone();
        l.swap(3, 4);
        write(&p, &l);
        assert!(
            verify(std::slice::from_ref(&p), &ChainStart::Genesis, None)
                .unwrap_err()
                .to_string()
                .starts_with(&format!("{}:4: record seq 5", p.display()))
        );

        let mut l = orig.clone();
        l[4].truncate(20);
        write(&p, &l);
        assert_eq!(
            verify(std::slice::from_ref(&p), &ChainStart::Genesis, None)
                .unwrap_err()
                .to_string(),
            format!("{}:5: not a JSON record (cut short or edited)", p.display())
        );
    }

    #[test]
    fn an_ocsf_copy_takes_every_mapped_record_and_rotates_with_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let ocsf = dir.path().join("audit.ocsf.jsonl");
        let mut log = AuditLog::open(&p, 2_000).unwrap();
        log.copy_as_ocsf(&ocsf).unwrap();
        for i in 0..20 {
            log.append(
                "decision",
                serde_json::json!({ "verdict": "deny", "port": i, "dest": "192.0.2.1" }),
            )
            .unwrap();
            // No OCSF class: in the native log only.
            log.append("policy", serde_json::json!({ "event": "applied" }))
                .unwrap();
        }
        let mut files: Vec<PathBuf> = rotated(&ocsf).into_iter().map(|(_, p)| p).collect();
        assert!(!files.is_empty(), "the OCSF file was never rotated");
        files.push(ocsf.clone());
        let ports: Vec<u64> = files
            .iter()
            .flat_map(|f| lines(f))
            .map(|l| {
                let e: Value = serde_json::from_str(&l).unwrap();
                assert_eq!(e["class_uid"], 4001);
                e["dst_endpoint"]["port"].as_u64().unwrap()
            })
            .collect();
        assert_eq!(ports, (0..20).collect::<Vec<u64>>());
        // The log's own rotations are the log's: the chain never counts the OCSF files.
        assert!(
            rotated(&p)
                .iter()
                .all(|(_, f)| !f.to_string_lossy().contains("ocsf"))
        );
        assert_eq!(log.ocsf_failures(), 0);
    }

    #[test]
    fn rotation_keeps_the_chain_across_files() {
        let d = tempfile::tempdir().unwrap();
        let p = log_with(d.path(), 20, 600);
        let files = chain_files(&p).unwrap();
        assert!(files.len() >= 3, "{files:?}");
        assert_eq!(verify(&files, &ChainStart::Genesis, None).unwrap(), 20);
        // Dropping a middle file breaks the chain where the next file starts.
        let without: Vec<PathBuf> = files.iter().filter(|f| **f != files[1]).cloned().collect();
        assert!(
            verify(&without, &ChainStart::Genesis, None)
                .unwrap_err()
                .to_string()
                .contains("records missing or reordered")
        );
    }

    #[test]
    fn a_missing_file_or_a_chain_without_its_start_fails() {
        let d = tempfile::tempdir().unwrap();
        let p = log_with(d.path(), 20, 600);
        let files = chain_files(&p).unwrap();
        let gone = lines(&files[0]);
        // The oldest rotated file deleted: named, whichever rotated files are left.
        fs::remove_file(&files[0]).unwrap();
        let err = chain_files(&p).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{} is missing", files[0].display())),
            "{err}"
        );
        // Given only what is left, the chain has no genesis.
        let rest = &files[1..];
        let err = verify(rest, &ChainStart::Genesis, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not start at its genesis"), "{err}");
        // With the trusted point those files continue, they verify.
        let last_gone = gone.last().cloned().unwrap();
        let r: Map<String, Value> = serde_json::from_str(&last_gone).unwrap();
        let from = ChainStart::After {
            seq: r["seq"].as_u64().unwrap(),
            hash: r["hash"].as_str().unwrap().to_owned(),
        };
        let n = verify(rest, &from, None).unwrap();
        assert_eq!(n, 20 - gone.len() as u64);
        // A rotation after the gap numbers on from the newest file, never reusing one.
        let mut log = AuditLog::open(&p, 600).unwrap();
        for i in 0..10 {
            log.append("deny", serde_json::json!({ "port": i }))
                .unwrap();
        }
        let numbers: Vec<u64> = rotated(&p).into_iter().map(|(n, _)| n).collect();
        assert!(!numbers.contains(&1), "{numbers:?}");
    }

    #[test]
    fn records_cut_off_the_end_are_caught_against_the_anchor() {
        let d = tempfile::tempdir().unwrap();
        let p = log_with(d.path(), 5, 0);
        let anchor_path = d.path().join("audit.anchor");
        let mut log = AuditLog::open(&p, 0).unwrap();
        log.append("deny", serde_json::json!({ "port": 9 }))
            .unwrap();
        log.anchor_to(&anchor_path).unwrap();
        assert_eq!(fs::metadata(&anchor_path).unwrap().len(), ANCHOR_LEN as u64);
        let anchor = Anchor::read(&anchor_path).unwrap().unwrap();
        assert_eq!((anchor.seq, anchor.log.as_path()), (6, p.as_path()));
        let files = chain_files(&p).unwrap();
        let with = Some((&anchor, anchor_path.as_path()));
        assert_eq!(verify(&files, &ChainStart::Genesis, with).unwrap(), 6);
        // The last two records cut away: the chain itself is intact, the anchor is not met.
        let l = lines(&p);
        write(&p, &l[..4]);
        assert_eq!(verify(&files, &ChainStart::Genesis, None).unwrap(), 4);
        assert_eq!(
            verify(&files, &ChainStart::Genesis, with)
                .unwrap_err()
                .to_string(),
            format!(
                "records were cut off the end: the anchor {} says seq 6 was written, and the chain ends at seq 4",
                anchor_path.display()
            )
        );
    }

    #[test]
    fn a_reader_group_may_read_the_log_and_nobody_else() {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.jsonl");
        // SAFETY: plain syscall.
        let gid = unsafe { libc::getgid() };
        let mut log = AuditLog::open_for(&p, 600, Some(gid)).unwrap();
        for i in 0..20 {
            log.append("deny", serde_json::json!({ "port": i }))
                .unwrap();
        }
        for f in chain_files(&p).unwrap() {
            let m = fs::metadata(&f).unwrap();
            assert_eq!(m.permissions().mode() & 0o777, 0o640, "{}", f.display());
            assert_eq!(m.gid(), gid, "{}", f.display());
        }
    }

    #[test]
    fn the_log_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.jsonl");
        fs::write(&p, "").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let p = log_with(d.path(), 20, 600);
        for f in chain_files(&p).unwrap() {
            let mode = fs::metadata(&f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", f.display());
        }
    }

    /// An Ed25519 key pair in `dir`: (private PEM, public PEM).
    fn ed25519(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let (private, public) = (
            dir.join(format!("{name}.key")),
            dir.join(format!("{name}.pub")),
        );
        fs::write(&private, k.serialize_pem()).unwrap();
        fs::write(&public, k.public_key_pem()).unwrap();
        (private, public)
    }

    #[test]
    fn signed_checkpoints_verify_and_a_chain_rewritten_without_the_key_does_not() {
        let d = tempfile::tempdir().unwrap();
        let (private, public) = ed25519(d.path(), "node");
        let (_, other) = ed25519(d.path(), "other");
        let signer = Signer::load(&private).unwrap();
        let key = SignerKey::load(&public).unwrap();
        let p = d.path().join("audit.jsonl");
        let mut log = AuditLog::open(&p, 0).unwrap();
        for i in 0..3 {
            log.append("deny", serde_json::json!({ "port": i }))
                .unwrap();
        }
        log.sign_checkpoint(&signer).unwrap();
        log.append("deny", serde_json::json!({ "port": 9 }))
            .unwrap();
        let files = chain_files(&p).unwrap();
        let v = verify_signed(&files, &ChainStart::Genesis, None, Some(&key)).unwrap();
        assert_eq!(
            (v.records, v.checkpoints, v.signed_through, v.last_seq),
            (5, 1, Some(3), 5)
        );
        // Another key's checkpoints are not these.
        let wrong = SignerKey::load(&other).unwrap();
        let e = verify_signed(&files, &ChainStart::Genesis, None, Some(&wrong))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not by the key given"), "{e}");
        // Root on the node changes record 2 and re-hashes everything after it, checkpoint
        // included: the hash chain holds, the signature does not.
        let mut records: Vec<Map<String, Value>> = lines(&p)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        records[1].insert("port".into(), 99.into());
        let mut prev = GENESIS.to_owned();
        for r in &mut records {
            r.insert("prev".into(), prev.clone().into());
            if r["kind"] == "checkpoint" {
                r.insert("signed_hash".into(), prev.clone().into());
            }
            let h = record_hash(r);
            r.insert("hash".into(), h.clone().into());
            prev = h;
        }
        write(
            &p,
            &records
                .iter()
                .map(|r| Value::Object(r.clone()).to_string())
                .collect::<Vec<_>>(),
        );
        assert!(verify(&files, &ChainStart::Genesis, None).is_ok());
        let e = verify_signed(&files, &ChainStart::Genesis, None, Some(&key))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":4: checkpoint seq 4: its signature does not verify"),
            "{e}"
        );
    }
}
