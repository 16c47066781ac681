//! The command line: its arguments ([`args`]), the admin client that runs a command through
//! the server or on the store ([`client`]), how replies are shown ([`output`]: tables, or JSON
//! with `--json`), and `job watch` ([`watch`]).

mod args;
mod client;
mod output;
mod watch;

pub use args::*;

use crate::server::{self, ServeOptions};
use crate::worker::WorkerConfig;

/// Runs the parsed command; the error is the one line to print.
pub fn run(cli: Cli) -> Result<(), String> {
    let data_dir = cli.data_dir;
    let command = match cli.command {
        Command::Serve(args) => {
            let runtime = tokio::runtime::Runtime::new()
                .map_err(|e| format!("cannot start the async runtime: {e}"))?;
            return runtime.block_on(server::run(ServeOptions {
                listen: args.listen,
                data_dir,
                demo: args.demo,
                worker: (!args.no_worker).then_some(WorkerConfig {
                    threads: usize::from(args.workers),
                    max_bandwidth: args.max_bandwidth,
                }),
                min_free: args.min_free.unwrap_or_default(),
                job_retention: args.job_retention,
                tls: args.tls_cert.zip(args.tls_key),
                keystone: args.keystone.validator_config()?,
            }));
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "image-replicator", &mut script);
            return std::io::Write::write_all(&mut std::io::stdout(), &script)
                .map_err(|e| format!("cannot write the completion script: {e}"));
        }
        Command::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            return clap_mangen::Man::new(command)
                .render(&mut std::io::stdout())
                .map_err(|e| format!("cannot write the man page: {e}"));
        }
        Command::Job(JobCmd::Watch { job_id }) => return watch::run(&data_dir, job_id.as_deref()),
        Command::Restore { file } => {
            let summary = crate::backup::restore(&file, &data_dir)?;
            println!("restored {summary} into {}", data_dir.display());
            return Ok(());
        }
        Command::Backup { file } => return backup(&data_dir, &file, cli.json),
        other => other,
    };
    let (request, verb) = args::request_for(command)?;
    let reply = client::call(&data_dir, request)?;
    if cli.json {
        let mut value = serde_json::to_value(&reply).map_err(|e| e.to_string())?;
        let mut inner = value.get_mut("value").map(serde_json::Value::take);
        output::name_region_kinds(&reply, inner.as_mut());
        let text =
            serde_json::to_string_pretty(&inner.unwrap_or_default()).map_err(|e| e.to_string())?;
        println!("{text}");
    } else {
        print!("{}", output::human(&reply, verb));
    }
    Ok(())
}

/// `backup FILE`: the records from the running server (or the store), written atomically.
fn backup(data_dir: &std::path::Path, file: &std::path::Path, json: bool) -> Result<(), String> {
    let crate::admin::Reply::Backup(backup) =
        client::call(data_dir, crate::admin::Request::Backup)?
    else {
        return Err("the server answered the backup request with something else".into());
    };
    crate::backup::write(&backup, file)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"file": file, "records": backup.summary()})
        );
    } else {
        println!(
            "backup of {} written to {}",
            backup.summary(),
            file.display()
        );
    }
    Ok(())
}
