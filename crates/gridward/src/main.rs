//! `gridward`: the single command-line binary of the Gridward head-end.
//!
//! CLI definition and glue only; all logic lives in the library crates.
//!
//! - [`pki_cmd`]: `gridward pki ...`, the certificate authority.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod pki_cmd;

/// Gridward: a secure smart-metering head-end system.
#[derive(Debug, Parser)]
#[command(name = "gridward", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the certificate authority: CA set-up, issuance, CSR signing, revocation, CRLs, PKCS#12.
    Pki(pki_cmd::PkiArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Pki(args) => pki_cmd::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
