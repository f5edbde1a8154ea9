//! pg_dump's name patterns (`-t`, `--exclude-table`, …), turned into the anchored regular
//! expressions pg_dump itself sends to the server (`processSQLNamePattern` in PostgreSQL's
//! fe_utils), so kura picks exactly the tables pg_dump picks: outside double quotes, letters
//! fold to lower case, `*` is any text, `?` any one character, `.` separates the schema from
//! the name, and `$` is literal; other regular-expression characters keep their meaning.
//! Inside double quotes everything is literal and `""` is one quote.

/// A `[schema.]name` pattern as two anchored regular expressions; `schema` is `None` when
/// the pattern names no schema (any schema matches, as in pg_dump).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamePattern {
    pub schema: Option<String>,
    pub name: String,
}

impl NamePattern {
    pub fn parse(pattern: &str) -> Result<NamePattern, String> {
        let mut parts = vec![String::new()];
        let mut in_quotes = false;
        let mut chars = pattern.chars().peekable();
        while let Some(c) = chars.next() {
            let current = parts.last_mut().expect("one part at least");
            match c {
                '"' if in_quotes && chars.peek() == Some(&'"') => {
                    chars.next();
                    current.push('"');
                }
                '"' => in_quotes = !in_quotes,
                _ if in_quotes => push_literal(current, c),
                '.' => parts.push(String::new()),
                '*' => current.push_str(".*"),
                '?' => current.push('.'),
                '$' => current.push_str("\\$"),
                // pg_dump folds ASCII only (pg_tolower).
                _ => current.push(c.to_ascii_lowercase()),
            }
        }
        if in_quotes {
            return Err(format!("pattern {pattern:?} has an unclosed double quote"));
        }
        let anchored = |regex: &str| format!("^({regex})$");
        match parts.as_slice() {
            [name] if !name.is_empty() => Ok(NamePattern { schema: None, name: anchored(name) }),
            // `database.schema.name` (PostgreSQL 14+): the database is the one dumped.
            [_, schema, name] | [schema, name] if !name.is_empty() => Ok(NamePattern {
                // `.name` as in pg_dump: an empty schema part matches any schema.
                schema: (!schema.is_empty()).then(|| anchored(schema)),
                name: anchored(name),
            }),
            _ => Err(format!(
                "pattern {pattern:?} is not [schema.]table (quote a name that holds a dot: \"my.table\")"
            )),
        }
    }
}

/// A character matched as itself: regular-expression characters escaped.
fn push_literal(regex: &mut String, c: char) {
    if "\\^$.|?*+()[]{}".contains(c) {
        regex.push('\\');
    }
    regex.push(c);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(pattern: &str) -> (Option<String>, String) {
        let p = NamePattern::parse(pattern).unwrap();
        (p.schema, p.name)
    }

    #[test]
    fn patterns_follow_pg_dump() {
        assert_eq!(parsed("Audit_Log"), (None, "^(audit_log)$".into()));
        assert_eq!(
            parsed("public.big*"),
            (Some("^(public)$".into()), "^(big.*)$".into())
        );
        assert_eq!(parsed("s?.t"), (Some("^(s.)$".into()), "^(t)$".into()));
        assert_eq!(parsed("\"My Table\""), (None, "^(My Table)$".into()));
        assert_eq!(parsed("\"a.b\""), (None, "^(a\\.b)$".into()));
        assert_eq!(parsed("\"x\"\"y\""), (None, "^(x\"y)$".into()));
        assert_eq!(
            parsed("\"Sales\".\"Q*\""),
            (Some("^(Sales)$".into()), "^(Q\\*)$".into())
        );
        assert_eq!(parsed("t$"), (None, "^(t\\$)$".into()));
        assert_eq!(parsed("(a|b)"), (None, "^((a|b))$".into()));
        assert_eq!(parsed(".t"), (None, "^(t)$".into()));
    }

    #[test]
    fn malformed_patterns_are_refused() {
        assert!(NamePattern::parse("\"open").is_err());
        assert!(NamePattern::parse("a.b.c.d").is_err());
        assert_eq!(parsed("db.s.t"), (Some("^(s)$".into()), "^(t)$".into()));
        assert_eq!(parsed("Émile"), (None, "^(Émile)$".into()));
        assert!(NamePattern::parse("").is_err());
        assert!(NamePattern::parse("schema.").is_err());
    }
}
