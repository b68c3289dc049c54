//! The live index: every live key's revisions, version and lease, in memory.
//!
//! A put needs the key's previous create revision, version and lease, but not its value (unless
//! the client or a watcher asks for `prev_kv`, or the put keeps the old value). Reading them from
//! `kv_latest` costs a search of the LSM tree per put: bloom filters, the block cache and a block
//! decode once the key has left the memtable, as most keys of a store with history have (on a
//! 500,000-key store this index cut the CPU per put by a third). etcd keeps an index of every key
//! and revision in memory for the same reason; this one holds only the live keys and no value.
//!
//! Bound: one entry per live key, so the backend quota bounds it (60 to 120 bytes plus the key,
//! per key). It is owned by the single writer (the store's writer lock) and updated after each
//! batch commits, so it always equals the committed `kv_latest`, except while it is *loading*.
//!
//! Loading: when a member starts, the keys live at that moment are read from a snapshot of
//! `kv_latest` taken before any write, in chunks, beside the writer ([`LiveIndex::load`]). Until
//! then a key may be [`Lookup::Unknown`] and the writer reads it from disk as before. The writer's
//! own changes are newer than the snapshot, so the loader never overwrites them: it skips keys the
//! writer has put since (they are in the map) and keys it has deleted since (kept in a set until
//! loading ends; bounded by the keys live at start plus the writes made while loading).

use std::collections::{HashMap, HashSet};

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

/// What the index knows about a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    Live(LiveKey),
    Absent,
    /// Still loading, and neither loaded nor written since: read it from disk.
    Unknown,
}

/// Live keys (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct LiveIndex {
    keys: HashMap<Box<[u8]>, LiveKey>,
    /// While loading: the keys the writer deleted, which the loader must not bring back.
    deleted_while_loading: Option<HashSet<Box<[u8]>>>,
}

impl LiveIndex {
    /// An index whose keys are still to be loaded (see the module docs).
    pub(crate) fn loading(capacity: usize) -> Self {
        Self {
            keys: HashMap::with_capacity(capacity),
            deleted_while_loading: Some(HashSet::new()),
        }
    }

    pub(crate) fn is_loading(&self) -> bool {
        self.deleted_while_loading.is_some()
    }

    pub(crate) fn lookup(&self, key: &[u8]) -> Lookup {
        if let Some(live) = self.keys.get(key) {
            return Lookup::Live(*live);
        }
        match &self.deleted_while_loading {
            Some(deleted) if !deleted.contains(key) => Lookup::Unknown,
            _ => Lookup::Absent,
        }
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
                if let Some(deleted) = &mut self.deleted_while_loading {
                    deleted.insert(key.into_boxed_slice());
                }
            }
        }
    }

    /// Adds a key read by the loader, unless the writer changed it since (or loading is over:
    /// a snapshot install replaced the index).
    pub(crate) fn load(&mut self, key: &[u8], live: LiveKey) {
        let Some(deleted) = &self.deleted_while_loading else {
            return;
        };
        if !deleted.contains(key) && !self.keys.contains_key(key) {
            self.keys.insert(key.into(), live);
        }
    }

    /// Every key live at the start is loaded: lookups are exact from now on.
    pub(crate) fn finish_loading(&mut self) {
        self.deleted_while_loading = None;
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

    fn live(version: i64) -> LiveKey {
        LiveKey {
            create_revision: 1,
            mod_revision: version,
            version,
            lease: 0,
        }
    }

    /// The loader fills in only keys the writer has not touched since the snapshot it reads.
    #[test]
    fn loading_never_overrides_the_writer() {
        let mut index = LiveIndex::loading(4);
        let kv = |key: &[u8], version| KeyValue {
            key: key.to_vec(),
            create_revision: 1,
            mod_revision: version,
            version,
            ..KeyValue::default()
        };
        assert_eq!(index.lookup(b"a"), Lookup::Unknown);
        index.set(b"a".to_vec(), Some(&kv(b"a", 7)));
        index.set(b"b".to_vec(), None);
        index.load(b"a", live(3));
        index.load(b"b", live(3));
        index.load(b"c", live(3));
        assert_eq!(
            index.lookup(b"a"),
            Lookup::Live(live(7)),
            "the writer's put is newer"
        );
        assert_eq!(
            index.lookup(b"b"),
            Lookup::Absent,
            "the writer's delete is newer"
        );
        assert_eq!(index.lookup(b"c"), Lookup::Live(live(3)));
        assert_eq!(index.lookup(b"d"), Lookup::Unknown);
        index.finish_loading();
        assert_eq!(index.lookup(b"d"), Lookup::Absent);
        index.load(b"d", live(1));
        assert_eq!(
            index.lookup(b"d"),
            Lookup::Absent,
            "nothing loads after loading"
        );
    }

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
            index.lookup(b"k"),
            Lookup::Live(LiveKey {
                create_revision: 2,
                mod_revision: 3,
                version: 2,
                lease: 9
            })
        );
        assert_eq!(index.len(), 1);
        index.set(b"k".to_vec(), None);
        assert_eq!(index.lookup(b"k"), Lookup::Absent);
        assert_eq!(index.len(), 0);
    }
}
