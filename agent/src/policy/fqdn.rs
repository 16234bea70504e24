//! Name rules: `api.example.com` (exact), `*.example.com` (exactly one more label) and
//! `**.example.com` (one or more labels, never the apex). Names compare case-insensitively and
//! without a trailing dot; internationalised names are written in their A-label (`xn--`) form.

use std::{fmt, str::FromStr};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?}: {problem}")]
pub struct FqdnError {
    pub value: String,
    pub problem: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FqdnKind {
    Exact,
    /// `*.suffix`
    OneLabel,
    /// `**.suffix`
    AnyDepth,
}

/// A validated name pattern, stored lower-case without a trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FqdnPattern {
    pub kind: FqdnKind,
    /// The exact name, or what the wildcard stands in front of.
    pub suffix: String,
}

/// Lower-cases and drops one trailing dot: the form names are compared in.
pub fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

impl FqdnPattern {
    pub fn matches(&self, name: &str) -> bool {
        let name = normalize(name);
        match self.kind {
            FqdnKind::Exact => name == self.suffix,
            FqdnKind::OneLabel | FqdnKind::AnyDepth => {
                let Some(front) = name
                    .strip_suffix(self.suffix.as_str())
                    .and_then(|f| f.strip_suffix('.'))
                else {
                    return false;
                };
                !front.is_empty() && (self.kind == FqdnKind::AnyDepth || !front.contains('.'))
            }
        }
    }
}

fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("has an empty label".into());
    }
    if label.len() > 63 {
        return Err(format!("label {label:?} is longer than 63 characters"));
    }
    if !label
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "label {label:?} has characters other than letters, digits, '-' and '_'"
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!("label {label:?} starts or ends with '-'"));
    }
    if label.len() >= 4 && label[2..4] == *"--" && !label.starts_with("xn--") {
        return Err(format!(
            "label {label:?} has '--' in positions 3-4, which is reserved for xn-- A-labels"
        ));
    }
    if let Some(puny) = label.strip_prefix("xn--") {
        // An A-label must decode to a valid U-label that encodes back to itself.
        let valid = idna::punycode::decode_to_string(puny).is_some_and(|u| {
            let (back, res) = idna::domain_to_unicode(label);
            res.is_ok() && back == u && !u.is_ascii()
        });
        if !valid {
            return Err(format!("label {label:?} is not a valid IDNA A-label"));
        }
    }
    Ok(())
}

impl FromStr for FqdnPattern {
    type Err = FqdnError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |problem: String| FqdnError {
            value: s.to_owned(),
            problem,
        };
        if !s.is_ascii() {
            let hint = match idna::domain_to_ascii(s) {
                Ok(a) => format!("; write it as {a:?}"),
                Err(_) => String::new(),
            };
            return Err(err(format!(
                "names are written in their ASCII (A-label) form{hint}"
            )));
        }
        let lower = normalize(s);
        let (kind, suffix) = if let Some(rest) = lower.strip_prefix("**.") {
            (FqdnKind::AnyDepth, rest)
        } else if let Some(rest) = lower.strip_prefix("*.") {
            (FqdnKind::OneLabel, rest)
        } else {
            (FqdnKind::Exact, lower.as_str())
        };
        if suffix.contains('*') {
            return Err(err(
                "a wildcard is only allowed as the whole first label (\"*.\" or \"**.\")".into(),
            ));
        }
        if suffix.len() > 253 {
            return Err(err("is longer than 253 characters".into()));
        }
        for label in suffix.split('.') {
            check_label(label).map_err(err)?;
        }
        let labels = suffix.split('.').count();
        if labels < 2 && kind != FqdnKind::Exact {
            return Err(err(format!(
                "a wildcard over a top-level domain ({suffix:?}) allows a whole TLD; name at least two labels"
            )));
        }
        if suffix
            .rsplit('.')
            .next()
            .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(err(
                "is not a host name (the last label is all digits)".into()
            ));
        }
        Ok(Self {
            kind,
            suffix: suffix.to_owned(),
        })
    }
}

impl fmt::Display for FqdnPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            FqdnKind::Exact => f.write_str(&self.suffix),
            FqdnKind::OneLabel => write!(f, "*.{}", self.suffix),
            FqdnKind::AnyDepth => write!(f, "**.{}", self.suffix),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> FqdnPattern {
        s.parse().unwrap()
    }

    #[test]
    fn exact_one_label_and_any_depth() {
        assert!(p("api.example.com").matches("API.Example.com."));
        assert!(!p("api.example.com").matches("x.api.example.com"));
        let one = p("*.example.com");
        assert!(one.matches("a.example.com"));
        assert!(!one.matches("example.com"));
        assert!(!one.matches("a.b.example.com"));
        assert!(!one.matches("aexample.com"));
        let any = p("**.example.com");
        assert!(any.matches("a.example.com"));
        assert!(any.matches("a.b.c.example.com."));
        assert!(!any.matches("example.com"));
        assert!(!any.matches("badexample.com"));
        assert_eq!(p("**.Example.COM.").to_string(), "**.example.com");
    }

    #[test]
    fn bad_names_say_why() {
        let e = |s: &str| s.parse::<FqdnPattern>().unwrap_err().to_string();
        assert_eq!(
            e("*.com"),
            "\"*.com\": a wildcard over a top-level domain (\"com\") allows a whole TLD; name at least two labels"
        );
        assert_eq!(
            e("a.*.example.com"),
            "\"a.*.example.com\": a wildcard is only allowed as the whole first label (\"*.\" or \"**.\")"
        );
        assert_eq!(e("a..com"), "\"a..com\": has an empty label");
        assert_eq!(
            e("-a.com"),
            "\"-a.com\": label \"-a\" starts or ends with '-'"
        );
        assert_eq!(
            e("xn--zz.example.com"),
            "\"xn--zz.example.com\": label \"xn--zz\" is not a valid IDNA A-label"
        );
        assert_eq!(
            e("bücher.example"),
            "\"bücher.example\": names are written in their ASCII (A-label) form; write it as \"xn--bcher-kva.example\""
        );
        assert!(e(&format!("{}.com", "a".repeat(64))).contains("longer than 63"));
        // A valid A-label is accepted.
        assert_eq!(p("xn--bcher-kva.example").suffix, "xn--bcher-kva.example");
    }
}
