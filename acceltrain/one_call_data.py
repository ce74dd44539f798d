"""``train_model(model=..., dataset=...)``: text in, a trained causal LM and a results dict out.

The steps are acceltrain's own: :class:`acceltrain.data.dataset_loader.DatasetLoader` reads and
cleans the texts, :func:`acceltrain.data.tokenizer_check.tokenizer_for` gives the tokenizer
(pretrained, BPE trained on the texts, or character-level), :func:`acceltrain.data.packing.pack_texts`
packs the tokens, :func:`acceltrain.data.packing.train_val_split` holds out the end of the
stream, and the one-call :class:`acceltrain.one_call.Trainer` trains with checkpoints (best by
``eval/loss``), evaluation and early stopping.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .checkpoint_names import BEST, CHECKPOINTS_SUBDIR, LATEST
from .data.text import DataError

__all__ = ["train_on_text", "load_dataset_texts"]

logger = logging.getLogger("acceltrain")


def load_dataset_texts(dataset: Any, *, config_name: str | None = None, text_column: str = "text",
                       loader: Any = None) -> list[str]:
    """Texts from a local file/folder path, a Hub dataset name, a ``datasets.Dataset`` or a list of strings."""
    from .data.dataset_loader import DatasetLoader

    loader = loader or DatasetLoader()
    if isinstance(dataset, (str, Path)):
        if Path(dataset).expanduser().exists():
            ds = loader.load_local_file(dataset, text_column=text_column)
        else:
            ds = loader.load_huggingface(str(dataset), config_name, text_column=text_column)
        return list(ds["text"])
    if isinstance(dataset, (list, tuple)):
        return list(loader.from_texts(dataset)["text"])
    if hasattr(dataset, "column_names"):
        if text_column not in dataset.column_names:
            raise DataError(f"dataset: no {text_column!r} column (columns: {dataset.column_names})")
        return list(loader.from_texts(list(dataset[text_column]))["text"])
    raise DataError(f"dataset: expected a path, a Hub name, a datasets.Dataset or a list of texts, "
                    f"got {type(dataset).__name__}")


def _model_vocab(model: torch.nn.Module) -> int | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(emb.num_embeddings) if emb is not None else getattr(getattr(model, "config", None), "vocab_size", None)


def train_on_text(model: torch.nn.Module, *, dataset: Any = None, dataset_path: str | Path | None = None,
                  config_name: str | None = None, text_column: str = "text", vocab_size: int | None = None,
                  tokenizer: Any = "auto", batch_size: int = 16, val_split: float = 0.1, max_length: int = 512,
                  max_epochs: float | None = None, use_gpu: bool = True, output_dir: str | Path = "./training_output",
                  callbacks: list | None = None, **config: Any) -> dict[str, Any]:
    """Train a causal LM on text; returns ``{"best_model_path", "final_metrics", "trainer", "model", "tokenizer"}``.

    Writes ``output_dir/checkpoints`` (``checkpoint_best`` by ``eval/loss``), ``output_dir/final``
    (a Hugging Face folder with the tokenizer), ``output_dir/tokenizer``, logs and the packed data.

    Args:
        model: A causal LM taking ``input_ids`` and ``labels`` (a ``transformers`` model).
        dataset: A local file or folder, a Hub dataset name (with ``config_name``), a
            ``datasets.Dataset`` (its ``text_column``) or a list of texts.
        dataset_path: A local file (the same as ``dataset=path``).
        vocab_size: The tokenizer's vocabulary size (default: the model's embedding size).
        tokenizer: A tokenizer, a folder or Hub id, or a strategy: ``"auto"``, ``"pretrained"``,
            ``"bpe"``, ``"character"``.
        batch_size: Windows per batch (training and evaluation).
        val_split: Fraction of the token windows held out for evaluation (0: none).
        max_length: Tokens per window.
        max_epochs: Passes over the training windows (or give ``max_steps``).
        use_gpu: False trains on the CPU even when a GPU is there.
        output_dir: Checkpoints, logs, the tokenizer and the packed data go here; a rerun
            resumes from its latest checkpoint.
        callbacks: Extra hooks.
        **config: :class:`acceltrain.one_call.TrainerConfig` keys and the seeds' aliases:
            ``learning_rate``, ``save_top_k`` (default 1), ``resume_from_checkpoint``,
            ``early_stopping_patience``, ``accumulate_grad_batches``, ``gradient_clip_val``,
            ``precision``, ``seed``, ...

    Raises:
        DataError: no text, a tokenizer with more tokens than the model has embeddings, or too
            little text for one window of ``max_length``.
    """
    from .data.packing import PackedTokens, pack_texts, train_val_split
    from .data.tokenizer_check import STRATEGIES, tokenizer_for
    from .one_call import Trainer

    if (dataset is None) == (dataset_path is None):
        raise ValueError("dataset / dataset_path: give exactly one")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not 0.0 <= val_split < 1.0:
        raise ValueError(f"val_split must be in [0, 1), got {val_split!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    out = Path(output_dir)
    texts = load_dataset_texts(dataset if dataset is not None else dataset_path, config_name=config_name,
                               text_column=text_column)
    model_vocab = _model_vocab(model)
    vocab_size = vocab_size or model_vocab
    if vocab_size is None:
        raise ValueError("vocab_size: the model has no input embeddings to read it from; pass vocab_size=")
    if isinstance(tokenizer, str) and tokenizer in STRATEGIES:
        tok = tokenizer_for(tokenizer, vocab_size=vocab_size, texts=texts, cache_dir=out / "tokenizers")
    elif isinstance(tokenizer, (str, Path)):
        from .data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
    else:
        tok = getattr(tokenizer, "hf", tokenizer)  # a CharacterLevelTokenizer wraps a HF tokenizer
    if model_vocab is not None and len(tok) > model_vocab:
        raise DataError(f"tokenizer: {len(tok)} tokens, but the model embeds only {model_vocab}: give vocab_size "
                        f"<= {model_vocab} or a larger model")
    corpus = pack_texts(texts, tok, out / "data")
    if val_split > 0:
        train_set, val_set = train_val_split(corpus, max_length, val_fraction=val_split)
    else:
        train_set, val_set = PackedTokens(corpus, max_length), None
        if len(train_set) == 0:
            raise DataError(f"dataset: {corpus.num_tokens} tokens make no window of max_length={max_length}")
    logger.info("train_model: %d training and %d evaluation windows of %d tokens", len(train_set),
                len(val_set) if val_set is not None else 0, max_length)
    train_dl = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True)
    eval_dl = torch.utils.data.DataLoader(val_set, batch_size=batch_size) if val_set is not None else None
    if eval_dl is not None:
        config.setdefault("save_top_k", 1)
    if max_epochs is not None:
        config["max_epochs"] = max_epochs
    device = None if use_gpu else "cpu"
    trainer = Trainer(model, train_dataloader=train_dl, eval_dataloader=eval_dl, output_dir=str(out), device=device,
                      callbacks=callbacks, **config)
    if trainer.config.save_interval is None and trainer.steps_per_epoch:
        trainer.config.save_interval = trainer.steps_per_epoch  # a checkpoint per epoch, ranked for save_top_k
    trainer.tokenizer = tok  # save_pretrained writes it beside the weights
    trainer.train()
    tok.save_pretrained(out / "tokenizer")
    trainer.save_pretrained(out / "final")  # a Hugging Face folder: weights (best, with early stopping), config, tokenizer
    root = out / CHECKPOINTS_SUBDIR
    best = root / BEST
    latest = root / LATEST
    best_path = best.resolve() if best.exists() else latest.resolve() if latest.exists() else None
    final = next((dict(h.last) for h in trainer.hooks if type(h).__name__ == "EvaluationHook" and h.last), {})
    return {"best_model_path": str(best_path) if best_path is not None else None, "final_metrics": final,
            "trainer": trainer, "model": trainer.unwrapped_model, "tokenizer": tok}
