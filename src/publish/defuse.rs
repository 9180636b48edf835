//! Agent text made harmless for where baton shows it.
//!
//! Whatever an agent writes can come from a stranger's issue, so baton posts
//! it defused: on GitHub (`markdown`, `anywhere`, `plain`) control
//! characters are gone, a `<!-- baton:` marker of the agent's is broken, so
//! the only marker in a body is baton's own (the lookup that recovers a lost
//! post trusts it), and with `[output] mentions = "defuse"` an `@name` or
//! `@org/team` notifies no one (`@` and a zero-width space, as Dependabot and
//! Renovate post them) — except the event's author, who asked. On a
//! terminal (`escape_controls`) control characters are shown, not obeyed.
//!
//! Code is left as it is: GitHub links no mention in a code span or block,
//! and a review's `suggestion` block must stay byte-exact. What is code is
//! read by a CommonMark parser (GitHub's dialect: tables, footnotes,
//! strikethrough, task lists), because a guess that takes text for code
//! would let a mention through. Control characters and markers go even
//! from code: nothing about them is worth keeping.
//!
//! Pure: no IO. This module never touches baton's own footer or marker; the
//! callers in `body` and `notify` put those around what it returns.

use std::ops::Range;

use pulldown_cmark::{Event, Options, Parser, Tag};

use crate::rules::Mentions;

/// What makes `@name` no longer a mention, and `<!-- baton:` no longer a
/// marker, while reading the same.
const ZWSP: char = '\u{200B}';

/// A bare URL longer than this is not taken for a link (its `@` is defused).
const MAX_URL: usize = 2048;

/// How a job's text is defused: its trigger's `mentions`, and who may
/// still be mentioned (the login of the event's author).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy<'a> {
    pub mentions: Mentions,
    pub author: Option<&'a str>,
}

/// Markdown that is posted as it stands (a comment, a review, a pull
/// request's body): mentions in code stay, since GitHub links none there.
pub(crate) fn markdown(text: &str, policy: &Policy) -> String {
    let text = plain(text);
    match policy.mentions {
        Mentions::Keep => text,
        Mentions::Defuse => defuse_mentions(&text, policy.author, &code(&text)),
    }
}

/// Text that lands inside someone else's markdown (a template's
/// `{{ result }}`, a title): what is code there is not known here, so
/// every mention is defused, code or not.
pub(crate) fn anywhere(text: &str, policy: &Policy) -> String {
    let text = plain(text);
    match policy.mentions {
        Mentions::Keep => text,
        Mentions::Defuse => defuse_mentions(&text, policy.author, &[]),
    }
}

/// Control characters removed and markers broken, nothing else: for
/// notifications, whose receivers know no GitHub mentions.
pub fn plain(text: &str) -> String {
    break_markers(&strip_controls(text))
}

/// Control characters (but `\n` and `\t`) shown as `\x1b`, as journalctl
/// does, so that a log or result printed on a terminal cannot move its
/// cursor, retitle its window or write its clipboard (OSC 52). Bidi
/// overrides are shown as `\u{202e}`: they would reorder what is printed.
pub fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if is_bidi_control(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Bidi embeddings, overrides and isolates (U+202A–U+202E, U+2066–U+2069)
/// make text read in another order than it is written (the "Trojan
/// Source" trick); nothing an agent says needs them, so they go too.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Every control character but `\n` and `\t` (C0, DEL, C1: `\r`, ESC, NUL,
/// the CSI and OSC introducers…) and the bidi controls.
fn strip_controls(text: &str) -> String {
    text.chars().filter(|&c| c == '\n' || c == '\t' || !(c.is_control() || is_bidi_control(c))).collect()
}

/// `<!--`, optional blanks, `baton:` (in any case) becomes `<` + zero-width
/// space + the rest: markdown shows it as text, and no lookup for a
/// marker (`event::MARKER_PREFIX`) finds it.
fn break_markers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("<!--") {
        let after = &rest[at + 4..];
        let blanks = after.len() - after.trim_start_matches([' ', '\t', '\n']).len();
        let is_marker = after.get(blanks..blanks + 6).is_some_and(|w| w.eq_ignore_ascii_case("baton:"));
        out.push_str(&rest[..at + 1]);
        if is_marker {
            out.push(ZWSP);
        }
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
    out
}

/// The byte ranges of `text` where GitHub links no mention: code spans,
/// code blocks, and links (GitHub leaves a link's text alone, and its
/// address must not change).
fn code(text: &str) -> Vec<Range<usize>> {
    let options =
        Options::ENABLE_TABLES | Options::ENABLE_FOOTNOTES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS;
    let mut ranges: Vec<Range<usize>> = Parser::new_ext(text, options)
        .into_offset_iter()
        .filter(|(event, _)| {
            matches!(event, Event::Code(_) | Event::Start(Tag::CodeBlock(_) | Tag::Link { .. } | Tag::Image { .. }))
        })
        .map(|(_, range)| range)
        .collect();
    ranges.sort_by_key(|r| r.start);
    ranges
}

/// `@` and a zero-width space for every mention outside `keep` but the
/// author's (an `@org/team` always).
///
/// GitHub's grammar: `@` at the start or after a character that is not a
/// word character, then a name (`[A-Za-z0-9](-?[A-Za-z0-9])*`, at most 39)
/// and optionally `/team-slug`. This reads a little wider on purpose — any
/// letter or digit after the `@`, and `_` or a non-ASCII letter before it
/// counts as a boundary (`_@x_` is emphasis around a mention) — since a name
/// GitHub would not link loses nothing by the space, and a rule narrower
/// than GitHub's lets a mention through. `&#64;`, `&#x40;` and `&commat;`
/// are an `@` to GitHub, so to this too.
fn defuse_mentions(text: &str, author: Option<&str>, keep: &[Range<usize>]) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut keep = keep.iter().peekable();
    let mut i = 0;
    while i < text.len() {
        while keep.peek().is_some_and(|r| r.end <= i) {
            keep.next();
        }
        if let Some(r) = keep.peek().filter(|r| r.start <= i) {
            out.push_str(&text[i..r.end]);
            i = r.end;
            continue;
        }
        let rest = &text[i..];
        if let Some(sign) = at_sign(rest) {
            let boundary = text[..i].chars().next_back().is_none_or(|c| !c.is_ascii_alphanumeric());
            let name_len = rest[sign..].bytes().take_while(|b| b.is_ascii_alphanumeric() || *b == b'-').count();
            let name = &rest[sign..sign + name_len];
            let starts_a_name = name.starts_with(|c: char| c.is_ascii_alphanumeric());
            if boundary && starts_a_name && !in_autolink(text, i) {
                let after = &rest[sign + name_len..];
                let team = after.strip_prefix('/').is_some_and(|t| t.starts_with(|c: char| c.is_ascii_alphanumeric()));
                let authors = !team && author.is_some_and(|a| a.eq_ignore_ascii_case(name));
                if !authors {
                    out.push('@');
                    out.push(ZWSP);
                    i += sign;
                    continue;
                }
            }
        }
        let c = rest.chars().next().unwrap_or_default();
        out.push(c);
        i += c.len_utf8().max(1);
    }
    out
}

/// The length of the `@` that starts `s`: the character, or an HTML
/// character reference to it (`&#64;`, `&#x40;`, `&commat;`, any case,
/// leading zeros allowed).
fn at_sign(s: &str) -> Option<usize> {
    if s.starts_with('@') {
        return Some(1);
    }
    let rest = s.strip_prefix('&')?;
    if rest.get(..7).is_some_and(|w| w.eq_ignore_ascii_case("commat;")) {
        return Some(8);
    }
    let rest = rest.strip_prefix('#')?;
    let (digits, radix, prefix) = match rest.strip_prefix(['x', 'X']) {
        Some(hex) => (hex, 16, 2),
        None => (rest, 10, 1),
    };
    let len = digits.bytes().take_while(|b| b.is_ascii_hexdigit()).count();
    let value = u32::from_str_radix(digits.get(..len)?, radix).ok()?;
    (value == 0x40 && digits[len..].starts_with(';')).then_some(1 + prefix + len + 1)
}

/// Whether the `@` at `at` lies in the path of a bare URL that GitHub
/// turns into a link (`https://www.npmjs.com/package/@scope/name`), where
/// it is no mention and a space would break the address. Strict on
/// purpose: only a token that starts at a blank (or a `(`), with an ASCII
/// domain that has a dot, and nothing before the `@` that markdown reads
/// as markup (`*`, `_`, `~`, a backtick, brackets, `<`, `\`, `&`).
fn in_autolink(text: &str, at: usize) -> bool {
    // Bounded, so that a text of many `@` and no blank costs no more than
    // a few passes over it.
    let mut window = at.saturating_sub(MAX_URL);
    while !text.is_char_boundary(window) {
        window += 1;
    }
    let start = match text[window..at].rfind(char::is_whitespace) {
        Some(s) => window + s + 1,
        None if window == 0 => 0,
        None => return false,
    };
    let token = &text[start..at];
    let token = token.strip_prefix('(').unwrap_or(token);
    let lower = token.to_ascii_lowercase();
    let Some(rest) = ["https://", "http://", "www."].iter().find_map(|p| lower.strip_prefix(p)) else {
        return false;
    };
    let Some((domain, path)) = rest.split_once('/') else { return false };
    let domain_ok = domain.contains('.')
        && domain.split('.').all(|s| {
            !s.is_empty()
                && s.starts_with(|c: char| c.is_ascii_alphanumeric())
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    let path_ok = path.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:/?#%+=,;@".contains(&b));
    domain_ok && path_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUTHOR: &str = "Codertocat";

    /// `input` posted as markdown by a trigger with `mentions = "defuse"`
    /// and the event's author `Codertocat` reads `expected`, where `␣`
    /// stands for the zero-width space.
    fn check(input: &str, expected: &str) {
        let policy = Policy { mentions: Mentions::Defuse, author: Some(AUTHOR) };
        let got = markdown(input, &policy).replace(ZWSP, "␣");
        assert_eq!(got, expected, "{input:?}");
        // Defusing twice changes nothing: a body may pass here again.
        let again = markdown(&markdown(input, &policy), &policy).replace(ZWSP, "␣");
        assert_eq!(again, expected, "twice: {input:?}");
    }

    #[test]
    fn control_characters_go_but_newlines_and_tabs() {
        check("a\x1b[31mred\x1b[0m\tb\r\nc", "a[31mred[0m\tb\nc");
        check("copy \x1b]52;c;ZWNobyBoaQ==\x07 me", "copy ]52;c;ZWNobyBoaQ== me");
        check("\x1b]0;owned\x07title", "]0;ownedtitle");
        check("nul\0 del\x7f c1\u{9b}31m \u{85}", "nul del c131m ");
        check("bidi \u{202E}txt.exe\u{202C} \u{2066}x\u{2069}", "bidi txt.exe x");
        check("é ünïcödé 🦀 \u{200B}", "é ünïcödé 🦀 ␣");
    }

    #[test]
    fn markers_other_than_batons_own_are_broken() {
        check("<!-- baton:job=other -->", "<␣!-- baton:job=other -->");
        check("x<!--baton:job=o status -->", "x<␣!--baton:job=o status -->");
        check("<!--\n BATON:job=o -->", "<␣!--\n BATON:job=o -->");
        check("`<!-- baton:job=o -->`", "`<␣!-- baton:job=o -->`");
        check("<!-\x1b- baton:job=o -->", "<␣!-- baton:job=o -->");
        check("<!-- a comment -->", "<!-- a comment -->");
    }

    #[test]
    fn mentions_stop_being_mentions() {
        check("@someone and @other-person.", "@␣someone and @␣other-person.");
        check("cc @acme/security-team", "cc @␣acme/security-team");
        check("(@a) [@b] *@c* _@d_ >@e", "(@␣a) [@␣b] *@␣c* _@␣d_ >@␣e");
        check("\\@escaped &#64;dec &#x40;hex &#0064;zeros &commat;named", "\\@␣escaped @␣dec @␣hex @␣zeros @␣named");
        check("# @heading\n> @quote\n- @item", "# @␣heading\n> @␣quote\n- @␣item");
        check("<div>\n@in-html\n</div>", "<div>\n@␣in-html\n</div>");
        check(&format!("@{}", "a".repeat(50)), &format!("@␣{}", "a".repeat(50)));
    }

    #[test]
    fn what_is_not_a_mention_is_left_alone() {
        check("mail a@b.com or x_y@z", "mail a@b.com or x_y@z");
        check("@ alone, @-dash, @@, @_x", "@ alone, @-dash, @@, @_x");
        check("&#64; &amp;@x", "&#64; &amp;@␣x");
    }

    #[test]
    fn the_events_author_stays_mentionable_but_not_as_a_team() {
        check("thanks @Codertocat and @codertocat!", "thanks @Codertocat and @codertocat!");
        check("@Codertocat/team @Codertocat-x @Codertocatx", "@␣Codertocat/team @␣Codertocat-x @␣Codertocatx");
    }

    #[test]
    fn code_is_left_as_it_is() {
        check("`@decorator` and ``a ` @b``", "`@decorator` and ``a ` @b``");
        check("```\n@Override\nnpm i @types/node\n```\n@after", "```\n@Override\nnpm i @types/node\n```\n@␣after");
        check("~~~py\n@dataclass\n~~~", "~~~py\n@dataclass\n~~~");
        check("    @indented code\n\n@text", "    @indented code\n\n@␣text");
        check("- list\n\n  ```\n  @in-list\n  ```", "- list\n\n  ```\n  @in-list\n  ```");
        // A fence that is never closed runs to the end, as GitHub reads it.
        check("```\n@open", "```\n@open");
        // Not code: an unmatched backtick, a backslash-escaped one, a
        // "fence" inside an HTML block, a span that a blank line cuts.
        check("` @x", "` @␣x");
        check("\\`@x`", "\\`@␣x`");
        check("<div>\n```\n@x\n```\n</div>", "<div>\n```\n@␣x\n```\n</div>");
        check("a `b\n\n@x `", "a `b\n\n@␣x `");
        check("a `b\nc` @x `d`", "a `b\nc` @␣x `d`");
        // A suggestion block stays byte-exact.
        let suggestion = "Use this.\n\n```suggestion\n    @Inject\n\tfoo(@bar)\n```";
        check(suggestion, suggestion);
    }

    #[test]
    fn links_keep_their_addresses() {
        check("[@x](https://github.com/@x) <https://a.b/@c>", "[@x](https://github.com/@x) <https://a.b/@c>");
        check("see https://www.npmjs.com/package/@scope/pkg.", "see https://www.npmjs.com/package/@scope/pkg.");
        check("(www.example.com/u/@me)", "(www.example.com/u/@me)");
        // Not a link GitHub makes, or markup splits it: defused.
        check("https://x/@a https://x.com@b", "https://x/@␣a https://x.com@b");
        check("https://x.com/*a*@b https://x.com/_@c", "https://x.com/*a*@␣b https://x.com/_@␣c");
        check("xhttps://x.com/@a", "xhttps://x.com/@␣a");
    }

    #[test]
    fn keep_leaves_mentions_but_not_controls_or_markers() {
        let keep = Policy { mentions: Mentions::Keep, author: None };
        assert_eq!(markdown("@a @b/c \x1b<!-- baton:x -->", &keep), "@a @b/c <\u{200B}!-- baton:x -->");
        assert_eq!(anywhere("@a \x07", &keep), "@a ");
    }

    #[test]
    fn anywhere_defuses_code_too() {
        let policy = Policy { mentions: Mentions::Defuse, author: Some(AUTHOR) };
        assert_eq!(anywhere("`@a` @Codertocat", &policy), "`@\u{200B}a` @Codertocat");
    }

    #[test]
    fn terminals_see_controls_escaped() {
        let check = |input: &str, expected: &str| assert_eq!(escape_controls(input), expected, "{input:?}");
        check("\x1b]52;c;aGk=\x07done\n\tnext", "\\x1b]52;c;aGk=\\x07done\n\tnext");
        check("a\rb\0c\x7f\u{9b}", "a\\x0db\\x00c\\x7f\\x9b");
        check("\u{202E}evil", "\\u{202e}evil");
        check("plain ünïcödé", "plain ünïcödé");
    }
}
