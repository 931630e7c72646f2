//! The container driver: runc with an OCI bundle on overlayfs, one shim process per container.

pub mod shim;
