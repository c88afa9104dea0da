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
    /// Mint, list, revoke and rotate org API keys, and read their usage, in the configured store.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Print the tenant's audit trail (mints, revokes and rotations), oldest first.
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
    /// Print a shell completion script: `keygate completions bash > /etc/bash_completion.d/keygate`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `keygate man > keygate.1; man ./keygate.1`.
    Man,
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
    /// Rotate a key: mint its successor; the old key keeps working for the grace.
    Rotate {
        #[command(flatten)]
        config: ConfigArg,
        /// The key id.
        id: String,
        /// How long the old key keeps working (default keys.rotate_grace; at most 30d).
        #[arg(long, value_name = "DUR")]
        grace: Option<String>,
        /// Print the same object as POST /org/tokens/{id}/rotate.
        #[arg(long)]
        json: bool,
    },
    /// A key's usage per UTC hour.
    Usage {
        #[command(flatten)]
        config: ConfigArg,
        /// The key id.
        id: String,
        /// From the hour that contains this RFC 3339 time.
        #[arg(long, value_name = "RFC3339")]
        since: Option<String>,
        /// Print the same object as GET /org/tokens/{id}/usage.
        #[arg(long)]
        json: bool,
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
        Command::Keys(KeysCommand::Rotate {
            config,
            id,
            grace,
            json,
        }) => cli::keys_rotate(&config_path(config.config), &id, grace, json),
        Command::Keys(KeysCommand::Usage {
            config,
            id,
            since,
            json,
        }) => cli::keys_usage(&config_path(config.config), &id, since, json),
        Command::Audit {
            config,
            since,
            json,
        } => cli::audit(&config_path(config.config), since, json),
        Command::Demo { port } => cli::demo(port),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "keygate", &mut script);
            write_stdout(&script, "the completion script")
        }
        Command::Man => man_page(),
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

/// `keygate(1)`: the top-level page, with every subcommand's usage and flags.
fn man_page() -> Result<(), Failure> {
    let cmd = <Cli as clap::CommandFactory>::command();
    let mut out = Vec::new();
    let page = clap_mangen::Man::new(cmd.clone());
    page.render_title(&mut out)
        .and_then(|_| page.render_name_section(&mut out))
        .and_then(|_| page.render_synopsis_section(&mut out))
        .and_then(|_| page.render_description_section(&mut out))
        .map_err(|e| Failure::Operation(format!("cannot render the man page: {e}")))?;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        render_subcommand(&mut out, sub, "keygate")?;
    }
    out.extend_from_slice(
        b".SH \"EXIT STATUS\"\n0 success; 1 an operation failed (store unreachable, not found); \
          2 a usage or configuration error. Errors print one line starting with \\fBerror:\\fR.\n\
          .SH FILES\nThe configuration: \\fB\\-\\-config\\fR, else \\fB$KEYGATE_CONFIG\\fR, \
          else \\fIconfig/keygate.toml\\fR (the container image sets \
          KEYGATE_CONFIG=/etc/keygate/keygate.toml).\n",
    );
    page.render_version_section(&mut out)
        .map_err(|e| Failure::Operation(format!("cannot render the man page: {e}")))?;
    write_stdout(&out, "the man page")
}

/// Write generated text to stdout. A reader that stopped early (`| head`)
/// is not an error; any other write failure is one `error:` line.
fn write_stdout(bytes: &[u8], what: &str) -> Result<(), Failure> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure::Operation(format!("cannot write {what}: {e}"))),
    }
}

/// One `.SH` section per (nested) subcommand: its usage, about and options.
fn render_subcommand(out: &mut Vec<u8>, sub: &clap::Command, parent: &str) -> Result<(), Failure> {
    use std::io::Write as _;
    let name = format!("{parent} {}", sub.get_name());
    let mut sub = sub.clone().bin_name(&name);
    let usage = sub.render_usage().to_string();
    let usage = usage.trim_start_matches("Usage: ");
    let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
    let mut text = format!(
        ".SH \"{}\"\n{}\n.PP\n\\fB{}\\fR\n",
        name.to_uppercase(),
        roff_escape(&about),
        roff_escape(usage)
    );
    for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
        let id = arg.get_id().as_str();
        if id == "help" || id == "version" {
            continue;
        }
        let values = match arg.get_value_names() {
            Some(v) => v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" "),
            None => id.to_uppercase(),
        };
        let flag = match (arg.get_long(), arg.get_action().takes_values()) {
            (Some(l), true) => format!("--{l} <{values}>"),
            (Some(l), false) => format!("--{l}"),
            (None, _) => format!("<{values}>"),
        };
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        text.push_str(&format!(
            ".TP\n\\fB{}\\fR\n{}\n",
            roff_escape(&flag),
            roff_escape(&help)
        ));
    }
    out.write_all(text.as_bytes())
        .map_err(|e| Failure::Operation(format!("cannot render the man page: {e}")))?;
    for nested in sub.get_subcommands().filter(|s| s.get_name() != "help") {
        render_subcommand(out, nested, &name)?;
    }
    Ok(())
}

/// Text for a roff line: backslashes and leading `.`/`'` neutralised.
fn roff_escape(s: &str) -> String {
    let s = s.replace('\\', "\\e").replace('-', "\\-");
    match s.chars().next() {
        Some('.') | Some('\'') => format!("\\&{s}"),
        _ => s,
    }
}

fn config_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("KEYGATE_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("config/keygate.toml"))
}
