"""``edgepack inspect``: verify an artifact folder against its manifest and summarise it."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from edgepack.errors import EdgepackError
from edgepack.families import Family, family_for

# The manifest keys edgepack's own loaders read, with their JSON types (runner.py needs only "files").
MANIFEST_KEYS: dict[str, type | tuple[type, ...]] = {
    "edgepack_version": str,
    "source": dict,
    "recipe": dict,
    "target": dict,
    "parameters": int,
    "num_layers": int,
    "model_bytes": int,
    "bits_per_weight": (int, float),
    "ops": dict,
    "opsets": dict,
    "tensors": list,
    "compression": dict,
}
NESTED_KEYS = {
    "source": ("path", "architecture"),
    "target": ("name", "dtype", "file_format"),
    "recipe": ("steps",),
}


def load_manifest(folder: Path) -> dict:
    """The manifest of an artifact folder, after the runner's checks (every file listed, inside, intact)."""
    from edgepack.runtime.runner import RunnerError, verify_artifact

    try:
        manifest = verify_artifact(Path(folder))
    except RunnerError as e:
        raise EdgepackError(str(e)) from e
    check_manifest(manifest, Path(folder) / "manifest.json")
    return manifest


def check_manifest(m: dict, path: Path) -> None:
    """Refuse a manifest without the keys (and types) inspect, bench and the torch backend read."""
    bad = [k for k, t in MANIFEST_KEYS.items() if not isinstance(m.get(k), t) or isinstance(m.get(k), bool)]
    bad += [
        f"{k}.{sub}" for k, subs in NESTED_KEYS.items() if k not in bad for sub in subs if sub not in m[k]
    ]
    if bad:
        raise EdgepackError(
            f"{path} lacks or mistypes {', '.join(bad)}; it was not written by this edgepack: re-export the artifact"
        )


def tensor_group(name: str, fam: Family) -> str:
    """The part of the model an initializer belongs to, by the family's module names."""
    norms = (*fam.block_norms, fam.final_norm)
    for matches, label in (
        (name.startswith(f"{fam.embed}."), "embedding"),
        (name.startswith(f"{fam.lm_head}."), "lm_head"),
        (any(f"{n}.weight" in name for n in norms), "norms"),
        (f".{fam.attention}." in name, "attention"),
        (f".{fam.mlp}." in name, "mlp"),
    ):
        if matches:
            return label
    return "other"


def parity_flips(parity: dict) -> str:
    """The parity line's suffix '; K of N top-1 flips at near-ties' when the check saw any flip, else ''. A flip
    where the reference's top two logits are closer than the rounding error is a near-tie; greedy decodes part
    there, and "greedy 0.667" alone would read as a disagreement."""
    if not parity.get("flips"):
        return ""
    return f"; {parity.get('flips_at_ties', 0)} of {parity['flips']} top-1 flips at near-ties"


def fold_summary(fold: dict) -> str:
    """One line: what the fold removed (blocks, or MLP width) and, for structure auto, what it weighed."""
    width = fold.get("width")
    if width:
        text = f"MLP width {width['channels_before']} -> {width['channels_after']} in all {fold['original_layers']} blocks"
    else:
        text = f"{len(fold['kept'])} of {fold['original_layers']} blocks kept, removed {fold['removed']}"
        shared = [g for g in fold["groups"] if len(g) > 1]
        if shared:
            text += f", positions sharing weights {shared}"
    check = fold.get("structure_check")
    if check:
        kls = ", ".join(f"{label} {kl:.4f}" for label, kl in check["held_out_kl"].items())
        text += f"; structure auto chose {check['decision']}"
        text += f" (held-out KL to the original: {kls})" if kls else ""
        text += "".join(f"; {label} not possible: {why}" for label, why in check.get("skipped", {}).items())
    return text


def inspect_artifact(folder: Path, as_json: bool = False) -> str:
    m = load_manifest(folder)
    if as_json:
        summary = {
            k: m[k]
            for k in (
                "edgepack_version",
                "source",
                "recipe",
                "target",
                "parameters",
                "model_bytes",
                "bits_per_weight",
                "ops",
                "parity",
                "files",
            )
            if k in m
        }
        return json.dumps(summary, indent=2)
    lines = [
        f"artifact   {Path(folder).resolve()}  (checksums OK, {len(m['files'])} files)",
        f"source     {m['source']['path']} ({m['source']['architecture']}, {m['num_layers']} layers)",
        f"target     {m['target']['name']} ({m['target']['dtype']}, .{m['target']['file_format']})",
        f"recipe     {' -> '.join(s['kind'] for s in m['recipe']['steps']) or 'none (float)'}",
        f"params     {m['parameters']:,} unique, {m['bits_per_weight']} stored bits/weight",
        f"opset      {m['opsets']}  IR {m['ir_version']}",
        "ops        " + ", ".join(f"{k.split('::')[1]} x{v}" for k, v in m["ops"].items()),
    ]
    fold = m.get("compression", {}).get("fold")
    if fold:
        lines.append(f"fold       {fold_summary(fold)}")
    if m.get("parity"):
        p = m["parity"]
        lines.append(
            f"parity     max |dlogit| {p['max_abs_logit']:.2e}, top-1 {p['top1']:.3f}, greedy {p['greedy']:.3f} "
            f"({p['thresholds']}, {'passed' if p['passed'] else 'FAILED'}){parity_flips(p)}"
        )
    quality = m.get("quality")
    if quality and quality.get("measured"):
        lines.append(
            f"quality    top-1 {quality['top1_agreement']:.3f} vs the original, perplexity "
            f"{quality['perplexity_original']:.3f} -> {quality['perplexity']:.3f} on {quality['tokens']:,} tokens of "
            f"{quality['text']}"
        )
        from edgepack.pipeline import quality_warning

        warning = quality_warning(quality, m.get("recipe"))
        if warning:
            lines.append(f"WARNING    {warning}")
    elif quality:
        lines.append(f"quality    not measured: {quality.get('reason', 'no reason recorded')}")
    if any(s["name"].startswith("past_key_values.") for s in m["io"]["inputs"]):
        from edgepack.pipeline import kv_facts, kv_line

        plan = m.get("compression", {}).get("kv", {}).get("plan", {})
        lines.append(f"kv cache   {kv_line(kv_facts(m['io']['inputs'], plan.get('channel_group', 32)))}")
    lines.append("\nfiles")
    for name, size in m.get("file_bytes", {}).items():
        lines.append(f"  {name:32s} {size / 1e6:10.3f} MB")
    groups: dict[str, int] = defaultdict(int)
    fam = family_for(m["source"]["architecture"])
    for t in m["tensors"]:
        groups[tensor_group(t["name"], fam) if fam else "other"] += t["bytes"]
    total = sum(groups.values()) or 1
    lines.append("\nweights by part")
    for g, b in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {g:12s} {b / 1e6:10.3f} MB  {100 * b / total:5.1f}%")
    quant = m.get("compression", {}).get("quantize")
    if quant and quant.get("layers"):
        lines.append("\nquantized layers")
        lines.append(f"  {'name':44s} {'shape':>12s} {'bits':>4s} {'group':>5s} {'bytes':>10s} {'bpw':>6s}")
        for q in quant["layers"]:
            shape = "x".join(map(str, q["shape"]))
            lines.append(
                f"  {q['name']:44s} {shape:>12s} {q['bits']:>4d} {q['group']:>5d} "
                f"{q.get('bytes', 0):>10d} {q.get('bits_per_weight', float('nan')):>6.2f}"
            )
    return "\n".join(lines)
