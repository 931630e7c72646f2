//! nimbus net
