//! A strict JSON parser for bodies on configured routes.
//!
//! - **Duplicate keys are rejected.** serde_json keeps the last of duplicate keys while an
//!   upstream may keep the first: `{"ssn": "enc:…", "ssn": "123-45-6789"}` would otherwise store
//!   the second value in clear.
//! - **Nesting is bounded** (a deep document is a CPU and stack DoS).
//! - **Errors never echo content**: only a position, never serde_json's message (which can
//!   quote values).

use std::cell::Cell;

use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

pub use super::json_scan::JsonError;

const NUMBER_TOKEN: &str = "$serde_json::private::Number";

#[derive(Clone, Copy)]
enum Failure {
    Duplicate,
    TooDeep,
}

struct State {
    max_depth: usize,
    failure: Cell<Option<Failure>>,
}

#[derive(Clone, Copy)]
struct Seed<'s> {
    depth: usize,
    state: &'s State,
}

impl<'s> Seed<'s> {
    fn enter<E: serde::de::Error>(&self) -> Result<Seed<'s>, E> {
        if self.depth >= self.state.max_depth {
            self.state.failure.set(Some(Failure::TooDeep));
            return Err(E::custom("too deep"));
        }
        Ok(Seed {
            depth: self.depth + 1,
            state: self.state,
        })
    }
}

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("non-finite number"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.enter()?;
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(v) = seq.next_element_seed(inner)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        let Some(first) = map.next_key::<String>()? else {
            self.enter::<A::Error>()?;
            return Ok(Value::Object(out));
        };
        // With serde_json's `arbitrary_precision` (enabled so numbers pass through exactly, even
        // beyond 64 bits), a number arrives as a one-entry map under this marker key holding the
        // number's original text. `big_numbers_pass_through_exactly` pins this behaviour.
        if first == NUMBER_TOKEN {
            let text: String = map.next_value()?;
            return text
                .parse::<serde_json::Number>()
                .map(Value::Number)
                .map_err(|_| A::Error::custom("bad number"));
        }
        let inner = self.enter()?;
        let value = map.next_value_seed(inner)?;
        out.insert(first, value);
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                self.state.failure.set(Some(Failure::Duplicate));
                return Err(A::Error::custom("duplicate key"));
            }
            let value = map.next_value_seed(inner)?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

/// Parse `bytes` as one JSON value with no duplicate keys and at most `max_depth` nesting.
pub fn parse(bytes: &[u8], max_depth: usize) -> Result<Value, JsonError> {
    let state = State {
        max_depth,
        failure: Cell::new(None),
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let result = Seed {
        depth: 0,
        state: &state,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|_| v));
    result.map_err(|e| match state.failure.get() {
        Some(Failure::TooDeep) => JsonError::TooDeep(max_depth),
        Some(Failure::Duplicate) => JsonError::DuplicateKey {
            line: e.line(),
            column: e.column(),
        },
        None => JsonError::Syntax {
            line: e.line(),
            column: e.column(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_json_and_keeps_order() {
        let v = parse(br#"{"b":1,"a":[true,null,"x",1.5,-3]}"#, 8).unwrap();
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"b":1,"a":[true,null,"x",1.5,-3]}"#
        );
    }

    #[test]
    fn big_numbers_pass_through_exactly() {
        let text = r#"{"big":123456789012345678901234567890,"f":-4.8015304084389446e+234,"x":1.10,"e":1e+2}"#;
        let v = parse(text.as_bytes(), 8).unwrap();
        assert_eq!(serde_json::to_string(&v).unwrap(), text);
        let again: Value = serde_json::from_slice(&serde_json::to_vec(&v["big"]).unwrap()).unwrap();
        assert_eq!(again, v["big"]);
    }

    #[test]
    fn rejects_duplicates_depth_and_garbage_without_echoing() {
        assert!(matches!(
            parse(br#"{"ssn":"a","ssn":"123-45-6789"}"#, 8),
            Err(JsonError::DuplicateKey { .. })
        ));
        assert!(matches!(
            parse(br#"{"a":{"a":{"a":1}}}"#, 2),
            Err(JsonError::TooDeep(2))
        ));
        assert!(parse(&[b'['; 10_000], 64).is_err());
        let e = parse(br#"{"ssn": 123-45-6789}"#, 8)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("6789"), "{e}");
        assert!(parse(b"{} x", 8).is_err());
        assert!(parse(b"\"\xff\"", 8).is_err());
    }
}
