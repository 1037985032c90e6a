"""The pipeline as a step registry: export_model() from Python, per-step time/memory in the manifest, and the
lean load (checkpoint dtype) that RTN-only recipes get."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_random_model
from edgepack.compressor.quantize import QuantConfig, QuantLinear, quantize
from edgepack.exporter.parity import open_decoder, ort_greedy, torch_logits_batch

from edgepack.artifact import Manifest
from edgepack.errors import EdgepackError
from edgepack.model import load_model, load_tokenizer
from edgepack.pipeline import STEPS, ExportRequest, export, export_model, reads_weights_once
from edgepack.recipe import Recipe


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def test_export_model_from_python(stories, tmp_path):
    """A model compressed in Python becomes a complete, verified artifact; parity runs when asked."""
    model = load_model(stories)
    report = quantize(model, QuantConfig(wbits=4, group_size=32))
    result = export_model(model, "cpu", tmp_path / "a", reports={"quantize": report}, parity=True)
    m = Manifest.load(result.out_dir)  # every file's SHA-256 checked
    assert m.raw["parity"]["passed"] and m.raw["parity"]["thresholds"] == "int8-activations"
    assert [layer.name for layer in m.quant_layers] == [layer["name"] for layer in report["layers"]]
    assert m.raw["ops"]["com.microsoft::MatMulNBits"] > 0
    assert set(m.raw["phases"]) == {"graph", "parity", "side_files"}  # the steps before the manifest
    assert (result.out_dir / "genai_config.json").is_file() and (result.out_dir / "README.md").is_file()
    ids = load_tokenizer(stories)("Once upon a time")["input_ids"]
    tokens = ort_greedy(open_decoder(result.out_dir / "model.onnx"), ids, 8)
    ref = torch_logits_batch(model, [ids + tokens[:-1]])[0].argmax(-1)[len(ids) - 1 :].tolist()
    assert tokens[:4] == ref[:4]
    with pytest.raises(EdgepackError, match="already exists"):
        export_model(model, "cpu", tmp_path / "a", reports={"quantize": report})
    with pytest.raises(EdgepackError, match="source folder"):
        export_model(model, "cpu", tmp_path / "b", source=tmp_path)


def test_manifest_records_every_step(stories, tmp_path):
    res = export(ExportRequest(stories, tmp_path / "o", recipe=Recipe([QuantConfig(wbits=4, group_size=32)])))
    phases = res.manifest["phases"]
    ran = [s.name for s in STEPS if s.name in phases]
    assert ran == ["load", "compress", "graph", "parity", "quality", "side_files"]
    for p in phases.values():
        assert p["seconds"] >= 0 and 0 < p["rss_gb"] <= p["peak_rss_gb"]


def test_rtn_loads_the_checkpoint_dtype_and_writes_the_same_bytes(tmp_path, monkeypatch):
    """A bf16 checkpoint: RTN reads each weight once, so the model loads in bf16 (half the memory) and the
    artifact is byte-identical to the one a float32 load writes."""
    src = make_random_model(tmp_path / "m", "Qwen2ForCausalLM", perturb_norms=True)
    model = load_model(src)
    model.to(torch.bfloat16).save_pretrained(src, safe_serialization=True)  # as hub checkpoints ship
    recipe = Recipe([QuantConfig(wbits=4, group_size=32)])
    assert reads_weights_once(recipe)
    assert not reads_weights_once(Recipe([QuantConfig(wbits=4, method="gptq")]))
    assert reads_weights_once(Recipe([]))  # a float export: written from bf16, upcast before parity
    loaded = {}

    def spy(*args, **kwargs):
        model = load_model(*args, **kwargs)
        loaded.setdefault("dtype", next(model.parameters()).dtype)
        return model

    monkeypatch.setattr("edgepack.model.load_model", spy)
    lean = export(ExportRequest(src, tmp_path / "lean", recipe=recipe))
    assert loaded["dtype"] == torch.bfloat16
    monkeypatch.setattr("edgepack.pipeline.reads_weights_once", lambda recipe: False)
    full = export(ExportRequest(src, tmp_path / "full", recipe=recipe))
    monkeypatch.undo()
    fp32 = export(ExportRequest(src, tmp_path / "fp32", recipe=Recipe([])))  # a lean float export
    monkeypatch.setattr("edgepack.pipeline.reads_weights_once", lambda recipe: False)
    fp32_full = export(ExportRequest(src, tmp_path / "fp32-full", recipe=Recipe([])))
    for x, y in ((lean, full), (fp32, fp32_full)):
        a, b = initializers(x.out_dir / "model.onnx"), initializers(y.out_dir / "model.onnx")
        assert a.keys() == b.keys()
        for name in a:
            assert np.array_equal(a[name], b[name]), name
        assert x.manifest["parity"]["passed"] and y.manifest["parity"]["passed"]
    assert fp32.manifest["parity"]["thresholds"] == "float32"


def test_parity_keeps_no_float_copy_of_quantized_weights(stories, tmp_path):
    """Parity dequantizes per forward: after the export the QuantLinears hold only their codes."""
    model = load_model(stories)
    report = quantize(model, QuantConfig(wbits=4, group_size=32))
    export_model(model, "cpu", tmp_path / "a", reports={"quantize": report}, parity=True)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m._weight_cache is None for m in layers)


def test_parity_scoring_counts_every_flip_and_names_near_ties():
    """Every flip counts against the verdict; the report says which flips sit at near-ties (a reference margin
    within twice the median rounding error), the situation of random-weight models' near-uniform logits."""
    from edgepack.exporter.parity import score_pairs

    vocab, n = 8, 8
    ref = np.zeros((n, vocab), np.float32)
    ref[:, 1] = 5.0  # a clear top-1 everywhere ...
    ref[5, 3] = 4.95  # ... but a near-tie at decode position 5
    noise = np.random.default_rng(0).normal(0, 0.05, ref.shape).astype(np.float32)
    got = ref + noise
    got[5, 3] = got[5, 1] + 0.01  # flipped by rounding-sized noise
    report = score_pairs([([7], got, ref)], "int8-activations", n)
    assert (report.flips, report.flips_at_ties) == (1, 1) and report.top1 == 0.875 and report.greedy == 0.625
    assert report.median_margin == 5.0 and report.median_error < 0.2 and report.passed
    wrong = got.copy()
    wrong[0, 6] = 5.6  # a clear margin flipped: a wrong token, not a tie
    report = score_pairs([([7], wrong, ref)], "int8-activations", n)
    assert report.flips == 2 and report.flips_at_ties == 1 and report.greedy == 0.0 and not report.passed
    assert not score_pairs([([7], ref + 2.0, ref)], "int8-activations", n).passed  # |dlogit| 2 > 1.5


def test_abq_defaults_shrink_with_model_size(stories, shakespeare, tmp_path, monkeypatch):
    """ABQ's samples x epochs follow abq.COST_BUDGET / parameters when the recipe sets neither (a 0.5B model gets
    8 x 2 instead of 64 x 3); explicit options are kept."""
    from edgepack.compressor import abq

    assert abq.size_defaults(14_000_000) == {}  # mix-llama-14m: the full defaults
    assert abq.size_defaults(494_032_768) == {"n_samples": 8, "epochs": 2}  # Qwen2.5-0.5B
    assert abq.size_defaults(3_085_938_688) == {"n_samples": 2, "epochs": 1}  # Qwen2.5-3B
    params = load_model(stories).num_parameters()
    monkeypatch.setattr(abq, "COST_BUDGET", params * 8)  # as if stories260k were large: 8 sample-epochs
    recipe = Recipe([QuantConfig(wbits=4, group_size=32, method="abq")])
    m = export(
        ExportRequest(stories, tmp_path / "a", recipe=recipe, calib=shakespeare, parity=False)
    ).manifest
    assert m["compression"]["quantize"]["options"] == {"n_samples": 4, "epochs": 2}
    assert m["compression"]["calibration"]["n_samples"] == 4
    recipe = Recipe(
        [QuantConfig(wbits=4, group_size=32, method="abq", options={"n_samples": 6, "epochs": 1})]
    )
    m = export(
        ExportRequest(stories, tmp_path / "b", recipe=recipe, calib=shakespeare, parity=False)
    ).manifest
    assert m["compression"]["quantize"]["options"] == {"n_samples": 6, "epochs": 1}
