//! Shell completions (`completions bash|zsh|fish`) and man pages (the
//! hidden `man OUTDIR`, run by the Nix package build).

use std::io::Write;
use std::path::Path;

use clap::CommandFactory;

use super::args::{BIN, Cli, CompletionShell};
use super::error::CliError;
use super::target::io_reason;

/// The environment variable through which the shell asks the binary for
/// completions (see `cli::complete`).
pub const COMPLETE_ENV: &str = "COMPLETE";

/// Prints the script that registers completion for `shell`: it asks this
/// binary (found on `PATH` as `blixard-agent`) on every TAB.
pub fn completions(shell: CompletionShell, out: &mut impl Write) -> Result<(), CliError> {
    use clap_complete::env::{Bash, EnvCompleter, Fish, Zsh};
    let shell: &dyn EnvCompleter = match shell {
        CompletionShell::Bash => &Bash,
        CompletionShell::Zsh => &Zsh,
        CompletionShell::Fish => &Fish,
    };
    let mut buffer = Vec::new();
    shell
        .write_registration(COMPLETE_ENV, BIN, BIN, BIN, &mut buffer)
        .map_err(|e| CliError::failed(format!("cannot write: {}", io_reason(&e))))?;
    match out.write_all(&buffer).and_then(|()| out.flush()) {
        // A reader that went away wants no more.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result.map_err(|e| CliError::failed(format!("cannot write: {}", io_reason(&e)))),
    }
}

/// Answers the shell when it asks for completions (`COMPLETE` is set);
/// returns `false`, doing nothing, otherwise.
pub fn answer_completion_request() -> bool {
    if std::env::var_os(COMPLETE_ENV).is_none_or(|v| v.is_empty() || v == "0") {
        return false;
    }
    clap_complete::CompleteEnv::with_factory(Cli::command).var(COMPLETE_ENV).bin(BIN).completer(BIN).complete();
    true
}

/// Writes `blixard-agent.1`, `blixard-agent-vm.1`, `blixard-agent-vm-create.1`,
/// ... for every visible command; returns the files written.
pub fn man_pages(outdir: &Path) -> Result<(), CliError> {
    write_man_pages(outdir).map(|_| ())
}

pub fn write_man_pages(outdir: &Path) -> Result<Vec<std::path::PathBuf>, CliError> {
    std::fs::create_dir_all(outdir)
        .map_err(|e| CliError::failed(format!("cannot create {}: {}", outdir.display(), io_reason(&e))))?;
    let mut root = Cli::command();
    // Sets each subcommand's display name (`blixard-agent-vm-create`) and
    // usage line (`blixard-agent vm create`).
    root.build();
    let mut written = Vec::new();
    write_page(&root, outdir, &mut written)?;
    Ok(written)
}

fn write_page(cmd: &clap::Command, outdir: &Path, written: &mut Vec<std::path::PathBuf>) -> Result<(), CliError> {
    let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name()).to_string();
    let path = outdir.join(format!("{name}.1"));
    let page =
        render_page(cmd, &name).map_err(|e| CliError::failed(format!("cannot render the man page {name}: {e}")))?;
    std::fs::write(&path, page)
        .map_err(|e| CliError::failed(format!("cannot write {}: {}", path.display(), io_reason(&e))))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        write_page(sub, outdir, written)?;
    }
    Ok(())
}

/// One page: clap_mangen's sections, with the `--help` examples as an
/// EXAMPLES section (clap_mangen would put them under EXTRA) and the
/// subcommands listed only when they have a page of their own (not the
/// generated `help`).
fn render_page(cmd: &clap::Command, name: &str) -> std::io::Result<Vec<u8>> {
    let examples = cmd.get_after_help().map(|h| h.to_string());
    let mut cmd = cmd.clone().after_help(None::<&str>).after_long_help(None::<&str>);
    if cmd.has_subcommands() {
        cmd = cmd.mut_subcommand("help", |help| help.hide(true));
    }
    let man = clap_mangen::Man::new(cmd.clone()).title(name.to_uppercase());
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut page)?;
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(&mut page)?;
    }
    if let Some(examples) = examples {
        page.extend_from_slice(examples_section(&examples).as_bytes());
    }
    if cmd.get_version().is_some() {
        man.render_version_section(&mut page)?;
    }
    Ok(page)
}

/// The `Examples:` text of a `--help` as a roff EXAMPLES section: the
/// commands kept as they are written (no filling), the notes after them
/// as paragraphs.
fn examples_section(text: &str) -> String {
    let mut out = String::from(".SH EXAMPLES\n");
    let mut preformatted = false;
    for line in text.lines().filter(|l| *l != "Examples:") {
        let example = line.starts_with("  ");
        if example && !preformatted {
            out.push_str(".nf\n");
            preformatted = true;
        } else if !example && preformatted {
            out.push_str(".fi\n");
            preformatted = false;
        }
        if line.is_empty() {
            out.push_str(".PP\n");
            continue;
        }
        out.push_str(&roff_escape(line.strip_prefix("  ").unwrap_or(line)));
        out.push('\n');
    }
    if preformatted {
        out.push_str(".fi\n");
    }
    out
}

/// Roff text for one line: backslashes and hyphens escaped, and a leading
/// `.` or `'` (which roff would read as a request) neutralised.
fn roff_escape(line: &str) -> String {
    let mut out = String::with_capacity(line.len() + 8);
    if line.starts_with('.') || line.starts_with('\'') {
        out.push_str("\\&");
    }
    for c in line.chars() {
        match c {
            '\\' => out.push_str("\\e"),
            '-' => out.push_str("\\-"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_for_every_shell() {
        for (shell, marker) in [
            (
                CompletionShell::Bash,
                "complete -o nospace -o bashdefault -o nosort -F _clap_complete_blixard_agent blixard-agent",
            ),
            (CompletionShell::Zsh, "#compdef blixard-agent"),
            (CompletionShell::Fish, "complete --keep-order --exclusive --command blixard-agent"),
        ] {
            let mut out = Vec::new();
            completions(shell, &mut out).unwrap();
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains(marker), "{shell:?}: {text}");
            assert!(text.contains("COMPLETE"), "{shell:?} asks the binary");
        }
    }

    #[test]
    fn the_engine_completes_below_the_top_level() {
        let complete = |words: &[&str]| -> Vec<String> {
            let mut cmd = Cli::command();
            cmd.build();
            let args: Vec<std::ffi::OsString> = words.iter().map(Into::into).collect();
            let index = args.len() - 1;
            clap_complete::engine::complete(&mut cmd, args, index, None)
                .unwrap()
                .into_iter()
                .map(|c| c.get_value().to_string_lossy().into_owned())
                .collect()
        };
        let vm = complete(&["blixard-agent", "vm", ""]);
        for sub in ["create", "update", "migrate", "list"] {
            assert!(vm.iter().any(|c| c == sub), "{sub} in {vm:?}");
        }
        let flags = complete(&["blixard-agent", "vm", "update", "web", "--"]);
        assert!(flags.iter().any(|c| c == "--restart"), "{flags:?}");
        let states = complete(&["blixard-agent", "vm", "list", "--state", ""]);
        assert!(states.iter().any(|c| c == "running"), "{states:?}");
    }

    #[test]
    fn man_pages_for_every_visible_command() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_man_pages(dir.path()).unwrap();
        let names: Vec<String> =
            written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        for expected in [
            "blixard-agent.1",
            "blixard-agent-run.1",
            "blixard-agent-cluster.1",
            "blixard-agent-cluster-join.1",
            "blixard-agent-node-drain.1",
            "blixard-agent-vm-create.1",
            "blixard-agent-vm-status.1",
            "blixard-agent-completions.1",
        ] {
            assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("-man") || n.contains("-help")), "{names:?}");
        let page = std::fs::read_to_string(dir.path().join("blixard-agent-vm-create.1")).unwrap();
        assert!(page.contains("\\-\\-vcpu"), "{page}");
        assert!(page.contains(".SH EXAMPLES\n.nf\nblixard\\-agent vm create web"), "examples under EXAMPLES: {page}");
        assert!(!page.contains("EXTRA"), "{page}");
        // Every page a page names exists.
        for file in &written {
            let text = std::fs::read_to_string(file).unwrap();
            for word in text.split(|c: char| c.is_whitespace()) {
                if let Some(linked) = word.strip_suffix("(1)") {
                    let linked = linked.replace("\\-", "-");
                    assert!(
                        names.contains(&format!("{linked}.1")),
                        "{} links {linked}(1), not generated",
                        file.display()
                    );
                }
            }
        }
    }
}
