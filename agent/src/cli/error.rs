//! How the CLI fails: one sentence on stderr and an exit code.
//!
//! Exit codes (design.md, "User-facing contract"): 0 success; 1 the
//! operation failed (unreachable, timed out, no quorum); 2 bad usage, or a
//! request the cluster rejects as invalid. clap's own errors are re-worded
//! here into one line that names the command and points at its `--help`,
//! instead of clap's multi-line usage dump.

use std::ffi::OsString;
use std::fmt;
use std::process::ExitCode;

use clap::error::{ContextKind, ContextValue, ErrorKind};

use super::args::BIN;

/// Why a command did not succeed, and so which exit code it ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Exit 1: the operation failed; trying again later may work.
    Failed,
    /// Exit 2: bad usage, or the cluster rejected the request as invalid.
    Usage,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    pub failure: Failure,
    /// One sentence, without the `error: ` prefix.
    pub message: String,
}

impl CliError {
    pub fn usage(message: impl Into<String>) -> Self {
        CliError { failure: Failure::Usage, message: message.into() }
    }

    pub fn failed(message: impl Into<String>) -> Self {
        CliError { failure: Failure::Failed, message: message.into() }
    }

    pub fn exit_code(&self) -> u8 {
        match self.failure {
            Failure::Failed => 1,
            Failure::Usage => 2,
        }
    }

    /// Prints `error: MESSAGE` to stderr and gives the exit code.
    pub fn report(&self) -> ExitCode {
        eprintln!("{self}");
        ExitCode::from(self.exit_code())
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error: {}", one_line(&self.message))
    }
}

impl std::error::Error for CliError {}

/// Makes `text` one line of printable characters (server messages and
/// user input can hold anything).
pub fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut space = false;
    for c in text.trim().chars() {
        if c.is_whitespace() || c.is_control() {
            if !space {
                out.push(' ');
            }
            space = true;
        } else {
            out.push(c);
            space = false;
        }
    }
    out
}

/// What parsing the command line ended with, when it is not a command to run.
#[derive(Debug)]
pub enum ParseExit {
    /// `--help` or `--version`: clap prints it, exit 0.
    Print(clap::Error),
    Error(CliError),
}

impl ParseExit {
    pub fn report(self) -> ExitCode {
        match self {
            ParseExit::Print(e) => match e.print() {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::from(1),
            },
            ParseExit::Error(e) => e.report(),
        }
    }
}

/// Turns clap's error into ours. `args` are the raw arguments, used to find
/// which (sub)command the error belongs to.
pub fn from_clap(error: clap::Error, root: &clap::Command, args: &[OsString]) -> ParseExit {
    if matches!(error.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        // Not an error: clap prints it to stdout, exit 0.
        return ParseExit::Print(error);
    }
    let error = &error;
    let path = command_path(root, args);
    let cmd = find(root, &path);
    let name = if path.is_empty() { BIN.to_string() } else { format!("`{}`", path.join(" ")) };
    let help = if path.is_empty() { format!("`{BIN} --help`") } else { format!("`{BIN} {} --help`", path.join(" ")) };
    let see = format!("see {help}");
    let arg = string_context(error, ContextKind::InvalidArg);
    let value = string_context(error, ContextKind::InvalidValue);
    let suggestion = suggestion(error);
    let message = match error.kind() {
        ErrorKind::UnknownArgument => {
            let arg = arg.unwrap_or_default();
            if arg.starts_with('-') {
                format!("unknown flag {arg} for {name}{suggestion}; {see}")
            } else {
                format!("unexpected argument {:?} for {name}{suggestion}; {see}", arg)
            }
        }
        ErrorKind::InvalidSubcommand => {
            let sub = string_context(error, ContextKind::InvalidSubcommand).unwrap_or_default();
            format!("unknown subcommand {sub:?} for {name}{suggestion}; {see}")
        }
        ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let subs: Vec<&str> = cmd
                .map(|c| c.get_subcommands().filter(|s| !s.is_hide_set()).map(|s| s.get_name()).collect())
                .unwrap_or_default();
            format!("{name} needs a subcommand ({}); {see}", subs.join(", "))
        }
        ErrorKind::MissingRequiredArgument => {
            let missing = strings_context(error, ContextKind::InvalidArg);
            format!("{name} needs {}; {see}", join_and(&missing))
        }
        ErrorKind::InvalidValue => {
            let valid = strings_context(error, ContextKind::ValidValue);
            let value = value.unwrap_or_default();
            let arg = arg.map(|a| clean_arg(&a)).unwrap_or_default();
            if value.is_empty() {
                format!("{arg} needs a value; {see}")
            } else {
                format!("{value:?} is not a valid {arg}: use {}", join_or(&valid))
            }
        }
        ErrorKind::ValueValidation => {
            let arg = arg.map(|a| clean_arg(&a)).unwrap_or_default();
            let reason = std::error::Error::source(error).map(|s| s.to_string()).unwrap_or_default();
            format!("invalid {arg} for {name}: {reason}")
        }
        ErrorKind::ArgumentConflict => {
            let arg = arg.map(|a| clean_arg(&a)).unwrap_or_default();
            let other = strings_context(error, ContextKind::PriorArg);
            if other.is_empty() || other == [arg.clone()] {
                format!("{arg} is given more than once for {name}; {see}")
            } else {
                format!("{arg} cannot be used with {} in {name}; {see}", join_or(&other))
            }
        }
        ErrorKind::TooManyValues | ErrorKind::WrongNumberOfValues => {
            format!("{} is given too many values for {name}; {see}", arg.map(|a| clean_arg(&a)).unwrap_or_default())
        }
        ErrorKind::InvalidUtf8 => format!("an argument to {name} is not valid UTF-8"),
        ErrorKind::NoEquals => format!("{} needs `=VALUE`; {see}", arg.unwrap_or_default()),
        _ => {
            // Anything else: clap's first line, without its own prefix.
            let text = error.render().to_string();
            let first = text.lines().next().unwrap_or("invalid command line");
            format!("{}; {see}", first.trim_start_matches("error: "))
        }
    };
    ParseExit::Error(CliError::usage(message))
}

/// The subcommand names in `args`, e.g. `["vm", "create"]`, skipping flags
/// and their values.
fn command_path(root: &clap::Command, args: &[OsString]) -> Vec<String> {
    let mut path = Vec::new();
    let mut cmd = root;
    let mut skip_value = false;
    for arg in args.iter().skip(1) {
        let Some(arg) = arg.to_str() else { continue };
        if skip_value {
            skip_value = false;
            continue;
        }
        if arg == "--" {
            break;
        }
        if let Some(long) = arg.strip_prefix("--") {
            if !long.contains('=') {
                skip_value = cmd
                    .get_arguments()
                    .find(|a| a.get_long() == Some(long))
                    .is_some_and(|a| a.get_action().takes_values());
            }
            continue;
        }
        if arg.starts_with('-') {
            continue;
        }
        match cmd.find_subcommand(arg) {
            Some(sub) => {
                path.push(sub.get_name().to_string());
                cmd = sub;
            }
            None => {
                // A positional argument; subcommands cannot follow one.
                if cmd.has_subcommands() {
                    break;
                }
            }
        }
    }
    path
}

fn find<'a>(root: &'a clap::Command, path: &[String]) -> Option<&'a clap::Command> {
    let mut cmd = root;
    for name in path {
        cmd = cmd.find_subcommand(name)?;
    }
    Some(cmd)
}

fn string_context(error: &clap::Error, kind: ContextKind) -> Option<String> {
    match error.get(kind)? {
        ContextValue::String(s) => Some(s.clone()),
        ContextValue::Strings(v) => v.first().cloned(),
        ContextValue::StyledStr(s) => Some(s.to_string()),
        _ => None,
    }
}

fn strings_context(error: &clap::Error, kind: ContextKind) -> Vec<String> {
    match error.get(kind) {
        Some(ContextValue::String(s)) => vec![clean_arg(s)],
        Some(ContextValue::Strings(v)) => v.iter().map(|s| clean_arg(s)).collect(),
        _ => Vec::new(),
    }
}

fn suggestion(error: &clap::Error) -> String {
    let suggested = string_context(error, ContextKind::SuggestedArg)
        .or_else(|| string_context(error, ContextKind::SuggestedSubcommand));
    match suggested {
        Some(s) => format!(" (did you mean {}?)", s.trim()),
        None => String::new(),
    }
}

/// `<NAME>` -> `NAME`; `[NODE]` -> `NODE`; `--vcpu <N>` -> `--vcpu N`.
fn clean_arg(arg: &str) -> String {
    arg.replace(['<', '>', '[', ']'], "").replace("...", "")
}

fn join_and(items: &[String]) -> String {
    join_with(items, "and")
}

fn join_or(items: &[String]) -> String {
    join_with(items, "or")
}

fn join_with(items: &[String], word: &str) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} {word} {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_flattens_control_characters() {
        assert_eq!(one_line("  a\nb\r\n\tc\u{7}d "), "a b c d");
    }

    #[test]
    fn joins() {
        let items = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(join_and(&items(&["a"])), "a");
        assert_eq!(join_and(&items(&["a", "b"])), "a and b");
        assert_eq!(join_or(&items(&["a", "b", "c"])), "a, b or c");
    }
}
