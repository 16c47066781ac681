//! image-replicator: one binary that serves the OpenStack image-replicator API and administers
//! its own data directory. This file only parses the command line and dispatches; the code
//! lives in the library (`src/lib.rs`), which fuzz targets and benchmarks can call too.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use image_replicator::cli;
use image_replicator::text::escape;

/// Allocations above this size get their own mapping, returned to the system when freed.
/// glibc otherwise raises the threshold after the first large free and then keeps every
/// argon2 verification's 19 MiB in whichever thread's arena ran it: hundreds of MiB.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 4 << 20;

fn main() -> ExitCode {
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    init_logging(&cli);
    if !matches!(cli.command, cli::Command::Serve(_)) {
        // A command piped into `head` ends quietly, as Unix tools do, instead of panicking
        // in println!. (The server keeps SIGPIPE ignored: its sockets report EPIPE.)
        // SAFETY: restoring a default signal disposition has no preconditions.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            // The message may quote a name or a remote service's words.
            eprintln!("image-replicator: {}", escape(&message));
            ExitCode::FAILURE
        }
    }
}

/// Help and version print as clap makes them; a usage mistake is one line on stderr, like
/// every other failure, with exit status 2.
fn usage_error(e: clap::Error) -> ExitCode {
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.to_string();
    let message: Vec<&str> = text
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect();
    let message = message.join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    // clap's "did you mean": `tip: a similar subcommand exists: 'list'`.
    let tips: Vec<&str> = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("tip: "))
        .collect();
    let mut hint = tips.join("; ");
    if !hint.is_empty() {
        hint.push_str("; ");
    }
    eprintln!("image-replicator: {} ({hint}see --help)", escape(message));
    ExitCode::from(2)
}

/// `--log-level` as an `EnvFilter`: a bare level is image-replicator's own, and
/// the other crates (sled, hyper, ...) log at warn (or less, if the level is quieter) unless a
/// directive names them: `debug,sled=debug`.
fn log_directives(spec: &str) -> String {
    use tracing_subscriber::filter::LevelFilter;
    let mut directives = Vec::new();
    let mut others = LevelFilter::WARN;
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<LevelFilter>() {
            Ok(level) => {
                others = others.min(level);
                directives.push(format!("image_replicator={level}"));
            }
            Err(_) => directives.push(part.to_string()),
        }
    }
    directives.insert(0, others.to_string());
    directives.join(",")
}

/// Logs go to stderr (journald collects them): `--log-level`, else `RUST_LOG`, else a default
/// (read as `--log-level` is).
fn init_logging(cli: &cli::Cli) {
    use tracing_subscriber::EnvFilter;
    let default_level = if matches!(cli.command, cli::Command::Serve(_)) {
        "info"
    } else {
        "warn"
    };
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    // --log-level is read as log_directives says; RUST_LOG as everyone reads it (trace: every
    // crate at trace).
    let given = match (&cli.log_level, &from_env) {
        (Some(level), _) => Some(("--log-level", level, log_directives(level))),
        (None, Some(level)) => Some(("RUST_LOG", level, level.clone())),
        (None, None) => None,
    };
    let filter = match given {
        Some((source, level, directives)) => EnvFilter::try_new(directives).unwrap_or_else(|e| {
            let why = escape(&format!(
                "{source} '{level}' is not a level or filter ({e})"
            ))
            .into_owned();
            eprintln!("image-replicator: {why}; using {default_level}");
            EnvFilter::new(log_directives(default_level))
        }),
        None => EnvFilter::new(log_directives(default_level)),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        cli::LogFormat::Json => builder.json().init(),
        cli::LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}
