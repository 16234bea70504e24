//! The scan of an HTTP/1 request head that the server-name check runs on plain HTTP: which
//! Host a server would route the request by, and that it routes no other request on the
//! connection. Two tables built at compile time, a class for each byte and a transition for
//! each (state, class), which the kernel walks a byte at a time with no branch on the state
//! (the verifier then checks each byte once, not once for every path of states through the
//! bytes before it), and which tests walk with [`scan`].
//!
//! Strict, so that a server cannot read another Host than the check did: the request line's
//! target in origin form (`/…`) or `*`, never a URL or an authority (a server prefers those to
//! Host); the version `HTTP/1.0` or `HTTP/1.1`; lines ending CRLF (no bare CR or LF, no
//! folded lines, no white space in a field name); no control bytes; exactly one Host, holding
//! a name and perhaps a port; exactly one Connection, whose value is `close` (a server then
//! answers this request and no other on the connection: RFC 9112 section 9.6), and no
//! Upgrade; the whole head, to its empty line, within [`HEAD_MAX`] bytes.

/// How much of a request the scan reads: the head must end within it.
pub const HEAD_MAX: usize = 512;
pub const CLASSES: usize = 32;
pub const STATES: usize = 64;

/// A transition's next state is in its low six bits; the bits above say what the byte was.
pub const STATE_MASK: u16 = 0x3f;
/// The byte starts the Host name.
pub const HOST_START: u16 = 1 << 6;
/// The byte is more of the Host name.
pub const HOST_MORE: u16 = 1 << 7;
/// The colon of a Host field.
pub const HOST_FIELD: u16 = 1 << 8;
/// The colon of a Connection field.
pub const CONNECTION_FIELD: u16 = 1 << 9;
/// The end of a Connection field whose value is `close`.
pub const CLOSE: u16 = 1 << 10;
/// The colon of an Upgrade field.
pub const UPGRADE: u16 = 1 << 11;

/// The head is refused (0: what a missing transition holds).
pub const REFUSE: u16 = 0;
/// The head ended; it holds a request if the fields counted are right (see [`scan`]).
pub const DONE: u16 = 1;
/// The first byte of a request.
pub const START: u16 = M0;

// The request line: method, target, version.
const M0: u16 = 2;
const M: u16 = 3;
const T0: u16 = 4;
const T: u16 = 5;
/// `HTTP/1.`, then `0` or `1`, then CR: V0 expects the `H`, V8 the CR.
const V0: u16 = 6;
const V7: u16 = 13;
const V8: u16 = 14;
const RLF: u16 = 15;
// Header lines: a line's first byte; the field names looked for, a byte at a time; another
// field name; another field's value; the LF ending a line; the LF of the empty line.
const L0: u16 = 16;
/// "h", "ho", "hos", "host".
const H1: u16 = 17;
const H4: u16 = 20;
/// "c" … "connection".
const C1: u16 = 21;
const C10: u16 = 30;
/// "u" … "upgrade".
const U1: u16 = 31;
const U7: u16 = 37;
const NO: u16 = 38;
const VAL: u16 = 39;
const LF: u16 = 40;
const END: u16 = 41;
// The Host value: white space before it, its name, its port, white space after it.
const OWS: u16 = 42;
const HOST: u16 = 43;
const PORT: u16 = 44;
const TRAIL: u16 = 45;
// The Connection value: white space before it, "c" … "close", white space after it.
const COWS: u16 = 46;
const K1: u16 = 47;
const K5: u16 = 51;
const KTRAIL: u16 = 52;

// Byte classes (0: control bytes and DEL). Letters the scan looks for have a class each, in
// either case.
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
const C_ZERO: u8 = 10;
const C_ONE: u8 = 11;
const C_DIGIT: u8 = 12;
/// The letters of "host", "connection", "upgrade", "close" and "HTTP", from `a` on.
const LETTERS: &[u8; 15] = b"acdeghilnoprstu";
const C_LETTER0: u8 = 13;
/// Other letters.
const C_LETTER: u8 = 28;
/// The other characters of a field name (RFC 9110 `tchar`).
const C_TCHAR: u8 = 29;
/// Other visible ASCII.
const C_VISIBLE: u8 = 30;
/// 0x80 and above (obs-text).
const C_HIGH: u8 = 31;

const fn class_of(b: u8) -> u8 {
    if b.is_ascii_alphabetic() {
        let l = b.to_ascii_lowercase();
        let mut i = 0;
        while i < LETTERS.len() {
            if LETTERS[i] == l {
                return C_LETTER0 + i as u8;
            }
            i += 1;
        }
        return C_LETTER;
    }
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
        b'0' => C_ZERO,
        b'1' => C_ONE,
        b'2'..=b'9' => C_DIGIT,
        b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'+' | b'^' | b'`' | b'|' | b'~' => C_TCHAR,
        0x21..=0x7e => C_VISIBLE,
        0x80..=0xff => C_HIGH,
        _ => C_CTL,
    }
}

/// The class of a letter (either case).
const fn letter(l: u8) -> u8 {
    class_of(l)
}

const fn alpha(c: u8) -> bool {
    c >= C_LETTER0 && c <= C_LETTER
}

const fn digit(c: u8) -> bool {
    c == C_ZERO || c == C_ONE || c == C_DIGIT
}

/// A Host name's bytes: letters, digits, `.`, `-`, `_`.
const fn host_char(c: u8) -> bool {
    alpha(c) || digit(c) || c == C_DOT || c == C_DASH
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

/// A field name being read as one of the names looked for: its next letter, the state after
/// it, and what its colon does when the name is complete.
const fn name_byte(s: u16, c: u8, word: &[u8], first: u16, done: u16) -> u16 {
    let at = (s - first + 1) as usize;
    if at < word.len() && c == letter(word[at]) {
        return s + 1;
    }
    if c == C_COLON {
        return if at == word.len() { done } else { VAL };
    }
    if tchar(c) { NO } else { REFUSE }
}

const fn next(s: u16, c: u8) -> u16 {
    const VERSION: [u8; 7] = [b'h', b't', b't', b'p', b'/', b'1', b'.'];
    match s {
        M0 | M if alpha(c) => M,
        M if c == C_SP => T0,
        T0 if c == C_SLASH || c == C_STAR => T,
        T if c == C_SP => V0,
        T if visible(c) => T,
        V0..=12 if c == class_of(VERSION[(s - V0) as usize]) => s + 1,
        V7 if c == C_ZERO || c == C_ONE => V8,
        V8 if c == C_CR => RLF,
        RLF | LF if c == C_LF => L0,
        L0 if c == C_CR => END,
        L0 if c == letter(b'h') => H1,
        L0 if c == letter(b'c') => C1,
        L0 if c == letter(b'u') => U1,
        L0 if tchar(c) => NO,
        H1..=H4 => name_byte(s, c, b"host", H1, OWS | HOST_FIELD),
        C1..=C10 => name_byte(s, c, b"connection", C1, COWS | CONNECTION_FIELD),
        U1..=U7 => name_byte(s, c, b"upgrade", U1, VAL | UPGRADE),
        NO if tchar(c) => NO,
        NO if c == C_COLON => VAL,
        VAL if c == C_CR => LF,
        VAL if visible(c) || ws(c) => VAL,
        // The empty line: the head is over.
        END if c == C_LF => DONE,
        OWS if ws(c) => OWS,
        OWS if host_char(c) => HOST | HOST_START,
        HOST if host_char(c) => HOST | HOST_MORE,
        HOST if c == C_COLON => PORT,
        PORT if digit(c) => PORT,
        HOST | PORT | TRAIL if ws(c) => TRAIL,
        HOST | PORT | TRAIL if c == C_CR => LF,
        COWS if ws(c) => COWS,
        COWS if c == letter(b'c') => K1,
        K1..=52 if c == C_CR => {
            if s == K5 || s == KTRAIL {
                LF | CLOSE
            } else {
                LF
            }
        }
        K1..=K5 if s < K5 && c == letter(b"close"[(s - K1 + 1) as usize]) => s + 1,
        K5 | KTRAIL if ws(c) => KTRAIL,
        KTRAIL if !ws(c) && visible(c) => VAL,
        // Another value ("keep-alive", "close, upgrade"): read as any field's.
        COWS..=K5 if visible(c) || ws(c) => VAL,
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

const fn transitions() -> [u16; STATES * CLASSES] {
    let mut t = [0u16; STATES * CLASSES];
    let mut s = 0;
    while s < STATES {
        let mut c = 0;
        while c < CLASSES {
            t[s * CLASSES + c] = next(s as u16, c as u8);
            c += 1;
        }
        s += 1;
    }
    t
}

// The kernel indexes the transitions by state × CLASSES + class and masks the index to the
// table: every class below CLASSES, the table a power of two, every state below STATES.
const _: () = {
    let mut b = 0;
    while b < 256 {
        assert!((class_of(b as u8) as usize) < CLASSES);
        b += 1;
    }
    assert!((STATES * CLASSES).is_power_of_two());
    assert!((KTRAIL as usize) < STATES);
    assert!(C_LETTER0 as usize + LETTERS.len() == C_LETTER as usize);
};

/// Each byte's class.
pub static CLASS: [u8; 256] = classes();
/// (state × [`CLASSES`] + class) → transition.
pub static TRANSITIONS: [u16; STATES * CLASSES] = transitions();

/// What the fields counted must be once the head has ended: one Host, one Connection whose
/// value is `close`, no Upgrade.
pub const fn fields_right(hosts: u32, connections: u32, closes: u32, upgrades: u32) -> bool {
    hosts == 1 && connections == 1 && closes == 1 && upgrades == 0
}

/// The Host name of a request head (where it starts, its length), as the kernel's scan finds
/// it: None when the head is refused or does not end within `head` and [`HEAD_MAX`].
pub fn scan(head: &[u8]) -> Option<(usize, usize)> {
    let mut state = START;
    let (mut at, mut len) = (0, 0);
    let (mut hosts, mut connections, mut closes, mut upgrades) = (0, 0, 0, 0);
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
        hosts += u32::from(t & HOST_FIELD != 0);
        connections += u32::from(t & CONNECTION_FIELD != 0);
        closes += u32::from(t & CLOSE != 0);
        upgrades += u32::from(t & UPGRADE != 0);
        state = t & STATE_MASK;
        match state {
            REFUSE => return None,
            DONE => {
                return fields_right(hosts, connections, closes, upgrades).then_some((at, len));
            }
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
        let curl = b"GET /v1/models HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: curl/8.14.1\r\nAccept: */*\r\nConnection: close\r\n\r\n";
        assert_eq!(host(curl), Some(&b"api.example.com"[..]));
        // Case, a port, white space around the values, Host after other fields, a body after.
        let h = b"POST / HTTP/1.0\r\nCONNECTION:   Close \r\nAccept: x\r\nhOsT:\t API.Example.com:8080 \r\nX-A: b\r\n\r\n{\"a\":1}";
        assert_eq!(host(h), Some(&b"API.Example.com"[..]));
        assert_eq!(
            host(b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
            Some(&b"a"[..])
        );
        // Field names that start like the ones looked for, and values that hold them.
        let h = b"GET / HTTP/1.1\r\nHostname: x\r\nHos: y\r\nConnections: keep-alive\r\nUpgrades: h2c\r\nUp: z\r\nX: Host: b\r\nHost: a.b\r\nConnection: close\r\n\r\n";
        assert_eq!(host(h), Some(&b"a.b"[..]));
    }

    #[test]
    fn heads_a_server_could_read_another_host_from_are_refused() {
        for (why, head) in [
            (
                "no Host",
                &b"GET / HTTP/1.1\r\nAccept: x\r\nConnection: close\r\n\r\n"[..],
            ),
            (
                "two Hosts",
                b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
            ),
            (
                "absolute form",
                b"GET http://b/ HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            ),
            (
                "authority form",
                b"CONNECT b:443 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            ),
            (
                "bare LF",
                b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX: y\nHost: b\r\n\r\n",
            ),
            (
                "bare CR",
                b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX: y\rHost: b\r\n\r\n",
            ),
            (
                "folded",
                b"GET / HTTP/1.1\r\nHost: a\r\n b\r\nConnection: close\r\n\r\n",
            ),
            (
                "space before colon",
                b"GET / HTTP/1.1\r\nHost : b\r\nHost: a\r\nConnection: close\r\n\r\n",
            ),
            (
                "NUL",
                b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX: \0\r\n\r\n",
            ),
            (
                "empty Host",
                b"GET / HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n",
            ),
            (
                "user info",
                b"GET / HTTP/1.1\r\nHost: a@b\r\nConnection: close\r\n\r\n",
            ),
            (
                "IPv6 literal",
                b"GET / HTTP/1.1\r\nHost: [::1]\r\nConnection: close\r\n\r\n",
            ),
            (
                "two names",
                b"GET / HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n",
            ),
            ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            (
                "HTTP/1.2",
                b"GET / HTTP/1.2\r\nHost: a\r\nConnection: close\r\n\r\n",
            ),
            ("HTTP/0.9", b"GET /\r\n"),
            (
                "head not ended",
                b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n",
            ),
            ("TLS", b"\x16\x03\x01\x00\x10"),
            // More requests could follow on the connection, each routed by its own Host.
            (
                "kept alive",
                b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: b\r\n\r\n",
            ),
            (
                "keep-alive",
                b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
            ),
            (
                "close among others",
                b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, x\r\n\r\n",
            ),
            (
                "two Connections",
                b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n",
            ),
            (
                "Upgrade",
                b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nUpgrade: h2c\r\n\r\n",
            ),
            (
                "empty Connection",
                b"GET / HTTP/1.1\r\nHost: a\r\nConnection:\r\n\r\n",
            ),
        ] {
            assert_eq!(scan(head), None, "{why}");
        }
        let mut long = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX: ".to_vec();
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
        for s in [REFUSE, DONE] {
            assert_eq!(
                TRANSITIONS[usize::from(s) * CLASSES..][..CLASSES],
                [REFUSE; CLASSES]
            );
        }
    }
}
