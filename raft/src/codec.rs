//! The one place that turns replicated data into bytes: raft log entries, state-machine
//! records, snapshots and the payloads of node-to-node RPCs.
//!
//! Encoding is serde + bincode 2.0.1 (pinned: 3.0.0 on crates.io is an empty tombstone).
//! Switching to another format (postcard, wincode) touches this file and bumps
//! [`FORMAT_VERSION`].

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Version of everything this module writes to disk or to the wire. Stored in every data
/// directory and every snapshot; a node refuses data written under another version.
/// 4: a log entry holds its command as the command's own encoding, length-prefixed
/// ([`crate::command::LoggedCommand`]). 5: an event is stored without its id, runtime id and
/// sequence number, which its key holds (`crate::apply::events::EventRecord`). 6: a snapshot is a
/// stream of length-prefixed records (`crate::snapshot_file`), not one bincode value. 7: API
/// keys (their column family and commands), `Actor::Service`, `Op::CancelOperation`, and an
/// executor's report whose fencing token is not optional. 8: `LifecycleAction::Relabel`, and
/// `Op::PatchLabels` carries the relabel as an operation. 9: a snapshot ends with the CRC-32 of
/// its bytes; the index of runtimes by node (`runtimes_by_node`). 10: the indexes of runtimes by
/// tenant, type and state with their counts, `ClusterSettings::limits`, `Rejection::LimitExceeded`,
/// a membership change audited as a `MembershipChange`, a rule's kind as a `RuleKind` and a
/// decision's action as an `ActionKind`, not text, and no `Op::UpdateRuntime` (no request made it;
/// a runtime changes by its lifecycle and its labels). 11: a policy rule's selector and
/// parameters are typed (`runtimeai_model::Selector`, `RuleParams`), not JSON text;
/// `RuntimeSpec::image`; exec (`ActionKind::Exec`, `LifecycleAction::Exec`, `EventType::RuntimeExec`,
/// `Op::RecordExec`). 12: pause and resume (`ActionKind::Pause`/`Resume`, their
/// `LifecycleAction`s, `RuntimeState::Paused`); a spec's `ttl_seconds` and
/// `idle_timeout_seconds`, a runtime's `expires_at` and `last_activity_at`,
/// `EventType::RuntimeExpired` and `Op::ExpireRuntime`; `LifecycleAction::Exec` carries the whole
/// `ExecRequest`; `rollout_restart` and `tune_policy` (`ActionKind`, `LifecycleAction`),
/// `Runtime::policy`, `RuntimeSignals::cpu_measured`. 13: migration (`ActionKind::Migrate`,
/// `LifecycleAction::Migrate`, `EventType::RuntimeMigrated`). 14: the global event feed
/// (`event_feed`: every event's position → its stream). 15: webhooks (`webhooks`,
/// `webhook_deliveries`, the delivery lease, their ops; `ClusterSettings::
/// webhook_allowed_destinations`, `Limits::webhooks`), observers (`ActionKind::AttachObserver`/
/// `DetachObserver`, their `LifecycleAction`s). 16: `Webhook::ends_with` (an observer ends with
/// its runtime's deletion).
pub const FORMAT_VERSION: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: bincode::error::EncodeError,
    },
    #[error("cannot decode {what}: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: bincode::error::DecodeError,
    },
    #[error("{what} has {trailing} unexpected trailing bytes")]
    Trailing { what: &'static str, trailing: usize },
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// Encodes `value`; `what` names it in errors.
///
/// The bytes are written to a buffer the thread keeps and copied out once at their final size:
/// bincode's own `encode_to_vec` grows its vector from empty, one reallocation and copy per
/// doubling, which showed in profiles as a good part of apply's allocations.
pub fn encode<T: Serialize + ?Sized>(what: &'static str, value: &T) -> Result<Vec<u8>, CodecError> {
    let encoded = SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut scratch) => {
            scratch.clear();
            let written = bincode::serde::encode_into_writer(value, ScratchWriter(&mut scratch), config());
            let bytes = written.map(|()| scratch.to_vec());
            if scratch.capacity() > SCRATCH_KEPT {
                *scratch = Vec::new();
            }
            bytes
        }
        // A `Serialize` that encodes something itself while being encoded.
        Err(_) => bincode::serde::encode_to_vec(value, config()),
    });
    encoded.map_err(|source| CodecError::Encode { what, source })
}

/// How many bytes [`encode`] would make of `value`, counted without keeping them.
pub fn encoded_len<T: Serialize + ?Sized>(what: &'static str, value: &T) -> Result<usize, CodecError> {
    let mut counter = Counter(0);
    bincode::serde::encode_into_writer(value, &mut counter, config())
        .map_err(|source| CodecError::Encode { what, source })?;
    Ok(counter.0)
}

struct Counter(usize);

impl bincode::enc::write::Writer for &mut Counter {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0 += bytes.len();
        Ok(())
    }
}

thread_local! {
    /// [`encode`]'s buffer.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A thread keeps its encoding buffer up to this size; a larger one (a snapshot's) is freed.
const SCRATCH_KEPT: usize = 1 << 20;

struct ScratchWriter<'a>(&'a mut Vec<u8>);

impl bincode::enc::write::Writer for ScratchWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// Decodes a whole buffer as one `T`; trailing bytes are an error (they mean a format mix-up).
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, CodecError> {
    let (value, read) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|source| CodecError::Decode { what, source })?;
    if read != bytes.len() {
        return Err(CodecError::Trailing { what, trailing: bytes.len() - read });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_trailing_bytes() {
        let value = (7u64, "runtime".to_string(), Some(vec![1u8, 2, 3]));
        let mut bytes = encode("tuple", &value).unwrap();
        let back: (u64, String, Option<Vec<u8>>) = decode("tuple", &bytes).unwrap();
        assert_eq!(back, value);
        bytes.push(0);
        let err = decode::<(u64, String, Option<Vec<u8>>)>("tuple", &bytes).unwrap_err();
        assert!(matches!(err, CodecError::Trailing { trailing: 1, .. }), "{err}");
    }

    #[test]
    fn encoding_inside_an_encoding_and_after_a_large_value_gives_the_same_bytes() {
        struct EncodesItself(u32);
        impl Serialize for EncodesItself {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let inner = encode("inner", &self.0).map_err(serde::ser::Error::custom)?;
                serializer.serialize_bytes(&inner)
            }
        }
        let nested = EncodesItself(300);
        assert_eq!(encode("nested", &nested).unwrap(), direct(&nested));
        let large = vec![7u8; 2 * SCRATCH_KEPT];
        assert_eq!(encode("large", &large).unwrap(), direct(&large));
        let small = ("after", 1u64);
        assert_eq!(encode("small", &small).unwrap(), direct(&small));
    }

    /// bincode's own encoding, to compare [`encode`] with.
    fn direct<T: Serialize>(value: &T) -> Vec<u8> {
        bincode::serde::encode_to_vec(value, config()).unwrap()
    }

    #[test]
    fn capabilities_are_stored_as_the_names_they_always_were() {
        use runtimeai_model::{capability, Capability};
        let names = vec![capability("start"), capability("hibernate")];
        let bytes = encode("capabilities", &names).unwrap();
        assert_eq!(bytes, direct(&vec!["start".to_string(), "hibernate".to_string()]));
        let at = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let runtime = runtimeai_model::Runtime {
            capabilities: names,
            ..runtimeai_model::Runtime::new("rt_a", "web", runtimeai_model::RuntimeType::Vm, at)
        };
        let back: runtimeai_model::Runtime = decode("runtime", &encode("runtime", &runtime).unwrap()).unwrap();
        assert_eq!(back, runtime);
        assert!(matches!(back.capabilities[0], Capability::Borrowed("start")));
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let bytes = encode("string", &"a fairly long string".to_string()).unwrap();
        assert!(decode::<String>("string", &bytes[..bytes.len() / 2]).is_err());
    }
}
