//! [`Json`]: a JSON document kept as its text. A step's output is checked
//! once, when the step returns it, and then shared: its dependents get the
//! same text as their input (no tree is built, no copy is made per
//! dependent), and a summary embeds it as it is. A tree of a large array
//! costs ten to twenty times its text; this is why outputs are not trees.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use sha2::{Digest as _, Sha256};

/// A valid JSON document, as text, cheap to clone.
///
/// The box inside the `Arc` is the text's own allocation: checking a
/// step's output (a `String` with no surrounding whitespace) copies
/// nothing.
#[derive(Clone)]
pub struct Json(Arc<Box<RawValue>>);

impl Json {
    /// `text`, if it is one valid JSON document nested at most 127 deep
    /// (what a tree of it can be built from: serde_json's own limit).
    pub fn parse(text: String) -> Result<Json, serde_json::Error> {
        if !within_depth(text.as_bytes()) {
            let message = format!("recursion limit exceeded: nested deeper than {MAX_DEPTH}");
            return Err(<serde_json::Error as serde::de::Error>::custom(message));
        }
        Ok(Json(Arc::new(RawValue::from_string(text)?)))
    }

    /// A value's text.
    pub fn from_value(value: &Value) -> Json {
        // A `Value` always serializes, and always to valid JSON.
        let raw = serde_json::value::to_raw_value(value).unwrap_or_else(|_| null());
        Json(Arc::new(raw))
    }

    /// `null`.
    pub fn null() -> Json {
        Json(Arc::new(null()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The text's length in bytes.
    pub fn len(&self) -> usize {
        self.0.get().len()
    }

    /// Whether the text is empty (never: a document is at least `0`).
    pub fn is_empty(&self) -> bool {
        self.0.get().is_empty()
    }

    /// The document as a tree, for a caller who needs its parts.
    pub fn value(&self) -> Value {
        // Checked when it was made, so it parses.
        serde_json::from_str(self.as_str()).unwrap_or(Value::Null)
    }

    /// `{"sha256": …, "bytes": …}`: what identifies this document where it
    /// is too large to keep.
    pub fn digest(&self) -> Json {
        let sha256 = hex::encode(Sha256::digest(self.as_str().as_bytes()));
        Json::from_value(&serde_json::json!({ "sha256": sha256, "bytes": self.len() }))
    }

    /// Whether two are the same allocation (a dependent's input shared
    /// with its dependency's output).
    pub fn shares(&self, other: &Json) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// `{"id": doc, …}` built from the texts, without parsing them: the
    /// input of a step that needs several others.
    pub fn object<'a>(fields: impl IntoIterator<Item = (&'a str, &'a Json)>) -> Json {
        let mut text = String::from("{");
        for (n, (key, value)) in fields.into_iter().enumerate() {
            if n > 0 {
                text.push(',');
            }
            // A string always serializes.
            text.push_str(&serde_json::to_string(key).unwrap_or_default());
            text.push(':');
            text.push_str(value.as_str());
        }
        text.push('}');
        // Valid JSON pieces joined as JSON make valid JSON.
        Json::parse(text).unwrap_or_else(|_| Json::null())
    }
}

/// How deep arrays and objects may nest: serde_json parses a tree no deeper.
const MAX_DEPTH: usize = 127;

/// Whether `text` nests arrays and objects at most [`MAX_DEPTH`] deep, by a
/// single pass that skips strings (the validation that follows checks the
/// rest).
fn within_depth(text: &[u8]) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &byte in text {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

fn null() -> Box<RawValue> {
    // "null" is valid JSON.
    RawValue::from_string("null".to_owned()).unwrap_or_else(|_| unreachable!("null is JSON"))
}

impl fmt::Debug for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for Json {
    fn eq(&self, other: &Json) -> bool {
        self.shares(other) || self.as_str() == other.as_str()
    }
}

impl From<Value> for Json {
    fn from(value: Value) -> Json {
        Json::from_value(&value)
    }
}

impl Serialize for Json {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Json, D::Error> {
        Ok(Json(Arc::new(Box::<RawValue>::deserialize(deserializer)?)))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn text_is_checked_once_and_embedded_as_it_is() {
        assert!(Json::parse("{not json".into()).is_err());
        let doc = Json::parse("{\"b\": [1, 2],  \"a\": 1}".into()).unwrap();
        assert_eq!(doc.value(), json!({"a": 1, "b": [1, 2]}));
        let report = serde_json::to_string(&json!({"output": 1})).unwrap();
        assert_eq!(report, "{\"output\":1}");
        #[derive(Serialize, Deserialize)]
        struct Report {
            output: Json,
        }
        let text = serde_json::to_string(&Report { output: doc.clone() }).unwrap();
        assert_eq!(text, "{\"output\":{\"b\": [1, 2],  \"a\": 1}}");
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back.output, doc);
    }

    #[test]
    fn an_object_of_documents_is_built_from_their_texts() {
        let a = Json::from_value(&json!([1, "x"]));
        let b = Json::parse("\"q\\\"uote\"".into()).unwrap();
        let joined = Json::object([("a", &a), ("we\"ird", &b)]);
        assert_eq!(joined.value(), json!({"a": [1, "x"], "we\"ird": "q\"uote"}));
        assert_eq!(Json::object([]).as_str(), "{}");
    }

    #[test]
    fn nesting_deeper_than_a_tree_can_hold_is_refused() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let ok = Json::parse(deep(127)).unwrap();
        assert_eq!(ok.value().as_array().map(Vec::len), Some(1));
        let err = Json::parse(deep(128)).unwrap_err();
        assert!(err.to_string().contains("recursion limit"), "{err}");
        // Brackets inside strings are text.
        assert!(Json::parse(format!("\"{}\\\"\"", "[".repeat(500))).is_ok());
    }

    #[test]
    fn a_digest_names_the_text_by_hash_and_size() {
        let doc = Json::from_value(&json!("abc"));
        let digest = doc.digest().value();
        assert_eq!(digest["bytes"], 5);
        assert_eq!(digest["sha256"].as_str().unwrap().len(), 64);
        assert!(doc.shares(&doc.clone()));
    }
}
