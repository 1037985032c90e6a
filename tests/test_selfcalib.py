"""Data-free calibration (--calib self): sampling math, seeded generation on stories260k, the artifact copy."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from edgepack.compressor.fold_importance import mean_nll
from edgepack.compressor.selfcalib import (
    AUTO,
    DEFAULT_TOP_P,
    FILE_NAME,
    SelfCalibConfig,
    _pilot_logits,
    generate_samples,
    held_out_config,
    mix_samples,
    narrow_samples_hint,
    nucleus_sample,
    read_samples,
    resolve_temperature,
    sampling_entropy,
    solve_temperature,
)
from edgepack.runtime.runner import sha256_file

from edgepack.errors import EdgepackError
from edgepack.model import load_model, load_tokenizer
from edgepack.pipeline import ExportRequest, calibration_ids
from edgepack.textdata import read_text, tokenize

SMALL = SelfCalibConfig(n_samples=6, seq_len=48, batch_size=3, seed=3)


@pytest.fixture(scope="module")
def setup(stories):
    torch.set_num_threads(1)
    return load_model(stories), load_tokenizer(stories)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgepack", *args], capture_output=True, text=True, timeout=600
    )


def test_nucleus_sample_keeps_to_the_nucleus():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]]).repeat(200, 1)  # p = 0.71, 0.26, 0.01, 0.005
    gen = torch.Generator().manual_seed(0)
    assert set(nucleus_sample(logits, 1.0, 0.5, gen).tolist()) == {0}  # the top token alone covers 0.5
    two = nucleus_sample(logits, 1.0, 0.9, gen)
    assert set(two.tolist()) == {0, 1}  # the top two cover 0.97 >= 0.9; the tail is never drawn
    hot = nucleus_sample(logits, 100.0, 1.0, gen)  # near-uniform at a high temperature
    assert len(set(hot.tolist())) == 4


def test_bad_settings_are_one_line_errors():
    for kwargs, needle in [({"temperature": 0}, "temperature"), ({"top_p": 1.5}, "top_p")]:
        with pytest.raises(EdgepackError, match=needle):
            SelfCalibConfig(**kwargs)
    with pytest.raises(EdgepackError, match="unknown self-calibration keys"):
        SelfCalibConfig.from_dict({"temp": 1.0})


def test_solve_temperature_hits_the_entropy_target():
    logits = 4 * torch.randn(50, 300, generator=torch.Generator().manual_seed(0))
    assert sampling_entropy(logits, 1.0) < sampling_entropy(logits, 2.0) < math.log(300)
    for target in (0.5, 3.0, 5.5):
        assert sampling_entropy(logits, solve_temperature(logits, target)) == pytest.approx(target, abs=1e-3)


def test_auto_temperature_heats_a_narrow_model_and_keeps_a_broad_one(setup, mix, tmp_path):
    """stories260k's own samples at 1.6 carry about 0.40 ln V of sampling entropy per step: "auto" heats them
    until they carry the target 0.65 (about 2.5). mix-llama-14m's carry about 0.67 ln V at 1.6, which stays.
    A number is kept; "auto" draws exactly the samples of the number it resolves to (which calib_self.json
    records, so a reproduction needs no second resolution)."""
    model, tok = setup
    config = SelfCalibConfig(16, 256, seed=0, temperature=AUTO)
    hot = resolve_temperature(model, tok, config)
    # heated, it samples the whole distribution whose entropy it solved for (no nucleus cut)
    assert 2.3 < hot.temperature < 2.8 and hot.entropy_target == 0.65 and hot.top_p == 1.0
    ln_v = math.log(model.config.vocab_size)
    at = {t: sampling_entropy(_pilot_logits(model, tok, replace(config, temperature=t, top_p=p)), t) / ln_v
          for t, p in ((1.6, DEFAULT_TOP_P), (hot.temperature, 1.0))}  # fmt: skip
    assert at[1.6] < 0.5 and at[hot.temperature] == pytest.approx(0.65, abs=0.02)
    fixed = resolve_temperature(model, tok, replace(config, temperature=1.2))
    assert (fixed.temperature, fixed.top_p) == (1.2, DEFAULT_TOP_P) == (1.2, 0.95)
    given = resolve_temperature(model, tok, replace(config, top_p=0.9))  # a top-p the user gave is kept
    assert given.top_p == 0.9 and 2.3 < given.temperature < 2.8
    auto = replace(SMALL, temperature=AUTO)
    assert torch.equal(
        generate_samples(model, tok, auto),
        generate_samples(model, tok, resolve_temperature(model, tok, auto)),
    )
    broad_model, broad_tok = load_model(mix), load_tokenizer(mix)
    broad = resolve_temperature(broad_model, broad_tok, config)
    assert (broad.temperature, broad.top_p) == (1.6, DEFAULT_TOP_P)
    # the whole draw measures what the pilot did: broad at 1.6, so no note (stories260k's: see the export test)
    stats: dict = {}
    generate_samples(broad_model, broad_tok, broad, stats=stats)
    assert (
        0.65 < stats["sampling_entropy"] < 0.75
        and narrow_samples_hint(broad, stats["sampling_entropy"]) is None
    )
    assert "0.40 of ln vocabulary" in narrow_samples_hint(broad, 0.4)
    # the pipeline records the number "auto" resolved to (calib_self.json and the manifest reproduce it)
    req = ExportRequest(model_dir=Path("unused"), out_dir=tmp_path, self_calib={"temperature": AUTO})
    reports: dict = {}
    ids = calibration_ids(
        tok, req, SimpleNamespace(n_samples=4, seq_len=64), model, tmp_path, reports, 0.0, "q"
    )
    settings = json.loads((tmp_path / FILE_NAME).read_text())["settings"]
    assert (
        ids.shape == (4, 64) and 2.3 < reports["calibration"]["temperature"] == settings["temperature"] < 2.8
    )
    assert (
        reports["calibration"]["top_p"] == settings["top_p"] == 1.0 and "note" not in reports["calibration"]
    )


def test_generation_is_seeded_mixed_and_model_like(setup, shakespeare):
    model, tok = setup
    ids = generate_samples(model, tok, SMALL)
    assert ids.shape == (6, 48) and ids.dtype == torch.long
    assert torch.equal(ids, generate_samples(model, tok, SMALL)), "same seed, same samples"
    assert not torch.equal(ids, generate_samples(model, tok, SelfCalibConfig(**{**vars(SMALL), "seed": 4})))
    bos = model.config.bos_token_id
    assert ids[0, 0] == bos and ids[3, 0] == bos and ids[1, 0] != bos and ids[2, 0] != bos  # the start mix
    assert len({tuple(r) for r in ids.tolist()}) == 6, "every sample differs"
    # The model's own samples are far more likely under it than real text of another domain.
    text = tokenize(tok, read_text(shakespeare), 6 * 48).view(6, 48)
    assert mean_nll(model, ids, 6) < 0.6 * mean_nll(model, text, 6)


def test_held_out_samples_are_drawn_apart_from_the_calibration_draw(setup):
    """A check's held-out samples (fold structure auto): the same settings on a seed of their own, so none
    repeats a calibration sample, and the same every run."""
    model, tok = setup
    held_config = held_out_config(SMALL, 1 / 3)  # a third as many as the 6 calibration samples
    assert (held_config.n_samples, held_config.seed, held_config.temperature) == (2, 2003, SMALL.temperature)
    calib, held = generate_samples(model, tok, SMALL), generate_samples(model, tok, held_config)
    assert held.shape == (2, 48) and torch.equal(held, generate_samples(model, tok, held_config))
    assert not {tuple(r) for r in held.tolist()} & {tuple(r) for r in calib.tolist()}


def test_export_self_calibrates_by_default_and_reproduces(stories, tmp_path):
    """No --calib: GPTQ calibrates on the model's own samples, stored in the artifact and listed in the
    manifest; --calib with that file reproduces the same model.onnx."""
    args = ["export", "--model", str(stories), "--wbits", "4", "--method", "gptq", "--no-parity"]
    r = cli(*args, "-o", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    calib = m["compression"]["calibration"]
    assert calib["source"] == "self" and calib["file"] == FILE_NAME and calib["temperature"] == 1.6
    # TinyStories' own samples at 1.6 are narrow (the measure "auto" heats by): the export says what to do
    assert 0.3 < calib["sampling_entropy"] < 0.5 and calib["note"] in r.stdout
    assert "--calib-temperature auto" in calib["note"] and "0.65" in calib["note"] and "note:" not in r.stderr
    stored = tmp_path / "a" / FILE_NAME
    assert m["files"][FILE_NAME] == sha256_file(stored)
    data = json.loads(stored.read_text())
    ids = read_samples(stored)
    assert ids.shape == (64, 256) and len(data["text"]) == 64 and data["settings"]["top_p"] == 0.95
    assert data["settings"]["temperature"] == calib["temperature"]
    assert data["text"][1] == load_tokenizer(stories).decode(data["ids"][1])
    r = cli(*args, "--calib", str(stored), "-o", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    m2 = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m2["compression"]["calibration"]["source"] == str(stored) and "note:" not in r.stdout
    assert m2["files"]["model.onnx"] == m["files"]["model.onnx"], "same samples, same weights"
    assert FILE_NAME not in m2["files"]


def test_bad_calibration_file_is_one_line(stories, tmp_path):
    r = cli("export", "--model", str(stories), "--wbits", "4", "--method", "gptq", "--calib",
            str(tmp_path / "missing.txt"), "-o", str(tmp_path / "x"))  # fmt: skip
    assert r.returncode == 2 and "missing.txt" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()
    bad = tmp_path / FILE_NAME
    bad.write_text('{"ids": "nope"}')
    r = cli("export", "--model", str(stories), "--wbits", "4", "--method", "gptq", "--calib", str(bad),
            "-o", str(tmp_path / "y"))  # fmt: skip
    assert r.returncode == 2 and "--calib self" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "y").exists()
    r = cli("export", "--model", str(stories), "--calib-temperature", "hot", "-o", str(tmp_path / "z"))
    assert r.returncode == 2 and "--calib-temperature 'hot'" in r.stderr and "'auto'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "z").exists()


def test_mix_samples_keeps_every_row_and_shuffles_reproducibly():
    real, own = torch.arange(12).view(3, 4), 100 + torch.arange(20).view(5, 4)
    mixed = mix_samples(real, own, seed=0)
    assert mixed.shape == (8, 4) and torch.equal(mixed, mix_samples(real, own, seed=0))
    assert sorted(map(tuple, mixed.tolist())) == sorted(map(tuple, torch.cat([real, own]).tolist()))
    assert not torch.equal(mixed, torch.cat([real, own])), "shuffled, so every batch holds both kinds"


def test_text_calibration_mixes_in_the_models_own_samples(stories, shakespeare, tmp_path):
    """--calib FILE: half the samples are sampled from the model (stored as calib_self.json, listed in the
    manifest), shuffled in with the file's; --calib-self-share 0 is the file alone; out of [0, 1]: one line."""
    args = ["export", "--model", str(stories), "--wbits", "4", "--method", "gptq", "--no-parity",
            "--calib", str(shakespeare)]  # fmt: skip
    r = cli(*args, "-o", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    calib = m["compression"]["calibration"]
    assert calib["source"] == str(shakespeare) and calib["n_samples"] == 64 and calib["self_share"] == 0.5
    assert calib["self"]["n_samples"] == 32 and calib["self"]["temperature"] == 1.6
    assert read_samples(tmp_path / "a" / FILE_NAME).shape == (32, 256) and FILE_NAME in m["files"]
    r = cli(*args, "--calib-self-share", "0", "-o", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    m0 = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert "self" not in m0["compression"]["calibration"] and FILE_NAME not in m0["files"]
    assert m0["files"]["model.onnx"] != m["files"]["model.onnx"], "the mix changes the calibration"
    r = cli(*args, "--calib-self-share", "1.5", "-o", str(tmp_path / "c"))
    assert r.returncode == 2 and "--calib-self-share" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "c").exists()


def test_fold_cures_on_the_text_alone_and_gptq_mixes(stories, shakespeare, tmp_path):
    """Fold then GPTQ on --calib FILE: the cure sees the text alone (mixing cost the fold, round 4 of
    generalization.md), GPTQ half the text and half the (folded) model's samples; both recorded."""
    from edgepack.compressor.fold import FoldConfig
    from edgepack.compressor.quantize import QuantConfig

    from edgepack.pipeline import ExportRequest, export
    from edgepack.recipe import Recipe

    fold = FoldConfig(
        remove=0.2, importance="bi", cure_steps=2, n_samples=8, seq_len=64, batch_size=4, structure="blocks"
    )
    gptq = QuantConfig(wbits=4, method="gptq", options={"n_samples": 8, "seq_len": 64})
    recipe = Recipe([fold, gptq])
    m = export(
        ExportRequest(stories, tmp_path / "a", recipe=recipe, calib=shakespeare, parity=False)
    ).manifest
    c = m["compression"]
    assert c["calibration"]["self_share"] == 0.0 and "self" not in c["calibration"]
    assert (
        c["calibration_quantize"]["self_share"] == 0.5 and c["calibration_quantize"]["self"]["n_samples"] == 4
    )
    assert read_samples(tmp_path / "a" / FILE_NAME).shape == (4, 64)


def test_abq_calibrates_on_the_text_alone(stories, shakespeare, tmp_path):
    """The mix is GPTQ's: ABQ did worse with it (round 4 of generalization.md) and gets the file alone."""
    from edgepack.compressor.quantize import QuantConfig

    from edgepack.pipeline import ExportRequest, export
    from edgepack.recipe import Recipe

    abq = QuantConfig(wbits=4, method="abq", options={"n_samples": 4, "seq_len": 64, "epochs": 1})
    m = export(
        ExportRequest(stories, tmp_path / "a", recipe=Recipe([abq]), calib=shakespeare, parity=False)
    ).manifest
    assert m["compression"]["calibration"]["self_share"] == 0.0 and not (tmp_path / "a" / FILE_NAME).exists()


def test_auto_temperature_is_resolved_once_per_fold_step(stories, tmp_path, monkeypatch):
    """A fold of structure auto draws its cure / channel samples and its held-out samples from the same model at
    the same sizes: "auto" is resolved once (one pilot), and the held-out draw takes the number it resolved to."""
    from edgepack.compressor import selfcalib
    from edgepack.compressor.fold import FoldConfig

    from edgepack.pipeline import compress
    from edgepack.recipe import Recipe

    resolved = []
    original = selfcalib.resolve_temperature

    def counting(model, tokenizer, config):
        out = original(model, tokenizer, config)
        if config.temperature == AUTO:
            resolved.append(out.temperature)
        return out

    drawn = []
    original_generate = selfcalib.generate_samples

    def recording(model, tokenizer, config, **kwargs):
        drawn.append(config)
        return original_generate(model, tokenizer, config, **kwargs)

    monkeypatch.setattr(selfcalib, "resolve_temperature", counting)
    monkeypatch.setattr(selfcalib, "generate_samples", recording)
    step = FoldConfig(remove=0.2, importance="bi", cure_steps=1, n_samples=8, seq_len=32, batch_size=4)
    req = ExportRequest(stories, tmp_path, recipe=Recipe([step]), self_calib={"temperature": AUTO})
    reports = compress(load_model(stories), load_tokenizer(stories), req, tmp_path)
    assert len(resolved) == 1 and 2.0 < resolved[0] < 3.0  # stories260k heats (see above)
    held = [c for c in drawn if c.seed != drawn[0].seed]
    assert len(held) == 1 and held[0].temperature == resolved[0] == reports["calibration"]["temperature"]
    assert (
        held[0].top_p == reports["calibration"]["top_p"] == 1.0
    )  # and its top-p (heated: the whole distribution)
    assert reports["fold"]["structure_check"]["held_out_samples"] == 1
