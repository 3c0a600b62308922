//! Every SQL statement the worker runs is a string literal (or a `const` one) with bound
//! parameters: no statement is built from data. The exceptions, `CREATE DATABASE` and the
//! demo's `DROP DATABASE` (identifiers cannot be bound), quote their name from the
//! configuration as an identifier.

use std::path::Path;

fn rust_files(directory: &Path, found: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(directory).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            found.push(path);
        }
    }
}

#[test]
fn every_statement_is_a_literal_with_bound_parameters() {
    let mut files = Vec::new();
    rust_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let mut statements = 0;
    let mut built = Vec::new();
    for file in files {
        let source = std::fs::read_to_string(&file).unwrap();
        for call in ["query(", "query_as(", "query_scalar(", "raw_sql("] {
            for (at, _) in source.match_indices(&format!("sqlx::{call}")) {
                statements += 1;
                let argument = source[at + "sqlx::".len() + call.len()..].trim_start();
                let constant: String = argument
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                    .collect();
                let literal = argument.starts_with('"')
                    || argument.starts_with("r#\"")
                    || (!constant.is_empty()
                        && source.contains(&format!("const {constant}: &str =")));
                let quoted_identifier = argument.starts_with("&statement")
                    && (source.contains(
                        r#"format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""))"#,
                    ) || source.contains(
                        r#""DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
        name.replace('"', "\"\"")"#,
                    ));
                if !literal && !quoted_identifier {
                    let line = source[..at].lines().count() + 1;
                    built.push(format!("{}:{line}", file.display()));
                }
            }
        }
    }
    assert!(
        statements > 10,
        "the scan found the statements ({statements})"
    );
    assert!(built.is_empty(), "statements built at run time: {built:?}");
}
