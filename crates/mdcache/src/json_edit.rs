//! `--set a.b=value` / `--unset a.b` edits of a JSON document.

use metadatacache::Error;
use serde_json::{Map, Value};

/// One edit parsed from the command line.
#[derive(Debug, Clone, PartialEq)]
pub enum Edit {
    Set(Vec<String>, Value),
    Unset(Vec<String>),
}

fn field_path(spec: &str) -> Result<Vec<String>, Error> {
    let parts: Vec<String> = spec.split('.').map(str::to_owned).collect();
    if parts.iter().any(String::is_empty) {
        return Err(Error::invalid_input(format!(
            "bad field {spec:?}: expected names separated by dots, like a.b.c"
        )));
    }
    Ok(parts)
}

/// Parses `a.b=value`; the value is JSON if it parses as JSON, else a string.
pub fn parse_set(spec: &str) -> Result<Edit, Error> {
    let (field, raw) = spec
        .split_once('=')
        .ok_or_else(|| Error::invalid_input(format!("bad --set {spec:?}: expected FIELD=VALUE")))?;
    let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()));
    Ok(Edit::Set(field_path(field)?, value))
}

/// Parses `a.b`.
pub fn parse_unset(spec: &str) -> Result<Edit, Error> {
    Ok(Edit::Unset(field_path(spec)?))
}

/// Applies `edits` to `doc` in order.
pub fn apply(mut doc: Value, edits: &[Edit]) -> Result<Value, Error> {
    for edit in edits {
        match edit {
            Edit::Set(path, value) => {
                let (last, parents) = split_last(path);
                let obj = descend(&mut doc, parents, true)?.ok_or_else(|| not_object(parents))?;
                obj.insert(last.clone(), value.clone());
            }
            Edit::Unset(path) => {
                let (last, parents) = split_last(path);
                if let Some(obj) = descend(&mut doc, parents, false)? {
                    obj.remove(last);
                }
            }
        }
    }
    Ok(doc)
}

fn split_last(path: &[String]) -> (&String, &[String]) {
    // field_path never yields an empty path.
    match path.split_last() {
        Some((last, parents)) => (last, parents),
        None => unreachable!("field paths are never empty"),
    }
}

fn not_object(path: &[String]) -> Error {
    if path.is_empty() {
        Error::invalid_input("the document is not a JSON object")
    } else {
        Error::invalid_input(format!("field {:?} is not a JSON object", path.join(".")))
    }
}

/// The object at `path`, creating missing objects when `create`; `None` when
/// absent and not created.
fn descend<'a>(
    doc: &'a mut Value,
    path: &[String],
    create: bool,
) -> Result<Option<&'a mut Map<String, Value>>, Error> {
    let mut cur = doc;
    for (i, name) in path.iter().enumerate() {
        let obj = cur.as_object_mut().ok_or_else(|| not_object(&path[..i]))?;
        if !obj.contains_key(name) {
            if !create {
                return Ok(None);
            }
            obj.insert(name.clone(), Value::Object(Map::new()));
        }
        cur = match obj.get_mut(name) {
            Some(v) => v,
            None => return Ok(None),
        };
    }
    match cur.as_object_mut() {
        Some(obj) => Ok(Some(obj)),
        None => Err(not_object(path)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn set_and_unset() {
        let edits = [
            parse_set("a.b=1").unwrap(),
            parse_set("a.c=hello").unwrap(),
            parse_set("d={\"x\":[1,2]}").unwrap(),
            parse_unset("e").unwrap(),
            parse_unset("zz.yy").unwrap(),
        ];
        let doc = apply(json!({"e": true}), &edits).unwrap();
        assert_eq!(
            doc,
            json!({"a": {"b": 1, "c": "hello"}, "d": {"x": [1, 2]}})
        );
    }

    #[test]
    fn bad_specs_and_shapes() {
        assert!(parse_set("novalue").is_err());
        assert!(parse_set("a..b=1").is_err());
        let err = apply(json!({"a": 3}), &[parse_set("a.b=1").unwrap()]).unwrap_err();
        assert!(
            err.to_string().contains("\"a\" is not a JSON object"),
            "{err}"
        );
        assert!(apply(json!([1]), &[parse_set("a=1").unwrap()]).is_err());
    }
}
