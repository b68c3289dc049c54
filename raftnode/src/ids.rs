//! Member and cluster IDs, derived the way etcd derives them, so they are stable for the same
//! peer URLs and cluster token: member ID = first 8 bytes (big-endian) of
//! SHA-1(sorted peer URLs joined ++ token); cluster ID = first 8 bytes of SHA-1 of the sorted
//! member IDs, each as 8 big-endian bytes.

use sha1::{Digest, Sha1};

fn first_u64(bytes: &[u8]) -> u64 {
    let digest = Sha1::digest(bytes);
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(id)
}

/// Member ID from its peer URLs and the cluster token.
pub fn member_id(peer_urls: &[String], token: &str) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let mut b = urls.concat().into_bytes();
    b.extend_from_slice(token.as_bytes());
    first_u64(&b)
}

/// Cluster ID from the member IDs.
pub fn cluster_id(member_ids: &[u64]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort_unstable();
    let b: Vec<u8> = ids.iter().flat_map(|id| id.to_be_bytes()).collect();
    first_u64(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_order_independent() {
        let a = member_id(&["http://127.0.0.1:2380".into()], "t");
        assert_eq!(a, member_id(&["http://127.0.0.1:2380".into()], "t"));
        assert_ne!(a, member_id(&["http://127.0.0.1:2380".into()], "u"));
        let urls = ["http://b:1".to_string(), "http://a:1".to_string()];
        assert_eq!(
            member_id(&urls, "t"),
            member_id(&[urls[1].clone(), urls[0].clone()], "t")
        );
        assert_eq!(cluster_id(&[1, 2]), cluster_id(&[2, 1]));
        assert_ne!(cluster_id(&[1, 2]), cluster_id(&[1, 3]));
    }
}
