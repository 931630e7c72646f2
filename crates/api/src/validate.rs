//! Validation in one place: names, sizes, resources.

use crate::{ApiError, CreateInstanceRequest, InstanceDraft, InstanceType};

pub mod net;

/// Maximum user-data size.
pub const MAX_USER_DATA: usize = 64 * 1024;
/// Smallest VM memory.
pub const MIN_VM_MEMORY: u64 = 128 * 1024 * 1024;
/// Smallest container memory.
pub const MIN_CONTAINER_MEMORY: u64 = 4 * 1024 * 1024;

/// Checks a name against DNS label rules: 1-63 chars of `[a-z0-9-]`, starting with a letter,
/// not ending with `-`.
pub fn name(field: &str, value: &str) -> Result<(), ApiError> {
    let bad = |why: &str| {
        Err(ApiError::invalid(
            field,
            format!("invalid name {value:?}: {why}"),
        ))
    };
    if value.is_empty() {
        return bad("must not be empty");
    }
    if value.len() > 63 {
        return bad("at most 63 characters");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("only lowercase letters, digits and '-' are allowed");
    }
    if !value.as_bytes()[0].is_ascii_lowercase() {
        return bad("must start with a letter");
    }
    if value.ends_with('-') {
        return bad("must not end with '-'");
    }
    Ok(())
}

/// Parses a size: a plain number of bytes, or a number with a suffix
/// `K`, `M`, `G`, `T` (powers of 1024; `KiB`, `MB`, `Gi` spellings accepted).
pub fn parse_size(field: &str, value: &str) -> Result<u64, ApiError> {
    let bad = || {
        ApiError::invalid(field, format!("invalid size {value:?}: use a number with an optional K, M, G or T suffix, e.g. 512M"))
    };
    let s = value.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(bad());
    }
    let n: f64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "ki" | "kib" => 1 << 10,
        "m" | "mb" | "mi" | "mib" => 1 << 20,
        "g" | "gb" | "gi" | "gib" => 1 << 30,
        "t" | "tb" | "ti" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    let out_of_range = || {
        ApiError::invalid(
            field,
            format!("size {value:?} must be positive and below 1 EiB"),
        )
    };
    if !num.contains('.') {
        // Whole numbers exactly (a float would round above 2^53).
        let whole: u64 = num.parse().map_err(|_| out_of_range())?;
        return whole
            .checked_mul(mult)
            .filter(|b| (1..=1_000_000_000_000_000_000).contains(b))
            .ok_or_else(out_of_range);
    }
    let bytes = n * mult as f64;
    if !bytes.is_finite() || !(1.0..=1e18).contains(&bytes) {
        return Err(out_of_range());
    }
    Ok(bytes as u64)
}

/// A size given as JSON: a number of bytes or a size string.
pub fn json_size(field: &str, value: &serde_json::Value) -> Result<u64, ApiError> {
    match value {
        serde_json::Value::Number(n) => match n.as_u64() {
            // The same bound as size strings.
            Some(v) if v > 0 && v <= 1_000_000_000_000_000_000 => Ok(v),
            _ => Err(ApiError::invalid(
                field,
                format!("{field} must be a positive number of bytes below 1 EiB"),
            )),
        },
        serde_json::Value::String(s) => parse_size(field, s),
        _ => Err(ApiError::invalid(
            field,
            format!("{field} must be a number of bytes or a size string like \"512M\""),
        )),
    }
}

/// Formats bytes for humans (`512M`, `1.5G`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("T", 1 << 40),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ];
    for (u, m) in UNITS {
        if bytes >= m {
            let v = bytes as f64 / m as f64;
            return if (v - v.round()).abs() < 0.05 {
                format!("{}{u}", v.round())
            } else {
                format!("{v:.1}{u}")
            };
        }
    }
    format!("{bytes}B")
}

/// The largest process limit (Linux's highest `pid_max`).
pub const MAX_PIDS_LIMIT: u64 = 4_194_304;

/// Validates an instance create request for `project` and fills in its defaults: the one
/// place where a create is checked before `apply` (which checks what depends on the state:
/// the project, the image, the name, the network and groups, room on a node).
pub fn create_instance(
    project: &str,
    req: &CreateInstanceRequest,
) -> Result<InstanceDraft, ApiError> {
    name("name", &req.name)?;
    if req.image.trim().is_empty() {
        return Err(ApiError::invalid("image", "image must not be empty"));
    }
    let vm = req.instance_type == InstanceType::Vm;
    let cpus = match req.cpus {
        Some(c) => {
            // Reservations and CPU quotas count milli-CPUs.
            if !c.is_finite() || c < 0.001 {
                return Err(ApiError::invalid(
                    "cpus",
                    format!("cpus must be at least 0.001, got {c}"),
                ));
            }
            (c * 1000.0).round() / 1000.0
        }
        None if vm => 1.0,
        // A container without a size is best effort: no reservation, no limit.
        None => 0.0,
    };
    if cpus > 256.0 {
        return Err(ApiError::invalid("cpus", "cpus must be at most 256"));
    }
    if vm && cpus.fract() != 0.0 {
        return Err(ApiError::invalid(
            "cpus",
            "a VM needs a whole number of vCPUs",
        ));
    }
    let memory_bytes = match &req.memory {
        Some(v) => {
            let m = json_size("memory", v)?;
            if m < MIN_CONTAINER_MEMORY {
                return Err(ApiError::invalid(
                    "memory",
                    format!("memory must be at least 4M, got {}", format_size(m)),
                ));
            }
            m
        }
        None if vm => 512 << 20,
        None => 0,
    };
    if vm && memory_bytes < MIN_VM_MEMORY {
        return Err(ApiError::invalid(
            "memory",
            format!(
                "a VM needs at least 128M of memory, got {}",
                format_size(memory_bytes)
            ),
        ));
    }
    let disk_bytes = match &req.disk {
        Some(v) => json_size("disk", v)?,
        None if vm => 2 << 30,
        None => 1 << 30,
    };
    let pids_limit = req.pids_limit.unwrap_or(1024);
    if pids_limit == 0 || pids_limit > MAX_PIDS_LIMIT {
        return Err(ApiError::invalid(
            "pids_limit",
            format!("pids_limit must be between 1 and {MAX_PIDS_LIMIT}"),
        ));
    }
    if let Some(ud) = &req.user_data {
        if ud.len() > MAX_USER_DATA {
            return Err(ApiError::invalid(
                "user_data",
                format!("user-data is {} bytes; the limit is 64 KiB", ud.len()),
            ));
        }
    }
    for (k, v) in &req.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(ApiError::invalid(
                format!("env.{k}"),
                format!("invalid environment variable {k:?}"),
            ));
        }
    }
    for (k, v) in &req.labels {
        label(k, v)?;
    }
    if req.command.iter().any(|c| c.contains('\0')) {
        return Err(ApiError::invalid(
            "command",
            "command must not contain NUL bytes",
        ));
    }
    nimbus_scheduler::Constraint::parse_all(&req.constraints)
        .map_err(|e| ApiError::invalid(e.field, e.message))?;
    if let Some(g) = &req.spread_group {
        name("spread_group", g)?;
    }
    if req.anti_affinity && req.spread_group.is_none() {
        return Err(ApiError::invalid(
            "anti_affinity",
            "anti_affinity needs a spread_group",
        ));
    }
    let priority = match &req.priority_class {
        Some(c) => nimbus_scheduler::PriorityClasses::default()
            .resolve(c)
            .map_err(|e| ApiError::invalid("priority_class", e.message))?,
        None => 0,
    };
    let network = req
        .network
        .clone()
        .unwrap_or_else(|| crate::DEFAULT_NETWORK.to_string());
    name("network", &network)?;
    let subnet = req.subnet.clone().unwrap_or_default();
    if !subnet.is_empty() {
        name("subnet", &subnet)?;
    }
    let mut security_groups = Vec::new();
    for (i, g) in req.security_groups.iter().enumerate() {
        name(&format!("security_groups[{i}]"), g)?;
        if !security_groups.contains(g) {
            security_groups.push(g.clone());
        }
    }
    if security_groups.is_empty() {
        security_groups.push(crate::DEFAULT_SECURITY_GROUP.to_string());
    }
    let publish = net::publish_list(&req.publish)?;
    crate::secret::secret_uses(&req.secrets, &req.env)?;
    crate::volume::volume_uses(&req.volumes, vm)?;
    Ok(InstanceDraft {
        name: req.name.clone(),
        project: project.to_string(),
        labels: req.labels.clone(),
        spec: crate::InstanceSpec {
            instance_type: req.instance_type,
            image: req.image.clone(),
            image_digest: String::new(),
            cpus,
            memory_bytes,
            disk_bytes,
            command: req.command.clone(),
            env: req.env.clone(),
            restart: req.restart,
            pids_limit,
            user_data: req.user_data.clone(),
            ssh_keys: req.ssh_keys.clone(),
            desired: if req.start.unwrap_or(true) {
                crate::DesiredState::Running
            } else {
                crate::DesiredState::Stopped
            },
            restart_nonce: 0,
            constraints: req.constraints.clone(),
            spread_group: req.spread_group.clone(),
            anti_affinity: req.anti_affinity,
            priority_class: req.priority_class.clone(),
            priority,
            network,
            subnet,
            security_groups,
            publish,
            secrets: req.secrets.clone(),
            volumes: req.volumes.clone(),
        },
    })
}

/// `exec`: a command must be given; answers how long it may run (`timeout_secs`, default 60,
/// clamped to 1 s..1 h). Both the server and the agent that runs it check.
pub fn exec(req: &crate::ExecRequest) -> Result<std::time::Duration, ApiError> {
    if req.command.is_empty() {
        return Err(ApiError::invalid("command", "command must not be empty"));
    }
    Ok(std::time::Duration::from_secs(
        req.timeout_secs.unwrap_or(60).clamp(1, 3600),
    ))
}

/// Checks a label key and value.
pub fn label(k: &str, v: &str) -> Result<(), ApiError> {
    let ok_key = !k.is_empty()
        && k.len() <= 63
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
    if !ok_key {
        return Err(ApiError::invalid(
            format!("labels.{k}"),
            format!("invalid label key {k:?}"),
        ));
    }
    if v.len() > 253 || v.contains('\0') {
        return Err(ApiError::invalid(
            format!("labels.{k}"),
            "label value too long or contains NUL",
        ));
    }
    Ok(())
}

/// Checks a heartbeat's measurement and converts it to the node's [`crate::NodeUtilization`]
/// (`memory_bytes`: the node's memory capacity). `None` when the heartbeat carries none.
/// Fractions must be finite and within 0..=1 (`invalid_argument` naming the field).
pub fn heartbeat(
    req: &crate::agent::HeartbeatRequest,
    memory_bytes: u64,
) -> Result<Option<crate::NodeUtilization>, ApiError> {
    if !req.measured {
        return Ok(None);
    }
    let permille = |field: &str, v: f64| -> Result<u32, ApiError> {
        if v.is_finite() && (0.0..=1.0).contains(&v) {
            Ok((v * 1000.0).round() as u32)
        } else {
            Err(ApiError::invalid(
                field,
                "must be a fraction between 0 and 1",
            ))
        }
    };
    let memory = if memory_bytes == 0 {
        0
    } else {
        (u128::from(req.memory_used_bytes.min(memory_bytes)) * 1000 / u128::from(memory_bytes))
            as u32
    };
    Ok(Some(crate::NodeUtilization {
        cpu_permille: permille("cpu_utilisation", req.cpu_utilisation)?,
        memory_permille: memory,
        network_permille: permille("network_utilisation", req.network_utilisation)?,
        network_mbps: req.network_mbps,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(name("name", "web-1").is_ok());
        for bad in ["", "Web", "1abc", "a_b", "abc-", &"a".repeat(64)] {
            let e = name("name", bad).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("name"), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("m", "512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("m", "1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("m", "1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("m", "4096").unwrap(), 4096);
        for bad in ["", "M", "12Q", "-1M", "0", "abc", "1e400"] {
            assert!(parse_size("m", bad).is_err(), "{bad}");
        }
        assert_eq!(format_size(512 << 20), "512M");
    }

    #[test]
    fn create_defaults_and_errors() {
        let mut r = CreateInstanceRequest {
            name: "web".into(),
            image: "busybox".into(),
            ..Default::default()
        };
        let v = create_instance("team", &r).unwrap();
        // A container without sizes is best effort: no reservation, no limit.
        assert_eq!((v.spec.cpus, v.spec.memory_bytes), (0.0, 0));
        assert_eq!(v.project, "team");
        assert_eq!(v.spec.image, "busybox");
        assert!(v.spec.image_digest.is_empty(), "apply resolves the image");
        assert_eq!(v.spec.security_groups, vec!["default".to_string()]);
        for bad in [0.0, -1.0, 1e-300, f64::NAN, 257.0] {
            r.cpus = Some(bad);
            assert_eq!(
                create_instance("team", &r).unwrap_err().field.as_deref(),
                Some("cpus"),
                "{bad}"
            );
        }
        r.cpus = Some(0.123_456);
        assert!((create_instance("team", &r).unwrap().spec.cpus - 0.123).abs() < 1e-12);
        r.cpus = None;
        for bad in [
            serde_json::json!(u64::MAX),
            serde_json::json!(0),
            serde_json::json!("2M"),
        ] {
            r.memory = Some(bad.clone());
            assert_eq!(
                create_instance("team", &r).unwrap_err().field.as_deref(),
                Some("memory"),
                "{bad}"
            );
        }
        r.memory = None;
        r.pids_limit = Some(9_223_372_036_854_775_807);
        assert_eq!(
            create_instance("team", &r).unwrap_err().field.as_deref(),
            Some("pids_limit")
        );
        r.pids_limit = None;
        r.constraints = vec!["zone in (".into()];
        assert!(create_instance("team", &r)
            .unwrap_err()
            .field
            .unwrap()
            .starts_with("constraints"));
        r.constraints = Vec::new();
        r.anti_affinity = true;
        assert_eq!(
            create_instance("team", &r).unwrap_err().field.as_deref(),
            Some("anti_affinity")
        );
        r.anti_affinity = false;
        r.priority_class = Some("urgent-ish".into());
        assert_eq!(
            create_instance("team", &r).unwrap_err().field.as_deref(),
            Some("priority_class")
        );
        r.priority_class = None;
        r.instance_type = InstanceType::Vm;
        let vm = create_instance("team", &r).unwrap();
        assert_eq!((vm.spec.cpus, vm.spec.memory_bytes), (1.0, 512 << 20));
        r.memory = Some(serde_json::json!("64M"));
        assert_eq!(
            create_instance("team", &r).unwrap_err().field.as_deref(),
            Some("memory")
        );
        r.memory = None;
        r.user_data = Some("x".repeat(MAX_USER_DATA + 1));
        assert_eq!(
            create_instance("team", &r).unwrap_err().field.as_deref(),
            Some("user_data")
        );
    }

    #[test]
    fn heartbeat_measurements_are_checked_and_converted() {
        let mut hb = crate::agent::HeartbeatRequest::default();
        assert_eq!(super::heartbeat(&hb, 1000).unwrap(), None, "not measured");
        hb.measured = true;
        hb.cpu_utilisation = 0.25;
        hb.memory_used_bytes = 600;
        hb.network_utilisation = 1.0;
        hb.network_mbps = 10_000;
        let u = super::heartbeat(&hb, 1000).unwrap().unwrap();
        assert_eq!(
            (
                u.cpu_permille,
                u.memory_permille,
                u.network_permille,
                u.network_mbps
            ),
            (250, 600, 1000, 10_000)
        );
        hb.cpu_utilisation = 1.5;
        let e = super::heartbeat(&hb, 1000).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("cpu_utilisation"));
        hb.cpu_utilisation = f64::NAN;
        assert!(super::heartbeat(&hb, 1000).is_err());
        hb.cpu_utilisation = 0.1;
        hb.network_utilisation = -0.1;
        let e = super::heartbeat(&hb, 1000).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("network_utilisation"));
    }
}
