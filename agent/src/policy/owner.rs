//! Who answers for an agent (or a node), and how it is grouped: an owner (a person or team,
//! such as an e-mail address) and labels (Kubernetes-style `key: value` pairs). They are
//! carried into every record about it, so each is checked where it is written and kept small.

use std::{collections::BTreeMap, fmt, str::FromStr, sync::Arc};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// Longest owner, in characters.
pub const MAX_OWNER: usize = 256;
/// Most labels on one policy or node.
pub const MAX_LABELS: usize = 32;
/// Longest label name (after any prefix) and value, as Kubernetes has them.
const MAX_NAME: usize = 63;
/// Longest label prefix (a DNS subdomain).
const MAX_PREFIX: usize = 253;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OwnerError {
    // Quoted so a policy error points at the key (an empty value cannot be found).
    #[error("`owner:` is empty: name a person or team")]
    EmptyOwner,
    #[error("owner {value:?} is longer than {MAX_OWNER} characters")]
    LongOwner { value: String },
    #[error(
        "owner {value:?} has a control or invisible character, or spaces at either end: write a person or team, e.g. \"payments-team@example.com\""
    )]
    BadOwner { value: String },
    #[error(
        "label name `{value}` is not a label name: up to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit, optionally after a DNS prefix and '/' (e.g. team, example.com/data-class)"
    )]
    BadKey { value: String },
    #[error(
        "label value `{value}` of `{key}` is not a label value: up to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit (or empty)"
    )]
    BadValue { key: String, value: String },
    #[error("label `{key}` is given twice")]
    Twice { key: String },
    #[error("{count} labels: at most {MAX_LABELS}")]
    TooMany { count: usize },
    #[error("label {value:?} is not KEY=VALUE")]
    NotPair { value: String },
}

/// Characters that change how text around them is shown without being seen themselves, or
/// show as nothing: format characters (direction overrides and isolates, zero-width and tag
/// characters), other default-ignorable ones (fillers, variation selectors), line and
/// paragraph separators, and private-use characters. A name holding one can read as another
/// in a terminal or a console.
pub fn is_hidden_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{0600}'..='\u{0605}' | '\u{06DD}' | '\u{070F}'
        | '\u{08E2}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}' | '\u{180B}'..='\u{180F}'
        | '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{206F}'
        | '\u{3164}' | '\u{E000}'..='\u{F8FF}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
        | '\u{FFA0}' | '\u{FFF0}'..='\u{FFFB}' | '\u{110BD}' | '\u{110CD}'
        | '\u{13430}'..='\u{1343F}' | '\u{1BCA0}'..='\u{1BCA3}' | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0000}'..='\u{E0FFF}' | '\u{F0000}'..='\u{10FFFF}')
}

/// A person or team. Shared, not copied, by every record that names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Owner(Arc<str>);

impl Serialize for Owner {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl Owner {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Owner {
    type Err = OwnerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let value = || s.to_owned();
        if s.is_empty() {
            return Err(OwnerError::EmptyOwner);
        }
        if s.chars().count() > MAX_OWNER {
            return Err(OwnerError::LongOwner { value: value() });
        }
        if s.chars().any(|c| c.is_control() || is_hidden_format(c)) || s.trim() != s {
            return Err(OwnerError::BadOwner { value: value() });
        }
        Ok(Self(s.into()))
    }
}

impl<'de> Deserialize<'de> for Owner {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// Labels, in key order. Shared, not copied, by every record that carries them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Labels(Arc<BTreeMap<String, String>>);

impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

fn is_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn is_prefix(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_PREFIX
        && s.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        })
}

impl Labels {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Labels from pairs, each checked; a key given twice is refused.
    pub fn from_pairs<I, K, V>(pairs: I) -> Result<Self, OwnerError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut out = BTreeMap::new();
        for (k, v) in pairs {
            let (k, v) = (k.into(), v.into());
            let name = match k.split_once('/') {
                Some((prefix, name)) if is_prefix(prefix) => name,
                Some(_) => return Err(OwnerError::BadKey { value: k }),
                None => &k,
            };
            if !is_name(name) {
                return Err(OwnerError::BadKey { value: k });
            }
            if !v.is_empty() && !is_name(&v) {
                return Err(OwnerError::BadValue { key: k, value: v });
            }
            if out.contains_key(&k) {
                return Err(OwnerError::Twice { key: k });
            }
            out.insert(k, v);
        }
        if out.len() > MAX_LABELS {
            return Err(OwnerError::TooMany { count: out.len() });
        }
        Ok(Self(Arc::new(out)))
    }

    /// Labels given as `KEY=VALUE` words (command-line flags).
    pub fn from_assignments<'a>(
        words: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, OwnerError> {
        let mut pairs = Vec::new();
        for w in words {
            let (k, v) = w.split_once('=').ok_or_else(|| OwnerError::NotPair {
                value: w.to_owned(),
            })?;
            pairs.push((k.to_owned(), v.to_owned()));
        }
        Self::from_pairs(pairs)
    }
}

/// `key=value,key=value`, as flags take them.
impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// " owner O labels K=V,..." for a line about something, or nothing when it has neither.
pub fn describe(owner: Option<&Owner>, labels: &Labels) -> String {
    let mut out = String::new();
    if let Some(o) = owner {
        out.push_str(&format!(" owner {o}"));
    }
    if !labels.is_empty() {
        out.push_str(&format!(" labels {labels}"));
    }
    out
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Labels;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of label names to values, e.g. {team: payments}")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut m: A) -> Result<Labels, A::Error> {
                let mut pairs: Vec<(String, String)> = Vec::new();
                // Text only, as Kubernetes has it: a number would be read back otherwise than
                // written (`1.10` as 1.1).
                while let Some((k, v)) = m.next_entry::<String, serde_json::Value>()? {
                    let v = match v {
                        serde_json::Value::String(s) => s,
                        serde_json::Value::Null => String::new(),
                        _ => {
                            return Err(de::Error::custom(format!(
                                "label `{k}` is not text: quote its value (as written)"
                            )));
                        }
                    };
                    pairs.push((k, v));
                }
                Labels::from_pairs(pairs).map_err(de::Error::custom)
            }
        }
        d.deserialize_map(V)
    }
}

/// An owner as another party wrote it: none when it is not one (what it held is not kept).
pub fn lenient_owner<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Owner>, D::Error> {
    Ok(Option::<serde_json::Value>::deserialize(d)?
        .and_then(|v| v.as_str().and_then(|s| s.parse().ok())))
}

/// Labels as another party wrote them: none when they are not labels.
pub fn lenient_labels<'de, D: Deserializer<'de>>(d: D) -> Result<Labels, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(v).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_checked() {
        assert_eq!(
            "payments@example.com".parse::<Owner>().unwrap().as_str(),
            "payments@example.com"
        );
        assert!("Payments Team".parse::<Owner>().is_ok());
        for (bad, want) in [
            ("", "`owner:` is empty"),
            (" x", "spaces at either end"),
            ("a\nb", "control or invisible character"),
            ("ops\u{202E}moc.elpmaxe", "control or invisible character"),
            ("ops\u{E0020}", "control or invisible character"),
            ("ops\u{3164}", "control or invisible character"),
            ("ops\u{2028}x", "control or invisible character"),
        ] {
            let e = bad.parse::<Owner>().unwrap_err().to_string();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
        let long = "x".repeat(MAX_OWNER + 1);
        assert!(
            long.parse::<Owner>()
                .unwrap_err()
                .to_string()
                .contains("longer than 256")
        );
    }

    #[test]
    fn labels_are_checked() {
        let l = Labels::from_assignments(["team=payments", "example.com/data-class=pii", "x="])
            .unwrap();
        assert_eq!(
            l.iter().collect::<Vec<_>>(),
            [
                ("example.com/data-class", "pii"),
                ("team", "payments"),
                ("x", "")
            ]
        );
        for (bad, want) in [
            ("-a=b", "label name `-a`"),
            ("a/b/c=d", "label name `a/b/c`"),
            ("a=b c", "label value `b c` of `a`"),
            ("ab", "label \"ab\" is not KEY=VALUE"),
        ] {
            let e = Labels::from_assignments([bad]).unwrap_err().to_string();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
        assert_eq!(
            Labels::from_assignments(["a=1", "a=2"])
                .unwrap_err()
                .to_string(),
            "label `a` is given twice"
        );
        let many: Vec<String> = (0..=MAX_LABELS).map(|i| format!("k{i}=v")).collect();
        assert_eq!(
            Labels::from_assignments(many.iter().map(String::as_str))
                .unwrap_err()
                .to_string(),
            "33 labels: at most 32"
        );
    }
}
