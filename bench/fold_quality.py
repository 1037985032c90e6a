"""Depth-folding quality bench: perplexity and size of folded models, before and after the cure.

For each model: removal rates 0/17/25/33% with sharing off and on, for each importance method (gates, BI,
drop-one), then the "25% fewer unique block parameters" goal: every split of that budget between removing
blocks and sharing pairs, against ShortGPT (BI removal, no sharing) under the same cure budget, and the
init comparison (most important block's weights vs the mean). Identical folds are measured once.

    python bench/fold_quality.py                       # both shared models, ~25 min on 2 cores
    python bench/fold_quality.py --models stories260k --cure-steps 20

Writes docs/results/fold_quality_<model>.json and rebuilds docs/results/fold_quality.md from all of them.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from edgepack.compressor.fold import FoldConfig, fold, rank, removal_count, unique_parameter_count
from edgepack.compressor.fold_cure import cure
from edgepack.compressor.fold_importance import IMPORTANCE
from edgepack.compressor.fold_plan import least_important_pairs

from edgepack.evaluate import perplexity
from edgepack.model import load_model, load_tokenizer
from edgepack.textdata import calibration_samples, read_text, split_text, tokenize

log = logging.getLogger("fold_quality")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "docs" / "results"
RATES = (0.0, 0.17, 0.25, 0.33)
METHODS = ("gates", "bi", "drop_one")
GOAL_CUT = 0.25  # fraction of unique block parameters the goal removes
GOAL_PPL = 1.10  # in-domain perplexity within 10% of the original


@dataclass(frozen=True)
class Setting:
    """One row: how many blocks to remove, how to share the rest, by which importance, from which init."""

    section: str  # "grid" | "goal" | "init"
    rate: float  # nominal removal rate (grid rows), else remove_blocks / layers
    remove_blocks: int
    sharing: str  # "off" | "pairs" (positions after the first, in pairs) | "k=N" (N least important pairs)
    importance: str
    cure_steps: int
    init: str = "important"


# ---------------------------------------------------------------- grouping rules


def pairs_after_first(n: int) -> list[list[int]]:
    """Positions 1..n-1 in consecutive pairs; position 0 (the embedding-facing block) keeps its own weights."""
    groups = [[0]] + [[i, i + 1] for i in range(1, n - 1, 2)]
    return groups + ([[n - 1]] if (n - 1) % 2 else [])


def groups_for(setting: Setting, kept: list[int], scores: list[float]) -> list[list[int]] | None:
    if setting.sharing == "off":
        return None
    if setting.sharing == "pairs":
        return pairs_after_first(len(kept))
    return least_important_pairs(kept, scores, int(setting.sharing.removeprefix("k=")))


# ---------------------------------------------------------------- settings


def settings_for(num_layers: int, grid_steps: int, goal_steps: int) -> list[Setting]:
    """The grid (short cure), the goal at the library's default cure budget, and init=mean twins."""
    rows = [Setting("grid", 0.0, 0, "off", "gates", 0)]  # the original model
    for rate in RATES:
        n = removal_count(rate, num_layers)
        for sharing in ("off", "pairs"):
            if n == 0 and sharing == "off":
                continue
            rows += [Setting("grid", rate, n, sharing, m, grid_steps) for m in METHODS]
    cut = num_layers - round((1 - GOAL_CUT) * num_layers)
    for n, sharing, method in [
        *[(cut - k, f"k={k}", "gates") for k in range(1, cut + 1)],
        (cut, "off", "bi"),
        (cut, "off", "gates"),
    ]:
        rows.append(Setting("goal", round(n / num_layers, 3), n, sharing, method, goal_steps))
    grid_25 = removal_count(0.25, num_layers)
    for s in [r for r in rows if r.sharing != "off" and r.importance == "gates"]:
        if s.section == "goal" or s.remove_blocks == grid_25:
            rows.append(replace(s, section="init", init="mean"))
    return rows


# ---------------------------------------------------------------- measuring


def artifact_stats(model, model_dir: Path, tokenizer) -> dict:
    """Export ``model`` with the edgepack exporter (CPU target) and run the runtime: file MB, peak RSS."""
    from edgepack.runtime.bench import run_artifact
    from edgepack.runtime.runner import RunConfig

    from edgepack.pipeline import export_model

    with tempfile.TemporaryDirectory(prefix="fold-bench-") as tmp:
        folder = export_model(
            model, "cpu", Path(tmp) / "artifact", source=model_dir, tokenizer=tokenizer
        ).out_dir
        size = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
        report = run_artifact(folder, RunConfig(threads=1, prompt_len=64, gen=32, runs=1, warmup=0))
    return {"artifact_mb": size / 1e6, "peak_rss_mib": report["peak_rss_mib"]}


class Bench:
    """One model: calibration and eval ids, importance scores, and the folded rows (deduplicated)."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name, self.args = name, args
        self.model_dir = SHARED / "models" / name
        self.base = load_model(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.layers = len(self.base.model.layers)
        train, held_out = split_text(read_text(SHARED / "data" / "tinyshakespeare.txt"))
        self.config = FoldConfig(
            n_samples=args.n_samples,
            seq_len=args.seq_len,
            batch_size=4,
            share_check=False,
            structure="blocks",
        )
        self.calib = calibration_samples(self.tokenizer, train, args.n_samples, args.seq_len, seed=0)
        wiki = read_text(SHARED / "data" / "wikitext2-raw-test.txt")
        self.eval = {
            "in_domain": tokenize(self.tokenizer, held_out, args.eval_tokens + 1),
            "wikitext2": tokenize(self.tokenizer, wiki, args.eval_tokens + 1),
        }
        self.scores: dict[str, list[float]] = {}
        self.cache: dict[tuple, dict] = {}
        self.artifacts: dict[tuple, dict] = {}

    def ppl(self, model) -> dict[str, float]:
        return {k: perplexity(model, ids, seq_len=self.args.eval_seq_len) for k, ids in self.eval.items()}

    def scores_for(self, remove_blocks: int) -> dict[str, list[float]]:
        """BI and drop-one once; gates once per removal budget (their penalty targets it)."""
        for method in ("bi", "drop_one"):
            if method not in self.scores:
                self.scores[method] = IMPORTANCE[method](self.base, self.calib, self.config)
        key = f"gates@{max(remove_blocks, 1)}"
        if key not in self.scores:
            t0 = time.perf_counter()
            cfg = replace(self.config, remove=max(remove_blocks, 1) / self.layers)
            self.scores[key] = IMPORTANCE["gates"](self.base, self.calib, cfg)
            log.info(
                "%s: gates for %d removed in %.0fs: %s",
                self.name,
                max(remove_blocks, 1),
                time.perf_counter() - t0,
                rank(self.scores[key]),
            )
        return {"gates": self.scores[key], "bi": self.scores["bi"], "drop_one": self.scores["drop_one"]}

    def run(self, setting: Setting) -> dict:
        scores = self.scores_for(setting.remove_blocks)
        order = rank(scores[setting.importance])
        kept = sorted(order[: self.layers - setting.remove_blocks])
        groups = groups_for(setting, kept, scores[setting.importance])
        sources = [
            "mean"
            if setting.init == "mean" or len(g) == 1
            else max((kept[p] for p in g), key=scores[setting.importance].__getitem__)
            for g in (groups or [[p] for p in range(len(kept))])
        ]
        key = (tuple(kept), json.dumps(groups), tuple(sources), setting.cure_steps)
        row = {"setting": asdict(setting), "kept": kept, "groups": groups}
        if key in self.cache:
            return {**self.cache[key], **row, "same_as": self.cache[key]["id"]}
        t0 = time.perf_counter()
        model = copy.deepcopy(self.base)
        cfg = replace(
            self.config,
            remove=setting.remove_blocks / self.layers,
            share_group=groups,
            importance=setting.importance,
            init=setting.init,
            cure_steps=0,
        )
        report = fold(model, cfg, self.calib, scores=scores)
        before = self.ppl(model)
        cured = None
        if setting.cure_steps:
            cured = cure(model, self.base, self.calib, replace(self.config, cure_steps=setting.cure_steps))
        after = self.ppl(model) if cured else before
        structure = (len(kept), json.dumps([len(g) for g in report.groups]))
        if self.args.artifacts and structure not in self.artifacts:
            self.artifacts[structure] = artifact_stats(model, self.model_dir, self.tokenizer)
        result = {
            "id": len(self.cache),
            "positions": len(kept),
            "unique_blocks": len(report.groups),
            "block_params": report.block_params_after,
            "params": unique_parameter_count(model),
            "ppl_before_cure": before,
            "ppl_after_cure": after,
            "distill_loss": [cured.before, cured.after] if cured else None,
            "seconds": time.perf_counter() - t0,
            **self.artifacts.get(structure, {}),
        }
        self.cache[key] = result
        log.info("%s: %s -> %s", self.name, setting, {k: v for k, v in result.items() if "ppl" in k})
        return {**result, **row}

    def measure(self) -> dict:
        t0 = time.perf_counter()
        rows = [
            self.run(s) for s in settings_for(self.layers, self.args.cure_steps, self.args.goal_cure_steps)
        ]
        return {
            "model": self.name,
            "layers": self.layers,
            "eval_tokens": {k: len(v) - 1 for k, v in self.eval.items()},
            "eval_seq_len": self.args.eval_seq_len,
            "calibration": f"{self.args.n_samples} x {self.args.seq_len} tokens from the first 90% of tinyshakespeare",
            "fold_config": self.config.to_dict(),
            "scores": self.scores,
            "rows": rows,
            "goal": goal_verdict(rows),
            "seconds": time.perf_counter() - t0,
            "host": {
                "cpus": os.cpu_count(),
                "threads": torch.get_num_threads(),
                "load": os.getloadavg(),
                "machine": platform.machine(),
            },
        }


def goal_verdict(rows: list[dict]) -> dict:
    """Best fold at the goal's unique-block count vs ShortGPT (BI removal, no sharing), both cured alike."""
    original = rows[0]["ppl_after_cure"]["in_domain"]
    goal = [r for r in rows if r["setting"]["section"] == "goal"]
    baseline = next(r for r in goal if r["setting"]["importance"] == "bi")
    best = min((r for r in goal if r is not baseline), key=lambda r: r["ppl_after_cure"]["in_domain"])
    ppl = best["ppl_after_cure"]["in_domain"]
    return {
        "unique_blocks": best["unique_blocks"],
        "original_ppl": original,
        "best": best["setting"],
        "best_ppl": ppl,
        "shortgpt_ppl": baseline["ppl_after_cure"]["in_domain"],
        "within_10pct": ppl <= GOAL_PPL * original,
        "beats_shortgpt": ppl < baseline["ppl_after_cure"]["in_domain"],
    }


# ---------------------------------------------------------------- reporting


def label(s: dict) -> str:
    sharing = {"off": "no sharing", "pairs": "pairs after block 0"}.get(
        s["sharing"], f"{s['sharing'][2:]} least-important pair(s)"
    )
    n = s["remove_blocks"]
    return f"remove {s['rate']:.0%} ({n} block{'' if n == 1 else 's'}), {sharing}"


def table(result: dict) -> str:
    tok = result["eval_tokens"]
    art = any("artifact_mb" in r for r in result["rows"])
    head = [
        "#",
        "section",
        "setting",
        "importance",
        "init",
        "cure",
        "unique blocks",
        "block params",
        "all params",
        f"Shakespeare held-out ppl ({tok['in_domain']} tok) before -> after cure",
        f"WikiText-2 ppl ({tok['wikitext2']} tok) before -> after cure",
    ]
    head += ["artifact MB", "peak RSS MiB (generation)"] if art else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        s, b, a = r["setting"], r["ppl_before_cure"], r["ppl_after_cure"]
        cells = [
            f"={r['id']}" if "same_as" in r else str(r["id"]),
            s["section"],
            label(s),
            s["importance"],
            s["init"],
            str(s["cure_steps"]),
            f"{r['unique_blocks']}/{result['layers']}",
            f"{r['block_params']:,}",
            f"{r['params']:,}",
            f"{b['in_domain']:.1f} -> **{a['in_domain']:.1f}**",
            f"{b['wikitext2']:.0f} -> {a['wikitext2']:.0f}",
        ]
        if art:
            cells += [f"{r.get('artifact_mb', math.nan):.2f}", f"{r.get('peak_rss_mib', math.nan):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown() -> None:
    parts = [
        "# Depth folding (FoldGPT) quality",
        "",
        "Generated by `bench/fold_quality.py` from `fold_quality_<model>.json`. Perplexity over consecutive "
        "windows of held-out text. Shakespeare held-out = the last 10% of tinyshakespeare (calibration and "
        "cure use the first 90%): in-domain for mix-llama-14m, out of domain for stories260k (a TinyStories "
        "model), whose cure on Shakespeare therefore pushes it *below* the original; WikiText-2 = raw test "
        "split, out of domain for both. 'before -> after cure' is the same fold before and after the "
        "distillation cure (logit KL + last-2-layer hidden MSE against the original; norms and block weights "
        "trained).",
        "",
        "Settings: *grid* = removal rate x sharing x importance with a short cure; *pairs after block 0* shares "
        "every two neighbouring positions except the first; *goal* = every way to reach 25% fewer unique "
        "blocks (remove r blocks + share the k least important neighbour pairs, `FoldConfig(share_pairs=k)`, "
        "r + k = 25% of the blocks) against "
        "ShortGPT (BI removal, no sharing), all with the library's default cure budget; *init* = the same fold "
        "with shared weights started from the mean instead of the most important block. '=N' in the first "
        "column: the same fold as row N (same blocks, groups, init and cure), measured once. Unique blocks and "
        "params count each shared weight once. Artifact MB: model.onnx from `edgepack.pipeline.export_model` "
        "(CPU target, fp32, shared weights stored once); peak RSS: the runtime's `runner.py` process while "
        "prefilling 64 and generating 32 tokens on one thread.",
        "",
    ]
    for path in sorted(RESULTS.glob("fold_quality_*.json")):
        r = json.loads(path.read_text())
        g = r["goal"]
        parts += [
            f"## {r['model']} ({r['layers']} blocks)",
            "",
            f"Calibration: {r['calibration']}; cure steps of {r['fold_config']['batch_size']} samples "
            f"(column 'cure'), lr {r['fold_config']['lr']} (norms) / "
            f"{r['fold_config']['lr'] * r['fold_config']['weight_lr_scale']:g} (block weights); {r['seconds'] / 60:.1f} min on {r['host']['cpus']} "
            f"cores, {r['host']['threads']} torch thread(s), load average {r['host']['load'][0]:.1f}.",
            "",
            table(r),
            "",
            "Block rankings, most important first (gates@N: trained for a budget of N removed blocks):",
            "",
            *[
                f"- {m}: {rank(sc)} (scores {', '.join(f'{v:.3g}' for v in sc)})"
                for m, sc in r["scores"].items()
            ],
            "",
            f"Goal ({g['unique_blocks']}/{r['layers']} unique blocks): best fold {label(g['best'])} by "
            f"{g['best']['importance']}: held-out Shakespeare ppl {g['best_ppl']:.1f} vs original {g['original_ppl']:.1f} "
            f"(within 10%: {'yes' if g['within_10pct'] else 'no'}); ShortGPT baseline {g['shortgpt_ppl']:.1f} "
            f"(beaten: {'yes' if g['beats_shortgpt'] else 'no'}).",
            "",
        ]
    (RESULTS / "fold_quality.md").write_text("\n".join(parts))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mix-llama-14m", "stories260k"])
    p.add_argument("--eval-tokens", type=int, default=4096, help="tokens of each eval text (cap for speed)")
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--n-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--cure-steps", type=int, default=40, help="cure budget of the grid and its init rows")
    p.add_argument(
        "--goal-cure-steps",
        type=int,
        default=FoldConfig(structure="blocks").cure_steps,
        help="cure budget of the goal rows (default: a block fold's, FoldConfig's)",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core host)"
    )
    p.add_argument(
        "--markdown-only", action="store_true", help="only rebuild fold_quality.md from the JSON files"
    )
    p.add_argument(
        "--no-artifacts",
        dest="artifacts",
        action="store_false",
        help="skip exporting each fold to ONNX for artifact MB and peak RSS",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in [] if args.markdown_only else args.models:
        result = Bench(name, args).measure()
        (RESULTS / f"fold_quality_{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"\n{name}\n{table(result)}\n{json.dumps(result['goal'])}")
    write_markdown()


if __name__ == "__main__":
    main()
