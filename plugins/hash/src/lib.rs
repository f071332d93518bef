//! The SHA-256 digest of a value: of a string's bytes, or of any other JSON
//! value's compact serialisation (object keys sorted, so equal values hash
//! equally).

use qflow_sdk::serde::Serialize;
use qflow_sdk::serde_json::{self, Value};
use qflow_sdk::{Error, Step, export_step};
use sha2::{Digest, Sha256};

#[derive(Serialize)]
#[serde(crate = "qflow_sdk::serde")]
struct Output {
    sha256: String,
    bytes: usize,
}

struct Hash;

impl Step for Hash {
    type Config = ();
    type Input = Value;
    type Output = Output;

    fn new(_config: ()) -> Result<Self, Error> {
        Ok(Hash)
    }

    fn run(&mut self, input: Value) -> Result<Output, Error> {
        let bytes = match input {
            Value::String(text) => text.into_bytes(),
            other => serde_json::to_vec(&other).map_err(Error::bad_input)?,
        };
        Ok(Output { sha256: hex::encode(Sha256::digest(&bytes)), bytes: bytes.len() })
    }
}

export_step!(Hash, "Computes the SHA-256 digest of a value");
