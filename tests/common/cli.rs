//! The admin CLI run as a test checks it: every run is free of sled's lock message, a success
//! prints its output, and a refusal is one line of stderr, `image-replicator: ` and a message
//! naming what is in the way. Used by tests/cli.rs and tests/admin_socket.rs.

use std::path::Path;
use std::process::Output;

use serde_json::Value;

use super::{json_args, parse_json, Lab};

pub const PREFIX: &str = "image-replicator: ";

/// A path as text.
pub fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Runs the CLI; whatever happens, it must never report sled's lock.
pub fn run(lab: &Lab, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let out = lab.cli_stdin(args, stdin);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("could not acquire lock") && !stderr.contains("is locked by"),
        "{args:?} hit the store lock: {stderr}"
    );
    out
}

/// A command that must succeed, with `stdin` on its standard input; its stdout.
pub fn ok_stdin(lab: &Lab, args: &[&str], stdin: Option<&[u8]>) -> String {
    let out = run(lab, args, stdin);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// A command that must succeed; its stdout.
pub fn ok(lab: &Lab, args: &[&str]) -> String {
    ok_stdin(lab, args, None)
}

/// A command that must succeed, run with `--json`; its parsed stdout.
pub fn ok_json(lab: &Lab, args: &[&str]) -> Value {
    let all = json_args(args);
    parse_json(&all, &ok(lab, &all))
}

/// The message of a failure: exit status non-zero, nothing on stdout, exactly one line on
/// stderr, starting with `image-replicator: `.
pub fn failure(args: &[&str], out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{args:?} should have failed; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        out.stdout.is_empty(),
        "{args:?} failed but printed on stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let line = stderr
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("{args:?}: stderr is not one terminated line: {stderr:?}"));
    assert!(
        !line.contains('\n'),
        "{args:?}: stderr is not one line: {stderr:?}"
    );
    let message = line
        .strip_prefix(PREFIX)
        .unwrap_or_else(|| panic!("{args:?}: stderr does not start with {PREFIX:?}: {stderr:?}"));
    assert!(
        message.len() > 10,
        "{args:?}: message too short: {stderr:?}"
    );
    message.to_string()
}

/// A command that must be refused; its one-line message, checked to name every `needle`.
pub fn refused(lab: &Lab, args: &[&str], needles: &[&str]) -> String {
    refused_stdin(lab, args, None, needles)
}

/// [`refused`], with `stdin` on its standard input.
pub fn refused_stdin(lab: &Lab, args: &[&str], stdin: Option<&[u8]>, needles: &[&str]) -> String {
    let out = run(lab, args, stdin);
    let message = failure(args, &out);
    for needle in needles {
        assert!(
            message.contains(needle),
            "{args:?}: message {message:?} does not name {needle:?}"
        );
    }
    message
}

/// The `key` of every object of a JSON array, in order.
pub fn ids(list: &Value, key: &str) -> Vec<String> {
    list.as_array()
        .expect("a JSON array")
        .iter()
        .map(|v| v[key].as_str().expect("id").to_string())
        .collect()
}
