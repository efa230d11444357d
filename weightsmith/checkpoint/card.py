"""Model card (README.md) for every output: Hub front matter + what was done + provenance.

Regenerated from the manifest on every run, never appended to. Front matter keys follow the Hub's
model-card spec: `base_model`, `base_model_relation` (always explicit), `library_name`,
`pipeline_tag`, `license` (inherited), `tags`.
"""

from __future__ import annotations

import json
from typing import Any

import yaml


def _front_matter(text: str) -> dict[str, Any]:
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def source_card_meta(ck) -> dict[str, Any]:
    path = ck.root / "README.md"
    try:
        return _front_matter(path.read_text(errors="replace")) if path.exists() else {}
    except OSError:
        return {}


def base_models(core: dict[str, Any], sources) -> list[str]:
    """Hub ids of the origins: from the inputs, else from the chain's first step, else the sources' cards."""
    out: list[str] = []
    for inp in core.get("inputs", []):
        if inp.get("repo_id"):
            out.append(inp["repo_id"])
    if not out:
        for step in core.get("chain", []):
            ids = [i["repo_id"] for i in step.get("inputs", []) if i.get("repo_id")]
            if ids:
                out = ids
                break
    if not out:
        for ck in sources:
            bm = source_card_meta(ck).get("base_model")
            if isinstance(bm, str):
                out.append(bm)
            elif isinstance(bm, list):
                out.extend(str(b) for b in bm)
    return list(dict.fromkeys(out))


def render_card(spec, core: dict[str, Any], sources, tags: list[str]) -> str:
    """`spec` is the pass (name, help, reference_url, relation, multi_source); `tags` are the Hub tags
    of every pass in the chain, which the caller looks up (the core knows no registry)."""
    meta: dict[str, Any] = {}
    bms = base_models(core, sources)
    relation = "merge" if spec.multi_source else spec.relation
    if bms and relation:
        meta["base_model"] = bms[0] if len(bms) == 1 else bms
        meta["base_model_relation"] = relation
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    lic = next((source_card_meta(ck).get("license") for ck in sources if source_card_meta(ck).get("license")), None)
    if lic:
        meta["license"] = lic
    meta["tags"] = list(dict.fromkeys(["weightsmith", *tags]))
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", ""]
    lines.append(f"# {spec.name}: output of weightsmith")
    lines.append("")
    ref = f" ([reference]({spec.reference_url}))" if spec.reference_url else ""
    lines.append(f"Produced by `weightsmith {spec.name}`{ref}: {spec.help}")
    lines.append("")
    lines.append("## Parameters")
    lines.append("")
    lines.append("```yaml")
    lines.append(yaml.safe_dump(core.get("parameters", {}), sort_keys=True).strip() or "{}")
    lines.append("```")
    if core.get("calibration"):
        lines += ["", "## Calibration", "", "```json", json.dumps(core["calibration"], indent=2, sort_keys=True), "```"]
    if core.get("metrics"):
        lines += ["", "## Measured", "", "```json", json.dumps(core["metrics"], indent=2, sort_keys=True), "```"]
    lines += ["", "## Provenance", "", "| step | pass | inputs |", "|---|---|---|"]
    chain = core.get("chain", []) + [core]
    for k, step in enumerate(chain, 1):
        name = step.get("pass", {}).get("name", "?")
        ins = ", ".join(i.get("repo_id") or i.get("gguf_file") or i.get("path", "?") for i in step.get("inputs", []))
        lines.append(f"| {k} | {name} | {ins} |")
    lines += [
        "",
        "Full provenance (input and output hashes, environment) is in `manifest.json`; check it with `weightsmith "
        "verify`.",
        "",
    ]
    return "\n".join(lines)
