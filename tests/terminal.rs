//! The command line as a person meets it at a terminal (issue 17): completion in a real bash,
//! man pages, help, "did you mean", log levels, `--listen`, `status --json`, tokens' ids and
//! order.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::cli::*;
use common::*;
use serde_json::Value;

/// Runs the binary without a data directory argument.
fn bin(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run the binary")
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

// ----- completion -----

/// What bash completes for `words` (the last one being completed), with the script the
/// binary prints loaded the way `/etc/bash_completion.d` loads it.
fn bash_complete(script: &std::path::Path, words: &[&str]) -> Vec<String> {
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let cword = words.len() - 1;
    let program = format!(
        "source '{}'
func=$(complete -p image-replicator | sed -E 's/.* -F ([^ ]+) .*/\\1/')
COMP_WORDS=({})
COMP_CWORD={cword}
COMP_LINE=\"${{COMP_WORDS[*]}}\"
COMP_POINT=${{#COMP_LINE}}
\"$func\" image-replicator \"${{COMP_WORDS[$COMP_CWORD]}}\" \"${{COMP_WORDS[$((COMP_CWORD-1))]}}\"
printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        quoted.join(" ")
    );
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &program])
        .output()
        .expect("run bash");
    assert!(out.status.success(), "bash failed: {}", stderr(&out));
    stdout(&out)
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

#[test]
fn bash_completion_goes_past_the_first_word() {
    let lab = Lab::new();
    let out = bin(&["completions", "bash"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let script = lab.dir.path().join("image-replicator.bash");
    std::fs::write(&script, &out.stdout).unwrap();

    assert!(bash_complete(&script, &["image-replicator", "jo"]).contains(&"job".to_string()));
    assert_eq!(
        bash_complete(&script, &["image-replicator", "job", "li"]),
        ["list"]
    );
    let options = bash_complete(&script, &["image-replicator", "job", "list", "--"]);
    for option in ["--status", "--tenant", "--data-dir", "--json"] {
        assert!(options.contains(&option.to_string()), "{options:?}");
    }
    let statuses = bash_complete(
        &script,
        &["image-replicator", "job", "list", "--status", "rep"],
    );
    assert_eq!(
        statuses,
        ["replicate_requested", "replicating", "replicated"]
    );
    let issue = bash_complete(&script, &["image-replicator", "token", "issue", "--u"]);
    assert_eq!(issue, ["--user"]);
    // The singular is an alias, as people type it.
    assert!(bin(&["completion", "bash"]).status.success());
}

// ----- man -----

#[test]
fn man_prints_a_subcommands_page_and_writes_every_page() {
    let lab = Lab::new();
    let top = bin(&["man"]);
    assert!(top.status.success());
    assert!(
        stdout(&top).contains(".TH image-replicator 1"),
        "{}",
        stdout(&top)
    );

    let page = stdout(&bin(&["man", "job", "list"]));
    assert!(page.contains(".TH image-replicator-job-list 1"), "{page}");
    assert!(page.contains("\\-\\-status"), "{page}");
    assert!(page.contains("replicate_requested"), "{page}");

    let out = bin(&["man", "job", "lst"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "image-replicator: there is no command 'job lst'; `image-replicator --help` lists them\n"
    );

    let dir = lab.dir.path().join("man1");
    let out = bin(&["man", "--out", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let names = names_in(&dir);
    for name in [
        "image-replicator.1",
        "image-replicator-serve.1",
        "image-replicator-job.1",
        "image-replicator-job-list.1",
        "image-replicator-job-watch.1",
        "image-replicator-token-issue.1",
        "image-replicator-man.1",
    ] {
        assert!(names.contains(name), "{name} missing from {names:?}");
    }
    assert!(!names.iter().any(|n| n.contains("help")), "{names:?}");
    let written = std::fs::read_to_string(dir.join("image-replicator-job-list.1")).unwrap();
    assert_eq!(written, page, "the written page is the printed one");
}

// ----- help -----

/// The section of a help text that starts with `heading` (up to the next blank line).
fn section<'a>(help: &'a str, heading: &str) -> Vec<&'a str> {
    help.lines()
        .skip_while(|l| *l != heading)
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .collect()
}

#[test]
fn help_keeps_global_options_apart_and_describes_every_argument() {
    let help = stdout(&bin(&["job", "list", "--help"]));
    let own = section(&help, "Options:").join("\n");
    let global = section(&help, "Global options:").join("\n");
    assert!(
        own.contains("--status") && own.contains("--tenant"),
        "{help}"
    );
    for option in ["--data-dir", "--json", "--log-level", "--log-format"] {
        assert!(
            !own.contains(option),
            "{option} among job list's own:\n{help}"
        );
        assert!(global.contains(option), "{option} not global:\n{help}");
    }
    assert!(
        own.contains(
            "[possible values: replicate_requested, replicating, replicated, cancel_requested, canceling, canceled, error]"
        ),
        "{help}"
    );

    // Every argument of every command says what it is, in the binary's own help.
    fn walk(command: &clap::Command, path: &mut Vec<String>) {
        for arg in command.get_arguments() {
            if arg.is_hide_set() || ["help", "version"].contains(&arg.get_id().as_str()) {
                continue;
            }
            let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
            args.push("-h");
            let help = stdout(&bin(&args));
            let name = match arg.get_long() {
                Some(long) => format!("--{long} "),
                None => arg.get_value_names().unwrap()[0].to_string(),
            };
            let starts = |l: &str| {
                let l = l.trim_start();
                match arg.get_long() {
                    Some(_) => l.starts_with(name.trim_end()),
                    None => {
                        l.starts_with(&format!("<{name}>")) || l.starts_with(&format!("[{name}]"))
                    }
                }
            };
            let lines: Vec<&str> = help.lines().collect();
            let at = lines
                .iter()
                .position(|l| starts(l))
                .unwrap_or_else(|| panic!("{args:?}: no line for {name}:\n{help}"));
            // `  --name <VALUE>  Description`, or the description on the lines below (clap
            // does that when descriptions are long).
            let same_line = lines[at].trim().split_once("  ").map(|(_, d)| d.trim());
            let below = lines.get(at + 1).map(|l| l.trim()).filter(|l| {
                !l.is_empty() && !l.starts_with('-') && !l.starts_with('<') && !l.ends_with(':')
            });
            assert!(
                same_line.is_some_and(|d| !d.is_empty()) || below.is_some(),
                "{args:?}: {name} has no description:\n{help}"
            );
        }
        for sub in command.get_subcommands() {
            if sub.get_name() == "help" {
                continue;
            }
            path.push(sub.get_name().to_string());
            walk(sub, path);
            path.pop();
        }
    }
    let command = <image_replicator::cli::Cli as clap::CommandFactory>::command();
    walk(&command, &mut Vec::new());
}

#[test]
fn usage_mistakes_suggest_the_near_name() {
    let out = bin(&["job", "lst"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        "image-replicator: unrecognized subcommand 'lst' (a similar subcommand exists: 'list'; see --help)\n"
    );
    let out = bin(&["--data-dri", "x", "status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("a similar argument exists: '--data-dir'"),
        "{}",
        stderr(&out)
    );
}

// ----- logs -----

#[test]
fn log_level_debug_keeps_dependencies_at_warn_unless_named() {
    let lab = Lab::new();
    lab.standard();
    let level_of_sled = |level: &str| {
        let mut server = lab.serve_with(&["--no-worker", "--log-level", level]);
        assert!(server.stop());
        let log = server.log_text();
        std::fs::remove_file(&server.log).unwrap();
        let ours = log.lines().any(|l| l.contains(" image_replicator"));
        assert!(ours, "{level}: no line of our own:\n{log}");
        log.lines().filter(|l| l.contains(" sled::")).count()
    };
    assert_eq!(level_of_sled("debug"), 0, "sled logs at debug by default");
    assert!(
        level_of_sled("debug,sled=debug") > 0,
        "sled=debug shows sled"
    );
}

// ----- --listen -----

#[test]
fn listen_takes_host_names() {
    let lab = Lab::new();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--no-worker",
            "--listen",
            "localhost:0",
            "--data-dir",
        ])
        .arg(lab.data_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("a line").unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let addr = first
        .strip_prefix("image-replicator listening on http://127.0.0.1:")
        .unwrap_or_else(|| panic!("{first}"));
    assert!(addr.parse::<u16>().is_ok_and(|p| p > 0), "{first}");
}

#[test]
fn bad_listen_is_a_usage_mistake_that_creates_nothing() {
    let lab = Lab::new();
    let data = lab.data_dir();
    for listen in [
        "bogus",
        "127.0.0.1",
        "localhost:99999",
        "no-such-host.invalid:80",
    ] {
        let out = Command::new(BIN)
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(&data)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{listen}: {}", stderr(&out));
        let message = stderr(&out);
        assert!(
            message.starts_with("image-replicator: ")
                && message.contains(listen)
                && message.ends_with("(see --help)\n"),
            "{message}"
        );
        assert!(!data.exists(), "{listen}: the data directory was created");
    }
    // The environment variable goes through the same check.
    let out = Command::new(BIN)
        .args(["serve", "--data-dir"])
        .arg(&data)
        .env("IMAGE_REPLICATOR_LISTEN", "bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(!data.exists());
}

// ----- status, tokens -----

#[test]
fn status_without_a_server_exits_3_and_says_so_in_json() {
    let lab = Lab::new();
    lab.standard();
    let out = lab.cli(&["--json", "status"]);
    assert_eq!(out.status.code(), Some(3));
    let value: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(value, serde_json::json!({"running": false}));
    let out = lab.cli(&["status"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(out.stdout.is_empty());
    assert_eq!(
        stderr(&out),
        format!(
            "image-replicator: no server is running on {}\n",
            lab.data_dir().display()
        )
    );
    let _server = lab.serve();
    let status = lab.ok_json(&["status"]);
    assert_eq!(status["running"], true, "{status}");
}

#[test]
fn token_issue_names_the_id_and_token_list_shows_usable_tokens_oldest_first() {
    let lab = Lab::new();
    lab.standard();
    let issue = |user: &str, tenant: &str, extra: &[&str]| {
        let out = lab.cli(&issue_args(user, tenant, extra));
        assert!(out.status.success(), "{}", stderr(&out));
        let err = stderr(&out);
        let id = err
            .strip_prefix("token id ")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no token id on stderr: {err:?}"))
            .to_string();
        assert!(!err.contains(stdout(&out).trim()), "stderr shows the token");
        id
    };
    let first = issue("alice", TENANT_A, &[]);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let second = issue("bob", TENANT_B, &[]);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let third = issue("carol", TENANT_C, &["--expires-in", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let fourth = issue("root", TENANT_A, &[]);
    ok(&lab, &["token", "revoke", &second]);
    std::thread::sleep(std::time::Duration::from_millis(1100));

    assert_eq!(
        ids(&ok_json(&lab, &["token", "list"]), "id"),
        [first.clone(), fourth.clone()]
    );
    assert_eq!(
        ids(&ok_json(&lab, &["token", "list", "--all"]), "id"),
        [first.clone(), second.clone(), third, fourth]
    );
    let table = ok(&lab, &["token", "list"]);
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(
        table.contains(&first) && !table.contains(&second),
        "{table}"
    );
    let out = lab.cli(&[
        "--json", "token", "issue", "--user", "alice", "--tenant", TENANT_A,
    ]);
    assert!(
        out.stderr.is_empty(),
        "--json prints the id in the JSON only"
    );
}

// ----- job watch -----

const MIB: usize = 1 << 20;

/// `job watch ARGS` started in the background (stdout a pipe: plain lines).
fn watch(lab: &Lab, args: &[&str]) -> std::process::Child {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(lab.data_dir())
        .args(["job", "watch"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn job watch")
}

/// Waits for a background `job watch`; its exit status and stdout.
fn watched(child: std::process::Child) -> (Option<i32>, String) {
    let out = child.wait_with_output().expect("job watch");
    (out.status.code(), stdout(&out))
}

#[test]
fn job_watch_exits_0_3_or_4_as_the_job_ends_replicated_in_error_or_canceled() {
    let lab = Lab::new();
    let token = lab.copier();
    let small = lab.image(TENANT_A, "small", 64 * 1024);
    let broken = lab.image(TENANT_A, "broken", MIB);
    let slow = lab.image(TENANT_A, "slow", 2 * MIB);
    let path = lab.region_dir("ot1").join(&broken);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4321] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let server = lab.serve_with(&["--max-bandwidth", "256K"]);

    let id = server.copy_ok(&token, &small, TENANT_B);
    let (code, out) = watched(watch(&lab, &[&id]));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.ends_with(&format!("{id} replicated 100%\n")), "{out}");

    let id = server.copy_ok(&token, &broken, TENANT_B);
    let (code, out) = watched(watch(&lab, &[&id]));
    assert_eq!(code, Some(3), "{out}");
    let last = out.lines().last().unwrap();
    assert!(
        last.starts_with(&format!("{id} error ")) && last.contains("changed"),
        "{out}"
    );

    let id = server.copy_ok(&token, &slow, TENANT_B);
    let child = watch(&lab, &[]);
    server.wait_job(&token, &id, std::time::Duration::from_secs(10), |j| {
        j["status"] == "replicating" && j["copy_progress"].as_u64() > Some(0)
    });
    ok(&lab, &["job", "cancel", &id]);
    let (code, out) = watched(child);
    assert_eq!(code, Some(4), "{out}");
    assert!(out.lines().last().unwrap().contains(" canceled "), "{out}");
    assert!(!out.contains("eta 0s"), "{out}");
    for line in out.lines() {
        assert!(
            line.chars().count() <= 80,
            "wider than 80 columns: {line:?}"
        );
    }
}

#[test]
fn job_watch_wait_starts_before_the_job_exists() {
    let lab = Lab::new();
    lab.standard();
    let _server = lab.serve();
    let id = "55555555-5555-4555-8555-555555555555";
    let out = lab.cli(&["job", "watch", id]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), format!("image-replicator: no job {id}\n"));

    let child = watch(&lab, &["--wait", id]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let job = serde_json::json!([{
        "copy_progress": 100, "destination_image_id": null, "destination_region_id": "ot2",
        "destination_tenant_id": TENANT_B, "job_id": id,
        "source_image_id": "9b805919-8acb-4880-8904-cd2f9a32c1ad",
        "source_image_name": "seeded", "source_region_id": "ot1",
        "source_tenant_id": TENANT_A, "status": "replicated"}]);
    lab.seed_jobs(job.as_array().unwrap());
    let (code, out) = watched(child);
    assert_eq!(code, Some(0));
    assert_eq!(out, format!("{id} replicated 100%\n"));
}

/// The rows a terminal `width` columns wide shows of `text`: escape sequences taken out, each
/// `\r` or `\n` ending a row.
fn screen_lines(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() || c == '~' {
                            break;
                        }
                    }
                }
            }
            '\r' | '\n' => lines.push(String::new()),
            c => lines.last_mut().unwrap().push(c),
        }
    }
    // indicatif pads each line with blanks to the terminal's width and lets the terminal
    // wrap to the next row.
    lines
        .into_iter()
        .flat_map(|l| {
            let chars: Vec<char> = l.chars().collect();
            chars
                .chunks(width)
                .map(|row| row.iter().collect::<String>().trim_end().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn job_watch_bars_fit_80_columns_and_show_no_eta_for_queued_or_ended_jobs() {
    let lab = Lab::new();
    let token = lab.copier();
    let first = lab.image(TENANT_A, "first", 4 * MIB);
    let second = lab.image(TENANT_A, "second", MIB);
    let server = lab.serve_with(&["--workers", "1", "--max-bandwidth", "1M"]);
    let a = server.copy_ok(&token, &first, TENANT_B);
    let b = server.copy_ok(&token, &second, TENANT_B);
    // A terminal 200 columns wide, so that nothing is cut for us.
    let watch = format!(
        "stty cols 200 rows 50; '{BIN}' --data-dir '{}' job watch",
        lab.data_dir().display()
    );
    let out = Command::new("script")
        .args(["-qec", &watch, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script (util-linux)");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines = screen_lines(&text, 200);
    assert!(lines.iter().any(|l| l.contains(&a)) && lines.iter().any(|l| l.contains(&b)));
    assert!(
        lines.iter().any(|l| l.contains(" eta ")),
        "no ETA ever:\n{text}"
    );
    for (i, line) in lines.iter().enumerate() {
        assert!(
            line.chars().count() <= 80,
            "wider than 80 columns: {line:?}"
        );
        assert!(!line.contains("eta 0s"), "{line:?}");
        // The bar below a queued job's line has no ETA.
        if line.ends_with("replicate_requested") {
            if let Some(bar) = lines.get(i + 1) {
                assert!(!bar.contains("eta"), "a queued job with an ETA: {bar:?}");
            }
        }
    }
    let ended: Vec<&String> = lines
        .iter()
        .filter(|l| l.ends_with(" replicated"))
        .collect();
    assert!(ended.len() >= 2, "{lines:#?}");
}
