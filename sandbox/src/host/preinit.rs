//! Pre-initialization of the SQL guest (wasmtime-wizer): the guest's
//! warm-up export runs once, and its memory and globals become the data of a
//! new module. Every run still gets a fresh instance, now of that module, so
//! what DataFusion builds on first use is built once per module instead of
//! once per query, and no run can see another's state: the snapshot holds
//! only the warm-up's own made-up data.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use wasmtime::{Config, Engine, Instance, Linker, Store, Strategy, Val};
use wasmtime_wizer::{InstanceState, SnapshotVal, ValType, Wizer};

use super::data::LocalDirectory;
use super::release::Release;
use super::run::{RunLimiter, RunSetup, RunState};
use super::{Imports, run, wasi};
use crate::policy::OutputPolicy;
use crate::protocol::PREINIT_EXPORT;

/// The warm-up's own limits: it is our code on made-up data, but a bug in it
/// must still end in an error, not a hung or exhausted host.
const WARM_UP_FUEL: u64 = 50_000_000_000;
const WARM_UP_MEMORY_BYTES: usize = 1 << 30;
/// The warm-up is compiled without optimisation (it runs once; compiling
/// the module twice at full optimisation would double a cold start), and
/// unoptimised frames are larger: a deep stack on a thread of its own.
const WARM_UP_WASM_STACK_BYTES: usize = 32 << 20;
const WARM_UP_THREAD_STACK_BYTES: usize = 64 << 20;

/// Whether `wasm` exports the warm-up function; a module that does not parse
/// does not (compiling it reports why).
pub(crate) fn has_warm_up(wasm: &[u8]) -> bool {
    wasmparser::Parser::new(0)
        .parse_all(wasm)
        .any(|payload| match payload {
            Ok(wasmparser::Payload::ExportSection(exports)) => exports
                .into_iter()
                .any(|e| e.is_ok_and(|e| e.name == PREINIT_EXPORT)),
            _ => false,
        })
}

/// `wasm` with its warm-up run and snapshotted, on a thread of its own.
pub(crate) fn preinitialize(wasm: &[u8]) -> Result<Vec<u8>, String> {
    let wasm = wasm.to_vec();
    std::thread::Builder::new()
        .name("sandbox-preinit".into())
        .stack_size(WARM_UP_THREAD_STACK_BYTES)
        .spawn(move || snapshot(&wasm))
        .map_err(|e| format!("starting the warm-up thread: {e}"))?
        .join()
        .map_err(|_| "the warm-up thread panicked".to_owned())?
}

fn snapshot(wasm: &[u8]) -> Result<Vec<u8>, String> {
    let mut wizer = Wizer::new();
    wizer.init_func(PREINIT_EXPORT);
    let (module_context, instrumented) = wizer
        .instrument(wasm)
        .map_err(|e| format!("instrumenting: {e:#}"))?;
    let mut config = Config::new();
    config
        .strategy(Strategy::Winch)
        .consume_fuel(true)
        .wasm_simd(true)
        // wasmtime requires the async stack (unused here) to be as large.
        .async_stack_size(WARM_UP_WASM_STACK_BYTES)
        .max_wasm_stack(WARM_UP_WASM_STACK_BYTES);
    let engine = Engine::new(&config).map_err(|e| format!("warm-up engine: {e:#}"))?;
    let module = wasmtime::Module::new(&engine, &instrumented)
        .map_err(|e| format!("compiling for the warm-up: {e:#}"))?;
    let mut imports = Imports {
        linker: Linker::new(&engine),
        provided: std::collections::HashSet::new(),
    };
    wasi::add_to_linker(&mut imports, true).map_err(|e| format!("{e:#}"))?;
    run::add_to_linker(&mut imports).map_err(|e| format!("{e:#}"))?;
    let no_tables = std::env::temp_dir();
    let state = RunState::new(RunSetup {
        request: Vec::new(),
        store: Arc::new(LocalDirectory::new(&no_tables, Vec::<String>::new())),
        tables: Vec::new(),
        release: Release::new(OutputPolicy::default()),
        max_log_bytes: 4096,
        max_output_bytes: 0,
        logical_time_ns: 0,
        limiter: RunLimiter {
            memory_bytes: WARM_UP_MEMORY_BYTES,
            table_elements: super::Limits::default().table_elements,
        },
    });
    let mut store = Store::new(&engine, state);
    store.limiter(|state| &mut state.limiter);
    store.set_fuel(WARM_UP_FUEL).map_err(|e| format!("{e:#}"))?;
    let instance = imports
        .linker
        .instantiate(&mut store, &module)
        .map_err(|e| format!("instantiating for the warm-up: {e:#}"))?;
    if let Ok(init) = instance.get_typed_func::<(), ()>(&mut store, "_initialize") {
        init.call(&mut store, ())
            .map_err(|e| format!("_initialize: {e:#}"))?;
    }
    instance
        .get_typed_func::<(), ()>(&mut store, PREINIT_EXPORT)
        .and_then(|warm_up| warm_up.call(&mut store, ()))
        .map_err(|e| format!("the warm-up failed: {e:#} {}", store.data().log.trim()))?;
    let mut state = Snapshotted {
        store: &mut store,
        instance,
    };
    // Reading a wasmtime instance never waits: the future is ready at once.
    match pin!(wizer.snapshot(&module_context, &mut state))
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(snapshot) => snapshot.map_err(|e| format!("snapshotting: {e:#}")),
        Poll::Pending => Err("snapshotting did not complete".into()),
    }
}

struct Snapshotted<'a> {
    store: &'a mut Store<RunState>,
    instance: Instance,
}

impl InstanceState for Snapshotted<'_> {
    async fn global_get(&mut self, name: &str, _: ValType) -> SnapshotVal {
        // Wizer asks only for the globals its instrumentation exported.
        let value = self
            .instance
            .get_global(&mut *self.store, name)
            .map(|global| global.get(&mut *self.store));
        match value {
            Some(Val::I32(x)) => SnapshotVal::I32(x),
            Some(Val::I64(x)) => SnapshotVal::I64(x),
            Some(Val::F32(x)) => SnapshotVal::F32(x),
            Some(Val::F64(x)) => SnapshotVal::F64(x),
            Some(Val::V128(x)) => SnapshotVal::V128(x.as_u128()),
            other => unreachable!("wizer exported global {name} as {other:?}"),
        }
    }

    async fn memory_contents(&mut self, name: &str, contents: impl FnOnce(&[u8]) + Send) {
        match self.instance.get_memory(&mut *self.store, name) {
            Some(memory) => contents(memory.data(&*self.store)),
            None => unreachable!("wizer exported memory {name}"),
        }
    }
}
