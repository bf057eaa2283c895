//! Operation URL templates: `/users/{id}`, `/files/*`, `/`.
//!
//! A template is a list of `/`-separated segments. A segment is a literal (matched exactly,
//! case-sensitively), a `{name}` parameter (matches one non-empty segment) or, as the last
//! segment only, `*` (matches the rest of the path, including nothing). A query part
//! (`?a={a}`) is accepted and ignored: operations are selected by method and path. A trailing
//! slash in a request path is ignored.

use std::fmt;

/// A parsed URL template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlTemplate {
    raw: String,
    segments: Vec<Segment>,
    rest: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

impl UrlTemplate {
    /// Parses a template; the error says what is wrong with it.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let path = raw.split('?').next().unwrap_or(raw);
        if !path.starts_with('/') {
            return Err(format!("'{raw}' must start with '/'"));
        }
        let mut segments = Vec::new();
        let mut rest = false;
        let trimmed = path.trim_start_matches('/');
        let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
        let parts: Vec<&str> = if trimmed.is_empty() {
            Vec::new()
        } else {
            trimmed.split('/').collect()
        };
        let mut names = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            if part.is_empty() {
                return Err(format!("'{raw}' has an empty segment ('//')"));
            }
            if *part == "*" {
                if i + 1 != parts.len() {
                    return Err(format!("'{raw}': '*' may only be the last segment"));
                }
                rest = true;
            } else if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                if name.is_empty()
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                {
                    return Err(format!("'{raw}': parameter '{{{name}}}' needs a name of letters, digits, '_' or '-'"));
                }
                if names.contains(&name) {
                    return Err(format!("'{raw}': parameter '{{{name}}}' appears twice"));
                }
                names.push(name);
                segments.push(Segment::Param(name.to_string()));
            } else if part.contains(['{', '}', '*']) {
                return Err(format!(
                    "'{raw}': segment '{part}' mixes text with '{{', '}}' or '*'; a parameter must be a whole segment"
                ));
            } else {
                segments.push(Segment::Literal((*part).to_string()));
            }
        }
        Ok(Self {
            raw: raw.to_string(),
            segments,
            rest,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Whether `path` (relative to the API's prefix, starting with `/` or empty) matches.
    /// Allocation-free.
    pub fn matches(&self, path: &str) -> bool {
        let path = path.trim_start_matches('/');
        let path = path.strip_suffix('/').unwrap_or(path);
        let mut parts = (!path.is_empty())
            .then(|| path.split('/'))
            .into_iter()
            .flatten();
        for seg in &self.segments {
            let Some(part) = parts.next().filter(|p| !p.is_empty()) else {
                return false;
            };
            if let Segment::Literal(l) = seg {
                if l != part {
                    return false;
                }
            }
        }
        self.rest || parts.next().is_none()
    }

    /// Sort key: more specific templates sort first so the first match wins. Literal segments
    /// beat parameters position by position, longer templates beat shorter, and `*` comes last.
    pub fn specificity(&self) -> impl Ord {
        let shape: Vec<u8> = self
            .segments
            .iter()
            .map(|s| match s {
                Segment::Literal(_) => 0,
                Segment::Param(_) => 1,
            })
            .collect();
        (self.rest, std::cmp::Reverse(self.segments.len()), shape)
    }
}

impl fmt::Display for UrlTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> UrlTemplate {
        UrlTemplate::parse(s).expect("valid template")
    }

    #[test]
    fn literals_and_params() {
        let users = t("/users/{id}");
        assert!(users.matches("/users/42"));
        assert!(users.matches("/users/42/"));
        assert!(!users.matches("/users"));
        assert!(!users.matches("/users/"));
        assert!(!users.matches("/users/42/orders"));
        assert!(!users.matches("/Users/42"));
    }

    #[test]
    fn root_and_rest() {
        assert!(t("/").matches("/"));
        assert!(t("/").matches(""));
        assert!(!t("/").matches("/a"));
        let all = t("/*");
        assert!(all.matches(""));
        assert!(all.matches("/"));
        assert!(all.matches("/a/b/c"));
        let files = t("/files/*");
        assert!(files.matches("/files"));
        assert!(files.matches("/files/a/b"));
        assert!(!files.matches("/filesx"));
    }

    #[test]
    fn query_part_is_ignored() {
        assert!(t("/search?q={q}").matches("/search"));
    }

    #[test]
    fn bad_templates_say_why() {
        for (raw, want) in [
            ("users", "must start with '/'"),
            ("/a//b", "empty segment"),
            ("/*/a", "last segment"),
            ("/{}", "needs a name"),
            ("/{a}/{a}", "twice"),
            ("/file{id}.json", "whole segment"),
        ] {
            let err = UrlTemplate::parse(raw).expect_err(raw);
            assert!(err.contains(want), "{raw}: {err}");
        }
    }

    #[test]
    fn specific_templates_sort_first() {
        let mut list = [
            t("/*"),
            t("/users/{id}"),
            t("/users/me"),
            t("/users/{id}/orders"),
        ];
        list.sort_by_key(|a| a.specificity());
        let order: Vec<&str> = list.iter().map(UrlTemplate::as_str).collect();
        assert_eq!(
            order,
            ["/users/{id}/orders", "/users/me", "/users/{id}", "/*"]
        );
    }
}
