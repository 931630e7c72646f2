//! Load-balancer TLS keys written inline by older builds move into secrets when the leader
//! starts: the stored spec then names the secret, the key opens from it, and the state holds
//! the key sealed only.

use std::time::Duration;

use nimbus_api::lb::{
    validate_spec, LbBackends, LbListener, LbProtocol, LbTls, LoadBalancerSpecRequest,
};
use nimbus_server::{Server, ServerConfig};
use nimbus_state::secrets::secret_aad;
use nimbus_state::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_lb_keys_of_older_builds_move_into_secrets() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(ServerConfig {
        data_dir: tmp.path().join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise_url: String::new(),
        node_id: 1,
        heartbeat_grace: Duration::from_secs(10),
        body_limit: 1 << 20,
        network_pool: "10.232.0.0/16".into(),
        net_prefix: "nblk".into(),
        master_key_file: None,
        tls: nimbus_server::identity::TlsSettings::default(),
    })
    .await
    .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["lb.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let key_pem = key.serialize_pem();
    let spec = validate_spec(&LoadBalancerSpecRequest {
        listeners: vec![LbListener {
            port: 18_443,
            protocol: LbProtocol::Https,
            target_port: Some(8080),
        }],
        backends: LbBackends {
            label: Some("app=web".into()),
            ..LbBackends::default()
        },
        tls: Some(LbTls {
            cert_pem: cert.pem(),
            key_pem: key_pem.clone(),
            key_secret: None,
        }),
        ..LoadBalancerSpecRequest::default()
    })
    .unwrap();
    // What an older build stored: the key inline in the spec.
    server
        .app
        .propose(Command::CreateLoadBalancer {
            project: "default".into(),
            name: "old".into(),
            spec: Box::new(spec),
            labels: std::collections::BTreeMap::new(),
        })
        .await
        .unwrap();

    nimbus_server::routes::secrets::migrate_lb_keys(&server.app).await;

    let tls = server
        .app
        .read(|s| s.loadbalancer("default", "old").unwrap().spec.tls.clone())
        .unwrap();
    assert!(tls.key_pem.is_empty(), "the key is still inline");
    assert_eq!(tls.key_secret.as_deref(), Some("old-tls-key"));
    let sealed = server
        .app
        .read(|s| s.secrets["default/old-tls-key"].sealed.clone());
    let opened = server
        .app
        .keys
        .open(&sealed, &secret_aad("default", "old-tls-key"))
        .unwrap();
    assert_eq!(opened.as_slice(), key_pem.as_bytes());
    let state = server.app.read(|s| serde_json::to_string(s).unwrap());
    let line = key_pem.lines().nth(1).unwrap();
    assert!(
        !state.contains(line),
        "the key is in the state in plain text"
    );
    server.shutdown().await;
}
