"""Fine-tune a causal language model, in full or with LoRA, on text or prompt/response pairs.

    accelerate launch recipes/pretrain.py && accelerate launch recipes/causal_lm.py   # offline chain
    accelerate launch recipes/causal_lm.py --model Qwen/Qwen2.5-0.5B --dataset pairs.jsonl \\
        --prompt_column question --response_column answer --lora_r 16 --lr 2e-4
    accelerate launch recipes/causal_lm.py --dataset notes/ --lora_r 8      # plain text, packed
    python recipes/causal_lm.py --help                                       # every field, with its default

Loads ``--model`` (default: ``runs/pretrain/final``, the pretraining recipe's output) and its
tokenizer. With ``--prompt_column/--response_column`` each example is ``prompt + response + EOS``
with the prompt masked out of the loss and batches right-padded; without, the text is packed into
windows as in pretraining. By default (no ``--dataset``) it learns to write a function's
docstring from its signature, pairs built from this Python's standard library at run time. The
loss is the token mean over the whole accumulation window on all ranks; evaluation reports the
exact token-level perplexity of the held-out set and prints a greedy sample; ``output_dir/final``
holds the model (or the LoRA adapter), tokenizer and model card.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from acceltrain import (
    format_params,
)
from acceltrain.config import ConfigError, UserError
from acceltrain.data import load_texts, load_tokenizer, pack_texts, texts_fingerprint, train_val_split
from acceltrain.data.labels import load_columns
from acceltrain.data.packing import PackedTokens
from acceltrain.data.sft import (
    PadCollator,
    count_target_tokens,
    stdlib_docstring_pairs,
    token_loss_sum,
    tokenize_pairs,
)
from acceltrain.recipe_kit import (
    LoraFields,
    RecipeTrainer,
    SampleHook,
    TrainingConfig,
    apply_lora,
    cache_root,
    check_eval_source,
    enable_gradient_checkpointing,
    resolve_model,
    run_recipe,
    split_indices,
    trainable_summary,
)

DEFAULT_MODEL = "runs/pretrain/final"


@dataclass
class CausalLMConfig(LoraFields, TrainingConfig):
    """Fine-tune a causal language model (full or LoRA) on text or prompt/response pairs."""

    output_dir: str = field(default="runs/causal_lm", metadata={"help": "Run folder: checkpoints, logs, final/"})
    lr: float = field(default=2e-3, metadata={"help": "Peak learning rate (tiny default model; ~2e-5 full, "
                                                      "~2e-4 LoRA for billion-parameter models)"})
    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "Hub id or local folder of an AutoModelForCausalLM (default: recipes/pretrain.py's output)"})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer name or folder (default: --model's)"})
    dataset: str | None = field(default=None, metadata={
        "help": "Hub dataset, or a local .jsonl/.csv/.parquet file (text: also .txt or a folder); unset: "
                "signature -> docstring pairs from this Python's standard library (offline)"})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config name"})
    split: str = field(default="train", metadata={"help": "Hub split to train on"})
    eval_dataset: str | None = field(default=None, metadata={"help": "Evaluation data (default: --dataset)"})
    eval_split: str | None = field(default=None, metadata={
        "help": "Hub split to evaluate on; unset with no --eval_dataset: hold out val_fraction of the training data"})
    text_column: str = field(default="text", metadata={"help": "Column of plain text (packed into windows)"})
    prompt_column: str | None = field(default=None, metadata={"help": "Column of prompts (masked out of the loss)"})
    response_column: str | None = field(default=None, metadata={"help": "Column of responses (learned)"})
    max_length: int = field(default=256, metadata={"help": "Tokens per example (pairs: cut; text: window length)"})
    val_fraction: float = field(default=0.05, metadata={"help": "Share of the training data held out"})
    sample_prompt: str | None = field(default=None, metadata={
        "help": "Prompt for the greedy sample printed at each evaluation (default: the first held-out prompt)"})
    sample_tokens: int = field(default=48, metadata={"help": "Tokens to generate for the sample (0: none)"})

    def validate(self) -> None:
        self.validate_training()
        self.validate_lora()
        check_eval_source(self.dataset, self.eval_dataset, self.eval_split)
        if (self.prompt_column is None) != (self.response_column is None):
            raise ConfigError("prompt_column and response_column go together: give both (pairs) or neither (text)")
        if self.max_length < 2 or self.sample_tokens < 0 or not 0 < self.val_fraction < 1:
            raise ConfigError("max_length must be >= 2, sample_tokens >= 0 and val_fraction in (0, 1)")

    @property
    def pairs(self) -> bool:
        return self.prompt_column is not None or self.dataset is None


class CausalLMTrainer(RecipeTrainer):
    def __init__(self, cfg: CausalLMConfig):
        super().__init__(cfg, **cfg.trainer_kwargs())
        acc = self.accelerator
        hint = "run `accelerate launch recipes/pretrain.py` first (it writes it) or pass --model"
        self.source, model_config = resolve_model(cfg.model, kind="causal_lm", trust_remote_code=cfg.trust_remote_code,
                                                  missing_hint=hint if cfg.model == DEFAULT_MODEL else None)
        limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
        if limit and cfg.max_length > limit:
            raise ConfigError(f"max_length {cfg.max_length} is longer than --model's {limit} positions")
        self.tokenizer = load_tokenizer(cfg.tokenizer or self.source, trust_remote_code=cfg.trust_remote_code)
        with acc.main_process_first():  # packing writes a cache the other ranks then read
            self.train_set, self.eval_set, self.sample_prompt = self._prepare_data()

    def _prepare_data(self) -> tuple[list | PackedTokens, list | PackedTokens, str]:
        cfg = self.cfg
        if not cfg.pairs:
            return self._packed_text()
        if cfg.dataset is None:
            train_p, train_r = stdlib_docstring_pairs()
        else:
            train_p, train_r = self._load_pairs(cfg.dataset, cfg.split)
        if cfg.eval_dataset or cfg.eval_split:
            eval_p, eval_r = self._load_pairs(cfg.eval_dataset or cfg.dataset, cfg.eval_split or "train")
        else:
            keep, held = split_indices(len(train_p), cfg.val_fraction, cfg.seed)
            eval_p, eval_r = [train_p[i] for i in held], [train_r[i] for i in held]
            train_p, train_r = [train_p[i] for i in keep], [train_r[i] for i in keep]
        train, dropped = tokenize_pairs(train_p, train_r, self.tokenizer, max_length=cfg.max_length)
        evals, eval_dropped = tokenize_pairs(eval_p, eval_r, self.tokenizer, max_length=cfg.max_length)
        if not train or not evals:
            raise UserError(f"no {'training' if not train else 'evaluation'} pair has a response token within "
                            f"max_length {cfg.max_length}: every prompt is that long")
        if (dropped or eval_dropped) and self.is_main_process:
            print(f"dropped {dropped} training and {eval_dropped} evaluation pairs whose prompt fills max_length")
        return train, evals, cfg.sample_prompt or eval_p[0]

    def _load_pairs(self, source: str, split: str) -> tuple[list[str], list[str]]:
        cfg = self.cfg
        cols, _, _ = load_columns(source, {"prompt": cfg.prompt_column, "response": cfg.response_column},
                                  config_name=cfg.dataset_config, split=split,
                                  cache_dir=cache_root() / "datasets")
        return cols["prompt"], cols["response"]

    def _packed_text(self) -> tuple[PackedTokens, PackedTokens, str]:
        cfg = self.cfg

        def pack(source: str, split: str):
            texts = load_texts(source, text_column=cfg.text_column, config_name=cfg.dataset_config, split=split,
                               cache_dir=cache_root() / "datasets")
            return pack_texts(texts, self.tokenizer, cache_root() / "packed", fingerprint=texts_fingerprint(texts))

        corpus = pack(cfg.dataset, cfg.split)
        if cfg.eval_dataset or cfg.eval_split:
            train, evals = PackedTokens(corpus, cfg.max_length), PackedTokens(
                pack(cfg.eval_dataset or cfg.dataset, cfg.eval_split or "train"), cfg.max_length)
            if not len(train) or not len(evals):
                raise UserError(f"the {'training' if not len(train) else 'evaluation'} text is shorter than "
                                f"one window of max_length {cfg.max_length} tokens")
        else:
            train, evals = train_val_split(corpus, cfg.max_length, val_fraction=cfg.val_fraction)
        first = evals[0]["input_ids"][: min(16, cfg.max_length)]
        return train, evals, cfg.sample_prompt or self.tokenizer.decode(first, skip_special_tokens=True)

    def _loader(self, dataset, shuffle: bool) -> torch.utils.data.DataLoader:
        collate = PadCollator(self.tokenizer.pad_token_id) if self.cfg.pairs else None
        return torch.utils.data.DataLoader(dataset, batch_size=self.cfg.batch_size, shuffle=shuffle,
                                           drop_last=shuffle, collate_fn=collate, num_workers=self.cfg.num_workers)

    def build_data_loader(self):
        return self._loader(self.train_set, shuffle=True)

    def build_eval_data_loader(self):
        return self._loader(self.eval_set, shuffle=False)

    def build_model(self):
        from transformers import AutoModelForCausalLM

        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # LoRA's initialisation
        try:  # fp32 master weights: mixed precision is autocast's job, not the checkpoint dtype's
            model = AutoModelForCausalLM.from_pretrained(self.source, dtype=torch.float32,
                                                         trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as e:
            raise UserError(f"--model {cfg.model}: cannot load its weights ({str(e).splitlines()[0]})") from None
        if len(self.tokenizer) > model.get_input_embeddings().num_embeddings:
            raise UserError(f"the tokenizer has {len(self.tokenizer)} tokens, more than --model's "
                            f"{model.get_input_embeddings().num_embeddings} embeddings: pass the model's own tokenizer")
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        arch = type(model).__name__
        if cfg.lora_r:
            model = apply_lora(model, cfg, task_type="CAUSAL_LM")
        self.trainable, self.total = trainable_summary(model)
        if self.is_main_process:
            print(f"causal_lm: {arch} from {self.source}, {format_params(self.total)} parameters, {self.trainable:,} trainable; "
                  f"{len(self.train_set):,} training and {len(self.eval_set):,} evaluation "
                  f"{'examples' if cfg.pairs else f'windows of {cfg.max_length}'}", flush=True)
        return model.to(self.device)

    def build_hooks(self):
        cfg = self.cfg
        sample = [SampleHook(self.tokenizer, self.sample_prompt, max_new_tokens=cfg.sample_tokens,
                             interval=cfg.eval_interval)] if cfg.sample_tokens else []
        return self.standard_hooks(extra=sample)

    def count_loss_items(self, batch) -> torch.Tensor:
        # The trainer divides forward's sums by the target tokens of the whole window on all ranks.
        return count_target_tokens(batch["labels"])

    def forward(self, batch):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
        return token_loss_sum(out.logits, batch["labels"]), {}

    def evaluation_step(self, batch):
        # evaluate() weighs per-sample means by their sample counts, so sums divided by the batch
        # size come back as sums over the whole set: their ratio is the exact token mean.
        n = batch["input_ids"].shape[0]
        loss_sum, _ = self.forward(batch)
        return {"loss_sum": loss_sum.double() / n, "tokens": count_target_tokens(batch["labels"]).double() / n}

    def evaluate(self) -> dict[str, float]:
        sums = super().evaluate()
        loss = sums["loss_sum"] / sums["tokens"]
        return {"loss": loss, "perplexity": math.exp(loss), "tokens": float(round(sums["tokens"] * len(self.eval_set)))}

    def finish(self) -> Path:
        """Export ``output_dir/final`` (model or adapter, tokenizer, model card) and, with
        ``merge_lora``, ``output_dir/merged``."""
        cfg, final = self.cfg, self.workspace / "final"
        metrics = self.eval_hook.last or self.evaluate()
        facts = {
            "base model": self.source,
            "fine-tuning": f"LoRA r={cfg.lora_r}, alpha={cfg.lora_alpha}, targets {cfg.lora_target_modules}"
                           if cfg.lora_r else "full",
            "trainable parameters": f"{self.trainable:,} of {self.total:,}",
            "data": f"{cfg.dataset or 'Python standard library: signature -> docstring pairs'} "
                    f"({'prompt/response, prompt masked' if cfg.pairs else 'packed text'}), "
                    f"{len(self.train_set):,} training / {len(self.eval_set):,} held-out examples",
            "training": f"{self.step} steps x {cfg.batch_size * cfg.gradient_accumulation_steps * self.accelerator.num_processes}"
                        f" examples of up to {cfg.max_length} tokens, AdamW lr {cfg.lr} warmup+cosine",
            "final evaluation loss (token mean)": f"{metrics['loss']:.4f} over {int(metrics['tokens']):,} tokens",
            "final evaluation perplexity": f"{metrics['perplexity']:.2f}",
        }
        load = f'AutoModelForCausalLM.from_pretrained("{final}")'
        if cfg.lora_r:
            load = f'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{self.source}"), "{final}")'
        usage = f"""
from transformers import AutoModelForCausalLM, AutoTokenizer{chr(10) + 'from peft import PeftModel' if cfg.lora_r else ''}
tok = AutoTokenizer.from_pretrained("{final}")
model = {load}
ids = tok({self.sample_prompt!r}, return_tensors="pt")
print(tok.decode(model.generate(**ids, max_new_tokens=48)[0]))"""
        title = f"acceltrain causal_lm: {'LoRA adapter' if cfg.lora_r else 'fine-tuned model'}"
        summary = "A causal language model fine-tuned with `recipes/causal_lm.py`."
        self.export(title=title, summary=summary, facts=facts, usage=usage,
                    adapter_of=self.source if cfg.lora_r else None)
        if cfg.merge_lora:
            merged = self.workspace / "merged"
            usage = usage.replace(load, f'AutoModelForCausalLM.from_pretrained("{merged}")').replace(str(final), str(merged))
            self.export("merged", merge_lora=True, title="acceltrain causal_lm: LoRA merged into the base",
                        summary=summary, facts=facts, usage=usage.replace("\nfrom peft import PeftModel", ""))
        if self.is_main_process:
            print(f"Saved {final}{' and ' + str(self.workspace / 'merged') if cfg.merge_lora else ''} "
                  f"(evaluation loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f})")
        return final


def main(argv: list[str] | None = None) -> Path:
    return run_recipe(CausalLMConfig, CausalLMTrainer, argv, prog="recipes/causal_lm.py")


RECIPE = (CausalLMConfig, CausalLMTrainer)  # for `acceltrain lr-find --config`

if __name__ == "__main__":
    sys.exit(0 if main() else 1)
