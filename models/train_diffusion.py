"""Train the two diffusion models of issue 4: ``prior`` (text-to-embedding) and ``text`` (text-to-text).

Both read (query, passage) pairs from :func:`agents.corpora.training_pairs`
(never a held-out item) and hold out their own validation split from the
corpora's held-out items (:func:`heldout_pairs`), so the figures they report
are on text no training step saw. Each run is seeded, shows a tqdm bar,
writes a resumable state under ``data/cache/diffusion/`` every
``--save-every`` steps, and ends by writing the shipped checkpoint to
``models/checkpoints/`` and its loss curve to ``bench/results/``.

    python -m models.train_diffusion prior --encoder original
    python -m models.train_diffusion text

Training loops read ``loss = diffusion(batch)``; the maths lives in the model files.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import typer

from models import embedding_diffusion as ed
from models import text_diffusion as td

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = REPO_ROOT / "models" / "checkpoints"
RESULTS = REPO_ROOT / "bench" / "results"

app = typer.Typer(help="Train the diffusion models (embedding prior, text diffusion).", no_args_is_help=True)


def cache_dir() -> Path:
    from agents.corpora import data_dir

    return data_dir() / "cache" / "diffusion"


def prior_checkpoint_path(encoder_version: str) -> Path:
    return CHECKPOINTS / f"embedding-prior-{encoder_version}.pt"


def text_checkpoint_path() -> Path:
    return CHECKPOINTS / "text-diffusion-v1.pt"


# ---------------------------------------------------------------- data


def heldout_pairs(sources: Sequence[str] = ("wordnet", "foldoc", "chatterbot"), limit: int | None = None,
                  seed: int = 0) -> list[tuple[str, str]]:
    """(query, passage) pairs of the held-out items, in the shapes of the training pairs, shuffled."""
    from agents import corpora

    loaders = {"wordnet": corpora.wordnet_entries, "foldoc": corpora.foldoc_entries,
               "chatterbot": corpora.chatterbot_entries}
    seen, pairs = set(), []
    for name in sources:
        for e in loaders[name]():
            if not e.held_out:
                continue
            for q, p in corpora.entry_pairs(e):
                q, p = q.strip(), p.strip()
                if q and p and q != p and (q, p) not in seen:
                    seen.add((q, p))
                    pairs.append((q, p))
    random.Random(seed).shuffle(pairs)
    return pairs[:limit] if limit is not None else pairs


def text_key(text: str) -> bytes:
    """20-byte content key of a text in the embedding stores."""
    return hashlib.sha1(text.encode("utf-8", "replace")).digest()


def store_dir(encoder_version: str) -> Path:
    return cache_dir() / f"embeddings-{encoder_version}"


def known_embeddings(encoder_version: str, reuse: bool = True) -> dict[bytes, np.ndarray]:
    """Embeddings of ``encoder_version`` already on disk, by content key.

    Our own store (``data/cache/diffusion/embeddings-<version>/``) and, with
    ``reuse``, two caches other parts of the project fill with the same encoder:
    the evaluation harness's corpus embeddings (``data/cache/embeddings/``) and,
    for MiniLM, the hybrid encoder's teacher store (``data/cache/encoder-train/``,
    which reads 128 tokens: the same vector for every text we take from it, as
    :func:`select_pairs` keeps texts under 300 characters). On two shared cores
    the encoder is the slowest part of training the prior, so nothing is encoded twice.
    """
    known: dict[bytes, np.ndarray] = {}

    def add_shards(folder: Path) -> None:
        for shard in sorted(folder.glob("shard-*.npz")):
            z = np.load(shard)
            for k, v in zip(z["keys"], z["emb"]):
                known[k.tobytes()] = v

    if reuse:
        from agents.corpora import data_dir

        if encoder_version == "minilm-l6-v2":
            add_shards(data_dir() / "cache" / "encoder-train" / "teacher-store-128")
        known.update(_eval_corpus_embeddings(encoder_version))
    add_shards(store_dir(encoder_version))
    return known


def _eval_corpus_embeddings(encoder_version: str) -> dict[bytes, np.ndarray]:
    """Corpus embeddings the evaluation harness cached for this encoder (only those already computed)."""
    from agents import evaluation

    out: dict[bytes, np.ndarray] = {}
    folder = evaluation.embeddings_cache_dir() / evaluation._safe(encoder_version)
    for name in ("wordnet-revdict", "foldoc", "chatterbot"):
        try:
            ds = evaluation.Dataset.load(name)
        except (FileNotFoundError, ValueError):
            continue
        path = folder / f"{evaluation._safe(ds.name)}-{ds.fingerprint}.npy"
        if not path.exists():
            continue
        vecs = np.load(path)
        if len(vecs) == len(ds.doc_texts):
            out.update((text_key(t), v) for t, v in zip(ds.doc_texts, vecs))
    return out


def select_pairs(pairs: Sequence[tuple[str, str]], known, encode_budget: int | None,
                 max_chars: int = 300) -> list[tuple[str, str]]:
    """Pairs to train on when encoding is the bottleneck: cheapest first.

    ``known``: content keys (:func:`text_key`) of texts already embedded.
    Keeps pairs whose texts are at most ``max_chars`` long, then takes every pair
    with both texts already embedded, then those missing one, then two, until
    ``encode_budget`` new texts are spent (``None``: no budget, every pair).
    Order within each cost class follows ``pairs`` (already shuffled by seed).
    """
    pairs = [(q, p) for q, p in pairs if len(q) <= max_chars and len(p) <= max_chars]
    if encode_budget is None:
        return pairs
    known = set(known)
    keyed = [(pair, {text_key(pair[0]), text_key(pair[1])} - known) for pair in pairs]
    chosen, new = [], set()
    for cost in (0, 1, 2):
        for pair, missing in keyed:
            if len(missing) != cost:
                continue
            extra = missing - new
            if len(new) + len(extra) > encode_budget:
                continue
            new |= extra
            chosen.append(pair)
    return chosen


def pair_embeddings(pairs: Sequence[tuple[str, str]], encoder, reuse: bool = True,
                    batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Encoder embeddings of every pair's query and passage, (N, D) each.

    Each distinct text is encoded once, ever: new ones are appended to
    ``data/cache/diffusion/embeddings-<encoder version>/`` in shards, so an
    interrupted run loses at most one shard.
    """
    known = known_embeddings(encoder.version, reuse)
    texts = sorted({t for pair in pairs for t in pair})
    todo = [t for t in texts if text_key(t) not in known]
    if todo:
        from tqdm.auto import tqdm

        folder = store_dir(encoder.version)
        folder.mkdir(parents=True, exist_ok=True)
        todo.sort(key=len)  # batches of similar length pad less
        shard = len(list(folder.glob("shard-*.npz")))
        chunk = 2048
        for s in tqdm(range(0, len(todo), chunk), desc=f"encode ({encoder.version})", unit="chunk"):
            part = todo[s : s + chunk]
            vecs = np.asarray(encoder.encode(part, batch_size=batch_size), dtype=np.float32)
            keys = [text_key(t) for t in part]
            tmp = folder / f"shard-{shard:05d}.tmp.npz"
            np.savez(tmp, keys=np.frombuffer(b"".join(keys), dtype="V20"), emb=vecs)
            tmp.replace(folder / f"shard-{shard:05d}.npz")
            shard += 1
            known.update(zip(keys, vecs))
    q = np.stack([known[text_key(a)] for a, _ in pairs]).astype(np.float32)
    p = np.stack([known[text_key(b)] for _, b in pairs]).astype(np.float32)
    return q, p


# ---------------------------------------------------------------- shared training pieces


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """Exponential moving average of the weights (what diffusion models sample with)."""
    with torch.no_grad():
        for e, m in zip(ema.parameters(), model.parameters()):
            e.lerp_(m, 1 - decay)
        for e, m in zip(ema.buffers(), model.buffers()):
            e.copy_(m)


def cosine_lr(step: int, progress: float, base: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% of ``base`` as ``progress`` goes 0 -> 1."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def schedule_progress(step: int, steps: int, elapsed_s: float, budget_s: float | None) -> float:
    """How far through the run we are, in [0, 1]: by steps, or by wall clock when there is a budget.

    The machine is shared and its speed swings several-fold within minutes, so a
    budgeted run decays its learning rate over time rather than over a step
    count guessed from the first steps, and stops when the time is up.
    """
    by_steps = step / max(steps, 1)
    return by_steps if budget_s is None else max(by_steps, elapsed_s / budget_s)


def _save_state(path: Path, model, ema, opt, history: dict, step: int, elapsed_s: float) -> None:
    """Everything ``--resume`` needs: weights, EMA, optimiser, history, step and the seconds spent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "history": history, "step": step, "elapsed_s": elapsed_s}, tmp)
    tmp.replace(path)


def state_digest(state: dict) -> str:
    h = hashlib.sha1()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:8]


def _save_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------- prior


@torch.no_grad()
def prior_validation(diffusion: ed.EmbeddingDiffusion, q: torch.Tensor, p: torch.Tensor, steps: int = 10,
                     k: int = 4, seed: int = 0) -> dict:
    """Held-out loss and how close samples land to the true passage, against the query itself.

    ``query_cos``: cos(query, passage), the no-expansion reference.
    ``sample_cos``: cos(one sample, passage). ``mean4_cos``: cos(mean of k samples, passage).
    ``blend_cos``: cos(0.5 query + 0.5 mean of k samples, passage).
    """
    diffusion.eval()
    gen = torch.Generator(device=q.device).manual_seed(seed)
    torch.manual_seed(seed)
    loss = float(np.mean([diffusion(p[i : i + 1024], q[i : i + 1024]).item() for i in range(0, len(q), 1024)]))
    s = diffusion.sample(q.repeat_interleave(k, 0), steps=steps, generator=gen).reshape(len(q), k, -1)
    mean = torch.nn.functional.normalize(s.mean(1), dim=-1)
    blend = torch.nn.functional.normalize(q + mean, dim=-1)
    return {
        "val_loss": loss,
        "query_cos": float((q * p).sum(-1).mean()),
        "sample_cos": float((s[:, 0] * p).sum(-1).mean()),
        "mean4_cos": float((mean * p).sum(-1).mean()),
        "blend_cos": float((blend * p).sum(-1).mean()),
    }


def train_prior(
    train_q: np.ndarray,
    train_p: np.ndarray,
    val_q: np.ndarray,
    val_p: np.ndarray,
    cfg: ed.Config,
    steps: int = 20_000,
    batch_size: int = 512,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    ema_decay: float = 0.999,
    seed: int = 0,
    device: str = "cpu",
    state_path: Path | None = None,
    resume: bool = False,
    save_every: int = 500,
    eval_every: int = 1000,
    progress: bool = True,
    time_budget_s: float | None = None,
) -> tuple[ed.EmbeddingDiffusion, dict]:
    """Train the prior on (query, passage) embeddings; returns the EMA model (CPU) and the history.

    ``time_budget_s``: total wall-clock seconds, earlier runs of a resume included; see :func:`schedule_progress`.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    diffusion = ed.EmbeddingDiffusion(ed.PriorMLP(cfg)).to(device)
    Q, P = torch.from_numpy(train_q).to(device), torch.from_numpy(train_p).to(device)
    vQ, vP = torch.from_numpy(val_q).to(device), torch.from_numpy(val_p).to(device)
    diffusion.set_data_stats(P)
    ema = copy.deepcopy(diffusion).eval()
    opt = torch.optim.AdamW(diffusion.parameters(), lr=lr, weight_decay=weight_decay)
    history: dict = {"loss": [], "val": [], "config": asdict(cfg), "steps": steps, "batch_size": batch_size,
                     "lr": lr, "seed": seed, "train_pairs": len(Q), "val_pairs": len(vQ)}
    start, prior_s = 0, 0.0  # prior_s: seconds already trained before a resume
    if resume and state_path is not None and state_path.exists():
        st = torch.load(state_path, map_location=device, weights_only=False)
        diffusion.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        history, start, prior_s = st["history"], st["step"], st.get("elapsed_s", 0.0)
    gen = torch.Generator(device="cpu").manual_seed(seed + start)
    running, t0 = [], time.perf_counter()
    bar = tqdm(range(start, steps), desc="prior", disable=not progress, initial=start, total=steps)
    for step in bar:
        frac = schedule_progress(step, steps, prior_s + time.perf_counter() - t0, time_budget_s)
        if frac >= 1.0:
            break
        diffusion.train()
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, frac, lr, warmup=min(500, steps // 10 + 1))
        idx = torch.randint(0, len(Q), (batch_size,), generator=gen).to(device)
        loss = diffusion(P[idx], Q[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
        opt.step()
        ema_update(ema, diffusion, ema_decay if step > 200 else 0.0)
        running.append(loss.item())
        if (step + 1) % 100 == 0:
            history["loss"].append([step + 1, float(np.mean(running))])
            bar.set_postfix(loss=f"{np.mean(running):.4f}")
            running = []
        if (step + 1) % eval_every == 0:
            v = prior_validation(ema, vQ, vP)
            v.update(step=step + 1, elapsed_s=time.perf_counter() - t0)
            history["val"].append(v)
            tqdm.write(json.dumps(v))
        if state_path is not None and (step + 1) % save_every == 0:
            _save_state(state_path, diffusion, ema, opt, history, step + 1, prior_s + time.perf_counter() - t0)
    step = bar.n
    bar.close()
    v = prior_validation(ema, vQ, vP)
    v.update(step=step, elapsed_s=prior_s + time.perf_counter() - t0)
    history["val"].append(v)
    history["steps"] = step
    tqdm.write(json.dumps(v))
    if state_path is not None:
        _save_state(state_path, diffusion, ema, opt, history, step, prior_s + time.perf_counter() - t0)
    return ema.cpu().eval(), history


@app.command()
def prior(
    encoder: str = typer.Option("original", help="Encoder whose embedding space the prior learns: original or hybrid."),
    encoder_checkpoint: str = typer.Option(None, help="Hybrid encoder checkpoint (default: the shipped one)."),
    limit: int = typer.Option(None, help="Use at most this many training pairs (all by default)."),
    encode_budget: int = typer.Option(25_000, help="Encode at most this many new texts (pairs whose texts are "
                                      "already embedded come first); 0 for none, -1 for no budget."),
    val_pairs: int = typer.Option(1000, help="Held-out pairs for validation."),
    steps: int = typer.Option(20_000, help="Upper bound; --minutes usually ends the run first."),
    minutes: float = typer.Option(15.0, help="Wall-clock budget of the run, resumes included; the LR decays over it."),
    batch_size: int = typer.Option(256),
    lr: float = typer.Option(1e-3),
    hidden: int = typer.Option(ed.Config.hidden),
    depth: int = typer.Option(ed.Config.depth),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu"),
    resume: bool = typer.Option(False, help="Continue from data/cache/diffusion/prior-<encoder>-state.pt."),
    out: Path = typer.Option(None, help="Checkpoint path (default models/checkpoints/embedding-prior-<encoder version>.pt)."),
) -> None:
    """Train the text-to-embedding prior on (query, passage) pairs embedded by ENCODER."""
    from agents import corpora
    from agents.encoders import load_encoder

    torch.manual_seed(seed)
    enc = load_encoder(encoder, checkpoint=encoder_checkpoint)
    pairs = corpora.training_pairs(limit=limit, seed=seed)
    held = heldout_pairs(limit=val_pairs, seed=seed)
    typer.echo(f"{len(pairs)} training pairs, {len(held)} held-out pairs, encoder {enc.version}")
    known = known_embeddings(enc.version)
    pairs = select_pairs(pairs, known, None if encode_budget < 0 else encode_budget)
    typer.echo(f"{len(pairs)} pairs selected (encode budget {encode_budget}, {len(known)} texts already embedded)")
    tq, tp = pair_embeddings(pairs, enc)
    vq, vp = pair_embeddings(held, enc)
    cfg = ed.Config(dim=enc.dim, hidden=hidden, depth=depth)
    state = cache_dir() / f"prior-{enc.version}-state.pt"
    model, history = train_prior(tq, tp, vq, vp, cfg, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                 device=device, state_path=state, resume=resume, time_budget_s=minutes * 60,
                                 eval_every=500)
    path = save_prior(model, enc.version, history, out)
    typer.echo(f"wrote {path}")


def save_prior(model: ed.EmbeddingDiffusion, encoder_version: str, history: dict, out: Path | None = None) -> Path:
    """Write the shipped checkpoint and its loss curve (bench/results/diffusion-prior-train.json)."""
    version = f"embedding-prior-{encoder_version}-{state_digest(model.state_dict())}"
    path = Path(out) if out else prior_checkpoint_path(encoder_version)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.checkpoint(version=version, encoder_version=encoder_version,
                                meta={"final_val": history["val"][-1] if history["val"] else None,
                                      "train_pairs": history.get("train_pairs"), "steps": history.get("steps")}), path)
    _save_json(RESULTS / f"diffusion-prior-train-{encoder_version}.json", {"version": version, **history})
    return path


# ---------------------------------------------------------------- text diffusion


def tokenize_pairs(pairs: Sequence[tuple[str, str]], tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """WordPiece ids of each query and passage."""
    qs = td.wordpiece(tokenizer, [q for q, _ in pairs])
    ps = td.wordpiece(tokenizer, [p for _, p in pairs])
    return qs, ps


def text_rows(q_ids, p_ids, vocab: td.Vocab, cfg: td.Config) -> torch.Tensor:
    """(N, query_len + doc_len) int64 rows for the denoiser."""
    rows = np.stack([td.layout(vocab.encode(q), vocab.encode(p), cfg.query_len, cfg.doc_len)
                     for q, p in zip(q_ids, p_ids)])
    return torch.from_numpy(rows)


def train_text_model(
    train_rows: torch.Tensor,
    val_rows: torch.Tensor,
    cfg: td.Config,
    steps: int = 20_000,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    ema_decay: float = 0.999,
    seed: int = 0,
    device: str = "cpu",
    state_path: Path | None = None,
    resume: bool = False,
    save_every: int = 1000,
    eval_every: int = 1000,
    progress: bool = True,
    amp: bool = False,
    time_budget_s: float | None = None,
    token_table: torch.Tensor | None = None,
    init_state: dict | None = None,
    warmup: int = 1000,
) -> tuple[td.MaskedDiffusion, dict]:
    """Train the masked diffusion LM on laid-out rows; returns the EMA model (CPU) and the history.

    ``time_budget_s``: total wall-clock seconds, earlier runs of a resume included; see :func:`schedule_progress`.
    ``init_state``: weights to continue from (a shipped model's ``state_dict``), instead of a fresh start.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    diffusion = td.MaskedDiffusion(td.Denoiser(cfg))
    if init_state is not None:
        diffusion.load_state_dict(init_state)
    elif token_table is not None:
        diffusion.model.init_token_embedding(token_table)
    diffusion = diffusion.to(device)
    ema = copy.deepcopy(diffusion).eval()
    decay, no_decay = [], []
    for n, p in diffusion.named_parameters():
        (no_decay if p.ndim < 2 or n.endswith("pos") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    history: dict = {"loss": [], "val": [], "config": asdict(cfg), "steps": steps, "batch_size": batch_size, "lr": lr,
                     "seed": seed, "train_rows": len(train_rows), "val_rows": len(val_rows)}
    start, prior_s = 0, 0.0  # prior_s: seconds already trained before a resume
    if resume and state_path is not None and state_path.exists():
        st = torch.load(state_path, map_location=device, weights_only=False)
        diffusion.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        history, start, prior_s = st["history"], st["step"], st.get("elapsed_s", 0.0)
    train_rows = train_rows.to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed + start)
    running, t0 = [], time.perf_counter()
    bar = tqdm(range(start, steps), desc="text", disable=not progress, initial=start, total=steps)
    for step in bar:
        frac = schedule_progress(step, steps, prior_s + time.perf_counter() - t0, time_budget_s)
        if frac >= 1.0:
            break
        diffusion.train()
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, frac, lr, warmup=min(warmup, steps // 10 + 1))
        idx = torch.randint(0, len(train_rows), (batch_size,), generator=gen).to(device)
        with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16,
                            enabled=amp):
            loss = diffusion(train_rows[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
        opt.step()
        ema_update(ema, diffusion, ema_decay if step > 500 else 0.0)
        running.append(loss.item())
        if (step + 1) % 100 == 0:
            history["loss"].append([step + 1, float(np.mean(running))])
            bar.set_postfix(loss=f"{np.mean(running):.3f}")
            running = []
        if (step + 1) % eval_every == 0:
            v = text_validation(ema, val_rows.to(device))
            v.update(step=step + 1, elapsed_s=time.perf_counter() - t0)
            history["val"].append(v)
            tqdm.write(json.dumps(v))
        if state_path is not None and (step + 1) % save_every == 0:
            _save_state(state_path, diffusion, ema, opt, history, step + 1, prior_s + time.perf_counter() - t0)
    step = bar.n
    bar.close()
    v = text_validation(ema, val_rows.to(device))
    v.update(step=step, elapsed_s=prior_s + time.perf_counter() - t0)
    history["val"].append(v)
    history["steps"] = step
    tqdm.write(json.dumps(v))
    if state_path is not None:
        _save_state(state_path, diffusion, ema, opt, history, step, prior_s + time.perf_counter() - t0)
    return ema.cpu().eval(), history


@torch.no_grad()
def text_validation(diffusion: td.MaskedDiffusion, rows: torch.Tensor, samples: int = 4, seed: int = 0) -> dict:
    """Held-out NELBO: nats per real document token (tokens + closing [SEP]) and the perplexity bound."""
    diffusion.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total, real = 0.0, int((rows[:, diffusion.cfg.query_len :] != td.PAD).sum())
    for s in range(0, len(rows), 256):
        xb = rows[s : s + 256]
        for _ in range(samples):
            t = td.antithetic_times(len(xb), diffusion.cfg.eps, generator=gen).to(xb.device)
            # times and masks from one seeded generator: two models scored with one seed see the same x_t
            total += diffusion.nelbo(xb, t, generator=gen if xb.device.type == "cpu" else None).sum().item() / samples
    nats = total / max(real, 1)
    return {"val_nats_per_token": nats, "val_ppl_bound": math.exp(nats)}


def fits(q_ids: Sequence[int], p_ids: Sequence[int], cfg: td.Config) -> bool:
    """Whether a pair fits the layout uncut: query in query_len - 2, passage and its [SEP] in doc_len."""
    return len(q_ids) <= cfg.query_len - 2 and len(p_ids) <= cfg.doc_len - 1


def build_text_data(pairs, held, tokenizer, cfg: td.Config, min_count: int) -> tuple[td.Vocab, torch.Tensor, torch.Tensor]:
    """Vocabulary from the training pairs, then laid-out rows for training and validation.

    Only pairs that fit the layout uncut are kept (a cut document would teach
    the model to stop mid-sentence); the held-out rows are filtered the same way.
    """
    tq, tp = tokenize_pairs(pairs, tokenizer)
    keep = [i for i in range(len(tq)) if fits(tq[i], tp[i], cfg)]
    tq, tp = [tq[i] for i in keep], [tp[i] for i in keep]
    reserved = [tokenizer.token_to_id(t) for t in td.SPECIAL_TOKENS if tokenizer.token_to_id(t) is not None]
    vocab = td.Vocab.build([*tq, *tp], min_count=min_count, wordpiece_size=tokenizer.get_vocab_size(), reserved=reserved)
    cfg.vocab_size = len(vocab)
    vq, vp = tokenize_pairs(held, tokenizer)
    keep = [i for i in range(len(vq)) if fits(vq[i], vp[i], cfg)]
    vq, vp = [vq[i] for i in keep], [vp[i] for i in keep]
    return vocab, text_rows(tq, tp, vocab, cfg), text_rows(vq, vp, vocab, cfg)


def teacher_token_table(vocab: td.Vocab, emb_dim: int, model_dir: Path | None = None) -> torch.Tensor:
    """A (V, emb_dim) start for the token table: MiniLM's word embeddings of the kept ids, PCA-reduced.

    Words that mean alike start close, which a model trained for minutes on two
    cores could not learn from scratch; special ids start at small random values.
    """
    from safetensors import safe_open

    if model_dir is None:
        from agents.encoders import minilm_model_dir

        model_dir = minilm_model_dir()
    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        words = f.get_tensor("embeddings.word_embeddings.weight").float()  # (30522, 384)
    sub = words[torch.from_numpy(vocab.wordpiece_ids)]
    sub = sub - sub.mean(0)
    _, _, v = torch.linalg.svd(sub, full_matrices=False)
    reduced = sub @ v[:emb_dim].T  # (V - specials, E)
    table = torch.randn(len(vocab), emb_dim) * reduced.std()
    table[td.N_SPECIAL :] = reduced
    return table


def save_text(model: td.MaskedDiffusion, vocab: td.Vocab, history: dict, out: Path | None = None) -> Path:
    """Write the shipped checkpoint (float16) and its loss curve (bench/results/diffusion-text-train.json)."""
    version = f"text-diffusion-{state_digest(model.state_dict())}"
    path = Path(out) if out else text_checkpoint_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.checkpoint(version=version, vocab=vocab.wordpiece_ids.tolist(),
                                meta={"final_val": history["val"][-1] if history["val"] else None,
                                      "train_rows": history.get("train_rows"), "steps": history.get("steps")}), path)
    # the shipped model's curve goes to bench/results; a candidate's stays next to it until it replaces the shipped one
    curve = RESULTS / "diffusion-text-train.json" if path.resolve() == text_checkpoint_path().resolve() \
        else path.with_suffix(".train.json")
    _save_json(curve, {"version": version, **history})
    return path


@app.command()
def text(
    limit: int = typer.Option(None, help="Use at most this many training pairs (all by default)."),
    val_pairs: int = typer.Option(2000, help="Held-out pairs for the NLL bound."),
    steps: int = typer.Option(100_000, help="Upper bound; --minutes usually ends the run first."),
    minutes: float = typer.Option(20.0, help="Wall-clock budget of the run, resumes included; the LR decays over it."),
    batch_size: int = typer.Option(64),
    lr: float = typer.Option(2e-3),
    min_count: int = typer.Option(8, help="Keep WordPiece ids seen this often; the rest become [UNK]."),
    teacher_init: bool = typer.Option(True, help="Start the token table from MiniLM's word embeddings (PCA)."),
    d_model: int = typer.Option(td.Config.d_model),
    n_layers: int = typer.Option(td.Config.n_layers),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu"),
    resume: bool = typer.Option(False, help="Continue from data/cache/diffusion/text-state.pt."),
    init: Path = typer.Option(None, help="Continue training a shipped checkpoint (its config and vocabulary); "
                              "the run ends by scoring it and the new model on the same held-out draws."),
    warmup: int = typer.Option(1000, help="Linear warm-up steps of the learning rate."),
    amp: bool = typer.Option(None, help="bfloat16 autocast (default: on for CUDA)."),
    out: Path = typer.Option(None, help="Checkpoint path (default models/checkpoints/text-diffusion-v1.pt)."),
) -> None:
    """Train the masked diffusion language model on (query, passage) pairs."""
    from agents import corpora

    torch.manual_seed(seed)
    pairs = corpora.training_pairs(limit=limit, seed=seed)
    held = heldout_pairs(limit=val_pairs, seed=seed)
    base = td.MaskedDiffusion.from_checkpoint(torch.load(init, map_location="cpu", weights_only=False)) if init else None
    cfg = copy.deepcopy(base.cfg) if base is not None else td.Config(d_model=d_model, n_layers=n_layers)
    vocab, train_rows, val_rows = build_text_data(pairs, held, td.load_tokenizer(), cfg, min_count)
    if base is not None:
        base_vocab = torch.load(init, map_location="cpu", weights_only=False)["vocab"]
        if vocab.wordpiece_ids.tolist() != list(base_vocab):
            raise ValueError(f"{init} was trained with another vocabulary (min_count or training pairs differ)")
    typer.echo(f"{len(train_rows)} training rows, {len(val_rows)} held-out rows, vocab {len(vocab)}")
    table = teacher_token_table(vocab, cfg.emb_dim) if teacher_init and base is None else None
    model, history = train_text_model(train_rows, val_rows, cfg, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                      device=device, state_path=cache_dir() / "text-state.pt", resume=resume,
                                      amp=device.startswith("cuda") if amp is None else amp,
                                      time_budget_s=minutes * 60, token_table=table,
                                      init_state=None if base is None else base.state_dict(), warmup=warmup)
    if base is not None:
        # same rows, same seeded times and masks, more draws than the running validation: a like-for-like comparison
        history["init"] = str(init)
        history["compare"] = {"init": text_validation(base, val_rows, samples=16, seed=123),
                              "trained": text_validation(model, val_rows, samples=16, seed=123)}
        typer.echo(json.dumps(history["compare"]))
    path = save_text(model, vocab, history, out)
    typer.echo(f"wrote {path}")


if __name__ == "__main__":
    app()
