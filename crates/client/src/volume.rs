//! Volume and storage-pool calls.

use nimbus_api::volume::{
    CreateVolumeRequest, ResizeVolumeRequest, RestoreVolumeRequest, SnapshotVolumeRequest,
    StoragePool, Volume,
};
use reqwest::Method;

use crate::{Client, Result};

impl Client {
    fn volpath(&self, rest: &str) -> String {
        format!("/v1/projects/{}/volumes{rest}", self.project)
    }

    /// Creates a volume.
    pub async fn create_volume(&self, req: &CreateVolumeRequest) -> Result<Volume> {
        self.call(Method::POST, &self.volpath(""), Some(req)).await
    }

    /// Lists volumes.
    pub async fn list_volumes(&self) -> Result<Vec<Volume>> {
        self.list_all(&self.volpath("")).await
    }

    /// Gets a volume.
    pub async fn get_volume(&self, name: &str) -> Result<Volume> {
        self.call::<(), _>(Method::GET, &self.volpath(&format!("/{name}")), None)
            .await
    }

    /// Deletes a volume.
    pub async fn delete_volume(&self, name: &str) -> Result<()> {
        self.send(self.req(Method::DELETE, &self.volpath(&format!("/{name}"))))
            .await
            .map(|_| ())
    }

    /// Records a snapshot `snapshot` of volume `name`.
    pub async fn snapshot_volume(&self, name: &str, snapshot: &str) -> Result<Volume> {
        let req = SnapshotVolumeRequest {
            name: snapshot.into(),
        };
        self.call(
            Method::POST,
            &self.volpath(&format!("/{name}/snapshots")),
            Some(&req),
        )
        .await
    }

    /// Grows a volume to `size` (bytes or a size string).
    pub async fn resize_volume(&self, name: &str, size: &str) -> Result<Volume> {
        let req = ResizeVolumeRequest {
            size: serde_json::Value::String(size.into()),
            version: None,
        };
        self.call(
            Method::POST,
            &self.volpath(&format!("/{name}/resize")),
            Some(&req),
        )
        .await
    }

    /// Rolls a volume back to its snapshot `snapshot` (`SNAP` or `VOLUME@SNAP`).
    pub async fn restore_volume(&self, name: &str, snapshot: &str) -> Result<Volume> {
        let req = RestoreVolumeRequest {
            snapshot: snapshot.into(),
            version: None,
        };
        self.call(
            Method::POST,
            &self.volpath(&format!("/{name}/restore")),
            Some(&req),
        )
        .await
    }

    /// Lists storage pools.
    pub async fn list_storage_pools(&self) -> Result<Vec<StoragePool>> {
        self.call::<(), _>(Method::GET, "/v1/storage/pools", None)
            .await
    }

    /// Gets a storage pool.
    pub async fn get_storage_pool(&self, name: &str) -> Result<StoragePool> {
        self.call::<(), _>(Method::GET, &format!("/v1/storage/pools/{name}"), None)
            .await
    }
}
