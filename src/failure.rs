//! How a command ends when it does not succeed: the exit code and the one
//! `error:` line (contract §1). Shared by the CLI commands and the demo.

#[derive(Debug)]
pub enum Failure {
    /// Every configuration problem, each naming its key (exit 2).
    Config(Vec<String>),
    /// Bad command-line value (exit 2).
    Usage(String),
    /// The operation failed (exit 1).
    Operation(String),
}
