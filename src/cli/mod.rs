//! The command line: its arguments ([`args`]), the admin client that runs a command through
//! the server or on the store ([`client`]), how replies are shown ([`output`]: tables, or JSON
//! with `--json`), and `job watch` ([`watch`]).

mod args;
mod client;
mod output;
mod terminal;
mod watch;

pub use args::*;

use crate::admin::{self, Reply};
use crate::server::{self, ServeOptions};
use crate::worker::WorkerConfig;

/// The exit status of `status` when no server runs on the data directory.
pub const NOT_RUNNING: i32 = 3;

/// Runs the parsed command; the error is the one line to print.
pub fn run(cli: Cli) -> Result<(), String> {
    let mut store = cli.store_config();
    let data_dir = cli.data_dir;
    let command = match cli.command {
        Command::Serve(args) => {
            if let Some(node) = args.node_name.clone() {
                store.node = node;
            }
            let runtime = tokio::runtime::Runtime::new()
                .map_err(|e| format!("cannot start the async runtime: {e}"))?;
            return runtime.block_on(server::run(ServeOptions {
                listen: args.listen,
                data_dir,
                store,
                demo: args.demo,
                worker: (!args.no_worker).then_some(WorkerConfig {
                    threads: usize::from(args.workers),
                    max_bandwidth: args
                        .max_bandwidth
                        .or(args.demo.then_some(crate::demo::DEMO_BANDWIDTH)),
                }),
                min_free: args.min_free.unwrap_or_default(),
                job_retention: args.job_retention,
                tls: args.tls_cert.zip(args.tls_key),
                keystone: args.keystone.validator_config()?,
            }));
        }
        Command::Completions { shell } => {
            return std::io::Write::write_all(
                &mut std::io::stdout(),
                &terminal::completions(shell),
            )
            .map_err(|e| format!("cannot write the completion script: {e}"));
        }
        Command::Man(man) => return terminal::man(&man),
        Command::Job(JobCmd::Watch { job_id, wait }) => {
            let code = watch::run(&data_dir, job_id.as_deref(), wait)?;
            if code != 0 {
                std::process::exit(code);
            }
            return Ok(());
        }
        Command::Status => {
            if admin::connect(&data_dir)?.is_none() {
                if cli.json {
                    println!("{{\"running\": false}}");
                } else {
                    let message = format!("no server is running on {}", data_dir.display());
                    eprintln!("image-replicator: {}", crate::text::escape(&message));
                }
                std::process::exit(NOT_RUNNING);
            }
            Command::Status
        }
        Command::Restore { file } => {
            let summary = crate::backup::restore(&file, &data_dir, &store)?;
            println!("restored {summary} into {}", data_dir.display());
            return Ok(());
        }
        Command::Backup { file } => return backup(&data_dir, &store, &file, cli.json),
        Command::Migrate { to } => {
            let target = crate::store::StoreConfig {
                database_url: Some(to),
                ..store
            };
            let summary = crate::backup::migrate(&data_dir, &target)?;
            println!("{summary}");
            return Ok(());
        }
        other => other,
    };
    let token_list_all = match &command {
        Command::Token(TokenCmd::List { all }) => Some(*all),
        _ => None,
    };
    let (request, verb, input) = args::request_for(command)?;
    let mut input = input.unwrap_or_else(|| Box::new(std::io::empty()));
    let mut reply = client::call(&data_dir, &store, request, &mut input)?;
    if let (Some(all), Reply::Tokens(tokens)) = (token_list_all, &mut reply) {
        output::tokens_shown(tokens, all);
    }
    if let Reply::IssuedToken(issued) = &reply {
        if !cli.json {
            eprintln!(
                "token id {} (token list and token revoke name it by this id)",
                issued.info.id
            );
        }
    }
    if cli.json {
        let mut value = serde_json::to_value(&reply).map_err(|e| e.to_string())?;
        let mut inner = value.get_mut("value").map(serde_json::Value::take);
        output::name_region_kinds(&reply, inner.as_mut());
        if let (Reply::Status(_), Some(serde_json::Value::Object(map))) = (&reply, inner.as_mut()) {
            map.insert("running".into(), true.into());
        }
        let text =
            serde_json::to_string_pretty(&inner.unwrap_or_default()).map_err(|e| e.to_string())?;
        println!("{text}");
    } else {
        print!("{}", output::human(&reply, verb));
    }
    Ok(())
}

/// `backup FILE`: the records from the running server (or the store), written atomically.
fn backup(
    data_dir: &std::path::Path,
    store: &crate::store::StoreConfig,
    file: &std::path::Path,
    json: bool,
) -> Result<(), String> {
    let crate::admin::Reply::Backup(backup) = client::call(
        data_dir,
        store,
        crate::admin::Request::Backup,
        &mut std::io::empty(),
    )?
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
