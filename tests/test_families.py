"""The family registry: every supported family exports from a tiny random config with parity against
transformers (logits and greedy) at fp32, at W4 on int8 activations and after a fold, in both block forms."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest
import torch
from conftest import make_random_model
from edgepack.compressor.fold import restructure
from edgepack.compressor.quantize import QuantConfig, kernel_activations, quantize
from edgepack.exporter.builder import BuildOptions, build_decoder
from edgepack.exporter.parity import check_parity

from edgepack.errors import EdgepackError
from edgepack.families import FAMILIES, decoder_layers, family_of, resolve
from edgepack.model import load_model, read_config

LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0],
    "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
}
# One tiny config per family (head_dim 16, so both block forms apply), each turning on what the family adds.
CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": (
        "LlamaForCausalLM",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        ),
    ),
    "mistral": ("MistralForCausalLM", dict(sliding_window=4)),
    "qwen2": ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=16)),
    "phi3": (
        "Phi3ForCausalLM",
        dict(pad_token_id=0, original_max_position_embeddings=32, rope_parameters=LONGROPE),
    ),
    "gemma2": (
        "Gemma2ForCausalLM",
        dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=0.5,
            final_logit_softcapping=5.0,
            sliding_window=4,
        ),
    ),
    "gemma3": (
        "Gemma3ForCausalLM",
        dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
    ),
}
PROMPTS = [[1, 45, 67, 89, 12, 300, 7, 8], [1, 5, 400, 3]]
LONG_PROMPT = [[1, *range(3, 43)]]  # 41 tokens: past phi3's original 32 positions (long rope factors)
FORMS = ("fused", "plain")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family_model(request, tmp_path_factory) -> tuple[str, Path]:
    arch, overrides = CONFIGS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, make_random_model(folder, arch, perturb_norms=True, **overrides)


def export(model, form: str, path: Path) -> Counter:
    ir.save(build_decoder(model, BuildOptions(attention=form)), path)
    return Counter(n.op_type for n in onnx.load(path).graph.node)


def prompts_for(name: str) -> list[list[int]]:
    return PROMPTS + (LONG_PROMPT if name == "phi3" else [])


def test_registry_covers_every_family():
    assert set(FAMILIES) == set(CONFIGS)


def test_fp32_parity_both_forms(family_model, tmp_path):
    name, folder = family_model
    model = load_model(folder)
    fam = family_of(model)
    assert fam.name == name
    layer = decoder_layers(model)[0]
    for path in (*fam.linears, *fam.block_norms):  # the declared names exist in transformers' modules
        layer.get_submodule(path)
    for form in FORMS:
        ops = export(model, form, tmp_path / f"{form}.onnx")
        assert ops["GroupQueryAttention" if form == "fused" else "Softmax"] == 3, (form, ops)
        report = check_parity(model, tmp_path / f"{form}.onnx", prompts_for(name), "float32", new_tokens=8)
        assert report.passed and report.max_abs_logit < 1e-4 and report.top1 == 1.0, (form, report)
        assert report.greedy == 1.0


def test_w4_parity_int8_activations(family_model, tmp_path):
    name, folder = family_model
    model = load_model(folder)
    with torch.no_grad():
        before = model(torch.tensor([PROMPTS[0]])).logits
    quantize(model, QuantConfig(wbits=4, group_size=32))
    with torch.no_grad():
        assert (model(torch.tensor([PROMPTS[0]])).logits - before).abs().max() > 0.05  # really quantized
    linears = len(family_of(model).linears)
    for form in FORMS:
        ops = export(model, form, tmp_path / f"{form}.onnx")
        per_block = 4 if form == "fused" else linears  # fused: packed q/k/v, o, packed gate/up, down
        expected = 3 * per_block + 1  # + the lm_head
        assert ops["MatMulNBits"] == expected, (form, ops)
        with kernel_activations(model, 8):
            report = check_parity(model, tmp_path / f"{form}.onnx", PROMPTS, "int8-activations", new_tokens=8)
        assert report.passed and report.top1 >= 0.95, (form, report)


def test_fold_parity_shared_weights(family_model, tmp_path):
    """Positions 1 and 2 share one block's weights: one Scan where both attend alike, unrolled otherwise."""
    name, folder = family_model
    model = load_model(folder)
    restructure(model, kept=[0, 1, 2], groups=[[1, 2]], scores=[1.0, 2.0, 1.0], init="important")
    spec = resolve(model)
    for form in FORMS:
        ops = export(model, form, tmp_path / f"{form}.onnx")
        assert ops["Scan"] == int(spec.layers[1] == spec.layers[2]), (form, ops)
        report = check_parity(model, tmp_path / f"{form}.onnx", PROMPTS, "float32", new_tokens=8)
        assert report.passed and report.max_abs_logit < 1e-4, (form, report)


@pytest.mark.parametrize(
    ("name", "field", "off"),
    [
        ("mistral", "sliding_window", None),
        ("gemma2", "attn_logit_softcapping", None),
        ("gemma2", "final_logit_softcapping", None),
    ],
)
def test_configured_features_change_the_math(name, field, off, tmp_path):
    """The tiny configs exercise what they declare: turning the feature off moves transformers' logits, so
    the parity tests above would fail on an exporter that ignored it."""
    arch, overrides = CONFIGS[name]
    model = load_model(make_random_model(tmp_path, arch, perturb_norms=True, **overrides))
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        on = model(ids).logits
        setattr(model.config, field, off)
        for layer in decoder_layers(model):
            if hasattr(layer.self_attn, field):
                setattr(layer.self_attn, field, off)
        assert (model(ids).logits - on).abs().max() > 1e-2


def test_phi3_long_prompt_uses_long_factors(tmp_path):
    """Past original_max_position_embeddings transformers switches every position to the long factors."""
    spec = resolve(load_model(make_random_model(tmp_path, "Phi3ForCausalLM", **CONFIGS["phi3"][1])))
    rope = spec.ropes["default"]
    assert rope.switch_len == 32 and rope.long_inv_freq is not None
    assert abs(rope.long_inv_freq - rope.inv_freq).max() > 1e-3


@pytest.mark.parametrize(
    ("rope", "field"),
    [
        (
            {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
            "rope_parameters.rope_type 'dynamic'",
        ),
        ({"rope_type": "proportional", "rope_theta": 10000.0}, "rope_parameters.rope_type 'proportional'"),
    ],
)
def test_unimplemented_rope_is_refused_in_one_line(rope, field, tmp_path):
    folder = make_random_model(tmp_path, "LlamaForCausalLM", rope_parameters=rope)
    with pytest.raises(EdgepackError, match=field) as err:
        read_config(folder)
    assert "\n" not in str(err.value)


def test_bidirectional_gemma_is_refused(tmp_path):
    arch, overrides = CONFIGS["gemma3"]
    folder = make_random_model(tmp_path, arch, use_bidirectional_attention=True, **overrides)
    with pytest.raises(EdgepackError, match="use_bidirectional_attention"):
        read_config(folder)


def test_partial_rotary_runs_plain(tmp_path):
    """Phi-4-mini-style partial rotary (half the head rotated): auto picks the plain form, exact parity."""
    rope = dict(LONGROPE, short_factor=LONGROPE["short_factor"][:4], long_factor=LONGROPE["long_factor"][:4])
    rope["partial_rotary_factor"] = 0.5
    overrides = dict(CONFIGS["phi3"][1], rope_parameters=rope)
    model = load_model(make_random_model(tmp_path / "m", "Phi3ForCausalLM", perturb_norms=True, **overrides))
    assert resolve(model).rotary_dim == 8
    path = tmp_path / "p.onnx"
    ir.save(build_decoder(model, BuildOptions()), path)
    assert "GroupQueryAttention" not in Counter(n.op_type for n in onnx.load(path).graph.node)
    report = check_parity(model, path, PROMPTS + LONG_PROMPT, "float32", new_tokens=8)
    assert report.passed and report.max_abs_logit < 1e-4, report


def test_unimplemented_activation_is_refused(tmp_path):
    folder = make_random_model(tmp_path, "LlamaForCausalLM", hidden_act="relu2")
    with pytest.raises(EdgepackError, match="unsupported hidden_act 'relu2'"):
        read_config(folder)


def test_cli_refuses_unknown_rope_type_cleanly(tmp_path):
    """Through the CLI: one line naming the field, exit code 2, no traceback, nothing written."""
    import json
    import subprocess
    import sys

    folder = make_random_model(tmp_path / "m", "LlamaForCausalLM")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "edgepack", "export", "--model", str(folder), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "rope_parameters.rope_type 'dynamic'" in r.stderr.strip().splitlines()[-1]
    assert not out.exists()


@pytest.mark.parametrize("name", ["gemma2", "phi3"])
def test_pipeline_inspect_and_torch_backend(name, tmp_path, monkeypatch):
    """End to end through the pipeline (W4, target cpu, parity on), inspect's weights-by-part from the family's
    names, and the torch backend rebuilding the model from the artifact: Gemma-2's (1 + w) norms, scaled and
    tied quantized embedding; Phi-3's packed qkv_proj / gate_up_proj."""
    import numpy as np
    from edgepack.runtime.runner import DecoderIO, RunConfig, RunDecoder, make_session
    from edgepack.runtime.torch_backend import TorchDecoder, load_artifact_torch

    from edgepack.inspect import inspect_artifact
    from edgepack.pipeline import ExportRequest
    from edgepack.pipeline import export as pipeline_export
    from edgepack.recipe import Recipe

    arch, overrides = CONFIGS[name]
    folder = make_random_model(tmp_path / "m", arch, perturb_norms=True, **overrides)
    out = tmp_path / "a"
    recipe = Recipe([QuantConfig(wbits=4, group_size=32)])
    res = pipeline_export(
        ExportRequest(folder, out, recipe=recipe, new_tokens=8, build={"activations": "float"})
    )
    assert res.manifest["parity"]["passed"] and res.manifest["build"]["attention_form"] == "fused"
    text = inspect_artifact(out)
    for part in ("attention", "mlp", "norms"):
        assert f"\n  {part} " in text, text

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = load_artifact_torch(out, device="cpu", dtype=torch.float32)
    session = make_session(out / "model.onnx", RunConfig(threads=1))
    ort_dec, torch_dec = RunDecoder(session, DecoderIO.from_session(session)), TorchDecoder(model, "cpu")
    prompt = np.array([PROMPTS[0]], np.int64)
    for dec in (ort_dec, torch_dec):
        dec.reset()
    want, got = ort_dec.step(prompt), torch_dec.step(prompt)
    assert np.abs(got - want).max() < 1e-3


def test_abq_smoothing_folds_into_one_plus_w_norms(tmp_path):
    """W4A8 ABQ smooths activations into the norm before q/k/v and gate/up; for Gemma's (1 + w) norms the
    scale must fold into 1 + w, not w (folding into w alone doubles the output error here: measured 0.148
    vs 0.063, RTN 0.069)."""
    arch, overrides = CONFIGS["gemma2"]
    folder = make_random_model(tmp_path, arch, perturb_norms=True, **overrides)
    g = torch.Generator().manual_seed(0)
    calib, held = torch.randint(3, 512, (8, 32), generator=g), torch.randint(3, 512, (4, 32), generator=g)
    with torch.no_grad():
        ref = load_model(folder)(held).logits
    errors, norms = {}, {}
    for method, options in (("rtn", {}), ("abq", {"epochs": 4, "batch_size": 2})):
        model = load_model(folder)
        config = QuantConfig(wbits=4, abits=8, group_size=32, method=method, options=options)
        quantize(model, config, calib)
        with torch.no_grad():
            errors[method] = float((model(held).logits - ref).pow(2).mean() / ref.pow(2).mean())
        norms[method] = model.get_submodule("model.layers.0.input_layernorm").weight.detach().clone()
    assert (norms["abq"] - norms["rtn"]).abs().max() > 0.05  # smoothing really folded into the norm
    assert errors["abq"] < 1.25 * errors["rtn"], errors


def test_yarn_rope_scaling_parity(tmp_path):
    """Qwen2.5's long-context yarn scaling: static frequencies plus an attention factor on cos/sin."""
    rope = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 64}
    model = load_model(make_random_model(tmp_path / "m", "Qwen2ForCausalLM", rope_parameters=rope))
    assert resolve(model).ropes["default"].scaling > 1.0
    for form in FORMS:
        export(model, form, tmp_path / f"{form}.onnx")
        report = check_parity(model, tmp_path / f"{form}.onnx", PROMPTS, "float32", new_tokens=8)
        assert report.passed and report.max_abs_logit < 1e-4, (form, report)
