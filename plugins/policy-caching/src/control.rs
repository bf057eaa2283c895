//! `Cache-Control` directives (RFC 9111 §5.2), as far as a shared cache acts on them.

/// The directives of every `Cache-Control` line of a message.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Directives {
    /// `no-store`.
    pub no_store: bool,
    /// `no-cache` (a request's `Pragma: no-cache` too).
    pub no_cache: bool,
    /// `private` (with or without a field list).
    pub private: bool,
    /// `max-age=N`.
    pub max_age: Option<u64>,
    /// `s-maxage=N`.
    pub s_maxage: Option<u64>,
}

impl Directives {
    /// Reads `Cache-Control` lines. Directive names are case-insensitive; a value may be
    /// quoted; an unknown directive or a value that is not a number is ignored.
    pub(crate) fn parse<'v>(lines: impl Iterator<Item = &'v [u8]>) -> Directives {
        let mut d = Directives::default();
        for line in lines {
            for item in line.split(|&b| b == b',') {
                let item = item.trim_ascii();
                let (name, value) = match item.iter().position(|&b| b == b'=') {
                    Some(eq) => (item[..eq].trim_ascii(), Some(unquote(&item[eq + 1..]))),
                    None => (item, None),
                };
                let seconds = || value.and_then(parse_seconds);
                if name.eq_ignore_ascii_case(b"no-store") {
                    d.no_store = true;
                } else if name.eq_ignore_ascii_case(b"no-cache") {
                    d.no_cache = true;
                } else if name.eq_ignore_ascii_case(b"private") {
                    d.private = true;
                } else if name.eq_ignore_ascii_case(b"max-age") {
                    // The most restrictive of repeated directives wins.
                    d.max_age = min(d.max_age, seconds());
                } else if name.eq_ignore_ascii_case(b"s-maxage") {
                    d.s_maxage = min(d.s_maxage, seconds());
                }
            }
        }
        d
    }

    /// The freshness lifetime a shared cache may use, when the message states one.
    pub(crate) fn shared_max_age(&self) -> Option<u64> {
        self.s_maxage.or(self.max_age)
    }
}

fn min(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn unquote(v: &[u8]) -> &[u8] {
    let v = v.trim_ascii();
    match v {
        [b'"', inner @ .., b'"'] => inner,
        _ => v,
    }
}

/// Delta-seconds; a value too large for the type is as large as it can be (RFC 9111 §1.2.2).
fn parse_seconds(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, &b| {
        n.saturating_mul(10).saturating_add(u64::from(b - b'0'))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(lines: &[&str]) -> Directives {
        Directives::parse(lines.iter().map(|l| l.as_bytes()))
    }

    #[test]
    fn directives_are_read_from_every_line() {
        let d = parse(&["Public, MAX-AGE=60", "s-maxage=\"30\", no-cache"]);
        assert_eq!(
            d,
            Directives {
                no_cache: true,
                max_age: Some(60),
                s_maxage: Some(30),
                ..Directives::default()
            }
        );
        assert_eq!(d.shared_max_age(), Some(30));
        let d = parse(&[
            "private=\"set-cookie, x-user\", no-store",
            "max-age=10, max-age=5",
        ]);
        assert!(d.private && d.no_store);
        assert_eq!(d.shared_max_age(), Some(5));
        assert_eq!(parse(&["max-age=soon, max-age="]).max_age, None);
        assert_eq!(
            parse(&["max-age=99999999999999999999999"]).max_age,
            Some(u64::MAX)
        );
        assert_eq!(parse(&[]), Directives::default());
    }
}
