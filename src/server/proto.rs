//! Generated types of `proto/ip2p/v1/image_editor.proto`.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("ip2p.v1");

/// The file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ip2p_descriptor");
