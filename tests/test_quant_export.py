"""Arbitrary-bit quantization lowered to MatMulNBits planes: exact parity, bytes on disk, ops in the graph."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from conftest import SHAKESPEARE, kernel_attrs
from edgepack.compressor.quantize import QuantConfig, quantize
from edgepack.kernels.packing import PLANE_BITS, kernel_bits, lowered_bytes, storage_of

from edgepack.model import load_model, load_tokenizer
from edgepack.pipeline import ExportRequest, export
from edgepack.recipe import Recipe


def theoretical_bytes(layers: list[dict], bits_key: str = "bits") -> float:
    """params x bits / 8 plus one fp32 scale and one zero point (of the same width) per group."""
    total = 0.0
    for layer in layers:
        n, k = layer["shape"]
        groups = n * math.ceil(k / layer["group"])
        total += n * k * layer[bits_key] / 8 + groups * (4 + layer[bits_key] / 8)
    return total


WIDTH_CASES = [(b, "auto") for b in range(2, 9)] + [
    (3, "planes"),
    (7, "planes"),
    (3, "compact"),
    (6, "compact"),
]


@pytest.mark.parametrize(("wbits", "lowering"), WIDTH_CASES)
def test_every_width_is_exact_and_near_theoretical_size(stories, tmp_path, wbits, lowering):
    """Float activations (accuracy_level 0): the graph computes exactly what the fake-quant model computes,
    whether a width runs widened onto one 4/8-bit kernel (stored in its layout, or compact and widened at
    load) or as bit planes; compact and planes files keep b bits a weight, widened ones the kernel's."""
    res = export(
        ExportRequest(
            stories,
            tmp_path / "a",
            recipe=Recipe([QuantConfig(wbits=wbits, group_size=32, head_bits=None)]),
            build={"activations": "float", "lowering": lowering},
        )
    )
    m = res.manifest
    parity = m["parity"]
    assert parity["passed"] and parity["max_abs_logit"] < 1e-3 and parity["top1"] == 1.0
    assert parity["thresholds"] == "float32"
    layers = m["compression"]["quantize"]["layers"]
    assert len(layers) == 5 * 7 + 1  # every linear plus the tied lm_head
    kernel = kernel_bits(wbits, lowering, "float")
    storage = storage_of(wbits, lowering, "float")
    for layer in layers:  # the size model the mixed-precision planner uses is exact
        assert layer["kernel_bits"] == kernel and layer["storage"] == storage
        assert layer["bytes"] == lowered_bytes(
            *layer["shape"], wbits, layer["block"], kernel=kernel, storage=storage
        )
        layer["stored_bits"] = kernel if storage == "kernel" else wbits
    stored = sum(layer["bytes"] for layer in layers)
    assert stored <= 1.10 * theoretical_bytes(layers, "stored_bits"), (stored, theoretical_bytes(layers))
    graph = onnx.load(tmp_path / "a" / "model.onnx")
    ops = Counter(n.op_type for n in graph.graph.node)
    kernels = [kernel] if kernel else [max(b, 2) for b in PLANE_BITS[wbits]]
    # stories260k (head_dim 8) takes the plain block form: one MatMulNBits per kernel weight per linear use
    # (lm_head included), and the embedding read from the same packed weights
    assert ops["MatMulNBits"] == len(kernels) * (5 * 7 + 1)
    assert ops["GatherBlockQuantized"] == len(kernels)
    assert not any(t.name == "model.embed_tokens.weight" for t in graph.graph.initializer)
    assert sorted(set(kernel_attrs(tmp_path / "a" / "model.onnx"))) == sorted({(k, 0) for k in kernels})


def test_default_lowering_is_one_int8_kernel_per_linear(stories, tmp_path):
    """The default (cpu target): W3 runs as ONE 4-bit MatMulNBits per linear on int8 activations
    (accuracy_level 4), checked against a PyTorch model that quantizes its activations the same way."""
    cfg = QuantConfig(wbits=3, group_size=32, head_bits=None)
    res = export(ExportRequest(stories, tmp_path / "d", recipe=Recipe([cfg])))
    m = res.manifest
    assert m["build"]["activations"] == "int8" and m["build"]["lowering"] == "auto"
    assert m["parity"]["thresholds"] == "int8-activations" and m["parity"]["passed"]
    assert m["parity"]["top1"] >= 0.95
    assert set(kernel_attrs(tmp_path / "d" / "model.onnx")) == {(4, 4)}
    assert len(kernel_attrs(tmp_path / "d" / "model.onnx")) == 5 * 7 + 1


def test_mix_llama_w3_file_size(mix, tmp_path):
    """On a real 14M model the whole file is within 10% of params x 3/8 + scale overhead + float norms.

    Group 64 divides hidden 320; with group 128 MatMulNBits pads K = 320 to 384 (20% more weight bytes).
    """
    res = export(
        ExportRequest(
            mix,
            tmp_path / "w3",
            recipe=Recipe([QuantConfig(wbits=3, group_size=64, head_bits=None)]),
            build={"activations": "float", "lowering": "compact"},
        )
    )
    m = res.manifest
    layers = m["compression"]["quantize"]["layers"]
    norms = sum(t["bytes"] for t in m["tensors"] if "norm" in t["name"])
    expected = theoretical_bytes(layers) + norms
    assert m["model_bytes"] <= 1.10 * expected, (m["model_bytes"], expected)
    assert m["parity"]["passed"] and m["parity"]["max_abs_logit"] < 1e-3
    assert 3.0 < m["bits_per_weight"] <= 1.1 * (3 + (32 + 4) / 64)  # codes + fp32 scale + 4-bit zero point


def test_w4a8_sets_accuracy_level_and_passes_int8_thresholds(stories, tmp_path):
    res = export(
        ExportRequest(stories, tmp_path / "a8", recipe=Recipe([QuantConfig(wbits=4, abits=8, group_size=32)]))
    )
    assert res.manifest["parity"]["thresholds"] == "int8-activations" and res.manifest["parity"]["passed"]
    graph = onnx.load(tmp_path / "a8" / "model.onnx")
    levels = {
        a.i
        for n in graph.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    }
    assert levels == {4}


def test_skip_lm_head_keeps_float_embedding(stories, tmp_path):
    res = export(
        ExportRequest(stories, tmp_path / "s", recipe=Recipe([QuantConfig(wbits=4, skip=["lm_head"])]))
    )
    names = {t["name"] for t in res.manifest["tensors"]}
    assert "model.embed_tokens.weight" in names and "lm_head.qweight" not in names
    assert res.manifest["parity"]["passed"]


def test_per_layer_overrides(stories, tmp_path):
    cfg = QuantConfig(
        wbits=4, group_size=32, overrides={"*.mlp.down_proj": {"wbits": 8}, "lm_head": {"wbits": 6}}
    )
    res = export(ExportRequest(stories, tmp_path / "o", recipe=Recipe([cfg])))
    bits = {layer["name"]: layer["bits"] for layer in res.manifest["compression"]["quantize"]["layers"]}
    assert (
        bits["model.layers.2.mlp.down_proj"] == 8
        and bits["lm_head"] == 6
        and bits["model.layers.2.mlp.up_proj"] == 4
    )
    assert res.manifest["parity"]["passed"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgepack", *args], capture_output=True, text=True, timeout=600
    )


def test_recipe_file_equals_flags_and_inspect_table(stories, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - kind: quantize\n    wbits: 5\n    group_size: 64\n")
    r1 = cli(
        "export", "--model", str(stories), "--recipe", str(recipe), "--no-parity", "-o", str(tmp_path / "a")
    )
    r2 = cli(
        "export",
        "--model",
        str(stories),
        "--wbits",
        "5",
        "--group-size",
        "64",
        "--no-parity",
        "-o",
        str(tmp_path / "b"),
    )
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    ma = json.loads((tmp_path / "a" / "manifest.json").read_text())
    mb = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert ma["recipe"] == mb["recipe"] and ma["recipe"]["steps"][0]["wbits"] == 5
    assert ma["files"]["model.onnx"] == mb["files"]["model.onnx"]  # same settings, byte-identical graph
    out = cli("inspect", str(tmp_path / "a")).stdout
    assert "quantized layers" in out and "model.layers.0.self_attn.q_proj" in out and "64x64" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--wbits", "9"], "wbits=9 is not supported; choose an integer from 2 to 8"),
        (["--wbits", "4", "--group-size", "48"], "group_size=48 is not supported"),
        (["--wbits", "4", "--abits", "4"], "abits=4 is not supported"),
        (["--wbits", "4", "--method", "magic"], "unknown quantization method 'magic'"),
    ],
)
def test_bad_quant_flags(stories, tmp_path, args, needle):
    r = cli("export", "--model", str(stories), *args, "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_bad_recipe_keys(tmp_path, stories):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"steps": [{"kind": "quantize", "wbits": 4, "bitz": 3}]}))
    r = cli("export", "--model", str(stories), "--recipe", str(recipe), "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown quantize keys ['bitz']" in r.stderr


def test_bits_per_weight_budget(stories, shakespeare, tmp_path):
    """--bpw picks per-layer widths that meet the budget; an impossible budget is one clear error."""
    r = cli(
        "export",
        "--model",
        str(stories),
        "--bpw",
        "3.0",
        "--group-size",
        "32",
        "--calib",
        str(shakespeare),
        "-o",
        str(tmp_path / "m"),
    )
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "m" / "manifest.json").read_text())
    layers = m["compression"]["quantize"]["layers"]
    weights = sum(layer["shape"][0] * layer["shape"][1] for layer in layers)
    assert 8 * sum(layer["bytes"] for layer in layers) / weights <= 3.0 * 1.02
    assert len({layer["bits"] for layer in layers}) > 1 and m["parity"]["passed"]
    r = cli(
        "export",
        "--model",
        str(stories),
        "--bpw",
        "1.0",
        "--calib",
        str(shakespeare),
        "-o",
        str(tmp_path / "x"),
    )
    assert r.returncode == 2 and "below the minimum achievable" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("edgepack: error:") and not (tmp_path / "x").exists()


def test_mlp_group_size_where_it_divides_k(tmp_path):
    """The MLP projections take group 128 by default at group 64, wherever it divides their K (never padding);
    other linears keep --group-size, an explicit override wins, a chosen --group-size is kept everywhere and
    --mlp-group-size 0 turns the MLP group off."""
    from conftest import make_random_model

    cfg = QuantConfig(wbits=4)
    assert cfg.mlp_group_size == 128
    assert cfg.format_for("model.layers.0.mlp.down_proj", 768).group_size == 128
    assert cfg.format_for("model.layers.0.mlp.gate_proj", 320).group_size == 64  # 320 % 128 != 0
    assert cfg.format_for("model.layers.0.self_attn.q_proj", 896).group_size == 64
    assert (
        QuantConfig(wbits=4, group_size=32).format_for("model.layers.0.mlp.down_proj", 768).group_size == 32
    )
    over = QuantConfig(wbits=4, overrides={"*.down_proj": {"group_size": 32}})
    assert over.format_for("model.layers.0.mlp.down_proj", 768).group_size == 32
    with pytest.raises(Exception, match="mlp_group_size"):
        QuantConfig(wbits=4, mlp_group_size=100)

    src = make_random_model(tmp_path / "src", "LlamaForCausalLM", intermediate_size=256)  # hidden 64
    groups = {}
    runs = {"default": [], "off": ["--mlp-group-size", "0"], "g32": ["--group-size", "32"]}
    for name, extra in runs.items():
        out = tmp_path / name
        r = subprocess.run(
            [sys.executable, "-m", "edgepack", "export", "--model", str(src), "-o", str(out), "--wbits", "4",
             "--no-parity", *extra],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        m = json.loads((out / "manifest.json").read_text())
        groups[name] = {
            layer["name"].split(".")[-1]: layer["group"] for layer in m["compression"]["quantize"]["layers"]
        }
        assert m["recipe"]["steps"][0]["mlp_group_size"] == {"default": 128, "off": 64, "g32": 32}[name]
        graph = onnx.load(out / "model.onnx")
        blocks = {  # (K, block_size) of every MatMulNBits node: the kernel runs the group the manifest states
            (a["K"], a["block_size"])
            for n in graph.graph.node
            if n.op_type == "MatMulNBits"
            for a in [{x.name: x.i for x in n.attribute}]
        }
        groups[name]["kernels"] = blocks
    assert groups["default"]["down_proj"] == 128  # K = 256
    assert groups["default"]["kernels"] == {(64, 64), (256, 128)}  # packed q/k/v, o, gate/up, head; down
    assert groups["off"]["kernels"] == {(64, 64), (256, 64)}
    assert groups["default"]["gate_proj"] == 64 and groups["default"]["q_proj"] == 64  # K = 64
    assert {v for k, v in groups["off"].items() if k != "kernels"} == {64}
    assert {v for k, v in groups["g32"].items() if k != "kernels"} == {32}


def test_weight_range_search_lowers_error_and_perplexity(stories):
    """RTN's default MSE range search shrinks some groups' ranges within its grid, lowers the weight error and
    the W3 perplexity against the full range (weight_range="minmax"); unknown ranges are refused."""
    from edgepack.compressor.calib_grid import grid_for, quantize_on_grid, search_range
    from edgepack.compressor.quantize import QuantFormat

    from edgepack.textdata import read_text, tokenize

    model = load_model(stories)
    fmt = QuantFormat(3, 32)
    w = model.model.layers[0].mlp.down_proj.weight.detach()
    shrink = search_range(w, grid_for(fmt), 32)
    assert (shrink < 1).any() and (shrink >= 0.75).all()
    err = {s: (quantize_on_grid(w, fmt, search=s).dequantize() - w).square().sum() for s in (False, True)}
    assert err[True] < 0.9 * err[False]

    ids = tokenize(load_tokenizer(stories), read_text(SHAKESPEARE))[:2048].view(4, 512)
    ppl = {}
    for rng in ("minmax", "mse"):
        m = load_model(stories)
        quantize(m, QuantConfig(wbits=3, group_size=32, weight_range=rng))
        with torch.no_grad():
            ppl[rng] = math.exp(float(m(ids, labels=ids).loss))
    assert ppl["mse"] < 0.97 * ppl["minmax"], ppl
    with pytest.raises(Exception, match="weight_range"):
        QuantConfig(wbits=4, weight_range="max")


def test_mix_llama_head_bits(mix, tmp_path):
    """The tied lm_head/embedding of a real 14M model, W3 body:
    - head_bits=8 (CLI --head-bits 8): manifest, MatMulNBits and GatherBlockQuantized all say 8, parity holds,
      and the file is larger by the head's extra bits than under the default;
    - the default "auto" under the compact lowering (b bits a weight on disk) keeps the head at the body's 3;
    - "auto" under the default lowering stores it at 4 bits, the width that lowering stores the 3-bit body at:
      exactly the bytes a 3-bit head takes there, and a lower perplexity than the head at the body's width."""
    from edgepack.evaluate import perplexity
    from edgepack.textdata import read_text, tokenize

    sizes = {}
    for name, head_bits, lowering, want in (("h8", 8, "compact", 8), ("auto-compact", "auto", "compact", 3),
                                             ("auto", "auto", "auto", 4)):  # fmt: skip
        out = tmp_path / name
        cfg = QuantConfig(wbits=3, group_size=64, head_bits=head_bits)
        res = export(ExportRequest(mix, out, recipe=Recipe([cfg]), build={"lowering": lowering}))
        m = res.manifest
        assert m["parity"]["passed"]
        layers = {layer["name"]: layer for layer in m["compression"]["quantize"]["layers"]}
        head_layer = layers.pop("lm_head")
        assert head_layer["bits"] == want and {layer["bits"] for layer in layers.values()} == {3}
        graph = onnx.load(out / "model.onnx")
        gather = [n for n in graph.graph.node if n.op_type == "GatherBlockQuantized"]
        kernel = 8 if want == 8 else 4
        assert [next(a.i for a in n.attribute if a.name == "bits") for n in gather] == [kernel]
        attrs = [{a.name: a.i for a in n.attribute} for n in graph.graph.node if n.op_type == "MatMulNBits"]
        head = [a for a in attrs if a["N"] == 8192]  # the vocabulary: the lm_head's kernel
        assert head and {a["bits"] for a in head} == {kernel}
        assert {a["bits"] for a in attrs if a["N"] != 8192} == {4}
        sizes[name] = m["model_bytes"]
        if name == "auto":  # 4-bit codes in the 4-bit layout: what the 3-bit head would store
            assert head_layer["bytes"] == lowered_bytes(8192, 320, 3, 64, kernel=4, storage="kernel")
    extra = 8192 * 320 * (8 - 3) / 8  # the head's extra code bytes (zero points and scales aside)
    assert 0.95 * extra < sizes["h8"] - sizes["auto-compact"] < 1.2 * extra, sizes

    ids = tokenize(load_tokenizer(mix), read_text(SHAKESPEARE))[-2049:]  # the tail: 8 windows of 256
    ppl = {}
    for head_bits in ("auto", None):
        model = load_model(mix)
        quantize(model, QuantConfig(wbits=3, group_size=128, head_bits=head_bits))
        ppl[head_bits] = perplexity(model, ids)
    assert ppl["auto"] < 0.97 * ppl[None], ppl


def test_cli_head_bits_same_and_bad_values(stories, tmp_path):
    r = cli("export", "--model", str(stories), "--wbits", "4", "--head-bits", "same", "--no-parity",
            "-o", str(tmp_path / "s"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["recipe"]["steps"][0]["head_bits"] is None
    assert {layer["bits"] for layer in m["compression"]["quantize"]["layers"]} == {4}
    for wbits, head in ((3, 4), (6, 8)):  # the default, "auto": the head takes the width stored anyway
        out = tmp_path / f"a{wbits}"
        r = cli("export", "--model", str(stories), "--wbits", str(wbits), "--no-parity", "-o", str(out))
        assert r.returncode == 0, r.stderr
        m = json.loads((out / "manifest.json").read_text())
        assert m["recipe"]["steps"][0]["head_bits"] == "auto"
        layers = {layer["name"]: layer for layer in m["compression"]["quantize"]["layers"]}
        lm = layers.pop("lm_head")
        assert lm["bits"] == head and {layer["bits"] for layer in layers.values()} == {wbits}
        n, k = lm["shape"]  # the bytes a head at the body's width stores in this (widened) lowering
        assert lm["bytes"] == lowered_bytes(n, k, wbits, lm["block"], kernel=head, storage="kernel")
    for args, needle in (
        (
            ["--head-bits", "nine"],
            "--head-bits 'nine' is not a width; pass 2-8, 'same' (the --wbits width) or 'auto'",
        ),
        (["--head-bits", "9"], "wbits=9 for the output head (head_bits) is not supported"),
        (["--head-bits", "6", "--bpw", "4"], "--head-bits does not apply with a size budget"),
    ):
        r = cli("export", "--model", str(stories), "--wbits", "4", *args, "-o", str(tmp_path / "x"))
        assert r.returncode == 2 and needle in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_mix_llama_gptq_records_its_per_layer_choice(mix, shakespeare, tmp_path):
    """GPTQ on a real 14M model, exported with --head-bits 8: the 8-bit head is in the manifest, and every block
    linear records whether GPTQ's or RTN's codes were kept with both held-out output errors (the lower one
    wins)."""
    cfg = QuantConfig(
        wbits=4, group_size=64, method="gptq", head_bits=8, options={"n_samples": 8, "seq_len": 128}
    )
    res = export(ExportRequest(mix, tmp_path / "g", recipe=Recipe([cfg]), calib=shakespeare))
    m = res.manifest
    assert m["parity"]["passed"] and m["recipe"]["steps"][0]["head_bits"] == 8
    layers = {layer["name"]: layer for layer in m["compression"]["quantize"]["layers"]}
    assert layers.pop("lm_head")["bits"] == 8 and len(layers) == 12 * 7
    for layer in layers.values():
        errors = layer["calibration"]["held_out_error"]
        assert set(errors) == {"gptq", "rtn"} and layer["bits"] == 4
        assert layer["calibration"]["choice"] == ("gptq" if errors["gptq"] <= errors["rtn"] else "rtn")


@pytest.mark.parametrize(("target", "group"), [("cuda", 64), ("cuda", 32), ("cuda", 16), ("cpu", 64)])
@pytest.mark.parametrize("wbits", [4, 2])
def test_cuda_embedding_where_zero_points_leave_a_partial_byte(stories, tmp_path, target, group, wbits):
    """ONNX Runtime's CUDA GatherBlockQuantized reads zero point ``row * k_blocks + block`` of a flat array; the
    layout MatMulNBits shares pads each row to whole bytes (what the CPU kernel reads). On an H200 the cuda
    target's stories260k W4 (64 / 64 = 1 block a row) failed parity on the CUDA EP for that reason
    (docs/results/cuda.md). Where a row's zero points leave a partial byte, the cuda target dequantizes the
    gathered rows with standard ops from the same bytes; whole-byte rows and the cpu target keep the contrib op.
    Parity (here on the CPU EP) holds either way."""
    res = export(
        ExportRequest(
            stories,
            tmp_path / "a",
            target=target,
            recipe=Recipe([QuantConfig(wbits=wbits, group_size=group, head_bits=None)]),
            build={"activations": "float"},
        )
    )
    kernel = kernel_bits(
        wbits, "auto", "float"
    )  # the width the head's kernel stores (W2 runs on 4 bits here)
    whole_bytes = (64 // group * kernel) % 8 == 0  # stories260k: hidden 64
    gathered = target == "cpu" or whole_bytes
    ops = res.manifest["ops"]
    assert ("com.microsoft::GatherBlockQuantized" in ops) == gathered
    assert ("ai.onnx::Floor" in ops) == (not gathered)
    assert res.manifest["parity"]["passed"]
    assert res.manifest["parity"]["top1"] >= 0.99
    # logits leave in the activation dtype straight from the lm_head, as the builder's: no float32 Cast doubling
    # what a GPU prefill hands the host
    graph = onnx.load(str(tmp_path / "a" / "model.onnx"), load_external_data=False).graph
    (logits,) = [o for o in graph.output if o.name == "logits"]
    dtype = onnx.TensorProto.FLOAT16 if target == "cuda" else onnx.TensorProto.FLOAT
    assert logits.type.tensor_type.elem_type == dtype
    (producer,) = [n for n in graph.node if "logits" in n.output]
    assert producer.op_type in ("MatMulNBits", "Reshape")


def cuda_gather_zero_point(packed: np.ndarray, row: int, block: int, k_blocks: int, bits: int) -> int:
    """The zero point ONNX Runtime's CUDA GatherBlockQuantized reads for (row, block): element
    row * k_blocks + block of one flat array, low bits first (contrib_ops/cuda/quantization/
    gather_block_quantized.cu, get_val(zero_points, block_id))."""
    index = row * k_blocks + block
    per_byte = 8 // bits
    return int(packed[index // per_byte] >> ((index % per_byte) * bits)) & ((1 << bits) - 1)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k_blocks", [1, 2, 3, 4, 5, 14])
def test_flat_zero_point_reading_agrees_exactly_when_rows_fill_bytes(bits, k_blocks):
    """The rule the cuda target lowers by (quant_lowering.zero_points_fill_bytes) is exactly where the CUDA
    kernel's flat reading of MatMulNBits' per-row padded zero points gives back every zero point."""
    from edgepack.exporter.builder import KernelWeight
    from edgepack.exporter.quant_lowering import zero_points_fill_bytes
    from edgepack.kernels.packing import pack_zero_points

    rng = np.random.default_rng(bits * 100 + k_blocks)
    rows = 6
    zero_points = rng.integers(0, 1 << bits, size=(rows, k_blocks), dtype=np.uint8)
    packed = pack_zero_points(zero_points, bits)
    flat = np.array(
        [[cuda_gather_zero_point(packed, r, b, k_blocks, bits) for b in range(k_blocks)] for r in range(rows)]
    )
    w = KernelWeight(None, None, None, bits, 64, 64 * k_blocks, rows, 0)
    assert np.array_equal(flat, zero_points) == zero_points_fill_bytes(w)
