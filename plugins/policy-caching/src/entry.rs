//! A cached response as bytes: a small binary header, the response headers, then the body
//! as it is (no encoding of the body, so a stored entry is barely larger than the response).
//!
//! ```text
//! u8      format (1)
//! u16     status
//! u64     stored at (Unix ms)
//! u64     expires at (Unix ms)
//! u16     header count, then per header:
//!         u8 name length, name, u16 value length, value
//! ...     body (the rest)
//! ```
//! Integers are big-endian.

/// The format byte this version writes and reads.
const FORMAT: u8 = 1;

const FIXED: usize = 1 + 2 + 8 + 8 + 2;

/// A response head to store.
pub(crate) struct Stored {
    /// Status.
    pub status: u16,
    /// When it was stored (Unix ms).
    pub stored_ms: u64,
    /// When it expires (Unix ms).
    pub expires_ms: u64,
}

impl Stored {
    /// Encodes the entry with the headers `headers()` yields (lower-case name, value; it is
    /// called twice), or `None` when a header does not fit the format (a name over 255 bytes,
    /// a value over 65 535 bytes, more than 65 535 headers).
    pub(crate) fn encode<'a, I>(&self, headers: impl Fn() -> I, body: &[u8]) -> Option<Vec<u8>>
    where
        I: Iterator<Item = (&'a str, &'a [u8])>,
    {
        let mut size = FIXED + body.len();
        let mut count = 0u16;
        for (n, v) in headers() {
            if n.len() > usize::from(u8::MAX) || v.len() > usize::from(u16::MAX) {
                return None;
            }
            count = count.checked_add(1)?;
            size += 1 + n.len() + 2 + v.len();
        }
        let mut out = Vec::with_capacity(size);
        out.push(FORMAT);
        out.extend_from_slice(&self.status.to_be_bytes());
        out.extend_from_slice(&self.stored_ms.to_be_bytes());
        out.extend_from_slice(&self.expires_ms.to_be_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        for (n, v) in headers().take(usize::from(count)) {
            out.push(n.len() as u8);
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(&(v.len() as u16).to_be_bytes());
            out.extend_from_slice(v);
        }
        out.extend_from_slice(body);
        Some(out)
    }
}

/// A stored entry, read in place.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry<'a> {
    /// Status.
    pub status: u16,
    /// When it was stored (Unix ms).
    pub stored_ms: u64,
    /// When it expires (Unix ms).
    pub expires_ms: u64,
    count: u16,
    headers: &'a [u8],
    /// The body.
    pub body: &'a [u8],
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if data.len() < n {
        return None;
    }
    let (head, rest) = data.split_at(n);
    *data = rest;
    Some(head)
}

fn u16_at(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn u64_at(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl<'a> Entry<'a> {
    /// Reads an entry; `None` when the bytes are not one (another format, truncated, a
    /// header name that is not text).
    pub(crate) fn decode(data: &'a [u8]) -> Option<Entry<'a>> {
        let mut rest = data;
        let fixed = take(&mut rest, FIXED)?;
        if fixed[0] != FORMAT {
            return None;
        }
        let status = u16_at(&fixed[1..]);
        if !(100..=999).contains(&status) {
            return None;
        }
        let count = u16_at(&fixed[19..]);
        let start = rest;
        for _ in 0..count {
            let n = usize::from(take(&mut rest, 1)?[0]);
            std::str::from_utf8(take(&mut rest, n)?).ok()?;
            let v = usize::from(u16_at(take(&mut rest, 2)?));
            take(&mut rest, v)?;
        }
        let headers = &start[..start.len() - rest.len()];
        Some(Entry {
            status,
            stored_ms: u64_at(&fixed[3..]),
            expires_ms: u64_at(&fixed[11..]),
            count,
            headers,
            body: rest,
        })
    }

    /// The headers, in the order stored.
    pub(crate) fn headers(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        let mut rest = self.headers;
        (0..self.count).filter_map(move |_| {
            // Checked by `decode`.
            let n = usize::from(take(&mut rest, 1)?[0]);
            let name = std::str::from_utf8(take(&mut rest, n)?).ok()?;
            let v = usize::from(u16_at(take(&mut rest, 2)?));
            Some((name, take(&mut rest, v)?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_damage_is_detected() {
        let headers: Vec<(&str, &[u8])> = vec![
            ("content-type", b"application/json"),
            ("x-many", b"1"),
            ("x-many", b"2"),
            ("x-empty", b""),
        ];
        let stored = Stored {
            status: 203,
            stored_ms: 1_700_000_000_123,
            expires_ms: 1_700_000_060_123,
        };
        let body = b"{\"a\":1}\r\n\x00\xff";
        let bytes = stored
            .encode(|| headers.iter().copied(), body)
            .expect("fits");
        assert_eq!(
            bytes.len(),
            FIXED
                + body.len()
                + headers
                    .iter()
                    .map(|(n, v)| 3 + n.len() + v.len())
                    .sum::<usize>()
        );
        let e = Entry::decode(&bytes).expect("decodes");
        assert_eq!(e.status, 203);
        assert_eq!(e.stored_ms, 1_700_000_000_123);
        assert_eq!(e.expires_ms, 1_700_000_060_123);
        assert_eq!(e.body, body);
        assert_eq!(e.headers().collect::<Vec<_>>(), headers);

        // Truncated anywhere in the head: refused. Another format: refused.
        let head_len = bytes.len() - body.len();
        for cut in 0..head_len {
            assert!(Entry::decode(&bytes[..cut]).is_none(), "cut at {cut}");
        }
        let mut other = bytes.clone();
        other[0] = 2;
        assert!(Entry::decode(&other).is_none());
        assert!(Entry::decode(b"plain text someone stored").is_none());

        // A header too long for the format: not storable.
        let long = vec![b'x'; 70_000];
        let too_long = [("x-long", long.as_slice())];
        let s = Stored {
            status: 200,
            stored_ms: 0,
            expires_ms: 0,
        };
        assert!(s.encode(|| too_long.iter().copied(), b"").is_none());
    }
}
