"""MiniCache + quantized KV: the PyTorch reference, the exported graph against it, bytes, CLI and runner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import genai_greedy
from edgepack.compressor.minicache import (
    CompressedCache,
    KVCacheConfig,
    MiniCachePlan,
    decode_perplexity,
    layer_kv,
    make_plan,
    pack_int4,
    quantize_groups,
    slerp_merge,
    unpack_int4,
)
from edgepack.exporter.builder import BuildOptions, build_decoder
from edgepack.exporter.kv_cache import make_layout
from edgepack.exporter.parity import open_decoder, ort_greedy
from edgepack.runtime import runner

from edgepack.cli import cli
from edgepack.errors import EdgepackError
from edgepack.model import load_model


@pytest.fixture(scope="module")
def model(stories: Path):
    return load_model(stories)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(3, 500, (1, 40))


def test_slerp_and_quant_math() -> None:
    torch.manual_seed(1)
    a, b = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    d, na, nb, dist = slerp_merge(a, b, 0.0)  # t = 0: the shared direction is layer a's own
    torch.testing.assert_close(na * d, a)
    d, na, nb, dist = slerp_merge(a, b, 0.5)
    torch.testing.assert_close(torch.linalg.vector_norm(d, dim=-1), torch.ones(1, 2, 5))  # SLERP stays unit
    assert ((dist >= 0) & (dist <= 1)).all() and slerp_merge(a, a, 0.5)[3].max() < 1e-3
    codes, scale, low = quantize_groups(a, 4, -1)
    assert codes.max() <= 15 and scale.dtype == torch.float16
    err = (codes.float() * scale.float() + low.float() - a).abs()
    assert (
        err <= scale.float() / 2 + 1e-2
    ).all()  # round-to-nearest: half a step (plus fp16 rounding of low)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


def test_reference_retaining_everything_is_exact(model, ids) -> None:
    """With every token retained the merged layout must reproduce the uncompressed model."""
    plan = make_plan(model, KVCacheConfig(merge="minicache", start_layer=1), layer_kv(model, ids), 1)
    plan.thresholds = [-1.0] * len(plan.pairs)
    base, _ = decode_perplexity(model, ids, None)
    got, stats = decode_perplexity(model, ids, plan)
    assert got == pytest.approx(base, rel=1e-5) and stats["retained_fraction"] == 1.0
    merged, _ = decode_perplexity(model, ids, make_plan(model, KVCacheConfig(merge="minicache"), None, None))
    assert merged == pytest.approx(base, rel=1e-6)  # start None: no pair, nothing merged


CASES = {
    "minicache": dict(merge="minicache", start_layer=1, max_retained=0.3),
    "minicache-int4-channel": dict(
        merge="minicache", start_layer=1, max_retained=0.3, bits=4, group="channel", channel_group=4
    ),
    "minicache-int4-token": dict(merge="minicache", start_layer=1, max_retained=0.3, bits=4),
    "int8-token": dict(bits=8),
    "int4-token": dict(bits=4),
    "share": dict(merge="share", start_layer=1),
    "int8-static": dict(bits=8, group="static"),
    "int4-static": dict(bits=4, group="static"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_graph_matches_reference(model, ids, tmp_path: Path, case: str) -> None:
    """Prefill 13 tokens then 27 decode steps: logits and every stored byte equal the PyTorch reference."""
    cfg = KVCacheConfig(**CASES[case])
    plan = make_plan(model, cfg, layer_kv(model, ids), cfg.start_layer)
    path = tmp_path / "model.onnx"
    ir.save(build_decoder(model, BuildOptions(kv_layout=make_layout(plan))), path)
    err, past, cache = replay(path, model, plan, ids)
    tol = 2e-3 if cfg.group == "token" else 5e-3  # a per-channel code may round the other way (1 ulp)
    assert err < tol
    assert sum(v.nbytes for v in past.values()) == cache.stored_bytes()
    plain = 5 * 2 * 4 * 8 * 4 * 40  # layers x (K, V) x kv heads x head_dim x fp32 x tokens
    assert cache.stored_bytes() < plain
    if cfg.merge == "minicache":
        assert 0 < cache.retained_fraction() < 1
        assert past["past_key_values.1_2.retained_index"].dtype == np.int64
        ops = {n.op_type for n in ir.load(path).graph.all_nodes()}
        assert {"Acos", "ScatterElements", "NonZero"} <= ops
    if cfg.group in ("token", "static") and cfg.bits != 16:
        assert_reads_past_directly(ir.load(path), cfg.bits)


def consumers(graph: ir.Graph, value: ir.Value) -> list[ir.Node]:
    return [n for n in graph if value in n.inputs]


def assert_reads_past_directly(model: ir.Model, bits: int) -> None:
    """Attention reads a token-quantized / merged past without restoring it to float: the decoded codes feed
    only matmuls (through a transpose for keys), per-token scales, lows and magnitudes only become (1, P) rows
    by a reshape, never a (P, D) product, and the retained vectors feed only matmuls (exact scores / values)."""
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    for name, value in inputs.items():
        if value.dtype in (ir.DataType.UINT8, ir.DataType.INT8):  # a stream's codes
            (cast,) = [
                n for n in consumers(graph, value) if n.op_type not in ("Concat", "Shape")
            ]  # append, P
            assert cast.op_type == "Cast", (name, cast.op_type)
            readers = consumers(graph, cast.outputs[0])
            if bits == 4:  # high nibbles: floor(c / 16), one (P, D/2) pass
                (scale,) = [n for n in readers if n.op_type == "Mul"]
                (floor,) = consumers(graph, scale.outputs[0])
                assert floor.op_type == "Floor"
                readers = [n for n in readers if n is not scale] + consumers(graph, floor.outputs[0])
            for n in readers:  # keys through a transpose, values straight into the matmul
                after = consumers(graph, n.outputs[0]) if n.op_type == "Transpose" else [n]
                assert {m.op_type for m in after} == {"MatMul"}, (name, n.op_type)
        if name.endswith((".scale", ".low")):
            for cast in consumers(graph, value):
                if cast.op_type == "Cast" and any(
                    n.op_type == "Reshape" for n in consumers(graph, cast.outputs[0])
                ):
                    break
            else:
                raise AssertionError(f"{name} is not read as a per-token row")
        if name.endswith(".magnitude"):
            ops = {n.op_type for n in consumers(graph, value)}  # the append, its length, the (1, P) row:
            assert {"Concat", "Reshape"} <= ops <= {"Concat", "Shape", "Reshape"}, (name, ops)  # no m x dir
        if name.endswith(".retained"):
            ops = {n.op_type for n in consumers(graph, value)}
            assert ops <= {"Concat", "Transpose", "MatMul"} and len(ops) > 1, (name, ops)


def replay(path: Path, model, plan: MiniCachePlan, ids: torch.Tensor) -> tuple[float, dict, CompressedCache]:
    """Prefill 13 tokens then decode the rest one by one through the graph and the reference cache."""
    dec, cache, err = open_decoder(path), CompressedCache(plan), 0.0
    for chunk in [ids[:, :13], *(ids[:, j : j + 1] for j in range(13, ids.shape[1]))]:
        logits = dec.step(chunk.numpy(), all_positions=True)
        with torch.no_grad():
            ref = model(input_ids=chunk, past_key_values=cache, use_cache=True).logits[0].numpy()
        err = max(err, float(np.abs(logits - ref).max()))
    return err, dec.past, cache


def test_composes_with_fold_and_weight_quantization(stories: Path, tmp_path: Path) -> None:
    """A folded (shared blocks as one Scan) W4 model with MiniCache + int4 KV still matches its reference."""
    from edgepack.compressor.fold import FoldConfig, fold
    from edgepack.compressor.quantize import QuantConfig, quantize

    model = load_model(stories)
    torch.manual_seed(0)
    calib = torch.randint(3, 500, (4, 64))
    fold(
        model,
        FoldConfig(remove=0.2, share_group=2, cure_steps=0, gate_steps=2, n_samples=4, seq_len=64),
        calib,
    )
    quantize(model, QuantConfig(wbits=4, group_size=32), None)
    ids = calib[:1, :40]
    plan = make_plan(
        model,
        KVCacheConfig(merge="minicache", start_layer=0, max_retained=0.3, bits=4),
        layer_kv(model, ids),
        0,
    )
    # float activations: the replay's reference is the fake-quant model (exact low-bit kernels)
    graph = build_decoder(model, BuildOptions(activations="float", kv_layout=make_layout(plan)))
    assert {"Scan", "MatMulNBits", "ScatterElements"} <= {n.op_type for n in graph.graph.all_nodes()}
    ir.save(graph, tmp_path / "model.onnx")
    err, past, cache = replay(tmp_path / "model.onnx", model, plan, ids)
    assert err < 2e-3 and sum(v.nbytes for v in past.values()) == cache.stored_bytes()


@pytest.mark.parametrize(
    "attention,kv",
    [
        ("fused", dict(merge="minicache", start_layer=8, max_retained=0.3, bits=4)),
        ("plain", dict(merge="minicache", start_layer=8, max_retained=0.3, bits=4)),
        ("fused", dict(bits=8, group="static")),
        ("fused", dict(bits=4, group="static")),
        ("plain", dict(bits=8, group="static")),
    ],
)
def test_fused_and_plain_forms_read_compressed_kv(
    mix: Path, tmp_path: Path, attention: str, kv: dict
) -> None:
    """mix-llama-14m (head_dim 64): the fused block form (packed projections, fused norms) and the plain form
    both attend over compressed KV straight from the stored codes, matching the reference. Static per-channel
    codes in the fused form are GroupQueryAttention's own quantized cache: no other op touches them."""
    model = load_model(mix)
    torch.manual_seed(0)
    ids = torch.randint(3, 8000, (1, 24))
    cfg = KVCacheConfig(**kv)
    plan = make_plan(model, cfg, layer_kv(model, ids), cfg.start_layer)
    graph = build_decoder(model, BuildOptions(attention=attention, kv_layout=make_layout(plan)))
    assert graph.meta["attention"] == attention
    nodes = list(graph.graph.all_nodes())
    ops = {n.op_type for n in nodes}
    assert ("SkipSimplifiedLayerNormalization" in ops) == (attention == "fused")
    if attention == "fused" and cfg.group == "static":
        gqa = [n for n in nodes if n.op_type == "GroupQueryAttention"]
        assert len(gqa) == 12 and all(n.attributes["kv_cache_bit_width"].value == cfg.bits for n in gqa)
        codes = [v for v in graph.graph.inputs if v.name.startswith("past_key_values.")]
        assert all({n.op_type for n in consumers(graph.graph, v)} == {"GroupQueryAttention"} for v in codes)
    else:
        assert "GroupQueryAttention" not in ops
        assert_reads_past_directly(graph, cfg.bits)
    ir.save(graph, tmp_path / "model.onnx")
    err, past, cache = replay(tmp_path / "model.onnx", model, plan, ids)
    assert sum(v.nbytes for v in past.values()) == cache.stored_bytes()
    # int8 static codes: 256 levels, so float-order differences upstream (GroupQueryAttention's or the plain
    # form's (q * s) . c) flip a few codes by one step in the deep layers (< 1%), which moves logits ~1e-2
    assert err < (2e-2 if cfg.group == "static" and cfg.bits == 8 else 2e-3)
    if cfg.group == "static":
        stored = [
            (past[f"past_key_values.{i}.{k}"], cache.plain[i][j].codes.numpy())
            for i in range(12)
            for j, k in enumerate(("key", "value"))
        ]
        assert sum(int((a != r).sum()) for a, r in stored) < 0.01 * sum(a.size for a, _ in stored)


def test_int4_halves_int8_bytes(model, ids) -> None:
    stats = {
        b: decode_perplexity(model, ids, make_plan(model, KVCacheConfig(bits=b), None, None))[1]
        for b in (8, 4)
    }
    plain = 5 * 2 * 4 * 8 * 4
    # head_dim 8: int8 = 8 B + 4 B fp16 scale/low per head, int4 = 4 + 4
    assert stats[8]["bytes_per_token"] == 5 * 2 * 4 * 12 and stats[4]["bytes_per_token"] == 5 * 2 * 4 * 8
    assert plain / stats[4]["bytes_per_token"] == 4.0


def test_config_rejects_bad_values() -> None:
    for bad in (dict(bits=3), dict(group="row"), dict(merge="avg"), dict(t=1.5), dict(max_retained=1.0)):
        with pytest.raises(EdgepackError):
            KVCacheConfig(**bad)
    with pytest.raises(EdgepackError, match="unknown kv keys"):
        KVCacheConfig.from_dict({"bitz": 4})
    assert MiniCachePlan(5, "minicache", 1).pairs == [(1, 2), (3, 4)]
    assert MiniCachePlan(6, "minicache", 2).pairs == [(2, 3), (4, 5)]


def test_cli_export_kv_and_bench(stories: Path, shakespeare: Path, tmp_path: Path, capsys) -> None:
    """--kv-merge/--kv-bits end to end: parity vs the reference, manifest recipe, README, runner --context."""
    out = tmp_path / "kv"
    res = CliRunner().invoke(
        cli,
        [
            "export",
            "--model",
            str(stories),
            "--kv-merge",
            "minicache",
            "--kv-start",
            "1",
            "--kv-bits",
            "4",
            "--kv-group",
            "token",
            "--calib",
            str(shakespeare),
            "-o",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    step = m["recipe"]["steps"][0]
    assert step["kind"] == "kv" and step["merge"] == "minicache" and step["bits"] == 4
    assert m["compression"]["kv"]["plan"]["pairs"] == [[1, 2], [3, 4]]
    t_trials = m["compression"]["kv"]["search"]["t_trials"]  # t chosen on the calibration text
    assert m["compression"]["kv"]["plan"]["t"] == min(t_trials, key=lambda r: r["ppl"])["t"]
    # codes decided on the graph's own K/V: a value on a rounding boundary may take the neighbouring code
    assert m["parity"]["thresholds"] == "float32-kv" and m["parity"]["passed"]
    assert m["parity"]["max_abs_logit"] < 0.05 and m["parity"]["greedy"] == 1.0
    assert (
        not (out / "genai_config.json").exists()
        and "onnxruntime-genai cannot run" in (out / "README.md").read_text()
    )
    report_path = tmp_path / "r.json"
    argv = [
        str(out),
        "--json",
        str(report_path),
        "--prompt-len=8",
        "--gen=4",
        "--runs=1",
        "--warmup=0",
        "--threads=1",
    ]
    assert runner.main([*argv, "--context=64,200"]) == 0
    # no genai_config.json: the context length comes from the manifest, and a context past it is refused
    assert json.loads((out / "manifest.json").read_text())["context_length"] == 512
    assert runner.main([*argv, "--context=64,600"]) == 2
    assert "(prompt length, sweep or --context, + gen) = 604 exceeds the model's context_length 512" in (
        capsys.readouterr().err
    )
    report = json.loads(report_path.read_text())
    points = report["contexts"]
    assert [p["context"] for p in points] == [64, 200]
    assert points[1]["kv_bytes"] > points[0]["kv_bytes"] and all(p["decode_tok_s"] > 0 for p in points)
    assert report["kv"]["bytes_per_position"] < 1280  # the plain layout stores 1280 B per token


def test_cli_export_static_kv(mix: Path, shakespeare: Path, tmp_path: Path) -> None:
    """--kv-group static end to end on mix-llama-14m (fused form): calibrated per-channel scales in the plan,
    GroupQueryAttention's int4 cache in the graph, parity against the reference, the runner decodes it."""
    out = tmp_path / "static"
    flags = ["--kv-bits", "4", "--kv-group", "static", "--calib", str(shakespeare), "--eval", "none"]
    res = CliRunner().invoke(cli, ["export", "--model", str(mix), *flags, "-o", str(out)])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    scales = m["compression"]["kv"]["plan"]["static_scales"]
    assert len(scales) == 12 and np.array(scales).shape == (12, 2, 1, 64) and np.min(scales) > 0
    assert m["parity"]["max_abs_logit"] < 2e-3 and m["parity"]["greedy"] == 1.0
    graph = ir.load(out / "model.onnx")
    gqa = [n for n in graph.graph.all_nodes() if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 12 and all(n.attributes["kv_cache_bit_width"].value == 4 for n in gqa)
    # GroupQueryAttention's own cache: onnxruntime-genai runs it, past and present in one shared buffer
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is True
    report = runner.run_benchmark(out, runner.RunConfig(threads=1, prompt_len=8, gen=4, runs=1, warmup=0))
    assert report["kv_layout"] == "shared"
    concat = runner.run_benchmark(
        out, runner.RunConfig(threads=1, prompt_len=8, gen=4, runs=1, warmup=0, kv_layout="concat")
    )
    assert concat["kv"]["bytes_per_position"] == 12 * 2 * 32  # int4 codes only: 8x fewer than fp32
    pytest.importorskip("onnxruntime_genai")
    prompt = list(range(10, 40))
    genai_tokens = genai_greedy(out, prompt, 12)
    assert genai_tokens == ort_greedy(open_decoder(out / "model.onnx"), prompt, len(genai_tokens))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kv-bits", "3"], "kv bits=3 is not supported"),
        (["--kv-group", "row"], "kv group='row' is unknown"),
        (["--kv-start", "x"], "cannot read --kv-start"),
        (["--kv-merge", "minicache", "--calib", "no-such-text.txt"], "does not exist"),  # (no --calib: self)
        (["--kv-merge", "minicache", "--kv-group", "static", "--kv-bits", "8"], "not combined with merging"),
    ],
)
def test_cli_bad_kv_flags(tmp_path: Path, flags: list[str], message: str) -> None:
    res = CliRunner().invoke(cli, ["export", *flags, "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_runner_reads_any_kv_layout(model, tmp_path: Path) -> None:
    """The runner derives empty pasts (uint8 codes, fp16 scales, int64 indices) from the graph alone."""
    plan = MiniCachePlan(5, "minicache", 3, 0.5, [0.5], bits=4, group="channel", channel_group=8)
    path = tmp_path / "model.onnx"
    ir.save(build_decoder(model, BuildOptions(kv_layout=make_layout(plan))), path)
    io = runner.DecoderIO.from_session(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
    dtypes = {np.dtype(s.dtype).name for s in io.kv}
    assert dtypes == {"uint8", "float16", "float32", "int64"}
    assert all(s.present == "present." + s.past.removeprefix("past_key_values.") for s in io.kv)


@pytest.mark.parametrize(
    "target, flags",
    [
        # int8 activations + 4-bit token codes: failed parity (max |dlogit| 6.8) when the graph decoded through
        # its own cache, where one code on a rounding boundary carried into every later step
        ("cpu", ["--wbits", "4", "--kv-bits", "4"]),
        # the float16 graph of two merged pairs: one symbolic retained length for both pairs made onnxruntime
        # reuse one pair's buffer for the other's ("Shape mismatch attempting to re-use buffer")
        ("cuda", ["--wbits", "4", "--kv-merge", "minicache", "--kv-start", "1", "--kv-bits", "8"]),
    ],
)
def test_parity_steps_the_graph_from_the_reference_cache(
    stories: Path, tmp_path: Path, target, flags
) -> None:
    out = tmp_path / "kv"
    res = CliRunner().invoke(
        cli, ["export", "--model", str(stories), "--target", target, *flags, "--eval", "none", "-o", str(out)]
    )  # quality through the cache: test_quality_vs_the_original_decodes_through_the_compressed_cache
    assert res.exit_code == 0, res.output
    parity = json.loads((out / "manifest.json").read_text())["parity"]
    assert parity["passed"] and parity["kv_codes"] > 10_000 and parity["kv_code_error"] < 5e-4
    assert parity["kv_code_agreement"] > 0.9 and parity["top1"] >= 0.99
    assert parity["max_abs_logit"] < (0.1 if target == "cuda" else 1.0)
    retained = [i for i in ir.load(out / "model.onnx").graph.inputs if i.name.endswith("retained_index")]
    assert [str(i.shape[0]) for i in retained] == (
        [] if target == "cpu" else ["past_retained_length_1_2", "past_retained_length_3_4"]
    )


def test_parity_catches_a_graph_that_stores_its_cache_wrongly(
    stories: Path, tmp_path: Path, monkeypatch
) -> None:
    """Two faulty graphs fail parity on the cache comparison: one floors its KV codes instead of rounding them,
    one stores each token's offset (low) 1% off. The second never shows in the logits: its own step attends
    over the exact new K/V, and every next step is fed the reference's cache."""
    import numpy as np
    from edgepack.exporter import kv_cache

    original = kv_cache.quantize_groups

    def floored(b, x, bits, axis):
        codes, scale, low = original(b, x, bits, axis)
        rounded = codes.producer().inputs[0].producer().inputs[0].producer()  # Cast <- Clip <- Round
        rounded.op_type = "Floor"
        return codes, scale, low

    def low_off(b, x, bits, axis):
        codes, scale, low = original(b, x, bits, axis)
        return codes, scale, b.op("Mul", low, b.const(np.float16(1.01)))

    for fault, marker, floor in (
        (floored, "mean |difference| ", 1e-2),
        (low_off, "new float entries ", 1e-3),
    ):
        monkeypatch.setattr(kv_cache, "quantize_groups", fault)
        out = tmp_path / fault.__name__
        res = CliRunner().invoke(cli, ["export", "--model", str(stories), "--kv-bits", "4", "-o", str(out)])
        assert res.exit_code != 0 and "parity check failed" in res.output and not out.exists(), res.output
        assert float(res.output.split(marker)[1].split(" ")[0]) > floor  # the bound on fp32 is 1e-4


def test_quality_vs_the_original_decodes_through_the_compressed_cache(
    model, stories: Path, shakespeare: Path, ids: torch.Tensor, monkeypatch
) -> None:
    """The export's quality figure counts what a compressed KV cache loses: the compressed side decodes one token
    at a time through it, as the artifact generates. A full forward pass (what it did before) attends over float
    keys and values, so a float model with an int4 cache read as the original itself (top-1 1.000)."""
    from edgepack.compressor.minicache import decode_logits
    from transformers import AutoTokenizer

    from edgepack.pipeline import ExportRequest, measure_quality
    from edgepack.recipe import Recipe

    # the decode path itself: a plan that compresses nothing gives the forward pass's logits
    with torch.no_grad():
        plain = decode_logits(model, ids[:, :24], MiniCachePlan(5))
        torch.testing.assert_close(plain, model(input_ids=ids[:, :24]).logits.float(), atol=1e-4, rtol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(str(stories))
    step = KVCacheConfig(bits=4)
    req = ExportRequest(stories, Path("unused"), recipe=Recipe(steps=[step]), eval_text=shakespeare)
    int4 = MiniCachePlan(5, bits=4)
    full = measure_quality(req, model, tokenizer)  # the weights are the original's: no cache, no change
    cached = measure_quality(req, model, tokenizer, int4)
    assert full["top1_agreement"] == 1.0 and full["perplexity"] == full["perplexity_original"]
    assert "through the compressed KV cache" in cached["text"] and cached["tokens"] == 8 * 256
    assert cached["perplexity"] > 1.01 * cached["perplexity_original"] and cached["top1_agreement"] < 0.98
    # the same figure as the MiniCache reference's own decode perplexity on those 8 windows of 256 tokens
    from edgepack.textdata import read_text, tokenize

    tokens = tokenize(tokenizer, read_text(shakespeare), max_tokens=8 * 256 + 1)
    rows = torch.stack([tokens[k * 256 : (k + 1) * 256 + 1] for k in range(8)])
    assert cached["perplexity"] == pytest.approx(decode_perplexity(model, rows, int4)[0], abs=1e-3)
    # a large model (here: stories260k called large) decodes 4 windows, 16 tokens per step
    import edgepack.pipeline

    monkeypatch.setattr(edgepack.pipeline, "OWN_QUALITY_LARGE", 1000)
    large = measure_quality(req, model, tokenizer, int4)
    assert "16 tokens per step" in large["text"] and large["tokens"] == 4 * 256
    assert large["perplexity"] == pytest.approx(
        decode_perplexity(model, rows[:4], int4, chunk=16)[0], abs=1e-3
    )
