//! The names the TLS server-name check knows (`AW_SNI_NAMES`: for each identity and learned
//! address, the names it resolved there with the name rules allowing them), and the names it
//! refused (`AW_SNI_SEEN`), which the node reads to name them in records and to end those
//! connections.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use agent_common::{self as c, SNI_NAME_MAX, SNI_RULES, SniName};
use aya::maps::{HashMap, MapData, MapError};

use crate::policy::model::addr_from16;

/// Names per (identity, address), as the kernel holds them: name → rule ids.
pub type Names = BTreeMap<String, [u32; SNI_RULES]>;

/// Names one identity may hold in `AW_SNI_NAMES`, over all its addresses: an agent that
/// resolves name after name under a wildcard rule fills its own share, not the map the
/// other identities' checks need. Names past it are not written (their connections are
/// refused: closed, not open).
pub const NAMES_PER_IDENTITY: usize = c::SNI_NAME_ENTRIES as usize / 16;

/// A refused server name, with the connection it came in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub identity: u32,
    /// The name as the ClientHello carried it (lower case, no trailing dot; invalid UTF-8
    /// replaced), empty when the first data carried none.
    pub name: String,
    pub peer: std::net::SocketAddr,
    pub local_port: u16,
    /// The connection was refused (enforce): the node ends it.
    pub cut: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SniError {
    #[error("server name {name:?} for identity {identity} at {addr}: {source}")]
    Write {
        identity: u32,
        addr: IpAddr,
        name: String,
        #[source]
        source: Box<MapError>,
    },
    #[error(
        "identity {identity} resolved more server names than its share of the TLS check's map ({limit}): {left_out} at {addr} not written, their connections are refused"
    )]
    Quota {
        identity: u32,
        addr: IpAddr,
        limit: usize,
        left_out: usize,
    },
    #[error("reading {map}: {source}")]
    Read {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
}

pub struct SniMaps {
    names: HashMap<MapData, SniName, [u32; SNI_RULES]>,
    seen: HashMap<MapData, u64, SniName>,
    /// What `names` holds (read back at start: the map is pinned and outlives a node).
    mirror: BTreeMap<(u32, IpAddr), Names>,
    /// When each identity's going past its share was last said: once a minute, not at every
    /// DNS answer it gets.
    quota_said: std::collections::HashMap<u32, std::time::Instant>,
}

/// How often an identity's going past its share of the names map is said.
const QUOTA_SAID_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// The key of one name, or None when it cannot be one (too long: no ClientHello name the
/// kernel reads matches it either).
fn key(identity: u32, ip: IpAddr, name: &str) -> Option<SniName> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= SNI_NAME_MAX {
        return None;
    }
    let mut k = SniName {
        identity,
        len: bytes.len() as u16,
        addr: crate::policy::model::addr16(ip),
        ..SniName::default()
    };
    k.name[..bytes.len()].copy_from_slice(bytes);
    Some(k)
}

/// Every (identity, address) key of `identity` in the mirror's order.
fn identity_span(identity: u32) -> std::ops::RangeInclusive<(u32, IpAddr)> {
    (identity, IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
        ..=(identity, IpAddr::V6(std::net::Ipv6Addr::from(u128::MAX)))
}

/// The first of `want` (in name order) that fit beside `elsewhere` names the identity holds
/// at its other addresses, and how many did not.
fn within_share(want: &Names, elsewhere: usize) -> (Names, usize) {
    let room = NAMES_PER_IDENTITY.saturating_sub(elsewhere);
    let kept: Names = want
        .iter()
        .take(room)
        .map(|(n, r)| (n.clone(), *r))
        .collect();
    let left_out = want.len() - kept.len();
    (kept, left_out)
}

fn text(k: &SniName) -> String {
    let n = usize::from(k.len).min(SNI_NAME_MAX);
    String::from_utf8_lossy(&k.name[..n]).into_owned()
}

impl SniMaps {
    pub fn open(
        names: HashMap<MapData, SniName, [u32; SNI_RULES]>,
        seen: HashMap<MapData, u64, SniName>,
    ) -> Result<Self, SniError> {
        let mut mirror: BTreeMap<(u32, IpAddr), Names> = BTreeMap::new();
        for entry in names.iter() {
            let (k, v) = entry.map_err(|e| SniError::Read {
                map: c::MAP_SNI_NAMES,
                source: Box::new(e),
            })?;
            mirror
                .entry((k.identity, addr_from16(k.addr)))
                .or_default()
                .insert(text(&k), v);
        }
        Ok(Self {
            names,
            seen,
            mirror,
            quota_said: std::collections::HashMap::new(),
        })
    }

    /// The error for `left_out` names of `identity` at `ip` past its share, unless said in
    /// the last minute.
    fn over_share(&mut self, identity: u32, ip: IpAddr, left_out: usize) -> Option<SniError> {
        if left_out == 0 {
            return None;
        }
        let now = std::time::Instant::now();
        if let Some(said) = self.quota_said.get(&identity)
            && now.duration_since(*said) < QUOTA_SAID_EVERY
        {
            return None;
        }
        self.quota_said.insert(identity, now);
        Some(SniError::Quota {
            identity,
            addr: ip,
            limit: NAMES_PER_IDENTITY,
            left_out,
        })
    }

    /// Makes the kernel hold exactly `want` for (identity, ip). Every write is tried; the
    /// first failure is returned (a name the kernel lacks fails closed: its connections are
    /// refused).
    pub fn set(&mut self, identity: u32, ip: IpAddr, want: &Names) -> Result<(), SniError> {
        let elsewhere = self
            .mirror
            .range(identity_span(identity))
            .filter(|((_, at), _)| *at != ip)
            .map(|(_, names)| names.len())
            .sum();
        let (want, left_out) = within_share(want, elsewhere);
        let written = self.write(identity, ip, &want);
        match self.over_share(identity, ip, left_out) {
            Some(e) => Err(e),
            None => written,
        }
    }

    /// Makes the kernel hold exactly `want` for (identity, ip), share or not.
    fn write(&mut self, identity: u32, ip: IpAddr, want: &Names) -> Result<(), SniError> {
        let have = self.mirror.remove(&(identity, ip)).unwrap_or_default();
        let mut first = None;
        let mut kept = Names::new();
        for (name, rules) in want {
            let Some(k) = key(identity, ip, name) else {
                continue;
            };
            if have.get(name) == Some(rules) {
                kept.insert(name.clone(), *rules);
                continue;
            }
            match self.names.insert(k, rules, 0) {
                Ok(()) => {
                    kept.insert(name.clone(), *rules);
                }
                Err(e) => {
                    first.get_or_insert(SniError::Write {
                        identity,
                        addr: ip,
                        name: name.clone(),
                        source: Box::new(e),
                    });
                }
            }
        }
        for (name, rules) in have {
            if want.contains_key(&name) {
                continue;
            }
            let Some(k) = key(identity, ip, &name) else {
                continue;
            };
            match self.names.remove(&k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => {
                    // Still there: still in the mirror, so the next change tries again.
                    kept.insert(name.clone(), rules);
                    first.get_or_insert(SniError::Write {
                        identity,
                        addr: ip,
                        name,
                        source: Box::new(e),
                    });
                }
            }
        }
        if !kept.is_empty() {
            self.mirror.insert((identity, ip), kept);
        }
        first.map_or(Ok(()), Err)
    }

    /// Makes the kernel hold exactly `want` for every (identity, address), each identity's
    /// share taken by its addresses in order (what the map holds now does not count).
    pub fn set_all(&mut self, want: &BTreeMap<(u32, IpAddr), Names>) -> Result<(), SniError> {
        let keys: BTreeSet<(u32, IpAddr)> =
            self.mirror.keys().chain(want.keys()).copied().collect();
        let none = Names::new();
        let mut first = None;
        let mut used: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
        for (identity, ip) in keys {
            let taken = used.entry(identity).or_default();
            let (admitted, left_out) =
                within_share(want.get(&(identity, ip)).unwrap_or(&none), *taken);
            *taken += admitted.len();
            if let Err(e) = self.write(identity, ip, &admitted) {
                first.get_or_insert(e);
            }
            if let Some(e) = self.over_share(identity, ip, left_out) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// How many names the kernel holds.
    pub fn len(&self) -> usize {
        self.mirror.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.mirror.is_empty()
    }

    fn refused(k: &SniName) -> Refused {
        Refused {
            identity: k.identity,
            name: text(k),
            peer: std::net::SocketAddr::new(addr_from16(k.addr), k.port),
            local_port: k.local_port,
            cut: k.cut != 0,
        }
    }

    /// The refusal the kernel kept under a record's time, taken out.
    pub fn take_refused(&mut self, time_ns: u64) -> Option<Refused> {
        let k = self.seen.get(&time_ns, 0).ok()?;
        let _ = self.seen.remove(&time_ns);
        Some(Self::refused(&k))
    }

    /// Refusals kept since before `before_ns` whose record never came (folded by the
    /// kernel's rate limit), taken out.
    pub fn take_stale(&mut self, before_ns: u64) -> Vec<Refused> {
        let due: Vec<(u64, SniName)> = self
            .seen
            .iter()
            .filter_map(Result::ok)
            .filter(|(t, _)| *t < before_ns)
            .collect();
        due.into_iter()
            .map(|(t, k)| {
                let _ = self.seen.remove(&t);
                Self::refused(&k)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Names {
        (0..n)
            .map(|i| (format!("n{i:05}.example"), [1, 0, 0, 0]))
            .collect()
    }

    #[test]
    fn an_identity_holds_at_most_its_share_of_names() {
        let (kept, out) = within_share(&names(10), 0);
        assert_eq!((kept.len(), out), (10, 0));
        let (kept, out) = within_share(&names(10), NAMES_PER_IDENTITY - 4);
        assert_eq!((kept.len(), out), (4, 6));
        // The first in name order are kept: the same ones at every resync.
        assert_eq!(
            kept.keys().next().map(String::as_str),
            Some("n00000.example")
        );
        let (kept, out) = within_share(&names(3), NAMES_PER_IDENTITY + 1);
        assert_eq!((kept.len(), out), (0, 3));
    }

    #[test]
    fn an_identity_s_span_covers_both_families_and_no_other_identity() {
        let mut m: BTreeMap<(u32, IpAddr), u8> = BTreeMap::new();
        for id in [6, 7, 8] {
            m.insert((id, "0.0.0.0".parse().unwrap()), 0);
            m.insert((id, "203.0.113.9".parse().unwrap()), 0);
            m.insert((id, "2001:db8::1".parse().unwrap()), 0);
            m.insert(
                (
                    id,
                    "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap(),
                ),
                0,
            );
        }
        let ids: Vec<u32> = m.range(identity_span(7)).map(|((id, _), _)| *id).collect();
        assert_eq!(ids, [7, 7, 7, 7]);
    }
}
