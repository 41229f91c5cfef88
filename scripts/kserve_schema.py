#!/usr/bin/env python3
"""Derive a JSON schema for KServe's `InferenceService` (serving.kserve.io/v1beta1) from the kserve wheel.

KServe publishes its CRDs on GitHub only; no PyPI package ships them as JSON schema. The `kserve`
wheel on PyPI does ship the OpenAPI-generated model classes of every v1beta1 type (`openapi_types`:
attribute -> type, `attribute_map`: attribute -> JSON key), which is the same OpenAPI document the CRD
comes from. This script reads those classes *without importing them* (the wheel's dependencies are
heavy) and writes a strict schema: every KServe object admits only its own keys, Kubernetes types
(`V1Container`, `V1ResourceRequirements`, ...) refer to the strict Kubernetes definitions shipped by
`kubernetes-validate`, which tests/test_deploy.py loads next to this schema. The output is committed
(tests/schemas/), so the tests need no network.

    pip download --no-deps kserve==0.21.0 -d /tmp/kserve
    python scripts/kserve_schema.py /tmp/kserve/kserve-0.21.0-py3-none-any.whl \
        --output tests/schemas/kserve-inferenceservice-v1beta1.json
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import zipfile
from pathlib import Path

ROOT = "V1beta1InferenceService"
#: Kubernetes definitions the KServe schema refers to (by their $id in kubernetes-validate).
K8S_SCHEMA_VERSION = "1.36.0"
SCHEMA_ID = "urn:f5-triton:kserve:inferenceservice-serving-v1beta1"
PRIMITIVES = {"str": {"type": "string"}, "int": {"type": "integer"}, "bool": {"type": "boolean"},
              "float": {"type": "number"}, "object": {}, "datetime": {"type": "string"}, "date": {"type": "string"}}


def read_models(wheel: Path) -> dict[str, dict[str, tuple[str, str]]]:
    """{class name: {JSON key: (attribute, OpenAPI type)}} of every generated model in the wheel."""
    models: dict[str, dict[str, tuple[str, str]]] = {}
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if not re.fullmatch(r"kserve/models/[a-z0-9_]+\.py", name):
                continue
            for node in ast.parse(archive.read(name)).body:
                if isinstance(node, ast.ClassDef):
                    tables = {}
                    for stmt in node.body:
                        if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                                and isinstance(stmt.targets[0], ast.Name)
                                and stmt.targets[0].id in ("openapi_types", "attribute_map")):
                            tables[stmt.targets[0].id] = ast.literal_eval(stmt.value)
                    if len(tables) == 2:
                        models[node.name] = {tables["attribute_map"][attr]: (attr, kind)
                                             for attr, kind in tables["openapi_types"].items()}
    if ROOT not in models:
        sys.exit(f"error: {wheel} has no kserve/models class {ROOT}")
    return models


def kubernetes_index(definitions: dict[str, object]) -> dict[str, str]:
    """Python-client class names (V1Container, K8sIoApiAppsV1DeploymentStrategy, ...) -> definition keys."""
    index: dict[str, str] = {}
    preference = ("io.k8s.api.core.", "io.k8s.apimachinery.pkg.apis.meta.")
    for key in sorted(definitions, key=lambda k: (not k.startswith(preference), k)):
        parts = key.split(".")
        version, kind = parts[-2], parts[-1]
        index.setdefault(version[:1].upper() + version[1:] + kind, key)
        if key.startswith("io.k8s.api."):  # Go package path k8s.io/api/<group>/<version>
            index.setdefault("K8sIoApi" + "".join(p[:1].upper() + p[1:] for p in parts[3:]), key)
    quantity = "io.k8s.apimachinery.pkg.api.resource.Quantity"
    index["ResourceQuantity"] = index["V1beta1MetricQuantity"] = quantity
    index["V1Time"] = "io.k8s.apimachinery.pkg.apis.meta.v1.Time"
    return index


class SchemaBuilder:
    """Turns OpenAPI type strings into JSON schema, collecting the KServe definitions reached."""

    def __init__(self, models: dict, k8s_index: dict[str, str], k8s_id: str):
        self.models = models
        self.k8s_index = k8s_index
        self.k8s_id = k8s_id
        self.definitions: dict[str, dict] = {}
        self.unresolved: set[str] = set()

    def type_schema(self, kind: str) -> dict:
        if kind in PRIMITIVES:
            return dict(PRIMITIVES[kind])
        if kind.startswith("list[") and kind.endswith("]"):
            return {"type": "array", "items": self.type_schema(kind[5:-1])}
        if kind.startswith("dict(") and kind.endswith(")"):
            _, value = kind[5:-1].split(",", 1)
            return {"type": "object", "additionalProperties": self.type_schema(value.strip())}
        if kind in self.models:
            self.add_model(kind)
            return {"$ref": f"#/$defs/{kind}"}
        if kind in self.k8s_index:
            return {"$ref": f"{self.k8s_id}#/$defs/{self.k8s_index[kind]}"}
        self.unresolved.add(kind)  # Knative status types and the like: accepted as they are
        return {}

    def add_model(self, name: str) -> None:
        if name in self.definitions:
            return
        self.definitions[name] = {}  # placeholder against recursion
        fields = self.models[name]
        properties = {key: self.type_schema(kind) for key, (_, kind) in sorted(fields.items())}
        self.definitions[name] = {"type": "object", "properties": properties, "additionalProperties": False}


def build_schema(wheel: Path, k8s_definitions: dict, version: str) -> dict:
    """The InferenceService schema; `k8s_definitions` is kubernetes-validate's _definitions.json."""
    builder = SchemaBuilder(read_models(wheel), kubernetes_index(k8s_definitions["$defs"]), k8s_definitions["$id"])
    builder.add_model(ROOT)
    root = dict(builder.definitions[ROOT])
    root["properties"] = dict(root["properties"], apiVersion={"const": "serving.kserve.io/v1beta1"},
                              kind={"const": "InferenceService"})
    root["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "$comment": (f"Generated by scripts/kserve_schema.py from {wheel.name} (PyPI): the OpenAPI model classes "
                     f"of kserve.models. Kubernetes types refer to kubernetes-validate's "
                     f"v{version}-local-strict definitions. Not resolved (accepted as any value): "
                     f"{', '.join(sorted(builder.unresolved)) or 'none'}."),
        **root,
        "$defs": {k: v for k, v in sorted(builder.definitions.items()) if k != ROOT},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path, help="kserve-<version>-py3-none-any.whl")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--kubernetes-version", default=K8S_SCHEMA_VERSION,
                        help="kubernetes-validate schema version whose definitions are referenced")
    args = parser.parse_args()
    import importlib.resources

    folder = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    definitions = json.loads((folder / f"v{args.kubernetes_version}-local-strict" / "_definitions.json").read_text())
    schema = build_schema(args.wheel, definitions, args.kubernetes_version)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(schema, indent=1, sort_keys=False) + "\n")
    print(f"wrote {args.output}: {len(schema['$defs'])} KServe definitions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
