//! docs/cost-model.md documents every term of the cost and memory model under the name the code
//! uses, and names no term the code does not have.

use std::collections::BTreeSet;
use std::path::Path;

fn read(rel: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    std::fs::read_to_string(root.join(rel)).unwrap()
}

/// `pub fn` names at the top level of a source file, and those inside `impl LayerTerms` prefixed
/// with `LayerTerms::`; the test module is skipped.
fn code_terms(source: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut in_layer_terms = false;
    for line in source.lines() {
        if line.starts_with("#[cfg(test)]") {
            break;
        }
        if line.starts_with("impl LayerTerms") {
            in_layer_terms = true;
        } else if line.starts_with('}') {
            in_layer_terms = false;
        }
        let name = |rest: &str| rest.split(['(', '<']).next().unwrap().to_string();
        if let Some(rest) = line.strip_prefix("pub fn ") {
            out.insert(name(rest));
        } else if let Some(rest) = line.strip_prefix("    pub fn ") {
            if in_layer_terms {
                out.insert(format!("LayerTerms::{}", name(rest)));
            }
        }
    }
    out
}

fn documented_terms(doc: &str) -> BTreeSet<String> {
    doc.lines()
        .filter(|l| l.starts_with("### `") || l.starts_with("#### `"))
        .map(|l| l.split('`').nth(1).unwrap().to_string())
        .collect()
}

#[test]
fn cost_model_doc_and_code_name_the_same_terms() {
    let mut code = code_terms(&read("planner/src/cost.rs"));
    code.extend(code_terms(&read("planner/src/memory.rs")));
    let doc = documented_terms(&read("docs/cost-model.md"));
    let missing: Vec<_> = code.difference(&doc).collect();
    let unknown: Vec<_> = doc.difference(&code).collect();
    assert!(
        missing.is_empty(),
        "terms in the code but not in docs/cost-model.md: {missing:?}"
    );
    assert!(
        unknown.is_empty(),
        "terms in docs/cost-model.md but not in the code: {unknown:?}"
    );
    assert!(code.len() > 40, "{code:?}");
}
