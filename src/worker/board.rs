//! Where the service and the workers meet: which jobs this process is copying (each with its
//! cancel flag), and the wake-up for idle workers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use uuid::Uuid;

#[derive(Default)]
pub struct Board {
    /// Jobs being worked on → their cancel flag.
    running: Mutex<HashMap<Uuid, Arc<AtomicBool>>>,
    wake: (Mutex<u64>, Condvar),
}

impl Board {
    /// Tells idle workers there is new work.
    pub fn wake(&self) {
        if let Ok(mut generation) = self.wake.0.lock() {
            *generation += 1;
            self.wake.1.notify_all();
        }
    }

    /// Sleeps until [`Board::wake`] or `timeout`.
    pub fn wait(&self, timeout: Duration) {
        if let Ok(generation) = self.wake.0.lock() {
            let start = *generation;
            let _ = self
                .wake
                .1
                .wait_timeout_while(generation, timeout, |g| *g == start);
        }
    }

    /// Signals a running copy of job `id` to stop for a cancel.
    pub fn cancel(&self, id: Uuid) {
        if let Some(flag) = self.running.lock().ok().and_then(|r| r.get(&id).cloned()) {
            flag.store(true, Ordering::SeqCst);
        }
        self.wake();
    }

    /// Takes job `id` for this worker, unless another has it; its cancel flag.
    pub fn claim(&self, id: Uuid) -> Option<Arc<AtomicBool>> {
        let mut running = self.running.lock().ok()?;
        if running.contains_key(&id) {
            return None;
        }
        let flag = Arc::new(AtomicBool::new(false));
        running.insert(id, Arc::clone(&flag));
        Some(flag)
    }

    pub fn release(&self, id: Uuid) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(&id);
        }
    }

    /// How many jobs are being worked on.
    pub fn active(&self) -> usize {
        self.running.lock().map_or(0, |r| r.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_is_claimed_once_and_its_cancel_reaches_the_claimant() {
        let board = Board::default();
        let id = Uuid::new_v4();
        let flag = board.claim(id).expect("first claim");
        assert!(board.claim(id).is_none(), "second claim");
        assert_eq!(board.active(), 1);
        board.cancel(id);
        assert!(flag.load(Ordering::SeqCst));
        board.release(id);
        assert_eq!(board.active(), 0);
        assert!(board.claim(id).is_some(), "claimable again after release");
    }
}
