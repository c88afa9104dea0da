//! The `keygate` binary: parse the command line, load and validate the
//! configuration before binding anything, run the command, map the result to
//! the contract's exit codes (0 ok, 1 operation failed, 2 usage/config error).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use keygate::cli::{self, Failure};

#[derive(Parser)]
#[command(
    name = "keygate",
    version,
    about = "Authenticating reverse-proxy sidecar for organization API keys"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct ConfigArg {
    /// Configuration file [default: $KEYGATE_CONFIG, else config/keygate.toml]
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve(ConfigArg),
    /// Validate the configuration and print it with secrets redacted.
    Check(ConfigArg),
    /// Mint, list and revoke org API keys in the configured store.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Print the tenant's audit trail (mints and revokes), oldest first.
    Audit {
        #[command(flatten)]
        config: ConfigArg,
        /// Only entries from then on: RFC 3339 time, a date (2026-12-03 = midnight UTC)
        /// or a duration back from now (24h, 7d).
        #[arg(long, value_name = "WHEN")]
        since: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Self-contained demo: memory store, echo upstream, proxy on 127.0.0.1.
    Demo {
        /// Port of the demo proxy.
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Mint a key; the token alone is printed on stdout's first line.
    Mint {
        #[command(flatten)]
        config: ConfigArg,
        /// A name for the key.
        #[arg(long)]
        name: Option<String>,
        /// Lifetime in the config's duration syntax (ms s m h d w), e.g. 30d, 12h, 90m.
        #[arg(long, value_name = "DUR")]
        expires_in: Option<String>,
        /// admin (default), editor or reader.
        #[arg(long, value_name = "ROLE")]
        role: Option<String>,
        /// Bind the key to this workspace id (repeatable).
        #[arg(long = "workspace", value_name = "ID")]
        workspaces: Vec<String>,
        /// Per-key rate limit: N/s, N/min or N/h (default keys.default_rate_limit).
        #[arg(long, value_name = "RATE")]
        rate_limit: Option<String>,
        /// Print the same object as POST /org/tokens.
        #[arg(long)]
        json: bool,
    },
    /// List live keys.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the same object as GET /org/tokens.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id.
    Revoke {
        #[command(flatten)]
        config: ConfigArg,
        /// The key id.
        id: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(c) => cli::serve(&config_path(c.config)),
        Command::Check(c) => cli::check(&config_path(c.config)),
        Command::Keys(KeysCommand::Mint {
            config,
            name,
            expires_in,
            role,
            workspaces,
            rate_limit,
            json,
        }) => cli::keys_mint(
            &config_path(config.config),
            cli::MintArgs {
                name,
                expires_in,
                role,
                workspaces,
                rate_limit,
            },
            json,
        ),
        Command::Keys(KeysCommand::List { config, json }) => {
            cli::keys_list(&config_path(config.config), json)
        }
        Command::Keys(KeysCommand::Revoke { config, id }) => {
            cli::keys_revoke(&config_path(config.config), &id)
        }
        Command::Audit {
            config,
            since,
            json,
        } => cli::audit(&config_path(config.config), since, json),
        Command::Demo { port } => cli::demo(port),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(lines)) => {
            for line in lines {
                eprintln!("error: {line}");
            }
            ExitCode::from(2)
        }
        Err(Failure::Usage(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Operation(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
    }
}

fn config_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("KEYGATE_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("config/keygate.toml"))
}
