//! The `p2pchat` binary.

use std::process::ExitCode;

use clap::Parser;

use p2pchat::cli::{Cli, Command};
use p2pchat::config::{resolve, resolve_data_dir, Defaults, Sources};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("p2pchat: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Id { data_dir, config } => {
            let flags = p2pchat::cli::SettingsArgs { data_dir, config, ..Default::default() };
            let dir = resolve_data_dir(&flags.sources().with_process_env(), &Defaults::from_env())
                .map_err(|e| e.to_string())?;
            let identity = p2pchat_storage_sqlite::load_or_create_identity(&dir).map_err(|e| e.to_string())?;
            println!("{}", identity.peer_id());
            Ok(())
        }
        Command::Config(args) => {
            let sources: Sources = args.sources().with_process_env();
            let settings = resolve(&sources, &Defaults::from_env()).map_err(|e| e.to_string())?;
            println!("{settings:#?}");
            Ok(())
        }
    }
}
