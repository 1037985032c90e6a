"""The ``edgepack`` command line: export, inspect, targets (and bench, from the runtime)."""

from __future__ import annotations

import atexit
import errno
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import click

from edgepack import __version__
from edgepack.errors import EdgepackError

log = logging.getLogger("edgepack")
USER_OS_ERRORS = {
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EROFS,
}


class Cli(click.Group):
    """Turns EdgepackError into one line on stderr and exit code 2, with no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgepackError as e:
            fail(str(e))
        except click.UsageError as e:  # bad flag values: one line too, not click's usage block
            command = e.ctx.command_path if e.ctx else "edgepack"
            fail(f"{e.format_message()}; see `{command} -h`")
        except KeyboardInterrupt as e:
            # staging's carries what is on disk: "the partial artifact was removed", "OUT was already complete"
            click.echo(f"edgepack: interrupted; {e.args[0] if e.args else 'nothing was written'}", err=True)
            raise Interrupted(130) from None
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except OSError as e:  # a path the user gave that cannot be read or written
            if e.errno not in USER_OS_ERRORS or log.isEnabledFor(logging.DEBUG):
                raise
            fail(f"{e.filename or 'a file'}: {e.strerror}; check the path, free space and permissions")
        except Exception as e:  # a bug, not bad input: one line, the traceback only on request
            if log.isEnabledFor(logging.DEBUG):
                raise
            first = (str(e).strip().splitlines() or [""])[0]
            click.echo(
                f"edgepack: internal error: {type(e).__name__}: {first} (a bug; rerun with -vv for the "
                "traceback and report it)",
                err=True,
            )
            sys.exit(1)


class Interrupted(SystemExit):
    """Exit 130 after Ctrl-C, once the partial artifact is gone and the one line is printed.

    ``main`` ends the process itself on this one (atexit handlers first). Left to the interpreter, 4 runs in 40 of
    tests/test_bad_input.py::test_ctrl_c_removes_the_partial printed the line, removed the partial, ran the atexit
    handlers and then died by SIGINT (status -2) in finalization: each time the handler's KeyboardInterrupt had
    been raised inside code that dataclasses runs with ``exec`` from a string, during torch._dynamo's import.
    """


def fail(message: str) -> None:
    """Print one ``edgepack: error:`` line (newlines folded) and exit with status 2."""
    click.echo("edgepack: error: " + " ".join(message.split()), err=True)
    sys.exit(2)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgepack")
@click.option("-v", "--verbose", count=True, help="Log progress (-v) or debug detail and tracebacks (-vv).")
def cli(verbose: int) -> None:
    """Fold, quantize and export Hugging Face decoder LLMs to small, fast ONNX artifacts.

    \b
    edgepack export    build an artifact from a local model folder for a target
    edgepack inspect   verify an artifact's checksums and show its size breakdown
    edgepack targets   list deployment targets
    edgepack bench     measure latency and memory of an artifact
    edgepack generate  continue a prompt with an artifact (greedy or sampled)
    """
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "huggingface_hub", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if verbose < 2:  # library deprecation notices are not the user's business; -vv shows them
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        quiet_transformers()


def quiet_transformers() -> None:
    """transformers logs through its own handler; it reads this variable when (lazily) imported."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def parse_size(text: str) -> int:
    """'6MB' / '500KB' / '1.5GB' / '123456' -> bytes (decimal units, as file managers show them)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kKmMgG]?)[bB]?\s*", text)
    size = int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]) if m else 0
    if size <= 0:
        raise EdgepackError(f"cannot read size {text!r}; write a positive size like 6MB, 500KB or 1.5GB")
    return size


def parse_groups(text: str | None) -> int | list[list[int]] | None:
    """'2' -> 2; '0,1;2,3;4' -> [[0, 1], [2, 3], [4]]."""
    if text is None:
        return None
    try:
        if ";" not in text and "," not in text:
            return int(text)
        return [[int(i) for i in g.split(",")] for g in text.split(";") if g.strip()]
    except ValueError as e:
        raise EdgepackError(
            f"cannot read --share-groups {text!r}; pass a group size like 2 or groups like 0,1;2,3;4"
        ) from e


@cli.command()
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Local Hugging Face model folder (config.json + *.safetensors + tokenizer). "
    "Default: the embedded stories260k model.",
)
@click.option(
    "--target", default="cpu", show_default=True, help="Deployment target (see `edgepack targets`)."
)
@click.option(
    "-o", "--out", "out_dir", type=str, required=True, help="Artifact folder to write (a new folder)."
)
@click.option(
    "--recipe", type=click.Path(path_type=Path), help="Recipe file (.json/.yaml) instead of the flags below."
)
@click.option("--wbits", type=int, help="Quantize linear weights to this many bits (2-8).")
@click.option(
    "--group-size",
    type=int,
    default=64,
    show_default=True,
    help="Quantization group size; -1 = per channel.",
)
@click.option(
    "--mlp-group-size",
    type=int,
    default=None,
    help="Group size of the MLP projections wherever it divides their inputs (else --group-size). "
    "Default: 128 when --group-size is left at 64 (faster at the same perplexity, docs/results/speed.md), "
    "else --group-size; 0 = --group-size everywhere.",
)
@click.option(
    "--weight-range",
    type=click.Choice(["mse", "minmax"]),
    default="mse",
    show_default=True,
    help="RTN group range: mse searches the clipping with the lowest weight error (no data); minmax keeps it.",
)
@click.option("--symmetric/--asymmetric", default=False, show_default=True, help="Quantization grid.")
@click.option(
    "--abits",
    type=click.IntRange(0, 64),
    default=16,
    show_default=True,
    help="Activation bits: 16 (float) or 8 (int8 compute).",
)
@click.option("--method", default="rtn", show_default=True, help="Quantizer: rtn, gptq or abq.")
@click.option(
    "--e2e-epochs",
    type=int,
    default=None,
    help="Epochs of end-to-end tuning of the quantization scales by distillation from the float model on the "
    "--calib sequences (codes and bytes unchanged; 0 = off). Default: 4 with --method gptq/abq, 0 with rtn.",
)
@click.option(
    "--skip", multiple=True, help="Module name pattern to keep in float (repeatable), e.g. lm_head."
)
@click.option(
    "--head-bits",
    default="auto",
    show_default=True,
    help="Bits of the output head (lm_head and the tied embedding): 2-8, 'same' for --wbits, or 'auto': the "
    "width the default lowering stores --wbits at anyway (3 -> 4, 5-7 -> 8; no extra bytes; --lowering "
    "compact/planes: same). 8 keeps the head near float for ~1 MB per million head weights "
    "(docs/results/generalization.md).",
)
@click.option("--size-budget", help="Mixed precision: largest weight size, e.g. 6MB.")
@click.option("--bpw", type=float, help="Mixed precision: average stored bits per weight, e.g. 3.0.")
@click.option(
    "--remove",
    type=float,
    help="Fold: fraction of blocks to remove, e.g. 0.25 (a width fold removes their parameters).",
)
@click.option(
    "--share-groups", help="Fold: group size (e.g. 2) or explicit groups of kept positions (0,1;2,3;4)."
)
@click.option(
    "--fold-structure",
    type=click.Choice(["auto", "blocks", "mlp-width"]),
    help="Fold: where --remove's parameters come from: whole blocks (fewer layers: a smaller KV cache and less "
    "compute per token), every block's MLP width (channels chosen on the model's own samples; keeps depth and "
    "the KV cache), or auto (default; blocks with --share-groups): both built, the one closer to the original "
    "on held-out samples of the model's own text kept (about 2x the fold's time; docs/results/"
    "generalization.md, round 20).",
)
@click.option(
    "--kv-merge", help="KV cache across depth: minicache (MiniCache, arXiv 2405.14366), share or none."
)
@click.option(
    "--kv-start", help="MiniCache: first merged layer (default: chosen on --calib within 2% perplexity)."
)
@click.option("--kv-bits", help="Quantize the KV cache: 8 or 4 (default 16 = float).")
@click.option(
    "--kv-group",
    help="KV quantization groups: token (per token and head), channel (per channel over 32 tokens) or static "
    "(fixed per-channel scales from --calib; GroupQueryAttention reads it directly: the fastest decode).",
)
@click.option(
    "--calib",
    default="self",
    show_default=True,
    help="Calibration/cure text: 'self' (sampled from the model itself), a UTF-8 text file, or a calib_self.json.",
)
@click.option(
    "--calib-temperature",
    default="1.6",
    show_default=True,
    help="--calib self: sampling temperature, or 'auto': 1.6, hotter for a model whose samples at 1.6 are "
    "narrow (mean sampling entropy under 0.65 ln vocabulary); closer to the float model off its domain, "
    "further on its own prose.",
)
@click.option(
    "--calib-top-p",
    type=float,
    default=None,
    help="--calib self: nucleus top-p. Default 0.95, or 1.0 where --calib-temperature auto heats the sampling "
    "(it solves for the whole distribution's entropy).",
)
@click.option(
    "--calib-self-share",
    type=float,
    default=0.5,
    show_default=True,
    help="--calib FILE with --method gptq: the fraction of calibration samples sampled from the model itself and "
    "shuffled in with the file's, so GPTQ does not fit the file's domain alone; 0: the file only.",
)
@click.option(
    "--activations",
    type=click.Choice(["int8", "float"]),
    default=None,
    help="Low-bit matmuls on int8 activations (fast CPU kernels; the cpu/android default) or float "
    "activations (exact against the fake-quant model, 2-10x slower on CPU).",
)
@click.option(
    "--lowering",
    type=click.Choice(["auto", "widened", "compact", "planes"]),
    default=None,
    help="How 3/5/6/7-bit weights run: one wider kernel stored in its layout (widened), the same kernel from "
    "a b-bit file widened at load (compact: smaller file, higher load-time RAM peak), or one kernel per bit "
    "plane (planes). Default auto: widened, the fastest measured (bench/lowering.py).",
)
@click.option(
    "--attention",
    type=click.Choice(["auto", "fused", "plain"]),
    default=None,
    help="Block form: fused (GroupQueryAttention, packed projections, fused norms; needs head_dim % 16 == 0 "
    "and right-padded batches) or plain (standard ops). Default auto: fused where possible.",
)
@click.option(
    "--eval",
    "eval_text",
    type=click.Path(path_type=Path),
    help="Held-out text for quality vs the original float model (default: the --calib text's last 10%, else, "
    "up to 100M parameters, the original model's own samples); 'self': those samples at any size; 'none': "
    "no measurement.",
)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--no-parity", is_flag=True, help="Skip the ONNX-vs-PyTorch parity check.")
@click.option(
    "--trust-remote-code", is_flag=True, help="Allow model code from the model folder (off by default)."
)
def export(
    model_dir,
    target,
    out_dir,
    recipe,
    wbits,
    group_size,
    mlp_group_size,
    weight_range,
    symmetric,
    abits,
    method,
    e2e_epochs,
    skip,
    head_bits,
    size_budget,
    bpw,
    remove,
    share_groups,
    fold_structure,
    kv_merge,
    kv_start,
    kv_bits,
    kv_group,
    calib,
    calib_temperature,
    calib_top_p,
    calib_self_share,
    eval_text,
    activations,
    lowering,
    attention,
    force,
    no_parity,
    trust_remote_code,
) -> None:
    """Compress (optional) and export a model folder to an ONNX artifact for a target.

    \b
    edgepack export --target cpu -o out/default
    edgepack export --model ./my-llama --target android --wbits 4 -o out/phone
    edgepack export --model ./my-llama --remove 0.25 --share-groups 2 --calib text.txt -o out/folded
    """
    from edgepack.model import DEFAULT_MODEL
    from edgepack.pipeline import ExportRequest, quality_warning
    from edgepack.pipeline import export as run_export
    from edgepack.recipe import Recipe

    ctx = click.get_current_context()
    check_flag_combinations(ctx)
    if not out_dir.strip():  # Path("") would silently mean the current directory
        raise EdgepackError("-o is empty; pass the artifact folder to create, e.g. -o out/model")
    out_dir = Path(out_dir)
    kv = parse_kv_flags(kv_merge, kv_start, kv_bits, kv_group)
    if recipe is not None:
        rec = Recipe.load(recipe)
    else:
        flags = {name: ctx.params[name] for name in RECIPE_FLAGS}
        rec = recipe_from_flags(**{**flags, "head_bits": parse_head_bits(head_bits)})
        if kv is not None:
            rec.steps.append(kv)
    req = ExportRequest(
        model_dir=model_dir or DEFAULT_MODEL,
        out_dir=out_dir,
        target=target,
        recipe=rec,
        calib=calib,
        eval_text=eval_text,
        self_calib={"temperature": parse_temperature(calib_temperature), "top_p": calib_top_p},
        calib_self_share=calib_self_share,
        trust_remote_code=trust_remote_code,
        parity=not no_parity,
        force=force,
        build={
            k: v
            for k, v in {"activations": activations, "lowering": lowering, "attention": attention}.items()
            if v is not None
        },
    )
    result = run_export(req)
    m = result.manifest
    click.echo(
        f"wrote {out_dir}  ({m['model_bytes'] / 1e6:.2f} MB model, {m['parameters']:,} parameters, "
        f"{result.seconds:.1f} s)"
    )
    if m["parity"]:
        from edgepack.inspect import parity_flips

        p = m["parity"]
        where = ""
        target_ep = m["target"]["execution_provider"]
        # e.g. a cuda artifact exported on a CPU-only host: the target's kernels were not part of the check
        if p.get("provider") and p["provider"] != target_ep:
            where = f" (on {p['provider']}: this host has no {target_ep}; check on the device)"
        click.echo(
            f"parity vs PyTorch: max |dlogit| {p['max_abs_logit']:.2e}, top-1 {p['top1']:.3f}, "
            f"greedy {p['greedy']:.3f} over {p['new_tokens']} tokens{parity_flips(p)}{where}"
        )
    q = m.get("quality") or {}
    if q.get("measured"):
        click.echo(
            f"quality vs the original: top-1 {q['top1_agreement']:.3f}, perplexity {q['perplexity_original']:.3f} "
            f"-> {q['perplexity']:.3f} on {q['tokens']:,} tokens of {q['text'].split(' (')[0]}"
        )
        warning = quality_warning(q, m.get("recipe"))
        if warning:
            click.echo(f"edgepack: warning: {warning}", err=True)
    for key, report in (m.get("compression") or {}).items():
        if key.startswith("calibration") and isinstance(report, dict) and report.get("note"):
            click.echo(f"note: {report['note']}")


QUANT_DETAIL_FLAGS = (
    "group_size",
    "mlp_group_size",
    "weight_range",
    "symmetric",
    "abits",
    "method",
    "e2e_epochs",
    "skip",
    "head_bits",
)
RECIPE_FLAGS = (
    "wbits",
    "remove",
    "share_groups",
    "fold_structure",
    "size_budget",
    "bpw",
    *QUANT_DETAIL_FLAGS,
)  # recipe_from_flags' keywords
COMPRESSION_FLAGS = (*RECIPE_FLAGS, "kv_merge", "kv_start", "kv_bits", "kv_group")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_flag_combinations(ctx: click.Context) -> None:
    """Refuse flags that would be silently ignored: quantizer details without --wbits, flags with --recipe."""
    given = [
        name
        for name in COMPRESSION_FLAGS
        if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)
    ]
    if ctx.params.get("recipe") is not None and given:
        raise EdgepackError(
            f"pass either --recipe or compression flags, not both ({', '.join(map(flag, given))} given); "
            "put those settings into the recipe file"
        )
    quantizes = {"wbits", "size_budget", "bpw"} & set(given)
    if "head_bits" in given and {"size_budget", "bpw"} & set(given):
        raise EdgepackError(
            "--head-bits does not apply with a size budget: the mixed-precision plan chooses the head's width "
            "with the other layers'; drop --head-bits or the budget"
        )
    orphans = [flag(name) for name in given if name in QUANT_DETAIL_FLAGS]
    if orphans and not quantizes:
        raise EdgepackError(
            f"{', '.join(orphans)} apply only when quantizing; add --wbits (e.g. --wbits 4) or a budget "
            "(--bpw / --size-budget)"
        )


def parse_kv_flags(merge: str | None, start: str | None, bits: str | None, group: str | None):
    """--kv-* flags -> a KVCacheConfig step (None when no flag is given); bad values raise one-line errors."""
    from edgepack.compressor.minicache import KVCacheConfig

    if all(x is None for x in (merge, start, bits, group)):
        return None

    def integer(flag: str, text: str | None, example: str) -> int | None:
        if text is None:
            return None
        try:
            return int(text)
        except ValueError as e:
            raise EdgepackError(f"cannot read {flag} {text!r}; pass an integer such as {example}") from e

    values = {
        "merge": merge or ("minicache" if start is not None else "none"),
        "start_layer": integer("--kv-start", start, "6"),
        "bits": integer("--kv-bits", bits, "8 or 4"),
        "group": group,
    }
    return KVCacheConfig.from_dict({k: v for k, v in values.items() if v is not None})


def parse_temperature(text: str) -> float | str:
    """--calib-temperature: a number, or 'auto' (chosen from the model's sampling entropy)."""
    from edgepack.compressor.selfcalib import AUTO

    if text.strip().lower() == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise EdgepackError(
            f"--calib-temperature {text!r} is not a number; pass one > 0 (e.g. 1.6) or 'auto'"
        ) from None


def parse_head_bits(text: str) -> int | str | None:
    """--head-bits: an integer width, 'same' (None: the head takes --wbits) or 'auto' (QuantConfig's default)."""
    from edgepack.compressor.quantize import HEAD_AUTO

    word = text.strip().lower()
    if word == "same":
        return None
    if word == HEAD_AUTO:
        return HEAD_AUTO
    try:
        return int(text)
    except ValueError:
        raise EdgepackError(
            f"--head-bits {text!r} is not a width; pass 2-8, 'same' (the --wbits width) or 'auto'"
        ) from None


def recipe_from_flags(
    *,
    wbits,
    group_size,
    mlp_group_size,
    weight_range,
    symmetric,
    abits,
    method,
    skip,
    size_budget,
    bpw,
    remove,
    share_groups,
    fold_structure=None,
    head_bits="auto",
    e2e_epochs=None,
):
    from edgepack.recipe import Recipe, step_types

    if all(x is None for x in (wbits, remove, share_groups, fold_structure, size_budget, bpw)):
        return Recipe()
    types = step_types()
    steps = []
    if fold_structure is not None and remove is None:
        raise EdgepackError("--fold-structure needs --remove, e.g. --remove 0.25 --fold-structure mlp-width")
    if remove is not None or share_groups is not None:
        fold_keys = {"remove": remove, "share_group": parse_groups(share_groups), "structure": fold_structure}
        steps.append(types["fold"].from_dict({k: v for k, v in fold_keys.items() if v is not None}))
    quant = {
        "group_size": group_size,
        # None: QuantConfig's default (128 at group 64); 0: the group size everywhere
        "mlp_group_size": None if mlp_group_size is None else (mlp_group_size or group_size),
        "weight_range": weight_range,
        "symmetric": symmetric,
        "abits": abits,
        "method": method,
        "skip": list(skip),
    }
    if e2e_epochs is not None:
        if e2e_epochs < 0:
            raise EdgepackError(f"--e2e-epochs {e2e_epochs} must be >= 0 (0 turns the tuning off), e.g. 4")
        quant["options"] = {"e2e": e2e_epochs}
    if size_budget is not None or bpw is not None:
        steps.append(
            types["quantize"](
                wbits=wbits or 4,
                **quant,
                head_bits=None,  # the budget's plan chooses the head's width with every other layer's
                budget_bpw=bpw,
                size_budget=parse_size(size_budget) if size_budget else None,
            )
        )
    elif wbits is not None:
        steps.append(types["quantize"](wbits=wbits, **quant, head_bits=head_bits))
    return Recipe(steps=steps)


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
def inspect(artifact: Path, as_json: bool) -> None:
    """Verify an artifact's checksums and print its size breakdown and manifest summary."""
    from edgepack.inspect import inspect_artifact

    click.echo(inspect_artifact(artifact, as_json=as_json))


@cli.command()
def targets() -> None:
    """List deployment targets: dtype, file format, execution provider."""
    from edgepack.targets.profiles import TARGETS

    for t in TARGETS.values():
        click.echo(f"{t.name:8s} {t.dtype:8s} .{t.file_format:4s} {t.execution_provider:22s} {t.description}")
    from edgepack.targets.devices import PROFILES

    click.echo("\ndevice profiles (edgepack bench --profile NAME):")
    for d in PROFILES.values():
        click.echo(
            f"  {d.name:18s} {d.memory_bandwidth_gbs:7.1f} GB/s  {d.app_memory_mib:6d} MiB per app  {d.threads} threads"
        )


def _register_runtime_commands() -> None:
    from edgepack.runtime.cli import bench, generate

    cli.add_command(bench)
    cli.add_command(generate)


_register_runtime_commands()


def main() -> None:
    try:
        cli(prog_name="edgepack")
    except Interrupted as e:
        atexit._run_exitfuncs()  # what a normal exit runs; then the status is ours, not the interpreter's
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.code)


if __name__ == "__main__":
    main()
