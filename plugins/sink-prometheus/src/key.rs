//! Keys of the record path's series cache: label tuples encoded as bytes, and the hasher
//! the cache's maps use.

/// Appends a label that other labels follow, length first, so that no two tuples encode
/// alike (`("ab", "c")` and `("a", "bc")` stay apart).
pub(crate) fn push_prefixed(key: &mut Vec<u8>, label: &str) {
    key.extend_from_slice(&label.len().to_le_bytes());
    key.extend_from_slice(label.as_bytes());
}

/// The maps' hasher: rustc's multiply-and-rotate hash, a few cycles per 8 bytes where std's
/// SipHash costs tens of nanoseconds per key. No defence against chosen collisions is needed:
/// the keys are API and operation ids and route templates from the configuration, bounded
/// method labels, status codes and the gateway's own error codes.
pub(crate) type FxBuild = rustc_hash::FxBuildHasher;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixed_labels_keep_tuples_apart_and_equal_keys_hash_alike() {
        let key = |a: &str, b: &str| {
            let mut k = Vec::new();
            push_prefixed(&mut k, a);
            k.extend_from_slice(b.as_bytes());
            k
        };
        assert_ne!(key("ab", "c"), key("a", "bc"));
        assert_ne!(key("", "abc"), key("abc", ""));
        let h = |k: &[u8]| std::hash::BuildHasher::hash_one(&FxBuild::default(), k);
        assert_eq!(h(&key("orders", "get")), h(&key("orders", "get")));
        assert_ne!(h(&key("orders", "get")), h(&key("orders", "list")));
        // Trailing zero bytes change the hash (the length is hashed first).
        assert_ne!(h(b"a"), h(b"a\0"));
    }
}
