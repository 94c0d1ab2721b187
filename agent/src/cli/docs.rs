//! Shell completions (`completions bash|zsh|fish`) and man pages (the
//! hidden `man OUTDIR`, run by the Nix package build).

use std::io::Write;
use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use super::args::{BIN, Cli, CompletionShell};
use super::error::CliError;
use super::target::io_reason;

pub fn completions(shell: CompletionShell, out: &mut impl Write) -> Result<(), CliError> {
    let shell = match shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    let mut buffer = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), BIN, &mut buffer);
    out.write_all(&buffer)
        .and_then(|()| out.flush())
        .map_err(|e| CliError::failed(format!("cannot write: {}", io_reason(&e))))
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
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .title(name.to_uppercase())
        .render(&mut page)
        .map_err(|e| CliError::failed(format!("cannot render the man page {name}: {e}")))?;
    std::fs::write(&path, page)
        .map_err(|e| CliError::failed(format!("cannot write {}: {}", path.display(), io_reason(&e))))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        write_page(sub, outdir, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_for_every_shell() {
        for (shell, marker) in [
            (CompletionShell::Bash, "complete -F"),
            (CompletionShell::Zsh, "#compdef blixard-agent"),
            (CompletionShell::Fish, "complete -c blixard-agent"),
        ] {
            let mut out = Vec::new();
            completions(shell, &mut out).unwrap();
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains(marker), "{shell:?}");
            assert!(text.contains("migrate"), "{shell:?} completes subcommands");
        }
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
        assert!(page.contains("blixard\\-agent vm create web"), "examples are in the page");
    }
}
