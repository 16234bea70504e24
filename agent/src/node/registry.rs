//! The identity registry: the number the datapath knows each SPIFFE ID by, and the identities
//! revoked on this node. Numbers are kept for good (a binding made under a number must never
//! come to mean another identity) and revocations survive reloads and restarts; both live in
//! `state_dir/identities.json`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use crate::policy::IdentityStatus;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not an identity table: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "the policy needs {total} identities ({known} known to this node, {new} new); the datapath holds at most {max}: nothing was applied",
        total = known + new
    )]
    Capacity {
        known: usize,
        new: usize,
        max: usize,
    },
    #[error("{path}: identity number {number} is given twice ({first} and {second})")]
    Duplicate {
        path: PathBuf,
        number: u32,
        first: String,
        second: String,
    },
    #[error(
        "no identity number is left for the node's self-check: the {used} numbers the datapath holds are taken"
    )]
    NoSelfCheckNumber { used: u32 },
}

/// How the self-check's own number appears where an identity's name would: no policy can
/// name it (identities are SPIFFE IDs).
pub const SELF_CHECK: &str = "agentwall:self-check";

/// Numbers ↔ SPIFFE IDs, immutable once published.
#[derive(Debug, Default)]
pub struct IdentityTable {
    by_name: HashMap<Arc<str>, u32>,
    by_number: HashMap<u32, Arc<str>>,
}

impl IdentityTable {
    pub fn number(&self, id: &str) -> Option<u32> {
        self.by_name.get(id).copied()
    }

    /// The SPIFFE ID behind a number.
    pub fn name(&self, number: u32) -> Option<&str> {
        self.by_number.get(&number).map(|s| &**s)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Every known (SPIFFE ID, number).
    pub fn iter(&self) -> impl Iterator<Item = (&str, u32)> {
        self.by_name.iter().map(|(k, &v)| (&**k, v))
    }
}

/// `identities.json`, as it has always been written.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct File {
    numbers: BTreeMap<String, u32>,
    #[serde(default)]
    revoked: BTreeSet<String>,
    /// The number the node's self-check binds its canary to: numbered like an identity (so
    /// no identity ever gets it), and none of a policy's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    self_check: Option<u32>,
}

impl File {
    /// The highest number given, the self-check's included.
    fn last_number(&self) -> u32 {
        self.numbers
            .values()
            .copied()
            .chain(self.self_check)
            .max()
            .unwrap_or(0)
    }
}

struct State {
    file: File,
    table: Arc<IdentityTable>,
}

pub struct Registry {
    path: PathBuf,
    state: Mutex<State>,
}

/// Where the registry keeps the identity numbers.
pub fn kept(state_dir: &Path) -> PathBuf {
    state_dir.join("identities.json")
}

impl Registry {
    pub fn load(state_dir: &Path) -> Result<Self, RegistryError> {
        let path = kept(state_dir);
        let file: File = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| RegistryError::Corrupt {
                    path: path.clone(),
                    source,
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => File::default(),
            Err(source) => return Err(RegistryError::Io { path, source }),
        };
        // A number given twice would put two identities (or an identity and the self-check)
        // under one binding's rules and state.
        let mut seen: HashMap<u32, &str> = HashMap::new();
        let given = file
            .numbers
            .iter()
            .map(|(id, &n)| (id.as_str(), n))
            .chain(file.self_check.map(|n| (SELF_CHECK, n)));
        for (id, n) in given {
            if let Some(first) = seen.insert(n, id) {
                return Err(RegistryError::Duplicate {
                    path,
                    number: n,
                    first: first.to_owned(),
                    second: id.to_owned(),
                });
            }
        }
        let table = Arc::new(Self::table_of(&file));
        Ok(Self {
            path,
            state: Mutex::new(State { file, table }),
        })
    }

    fn table_of(file: &File) -> IdentityTable {
        let mut t = IdentityTable::default();
        for (id, &n) in &file.numbers {
            let id: Arc<str> = id.as_str().into();
            t.by_name.insert(id.clone(), n);
            t.by_number.insert(n, id);
        }
        t
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn save(&self, file: &File) -> Result<(), RegistryError> {
        let text = serde_json::to_vec_pretty(file).expect("serializable");
        crate::files::write_atomic(&self.path, &text).map_err(|source| RegistryError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Every known identity, numbered.
    pub fn table(&self) -> Arc<IdentityTable> {
        self.lock().table.clone()
    }

    /// Numbers every identity of `ids` that has none, refused whole when the table (at most
    /// `max` identities, known ones included) cannot hold them all.
    pub fn assign<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a str>,
        max: usize,
    ) -> Result<Arc<IdentityTable>, RegistryError> {
        let mut st = self.lock();
        // Numbered in the order given (the policy's), each once.
        let mut seen = std::collections::HashSet::new();
        let new: Vec<&str> = ids
            .into_iter()
            .filter(|id| !st.file.numbers.contains_key(*id) && seen.insert(*id))
            .collect();
        if new.is_empty() {
            return Ok(st.table.clone());
        }
        let known = st.file.numbers.len();
        if known + new.len() > max {
            return Err(RegistryError::Capacity {
                known,
                new: new.len(),
                max,
            });
        }
        let first = st.file.last_number() + 1;
        let mut file = File {
            numbers: st.file.numbers.clone(),
            revoked: st.file.revoked.clone(),
            self_check: st.file.self_check,
        };
        for (n, id) in (first..).zip(new) {
            file.numbers.insert(id.to_owned(), n);
        }
        self.save(&file)?;
        st.table = Arc::new(Self::table_of(&file));
        st.file = file;
        Ok(st.table.clone())
    }

    /// Whether `number` is one this table gave (an identity's or the self-check's).
    pub fn gave(&self, number: u32) -> bool {
        let st = self.lock();
        st.file.self_check == Some(number) || st.table.name(number).is_some()
    }

    /// The self-check's number, given (and kept) the first time it is asked for. At most
    /// `max` (the datapath's last identity number).
    pub fn self_check_number(&self, max: u32) -> Result<u32, RegistryError> {
        let mut st = self.lock();
        if let Some(n) = st.file.self_check {
            return Ok(n);
        }
        let n = st.file.last_number() + 1;
        if n > max {
            return Err(RegistryError::NoSelfCheckNumber { used: max });
        }
        let file = File {
            numbers: st.file.numbers.clone(),
            revoked: st.file.revoked.clone(),
            self_check: Some(n),
        };
        self.save(&file)?;
        st.file = file;
        Ok(n)
    }

    pub fn is_revoked(&self, id: &str) -> bool {
        self.lock().file.revoked.contains(id)
    }

    /// The status the kernel must hold for a number.
    pub fn status(&self, number: u32) -> IdentityStatus {
        let st = self.lock();
        match st.table.name(number) {
            Some(id) if st.file.revoked.contains(id) => IdentityStatus::Revoked,
            _ => IdentityStatus::Active,
        }
    }

    /// Marks `id` revoked for good (known to this node or not). False: it already was. The
    /// mark is in force for every later apply even when saving it fails (the error says so).
    pub fn revoke(&self, id: &str) -> Result<bool, RegistryError> {
        let mut st = self.lock();
        if !st.file.revoked.insert(id.to_owned()) {
            return Ok(false);
        }
        self.save(&st.file).map(|()| true)
    }

    pub fn revoked(&self) -> BTreeSet<String> {
        self.lock().file.revoked.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_kept_for_good_and_capacity_is_checked_first() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::load(d.path()).unwrap();
        let t = r.assign(["spiffe://x/b", "spiffe://x/a"], 3).unwrap();
        assert_eq!(t.number("spiffe://x/b"), Some(1));
        assert_eq!(t.name(2), Some("spiffe://x/a"));
        let e = r
            .assign(["spiffe://x/c", "spiffe://x/d"], 3)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("the policy needs 4 identities (2 known"),
            "{e}"
        );
        assert_eq!(r.table().len(), 2, "a refused assignment numbers nobody");
        assert!(r.revoke("spiffe://x/a").unwrap());
        assert!(!r.revoke("spiffe://x/a").unwrap());
        assert_eq!(r.status(2), IdentityStatus::Revoked);
        assert_eq!(r.status(1), IdentityStatus::Active);
        let again = Registry::load(d.path()).unwrap();
        assert_eq!(again.table().number("spiffe://x/a"), Some(2));
        assert!(again.is_revoked("spiffe://x/a"));
        let t = again.assign(["spiffe://x/c"], 3).unwrap();
        assert_eq!(t.number("spiffe://x/c"), Some(3));
    }

    #[test]
    fn the_self_check_is_numbered_like_an_identity_and_no_number_is_given_twice() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::load(d.path()).unwrap();
        r.assign(["spiffe://x/a"], 10).unwrap();
        assert_eq!(r.self_check_number(10).unwrap(), 2);
        assert_eq!(r.self_check_number(10).unwrap(), 2, "kept");
        let t = r.assign(["spiffe://x/b"], 10).unwrap();
        assert_eq!(t.number("spiffe://x/b"), Some(3), "after the self-check's");
        assert_eq!(t.len(), 2, "the self-check is no identity");
        let again = Registry::load(d.path()).unwrap();
        assert_eq!(again.self_check_number(10).unwrap(), 2);
        // A table with its last number taken has none for the self-check.
        let full = tempfile::tempdir().unwrap();
        let r = Registry::load(full.path()).unwrap();
        r.assign(["spiffe://x/a", "spiffe://x/b"], 2).unwrap();
        assert_eq!(
            r.self_check_number(2).unwrap_err().to_string(),
            "no identity number is left for the node's self-check: the 2 numbers the datapath holds are taken"
        );
        // A number given twice refuses the table, naming both.
        let dup = tempfile::tempdir().unwrap();
        std::fs::write(
            dup.path().join("identities.json"),
            r#"{"numbers":{"spiffe://x/a":1},"self_check":1}"#,
        )
        .unwrap();
        let e = Registry::load(dup.path()).err().unwrap().to_string();
        assert!(
            e.ends_with("identity number 1 is given twice (spiffe://x/a and agentwall:self-check)"),
            "{e}"
        );
    }
}
