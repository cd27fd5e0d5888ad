"""``quant.embeddings``: weight-only, per-row quantized ``nn.Embedding`` tables, through every form of the model."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import qsweep
from qsweep.config import ConfigError
from qsweep.export import artifact_bytes, artifact_form, export_program, load_program
from qsweep.quant.embedding import QuantEmbedding, quant_embeddings
from qsweep.quant.intkernel import to_int_backend

VOCAB, DIM, LENGTH = 64, 32, 8


class TinyText(nn.Module):
    """Token and position tables, mean-pooled into a classifier: what a text encoder's input end looks like."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tokens = nn.Embedding(VOCAB, DIM, padding_idx=0)
        self.positions = nn.Embedding(LENGTH, DIM)
        self.head = nn.Linear(DIM, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        return self.head(x.mean(1))


def token_ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed))


def quantized(bits: int | None = 8, w_bits: int = 8, **embeddings) -> nn.Module:
    recipe = {"weight": {"bits": w_bits, "granularity": "per_channel"}, "act": {"bits": 8},
              "embeddings": {"bits": bits, **embeddings}}
    return qsweep.quantize(TinyText(), recipe, [token_ids(16, 0)])


def test_embeddings_stay_float_unless_the_recipe_asks():
    for name in ("w8a8", "w4a8"):
        q = qsweep.quantize(TinyText(), qsweep.config.shipped_recipe(name), [token_ids(16, 0)])
        assert not quant_embeddings(q)
        assert type(q.tokens) is nn.Embedding


def test_codes_are_torchs_per_channel_quantization_of_each_row():
    q = quantized(8, observer="minmax")
    fp = TinyText()
    for name in ("tokens", "positions"):
        table = quant_embeddings(q)[name]
        w = getattr(fp, name).weight.detach()
        scale = table.qweight.scale.reshape(-1)
        torch.testing.assert_close(scale, (w.abs().amax(1) / 127.5).half().float())  # torch's symmetric min-max, float16
        ref = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(len(scale), dtype=torch.int32), 0, -128, 127)
        assert torch.equal(table.weight, ref)
        assert torch.equal(table.qweight.codes.reshape(w.shape).float() * scale[:, None], ref)


def test_a_quantized_table_looks_up_what_the_float_table_would_with_the_same_values():
    """Padding index, norm type and all: the swap changes the table's values and nothing else."""
    recipe = {"weight": {"bits": 8}, "act": {"bits": None}, "embeddings": {"bits": 4}, "skip": ["head"]}
    q = qsweep.quantize(TinyText(), recipe, [token_ids(4, 0)])
    fp = TinyText()
    with torch.no_grad():
        fp.tokens.weight.copy_(q.tokens.weight)
        fp.positions.weight.copy_(q.positions.weight)
    ids = token_ids(32, 2)
    with torch.no_grad():
        assert torch.equal(q(ids), fp(ids))
        assert torch.equal(artifact_form(q)(ids), fp(ids))
    assert not q.tokens.weight[0].any()  # the padding row is zero on any grid


def test_row_error_falls_with_bits():
    sqnr = [quant_embeddings(quantized(b))["tokens"].weight_sqnr_db for b in (2, 3, 4, 6, 8)]
    assert sqnr == sorted(sqnr) and sqnr[-1] - sqnr[0] > 30


def test_the_artifact_holds_packed_rows_and_computes_the_fake_quant_model(tmp_path):
    ids = token_ids(16, 3)
    sizes = {}
    for bits in (None, 8, 4):
        q = quantized(bits)
        with torch.no_grad():
            fake = q(ids)
            assert torch.equal(artifact_form(q, "fake")(ids), fake)
            assert torch.equal(artifact_form(q, "int")(ids), to_int_backend(q)[0](ids))
        sizes[bits] = artifact_bytes(q)
        if bits == 4:
            loaded = load_program(export_program(q, token_ids(2, 4), tmp_path / "m.pt2"))
            torch.testing.assert_close(loaded(ids), fake, rtol=0, atol=0)
    table = (VOCAB + LENGTH) * DIM
    assert sizes[None] - sizes[8] >= 3 * table - 1024  # 4 bytes a value became 1, plus a float16 scale a row
    assert sizes[8] - sizes[4] >= table // 2 - 1024


def test_the_int_backend_keeps_the_quantized_tables():
    q = quantized(8)
    int_model, _ = to_int_backend(q)
    ids = token_ids(8, 5)
    assert isinstance(int_model.tokens, QuantEmbedding)
    with torch.no_grad():
        torch.testing.assert_close(int_model.tokens(ids), q.tokens(ids), rtol=0, atol=0)


def test_onnx_gathers_from_per_row_dequantized_int8_codes(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from qsweep.onnx_export import export_onnx

    q = quantized(8)
    path = export_onnx(q, token_ids(2, 6), tmp_path / "m.onnx")
    model = onnx.load(str(path))
    tensors = {t.name: t for t in model.graph.initializer}
    codes = tensors["tokens.weight_quantized"]
    assert codes.data_type == onnx.TensorProto.INT8
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(codes).astype(np.int16),
                                  q.tokens.qweight.codes.reshape(VOCAB, DIM).numpy())
    (node,) = [n for n in model.graph.node if n.name == "tokens.weight_dequantize"]
    assert [a.i for a in node.attribute if a.name == "axis"] == [0]
    ids = token_ids(12, 7)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    with torch.no_grad():
        fake = q(ids)
    torch.testing.assert_close(torch.from_numpy(y), fake, rtol=1e-2, atol=0.05 * float(fake.abs().max()))


def test_tables_qsweep_cannot_reproduce_stay_float_with_a_warning(caplog):
    model = TinyText()
    model.positions = nn.Embedding(LENGTH, DIM, max_norm=1.0)
    recipe = {"weight": {"bits": 8}, "embeddings": {"bits": 8}}
    with caplog.at_level(logging.WARNING, logger="qsweep"):
        q = qsweep.quantize(model, recipe, [token_ids(4, 0)])
    assert type(q.positions) is nn.Embedding and isinstance(q.tokens, QuantEmbedding)
    assert "positions" in caplog.text and "max_norm" in caplog.text


def test_a_model_without_tables_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="qsweep"):
        q = qsweep.quantize(nn.Sequential(nn.Linear(4, 2)), {"embeddings": {"bits": 8}}, [torch.randn(2, 4)])
    assert not quant_embeddings(q) and "quant.embeddings.bits=8: the model has no nn.Embedding" in caplog.text


def test_skip_leaves_named_tables_float_and_a_pattern_matching_none_is_an_error():
    q = quantized(8, skip=["positions"])
    assert list(quant_embeddings(q)) == ["tokens"]
    with pytest.raises(ConfigError, match="quant.embeddings.skip pattern 'token' matches no nn.Embedding"):
        quantized(8, skip=["token"])


@pytest.mark.parametrize("embeddings, message", [
    ({"bits": 1}, r"quant.embeddings.bits=1 is not allowed; bits must be an integer in 2..8 or null"),
    ({"bits": 8, "observer": "auto"}, r"quant.embeddings.observer='auto' is not allowed; choose one of"),
    ({"bits": 8, "scale_dtype": "int8"}, r"quant.embeddings.scale_dtype='int8' is not allowed"),
])
def test_bad_embedding_settings_are_clear_errors(embeddings, message):
    with pytest.raises(ConfigError, match=message):
        qsweep.quantize(TinyText(), {"embeddings": embeddings}, [token_ids(4, 0)])
