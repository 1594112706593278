//! The gRPC contract between RuntimeAI nodes: raft RPCs (with chunked snapshot transfer),
//! forwarding of client commands to the leader, and cluster administration.
//!
//! Only generated code lives here; what the payload bytes mean is `runtimeai_raft::codec`'s
//! business.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("runtimeai.v1");
