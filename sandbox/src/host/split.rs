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
        let workers = parts
            .min(self.max_parallel_instances)
            .min(self.slots.free())
            .max(1);
        let split = SplitRun::new(guest, plan, table, parts);
        // Workers report to the caller's subscriber, inside the caller's
        // span, so a split run's instances stay in the query's trace.
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        let caller = tracing::Span::current();
        let work = || self.split_worker(&split);
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
        let results = split
            .results
            .into_iter()
            .map(|slot| slot.into_inner().map_err(internal))
            .collect::<Result<Vec<_>, _>>()?;
        gather(results, plan, self.meter_fuel)
    }

    /// One worker of a split run: takes turns until every share has run or
    /// the run stops.
    fn split_worker(&self, split: &SplitRun<'_>) {
        loop {
            let turn = split.next.fetch_add(1, Ordering::Relaxed);
            if turn >= split.parts || split.stop.load(Ordering::Relaxed) {
                break;
            }
            // Shares 1.. first and the final instance last: it waits for
            // their states, so on one core it must run after them.
            let part = (turn + 1) % split.parts;
            let ran = if part == 0 {
                match self.final_instance(split) {
                    Some(ran) => ran,
                    None => break,
                }
            } else {
                self.share_instance(split, part)
            };
            split.record(part, ran, self.meter_fuel);
        }
    }

    /// The final instance. It starts only once every share holds a pool
    /// slot, so its own slot can never be the one a share is waiting for;
    /// `None` when the run stopped meanwhile.
    fn final_instance(&self, split: &SplitRun<'_>) -> Option<Result<Ended, SandboxError>> {
        let mut holding = split
            .holding
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while *holding < split.parts - 1 && !split.stop.load(Ordering::Relaxed) {
            holding = split
                .holding
                .1
                .wait_timeout(holding, Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        drop(holding);
        if split.stop.load(Ordering::Relaxed) {
            return None;
        }
        let stage = Stage::Final {
            table: split.table,
            parts: split.parts,
        };
        Some(self.instance(
            split.guest,
            split.plan,
            stage,
            Some(Arc::clone(&split.shares)),
            split.spent.load(Ordering::Relaxed),
            &|| {},
        ))
    }

    /// Share `part`'s partial aggregate, published for the final instance.
    /// Each share may use what the finished ones left. Whether the run fits
    /// its budget depends only on the sum, so the outcome is the same in any
    /// order; this only stops a run that is over budget from burning the
    /// budget once per share.
    fn share_instance(&self, split: &SplitRun<'_>, part: usize) -> Result<Ended, SandboxError> {
        let stage = Stage::Partial {
            table: split.table,
            part,
            parts: split.parts,
        };
        let took_slot = std::cell::Cell::new(false);
        let mut ran = self.instance(
            split.guest,
            split.plan,
            stage,
            None,
            split.spent.load(Ordering::Relaxed),
            &|| {
                took_slot.set(true);
                split.held();
            },
        );
        match &mut ran {
            Ok(Ended::Ran(ran)) => {
                split
                    .shares
                    .publish(part, std::mem::take(&mut ran.state.partials_out));
            }
            _ => {
                if !took_slot.get() {
                    split.held();
                }
                split.shares.cancel();
            }
        }
        ran
    }
}

/// What the workers of one split run share.
struct SplitRun<'a> {
    guest: &'a Guest,
    plan: &'a RunPlan<'a>,
    table: usize,
    parts: usize,
    /// The next turn to take.
    next: AtomicUsize,
    /// Set when a share failed or the budget is spent.
    stop: AtomicBool,
    /// Fuel the finished instances burnt.
    spent: AtomicU64,
    /// The shares' partial states, for the final instance.
    shares: Arc<ShareStates>,
    /// Instances of shares that hold a pool slot (or failed to get one).
    holding: (Mutex<usize>, Condvar),
    /// Each part's outcome, by part.
    results: Vec<Mutex<Option<Result<Ended, SandboxError>>>>,
}

impl<'a> SplitRun<'a> {
    fn new(guest: &'a Guest, plan: &'a RunPlan<'a>, table: usize, parts: usize) -> Self {
        Self {
            guest,
            plan,
            table,
            parts,
            next: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            spent: AtomicU64::new(0),
            shares: Arc::new(ShareStates::new(parts)),
            holding: (Mutex::new(0), Condvar::new()),
            results: (0..parts).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// Counts a share as holding its slot (or as never going to).
    fn held(&self) {
        *self
            .holding
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner) += 1;
        self.holding.1.notify_all();
    }

    /// Keeps a part's outcome, stopping the run when it failed or the
    /// finished instances have spent the budget.
    fn record(&self, part: usize, ran: Result<Ended, SandboxError>, meter_fuel: bool) {
        let over_budget = match &ran {
            Ok(Ended::Ran(ran)) => {
                let total = self.spent.fetch_add(ran.fuel, Ordering::Relaxed) + ran.fuel;
                meter_fuel && total >= self.plan.limits.fuel
            }
            _ => true,
        };
        if over_budget {
            self.stop.store(true, Ordering::Relaxed);
            self.shares.cancel();
        }
        if let Ok(mut slot) = self.results[part].lock() {
            *slot = Some(ran);
        }
    }
}

/// A split run's outcome from its parts' outcomes: the final instance, and
/// the partial ones' fuel and (rows, bytes) read.
#[allow(clippy::type_complexity)]
fn gather(
    mut results: Vec<Option<Result<Ended, SandboxError>>>,
    plan: &RunPlan<'_>,
    meter_fuel: bool,
) -> Result<Option<(Ran, u64, (u64, u64))>, SandboxError> {
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
        Some(Err(error)) if meter_fuel && fuel >= plan.limits.fuel => {
            // It stopped because the shares had spent the budget.
            drop(error);
            None
        }
        Some(Err(error)) => return Err(error),
        None => None,
    };
    let total = fuel + ran.as_ref().map_or(0, |ran| ran.fuel);
    if meter_fuel && total >= plan.limits.fuel {
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
