//! A configured JSONPath of an encrypted field: parsed and compiled once, from the
//! configuration; evaluated by the JSON transform. A leaf: it knows JSON, not the proxy.

use serde_json::Value;

use crate::transform::json_scan::{self, CompiledPath, Step};

/// The path could not run on a value (it is not serializable JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CannotEvaluate;

/// A configured JSONPath. Filters, slices and functions are refused: whether they select a value
/// can depend on other (possibly encrypted) values, so a write and a read could disagree.
#[derive(Debug, Clone)]
pub struct FieldPath {
    source: String,
    /// The path, evaluated on scanned bodies ([`json_scan`]) and, through their
    /// serialization, on `Value`s.
    pub(crate) compiled: CompiledPath,
}

impl FieldPath {
    pub fn parse(source: &str) -> Result<FieldPath, String> {
        if !source.starts_with('$') {
            return Err(format!("{source:?} must start with '$'"));
        }
        if source.trim() == "$" {
            return Err("\"$\" would encrypt the whole document; name the fields".into());
        }
        let mut quote: Option<char> = None;
        let mut escaped = false;
        for c in source.chars() {
            match quote {
                Some(q) => {
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == q {
                        quote = None;
                    }
                }
                None => match c {
                    '\'' | '"' => quote = Some(c),
                    '?' | '(' | ':' | '@' => {
                        return Err(format!(
                            "{source:?}: filters, slices and functions are not supported in encrypted field paths"
                        ));
                    }
                    _ => {}
                },
            }
        }
        let query = jsonpath_rust::parser::parse_json_path(source)
            .map_err(|e| format!("{source:?} is not a valid JSONPath: {e}"))?;
        let compiled = CompiledPath::compile(&query).map_err(|e| format!("{source:?}: {e}"))?;
        Ok(FieldPath {
            source: source.to_string(),
            compiled,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether two of `paths` may match nested values (one inside the other's match).
    pub fn any_may_nest(paths: &[FieldPath]) -> bool {
        (0..paths.len()).any(|i| {
            (i + 1..paths.len())
                .any(|j| json_scan::may_overlap(&paths[i].compiled, &paths[j].compiled))
        })
    }

    /// The member names a query parameter would call the encrypted values by.
    pub fn last_names(&self) -> Vec<&str> {
        self.compiled.last_names()
    }

    /// Locations of the matches in `doc`, shallowest first, none inside another. One matcher
    /// serves both paths: the compiled path ([`CompiledPath::locate`]), run here on the
    /// value's serialization. A value it cannot run on is an error, never "no match": on the
    /// way to storage that would leave a field in clear.
    pub fn locate(&self, doc: &Value) -> Result<Vec<Vec<Step>>, CannotEvaluate> {
        let cannot = || CannotEvaluate;
        let text = serde_json::to_vec(doc).map_err(|_| cannot())?;
        let scanned = json_scan::scan(&text, usize::MAX).map_err(|_| cannot())?;
        Ok(scanned.locations(&self.compiled.locate(&scanned, scanned.root())))
    }

    /// Whether the path matches anything in `doc` (or cannot tell: then it may).
    pub fn matches_any(&self, doc: &Value) -> bool {
        self.locate(doc).map_or(true, |l| !l.is_empty())
    }
}
