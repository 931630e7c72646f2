//! nimbus client
