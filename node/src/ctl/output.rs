//! How the CLI prints what it got: a table for people, JSON or YAML for scripts.

use serde_json::Value;

/// `-o/--output`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
    Yaml,
}

/// The columns a table shows of a kind of record: header and JSON pointer.
pub type Columns = &'static [(&'static str, &'static str)];

pub const RUNTIMES: Columns = &[
    ("ID", "/id"),
    ("NAME", "/name"),
    ("TYPE", "/type"),
    ("STATE", "/state"),
    ("TENANT", "/tenant_id"),
    ("NODE", "/placement/node_id"),
];
pub const OPERATIONS: Columns = &[
    ("ID", "/id"),
    ("RUNTIME", "/runtime_id"),
    ("KIND", "/kind"),
    ("STATUS", "/status"),
    ("PROGRESS", "/progress/percent"),
    ("BY", "/requested_by"),
];
pub const EVENTS: Columns = &[
    ("ID", "/id"),
    ("TIME", "/ts"),
    ("RUNTIME", "/runtime_id"),
    ("TYPE", "/type"),
    ("SEVERITY", "/severity"),
    ("ACTOR", "/actor_name"),
];
pub const POLICIES: Columns = &[("ID", "/id"), ("NAME", "/name"), ("TENANT", "/tenant_id"), ("SCOPE", "/scope_env")];
pub const MEMBERS: Columns = &[
    ("NODE", "/id"),
    ("ROLE", "/role"),
    ("HTTP", "/http"),
    ("GRPC", "/grpc"),
    ("SITE", "/site"),
    ("REACHABLE", "/reachable"),
];
pub const CLUSTER: Columns = &[
    ("CLUSTER", "/cluster_name"),
    ("LEADER", "/leader_id"),
    ("TERM", "/term"),
    ("APPLIED", "/last_applied"),
    ("NODE", "/node_id"),
    ("STATE", "/state"),
];

/// Prints `value` (a record, or `items` of a list, shown as rows of `columns`).
pub fn print(value: &Value, format: Format, columns: Columns) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Format::Yaml => print!("{}", serde_yaml_ng::to_string(value)?),
        Format::Table => {
            let rows: Vec<&Value> = match value.get("items").and_then(Value::as_array) {
                Some(items) => items.iter().collect(),
                None => vec![value],
            };
            print!("{}", table(&rows, columns));
        }
    }
    Ok(())
}

/// Rows under a header, each column as wide as its widest cell.
pub fn table(rows: &[&Value], columns: Columns) -> String {
    let cell = |row: &Value, pointer: &str| match row.pointer(pointer) {
        None | Some(Value::Null) => "-".to_string(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    };
    let cells: Vec<Vec<String>> = rows.iter().map(|row| columns.iter().map(|(_, p)| cell(row, p)).collect()).collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (header, _))| cells.iter().map(|row| row[i].len()).chain([header.len()]).max().unwrap_or(0))
        .collect();
    let line = |values: Vec<&str>| {
        let padded: Vec<String> = values.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut text = line(columns.iter().map(|(header, _)| *header).collect());
    for row in &cells {
        text.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_aligns_its_columns_and_marks_what_is_missing() {
        let rows = [serde_json::json!({"id": "rt_1", "name": "web", "type": "vm", "state": "running"})];
        let text = table(&rows.iter().collect::<Vec<_>>(), &RUNTIMES[..4]);
        assert_eq!(text, "ID    NAME  TYPE  STATE\nrt_1  web   vm    running\n");
        let missing = table(&[&serde_json::json!({"id": "x"})], &RUNTIMES[..2]);
        assert_eq!(missing, "ID  NAME\nx   -\n");
    }
}
