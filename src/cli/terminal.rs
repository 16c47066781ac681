//! What the command line says about itself: shell completion scripts and man pages.

use clap::CommandFactory;

use super::{Cli, ManArgs};

const BIN: &str = "image-replicator";
/// Every page's version, subcommands' too (clap gives only the top command one).
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The name the bash script is made for: clap_complete's bash script spells a hyphenated
/// name one way in its dispatch loop and another in its case arms (clap-rs/clap#6421), so
/// nothing after the first word completes. Without the hyphen both agree.
const BASH_NAME: &str = "image_replicator";

/// The completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut command = Cli::command();
    let mut script = Vec::new();
    if shell != clap_complete::Shell::Bash {
        clap_complete::generate(shell, &mut command, BIN, &mut script);
        return script;
    }
    clap_complete::generate(shell, &mut command, BASH_NAME, &mut script);
    // The script completes whatever word 1 is ("$1"); only `complete` names the program.
    let text = String::from_utf8_lossy(&script);
    let suffix = format!(" {BASH_NAME}");
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        match line.strip_suffix(&suffix) {
            Some(head) if line.trim_start().starts_with("complete ") => {
                out.push_str(head);
                out.push(' ');
                out.push_str(BIN);
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out.into_bytes()
}

/// `man [SUBCOMMAND…]` prints one page; `man --out DIR` writes every page there.
pub fn man(args: &ManArgs) -> Result<(), String> {
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        return write_pages(command, dir)
            .map_err(|e| format!("cannot write the man pages into {}: {e}", dir.display()));
    }
    let mut page = command;
    for (depth, word) in args.command.iter().enumerate() {
        let Some(sub) = page.find_subcommand(word).cloned() else {
            let path = args.command[..=depth].join(" ");
            return Err(format!(
                "there is no command '{path}'; `image-replicator --help` lists them"
            ));
        };
        page = sub;
    }
    let mut text = Vec::new();
    clap_mangen::Man::new(page.version(VERSION))
        .render(&mut text)
        .map_err(|e| format!("cannot write the man page: {e}"))?;
    std::io::Write::write_all(&mut std::io::stdout(), &text)
        .map_err(|e| format!("cannot write the man page: {e}"))
}

/// Writes the page of `command` and of each of its subcommands into `dir`
/// (image-replicator.1, image-replicator-job-list.1, ...).
fn write_pages(command: clap::Command, dir: &std::path::Path) -> std::io::Result<()> {
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub.clone(), dir)?;
    }
    clap_mangen::Man::new(command.version(VERSION))
        .generate_to(dir)
        .map(drop)
}
