"""Per-rank RoPE table memory and time under context parallelism: megarope vs megatron-core.

    python benchmarks/rope_table_memory.py                       # 128k..2M, cp 1/2/4/8
    python benchmarks/rope_table_memory.py --lengths 131072 --cp 1 8 --repeat 3

For each sequence length S and CP size, both rotary embeddings are asked for CP rank 0's table,
as that rank's ``forward(S)`` would build it:

- megarope: ``MegaropeRotaryEmbedding.forward`` computes only the S/cp positions of the rank's
  two chunks (float64 angles reduced mod 2*pi, then fp32);
- megatron-core: ``RotaryEmbedding.forward`` builds the whole [S, 1, 1, d] fp32 table, then
  slices the rank's chunks out of it.

The CP size and rank come from a stand-in group (``size()`` = cp, ``rank()`` = 0) handed to both
modules: neither forward communicates, it only asks the group for these two numbers, so this is
what rank 0 of a real CP group of that size computes (tests/distributed/test_cp_rotary_2m.py
checks megarope's table under real gloo groups). Every rank of a group does the same work.

Columns: ``table`` = bytes of the returned tensor; ``peak`` = peak allocation during the call
above what was allocated before (GPU: ``torch.cuda.max_memory_allocated``; CPU: the process's
peak RSS, reset through Linux's /proc/self/clear_refs); ``ms`` = wall time of the call (median of
``--repeat`` calls, each on a fresh module: both cache their tables); ``ratio`` = megatron peak /
megarope peak. The method is LongRoPE with n-hat (megarope's 2M use case); megatron computes
plain RoPE, in fp32 (off by up to ~0.1 rad near 2M), which is cheaper per entry.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import re
import statistics
import time
import warnings

import torch

LENGTHS = [131_072, 262_144, 524_288, 1_048_576, 2_097_152]
CP_SIZES = [1, 2, 4, 8]
MiB = 2**20


class RankView:
    """The two things a rotary forward asks its CP group: its size and this rank."""

    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


class PeakMeter:
    """Peak bytes allocated during a block, above the level before it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if not self.cuda:
            # glibc raises its mmap threshold (up to 32 MiB) after each large free and then serves
            # blocks from heap memory that is already resident, invisible to the RSS peak; a fixed
            # threshold keeps every block >= 128 KiB a fresh mapping, returned on free.
            M_MMAP_THRESHOLD = -3
            ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak-RSS mark (VmHWM)
            self.before = self._status("VmRSS")

    def stop(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.before
        return self._status("VmHWM") - self.before

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def longrope(head_dim: int, window: int, length: int):
    from megarope.rope.config import RopeConfig

    half = head_dim // 2
    scale = length / window
    return RopeConfig(
        rope_type="longrope", head_dim=head_dim, original_max_position_embeddings=window,
        max_position_embeddings=length, n_hat=window // 4,
        long_factor=tuple(1 + (scale - 1) * i / (half - 1) for i in range(half)),
        short_factor=(1.0,) * half,
    )


def measure(make, length: int, device: torch.device, repeat: int) -> tuple[int, int, float]:
    """(table bytes, peak bytes, median ms) of ``make().forward(length)``."""
    meter = PeakMeter(device)
    peaks, times = [], []
    for _ in range(repeat):
        module = make()
        meter.start()
        start = time.perf_counter()
        table = module.forward(length)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        peaks.append(meter.stop())
        nbytes = table.nbytes
        del table, module
        clear_caches()
    return nbytes, max(peaks), statistics.median(times)


def clear_caches() -> None:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    RotaryEmbedding.forward.cache_clear()  # megatron keeps up to 32 tables in an lru_cache
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--cp", type=int, nargs="+", default=CP_SIZES)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=4096, help="LongRoPE's original window")
    parser.add_argument("--repeat", type=int, default=None, help="calls per cell (default: 3 on GPU, 1 on CPU)")
    parser.add_argument("--megatron-max-length", type=int, default=None,
                        help="skip megatron-core above this length (default: no limit)")
    args = parser.parse_args()

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    import megatron.core
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megarope.mcore import compat
    from megarope.mcore.rotary import MegaropeRotaryEmbedding

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        compat.enable_cpu_compat()  # megatron's get_emb moves inv_freq to torch.cuda.current_device()
    repeat = args.repeat or (3 if cuda else 1)
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; megatron-core {megatron.core.__version__}")
    print(f"head_dim {args.head_dim}, fp32 tables; megarope: LongRoPE n-hat={args.window // 4} "
          f"(window {args.window}); CP rank 0 of a stand-in group of each size; {repeat} call(s) per cell")

    rope = longrope(args.head_dim, args.window, max(args.lengths))

    def megarope_module(cp):
        return lambda: MegaropeRotaryEmbedding(rope, cp_group=RankView(cp))

    def megatron_module(cp):
        return lambda: RotaryEmbedding(kv_channels=args.head_dim, rotary_percent=1.0, rotary_base=10_000,
                                       use_cpu_initialization=not cuda, cp_group=RankView(cp))

    # first calls pay one-time costs (CUDA context, kernel loading, allocator pools)
    for make in (megarope_module(1), megatron_module(1)):
        measure(make, 2 * args.window, device, 1)

    header = ("| length | cp | megarope table MiB | megarope peak MiB | megarope ms | "
              "megatron table MiB | megatron peak MiB | megatron ms | peak ratio |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    skipped = []
    for length in args.lengths:
        for cp in args.cp:
            if length % (2 * cp):
                raise SystemExit(f"--lengths {length} is not divisible by 2*cp = {2 * cp}")
            ours = measure(megarope_module(cp), length, device, repeat)
            cells = [f"{ours[0] / MiB:.0f}", f"{ours[1] / MiB:.0f}", f"{ours[2]:.0f}"]
            if args.megatron_max_length is not None and length > args.megatron_max_length:
                skipped.append(length)
                cells += ["skipped"] * 3 + ["-"]
            else:
                theirs = measure(megatron_module(cp), length, device, repeat)
                ratio = theirs[1] / ours[1] if ours[1] > 0 else float("nan")
                cells += [f"{theirs[0] / MiB:.0f}", f"{theirs[1] / MiB:.0f}", f"{theirs[2]:.0f}", f"{ratio:.1f}x"]
            print(f"| {length} | {cp} | " + " | ".join(cells) + " |", flush=True)
    if skipped:
        print(f"megatron-core skipped at {sorted(set(skipped))} tokens (--megatron-max-length "
              f"{args.megatron_max_length}): its full table there is too slow for this run")


if __name__ == "__main__":
    main()
