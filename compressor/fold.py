"""FoldGPT depth folding: rank decoder blocks, remove the least important, share weights in groups, cure.

``fold(model, FoldConfig(...), calib_ids)`` edits a HF ``*ForCausalLM`` in place and returns a ``FoldReport``.
Representation contract (the exporter and quantizer rely on it):

- the family's decoder layers hold only the retained positions; ``config.num_hidden_layers`` (and
  ``layer_types``) match; each attention module's ``layer_idx`` is its new position 0..n-1, so every position
  has its own KV slot.
- Positions in one share group hold the *same* ``nn.Parameter`` objects for every non-norm weight (q/k/v/o,
  gate/up/down, biases); norms stay distinct per position. Modules are never shared (that would share layer_idx).
- No gates or hooks are left behind; the model runs ``forward``/``generate`` with a DynamicCache as before.
- ``structure="mlp-width"`` (fold_width.py) keeps every position and narrows every MLP to one smaller
  ``config.intermediate_size`` instead.
- ``structure="auto"`` (the default) builds both kinds, keeps the one whose result drifts least from the
  original on held-out samples of the model's own text, and leaves the model exactly as that structure alone
  would fold it (``fold_auto``); the manifest records every candidate's held-out KL.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from edgepack.compressor.fold_cure import cure, norm_parameters, sample_kls
from edgepack.compressor.fold_hooks import decoder_layers
from edgepack.compressor.fold_importance import IMPORTANCE
from edgepack.compressor.fold_plan import (
    check_pairs,
    check_share_group,
    least_important_pairs,
    rank,
    removal_count,
    resolve_groups,
)
from torch import nn

from edgepack.errors import EdgepackError
from edgepack.families import family_of
from edgepack.textdata import calibration_samples, read_text

log = logging.getLogger(__name__)

# what the removed parameters are taken from: whole blocks, MLP width, or the one of the two that a held-out
# check prefers ("auto"; sharing asked for: blocks)
STRUCTURES = ("auto", "blocks", "mlp-width")
INITS = ("important", "mean")  # how a share group's weights start: its most important block's, or the average
BASELINES = ("bi", "drop_one")  # always scored and reported next to the chosen importance method


@dataclass
class FoldConfig:
    """Recipe step: remove a fraction of decoder blocks, share weights within groups, cure by distillation."""

    remove: float = 0.25  # fraction of blocks to delete (rounded to whole blocks)
    # "mlp-width": the parameters of those blocks come from every block's MLP width instead (fold_width.py);
    # "auto": whichever of blocks / mlp-width drifts less from the original on held-out samples (fold_auto)
    structure: str = "auto"
    share_group: int | list[list[int]] | None = None  # group size, or explicit groups of retained positions
    share_pairs: int = 0  # or: share the N least important neighbour pairs of retained blocks (not block 0)
    importance: str = "gates"  # "gates" | "bi" | "drop_one"
    init: str = "important"  # shared weights start as the group's most important block's, or "mean"
    # None: the structure's default, 100 for blocks, 200 for mlp-width (closer to the original by KL on every
    # text of both models measured than 100; generalization.md round 17)
    cure_steps: int | None = None
    lr: float = 4e-3  # norms; block weights use lr * weight_lr_scale (best of 2e-3/4e-3/8e-3 on mix-llama)
    weight_lr_scale: float = 0.1
    # the cure trains the norms and: True every block weight (shared ones included), False none, "mlp" the MLPs'
    # only (attention stays the original's); None: the structure's default, True for blocks, "mlp" for
    # mlp-width (whose attention the fold leaves as it was: off the cure's domain +16.9% against +21.8%,
    # generalization.md round 15)
    cure_weights: bool | str | None = None
    # hold ``held_out`` of the cure samples out and keep the weights of the check (every cure_check_every steps,
    # and uncured) with the least KL to the original on them (a width fold only). Off by default: on both models
    # the held-out KL fell at every check up to 200 steps, so it never stopped, and it takes 1/8 of the samples
    # from the cure (generalization.md round 17); on, the manifest records the curve and the step kept
    cure_stop: bool = False
    cure_check_every: int = 25
    distill_layers: int = 2  # tail layers matched on hidden states (0 = logits only)
    hidden_weight: float = 1.0
    # calibration/cure samples (windows of the text, or the model's own samples), also the model's samples that
    # choose a width fold's channels; None: the structure's default, 32 for blocks, 128 for mlp-width (lower mean
    # KL to the original than 32 on every text, both models, both cure sources; generalization.md round 18)
    n_samples: int | None = None
    seq_len: int = 256
    batch_size: int = 4
    gate_steps: int = 60
    gate_lr: float = 0.1
    gate_init: float = 3.0  # gate logit at start: sigmoid(3) = 0.95
    gate_sparsity: float = 1.0  # hinge penalty per unit of gate mass above the kept-block budget
    gate_polarization: float = 0.2  # weight of sum g(1-g), pushing gates to 0 or 1
    share_check: bool = True  # sharing only if it beats plain removal of as many unique blocks (held-out KL)
    held_out: float = 0.125  # fraction of the calibration samples the share check holds out of the cure
    seed: int = 0
    version: int = 1

    kind = "fold"

    def __post_init__(self) -> None:
        if (
            isinstance(self.remove, bool)
            or not isinstance(self.remove, (int, float))
            or not 0 <= self.remove < 1
        ):
            raise EdgepackError(
                f"remove={self.remove!r} is not a fraction of blocks; pass a number in [0, 1), e.g. remove=0.25"
            )
        check_share_group(self.share_group)
        if (
            not isinstance(self.share_pairs, int)
            or isinstance(self.share_pairs, bool)
            or self.share_pairs < 0
        ):
            raise EdgepackError(f"share_pairs={self.share_pairs!r} must be a non-negative integer")
        if self.share_pairs and self.share_group is not None:
            raise EdgepackError("pass either share_group or share_pairs, not both")
        if self.importance not in IMPORTANCE:
            raise EdgepackError(
                f"importance={self.importance!r} is unknown; choose one of {', '.join(sorted(IMPORTANCE))}"
            )
        if self.structure not in STRUCTURES:
            raise EdgepackError(
                f"structure={self.structure!r} is unknown; choose one of {', '.join(STRUCTURES)}"
            )
        sharing = self.share_group is not None or self.share_pairs
        if self.structure == "auto" and sharing:
            self.structure = "blocks"  # sharing is a block fold's (its own check weighs it against removal)
        if self.structure == "mlp-width" and sharing:
            raise EdgepackError(
                "a width fold shares no blocks; drop share_group/share_pairs or use structure=blocks"
            )
        width, auto = self.structure == "mlp-width", self.structure == "auto"
        # auto keeps the cure settings it was given (None = each candidate's own default, resolved per structure)
        if self.cure_weights is None and not auto:
            self.cure_weights = "mlp" if width else True
        if self.cure_steps is None and not auto:
            self.cure_steps = 200 if width else 100
        if self.n_samples is None:
            self.n_samples = 32 if self.structure == "blocks" else 128
        if not isinstance(self.cure_stop, bool):
            raise EdgepackError(f"cure_stop={self.cure_stop!r} must be true or false")
        if self.cure_stop and not width:
            raise EdgepackError(
                "cure_stop applies to structure=mlp-width (a block fold's share check holds its samples out); "
                "drop cure_stop or use structure=mlp-width"
            )
        if not (
            isinstance(self.cure_weights, bool)
            or self.cure_weights == "mlp"
            or (auto and self.cure_weights is None)
        ):
            raise EdgepackError(f'cure_weights={self.cure_weights!r} must be true, false or "mlp"')
        if self.init not in INITS:
            raise EdgepackError(f"init={self.init!r} is unknown; choose one of {', '.join(INITS)}")
        for name in ("n_samples", "batch_size", "gate_steps", "cure_check_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise EdgepackError(f"{name}={getattr(self, name)!r} must be a positive integer")
        for name in ("cure_steps", "distill_layers", "seed"):
            if name == "cure_steps" and auto and self.cure_steps is None:
                continue
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise EdgepackError(f"{name}={getattr(self, name)!r} must be a non-negative integer")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise EdgepackError(f"seq_len={self.seq_len!r} must be an integer >= 2")
        if not 0 < self.held_out < 1:
            raise EdgepackError(f"held_out={self.held_out!r} must be a fraction in (0, 1), e.g. 0.125")
        for name in ("lr", "gate_lr", "weight_lr_scale"):
            if not getattr(self, name) > 0:
                raise EdgepackError(f"{name}={getattr(self, name)!r} must be > 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FoldConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise EdgepackError(f"unknown fold keys {sorted(unknown)}; allowed: {', '.join(sorted(known))}")
        return cls(**d)


@dataclass
class FoldReport:
    """What folding did, for logs and the artifact manifest. Blocks are original indices, groups positions."""

    original_layers: int
    kept: list[int]
    removed: list[int]
    groups: list[list[int]]
    importance: str
    init: str
    scores: dict[str, list[float]]  # method -> one score per original block, higher = more important
    rankings: dict[str, list[int]]  # method -> original blocks, most important first
    block_params_before: int  # unique parameters in the decoder blocks
    block_params_after: int
    cure_loss: list[float] = field(default_factory=list)  # per cure step
    distill_loss_before: float | None = None
    distill_loss_after: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    share_check: dict | None = None  # sharing vs plain removal: held-out KL of each and the decision
    # structure mlp-width: channels before/after, per block energy kept and refit R^2
    width: dict | None = None
    # cure_stop: held-out samples, their KL to the original at each check ([step, KL]), the step kept
    cure_held_out: dict | None = None
    structure: str = "blocks"  # what was built: "blocks" or "mlp-width"
    # structure auto: each candidate's held-out KL to the original (mean and per sample) and the decision
    structure_check: dict | None = None

    @property
    def ranking(self) -> list[int]:
        """Original blocks ranked by the chosen importance method, most important first."""
        return self.rankings[self.importance]

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- plan: how many blocks, which groups


def unique_parameter_count(module: nn.Module) -> int:
    """Number of parameter elements, counting each ``nn.Parameter`` object once (shared weights count once)."""
    seen = {id(p): p.numel() for _, p in module.named_parameters(remove_duplicate=False)}
    return sum(seen.values())


# ---------------------------------------------------------------- structural edit


def shared_parameter_names(layer: nn.Module) -> list[str]:
    """Names of a block's parameters that a share group shares: everything except its norms."""
    norms = {id(p) for p in norm_parameters(layer)}
    return [name for name, p in layer.named_parameters() if id(p) not in norms]


def _set_parameter(root: nn.Module, name: str, param: nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, leaf, param)


def restructure(
    model: nn.Module, kept: list[int], groups: list[list[int]], scores: list[float], init: str
) -> None:
    """Keep blocks ``kept`` (original indices, ascending), share weights within position ``groups``, renumber."""
    layers = decoder_layers(model)
    new = nn.ModuleList([layers[i] for i in kept])
    for group in groups:
        if len(group) < 2:
            continue
        members = [new[p] for p in group]
        source = members[max(range(len(group)), key=lambda j: scores[kept[group[j]]])]
        for name in shared_parameter_names(source):
            if init == "mean":
                with torch.no_grad():
                    stacked = torch.stack([m.get_parameter(name) for m in members])
                    param = nn.Parameter(
                        stacked.mean(0), requires_grad=source.get_parameter(name).requires_grad
                    )
            else:
                param = source.get_parameter(name)
            for m in members:
                _set_parameter(m, name, param)
    for pos, layer in enumerate(new):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = pos
    parent, _, child = family_of(model).layers.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    config = model.config
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept]
    config.num_hidden_layers = len(kept)


# ---------------------------------------------------------------- entry points


def calibration_ids(tokenizer, path: str | Path, config: FoldConfig) -> torch.Tensor:
    """Calibration/cure samples (n_samples, seq_len) from any local text file."""
    return calibration_samples(tokenizer, read_text(path), config.n_samples, config.seq_len, config.seed)


def score_blocks(
    model: nn.Module, calib_ids: torch.Tensor, config: FoldConfig, methods: list[str]
) -> dict[str, list[float]]:
    """Importance scores per block for each of ``methods`` (higher = more important); the model is unchanged."""
    was_training = model.training
    model.eval()
    out = {}
    for method in methods:
        t0 = time.perf_counter()
        out[method] = IMPORTANCE[method](model, calib_ids, config)
        log.info(
            "fold: %s scores %s (%.1fs)",
            method,
            " ".join(f"{s:.3g}" for s in out[method]),
            time.perf_counter() - t0,
        )
    model.train(was_training)
    return out


def _check_ids(calib_ids) -> None:
    if (
        not isinstance(calib_ids, torch.Tensor)
        or calib_ids.dtype != torch.long
        or calib_ids.dim() != 2
        or calib_ids.shape[1] < 2
    ):
        raise EdgepackError(
            "calibration ids must be a (n_samples, seq_len >= 2) LongTensor; build them with calibration_ids()"
        )
    if len(calib_ids) == 0:
        raise EdgepackError("no calibration samples; pass a calibration text file with --calib")


def fold(
    model: nn.Module,
    config: FoldConfig,
    calib_ids: torch.Tensor,
    scores: dict[str, list[float]] | None = None,
    channel_ids: torch.Tensor | None = None,
    baselines: tuple[str, ...] = BASELINES,
    held_ids: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
) -> FoldReport:
    """Fold ``model`` in place (see the module docstring for the result's contract): score the blocks, remove
    the lowest-ranked, share weights within groups, cure by distillation from a copy of the original.
    ``scores`` may carry precomputed importance ({method: one score per block}) to skip recomputing it.
    ``channel_ids``: for ``structure="mlp-width"``, the samples that choose and refit the MLP channels
    (default ``calib_ids``; the pipeline passes the model's own samples). ``baselines``: the importance methods
    scored and reported beside the chosen one (a candidate of ``fold_auto``, whose report is discarded: none).
    ``held_ids``: for ``structure="auto"``, samples of the model's own text that no candidate is built on, to
    choose between them (the pipeline draws them apart, ``selfcalib.held_out_config``); without them auto holds
    out part of ``channel_ids`` and folds the winner afresh. ``teacher``: a module equal to ``model`` as it is
    now, left unchanged, to distil from (``fold_auto`` passes the original a candidate was copied from);
    default: a copy of ``model``. The cure holds the original as its teacher on the model's device: twice the
    model's memory meanwhile."""
    _check_ids(calib_ids)
    layers = decoder_layers(model)
    n = len(layers)
    n_remove = removal_count(config.remove, n)
    if config.structure == "auto":
        for extra in (channel_ids, held_ids):
            if extra is not None:
                _check_ids(extra)
        return fold_auto(model, config, calib_ids, n_remove, channel_ids, held_ids)
    if config.structure == "mlp-width":
        if channel_ids is not None:
            _check_ids(channel_ids)
        return fold_mlp_width(
            model, config, calib_ids, n_remove, calib_ids if channel_ids is None else channel_ids, teacher
        )
    groups = resolve_groups(config.share_group, n - n_remove)
    check_pairs(config.share_pairs, n - n_remove)
    if config.distill_layers > n - n_remove:
        raise EdgepackError(
            f"distill_layers={config.distill_layers} exceeds the {n - n_remove} retained blocks; "
            f"pass distill_layers <= {n - n_remove}"
        )
    t0 = time.perf_counter()
    scores = dict(scores or {})
    for method, s in scores.items():
        if len(s) != n:
            raise EdgepackError(
                f"precomputed {method} scores have {len(s)} entries for {n} blocks; recompute them"
            )
    wanted = [m for m in (config.importance, *baselines) if m not in scores]
    scores.update(score_blocks(model, calib_ids, config, list(dict.fromkeys(wanted))))
    seconds = {"importance": time.perf_counter() - t0}
    rankings = {method: rank(s) for method, s in scores.items()}
    order = rankings[config.importance]
    kept = sorted(order[: n - n_remove])
    removed = sorted(order[n - n_remove :])
    if config.share_pairs:
        groups = least_important_pairs(kept, scores[config.importance], config.share_pairs)
    log.info("fold: %s ranking %s; removing blocks %s", config.importance, order, removed)

    changed = n_remove > 0 or any(len(g) > 1 for g in groups)
    check = config.share_check and any(len(g) > 1 for g in groups) and len(calib_ids) >= 2
    cure_ids, held_ids = split_held_out(calib_ids, config.held_out) if check else (calib_ids, None)
    need_teacher = (config.cure_steps and changed) or check
    if need_teacher and teacher is None:
        teacher = copy.deepcopy(model)
    elif not need_teacher:
        teacher = None  # nothing to cure
    n_alt = n_remove + sum(len(g) - 1 for g in groups)  # blocks a plain removal drops for the same size
    removals = removal_candidates(rankings, (config.importance, "bi"), n - n_alt) if check else {}
    before = unique_parameter_count(layers)
    restructure(model, kept, groups, scores[config.importance], config.init)
    after = unique_parameter_count(decoder_layers(model))
    log.info(
        "fold: %d -> %d blocks, groups %s, unique block params %d -> %d", n, len(kept), groups, before, after
    )
    report = FoldReport(
        original_layers=n,
        kept=kept,
        removed=removed,
        groups=groups,
        importance=config.importance,
        init=config.init,
        scores=scores,
        rankings=rankings,
        block_params_before=before,
        block_params_after=after,
        seconds=seconds,
    )
    if teacher is not None and config.cure_steps:
        t0 = time.perf_counter()
        result = cure(model, teacher, cure_ids, config)
        report.cure_loss = result.curve
        report.distill_loss_before, report.distill_loss_after = result.before, result.after
        report.seconds["cure"] = time.perf_counter() - t0
    if removals:
        check_sharing(model, removals, teacher, calib_ids, held_ids, config, report)
    model.eval()
    return report


def fold_mlp_width(
    model: nn.Module,
    config: FoldConfig,
    calib_ids: torch.Tensor,
    n_remove: int,
    channel_ids: torch.Tensor,
    teacher: nn.Module | None = None,
) -> FoldReport:
    """The width structure: every block keeps its place, and its MLP loses the channels that sum to the
    parameters of ``n_remove`` blocks (``fold_width``); then the same cure as a removal."""
    from edgepack.compressor.fold_width import fold_width

    layers = decoder_layers(model)
    n = len(layers)
    before = unique_parameter_count(layers)
    report = FoldReport(
        original_layers=n,
        kept=list(range(n)),
        removed=[],
        groups=[],
        importance="mlp-energy",
        init=config.init,
        scores={},
        rankings={"mlp-energy": list(range(n))},
        block_params_before=before,
        block_params_after=before,
        structure="mlp-width",
    )
    if not n_remove:
        return report
    teacher = copy.deepcopy(model) if teacher is None else teacher
    t0 = time.perf_counter()
    report.width = fold_width(model, teacher, n_remove, channel_ids, config.batch_size)
    report.seconds["width"] = time.perf_counter() - t0
    report.block_params_after = unique_parameter_count(decoder_layers(model))
    log.info("fold: MLP width, unique block params %d -> %d", before, report.block_params_after)
    if config.cure_steps:
        t0 = time.perf_counter()
        stop = config.cure_stop and len(calib_ids) >= 2
        if config.cure_stop and not stop:
            log.warning(
                "fold: one cure sample, none to hold out: the cure runs all %d steps", config.cure_steps
            )
        cure_ids, held_ids = split_held_out(calib_ids, config.held_out) if stop else (calib_ids, None)
        result = cure(model, teacher, cure_ids, config, held_ids=held_ids)
        report.cure_loss = result.curve
        report.distill_loss_before, report.distill_loss_after = result.before, result.after
        report.cure_held_out = result.held_out
        report.seconds["cure"] = time.perf_counter() - t0
    model.eval()
    return report


def structure_candidates(
    config: FoldConfig, rankings: dict[str, list[int]], n_keep: int
) -> dict[str, FoldConfig]:
    """The folds ``structure="auto"`` weighs, by label: the width fold, and removal of whole blocks by the
    configured importance and by block influence (ShortGPT's BI, the yardstick the fold must never lose to),
    distinct kept sets only. Each resolves its own structure's defaults for what ``config`` leaves unset."""
    out = {"mlp-width": replace(config, structure="mlp-width")}
    for label in removal_candidates(rankings, (config.importance, "bi"), n_keep):
        method = label.split(":", 1)[1]
        out[label] = replace(config, structure="blocks", importance=method, share_check=False)
    return out


def fold_auto(
    model: nn.Module,
    config: FoldConfig,
    calib_ids: torch.Tensor,
    n_remove: int,
    channel_ids: torch.Tensor | None,
    held_ids: torch.Tensor | None = None,
) -> FoldReport:
    """``structure="auto"``: build and cure every candidate of ``structure_candidates`` and keep the one whose
    next-token distributions drift least from the original's on held-out samples of the model's own text
    (lowest mean KL). Those samples are the model's own, so the choice judges the fold on the model's
    distribution, not on the cure text's domain. The report records each candidate's held-out KL and the
    decision, and the result is exactly the fold the winner's structure alone makes (its measurements hold).

    With ``held_ids`` (samples drawn apart from every fitting sample; what the pipeline passes) each candidate
    is that plain fold itself, built on every sample, and the winner becomes ``model``: no fold is built twice.
    Without them, the last ``held_out`` of the own samples (``channel_ids``; the calibration samples when none
    are given) are held out of every candidate, and ``model`` is then folded afresh, on every sample, as the
    winner's structure alone would. Memory: the original (every candidate's teacher), the best candidate so
    far and the one being built."""
    own = calib_ids if channel_ids is None else channel_ids
    if not n_remove or (held_ids is None and len(own) < 2):
        if n_remove:
            log.warning("fold: one sample, none to hold out: structure auto folds blocks")
        return fold(model, replace(config, structure="blocks"), calib_ids, channel_ids=channel_ids)
    t0 = time.perf_counter()
    apart = held_ids is not None
    if apart:  # every candidate is the plain fold: all samples, the baselines scored once for its report
        fit, held, cure_ids, baselines = channel_ids, held_ids, calib_ids, BASELINES
    else:
        fit, held = split_held_out(own, config.held_out)
        self_cured = own is calib_ids or torch.equal(own, calib_ids)
        cure_ids = fit if self_cured else calib_ids  # the cure text holds the held-out samples out too
        baselines = ()  # the final fold scores and reports them
    layers = decoder_layers(model)
    skipped = {}
    try:  # a family without one gated MLP width (fused gate/up, per-layer widths) cannot narrow its MLPs
        from edgepack.compressor.fold_width import plan_width

        plan_width(layers, model.config.hidden_size, n_remove)
    except EdgepackError as e:
        skipped["mlp-width"] = str(e)
        log.warning("fold: structure auto without the width fold: %s", e)
    # the two rankings the removal candidates keep blocks by (and, built on all samples, the baselines)
    methods = list(dict.fromkeys((config.importance, "bi", *baselines)))
    scores = score_blocks(model, cure_ids, replace(config, structure="blocks"), methods)
    candidates = structure_candidates(config, {m: rank(s) for m, s in scores.items()}, len(layers) - n_remove)
    for label in skipped:
        del candidates[label]
    if len(candidates) == 1:  # nothing to weigh: the one block fold, as structure=blocks builds it
        ((label, only),) = candidates.items()
        report = fold(model, only, calib_ids, scores=scores if apart else None)
        report.structure_check = {"decision": label, "skipped": skipped, "held_out_kl": {}}
        return report
    per_sample: dict[str, list[float]] = {}
    best: tuple[float, nn.Module, FoldReport] | None = None
    for label, candidate_config in candidates.items():
        candidate = copy.deepcopy(model)  # the model stays the original: every candidate's teacher
        built = fold(
            candidate,
            candidate_config,
            cure_ids,
            scores=scores,
            channel_ids=fit,
            baselines=baselines,
            teacher=model,
        )
        per_sample[label] = sample_kls(candidate, model, held, config.batch_size)
        loss = sum(per_sample[label]) / len(per_sample[label])
        if apart and (best is None or loss < best[0]):
            best = (loss, candidate, built)  # kept: it is the plain fold of its structure
        del candidate, built
    losses = {label: sum(v) / len(v) for label, v in per_sample.items()}
    decision = min(losses, key=losses.get)
    log.info(
        "fold: structure auto, held-out KL %s -> %s", {k: round(v, 4) for k, v in losses.items()}, decision
    )
    if best is not None:
        _, winner, report = best
        model.__dict__.update(winner.__dict__)  # in place, as every fold: the model becomes the winner
        checked = time.perf_counter() - t0 - sum(report.seconds.values())
    else:
        checked = time.perf_counter() - t0
        report = fold(model, candidates[decision], calib_ids, channel_ids=channel_ids)
    report.structure_check = {
        "decision": decision,
        "held_out_kl": losses,
        "held_out_kl_per_sample": per_sample,
        "held_out_samples": len(held),
        "held_out_from": (
            "own samples drawn apart (no candidate built on them)"
            if apart
            else "channel_ids (the model's own samples)"
            if channel_ids is not None
            else "calib_ids"
        ),
        "skipped": skipped,
        "candidates": {
            label: {
                "structure": c.structure,
                "importance": c.importance if c.structure == "blocks" else None,
                "cure_steps": c.cure_steps,
                "cure_weights": c.cure_weights,
            }
            for label, c in candidates.items()
        },
    }
    report.seconds["structure_check"] = checked
    return report


def split_held_out(ids: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cure, held-out) samples: the last ``fraction`` of the rows (at least one) are held out."""
    k = min(max(1, round(fraction * len(ids))), len(ids) - 1)
    return ids[:-k], ids[-k:]


def removal_candidates(
    rankings: dict[str, list[int]], methods: tuple[str, ...], n_keep: int
) -> dict[str, list[int]]:
    """Plain removals to weigh sharing against: {"remove:<method>": kept blocks}, distinct kept sets only."""
    out: dict[str, list[int]] = {}
    for method in dict.fromkeys(methods):
        kept = sorted(rankings[method][:n_keep])
        if kept not in out.values():
            out[f"remove:{method}"] = kept
    return out


def choose_fold(per_sample: dict[str, list[float]], base: str) -> str:
    """The fold to keep from held-out KLs per sample ({label: one KL per held-out sample}): ``base`` (removal by
    block influence, the choice that held on every model and cure text measured) unless another fold drifts
    less on EVERY held-out sample; among those, the lowest mean. A handful of held-out samples cannot rank
    folds whose means differ by a few percent (mix-llama-14m, self-generated cure text: KL 0.397 / 0.406 /
    0.411, while WikiText-2 perplexity differed 2.2x), so a win must be unanimous."""

    def mean(label: str) -> float:
        return sum(per_sample[label]) / len(per_sample[label])

    wins = [
        label
        for label, kls in per_sample.items()
        if label != base and all(a < b for a, b in zip(kls, per_sample[base], strict=True))
    ]
    return min(wins, key=mean) if wins else base


def check_sharing(
    model: nn.Module,
    removals: dict[str, list[int]],
    teacher: nn.Module,
    calib_ids: torch.Tensor,
    held_ids: torch.Tensor,
    config: FoldConfig,
    report: FoldReport,
) -> None:
    """Build and cure each plain removal in ``removals`` ({label: kept original blocks}, as many unique
    blocks as the shared fold) like the shared fold, and pick by the drift from ``teacher`` on held-out samples
    (``choose_fold``); then cure the winner afresh on every calibration sample, so a removal that wins equals
    the plain fold. Records every loss and the decision."""
    t0 = time.perf_counter()
    cure_ids = calib_ids[: len(calib_ids) - len(held_ids)]
    per_sample = {"share": sample_kls(model, teacher, held_ids, config.batch_size)}
    for label, kept in removals.items():
        candidate = copy.deepcopy(teacher)
        singles = [[p] for p in range(len(kept))]
        restructure(candidate, kept, singles, report.scores[config.importance], config.init)
        if config.cure_steps:
            cure(candidate, teacher, cure_ids, config)
        per_sample[label] = sample_kls(candidate, teacher, held_ids, config.batch_size)
        del candidate  # the winner is rebuilt below: one candidate in memory at a time
    best_label = choose_fold(per_sample, "remove:bi" if "remove:bi" in removals else next(iter(removals)))
    losses = {label: sum(v) / len(v) for label, v in per_sample.items()}
    report.share_check = {
        "decision": best_label,
        "held_out_kl": losses,
        "held_out_kl_per_sample": per_sample,
        "held_out_samples": len(held_ids),
        "candidates": removals,
    }
    log.info("fold: held-out KL %s -> %s", {k: round(v, 4) for k, v in losses.items()}, best_label)
    kept, groups, best_result = report.kept, report.groups, None
    if best_label != "share":
        kept = removals[best_label]
        groups = [[p] for p in range(len(kept))]
    if best_label == "share" and not config.cure_steps:
        report.seconds["share_check"] = time.perf_counter() - t0
        return  # the model is the uncured shared fold already
    best = copy.deepcopy(teacher)  # the winner afresh: cured on every sample (held-out ones only decided)
    restructure(best, kept, groups, report.scores[config.importance], config.init)
    if config.cure_steps:
        best_result = cure(best, teacher, calib_ids, config)
    report.seconds["share_check"] = time.perf_counter() - t0
    model.model.layers = best.model.layers
    model.model.norm = best.model.norm
    model.config.num_hidden_layers = best.config.num_hidden_layers
    if isinstance(getattr(best.config, "layer_types", None), list):
        model.config.layer_types = list(best.config.layer_types)
    report.kept = kept
    report.removed = [i for i in range(report.original_layers) if i not in kept]
    report.groups = groups
    report.block_params_after = unique_parameter_count(decoder_layers(model))
    if best_result is not None:
        report.cure_loss = best_result.curve
        report.distill_loss_before, report.distill_loss_after = best_result.before, best_result.after
