//! Consumer algorithms as Wasm components of the `algorithm` world
//! (sandbox/wit/algorithm.wit), over the same run state, limits and output
//! policy as core modules: only the way values cross the boundary differs.

use wasmtime::Engine;
use wasmtime::component::{Component, HasSelf, Linker};

use super::SandboxError;
use super::error::Abort;
use super::run::RunState;
use crate::protocol::GuestFailure;

wasmtime::component::bindgen!({
    path: "wit",
    world: "algorithm",
    // A host call that breaks a rule (a blocked column, an oversized
    // result) ends the run, as it does for core modules.
    imports: { default: trappable },
});

pub(crate) use self::civicgrid::sandbox::host::Host;

/// The one interface an algorithm may import.
pub(crate) const HOST_INTERFACE: &str = "civicgrid:sandbox/host@0.1.0";

/// Whether `wasm` is a component rather than a core module: the binary
/// format puts a layer field after the magic number, 0 for modules and 1 for
/// components (what `wasmparser::Parser::is_component` checks).
pub(crate) fn is_component(wasm: &[u8]) -> bool {
    wasm.len() >= 8 && wasm[..4] == *b"\0asm" && wasm[6..8] == [1, 0]
}

/// The linker for algorithm components: `host`, and nothing else.
pub(crate) struct Components {
    linker: Linker<RunState>,
}

impl Components {
    pub(crate) fn new(engine: &Engine) -> wasmtime::Result<Self> {
        let mut linker = Linker::new(engine);
        Algorithm::add_to_linker::<RunState, HasSelf<RunState>>(&mut linker, |state| state)?;
        Ok(Self { linker })
    }

    /// Links `component`, refusing by name anything it imports beyond
    /// `host`, and checks that it exports `run` with the world's type.
    pub(crate) fn link(
        &self,
        engine: &Engine,
        component: &Component,
    ) -> Result<AlgorithmPre<RunState>, SandboxError> {
        for (name, _) in component.component_type().imports(engine) {
            if name != HOST_INTERFACE {
                return Err(SandboxError::Link {
                    module: name.to_owned(),
                    name: "(component import)".to_owned(),
                });
            }
        }
        let pre = self
            .linker
            .instantiate_pre(component)
            .map_err(|e| SandboxError::InvalidModule(format!("{e:#}")))?;
        AlgorithmPre::new(pre).map_err(|e| {
            SandboxError::InvalidModule(format!(
                "the component is not of the `algorithm` world: {e:#}"
            ))
        })
    }
}

impl From<Failure> for GuestFailure {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Query(message) => GuestFailure::Query { message },
            Failure::Execution(message) => GuestFailure::Execution { message },
        }
    }
}

fn trap(abort: Abort) -> wasmtime::Error {
    wasmtime::Error::new(abort)
}

impl Host for RunState {
    fn request(&mut self) -> wasmtime::Result<String> {
        String::from_utf8(self.request.clone())
            .map_err(|e| trap(Abort::Protocol(format!("the request is not UTF-8: {e}"))))
    }

    fn scan_open(&mut self, table: u32, columns: Vec<u32>) -> wasmtime::Result<u32> {
        let columns = columns.into_iter().map(|c| c as usize).collect();
        let handle = self.open_scan(table as usize, columns).map_err(trap)?;
        u32::try_from(handle).map_err(|_| trap(Abort::Protocol("too many scans".into())))
    }

    fn scan_next(&mut self, scan: u32) -> wasmtime::Result<Option<Vec<u8>>> {
        let handle =
            i32::try_from(scan).map_err(|_| trap(Abort::Protocol(format!("no scan {scan}"))))?;
        let batch = self.next_batch(handle).map_err(trap)?;
        Ok(batch.map(|batch| batch.to_vec()))
    }

    fn emit(&mut self, batches: Vec<u8>) -> wasmtime::Result<()> {
        self.emitted(&batches).map_err(trap)
    }

    fn log(&mut self, line: String) -> wasmtime::Result<()> {
        self.log_bytes(line.as_bytes());
        self.log_bytes(b"\n");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::is_component;

    #[test]
    fn components_are_told_from_core_modules_by_their_layer() {
        let module = wat::parse_str("(module)").unwrap();
        let component = wat::parse_str("(component)").unwrap();
        assert!(!is_component(&module));
        assert!(is_component(&component));
        assert!(!is_component(b"\0asm"));
        assert!(!is_component(b"not wasm at all"));
    }
}
