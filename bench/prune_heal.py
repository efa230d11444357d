"""Healing curve: perplexity of a pruned SmolLM2 against distillation tokens, and where a
distillation step's time goes on this machine.

    .venv/bin/python bench/prune_heal.py --student DIR [--milestones 0,8192,32768] [--eval-windows 16]
    .venv/bin/python bench/prune_heal.py --student DIR --profile [--mixed-precision bf16]
    .venv/bin/python bench/prune_heal.py --student DIR [--data self] [--hidden-loss 1] [--trainable mlp] [--lr LR]

The student (e.g. `weightsmith prune SRC DIR --params 0.75 --axis mlp`) is distilled from the
SmolLM2 source with the trainer `weightsmith distill` uses (KDTrainer: AdamW, lr 1e-4, 4 warm-up
steps, linear decay to lr/10 over the largest milestone, batches of 4 x 256 tokens of the
political speeches, seed 0), and evaluated on hamlet.txt (fp32, 512-token windows) at every
milestone. Intermediate milestones are points of one run whose schedule spans the largest
milestone (not separate runs with smaller budgets). --profile times the phases of a few steps
(teacher forward, student forward, loss, backward, optimizer) instead. The screens (docs/pruning.md,
"Screened, not built"): --data self distils on text the source samples itself, --hidden-loss adds a
loss on the residual stream after every layer, --trainable mlp trains only the MLPs. Results JSON
records the git commit and date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import git_commit, save  # noqa: E402
from quant import smollm2  # noqa: E402


def windows(tok, n: int, length: int = 256, seed: int = 0) -> torch.Tensor:
    from weightsmith.assets import political_speeches
    from weightsmith.calib import load_calibration
    from weightsmith.calib.config import CalibConfig

    cfg = CalibConfig(
        calib=str(political_speeches()), calib_field="speeches", calib_samples=n, calib_length=length, calib_seed=seed
    )
    return load_calibration(cfg, tok, default="self").ids


def profile(trainer, ids: torch.Tensor, steps: int) -> dict:
    """Wall seconds per phase of KDTrainer.step, replayed piece by piece (same maths)."""
    from weightsmith.prune.distill import kd_loss

    phases = {k: 0.0 for k in ("teacher_forward", "student_forward", "loss", "backward", "optimizer")}
    for k in range(steps):
        batch = ids[k * 4 : (k + 1) * 4]
        t0 = time.perf_counter()
        with torch.inference_mode():
            t_logits = trainer.teacher(batch).logits
        t1 = time.perf_counter()
        with trainer.accel.autocast():
            s_logits = trainer.student(batch).logits
        t2 = time.perf_counter()
        loss = kd_loss(s_logits, t_logits.clone(), trainer.temperature)
        t3 = time.perf_counter()
        trainer.accel.backward(loss)
        t4 = time.perf_counter()
        trainer.accel.clip_grad_norm_(trainer.student.parameters(), 1.0)
        trainer.opt.step()
        trainer.sched.step()
        trainer.opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        if k == 0:
            continue  # warm-up step (allocator, oneDNN kernel selection)
        for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            phases[name] += dt / (steps - 1)
    total = sum(phases.values())
    return {"seconds_per_step": total, "tokens_per_s": 4 * ids.shape[1] / total, "phases": phases}


def hidden_loss_step(trainer, weight: float):
    """A KDTrainer step with the screened intermediate loss (not in weightsmith: measured, not built):
    the KL plus `weight` times the residual stream's Σ‖h_s - h_t‖² / ‖h_t‖² per token after every
    layer, averaged over tokens and layers."""
    from weightsmith.prune.distill import kd_loss

    def step(batch):
        with torch.no_grad():
            t = trainer.teacher(batch, output_hidden_states=True)
        with trainer.accel.autocast():
            s = trainer.student(batch, output_hidden_states=True)
        pairs = list(zip(s.hidden_states[1:-1], t.hidden_states[1:-1]))
        rel = sum(((a - b).pow(2).sum(-1) / b.pow(2).sum(-1)).mean() for a, b in pairs) / len(pairs)
        loss = kd_loss(s.logits, t.logits, trainer.temperature) + weight * rel
        trainer.accel.backward(loss)
        trainer.accel.clip_grad_norm_(trainer.student.parameters(), 1.0)
        trainer.opt.step()
        trainer.sched.step()
        trainer.opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", required=True)
    ap.add_argument("--scratch", default="/tmp/weightsmith-bench/heal")
    ap.add_argument("--milestones", default="0,8192,32768")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-steps", type=int, default=4)
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    ap.add_argument(
        "--data",
        default="speeches",
        choices=["speeches", "self"],
        help="distillation text: the political speeches, or windows the source samples itself (seed 0)",
    )
    ap.add_argument(
        "--hidden-loss",
        type=float,
        default=0.0,
        help="add this weight times the mean over layers of the student's relative squared error to the "
        "teacher's residual stream (screen; same hidden size only)",
    )
    ap.add_argument(
        "--trainable", default="all", choices=["all", "mlp"], help="train every weight, or only the MLPs (screen)"
    )
    ap.add_argument("--name", default="heal", help="results file bench/results/NAME.json (curve only)")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    import weightsmith
    from weightsmith.assets import hamlet
    from weightsmith.eval.perplexity import perplexity
    from weightsmith.eval.text import read_text, token_windows
    from weightsmith.prune.distill import KDTrainer

    src = smollm2(Path(args.scratch))
    tok = AutoTokenizer.from_pretrained(src)
    teacher = weightsmith.load(src, dtype=torch.float32)
    student = weightsmith.load(args.student, dtype=torch.float32)
    meta = {
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "student": str(args.student),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "mixed_precision": args.mixed_precision,
        "lr": args.lr,
        "data": args.data,
        "hidden_loss": args.hidden_loss,
        "trainable": args.trainable,
    }
    torch.manual_seed(0)
    if args.profile:
        ids = windows(tok, 4 * args.profile_steps)
        trainer = KDTrainer(
            student, teacher, steps=args.profile_steps, lr=args.lr, device="cpu", mixed_precision=args.mixed_precision
        )
        res = {**meta, **profile(trainer, ids, args.profile_steps)}
        print(res, flush=True)
        save("heal-profile" + ("-bf16" if args.mixed_precision == "bf16" else ""), res)
        return
    marks = sorted(int(x) for x in args.milestones.split(","))
    steps = max(1, -(-marks[-1] // (4 * 256)))
    if args.data == "self":
        from weightsmith.calib.windows import self_generated

        t0 = time.perf_counter()
        ids = self_generated(teacher, tok, 4 * steps, 256, 0)
        meta["generation_seconds"] = round(time.perf_counter() - t0, 1)
    else:
        ids = windows(tok, 4 * steps)
    order = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(0))
    wins = token_windows(tok, read_text(hamlet()), 512, args.eval_windows, source="hamlet.txt")
    src_ppl = perplexity(teacher, wins)["perplexity"]
    if args.trainable == "mlp":  # frozen weights get no gradient: AdamW and the clipping skip them
        for name, p in student.named_parameters():
            p.requires_grad_(".mlp." in name)
    trainer = KDTrainer(student, teacher, steps=steps, lr=args.lr, device="cpu", mixed_precision=args.mixed_precision)
    step = hidden_loss_step(trainer, args.hidden_loss) if args.hidden_loss else trainer.step
    rows, done, train_s = [], 0, 0.0
    for mark in marks:
        t0 = time.perf_counter()
        while done * 1024 < mark:
            step(ids[order[done * 4 : (done + 1) * 4]])
            done += 1
        train_s += time.perf_counter() - t0
        model = trainer.model()
        ppl = perplexity(model, wins)["perplexity"]
        trainer.student.train()
        rows.append(
            {
                "tokens": done * 1024,
                "ppl": ppl,
                "x_source": ppl / src_ppl,
                "train_seconds": round(train_s, 1),
            }
        )
        print(rows[-1], flush=True)
        save(
            args.name, {**meta, "source_ppl": src_ppl, "eval_windows": args.eval_windows, "rows": rows, "partial": True}
        )
    save(args.name, {**meta, "source_ppl": src_ppl, "eval_windows": args.eval_windows, "rows": rows})


if __name__ == "__main__":
    main()
