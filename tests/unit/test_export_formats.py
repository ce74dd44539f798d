"""ONNX, TorchScript and torch.export files of a tiny Llama and a tiny BERT classifier reproduce
PyTorch's logits (1e-4) at a batch size and sequence length other than the exported ones."""

from __future__ import annotations

import pytest
import torch

from acceltrain.export_formats import (
    ExportError,
    LogitsOnly,
    example_inputs,
    export_onnx,
    export_program,
    export_torchscript,
    trace_program,
)

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


@pytest.fixture(scope="module")
def bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=4, intermediate_size=64,
                                                    max_position_embeddings=64, num_labels=3)).eval()


def _reference(model, ids, mask):
    with torch.no_grad():
        kwargs = {"use_cache": False} if hasattr(model.config, "use_cache") and model.config.use_cache is not None else {}
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


@pytest.fixture(scope="module", params=["llama", "bert"])
def exported(request, tmp_path_factory):
    """Each model written once per module in every format: one ``torch.export`` trace, saved as the
    ``.pt2`` file and translated to ONNX; TorchScript by tracing. The tests below read the files."""
    name = request.param
    model = request.getfixturevalue(name)
    folder = tmp_path_factory.mktemp(name)
    program = trace_program(model)
    reports = {"pt2": export_program(model, folder / f"{name}.pt2", program=program),
               "onnx": export_onnx(model, folder / f"{name}.onnx", benchmark=True, benchmark_repeats=1,
                                   program=program),
               "ts": export_torchscript(model, folder / f"{name}.pt", mode="auto")}
    return name, model, folder, reports


def test_onnx_in_onnxruntime_matches_pytorch_at_new_shapes(exported):
    import onnx
    import onnxruntime as ort

    name, model, folder, reports = exported
    report = reports["onnx"]
    assert report["max_abs_diff"] <= 1e-4 and report["opset_version"] >= 18 and report["file_size_mb"] > 0
    assert set(report["benchmark"]) == {"pytorch_ms", "export_ms", "speedup"}
    graph = onnx.load(str(folder / f"{name}.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"] and [o.name for o in graph.output] == ["logits"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert all(isinstance(d, str) for d in dims)  # both axes symbolic (dynamic)
    session = ort.InferenceSession(str(folder / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    for shape in ((1, 5), (4, 11)):  # neither is the export's (2, 8)
        ids, mask = example_inputs(96, *shape, seed=7, pad_last=True)
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        want = _reference(model, ids, mask)
        assert got.shape == tuple(want.shape)
        torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=0)


def test_torchscript_and_torch_export_match_pytorch_at_new_shapes(exported):
    name, model, folder, reports = exported
    ts = reports["ts"]
    assert ts["mode"] == "trace" and ts["max_abs_diff"] <= 1e-4
    pt2 = reports["pt2"]
    assert pt2["max_abs_diff"] <= 1e-4
    scripted = torch.jit.load(str(folder / f"{name}.pt"))
    program = torch.export.load(str(folder / f"{name}.pt2")).module()
    ids, mask = example_inputs(96, 4, 11, seed=7, pad_last=True)
    want = _reference(model, ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(scripted(ids, mask), want, atol=1e-4, rtol=0)
        torch.testing.assert_close(program(ids, mask), want, atol=1e-4, rtol=0)


class _ShapeBranch(torch.nn.Module):
    """Data-dependent control flow: tracing bakes in the branch of the example's length."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        return x * 2 if input_ids.shape[1] > 8 else x


def test_a_trace_that_does_not_generalise_is_an_error(tmp_path):
    with pytest.raises(ExportError, match=r"outputs differ from PyTorch by .* on inputs of shape \(3, 13\)"):
        export_torchscript(_ShapeBranch(), tmp_path / "m.pt", mode="trace", vocab_size=10)
    report = export_torchscript(_ShapeBranch(), tmp_path / "s.pt", mode="script", vocab_size=10)
    assert report["mode"] == "script" and report["max_abs_diff"] == 0.0


def test_logits_only_and_inputs():
    wrapper = LogitsOnly(_ShapeBranch())
    ids, mask = example_inputs(10, 2, 6, pad_last=True)
    assert wrapper(ids, mask).shape == (2, 6, 4) and mask[0].tolist() == [1, 1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="vocab_size: the model has no config.vocab_size"):
        export_program(_ShapeBranch(), "unused.pt2")
    with pytest.raises(ValueError, match="mode must be 'auto', 'trace' or 'script', got 'x'"):
        export_torchscript(_ShapeBranch(), "unused.pt", mode="x", vocab_size=10)
