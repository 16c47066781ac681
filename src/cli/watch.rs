//! `image-replicator job watch [JOB_ID]`: follows jobs through the running server until they
//! end. On a terminal: one progress bar per job with rate and ETA; otherwise one plain line
//! each time a job's progress or status changes.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use super::client::call;
use crate::admin::{self, Reply, Request};
use crate::model::Job;
use crate::text::escape;

const POLL: Duration = Duration::from_millis(500);

/// How one watched job is shown.
enum View {
    Bar(ProgressBar),
    Lines {
        first: (Instant, u64),
        last: Option<(u8, String)>,
    },
}

pub fn run(data_dir: &Path, job_id: Option<&str>) -> Result<(), String> {
    if admin::connect(data_dir)?.is_none() {
        return Err(format!(
            "no server is running on {}; jobs only move while `image-replicator serve` runs",
            data_dir.display()
        ));
    }
    let bars = std::io::stdout().is_terminal().then(MultiProgress::new);
    let style = ProgressStyle::with_template(
        "{msg:48} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .map_err(|e| e.to_string())?
    .progress_chars("=> ");
    let mut watched: BTreeMap<u64, (Job, View)> = BTreeMap::new();
    let mut seen_any = false;
    loop {
        let jobs = match job_id {
            Some(id) => vec![show(data_dir, id)?],
            None => {
                let mut jobs = active(data_dir)?;
                for (job, _) in watched.values() {
                    if !jobs.iter().any(|j| j.wire.job_id == job.wire.job_id) {
                        jobs.push(show(data_dir, &job.wire.job_id.to_string())?);
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
                        multi.add(ProgressBar::new(job.bytes_total).with_style(style.clone())),
                    ),
                    None => View::Lines {
                        first: (Instant::now(), job.bytes_copied),
                        last: None,
                    },
                };
                (job.clone(), view)
            });
            entry.0 = job;
            show_progress(&entry.0, &mut entry.1);
        }
        watched.retain(|_, (job, _)| !job.wire.status.is_terminal());
        if watched.is_empty() {
            if !seen_any {
                println!("no active jobs");
            }
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
}

fn show(data_dir: &Path, id: &str) -> Result<Job, String> {
    match call(data_dir, Request::JobShow { id: id.to_string() })? {
        Reply::Job(job) => Ok(job),
        _ => Err("unexpected reply from the server".into()),
    }
}

fn active(data_dir: &Path) -> Result<Vec<Job>, String> {
    match call(data_dir, Request::ActiveJobs)? {
        Reply::Jobs(jobs) => Ok(jobs),
        _ => Err("unexpected reply from the server".into()),
    }
}

fn show_progress(job: &Job, view: &mut View) {
    let w = &job.wire;
    let label = format!("{} {}", w.job_id, w.status);
    match view {
        View::Bar(bar) => {
            bar.set_length(job.bytes_total);
            bar.set_position(job.bytes_copied);
            if w.status.is_terminal() {
                let end = match &job.error {
                    Some(reason) => format!("{label}: {}", escape(reason)),
                    None => label,
                };
                bar.abandon_with_message(end);
            } else {
                bar.set_message(label);
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
            if secs > 0.0 && moved > 0 && !w.status.is_terminal() {
                let rate = moved as f64 / secs;
                let left = job.bytes_total.saturating_sub(job.bytes_copied) as f64 / rate;
                line.push_str(&format!(
                    " {}/s eta {}s",
                    indicatif::HumanBytes(rate as u64),
                    left.ceil() as u64
                ));
            }
            if let Some(reason) = &job.error {
                line.push_str(&format!(": {}", escape(reason)));
            }
            println!("{line}");
        }
    }
}
