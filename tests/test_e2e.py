"""End-to-end scale tuning (compressor/e2e.py): it moves the quantized model towards the float one off its
calibration text, changes nothing but scales (and norms), keeps the tied embedding on the head's weight, and
the exported graph still matches the tuned model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import WIKITEXT
from edgepack.compressor.e2e import E2EOptions
from edgepack.compressor.quantize import QuantConfig, QuantLinear, e2e_options, quantize

from edgepack.errors import EdgepackError
from edgepack.model import load_model, load_tokenizer
from edgepack.textdata import calibration_samples, read_text, split_text, tokenize


@pytest.fixture(scope="module")
def setup(stories, shakespeare):
    """Calibration on Shakespeare (16 x 128), evaluation on WikiText-2 (8 x 128): another domain."""
    tok = load_tokenizer(stories)
    train, _ = split_text(read_text(shakespeare))
    calib = calibration_samples(tok, train, 16, 128)
    held = tokenize(tok, read_text(WIKITEXT)[:20000], 8 * 128).view(8, 128)
    model = load_model(stories)
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=held).logits, -1)
    return stories, calib, held, ref


def kl_to_float(model, held, ref) -> float:
    with torch.no_grad():
        q = torch.log_softmax(model(input_ids=held).logits, -1)
    return float((ref.exp() * (ref - q)).sum(-1).mean())


def quantized(path, calib, e2e, wbits=3):
    model = load_model(path)
    report = quantize(model, QuantConfig(wbits=wbits, group_size=128, options={"e2e": e2e}), calib)
    return model, report


def test_e2e_tunes_scales_only_and_generalizes(setup):
    path, calib, held, ref = setup
    base, _ = quantized(path, calib, 0)
    tuned, report = quantized(path, calib, {"epochs": 3, "batch_size": 4})
    # off the calibration domain the tuned model is closer to the float model
    before, after = kl_to_float(base, held, ref), kl_to_float(tuned, held, ref)
    assert after < 0.9 * before, (before, after)
    e2e = report["e2e"]
    assert e2e["held_out_kl_after"] < e2e["held_out_kl_before"]
    assert e2e["held_out_kl_after"] == min(e2e["kl_by_epoch"]), "the best held-out epoch is kept"
    assert e2e["held_out_sequences"] == 2 and e2e["train_sequences"] == 14
    layers = {n: m for n, m in base.named_modules() if isinstance(m, QuantLinear)}
    moved = 0
    for name, m in tuned.named_modules():
        if isinstance(m, QuantLinear):
            b = layers[name]
            assert torch.equal(m.codes, b.codes) and torch.equal(m.zero_points, b.zero_points), name
            moved += not torch.equal(m.scales, b.scales)
            assert not m.scales.requires_grad
    assert moved == len(layers), "every layer's scales were tuned"
    # the tied embedding reads the tuned head (one stored weight for both)
    head, emb = tuned.get_output_embeddings(), tuned.get_input_embeddings()
    assert torch.equal(emb.weight, head.weight) and not emb.weight.requires_grad
    flags = [(n, p.requires_grad) for n, p in base.named_parameters()]
    assert [(n, p.requires_grad) for n, p in tuned.named_parameters()] == flags, "restored as found"


def test_e2e_options_and_defaults():
    assert e2e_options(QuantConfig(method="rtn")) is None
    assert e2e_options(QuantConfig(method="gptq")).epochs == 4
    assert e2e_options(QuantConfig(method="gptq", options={"e2e": 0})) is None
    assert e2e_options(QuantConfig(method="rtn", options={"e2e": 2})).epochs == 2
    assert e2e_options(QuantConfig(options={"e2e": {"lr": 1e-3}})) == E2EOptions(lr=1e-3)
    for bad in ({"epochs": -1}, -1, {"rate": 1}, "many", {"holdout": 1.0}):
        with pytest.raises(EdgepackError):
            e2e_options(QuantConfig(options={"e2e": bad}))
    with pytest.raises(EdgepackError, match="needs calibration"):
        quantize(torch.nn.Module(), QuantConfig(options={"e2e": 1}), None)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "edgepack", *args], capture_output=True, text=True)


def test_export_tunes_by_default_with_gptq_and_keeps_parity(stories, tmp_path):
    """--method gptq tunes the scales (recorded in the manifest); the artifact's bytes equal the untuned one's
    and its graph matches the tuned PyTorch model (parity); --e2e-epochs -1 is one line."""
    args = ["export", "--model", str(stories), "--wbits", "4", "--method", "gptq"]
    r = cli(*args, "-o", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    e2e = m["compression"]["quantize"]["e2e"]
    assert e2e["epoch_kept"] >= 1 and e2e["held_out_kl_after"] < e2e["held_out_kl_before"]
    assert m["parity"]["passed"] and m["parity"]["top1"] == 1.0 and m["parity"]["greedy"] == 1.0
    r = cli(*args, "--e2e-epochs", "0", "--no-parity", "-o", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    m0 = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert "e2e" not in m0["compression"]["quantize"]
    assert m0["model_bytes"] == m["model_bytes"], "tuning moves scale values, not bytes"
    assert m0["files"]["model.onnx"] != m["files"]["model.onnx"]
    r = cli(*args, "--e2e-epochs", "-1", "-o", str(tmp_path / "c"))
    assert r.returncode == 2 and "--e2e-epochs -1" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "c").exists()


def test_folded_shared_blocks_tuned_export_exactly(stories, tmp_path):
    """A fold whose positions share one set of linears (one Scan per group), quantized by GPTQ with the tuning:
    the shared scales and each position's own tuned norms reach the graph (float activations: exact parity)."""
    import onnx

    out = tmp_path / "f"
    r = cli("export", "--model", str(stories), "--remove", "0.2", "--share-groups", "2", "--wbits", "4",
            "--method", "gptq", "--activations", "float", "-o", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["compression"]["fold"]["share_check"]["decision"] == "share"
    assert m["compression"]["quantize"]["e2e"]["norm_weights"] > 0
    assert "Scan" in {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert m["parity"]["max_abs_logit"] < 1e-3 and m["parity"]["greedy"] == 1.0
