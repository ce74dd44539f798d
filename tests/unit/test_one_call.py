"""One-call training: acceltrain.Trainer / train_model on plain and Hugging Face models, no subclass."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn

from acceltrain import BaseHook, CheckpointingHook
from acceltrain.hooks.early_stopping import EarlyStoppingHook
from acceltrain.one_call import Trainer, TrainerConfig, make_config, train_model
from acceltrain.schedules import Schedule
from tests.helpers import regression_data, run_step_dir


class Losses(BaseHook):
    def __init__(self):
        self.values: list[float] = []

    def on_after_step(self, trainer):
        self.values.append(trainer.step_info["loss"].item())


def _loader(n: int = 64, batch_size: int = 8, **kw) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(regression_data(n), batch_size=batch_size, **kw)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def test_plain_module_with_a_criterion_trains(capsys):
    losses = Losses()
    trainer = Trainer(_mlp(), train_dataloader=_loader(shuffle=True), criterion=nn.MSELoss(), callbacks=[losses],
                      config={"max_steps": 60, "learning_rate": 1e-2, "scheduler": "cosine", "warmup_steps": 3},
                      device="cpu")
    result = trainer.train()
    assert result["step"] == 60 and result["loss"] == pytest.approx(losses.values[-1])
    assert sum(losses.values[-5:]) < 0.3 * sum(losses.values[:5])
    assert isinstance(trainer.lr_scheduler.scheduler.lr_lambdas[0], Schedule)
    assert "Step 60/60:" in capsys.readouterr().out  # the default ProgressHook


# ----------------------------------------------------------------------------- a Hugging Face model
def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(cfg)


def _dict_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (n, 8), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": (ids[i, 0] >= 25).long()} for i in range(n)]


def test_hf_model_returning_loss_with_compute_metrics_on_the_full_eval_set():
    calls = []

    def metrics(predictions, labels):
        calls.append((predictions, labels))
        return {"accuracy": (predictions.argmax(-1) == labels).float().mean()}

    eval_set = _dict_data(23, seed=1)  # 23 samples: not a multiple of the batch size
    losses = Losses()
    trainer = Trainer(_bert(), train_dataloader=torch.utils.data.DataLoader(_dict_data(64, 0), batch_size=8),
                      eval_dataloader=torch.utils.data.DataLoader(eval_set, batch_size=5),
                      compute_metrics=metrics, callbacks=[losses], device="cpu",
                      config={"max_steps": 6, "eval_interval": 3, "learning_rate": 5e-3})
    result = trainer.train()
    assert len(calls) == 2  # after steps 3 and 6
    predictions, labels = calls[-1]
    assert predictions.shape == (23, 2) and predictions.dtype == torch.float32
    full = torch.utils.data.default_collate(eval_set)
    assert torch.equal(labels, full["labels"])  # the whole set, in dataset order
    trainer.model.eval()
    with torch.no_grad():
        out = trainer.model(**full)
    torch.testing.assert_close(predictions, out.logits, atol=1e-5, rtol=1e-5)
    assert result["eval/loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert result["eval/accuracy"] == pytest.approx((out.logits.argmax(-1) == full["labels"]).float().mean().item())
    assert losses.values[-1] < losses.values[0]


def test_dict_batch_without_labels_names_the_criterion():
    data = [{k: v for k, v in d.items() if k != "labels"} for d in _dict_data(16, 0)]
    trainer = Trainer(_bert(), train_dataloader=torch.utils.data.DataLoader(data, batch_size=4),
                      config={"max_steps": 1}, device="cpu")
    with pytest.raises(ValueError, match=r"^criterion: the model returned no loss \(the batch has no 'labels' key\)"):
        trainer.train()


def test_tuple_batches_without_a_criterion_need_a_model_that_returns_a_loss():
    with pytest.raises(ValueError, match="^criterion: batches of 2 items need a criterion"):
        Trainer(_mlp(), train_dataloader=_loader(), config={"max_steps": 1}, device="cpu").train()

    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def forward(self, x, y):
            return nn.functional.mse_loss(self.net(x), y)

    trainer = train_model(WithLoss(), _loader(), max_steps=4, device="cpu")
    assert trainer.step == 4


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("n, batch_size, drop_last, accumulation, epochs, steps", [
    (100, 8, False, 2, 2, 13),  # 13 batches per epoch, 2 per step: ceil(2 * 13 / 2)
    (100, 8, True, 1, 1.5, 18),  # 12 full batches per epoch
    (64, 8, False, 3, 1, 3),  # ceil(8 / 3)
])
def test_epochs_become_steps(n, batch_size, drop_last, accumulation, epochs, steps):
    loader = _loader(n, batch_size, drop_last=drop_last, shuffle=True)
    trainer = Trainer(_mlp(), train_dataloader=loader, criterion=nn.MSELoss(), device="cpu",
                      config={"epochs": epochs, "gradient_accumulation_steps": accumulation})
    assert trainer.max_steps == steps
    trainer.train()
    assert trainer.step == steps


def test_eval_runs_every_epoch_and_early_stopping_and_checkpoints_are_wired(tmp_path):
    eval_loader = _loader(23, 5)
    trainer = Trainer(_mlp(), train_dataloader=_loader(), eval_dataloader=eval_loader, criterion=nn.MSELoss(),
                      device="cpu", config={"epochs": 2, "output_dir": str(tmp_path), "patience": 5})
    trainer.train()
    evaluation = next(h for h in trainer.hooks if type(h).__name__ == "EvaluationHook")
    assert [step for step, _ in evaluation.history] == [8, 16]
    assert any(isinstance(h, EarlyStoppingHook) for h in trainer.hooks)
    assert any(isinstance(h, CheckpointingHook) for h in trainer.hooks)
    assert (run_step_dir(tmp_path, 16) / "manifest.json").is_file()


def test_seed_aliases_map_to_the_config():
    cfg = make_config({"max_epochs": 1, "lr": 0.01, "grad_clip_norm": 0, "bf16": True, "min_lr": 1e-3,
                       "scheduler_type": "cosine_restart", "t_0": 5, "accumulate_grad_batches": 2,
                       "logging_steps": 7})
    assert cfg == TrainerConfig(epochs=1, learning_rate=0.01, max_grad_norm=None, mixed_precision="bf16",
                                min_lr_ratio=pytest.approx(0.1), scheduler="cosine_restarts",
                                scheduler_kwargs={"t_0": 5}, gradient_accumulation_steps=2, log_interval=7)
    assert make_config({"max_steps": 3, "precision": "16"}).mixed_precision == "fp16"


@pytest.mark.parametrize("config, kwargs, match", [
    ({"max_stepz": 5}, {}, r"^config: unknown key 'max_stepz' \(did you mean 'max_steps'\?\)"),
    ({"max_steps": 5, "epochs": 1}, {}, "^config: give exactly one of max_steps and epochs"),
    ({}, {}, "^config: give exactly one of max_steps and epochs"),
    ({"max_steps": 5, "lr": 0.1, "learning_rate": 0.2}, {}, "^config: 'learning_rate' sets learning_rate"),
    ({"max_steps": 5, "scheduler": "cosinus"}, {}, "^name: unknown schedule 'cosinus'"),
    ({"max_steps": 5, "scheduler": "cosine_restarts"}, {}, "^t_0"),
    ({"max_steps": 5, "precision": "8"}, {}, "^config: precision must be"),
    ({"max_steps": 5}, {"colour": "red"}, "^colour: not a Trainer argument nor a config key"),
    ({"max_steps": 5, "patience": 2}, {}, "^early_stopping_patience: needs an eval_dataloader"),
])
def test_bad_config_names_the_key(config, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Trainer(_mlp(), train_dataloader=_loader(), criterion=nn.MSELoss(), config=config, device="cpu", **kwargs)


# ----------------------------------------------------------------------------- optimizer
def test_optimizer_instance_factory_or_default():
    model = _mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    t = Trainer(model, train_dataloader=_loader(), criterion=nn.MSELoss(), optimizer=sgd, device="cpu",
                config={"max_steps": 2, "scheduler": "constant"})
    t.train()
    assert t.unwrapped_optimizer is sgd and t.step_info["lr"] == [0.05]

    t = Trainer(_mlp(), train_dataloader=_loader(), criterion=nn.MSELoss(), device="cpu",
                optimizer=functools.partial(torch.optim.SGD, lr=0.02, momentum=0.9), config={"max_steps": 1})
    t.train()
    assert isinstance(t.unwrapped_optimizer, torch.optim.SGD) and t.unwrapped_optimizer.defaults["momentum"] == 0.9

    t = Trainer(_mlp(), train_dataloader=_loader(), criterion=nn.MSELoss(), device="cpu",
                config={"max_steps": 1, "weight_decay": 0.1, "learning_rate": 3e-3})
    t.train()
    groups = t.unwrapped_optimizer.param_groups
    assert isinstance(t.unwrapped_optimizer, torch.optim.AdamW)
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(2, 0.1), (2, 0.0)]  # matrices / biases

    with pytest.raises(ValueError, match="^optimizer: it holds parameters that are not the model's"):
        Trainer(_mlp(), train_dataloader=_loader(), criterion=nn.MSELoss(), device="cpu", config={"max_steps": 1},
                optimizer=torch.optim.SGD(_mlp().parameters(), lr=0.1)).train()
    with pytest.raises(ValueError, match="^optimizer: expected an Optimizer"):
        Trainer(_mlp(), train_dataloader=_loader(), criterion=nn.MSELoss(), device="cpu", config={"max_steps": 1},
                optimizer="adam").train()


def test_train_model_splits_config_keys_and_trainer_arguments():
    trainer = train_model(_mlp(), _loader(), criterion=nn.MSELoss(), max_epochs=2, lr=1e-2, device="cpu")
    assert trainer.config.epochs == 2 and trainer.config.learning_rate == 1e-2
    assert trainer.step == 16
