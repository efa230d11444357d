"""llm-compressor's GPTQ on given token windows (run by bench/quant.py inside .venv-anchors).

    .venv-anchors/bin/python bench/anchors/run_llmcompressor.py SRC IDS.pt DST BITS GROUP [--asym]

SRC: an fp32 safetensors model directory; IDS.pt: an [N, L] int64 tensor of calibration windows
(exactly the ones weightsmith calibrated on); GROUP -1 means per-channel. Writes a
compressed-tensors checkpoint to DST. Library defaults otherwise (dampening 0.01, block 128,
actorder static), lm_head left in full precision as in weightsmith.
"""

from __future__ import annotations

import sys


def main() -> None:
    src, ids_path, dst, bits, group = sys.argv[1:6]
    asym = "--asym" in sys.argv[6:]
    bits, group = int(bits), int(group)

    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(torch.get_num_threads())
    ids = torch.load(ids_path)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    weights = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=not asym,
        strategy="channel" if group == -1 else "group",
        group_size=None if group == -1 else group,
    )
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=["lm_head"]
    )
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0])
    model.save_pretrained(dst, save_compressed=True)
    tok.save_pretrained(dst)


if __name__ == "__main__":
    main()
