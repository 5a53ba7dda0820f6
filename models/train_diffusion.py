"""Train the two diffusion models: ``prior`` (text-to-embedding) and ``text`` (text-to-text).

Both read (query, passage) pairs from :func:`hybridrag.models.corpora.training_pairs`
(never a held-out item) and hold out their own validation split from the
corpora's held-out items (:func:`heldout_pairs`), so the figures they report
are on text no training step saw. Each run is seeded, shows a tqdm bar,
writes a resumable state under ``data/cache/diffusion/`` every
``--save-every`` steps, and ends by writing the shipped checkpoint to
``models/checkpoints/`` and its loss curve to ``bench/results/``.

    python -m hybridrag.agents.cli.train_diffusion prior --encoder original
    python -m hybridrag.agents.cli.train_diffusion text

Training loops read ``loss = diffusion(batch)``; the maths lives in the model files.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from hybridrag.models import embedding_diffusion as ed
from hybridrag.models import text_diffusion as td
from hybridrag.models.paths import CHECKPOINTS, data_dir
from hybridrag.models.training import LoopConfig, train

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results"  # loss curves, beside the benchmarks' figures (in a checkout)

def cache_dir() -> Path:
    return data_dir() / "cache" / "diffusion"


def prior_checkpoint_path(encoder_version: str) -> Path:
    return CHECKPOINTS / f"embedding-prior-{encoder_version}.pt"


def text_checkpoint_path() -> Path:
    return CHECKPOINTS / "text-diffusion-v1.pt"


# ---------------------------------------------------------------- data


def heldout_pairs(sources: Sequence[str] = ("wordnet", "foldoc", "chatterbot"), limit: int | None = None,
                  seed: int = 0) -> list[tuple[str, str]]:
    """(query, passage) pairs of the held-out items, in the shapes of the training pairs, shuffled."""
    from hybridrag.models import corpora

    loaders = {"wordnet": corpora.wordnet_entries, "foldoc": corpora.foldoc_entries,
               "chatterbot": corpora.chatterbot_entries}
    held = (e for name in sources for e in loaders[name]() if e.held_out)
    return corpora.shuffled_pairs(held, limit, seed)


def text_key(text: str) -> bytes:
    """20-byte content key of a text in the embedding stores."""
    return hashlib.sha1(text.encode("utf-8", "replace")).digest()


def store_dir(encoder_version: str) -> Path:
    return cache_dir() / f"embeddings-{encoder_version}"


def known_embeddings(encoder_version: str, reuse: bool = True,
                     extra: dict[bytes, np.ndarray] | None = None) -> dict[bytes, np.ndarray]:
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
        if encoder_version == "minilm-l6-v2":
            add_shards(data_dir() / "cache" / "encoder-train" / "teacher-store-128")
        known.update(extra or {})
    add_shards(store_dir(encoder_version))
    return known


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
                    batch_size: int = 128, extra: dict[bytes, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Encoder embeddings of every pair's query and passage, (N, D) each.

    Each distinct text is encoded once, ever: new ones are appended to
    ``data/cache/diffusion/embeddings-<encoder version>/`` in shards, so an
    interrupted run loses at most one shard.
    """
    known = known_embeddings(encoder.version, reuse, extra)
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

    ``time_budget_s``: total wall-clock seconds, earlier runs of a resume included; see :func:`hybridrag.models.training.schedule_progress`.
    """
    torch.manual_seed(seed)
    diffusion = ed.EmbeddingDiffusion(ed.PriorMLP(cfg)).to(device)
    Q, P = torch.from_numpy(train_q).to(device), torch.from_numpy(train_p).to(device)
    vQ, vP = torch.from_numpy(val_q).to(device), torch.from_numpy(val_p).to(device)
    diffusion.set_data_stats(P)
    opt = torch.optim.AdamW(diffusion.parameters(), lr=lr, weight_decay=weight_decay)
    history: dict = {"loss": [], "val": [], "config": asdict(cfg), "steps": steps, "batch_size": batch_size,
                     "lr": lr, "seed": seed, "train_pairs": len(Q), "val_pairs": len(vQ)}
    loop = LoopConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=min(500, steps // 10 + 1), ema_decay=ema_decay,
                      ema_start=200, seed=seed, device=device, state_path=state_path, resume=resume,
                      save_every=save_every, eval_every=eval_every, time_budget_s=time_budget_s, progress=progress,
                      desc="prior", loss_format=".4f")
    return train(diffusion, opt, len(Q), lambda idx: diffusion(P[idx], Q[idx]), lambda ema: prior_validation(ema, vQ, vP),
                 history, loop)


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

    ``time_budget_s``: total wall-clock seconds, earlier runs of a resume included; see :func:`hybridrag.models.training.schedule_progress`.
    ``init_state``: weights to continue from (a shipped model's ``state_dict``), instead of a fresh start.
    """
    torch.manual_seed(seed)
    diffusion = td.MaskedDiffusion(td.Denoiser(cfg))
    if init_state is not None:
        diffusion.load_state_dict(init_state)
    elif token_table is not None:
        diffusion.model.init_token_embedding(token_table)
    diffusion = diffusion.to(device)
    decay, no_decay = [], []
    for n, p in diffusion.named_parameters():
        (no_decay if p.ndim < 2 or n.endswith("pos") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    history: dict = {"loss": [], "val": [], "config": asdict(cfg), "steps": steps, "batch_size": batch_size, "lr": lr,
                     "seed": seed, "train_rows": len(train_rows), "val_rows": len(val_rows)}
    train_rows = train_rows.to(device)
    autocast = dict(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16, enabled=amp)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        with torch.autocast(**autocast):
            return diffusion(train_rows[idx])

    loop = LoopConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=min(warmup, steps // 10 + 1),
                      ema_decay=ema_decay, ema_start=500, seed=seed, device=device, state_path=state_path,
                      resume=resume, save_every=save_every, eval_every=eval_every, time_budget_s=time_budget_s,
                      progress=progress, desc="text", loss_format=".3f")
    return train(diffusion, opt, len(train_rows), loss_of, lambda ema: text_validation(ema, val_rows.to(device)),
                 history, loop)


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
        from hybridrag.models.tokenizer import minilm_model_dir

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


# ---------------------------------------------------------------- the generator that starts from MiniLM

# Sampling weight of each task in training: passage -> query first (the domain-adaptation loop needs it)
MINILM_TASK_WEIGHTS = {"title": 0.25, "question": 0.1, "sentence": 0.15, "passage": 0.4, "unconditional": 0.1}
# the one domain no generator trains on: it is scored as its own row
MINILM_HELD_OUT_DOMAIN = "foldoc"


def minilm_chunks(sentences: Sequence[str], min_words: int = 40, max_words: int = 90) -> list[str]:
    """Consecutive sentences joined into passages of ``min_words``..``max_words`` words (about 128 WordPiece tokens at most)."""
    out, parts, words = [], [], 0
    for s in sentences:
        n = len(s.split())
        if words + n > max_words and parts:
            if words >= min_words:
                out.append(" ".join(parts))
            parts, words = [], 0
        if n <= max_words:
            parts.append(s)
            words += n
    if words >= min_words:
        out.append(" ".join(parts))
    return out


def minilm_examples(held_out: bool = False, seed: int = 0, cache_dir=None) -> dict[str, list[tuple[str, str]]]:
    """(condition, target) texts per task from the project's corpora, FOLDOC never; ``held_out`` picks the test split.

    - title: WordNet gloss -> its first lemma; a Wikipedia paragraph -> its article's title (heading -> section)
    - question: a chatterbot answer -> its question
    - sentence: a passage (Brown, Lee, Wikipedia) -> one of its sentences (ICT)
    - passage: the reverse of all three (lemma -> gloss, question -> answer, sentence -> its passage, title -> paragraph)
    - unconditional: a passage from nothing (MDLM)
    """
    from hybridrag.models import corpora

    rng = random.Random(seed)
    keep = lambda e: e.held_out == held_out  # noqa: E731
    out: dict[str, list[tuple[str, str]]] = {task: [] for task in MINILM_TASK_WEIGHTS}
    for e in filter(keep, corpora.wordnet_entries(cache_dir)):
        out["title"].append((e.text, e.names[0]))
        out["passage"].append((e.names[0], e.text))
    for e in filter(keep, corpora.chatterbot_entries(cache_dir)):
        for a in e.examples[:2]:
            out["question"].append((a, e.names[0]))
            out["passage"].append((e.names[0], a))
    passages: list[str] = []
    by_article: dict[str, list[str]] = {}
    for e in filter(keep, corpora.wikipedia_paragraphs(cache_dir)):
        by_article.setdefault(e.names[0], []).append(e.text)
    for title, paras in by_article.items():
        for chunk in (c for p in paras for c in minilm_chunks(corpora.split_sentences(p))):
            out["title"].append((chunk, title))
            out["passage"].append((title, chunk))
            passages.append(chunk)
    brown_files: dict[str, list[str]] = {}
    for e in filter(keep, corpora.brown_sentences(cache_dir)):
        brown_files.setdefault(e.uid.rsplit(":", 1)[0], []).append(e.text)
    passages += [c for sents in brown_files.values() for c in minilm_chunks(sents)]
    for e in filter(keep, corpora.lee_background(cache_dir)):
        passages += minilm_chunks(corpora.split_sentences(e.text))
    for p in passages:
        sents = [s for s in corpora.split_sentences(p) if len(s.split()) >= 5]
        if len(sents) >= 2:
            s = rng.choice(sents)
            out["sentence"].append((p, s))
            out["passage"].append((s, p))
    out["unconditional"] = [("", p) for p in passages] + [("", e.text) for e in filter(keep, corpora.wordnet_entries(cache_dir))][: len(passages)]
    for rows in out.values():
        rng.shuffle(rows)
    return out


def minilm_tokenized(examples: dict[str, list[tuple[str, str]]], tokenizer, cfg) -> dict[str, list[tuple[list[int], list[int]]]]:
    """(condition row, target row) WordPiece ids per task (:func:`hybridrag.models.minilm_diffusion.cond_row`, ``target_row``)."""
    from hybridrag.models import minilm_diffusion as md

    out = {}
    for task, rows in examples.items():
        conds = td.wordpiece(tokenizer, [c for c, _ in rows])
        targets = td.wordpiece(tokenizer, [t for _, t in rows])
        length = cfg.passage_len if task in ("passage", "unconditional") else cfg.query_len
        out[task] = [(md.cond_row(task, c, cfg.cond_len), md.target_row(t, length))
                     for c, t in zip(conds, targets) if t]
    return out


def minilm_batches(rows: dict[str, list], n_batches: int, tokens: int = 1024, seed: int = 0,
                   weights: dict[str, float] | None = None) -> list[tuple[str, list[int]]]:
    """``n_batches`` (task, row indices) batches: tasks drawn by ``weights``, rows of like length, ~``tokens`` per batch.

    Rows are drawn at random, then each task's pool is sorted by length and
    cut into batches holding about ``tokens`` condition + target tokens, so
    little of a batch is padding.
    """
    rng = random.Random(seed)
    weights = weights or MINILM_TASK_WEIGHTS
    tasks = [t for t in weights if rows.get(t)]
    out: list[tuple[str, list[int]]] = []
    for task in tasks:
        want = max(1, round(n_batches * weights[task] / sum(weights[t] for t in tasks)))
        pool = rows[task]
        made: list[list[int]] = []
        while len(made) < want:
            idx = sorted(rng.sample(range(len(pool)), min(len(pool), 4096)), key=lambda i: len(pool[i][0]) + len(pool[i][1]))
            cur: list[int] = []
            for i in idx:
                cur.append(i)
                width = max(len(pool[j][0]) + 2 * len(pool[j][1]) for j in cur)
                if width * len(cur) >= tokens:
                    made.append(cur)
                    cur = []
        out += [(task, b) for b in made[:want]]
    rng.shuffle(out)
    return out


def minilm_draws(task: str) -> int:
    """Noised copies per condition: a query is short beside its passage, so one passage encoding serves two."""
    return 2 if task in ("title", "question", "sentence") else 1


def collate(rows: Sequence[tuple[list[int], list[int]]], device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    from hybridrag.models import minilm_diffusion as md

    return md.pad_rows([c for c, _ in rows]).to(device), md.pad_rows([t for _, t in rows]).to(device)


@torch.no_grad()
def minilm_validation(diffusion, val: dict[str, list], draws: int = 2, seed: int = 0, batch: int = 32) -> dict:
    """Held-out NELBO (nats per target token) and masked-token accuracy per task, seeded: two models see the same x_t."""
    diffusion.eval()
    gen = torch.Generator().manual_seed(seed)
    out: dict = {}
    for task, rows in val.items():
        nll = hits = masked = tokens = 0.0
        for s in range(0, len(rows), batch):
            cond, target = collate(rows[s : s + batch])
            t = td.antithetic_times(len(cond) * draws, diffusion.cfg.eps, generator=gen)
            n, h, m = diffusion.nelbo(cond, target, t, draws=draws, generator=gen)
            nll, hits, masked = nll + n.sum().item(), hits + h.sum().item(), masked + m.sum().item()
            tokens += (target != 0).sum().item() * draws
        out[task] = {"nats_per_token": nll / max(tokens, 1), "masked_acc": hits / max(masked, 1)}
    keys = [k for k in out if not k.startswith(MINILM_HELD_OUT_DOMAIN)]
    out["val_nats_per_token"] = float(np.mean([out[k]["nats_per_token"] for k in keys]))
    out["val_masked_acc"] = float(np.mean([out[k]["masked_acc"] for k in keys]))
    return out


def foldoc_validation_rows(tokenizer, cfg, limit: int = 64, seed: int = 0) -> dict[str, list]:
    """The held-out domain's rows: FOLDOC definition -> term (title) and term -> definition (passage)."""
    from hybridrag.models import corpora

    entries = corpora.foldoc_entries()
    rng = random.Random(seed)
    rng.shuffle(entries)
    pairs = [(corpora.foldoc_first_paragraph(e), e.names[0]) for e in entries[:limit]]
    ex = {"title": pairs, "passage": [(q, p) for p, q in pairs]}
    rows = minilm_tokenized(ex, tokenizer, cfg)
    return {f"{MINILM_HELD_OUT_DOMAIN}:{k}": v for k, v in rows.items()}


def plot_loss(history: dict, png: Path) -> None:
    """The loss curve (training loss every 100 steps, validation NELBO) as a PNG, if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    if history.get("loss"):
        s, l = zip(*history["loss"])
        ax.plot(s, l, label="train NELBO / token")
    val = [v for v in history.get("val", []) if "val_nats_per_token" in v]
    if val:
        ax.plot([v["step"] for v in val], [v["val_nats_per_token"] for v in val], "o-", label="held-out NELBO / token")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per target token")
    ax.legend()
    ax.grid(alpha=0.3)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def minilm_data(cfg, seed: int = 0, val_rows: int = 48) -> tuple[dict[str, list], dict[str, list]]:
    """Tokenized training rows per task, and the held-out validation rows (FOLDOC's as their own tasks).

    Tokenizing ~300k texts takes minutes on a shared CPU, so the rows are
    cached under ``data/cache/diffusion/`` (keyed by the seed and the lengths).
    """
    import pickle

    path = cache_dir() / f"minilm-rows-{seed}-{cfg.cond_len}-{cfg.query_len}-{cfg.passage_len}.pkl"
    if path.exists():
        rows, held = pickle.loads(path.read_bytes())
    else:
        tok = td.load_tokenizer()
        rows = minilm_tokenized(minilm_examples(seed=seed), tok, cfg)
        held = minilm_tokenized(minilm_examples(held_out=True, seed=seed), tok, cfg)
        held = {k: v[:1000] for k, v in held.items()}
        held.update(foldoc_validation_rows(tok, cfg, limit=1000))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps((rows, held)))
    return rows, {k: v[:val_rows] for k, v in held.items()}


def minilm_checkpoint_path() -> Path:
    return CHECKPOINTS / "text-diffusion-minilm.pt"


def train_minilm(
    rows: dict[str, list],
    batches: list[tuple[str, list[int]]],
    val: dict[str, list],
    cfg,
    from_teacher: bool = True,
    freeze_words: bool = True,
    lr: float = 2e-4,
    weight_decay: float = 0.01,
    ema_decay: float = 0.995,
    warmup: int = 20,
    seed: int = 0,
    state_path: Path | None = None,
    resume: bool = False,
    eval_every: int = 50,
    time_budget_s: float | None = None,
    amp: bool = False,
    on_validate=None,
    progress: bool = True,
):
    """Train the MiniLM denoiser on prepared batches; returns the EMA model and the history.

    ``from_teacher``: start from MiniLM's weights (else from noise, the same
    architecture: the comparison of the issue). ``freeze_words``: keep MiniLM's
    word and position tables as they are (the tied decoder reads them too): the
    step is cheaper and the checkpoint need not store them.
    ``on_validate(ema, figures)``: called after each validation (exports, plots).
    """
    from hybridrag.models import minilm_diffusion as md

    torch.manual_seed(seed)
    diffusion = md.MinilmDiffusion(md.Denoiser(cfg))
    if from_teacher or freeze_words:
        diffusion.model.load_minilm()  # a from-scratch run with frozen tables still reads MiniLM's word table
    if not from_teacher and freeze_words:
        with torch.no_grad():
            fresh = md.Denoiser(cfg)
            for name, p in diffusion.model.named_parameters():
                if not (freeze_words and name in md.FROZEN):
                    p.copy_(dict(fresh.named_parameters())[name])
    for name, p in diffusion.model.named_parameters():
        p.requires_grad_(not (freeze_words and name in md.FROZEN))
    params = [(n, p) for n, p in diffusion.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for n, p in params if p.ndim >= 2], "weight_decay": weight_decay},
                             {"params": [p for n, p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    history: dict = {"loss": [], "val": [], "config": asdict(cfg), "lr": lr, "seed": seed, "from_teacher": from_teacher,
                     "freeze_words": freeze_words, "rows": {k: len(v) for k, v in rows.items()}}

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        task, members = batches[int(idx[0])]
        cond, target = collate([rows[task][i] for i in members])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return diffusion(cond, target, draws=minilm_draws(task))

    def validate(ema) -> dict:
        figures = minilm_validation(ema, val)
        if on_validate is not None:
            on_validate(ema, figures)
        return figures

    loop = LoopConfig(steps=len(batches), batch_size=1, lr=lr, warmup=warmup, ema_decay=ema_decay, ema_start=20,
                      seed=seed, state_path=state_path, resume=resume, save_every=eval_every, eval_every=eval_every,
                      time_budget_s=time_budget_s, progress=progress, desc="minilm-diffusion", loss_format=".3f")
    return train(diffusion, opt, len(batches), loss_of, validate, history, loop)


def plot_validation_logs(logs: dict[str, Path], png: Path) -> None:
    """Held-out NELBO and masked-token accuracy against training time, one line per run's ``*.val.jsonl``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, path in logs.items():
        rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
        minutes = [r["elapsed_s"] / 60 for r in rows]
        a.plot(minutes, [r["val_nats_per_token"] for r in rows], "o-", label=name)
        b.plot(minutes, [r["val_masked_acc"] for r in rows], "o-", label=name)
    a.set_ylabel("held-out NELBO, nats per target token")
    b.set_ylabel("held-out masked-token accuracy")
    for ax in (a, b):
        ax.set_xlabel("training minutes (2 shared cores)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
