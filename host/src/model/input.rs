//! A step's `input` mapping: any JSON value in which a string `${input...}`
//! or `${steps.ID.output...}` stands for that value, and a string with such
//! references inside other text is interpolated. `$${` writes a literal `${`.

use serde_json::{Map, Value};

/// A parsed `input` mapping, resolved against the flow's input and the
/// outputs of the steps it references.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Template {
    /// A value with no references in it.
    Literal(Value),
    /// A string that is exactly one reference: replaced by the value itself.
    Ref(Ref),
    /// A string with references inside text: the result is a string.
    Text(Vec<Part>),
    Array(Vec<Template>),
    Object(Vec<(String, Template)>),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Part {
    Text(String),
    Ref(Ref),
}

/// `${input.a.b}` or `${steps.ID.output.a.b}`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ref {
    pub(crate) source: Source,
    pub(crate) path: Vec<String>,
    /// The reference as written, for error messages.
    pub(crate) text: String,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Source {
    Input,
    Step(String),
}

impl Template {
    /// Parses a mapping; the error says which reference is malformed and why.
    pub(crate) fn parse(value: &Value) -> Result<Template, String> {
        Ok(match value {
            Value::String(s) => parse_string(s)?,
            Value::Array(items) => {
                let items = items.iter().map(Template::parse).collect::<Result<Vec<_>, _>>()?;
                if items.iter().all(|t| matches!(t, Template::Literal(_))) {
                    Template::Literal(value.clone())
                } else {
                    Template::Array(items)
                }
            }
            Value::Object(fields) => {
                let fields = fields
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), Template::parse(v)?)))
                    .collect::<Result<Vec<_>, String>>()?;
                if fields.iter().all(|(_, t)| matches!(t, Template::Literal(_))) {
                    Template::Literal(value.clone())
                } else {
                    Template::Object(fields)
                }
            }
            other => Template::Literal(other.clone()),
        })
    }

    /// Every reference in the mapping.
    pub(crate) fn refs(&self) -> Vec<&Ref> {
        let mut out = Vec::new();
        self.collect_refs(&mut out);
        out
    }

    fn collect_refs<'a>(&'a self, out: &mut Vec<&'a Ref>) {
        match self {
            Template::Literal(_) => {}
            Template::Ref(r) => out.push(r),
            Template::Text(parts) => out.extend(parts.iter().filter_map(|p| match p {
                Part::Ref(r) => Some(r),
                Part::Text(_) => None,
            })),
            Template::Array(items) => items.iter().for_each(|t| t.collect_refs(out)),
            Template::Object(fields) => fields.iter().for_each(|(_, t)| t.collect_refs(out)),
        }
    }

    /// The value, with every reference replaced; `lookup` gives a source's value.
    pub(crate) fn resolve<'v>(
        &self,
        lookup: &impl Fn(&Source) -> Option<&'v Value>,
    ) -> Result<Value, String> {
        Ok(match self {
            Template::Literal(v) => v.clone(),
            Template::Ref(r) => r.resolve(lookup)?.clone(),
            Template::Text(parts) => {
                let mut text = String::new();
                for part in parts {
                    match part {
                        Part::Text(t) => text.push_str(t),
                        Part::Ref(r) => match r.resolve(lookup)? {
                            Value::String(s) => text.push_str(s),
                            other => text.push_str(&other.to_string()),
                        },
                    }
                }
                Value::String(text)
            }
            Template::Array(items) => {
                Value::Array(items.iter().map(|t| t.resolve(lookup)).collect::<Result<_, _>>()?)
            }
            Template::Object(fields) => Value::Object(
                fields.iter().map(|(k, t)| Ok((k.clone(), t.resolve(lookup)?))).collect::<Result<
                    Map<_, _>,
                    String,
                >>(
                )?,
            ),
        })
    }
}

impl Ref {
    fn resolve<'v>(
        &self,
        lookup: &impl Fn(&Source) -> Option<&'v Value>,
    ) -> Result<&'v Value, String> {
        let mut value =
            lookup(&self.source).ok_or_else(|| format!("{}: no such value", self.text))?;
        for (depth, field) in self.path.iter().enumerate() {
            let next = match value {
                Value::Object(map) => map.get(field),
                Value::Array(items) => field.parse::<usize>().ok().and_then(|i| items.get(i)),
                _ => None,
            };
            value = next.ok_or_else(|| {
                let at = if depth == 0 {
                    String::new()
                } else {
                    format!(" at .{}", self.path[..depth].join("."))
                };
                format!(
                    "{}: the value{at} has no field `{field}` (it is {})",
                    self.text,
                    kind_of(value)
                )
            })?;
        }
        Ok(value)
    }
}

fn kind_of(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(_) => "a boolean".into(),
        Value::Number(_) => "a number".into(),
        Value::String(_) => "a string".into(),
        Value::Array(items) => format!("an array of {}", items.len()),
        Value::Object(map) => {
            let keys: Vec<&str> = map.keys().map(String::as_str).take(8).collect();
            format!("an object with fields: {}", keys.join(", "))
        }
    }
}

fn parse_string(s: &str) -> Result<Template, String> {
    if !s.contains('$') {
        return Ok(Template::Literal(Value::String(s.to_owned())));
    }
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        text.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$${") {
            text.push_str("${");
            rest = after;
        } else if let Some(after) = rest.strip_prefix("${") {
            let end =
                after.find('}').ok_or_else(|| format!("`{s}`: `${{` without a closing `}}`"))?;
            if !text.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut text)));
            }
            parts.push(Part::Ref(parse_ref(&after[..end])?));
            rest = &after[end + 1..];
        } else {
            text.push('$');
            rest = &rest[1..];
        }
    }
    text.push_str(rest);
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    Ok(match parts.as_slice() {
        [] => Template::Literal(Value::String(String::new())),
        [Part::Ref(r)] => Template::Ref(r.clone()),
        [Part::Text(t)] => Template::Literal(Value::String(t.clone())),
        _ => Template::Text(parts),
    })
}

fn parse_ref(inner: &str) -> Result<Ref, String> {
    let text = format!("${{{inner}}}");
    let segments: Vec<&str> = inner.trim().split('.').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(format!("`{text}`: an empty name between dots"));
    }
    let (source, path) = match segments.as_slice() {
        ["input", path @ ..] => (Source::Input, path),
        ["steps", id, "output", path @ ..] => (Source::Step((*id).to_owned()), path),
        ["steps", id, ..] => {
            return Err(format!(
                "`{text}`: write `${{steps.{id}.output}}` (optionally with `.field`s after it)"
            ));
        }
        _ => {
            return Err(format!("`{text}`: a reference starts with `input` or `steps.ID.output`"));
        }
    };
    Ok(Ref { source, path: path.iter().map(|s| (*s).to_owned()).collect(), text })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lookup<'v>(input: &'v Value, orders: &'v Value) -> impl Fn(&Source) -> Option<&'v Value> {
        move |source| match source {
            Source::Input => Some(input),
            Source::Step(id) if id == "orders" => Some(orders),
            Source::Step(_) => None,
        }
    }

    #[test]
    fn a_whole_string_reference_keeps_the_value_type() {
        let t = Template::parse(&json!("${steps.orders.output.total}")).unwrap();
        let (input, orders) = (json!(null), json!({"total": 42}));
        assert_eq!(t.resolve(&lookup(&input, &orders)).unwrap(), json!(42));
    }

    #[test]
    fn references_inside_text_interpolate() {
        let t = Template::parse(
            &json!({"msg": "total ${steps.orders.output.total} for ${input.who}", "n": 1}),
        )
        .unwrap();
        let (input, orders) = (json!({"who": "ann"}), json!({"total": 42}));
        assert_eq!(
            t.resolve(&lookup(&input, &orders)).unwrap(),
            json!({"msg": "total 42 for ann", "n": 1})
        );
    }

    #[test]
    fn array_indices_and_escapes() {
        let t = Template::parse(&json!(["${input.rows.1}", "$${literal}", "costs $5"])).unwrap();
        let (input, orders) = (json!({"rows": ["a", "b"]}), json!(null));
        assert_eq!(
            t.resolve(&lookup(&input, &orders)).unwrap(),
            json!(["b", "${literal}", "costs $5"])
        );
    }

    #[test]
    fn literals_stay_literal() {
        assert_eq!(
            Template::parse(&json!({"a": [1, "x"]})).unwrap(),
            Template::Literal(json!({"a": [1, "x"]}))
        );
    }

    #[test]
    fn a_missing_field_names_the_reference_and_what_is_there() {
        let t = Template::parse(&json!("${steps.orders.output.totl}")).unwrap();
        let (input, orders) = (json!(null), json!({"total": 42}));
        let err = t.resolve(&lookup(&input, &orders)).unwrap_err();
        assert!(err.contains("${steps.orders.output.totl}") && err.contains("total"), "{err}");
    }

    #[test]
    fn malformed_references_are_errors() {
        for bad in ["${steps.orders}", "${output}", "${input..a}", "${input"] {
            assert!(Template::parse(&json!(bad)).is_err(), "{bad} should not parse");
        }
    }
}
