//! Text from a tenant or a remote service, made safe to show to a person.
//!
//! An image name or a Glance error body may hold control characters: ESC starts a terminal
//! escape sequence, CR and LF forge table rows and log lines, bidi overrides reorder what is
//! read. [`escape`] writes each such character as `\u{1b}` (Rust's notation), and leaves every
//! other character, backslashes included, as it is: so escaping escaped text changes nothing,
//! and a display site need not know whether the text was escaped before it. JSON outputs carry
//! the exact value; only text for terminals and log lines goes through here.

use std::borrow::Cow;
use std::fmt::Write;

/// Whether `c` is shown as `\u{…}` rather than as itself: every C0 control (tab, CR and LF
/// included), DEL, every C1 control, the bidi marks, embeddings, overrides and isolates, and
/// the Unicode line and paragraph separators.
pub fn is_unsafe(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{1f}'
        | '\u{7f}'..='\u{9f}'
        | '\u{61c}'
        | '\u{200e}' | '\u{200f}'
        | '\u{2028}'..='\u{202e}'
        | '\u{2066}'..='\u{2069}')
}

/// `text` with each unsafe character (see [`is_unsafe`]) written as `\u{hex}`; borrowed when
/// there is none.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        push(&mut out, c);
    }
    Cow::Owned(out)
}

/// What stands for a file path of the appliance in [`without_paths`].
pub const PATH_WITHHELD: &str = "<path on the appliance>";

/// `text` with each absolute file path (a word that begins with `/` after a space, a quote, a
/// parenthesis or the start) replaced by [`PATH_WITHHELD`]: a reason shown to a tenant says
/// what failed, not where the operator keeps the files. A path ends at a space, a quote, a
/// parenthesis, a comma, or a colon that ends a word (`/srv/ot1: Permission denied`).
pub fn without_paths(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.char_indices().peekable();
    let mut before = ' ';
    while let Some((_, c)) = chars.next() {
        if c == '/' && matches!(before, ' ' | '(' | '\'' | '"') {
            while let Some(&(_, next)) = chars.peek() {
                let colon_ends = next == ':'
                    && chars
                        .clone()
                        .nth(1)
                        .is_none_or(|(_, after)| after.is_whitespace());
                if next.is_whitespace() || matches!(next, ')' | '\'' | '"' | ',') || colon_ends {
                    break;
                }
                chars.next();
            }
            out.push_str(PATH_WITHHELD);
            before = '/';
            continue;
        }
        out.push(c);
        before = c;
    }
    out
}

/// [`escape`]d `text`, cut after at most `max` characters (an escape is never cut in two); a
/// `…` ends a text that was cut.
pub fn excerpt(text: &str, max: usize) -> String {
    let mut out = String::new();
    let mut shown = 0;
    for c in text.chars() {
        let mut piece = String::new();
        push(&mut piece, c);
        let width = piece.chars().count();
        if shown + width > max {
            out.push('…');
            return out;
        }
        shown += width;
        out.push_str(&piece);
    }
    out
}

fn push(out: &mut String, c: char) {
    if is_unsafe(c) {
        // Writing to a String cannot fail.
        let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
    } else {
        out.push(c);
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn paths_are_withheld_and_the_rest_is_kept() {
        let w = PATH_WITHHELD;
        assert_eq!(
            without_paths("image 7 is missing (/srv/data/regions/ot1/7)"),
            format!("image 7 is missing ({w})")
        );
        assert_eq!(
            without_paths("/srv/ot2: Permission denied (os error 13)"),
            format!("{w}: Permission denied (os error 13)")
        );
        assert_eq!(
            without_paths("'/a b' and \"/c\", /d, then /e"),
            format!("'{w} b' and \"{w}\", {w}, then {w}")
        );
        assert_eq!(
            without_paths("GET http://g:9292/v2/images 1/2 a/b"),
            "GET http://g:9292/v2/images 1/2 a/b"
        );
        assert_eq!(without_paths("/x:y/z"), w);
        assert_eq!(without_paths(""), "");
    }

    use super::*;

    #[test]
    fn control_characters_are_written_as_escapes() {
        assert_eq!(
            escape("a\u{1b}[31mb\rc\nd\u{7}e\u{0}\t\u{7f}\u{9b}"),
            "a\\u{1b}[31mb\\u{d}c\\u{a}d\\u{7}e\\u{0}\\u{9}\\u{7f}\\u{9b}"
        );
    }

    #[test]
    fn bidi_controls_and_line_separators_are_escaped() {
        assert_eq!(
            escape("x\u{202e}y\u{2066}z\u{200f}\u{61c}\u{2028}\u{2029}"),
            "x\\u{202e}y\\u{2066}z\\u{200f}\\u{61c}\\u{2028}\\u{2029}"
        );
    }

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        for text in [
            "ubuntu-22.04 (qcow2)",
            "Ærø — 東京 ✓",
            "back\\slash \\u{1b}",
            "",
        ] {
            assert!(matches!(escape(text), Cow::Borrowed(t) if t == text));
        }
    }

    #[test]
    fn escaping_twice_is_escaping_once() {
        let once = escape("a\u{1b}b\\c\n").into_owned();
        assert_eq!(escape(&once), once);
    }

    #[test]
    fn every_character_of_the_escaped_text_is_safe() {
        let all: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        assert!(!escape(&all).chars().any(is_unsafe));
    }

    #[test]
    fn excerpts_are_cut_between_escapes() {
        assert_eq!(excerpt("abc", 3), "abc");
        assert_eq!(excerpt("abcd", 3), "abc…");
        assert_eq!(excerpt("ab\u{1b}cd", 8), "ab\\u{1b}…");
        assert_eq!(excerpt("ab\u{1b}cd", 7), "ab…");
        assert_eq!(excerpt("a\u{1b}", 100), "a\\u{1b}");
    }
}
