"""Click options generated from a pass's config dataclass, recipe-file merging, and `build_config`.

One source of truth: a dataclass field becomes `--field-name` with its type, default, choices and
help; recipe files (YAML/JSON) use the same names; `config_to_params` writes them to the manifest.
Every config — from the command line, `--recipe`, a `weightsmith run` step or the demo — is made by
`build_config`, so the same values are refused the same way wherever they come from.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import click

from weightsmith.errors import UsageError
from weightsmith.passes import check_bounds


def _unwrap_optional(tp):
    if get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def option_for_field(f: dataclasses.Field, tp) -> click.Option:
    name = "--" + f.name.replace("_", "-")
    help_ = f.metadata.get("help", "")
    default = (
        f.default
        if f.default is not dataclasses.MISSING
        else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    )
    tp, optional = _unwrap_optional(tp)
    kw: dict[str, Any] = {"help": help_, "show_default": default is not None and default != (), "default": default}
    if tp is bool:
        return click.Option([f"{name}/--no-{f.name.replace('_', '-')}"], **kw)
    if get_origin(tp) is Literal:
        choices = [str(c) for c in get_args(tp)]
        kw["type"] = click.Choice(choices)
        kw["default"] = None if default is None else str(default)
        return click.Option([name], **kw)
    if get_origin(tp) in (tuple, list):
        inner = get_args(tp)[0] if get_args(tp) else str
        kw["multiple"] = True
        kw["type"] = inner if inner in (int, float, str) else str
        kw["default"] = tuple(default or ())
        return click.Option([name], **kw)
    kw["type"] = tp if tp in (int, float, str) else str
    return click.Option([name], **kw)


def field_options(cls: type) -> list[click.Option]:
    hints = typing.get_type_hints(cls, include_extras=False)
    return [option_for_field(f, hints[f.name]) for f in dataclasses.fields(cls) if not f.metadata.get("cli_hidden")]


def coerce_value(cls: type, name: str, value: Any) -> Any:
    """Turn a CLI/recipe value into the field's type (Literal choices arrive as strings)."""
    hints = typing.get_type_hints(cls)
    tp, _ = _unwrap_optional(hints[name])
    if value is None:
        return None
    if get_origin(tp) is Literal:
        for c in get_args(tp):
            if str(c) == str(value):
                return c
        raise UsageError(
            f"--{name.replace('_', '-')}: {value!r} is not one of {', '.join(str(c) for c in get_args(tp))}"
        )
    if get_origin(tp) in (tuple, list):
        return tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if tp in (int, float) and isinstance(value, str):
        try:
            return tp(value)
        except ValueError:
            raise UsageError(f"--{name.replace('_', '-')}: {value!r} is not a valid {tp.__name__}") from None
    return value


def load_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"{path}: cannot read recipe ({e.strerror})") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml/json parse errors
        raise UsageError(f"{path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a recipe must be a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(spec_or_cls: Any, values: dict[str, Any]) -> Any:
    """A pass config from option values: unknown names refused (typos fail loudly), each value
    coerced to its field's type with the choice checks of the command line, then the dataclass's
    own validation. `spec_or_cls` is a PassSpec or a config dataclass."""
    cls = getattr(spec_or_cls, "config_cls", spec_or_cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    coerced = {k: coerce_value(cls, k, v) for k, v in values.items()}
    try:
        config = cls(**coerced)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    check_bounds(config)
    return config


def resolve_config(cls: type, ctx: click.Context, cli_values: dict[str, Any], recipe: dict[str, Any]) -> Any:
    """CLI values given explicitly win over the recipe, which wins over the dataclass defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(recipe) - names)
    if unknown:
        raise UsageError(
            f"recipe option {unknown[0]!r} is not an option of this pass; valid: {', '.join(sorted(names))}"
        )
    values = dict(recipe)
    for k in names:
        if k in cli_values and ctx.get_parameter_source(k) not in (click.core.ParameterSource.DEFAULT, None):
            values[k] = cli_values[k]
    return build_config(cls, values)
