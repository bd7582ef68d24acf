"""Regenerate serving.kserve.io_inferenceservice_v1beta1.json from the KServe Python SDK's models.

The SDK's model classes are generated from the same Go types as the InferenceService CRD; each
lists its fields (`attribute_map`) and their types (`openapi_types`). Core Kubernetes types are
referenced into kubernetes-validate's definitions, exactly as the CRD embeds them.

    pip download --no-deps kserve==0.21.0 && unzip kserve-0.21.0-*.whl -d /tmp/kserve
    python deploy/schemas/gen_kserve_schema.py /tmp/kserve/kserve/models > \
        deploy/schemas/serving.kserve.io_inferenceservice_v1beta1.json
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path
from typing import Any

DEFS = "/api/_definitions.json#/$defs/"
# SDK class name -> Kubernetes definition name, where the prefix is not core/v1.
K8S_SPECIAL = {
    "V1ObjectMeta": "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
    "V1LabelSelector": "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector",
    "V1Condition": "io.k8s.apimachinery.pkg.apis.meta.v1.Condition",
    "ResourceQuantity": "io.k8s.apimachinery.pkg.api.resource.Quantity",
    # the SDK names it but has no class: in the Go types it is a resource.Quantity
    "V1beta1MetricQuantity": "io.k8s.apimachinery.pkg.api.resource.Quantity",
}
PRIMITIVES: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "object": {},
}


def class_fields(models: Path, class_name: str) -> tuple[dict[str, str], dict[str, str]]:
    """Return (openapi_types, attribute_map) of one SDK model class, read without importing it."""
    source = next(
        text
        for f in sorted(models.glob("*.py"))
        if f"class {class_name}(" in (text := f.read_text())
    )
    found: dict[str, dict[str, str]] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Assign):
            continue
        target = node.targets[0]
        if isinstance(target, ast.Name) and target.id in ("openapi_types", "attribute_map"):
            found[target.id] = ast.literal_eval(node.value)
    return found["openapi_types"], found["attribute_map"]


def type_schema(models: Path, t: str, defs: dict[str, Any]) -> dict[str, Any]:
    """Translate one SDK type string into a JSON schema, collecting KServe types into `defs`."""
    if t in PRIMITIVES:
        return dict(PRIMITIVES[t])
    if m := re.fullmatch(r"list\[(.+)\]", t):
        return {"type": "array", "items": type_schema(models, m.group(1), defs)}
    if m := re.fullmatch(r"dict\(str, (.+)\)", t):
        return {"type": "object", "additionalProperties": type_schema(models, m.group(1), defs)}
    if t in K8S_SPECIAL:
        return {"$ref": DEFS + K8S_SPECIAL[t]}
    if m := re.fullmatch(r"K8sIoApi([A-Z][a-z]+)(V\d(?:[a-z]+\d+)?)([A-Z]\w+)", t):
        group, version, kind = m.groups()
        return {"$ref": f"{DEFS}io.k8s.api.{group.lower()}.{version.lower()}.{kind}"}
    if t.startswith("V1") and not t.startswith("V1alpha") and not t.startswith("V1beta"):
        return {"$ref": DEFS + "io.k8s.api.core.v1." + t[2:]}
    if t not in defs:
        defs[t] = {}
        types, names = class_fields(models, t)
        defs[t] = {
            "type": "object",
            "additionalProperties": False,
            "properties": {names[k]: type_schema(models, v, defs) for k, v in types.items()},
        }
    return {"$ref": f"#/$defs/{t}"}


def main() -> None:
    """Print the strict JSON schema of an InferenceService (status left out: never written)."""
    models = Path(sys.argv[1])
    defs: dict[str, Any] = {}
    spec = type_schema(models, "V1beta1InferenceServiceSpec", defs)
    # NOTE: the CRD marks predictor required (InferenceServiceSpec.Predictor has no omitempty).
    defs["V1beta1InferenceServiceSpec"]["required"] = ["predictor"]
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "InferenceService serving.kserve.io/v1beta1 (from kserve 0.21.0 SDK models)",
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "serving.kserve.io/v1beta1"},
            "kind": {"const": "InferenceService"},
            "metadata": {"$ref": DEFS + K8S_SPECIAL["V1ObjectMeta"]},
            "spec": spec,
        },
        "$defs": dict(sorted(defs.items())),
    }
    json.dump(schema, sys.stdout, indent=1, sort_keys=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
