"""Fine-tune a sequence classifier: single-label, multi-label or regression, in full or with LoRA.

    accelerate launch recipes/classify.py                   # offline: a tiny BERT learns which stdlib package a docstring is from
    accelerate launch recipes/classify.py --model bert-base-uncased --dataset imdb --eval_split test --lora_r 8 --lr 5e-4
    accelerate launch recipes/classify.py --dataset tickets.csv --label_column tags \\
        --problem_type multi_label_classification --label_separator "|"
    python recipes/classify.py --help                       # every field, with its default

Loads ``--model`` with ``AutoModelForSequenceClassification`` and its tokenizer or, with no
``--model``, builds a small BERT from a config and trains a BPE tokenizer (cached) on the
training texts. Labels are class ids, class names or (multi-label) lists of either, or numbers
for regression. Evaluation gathers every prediction from every rank, so accuracy, macro-F1 and
MSE are exact over the held-out set; the best checkpoint by ``best_metric`` is kept and exported
to ``output_dir/final`` (model or LoRA adapter, tokenizer, model card).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from acceltrain import (
    format_params,
)
from acceltrain.checkpoint_names import BEST, CHECKPOINTS_SUBDIR, checkpoint_step
from acceltrain.config import ConfigError, UserError
from acceltrain.data import load_tokenizer, texts_fingerprint, train_bpe_tokenizer
from acceltrain.data.labels import LabelSpace, classification_metrics, load_labelled, stdlib_family_task
from acceltrain.data.sft import PadCollator
from acceltrain.recipe_kit import (
    LoraFields,
    RecipeTrainer,
    TrainingConfig,
    apply_lora,
    cache_root,
    check_eval_source,
    check_weights_loadable,
    enable_gradient_checkpointing,
    gather_eval_outputs,
    load_checkpoint_weights,
    resolve_model,
    run_recipe,
    split_indices,
    trainable_summary,
)

CLS = "<|cls|>"
METRICS = {"single_label_classification": ("accuracy", "f1", "loss"),
           "multi_label_classification": ("f1", "accuracy", "loss"), "regression": ("mse", "mae", "loss")}


@dataclass
class ClassifyConfig(LoraFields, TrainingConfig):
    """Fine-tune a sequence classifier (single-label, multi-label or regression; full or LoRA)."""

    output_dir: str = field(default="runs/classify", metadata={"help": "Run folder: checkpoints, logs, final/"})
    batch_size: int = field(default=32, metadata={"help": "Examples per micro-batch per process"})
    max_steps: int = field(default=400, metadata={"help": "Optimizer steps"})
    model: str | None = field(default=None, metadata={
        "help": "Hub id or folder AutoModelForSequenceClassification loads (an encoder such as BERT, or a decoder); "
                "unset: a small BERT built from scratch"})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer name or folder (default: --model's)"})
    problem_type: Literal["single_label_classification", "multi_label_classification", "regression"] = field(
        default="single_label_classification", metadata={"help": "As transformers' config.problem_type"})
    num_labels: int | None = field(default=None, metadata={"help": "Classes (default: from the labels)"})
    dataset: str | None = field(default=None, metadata={
        "help": "Hub dataset or a local .csv/.jsonl/.parquet file; unset: which package family a docstring "
                "of this Python's standard library comes from (offline)"})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config name"})
    split: str = field(default="train", metadata={"help": "Hub split to train on"})
    eval_dataset: str | None = field(default=None, metadata={"help": "Evaluation data (default: --dataset)"})
    eval_split: str | None = field(default=None, metadata={
        "help": "Hub split to evaluate on; unset with no --eval_dataset: hold out val_fraction of the training data"})
    text_column: str = field(default="text", metadata={"help": "Column of texts"})
    label_column: str = field(default="label", metadata={"help": "Column of labels"})
    label_separator: str = field(default="|", metadata={"help": "Joins class names in a multi-label string cell"})
    max_length: int = field(default=64, metadata={"help": "Tokens per text (longer ones are cut)"})
    val_fraction: float = field(default=0.15, metadata={"help": "Share of the training data held out"})
    best_metric: str | None = field(default=None, metadata={
        "help": "Evaluation metric that picks the best checkpoint (default: accuracy; multi-label: f1; regression: mse)"})
    export_best: bool = field(default=True, metadata={"help": "Export the best checkpoint's weights, not the last"})
    vocab_size: int = field(default=4096, metadata={"help": "No --model: BPE vocabulary trained on the texts"})
    d_model: int = field(default=128, metadata={"help": "No --model: BERT width"})
    n_layers: int = field(default=2, metadata={"help": "No --model: BERT depth"})
    n_heads: int = field(default=4, metadata={"help": "No --model: BERT attention heads"})
    dropout: float = field(default=0.1, metadata={"help": "No --model: BERT dropout"})

    def validate(self) -> None:
        self.validate_training()
        self.validate_lora()
        check_eval_source(self.dataset, self.eval_dataset, self.eval_split)
        self.best_metric = self.best_metric or METRICS[self.problem_type][0]
        if self.best_metric not in METRICS[self.problem_type]:
            raise ConfigError(f"best_metric {self.best_metric!r}: {self.problem_type} reports "
                              f"{', '.join(METRICS[self.problem_type])}")
        if self.save_interval % self.eval_interval:
            raise ConfigError(f"save_interval ({self.save_interval}) must be a multiple of eval_interval "
                              f"({self.eval_interval}): each checkpoint records its own step's evaluation")
        if self.lora_r and not self.model:
            raise ConfigError("LoRA adapts pretrained weights: pass --model (the built-in BERT starts from random)")
        if self.max_length < 2 or not 0 < self.val_fraction < 1 or (self.num_labels or 2) < 1:
            raise ConfigError("max_length must be >= 2, val_fraction in (0, 1) and num_labels >= 1")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")


class ClassifyTrainer(RecipeTrainer):
    def __init__(self, cfg: ClassifyConfig):
        super().__init__(cfg, **cfg.trainer_kwargs())
        acc = self.accelerator
        self.source = self.model_config = None
        if cfg.model:
            self.source, self.model_config = resolve_model(cfg.model, kind="classifier",
                                                           trust_remote_code=cfg.trust_remote_code)
        with acc.main_process_first():  # the tokenizer cache is written once
            self.train_set, self.eval_set = self._prepare_data()

    def check_engine(self) -> None:
        if self.cfg.export_best:  # refused now, not after training: ZeRO-3 checkpoints hold no weights alone
            check_weights_loadable(self)

    def _prepare_data(self) -> tuple[list[dict], list[dict]]:
        cfg = self.cfg
        if cfg.dataset is None:
            texts, raw = stdlib_family_task()
            names, where = None, "python stdlib docstrings"
        else:
            texts, raw, names = self._load(cfg.dataset, cfg.split)
            where = cfg.dataset
        self.space = LabelSpace.fit(cfg.problem_type, raw, num_labels=cfg.num_labels, names=names,
                                    separator=cfg.label_separator, where=where)
        labels = self.space.encode(raw, where=where)
        if cfg.eval_dataset or cfg.eval_split:
            eval_texts, eval_raw, _ = self._load(cfg.eval_dataset or cfg.dataset, cfg.eval_split or "train")
            eval_labels = self.space.encode(eval_raw, where=f"{cfg.eval_dataset or cfg.dataset} (evaluation)")
        else:
            keep, held = split_indices(len(texts), cfg.val_fraction, cfg.seed)
            eval_texts, eval_labels = [texts[i] for i in held], [labels[i] for i in held]
            texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
        self.tokenizer = self._tokenizer(texts)
        self.eval_texts = eval_texts
        return self._encode(texts, labels), self._encode(eval_texts, eval_labels)

    def _load(self, source: str, split: str):
        cfg = self.cfg
        return load_labelled(source, text_column=cfg.text_column, label_column=cfg.label_column,
                             config_name=cfg.dataset_config, split=split, cache_dir=cache_root() / "datasets")

    def _tokenizer(self, texts: list[str]):
        cfg = self.cfg
        if cfg.model or cfg.tokenizer:
            return load_tokenizer(cfg.tokenizer or self.source, trust_remote_code=cfg.trust_remote_code)
        from tokenizers.processors import TemplateProcessing

        fingerprint = texts_fingerprint(texts)
        tok = train_bpe_tokenizer(texts, cfg.vocab_size, cache_root() / "tokenizers" / f"{fingerprint[:16]}-{cfg.vocab_size}-cls",
                                  extra_special_tokens=[CLS], fingerprint=fingerprint, model_max_length=cfg.max_length)
        # BERT classifies from position 0: the tokenizer itself starts every text with CLS, so the
        # exported folder encodes text exactly as training did.
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{CLS} $A", special_tokens=[(CLS, tok.convert_tokens_to_ids(CLS))])
        tok.cls_token = CLS
        return tok

    def _encode(self, texts: list[str], labels: list) -> list[dict]:
        ids = self.tokenizer(texts, truncation=True, max_length=self.cfg.max_length)["input_ids"]
        return [{"input_ids": x, "labels": y} for x, y in zip(ids, labels, strict=True)]

    def _loader(self, dataset: list[dict], shuffle: bool) -> torch.utils.data.DataLoader:
        collate = PadCollator(self.tokenizer.pad_token_id, sequence_labels=False)
        return torch.utils.data.DataLoader(dataset, batch_size=self.cfg.batch_size, shuffle=shuffle, drop_last=shuffle,
                                           collate_fn=collate, num_workers=self.cfg.num_workers)

    def build_data_loader(self):
        return self._loader(self.train_set, shuffle=True)

    def build_eval_data_loader(self):
        return self._loader(self.eval_set, shuffle=False)

    def build_model(self):
        from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

        cfg, tok = self.cfg, self.tokenizer
        torch.manual_seed(cfg.seed)  # the new head's (and LoRA's) initialisation
        if cfg.model:
            # A classifier trained on other classes keeps its body; its head must start anew.
            old_head = any(a.endswith("ForSequenceClassification") for a in self.model_config.architectures or [])
            new_head = old_head and self.model_config.num_labels != self.space.num_labels
            if new_head and self.is_main_process:
                print(f"note: {cfg.model} has a head of {self.model_config.num_labels} outputs, this task needs "
                      f"{self.space.num_labels}: a new head is trained")
            try:
                model = AutoModelForSequenceClassification.from_pretrained(
                    self.source, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code,
                    ignore_mismatched_sizes=new_head, **self.space.model_config_kwargs())
            except (OSError, ValueError, RuntimeError) as e:
                raise UserError(f"--model {cfg.model}: cannot load it as a classifier ({str(e).splitlines()[0]})") from None
        else:
            model = BertForSequenceClassification(BertConfig(
                vocab_size=len(tok), hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, intermediate_size=4 * cfg.d_model, max_position_embeddings=cfg.max_length,
                hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout, pad_token_id=tok.pad_token_id,
                **self.space.model_config_kwargs()))
        if model.config.pad_token_id is None:  # decoders classify from the last token that is not padding
            model.config.pad_token_id = tok.pad_token_id
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        arch = type(model).__name__
        if cfg.lora_r:
            model = apply_lora(model, cfg, task_type="SEQ_CLS")
        self.trainable, self.total = trainable_summary(model)
        if self.is_main_process:
            print(f"classify: {arch} ({self.source or 'built from a config'}), {format_params(self.total)} parameters, "
                  f"{self.trainable:,} trainable; {self.space.num_labels} {'output' if cfg.problem_type == 'regression' else 'classes'}; "
                  f"{len(self.train_set):,} training and {len(self.eval_set):,} evaluation texts", flush=True)
        return model.to(self.device)

    def build_hooks(self):
        cfg = self.cfg
        return self.standard_hooks(keep_best=1, metric=f"eval/{cfg.best_metric}",
                                   mode="max" if cfg.best_metric in ("accuracy", "f1") else "min")

    def forward(self, batch):
        return self.model(**batch).loss, {}

    def evaluate(self) -> dict[str, float]:
        # Macro-F1 is not a mean of per-batch values: gather every prediction, then score the union.
        def step(batch):
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return {"logits": logits.float(), "labels": batch["labels"]}

        out = gather_eval_outputs(self, step)
        return classification_metrics(self.cfg.problem_type, out["logits"], out["labels"])

    def finish(self) -> Path:
        """Export ``output_dir/final`` from the best checkpoint (or the last step), with a model card."""
        cfg, final = self.cfg, self.workspace / "final"
        metrics, step = self.eval_hook.last or self.evaluate(), self.step
        best = self.workspace / CHECKPOINTS_SUBDIR / BEST
        if cfg.export_best and best.exists() and checkpoint_step(best.resolve()) != self.step:
            step = checkpoint_step(best.resolve())
            load_checkpoint_weights(self, best.resolve())
            metrics = self.evaluate()
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "samples")
        facts = {
            "base model": self.source or f"BERT from scratch: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads",
            "fine-tuning": f"LoRA r={cfg.lora_r}, alpha={cfg.lora_alpha}, targets {cfg.lora_target_modules}" if cfg.lora_r else "full",
            "trainable parameters": f"{self.trainable:,} of {self.total:,}",
            "task": f"{cfg.problem_type}, {self.space.num_labels} {'output' if cfg.problem_type == 'regression' else 'classes'}"
                    + (f": {', '.join(self.space.names)}" if self.space.names else ""),
            "data": f"{cfg.dataset or 'Python standard library docstrings by package family'}: "
                    f"{len(self.train_set):,} training / {len(self.eval_set):,} held-out texts",
            "training": f"{self.step} steps x {cfg.batch_size * cfg.gradient_accumulation_steps * self.accelerator.num_processes}"
                        f" texts of up to {cfg.max_length} tokens, AdamW lr {cfg.lr} warmup+cosine",
            f"evaluation (step {step}, {int(metrics['samples'])} texts)": shown,
        }
        load = f'AutoModelForSequenceClassification.from_pretrained("{final}")'
        if cfg.lora_r:
            base = f'AutoModelForSequenceClassification.from_pretrained("{self.source}", num_labels={self.space.num_labels})'
            load = f'PeftModel.from_pretrained({base}, "{final}")'
        usage = f"""
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer{chr(10) + 'from peft import PeftModel' if cfg.lora_r else ''}
tok = AutoTokenizer.from_pretrained("{final}")
model = {load}.eval()
with torch.no_grad():
    print(model(**tok(["some text"], return_tensors="pt")).logits)"""
        self.export(title=f"acceltrain classify: {cfg.problem_type}",
                    summary="A sequence classifier trained with `recipes/classify.py`.", facts=facts, usage=usage,
                    adapter_of=self.source if cfg.lora_r else None)
        if cfg.merge_lora:
            self.export("merged", merge_lora=True)
        if self.is_main_process:
            print(f"Saved {final} from step {step}: {shown}")
        return final


def main(argv: list[str] | None = None) -> Path:
    return run_recipe(ClassifyConfig, ClassifyTrainer, argv, prog="recipes/classify.py")


RECIPE = (ClassifyConfig, ClassifyTrainer)  # for `acceltrain lr-find --config`

if __name__ == "__main__":
    sys.exit(0 if main() else 1)
