//! etcd's key-range conventions and the order-preserving index key encoding.
//!
//! `range_end` empty = the single key; `"\0"` = every key `>= key`; otherwise `[key, range_end)`.
//! A prefix `p` is written as `[p, prefix_end(p))`.

use crate::revision::{REVISION_BYTES, Revision};

/// A half-open key interval resolved from `(key, range_end)`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyRange {
    /// First key (inclusive).
    pub start: Vec<u8>,
    /// End: `None` = unbounded; `Some(e)` = exclusive end.
    pub end: KeyEnd,
}

/// End of a [`KeyRange`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KeyEnd {
    /// Exactly one key.
    Single,
    /// Every key from `start` on.
    Unbounded,
    /// Exclusive end.
    Before(Vec<u8>),
}

impl KeyRange {
    /// Resolves etcd's `(key, range_end)` pair.
    pub fn new(key: &[u8], range_end: &[u8]) -> Self {
        let end = match range_end {
            [] => KeyEnd::Single,
            [0] => KeyEnd::Unbounded,
            e => KeyEnd::Before(e.to_vec()),
        };
        Self {
            start: key.to_vec(),
            end,
        }
    }

    /// Whether `key` is inside the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        match &self.end {
            KeyEnd::Single => key == self.start.as_slice(),
            KeyEnd::Unbounded => key >= self.start.as_slice(),
            KeyEnd::Before(e) => key >= self.start.as_slice() && key < e.as_slice(),
        }
    }

    /// Whether the range can hold no key (`range_end <= key`).
    pub fn is_empty(&self) -> bool {
        matches!(&self.end, KeyEnd::Before(e) if e.as_slice() <= self.start.as_slice())
    }

    /// Whether two ranges share at least one key.
    pub fn intersects(&self, other: &KeyRange) -> bool {
        if self.is_empty() || other.is_empty() {
            return false;
        }
        let below_end = |k: &[u8], r: &KeyRange| match &r.end {
            KeyEnd::Single => k <= r.start.as_slice(),
            KeyEnd::Unbounded => true,
            KeyEnd::Before(e) => k < e.as_slice(),
        };
        below_end(&self.start, other) && below_end(&other.start, self)
    }
}

/// The smallest key greater than every key with prefix `p`; `"\0"` when none exists.
pub fn prefix_end(p: &[u8]) -> Vec<u8> {
    let mut end = p.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Encodes `key` so that byte order of `escape(a) ++ TERMINATOR ++ x` follows `a`'s order:
/// `0x00` becomes `0x00 0xff`, and the key ends with `0x00 0x00`.
pub fn index_key(key: &[u8], rev: Revision) -> Vec<u8> {
    let mut out = index_key_prefix(key);
    out.extend_from_slice(&rev.to_bytes());
    out
}

/// The escaped key plus terminator: every index entry of `key` starts with it.
pub fn index_key_prefix(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 2 + REVISION_BYTES);
    for &b in key {
        out.push(b);
        if b == 0 {
            out.push(0xff);
        }
    }
    out.extend_from_slice(&[0, 0]);
    out
}

/// Splits an index entry into the user key and the revision; `None` on malformed bytes.
pub fn split_index_key(entry: &[u8]) -> Option<(Vec<u8>, Revision)> {
    let rev_at = entry.len().checked_sub(REVISION_BYTES)?;
    let rev = Revision::from_bytes(entry.get(rev_at..)?)?;
    let escaped = entry.get(..rev_at.checked_sub(2)?)?;
    if entry.get(rev_at - 2..rev_at)? != [0, 0] {
        return None;
    }
    let mut key = Vec::with_capacity(escaped.len());
    let mut i = 0;
    while i < escaped.len() {
        let b = escaped[i];
        key.push(b);
        if b == 0 {
            if escaped.get(i + 1) != Some(&0xff) {
                return None;
            }
            i += 1;
        }
        i += 1;
    }
    Some((key, rev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_carries_over_ff() {
        assert_eq!(prefix_end(b"a"), b"b");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }

    #[test]
    fn range_conventions() {
        assert!(KeyRange::new(b"a", b"").contains(b"a"));
        assert!(!KeyRange::new(b"a", b"").contains(b"ab"));
        assert!(KeyRange::new(b"a", b"\0").contains(b"zzz"));
        assert!(!KeyRange::new(b"b", b"\0").contains(b"a"));
        assert!(KeyRange::new(b"a", b"c").contains(b"b"));
        assert!(!KeyRange::new(b"a", b"c").contains(b"c"));
        assert!(KeyRange::new(b"c", b"a").is_empty());
        assert!(KeyRange::new(b"a", b"c").intersects(&KeyRange::new(b"b", b"")));
        assert!(!KeyRange::new(b"a", b"c").intersects(&KeyRange::new(b"c", b"\0")));
        assert!(KeyRange::new(b"\0", b"\0").intersects(&KeyRange::new(b"x", b"")));
    }

    #[test]
    fn index_keys_sort_by_key_then_revision() {
        let keys: [&[u8]; 5] = [b"", b"\0", b"\0\0", b"a", b"a\0"];
        let mut encoded = Vec::new();
        for k in keys {
            for main in [1, 300] {
                encoded.push(index_key(k, Revision::new(main, 0)));
            }
        }
        let mut sorted = encoded.clone();
        sorted.sort();
        assert_eq!(encoded, sorted);
        for (i, k) in keys.iter().enumerate() {
            let (key, rev) = split_index_key(&encoded[i * 2 + 1]).expect("valid");
            assert_eq!((key.as_slice(), rev), (*k, Revision::new(300, 0)));
        }
        assert_eq!(split_index_key(b"short"), None);
    }
}
