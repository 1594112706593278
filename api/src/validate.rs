//! Semantic checks of request values (422): sizes from the cluster's catalogue, positive resources,
//! Kubernetes-style quantities, DNS-label names. Nothing that fails here reaches the log.

use axum::http::StatusCode;

pub use runtimeai_engine::catalogue::quantity_bytes;
use runtimeai_engine::Catalogue;
use runtimeai_model::{ResourceProfile, RuntimeSpec, RuntimeType, SizeEntry};

use crate::problem::{FieldError, Problem};

pub(crate) fn invalid(path: &str, message: impl Into<String>) -> Problem {
    let message = message.into();
    let mut problem = Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-value", format!("{path}: {message}"));
    problem.errors.push(FieldError { path: path.to_string(), message });
    problem
}

/// Names follow Kubernetes' DNS label rule, so a runtime's name can name its backend objects.
pub fn name(value: &str, path: &str) -> Result<(), Problem> {
    let valid = !value.is_empty()
        && value.len() <= 63
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(Problem::invalid_field(
            path,
            "must be 1-63 characters of lowercase letters, digits and '-', starting and ending with a letter or digit",
        ))
    }
}

/// A size must be in the cluster's catalogue (`GET /v1/cluster/settings`).
pub fn size(value: &str, path: &str, sizes: &[SizeEntry]) -> Result<(), Problem> {
    let catalogue = Catalogue::new(sizes);
    if catalogue.index(value).is_some() {
        Ok(())
    } else {
        Err(invalid(path, format!("unknown size {value:?}; known sizes: {}", catalogue.names().join(", "))))
    }
}

pub fn resources(value: &ResourceProfile, path: &str) -> Result<(), Problem> {
    if let Some(cpu) = value.cpu {
        if !(cpu.is_finite() && cpu > 0.0 && cpu <= 1024.0) {
            return Err(invalid(&format!("{path}.cpu"), "must be a number of vCPUs above 0 and at most 1024"));
        }
    }
    if let Some(memory) = &value.memory {
        match quantity_bytes(memory) {
            Some(bytes) if bytes > 0 => {}
            _ => {
                return Err(invalid(
                    &format!("{path}.memory"),
                    format!("{memory:?} is not a quantity such as 512Mi or 8Gi"),
                ))
            }
        }
    }
    if let Some(replicas) = value.replicas {
        if !(0..=10_000).contains(&replicas) {
            return Err(invalid(&format!("{path}.replicas"), "must be between 0 and 10000"));
        }
    }
    Ok(())
}

pub fn spec(value: &RuntimeSpec, path: &str, sizes: &[SizeEntry]) -> Result<(), Problem> {
    if let Some(size) = &value.size {
        self::size(size, &format!("{path}.size"), sizes)?;
    }
    if let Some(resources) = &value.resources {
        self::resources(resources, &format!("{path}.resources"))?;
    }
    Ok(())
}

/// The longest `ttl_seconds` or `idle_timeout_seconds` (a year).
pub const MAX_LIFETIME_SECONDS: u64 = 31_536_000;

/// A TTL and an idle timeout are 1 s to a year; only a sandbox or an agent runtime (whose use
/// the cluster sees: commands run in it) has an idle timeout.
pub fn lifetimes(spec: &RuntimeSpec, runtime_type: RuntimeType, path: &str) -> Result<(), Problem> {
    for (field, value) in [("ttl_seconds", spec.ttl_seconds), ("idle_timeout_seconds", spec.idle_timeout_seconds)] {
        if value.is_some_and(|seconds| !(1..=MAX_LIFETIME_SECONDS).contains(&seconds)) {
            return Err(invalid(&format!("{path}.{field}"), format!("must be 1 to {MAX_LIFETIME_SECONDS} seconds")));
        }
    }
    if spec.idle_timeout_seconds.is_some() && !matches!(runtime_type, RuntimeType::Sandbox | RuntimeType::AgentRuntime)
    {
        return Err(invalid(
            &format!("{path}.idle_timeout_seconds"),
            "only sandboxes and agent runtimes have an idle timeout (the cluster sees their use)",
        ));
    }
    Ok(())
}

/// An image is a sandbox's (an OCI reference) or a VM's (a name in its node's image store);
/// vclusters have none.
pub fn image(value: Option<&str>, runtime_type: RuntimeType, path: &str) -> Result<(), Problem> {
    let Some(image) = value else { return Ok(()) };
    let starts_well = image.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit());
    match runtime_type {
        RuntimeType::Vcluster => Err(invalid(path, "a vcluster starts from no image")),
        RuntimeType::Vm => {
            let ok = image.len() <= 63
                && starts_well
                && image.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
            if ok {
                Ok(())
            } else {
                Err(invalid(
                    path,
                    "a VM image is named by 1-63 of [a-z0-9._-], as `runtimeai vm-image import` named it",
                ))
            }
        }
        RuntimeType::Sandbox | RuntimeType::AgentRuntime => {
            let ok = image.len() <= 255
                && starts_well
                && image.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:/@-".contains(&b));
            if ok {
                Ok(())
            } else {
                Err(invalid(
                    path,
                    "an image is `busybox` or a registry's reference such as registry.example.com/team/tool:1.2",
                ))
            }
        }
    }
}

/// Largest cloud-init user data.
pub const MAX_USER_DATA_BYTES: usize = 64 << 10;

/// Cloud-init data is a VM's: user data up to 64 KiB, up to 32 SSH public keys of one line each.
pub fn cloud_init(spec: &RuntimeSpec, runtime_type: RuntimeType, path: &str) -> Result<(), Problem> {
    let given = spec.user_data.is_some() || spec.ssh_authorized_keys.is_some();
    if given && runtime_type != RuntimeType::Vm {
        let field = if spec.user_data.is_some() { "user_data" } else { "ssh_authorized_keys" };
        return Err(invalid(&format!("{path}.{field}"), "only VMs take cloud-init data"));
    }
    if spec.user_data.as_ref().is_some_and(|data| data.len() > MAX_USER_DATA_BYTES) {
        return Err(invalid(&format!("{path}.user_data"), format!("at most {MAX_USER_DATA_BYTES} bytes")));
    }
    let keys = spec.ssh_authorized_keys.as_deref().unwrap_or_default();
    if keys.len() > 32 {
        return Err(invalid(&format!("{path}.ssh_authorized_keys"), "at most 32 keys"));
    }
    for (i, key) in keys.iter().enumerate() {
        let one_line = !key.is_empty() && key.len() <= 8192 && !key.contains(['\n', '\r', '\0']);
        if !one_line || !["ssh-", "ecdsa-", "sk-"].iter().any(|kind| key.starts_with(kind)) {
            return Err(invalid(&format!("{path}.ssh_authorized_keys[{i}]"), "an OpenSSH public key on one line"));
        }
    }
    Ok(())
}

/// Label keys and values are of Kubernetes' characters; how long they may be, and how many a
/// runtime may have, are cluster settings (`limits`, checked with the runtime).
pub fn labels(value: &std::collections::BTreeMap<String, Option<String>>, path: &str) -> Result<(), Problem> {
    for (key, val) in value {
        let key_ok =
            !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
        if !key_ok {
            return Err(invalid(&format!("{path}.{key}"), "label keys are 1 or more characters of [A-Za-z0-9-_./]"));
        }
        if let Some(val) = val {
            if !val.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
                return Err(invalid(&format!("{path}.{key}"), "label values are characters of [A-Za-z0-9-_.]"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_like_kubernetes() {
        assert_eq!(quantity_bytes("512Mi"), Some(512 << 20));
        assert_eq!(quantity_bytes("8Gi"), Some(8 << 30));
        assert_eq!(quantity_bytes("1G"), Some(1_000_000_000));
        assert_eq!(quantity_bytes("lots"), None);
        assert_eq!(quantity_bytes("12Qi"), None);
        assert_eq!(quantity_bytes(""), None);
    }

    #[test]
    fn bad_values_are_422_with_their_path() {
        let bad = ResourceProfile { replicas: Some(-1), ..Default::default() };
        let problem = resources(&bad, "$.resources").unwrap_err();
        assert_eq!(problem.status, 422);
        assert_eq!(problem.errors[0].path, "$.resources.replicas");
        let problem = size("huge", "$.size", &runtimeai_model::default_sizes()).unwrap_err();
        assert!(problem.detail.contains("small, medium, large, xlarge"), "{}", problem.detail);
        let memory = ResourceProfile { memory: Some("lots".into()), ..Default::default() };
        assert_eq!(resources(&memory, "$").unwrap_err().errors[0].path, "$.memory");
    }
}
