"""Which teacher layers should seed a student with fewer blocks: measured before training.

For each candidate subset of all-MiniLM-L6-v2's six layers, the student is
built from those layers (no training), its output projection fitted in closed
form on training texts, and scored on validation texts the fit never saw:
mean cosine to the teacher's embedding, and pair recall@1 (does a query's
nearest passage among the validation pairs match the teacher's choice of the
right one). The held-out domain (FOLDOC) is not read at all.

Run: ``python bench/encoder_layers.py`` -> bench/results/encoder_layers.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hybridrag.models.hybrid_encoder import Config, HybridEncoder
from hybridrag.models.train_encoder import TrainConfig, fit_output_projection, init_from_teacher, load_training_data, validate

ROOT = Path(__file__).resolve().parent.parent
CANDIDATES = ((0, 1, 2, 3), (0, 1, 2, 5), (0, 1, 3, 5), (0, 2, 4, 5), (1, 2, 3, 4), (2, 3, 4, 5),
              (0, 1, 2), (0, 2, 5), (0, 1, 2, 3, 4), (0, 1, 2, 3, 4, 5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fit-samples", type=int, default=3000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "encoder_layers.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    tc = TrainConfig()
    data = load_training_data(tc.max_texts, tc.max_pairs, tc.max_len, tc.seed, extra_pairs=0,
                              sources=tc.sources(), long_passages=tc.long_passages)
    fit_idx = [i for i in data.texts[: args.fit_samples] if data.known[i]]
    rows = {}
    for layers in CANDIDATES:
        start = time.perf_counter()
        model = init_from_teacher(HybridEncoder(Config(n_layers=len(layers), conv_kernels=())), layers).eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            train_cos = fit_output_projection(model, [data.ids[i] for i in fit_idx], data.teacher[fit_idx])
            metrics = validate(model, data, torch.device("cpu"))
        rows[",".join(map(str, layers))] = {"n_layers": len(layers), "train_cos": train_cos, **metrics,
                                             "seconds": time.perf_counter() - start}
        print(f"layers {layers}: fitted cos {train_cos:.4f}, val cos {metrics['val_cos']:.4f}, "
              f"pair r@1 {metrics['val_pair_r1']:.3f} (teacher {metrics['val_pair_r1_teacher']:.3f})", flush=True)
        # after every candidate, so an interrupted run keeps what it measured
        Path(args.out).write_text(json.dumps({"fit_samples": len(fit_idx), "held_out_source": tc.held_out_source,
                                              "candidates": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
