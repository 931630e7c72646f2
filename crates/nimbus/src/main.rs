//! The `nimbus` binary: wires subcommands to the crates.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("shim") {
        std::process::exit(nimbus_agent::driver::container::shim::main(args[2..].to_vec()));
    }
}
