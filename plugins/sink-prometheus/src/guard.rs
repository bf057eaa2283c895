//! The cardinality guard: a metric keeps at most `max_series` label sets of its own; later
//! ones are folded into `(other)`.

use std::collections::HashSet;

/// The label value that stands for every label set past the guard's limit.
pub const OTHER: &str = "(other)";

/// The label sets one metric has admitted.
#[derive(Debug)]
pub struct SeriesGuard {
    max: usize,
    seen: HashSet<String>,
    key: String,
}

impl SeriesGuard {
    /// A guard admitting at most `max` label sets.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            seen: HashSet::new(),
            key: String::new(),
        }
    }

    /// Whether this label set has (or may now have) a series of its own. A label set admitted
    /// once stays admitted, so a series never moves into `(other)` later.
    pub fn admit(&mut self, labels: &[&str]) -> bool {
        self.key.clear();
        for l in labels {
            self.key.push_str(l);
            // A separator no sane label value holds; a collision would only merge two
            // label sets' admission, never their values.
            self.key.push('\u{1f}');
        }
        if self.seen.contains(self.key.as_str()) {
            return true;
        }
        if self.seen.len() >= self.max {
            return false;
        }
        self.seen.insert(self.key.clone());
        true
    }

    /// How many label sets are admitted.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no label set has been admitted yet.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_limit_and_keeps_what_it_admitted() {
        let mut g = SeriesGuard::new(2);
        assert!(g.is_empty());
        assert!(g.admit(&["a", "1"]));
        assert!(g.admit(&["b", "1"]));
        assert!(!g.admit(&["c", "1"]), "the third label set is folded");
        assert!(g.admit(&["a", "1"]), "an admitted set stays admitted");
        assert!(!g.admit(&["a", "2"]));
        assert_eq!(g.len(), 2);
        // The separator keeps ("ab", "") and ("a", "b") apart.
        let mut g = SeriesGuard::new(2);
        assert!(g.admit(&["ab", ""]));
        assert!(g.admit(&["a", "b"]));
        assert_eq!(g.len(), 2);
    }
}
