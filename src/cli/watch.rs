//! `image-replicator job watch [JOB_ID]`: follows jobs through the running server until they
//! end. On a terminal: one progress bar per job with rate and ETA; otherwise one plain line
//! each time a job's progress or status changes.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::admin::{self, Reply, Request};
use crate::error::ServiceError;
use crate::model::{Job, JobStatus};
use crate::text::escape;

const POLL: Duration = Duration::from_millis(500);
/// Every line `job watch` draws fits this many columns (an error's reason aside, in plain
/// lines; the bars cut it).
pub const COLUMNS: usize = 80;
/// Exit status when a watched job ended in `error`.
pub const EXIT_ERROR: i32 = 3;
/// Exit status when a watched job was canceled (and none ended in `error`).
pub const EXIT_CANCELED: i32 = 4;

/// How one watched job is shown.
enum View {
    Bar(ProgressBar),
    Lines {
        first: (Instant, u64),
        last: Option<(u8, String)>,
    },
}

/// The bars' two lines: the job's id and status, then its bar, bytes, rate and ETA (76
/// columns at most: 1023.99 MiB/1023.99 MiB 1023.99 MiB/s eta 59m).
const BAR_TEMPLATE: &str =
    "{prefix}\n  [{bar:26}] {bytes:>11}/{total_bytes:<11} {bytes_per_sec:>12} {msg}";

/// Follows the job (or every active one) until it ends; the exit status to end with: 0, or
/// [`EXIT_ERROR`] / [`EXIT_CANCELED`] when a watched job ended so. With `wait`, a job that
/// does not exist yet (or, without an id, no active job) is waited for.
pub fn run(data_dir: &Path, job_id: Option<&str>, wait: bool) -> Result<i32, String> {
    if admin::connect(data_dir)?.is_none() {
        return Err(format!(
            "no server is running on {}; jobs only move while `image-replicator serve` runs",
            data_dir.display()
        ));
    }
    let bars = std::io::stdout().is_terminal().then(MultiProgress::new);
    let style = ProgressStyle::with_template(BAR_TEMPLATE)
        .map_err(|e| e.to_string())?
        .progress_chars("=> ");
    let ended_style = ProgressStyle::with_template("{prefix}{msg}").map_err(|e| e.to_string())?;
    let mut watched: BTreeMap<u64, (Job, View)> = BTreeMap::new();
    let mut seen_any = false;
    let mut code = 0;
    loop {
        let jobs = match job_id {
            Some(id) => match show(data_dir, id)? {
                Some(job) => vec![job],
                None if wait && !seen_any => Vec::new(),
                None => return Err(format!("no job {id}")),
            },
            None => {
                let mut jobs = active(data_dir)?;
                for (job, _) in watched.values() {
                    if !jobs.iter().any(|j| j.wire.job_id == job.wire.job_id) {
                        let id = job.wire.job_id.to_string();
                        jobs.extend(show(data_dir, &id)?);
                    }
                }
                jobs
            }
        };
        for job in jobs {
            seen_any = true;
            let entry = watched.entry(job.seq).or_insert_with(|| {
                let view = match &bars {
                    Some(multi) => View::Bar(
                        multi.add(
                            ProgressBar::new(job.bytes_total)
                                .with_style(style.clone())
                                .with_prefix(format!("{} {}", job.wire.job_id, job.wire.status)),
                        ),
                    ),
                    None => View::Lines {
                        first: (Instant::now(), job.bytes_copied),
                        last: None,
                    },
                };
                (job.clone(), view)
            });
            entry.0 = job;
            show_progress(&entry.0, &mut entry.1, &ended_style);
            match entry.0.wire.status {
                JobStatus::Error => code = EXIT_ERROR,
                JobStatus::Canceled if code == 0 => code = EXIT_CANCELED,
                _ => {}
            }
        }
        watched.retain(|_, (job, _)| !job.wire.status.is_terminal());
        if watched.is_empty() && (seen_any || !wait) {
            if !seen_any {
                println!("no active jobs");
            }
            return Ok(code);
        }
        std::thread::sleep(POLL);
    }
}

/// The job, or `None` if there is no such job.
fn show(data_dir: &Path, id: &str) -> Result<Option<Job>, String> {
    let Some(stream) = admin::connect(data_dir)? else {
        return Err(format!("the server on {} stopped", data_dir.display()));
    };
    match admin::send(stream, &Request::JobShow { id: id.to_string() })? {
        Ok(Reply::JobShown(shown)) => Ok(Some(shown.job)),
        Err(ServiceError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.to_string()),
        Ok(_) => Err("unexpected reply from the server".into()),
    }
}

fn active(data_dir: &Path) -> Result<Vec<Job>, String> {
    let Some(stream) = admin::connect(data_dir)? else {
        return Err(format!("the server on {} stopped", data_dir.display()));
    };
    match admin::send(stream, &Request::ActiveJobs)? {
        Ok(Reply::Jobs(jobs)) => Ok(jobs),
        Err(e) => Err(e.to_string()),
        Ok(_) => Err("unexpected reply from the server".into()),
    }
}

/// `text` cut to `width` characters, the last one `…` if anything was cut.
fn cut(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut out: String = text.chars().take(width.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Whether an ETA means anything: the job copies and has bytes left.
fn has_eta(job: &Job) -> bool {
    job.wire.status == JobStatus::Replicating && job.bytes_copied < job.bytes_total
}

fn show_progress(job: &Job, view: &mut View, ended_style: &ProgressStyle) {
    let w = &job.wire;
    let label = format!("{} {}", w.job_id, w.status);
    match view {
        View::Bar(bar) => {
            bar.set_length(job.bytes_total);
            bar.set_position(job.bytes_copied);
            bar.set_prefix(label.clone());
            if w.status.is_terminal() {
                bar.set_style(ended_style.clone());
                let end = match &job.error {
                    Some(reason) => cut(
                        &format!(": {}", escape(reason)),
                        COLUMNS.saturating_sub(label.chars().count()),
                    ),
                    None => String::new(),
                };
                bar.abandon_with_message(end);
            } else if has_eta(job) && job.bytes_copied > 0 {
                // Bytes are left, so at least a second is (never "eta 0s").
                let eta = bar.eta().max(Duration::from_secs(1));
                bar.set_message(format!("eta {:#}", indicatif::HumanDuration(eta)));
            } else {
                bar.set_message("");
            }
        }
        View::Lines { first, last } => {
            let now = (w.copy_progress, w.status.to_string());
            if last.as_ref() == Some(&now) {
                return;
            }
            *last = Some(now);
            let mut line = format!("{} {} {}%", w.job_id, w.status, w.copy_progress);
            let secs = first.0.elapsed().as_secs_f64();
            let moved = job.bytes_copied.saturating_sub(first.1);
            if secs > 0.0 && moved > 0 && has_eta(job) {
                let rate = moved as f64 / secs;
                let left = job.bytes_total.saturating_sub(job.bytes_copied) as f64 / rate;
                line.push_str(&format!(
                    " {}/s eta {}s",
                    indicatif::HumanBytes(rate as u64),
                    left.ceil().max(1.0) as u64
                ));
            }
            if let Some(reason) = &job.error {
                line.push_str(&format!(": {}", escape(reason)));
            }
            println!("{line}");
        }
    }
}
