"""Writes the OCSF JSON Schemas agentwall's OCSF events are checked against.

`cargo xtask setup` runs this with ocsf-json-schema (PyPI, pinned in xtask), which carries
the OCSF schema exports and builds a class's JSON Schema (draft 2020-12) the way
schema.ocsf.io does: python3 schemas.py OUT_DIR VERSION
"""

import json
import pathlib
import sys

from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema

# The classes agentwall writes, each with the profiles its events declare.
CLASSES = {
    "network_activity": ["security_control"],
    "dns_activity": ["security_control"],
    "authentication": [],
    "account_change": [],
    "detection_finding": ["security_control"],
}


def main() -> None:
    out, version = pathlib.Path(sys.argv[1]), sys.argv[2]
    schema = OcsfJsonSchemaEmbedded(get_ocsf_schema(version=version))
    out.mkdir(parents=True, exist_ok=True)
    for name, profiles in CLASSES.items():
        js = schema.get_class_schema(class_name=name, profiles=profiles)
        (out / f"{name}.json").write_text(json.dumps(js, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
