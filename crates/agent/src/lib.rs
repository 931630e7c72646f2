//! The nimbus node agent: registers the node, watches its assignments, converges local reality
//! through the drivers, and reports status.

pub mod driver;
