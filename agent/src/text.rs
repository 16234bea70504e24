//! Text cut to a size: what a field, a column or a message holds.

/// The longest start of `s` of at most `max` bytes that ends at a character boundary.
pub fn prefix(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `s` with every control or invisible formatting character (a newline, an ANSI escape, a
/// bidi override) written as its `\u{…}` escape: text from elsewhere, safe to put in a log
/// line or on a terminal.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    let hidden = |c: char| c.is_control() || crate::policy::owner::is_hidden_format(c);
    if !s.chars().any(hidden) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if hidden(c) {
                format!("\\u{{{:04x}}}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

#[cfg(test)]
mod tests {
    #[test]
    fn printable_text_shows_what_would_move_a_terminal_or_forge_a_line() {
        assert_eq!(super::printable("plain \"text\""), "plain \"text\"");
        assert_eq!(
            super::printable("a\nINFO forged\u{1b}[8m\u{202e}"),
            "a\\u{000a}INFO forged\\u{001b}[8m\\u{202e}"
        );
    }

    #[test]
    fn a_cut_never_splits_a_character() {
        assert_eq!(super::prefix("héllo", 2), "h");
        assert_eq!(super::prefix("héllo", 3), "hé");
        assert_eq!(super::prefix("abc", 10), "abc");
    }
}
