"""Regenerate ``fixtures/rayjob_v1_schema.json`` from KubeRay's RayJob CRD (not run by the tests).

    python tests/cluster/make_rayjob_schema.py path/to/ray.io_rayjobs.yaml KUBERAY_REF

The input is ``ray-operator/config/crd/bases/ray.io_rayjobs.yaml`` of ray-project/kuberay
(Apache-2.0). The output is that CRD's ``v1`` ``openAPIV3Schema``, unchanged in content, with
every subtree that occurs more than once (the pod template of the head, the worker groups and the
submitter; the container schema of containers, initContainers...) stored once under ``$defs`` and
referenced with ``$ref``: 238 kB of schema become a fixture a fraction of that size that
``jsonschema`` reads as it is.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import yaml

MIN_SHARED_CHARS = 1500  # smaller repeated subtrees are not worth a $ref


def _key(node) -> str:
    return json.dumps(node, sort_keys=True)


def _count(node, counts: Counter) -> None:
    if isinstance(node, dict):
        counts[_key(node)] += 1
        for v in node.values():
            _count(v, counts)
    elif isinstance(node, list):
        for v in node:
            _count(v, counts)


def _replace(node, shared: dict[str, str], top: bool = False):
    if isinstance(node, dict):
        k = _key(node)
        if not top and k in shared:
            return {"$ref": f"#/$defs/{shared[k]}"}
        return {kk: _replace(v, shared) for kk, v in node.items()}
    if isinstance(node, list):
        return [_replace(v, shared) for v in node]
    return node


def shrink(schema: dict) -> dict:
    """Store each repeated subtree of ``schema`` once under ``$defs`` (largest first)."""
    defs: dict[str, dict] = {}
    shared: dict[str, str] = {}
    while True:
        counts: Counter = Counter()
        _count(schema, counts)
        for d in defs.values():
            _count(d, counts)
        repeated = [k for k, n in counts.items() if n > 1 and len(k) >= MIN_SHARED_CHARS and k not in shared]
        if not repeated:
            break
        biggest = max(repeated, key=len)
        name = f"shared{len(shared)}"
        shared[biggest] = name
        defs[name] = json.loads(biggest)
        schema = _replace(schema, shared)
        defs = {n: _replace(d, shared, top=True) for n, d in defs.items()}
    return {**schema, "$defs": defs}


def main(crd_path: str, ref: str) -> None:
    crd = yaml.safe_load(Path(crd_path).read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = shrink(v1["schema"]["openAPIV3Schema"])
    schema["$comment"] = (f"ray-project/kuberay {ref} ray-operator/config/crd/bases/ray.io_rayjobs.yaml "
                          "(Apache-2.0), v1 openAPIV3Schema; repeated subtrees moved to $defs by "
                          "tests/cluster/make_rayjob_schema.py")
    out = Path(__file__).parent / "fixtures" / "rayjob_v1_schema.json"
    out.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
    print(out, out.stat().st_size, "bytes")


if __name__ == "__main__":
    main(*sys.argv[1:])
