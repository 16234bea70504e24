//! OCSF events checked against the OCSF JSON Schema of their class: the schemas
//! `cargo xtask test` builds with ocsf-json-schema (`tests/ocsf/schemas.py`) into
//! `target/tools/ocsf/VERSION`, named with the OCSF version agentwall writes.

use std::{collections::HashMap, path::PathBuf, sync::OnceLock};

use serde_json::Value;

/// The class names of the classes agentwall writes, by `class_uid`.
const CLASSES: [(i64, &str); 5] = [
    (4001, "network_activity"),
    (4003, "dns_activity"),
    (3002, "authentication"),
    (3001, "account_change"),
    (2004, "detection_finding"),
];

fn schema_dir() -> PathBuf {
    crate::bin_path("agentwall")
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("tools/ocsf")
        .join(agentwall::ocsf::VERSION)
}

fn validators() -> &'static HashMap<i64, jsonschema::Validator> {
    static V: OnceLock<HashMap<i64, jsonschema::Validator>> = OnceLock::new();
    V.get_or_init(|| {
        CLASSES
            .iter()
            .map(|(uid, name)| {
                let path = schema_dir().join(format!("{name}.json"));
                let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                    panic!(
                        "{}: {e}: run the tests through `cargo xtask test`, which builds the OCSF schemas",
                        path.display()
                    )
                });
                let schema: Value = serde_json::from_str(&text).expect("a schema is JSON");
                let v = jsonschema::draft202012::new(&schema)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                (*uid, v)
            })
            .collect()
    })
}

/// `record` mapped as the control plane maps a stored record (`node` sent it, stored as
/// number 1) or, without a node, as `audit export` maps a line of a node's log: the event
/// as JSON.
pub fn event(record: &Value, node: Option<&str>) -> Option<Value> {
    use agentwall::ocsf::Origin;
    let raw = serde_json::value::to_raw_value(record).expect("JSON");
    let origin = match node {
        Some(node) => Origin::Stored { node, id: 1 },
        None => Origin::Log,
    };
    agentwall::ocsf::event(&raw, origin).map(|e| serde_json::to_value(&e).expect("JSON"))
}

/// Checks `event` against its class's schema; Err lists every violation with its place.
pub fn check(event: &Value) -> Result<(), String> {
    let uid = event["class_uid"].as_i64().ok_or("no class_uid")?;
    let v = validators()
        .get(&uid)
        .ok_or_else(|| format!("class_uid {uid} is not one agentwall writes"))?;
    let errors: Vec<String> = v
        .iter_errors(event)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}
