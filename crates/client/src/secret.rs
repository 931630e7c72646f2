//! Secret calls and master-key rotation.

use nimbus_api::secret::{CreateSecretRequest, Secret};
use reqwest::Method;

use crate::{Client, Result};

impl Client {
    fn secretpath(&self, rest: &str) -> String {
        format!("/v1/projects/{}/secrets{rest}", self.project)
    }

    /// Creates a secret holding `value`.
    pub async fn create_secret(&self, name: &str, value: &[u8]) -> Result<Secret> {
        let req = CreateSecretRequest {
            name: name.into(),
            data: nimbus_api::secret::encode(value),
            labels: std::collections::BTreeMap::new(),
        };
        self.call(Method::POST, &self.secretpath(""), Some(&req))
            .await
    }

    /// Lists secrets (metadata only).
    pub async fn list_secrets(&self) -> Result<Vec<Secret>> {
        self.list_all(&self.secretpath("")).await
    }

    /// Gets a secret's metadata.
    pub async fn get_secret(&self, name: &str) -> Result<Secret> {
        self.call::<(), _>(Method::GET, &self.secretpath(&format!("/{name}")), None)
            .await
    }

    /// Deletes a secret.
    pub async fn delete_secret(&self, name: &str) -> Result<()> {
        self.send(self.req(Method::DELETE, &self.secretpath(&format!("/{name}"))))
            .await
            .map(|_| ())
    }

    /// Rotates the cluster master key; returns the server's account (JSON).
    pub async fn rotate_master_key(&self) -> Result<serde_json::Value> {
        self.call::<(), _>(Method::POST, "/v1/cluster/master-key/rotate", None)
            .await
    }
}
