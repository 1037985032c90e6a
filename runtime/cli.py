"""The ``edgepack bench`` command; edgepack/cli.py registers it with ``cli.add_command(bench)``."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import click
from edgepack.runtime.bench import BACKENDS, TORCH_BACKEND, import_pyplot, plot_latency
from edgepack.runtime.bench import bench as run_bench
from edgepack.runtime.runner import (
    DEVICES,
    PromptStream,
    RunConfig,
    RunnerError,
    check_output_file,
    max_threads,
    prompt_summary,
    run_prompt,
    write_report,
)
from edgepack.targets.devices import PROFILES, get_profile

from edgepack.errors import EdgepackError


def parse_contexts(text: str) -> tuple[int, ...]:
    """'1024,4096' -> (1024, 4096); anything else is one clear error."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise EdgepackError(f"cannot read --context {text!r}; pass context lengths like 1024,4096") from e
    if any(v < 1 for v in values):
        raise EdgepackError(f"--context {text!r} must list positive context lengths, like 1024,4096")
    return values


def check_threads(threads: int | None) -> None:
    """--threads of bench and generate: at most twice the host's CPUs (more only thrashes it)."""
    if threads is not None and threads > max_threads():
        raise EdgepackError(
            f"--threads {threads} is more than twice this host's {os.cpu_count()} CPUs; pass at most "
            f"{max_threads()}, or leave it out for the default"
        )


@click.command("bench")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--compare", type=click.Path(path_type=Path), default=None, help="second artifact, run side by side"
)
@click.option("--profile", default=None, help=f"device profile: {', '.join(PROFILES)}")
@click.option(
    "--threads",
    type=click.IntRange(min=0),
    default=None,
    help="intra-op threads (default: the profile's, else ONNX Runtime's)",
)
@click.option(
    "--prompt-len",
    type=click.IntRange(min=1),
    default=RunConfig.prompt_len,
    show_default=True,
    help="prompt tokens",
)
@click.option(
    "--gen", type=click.IntRange(min=1), default=RunConfig.gen, show_default=True, help="decode steps"
)
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=RunConfig.runs,
    show_default=True,
    help="measured repetitions",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=RunConfig.warmup,
    show_default=True,
    help="unmeasured runs first",
)
@click.option(
    "--device",
    type=click.Choice(list(DEVICES)),
    default=None,
    help=f"default: profile's, else cuda for --backend {TORCH_BACKEND}, else cpu",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default=BACKENDS[0],
    show_default=True,
    help=f"{BACKENDS[0]} runs model.onnx; {TORCH_BACKEND} runs its weights in PyTorch on the Triton kernels (CUDA)",
)
@click.option(
    "--context",
    "contexts",
    default="",
    help="comma-separated contexts (e.g. 1024,4096): KV bytes/token, KV bytes, peak RSS and decode tok/s at each",
)
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), default=None, help="write the report here"
)
@click.option(
    "--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="latency vs prompt PNG"
)
def bench(
    artifact: Path,
    compare: Path | None,
    profile: str | None,
    threads: int | None,
    prompt_len: int,
    gen: int,
    runs: int,
    warmup: int,
    device: str | None,
    backend: str,
    contexts: str,
    json_path: Path | None,
    plot_path: Path | None,
) -> None:
    """Benchmark ARTIFACT (prefill + greedy decode through the KV cache), each artifact in a fresh process."""
    device_profile = get_profile(profile) if profile else None
    artifacts = [artifact] if compare is None else [artifact, compare]
    check_threads(threads)
    for flag, path in (("--json", json_path), ("--plot", plot_path)):
        if path is not None:
            try:
                check_output_file(path, flag, tuple(artifacts))
            except RunnerError as e:
                raise EdgepackError(str(e)) from e
    if plot_path is not None:
        import_pyplot()  # fail before minutes of benchmarking, not after
    config = RunConfig(
        threads=threads if threads is not None else (device_profile.threads if device_profile else 0),
        prompt_len=prompt_len,
        gen=gen,
        runs=runs,
        warmup=warmup,
        device=device
        or (device_profile.device if device_profile else ("cuda" if backend == TORCH_BACKEND else "cpu")),
        contexts=parse_contexts(contexts),
    )
    report = run_bench(artifacts, config, device_profile, with_sweep=plot_path is not None, backend=backend)
    click.echo(report.table())
    if json_path is not None:
        try:
            write_report(json_path, report.to_dict())
        except RunnerError as e:
            raise EdgepackError(str(e)) from e
        click.echo(f"wrote {json_path}")
    if plot_path is not None:
        plot_latency(report, plot_path)
        click.echo(f"wrote {plot_path}")


@click.command("generate")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="text to continue")
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="stop after this many new tokens (or at EOS, or at the context length)",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="0 = greedy (what parity checks), else sample",
)
@click.option("--top-p", type=click.FloatRange(min=0, min_open=True, max=1), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="sampling seed")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="intra-op threads (0: ONNX Runtime's)")
@click.option("--device", type=click.Choice(list(DEVICES)), default="cpu", show_default=True)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    default=None,
    help="write ids, text and timings here",
)
def generate(
    artifact: Path,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    threads: int,
    device: str,
    json_path: Path | None,
) -> None:
    """Continue PROMPT with ARTIFACT through ONNX Runtime (the runner's decode loop: every KV layout, compressed
    caches included) and print the text, why it stopped and its speed. Greedy unless --temperature > 0."""
    check_threads(threads)
    stream = PromptStream(prompt, partial(click.echo, nl=False))
    try:
        if json_path is not None:
            check_output_file(json_path, "--json", (artifact,))
        config = RunConfig(threads=threads, gen=max_new_tokens, device=device)
        report = run_prompt(artifact, prompt, config, temperature, top_p, seed, stream=stream)
        if json_path is not None:
            write_report(json_path, report)
    except RunnerError as e:
        stream.end_line()
        raise EdgepackError(str(e)) from e
    stream("")  # the prompt, when no piece was streamed
    click.echo(prompt_summary(report, streamed=True))
