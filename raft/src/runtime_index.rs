//! Runtimes by tenant, by type and by state, with how many each value has: a filtered list
//! reads the runtimes of its smallest matching set instead of every runtime, and a tenant's
//! count is what its quota (`limits.runtimes_per_tenant`) is checked against.
//!
//! [`CF_RUNTIMES_BY_FIELD`] holds `field=value \0 runtime id` → (), [`CF_RUNTIME_COUNTS`]
//! `field=value` → count. Apply keeps both with every runtime it writes ([`reindex`]).

use runtimeai_model::{Runtime, RuntimeState, RuntimeType};

use crate::store::{CF_RUNTIMES_BY_FIELD, CF_RUNTIME_COUNTS};
use crate::txn::Txn;
use crate::types::StorageError;

/// A value of an indexed field that a list may filter on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeField {
    Tenant(String),
    Type(RuntimeType),
    State(RuntimeState),
}

impl RuntimeField {
    /// The fields a runtime is indexed under (a runtime of no tenant has no tenant entry).
    pub(crate) fn of(runtime: &Runtime) -> Vec<RuntimeField> {
        let mut fields = vec![RuntimeField::Type(runtime.runtime_type), RuntimeField::State(runtime.state)];
        if let Some(tenant) = &runtime.tenant_id {
            fields.push(RuntimeField::Tenant(tenant.clone()));
        }
        fields
    }

    /// Whether `runtime` has this value.
    pub fn matches(&self, runtime: &Runtime) -> bool {
        match self {
            RuntimeField::Tenant(tenant) => runtime.tenant_id.as_deref() == Some(tenant.as_str()),
            RuntimeField::Type(runtime_type) => runtime.runtime_type == *runtime_type,
            RuntimeField::State(state) => runtime.state == *state,
        }
    }

    /// Its key in [`CF_RUNTIME_COUNTS`]: `field=value`.
    pub(crate) fn count_key(&self) -> Vec<u8> {
        match self {
            RuntimeField::Tenant(tenant) => format!("{TENANT_COUNT_PREFIX}{tenant}"),
            RuntimeField::Type(runtime_type) => format!("{TYPE_COUNT_PREFIX}{}", runtime_type.as_str()),
            RuntimeField::State(state) => format!("state={}", state.as_str()),
        }
        .into_bytes()
    }

    /// The prefix of its runtimes' keys in [`CF_RUNTIMES_BY_FIELD`]: `field=value \0`.
    pub(crate) fn index_prefix(&self) -> Vec<u8> {
        let mut prefix = self.count_key();
        prefix.push(0);
        prefix
    }

    fn index_key(&self, runtime_id: &str) -> Vec<u8> {
        [self.index_prefix(), runtime_id.as_bytes().to_vec()].concat()
    }
}

/// How the keys of tenants' counts begin.
pub(crate) const TENANT_COUNT_PREFIX: &str = "tenant=";
/// How the keys of types' counts begin.
pub(crate) const TYPE_COUNT_PREFIX: &str = "type=";

/// How many runtimes have `field`'s value, as this batch sees it.
pub(crate) fn count(txn: &Txn<'_>, field: &RuntimeField) -> Result<u64, StorageError> {
    Ok(txn.get::<u64>(CF_RUNTIME_COUNTS, &field.count_key())?.unwrap_or(0))
}

/// Moves runtime `id` from the entries of `before` to those of `after` (`None`: not stored),
/// and their counts with it. Values in both stay as they are.
pub(crate) fn reindex(
    txn: &mut Txn<'_>,
    id: &str,
    before: Option<&[RuntimeField]>,
    after: Option<&[RuntimeField]>,
) -> Result<(), StorageError> {
    let (before, after) = (before.unwrap_or_default(), after.unwrap_or_default());
    for field in before.iter().filter(|field| !after.contains(field)) {
        txn.delete(CF_RUNTIMES_BY_FIELD, field.index_key(id));
        let left = count(txn, field)?.saturating_sub(1);
        if left == 0 {
            txn.delete(CF_RUNTIME_COUNTS, field.count_key());
        } else {
            txn.put(CF_RUNTIME_COUNTS, field.count_key(), &left)?;
        }
    }
    for field in after.iter().filter(|field| !before.contains(field)) {
        txn.put(CF_RUNTIMES_BY_FIELD, field.index_key(id), &())?;
        let now = count(txn, field)? + 1;
        txn.put(CF_RUNTIME_COUNTS, field.count_key(), &now)?;
    }
    Ok(())
}
