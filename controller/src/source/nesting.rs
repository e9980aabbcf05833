//! A linear-time guard against deeply nested YAML, run before the parser.
//!
//! libyaml's scanner keeps one "possible simple key" per open flow collection and walks all of
//! them for every token, so a document nested N levels deep costs N² (80,000 nested brackets
//! took 23 s in a release build, and the directory source was frozen meanwhile). The parser
//! cannot be told to stop early, so this scan refuses such text first.
//!
//! It tracks the flow depth (`[`/`{` open, `]`/`}` close) without parsing YAML: every opening
//! bracket counts, wherever it is (in a string or comment too); a closing bracket counts only
//! outside what libyaml would read as text (quoted and plain scalars, comments, tags), or
//! inside such text down to the depth at which it began. So the depth it finds is never below
//! the depth libyaml reaches, and a balanced bracket in a string costs nothing; an ordinary
//! manifest would need dozens of unbalanced brackets in its strings to be refused.

/// The line (1-based) at which `text` nests flow collections more than `limit` deep, if it does.
pub(crate) fn exceeds(text: &str, limit: usize) -> Option<usize> {
    let b = text.as_bytes();
    let mut depth = 0usize;
    let mut line = 1usize;
    // The region of text the scan is in, and the depth at which it began.
    let mut region = Region::None;
    let mut floor = 0usize;
    // Whether the previous byte ends a token (whitespace, line start, a flow indicator, `:`).
    let mut token_start = true;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let line_start = i == 0 || b[i - 1] == b'\n';
        if c == b'\n' {
            line += 1;
        }
        // A document marker ends everything: libyaml starts afresh or fails there.
        if line_start && is_document_marker(&b[i..]) {
            depth = 0;
            region = Region::None;
            token_start = true;
            i += 3;
            continue;
        }
        // A plain scalar ends at a flow indicator inside a flow collection, a tag or anchor
        // at any: the indicator itself is structure.
        if is_flow_indicator(c)
            && (region == Region::Word || (region == Region::Plain && depth > 0))
        {
            region = Region::None;
        }
        match c {
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return Some(line);
                }
            }
            // Inside text, a closing bracket only undoes openings in the same text.
            b']' | b'}' if region != Region::None && depth > floor => depth -= 1,
            b']' | b'}' if region == Region::None => depth = depth.saturating_sub(1),
            _ => {}
        }
        match region {
            Region::Comment => {
                if c == b'\n' {
                    region = Region::None;
                    token_start = true;
                }
            }
            Region::Single => {
                if c == b'\'' {
                    if b.get(i + 1) == Some(&b'\'') {
                        i += 1; // an escaped quote
                    } else {
                        region = Region::None;
                        token_start = false;
                    }
                }
            }
            Region::Double => {
                if c == b'\\' {
                    // Whatever is escaped (a newline included) is text.
                    if b.get(i + 1) == Some(&b'\n') {
                        line += 1;
                    }
                    i += 1;
                } else if c == b'"' {
                    region = Region::None;
                    token_start = false;
                }
            }
            Region::Word => {
                if c.is_ascii_whitespace() {
                    region = Region::None;
                    token_start = true;
                }
            }
            Region::Plain => {
                let next = b.get(i + 1).copied();
                let flow_next = depth > 0 && next.is_some_and(is_flow_indicator);
                if c == b':' && (flow_next || next.is_none_or(|n| n.is_ascii_whitespace())) {
                    region = Region::None;
                    token_start = true;
                } else if c == b'#' && i > 0 && b[i - 1].is_ascii_whitespace() {
                    region = Region::Comment;
                } else if c == b'\n' && depth == 0 {
                    // A block scalar continues on the next line only as text libyaml's block
                    // context reads at depth 0, where a closing bracket cannot undercount.
                    region = Region::None;
                    token_start = true;
                }
            }
            Region::None => {
                let next = b.get(i + 1).copied();
                let spaced = next.is_none_or(|n| n.is_ascii_whitespace() || is_flow_indicator(n));
                match c {
                    _ if c.is_ascii_whitespace() => token_start = true,
                    b'[' | b']' | b'{' | b'}' | b',' | b':' => token_start = true,
                    b'#' if token_start || line_start => region = Region::Comment,
                    b'\'' if token_start => region = Region::Single,
                    b'"' if token_start => region = Region::Double,
                    b'!' | b'&' | b'*' if token_start => region = Region::Word,
                    b'-' | b'?' if token_start && spaced => token_start = true,
                    _ if token_start => region = Region::Plain,
                    _ => {}
                }
                if region != Region::None {
                    floor = depth;
                }
            }
        }
        i += 1;
    }
    None
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Region {
    None,
    Comment,
    /// A single-quoted scalar.
    Single,
    /// A double-quoted scalar.
    Double,
    /// A plain scalar (or a block scalar's header and, in block context, its lines).
    Plain,
    /// A tag, anchor or alias.
    Word,
}

fn is_flow_indicator(c: u8) -> bool {
    matches!(c, b',' | b'[' | b']' | b'{' | b'}')
}

fn is_document_marker(rest: &[u8]) -> bool {
    (rest.starts_with(b"---") || rest.starts_with(b"..."))
        && rest.get(3).is_none_or(|c| c.is_ascii_whitespace())
}

#[cfg(test)]
mod tests {
    use super::exceeds;

    #[test]
    fn ordinary_manifests_pass() {
        let texts = [
            "a: [1, [2, [3]]]\nb: {c: {d: [x]}}\n",
            // Brackets in strings, comments and plain scalars, balanced or not.
            "a: \"[x]\"\nb: '{}'\nc: x[y] # [z]\nd: |\n  [ -f x ] && { y; }\n",
            "a: \"]]]\"\nb: ']]'\nc: x]] # ]]\nd: |\n  ]]\n",
            r#"metadata: {annotations: {last-applied: '{"spec":{"ports":[{"port":80}]}}'}}"#,
            "---\na: [\n---\nb: [\n---\nc: [\n",
        ];
        for text in texts {
            assert_eq!(exceeds(text, 8), None, "{text}");
        }
        // The project's own manifests, far below the limit.
        let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        for entry in std::fs::read_dir(deploy).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                assert_eq!(exceeds(&text, 8), None, "{}", path.display());
            }
        }
        // Unbalanced opening brackets in strings count (the price of never undercounting).
        assert_eq!(exceeds("a: \"[[[\"\nb: x[[ # [[\n", 4), Some(2));
    }

    #[test]
    fn deep_nesting_is_found_wherever_it_hides() {
        let n = 100;
        let texts = [
            format!("{}{}", "[".repeat(n), "]".repeat(n)),
            format!("a: {}", "{a: ".repeat(n)),
            format!("a: {}", "[{\"x\": ".repeat(n)),
            // Closing brackets in strings must not cancel real openings.
            format!("a: {}", "[ \"]\", ".repeat(n)),
            format!("a: {}", "[ ']', ".repeat(n)),
            format!("a: {}", "[ x #]\n".repeat(n)),
            format!("a: {}", "[ &a ']' , ".repeat(n)),
            // Deep nesting inside what looks like a string still counts.
            format!("a: \"{}\"", "[".repeat(n)),
        ];
        for text in &texts {
            assert!(exceeds(text, 64).is_some(), "{}", &text[..80]);
        }
    }
}
