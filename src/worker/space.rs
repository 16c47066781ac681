//! Room on the file systems the appliance writes: the free-space reserve copies may not use
//! (`serve --min-free`), and the bytes promised to copies that are accepted but not yet
//! written, so that copies that each fit alone are not all accepted when together they do not.
//!
//! A job's promise is made when the API accepts it (or when the worker starts it), shrinks as
//! its bytes are written, and is released when the job ends. Promises are kept in memory and
//! rebuilt from the queue at start-up.

use std::collections::HashMap;
use std::sync::Mutex;

use uuid::Uuid;

use crate::disk::Space;
use crate::model::size_text;

/// Smallest default reserve.
const DEFAULT_MIN: u64 = 64 << 20;
/// Largest default reserve.
const DEFAULT_MAX: u64 = 10 << 30;

/// The free-space reserve of every file system the appliance writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MinFree {
    /// 5 % of the file system, at least 64 MiB, at most 10 GiB.
    #[default]
    Default,
    /// These many bytes (0: no reserve).
    Bytes(u64),
}

impl MinFree {
    /// The reserve on a file system of `total` bytes.
    pub fn of(self, total: u64) -> u64 {
        match self {
            MinFree::Bytes(bytes) => bytes,
            MinFree::Default => (total / 20).clamp(DEFAULT_MIN, DEFAULT_MAX),
        }
    }
}

/// Whether `need` bytes fit on `space` beside `promised` bytes and the `reserve`; why not, as
/// the end of a sentence.
pub fn room_for(space: &Space, reserve: u64, promised: u64, need: u64) -> Result<(), String> {
    let wanted = need.saturating_add(promised).saturating_add(reserve);
    if space.free >= wanted {
        return Ok(());
    }
    let promised = if promised == 0 {
        String::new()
    } else {
        format!(
            ", {} of which are promised to copies already accepted",
            size_text(promised)
        )
    };
    Err(format!(
        "the image needs {}, and its file system has {} free{promised}, with {} kept free as the reserve (serve --min-free)",
        size_text(need),
        size_text(space.free),
        size_text(reserve),
    ))
}

#[derive(Debug, Clone, Copy)]
struct Promise {
    device: u64,
    total: u64,
    written: u64,
}

/// The bytes promised to accepted copies, by job, with the outstanding sum of each file
/// system kept beside them: asking costs the same with 10 queued copies or 100,000 (summing
/// the promises at each `POST` cost P4 0.85 of 5ef79c4's creates per second).
#[derive(Default)]
pub struct Ledger {
    inner: Mutex<Promises>,
}

#[derive(Default)]
struct Promises {
    by_job: HashMap<Uuid, Promise>,
    /// Outstanding bytes (promised and not yet written) by device.
    outstanding: HashMap<u64, u64>,
}

impl Promise {
    fn outstanding(&self) -> u64 {
        self.total.saturating_sub(self.written)
    }
}

impl Promises {
    fn set(&mut self, job: Uuid, promise: Option<Promise>) {
        if let Some(old) = self.by_job.remove(&job) {
            if let Some(sum) = self.outstanding.get_mut(&old.device) {
                *sum = sum.saturating_sub(old.outstanding());
            }
        }
        if let Some(new) = promise {
            *self.outstanding.entry(new.device).or_default() += new.outstanding();
            self.by_job.insert(job, new);
        }
    }
}

impl Ledger {
    /// Bytes promised on the file system `device`, leaving out job `except`'s.
    pub fn promised(&self, device: u64, except: Option<Uuid>) -> u64 {
        self.inner.lock().map_or(0, |p| {
            let all = p.outstanding.get(&device).copied().unwrap_or(0);
            let own = except
                .and_then(|id| p.by_job.get(&id))
                .filter(|promise| promise.device == device)
                .map_or(0, Promise::outstanding);
            all.saturating_sub(own)
        })
    }

    /// Job `job` will write `bytes` on `device` (from the start: a copy that starts over).
    pub fn promise(&self, job: Uuid, device: u64, bytes: u64) {
        if let Ok(mut p) = self.inner.lock() {
            let promise = Promise {
                device,
                total: bytes,
                written: 0,
            };
            p.set(job, Some(promise));
        }
    }

    /// [`Ledger::promise`] unless the job has a promise already.
    pub fn promise_if_absent(&self, job: Uuid, device: u64, bytes: u64) {
        if let Ok(mut p) = self.inner.lock() {
            if !p.by_job.contains_key(&job) {
                let promise = Promise {
                    device,
                    total: bytes,
                    written: 0,
                };
                p.set(job, Some(promise));
            }
        }
    }

    /// Job `job` has written `written` bytes of its promise.
    pub fn progress(&self, job: Uuid, written: u64) {
        if let Ok(mut p) = self.inner.lock() {
            if let Some(&old) = p.by_job.get(&job) {
                p.set(job, Some(Promise { written, ..old }));
            }
        }
    }

    /// Job `job` ended: its promise is kept or given back by the file system itself.
    pub fn release(&self, job: Uuid) {
        if let Ok(mut p) = self.inner.lock() {
            p.set(job, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_default_reserve_is_5_percent_within_64_mib_and_10_gib() {
        assert_eq!(MinFree::Default.of(24 * MIB), 64 * MIB);
        assert_eq!(MinFree::Default.of(100 << 30), 5 << 30);
        assert_eq!(MinFree::Default.of(1 << 40), 10 << 30);
        assert_eq!(MinFree::Bytes(8 * MIB).of(1 << 40), 8 * MIB);
        assert_eq!(MinFree::Bytes(0).of(24 * MIB), 0);
    }

    #[test]
    fn promises_of_other_jobs_on_the_same_file_system_count_until_released() {
        let ledger = Ledger::default();
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        ledger.promise(a, 1, 10 * MIB);
        ledger.promise(b, 1, 6 * MIB);
        ledger.promise(c, 2, 100 * MIB);
        assert_eq!(ledger.promised(1, None), 16 * MIB);
        assert_eq!(ledger.promised(1, Some(a)), 6 * MIB);
        ledger.progress(a, 4 * MIB);
        assert_eq!(ledger.promised(1, None), 12 * MIB);
        ledger.promise_if_absent(a, 1, 10 * MIB);
        assert_eq!(ledger.promised(1, None), 12 * MIB, "kept as it was");
        ledger.release(a);
        ledger.release(b);
        assert_eq!(ledger.promised(1, None), 0);
        assert_eq!(ledger.promised(2, None), 100 * MIB);
    }

    #[test]
    fn room_counts_the_reserve_and_the_promises() {
        let space = Space {
            free: 20 * MIB,
            total: 24 * MIB,
            device: 1,
        };
        assert!(room_for(&space, 8 * MIB, 0, 12 * MIB).is_ok());
        let why = room_for(&space, 8 * MIB, 0, 13 * MIB).unwrap_err();
        assert_eq!(
            why,
            "the image needs 13 MiB, and its file system has 20 MiB free, with 8 MiB kept free as the reserve (serve --min-free)"
        );
        let why = room_for(&space, 8 * MIB, 6 * MIB, 7 * MIB).unwrap_err();
        assert!(why.contains("6 MiB of which are promised"), "{why}");
    }
}
