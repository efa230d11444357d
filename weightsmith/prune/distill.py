"""`weightsmith distill STUDENT TEACHER DST`: logit distillation that heals any pass.

Minitron's recipe: forward KL(teacher ‖ student) on the logits at temperature T (×T²), no LM
loss; AdamW with linear warm-up and linear decay to lr/10; gradient clipping at 1. Data: the
calibration sources (`--calib`), cut into `--calib-length` windows, `--tokens` in total, seeded.
Device placement and mixed precision through accelerate. Every `--save-every` steps the full
training state (student, optimizer, scheduler, step, RNG) is saved atomically next to DST; a run
interrupted for any reason resumes from it and finishes with the same bytes as an uninterrupted
run. The student is written in its own dtypes and tensor names.

Under a launcher (torchrun / accelerate launch) training is data-parallel with torch DDP through
accelerate (gloo on CPUs, NCCL on GPUs): every rank holds the student and the teacher, takes its
contiguous block of each step's windows, and DDP averages the gradients (each rank's loss weighted
by its share of the windows, so any split gives the one-process gradient); the step order, seed and
schedule are the one-process ones. Rank 0 saves the training state and writes the student; every
rank resumes from the same state. `--fsdp student|both` shards the student's parameters, gradients
and AdamW state (and the teacher's parameters) over the ranks with torch FSDP2 instead
(weightsmith/fsdp.py): the whole state is gathered onto rank 0 for the resume file and the output.
The saved state is in the format of an unsharded model and optimizer and the data order is by global
windows, so a run resumes at another world size, sharded or not (agreeing to fp tolerance).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from weightsmith import dist
from weightsmith.calib.config import CalibConfig
from weightsmith.checkpoint import tokenizer
from weightsmith.checkpoint.writer import TensorSpec
from weightsmith.errors import CheckpointError, UsageError
from weightsmith.passes import PassSpec, Plan, register


@dataclass(frozen=True)
class DistillConfig(CalibConfig):
    tokens: int = field(
        default=65536, metadata={"help": "training tokens in total (windows x length, rounded up to whole batches)"}
    )
    calib_length: int = field(default=256, metadata={"help": "tokens per training window"})
    batch_size: int = field(default=4, metadata={"help": "windows per optimizer step"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (decays linearly to lr/10)"})
    warmup: int = field(default=4, metadata={"help": "linear warm-up steps"})
    temperature: float = field(
        default=1.0, metadata={"help": "softmax temperature of the logit KL (the loss is scaled by T²)"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    seed: int = field(default=0, metadata={"help": "seed for data order and initialisation of optimizer state"})
    mixed_precision: Literal["no", "bf16", "fp16"] = field(
        default="no", metadata={"help": "accelerate mixed precision"}
    )
    save_every: int = field(
        default=50, metadata={"help": "save a resumable training state every N steps (0: never)", "runtime": True}
    )
    resume: bool = field(
        default=True,
        metadata={"help": "resume from a saved training state of this same job when one exists", "runtime": True},
    )
    fsdp: Literal["off", "student", "both"] = field(
        default="off",
        metadata={
            "help": "under a launcher, shard over the ranks (torch FSDP2) the student's parameters, gradients and "
            "optimizer state ('student'), and the teacher's parameters too ('both'), instead of a whole copy per "
            "rank (DDP); `accelerate launch --use_fsdp` means 'student'. One process: ignored",
            "runtime": True,
        },
    )

    def __post_init__(self):
        if self.tokens < self.calib_length:
            raise UsageError(
                f"--tokens {self.tokens}: must be at least one window (--calib-length {self.calib_length})"
            )
        if self.batch_size < 1 or self.lr <= 0 or self.temperature <= 0:
            raise UsageError("--batch-size, --lr and --temperature must be positive")
        if self.fsdp != "off" and self.mixed_precision == "fp16":
            raise UsageError("--mixed-precision fp16 with --fsdp: FSDP here has no gradient scaler; use bf16")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(softmax(t/T) ‖ softmax(s/T)) · T² (fp32)."""
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = torch.nn.functional.kl_div(s, t, log_target=True, reduction="sum") / s[..., 0].numel()
    return kl * temperature**2


class KDTrainer:
    """The one logit-distillation loop (used by `distill` and by the Minitron search's round):
    AdamW (β 0.9/0.95), linear warm-up then linear decay to lr/10 over `steps`, clipping at 1,
    the teacher's logits without gradients, accelerate for device and mixed precision.

    `data_parallel` (under a launcher): the student is wrapped in DDP and each `step(batch)` trains
    on this rank's block of the batch; otherwise (and for a rank training alone, such as a Minitron
    candidate's owner) the whole batch, with no collective. `sharded`: the student (and maybe the
    teacher) was already wrapped by FSDP2 (`weightsmith.fsdp.shard_model`); each rank trains on its
    block as under DDP, without accelerate (FSDP2 does placement and mixed precision itself)."""

    def __init__(
        self,
        student,
        teacher,
        *,
        steps: int,
        lr: float,
        warmup: int = 4,
        weight_decay: float = 0.0,
        temperature: float = 1.0,
        device: str = "cpu",
        mixed_precision: str = "no",
        data_parallel: bool = True,
        sharded: bool = False,
    ):
        self.steps, self.warmup, self.temperature, self.sharded = steps, warmup, temperature, sharded
        self.world = dist.world(device) if data_parallel or sharded else dist.World()
        for p in teacher.parameters():
            p.requires_grad_(False)
        student.train()
        opt = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_at)
        if sharded:
            self.accel, self.device = None, dist.local_device(device)
            self.student, self.opt, self.sched = student, opt, sched
            self.teacher = teacher.eval()
            if not any(_is_dtensor(p) for p in teacher.parameters()):
                self.teacher = self.teacher.to(self.device)
            return
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration

        # split_batches: each step's windows are split over the ranks (the scheduler steps once per step)
        self.accel = Accelerator(
            cpu=device == "cpu",
            mixed_precision=mixed_precision,
            dataloader_config=DataLoaderConfiguration(split_batches=True),
        )
        self.device = self.accel.device
        if dist.world(device).distributed and not data_parallel:  # under a launcher, training alone: no DDP
            self.opt, self.sched = self.accel.prepare(opt, sched)
            self.student = student.to(self.accel.device)
        else:
            self.student, self.opt, self.sched = self.accel.prepare(student, opt, sched)
        self.teacher = teacher.eval().to(self.accel.device)

    def _lr_at(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return 1.0 - 0.9 * (step - self.warmup) / max(1, self.steps - self.warmup)

    def step(self, batch: torch.Tensor) -> float:
        """One optimizer step on `batch` (the whole step's windows, the same on every rank); returns
        the step's KL over all of them."""
        n, w = batch.shape[0], self.world
        if w.distributed:
            if n < w.size:
                raise UsageError(f"--batch-size {n} cannot be split over {w.size} ranks: give at least {w.size}")
            batch = batch[dist.shard(n, w)]
        batch = batch.to(self.device)
        # no_grad, not inference_mode: FSDP's all-gathered teacher weights must not become inference tensors
        with torch.no_grad():
            t_logits = self.teacher(batch).logits
        with self.accel.autocast() if self.accel else contextlib.nullcontext():
            s_logits = self.student(batch).logits
        loss = kd_loss(s_logits, t_logits, self.temperature)
        share = batch.shape[0] / n  # this rank's part of the step's windows (DDP and FSDP average over ranks)
        scaled = loss * (share * w.size) if w.distributed else loss
        if self.accel:
            self.accel.backward(scaled)
            self.accel.clip_grad_norm_(self.student.parameters(), 1.0)
        else:
            scaled.backward()
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)  # the norm over all shards
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if w.distributed:
            return float(dist.sum_ordered(torch.tensor([loss.item() * share], dtype=torch.float64)))
        return loss.item()

    def model(self):
        if self.sharded:
            raise RuntimeError("internal error: a sharded student has no whole model; use state_dict()")
        return self.accel.unwrap_model(self.student).eval()

    def state_dict(self) -> dict | None:
        """The training state in the format of an unsharded model and optimizer (the same at any world
        size, sharded or not). Sharded: collective, whole tensors on rank 0 and None on the others."""
        if self.sharded:
            from weightsmith import fsdp

            got = fsdp.gather_state(self.student, self.opt)
            if got is None:
                return None
            return {"student": got[0], "optimizer": got[1], "scheduler": self.sched.state_dict()}
        return {
            "student": self.accel.unwrap_model(self.student).state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
        }

    def load_state_dict(self, st: dict | None) -> None:
        """Sharded: collective; `st` is read on rank 0 only (None elsewhere) and each rank receives its rows."""
        if self.sharded:
            from weightsmith import fsdp

            fsdp.scatter_state(self.student, self.opt, (st["student"], st["optimizer"]) if st else None)
            self.sched.load_state_dict(dist.broadcast_object(st["scheduler"] if st else None, 0))
            return
        self.accel.unwrap_model(self.student).load_state_dict(st["student"])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def plan(cfg: DistillConfig, ctx) -> Plan:
    student, teacher = ctx.sources
    if student.config.vocab_size != teacher.config.vocab_size:
        raise CheckpointError(
            f"student vocabulary {student.config.vocab_size} != teacher {teacher.config.vocab_size}: logit "
            "distillation needs one tokenizer"
        )
    a, b = (
        tokenizer.digest(student.root, tokenizer.VOCABULARY_FILES),
        tokenizer.digest(teacher.root, tokenizer.VOCABULARY_FILES),
    )
    if a and b and tokenizer.differences(a, b):
        raise CheckpointError(
            f"{student.root} and {teacher.root} have different tokenizers (tokenizer files differ); logit distillation "
            "needs the same one"
        )
    windows = math.ceil(cfg.tokens / cfg.calib_length)
    steps = math.ceil(windows / cfg.batch_size)
    tensors = [TensorSpec(i.name, i.shape, i.dtype) for i in student.infos()]
    return Plan(
        tensors=tensors,
        config=student.config,
        summary={"steps": steps, "windows": windows, "tokens": steps * cfg.batch_size * cfg.calib_length},
    )


def _state_dir(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.distill-state"


def _save_state(path: Path, state: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path / "state.pt")


def run(cfg: DistillConfig, ctx, plan: Plan) -> None:
    from weightsmith import loading
    from weightsmith.passes import config_to_params

    student_ck, teacher_ck = ctx.sources
    steps = plan.summary["steps"]
    windows = steps * cfg.batch_size
    data_cfg = CalibConfig(
        calib=cfg.calib,
        calib_samples=windows,
        calib_length=cfg.calib_length,
        calib_seed=cfg.seed,
        calib_field=cfg.calib_field,
        calib_chat_template=cfg.calib_chat_template,
    )
    data = ctx.calibrate(data_cfg, default="self", index=1)
    ids = data.ids
    torch.manual_seed(cfg.seed)
    mode = _fsdp_mode(cfg, ctx)
    if mode == "off":
        student = loading.load(student_ck.root, dtype=torch.float32)
        teacher = loading.load(teacher_ck.root, dtype=torch.float32)
    else:
        from weightsmith import fsdp

        mesh = fsdp.mesh(ctx.device)
        student = fsdp.shard_model(
            lambda: loading.load(student_ck.root, dtype=torch.float32),
            lambda: _empty_model(student_ck, "--fsdp"),
            mesh,
            mp_policy=_mp_policy(cfg.mixed_precision),
        )
        if mode == "both":  # forward only, in fp32 (as the unsharded teacher): gathered a layer at a time
            teacher = fsdp.shard_model(
                lambda: loading.load(teacher_ck.root, dtype=torch.float32),
                lambda: _empty_model(teacher_ck, "--fsdp both"),
                mesh,
            )
        else:
            teacher = loading.load(teacher_ck.root, dtype=torch.float32)
        held = dist.gather_objects(fsdp.local_numel(student))
        ctx.report.log(
            f"FSDP ({mode}) over {len(held)} ranks: the ranks hold {' / '.join(f'{n:,}' for n in held)} of the "
            f"{sum(math.prod(i.shape) for i in student_ck.infos()):,} student parameter elements (and as many "
            "gradient and AdamW moment elements each)"
        )
    trainer = KDTrainer(
        student,
        teacher,
        steps=steps,
        lr=cfg.lr,
        warmup=cfg.warmup,
        weight_decay=cfg.weight_decay,
        temperature=cfg.temperature,
        device=ctx.device,
        mixed_precision=cfg.mixed_precision,
        sharded=mode != "off",
    )
    order = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    job = hashlib.sha256(
        json.dumps(
            {
                "params": config_to_params(cfg),
                "student": str(student_ck.root),
                "teacher": str(teacher_ck.root),
                "data": data.description.get("sha256"),
            },
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()
    state_dir = _state_dir(ctx.writer.dst)  # the same path on every rank (a shared filesystem)
    main = dist.world().is_main
    start, losses = 0, []
    if cfg.resume:
        # the state holds whole tensors, in the format of an unsharded model and optimizer, and the data
        # order is by global windows: it resumes at any world size, sharded or not. Sharded: rank 0
        # alone reads it (memory-mapped) and each rank receives its rows; DDP: every rank reads it.
        state_file = state_dir / "state.pt"
        st = None
        if state_file.is_file() and (main or not trainer.sharded):
            st = torch.load(state_file, weights_only=False, mmap=True)
        kind = "none" if st is None else ("job" if st.get("job") == job else "other")
        if trainer.sharded:
            kind = dist.broadcast_object(kind, 0)
        if kind == "job":
            trainer.load_state_dict(st)
            meta = {k: st[k] for k in ("rng", "step", "losses")} if st else None
            if trainer.sharded:
                meta = dist.broadcast_object(meta, 0)
            torch.set_rng_state(meta["rng"])
            start, losses = meta["step"], list(meta["losses"])
            ctx.notes.append(f"resumed from the saved training state at step {start}/{steps}")
        elif kind == "other":
            ctx.notes.append(f"{state_dir}: a saved state of another job (other options or inputs) was ignored")
        del st
    dist.barrier()  # every rank has read the state before rank 0 may replace it
    t0 = time.perf_counter()
    # a bar on a terminal; KL and tokens/s in the log lines
    for step in ctx.report.track(range(start, steps), desc="distilling"):
        losses.append(trainer.step(ids[order[step * cfg.batch_size : (step + 1) * cfg.batch_size]]))
        done = step + 1
        if done % max(1, steps // 10) == 0 or done == steps:
            rate = (done - start) * cfg.batch_size * cfg.calib_length / max(time.perf_counter() - t0, 1e-9)
            ctx.report.log(f"distill step {done}/{steps}: KL {losses[-1]:.4f}, {rate:,.0f} tokens/s")
        if cfg.save_every and done % cfg.save_every == 0 and done < steps and (main or trainer.sharded):
            st = trainer.state_dict()  # DDP: every rank holds the same; sharded: gathered onto rank 0
            if main:
                _save_state(state_dir, {"job": job, "step": done, "losses": losses, **st, "rng": torch.get_rng_state()})
            del st
    train_seconds = time.perf_counter() - t0
    ctx.report.log(
        f"distilled {(steps - start) * cfg.batch_size * cfg.calib_length:,} tokens in {train_seconds:.0f} s "
        f"({(steps - start) * cfg.batch_size * cfg.calib_length / max(train_seconds, 1e-9):,.1f} tokens/s; timings "
        "stay out of the manifest)"
    )
    if trainer.sharded:  # the whole student gathered onto rank 0, which writes it
        from weightsmith import fsdp

        whole = fsdp.gather_model(trainer.student)
        if main:
            write_student(ctx.writer, student_ck, _assembled(student_ck, whole))
            shutil.rmtree(state_dir, ignore_errors=True)
        del whole
    elif main:  # every rank holds the same student; rank 0 writes it
        write_student(ctx.writer, student_ck, trainer.model())
        shutil.rmtree(state_dir, ignore_errors=True)
    first = sum(losses[: max(1, len(losses) // 10)]) / max(1, len(losses[: max(1, len(losses) // 10)]))
    last = sum(losses[-max(1, len(losses) // 10) :]) / max(1, len(losses[-max(1, len(losses) // 10) :]))
    ctx.metrics.update(
        {
            "steps": steps,
            "tokens": windows * cfg.calib_length,
            "kl_first_steps": first,
            "kl_last_steps": last,
            "kl_per_step": [round(x, 6) for x in losses],
        }
    )


def _fsdp_mode(cfg: DistillConfig, ctx) -> str:
    """--fsdp, or 'student' under `accelerate launch --use_fsdp`; 'off' in one process."""
    mode = cfg.fsdp
    if mode == "off" and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("true", "1"):
        mode = "student"
    if mode != "off" and not dist.world(ctx.device).distributed:
        ctx.notes.append(f"--fsdp {mode} in one process: nothing to shard, trained unsharded")
        return "off"
    return mode


def _mp_policy(mixed_precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision == "bf16":  # bf16 compute, fp32 weights, optimizer state and gradient reduction
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _empty_model(ck, option: str):
    """The checkpoint's model on the meta device (for the ranks that receive their shards from rank 0)."""
    from transformers import AutoModelForCausalLM

    if ck.config_dict.get("quantization_config"):
        raise UsageError(f"{option}: {ck.root} is quantized; FSDP trains plain checkpoints only (drop {option})")
    return AutoModelForCausalLM.from_config(ck.config, dtype=torch.float32)


def _assembled(ck, state: dict):
    """A transformers model around the whole state gathered from the shards (its tensors, not copies)."""
    with torch.device("meta"):
        model = _empty_model(ck, "--fsdp")
    model.load_state_dict(state, assign=True, strict=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def write_student(writer, student_ck, model) -> None:
    """Save through transformers (which knows each family's on-disk layout, e.g. per-expert MoE
    tensors), then copy every tensor into the output in the student's own dtypes."""
    from weightsmith.checkpoint.reader import Checkpoint

    with tempfile.TemporaryDirectory(dir=writer.tmp.parent, prefix=".distill-save-") as td:
        # under torch.distributed transformers saves on rank 0 only; here the caller is the rank
        # that holds this model (a Minitron candidate's owner may be any rank)
        model.should_save_on_this_rank = lambda is_main_process: True
        try:
            model.save_pretrained(td, safe_serialization=True)
        finally:
            del model.should_save_on_this_rank
        saved = Checkpoint(td)
        for info in student_ck.infos():
            if info.name not in saved:
                raise CheckpointError(f"internal error: the trained student lacks {info.name!r}")
            writer.write(info.name, saved.get(info.name).to(info.dtype))
        saved.close()


register(
    PassSpec(
        name="distill",
        config_cls=DistillConfig,
        plan=plan,
        run=run,
        help="logit-KL distillation of a student (pruned, converted...) from its teacher (Minitron recipe), resumable",
        reference_url="https://arxiv.org/abs/2408.11796",
        relation="finetune",
        sources=2,
        source_names=("student", "teacher"),
        tags=("distilled",),
    )
)
