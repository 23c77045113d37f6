//! The daemon's long-lived tasks and what their ending means: a task that
//! returns an error or panics ends the daemon with a non-zero status and one
//! line naming the task, so a service manager restarts it (`Restart=on-failure`).

use std::collections::HashMap;
use std::future::Future;

use tokio::task::{AbortHandle, JoinError, JoinSet};

/// Named tasks; the first to end decides how the daemon stops.
#[derive(Default)]
pub struct Tasks {
    set: JoinSet<anyhow::Result<()>>,
    names: HashMap<tokio::task::Id, &'static str>,
}

impl Tasks {
    /// Starts `task`; the handle aborts it (for tasks that never end by themselves).
    pub fn spawn<F>(&mut self, name: &'static str, task: F) -> AbortHandle
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name);
        handle
    }

    /// Waits for the first task to end: its name and whether it ended well.
    /// With no task left, says so as a success.
    pub async fn first_exit(&mut self) -> (&'static str, anyhow::Result<()>) {
        match self.set.join_next_with_id().await {
            Some(Ok((id, result))) => {
                let name = self.name(id);
                (name, outcome(name, Ok(result)))
            }
            Some(Err(e)) => {
                let name = self.name(e.id());
                (name, outcome(name, Err(e)))
            }
            None => ("none", Ok(())),
        }
    }

    fn name(&self, id: tokio::task::Id) -> &'static str {
        self.names.get(&id).copied().unwrap_or("unnamed")
    }

    /// Gives the remaining tasks `grace` to end by themselves, then aborts them.
    pub async fn shutdown(mut self, grace: std::time::Duration) {
        let _ = tokio::time::timeout(grace, async {
            while let Some(done) = self.set.join_next_with_id().await {
                let failed = match done {
                    Ok((id, Err(e))) => Some((id, format!("{e:#}"))),
                    Err(e) if e.is_panic() => Some((e.id(), panic_message(e))),
                    _ => None,
                };
                if let Some((id, e)) = failed {
                    tracing::warn!("{} task failed while stopping: {e}", self.name(id));
                }
            }
        })
        .await;
        self.set.shutdown().await;
    }
}

/// What one task's ending means for the daemon: an error or a panic is a failure
/// naming the task; a clean return is a normal stop.
pub fn outcome(name: &str, joined: Result<anyhow::Result<()>, JoinError>) -> anyhow::Result<()> {
    match joined {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.context(format!("{name} task failed"))),
        Err(e) if e.is_panic() => Err(anyhow::anyhow!(
            "{name} task panicked: {}",
            panic_message(e)
        )),
        Err(_) => Err(anyhow::anyhow!("{name} task was cancelled")),
    }
}

fn panic_message(e: JoinError) -> String {
    let payload = e.into_panic();
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_panicking_task_is_a_failure_naming_it() {
        let mut tasks = Tasks::default();
        tasks.spawn("engine", async {
            panic!("index out of bounds");
        });
        tasks.spawn("tun", async {
            std::future::pending::<()>().await;
            Ok(())
        });
        let (name, result) = tasks.first_exit().await;
        assert_eq!(name, "engine");
        let e = result.expect_err("a panic must be a failure");
        assert_eq!(e.to_string(), "engine task panicked: index out of bounds");
        tasks.shutdown(Duration::from_millis(10)).await;
    }

    #[tokio::test]
    async fn a_task_error_is_a_failure_with_its_cause() {
        let mut tasks = Tasks::default();
        tasks.spawn("udp", async { Err(anyhow::anyhow!("socket closed")) });
        let (name, result) = tasks.first_exit().await;
        assert_eq!(name, "udp");
        let e = result.expect_err("an error must be a failure");
        assert_eq!(format!("{e:#}"), "udp task failed: socket closed");
    }

    #[tokio::test]
    async fn a_clean_return_is_a_normal_stop() {
        let mut tasks = Tasks::default();
        tasks.spawn("engine", async { Ok(()) });
        let (name, result) = tasks.first_exit().await;
        assert_eq!(name, "engine");
        assert!(result.is_ok());
    }

    #[tokio::test]
    async fn shutdown_aborts_tasks_that_do_not_end() {
        let mut tasks = Tasks::default();
        tasks.spawn("stuck", async {
            std::future::pending::<()>().await;
            Ok(())
        });
        tokio::time::timeout(
            Duration::from_secs(5),
            tasks.shutdown(Duration::from_millis(10)),
        )
        .await
        .expect("shutdown returns");
    }
}
