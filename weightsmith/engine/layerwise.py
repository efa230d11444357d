"""Run a model one decoder layer at a time, straight from the checkpoint on disk.

Memory = one layer's weights + the calibration activations (which may live in memory-mapped files),
whatever the model's depth. Attention, masks, rotary embeddings and MoE routing are transformers'
own code: the engine builds the real model on the meta device, captures the exact keyword
arguments the model passes to each layer (masks, position embeddings), and replays them.

A pass drives it through `LayerHandle`s::

    engine = LayerwiseEngine(checkpoint)
    def process(layer):                       # called once per decoder layer, in order
        stats = layer.run(observe={"model.layers.3.mlp.down_proj": fn})   # hooks see module inputs
        layer.set_weight(name, new_tensor)    # replace weights (same shape)
        # by default the next layer sees this layer's outputs *after* the pass's changes
    final_hidden = engine.run(calibration_ids, process)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from weightsmith.arch import arch_for
from weightsmith.engine.activations import ActivationStore, OffloadPolicy
from weightsmith.engine.experts import UnfusedExperts
from weightsmith.engine.skeleton import build_skeleton, get_path, materialize, release, set_path
from weightsmith.errors import UnsupportedError
from weightsmith.progress import QUIET, Reporter

Observer = Callable[[torch.Tensor, torch.Tensor], None]  # (module input, module output)


def _trim_heap() -> None:
    """Return freed heap memory to the OS (glibc keeps fragments of freed layer weights otherwise,
    and RSS creeps up by tens of MB per layer). A no-op where malloc_trim does not exist."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None

# Test hook (tests/test_distributed.py): WEIGHTSMITH_TEST_FAIL=RANK:LAYER[:kill] makes that rank
# raise (or SIGKILL itself) when the engine reaches that layer, to exercise failure handling.
FAIL_HOOK = "WEIGHTSMITH_TEST_FAIL"


def _test_failure(index: int) -> None:
    import os

    spec = os.environ.get(FAIL_HOOK)
    if not spec:
        return
    from weightsmith import dist
    from weightsmith.errors import WeightsmithError

    rank, layer, *how = spec.split(":")
    if int(rank) != dist.world().rank or int(layer) != index:
        return
    if how == ["kill"]:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    raise WeightsmithError(f"layer {index}: failure injected by {FAIL_HOOK}={spec}")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class _StopForward(Exception):
    """Raised by a hook once every observed module of a batch has run."""


def copy_layer_attributes(stand_in: nn.Module, original: nn.Module) -> None:
    """Give a module standing in for a decoder layer the layer's plain attributes (e.g.
    attention_type, read by some models to pick a mask)."""
    for k, v in vars(original).items():
        if not k.startswith("_") and isinstance(v, (str, int, float, bool)):
            setattr(stand_in, k, v)


class _Recorder(nn.Module):
    """Stands in for a decoder layer to capture the keyword arguments the model gives it."""

    def __init__(self, original: nn.Module, sink: dict):
        super().__init__()
        self._sink = sink
        copy_layer_attributes(self, original)

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("decoder layer called with positional arguments beyond hidden_states; not supported")
        self._sink.update(kwargs)
        return hidden_states


@dataclass
class LayerStats:
    index: int
    seconds: float
    forward_passes: int
    expert_tokens: list[int] | None = None


class LayerHandle:
    """One materialised decoder layer with its inputs; what a pass gets to work with."""

    def __init__(self, engine: "LayerwiseEngine", index: int, module: nn.Module, inputs: ActivationStore):
        self.engine = engine
        self.index = index
        self.module = module
        self.inputs = inputs
        self.next_inputs: ActivationStore | None = None
        self.forward_passes = 0
        self._modules: dict[str, nn.Module] | None = None

    @property
    def view(self):
        return self.engine.view

    @property
    def prefix(self) -> str:
        return self.view.layer_prefix(self.index)

    # --- module lookup by on-disk names ---
    def modules(self) -> dict[str, nn.Module]:
        """Disk prefix -> submodule, for every submodule of this layer."""
        if self._modules is None:
            out = {}
            for rel, mod in self.module.named_modules():
                if rel:
                    out[self.view.to_disk(self.index, rel)] = mod
            self._modules = out
        return self._modules

    def linear(self, disk_prefix: str) -> nn.Module:
        """A module holding a 2-D `weight` (nn.Linear, or a router such as MixtralTopKRouter)."""
        mod = self.modules().get(disk_prefix)
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise KeyError(f"layer {self.index} has no linear module {disk_prefix!r}")
        return mod

    def in_features(self, disk_prefix: str) -> int:
        return int(self.linear(disk_prefix).weight.shape[1])

    def tensor(self, disk_name: str) -> torch.Tensor:
        prefix, _, attr = disk_name.rpartition(".")
        return getattr(self.modules()[prefix], attr)

    def set_weight(self, disk_name: str, value: torch.Tensor) -> None:
        t = self.tensor(disk_name)
        if tuple(value.shape) != tuple(t.shape):
            raise ValueError(
                f"{disk_name}: new value {list(value.shape)} does not match {list(t.shape)}; use replace_module for "
                "shape changes"
            )
        with torch.no_grad():
            t.copy_(value.to(t.dtype))

    def replace_module(self, disk_prefix: str, new: nn.Module) -> None:
        rel = next(r for r, m in self.module.named_modules() if r and self.view.to_disk(self.index, r) == disk_prefix)
        set_path(self.module, rel, new.to(self.engine.device))
        self._modules = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Current parameters and persistent buffers of the layer, by on-disk name."""
        out = {}
        for rel, t in list(self.module.named_parameters()) + [
            (n, b) for n, b in self.module.named_buffers() if not n.endswith(".tokens")
        ]:
            out[self.view.to_disk(self.index, rel)] = t.detach()
        return out

    def expert_tokens(self) -> list[int] | None:
        for m in self.module.modules():
            if isinstance(m, UnfusedExperts):
                return [int(x) for x in m.tokens]
        return None

    # --- execution ---
    def run(
        self,
        observe: dict[str, Observer] | None = None,
        *,
        keep_outputs: bool = True,
        inputs: ActivationStore | None = None,
    ) -> ActivationStore | None:
        """Push every calibration batch through the layer as it is now; hooks see module inputs/outputs.

        Without `keep_outputs`, a batch's forward stops as soon as every observed module has run
        (the rest of the layer would be computed for nothing).
        """
        eng = self.engine
        mods = self.modules()
        handles = []
        fired: set[str] = set()
        wanted = set(observe or {})
        stop_early = not keep_outputs and bool(wanted)

        def hook(name, fn):
            def h(m, i, o):
                fn(i[0], o if isinstance(o, torch.Tensor) else o[0])
                fired.add(name)
                if stop_early and fired >= wanted:
                    raise _StopForward

            return h

        for name, fn in (observe or {}).items():
            if name not in mods:
                raise KeyError(f"layer {self.index} has no module {name!r}")
            handles.append(mods[name].register_forward_hook(hook(name, fn)))
        for m in self.module.modules():
            if isinstance(m, UnfusedExperts):
                m.tokens.zero_()
        src = inputs or self.inputs
        out = eng.new_store() if keep_outputs else None
        try:
            with torch.no_grad():
                for sl, x in src.batches(eng.batch_size):
                    fired.clear()
                    try:
                        y = self.module(x.to(eng.device, eng.dtype), **eng.layer_kwargs(self.index, x.shape[0]))
                    except _StopForward:
                        continue
                    if isinstance(y, tuple):
                        y = y[0]
                    if out is not None:
                        out.data[sl] = y.to("cpu", out.dtype)
        finally:
            for h in handles:
                h.remove()
        self.forward_passes += 1
        return out


class LayerwiseEngine:
    def __init__(
        self,
        ck,
        *,
        device: str | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 8,
        offload: str = "auto",
        offload_dir: str | None = None,
        activation_dtype: torch.dtype = torch.float32,
        report: Reporter = QUIET,
    ):
        self.ck = ck
        method = (ck.config_dict.get("quantization_config") or {}).get("quant_method")
        if method not in (None, "fp8"):
            raise UnsupportedError(
                f"{ck.root}: the layer-wise engine reads floating-point or fp8 checkpoints, not {method!r}-quantized "
                "ones"
            )
        self.config = ck.config
        self.view = arch_for(self.config)
        self.device = torch.device(device or default_device())
        self.dtype = dtype
        self.batch_size = batch_size
        self.activation_dtype = activation_dtype
        self.report = report
        self.policy = OffloadPolicy(offload, offload_dir)
        self.model = build_skeleton(self.config, self.view, dtype)
        self.layers = get_path(self.model, self.view.layers_path)
        self.decoder = get_path(self.model, self.view.layers_path.rsplit(".", 1)[0])
        if getattr(self.decoder, "rotary_emb", None) is not None:
            self.decoder.rotary_emb.to(self.device)
        self._kwargs: dict[int, list[dict]] = {}
        self._shape: tuple[int, int] | None = None
        self.layer_stats: list[LayerStats] = []

    # --- activations ---
    def new_store(self) -> ActivationStore:
        n, seq = self._shape
        hidden = self.view.hidden
        nbytes = n * seq * hidden * torch.empty((), dtype=self.activation_dtype).element_size()
        return ActivationStore(n, seq, hidden, self.activation_dtype, self.policy.directory_for(nbytes))

    def embed(self, ids: torch.Tensor) -> ActivationStore:
        self._shape = (int(ids.shape[0]), int(ids.shape[1]))
        self._kwargs.clear()
        emb_path = self.view.module_path(self.view.family.embed)
        emb = get_path(self.model, emb_path)
        materialize(emb, lambda n: f"{emb_path}.{n}", self.ck, self.device, "the embedding")
        store = self.new_store()
        with torch.no_grad():
            for s in range(0, ids.shape[0], self.batch_size):
                store.data[s : s + self.batch_size] = emb(ids[s : s + self.batch_size].to(self.device)).to(
                    "cpu", store.dtype
                )
        release(emb)
        return store

    def layer_kwargs(self, index: int, batch: int) -> dict:
        if batch not in self._kwargs:
            self._kwargs[batch] = self._capture(batch)
        return self._kwargs[batch][index]

    def _capture(self, batch: int) -> list[dict]:
        """Run the decoder with every layer replaced by a recorder to learn each layer's kwargs."""
        seq = self._shape[1]
        sinks = [dict() for _ in range(self.view.num_layers)]
        originals = list(self.layers)
        norm_path = self.view.module_path(self.view.family.final_norm)
        norm = get_path(self.model, norm_path)
        try:
            for i in range(len(originals)):
                self.layers[i] = _Recorder(originals[i], sinks[i])
            set_path(self.model, norm_path, nn.Identity())
            x = torch.zeros(batch, seq, self.view.hidden, dtype=self.dtype, device=self.device)
            with torch.no_grad():
                self.decoder(inputs_embeds=x, use_cache=False)
        finally:
            for i, m in enumerate(originals):
                self.layers[i] = m
            set_path(self.model, norm_path, norm)
        for s in sinks:
            s.pop("past_key_values", None)
            s["use_cache"] = False
        return sinks

    # --- the loop ---
    def run(
        self,
        ids: torch.Tensor,
        process: Callable[[LayerHandle], None] | None = None,
        *,
        layers: Iterable[int] | None = None,
        inputs: ActivationStore | None = None,
    ) -> ActivationStore:
        """Embed `ids` (or start from `inputs`), then for each layer: materialise, process, advance."""
        h = inputs if inputs is not None else self.embed(ids)
        if inputs is not None:
            self._shape = (inputs.shape[0], inputs.shape[1])
        todo = list(range(self.view.num_layers)) if layers is None else list(layers)
        for i in self.report.track(todo, desc="layers"):
            t0 = time.perf_counter()
            _test_failure(i)
            module = self.layers[i]
            materialize(module, lambda n, i=i: self.view.to_disk(i, n), self.ck, self.device, f"layer {i}")
            handle = LayerHandle(self, i, module, h)
            if process is not None:
                process(handle)
            nxt = handle.next_inputs if handle.next_inputs is not None else handle.run()
            self.layer_stats.append(
                LayerStats(i, time.perf_counter() - t0, handle.forward_passes, handle.expert_tokens())
            )
            if handle.module is not module:  # a pass replaced the whole layer
                self.layers[i] = handle.module
            release(self.layers[i])
            if h is not nxt and h is not inputs:
                h.close()
            h = nxt
            _trim_heap()
        return h

    # --- the head ---
    def head(
        self, hidden: ActivationStore, fn: Callable[[slice, torch.Tensor], None], *, apply_norm: bool = True
    ) -> None:
        """Materialise final norm + LM head and call fn(batch_slice, logits fp32) per batch."""
        f = self.view.family
        norm_path = self.view.module_path(f.final_norm)
        norm = get_path(self.model, norm_path)
        head_path = self.view.module_path(f.lm_head)
        head = get_path(self.model, head_path)
        materialize(norm, lambda n: f"{norm_path}.{n}", self.ck, self.device, "the final norm")
        emb_w = f.embed if self.view.tied else None
        materialize(
            head, (lambda n: emb_w) if emb_w else (lambda n: f"{head_path}.{n}"), self.ck, self.device, "the LM head"
        )
        try:
            with torch.no_grad():
                for sl, x in hidden.batches(self.batch_size):
                    y = x.to(self.device, self.dtype)
                    if apply_norm:
                        y = norm(y)
                    fn(sl, head(y).float())
        finally:
            release(norm)
            release(head)

    def nll(self, hidden: ActivationStore, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token negative log-likelihood per sample."""
        out = torch.empty(ids.shape[0], dtype=torch.float64)

        def fn(sl, logits):
            labels = ids[sl].to(logits.device)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
            out[sl] = loss.mean(dim=1).double().cpu()

        self.head(hidden, fn)
        return out

    def close(self) -> None:
        self.policy.cleanup()
