//! image-replicator: one binary that serves the OpenStack image-replicator API and administers
//! its own data directory. This file only parses the command line and dispatches.

mod admin;
mod auth;
mod cli;
mod copy;
mod demo;
mod error;
mod http;
mod model;
mod regions;
mod server;
mod service;
mod store;
mod watch;
mod worker;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let default_level = if matches!(cli.command, cli::Command::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("image-replicator: {message}");
            ExitCode::FAILURE
        }
    }
}
