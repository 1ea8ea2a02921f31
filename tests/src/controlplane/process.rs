//! Child processes that cannot outlive the test that started them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::HarnessError;

/// A control-plane process. Dropping it kills it and reaps it.
///
/// Guarantees: the process is killed when this value drops (test success,
/// failure or panic) and, through `PR_SET_PDEATHSIG`, also when the thread that
/// spawned it dies — which covers a test process killed by a timeout, where no
/// destructor runs. Spawn from a thread that lives as long as the test (the
/// test's own thread or a runtime worker), never from a blocking-pool thread,
/// which may exit while the process should still run.
pub(crate) struct ManagedProcess {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl ManagedProcess {
    pub(crate) fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log_dir: &Path,
    ) -> Result<Self, HarnessError> {
        Self::spawn_with_env(name, program, args, &[], log_dir)
    }

    /// Like [`Self::spawn`], with `env` added to the inherited environment.
    pub(crate) fn spawn_with_env(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &std::ffi::OsStr)],
        log_dir: &Path,
    ) -> Result<Self, HarnessError> {
        Self::spawn_inner(name, program, args, env, log_dir, false)
    }

    /// Like [`Self::spawn`], with `env` as the whole environment: nothing of
    /// the test's own (say, a developer's AWS_* credentials) reaches it.
    pub(crate) fn spawn_with_only_env(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &std::ffi::OsStr)],
        log_dir: &Path,
    ) -> Result<Self, HarnessError> {
        Self::spawn_inner(name, program, args, env, log_dir, true)
    }

    fn spawn_inner(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &std::ffi::OsStr)],
        log_dir: &Path,
        only_env: bool,
    ) -> Result<Self, HarnessError> {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|source| HarnessError::Io {
                what: format!("open log {}", log.display()),
                source,
            })?;
        let err = out.try_clone().map_err(|source| HarnessError::Io {
            what: format!("clone log handle {}", log.display()),
            source,
        })?;
        let mut command = Command::new(program);
        if only_env {
            command.env_clear();
        }
        command
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        die_with_parent(&mut command);
        let child = command.spawn().map_err(|source| HarnessError::Io {
            what: format!("start {name} ({})", program.display()),
            source,
        })?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Fails with the end of the process log if the process has exited.
    pub(crate) fn check_running(&mut self) -> Result<(), HarnessError> {
        let Some(child) = self.child.as_mut() else {
            return Err(HarnessError::ProcessExited {
                name: self.name.clone(),
                status: "stopped by the harness".to_owned(),
                log_tail: String::new(),
            });
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(HarnessError::ProcessExited {
                name: self.name.clone(),
                status: status.to_string(),
                log_tail: self.log_tail(),
            }),
            Err(source) => Err(HarnessError::Io {
                what: format!("poll {}", self.name),
                source,
            }),
        }
    }

    /// The last lines of the process's combined stdout and stderr.
    pub(crate) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(30);
        lines[start..].join("\n")
    }

    /// Kills the process and waits for it to exit.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors mean the process is already gone, which is the goal.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Asks the kernel to SIGKILL the child when the spawning thread exits.
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and calls only
    // prctl(2) and getppid(2), both async-signal-safe; it allocates nothing and
    // touches no lock.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() == 1 {
                return Err(std::io::Error::other("parent exited before exec"));
            }
            Ok(())
        });
    }
}
