//! Networks and security groups.

use nimbus_api::{
    AddRuleRequest, CreateNetworkRequest, CreateSecurityGroupRequest, Network, SecurityGroup,
};
use reqwest::Method;

use crate::{Client, Result};

impl Client {
    fn npath(&self, kind: &str, rest: &str) -> String {
        format!("/v1/projects/{}/{kind}{rest}", self.project)
    }

    /// Creates a network.
    pub async fn create_network(&self, req: &CreateNetworkRequest) -> Result<Network> {
        self.call(Method::POST, &self.npath("networks", ""), Some(req))
            .await
    }

    /// Lists the project's networks.
    pub async fn list_networks(&self) -> Result<Vec<Network>> {
        self.list_all(&self.npath("networks", "")).await
    }

    /// Gets a network.
    pub async fn get_network(&self, name: &str) -> Result<Network> {
        self.call::<(), _>(
            Method::GET,
            &self.npath("networks", &format!("/{name}")),
            None,
        )
        .await
    }

    /// Deletes a network (it must have no instances).
    pub async fn delete_network(&self, name: &str) -> Result<()> {
        self.send(self.req(Method::DELETE, &self.npath("networks", &format!("/{name}"))))
            .await
            .map(|_| ())
    }

    /// Creates a security group.
    pub async fn create_security_group(
        &self,
        name: &str,
        description: &str,
    ) -> Result<SecurityGroup> {
        self.call(
            Method::POST,
            &self.npath("security-groups", ""),
            Some(&CreateSecurityGroupRequest {
                name: name.into(),
                description: description.into(),
            }),
        )
        .await
    }

    /// Lists the project's security groups.
    pub async fn list_security_groups(&self) -> Result<Vec<SecurityGroup>> {
        self.list_all(&self.npath("security-groups", "")).await
    }

    /// Gets a security group.
    pub async fn get_security_group(&self, name: &str) -> Result<SecurityGroup> {
        self.call::<(), _>(
            Method::GET,
            &self.npath("security-groups", &format!("/{name}")),
            None,
        )
        .await
    }

    /// Deletes a security group.
    pub async fn delete_security_group(&self, name: &str) -> Result<()> {
        self.send(self.req(
            Method::DELETE,
            &self.npath("security-groups", &format!("/{name}")),
        ))
        .await
        .map(|_| ())
    }

    /// Adds a rule to a security group; returns the group with the new rule (the last one).
    pub async fn add_rule(&self, group: &str, req: &AddRuleRequest) -> Result<SecurityGroup> {
        self.call(
            Method::POST,
            &self.npath("security-groups", &format!("/{group}/rules")),
            Some(req),
        )
        .await
    }

    /// Deletes a rule by id.
    pub async fn delete_rule(&self, group: &str, rule: &str) -> Result<SecurityGroup> {
        self.call::<(), _>(
            Method::DELETE,
            &self.npath("security-groups", &format!("/{group}/rules/{rule}")),
            None,
        )
        .await
    }
}
