//! Where the service and the workers of this process meet: the jobs its workers run (each
//! with its cancel flag; the claim itself is the job repository's), and the wake-up for idle
//! workers.

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

    /// A worker of this process runs job `id` (which it claimed); its cancel flag.
    pub fn track(&self, id: Uuid) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        if let Ok(mut running) = self.running.lock() {
            running.insert(id, Arc::clone(&flag));
        }
        flag
    }

    pub fn untrack(&self, id: Uuid) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(&id);
        }
    }

    /// The jobs being worked on.
    pub fn running(&self) -> Vec<Uuid> {
        self.running
            .lock()
            .map_or_else(|_| Vec::new(), |r| r.keys().copied().collect())
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
    fn a_cancel_reaches_the_running_copy_and_no_other() {
        let board = Board::default();
        let (id, other) = (Uuid::new_v4(), Uuid::new_v4());
        let flag = board.track(id);
        let other_flag = board.track(other);
        assert_eq!(board.active(), 2);
        board.cancel(id);
        assert!(flag.load(Ordering::SeqCst));
        assert!(!other_flag.load(Ordering::SeqCst));
        board.untrack(id);
        board.untrack(other);
        assert_eq!(board.active(), 0);
        board.cancel(id);
    }
}
