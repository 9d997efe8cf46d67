"""RoPE + scales throughput: megarope's fused function (compiled and eager) vs megatron's unfused apply.

What one attention layer does to q and k before the kernel, for an entropy-aware ABF layer (the
heaviest case: attention factor and per-position query scale):

- megatron: ``apply_rotary_pos_emb`` on q and on k (each recomputes cos/sin from the angle table
  and builds the rotated half with cat/neg), then the query multiplied by its [tokens, head_dim]
  multipliers, another pass (what megarope's core attention did before the fused function);
- fused eager: ``megarope.rope.fused.rope_qk`` in plain torch, from cos/sin tables computed once;
- fused compiled: the same function through ``torch.compile`` (what a megarope model runs).

GB/s counts the bytes that must move at least: q and k read and written once (the small cos/sin and
scale tables are left out), divided by the median time of ``--repeats`` calls after warm-up; a
plain copy of q and k gives the device's reference. Forward only, no autograd.

    python benchmarks/rope_apply.py [--append]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

from results import publish

# (tokens, q heads, kv heads, head dim): SmolLM2-135M at 4k and 16k, a Llama-3-8B-like layer at 8k
SHAPES = [(4096, 9, 3, 64), (16384, 9, 3, 64), (8192, 32, 8, 128)]


def timed(fn, repeats: int, cuda: bool) -> float:
    """Median seconds of ``fn()`` after two warm-up calls (compilation happens there)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--note", default="", help="a line under the table (machine load, ...)")
    args = parser.parse_args()

    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    from megarope.mcore import compat, parallel
    from megarope.mcore.spec import transformer_config
    from megarope.rope.config import RopeConfig
    from megarope.rope.fused import rope_function, rope_qk

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    with compat.cpu_compat():
        parallel.initialize()  # megatron's apply_rotary_pos_emb asks for the CP group
    group = parallel_state.get_context_parallel_group()
    compiled = rope_function("compile")
    rows = []
    with torch.no_grad():
        for tokens, heads, kv_heads, dim in SHAPES:
            rope = RopeConfig(rope_type="eabf", head_dim=dim, rope_theta=500_000.0, original_max_position_embeddings=1024)
            config = transformer_config(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads,
                                        num_query_groups=kv_heads, kv_channels=dim)
            gen = torch.Generator().manual_seed(0)
            q = torch.randn(tokens, 1, heads, dim, generator=gen).to(device, dtype)
            k = torch.randn(tokens, 1, kv_heads, dim, generator=gen).to(device, dtype)
            positions = torch.arange(tokens)
            angles = rope.angles(positions).to(device)
            freqs = torch.cat((angles, angles), -1)[:, None, None, :]
            cos, sin = angles.cos(), angles.sin()
            scale = rope.query_scale(positions, layer_number=3).to(device)
            factor = 1.2  # an attention factor a: a² on the query
            q_rot, q_pass, k_rot = scale * factor**2, scale, torch.ones_like(scale)
            q_mult = (scale[:, None] * factor**2).expand(tokens, dim).contiguous().to(dtype)[:, None, None, :]

            def megatron():
                qq = apply_rotary_pos_emb(q, freqs, config, cp_group=group) * q_mult
                return qq, apply_rotary_pos_emb(k, freqs, config, cp_group=group)

            def fused(fn):
                return lambda: fn(q, k, cos, sin, q_rot, q_pass, k_rot)

            reference = megatron()
            for out, ref in zip(compiled(q, k, cos, sin, q_rot, q_pass, k_rot), reference):
                torch.testing.assert_close(out, ref, rtol=1e-2 if cuda else 1e-5, atol=1e-2 if cuda else 1e-5)
            moved = 2 * (q.nbytes + k.nbytes)
            seconds = {
                "copy": timed(lambda: (q.clone(), k.clone()), args.repeats, cuda),
                "megatron": timed(megatron, args.repeats, cuda),
                "eager": timed(fused(rope_qk), args.repeats, cuda),
                "compiled": timed(fused(compiled), args.repeats, cuda),
            }
            assert not compiled.failed, "torch.compile failed: the compiled column would be eager"
            rows.append(((tokens, heads, kv_heads, dim), moved, seconds))
            print(f"{tokens}x{heads}/{kv_heads}x{dim}: " + ", ".join(
                f"{name} {moved / s / 1e9:.1f} GB/s" for name, s in seconds.items()), flush=True)

    device_name = torch.cuda.get_device_name() if cuda else \
        f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    lines = [
        f"{datetime.date.today()}, {device_name}, load average {os.getloadavg()[0]:.1f} at the end; "
        f"torch {torch.__version__}; {str(dtype).removeprefix('torch.')}; median of {args.repeats} calls; "
        "E-ABF layer (attention factor and per-position query scale)",
        "",
        "| tokens | q/kv heads | head dim | MiB moved | copy GB/s | megatron unfused GB/s | fused eager GB/s "
        "| fused compiled GB/s | compiled / megatron | eager / megatron |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (tokens, heads, kv_heads, dim), moved, s in rows:
        gbs = {name: moved / t / 1e9 for name, t in s.items()}
        lines.append(
            f"| {tokens} | {heads}/{kv_heads} | {dim} | {moved / 2**20:.0f} | {gbs['copy']:.1f} | "
            f"{gbs['megatron']:.1f} | {gbs['eager']:.1f} | {gbs['compiled']:.1f} | "
            f"{s['megatron'] / s['compiled']:.1f}x | {s['megatron'] / s['eager']:.1f}x |")
    publish("RoPE + scales throughput, fused vs megatron (`python benchmarks/rope_apply.py`)", lines, args.note,
            args.append)
    parallel.destroy()


if __name__ == "__main__":
    main()
