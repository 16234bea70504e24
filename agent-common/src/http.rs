//! The scan of an HTTP/1 request head that the server-name check runs on plain HTTP: which
//! Host a server would route the request by. Two tables built at compile time, a class for
//! each byte and a transition for each (state, class), which the kernel walks a byte at a time
//! with no branch on the state (the verifier then checks each byte once, not once for every
//! path of states through the bytes before it), and which tests walk with [`scan`].
//!
//! Strict, so that a server cannot read another Host than the check did: the request line's
//! target in origin form (`/…`) or `*`, never a URL or an authority (a server prefers those to
//! Host); the version `HTTP/1.x`; lines ending CRLF (no bare CR or LF, no folded lines, no
//! white space in a field name); no control bytes; exactly one Host, holding a name and
//! perhaps a port; the whole head, to its empty line, within [`HEAD_MAX`] bytes.

/// How much of a request the scan reads: the head must end within it.
pub const HEAD_MAX: usize = 1024;
pub const CLASSES: usize = 32;
pub const STATES: usize = 64;

/// A transition's next state is in its low six bits.
pub const STATE_MASK: u8 = 0x3f;
/// The byte starts the Host name.
pub const HOST_START: u8 = 0x40;
/// The byte is more of the Host name.
pub const HOST_MORE: u8 = 0x80;

/// The head is refused (0: what a missing transition holds).
pub const REFUSE: u8 = 0;
/// The head ended with one Host.
pub const DONE: u8 = 1;
/// The first byte of a request.
pub const START: u8 = M0;

// The request line: method, target, version.
const M0: u8 = 2;
const M: u8 = 3;
const T0: u8 = 4;
const T: u8 = 5;
/// `HTTP/1.` then a digit then CR: V0 expects the `H`, V8 the CR.
const V0: u8 = 6;
const V8: u8 = 14;
const RLF: u8 = 15;
// Header lines, in two halves: before the Host field (A) and after it (B).
const A: u8 = 16;
const B: u8 = 32;
/// Offsets in a half: a line's first byte; "h", "ho", "hos", "host" read of a field name;
/// another field name; another field's value; the LF ending a line; the LF of the empty line.
const L0: u8 = 0;
const N1: u8 = 1;
const N4: u8 = 4;
const NO: u8 = 5;
const VAL: u8 = 6;
const LF: u8 = 7;
const END: u8 = 8;
// The Host value: white space before it, its name, its port, white space after it.
const OWS: u8 = 48;
const HOST: u8 = 49;
const PORT: u8 = 50;
const TRAIL: u8 = 51;

// Byte classes (0: control bytes and DEL).
const C_CTL: u8 = 0;
const C_HTAB: u8 = 1;
const C_SP: u8 = 2;
const C_CR: u8 = 3;
const C_LF: u8 = 4;
const C_COLON: u8 = 5;
const C_SLASH: u8 = 6;
const C_STAR: u8 = 7;
const C_DOT: u8 = 8;
/// `-` and `_`.
const C_DASH: u8 = 9;
const C_ONE: u8 = 10;
const C_DIGIT: u8 = 11;
const C_UH: u8 = 12;
const C_UT: u8 = 13;
const C_UP: u8 = 14;
const C_UO: u8 = 15;
const C_US: u8 = 16;
const C_UPPER: u8 = 17;
const C_LH: u8 = 18;
const C_LT: u8 = 19;
const C_LO: u8 = 20;
const C_LS: u8 = 21;
const C_LOWER: u8 = 22;
/// The other characters of a field name (RFC 9110 `tchar`).
const C_TCHAR: u8 = 23;
/// Other visible ASCII.
const C_VISIBLE: u8 = 24;
/// 0x80 and above (obs-text).
const C_HIGH: u8 = 25;

const fn class_of(b: u8) -> u8 {
    match b {
        b'\t' => C_HTAB,
        b' ' => C_SP,
        b'\r' => C_CR,
        b'\n' => C_LF,
        b':' => C_COLON,
        b'/' => C_SLASH,
        b'*' => C_STAR,
        b'.' => C_DOT,
        b'-' | b'_' => C_DASH,
        b'1' => C_ONE,
        b'0'..=b'9' => C_DIGIT,
        b'H' => C_UH,
        b'T' => C_UT,
        b'P' => C_UP,
        b'O' => C_UO,
        b'S' => C_US,
        b'A'..=b'Z' => C_UPPER,
        b'h' => C_LH,
        b't' => C_LT,
        b'o' => C_LO,
        b's' => C_LS,
        b'a'..=b'z' => C_LOWER,
        b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'+' | b'^' | b'`' | b'|' | b'~' => C_TCHAR,
        0x21..=0x7e => C_VISIBLE,
        0x80..=0xff => C_HIGH,
        _ => C_CTL,
    }
}

const fn upper(c: u8) -> bool {
    matches!(c, C_UH | C_UT | C_UP | C_UO | C_US | C_UPPER)
}

const fn lower(c: u8) -> bool {
    matches!(c, C_LH | C_LT | C_LO | C_LS | C_LOWER)
}

const fn digit(c: u8) -> bool {
    c == C_ONE || c == C_DIGIT
}

/// A Host name's bytes: letters, digits, `.`, `-`, `_`.
const fn host_char(c: u8) -> bool {
    upper(c) || lower(c) || digit(c) || c == C_DOT || c == C_DASH
}

const fn tchar(c: u8) -> bool {
    host_char(c) || c == C_STAR || c == C_TCHAR
}

/// What a target or a field value may hold besides white space.
const fn visible(c: u8) -> bool {
    tchar(c) || c == C_COLON || c == C_SLASH || c == C_VISIBLE || c == C_HIGH
}

const fn ws(c: u8) -> bool {
    c == C_SP || c == C_HTAB
}

/// The literal `HTTP/1.` in V0..V6.
const VERSION: [u8; 7] = [C_UH, C_UT, C_UT, C_UP, C_SLASH, C_ONE, C_DOT];

const fn next(s: u8, c: u8) -> u8 {
    match s {
        M0 if upper(c) => M,
        M if upper(c) => M,
        M if c == C_SP => T0,
        T0 if c == C_SLASH || c == C_STAR => T,
        T if c == C_SP => V0,
        T if visible(c) => T,
        V0..=13 if s - V0 < 7 && c == VERSION[(s - V0) as usize] => s + 1,
        13 if digit(c) => V8,
        V8 if c == C_CR => RLF,
        RLF if c == C_LF => A + L0,
        OWS if ws(c) => OWS,
        OWS if host_char(c) => HOST | HOST_START,
        HOST if host_char(c) => HOST | HOST_MORE,
        HOST if c == C_COLON => PORT,
        PORT if digit(c) => PORT,
        HOST | PORT | TRAIL if ws(c) => TRAIL,
        HOST | PORT | TRAIL if c == C_CR => B + LF,
        A..=40 if s - A <= END || s >= B => header(s, c),
        _ => REFUSE,
    }
}

/// A transition of a header line's state `s` (in half A or B).
const fn header(s: u8, c: u8) -> u8 {
    let half = if s >= B { B } else { A };
    let at = s - half;
    if at > END {
        return REFUSE;
    }
    match at {
        L0 if c == C_CR => half + END,
        L0 if c == C_UH || c == C_LH => half + N1,
        // "ho", "hos", "host".
        1 if c == C_UO || c == C_LO => half + 2,
        2 if c == C_US || c == C_LS => half + 3,
        3 if c == C_UT || c == C_LT => half + N4,
        // A second Host is refused.
        N4 if c == C_COLON => {
            if half == A {
                OWS
            } else {
                REFUSE
            }
        }
        L0..=NO if c == C_COLON && at != L0 => half + VAL,
        L0..=NO if tchar(c) => half + NO,
        VAL if c == C_CR => half + LF,
        VAL if visible(c) || ws(c) => half + VAL,
        LF if c == C_LF => half + L0,
        // The empty line: the head is over, with its one Host or without.
        END if c == C_LF => {
            if half == B {
                DONE
            } else {
                REFUSE
            }
        }
        _ => REFUSE,
    }
}

const fn classes() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = class_of(b as u8);
        b += 1;
    }
    t
}

const fn transitions() -> [u8; STATES * CLASSES] {
    let mut t = [0u8; STATES * CLASSES];
    let mut s = 0;
    while s < STATES {
        let mut c = 0;
        while c < CLASSES {
            t[s * CLASSES + c] = next(s as u8, c as u8);
            c += 1;
        }
        s += 1;
    }
    t
}

/// Each byte's class.
pub static CLASS: [u8; 256] = classes();
/// (state × [`CLASSES`] + class) → transition.
pub static TRANSITIONS: [u8; STATES * CLASSES] = transitions();

/// The Host name of a request head (where it starts, its length), as the kernel's scan finds
/// it: None when the head is refused or does not end within `head` and [`HEAD_MAX`].
pub fn scan(head: &[u8]) -> Option<(usize, usize)> {
    let mut state = START;
    let (mut at, mut len) = (0, 0);
    for (i, &b) in head.iter().take(HEAD_MAX).enumerate() {
        let t = TRANSITIONS
            [usize::from(state & STATE_MASK) * CLASSES + usize::from(CLASS[usize::from(b)])];
        if t & HOST_START != 0 {
            at = i;
            len = 0;
        }
        if t & (HOST_START | HOST_MORE) != 0 {
            len += 1;
        }
        state = t & STATE_MASK;
        match state {
            REFUSE => return None,
            DONE => return Some((at, len)),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(head: &[u8]) -> Option<&[u8]> {
        scan(head).map(|(at, len)| &head[at..at + len])
    }

    #[test]
    fn the_host_of_a_well_formed_head_is_found() {
        let curl = b"GET /v1/models HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: curl/8.14.1\r\nAccept: */*\r\n\r\n";
        assert_eq!(host(curl), Some(&b"api.example.com"[..]));
        // Case, a port, white space around the value, Host after other fields, a body after.
        let h = b"POST / HTTP/1.0\r\nAccept: x\r\nhOsT:\t API.Example.com:8080 \r\nX-A: b\r\n\r\n{\"a\":1}";
        assert_eq!(host(h), Some(&b"API.Example.com"[..]));
        assert_eq!(
            host(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"),
            Some(&b"a"[..])
        );
        // Field names that start like "host".
        let h = b"GET / HTTP/1.1\r\nHostname: x\r\nHos: y\r\nHost: a.b\r\n\r\n";
        assert_eq!(host(h), Some(&b"a.b"[..]));
    }

    #[test]
    fn heads_a_server_could_read_another_host_from_are_refused() {
        for (why, head) in [
            ("no Host", &b"GET / HTTP/1.1\r\nAccept: x\r\n\r\n"[..]),
            ("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            (
                "absolute form",
                b"GET http://b/ HTTP/1.1\r\nHost: a\r\n\r\n",
            ),
            (
                "authority form",
                b"CONNECT b:443 HTTP/1.1\r\nHost: a\r\n\r\n",
            ),
            (
                "bare LF",
                b"GET / HTTP/1.1\r\nHost: a\r\nX: y\nHost: b\r\n\r\n",
            ),
            (
                "bare CR",
                b"GET / HTTP/1.1\r\nHost: a\r\nX: y\rHost: b\r\n\r\n",
            ),
            ("folded", b"GET / HTTP/1.1\r\nHost: a\r\n b\r\n\r\n"),
            (
                "space before colon",
                b"GET / HTTP/1.1\r\nHost : b\r\nHost: a\r\n\r\n",
            ),
            ("NUL", b"GET / HTTP/1.1\r\nHost: a\r\nX: \0\r\n\r\n"),
            ("empty Host", b"GET / HTTP/1.1\r\nHost: \r\n\r\n"),
            ("user info", b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n"),
            ("IPv6 literal", b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n"),
            ("two names", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
            ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            ("HTTP/0.9", b"GET /\r\n"),
            ("lower-case method", b"get / HTTP/1.1\r\nHost: a\r\n\r\n"),
            ("head not ended", b"GET / HTTP/1.1\r\nHost: a\r\n"),
            ("TLS", b"\x16\x03\x01\x00\x10"),
        ] {
            assert_eq!(scan(head), None, "{why}");
        }
        let mut long = b"GET / HTTP/1.1\r\nHost: a\r\nX: ".to_vec();
        long.resize(HEAD_MAX, b'x');
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(scan(&long), None, "a head past HEAD_MAX");
    }

    #[test]
    fn a_missing_transition_refuses() {
        // Every (state, class) pair not named is REFUSE, and no state outside the table is
        // ever reached.
        for t in TRANSITIONS {
            assert!(usize::from(t & STATE_MASK) < STATES);
        }
        assert_eq!(
            TRANSITIONS[usize::from(REFUSE) * CLASSES..][..CLASSES],
            [REFUSE; CLASSES]
        );
        assert_eq!(
            TRANSITIONS[usize::from(DONE) * CLASSES..][..CLASSES],
            [REFUSE; CLASSES]
        );
    }
}
