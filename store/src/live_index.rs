//! The live index: every live key's revisions, version and lease, in memory.
//!
//! A put needs the key's previous create revision, version and lease, but not its value (unless
//! the client or a watcher asks for `prev_kv`, or the put keeps the old value). Reading them from
//! `kv_latest` costs a search of the LSM tree per put, mostly cache misses in the memtable's skip
//! list; this hash map answers in one or two. etcd keeps an index of every key and revision in
//! memory for the same reason; this one holds only the live keys and no value.
//!
//! Bound: one entry per live key, so the backend quota bounds it (about 80 bytes plus the key,
//! per key). It is owned by the single writer (the store's writer lock), rebuilt from `kv_latest`
//! when the store opens or installs a snapshot, and updated after each batch commits, so it always
//! equals the committed `kv_latest`.

use std::collections::HashMap;

use crate::types::KeyValue;

/// What the writer knows about a live key without reading its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LiveKey {
    pub(crate) create_revision: i64,
    pub(crate) mod_revision: i64,
    pub(crate) version: i64,
    pub(crate) lease: i64,
}

impl LiveKey {
    pub(crate) fn of(kv: &KeyValue) -> Self {
        Self {
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: kv.lease,
        }
    }
}

/// Live keys (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct LiveIndex {
    keys: HashMap<Box<[u8]>, LiveKey>,
}

impl LiveIndex {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self {
            keys: HashMap::with_capacity(n),
        }
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<LiveKey> {
        self.keys.get(key).copied()
    }

    /// Records the committed state of `key`: live with `kv`, or deleted.
    pub(crate) fn set(&mut self, key: Vec<u8>, kv: Option<&KeyValue>) {
        match kv {
            // An overwrite (the common case) updates in place without allocating the key.
            Some(kv) => match self.keys.get_mut(key.as_slice()) {
                Some(entry) => *entry = LiveKey::of(kv),
                None => {
                    self.keys.insert(key.into_boxed_slice(), LiveKey::of(kv));
                }
            },
            None => {
                self.keys.remove(key.as_slice());
            }
        }
    }

    pub(crate) fn insert(&mut self, key: &[u8], live: LiveKey) {
        self.keys.insert(key.into(), live);
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], &LiveKey)> {
        self.keys.iter().map(|(k, v)| (&**k, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_overwrites_and_deletes() {
        let mut index = LiveIndex::default();
        let kv = |version| KeyValue {
            key: b"k".to_vec(),
            create_revision: 2,
            mod_revision: 1 + version,
            version,
            value: b"ignored".to_vec(),
            lease: 9,
        };
        index.set(b"k".to_vec(), Some(&kv(1)));
        index.set(b"k".to_vec(), Some(&kv(2)));
        assert_eq!(
            index.get(b"k"),
            Some(LiveKey {
                create_revision: 2,
                mod_revision: 3,
                version: 2,
                lease: 9
            })
        );
        assert_eq!(index.len(), 1);
        index.set(b"k".to_vec(), None);
        assert_eq!(index.get(b"k"), None);
        assert_eq!(index.len(), 0);
    }
}
