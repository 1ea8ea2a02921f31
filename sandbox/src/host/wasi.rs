//! The few `wasi_snapshot_preview1` calls a Rust guest's standard library
//! makes, answered without ambient authority: no files (no preopened
//! directories), no network (the socket calls are not defined at all, so a
//! module that imports them fails to link), no environment or arguments, a
//! clock fixed at the run's logical time, and randomness from a seed, so the
//! same query on the same data always takes the same path and the same fuel.
//!
//! Anything not listed here is not provided: a module importing it does not
//! load. The SQL guest alone also gets the path calls its standard library
//! links in (DataFusion can spill to disk), each failing with EBADF: with no
//! directory descriptor there is nothing to resolve a path against.

use rand::RngCore;
use wasmtime::Caller;

use super::Imports;

use super::error::Abort;
use super::run::RunState;

const MODULE: &str = "wasi_snapshot_preview1";
const SUCCESS: i32 = 0;
const EBADF: i32 = 8;
const EFAULT: i32 = 21;
const ENOTSUP: i32 = 58;

fn memory<'a>(caller: &'a mut Caller<'_, RunState>) -> Option<(&'a mut [u8], &'a mut RunState)> {
    let memory = caller.get_export("memory")?.into_memory()?;
    Some(memory.data_and_store_mut(caller))
}

fn write_u32(mem: &mut [u8], at: i32, value: u32) -> bool {
    write_bytes(mem, at, &value.to_le_bytes())
}

fn write_u64(mem: &mut [u8], at: i32, value: u64) -> bool {
    write_bytes(mem, at, &value.to_le_bytes())
}

fn write_bytes(mem: &mut [u8], at: i32, bytes: &[u8]) -> bool {
    let Ok(at) = usize::try_from(at) else {
        return false;
    };
    match mem.get_mut(at..at + bytes.len()) {
        Some(slot) => {
            slot.copy_from_slice(bytes);
            true
        }
        None => false,
    }
}

fn read_u32(mem: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(mem.get(at..at + 4)?.try_into().ok()?))
}

pub(crate) fn add_to_linker(linker: &mut Imports, dead_file_calls: bool) -> wasmtime::Result<()> {
    add_process(linker)?;
    add_clocks_and_random(linker)?;
    add_stdio(linker)?;
    if dead_file_calls {
        add_dead_paths(linker)?;
    }
    Ok(())
}

/// A process with no arguments, no environment, nothing to wait on, and an
/// exit that ends the run.
fn add_process(linker: &mut Imports) -> wasmtime::Result<()> {
    // No arguments and no environment: both report zero entries.
    for name in ["args_sizes_get", "environ_sizes_get"] {
        linker.func_wrap(
            MODULE,
            name,
            |mut caller: Caller<'_, RunState>, count: i32, size: i32| -> i32 {
                let Some((mem, _)) = memory(&mut caller) else {
                    return EFAULT;
                };
                if write_u32(mem, count, 0) && write_u32(mem, size, 0) {
                    SUCCESS
                } else {
                    EFAULT
                }
            },
        )?;
    }
    for name in ["args_get", "environ_get"] {
        linker.func_wrap(MODULE, name, |_: i32, _: i32| -> i32 { SUCCESS })?;
    }
    linker.func_wrap(MODULE, "sched_yield", || -> i32 { SUCCESS })?;
    linker.func_wrap(
        MODULE,
        "poll_oneoff",
        |_: i32, _: i32, _: i32, _: i32| -> i32 { ENOTSUP },
    )?;
    linker.func_wrap(MODULE, "proc_exit", |code: i32| -> wasmtime::Result<()> {
        Err(wasmtime::Error::new(Abort::Exit(code)))
    })?;
    Ok(())
}

/// The run's logical clock and a generator seeded alike for every run, so
/// the same query on the same data behaves the same.
fn add_clocks_and_random(linker: &mut Imports) -> wasmtime::Result<()> {
    linker.func_wrap(
        MODULE,
        "clock_time_get",
        |mut caller: Caller<'_, RunState>, _clock: i32, _precision: i64, out: i32| -> i32 {
            let Some((mem, state)) = memory(&mut caller) else {
                return EFAULT;
            };
            let now = state.logical_time_ns;
            if write_u64(mem, out, now) {
                SUCCESS
            } else {
                EFAULT
            }
        },
    )?;
    linker.func_wrap(
        MODULE,
        "clock_res_get",
        |mut caller: Caller<'_, RunState>, _clock: i32, out: i32| -> i32 {
            let Some((mem, _)) = memory(&mut caller) else {
                return EFAULT;
            };
            if write_u64(mem, out, 1_000_000_000) {
                SUCCESS
            } else {
                EFAULT
            }
        },
    )?;
    linker.func_wrap(
        MODULE,
        "random_get",
        |mut caller: Caller<'_, RunState>, buf: i32, len: i32| -> i32 {
            let Some((mem, state)) = memory(&mut caller) else {
                return EFAULT;
            };
            let (Ok(at), Ok(len)) = (usize::try_from(buf), usize::try_from(len)) else {
                return EFAULT;
            };
            match mem.get_mut(at..at + len) {
                Some(slot) => {
                    state.random.fill_bytes(slot);
                    SUCCESS
                }
                None => EFAULT,
            }
        },
    )?;
    Ok(())
}

/// Standard output and error into the run's log; every other descriptor
/// is bad.
fn add_stdio(linker: &mut Imports) -> wasmtime::Result<()> {
    // stdout and stderr (a panic message, say) go to the run's capped log.
    linker.func_wrap(
        MODULE,
        "fd_write",
        |mut caller: Caller<'_, RunState>,
         fd: i32,
         iovs: i32,
         iovs_len: i32,
         written: i32|
         -> i32 {
            if fd != 1 && fd != 2 {
                return EBADF;
            }
            let Some((mem, state)) = memory(&mut caller) else {
                return EFAULT;
            };
            let mut total = 0u32;
            for i in 0..usize::try_from(iovs_len).unwrap_or(0) {
                let at = usize::try_from(iovs)
                    .unwrap_or(usize::MAX)
                    .saturating_add(i * 8);
                let (Some(ptr), Some(len)) = (read_u32(mem, at), read_u32(mem, at + 4)) else {
                    return EFAULT;
                };
                let Some(bytes) = mem.get(ptr as usize..ptr as usize + len as usize) else {
                    return EFAULT;
                };
                state.log_bytes(bytes);
                total += len;
            }
            if write_u32(mem, written, total) {
                SUCCESS
            } else {
                EFAULT
            }
        },
    )?;
    // File descriptors: only stdio exists, and none of it is a directory, so
    // the standard library finds no preopened directory to open files under.
    linker.func_wrap(MODULE, "fd_prestat_get", |_: i32, _: i32| -> i32 { EBADF })?;
    linker.func_wrap(
        MODULE,
        "fd_prestat_dir_name",
        |_: i32, _: i32, _: i32| -> i32 { EBADF },
    )?;
    linker.func_wrap(MODULE, "fd_close", |_: i32| -> i32 { EBADF })?;
    linker.func_wrap(MODULE, "fd_fdstat_get", |_: i32, _: i32| -> i32 { EBADF })?;
    linker.func_wrap(MODULE, "fd_seek", |_: i32, _: i64, _: i32, _: i32| -> i32 {
        EBADF
    })?;
    linker.func_wrap(MODULE, "fd_read", |_: i32, _: i32, _: i32, _: i32| -> i32 {
        EBADF
    })?;
    Ok(())
}

/// Path calls all take a directory descriptor, and there is none.
fn add_dead_paths(linker: &mut Imports) -> wasmtime::Result<()> {
    // Path calls all take a directory descriptor, and there is none.
    linker.func_wrap(
        MODULE,
        "path_open",
        |_: i32, _: i32, _: i32, _: i32, _: i32, _: i64, _: i64, _: i32, _: i32| -> i32 { EBADF },
    )?;
    linker.func_wrap(
        MODULE,
        "path_filestat_get",
        |_: i32, _: i32, _: i32, _: i32, _: i32| -> i32 { EBADF },
    )?;
    linker.func_wrap(
        MODULE,
        "path_create_directory",
        |_: i32, _: i32, _: i32| -> i32 { EBADF },
    )?;
    linker.func_wrap(
        MODULE,
        "path_remove_directory",
        |_: i32, _: i32, _: i32| -> i32 { EBADF },
    )?;
    linker.func_wrap(
        MODULE,
        "path_unlink_file",
        |_: i32, _: i32, _: i32| -> i32 { EBADF },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_readdir",
        |_: i32, _: i32, _: i32, _: i64, _: i32| -> i32 { EBADF },
    )?;
    Ok(())
}
