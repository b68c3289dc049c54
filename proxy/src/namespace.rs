//! `--namespace P`: clients see the key space under `P` as the whole key space (etcd's
//! `namespace` wrappers, applied to KV, Watch and Lease). Keys and range ends are prefixed on
//! the way up and stripped from every key on the way back.

use keyhold_proto::etcdserverpb as pb;
use keyhold_proto::mvccpb;
use tonic::Status;

/// A namespace (`prefix` empty = none: every call is a no-op).
#[derive(Debug, Clone, Default)]
pub struct Namespace {
    prefix: Vec<u8>,
}

/// The end of the range of keys starting with `prefix` (`"\0"` = no end), as etcd computes it.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Namespace {
    /// The namespace under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.as_bytes().to_vec(),
        }
    }

    fn on(&self) -> bool {
        !self.prefix.is_empty()
    }

    /// Bytes stripped from keys coming back.
    pub fn len(&self) -> usize {
        self.prefix.len()
    }

    /// Whether there is no namespace.
    pub fn is_empty(&self) -> bool {
        self.prefix.is_empty()
    }

    fn key(&self, key: &[u8]) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(key);
        k
    }

    /// `key`/`range_end` inside the namespace: `"\0"` ends at the namespace's end, and a
    /// `"\0"` key with it covers the whole namespace.
    fn range(&self, key: &mut Vec<u8>, end: &mut Vec<u8>) {
        if !self.on() {
            return;
        }
        if end.as_slice() == [0] {
            *end = prefix_end(&self.prefix);
            if key.as_slice() == [0] {
                key.clear();
            }
        } else if !end.is_empty() {
            *end = self.key(end);
        }
        *key = self.key(key);
    }

    /// Refuses an empty key (inside a namespace it would silently mean the prefix itself).
    fn check_key(&self, key: &[u8]) -> Result<(), Status> {
        if self.on() && key.is_empty() {
            return Err(Status::invalid_argument("etcdserver: key is not provided"));
        }
        Ok(())
    }

    /// Strips the prefix from one key-value.
    pub fn strip_kv(&self, kv: &mut mvccpb::KeyValue) {
        if self.on() && kv.key.starts_with(&self.prefix) {
            kv.key.drain(..self.prefix.len());
        }
    }

    pub fn range_request(&self, r: &mut pb::RangeRequest) -> Result<(), Status> {
        self.check_key(&r.key)?;
        self.range(&mut r.key, &mut r.range_end);
        Ok(())
    }

    pub fn range_response(&self, r: &mut pb::RangeResponse) {
        r.kvs.iter_mut().for_each(|kv| self.strip_kv(kv));
    }

    pub fn put_request(&self, r: &mut pb::PutRequest) -> Result<(), Status> {
        self.check_key(&r.key)?;
        if self.on() {
            r.key = self.key(&r.key);
        }
        Ok(())
    }

    pub fn put_response(&self, r: &mut pb::PutResponse) {
        r.prev_kv.iter_mut().for_each(|kv| self.strip_kv(kv));
    }

    pub fn delete_request(&self, r: &mut pb::DeleteRangeRequest) -> Result<(), Status> {
        self.check_key(&r.key)?;
        self.range(&mut r.key, &mut r.range_end);
        Ok(())
    }

    pub fn delete_response(&self, r: &mut pb::DeleteRangeResponse) {
        r.prev_kvs.iter_mut().for_each(|kv| self.strip_kv(kv));
    }

    pub fn txn_request(&self, t: &mut pb::TxnRequest) -> Result<(), Status> {
        use pb::request_op::Request as Op;
        if !self.on() {
            return Ok(());
        }
        for c in &mut t.compare {
            self.range(&mut c.key, &mut c.range_end);
        }
        for op in t.success.iter_mut().chain(t.failure.iter_mut()) {
            match &mut op.request {
                Some(Op::RequestRange(r)) => self.range_request(r)?,
                Some(Op::RequestPut(p)) => self.put_request(p)?,
                Some(Op::RequestDeleteRange(d)) => self.delete_request(d)?,
                Some(Op::RequestTxn(t)) => self.txn_request(t)?,
                None => {}
            }
        }
        Ok(())
    }

    pub fn txn_response(&self, t: &mut pb::TxnResponse) {
        use pb::response_op::Response as Op;
        if !self.on() {
            return;
        }
        for op in &mut t.responses {
            match &mut op.response {
                Some(Op::ResponseRange(r)) => self.range_response(r),
                Some(Op::ResponsePut(p)) => self.put_response(p),
                Some(Op::ResponseDeleteRange(d)) => self.delete_response(d),
                Some(Op::ResponseTxn(t)) => self.txn_response(t),
                None => {}
            }
        }
    }

    pub fn watch_create(&self, c: &mut pb::WatchCreateRequest) {
        self.range(&mut c.key, &mut c.range_end);
    }

    pub fn event(&self, e: &mut mvccpb::Event) {
        e.kv.iter_mut().for_each(|kv| self.strip_kv(kv));
        e.prev_kv.iter_mut().for_each(|kv| self.strip_kv(kv));
    }

    /// LeaseTimeToLive lists attached keys: only this namespace's, stripped.
    pub fn lease_keys(&self, keys: &mut Vec<Vec<u8>>) {
        if !self.on() {
            return;
        }
        keys.retain(|k| k.starts_with(&self.prefix));
        for k in keys.iter_mut() {
            k.drain(..self.prefix.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_map_into_the_namespace() {
        let ns = Namespace::new("a/");
        let mut r = pb::RangeRequest {
            key: b"k".to_vec(),
            ..Default::default()
        };
        ns.range_request(&mut r).expect("ok");
        assert_eq!(
            (r.key.as_slice(), r.range_end.as_slice()),
            (&b"a/k"[..], &b""[..])
        );
        let mut r = pb::RangeRequest {
            key: b"k".to_vec(),
            range_end: b"l".to_vec(),
            ..Default::default()
        };
        ns.range_request(&mut r).expect("ok");
        assert_eq!(
            (r.key.as_slice(), r.range_end.as_slice()),
            (&b"a/k"[..], &b"a/l"[..])
        );
        let mut r = pb::RangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..Default::default()
        };
        ns.range_request(&mut r).expect("ok");
        assert_eq!(
            (r.key.as_slice(), r.range_end.as_slice()),
            (&b"a/"[..], &b"a0"[..]),
            "everything = the whole namespace"
        );
        let mut r = pb::RangeRequest::default();
        let e = ns.range_request(&mut r).expect_err("empty key");
        assert_eq!(e.message(), "etcdserver: key is not provided");
    }

    #[test]
    fn keys_come_back_stripped_and_foreign_lease_keys_hidden() {
        let ns = Namespace::new("a/");
        let mut kv = mvccpb::KeyValue {
            key: b"a/k".to_vec(),
            ..Default::default()
        };
        ns.strip_kv(&mut kv);
        assert_eq!(kv.key, b"k");
        let mut keys = vec![b"a/x".to_vec(), b"b/y".to_vec()];
        ns.lease_keys(&mut keys);
        assert_eq!(keys, vec![b"x".to_vec()]);
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn no_namespace_changes_nothing() {
        let ns = Namespace::default();
        let mut r = pb::RangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..Default::default()
        };
        ns.range_request(&mut r).expect("ok");
        assert_eq!((r.key, r.range_end), (vec![0], vec![0]));
    }
}
