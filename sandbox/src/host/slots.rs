//! The pool's instance slots, counted so that a run waits for one.

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Instant;

/// The pooling allocator's instance slots, counted so that a run waits for
/// a free one, up to its wall-time limit: instantiating with every slot in
/// use fails at once, so a burst of more queries than slots would otherwise
/// fail instead of queueing.
pub(super) struct Slots {
    pub(super) total: usize,
    pub(super) in_use: Mutex<usize>,
    pub(super) freed: Condvar,
}

impl Slots {
    pub(super) fn new(total: usize) -> Self {
        Self {
            total,
            in_use: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        // The count is only ever incremented or decremented whole, so a
        // panic elsewhere cannot leave it half-updated.
        self.in_use.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn free(&self) -> usize {
        self.total.saturating_sub(*self.lock())
    }

    /// A slot, once one is free; `None` if none is before `deadline` (no
    /// deadline: wait as long as it takes).
    pub(super) fn take(&self, deadline: Option<Instant>) -> Option<Slot<'_>> {
        let mut in_use = self.lock();
        while *in_use >= self.total {
            in_use = match deadline {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.freed
                        .wait_timeout(in_use, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .freed
                    .wait(in_use)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
        *in_use += 1;
        Some(Slot(self))
    }
}

/// Holds one pool slot; drop it only after the instance's store is gone.
pub(super) struct Slot<'a>(&'a Slots);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.lock() -= 1;
        self.0.freed.notify_one();
    }
}
