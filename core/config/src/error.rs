//! The validation report: every problem of a document, each with the key it concerns.

use std::fmt;

/// One problem in a configuration document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Where the problem is: `listeners[1].tls.certificates[0].cert`, `apis[2].backend`, …
    /// Empty when it concerns the whole document (a syntax error, say).
    pub path: String,
    /// What is wrong, as a sentence fragment.
    pub message: String,
}

/// Every problem found in one document. Empty means valid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The file (or other origin) the document came from, for messages.
    pub origin: String,
    /// The problems, in document order where that is known.
    pub issues: Vec<Issue>,
}

impl Report {
    /// An empty report for a document from `origin`.
    pub fn new(origin: impl Into<String>) -> Self {
        Self {
            origin: origin.into(),
            issues: Vec::new(),
        }
    }

    /// Records a problem at `path`.
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.issues.push(Issue {
            path: path.into(),
            message: message.into(),
        });
    }

    /// True when no problem was found.
    pub fn is_ok(&self) -> bool {
        self.issues.is_empty()
    }

    /// `Ok(value)` when the report is empty, the report itself otherwise.
    pub fn into_result<T>(self, value: T) -> Result<T, Report> {
        if self.is_ok() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.issues.len();
        write!(
            f,
            "{}: {} problem{}",
            self.origin,
            n,
            if n == 1 { "" } else { "s" }
        )?;
        for issue in &self.issues {
            if issue.path.is_empty() {
                write!(f, "\n  - {}", issue.message)?;
            } else {
                write!(f, "\n  - {}: {}", issue.path, issue.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for Report {}

/// Deserializes `T` from `de`, recording a failure (with the key path serde reached) under
/// `prefix` in `report` instead of returning it.
pub(crate) fn deserialize_into<'de, T, D>(de: D, prefix: &str, report: &mut Report) -> Option<T>
where
    T: serde::Deserialize<'de>,
    D: serde::Deserializer<'de>,
    D::Error: fmt::Display,
{
    match serde_path_to_error::deserialize(de) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            let path = join_path(prefix, if inner == "." { "" } else { &inner });
            report.push(path, clean_serde_message(&e.inner().to_string()));
            None
        }
    }
}

/// Joins a prefix and a serde path (`a.b[0]`) into one key path.
pub(crate) fn join_path(prefix: &str, inner: &str) -> String {
    match (prefix.is_empty(), inner.is_empty()) {
        (true, _) => inner.to_string(),
        (false, true) => prefix.to_string(),
        (false, false) if inner.starts_with('[') => format!("{prefix}{inner}"),
        (false, false) => format!("{prefix}.{inner}"),
    }
}

/// serde_json appends " at line L column C" which is meaningless for a sub-document; TOML
/// values carry no position at all. Keep the message itself.
fn clean_serde_message(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lists_every_issue_with_its_path() {
        let mut r = Report::new("site.toml");
        r.push("listeners[0].address", "invalid socket address");
        r.push("", "syntax error");
        let text = r.to_string();
        assert_eq!(
            text,
            "site.toml: 2 problems\n  - listeners[0].address: invalid socket address\n  - syntax error"
        );
        assert!(r.into_result(()).is_err());
    }

    #[test]
    fn join_path_handles_indexes_and_empties() {
        assert_eq!(join_path("listeners", "[1].tls"), "listeners[1].tls");
        assert_eq!(
            join_path("limits", "max_body_bytes"),
            "limits.max_body_bytes"
        );
        assert_eq!(join_path("", "x"), "x");
        assert_eq!(join_path("log", ""), "log");
    }
}
