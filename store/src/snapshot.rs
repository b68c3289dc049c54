//! Full-state export and import, used for raft snapshots.
//!
//! The stream is `MAGIC`, then frames `[keyspace u8][key len u32 BE][key][value len u32 BE][value]`,
//! then `END`. It is read from one fjall snapshot, so it is one consistent state, and it carries
//! history and the meta keyspace, so an installed member has the same revisions, compact revision
//! and HashKV as the member that built it.

use std::io::{Read, Write};

use fjall::Readable;

use crate::error::{Error, Result};
use crate::kv_store::KvStore;

const MAGIC: &[u8; 8] = b"KHSNAP01";
const END: u8 = 0xff;
/// Largest key or value frame accepted on import; bounds memory of a corrupt or hostile stream.
const FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Records per write batch on import.
const IMPORT_BATCH_RECORDS_MAX: usize = 10_000;

fn io(e: std::io::Error) -> Error {
    Error::Storage(format!("snapshot io: {e}"))
}

impl KvStore {
    /// Writes the whole state to `out`; returns the values of `meta_keys` as of the same state
    /// (the raft layer reads its applied log id and membership this way).
    ///
    /// # Errors
    /// `Storage` on read or write failure.
    pub fn export(
        &self,
        out: &mut impl Write,
        meta_keys: &[&[u8]],
    ) -> Result<Vec<Option<Vec<u8>>>> {
        let snap = self.database().snapshot();
        let meta = self.keyspaces()[5];
        let mut values = Vec::with_capacity(meta_keys.len());
        for k in meta_keys {
            values.push(snap.get(meta, k)?.map(|v| v.to_vec()));
        }
        out.write_all(MAGIC).map_err(io)?;
        for (tag, ks) in self.keyspaces().iter().enumerate() {
            for item in snap.iter(ks) {
                let (k, v) = item.into_inner()?;
                out.write_all(&[tag as u8]).map_err(io)?;
                for part in [&k[..], &v[..]] {
                    out.write_all(&(part.len() as u32).to_be_bytes())
                        .map_err(io)?;
                    out.write_all(part).map_err(io)?;
                }
            }
        }
        out.write_all(&[END]).map_err(io)?;
        out.flush().map_err(io)?;
        Ok(values)
    }

    /// Replaces the whole state with the stream written by [`KvStore::export`].
    ///
    /// # Errors
    /// `Storage` when the stream is malformed or the write fails.
    pub fn import(&self, input: &mut impl Read) -> Result<()> {
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic).map_err(io)?;
        if &magic != MAGIC {
            return Err(Error::Storage("not a keyhold snapshot".into()));
        }
        // A sweep step between the clear and the import would act on neither state.
        let _sweeps = self.pause_sweeps();
        let keyspaces = self.keyspaces();
        for ks in &keyspaces {
            ks.clear()?;
        }
        let mut batch = self.database().batch();
        let mut pending = 0usize;
        loop {
            let mut tag = [0u8; 1];
            input.read_exact(&mut tag).map_err(io)?;
            if tag[0] == END {
                break;
            }
            let ks = keyspaces
                .get(tag[0] as usize)
                .ok_or_else(|| Error::Storage("bad snapshot keyspace".into()))?;
            let key = read_frame(input)?;
            let value = read_frame(input)?;
            batch.insert(ks, key, value);
            pending += 1;
            if pending >= IMPORT_BATCH_RECORDS_MAX {
                std::mem::replace(&mut batch, self.database().batch()).commit()?;
                pending = 0;
            }
        }
        batch.commit()?;
        self.persist()?;
        self.reload()
    }
}

fn read_frame(input: &mut impl Read) -> Result<Vec<u8>> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len).map_err(io)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(Error::Storage(format!("snapshot frame of {len} bytes")));
    }
    let mut buf = vec![0u8; len];
    input.read_exact(&mut buf).map_err(io)?;
    Ok(buf)
}
