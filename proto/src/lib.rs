//! etcd v3.7 wire types and gRPC service definitions, generated from the vendored `.proto` files
//! under `proto/` (copied from etcd v3.7.2). Package names are kept as etcd's, because method paths
//! such as `/etcdserverpb.KV/Range` are the compatibility contract. No logic lives here.

#![allow(unreachable_pub, unused_qualifications, clippy::all)]

/// `mvccpb`: `KeyValue` and `Event`.
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

/// `authpb`: users, roles and permissions.
pub mod authpb {
    tonic::include_proto!("authpb");
}

/// `etcdserverpb`: every public etcd v3 service and its messages.
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

/// `v3electionpb`: the Election service.
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}

/// `v3lockpb`: the Lock service.
pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}

/// Encoded `FileDescriptorSet` of all etcd protos (for reflection and JSON mapping).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/etcd_descriptor.bin"));
