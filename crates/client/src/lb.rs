//! Load-balancer calls.

use nimbus_api::lb::{
    CreateLoadBalancerRequest, LbBackendHealth, LoadBalancer, UpdateLoadBalancerRequest,
};
use reqwest::Method;

use crate::{Client, Result};

impl Client {
    fn lbpath(&self, rest: &str) -> String {
        format!("/v1/projects/{}/loadbalancers{rest}", self.project)
    }

    /// Creates a load balancer.
    pub async fn create_lb(&self, req: &CreateLoadBalancerRequest) -> Result<LoadBalancer> {
        self.call(Method::POST, &self.lbpath(""), Some(req)).await
    }

    /// Lists load balancers.
    pub async fn list_lbs(&self) -> Result<Vec<LoadBalancer>> {
        self.list_all(&self.lbpath("")).await
    }

    /// Gets a load balancer.
    pub async fn get_lb(&self, name: &str) -> Result<LoadBalancer> {
        self.call::<(), _>(Method::GET, &self.lbpath(&format!("/{name}")), None)
            .await
    }

    /// Replaces a load balancer's spec.
    pub async fn update_lb(
        &self,
        name: &str,
        req: &UpdateLoadBalancerRequest,
    ) -> Result<LoadBalancer> {
        self.call(Method::PATCH, &self.lbpath(&format!("/{name}")), Some(req))
            .await
    }

    /// Deletes a load balancer.
    pub async fn delete_lb(&self, name: &str) -> Result<()> {
        self.send(self.req(Method::DELETE, &self.lbpath(&format!("/{name}"))))
            .await
            .map(|_| ())
    }

    /// Backend health of a load balancer.
    pub async fn lb_backends(&self, name: &str) -> Result<Vec<LbBackendHealth>> {
        self.call::<(), _>(
            Method::GET,
            &self.lbpath(&format!("/{name}/backends")),
            None,
        )
        .await
    }
}
