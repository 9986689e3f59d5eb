//! `ip2p`: edit images from written instructions. The flags and subcommands are in [`cli`].

#![forbid(unsafe_code)]

mod cli;

use clap::Parser;

fn main() {
    ip2p::device::tune_allocator();
    let cli = cli::Cli::parse();
    let level = if cli.long_running() { "info" } else { "warn" };
    ip2p::logging::init(cli.log_format, level);
    if let Err(e) = cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
