"""Folded models through the exporter: shared weights stored once, exact parity, folding plus quantization."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter

import onnx
import pytest
from edgepack.compressor.fold import FoldConfig
from edgepack.compressor.quantize import QuantConfig
from onnx import numpy_helper

from edgepack.pipeline import ExportRequest, export
from edgepack.recipe import Recipe

# stories260k has 5 blocks: remove 1 (20%), share the 4 kept positions in 2 groups of 2.
FAST_FOLD = dict(
    remove=0.2,
    share_group=2,
    importance="bi",
    cure_steps=4,
    n_samples=8,
    seq_len=64,
    batch_size=4,
    share_check=False,  # these tests pin the sharing mechanics; test_fold.py covers the check
)


def all_nodes(graph):
    """Nodes of a graph and of every subgraph (Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attr.g)


def weight_initializers(path):
    model = onnx.load(path)
    return model, [t for t in model.graph.initializer if not t.name.startswith("const")]


@pytest.fixture(scope="module")
def folded(tmp_path_factory, stories, shakespeare):
    out = tmp_path_factory.mktemp("fold") / "a"
    res = export(ExportRequest(stories, out, recipe=Recipe([FoldConfig(**FAST_FOLD)]), calib=shakespeare))
    return out, res.manifest


def test_folded_export_parity_and_structure(folded):
    out, m = folded
    assert m["num_layers"] == 4 and m["parity"]["passed"] and m["parity"]["max_abs_logit"] < 1e-3
    fold = m["compression"]["fold"]
    assert len(fold["kept"]) == 4 and fold["groups"] == [[0, 1], [2, 3]]
    graph, inits = weight_initializers(out / "model.onnx")
    q = [t.name for t in inits if t.name.endswith("self_attn.q_proj.weight")]
    assert len(q) == 2  # one per group
    # Each group of positions is one Scan whose body holds one node per shared weight (RAM: one pre-pack).
    scans = [n for n in graph.graph.node if n.op_type == "Scan"]
    assert len(scans) == 2
    body = scans[0].attribute[0].g
    assert Counter(n.op_type for n in body.node)["MatMul"] == 7 + 2  # 7 linears + 2 attention products
    assert Counter(n.op_type for n in all_nodes(graph.graph))["MatMul"] == 2 * 9
    cfg = json.loads((out / "config.json").read_text())
    genai = json.loads((out / "genai_config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 == genai["model"]["decoder"]["num_hidden_layers"]


def test_initializer_bytes_equal_unique_weights(folded):
    out, m = folded
    _, inits = weight_initializers(out / "model.onnx")
    stored = sum(numpy_helper.to_array(t).nbytes for t in inits)
    assert stored == 4 * m["parameters"]  # fp32: each unique parameter exactly once
    digests = Counter(
        hashlib.sha256(numpy_helper.to_array(t).tobytes()).hexdigest()
        for t in inits
        if numpy_helper.to_array(t).size > 64
    )
    assert max(digests.values()) == 1  # no weight stored twice under two names
    assert m["parameters"] < 260_032 * 0.6  # 4 positions, 2 unique blocks (+ embedding)


def test_fold_then_quantize_shares_packed_weights(stories, shakespeare, tmp_path):
    rec = Recipe([FoldConfig(**FAST_FOLD), QuantConfig(wbits=3, group_size=32)])
    build = {"activations": "float", "lowering": "planes"}  # exact, and one kernel per plane
    res = export(ExportRequest(stories, tmp_path / "fq", recipe=rec, calib=shakespeare, build=build))
    m = res.manifest
    assert m["parity"]["passed"] and m["parity"]["max_abs_logit"] < 1e-3
    graph, inits = weight_initializers(tmp_path / "fq" / "model.onnx")
    planes = [t.name for t in inits if ".qweight" in t.name and "layers" in t.name]
    ops = Counter(n.op_type for n in all_nodes(graph.graph))
    assert len(planes) == 2 * 7 * 2  # 2 unique blocks x 7 linears x 2 planes (3 = 2 + 1)
    assert ops["MatMulNBits"] == (2 * 7 + 1) * 2  # one node per packed plane: the Scan runs it per position
    assert ops["Scan"] == 2
    layers = m["compression"]["quantize"]["layers"]
    shared = [layer for layer in layers if len(layer["uses"]) == 2]
    assert len(shared) == 14  # every block linear quantized once, used by two positions


def test_width_fold_exports_narrow_mlps_with_parity(stories, shakespeare, tmp_path):
    """structure=mlp-width through the exporter: every block stays, each MLP is 128 channels wide in the graph
    and in config.json, parity holds, and the channels were chosen on the model's own samples although the
    cure text is Shakespeare (recorded as the fold's second calibration)."""
    width = dict(remove=0.2, structure="mlp-width", cure_steps=4, n_samples=8, seq_len=64, batch_size=4)
    width["cure_stop"] = True  # its record in the manifest is checked below
    out = tmp_path / "w"
    m = export(ExportRequest(stories, out, recipe=Recipe([FoldConfig(**width)]), calib=shakespeare)).manifest
    assert m["num_layers"] == 5 and m["parity"]["passed"] and m["parity"]["max_abs_logit"] < 1e-3
    fold = m["compression"]["fold"]
    assert fold["width"]["channels_after"] == 128 and fold["removed"] == []
    # the cure's held-out stop is recorded: 1 of 8 samples, checked uncured and at step 4
    held = fold["cure_held_out"]
    assert held["samples"] == 1 and [s for s, _ in held["kl"]] == [0, 4] and held["kept_step"] in (0, 4)
    assert m["compression"]["calibration"]["source"] == str(shakespeare)
    # with a text, the channels are still chosen on n_samples of the model's own samples
    assert m["compression"]["calibration_fold"]["self_share"] == 1.0
    assert (
        m["compression"]["calibration_fold"]["self"]["n_samples"] == 8
        and fold["width"]["channel_samples"] == 8
    )
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 128
    _, inits = weight_initializers(out / "model.onnx")
    shapes = {t.name: list(t.dims) for t in inits if ".mlp." in t.name}
    assert len(shapes) == 15 and all(128 in dims and 172 not in dims for dims in shapes.values()), shapes


def test_self_calibrated_width_fold_draws_128_samples_by_default(stories, tmp_path):
    """Without a text or a count, a width fold draws 128 of the model's samples (round 18): the manifest, the
    stored samples and the channel statistics all hold that many."""
    from edgepack.compressor.selfcalib import FILE_NAME, read_samples

    width = dict(remove=0.2, structure="mlp-width", cure_steps=2, seq_len=32)
    out = tmp_path / "s"
    m = export(ExportRequest(stories, out, recipe=Recipe([FoldConfig(**width)]), parity=False)).manifest
    calib, fold = m["compression"]["calibration"], m["compression"]["fold"]
    assert calib["source"] == "self" and calib["n_samples"] == 128 and fold["width"]["channel_samples"] == 128
    assert read_samples(out / FILE_NAME).shape == (128, 32)


def test_auto_fold_through_the_exporter_records_its_choice(stories, shakespeare, tmp_path):
    """The default structure through the exporter: the choice is made on the model's own samples although the
    cure text is Shakespeare, the graph and config.json are the chosen structure's, parity holds, and the
    manifest and `edgepack inspect` show every candidate's held-out KL and the decision."""
    from edgepack.inspect import inspect_artifact

    # importance bi: two candidates (width, BI removal), no gate training
    auto = dict(remove=0.2, importance="bi", cure_steps=2, n_samples=8, seq_len=64, batch_size=4)
    out = tmp_path / "auto"
    m = export(ExportRequest(stories, out, recipe=Recipe([FoldConfig(**auto)]), calib=shakespeare)).manifest
    assert m["recipe"]["steps"][0]["structure"] == "auto" and m["parity"]["passed"]
    fold = m["compression"]["fold"]
    check = fold["structure_check"]
    # one held-out sample (1/8 of 8), drawn apart from the 8 the candidates were built on
    assert check["held_out_samples"] == 1 and check["held_out_from"].startswith("own samples drawn apart")
    assert check["decision"] == min(check["held_out_kl"], key=check["held_out_kl"].get)
    assert m["compression"]["calibration_fold"]["self_share"] == 1.0  # the own samples the width fold reads
    config = json.loads((out / "config.json").read_text())
    if check["decision"] == "mlp-width":
        assert (
            fold["structure"] == "mlp-width" and m["num_layers"] == 5 and config["intermediate_size"] == 128
        )
    else:
        assert fold["structure"] == "blocks" and m["num_layers"] == 4 and config["num_hidden_layers"] == 4
    line = next(x for x in inspect_artifact(out).splitlines() if x.startswith("fold "))
    assert f"structure auto chose {check['decision']}" in line and "mlp-width" in line and "remove:bi" in line


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgepack", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--remove", "1.0"], "remove"),
        (["--remove", "0.2", "--share-groups", "0,1;2"], "group"),
        (["--share-groups", "0"], "must be >= 1"),  # an uneven size is valid: the last group is shorter
        (["--fold-structure", "mlp-width"], "--fold-structure needs --remove"),
        (["--remove", "0.2", "--share-groups", "2", "--fold-structure", "mlp-width"], "shares no blocks"),
    ],
)
def test_bad_fold_input(stories, shakespeare, tmp_path, args, needle):
    r = cli("export", "--model", str(stories), *args, "--calib", str(shakespeare), "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_fold_with_missing_calibration_text(stories, tmp_path):
    """Without --calib the fold self-calibrates (tests/test_selfcalib.py); a missing file is one clear error."""
    missing = tmp_path / "nope.txt"
    r = cli(
        "export",
        "--model",
        str(stories),
        "--remove",
        "0.2",
        "--calib",
        str(missing),
        "-o",
        str(tmp_path / "x"),
    )
    assert r.returncode == 2 and "nope.txt" in r.stderr and not (tmp_path / "x").exists()
