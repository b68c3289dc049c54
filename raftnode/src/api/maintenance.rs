//! The Maintenance service: Status, Alarm, Hash/HashKV, Defragment, Snapshot, MoveLeader.

use std::io::Read;
use std::sync::Arc;

use keyhold_proto::etcdserverpb as pb;
use keyhold_proto::etcdserverpb::maintenance_server::Maintenance;
use keyhold_store as st;
use sha2::{Digest, Sha256};
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::status::store_err;
use super::{current_header, header};
use crate::node::{ETCD_COMPAT_VERSION, Node};

/// Bytes per Snapshot message, as etcd (32 KiB).
const SNAPSHOT_CHUNK_BYTES: usize = 32 * 1024;
/// Snapshot bodies are padded to a multiple of this (etcd clients check bbolt page alignment).
const SNAPSHOT_ALIGN_BYTES: u64 = 512;
/// Snapshot messages buffered before the stream waits for the client.
const SNAPSHOT_QUEUE_MAX: usize = 8;

/// Maintenance service.
pub struct MaintenanceService {
    pub(crate) node: Arc<Node>,
}

fn alarm_to_pb(a: st::AlarmMember) -> pb::AlarmMember {
    pb::AlarmMember {
        member_id: a.member_id,
        alarm: match a.alarm {
            st::AlarmType::NoSpace => pb::AlarmType::Nospace as i32,
            st::AlarmType::Corrupt => pb::AlarmType::Corrupt as i32,
        },
    }
}

/// etcd's text for an active alarm in Status `errors`.
fn alarm_text(a: &st::AlarmMember) -> String {
    let name = match a.alarm {
        st::AlarmType::NoSpace => "NOSPACE",
        st::AlarmType::Corrupt => "CORRUPT",
    };
    format!("memberID:{} alarm:{name} ", a.member_id)
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(
        &self,
        req: Request<pb::AlarmRequest>,
    ) -> Result<Response<pb::AlarmResponse>, Status> {
        use pb::alarm_request::AlarmAction;
        let req = req.into_inner();
        let kind = match pb::AlarmType::try_from(req.alarm) {
            Ok(pb::AlarmType::Nospace) => Some(st::AlarmType::NoSpace),
            Ok(pb::AlarmType::Corrupt) => Some(st::AlarmType::Corrupt),
            _ => None,
        };
        let activate = match AlarmAction::try_from(req.action) {
            Ok(AlarmAction::Get) | Err(_) => None,
            Ok(AlarmAction::Activate) => Some(true),
            Ok(AlarmAction::Deactivate) => Some(false),
        };
        let alarms = match (activate, kind) {
            (Some(activate), Some(alarm)) => {
                let alarm = st::AlarmMember {
                    member_id: req.member_id,
                    alarm,
                };
                match self
                    .node
                    .propose(st::WriteRequest::Alarm { activate, alarm })
                    .await?
                {
                    st::WriteResponse::Alarm { alarms, .. } if activate => {
                        alarms.into_iter().filter(|a| *a == alarm).collect()
                    }
                    st::WriteResponse::Alarm { .. } => vec![alarm],
                    other => {
                        return Err(super::unexpected(&other));
                    }
                }
            }
            (Some(_), None) => Vec::new(),
            (None, _) => self
                .node
                .store
                .alarms()
                .into_iter()
                .filter(|a| kind.is_none_or(|k| a.alarm == k))
                .filter(|a| req.member_id == 0 || a.member_id == req.member_id)
                .collect(),
        };
        Ok(Response::new(pb::AlarmResponse {
            header: current_header(&self.node),
            alarms: alarms.into_iter().map(alarm_to_pb).collect(),
        }))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let node = &self.node;
        let (committed, applied) = node.raft_indexes();
        let mut errors: Vec<String> = node.store.alarms().iter().map(alarm_text).collect();
        let leader = node.leader().unwrap_or(0);
        if leader == 0 {
            errors.push("etcdserver: no leader".into());
        }
        Ok(Response::new(pb::StatusResponse {
            header: current_header(node),
            version: ETCD_COMPAT_VERSION.into(),
            db_size: node.store.size_bytes() as i64,
            leader,
            raft_index: committed,
            raft_term: node.term(),
            raft_applied_index: applied,
            errors,
            db_size_in_use: node.store.size_in_use_bytes() as i64,
            is_learner: node.is_learner(),
            storage_version: ETCD_COMPAT_VERSION.into(),
            db_size_quota: node.config.quota_bytes as i64,
            downgrade_info: Some(pb::DowngradeInfo::default()),
        }))
    }

    async fn defragment(
        &self,
        _req: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        let store = self.node.store.clone();
        tokio::task::spawn_blocking(move || store.defragment())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(store_err)?;
        Ok(Response::new(pb::DefragmentResponse {
            header: current_header(&self.node),
        }))
    }

    async fn hash(
        &self,
        _req: Request<pb::HashRequest>,
    ) -> Result<Response<pb::HashResponse>, Status> {
        let (hash, _, rev) = self.node.blocking(|s| s.hash_kv(0)).map_err(store_err)?;
        Ok(Response::new(pb::HashResponse {
            header: header(&self.node, rev),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        req: Request<pb::HashKvRequest>,
    ) -> Result<Response<pb::HashKvResponse>, Status> {
        let revision = req.into_inner().revision;
        let (hash, compact_revision, hash_revision) = self
            .node
            .blocking(|s| s.hash_kv(revision))
            .map_err(store_err)?;
        Ok(Response::new(pb::HashKvResponse {
            header: current_header(&self.node),
            hash,
            compact_revision,
            hash_revision,
        }))
    }

    async fn snapshot(
        &self,
        _req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<BoxStream<pb::SnapshotResponse>>, Status> {
        let node = self.node.clone();
        let path = node
            .config
            .data_dir
            .join("snap")
            .join(format!("export-{:x}.tmp", rand::random::<u64>()));
        let (store, export_path) = (node.store.clone(), path.clone());
        let size = tokio::task::spawn_blocking(move || -> Result<u64, Status> {
            let f =
                std::fs::File::create(&export_path).map_err(|e| Status::internal(e.to_string()))?;
            let mut out = std::io::BufWriter::new(f);
            store.export(&mut out, &[]).map_err(store_err)?;
            // etcd clients expect a page-aligned body (bbolt files are); the export ends with an
            // END marker, so zero padding after it is ignored on import.
            let len = out
                .get_ref()
                .metadata()
                .map_err(|e| Status::internal(e.to_string()))?
                .len()
                + out.buffer().len() as u64;
            let pad = (SNAPSHOT_ALIGN_BYTES - len % SNAPSHOT_ALIGN_BYTES) % SNAPSHOT_ALIGN_BYTES;
            std::io::Write::write_all(&mut out, &vec![0u8; pad as usize])
                .map_err(|e| Status::internal(e.to_string()))?;
            std::io::Write::flush(&mut out).map_err(|e| Status::internal(e.to_string()))?;
            drop(out);
            Ok(std::fs::metadata(&export_path)
                .map_err(|e| Status::internal(e.to_string()))?
                .len())
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        let (tx, rx) = tokio::sync::mpsc::channel(SNAPSHOT_QUEUE_MAX);
        tokio::task::spawn_blocking(move || {
            let result = (|| -> std::io::Result<()> {
                let mut file = std::fs::File::open(&path)?;
                let mut hasher = Sha256::new();
                let mut remaining = size;
                let mut buf = vec![0u8; SNAPSHOT_CHUNK_BYTES];
                loop {
                    let n = file.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    remaining -= n as u64;
                    let msg = pb::SnapshotResponse {
                        header: None,
                        remaining_bytes: remaining,
                        blob: buf[..n].to_vec(),
                        version: ETCD_COMPAT_VERSION.into(),
                    };
                    if tx.blocking_send(Ok(msg)).is_err() {
                        return Ok(());
                    }
                }
                let trailer = pb::SnapshotResponse {
                    header: None,
                    remaining_bytes: 0,
                    blob: hasher.finalize().to_vec(),
                    version: ETCD_COMPAT_VERSION.into(),
                };
                let _ = tx.blocking_send(Ok(trailer));
                Ok(())
            })();
            if let Err(e) = result {
                let _ = tx.blocking_send(Err(Status::internal(e.to_string())));
            }
            let _ = std::fs::remove_file(&path);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn move_leader(
        &self,
        req: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        self.node.move_leader(req.into_inner().target_id).await?;
        Ok(Response::new(pb::MoveLeaderResponse {
            header: current_header(&self.node),
        }))
    }
}
