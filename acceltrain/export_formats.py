"""Inference exports beside the Hugging Face folder: ONNX, TorchScript and ``torch.export`` programs.

Each export takes a model (a ``transformers`` model or any ``nn.Module`` taking token ids),
writes one file whose single output is the logits, checks it by running the file (in
``onnxruntime``, or loaded back with ``torch.jit.load`` / ``torch.export.load``) on a batch
size and sequence length *other* than the ones it was exported with, and returns a report
dict with the largest absolute difference to the PyTorch logits. Batch and sequence axes are
dynamic.

- ONNX: ``torch.onnx.export(..., dynamo=True)`` (the ``torch.export``-based exporter; opset
  >= 18) run with ``onnxruntime`` (``pip install 'acceltrain[onnx]'``).
- TorchScript: ``torch.jit.trace`` (``mode="trace"``), ``torch.jit.script`` (``"script"``),
  or trace with a fall back to script (``"auto"``).
- ``torch.export``: ``torch.export.export`` + ``torch.export.save`` (a ``.pt2`` file).

Example:
    >>> report = export_onnx(model, "model.onnx")
    >>> report["max_abs_diff"] < 1e-4
    True
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["LogitsOnly", "ExportError", "export_onnx", "export_torchscript", "export_program", "trace_program",
           "example_inputs"]

logger = logging.getLogger("acceltrain")
_MIN_DYNAMO_OPSET = 18


class ExportError(RuntimeError):
    """The exported file did not reproduce the PyTorch outputs (or could not be written)."""


class LogitsOnly(torch.nn.Module):
    """``model(input_ids, attention_mask) -> logits``: one tensor out, no KV cache, no loss."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.takes_mask = "attention_mask" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
        self.hf = hasattr(model, "config") and hasattr(model.config, "to_dict")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.hf:
            kwargs: dict[str, Any] = {"attention_mask": attention_mask}
            if getattr(self.model.config, "use_cache", None) is not None:
                kwargs["use_cache"] = False
            out = self.model(input_ids=input_ids, **kwargs)
        else:
            out = self.model(input_ids, attention_mask) if self.takes_mask else self.model(input_ids)
        if hasattr(out, "logits"):
            return out.logits
        return out[0] if isinstance(out, (tuple, list)) else out


class _IdsOnly(torch.nn.Module):
    """What ``torch.jit.script`` compiles for a plain model taking ids (LogitsOnly's kwargs are not scriptable)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)


class _IdsAndMask(_IdsOnly):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask)


def _script(wrapper: LogitsOnly) -> torch.jit.ScriptModule:
    if wrapper.hf:
        raise ExportError("torch.jit.script: Hugging Face models are not scriptable; use mode='trace' (or 'auto')")
    return torch.jit.script((_IdsAndMask if wrapper.takes_mask else _IdsOnly)(wrapper.model))


def _vocab_size(model: torch.nn.Module, vocab_size: int | None) -> int:
    size = vocab_size or getattr(getattr(model, "config", None), "vocab_size", None)
    if not size:
        raise ValueError("vocab_size: the model has no config.vocab_size; pass vocab_size=")
    return int(size)


def example_inputs(vocab_size: int, batch: int, seq: int, *, seed: int = 0,
                   pad_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of shape ``(batch, seq)``; ``pad_last`` masks the tail of row 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad_last and seq > 2:
        mask[0, seq - seq // 3:] = 0  # right padding: the masked positions still get logits
    return ids, mask


def _dynamic_shapes(max_seq_len: int) -> dict[str, dict[int, Any]]:
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("sequence", min=2, max=max(3, max_seq_len))
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}


def _prepare(model: torch.nn.Module, vocab_size: int | None) -> tuple[LogitsOnly, int]:
    return LogitsOnly(model).eval(), _vocab_size(model, vocab_size)


def _max_len(model: torch.nn.Module, max_seq_len: int) -> int:
    # A dynamic axis longer than the position table fails torch.export's shape constraints.
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(max_seq_len, positions) if positions else max_seq_len


def _check(run: Callable[[torch.Tensor, torch.Tensor], Any], wrapper: LogitsOnly, vocab: int, shape: tuple[int, int],
           atol: float, what: str) -> float:
    ids, mask = example_inputs(vocab, *shape, seed=1, pad_last=True)
    with torch.no_grad():
        ref = wrapper(ids, mask).float()
    got = torch.as_tensor(run(ids, mask)).float()
    if got.shape != ref.shape:
        raise ExportError(f"{what}: output shape {tuple(got.shape)} for inputs {shape}, PyTorch gives {tuple(ref.shape)}")
    diff = float((got - ref).abs().max())
    if not diff <= atol:
        raise ExportError(f"{what}: outputs differ from PyTorch by {diff:.3g} (> {atol}) on inputs of shape {shape}")
    return diff


def _benchmark(run: Callable[[], Any], reference: Callable[[], Any], repeats: int) -> dict[str, float]:
    def timed(fn: Callable[[], Any]) -> float:
        fn()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats * 1000

    with torch.no_grad():
        torch_ms, export_ms = timed(reference), timed(run)
    return {"pytorch_ms": torch_ms, "export_ms": export_ms, "speedup": torch_ms / export_ms}


def _report(path: Path, **extra: Any) -> dict[str, Any]:
    return {"output_path": str(path), "file_size_mb": path.stat().st_size / 2**20, **extra}


def export_onnx(model: torch.nn.Module, path: str | Path, *, vocab_size: int | None = None, max_seq_len: int = 512,
                example_shape: tuple[int, int] = (2, 8), check_shape: tuple[int, int] = (3, 13),
                opset_version: int = _MIN_DYNAMO_OPSET, dynamic_axes: bool = True, optimize: bool = True,
                validate: bool = True, atol: float = 1e-4, benchmark: bool = False,
                benchmark_repeats: int = 20, program: torch.export.ExportedProgram | None = None) -> dict[str, Any]:
    """Write ``model`` as ONNX (inputs ``input_ids``, ``attention_mask``; output ``logits``).

    Args:
        model: A model taking token ids (and an attention mask).
        path: The ``.onnx`` file.
        vocab_size: For the example ids (default ``model.config.vocab_size``).
        max_seq_len: Largest sequence length the dynamic axis allows.
        example_shape: ``(batch, seq)`` traced with.
        check_shape: ``(batch, seq)`` checked with, in onnxruntime (must differ to test the dynamic axes).
        opset_version: Below 18 is raised to 18 (what the dynamo exporter writes), with a log line.
        dynamic_axes: Batch and sequence dynamic (else the example shape is fixed).
        optimize: onnxscript's graph optimisation passes.
        validate: Run the file in onnxruntime and compare with PyTorch (``ExportError`` beyond ``atol``).
        benchmark: Also time PyTorch and onnxruntime on ``check_shape`` (``report["benchmark"]``).
        program: ``model``'s :func:`trace_program` if you have it (then ``max_seq_len``,
            ``example_shape`` and ``dynamic_axes`` are the program's): the ONNX exporter starts from
            it instead of running ``torch.export`` again, e.g. when writing a ``.pt2`` file too.

    Returns:
        ``{"output_path", "file_size_mb", "opset_version", "max_abs_diff" (validate),
        "benchmark": {"pytorch_ms", "export_ms", "speedup"} (benchmark)}``.
    """
    wrapper, vocab = _prepare(model, vocab_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if opset_version < _MIN_DYNAMO_OPSET:
        logger.info("ONNX opset %d -> %d: the dynamo exporter writes opset >= %d", opset_version, _MIN_DYNAMO_OPSET,
                    _MIN_DYNAMO_OPSET)
        opset_version = _MIN_DYNAMO_OPSET
    args = example_inputs(vocab, *example_shape)
    if program is not None:
        dynamic_axes = True  # trace_program's axes
        onnx_program = torch.onnx.export(program, args, dynamo=True, input_names=["input_ids", "attention_mask"],
                                         output_names=["logits"], opset_version=opset_version, optimize=optimize,
                                         verbose=False)
    else:
        onnx_program = torch.onnx.export(
            wrapper, args, dynamo=True, input_names=["input_ids", "attention_mask"], output_names=["logits"],
            opset_version=opset_version, optimize=optimize,
            dynamic_shapes=_dynamic_shapes(_max_len(model, max_seq_len)) if dynamic_axes else None, verbose=False)
    onnx_program.save(str(path))
    report = _report(path, opset_version=opset_version)
    if validate or benchmark:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(ids: torch.Tensor, mask: torch.Tensor) -> Any:
            return session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]

        shape = check_shape if dynamic_axes else example_shape
        if validate:
            report["max_abs_diff"] = _check(run, wrapper, vocab, shape, atol, f"{path} (onnxruntime)")
        if benchmark:
            ids, mask = example_inputs(vocab, *shape, seed=2)
            report["benchmark"] = _benchmark(lambda: run(ids, mask), lambda: wrapper(ids, mask), benchmark_repeats)
    return report


def export_torchscript(model: torch.nn.Module, path: str | Path, *, vocab_size: int | None = None,
                       mode: str = "auto", example_shape: tuple[int, int] = (2, 8),
                       check_shape: tuple[int, int] = (3, 13), validate: bool = True, atol: float = 1e-4,
                       benchmark: bool = False, benchmark_repeats: int = 20) -> dict[str, Any]:
    """Write ``model`` as TorchScript (``torch.jit.save``); loaded back with ``torch.jit.load`` to check.

    ``mode``: ``"trace"``, ``"script"`` or ``"auto"`` (trace, and script if tracing fails).
    Returns ``{"output_path", "file_size_mb", "mode", "max_abs_diff", "benchmark"}`` as :func:`export_onnx`.
    """
    if mode not in ("auto", "trace", "script"):
        raise ValueError(f"mode must be 'auto', 'trace' or 'script', got {mode!r}")
    wrapper, vocab = _prepare(model, vocab_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = example_inputs(vocab, *example_shape)
    used = mode
    with torch.no_grad():
        if mode in ("auto", "trace"):
            try:
                module = torch.jit.trace(wrapper, args, strict=False, check_trace=False)
                used = "trace"
            except Exception as e:  # tracing is best effort (data-dependent control flow): fall back
                if mode == "trace":
                    raise ExportError(f"torch.jit.trace failed: {str(e).splitlines()[0]}") from e
                logger.info("TorchScript: tracing failed (%s), scripting instead", str(e).splitlines()[0])
                used = "script"
        if used == "script":
            module = _script(wrapper)
    module = torch.jit.optimize_for_inference(torch.jit.freeze(module.eval())) if used == "trace" else module
    torch.jit.save(module, str(path))
    report = _report(path, mode=used)
    loaded = torch.jit.load(str(path))
    if validate:
        with torch.no_grad():
            report["max_abs_diff"] = _check(loaded, wrapper, vocab, check_shape, atol, f"{path} (torch.jit.load)")
    if benchmark:
        ids, mask = example_inputs(vocab, *check_shape, seed=2)
        report["benchmark"] = _benchmark(lambda: loaded(ids, mask), lambda: wrapper(ids, mask), benchmark_repeats)
    return report


def trace_program(model: torch.nn.Module, *, vocab_size: int | None = None, max_seq_len: int = 512,
                  example_shape: tuple[int, int] = (2, 8)) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model(input_ids, attention_mask) -> logits`` with dynamic batch and
    sequence axes: what :func:`export_program` saves and :func:`export_onnx` translates (pass it
    to both as ``program=`` to trace the model once)."""
    wrapper, vocab = _prepare(model, vocab_size)
    return torch.export.export(wrapper, example_inputs(vocab, *example_shape),
                               dynamic_shapes=_dynamic_shapes(_max_len(model, max_seq_len)), strict=False)


def export_program(model: torch.nn.Module, path: str | Path, *, vocab_size: int | None = None,
                   max_seq_len: int = 512, example_shape: tuple[int, int] = (2, 8),
                   check_shape: tuple[int, int] = (3, 13), validate: bool = True, atol: float = 1e-4,
                   program: torch.export.ExportedProgram | None = None) -> dict[str, Any]:
    """Write ``model`` as a ``torch.export`` program (``.pt2``, dynamic batch and sequence), checked
    by ``torch.export.load(path).module()``. Returns ``{"output_path", "file_size_mb", "max_abs_diff"}``.
    ``program``: ``model``'s :func:`trace_program`, if already made (saved as it is)."""
    wrapper, vocab = _prepare(model, vocab_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if program is None:
        program = trace_program(model, vocab_size=vocab, max_seq_len=max_seq_len, example_shape=example_shape)
    torch.export.save(program, str(path))
    report = _report(path)
    if validate:
        loaded = torch.export.load(str(path)).module()
        with torch.no_grad():
            report["max_abs_diff"] = _check(loaded, wrapper, vocab, check_shape, atol, f"{path} (torch.export.load)")
    return report
