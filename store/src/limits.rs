//! Named limits (units last). Each bound here is what keeps a queue, batch or request finite.

/// Operations per txn compare list or branch (etcd `--max-txn-ops`, default 128).
pub const TXN_OPS_MAX: usize = 128;
/// Largest client request, in bytes (etcd `--max-request-bytes`, 1.5 MiB).
pub const REQUEST_BYTES_MAX: usize = 1536 * 1024;
/// Distinct revisions per watch catch-up batch read from history.
pub const WATCH_BATCH_REVISIONS_MAX: usize = 1000;
/// Largest lease TTL accepted by LeaseGrant, in seconds (etcd `MaxLeaseTTL`).
pub const LEASE_TTL_MAX_SECONDS: i64 = 9_000_000_000;
/// Leases turned into revokes per lessor tick (etcd revokes at most 1000/s, 500 per 500 ms).
pub const LEASE_REVOKES_PER_TICK_MAX: usize = 500;
/// History records one compaction sweep step reads (etcd's `--compaction-batch-limit`
/// default); bounds a step's batch and how long it holds the disk.
pub const COMPACTION_BATCH_RECORDS_MAX: usize = 1000;
/// Compacted-away history entries below which a reclaim (a rewrite of every keyspace) is not
/// worth its cost.
pub const RECLAIM_ENTRIES_MIN: u64 = 10_000;
/// Major compactions per keyspace in one reclaim, while background compactions hold tables.
pub const RECLAIM_REWRITES_MAX: usize = 3;
/// Longest wait, in milliseconds, for background compactions to end before each of a reclaim's
/// rewrites (a loaded store may always have one running).
pub const RECLAIM_COMPACTION_WAIT_MS_MAX: u128 = 5000;
/// Default backend quota in bytes (etcd: 2 GiB when `--quota-backend-bytes` is 0).
pub const QUOTA_BACKEND_BYTES_DEFAULT: u64 = 2 * 1024 * 1024 * 1024;
/// Bytes charged per Put on top of key and value, for the quota check (etcd's cost model).
pub const QUOTA_PUT_OVERHEAD_BYTES: u64 = 256;
/// Bytes charged per LeaseGrant for the quota check.
pub const QUOTA_LEASE_GRANT_BYTES: u64 = 64;
/// Versions of a key's life between its sparse index entries (`StoreOptions::waypoint_versions`):
/// a read at an older revision walks at most this many history records per key.
pub const HISTORY_WAYPOINT_VERSIONS: i64 = 128;
/// Keys the live index loads per step at start-up; the writer waits for at most one step.
pub const LIVE_INDEX_LOAD_CHUNK_KEYS: usize = 4096;

const _: () = assert!(LEASE_REVOKES_PER_TICK_MAX <= 1000);
