//! Secrets in the replicated state: stored sealed only (the state machine never sees a key or
//! a plaintext), refused for deletion while an instance or a load balancer uses them, and
//! re-wrapped in place by a master-key rotation.

use std::collections::BTreeMap;

use nimbus_api::secret::Secret;
use nimbus_api::{ApiError, ErrorCode};
use nimbus_seal::Sealed;
use serde::{Deserialize, Serialize};

use crate::command::{CommandEnvelope, CommandOutput, CommandResult};
use crate::machine::{meta, touch, StateMachine};

/// A secret as stored: its metadata and its sealed value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSecret {
    /// Metadata (what the API shows).
    pub secret: Secret,
    /// The value, sealed under the master key named by `sealed.key_id`.
    pub sealed: Sealed,
}

/// The associated data a secret's value is sealed with: a sealed value copied to another
/// secret does not open.
pub fn secret_aad(project: &str, name: &str) -> Vec<u8> {
    format!("nimbus/secret/v1/{project}/{name}").into_bytes()
}

/// The key of a secret in [`crate::StateData::secrets`].
pub fn secret_key(project: &str, name: &str) -> String {
    format!("{project}/{name}")
}

impl StateMachine {
    pub(crate) fn create_secret(
        &mut self,
        env: &CommandEnvelope,
        project: &str,
        name: &str,
        sealed: &Sealed,
        labels: &BTreeMap<String, String>,
    ) -> CommandResult {
        if !self.projects.contains_key(project) {
            return Err(ApiError::not_found("project", project).with_field("project"));
        }
        nimbus_api::validate::name("name", name)?;
        let key = secret_key(project, name);
        if self.secrets.contains_key(&key) {
            return Err(ApiError::already_exists("secret", name));
        }
        let size = sealed.plaintext_len() as u64;
        if size > nimbus_api::secret::MAX_SECRET_BYTES as u64 {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                "the secret is over the 64 KiB limit",
            )
            .with_field("data"));
        }
        let mut m = meta(env, name, project);
        m.labels.clone_from(labels);
        let secret = Secret {
            meta: m,
            size_bytes: size,
            key_id: sealed.key_id.clone(),
        };
        self.secrets.insert(
            key,
            StoredSecret {
                secret: secret.clone(),
                sealed: sealed.clone(),
            },
        );
        self.event(
            env,
            project,
            "secret",
            name,
            "Created",
            format!("{size} bytes"),
        );
        Ok(CommandOutput::Secret(Box::new(secret)))
    }

    pub(crate) fn delete_secret(
        &mut self,
        env: &CommandEnvelope,
        project: &str,
        name: &str,
    ) -> CommandResult {
        let key = secret_key(project, name);
        if !self.secrets.contains_key(&key) {
            return Err(ApiError::not_found("secret", name));
        }
        if let Some(user) = self.secret_user(project, name) {
            return Err(ApiError::conflict(format!(
                "secret {name:?} is used by {user}; delete or change it first"
            )));
        }
        self.secrets.remove(&key);
        self.event(env, project, "secret", name, "Deleted", String::new());
        Ok(CommandOutput::None)
    }

    /// What uses a secret (`instance NAME` or `load balancer NAME`), if anything.
    pub fn secret_user(&self, project: &str, name: &str) -> Option<String> {
        if let Some(i) = self
            .instances
            .values()
            .find(|i| i.meta.project == project && i.spec.secrets.iter().any(|u| u.secret == name))
        {
            return Some(format!("instance {}", i.meta.name));
        }
        self.loadbalancers
            .values()
            .find(|l| {
                l.meta.project == project
                    && l.spec
                        .tls
                        .as_ref()
                        .is_some_and(|t| t.key_secret.as_deref() == Some(name))
            })
            .map(|l| format!("load balancer {}", l.meta.name))
    }

    /// Checks that every secret named exists in the project (`field` names the offender).
    pub(crate) fn check_secrets_exist<'a>(
        &self,
        project: &str,
        names: impl IntoIterator<Item = (String, &'a str)>,
    ) -> Result<(), ApiError> {
        for (field, name) in names {
            if !self.secrets.contains_key(&secret_key(project, name)) {
                return Err(ApiError::not_found("secret", name).with_field(field));
            }
        }
        Ok(())
    }

    /// Replaces the sealed values of the secrets named in `items` that are still wrapped by
    /// `from` with the re-wrapped ones (wrapped by `to`); returns how many were replaced.
    /// A secret deleted or re-created meanwhile is skipped (the rotation re-reads and retries).
    pub(crate) fn rewrap_secrets(
        &mut self,
        env: &CommandEnvelope,
        from: &str,
        to: &str,
        items: &BTreeMap<String, Sealed>,
    ) -> CommandResult {
        let mut n = 0u64;
        for (key, sealed) in items {
            if sealed.key_id != to {
                return Err(ApiError::invalid(
                    "items",
                    format!("item {key} is not wrapped by the new key {to}"),
                ));
            }
            let Some(s) = self.secrets.get_mut(key) else {
                continue;
            };
            if s.sealed.key_id != from || s.sealed.ciphertext != sealed.ciphertext {
                continue;
            }
            s.sealed = sealed.clone();
            s.secret.key_id = to.to_string();
            touch(&mut s.secret.meta, env);
            n += 1;
        }
        if n > 0 {
            self.event(
                env,
                "",
                "cluster",
                "master-key",
                "Rewrapped",
                format!("{n} secrets re-wrapped from key {from} to key {to}"),
            );
        }
        Ok(CommandOutput::Count(n))
    }

    /// Secrets of a project in name order, after `after`.
    pub fn project_secrets<'a>(
        &'a self,
        project: &'a str,
        after: Option<&str>,
    ) -> impl Iterator<Item = &'a Secret> + 'a {
        let start = match after {
            Some(a) => std::ops::Bound::Excluded(secret_key(project, a)),
            None => std::ops::Bound::Included(format!("{project}/")),
        };
        let prefix = format!("{project}/");
        self.secrets
            .range((start, std::ops::Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(&prefix))
            .map(|(_, s)| &s.secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Command;
    use nimbus_seal::MasterKey;

    fn env(command: Command) -> CommandEnvelope {
        CommandEnvelope {
            format: crate::COMMAND_FORMAT_VERSION,
            time: "2026-01-01T00:00:00Z".into(),
            new_id: "id-1".into(),
            command,
        }
    }

    fn with_project() -> StateMachine {
        let mut sm = StateMachine::default();
        sm.apply(
            1,
            &env(Command::CreateProject {
                name: "p".into(),
                description: String::new(),
                idempotency_key: None,
            }),
        )
        .unwrap();
        sm
    }

    fn create(sm: &mut StateMachine, key: &MasterKey, name: &str, value: &[u8]) -> CommandResult {
        sm.apply(
            2,
            &env(Command::CreateSecret {
                project: "p".into(),
                name: name.into(),
                sealed: key.seal(value, &secret_aad("p", name)),
                labels: BTreeMap::new(),
            }),
        )
    }

    #[test]
    fn create_list_delete_and_events_hold_no_value() {
        let key = MasterKey::generate();
        let mut sm = with_project();
        create(&mut sm, &key, "db", b"s3cr3t-value").unwrap();
        assert_eq!(
            create(&mut sm, &key, "db", b"x").unwrap_err().code,
            ErrorCode::AlreadyExists
        );
        let listed: Vec<_> = sm.project_secrets("p", None).collect();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].size_bytes, 12);
        assert_eq!(listed[0].key_id, key.key_id());
        let json = serde_json::to_string(&*sm).unwrap();
        assert!(!json.contains("s3cr3t"));
        let stored = &sm.secrets["p/db"];
        assert_eq!(
            key.open(&stored.sealed, &secret_aad("p", "db"))
                .unwrap()
                .as_slice(),
            b"s3cr3t-value"
        );
        sm.apply(
            3,
            &env(Command::DeleteSecret {
                project: "p".into(),
                name: "db".into(),
            }),
        )
        .unwrap();
        assert!(sm.secrets.is_empty());
        assert!(sm
            .events
            .iter()
            .all(|e| !e.message.contains("s3cr3t") && !e.reason.contains("s3cr3t")));
    }

    #[test]
    fn rewrap_replaces_only_items_still_on_the_old_key() {
        let old = MasterKey::generate();
        let new = MasterKey::generate();
        let mut sm = with_project();
        create(&mut sm, &old, "a", b"va").unwrap();
        create(&mut sm, &old, "b", b"vb").unwrap();
        let items: BTreeMap<_, _> = sm
            .secrets
            .iter()
            .map(|(k, s)| (k.clone(), s.sealed.rewrap(&old, &new).unwrap()))
            .collect();
        let out = sm
            .apply(
                4,
                &env(Command::RewrapSecrets {
                    from: old.key_id().into(),
                    to: new.key_id().into(),
                    items: items.clone(),
                }),
            )
            .unwrap();
        assert_eq!(out, CommandOutput::Count(2));
        for (k, s) in &sm.secrets {
            let name = k.split('/').nth(1).unwrap();
            assert_eq!(s.secret.key_id, new.key_id());
            assert!(new.open(&s.sealed, &secret_aad("p", name)).is_ok());
            assert!(old.open(&s.sealed, &secret_aad("p", name)).is_err());
        }
        // Applying it again changes nothing.
        let again = sm
            .apply(
                5,
                &env(Command::RewrapSecrets {
                    from: old.key_id().into(),
                    to: new.key_id().into(),
                    items,
                }),
            )
            .unwrap();
        assert_eq!(again, CommandOutput::Count(0));
    }

    #[test]
    fn missing_project_is_refused() {
        let key = MasterKey::generate();
        let mut sm = StateMachine::default();
        assert_eq!(
            create(&mut sm, &key, "db", b"x").unwrap_err().code,
            ErrorCode::NotFound
        );
    }
}
