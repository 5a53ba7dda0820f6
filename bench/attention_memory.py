"""Peak memory of streaming (chunked sliding-window) attention against full attention.

Each case runs in a fresh subprocess; its figure is the growth of the peak
resident set size (``ru_maxrss``) while the attention runs, after q, k and v
are allocated. Cases, per length T in {512, 2048, 8192} (one sequence, 12
heads of 32 dims, the hybrid encoder's shape):

- ``full``: softmax(QK^T)V with the (H, T, T) scores materialised: the
  quadratic baseline the design refers to;
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``, whatever
  kernel torch picks on this machine (on CPU a flash kernel that is itself
  memory-efficient when no mask is given);
- ``sdpa_masked``: the same with a padding mask, as in a padded batch;
- ``streaming``: ``hybridrag.models.streaming_attention.sliding_window_attention``
  (window 128, chunk 256, the encoder's defaults).

Wall time per call is recorded too (noisy on a shared machine): the window
also makes the compute linear in T, where the full kernels are quadratic.

Run: ``python bench/attention_memory.py`` -> bench/results/attention_memory.json
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = (512, 2048, 8192)
METHODS = ("full", "sdpa", "sdpa_masked", "streaming")
HEADS, HEAD_DIM = 12, 32


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(method: str, T: int) -> dict:
    import torch
    import torch.nn.functional as F

    from hybridrag.models.hybrid_encoder import Config
    from hybridrag.models.streaming_attention import full_attention, sliding_window_attention

    torch.set_num_threads(2)
    cfg = Config()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, T, HEAD_DIM, generator=g) for _ in range(3))
    mask = torch.ones(1, T, dtype=torch.bool)
    with torch.inference_mode():  # warm the kernels on a tiny input so their setup is not counted
        sliding_window_attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], window=4, chunk=4)
        full_attention(q[:, :, :8], k[:, :, :8], v[:, :, :8])
        F.scaled_dot_product_attention(q[:, :, :8], k[:, :, :8], v[:, :, :8])
        before = _peak_rss_bytes()
        started = time.perf_counter()
        if method == "full":
            out = full_attention(q, k, v)
        elif method == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        elif method == "sdpa_masked":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        elif method == "streaming":
            out = sliding_window_attention(q, k, v, mask, window=cfg.streaming_window, chunk=cfg.streaming_chunk)
        else:
            raise ValueError(f"{method} is not a valid method ({', '.join(METHODS)})")
        seconds = time.perf_counter() - started
        after = _peak_rss_bytes()
    return {"method": method, "tokens": T, "peak_extra_bytes": after - before, "seconds": seconds,
            "output_bytes": out.numel() * out.element_size(), "input_bytes": 3 * q.numel() * q.element_size()}


def main() -> None:
    results = []
    for T in LENGTHS:
        for method in METHODS:
            proc = subprocess.run([sys.executable, __file__, "--worker", method, str(T)],
                                  capture_output=True, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(row)
            print(f"T={T:5d} {method:12s} peak +{row['peak_extra_bytes'] / 2**20:9.1f} MiB  {row['seconds']:.3f} s",
                  flush=True)
    by = {(r["method"], r["tokens"]): r["peak_extra_bytes"] for r in results}
    ratios = {}
    for T in LENGTHS:
        s = max(by[("streaming", T)], 1)
        ratios[str(T)] = {f"{m}_over_streaming": by[(m, T)] / s for m in METHODS if m != "streaming"}
        print(f"T={T:5d} full/streaming = {ratios[str(T)]['full_over_streaming']:.1f}x, "
              f"sdpa/streaming = {ratios[str(T)]['sdpa_over_streaming']:.1f}x, "
              f"sdpa_masked/streaming = {ratios[str(T)]['sdpa_masked_over_streaming']:.1f}x")
    out = ROOT / "bench" / "results" / "attention_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "what": "growth of peak RSS while one attention call runs (1 sequence, 12 heads x 32 dims), fresh process per case",
        "window": 128, "chunk": 256, "machine": platform.processor() or platform.machine(),
        "results": results, "ratios": ratios,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]))))
    else:
        import argparse

        argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
        main()
