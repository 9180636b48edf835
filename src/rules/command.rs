//! The comment-command grammar: `/fix the flaky test --fast` on a comment's
//! first line. Pure functions, no IO.

use serde::Serialize;

/// A slash command found at the start of a comment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlashCommand {
    /// The command itself, e.g. `/fix`.
    pub name: String,
    /// The rest of the first line, trimmed.
    pub args: String,
    /// `args` split shell-style (quotes group words, backslash escapes).
    pub argv: Vec<String>,
}

/// Whether `body`'s first line starts with `command` as a whole word.
pub fn parse(command: &str, body: &str) -> Option<SlashCommand> {
    let first = body.trim_start().lines().next().unwrap_or("");
    let rest = first.strip_prefix(command)?;
    if !(rest.is_empty() || rest.starts_with(char::is_whitespace)) {
        return None;
    }
    let args = rest.trim().to_string();
    Some(SlashCommand { name: command.to_string(), argv: split_words(&args), args })
}

/// Shell-style word splitting without expansion. An unclosed quote runs to
/// the end of the line rather than failing: a comment is not a script.
pub(crate) fn split_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => match chars.next() {
                Some(n @ ('"' | '\\')) => cur.push(n),
                Some(n) => {
                    cur.push('\\');
                    cur.push(n);
                }
                None => cur.push('\\'),
            },
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(command: &str, body: &str, expected: Option<(&str, &[&str])>) {
        let got = parse(command, body);
        let got = got.as_ref().map(|c| (c.args.as_str(), c.argv.iter().map(String::as_str).collect::<Vec<_>>()));
        let expected = expected.map(|(a, v)| (a, v.to_vec()));
        assert_eq!(got, expected, "command {command:?} on {body:?}");
    }

    #[test]
    fn matches_whole_word_on_first_line_only() {
        check("/fix", "/fix", Some(("", &[])));
        check("/fix", "  /fix the build\nmore text", Some(("the build", &["the", "build"])));
        check("/fix", "/fixup", None);
        check("/fix", "please /fix", None);
        check("/fix", "hello\n/fix it", None);
        check("/fix", "/fix\tnow", Some(("now", &["now"])));
    }

    #[test]
    fn argv_splits_like_a_shell() {
        check(
            "/fix",
            r#"/fix "two words" plain\ space 'single "q"'"#,
            Some((r#""two words" plain\ space 'single "q"'"#, &["two words", "plain space", "single \"q\""])),
        );
        assert_eq!(split_words(r#"a "b \" c" d"#), vec!["a", "b \" c", "d"]);
        assert_eq!(split_words("  "), Vec::<String>::new());
        assert_eq!(split_words("''"), vec![""]);
    }
}
