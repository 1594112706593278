use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A free-form JSON object (an intent's constraints and context, event data).
///
/// In human-readable formats (the REST API's JSON) it is the object itself. In binary formats
/// (the raft log and snapshots) it travels as JSON text, because those formats cannot describe
/// a value whose shape is only known at run time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JsonObject(pub serde_json::Map<String, serde_json::Value>);

impl JsonObject {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<serde_json::Map<String, serde_json::Value>> for JsonObject {
    fn from(map: serde_json::Map<String, serde_json::Value>) -> Self {
        JsonObject(map)
    }
}

impl Serialize for JsonObject {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        JsonText(&self.0).serialize(serializer)
    }
}

/// Any serializable value written the way a [`JsonObject`] is: itself in human-readable
/// formats, JSON text in binary ones; an object reads back as a `JsonObject`. For data built
/// from borrowed fields, without a map of copies.
pub struct JsonText<T>(pub T);

impl<T: Serialize> Serialize for JsonText<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            self.0.serialize(serializer)
        } else {
            let text = serde_json::to_string(&self.0).map_err(serde::ser::Error::custom)?;
            serializer.serialize_str(&text)
        }
    }
}

impl<'de> Deserialize<'de> for JsonObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            serde_json::Map::deserialize(deserializer).map(JsonObject)
        } else {
            let text = String::deserialize(deserializer)?;
            serde_json::from_str(&text).map(JsonObject).map_err(serde::de::Error::custom)
        }
    }
}
