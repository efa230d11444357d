"""Orchestration shared by every pass: open inputs, freshness check, plan, write, manifest.

`run_pass()` is what the CLI and `weightsmith run` call. The pass itself only plans shapes and
writes tensors; everything about provenance, atomicity and skipping up-to-date work lives here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightsmith import dist
from weightsmith.app import registry
from weightsmith.checkpoint import destination as dest
from weightsmith.checkpoint import manifest as mf
from weightsmith.checkpoint.reader import Checkpoint
from weightsmith.checkpoint.resolve import open_checkpoint
from weightsmith.checkpoint.writer import DEFAULT_MAX_SHARD, CheckpointWriter, TensorSpec
from weightsmith.errors import UsageError, WeightsmithError
from weightsmith.passes import PassSpec, Plan, config_to_params
from weightsmith.progress import QUIET, Reporter
from weightsmith.util import human_bytes


@dataclass
class PassContext:
    """What a pass sees: its inputs, the writer, a reporter, and places to put results."""

    sources: list[Checkpoint]
    writer: CheckpointWriter | None
    report: Reporter = QUIET
    device: str = "cpu"
    metrics: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    copy_aux: bool = True  # copy tokenizer & co. from the first source at the end
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False  # --dry-run: plan() only; a pass may skip measurements that only run() needs

    @property
    def source(self) -> Checkpoint:
        return self.sources[0]

    def tokenizer(self, index: int = 0):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.sources[index].root)

    def calibrate(self, cfg, *, default: str | None = None, index: int = 0, shard: bool = False):
        """Calibration windows for a pass config that inherits CalibConfig; recorded for the manifest.

        Under a launcher rank 0 prepares the windows (reads/tokenizes, or generates them) and every
        rank receives the same ones. With `shard=True` each rank gets its contiguous block
        (`dist.shard`, in rank order) as `.ids`, and `.total` is the number of windows of all ranks:
        a pass that shards must reduce its statistics (`acc.reduce()`) before using them."""
        from weightsmith.calib import load_calibration

        ck = self.sources[index]
        w = dist.world()

        def model_loader():
            from weightsmith.loading import load

            return load(ck.root, device=self.device)

        data = None
        if w.is_main:
            with self.report.status("preparing calibration data"):
                data = load_calibration(cfg, self.tokenizer(index), model_loader=model_loader, default=default)
        data = dist.broadcast_object(data, 0)
        self.calibration = data.description
        data.total = int(data.ids.shape[0])
        if shard and w.distributed:
            if data.total < w.size:
                raise UsageError(
                    f"{data.total} calibration windows for {w.size} ranks: every rank needs at least one; raise "
                    "--calib-samples or launch fewer processes"
                )
            data.ids = data.ids[dist.shard(data.total, w)]
        return data

    @property
    def world(self) -> dist.World:
        """This process's place in a torch.distributed run (rank 0 of 1 without a launcher)."""
        return dist.world()

    def mine(self, costs) -> list[int]:
        """Indices of the jobs (by cost) this rank does: `dist.owned`, all of them without a launcher."""
        return dist.owned(list(costs))

    def engine(self, index: int = 0, **kw):
        """A layer-wise engine over one of the sources, on this run's device."""
        from weightsmith.engine import LayerwiseEngine

        return LayerwiseEngine(self.sources[index], device=self.device, report=self.report, **kw)

    def copy_tensor(self, name: str, index: int = 0, dtype=None) -> None:
        """Write a source tensor unchanged (byte copy) or cast, under the same name."""
        ck = self.sources[index]
        if dtype is None or ck.info(name).dtype == dtype:
            self.writer.write_bytes(name, ck.read_raw(name))
        else:
            self.writer.write(name, ck.get(name, dtype=dtype))


@dataclass(frozen=True)
class EvalOptions:
    """Optional perplexity of the finished output, measured before the manifest is written."""

    text: str | None = None
    windows: int | None = 32
    length: int = 512

    def as_params(self) -> dict[str, Any] | None:
        return None if self.text is None else {"text": self.text, "windows": self.windows, "length": self.length}


@dataclass
class RunResult:
    status: str  # "written" | "up-to-date" | "dry-run"
    dst: Path | None
    plan: Plan | None = None
    manifest: dict | None = None
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": self.status,
            "output": str(self.dst) if self.dst else None,
            "notes": self.notes,
        }
        if self.plan is not None:
            out["plan"] = plan_summary(self.plan)
        if self.manifest is not None:
            out["metrics"] = self.manifest.get("metrics", {})
            out["outputs"] = self.manifest.get("outputs", {})
        return out


def input_record(ck: Checkpoint, dst: Path | None = None) -> dict[str, Any]:
    """What went in: file hashes, and where from as a path relative to the output or a Hub id
    (never an absolute path of the machine that made it)."""
    o = ck.origin
    if o.kind == "gguf":
        p = Path(o.path)
        return {"gguf_file": p.name, "path": mf.portable_path(p, dst), "files": {p.name: mf.sha256_file(p)}}
    rec: dict[str, Any] = (
        {"path": mf.portable_path(o.path, dst)} if o.kind == "path" else {"repo_id": o.repo_id, "revision": o.revision}
    )
    rec["files"] = mf.hash_dir_files(ck.root, mf.input_files(ck.root))
    return rec


def check_run_options(*, device: str, max_shard_size: int) -> None:
    """Options every pass shares, refused with exit 2 before any input is read."""
    from weightsmith.errors import UsageError

    if max_shard_size <= 0:
        raise UsageError(f"--max-shard-size {max_shard_size}: must be a positive size, e.g. 5GB or 500MB")
    check_device(device)


def check_device(device: str) -> None:
    import torch

    from weightsmith.errors import UsageError

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {device}: CUDA is not available here (torch {torch.__version__}, no usable GPU); use "
                "--device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here; use "
                f"cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
    elif dev.type != "cpu":
        raise UsageError(f"--device {device}: weightsmith computes on cpu or cuda; use --device cpu or --device cuda")


def check_input(spec: PassSpec, ck: Checkpoint) -> None:
    """The checks every pass shares: no (non-fp8) quantized input, and every
    tensor's shape as config.json implies (one place, so no pass writes a checkpoint that
    `from_pretrained` refuses)."""
    from weightsmith.engine.shapes import check_shapes
    from weightsmith.errors import UsageError

    qc = ck.config_dict.get("quantization_config") or {}
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method and method != "fp8":  # fp8 block-scaled weights are first-class; packed low-bit ones are a pass's end
        raise UsageError(
            f"{ck.root}: already quantized ({method}, see quantization_config in config.json); "
            f"{spec.name} needs the unquantized model: run it on the checkpoint you quantized from"
        )
    check_shapes(ck)


def plan_summary(plan: Plan) -> dict[str, Any]:
    out = dict(plan.summary)
    if plan.tensors is not None:
        out["tensors"] = len(plan.tensors)
        out["output_bytes"] = sum(t.nbytes for t in plan.tensors)
    return out


def run_pass(
    spec: PassSpec | str,
    config: Any,
    sources: list[str | Checkpoint],
    dst: str | Path | None,
    *,
    force: bool = False,
    replace_stale: bool = False,
    dry_run: bool = False,
    allow_pickle: bool = False,
    allow_download: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD,
    device: str = "cpu",
    report: Reporter = QUIET,
    evaluate: EvalOptions | None = None,
) -> RunResult:
    registry.load()  # every pass and the runtimes that load quantized checkpoints
    spec = registry.get_pass(spec) if isinstance(spec, str) else spec
    problem = spec.sources_problem(len(sources))
    if problem:
        raise UsageError(problem)
    check_run_options(device=device, max_shard_size=max_shard_size)
    w = dist.world(device)  # joins the process group under a launcher (torchrun, accelerate launch)
    kw = dict(
        force=force,
        replace_stale=replace_stale,
        dry_run=dry_run,
        allow_pickle=allow_pickle,
        allow_download=allow_download,
        max_shard_size=max_shard_size,
        device=dist.local_device(device),
        report=report if w.is_main else QUIET,
        evaluate=evaluate,
    )
    if not w.distributed:
        return _run(spec, config, sources, dst, **kw)
    target = dest.resolve_output(dst) if dst is not None else None
    if w.is_main and target is not None:
        dest.clear_failures(target)  # markers of an earlier failed run
    dist.barrier()
    with _failure_guard(target, w):
        return _run(spec, config, sources, dst, **kw)


@contextlib.contextmanager
def _failure_guard(target: Path | None, w: dist.World):
    """A failure on any rank ends every rank with the failing rank's one-line error: the failing
    rank leaves it in `.DST.failed-rank-R`; its peers (stopped by the broken collective, or by the
    launcher's SIGTERM) read it. Rank 0's writer removes the staging directory on the way out (a
    SIGKILLed rank 0 leaves `.DST.tmp-PID`, which the next run removes)."""
    try:
        yield
    except BaseException as e:
        others = _peer_failures(target, w, wait=_collective_failure(e) or isinstance(e, KeyboardInterrupt))
        if others:
            first = others[0]
            err = WeightsmithError(f"rank {first['rank']} failed: {first['message']}")
            err.exit_code = int(first.get("exit_code") or 1)
            raise err from None
        if isinstance(e, WeightsmithError):
            message, code = str(e), e.exit_code
        elif isinstance(e, KeyboardInterrupt):  # Ctrl-C, SIGTERM from the launcher, SLURM...
            message, code = f"interrupted ({type(e).__name__})", 128 + int(getattr(e, "signum", 2))
        elif _collective_failure(e):
            message, code = (
                f"a peer process stopped without leaving a message (killed? out of memory?); the launcher's log "
                f"names it ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                1,
            )
            err = WeightsmithError(f"rank {w.rank}: {message}")
            raise err from None
        else:
            message, code = f"internal error: {type(e).__name__}: {e}".splitlines()[0], 1
        if target is not None:
            dest.write_failure(target, w.rank, message, code)
        err = type(e)(f"rank {w.rank} failed: {message}") if isinstance(e, WeightsmithError) else None
        if err is None:
            err = WeightsmithError(f"rank {w.rank} failed: {message}")
            err.exit_code = code
        raise err from e


def _peer_failures(target: Path | None, w: dist.World, *, wait: bool) -> list[dict]:
    """Other ranks' failure markers; when this rank was stopped by a peer (broken collective,
    SIGTERM), give the marker a few seconds to appear (a shared filesystem may show it late)."""
    import time

    if target is None:
        return []
    deadline = time.monotonic() + (2.0 if wait else 0.0)
    while True:
        found = [f for f in dest.read_failures(target) if f["rank"] != w.rank]
        if found or time.monotonic() >= deadline:
            return found
        try:
            time.sleep(0.2)
        except KeyboardInterrupt:  # the launcher's SIGTERM while waiting: answer with what is known
            return [f for f in dest.read_failures(target) if f["rank"] != w.rank]


def _collective_failure(e: BaseException) -> bool:
    """A torch.distributed error caused by a peer going away (gloo: connection closed/reset)."""
    try:
        import torch.distributed as tdist

        if isinstance(e, getattr(tdist, "DistError", ())):
            return True
    except ImportError:
        pass
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(
        k in text for k in ("connection closed", "connection reset", "gloo", "nccl", "broken pipe")
    )


def _run(
    spec,
    config,
    sources,
    dst,
    *,
    force,
    replace_stale,
    dry_run,
    allow_pickle,
    allow_download,
    max_shard_size,
    device,
    report,
    evaluate,
) -> RunResult:
    w = dist.world()
    cks = [
        s
        if isinstance(s, Checkpoint)
        else open_checkpoint(str(s), allow_pickle=allow_pickle, allow_download=allow_download, headers_only=dry_run)
        for s in sources
    ]
    for ck in cks:  # before anything is planned or written
        check_input(spec, ck)
        if spec.check is not None:
            spec.check(config, ck)
    params = config_to_params(config)
    if max_shard_size != DEFAULT_MAX_SHARD:
        params["max_shard_size"] = max_shard_size
    if evaluate is not None and evaluate.text is not None:
        params["eval"] = evaluate.as_params()
    ctx = PassContext(sources=cks, writer=None, report=report, device=device, dry_run=dry_run)
    if dry_run:
        plan = spec.plan(config, ctx)
        return RunResult("dry-run", Path(dst) if dst else None, plan=plan, notes=ctx.notes)
    if dst is None:
        raise UsageError(f"{spec.name}: give an output directory DST (or use --dry-run)")
    dst = dest.resolve_output(dst)  # once, up front (DST/../DST, symlinks)
    if w.distributed:
        return _run_distributed(
            spec, config, ctx, params, dst, force=force, replace_stale=replace_stale,
            max_shard_size=max_shard_size, report=report, evaluate=evaluate,
        )  # fmt: skip
    dest.refuse_overlap(dst, cks)
    with report.status("hashing inputs"):
        inputs = [input_record(ck, dst) for ck in cks]
    if not force and mf.is_fresh(dst, pass_name=spec.name, parameters=params, inputs=inputs):
        return _up_to_date(dst, report)  # no lock needed to find nothing to do (works on read-only media too)
    with dest.output_lock(dst, report):  # one writer per output; a second identical run waits, then finds it fresh
        return _locked_run(
            spec,
            config,
            ctx,
            params,
            inputs,
            dst,
            force=force,
            replace_stale=replace_stale,
            max_shard_size=max_shard_size,
            report=report,
            evaluate=evaluate,
        )


def _decide(spec, params, inputs, dst: Path, *, force: bool, replace_stale: bool) -> tuple[str, bool]:
    """("fresh" | "run", force) for an output DST under the lock; raises when it must not be replaced."""
    if dst.exists():
        state, why = mf.freshness(dst, pass_name=spec.name, parameters=params, inputs=inputs)
        if not force:
            if state == "fresh":
                return "fresh", force
            if replace_stale and state in ("stale", "damaged"):
                force = True  # an earlier result of this same step (pipelines own their step outputs)
            elif state == "damaged":
                raise WeightsmithError(f"{dst}: the output is damaged ({why}); pass --force to rebuild it")
            elif state == "stale":
                raise WeightsmithError(
                    f"{dst}: output already exists (from other inputs or parameters); pass --force to replace it"
                )
        dest.refuse_foreign(dst)
    return "run", force


def _locked_run(
    spec, config, ctx, params, inputs, dst: Path, *, force, replace_stale, max_shard_size, report, evaluate
) -> RunResult:
    state, force = _decide(spec, params, inputs, dst, force=force, replace_stale=replace_stale)
    if state == "fresh":
        return _up_to_date(dst, report)
    plan = spec.plan(config, ctx)
    dest.clear_failures(dst)  # what a failed distributed run into DST left
    writer = None
    try:
        with CheckpointWriter(dst, force=force, max_shard_size=max_shard_size) as writer:
            _write(spec, config, ctx, plan, params, inputs, writer, report=report, evaluate=evaluate)
    except OSError as e:
        raise dest.os_error(e, dst, writer.total_size if writer is not None else None) from None
    report.log(
        f"wrote {dst} ({len(writer.planned)} tensors, {human_bytes(writer.total_size)} in {len(writer.shards)} "
        "shard(s))"
    )
    return RunResult("written", dst, plan=plan, manifest=mf.read(dst), notes=ctx.notes)


def _run_distributed(
    spec, config, ctx, params, dst: Path, *, force, replace_stale, max_shard_size, report, evaluate
) -> RunResult:
    """Rank 0 checks, decides freshness and takes the lock, and broadcasts the decision; every rank
    plans (plans are deterministic, and a plan may itself make collective calls); rank 0 creates
    the staging directory and broadcasts its path; every rank runs the pass into the shared
    staging files; rank 0 finalizes (completeness over all ranks, manifest, one rename) and every
    rank returns the same result."""
    w = dist.world()
    with contextlib.ExitStack() as stack:
        decision: dict[str, Any] | None = None
        inputs = None
        if w.is_main:
            dest.refuse_overlap(dst, ctx.sources)
            with report.status("hashing inputs"):
                inputs = [input_record(ck, dst) for ck in ctx.sources]
            stack.enter_context(dest.output_lock(dst, report))
            state, force = _decide(spec, params, inputs, dst, force=force, replace_stale=replace_stale)
            decision = {"status": "up-to-date" if state == "fresh" else "run"}
        decision = dist.broadcast_object(decision, 0)
        if decision["status"] == "up-to-date":
            return _up_to_date(dst, report)
        plan = spec.plan(config, ctx)
        writer = None
        if w.is_main:
            try:
                writer = stack.enter_context(CheckpointWriter(dst, force=force, max_shard_size=max_shard_size))
            except OSError as e:
                raise dest.os_error(e, dst) from None
            writer.shared = True
        tmp = dist.broadcast_object(str(writer.tmp) if writer is not None else None, 0)
        if writer is None:
            writer = stack.enter_context(CheckpointWriter.join(dst, tmp))
        try:
            _write(spec, config, ctx, plan, params, inputs, writer, report=report, evaluate=evaluate)
        except OSError as e:
            raise dest.os_error(e, dst, writer.total_size) from None
        dist.barrier()  # rank 0 has renamed the output into place
    report.log(
        f"wrote {dst} ({len(writer.planned)} tensors, {human_bytes(writer.total_size)} in {len(writer.shards)} "
        f"shard(s)) with {w.size} processes"
    )
    return RunResult("written", dst, plan=plan, manifest=mf.read(dst), notes=ctx.notes)


def _up_to_date(dst: Path, report: Reporter) -> RunResult:
    report.log(f"{dst}: up to date (same inputs, parameters and weightsmith version); nothing to do")
    return RunResult("up-to-date", dst, manifest=mf.read(dst))


def _write(spec, config, ctx, plan, params, inputs, writer, *, report, evaluate) -> None:
    cks = ctx.sources
    ctx.writer = writer
    if plan.tensors is not None:
        writer.plan(plan.tensors, layout=plan.layout)
    if plan.config is not None:
        writer.set_config(plan.config)
    spec.run(config, ctx, plan)
    w = dist.world()
    if w.distributed:  # every rank's written byte ranges count; the rest is rank 0's
        writer.close_for_handoff()
        ranges = dist.gather_objects(writer.written_ranges())
        if not w.is_main:
            writer._done = True  # nothing of the staging directory is this rank's to remove
            return
        for r in ranges:
            writer.mark_written(r)
    if ctx.copy_aux:
        writer.copy_aux_files(ctx.source.root, ctx.source.aux_files())
    if evaluate is not None and evaluate.text is not None:
        ctx.metrics["perplexity"] = evaluate_output(writer.tmp, evaluate, device=ctx.device, report=report)
    seed = params.get("seed")

    def build_manifest(tmp: Path) -> dict:
        from weightsmith.checkpoint.card import render_card, sidecars

        core = mf.build_core(
            pass_name=spec.name,
            reference_url=spec.reference_url,
            parameters=params,
            inputs=inputs,
            input_manifests=[ck.manifest for ck in cks],
            calibration=ctx.calibration,
            metrics=ctx.metrics,
            seed=seed,
            device=ctx.device,
            world_size=w.size,
        )
        steps = [s.get("pass", {}).get("name") for s in core.get("chain", [])] + [spec.name]
        known = registry.all_passes()
        tags = [t for step in steps if step in known for t in known[step].tags]
        (tmp / "README.md").write_text(render_card(spec, core, cks, tags))
        for fname, text in sidecars(core).items():
            (tmp / fname).write_text(text)
        return mf.with_outputs(core, tmp, tensors=len(writer.planned), total_size=writer.total_size)

    writer.finalize(build_manifest)


def evaluate_output(path: Path, opts: EvalOptions, *, device: str = "cpu", report: Reporter = QUIET) -> dict[str, Any]:
    """Perplexity of a just-written output (it loads like any checkpoint from the temporary directory)."""
    from transformers import AutoTokenizer

    from weightsmith.eval.perplexity import perplexity
    from weightsmith.eval.text import read_text, token_windows
    from weightsmith.loading import load

    tok = AutoTokenizer.from_pretrained(path)
    wins = token_windows(tok, read_text(opts.text), opts.length, opts.windows, source=opts.text)
    with report.status("evaluating the output"):
        res = perplexity(load(path, device=device), wins, device=device, report=report)
    return {"text": Path(opts.text).name, **{k: res[k] for k in ("perplexity", "windows", "length", "tokens")}}


def tensor_specs_like(ck: Checkpoint, names: list[str], dtype=None) -> list[TensorSpec]:
    out = []
    for n in names:
        info = ck.info(n)
        out.append(TensorSpec(n, info.shape, dtype or info.dtype))
    return out
