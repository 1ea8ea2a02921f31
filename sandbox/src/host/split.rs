//! Split runs: one query's scan shared among instances on every core,
//! and the final instance that merges their partial aggregates.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use super::data::MAX_PARTS;
use super::error::SandboxError;

use super::run::ShareStates;

use crate::protocol::Stage;

use super::{Ended, Guest, Ran, RunPlan, Sandbox, internal};

/// Host threads running a split run's instances: the Wasm stack limit plus
/// room for the host frames beneath it.
pub(super) const WORKER_STACK_BYTES: usize = 8 << 20;

impl Sandbox {
    /// The table a SQL run splits: the one stored in the most parts, if any
    /// is stored in more than one.
    pub(super) fn split_table(
        &self,
        plan: &RunPlan<'_>,
    ) -> Result<Option<(usize, usize)>, SandboxError> {
        let mut best: Option<(usize, usize)> = None;
        for (index, table) in plan.tables.iter().enumerate() {
            let parts = plan.store.parts(&table.name).map_err(SandboxError::Data)?;
            if parts > 1 && best.is_none_or(|(_, most)| parts > most) {
                best = Some((index, parts.min(MAX_PARTS)));
            }
        }
        Ok(best)
    }

    /// Runs the partial aggregates of shares 1.. of `parts` shares of
    /// `table`, and the final instance, which aggregates share 0 itself and
    /// then merges the others' states as they finish: as many at once as
    /// there are cores and free pool slots. `None` when the guest finds the
    /// plan cannot be split: the caller then runs it whole, and the planning
    /// the split run did is not billed. Returns the final instance, and the
    /// fuel and (rows, bytes) read of the partial ones.
    #[allow(clippy::type_complexity)]
    pub(super) fn run_split(
        &self,
        guest: &Guest,
        plan: &RunPlan<'_>,
        table: usize,
        parts: usize,
    ) -> Result<Option<(Ran, u64, (u64, u64))>, SandboxError> {
        let free = self.slots.free();
        let workers = parts.min(self.max_parallel_instances).min(free).max(1);
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let spent = AtomicU64::new(0);
        let shares = Arc::new(ShareStates::new(parts));
        // Instances of shares that hold a pool slot (or failed to get one).
        let holding = (Mutex::new(0usize), Condvar::new());
        let held = || {
            *holding.0.lock().unwrap_or_else(PoisonError::into_inner) += 1;
            holding.1.notify_all();
        };
        let results: Vec<Mutex<Option<Result<Ended, SandboxError>>>> =
            (0..parts).map(|_| Mutex::new(None)).collect();
        let work = || {
            loop {
                let turn = next.fetch_add(1, Ordering::Relaxed);
                if turn >= parts || stop.load(Ordering::Relaxed) {
                    break;
                }
                // Shares 1.. first and the final instance last: it waits for
                // their states, so on one core it must run after them. It
                // starts only once every share holds a pool slot, so its own
                // slot can never be the one a share is waiting for.
                let part = (turn + 1) % parts;
                let ran = if part == 0 {
                    let mut holding_now = holding.0.lock().unwrap_or_else(PoisonError::into_inner);
                    while *holding_now < parts - 1 && !stop.load(Ordering::Relaxed) {
                        holding_now = holding
                            .1
                            .wait_timeout(holding_now, Duration::from_millis(10))
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                    }
                    drop(holding_now);
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let stage = Stage::Final { table, parts };
                    self.instance(
                        guest,
                        plan,
                        stage,
                        Some(Arc::clone(&shares)),
                        spent.load(Ordering::Relaxed),
                        &|| {},
                    )
                } else {
                    let stage = Stage::Partial { table, part, parts };
                    // Each share may use what the finished ones left. Whether
                    // the run fits its budget depends only on the sum, so the
                    // outcome is the same in any order; this only stops a run
                    // that is over budget from burning the budget once per
                    // share.
                    let took_slot = std::cell::Cell::new(false);
                    let mut ran = self.instance(
                        guest,
                        plan,
                        stage,
                        None,
                        spent.load(Ordering::Relaxed),
                        &|| {
                            took_slot.set(true);
                            held();
                        },
                    );
                    match &mut ran {
                        Ok(Ended::Ran(ran)) => {
                            shares.publish(part, std::mem::take(&mut ran.state.partials_out));
                        }
                        _ => {
                            if !took_slot.get() {
                                held();
                            }
                            shares.cancel();
                        }
                    }
                    ran
                };
                let over_budget = match &ran {
                    Ok(Ended::Ran(ran)) => {
                        let total = spent.fetch_add(ran.fuel, Ordering::Relaxed) + ran.fuel;
                        self.meter_fuel && total >= plan.limits.fuel
                    }
                    _ => true,
                };
                if over_budget {
                    stop.store(true, Ordering::Relaxed);
                    shares.cancel();
                }
                if let Ok(mut slot) = results[part].lock() {
                    *slot = Some(ran);
                }
            }
        };
        // Workers report to the caller's subscriber, inside the caller's
        // span, so a split run's instances stay in the query's trace.
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        let caller = tracing::Span::current();
        std::thread::scope(|scope| {
            for worker in 1..workers {
                let (dispatch, caller, work) = (dispatch.clone(), caller.clone(), &work);
                // A worker that cannot start leaves its shares to the others.
                let _ = std::thread::Builder::new()
                    .name(format!("sandbox-part-{worker}"))
                    .stack_size(WORKER_STACK_BYTES)
                    .spawn_scoped(scope, move || {
                        tracing::dispatcher::with_default(&dispatch, || caller.in_scope(work));
                    });
            }
            work();
        });
        let mut results = results
            .into_iter()
            .map(|slot| slot.into_inner().map_err(internal))
            .collect::<Result<Vec<_>, _>>()?;
        let final_run = results[0].take();
        let mut fuel = 0u64;
        let mut read = (0u64, 0u64);
        // A share's own failure comes before the final instance's, which
        // may only be that it stopped waiting for that share.
        for ran in results.into_iter().skip(1) {
            match ran {
                Some(Ok(Ended::Ran(ran))) => {
                    fuel += ran.fuel;
                    read.0 += ran.state.rows_read;
                    read.1 += ran.state.bytes_read;
                }
                Some(Ok(Ended::NotSplittable)) => return Ok(None),
                Some(Err(error)) => return Err(error),
                // Skipped after another share failed; that failure comes first
                // in part order only if it is earlier, so keep looking.
                None => continue,
            }
        }
        let ran = match final_run {
            Some(Ok(Ended::NotSplittable)) => return Ok(None),
            Some(Ok(Ended::Ran(ran))) => Some(*ran),
            Some(Err(error)) if self.meter_fuel && fuel >= plan.limits.fuel => {
                // It stopped because the shares had spent the budget.
                drop(error);
                None
            }
            Some(Err(error)) => return Err(error),
            None => None,
        };
        let total = fuel + ran.as_ref().map_or(0, |ran| ran.fuel);
        if self.meter_fuel && total >= plan.limits.fuel {
            return Err(SandboxError::FuelExhausted {
                fuel: plan.limits.fuel,
            });
        }
        match ran {
            Some(ran) => Ok(Some((ran, fuel, read))),
            None => Err(SandboxError::Internal(
                "the final instance of a split run never ran".into(),
            )),
        }
    }
}
