//! Signed policy bundles. Admins sign what a bundle holds with their own Ed25519 keys; a
//! node that trusts those keys applies only bundles enough of them signed, so a control
//! plane (or whoever took it over) cannot push a policy no admin signed. A signature covers
//! the bundle's revision (the hash of its files, which the node computes again from the
//! files it gets) and the times it is valid from and until: a node refuses a bundle older
//! than the one it applied (by that signed time) and one past its expiry, so an old signed
//! bundle cannot be served again to undo a newer one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::audit::SignerKey;

/// How far ahead of a node's clock a bundle's `not_before` may be (the clocks of the admin
/// who signed, the control plane and the node differ a little).
pub const CLOCK_SKEW_SECS: i64 = 300;

/// A bundle's signed validity and its signatures.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Signing {
    /// RFC 3339: when the bundle was made; it is not valid before, and a node never takes
    /// a bundle older than the one it applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// RFC 3339: a node refuses the bundle after this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// RFC 3339: for grants added to a signed bundle (`cp grant`), the full bundle under it
    /// ([`Signing::root`] of that bundle). A node whose bundle in force stands on a newer one
    /// refuses this one: an admin given an old bundle as the newest (by whoever holds the
    /// control plane) signs grants on top of it, and the old rules must not come back with
    /// them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adds_to: Option<String>,
    /// RFC 3339: for a push that carries grants over from the newest bundle (`policy push`),
    /// that bundle's root ([`Signing::root`]). A node whose bundle in force stands on a
    /// newer one refuses it: grants admins ended early must not come back from an old
    /// bundle shown as the newest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carries_from: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signatures: Vec<BundleSignature>,
}

impl Signing {
    pub fn is_empty(&self) -> bool {
        self.not_before.is_none()
            && self.expires_at.is_none()
            && self.adds_to.is_none()
            && self.carries_from.is_none()
            && self.signatures.is_empty()
    }

    /// The full bundle this one is: the one its grants were added to (`adds_to`), or
    /// itself. Grants added to grants keep the first bundle's time, so a chain of them is
    /// judged by the rules under it, not by its newest grant.
    pub fn root(&self) -> Option<&str> {
        self.adds_to.as_deref().or(self.not_before.as_deref())
    }

    /// Whether its times are ones to sign or take `now`: `not_before` not ahead of the clock
    /// (a bundle dated ahead would be taken then, over whatever came meanwhile: a rollback
    /// in waiting), and grants added to a bundle made before them.
    pub fn dated_sanely(&self, now: time::OffsetDateTime) -> Result<(), SigningError> {
        let Some(nb) = &self.not_before else {
            return Ok(());
        };
        let nb_time = parse(nb, "not_before")?;
        if nb_time - now > time::Duration::seconds(CLOCK_SKEW_SECS) {
            return Err(SigningError::NotYet {
                not_before: nb.clone(),
            });
        }
        for (field, t) in [
            ("adds_to", &self.adds_to),
            ("carries_from", &self.carries_from),
        ] {
            if let Some(t) = t
                && parse(t, field)? > nb_time
            {
                return Err(SigningError::AddsToLater {
                    field,
                    time: t.clone(),
                    not_before: nb.clone(),
                });
            }
        }
        Ok(())
    }

    /// What a signature signs, None without a `not_before`. A bundle that adds to none is
    /// stated as before `adds_to` existed, so signatures made then still verify. One that
    /// adds to a bundle is stated as v3, where `adds_to` is the full bundle under the base
    /// ([`Signing::root`]): an older CLI signed the base's own `not_before` there, which
    /// could be a refused grant's, and such a signature must not pass for the new meaning.
    pub fn statement(&self, digest: &str) -> Option<String> {
        let nb = self.not_before.as_deref()?;
        let version = if self.adds_to.is_some() || self.carries_from.is_some() {
            3
        } else {
            2
        };
        let mut s = format!(
            "agentwall policy bundle v{version}\nsha256 {digest}\nnot_before {nb}\nexpires_at {}\n",
            self.expires_at.as_deref().unwrap_or("-")
        );
        if let Some(base) = &self.adds_to {
            s.push_str(&format!("adds_to {base}\n"));
        }
        if let Some(from) = &self.carries_from {
            s.push_str(&format!("carries_from {from}\n"));
        }
        Some(s)
    }
}

/// One admin's signature of a bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BundleSignature {
    /// The key's id: the first 16 bytes of the SHA-256 of its raw public key, hex.
    pub key: String,
    /// Whose key it is, as the control plane's `[signers]` names it.
    #[serde(default)]
    pub signer: String,
    /// Ed25519 over [`Signing::statement`], hex.
    pub signature: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("signer key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("signer keys {first} and {second} are the same key ({key})")]
    SameKey {
        first: String,
        second: String,
        key: String,
    },
    #[error(
        "the bundle is not signed (it has no not_before); this node needs {required} signature(s)"
    )]
    Unsigned { required: usize },
    #[error("{field} {value:?} is not an RFC 3339 time")]
    Time { field: &'static str, value: String },
    #[error(
        "{valid} valid signature(s) from keys this node trusts{}; it needs {required}{}",
        if signers.is_empty() { String::new() } else { format!(" ({})", signers.join(", ")) },
        if *other > 0 { format!(" ({other} other signature(s) by keys it does not trust or that do not verify)") } else { String::new() }
    )]
    TooFew {
        valid: usize,
        required: usize,
        signers: Vec<String>,
        other: usize,
    },
    #[error(
        "the bundle is valid from {not_before}, more than {CLOCK_SKEW_SECS} s ahead of this clock"
    )]
    NotYet { not_before: String },
    #[error("the bundle expired at {expires_at}")]
    Expired { expires_at: String },
    #[error(
        "the bundle is older than the one in force (signed valid from {not_before}; the one applied from {applied}): a bundle is never rolled back"
    )]
    Older { not_before: String, applied: String },
    #[error(
        "the bundle is another than the one in force but signed as made at the same time ({not_before}): refused, as either could be the newer"
    )]
    SameTime { not_before: String },
    #[error(
        "the bundle adds grants to a bundle valid from {adds_to}, older than the one in force (valid from {applied}): its other rules would roll back"
    )]
    AddsToOlder { adds_to: String, applied: String },
    #[error(
        "the bundle carries grants over from a bundle valid from {carries_from}, older than the one the bundle in force stands on (valid from {applied}): grants ended since could come back"
    )]
    CarriesFromOlder {
        carries_from: String,
        applied: String,
    },
    #[error(
        "the bundle's {field} {time} is after its own not_before {not_before}: grants come from a bundle made before them"
    )]
    AddsToLater {
        field: &'static str,
        time: String,
        not_before: String,
    },
    #[error("signature by key {key}: {why}")]
    Refused { key: String, why: &'static str },
}

/// The signed bundle a node has in force, as [`Keyring::admit`] orders bundles by it.
#[derive(Clone, Copy, Debug)]
pub struct InForce<'a> {
    pub not_before: &'a str,
    pub revision: &'a str,
    /// Its [`Signing::root`].
    pub root: &'a str,
}

/// The public keys (SPKI PEM) signatures are checked against, each by a name.
#[derive(Default)]
pub struct Keyring {
    keys: Vec<(String, SignerKey)>,
}

impl Keyring {
    /// Loads every key; two names for one key are an error (they would count twice).
    pub fn load(named: impl IntoIterator<Item = (String, PathBuf)>) -> Result<Self, SigningError> {
        let mut keys: Vec<(String, SignerKey)> = Vec::new();
        for (name, path) in named {
            let key = SignerKey::load(&path).map_err(|e| SigningError::Key {
                path: path.clone(),
                message: e.to_string(),
            })?;
            if let Some((first, _)) = keys.iter().find(|(_, k)| k.id() == key.id()) {
                return Err(SigningError::SameKey {
                    first: first.clone(),
                    second: name,
                    key: key.id().to_owned(),
                });
            }
            keys.push((name, key));
        }
        Ok(Self { keys })
    }

    /// Keys named by their file (a node's `trusted_signers`).
    pub fn load_files(paths: &[PathBuf]) -> Result<Self, SigningError> {
        Self::load(paths.iter().map(|p| (p.display().to_string(), p.clone())))
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The name of the key with this id.
    pub fn name_of(&self, id: &str) -> Option<&str> {
        self.keys
            .iter()
            .find(|(_, k)| k.id() == id)
            .map(|(n, _)| n.as_str())
    }

    /// Checks one signature of the bundle whose files hash to `digest` (the whole SHA-256)
    /// as `signing` dates it: Err says why it is none.
    pub fn check_one(
        &self,
        digest: &str,
        signing: &Signing,
        sig: &BundleSignature,
    ) -> Result<(), SigningError> {
        let refused = |why| SigningError::Refused {
            key: sig.key.clone(),
            why,
        };
        let Some(message) = signing.statement(digest) else {
            return Err(refused("the bundle has no not_before to sign"));
        };
        let key = self
            .keys
            .iter()
            .find(|(_, k)| k.id() == sig.key)
            .map(|(_, k)| k)
            .ok_or_else(|| refused("not one of the signers' keys"))?;
        if key.verifies(message.as_bytes(), &sig.signature) {
            Ok(())
        } else {
            Err(refused(
                "does not verify (made for other files or times, or forged)",
            ))
        }
    }

    /// Whether a node may apply the bundle `revision` (its files hashed by the node) as
    /// `signing` dates and signs it: `required` distinct trusted keys signed it, it is valid
    /// `now`, and it is not older than `applied` (the bundle in force, when it was signed),
    /// nor adds grants to a full bundle older than the one under it.
    pub fn admit(
        &self,
        digest: &str,
        revision: &str,
        signing: &Signing,
        required: usize,
        applied: Option<InForce<'_>>,
        now: time::OffsetDateTime,
    ) -> Result<(), SigningError> {
        let Some(nb) = &signing.not_before else {
            return Err(SigningError::Unsigned { required });
        };
        let nb_time = parse(nb, "not_before")?;
        let mut signers: Vec<String> = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let mut other = 0;
        for s in &signing.signatures {
            match self.check_one(digest, signing, s) {
                Ok(()) if seen.insert(s.key.clone()) => {
                    signers.push(self.name_of(&s.key).unwrap_or_default().to_owned());
                }
                // The same key twice counts once.
                Ok(()) => {}
                Err(_) => other += 1,
            }
        }
        if signers.len() < required {
            return Err(SigningError::TooFew {
                valid: signers.len(),
                required,
                signers,
                other,
            });
        }
        signing.dated_sanely(now)?;
        if let Some(exp) = &signing.expires_at
            && parse(exp, "expires_at")? <= now
        {
            return Err(SigningError::Expired {
                expires_at: exp.clone(),
            });
        }
        if let Some(applied) = applied
            && let Ok(applied_time) = parse(applied.not_before, "not_before")
        {
            if nb_time < applied_time {
                return Err(SigningError::Older {
                    not_before: nb.clone(),
                    applied: applied.not_before.to_owned(),
                });
            }
            if nb_time == applied_time && revision != applied.revision {
                return Err(SigningError::SameTime {
                    not_before: nb.clone(),
                });
            }
            // Grants on a full bundle older than the one under the bundle in force: that
            // bundle's rules would come back (also through grants on grants, each signed
            // later than the last).
            if let Some(base) = &signing.adds_to
                && let Ok(root) = parse(applied.root, "adds_to")
                && parse(base, "adds_to")? < root
            {
                return Err(SigningError::AddsToOlder {
                    adds_to: base.clone(),
                    applied: applied.root.to_owned(),
                });
            }
            if let Some(from) = &signing.carries_from
                && let Ok(root) = parse(applied.root, "adds_to")
                && parse(from, "carries_from")? < root
            {
                return Err(SigningError::CarriesFromOlder {
                    carries_from: from.clone(),
                    applied: applied.root.to_owned(),
                });
            }
        }
        Ok(())
    }
}

fn parse(t: &str, field: &'static str) -> Result<time::OffsetDateTime, SigningError> {
    crate::clock::parse_rfc3339(t).map_err(|_| SigningError::Time {
        field,
        value: t.chars().take(64).collect(),
    })
}

/// Signs the bundle whose files hash to `digest` as `signing` dates it, with the private
/// key at `key` (PKCS#8 PEM): what `cp policy push --sign-key` and `cp policy approve`
/// send.
pub fn sign(key: &Path, digest: &str, signing: &Signing) -> Result<BundleSignature, SigningError> {
    let statement = signing
        .statement(digest)
        .ok_or(SigningError::Unsigned { required: 1 })?;
    let signer = crate::audit::Signer::load(key).map_err(|e| SigningError::Key {
        path: key.to_owned(),
        message: e.to_string(),
    })?;
    Ok(BundleSignature {
        key: signer.id().to_owned(),
        signer: String::new(),
        signature: signer.sign_hex(statement.as_bytes()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keypair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let private = dir.join(format!("{name}.key"));
        let public = dir.join(format!("{name}.pub"));
        std::fs::write(&private, k.serialize_pem()).unwrap();
        std::fs::write(&public, k.public_key_pem()).unwrap();
        (private, public)
    }

    #[test]
    fn a_node_admits_only_enough_valid_signatures_on_a_current_newer_bundle() {
        let d = tempfile::tempdir().unwrap();
        let (alice, alice_pub) = keypair(d.path(), "alice");
        let (bob, bob_pub) = keypair(d.path(), "bob");
        let (eve, _) = keypair(d.path(), "eve");
        let ring = Keyring::load_files(&[alice_pub.clone(), bob_pub]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let at = |secs: i64| crate::clock::rfc3339((now + time::Duration::seconds(secs)).into());
        let signed = |nb: &str, exp: Option<&str>, keys: &[&PathBuf]| {
            let mut s = Signing {
                not_before: Some(nb.to_owned()),
                expires_at: exp.map(str::to_owned),
                ..Default::default()
            };
            s.signatures = keys.iter().map(|k| sign(k, "r1", &s).unwrap()).collect();
            s
        };
        // A full bundle in force: its own root.
        struct Full(String, &'static str);
        impl Full {
            fn get(&self) -> InForce<'_> {
                InForce {
                    not_before: &self.0,
                    revision: self.1,
                    root: &self.0,
                }
            }
        }
        let full = |nb: &str, revision: &'static str| Full(nb.to_owned(), revision);
        let nb = at(-10);
        let two = signed(&nb, None, &[&alice, &bob]);
        ring.admit("r1", "r1", &two, 2, None, now).unwrap();
        let say = |r: Result<(), SigningError>| r.unwrap_err().to_string();
        // One key twice, a stranger's key, other files: one valid signature.
        let e = say(ring.admit(
            "r1",
            "r1",
            &signed(&nb, None, &[&alice, &alice, &eve]),
            2,
            None,
            now,
        ));
        assert!(
            e.starts_with("1 valid signature(s) from keys this node trusts ("),
            "{e}"
        );
        assert!(
            e.ends_with(
                "it needs 2 (1 other signature(s) by keys it does not trust or that do not verify)"
            ),
            "{e}"
        );
        assert!(say(ring.admit("r2", "r2", &two, 1, None, now)).starts_with("0 valid"));
        assert!(
            say(ring.admit("r1", "r1", &Signing::default(), 1, None, now)).contains("not signed")
        );
        // Times: expired, too far ahead, older than what is in force, or as old but other.
        let old = signed(&at(-100), Some(&at(-1)), &[&alice, &bob]);
        assert!(say(ring.admit("r1", "r1", &old, 2, None, now)).contains("expired at"));
        let ahead = signed(&at(CLOCK_SKEW_SECS + 60), None, &[&alice, &bob]);
        assert!(say(ring.admit("r1", "r1", &ahead, 2, None, now)).contains("ahead of this clock"));
        let e = say(ring.admit("r1", "r1", &two, 2, Some(full(&at(0), "r0").get()), now));
        assert!(e.contains("never rolled back"), "{e}");
        let e = say(ring.admit("r1", "r1", &two, 2, Some(full(&nb, "r0").get()), now));
        assert!(e.contains("either could be the newer"), "{e}");
        ring.admit("r1", "r1", &two, 2, Some(full(&nb, "r1").get()), now)
            .unwrap();
        ring.admit("r1", "r1", &two, 2, Some(full(&at(-20), "r0").get()), now)
            .unwrap();
        // A signature is over the times too: moving them breaks it.
        let mut moved = two.clone();
        moved.expires_at = Some(at(3600));
        assert!(say(ring.admit("r1", "r1", &moved, 1, None, now)).starts_with("0 valid"));
        // Grants added to a bundle older than the one in force bring its rules back.
        let mut grant = Signing {
            not_before: Some(at(-5)),
            adds_to: Some(at(-30)),
            ..Default::default()
        };
        grant.signatures = vec![sign(&alice, "r1", &grant).unwrap()];
        ring.admit("r1", "r1", &grant, 1, Some(full(&at(-30), "r0").get()), now)
            .unwrap();
        ring.admit("r1", "r1", &grant, 1, None, now).unwrap();
        let e = say(ring.admit("r1", "r1", &grant, 1, Some(full(&at(-20), "r0").get()), now));
        assert!(e.contains("its other rules would roll back"), "{e}");
        // Grants on grants keep the full bundle under them: grants added to an old bundle
        // and refused cannot become the base of a later grant that passes for newer.
        let on = |adds_to: &str, nb: &str| {
            let mut g = Signing {
                not_before: Some(nb.to_owned()),
                adds_to: Some(adds_to.to_owned()),
                ..Default::default()
            };
            g.signatures = vec![sign(&alice, "r1", &g).unwrap()];
            g
        };
        let b1 = full(&at(-20), "r0");
        let g1 = on(&at(-30), &at(-10));
        assert!(say(ring.admit("r1", "r1", &g1, 1, Some(b1.get()), now)).contains("roll back"));
        let g2 = on(g1.root().unwrap(), &at(-5));
        assert!(say(ring.admit("r1", "r1", &g2, 1, Some(b1.get()), now)).contains("roll back"));
        // Grants on the bundle in force, then on those: taken.
        let g1 = on(&at(-20), &at(-10));
        ring.admit("r1", "r1", &g1, 1, Some(b1.get()), now).unwrap();
        let in_g1 = InForce {
            not_before: g1.not_before.as_deref().unwrap(),
            revision: "r0",
            root: g1.root().unwrap(),
        };
        let g2 = on(g1.root().unwrap(), &at(-5));
        ring.admit("r1", "r1", &g2, 1, Some(in_g1), now).unwrap();
        // A push carrying grants over from a bundle older than the one under the bundle in
        // force: grants admins ended since would come back.
        let carrying = |from: &str| {
            let mut g = Signing {
                not_before: Some(at(-5)),
                carries_from: Some(from.to_owned()),
                ..Default::default()
            };
            g.signatures = vec![sign(&alice, "r1", &g).unwrap()];
            g
        };
        let e = say(ring.admit("r1", "r1", &carrying(&at(-30)), 1, Some(b1.get()), now));
        assert!(e.contains("grants ended since could come back"), "{e}");
        ring.admit("r1", "r1", &carrying(&at(-20)), 1, Some(b1.get()), now)
            .unwrap();
        // A base after the bundle's own time is no base.
        let e = say(ring.admit("r1", "r1", &on(&at(-1), &at(-5)), 1, None, now));
        assert!(e.contains("after its own not_before"), "{e}");
        // The base is signed: taken away (to pass as an ordinary bundle), nothing verifies.
        let mut stripped = grant.clone();
        stripped.adds_to = None;
        assert!(say(ring.admit("r1", "r1", &stripped, 1, None, now)).starts_with("0 valid"));
        // Two names for one key would count it twice.
        let e = Keyring::load([("a".into(), alice_pub.clone()), ("b".into(), alice_pub)])
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("signer keys a and b are the same key"), "{e}");
    }
}
