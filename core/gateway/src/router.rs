//! Request routing: host + longest path prefix selects the API; method + URL template selects
//! the operation. Lookups are allocation-free for lower-case hosts (the usual case).

use std::collections::HashMap;

use http::Method;
use outpost_config::template::UrlTemplate;

/// Path prefixes of one host (or of "any host") mapped to API indexes.
#[derive(Debug, Default)]
struct PrefixTable {
    by_prefix: HashMap<Box<str>, usize>,
    /// Length of the longest prefix: lookups start there, so a long path costs one probe per
    /// segment within that length, not one per segment of the whole path.
    max_len: usize,
}

impl PrefixTable {
    fn insert(&mut self, prefix: &str, api: usize) {
        self.max_len = self.max_len.max(prefix.len());
        self.by_prefix.insert(prefix.into(), api);
    }

    /// Longest prefix of `path` that is an API path, on a segment boundary. Returns the API and
    /// the rest of the path (starting with `/`, or empty).
    fn lookup<'p>(&self, path: &'p str) -> Option<(usize, &'p str)> {
        if self.by_prefix.is_empty() {
            return None;
        }
        let mut end = path.len();
        if end > self.max_len {
            // Start at the last segment boundary within the longest prefix.
            end = match path.as_bytes().get(self.max_len) {
                Some(b'/') => self.max_len,
                _ => path
                    .get(..self.max_len)
                    .and_then(|p| p.rfind('/'))
                    .unwrap_or(0),
            };
        }
        loop {
            let prefix = &path[..end];
            if let Some(&api) = self.by_prefix.get(prefix) {
                return Some((api, &path[end..]));
            }
            if end == 0 {
                return None;
            }
            end = prefix.rfind('/').unwrap_or(0);
        }
    }
}

/// The routing table of one configuration.
#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<Box<str>, PrefixTable>,
    /// `.example.com` for `*.example.com`, longest suffix first.
    wildcard: Vec<(Box<str>, PrefixTable)>,
    any_host: PrefixTable,
}

impl Router {
    /// Adds an API's prefix (normalised: no trailing slash, root empty) on `hosts` (empty:
    /// any host).
    pub fn add(&mut self, hosts: &[String], prefix: &str, api: usize) {
        if hosts.is_empty() {
            self.any_host.insert(prefix, api);
        }
        for host in hosts {
            let host = host.to_ascii_lowercase();
            let table = if let Some(suffix) = host.strip_prefix('*') {
                match self.wildcard.iter_mut().position(|(s, _)| **s == *suffix) {
                    Some(i) => &mut self.wildcard[i].1,
                    None => {
                        self.wildcard.push((suffix.into(), PrefixTable::default()));
                        self.wildcard
                            .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
                        let i = self
                            .wildcard
                            .iter()
                            .position(|(s, _)| **s == *suffix)
                            .expect("just inserted");
                        &mut self.wildcard[i].1
                    }
                }
            } else {
                self.exact.entry(host.into()).or_default()
            };
            table.insert(prefix, api);
        }
    }

    /// Selects the API for `host` (as sent, possibly with a port and in any case) and `path`.
    /// APIs bound to the exact host win, then wildcard hosts, then APIs for any host; within
    /// each, the longest prefix wins.
    pub fn route<'p>(&self, host: Option<&str>, path: &'p str) -> Option<(usize, &'p str)> {
        if let Some(host) = host.map(strip_port) {
            if !self.exact.is_empty() || !self.wildcard.is_empty() {
                let lowered;
                let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                    lowered = host.to_ascii_lowercase();
                    lowered.as_str()
                } else {
                    host
                };
                if let Some(found) = self.exact.get(host).and_then(|t| t.lookup(path)) {
                    return Some(found);
                }
                for (suffix, table) in &self.wildcard {
                    // `*.example.com` covers `a.example.com`, not `example.com`.
                    if host.len() > suffix.len() && host.ends_with(&**suffix) {
                        if let Some(found) = table.lookup(path) {
                            return Some(found);
                        }
                    }
                }
            }
        }
        self.any_host.lookup(path)
    }
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rfind(':') {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

/// One operation, compiled.
#[derive(Debug)]
pub struct OperationRoute {
    /// Operation id.
    pub id: std::sync::Arc<str>,
    /// `None` matches any method.
    pub method: Option<Method>,
    /// The URL template.
    pub template: UrlTemplate,
    /// The template as text, shared (telemetry route label).
    pub route: std::sync::Arc<str>,
    /// Policy pipelines: one per product whose policies apply (`Some(product index)`), and
    /// the one for requests without a product (`None`), first. Empty when no policies apply.
    pub pipelines: Vec<(Option<usize>, std::sync::Arc<crate::plugins::Pipeline>)>,
}

impl OperationRoute {
    /// The pipeline for a request of this product (or none).
    pub fn pipeline(&self, product: Option<usize>) -> Option<&crate::plugins::Pipeline> {
        self.pipelines
            .iter()
            .find(|(p, _)| *p == product)
            .or_else(|| self.pipelines.first())
            .map(|(_, p)| &**p)
    }
}

/// Finds the first operation (they are sorted most specific first) matching method and path.
pub fn match_operation<'a>(
    ops: &'a [OperationRoute],
    method: &Method,
    path: &str,
) -> Option<&'a OperationRoute> {
    ops.iter()
        .find(|op| op.method.as_ref().is_none_or(|m| m == method) && op.template.matches(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let mut r = Router::default();
        r.add(&[], "", 0); // root API on any host
        r.add(&[], "/orders", 1);
        r.add(&[], "/orders/archive", 2);
        r.add(&["api.example.com".into()], "/orders", 3);
        r.add(&["*.example.com".into()], "/orders", 4);
        r
    }

    #[test]
    fn long_paths_start_at_the_longest_prefix() {
        let r = router();
        let long = format!("/orders/archive{}", "/".repeat(30_000));
        assert_eq!(r.route(None, &long).map(|(a, _)| a), Some(2));
        let long = "/x".repeat(10_000);
        assert_eq!(r.route(None, &long).map(|(a, _)| a), Some(0));
        // The boundary right at the longest prefix's length.
        assert_eq!(r.route(None, "/orders/archive/"), Some((2, "/")));
        assert_eq!(
            r.route(None, "/orders/archivex/1"),
            Some((1, "/archivex/1"))
        );
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let r = router();
        assert_eq!(r.route(None, "/orders/1"), Some((1, "/1")));
        assert_eq!(r.route(None, "/orders"), Some((1, "")));
        assert_eq!(r.route(None, "/orders/"), Some((1, "/")));
        assert_eq!(r.route(None, "/orders/archive/7"), Some((2, "/7")));
        assert_eq!(r.route(None, "/ordersx"), Some((0, "/ordersx")));
        assert_eq!(r.route(None, "/"), Some((0, "/")));
    }

    #[test]
    fn hosts_exact_then_wildcard_then_any() {
        let r = router();
        assert_eq!(
            r.route(Some("API.example.com:8443"), "/orders/1"),
            Some((3, "/1"))
        );
        assert_eq!(
            r.route(Some("eu.example.com"), "/orders/1"),
            Some((4, "/1"))
        );
        assert_eq!(r.route(Some("example.com"), "/orders/1"), Some((1, "/1")));
        // A host-specific table without a match falls back to any-host APIs.
        assert_eq!(
            r.route(Some("api.example.com"), "/other"),
            Some((0, "/other"))
        );
        assert_eq!(r.route(Some("[::1]:80"), "/orders"), Some((1, "")));
    }

    #[test]
    fn no_match_without_root_api() {
        let mut r = Router::default();
        r.add(&[], "/a", 0);
        assert_eq!(r.route(None, "/b"), None);
        assert_eq!(r.route(None, "/"), None);
    }

    #[test]
    fn operations_match_method_and_template() {
        let mut ops: Vec<OperationRoute> = [
            ("all", None, "/*"),
            ("get", Some(Method::GET), "/users/{id}"),
            ("me", Some(Method::GET), "/users/me"),
        ]
        .into_iter()
        .map(|(id, method, t)| OperationRoute {
            id: id.into(),
            method,
            template: UrlTemplate::parse(t).expect("template"),
            route: t.into(),
            pipelines: Vec::new(),
        })
        .collect();
        ops.sort_by_key(|o| o.template.specificity());
        let find = |m: Method, p: &str| match_operation(&ops, &m, p).map(|o| &*o.id);
        assert_eq!(find(Method::GET, "/users/me"), Some("me"));
        assert_eq!(find(Method::GET, "/users/7"), Some("get"));
        assert_eq!(find(Method::POST, "/users/7"), Some("all"));
    }
}
