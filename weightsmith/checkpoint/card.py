"""Model card (README.md) for every output, built with huggingface_hub's ModelCard/ModelCardData.

Regenerated from the manifest on every run, never appended to. Front matter follows the Hub's
model-card spec: `base_model` (the Hub model this one descends from), `base_model_relation` (the
pass's relation: quantized / finetune / merge; the import of the same model sets none), `license`
(inherited from the source card, or a GGUF file's `general.license`), `library_name`,
`pipeline_tag`, `tags`. The card is a page a person reads: no absolute paths, no home directories,
no per-module tables; large structured results (pruning's kept-index maps) go to a sidecar JSON
file next to it, and everything is in `manifest.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

# metrics keys written to a sidecar file instead of the card: key -> file name
SIDECARS = {"kept": "kept_indices.json"}
# how each quantization format is read (the card's "How to load" and the README say the same)
READERS = {
    "compressed-tensors": "`transformers` + `compressed-tensors` (`pip install compressed-tensors`); vLLM and SGLang "
    "serve it",
    "gptq": "`transformers` + `optimum` + `gptqmodel`; vLLM and SGLang serve it (Marlin kernels)",
}


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


def gguf_meta(path: str | os.PathLike) -> dict[str, Any]:
    """License and Hub id of a GGUF file from its `general.*` header fields (header only)."""
    try:
        import gguf

        fields = gguf.GGUFReader(str(path)).fields
    except Exception:  # no gguf package or unreadable header: the card just says less
        return {}

    def get(key):
        f = fields.get(key)
        try:
            return f.contents() if f is not None else None
        except Exception:
            return None

    out: dict[str, Any] = {}
    if get("general.license"):
        out["license"] = str(get("general.license"))
    for key in ("general.base_model.0.repo_url", "general.source.repo_url", "general.source.url"):
        url = get(key)
        if isinstance(url, str) and "huggingface.co/" in url:
            out["base_model"] = "/".join(url.split("huggingface.co/", 1)[1].strip("/").split("/")[:2])
            break
    if "base_model" not in out:
        from weightsmith.checkpoint.resolve import embedded_repo_id

        rid = embedded_repo_id(path)
        if rid:
            out["base_model"] = rid
    return out


def _origin_meta(ck) -> dict[str, Any]:
    o = getattr(ck, "origin", None)
    if o is not None and o.kind == "gguf":
        return gguf_meta(o.path)
    if o is not None and o.kind == "hub" and o.repo_id:
        return {"base_model": o.repo_id, **{k: v for k, v in source_card_meta(ck).items() if k == "license"}}
    return source_card_meta(ck)


def base_models(core: dict[str, Any], sources) -> list[str]:
    """Hub ids of the origins: from the inputs, else the chain's first step, else the sources' cards/GGUF headers."""
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
            bm = _origin_meta(ck).get("base_model")
            if isinstance(bm, str):
                out.append(bm)
            elif isinstance(bm, list):
                out.extend(str(b) for b in bm)
    return list(dict.fromkeys(out))


def _public(value: Any) -> Any:
    """Drop directories from path-like strings (a card must not show where files were on a machine)."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_public(v) for v in value]
    if isinstance(value, str) and (
        value.startswith(("/", "~")) or os.path.expanduser("~") in value or value.startswith("./")
    ):
        return Path(value).name
    return value


def _summary_lines(name: str, core: dict[str, Any]) -> list[str]:
    """What was done, in words, from the parameters and metrics (what a label cannot say)."""
    p, m = core.get("parameters", {}), core.get("metrics", {})
    lines = []
    if name == "quant":
        gs = p.get("group_size")
        fmt = p.get("format", "")
        lines.append(
            f"{str(p.get('method', '')).upper()} {p.get('bits')}-bit weights, "
            f"group size {'per-channel' if gs == -1 else gs}, "
            f"{'symmetric' if p.get('sym', True) else 'asymmetric'}, written as `{fmt}`; "
            f"{m.get('quantized_modules', '?')} linear modules quantized, embeddings, norms and routers kept."
        )
        adj = m.get("group_adjustments") or {}
        if adj:
            reasons: dict[str, int] = {}
            for note in adj.values():
                reasons[note] = reasons.get(note, 0) + 1
            lines.append(
                f"Group size changed in {len(adj)} of {m.get('quantized_modules', '?')} modules: "
                + "; ".join(f"{r} ({n} modules)" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
                + "."
            )
        if m.get("bits_per_quantized_weight"):
            lines.append(f"{m['bits_per_quantized_weight']:.2f} bits per quantized weight, scales included.")
        if m.get("rtn_fallback_experts"):
            lines.append(
                f"{len(m['rtn_fallback_experts'])} MoE expert projections saw too few calibration tokens "
                "and were rounded to nearest (RTN)."
            )
        if fmt in READERS:
            lines.append(f"Reader: {READERS[fmt]}.")
    return lines


def sidecars(core: dict[str, Any]) -> dict[str, str]:
    """Files written next to the card for large structured results."""
    m = core.get("metrics") or {}
    return {fname: json.dumps(m[key], indent=1, sort_keys=True) + "\n" for key, fname in SIDECARS.items() if key in m}


def card_data(spec, core: dict[str, Any], sources, chain_tags=()):
    """`chain_tags`: the Hub tags of every pass in the chain, which the caller looks up (the core knows no registry)."""
    from huggingface_hub import ModelCardData

    bms = base_models(core, sources)
    relation = "merge" if spec.multi_source else spec.relation
    lic = next((lic for lic in (_origin_meta(ck).get("license") for ck in sources) if lic), None)
    inherited = [t for ck in sources for t in (source_card_meta(ck).get("tags") or []) if isinstance(t, str)]
    steps = [s.get("pass", {}).get("name") for s in core.get("chain", [])] + [spec.name]
    tags = list(dict.fromkeys(["weightsmith", *inherited, *(s for s in steps if s), *spec.tags, *chain_tags]))
    extra = {"base_model_relation": relation} if bms and relation else {}
    return ModelCardData(
        base_model=(bms[0] if len(bms) == 1 else bms) if bms else None,
        license=lic,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        **extra,
    )


def render_card(spec, core: dict[str, Any], sources, tags=()) -> str:
    from huggingface_hub import ModelCard

    data = card_data(spec, core, sources, tags)
    bms = base_models(core, sources)
    body = [f"# {spec.name}: output of weightsmith", ""]
    origin = f" of [{bms[0]}](https://huggingface.co/{bms[0]})" if len(bms) == 1 else ""
    ref = f" ([method]({spec.reference_url}))" if spec.reference_url else ""
    body += [f"Made by `weightsmith {spec.name}`{origin}{ref}: {spec.help.rstrip('.')}.", ""]
    summary = _summary_lines(spec.name, core)
    if summary:
        body += ["## What was done", "", *(f"- {s}" for s in summary), ""]
    body += [
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "",
        'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO_ID")',
        "```",
        "",
    ]
    body += [
        "## Parameters",
        "",
        "```yaml",
        yaml.safe_dump(_public(core.get("parameters", {})), sort_keys=True).strip() or "{}",
        "```",
        "",
    ]
    cal = core.get("calibration")
    if cal:
        body += ["## Calibration", "", "```yaml", yaml.safe_dump(_public(cal), sort_keys=True).strip(), "```", ""]
    scalars = {
        k: v for k, v in (core.get("metrics") or {}).items() if isinstance(v, (int, float, str, bool)) and v is not None
    }
    if scalars:
        body += ["## Measured", "", "| metric | value |", "|---|---|"]
        body += [f"| {k} | {f'{v:.6g}' if isinstance(v, float) else v} |" for k, v in sorted(scalars.items())] + [""]
    side = sidecars(core)
    if side:
        body += [f"Kept-index maps and other large results: {', '.join(f'`{n}`' for n in side)}.", ""]
    body += ["## Provenance", "", "| step | pass | inputs |", "|---|---|---|"]
    for k, step in enumerate(core.get("chain", []) + [core], 1):
        name = step.get("pass", {}).get("name", "?")
        ins = ", ".join(
            i.get("repo_id") or i.get("gguf_file") or Path(i.get("path") or "?").name for i in step.get("inputs", [])
        )
        body.append(f"| {k} | {name} | {ins} |")
    body += [
        "",
        "Input and output hashes, software versions and every measurement are in `manifest.json`; "
        "`weightsmith verify` re-checks the files against it.",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)).content
