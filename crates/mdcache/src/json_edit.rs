//! `--set a.b=value` / `--unset a.b` edits of a JSON document.

use metadatacache::Error;
use serde_json::{Map, Value};

/// One edit parsed from the command line.
#[derive(Debug, Clone, PartialEq)]
pub enum Edit {
    Set(Vec<String>, Value),
    Unset(Vec<String>),
}

/// The deepest nesting a document may have: JSON readers (this one among
/// them) refuse deeper documents, so a deeper edit could not be read back.
const MAX_DEPTH: usize = 127;

fn field_path(spec: &str) -> Result<Vec<String>, Error> {
    let parts: Vec<String> = spec.split('.').map(str::to_owned).collect();
    if parts.iter().any(String::is_empty) {
        return Err(Error::invalid_input(format!(
            "bad field {spec:?}: expected names separated by dots, like a.b.c"
        )));
    }
    if parts.len() > MAX_DEPTH {
        return Err(Error::invalid_input(format!(
            "field path of {} names: a document may nest at most {MAX_DEPTH} levels",
            parts.len()
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

/// Applies `edits` to `doc` in order; fails if the result nests deeper
/// than a JSON reader reads back.
pub fn apply(doc: Value, edits: &[Edit]) -> Result<Value, Error> {
    let doc = apply_all(doc, edits)?;
    let levels = depth(&doc);
    if levels > MAX_DEPTH {
        return Err(Error::invalid_input(format!(
            "the edited document would nest {levels} levels deep; at most {MAX_DEPTH} can be read \
             back"
        )));
    }
    Ok(doc)
}

/// How deep `v` nests: 0 for a scalar, 1 for a flat array or object.
/// Recursion is bounded: edits' paths and values are at most
/// [`MAX_DEPTH`] deep each, and stored documents were read by a parser
/// with the same limit.
fn depth(v: &Value) -> usize {
    match v {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn apply_all(mut doc: Value, edits: &[Edit]) -> Result<Value, Error> {
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
                    // Keeps the other keys in their order.
                    obj.shift_remove(last);
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

    /// The limit is the reader's: a document `MAX_DEPTH` deep reads back, one
    /// level more does not, and edits that would make one are refused.
    #[test]
    fn documents_stay_readable() {
        let nested = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels));
        assert!(serde_json::from_str::<Value>(&nested(MAX_DEPTH)).is_ok());
        assert!(serde_json::from_str::<Value>(&nested(MAX_DEPTH + 1)).is_err());
        let path = |names: usize| vec!["a"; names].join(".");
        let doc = apply(
            json!({}),
            &[parse_set(&format!("{}=1", path(MAX_DEPTH))).unwrap()],
        );
        assert_eq!(depth(&doc.unwrap()), MAX_DEPTH);
        let err = parse_set(&format!("{}=1", path(MAX_DEPTH + 1))).unwrap_err();
        assert!(err.to_string().contains("at most 127"), "{err}");
        // A path and a nested value that are each within the limit.
        let set = parse_set(&format!("{}={}", path(100), nested(50))).unwrap();
        let err = apply(json!({}), &[set]).unwrap_err();
        assert!(err.to_string().contains("150 levels"), "{err}");
    }

    /// Numbers are kept as written and keys in their order.
    #[test]
    fn untouched_fields_are_kept_exactly() {
        let doc: Value =
            serde_json::from_str(r#"{"z":1,"id":123456789012345678901,"f":0.1,"a":2}"#).unwrap();
        let edits = [parse_set("theme=dark").unwrap(), parse_unset("z").unwrap()];
        let text = serde_json::to_string(&apply(doc, &edits).unwrap()).unwrap();
        assert_eq!(
            text,
            r#"{"id":123456789012345678901,"f":0.1,"a":2,"theme":"dark"}"#
        );
    }
}
