"""acceltrain.checkpoint and CheckpointingHook: validation, corruption, safe loading, retention."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import pytest

from acceltrain import BaseTrainer, CheckpointingHook
from acceltrain.checkpoint import (
    CheckpointError,
    _write_manifest,
    find_latest_checkpoint,
    load_checkpoint,
    verify_checkpoint,
)
from tests.helpers import (
    BEST,
    ToyTrainer,
    ckpt_root,
    link_step,
    run_step_dir,
    saved_steps,
    step_dir,
    step_folder_name,
    tmp_folder_name,
)


def _train(tmp_path: Path, steps: int, **hook_kwargs) -> ToyTrainer:
    hook_kwargs.setdefault("interval", 1)
    hook_kwargs.setdefault("keep_previous", None)
    hook = CheckpointingHook(exit_signals=[], **hook_kwargs)
    t = ToyTrainer(max_steps=steps, optimizer="adamw", device="cpu", workspace=tmp_path, hooks=[hook])
    t.train()
    return t


def test_folder_layout_and_manifest(tmp_path):
    _train(tmp_path, 2)
    folder = run_step_dir(tmp_path, 2)
    manifest = verify_checkpoint(folder)
    assert manifest["step"] == 2 and manifest["world_size"] == 1
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.pt", "trainer_state.pt", "rank_state_0.pt"}
    assert {"torch", "accelerate", "transformers", "acceltrain"} <= set(manifest["versions"])


def test_truncated_file_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    _train(tmp_path, 3)
    root = ckpt_root(tmp_path)
    victim = step_dir(root, 3) / "optimizer.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="acceltrain"):
        assert find_latest_checkpoint(root) == step_dir(root, 2)
    assert str(victim) in caplog.text and "truncated" in caplog.text


def test_altered_file_of_same_size_is_detected(tmp_path):
    _train(tmp_path, 1)
    folder = run_step_dir(tmp_path, 1)
    victim = folder / "model.safetensors"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: CRC32 differs"):
        verify_checkpoint(folder)


def test_explicit_load_of_corrupt_checkpoint_is_an_error_naming_the_file(tmp_path):
    _train(tmp_path, 2)
    folder = run_step_dir(tmp_path, 2)
    (folder / "trainer_state.pt").write_bytes(b"garbage")
    hook = CheckpointingHook(load=folder, exit_signals=[])
    t = ToyTrainer(max_steps=3, optimizer="adamw", device="cpu", workspace=tmp_path / "other", hooks=[hook])
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt"):
        t.train()


@pytest.mark.parametrize("load", ["latest", "explicit"])
def test_resume_reads_each_file_for_its_checksum_once(tmp_path, monkeypatch, load):
    import acceltrain.checkpoint as ckpt

    _train(tmp_path, 2)
    folder = run_step_dir(tmp_path, 2)
    read = []
    real = ckpt._crc32
    monkeypatch.setattr(ckpt, "_crc32", lambda path: read.append(path.name) or real(path))
    hook = CheckpointingHook(load="latest" if load == "latest" else folder, exit_signals=[], interval=100)
    t = ToyTrainer(max_steps=2, optimizer="adamw", device="cpu", workspace=tmp_path, hooks=[hook])
    t.train()
    assert hook.loaded_from == folder and t.step == 2
    assert sorted(read) == sorted(json.loads((folder / "manifest.json").read_text())["files"])


def test_missing_load_path_is_an_error(tmp_path):
    hook = CheckpointingHook(load=tmp_path / "nope", exit_signals=[])
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        ToyTrainer(max_steps=1, device="cpu", hooks=[hook]).train()


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_never_executed(tmp_path):
    _train(tmp_path, 1)
    folder = run_step_dir(tmp_path, 1)
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    (folder / "trainer_state.pt").write_bytes(pickle.dumps({"step": payload}))
    _write_manifest(folder, 1, 1, {})  # a "valid" manifest: the attack passes the size/CRC checks
    t = ToyTrainer(max_steps=2, device="cpu", optimizer="adamw")
    t.build()
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt: cannot be loaded safely"):
        load_checkpoint(t, folder)
    assert not marker.exists()


def test_stale_temporary_folder_is_removed(tmp_path):
    _train(tmp_path, 1)
    stale = ckpt_root(tmp_path) / tmp_folder_name(7)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert find_latest_checkpoint(ckpt_root(tmp_path)).name == step_folder_name(1)
    assert not stale.exists()


def _as_if_saved_by(folder: Path, world: int, batch: tuple[int, int] | None) -> None:
    """Rewrite the manifest as if ``world`` processes saved it with (micro-batch, accumulation); the
    ranks it adds get rank 0's per-rank file (every saved rank wrote one)."""
    import shutil

    for rank in range(1, world):
        shutil.copyfile(folder / "rank_state_0.pt", folder / f"rank_state_{rank}.pt")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["world_size"] = world
    if batch is None:
        del manifest["batch"]  # a checkpoint from before elastic resume
    else:
        manifest["batch"] = {"micro_batch": batch[0], "accumulation": batch[1], "global_batch": batch[0] * batch[1] * world}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_world_size_change_keeps_the_global_batch_by_accumulation(tmp_path, caplog):
    _train(tmp_path, 1)
    folder = run_step_dir(tmp_path, 1)
    assert json.loads((folder / "manifest.json").read_text())["batch"] == {
        "micro_batch": 8, "accumulation": 1, "global_batch": 8}
    _as_if_saved_by(folder, 2, (8, 1))
    t = ToyTrainer(max_steps=2, device="cpu", optimizer="adamw")
    t.build()
    with caplog.at_level("WARNING", logger="acceltrain"):
        load_checkpoint(t, folder)
    assert t.gradient_accumulation_steps == 2 and t.step == 1
    assert ("resumed on 1 process from a 2-process checkpoint at step 1: accumulation 1 -> 2, same 16 samples "
            "per step") in caplog.messages


def test_world_size_change_that_cannot_keep_the_global_batch_is_refused(tmp_path):
    _train(tmp_path, 1)
    folder = run_step_dir(tmp_path, 1)
    _as_if_saved_by(folder, 2, (6, 3))  # 36 samples per step: no multiple of this run's 8 per micro-step
    t = ToyTrainer(max_steps=2, device="cpu", optimizer="adamw")
    t.build()
    with pytest.raises(CheckpointError, match=r"saved with 36 samples per step \(6 per process x accumulation 3 x 2 "
                                              r"processes\); on 1 process with micro-batch 8 .*this run would use 8"):
        load_checkpoint(t, folder)
    assert t.step == 0 and t.gradient_accumulation_steps == 1
    t.allow_global_batch_change = True
    load_checkpoint(t, folder)
    assert t.step == 1 and t.gradient_accumulation_steps == 1


def test_world_size_change_without_a_recorded_batch_is_refused(tmp_path):
    _train(tmp_path, 1)
    folder = run_step_dir(tmp_path, 1)
    _as_if_saved_by(folder, 2, None)
    t = ToyTrainer(max_steps=2, device="cpu", optimizer="adamw")
    t.build()
    with pytest.raises(CheckpointError, match="saved by 2 processes, this run has 1; the checkpoint does not record "
                                              "its samples per step.*resume with 2 processes"):
        load_checkpoint(t, folder)


def test_keep_previous_and_keep_interval_after_20_steps(tmp_path):
    _train(tmp_path, 20, keep_previous=2, keep_interval=5)
    assert saved_steps(ckpt_root(tmp_path)) == [5, 10, 15, 19, 20]


def test_keep_best_by_metric_after_20_steps(tmp_path):
    scripted = {s: abs(s - 7) + 0.5 * (s > 7) for s in range(1, 21)}  # best: 7 (0.0), then 6 (1.0)

    class Metric(CheckpointingHook):
        def on_after_step(self, trainer):
            trainer.log({"eval": {"loss": scripted[trainer.step]}})
            super().on_after_step(trainer)

    hook = Metric(interval=1, keep_previous=1, keep_best=2, metric="eval/loss", mode="min", exit_signals=[])
    ToyTrainer(max_steps=20, device="cpu", workspace=tmp_path, hooks=[hook]).train()
    root = ckpt_root(tmp_path)
    assert saved_steps(root) == [6, 7, 20]
    assert link_step(root, BEST) == 7
    assert json.loads((step_dir(root, 7) / "manifest.json").read_text())["metrics"] == {"eval/loss": 0.0}


def test_bad_hook_arguments():
    with pytest.raises(ValueError, match="keep_best needs"):
        CheckpointingHook(keep_best=2)
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        CheckpointingHook(keep_best=1, metric="m", mode="low")
    with pytest.raises(ValueError, match="interval must be >= 1"):
        CheckpointingHook(interval=0)


def test_save_pretrained_hf_model_and_lora_adapter_load_without_acceltrain(tmp_path):
    import subprocess
    import sys

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from acceltrain import BaseTrainer

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)

    class LM(BaseTrainer):
        def __init__(self, lora, **kw):
            super().__init__(**kw)
            self.lora = lora

        def build_data_loader(self):
            ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(0))
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)

        def build_model(self):
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg)
            if self.lora:
                model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
            return model

        def build_optimizer(self):
            return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-2)

        def forward(self, input):
            (ids,) = input
            return self.model(input_ids=ids, labels=ids).loss, {}

    full = LM(False, max_steps=3, device="cpu")
    full.train()
    full.save_pretrained(tmp_path / "full")
    lora = LM(True, max_steps=3, device="cpu")
    lora.train()
    lora.save_pretrained(tmp_path / "lora")
    lora.save_pretrained(tmp_path / "merged", merge_lora=True)
    probe = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        want = {"full": full.unwrapped_model(probe).logits, "lora": lora.unwrapped_model(probe).logits}
    torch.save(want, tmp_path / "want.pt")
    base = tmp_path / "base"
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(base)  # the same initial weights the LoRA run started from
    check = f"""
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
assert 'acceltrain' not in sys.modules
want = torch.load(r'{tmp_path / "want.pt"}')
probe = torch.arange(10).unsqueeze(0)
full = AutoModelForCausalLM.from_pretrained(r'{tmp_path / "full"}')
torch.testing.assert_close(full(probe).logits, want['full'], atol=1e-5, rtol=0)
lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(r'{base}'), r'{tmp_path / "lora"}')
torch.testing.assert_close(lora(probe).logits, want['lora'], atol=1e-5, rtol=0)
merged = AutoModelForCausalLM.from_pretrained(r'{tmp_path / "merged"}')
torch.testing.assert_close(merged(probe).logits, want['lora'], atol=1e-5, rtol=0)
print('ok')
"""
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_signal_handlers_are_restored_after_training(tmp_path):
    import signal

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGUSR1, mine)
    try:
        hook = CheckpointingHook(interval=1, exit_signals=[signal.SIGTERM, signal.SIGUSR1])
        seen = {}

        class Peek(CheckpointingHook):
            def on_after_step(self, trainer):
                seen["during"] = signal.getsignal(signal.SIGUSR1)

        ToyTrainer(max_steps=1, device="cpu", workspace=tmp_path, hooks=[hook, Peek(exit_signals=[], load=None)]).train()
        assert seen["during"] is not mine  # ours while training
        assert signal.getsignal(signal.SIGUSR1) is mine and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_handlers_are_restored_when_training_raises(tmp_path):
    import signal

    class Boom(ToyTrainer):
        def forward(self, input):
            raise RuntimeError("boom")

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(RuntimeError, match="boom"):
        Boom(max_steps=2, device="cpu", workspace=tmp_path, hooks=[CheckpointingHook(interval=1)]).train()
    assert signal.getsignal(signal.SIGINT) is before


class _LoraLM(BaseTrainer):
    """A tiny Llama with LoRA adapters: only the adapters train."""

    def __init__(self, layers=2, hooks=(), **kw):
        super().__init__(**kw)
        self.layers, self._hooks = layers, list(hooks)

    def build_hooks(self):
        return self._hooks

    def build_data_loader(self):
        import torch

        ids = torch.randint(0, 64, (32, 12), generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4, shuffle=True)

    def build_model(self):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=self.layers, num_attention_heads=4,
                                            num_key_value_heads=2, max_position_embeddings=32))
        return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))

    def build_optimizer(self):
        import torch

        return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-2)

    def forward(self, input):
        (ids,) = input
        return self.model(input_ids=ids, labels=ids).loss, {}


def test_lora_checkpoints_hold_only_what_trains_and_resume_exactly(tmp_path):
    import torch
    from safetensors.torch import load_file

    full = _LoraLM(max_steps=4, device="cpu")
    full.train()
    hook = CheckpointingHook(interval=2, keep_previous=None, exit_signals=[])
    _LoraLM(max_steps=2, device="cpu", workspace=tmp_path, hooks=[hook]).train()
    folder = run_step_dir(tmp_path, 2)
    saved = load_file(folder / "model.safetensors")
    trainable = {n for n, p in full.unwrapped_model.named_parameters() if p.requires_grad}
    assert set(saved) - {n for n, _ in full.unwrapped_model.named_buffers()} == trainable
    assert all("lora_" in n for n in trainable) and len(trainable) == 2 * 2 * 2  # 2 layers x q,v x A,B
    assert (folder / "model.safetensors").stat().st_size < 20_000  # the adapters, not the base
    resumed = _LoraLM(max_steps=4, device="cpu", workspace=tmp_path,
                      hooks=[CheckpointingHook(interval=2, keep_previous=None, exit_signals=[])])
    resumed.train()
    for (name, a), b in zip(full.unwrapped_model.state_dict().items(), resumed.unwrapped_model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    other = _LoraLM(layers=3, max_steps=4, device="cpu")
    other.build()
    with pytest.raises(CheckpointError, match="this run.s frozen parameters differ from that run.s"):
        load_checkpoint(other, folder)


def _fake_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> Path:
    """`scontrol` on PATH that appends its argv to a file; with ``fail`` it complains and exits 1."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    body = 'echo "scontrol: error: Unable to contact slurm controller" >&2\nexit 1\n' if fail else "exit 0\n"
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\n{body}')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    return calls


def _signalled_run(tmp_path: Path, signum: int, **hook_kwargs) -> tuple[CheckpointingHook, int]:
    """Train 4 steps with ``signum`` sent to this process after step 2; returns the hook and exit status."""
    from acceltrain import BaseHook

    class SignalAfterStep2(BaseHook):
        def on_after_step(self, trainer):
            if trainer.step == 2:
                os.kill(os.getpid(), signum)

    hook = CheckpointingHook(interval=100, requeue=True, **hook_kwargs)
    with pytest.raises(SystemExit) as exit_info:
        ToyTrainer(max_steps=4, device="cpu", workspace=tmp_path, hooks=[SignalAfterStep2(), hook]).train()
    assert link_step(ckpt_root(tmp_path)) == 2  # saved anyway
    return hook, exit_info.value.code


def test_usr1_under_slurm_requeues_the_job_once(tmp_path, monkeypatch):
    import signal

    calls = _fake_scontrol(tmp_path, monkeypatch)
    hook, code = _signalled_run(tmp_path, signal.SIGUSR1)
    assert calls.read_text().splitlines() == ["requeue 4242"]
    assert hook.requeued is True and code == 128 + signal.SIGUSR1


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_term_and_int_under_slurm_save_and_exit_without_requeueing(tmp_path, monkeypatch, caplog, name):
    import signal

    signum = signal.Signals[name]
    calls = _fake_scontrol(tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="acceltrain"):
        hook, code = _signalled_run(tmp_path, signum)
    assert not calls.exists() and hook.requeued is None and code == 128 + signum
    assert f"{name}: saved step 2, not requeueing (only SIGUSR1 requeues the job)" in caplog.text


def test_the_requeue_signal_is_configurable(tmp_path, monkeypatch):
    import signal

    calls = _fake_scontrol(tmp_path, monkeypatch)
    hook, code = _signalled_run(tmp_path, signal.SIGTERM, requeue_signal=signal.SIGTERM)
    assert calls.read_text().splitlines() == ["requeue 4242"] and hook.requeued is True
    with pytest.raises(ValueError, match="requeue_signal must be a signal number"):
        CheckpointingHook(requeue_signal=100000)


def test_a_failing_scontrol_is_reported_not_taken_for_a_requeue(tmp_path, monkeypatch, caplog):
    import signal

    calls = _fake_scontrol(tmp_path, monkeypatch, fail=True)
    with caplog.at_level(logging.WARNING, logger="acceltrain"):
        hook, code = _signalled_run(tmp_path, signal.SIGUSR1)
    assert calls.read_text().splitlines() == ["requeue 4242"]
    assert hook.requeued is False and code == 128 + signal.SIGUSR1
    failure, = (r.getMessage() for r in caplog.records if "failed" in r.getMessage())
    assert failure.startswith("scontrol requeue 4242 failed (exit 1: scontrol: error: Unable to contact slurm "
                              "controller): the job is NOT requeued")


def test_a_missing_scontrol_is_reported(tmp_path, monkeypatch, caplog):
    import signal

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with caplog.at_level(logging.WARNING, logger="acceltrain"):
        hook, _ = _signalled_run(tmp_path, signal.SIGUSR1)
    assert hook.requeued is False
    assert "scontrol requeue 4242 failed (exit none: " in caplog.text and "NOT requeued" in caplog.text
