"""Vendor one CustomResourceDefinition's schema as a small JSON file (deploy/schemas/README.md).

    python deploy/schemas/vendor.py CRD.yaml OUT.json --source "URL at a tag (commit)"

Takes the served, stored version's ``openAPIV3Schema`` as published upstream, drops the
``description`` fields (most of the size, no effect on validation), and replaces every object
schema that occurs more than once (KServe's CRDs repeat the container and pod specs dozens of
times) by a ``$ref`` to one copy under ``$defs``: the same constraints, a tenth of the bytes.
Nothing else changes; tests/test_deploy.py adds the strictness (unknown fields are errors).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from pathlib import Path

import yaml

MIN_SHARED = 400  # characters: smaller repeated subschemas stay inline


def _key(node) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def strip_descriptions(node):
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def share_repeats(schema: dict) -> dict:
    counts: Counter = Counter()

    def count(node) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" or "properties" in node:
                counts[_key(node)] += 1
            for v in node.values():
                count(v)
        elif isinstance(node, list):
            for v in node:
                count(v)

    count(schema)
    names = {k: "s" + hashlib.sha256(k.encode()).hexdigest()[:12]
             for k, n in counts.items() if n > 1 and len(k) >= MIN_SHARED}
    defs: dict = {}

    def rewrite(node, root: bool = False):
        if isinstance(node, dict):
            name = None if root else names.get(_key(node))
            if name is not None:
                if name not in defs:
                    defs[name] = None  # reserve the name before recursing
                    defs[name] = rewrite(node, root=True)
                return {"$ref": f"#/$defs/{name}"}
            return {k: rewrite(v) for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    out = rewrite(schema, root=True)
    if defs:
        out["$defs"] = dict(sorted(defs.items()))
    return out


def vendor(crd_path: Path, source: str) -> dict:
    crd = yaml.safe_load(crd_path.read_text())
    spec = crd["spec"]
    version = next(v for v in spec["versions"] if v.get("served") and v.get("storage"))
    schema = share_repeats(strip_descriptions(version["schema"]["openAPIV3Schema"]))
    header = {
        "$comment": f"openAPIV3Schema of {spec['names']['kind']} {spec['group']}/"
                    f"{version['name']} from {source}; descriptions dropped, repeated object "
                    "schemas shared under $defs (deploy/schemas/vendor.py)",
        "x-kubernetes-group-version-kind": {"group": spec["group"], "version": version["name"],
                                            "kind": spec["names"]["kind"]},
    }
    return {**header, **schema}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("crd", type=Path, help="the CRD's YAML, as published upstream")
    p.add_argument("out", type=Path, help="the JSON schema to write")
    p.add_argument("--source", required=True, help="where the CRD came from (URL, tag, commit)")
    a = p.parse_args()
    a.out.write_text(json.dumps(vendor(a.crd, a.source), indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
