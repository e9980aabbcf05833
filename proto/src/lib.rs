//! The `kubenft.v1` API shared by the controller and the agent: generated message and service
//! types (the service stubs with the `grpc` feature), the descriptor set that reflection serves, and the content versions that make two
//! controller replicas interchangeable; and what this build is ([`release`]).
#![forbid(unsafe_code)]

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    include!(concat!(env!("OUT_DIR"), "/kubenft.v1.rs"));

    /// Encoded `FileDescriptorSet` of every kubenft.v1 file, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/kubenft_descriptor.bin"));
}

mod names;
pub mod release;
mod version;

pub use names::{
    ENDPOINT_BUCKETS, MAX_INTERFACE_NAME, NODE_RESOURCE, check_interface_name, endpoint_bucket,
    node_endpoints_name, parse_namespaced_name, parse_node_endpoints_name,
};
pub use version::{format_version, resource_version, system_version, version_term};
