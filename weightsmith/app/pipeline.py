"""`weightsmith run RECIPE.yaml`: a chain of passes, each a step with its options.

    source: path/to/model-or.gguf        # input of the first step
    out: out/pipeline                    # step outputs go to OUT/<step name> unless `out:` is given
    steps:
      - name: pruned
        pass: prune
        options: {target_params: 100M}
      - name: w4
        pass: quant
        input: pruned                    # default: the previous step's output
        options: {bits: 4, group_size: 64}

Every step goes through the same runner as its CLI command, so the manifest freshness check
applies: a step whose inputs, parameters and weightsmith version are unchanged is skipped, and a
changed step makes every step after it stale (their input hashes change). Relative paths are
resolved against the recipe's directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightsmith import assets
from weightsmith.errors import UsageError
from weightsmith.progress import QUIET

_STEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TOP_KEYS = {"source", "out", "steps", "options"}
_STEP_KEYS = {"name", "pass", "input", "inputs", "out", "options"}
_HUB_ID = re.compile(r"^(?![.~/])[\w.-]+/[\w.-]+$")  # owner/name, as a recipe input (a path never starts with . ~ /)


@dataclass
class Step:
    name: str
    pass_name: str
    inputs: list[str]  # paths (or hub ids) after resolution
    out: Path
    options: dict[str, Any] = field(default_factory=dict)


def parse_recipe(data: Any, base: Path, *, where: str = "recipe") -> list[Step]:
    """Validate a recipe (already loaded from YAML/JSON) into steps; every error names the step."""
    from weightsmith.app.registry import all_passes

    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a mapping with 'source' and 'steps'")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(_TOP_KEYS))}")
    steps_raw = data.get("steps")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise UsageError(f"{where}: 'steps' must be a non-empty list")
    out_root = _path(data.get("out", "out"), base)
    defaults = data.get("options") or {}
    passes = all_passes()
    previous: str | None = _resolve_input(data["source"], base) if data.get("source") is not None else None
    outputs: dict[str, Path] = {}
    steps: list[Step] = []
    for i, raw in enumerate(steps_raw, 1):
        label = f"{where}: step {i}"
        if not isinstance(raw, dict):
            raise UsageError(f"{label}: expected a mapping with 'name' and 'pass'")
        bad = set(raw) - _STEP_KEYS
        if bad:
            raise UsageError(
                f"{label}: unknown key(s) {', '.join(sorted(bad))}; valid: {', '.join(sorted(_STEP_KEYS))}"
            )
        name = str(raw.get("name", ""))
        if not _STEP_NAME.match(name):
            raise UsageError(
                f"{label}: 'name' must be a plain file name (letters, digits, '-', '_', '.'), got {name!r}"
            )
        if name in outputs:
            raise UsageError(f"{label}: step name {name!r} is used twice")
        label = f"{where}: step {name!r}"
        pname = raw.get("pass")
        if pname not in passes:
            raise UsageError(f"{label}: unknown pass {pname!r}; available: {', '.join(sorted(passes))}")
        spec = passes[pname]
        refs = raw.get("inputs", raw.get("input"))
        if refs is None:
            if previous is None:
                raise UsageError(f"{label}: no input (give the recipe a 'source' or the step an 'input')")
            inputs = [previous]
        else:
            inputs = [
                str(outputs[r]) if r in outputs else _resolve_input(r, base)
                for r in (refs if isinstance(refs, list) else [refs])
            ]
        problem = spec.sources_problem(len(inputs))
        if problem:
            raise UsageError(f"{label}: {problem} (give the step 'inputs')")
        options = {
            **{k: v for k, v in defaults.items() if _has_field(spec.config_cls, k)},
            **(raw.get("options") or {}),
        }
        out = _path(raw["out"], base) if raw.get("out") else out_root / name
        steps.append(Step(name, pname, inputs, out, options))
        outputs[name] = out
        previous = str(out)
    return steps


def _has_field(cls, name: str) -> bool:
    import dataclasses

    return any(f.name == name for f in dataclasses.fields(cls))


def _path(value: Any, base: Path) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else base / p


def _resolve_input(value: Any, base: Path) -> str:
    s = str(value)
    if assets.is_asset(s):  # embedded assets (demo:smollm2) resolve wherever the recipe lives
        return s
    p = _path(s, base)
    # a Hub id (owner/name) stays as given unless a directory of that name exists here
    if not p.exists() and _HUB_ID.match(s):
        return s
    return str(p)


def check_steps(steps: list[Step], where: str) -> list[Any]:
    """Every step's config, built and checked before anything runs (a typo in the last step must not
    surface after an hour of the first one), and every input either there or made by an earlier step."""
    from weightsmith.app.cli_options import build_config
    from weightsmith.app.registry import all_passes

    passes = all_passes()
    configs = []
    made: set[str] = set()
    for step in steps:
        try:
            configs.append(build_config(passes[step.pass_name], step.options))
        except UsageError as e:
            raise UsageError(f"{where}: step {step.name!r}: {e}") from None
        for i in step.inputs:
            if i not in made and not assets.is_asset(i) and not _HUB_ID.match(i) and not Path(i).exists():
                raise UsageError(f"{where}: step {step.name!r}: input {i} does not exist and no earlier step writes it")
        made.add(str(step.out))
    return configs


def run_recipe(
    path: str | Path,
    *,
    force: bool = False,
    dry_run: bool = False,
    only: list[str] | None = None,
    report=None,
    **run_kw,
) -> list[dict]:
    """Run (or plan) every step in order; returns one summary per step. Every step is checked first."""
    from weightsmith.app.cli_options import load_recipe
    from weightsmith.app.registry import all_passes
    from weightsmith.app.runner import run_pass

    path = Path(path)
    steps = parse_recipe(load_recipe(path), path.resolve().parent, where=str(path))
    if only:
        unknown = sorted(set(only) - {s.name for s in steps})
        if unknown:
            raise UsageError(f"--step {', '.join(unknown)}: no such step; steps: {', '.join(s.name for s in steps)}")
    configs = check_steps(steps, str(path))
    passes = all_passes()
    made_earlier = {str(s.out) for s in steps}
    results = []
    for step, config in zip(steps, configs):
        if only and step.name not in only:
            continue
        spec = passes[step.pass_name]
        if report is not None:
            report.log(f"step {step.name}: {step.pass_name} {' '.join(step.inputs)} -> {step.out}")
        row = {"step": step.name, "pass": step.pass_name, "inputs": step.inputs, "out": str(step.out)}
        if dry_run and any(i in made_earlier and not Path(i).exists() for i in step.inputs):
            results.append({**row, "status": "pending (its input is made by an earlier step)", "notes": []})
            continue
        res = run_pass(
            spec,
            config,
            step.inputs,
            step.out,
            force=force,
            replace_stale=True,
            dry_run=dry_run,
            report=report or QUIET,
            **run_kw,
        )
        results.append({**row, "status": res.status, "notes": res.notes})
    return results
