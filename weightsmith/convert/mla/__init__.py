"""GQA→MLA conversion (TransMLA and MHA2MLA) into the stock DeepSeek-V3 layout.

Pure maths: `rope.py` (pair layouts, frequencies as longrope factors), `components.py` (RoRoPE,
FreqFold, partial-RoPE selection), `lowrank.py` (BKV-PCA, joint/split SVD), `latent.py` (the
latent RMSNorm: constant channel or calibrated weights), `layer.py` (one layer's MLA weights),
`simulate.py` (reference attentions for calibration loss and tests). Orchestration: `mla_pass.py`.
"""
