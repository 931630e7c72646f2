//! The hollow driver of `nimbus agent --hollow` (a test mode, like Kubernetes' kubemark; never
//! the default): it keeps each instance's lifecycle in memory and runs nothing. `start`
//! answers pid 0 ("no process"), so the agent reports the instance `running` at once; `exec`
//! and stats are refused. The agent drives it through the same decision core and executor
//! as a real driver (`crate::decide`, `crate::converge`; a hollow node has no datapath to wait
//! for). It lets a benchmark drive the real control plane (API, Raft, scheduler, assignments,
//! status reports) with hundreds of nodes on one machine; fleets of thousands use
//! `crate::fleet` instead.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use nimbus_api::{ExecResponse, InstanceType};

use super::{Driver, DriverError, RuntimeSpec, RuntimeState, RuntimeStats};

/// An in-memory driver that runs nothing (see the module docs).
#[derive(Debug, Default)]
pub struct HollowDriver {
    states: Mutex<BTreeMap<String, RuntimeState>>,
}

impl HollowDriver {
    /// An empty hollow driver.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<String, RuntimeState>) -> R) -> R {
        f(&mut self
            .states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

#[async_trait]
impl Driver for HollowDriver {
    fn instance_type(&self) -> InstanceType {
        InstanceType::Container
    }

    async fn create(&self, spec: &RuntimeSpec) -> Result<(), DriverError> {
        self.with(|m| {
            m.entry(spec.id.clone()).or_insert(RuntimeState::Created);
        });
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<u32, DriverError> {
        self.with(|m| match m.get_mut(id) {
            Some(s) => {
                *s = RuntimeState::Running { pid: 0 };
                Ok(0)
            }
            None => Err(DriverError::NotFound(id.to_owned())),
        })
    }

    async fn stop(&self, id: &str, _grace: Duration) -> Result<(), DriverError> {
        self.with(|m| match m.get_mut(id) {
            Some(s) => {
                *s = RuntimeState::Exited { code: Some(0) };
                Ok(())
            }
            None => Err(DriverError::NotFound(id.to_owned())),
        })
    }

    async fn state(&self, id: &str) -> Result<RuntimeState, DriverError> {
        Ok(self.with(|m| m.get(id).cloned().unwrap_or(RuntimeState::Absent)))
    }

    async fn exec(
        &self,
        id: &str,
        _command: &[String],
        _timeout: Duration,
    ) -> Result<ExecResponse, DriverError> {
        Err(DriverError::Unavailable(format!(
            "instance {id} is on a hollow node (nimbus agent --hollow): nothing runs there"
        )))
    }

    fn log_path(&self, id: &str) -> PathBuf {
        PathBuf::from("/dev/null").join(id)
    }

    async fn stats(&self, id: &str) -> Result<RuntimeStats, DriverError> {
        self.state(id).await.map(|_| RuntimeStats::default())
    }

    async fn delete(&self, id: &str) -> Result<(), DriverError> {
        self.with(|m| {
            m.remove(id);
        });
        Ok(())
    }

    async fn list(&self) -> Result<Vec<String>, DriverError> {
        Ok(self.with(|m| m.keys().cloned().collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> RuntimeSpec {
        RuntimeSpec {
            id: id.into(),
            name: id.into(),
            image: serde_json::from_value(serde_json::json!({
                "name": "busybox", "digest": "sha256:aa", "layers": [],
                "default_command": [], "default_env": [], "working_dir": "/"
            }))
            .unwrap(),
            layer_dirs: vec![],
            command: vec![],
            env: vec![],
            working_dir: "/".into(),
            cpus: 1.0,
            memory_bytes: 1 << 20,
            disk_bytes: 0,
            pids_limit: 10,
            network: serde_json::from_value(serde_json::json!({
                "bridge": "b", "ip": "10.0.0.2", "prefix_len": 24,
                "gateway": "10.0.0.1", "mac": "02:00:00:00:00:01"
            }))
            .unwrap(),
            user_data: None,
            ssh_keys: vec![],
            secrets: crate::driver::SecretMaterial::default(),
        }
    }

    #[tokio::test]
    async fn lifecycle_in_memory() {
        let d = HollowDriver::new();
        assert_eq!(d.state("a").await.unwrap(), RuntimeState::Absent);
        assert!(d.start("a").await.is_err());
        d.create(&spec("a")).await.unwrap();
        assert_eq!(d.state("a").await.unwrap(), RuntimeState::Created);
        assert_eq!(d.start("a").await.unwrap(), 0);
        assert_eq!(
            d.state("a").await.unwrap(),
            RuntimeState::Running { pid: 0 }
        );
        assert!(d.exec("a", &[], Duration::from_secs(1)).await.is_err());
        d.stop("a", Duration::ZERO).await.unwrap();
        assert_eq!(
            d.state("a").await.unwrap(),
            RuntimeState::Exited { code: Some(0) }
        );
        assert_eq!(d.list().await.unwrap(), vec!["a".to_owned()]);
        d.delete("a").await.unwrap();
        assert!(d.list().await.unwrap().is_empty());
    }
}
