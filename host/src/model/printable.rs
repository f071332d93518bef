//! Text a plugin controls, made safe for a terminal or a log line: a step's
//! output, its error message, what it logs, what it says it is. Control
//! characters (ESC, CR, LF, BEL, …) and the bidirectional overrides that
//! reorder what a reader sees are shown as `\u{…}`, so such text can
//! neither retitle a terminal, clear it, nor forge a line of its own.
//! JSON output is never escaped this way: serde's escaping is exact.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether `c` must not reach a terminal as itself.
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` on one line, every control character shown as `\u{…}`.
pub fn printable(text: &str) -> Cow<'_, str> {
    escape(text, |_| false)
}

/// `text` with its line breaks (and tabs) kept, every other control
/// character shown as `\u{…}`: for multi-line text that a caller prints
/// line by line, each under a prefix of its own.
pub fn printable_lines(text: &str) -> Cow<'_, str> {
    escape(text, |c| c == '\n' || c == '\t')
}

fn escape(text: &str, keep: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !text.chars().any(|c| unsafe_char(c) && !keep(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if unsafe_char(c) && !keep(c) {
            // Writing to a String cannot fail.
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_cannot_reach_the_terminal() {
        let hostile = "\u{1b}]0;owned\u{7}\u{1b}[2J\r\n✓ fake-step  done\u{202e}txt";
        let shown = printable(hostile);
        assert!(!shown.chars().any(unsafe_char), "{shown}");
        assert_eq!(
            shown,
            "\\u{1b}]0;owned\\u{7}\\u{1b}[2J\\u{d}\\u{a}✓ fake-step  done\\u{202e}txt"
        );
        assert!(matches!(printable("plain text, ünïcode"), Cow::Borrowed(_)));
        assert_eq!(printable_lines("a\r\nb\tc\u{1b}"), "a\\u{d}\nb\tc\\u{1b}");
    }
}
