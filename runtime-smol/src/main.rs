//! The `p2pchat` binary.

use std::process::ExitCode;

use clap::Parser;

use p2pchat::cli::{Cli, Command};
use p2pchat::config::{resolve, Defaults, Sources};

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

/// Logs go to stderr and to `<kind>-<pid>.log` in the log directory; a
/// log directory that cannot be written is reported, and stderr still works.
fn start_logging(settings: &p2pchat::config::Settings, kind: &str) -> Result<(), String> {
    let name = format!("{kind}-{}", std::process::id());
    if let Err(e) = p2pchat::logging::init(&settings.log_dir, &name, settings.log_level) {
        eprintln!("p2pchat: {e}");
    }
    Ok(())
}

fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Id { dir, passphrase_fd } => {
            let dir = dir.resolve()?;
            let passphrase = p2pchat::passphrase::for_start(&dir, passphrase_fd)?;
            let identity = p2pchat_storage_sqlite::load_or_create_identity_with(&dir, passphrase.as_ref())
                .map_err(|e| e.to_string())?;
            println!("{}", identity.peer_id());
            Ok(())
        }
        Command::Passphrase { dir, passphrase_fd, new_passphrase_fd, remove } => {
            let dir = dir.resolve()?;
            if passphrase_fd.is_some() && passphrase_fd == new_passphrase_fd {
                return Err("--passphrase-fd and --new-passphrase-fd must be different descriptors".into());
            }
            let exists = dir.join(p2pchat_storage_sqlite::IDENTITY_FILE).exists();
            let current = if exists { p2pchat::passphrase::for_start(&dir, passphrase_fd)? } else { None };
            let new = match (remove, new_passphrase_fd) {
                (true, _) => None,
                (false, Some(fd)) => Some(p2pchat::passphrase::from_fd(fd)?),
                (false, None) => {
                    let first = p2pchat::passphrase::ask("new passphrase: ")?;
                    let again = p2pchat::passphrase::ask("the new passphrase again: ")?;
                    if !first.same_as(&again) {
                        return Err("the two passphrases differ; nothing was changed".into());
                    }
                    Some(first)
                }
            };
            let identity = if exists {
                p2pchat_storage_sqlite::set_identity_passphrase(&dir, current.as_ref(), new.as_ref())
            } else {
                // A new identity is created wrapped: its key never touches
                // the disk unprotected.
                p2pchat_storage_sqlite::load_or_create_identity_with(&dir, new.as_ref())
            }
            .map_err(|e| e.to_string())?;
            match new {
                Some(_) => println!(
                    "the identity key of {} is protected by the passphrase; give it at every start \
                     (asked at the terminal, or --passphrase-fd)",
                    identity.peer_id()
                ),
                None => println!("the identity key of {} has no passphrase now", identity.peer_id()),
            }
            Ok(())
        }
        Command::Token { dir } => {
            let dir = dir.resolve()?;
            let token = p2pchat::api::load_or_create_token(&dir).map_err(|e| e.to_string())?;
            println!("{}", token.as_str());
            Ok(())
        }
        Command::Node(args) => {
            let settings =
                resolve(&args.sources().with_process_env(), &Defaults::from_env()).map_err(|e| e.to_string())?;
            let passphrase = p2pchat::passphrase::for_start(&settings.data_dir, args.passphrase_fd)?;
            start_logging(&settings, "node")?;
            p2pchat::run::node(&settings, passphrase)
        }
        Command::Relay(args) => {
            let settings =
                resolve(&args.sources().with_process_env(), &Defaults::from_env()).map_err(|e| e.to_string())?;
            let passphrase = p2pchat::passphrase::for_start(&settings.data_dir, args.passphrase_fd)?;
            start_logging(&settings, "relay")?;
            p2pchat::run::relay(&settings, passphrase)
        }
        Command::Demo { data_dir } => {
            let sources = p2pchat::cli::SettingsArgs::default().sources().with_process_env();
            let settings = resolve(&sources, &Defaults::from_env()).map_err(|e| e.to_string())?;
            start_logging(&settings, "demo")?;
            p2pchat::run::demo(data_dir, &settings)
        }
        Command::Config(args) => {
            let sources: Sources = args.sources().with_process_env();
            let settings = resolve(&sources, &Defaults::from_env()).map_err(|e| e.to_string())?;
            println!("{settings:#?}");
            Ok(())
        }
    }
}
