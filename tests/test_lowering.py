"""The fast graph: fused block form (packed projections, fused norms, GroupQueryAttention) and its plain
fallback, low-bit kernels on int8 activations, widened widths folded at load. Parity for both forms."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from conftest import genai_greedy, kernel_attrs, make_random_model
from edgepack.compressor.fold import restructure
from edgepack.compressor.quantize import QuantConfig, fake_quant_activations, kernel_activations, quantize
from edgepack.exporter.builder import BuildOptions, build_decoder
from edgepack.exporter.parity import check_parity
from edgepack.kernels.packing import pack_nbits
from onnx import TensorProto, helper, numpy_helper

from edgepack.model import load_model
from edgepack.pipeline import ExportRequest, export
from edgepack.recipe import Recipe

PROMPTS = [[1, 45, 67, 89, 12, 300, 7, 8], [1, 5, 400, 3]]


def ops_of(path: Path) -> Counter:
    """op types of a model, Scan bodies included."""

    def walk(graph):
        for node in graph.node:
            yield node.op_type
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)

    return Counter(walk(onnx.load(path).graph))


def save(model_ir: ir.Model, path: Path) -> Path:
    ir.save(model_ir, path)
    return path


@pytest.mark.parametrize(("bits", "block"), [(4, 32), (4, 128), (2, 64), (8, 32)])
def test_int8_kernel_equals_activation_fake_quant(bits, block):
    """MatMulNBits at accuracy_level 4 computes exactly x quantized to int8 per K-block (of the weight's
    block) times the dequantized weight: the PyTorch reference parity uses for the fast path."""
    rng = np.random.default_rng(bits * block)
    n, k = 48, 256
    codes = rng.integers(0, 2**bits, (n, k)).astype(np.uint8)
    scales = (rng.random((n, k // block)).astype(np.float32) + 0.5) * 0.01
    w = (codes.astype(np.float32) - 2 ** (bits - 1)) * np.repeat(scales, block, 1)
    x = rng.standard_normal((3, k)).astype(np.float32)
    node = helper.make_node(
        "MatMulNBits", ["x", "B", "s"], ["y"], domain="com.microsoft",
        K=k, N=n, bits=bits, block_size=block, accuracy_level=4,
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(pack_nbits(codes, bits, block), "B"),
            numpy_helper.from_array(scales.reshape(-1), "s"),
        ],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    ref = fake_quant_activations(torch.tensor(x), block).numpy() @ w.T
    assert np.abs(y - ref).max() < 1e-4
    assert np.abs(y - x @ w.T).max() > 1e-3  # and it really is not the float-activation result


@pytest.fixture(scope="module")
def llama16(tmp_path_factory) -> Path:
    """A random Llama with head_dim 16 (the fused form's minimum), GQA 4/2, 3 blocks."""
    return make_random_model(tmp_path_factory.mktemp("llama16"), "LlamaForCausalLM")


def test_fused_form_ops_and_exact_parity(llama16, tmp_path):
    model = load_model(llama16)
    path = save(build_decoder(model, BuildOptions()), tmp_path / "f.onnx")
    ops = ops_of(path)
    assert ops["GroupQueryAttention"] == 3 and ops["MatMul"] == 4 * 3 + 1  # qkv, o, gate_up, down; lm_head
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * 3 and ops["SimplifiedLayerNormalization"] == 1
    assert "Softmax" not in ops and "Range" not in ops  # no hand-written attention left
    inputs = [i.name for i in onnx.load(path).graph.input]
    assert "position_ids" not in inputs  # GroupQueryAttention derives positions from the mask
    report = check_parity(model, path, PROMPTS, "float32", new_tokens=8)
    assert report.passed and report.max_abs_logit < 1e-4 and report.top1 == 1.0


def test_target_passes_leave_the_norms_training_outputs_unnamed(llama16, tmp_path):
    """SkipSimplifiedLayerNormalization's mean and inv_std_var (outputs 1, 2) are left empty after the target
    passes, as onnxruntime-genai's builder emits them (ONNX Runtime then neither computes nor allocates them);
    the residual sum (output 3) stays, and the logits are unchanged."""
    from edgepack.exporter.passes import run_target_passes
    from edgepack.targets.profiles import get_target

    model = load_model(llama16)
    path = save(
        run_target_passes(build_decoder(model, BuildOptions()), get_target("cpu")), tmp_path / "t.onnx"
    )
    nodes = [n for n in onnx.load(path).graph.node if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert len(nodes) == 2 * 3
    assert all(n.output[1] == n.output[2] == "" and n.output[0] and n.output[3] for n in nodes)
    report = check_parity(model, path, PROMPTS, "float32", new_tokens=8)
    assert report.passed and report.max_abs_logit < 1e-4 and report.top1 == 1.0


def test_plain_form_on_request_and_for_small_heads(llama16, stories, tmp_path):
    model = load_model(llama16)
    path = save(build_decoder(model, BuildOptions(attention="plain")), tmp_path / "p.onnx")
    ops = ops_of(path)
    assert "GroupQueryAttention" not in ops and ops["Softmax"] == 3
    assert check_parity(model, path, PROMPTS, "float32", new_tokens=8).max_abs_logit < 1e-4
    res = export(ExportRequest(stories, tmp_path / "s", parity=False))  # head_dim 8: plain, automatically
    assert res.manifest["build"]["attention_form"] == "plain"
    assert "position_ids" in [i["name"] for i in res.manifest["io"]["inputs"]]


def test_fused_on_a_small_head_model_is_one_line_error(stories, tmp_path):
    from edgepack.errors import EdgepackError

    with pytest.raises(EdgepackError, match="head_dim 8 is not a multiple of 16"):
        export(ExportRequest(stories, tmp_path / "x", build={"attention": "fused"}))
    assert not (tmp_path / "x").exists()


def test_fused_quantized_folded_scan_and_prep_folded_at_load(llama16, tmp_path):
    """Fold (positions 1, 2 share a block, run as one Scan) + W3 stored compact on int8 activations in the
    fused form: one packed 4-bit MatMulNBits for q/k/v and one for gate/up; every weight-preparation node
    (plane widening, packing) is folded away by ONNX Runtime at load, and parity holds against a PyTorch model
    that reproduces the kernels' activation quantization."""
    model = load_model(llama16)
    restructure(model, kept=[0, 1, 2], groups=[[1, 2]], scores=[1.0, 2.0, 1.0], init="important")
    quantize(model, QuantConfig(wbits=3, group_size=32))
    path = save(build_decoder(model, BuildOptions(lowering="compact")), tmp_path / "q.onnx")
    ops = ops_of(path)
    assert ops["Scan"] == 1 and ops["GroupQueryAttention"] == 2  # block 0 + one in the Scan body
    assert ops["MatMulNBits"] == 4 * 2 + 1  # qkv, o, gate_up, down per unique block, + lm_head
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    opt = ops_of(tmp_path / "opt.onnx")
    assert not {"BitShift", "BitwiseOr", "BitwiseAnd"} & set(opt), opt
    bits = {
        a.i
        for n in onnx.load(path).graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "bits"
    }
    assert bits == {4}
    with kernel_activations(model, 8):
        report = check_parity(model, path, PROMPTS, "int8-activations", new_tokens=8)
    assert report.passed and report.top1 >= 0.9, report


def test_fused_w4_export_matches_builder_layout(mix, tmp_path):
    """mix-llama-14m W4 through the CLI pipeline: the fused form end to end, 4 MatMulNBits per block (the
    onnxruntime-genai builder emits 5), all at accuracy_level 4, parity within the int8 thresholds."""
    res = export(
        ExportRequest(
            mix, tmp_path / "w4", recipe=Recipe([QuantConfig(wbits=4, group_size=64)]), new_tokens=16
        )
    )
    m = res.manifest
    assert m["build"]["attention_form"] == "fused" and m["parity"]["passed"]
    ops = ops_of(tmp_path / "w4" / "model.onnx")
    assert ops["MatMulNBits"] == 12 * 4 + 1 and ops["GroupQueryAttention"] == 12
    assert {level for _, level in kernel_attrs(tmp_path / "w4" / "model.onnx")} == {4}


def test_fused_genai_config_shares_the_kv_buffer(llama16, tmp_path):
    """The fused form's presents come straight from GroupQueryAttention, so genai_config turns on
    past_present_share_buffer (and lists no position_ids); onnxruntime-genai then decodes with one KV buffer
    and agrees with a plain onnxruntime loop token for token."""
    import json

    from edgepack.exporter.parity import open_decoder, ort_greedy

    out = tmp_path / "g"
    export(ExportRequest(llama16, out, recipe=Recipe([QuantConfig(wbits=4, group_size=32)]), new_tokens=8))
    cfg = json.loads((out / "genai_config.json").read_text())
    assert cfg["search"]["past_present_share_buffer"] is True
    assert "position_ids" not in cfg["model"]["decoder"]["inputs"]
    prompt = PROMPTS[0]
    genai_tokens = genai_greedy(out, prompt, 12)
    assert genai_tokens == ort_greedy(open_decoder(out / "model.onnx"), prompt, len(genai_tokens))


@pytest.mark.parametrize("wbits", [None, 4, 3])
def test_packed_projections_stored_once_without_concat(llama16, tmp_path, wbits):
    """The fused form's q/k/v and gate/up are stored packed: no Concat over initializers is left for ONNX
    Runtime to fold at load, every stored weight tensor is distinct (no per-projection copy beside its packed
    one), and the packed tensors read back per projection (artifact.PackedView) equal the model's weights."""
    from edgepack.artifact import Packed, PackedView, QuantLayer, decode_weight, packed_name

    model = load_model(llama16)
    if wbits:
        quantize(model, QuantConfig(wbits=wbits, group_size=32))
    graph = build_decoder(model, BuildOptions())
    path = save(graph, tmp_path / "m.onnx")
    proto = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    concats = [n for n in proto.graph.node if n.op_type == "Concat" and all(i in inits for i in n.input)]
    assert not concats, [n.input for n in concats]
    big = [a.tobytes() for a in inits.values() if a.size > 64]
    assert len(big) == len(set(big))  # each weight stored once
    qkv = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    name = packed_name(qkv)
    assert name == "model.layers.0.self_attn.q_proj+k_proj+v_proj"
    assert graph.meta["packed"][name]["parts"] == qkv
    assert not any(n.startswith(qkv[1] + ".") for n in inits)  # k_proj only inside the packed tensors
    view = PackedView(
        inits.__getitem__, inits.__contains__, [Packed.from_dict(name, graph.meta["packed"][name])]
    )
    k_proj = model.get_submodule(qkv[1])
    if wbits is None:
        assert np.array_equal(view.get(f"{qkv[1]}.weight"), k_proj.weight.detach().numpy().T)
    else:
        facts = graph.meta["quant_layers"][qkv[1]]
        assert facts["packed"] == name
        layer = QuantLayer.from_dict(
            {"name": qkv[1], "shape": list(k_proj.codes.shape), "bits": wbits, **facts}
        )
        w = decode_weight(view.get, view.__contains__, layer)
        assert np.array_equal(w.codes, k_proj.codes.numpy())
        assert np.array_equal(w.zero_points, k_proj.zero_points.numpy())
        assert np.allclose(w.scales, k_proj.scales.float().numpy())
    if wbits is None:
        report = check_parity(model, path, PROMPTS, "float32", new_tokens=4)
        assert report.passed and report.max_abs_logit < 1e-4
    else:
        with kernel_activations(model, 8):
            assert check_parity(model, path, PROMPTS, "int8-activations", new_tokens=4).passed


def test_mixed_widths_keep_separate_projections(llama16, tmp_path):
    """Projections of one input at different widths cannot share one MatMulNBits: each keeps its own stored
    tensors and node, their outputs concatenated."""
    model = load_model(llama16)
    quantize(model, QuantConfig(wbits=4, group_size=32))
    k_proj = "model.layers.0.self_attn.k_proj"
    from edgepack.compressor.calib_grid import quantize_on_grid
    from edgepack.compressor.quantize import QuantFormat, QuantLinear

    lin = model.get_submodule(k_proj)
    w = lin.weight.detach().clone()
    model.model.layers[0].self_attn.k_proj = QuantLinear(quantize_on_grid(w, QuantFormat(8, 32, False)), None)
    graph = build_decoder(model, BuildOptions())
    assert f"{k_proj}.qweight" in graph.graph.initializers
    assert "model.layers.0.self_attn.q_proj+k_proj+v_proj" not in graph.meta["packed"]
    assert "model.layers.1.self_attn.q_proj+k_proj+v_proj" in graph.meta["packed"]


def test_qkv_bias_inside_the_kernel(tmp_path):
    """Qwen2's q/k/v bias rides in the packed MatMulNBits's bias input (no Add node after it), and parity
    holds against the kernel-activation PyTorch model."""
    folder = make_random_model(tmp_path / "q", "Qwen2ForCausalLM", perturb_norms=True)
    model = load_model(folder)
    quantize(model, QuantConfig(wbits=4, group_size=32))
    path = save(build_decoder(model, BuildOptions()), tmp_path / "q.onnx")
    nodes = onnx.load(path).graph.node
    with_bias = [n for n in nodes if n.op_type == "MatMulNBits" and len(n.input) == 6 and n.input[5]]
    assert [n.input[5] for n in with_bias] == [
        f"model.layers.{i}.self_attn.q_proj+k_proj+v_proj.bias" for i in range(3)
    ]
    produced_by_kernel = {n.output[0] for n in nodes if n.op_type == "MatMulNBits"}
    adds = [n for n in nodes if n.op_type == "Add" and set(n.input) & produced_by_kernel]
    assert not adds  # no bias Add left after a kernel
    with kernel_activations(model, 8):
        report = check_parity(model, path, PROMPTS, "int8-activations", new_tokens=8)
    assert report.passed and report.top1 >= 0.9, report
