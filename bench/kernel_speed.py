"""GPU benchmark of the low-bit matmul kernels against torch fp16 and ONNX Runtime's MatMulNBits.

    python bench/kernel_speed.py [--out docs/results/kernels_<gpu>.json] [--e2e] [--gemv-sweep]

Prints a latency table for (K, N) in {(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)} and
M in {1, 4, 16, 256}: torch fp16 matmul, ORT CUDA EP MatMulNBits at 8/4/2 bits (n/a without
CUDAExecutionProvider, see docs/gpu.md) and our Triton kernels at 8/4/3/2 bits, then a bandwidth table:
GB/s achieved on our packed bytes (codes + scales + zero points + activations + output) and the floor,
those bytes over the HBM copy bandwidth measured in the same run. Writes the numbers as JSON to --out and
the tables as Markdown beside it. Our kernels pick their configs by timing candidates on the first call per
shape (`triton_matmul.tuned_configs`); the chosen config and every candidate's time are saved as "tuned" and
tabulated.

Timing: torch and Triton with `triton.testing.do_bench` (CUDA events, L2 flushed before every call,
warm-up, median). An ORT Run is synchronous, so ORT is host-timed over one Run of several MatMulNBits nodes,
each with its own weight (so weights come from HBM, not L2), median per node.

--gemv-sweep: every GEMV candidate config at M = 1 and 4, per shape and width, timed like the rest (shorter
do_bench runs), saved as "gemv_sweep" and tabulated, the whole landscape the tuner chose from.

--e2e: a Llama-3.2-1B-shaped model with random fp16 weights decodes greedily, one token per step with a
static KV cache, eagerly and replayed from a CUDA graph; tokens/s with torch fp16 linears vs W4 (RTN,
group 128) `TritonQuantLinear`. The step is checked against the Hugging Face model's logits first.

Needs a CUDA GPU: without one it prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("bench.kernel_speed")

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192))  # (K, N)
ROWS = (1, 4, 16, 256)  # M
OUR_BITS = (8, 4, 3, 2)
ORT_BITS = (8, 4, 2)


@dataclass
class Row:
    """One (K, N, M) line of the tables; times in microseconds, None where not measured."""

    k: int
    n: int
    m: int
    torch_fp16_us: float
    ort_us: dict[int, float | None]
    ours_us: dict[int, float]
    ours_gbps: dict[int, float]
    floor_us: dict[int, float]
    ours_max_rel_err: dict[int, float]


def _median_us(fn, warmup: int = 25, rep: int = 200) -> float:
    """Median GPU time of fn in microseconds (CUDA events, L2 flushed, warmed up; warmup and rep in ms)."""
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """HBM bandwidth of a device-to-device copy (read + write bytes over time), GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (_median_us(lambda: dst.copy_(src)) * 1e3)


def random_quant(rng: np.random.Generator, n: int, k: int, bits: int, group: int):
    """Random asymmetric codes (N, K), scales float32 and zero points (N, k_groups)."""
    k_groups = -(-k // group)
    codes = rng.integers(0, 2**bits, size=(n, k), dtype=np.uint8)
    scales = rng.uniform(1e-3, 1e-2, size=(n, k_groups)).astype(np.float32)
    zero_points = rng.integers(0, 2**bits, size=(n, k_groups), dtype=np.uint8)
    return codes, scales, zero_points


def ort_cuda_available() -> bool:
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    return "CUDAExecutionProvider" in ort.get_available_providers()


def ort_matmulnbits_us(
    codes: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray,
    bits: int,
    group: int,
    rows: tuple[int, ...],
) -> dict[int, float]:
    """Host-timed median microseconds per MatMulNBits node on the ORT CUDA EP, fp16, for each M in rows."""
    import onnx
    import onnxruntime as ort
    from edgepack.kernels.packing import pack_nbits, pack_zero_points
    from onnx import TensorProto, helper, numpy_helper

    n, k = codes.shape
    packed = pack_nbits(codes, bits, group)  # (N, k_blocks, group * bits / 8)
    copies = int(np.clip((512 << 20) // packed.nbytes, 4, 16))
    inits = [
        numpy_helper.from_array(scales.astype(np.float16).reshape(-1), "S"),
        numpy_helper.from_array(pack_zero_points(zero_points, bits), "Z"),
    ]
    nodes = []
    for i in range(copies):  # rows rolled: every node reads a distinct weight
        inits.append(numpy_helper.from_array(np.roll(packed, i, axis=0), f"B{i}"))
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                ["A", f"B{i}", "S", "Z"],
                [f"Y{i}"],
                domain="com.microsoft",
                K=k,
                N=n,
                bits=bits,
                block_size=group,
            )
        )
    graph = helper.make_graph(
        nodes,
        "matmulnbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT16, ["M", k])],
        [helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT16, ["M", n]) for i in range(copies)],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    result = {}
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)  # (M, K)
        y = torch.empty(copies, m, n, device="cuda", dtype=torch.float16)  # (copies, M, N)
        binding = sess.io_binding()
        binding.bind_input("A", "cuda", 0, np.float16, [m, k], x.data_ptr())
        for i in range(copies):
            binding.bind_output(f"Y{i}", "cuda", 0, np.float16, [m, n], y[i].data_ptr())
        times = []
        for rep in range(60):
            torch.cuda.synchronize()
            start = time.perf_counter()
            sess.run_with_iobinding(binding)
            torch.cuda.synchronize()
            if rep >= 10:  # warm-up
                times.append((time.perf_counter() - start) * 1e6 / copies)
        result[m] = statistics.median(times)
    return result


SWEEP_ROWS = (1, 4)  # M of --gemv-sweep


def gemv_sweep(
    x: torch.Tensor, planes, s: torch.Tensor, z: torch.Tensor, bits: int, group: int
) -> dict[str, float]:
    """Median microseconds of every GEMV candidate config on x (M, K), by config label."""
    from edgepack.kernels.triton_matmul import gemv_candidates, quant_gemv

    m, k = x.shape
    return {
        c.label: _median_us(partial(quant_gemv, x, planes, s, z, bits, group, config=c), warmup=5, rep=25)
        for c in gemv_candidates(m, s.shape[1], k, group, x.device)
    }


def kernel_rows(
    group: int, device: torch.device, with_ort: bool, on_shape=None, sweep: list[dict] | None = None
) -> tuple[list[Row], float]:
    """Time every (K, N, M) for torch fp16, ORT MatMulNBits and our kernels; check our outputs.

    Returns the rows and the copy bandwidth (GB/s) the floors are computed from; ``on_shape(rows, gbps)`` is
    called after each (K, N), so a run cut short keeps what it measured. With ``sweep`` a list, every GEMV
    candidate is timed at M in SWEEP_ROWS and a dict per (K, N, M, bits) appended to it.
    """
    from edgepack.kernels.packing import pack_for_triton
    from edgepack.kernels.reference import dequantize
    from edgepack.kernels.triton_matmul import quant_matmul

    copy_gbps = copy_bandwidth_gbps(device)
    rng = np.random.default_rng(0)
    rows = []
    for k, n in SHAPES:
        quant = {bits: random_quant(rng, n, k, bits, group) for bits in OUR_BITS}
        ort_us: dict[int, dict[int, float | None]] = {m: {} for m in ROWS}
        for bits in ORT_BITS:
            times = ort_matmulnbits_us(*quant[bits], bits, group, ROWS) if with_ort else {}
            for m in ROWS:
                ort_us[m][bits] = times.get(m)
        tensors, weights = {}, {}
        for bits, (codes, scales, zero_points) in quant.items():
            planes = tuple(torch.from_numpy(p).to(device) for p in pack_for_triton(codes, bits))
            s = torch.from_numpy(np.ascontiguousarray(scales.T)).to(device)  # (k_groups, N)
            z = torch.from_numpy(np.ascontiguousarray(zero_points.T)).to(device)  # (k_groups, N)
            tensors[bits] = (planes, s, z)
            weights[bits] = torch.from_numpy(dequantize(codes, scales, zero_points, group)).to(
                device
            )  # (N, K)
        w16 = weights[4].half()  # (N, K), the fp16 baseline's weight
        for m in ROWS:
            x = torch.randn(m, k, device=device, dtype=torch.float16)  # (M, K)
            row = Row(
                k, n, m, _median_us(partial(torch.nn.functional.linear, x, w16)), ort_us[m], {}, {}, {}, {}
            )
            for bits, (planes, s, z) in tensors.items():
                y = quant_matmul(x, planes, s, z, bits, group).float()  # (M, N)
                want = x.float() @ weights[bits].T
                row.ours_max_rel_err[bits] = float((y - want).abs().max() / want.abs().max())
                if row.ours_max_rel_err[bits] > 1e-2:
                    log.warning(
                        "W%d K=%d N=%d M=%d: error %.3g vs the reference",
                        bits,
                        k,
                        n,
                        m,
                        row.ours_max_rel_err[bits],
                    )
                row.ours_us[bits] = _median_us(partial(quant_matmul, x, planes, s, z, bits, group))
                nbytes = sum(t.nbytes for t in (*planes, s, z)) + 2 * m * (k + n)
                row.ours_gbps[bits] = nbytes / (row.ours_us[bits] * 1e3)
                row.floor_us[bits] = nbytes / (copy_gbps * 1e3)
                if sweep is not None and m in SWEEP_ROWS:
                    sweep.append(dict(k=k, n=n, m=m, bits=bits, us=gemv_sweep(x, planes, s, z, bits, group)))
            rows.append(row)
            log.info("K=%d N=%d M=%d done", k, n, m)
        if on_shape is not None:
            on_shape(rows, copy_gbps)
    return rows, copy_gbps


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def markdown_tables(
    rows: list[Row],
    copy_gbps: float,
    device_name: str,
    group: int,
    tuned: list[dict] | None = None,
    sweep: list[dict] | None = None,
) -> str:
    """The latency table and the bandwidth table as Markdown; then the tuned configs and the GEMV sweep, if any."""
    lines = [
        f"# Low-bit matmul kernels on {device_name} (group {group}, fp16 activations)",
        "",
        f"HBM copy bandwidth in this run: {copy_gbps:.0f} GB/s. Times in microseconds (median).",
        "",
        "| K | N | M | torch fp16 | "
        + " | ".join(f"ORT NBits {b}" for b in ORT_BITS)
        + " | "
        + " | ".join(f"ours W{b}" for b in OUR_BITS)
        + " |",
        "|---" * (4 + len(ORT_BITS) + len(OUR_BITS)) + "|",
    ]
    for r in rows:
        cells = [r.k, r.n, r.m, _fmt(r.torch_fp16_us)]
        cells += [_fmt(r.ort_us[b]) for b in ORT_BITS] + [_fmt(r.ours_us[b]) for b in OUR_BITS]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        "Ours: GB/s achieved on packed bytes, and the floor (packed bytes / copy bandwidth) in microseconds.",
        "",
        "| K | N | M | " + " | ".join(f"W{b} GB/s | W{b} floor" for b in OUR_BITS) + " |",
        "|---" * (3 + 2 * len(OUR_BITS)) + "|",
    ]
    for r in rows:
        cells = [r.k, r.n, r.m] + [f"{r.ours_gbps[b]:.0f} | {r.floor_us[b]:.1f}" for b in OUR_BITS]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if tuned:
        lines += [
            "",
            "Configs our kernels chose (fastest candidate on the first call; microseconds from the tuner's own "
            "5 timed calls).",
            "",
            "| kernel | K | N | M bucket | bits | dtype | chosen | us | runner-up | us | candidates |",
            "|---" * 11 + "|",
        ]
        for t in tuned:
            ranked = sorted(t["candidates_us"].items(), key=lambda item: item[1])
            second = ranked[1] if len(ranked) > 1 else ("-", None)
            cells = [t["kernel"], t["k"], t["n"], t["m_bucket"], t["bits"], t["dtype"], t["best"]]
            cells += [_fmt(ranked[0][1]), second[0], _fmt(second[1]), len(ranked)]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if sweep:
        lines += [
            "",
            "GEMV sweep: microseconds of every candidate config (median, L2 flushed), fastest first.",
            "",
            "| K | N | M | bits | candidates |",
            "|---" * 5 + "|",
        ]
        for s in sweep:
            ranked = sorted(s["us"].items(), key=lambda item: item[1])
            cells = [s["k"], s["n"], s["m"], s["bits"], ", ".join(f"{c} {us:.1f}" for c, us in ranked)]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


# Llama-3.2-1B shapes.
E2E_CONFIG = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=2048,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)


def rtn_quantize(weight: torch.Tensor, bits: int, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric round-to-nearest of weight (N, K), K a multiple of group: codes, scales, zero points."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group, group)  # (N, k_groups, group)
    lo = w.amin(-1).clamp(max=0)
    hi = w.amax(-1).clamp(min=0)
    qmax = 2**bits - 1
    scales = ((hi - lo) / qmax).clamp(min=1e-8)  # (N, k_groups)
    zero_points = torch.round(-lo / scales).clamp(0, qmax)
    codes = torch.clamp(torch.round(w / scales[..., None]) + zero_points[..., None], 0, qmax).reshape(n, k)
    return (
        codes.to(torch.uint8).cpu().numpy(),
        scales.cpu().numpy(),
        zero_points.to(torch.uint8).cpu().numpy(),
    )


def quantize_linears(model: torch.nn.Module, bits: int, group: int) -> None:
    """Replace every nn.Linear of the decoder blocks by a `TritonQuantLinear` with RTN codes, in place."""
    from edgepack.kernels.torch_backend import TritonQuantLinear

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    codes, scales, zero_points = rtn_quantize(child.weight.data, bits, group)
                    quant = TritonQuantLinear(codes, scales, zero_points, bits, group, child.bias)
                    setattr(parent, name, quant.to(child.weight.device))


class StaticDecoder(torch.nn.Module):
    """One-token greedy decode step of a Hugging Face Llama with a static KV cache.

    It reuses the model's own modules (projections, norms, MLP, rotary tables) but has fixed shapes and no
    host synchronisation, so a step can be captured in a CUDA graph.
    """

    def __init__(self, model: torch.nn.Module, max_len: int) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.model = model
        self.rotate = apply_rotary_pos_emb
        cfg = model.config
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        emb = model.model.embed_tokens.weight
        positions = torch.arange(max_len, device=emb.device)[None]  # (1, T)
        cos, sin = model.model.rotary_emb(emb[None, :1], positions)  # (1, T, head_dim) each
        self.register_buffer("cos", cos[0].to(emb.dtype))  # (T, head_dim)
        self.register_buffer("sin", sin[0].to(emb.dtype))
        shape = (cfg.num_hidden_layers, 1, self.n_kv, max_len, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=emb.dtype, device=emb.device))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=emb.dtype, device=emb.device))
        self.register_buffer("slots", torch.arange(max_len, device=emb.device))  # (T,)

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """token (1, 1) int64 at position pos (1,) int64 -> logits (1, 1, vocab); writes the KV cache."""
        h = self.model.model.embed_tokens(token)  # (1, 1, C)
        cos, sin = self.cos[pos][None], self.sin[pos][None]  # (1, 1, head_dim)
        visible = (self.slots <= pos)[None, None, None]  # (1, 1, 1, T)
        for i, layer in enumerate(self.model.model.layers):
            attn = layer.self_attn
            a = layer.input_layernorm(h)
            q = attn.q_proj(a).view(1, 1, self.n_heads, self.head_dim).transpose(1, 2)  # (1, H, 1, D)
            k = attn.k_proj(a).view(1, 1, self.n_kv, self.head_dim).transpose(1, 2)  # (1, Hkv, 1, D)
            v = attn.v_proj(a).view(1, 1, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = self.rotate(q, k, cos, sin)
            self.k_cache[i].index_copy_(2, pos, k)  # (1, Hkv, T, D)
            self.v_cache[i].index_copy_(2, pos, v)
            o = torch.nn.functional.scaled_dot_product_attention(
                q, self.k_cache[i], self.v_cache[i], attn_mask=visible, enable_gqa=True
            )  # (1, H, 1, D)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(1, 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(self.model.model.norm(h))


def check_decoder(decoder: StaticDecoder, prompt: torch.Tensor) -> float:
    """Feed prompt (1, T) one token at a time; max |logits - HF logits| / max |HF logits| at the last token."""
    with torch.no_grad():
        want = decoder.model(prompt).logits[:, -1].float()  # (1, vocab)
        for t in range(prompt.shape[1]):
            got = decoder(prompt[:, t : t + 1], torch.tensor([t], device=prompt.device))[:, -1].float()
    return float((got - want).abs().max() / want.abs().max())


def decode_tokens_per_s(decoder: StaticDecoder, start: int, steps: int, cuda_graph: bool) -> float:
    """Greedy decode `steps` tokens from position `start`, eagerly or as CUDA graph replays."""
    device = decoder.cos.device
    token = torch.zeros((1, 1), dtype=torch.long, device=device)
    pos = torch.full((1,), start, dtype=torch.long, device=device)

    def step() -> None:
        token.copy_(decoder(token, pos)[:, -1].argmax(-1, keepdim=True))
        pos.add_(1)

    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up compiles the Triton kernels before any capture
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        run = step
        if cuda_graph:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            run = graph.replay
        pos.fill_(start)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
        return steps / (time.perf_counter() - t0)


def e2e(device: torch.device, bits: int = 4, group: int = 128, steps: int = 128) -> dict:
    """Decode tokens/s of the 1B-class Llama with fp16 linears vs W4 `TritonQuantLinear`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(LlamaConfig(**E2E_CONFIG)).to(torch.float16).eval()
    prompt = torch.randint(0, E2E_CONFIG["vocab_size"], (1, 16), device=device)
    result = {"config": E2E_CONFIG, "bits": bits, "group_size": group, "steps": steps, "prompt": 16}
    for name in ("fp16", f"w{bits}"):
        if name != "fp16":
            quantize_linears(model, bits, group)
        decoder = StaticDecoder(model, max_len=prompt.shape[1] + steps + 8)
        err = check_decoder(decoder, prompt)
        if err > 2e-2:
            raise RuntimeError(
                f"{name}: the static decode step disagrees with the HF model (rel err {err:.3g})"
            )
        result[name] = {
            "logits_rel_err_vs_hf": err,
            "eager_tokens_per_s": decode_tokens_per_s(decoder, prompt.shape[1], steps, cuda_graph=False),
            "cuda_graph_tokens_per_s": decode_tokens_per_s(decoder, prompt.shape[1], steps, cuda_graph=True),
        }
        log.info("e2e %s: %s", name, result[name])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON path (default docs/results/kernels_<gpu>.json)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--e2e", action="store_true", help="also time 1B-class Llama decode, fp16 vs W4")
    parser.add_argument(
        "--gemv-sweep", action="store_true", help="also time every GEMV candidate config at M = 1 and 4"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU; torch.cuda.is_available() is False on this machine", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import onnxruntime
    import triton
    from edgepack.kernels.triton_matmul import tuned_configs

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    out = (
        args.out
        or Path("docs/results") / f"kernels_{re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')}.json"
    )
    with_ort = ort_cuda_available()
    result = {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "onnxruntime": onnxruntime.__version__,
        "ort_cuda_ep": with_ort,
        "group_size": args.group_size,
    }
    out.parent.mkdir(parents=True, exist_ok=True)

    sweep = [] if args.gemv_sweep else None

    def save(rows: list[Row], copy_gbps: float) -> str:
        result.update(copy_bandwidth_gbps=copy_gbps, rows=[asdict(r) for r in rows], tuned=tuned_configs())
        if sweep is not None:
            result["gemv_sweep"] = sweep
        tables = markdown_tables(rows, copy_gbps, name, args.group_size, result["tuned"], sweep)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(tables)
        return tables

    rows, copy_gbps = kernel_rows(args.group_size, device, with_ort, on_shape=save, sweep=sweep)
    print(save(rows, copy_gbps))
    if args.e2e:
        result["e2e"] = e2e(device)
        print(json.dumps(result["e2e"], indent=2))
        save(rows, copy_gbps)
    log.info("wrote %s and %s", out, out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
