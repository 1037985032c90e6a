"""Folding plan: how many blocks a removal rate deletes, how share groups cover the retained positions.

Pure functions on integers and lists; each refuses bad input with a one-line EdgepackError naming the fix.
"""

from __future__ import annotations

from edgepack.errors import EdgepackError

GROUPS_HINT = "--share-groups 0,1;2,3;4 (recipe: share_group: [[0, 1], [2, 3], [4]])"


def removal_count(remove: float, num_layers: int) -> int:
    """Whole blocks removed at rate ``remove`` (nearest integer); refuses to remove every block."""
    n = int(remove * num_layers + 0.5)
    if n >= num_layers:
        limit = (num_layers - 0.5) / num_layers
        raise EdgepackError(
            f"--remove {remove} would delete all {num_layers} blocks; pass --remove below {limit:.2f} "
            "to keep at least one"
        )
    return n


def resolve_groups(share_group: int | list[list[int]] | None, n_kept: int) -> list[list[int]]:
    """Share groups over retained positions 0..n_kept-1: singletons, runs of ``share_group`` (the last one
    shorter when it does not divide n_kept), or checked explicit groups."""
    if share_group is None:
        return [[i] for i in range(n_kept)]
    if isinstance(share_group, int):
        return [list(range(i, min(i + share_group, n_kept))) for i in range(0, n_kept, share_group)]
    flat = [i for group in share_group for i in group]
    if sorted(flat) != list(range(n_kept)):
        raise EdgepackError(
            f"--share-groups {format_groups(share_group)} does not cover the {n_kept} retained positions "
            f"exactly; list each of 0..{n_kept - 1} once, e.g. {GROUPS_HINT}"
        )
    for group in share_group:
        if group != list(range(group[0], group[0] + len(group))):
            raise EdgepackError(
                f"share group {format_groups([group])} is not a run of consecutive positions; "
                f"share only neighbours, e.g. {GROUPS_HINT}"
            )
    return [list(group) for group in share_group]


def format_groups(groups: list[list[int]]) -> str:
    """Groups in the CLI's --share-groups syntax: [[0, 1], [2]] -> '0,1;2'."""
    return ";".join(",".join(str(i) for i in group) for group in groups)


def max_pairs(n_kept: int) -> int:
    """How many disjoint neighbour pairs fit among positions 1..n_kept-1."""
    return max(n_kept - 1, 0) // 2


def check_pairs(share_pairs: int, n_kept: int) -> None:
    """Refuse more share pairs than the retained positions hold (position 0 never shares)."""
    if share_pairs > max_pairs(n_kept):
        raise EdgepackError(
            f"share_pairs={share_pairs} needs {2 * share_pairs + 1} retained blocks, only {n_kept} are left; "
            f"set share_pairs <= {max_pairs(n_kept)} in the recipe or pass a smaller --remove"
        )


def least_important_pairs(kept: list[int], scores: list[float], k: int) -> list[list[int]]:
    """Groups over retained positions with ``k`` disjoint neighbour pairs (never position 0) whose blocks
    have the lowest summed score; every other position stays alone. ``kept``: original block per position."""
    order = sorted(range(1, len(kept) - 1), key=lambda p: scores[kept[p]] + scores[kept[p + 1]])
    chosen: list[int] = []
    for p in order:
        if len(chosen) < k and all(abs(p - q) > 1 for q in chosen):
            chosen.append(p)
    in_pair = {p: [p, p + 1] for p in chosen}
    groups, p = [], 0
    while p < len(kept):
        groups.append(in_pair.get(p, [p]))
        p += len(groups[-1])
    return groups


def check_share_group(share_group) -> None:
    """Config-time shape check of ``share_group`` (coverage is checked at fold time, against the model)."""
    if share_group is None:
        return
    if isinstance(share_group, bool):
        raise EdgepackError(
            f"share_group must be a group size or a list of groups, not a bool; e.g. {GROUPS_HINT}"
        )
    if isinstance(share_group, int):
        if share_group < 1:
            raise EdgepackError(f"--share-groups {share_group} must be >= 1 (1 = no sharing)")
        return
    ok = isinstance(share_group, (list, tuple)) and all(
        isinstance(g, (list, tuple)) and g and all(isinstance(i, int) and not isinstance(i, bool) for i in g)
        for g in share_group
    )
    if not ok:
        raise EdgepackError(
            f"share_group={share_group!r} is not valid; pass a group size like --share-groups 2, or groups like "
            f"{GROUPS_HINT}"
        )


def rank(scores: list[float]) -> list[int]:
    """Block indices by descending score (ties keep the lower index first)."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])
