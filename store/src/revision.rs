//! Revisions and their on-disk encoding.
//!
//! A revision is `(main, sub)`: `main` is the store revision a write request created, `sub` numbers
//! the changes inside that request. Encoded as 16 bytes, big-endian `main` then `sub`, so byte
//! order is revision order. Example: the second change of the txn at revision 7 is
//! `00..07 00..01`.

/// One change's position in history.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Revision {
    /// Store revision of the write request.
    pub main: i64,
    /// Index of the change inside that request.
    pub sub: i64,
}

/// Length of an encoded revision.
pub const REVISION_BYTES: usize = 16;

impl Revision {
    /// A revision at `main` with `sub`.
    pub fn new(main: i64, sub: i64) -> Self {
        assert!(main >= 0 && sub >= 0, "negative revision {main}/{sub}");
        Self { main, sub }
    }

    /// Big-endian encoding: byte order is revision order.
    pub fn to_bytes(self) -> [u8; REVISION_BYTES] {
        assert!(self.main >= 0 && self.sub >= 0);
        let mut out = [0u8; REVISION_BYTES];
        out[..8].copy_from_slice(&self.main.to_be_bytes());
        out[8..].copy_from_slice(&self.sub.to_be_bytes());
        out
    }

    /// Decodes [`Revision::to_bytes`]; `None` when the bytes are not a revision (corruption).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let main = i64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let sub = i64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
        if bytes.len() != REVISION_BYTES || main < 0 || sub < 0 {
            return None;
        }
        Some(Self { main, sub })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_and_preserves_order() {
        let revs = [
            Revision::new(0, 0),
            Revision::new(1, 5),
            Revision::new(2, 0),
            Revision::new(2, 1),
        ];
        for w in revs.windows(2) {
            assert!(w[0].to_bytes() < w[1].to_bytes());
        }
        for r in revs {
            assert_eq!(Revision::from_bytes(&r.to_bytes()), Some(r));
        }
        assert_eq!(Revision::from_bytes(&[0u8; 15]), None);
        assert_eq!(Revision::from_bytes(&[0xff; 16]), None);
    }
}
