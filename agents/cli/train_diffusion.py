"""``python -m hybridrag.agents.cli.train_diffusion``: train the diffusion models (embedding prior, text diffusion).

The training itself is :mod:`hybridrag.models.train_diffusion`; this command
line feeds it the corpora's pairs and the embeddings the evaluation harness
already cached, so nothing is encoded twice.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
import typer

from hybridrag.agents.evaluation.harness import cached_corpus_embeddings
from hybridrag.models import corpora
from hybridrag.models import embedding_diffusion as ed
from hybridrag.models import text_diffusion as td
from hybridrag.models.encoders import load_encoder
from hybridrag.models.train_diffusion import (build_text_data, cache_dir, heldout_pairs, known_embeddings,
                                              pair_embeddings, save_prior, save_text, select_pairs, teacher_token_table,
                                              text_key, text_validation, train_prior, train_text_model)

app = typer.Typer(help="Train the diffusion models (embedding prior, text diffusion).", no_args_is_help=True)


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
    torch.manual_seed(seed)
    enc = load_encoder(encoder, checkpoint=encoder_checkpoint)
    pairs = corpora.training_pairs(limit=limit, seed=seed)
    held = heldout_pairs(limit=val_pairs, seed=seed)
    typer.echo(f"{len(pairs)} training pairs, {len(held)} held-out pairs, encoder {enc.version}")
    extra = cached_corpus_embeddings(enc.version, text_key)  # what the evaluation harness already encoded
    known = known_embeddings(enc.version, extra=extra)
    pairs = select_pairs(pairs, known, None if encode_budget < 0 else encode_budget)
    typer.echo(f"{len(pairs)} pairs selected (encode budget {encode_budget}, {len(known)} texts already embedded)")
    tq, tp = pair_embeddings(pairs, enc, extra=extra)
    vq, vp = pair_embeddings(held, enc, extra=extra)
    cfg = ed.Config(dim=enc.dim, hidden=hidden, depth=depth)
    state = cache_dir() / f"prior-{enc.version}-state.pt"
    model, history = train_prior(tq, tp, vq, vp, cfg, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                 device=device, state_path=state, resume=resume, time_budget_s=minutes * 60,
                                 eval_every=500)
    path = save_prior(model, enc.version, history, out)
    typer.echo(f"wrote {path}")


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


@app.command()
def minilm(
    minutes: float = typer.Option(80.0, help="Wall-clock budget of the run, resumes included; the LR decays over it."),
    from_teacher: bool = typer.Option(True, help="Start from MiniLM's weights (--no-from-teacher: from noise)."),
    freeze_words: bool = typer.Option(None, help="Keep MiniLM's word and position tables frozen "
                                      "(default: on from the teacher, off from noise)."),
    tokens: int = typer.Option(768, help="Condition + target tokens per batch."),
    lr: float = typer.Option(3e-4),
    ema_decay: float = typer.Option(0.98, help="EMA of the weights: a half-life of ~35 steps suits runs of hundreds of steps."),
    eval_every: int = typer.Option(20, help="Steps between validations, resumable states and exports."),
    val_rows: int = typer.Option(16, help="Held-out rows per task for the running validation."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, help="torch threads: the machine is shared."),
    resume: bool = typer.Option(False, help="Continue from data/cache/diffusion/minilm-<name>-state.pt."),
    name: str = typer.Option("teacher", help="Run name: its state, log and plot files are named after it."),
    out: Path = typer.Option(None, help="Checkpoint exported at every validation "
                             "(default models/checkpoints/text-diffusion-minilm.pt for a from-teacher run)."),
) -> None:
    """Train the masked-diffusion generator that starts from MiniLM (both directions, FOLDOC held out)."""
    from hybridrag.models import minilm_diffusion as md
    from hybridrag.models import train_diffusion as tdm

    torch.set_num_threads(threads)
    freeze = from_teacher if freeze_words is None else freeze_words
    cfg = md.Config()
    rows, val = tdm.minilm_data(cfg, seed=seed, val_rows=val_rows)
    batches = tdm.minilm_batches(rows, n_batches=20_000, tokens=tokens, seed=seed)
    typer.echo(f"training rows {json.dumps({k: len(v) for k, v in rows.items()})}, {len(batches)} batches")
    lengths = {k: [len(t) for _, t in v[:20000]] for k, v in rows.items()}
    path = out or (tdm.minilm_checkpoint_path() if from_teacher else cache_dir() / f"minilm-{name}.pt")
    state = cache_dir() / f"minilm-{name}-state.pt"
    log = cache_dir() / f"minilm-{name}.val.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    if not resume:
        log.write_text("")
    # validations are every eval_every steps; a resumed run continues the log's step and time
    done = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
    clock = {"step": done[-1]["step"] if done else 0, "s": done[-1]["elapsed_s"] if done else 0.0,
             "t0": time.perf_counter()}

    def export(ema, figures: dict, final_step: int | None = None) -> None:
        clock["step"] = final_step if final_step is not None else clock["step"] + eval_every
        figures = {**figures, "step": clock["step"], "elapsed_s": clock["s"] + time.perf_counter() - clock["t0"]}
        version = f"text-diffusion-minilm-{tdm.state_digest(ema.state_dict())}"
        torch.save(ema.checkpoint(frozen=md.FROZEN if freeze else (), version=version, lengths=lengths,
                                  meta={"from_teacher": from_teacher, "val": figures, "name": name}), path)
        lines = log.read_text().splitlines()
        if final_step is not None and lines:
            lines.pop()  # the loop's own last validation of this model, logged one interval ahead
        log.write_text("".join(x + "\n" for x in [*lines, json.dumps({"version": version, **figures})]))

    model, history = tdm.train_minilm(rows, batches, val, cfg, from_teacher=from_teacher, freeze_words=freeze,
                                      lr=lr, ema_decay=ema_decay, seed=seed,
                                      state_path=state, resume=resume, eval_every=eval_every,
                                      time_budget_s=minutes * 60, on_validate=export)
    export(model, {k: v for k, v in history["val"][-1].items() if k not in ("step", "elapsed_s")},
           final_step=history["steps"])
    tdm.plot_loss(history, cache_dir() / f"minilm-{name}.loss.png")
    tdm.plot_validation_logs({name: log}, cache_dir() / f"minilm-{name}.val.png")
    (cache_dir() / f"minilm-{name}.history.json").write_text(json.dumps(history, indent=1) + "\n")
    typer.echo(f"wrote {path}")


if __name__ == "__main__":
    app()
