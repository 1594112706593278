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
pub const FORMAT_VERSION: u32 = 3;

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
pub fn encode<T: Serialize + ?Sized>(what: &'static str, value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|source| CodecError::Encode { what, source })
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
    fn truncated_input_is_an_error_not_a_panic() {
        let bytes = encode("string", &"a fairly long string".to_string()).unwrap();
        assert!(decode::<String>("string", &bytes[..bytes.len() / 2]).is_err());
    }
}
