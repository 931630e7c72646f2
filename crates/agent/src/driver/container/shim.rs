//! The container shim: `nimbus shim ...` — started per container, outlives the agent.

/// Entry point of `nimbus shim ARGS...`; returns the process exit code.
pub fn main(args: Vec<String>) -> i32 {
    let _ = args;
    2
}
