//! How a [`Timestamp`] field serializes (`#[serde(with = "crate::timestamp")]`, or
//! `crate::timestamp::option` for an `Option`): RFC 3339 text in human-readable formats (the
//! REST API's JSON), seconds and nanoseconds since the Unix epoch in binary ones (the raft log,
//! stored records, snapshots). Formatting and parsing text in every record a command reads and
//! writes cost a loaded node a few percent of its CPU.

use serde::{de::Error as _, Deserialize, Deserializer, Serialize, Serializer};

use crate::Timestamp;

pub fn serialize<S: Serializer>(ts: &Timestamp, serializer: S) -> Result<S::Ok, S::Error> {
    if serializer.is_human_readable() {
        ts.serialize(serializer)
    } else {
        (ts.timestamp(), ts.timestamp_subsec_nanos()).serialize(serializer)
    }
}

pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Timestamp, D::Error> {
    if deserializer.is_human_readable() {
        Timestamp::deserialize(deserializer)
    } else {
        let (secs, nanos) = <(i64, u32)>::deserialize(deserializer)?;
        Timestamp::from_timestamp(secs, nanos)
            .ok_or_else(|| D::Error::custom(format!("timestamp out of range: {secs} s {nanos} ns")))
    }
}

/// A timestamp in a field of its own, so that `Option` can wrap it.
struct Field(Timestamp);

impl Serialize for Field {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize(&self.0, serializer)
    }
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize(deserializer).map(Field)
    }
}

/// The same, for an optional timestamp.
pub mod option {
    use super::*;

    pub fn serialize<S: Serializer>(ts: &Option<Timestamp>, serializer: S) -> Result<S::Ok, S::Error> {
        ts.map(Field).serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Timestamp>, D::Error> {
        Ok(Option::<Field>::deserialize(deserializer)?.map(|field| field.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Stamped {
        #[serde(with = "crate::timestamp")]
        at: Timestamp,
        #[serde(with = "crate::timestamp::option", default)]
        until: Option<Timestamp>,
    }

    fn sample() -> Stamped {
        let at = Timestamp::from_timestamp(1_790_000_000, 123_456_789).unwrap();
        Stamped { at, until: Some(at + chrono::Duration::seconds(5)) }
    }

    #[test]
    fn json_carries_rfc3339_text() {
        let json = serde_json::to_value(sample()).unwrap();
        assert_eq!(json["at"], "2026-09-21T14:13:20.123456789Z");
        assert_eq!(json["until"], "2026-09-21T14:13:25.123456789Z");
        assert_eq!(serde_json::from_value::<Stamped>(json).unwrap(), sample());
        let none: Stamped = serde_json::from_str(r#"{"at":"2026-09-21T14:13:20Z"}"#).unwrap();
        assert_eq!(none.until, None);
    }

    #[test]
    fn binary_carries_numbers_to_the_nanosecond() {
        let config = bincode::config::standard();
        for value in [sample(), Stamped { until: None, ..sample() }] {
            let bytes = bincode::serde::encode_to_vec(&value, config).unwrap();
            // At most 9 + 5 bytes of varints per timestamp (plus the option's tag), where the
            // text alone is 30.
            assert!(bytes.len() <= 29, "two numbers, not text: {} bytes", bytes.len());
            let (back, _): (Stamped, usize) = bincode::serde::decode_from_slice(&bytes, config).unwrap();
            assert_eq!(back, value);
        }
        let out_of_range = bincode::serde::encode_to_vec((i64::MAX, 0u32, 0u8), config).unwrap();
        let err = bincode::serde::decode_from_slice::<Stamped, _>(&out_of_range, config).unwrap_err();
        assert!(err.to_string().contains("timestamp out of range"), "{err}");
    }
}
