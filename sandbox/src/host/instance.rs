//! One instance in a fresh store, and what its ending means.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use wasmtime::{Store, Trap};

use super::data::TableStore;
use super::error::SandboxError;

use super::error::Abort;
use super::release::Release;
use super::run::{RunLimiter, RunSetup, RunState, ShareStates, Split, Table};

use crate::policy::OutputPolicy;
use crate::protocol::{GuestFailure, GuestRequest, RUN_EXPORT, Stage, TableInfo};

use super::config::{Limits, TICK};
use super::{Ended, Guest, Linked, Ran, RunPlan, Sandbox, internal};

impl Sandbox {
    /// One instance in a fresh store: `stage` of `plan`, with the fuel left
    /// after `fuel_spent` and the wall time left since the run started; a
    /// final instance reads the other shares' states from `shares`.
    /// `slot_taken` is called once the instance holds its pool slot.
    pub(super) fn instance(
        &self,
        guest: &Guest,
        plan: &RunPlan<'_>,
        stage: Stage,
        shares: Option<Arc<ShareStates>>,
        fuel_spent: u64,
        slot_taken: &dyn Fn(),
    ) -> Result<Ended, SandboxError> {
        let span = instance_span(stage);
        let _entered = span.enter();
        let limits = plan.limits;
        let limit_ms = limits.wall_time.as_millis() as u64;
        if limits.wall_time <= plan.started.elapsed() {
            return Err(SandboxError::Deadline { limit_ms });
        }
        let state = run_state(plan, stage, shares)?;
        let fuel_budget = limits.fuel.saturating_sub(fuel_spent);
        // Waiting for a slot counts against the wall-time limit: it is the
        // consumer's time too, and it bounds the queue.
        let _slot = self
            .slots
            .take(plan.started.checked_add(limits.wall_time))
            .ok_or(SandboxError::Busy {
                slots: self.slots.total,
                limit_ms,
            })?;
        slot_taken();
        let wall_left = limits.wall_time.saturating_sub(plan.started.elapsed());
        if wall_left.is_zero() {
            return Err(SandboxError::Deadline { limit_ms });
        }
        let mut store = self.fresh_store(state, fuel_budget, wall_left)?;
        let starting = Instant::now();
        let started_up = || {
            let startup = starting.elapsed();
            span.record("startup_us", startup.as_micros() as u64);
            plan.startup_ns.fetch_add(
                u64::try_from(startup.as_nanos()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
        };
        let result = call_guest(guest, &mut store, &started_up);
        let fuel = match self.meter_fuel {
            true => fuel_budget - store.get_fuel().unwrap_or(fuel_budget),
            false => 0,
        };
        span.record("fuel", fuel);
        span.record("ran_us", starting.elapsed().as_micros() as u64);
        plan.fuel_burnt.fetch_add(fuel, Ordering::Relaxed);
        ending(result, stage, limits, store.into_data(), fuel)
    }

    /// A store for one instance, with its memory limiter, its fuel and its
    /// epoch deadline.
    fn fresh_store(
        &self,
        state: RunState,
        fuel_budget: u64,
        wall_left: std::time::Duration,
    ) -> Result<Store<RunState>, SandboxError> {
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        if self.meter_fuel {
            store.set_fuel(fuel_budget).map_err(internal)?;
        }
        let ticks = (wall_left.as_nanos() / TICK.as_nanos()).max(1) as u64;
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();
        Ok(store)
    }
}

/// What one instance of `stage` starts with: the guest's request, the
/// product's tables, the release under the policy, its limits, and for a
/// share or the final instance its part of the split.
fn run_state(
    plan: &RunPlan<'_>,
    stage: Stage,
    shares: Option<Arc<ShareStates>>,
) -> Result<RunState, SandboxError> {
    let limits = plan.limits;
    let request = GuestRequest {
        stage,
        ..plan.request.clone()
    };
    let request = serde_json::to_vec(&request).map_err(internal)?;
    let split = match stage {
        Stage::Whole => Split::Whole,
        Stage::Partial { table, part, parts } => Split::Partial {
            table,
            part,
            parts,
            max_bytes: limits.memory_bytes,
        },
        Stage::Final { table, parts } => Split::Final {
            table,
            parts,
            // Without the shares' states it would wait until the deadline.
            states: shares.ok_or_else(|| {
                SandboxError::Internal("a final instance needs its shares' states".into())
            })?,
            deadline: plan.started + limits.wall_time,
            max_bytes: limits.memory_bytes,
            share_opened: false,
            next_share: 1,
            bytes_read: 0,
        },
    };
    Ok(RunState::new(RunSetup {
        request,
        store: Arc::clone(plan.store),
        tables: plan.tables.iter().map(Table::clone).collect(),
        release: Release::new(plan.policy.clone()),
        max_log_bytes: limits.max_log_bytes,
        max_output_bytes: limits.max_output_bytes,
        logical_time_ns: plan.logical_time_ns,
        limiter: RunLimiter {
            memory_bytes: limits.memory_bytes as usize,
            table_elements: limits.table_elements,
        },
        split,
    }))
}

/// Instantiates the guest and calls its entry point; `started_up` marks
/// the end of instantiation. A core module returns its code; an algorithm
/// component's failure becomes code 1 with the failure kept.
fn call_guest(
    guest: &Guest,
    store: &mut Store<RunState>,
    started_up: &dyn Fn(),
) -> wasmtime::Result<i32> {
    match &guest.linked {
        Linked::Module(pre) => pre.instantiate(&mut *store).and_then(|instance| {
            if let Ok(init) = instance.get_typed_func::<(), ()>(&mut *store, "_initialize") {
                init.call(&mut *store, ())?;
            }
            started_up();
            let run = instance.get_typed_func::<(), i32>(&mut *store, RUN_EXPORT)?;
            run.call(&mut *store, ())
        }),
        Linked::Component(pre) => pre.instantiate(&mut *store).and_then(|algorithm| {
            started_up();
            Ok(match algorithm.call_run(&mut *store)? {
                Ok(()) => 0,
                Err(failure) => {
                    store.data_mut().failure = Some(failure.into());
                    1
                }
            })
        }),
    }
}

/// What an instance's ending means: it ran, its plan does not split, or
/// the error it ended with.
fn ending(
    result: wasmtime::Result<i32>,
    stage: Stage,
    limits: &Limits,
    mut state: RunState,
    fuel: u64,
) -> Result<Ended, SandboxError> {
    // Either kind of instance of a split run may find the plan does not
    // split: a whole instance never asks.
    let partial = !matches!(stage, Stage::Whole);
    if let Err(error) = &result
        && partial
        && matches!(error.downcast_ref::<Abort>(), Some(Abort::NotSplittable(_)))
    {
        return Ok(Ended::NotSplittable);
    }
    let code = result.map_err(|e| classify(e, limits, &state))?;
    if code != 0 || state.failure.is_some() {
        return Err(match state.failure.take() {
            Some(GuestFailure::NotSplittable { .. }) if partial => {
                return Ok(Ended::NotSplittable);
            }
            Some(failure) => failure.into(),
            None => {
                SandboxError::Execution(format!("the guest returned {code}: {}", state.log.trim()))
            }
        });
    }
    Ok(Ended::Ran(Box::new(Ran { fuel, state })))
}

/// The span of one instance: which stage of the run it is, and (recorded as
/// it ends) its fuel and the microseconds from the start of instantiation to
/// the guest's entry point (`startup_us`) and to its return (`ran_us`). A
/// split run's shares show how evenly its cores were loaded, and the final
/// instance what merging cost.
pub(super) fn instance_span(stage: Stage) -> tracing::Span {
    use tracing::field::Empty;
    match stage {
        Stage::Whole => tracing::info_span!(
            "sandbox_instance",
            stage = "whole",
            fuel = Empty,
            startup_us = Empty,
            ran_us = Empty
        ),
        Stage::Partial { table, part, parts } => tracing::info_span!(
            "sandbox_instance",
            stage = "partial",
            table,
            part,
            parts,
            fuel = Empty,
            startup_us = Empty,
            ran_us = Empty
        ),
        Stage::Final { table, parts } => tracing::info_span!(
            "sandbox_instance",
            stage = "final",
            table,
            part = 0,
            parts,
            fuel = Empty,
            startup_us = Empty,
            ran_us = Empty
        ),
    }
}

pub(super) fn describe(
    store: &dyn TableStore,
    policy: &OutputPolicy,
) -> Result<(Vec<Table>, Vec<TableInfo>), SandboxError> {
    let units: Vec<&String> = policy
        .aggregation
        .iter()
        .flat_map(|a| a.privacy_unit_columns.iter())
        .collect();
    let mut tables = Vec::new();
    let mut infos = Vec::new();
    for name in store.tables() {
        let schema = store.schema(&name).map_err(SandboxError::Data)?;
        let columns: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let readable = columns
            .iter()
            .map(|c| !policy.blocked_columns.contains(c) || units.contains(&c))
            .collect();
        tables.push(Table {
            name: name.clone(),
            readable,
            columns,
        });
        infos.push(TableInfo {
            name,
            schema: schema.as_ref().clone(),
        });
    }
    Ok((tables, infos))
}

pub(super) fn classify(error: wasmtime::Error, limits: &Limits, state: &RunState) -> SandboxError {
    if let Some(abort) = error.downcast_ref::<Abort>() {
        return match abort {
            Abort::Memory => SandboxError::MemoryLimit {
                limit_bytes: limits.memory_bytes,
            },
            Abort::ResultTooLarge { limit_bytes, rule } => SandboxError::ResultTooLarge {
                limit_bytes: *limit_bytes,
                rule,
            },
            Abort::Policy {
                rule,
                column,
                message,
            } => SandboxError::Policy {
                rule: rule.clone(),
                column: column.clone(),
                message: message.clone(),
            },
            Abort::Data(message) => SandboxError::Data(message.clone()),
            Abort::Protocol(message) => {
                SandboxError::Trap(format!("broke the host protocol: {message}"))
            }
            Abort::Exit(code) => SandboxError::Execution(format!(
                "the guest exited with {code}: {}",
                state.log.trim()
            )),
            Abort::NotSplittable(reason) => SandboxError::Internal(format!(
                "a whole run was refused as not splittable: {reason}"
            )),
            Abort::Deadline => SandboxError::Deadline {
                limit_ms: limits.wall_time.as_millis() as u64,
            },
            Abort::ShareFailed => {
                SandboxError::Internal("a share of the split run failed or never ran".into())
            }
        };
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => SandboxError::FuelExhausted { fuel: limits.fuel },
        Some(Trap::Interrupt) => SandboxError::Deadline {
            limit_ms: limits.wall_time.as_millis() as u64,
        },
        Some(Trap::StackOverflow) => SandboxError::StackOverflow,
        Some(trap) => SandboxError::Trap(format!("{trap}{}", log_suffix(state))),
        None => SandboxError::Trap(format!("{error:#}{}", log_suffix(state))),
    }
}

pub(super) fn log_suffix(state: &RunState) -> String {
    if state.log.is_empty() {
        String::new()
    } else {
        format!(" (guest log: {})", state.log.trim())
    }
}
