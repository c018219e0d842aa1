"""Benchmark the update codecs on a ~10M-parameter update (prints a markdown table).

For each spec: bytes on the wire, bits per parameter, ratio versus float32
``.npy``, encode and decode throughput in MB/s of float32 input, and each
time divided by the time of a plain memory copy (``np.copy``: allocate and
copy) of the same 40 MB, measured in the same run next to each row (the
physical floor).  Baselines: float32 ``.npy``, fp16 by
``astype``, and zlib of the float32 bytes.  Times are the best of
``--repeat`` runs; nothing here asserts.

Run: ``.venv/bin/python benchmarks/codecs.py [--params 10000000] [--repeat 3]``;
``--bytes-1m`` prints only the sizes on the ~1M update, ``--decode-cost`` only the
decoder's peak memory (tracemalloc) and CPU there, for honest and hostile payloads.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import zstandard

from flowerpress.compression import CodecState, PayloadError, decode, fp32_nbytes, parse

SPECS = [
    "none",
    "fp16",
    "q:8",
    "q:4",
    "q:2",
    "sign",
    "sign+ef",
    "q:8+zstd",
    "topk:0.01",
    "topk:0.01+q:8+zstd",
    "topk:0.01+q:4+ef+zstd",
    "randk:0.01+q:8",
    "lowrank:4+q:8+ef",
]


class Row(NamedTuple):
    """One line of the table: sizes, best times (s), median ratios to np.copy."""

    name: str
    size: int
    enc: float
    dec: float
    enc_ratio: float
    dec_ratio: float


def mixed_shapes(params: int) -> list[tuple[int, ...]]:
    """Conv / linear / bias shapes (ResNet-like convs, one big linear) totalling ~``params``."""
    convs = [(64, 3, 7, 7), (128, 64, 3, 3), (256, 128, 3, 3), (512, 256, 3, 3), (512, 512, 3, 3)]
    shapes: list[tuple[int, ...]] = []
    for c in convs:
        shapes += [c, (c[0],)]
    used = sum(int(np.prod(s)) for s in shapes) + 1000 * 144 + 1000 + 2048
    cols = max(1, (params - used) // 2048)
    shapes += [(2048, cols), (2048,), (1000, 144), (1000,)]
    return shapes


# The ~1M-parameter update of issue 4 (same shapes as tests/compression/test_codec_sizes.py).
SHAPES_1M: list[tuple[int, ...]] = [
    (32, 3, 3, 3), (32,), (64, 32, 3, 3), (64,), (128, 64, 3, 3), (128,),
    (128, 128, 3, 3), (128,), (256, 3200), (256,), (10, 256), (10,),
]  # fmt: skip
DECODE_SPECS_1M = [
    "none", "none+zstd", "q:8", "q:16", "fp16", "sign", "randk:0.01+q:8", "randk:0.5",
    "randk:0.5+zstd", "topk:0.01+q:8+zstd", "topk:0.5+fp16", "topk:0.99", "topk:0.99+zstd",
    "lowrank:4+q:8",
]  # fmt: skip
SPECS_1M = [
    "none", "fp16", "q:8", "q:4", "q:2", "sign", "sign+ef", "q:8+zstd", "topk:0.01",
    "topk:0.01+q:8", "topk:0.01+q:8+zstd", "topk:0.01+q:4+ef+zstd", "randk:0.01+q:8",
    "lowrank:4", "lowrank:4+q:8+ef",
]  # fmt: skip


def bytes_table_1m(seed: int) -> None:
    """Print payload sizes on the ~1M update (deterministic for a given seed)."""
    rng = np.random.default_rng(seed)
    update = [(0.01 * rng.standard_normal(s)).astype(np.float32) for s in SHAPES_1M]
    n = sum(a.size for a in update)
    npy = len(npy_bytes(update))
    print(f"update: {n:,} float32 parameters in {len(update)} tensors; .npy {npy:,} bytes")
    print()
    print("| spec | bytes | bits/param | ratio vs float32 | ratio vs .npy |")
    print("|---|---:|---:|---:|---:|")
    for spec in SPECS_1M:
        payload, _ = parse(spec).encode(update, rng=np.random.default_rng(0))
        size = len(payload)
        print(
            f"| `{spec}` | {size:,} | {8 * size / n:.3f} | {fp32_nbytes(update) / size:.1f}x "
            f"| {npy / size:.1f}x |"
        )


def _frame(body: bytes, *, zstd: bool = False) -> bytes:
    """A version-1 payload around a hand-made body (optionally as a zstd frame)."""
    if zstd:
        frame = zstandard.ZstdCompressor(level=3).compress(body)
        return b"FPC\x01\x01" + struct.pack("<Q", len(body)) + frame
    return b"FPC\x01\x00" + body


def hostile_payloads(n: int) -> dict[str, bytes]:
    """Payloads a hostile device can send for a model of ``n`` elements (all within bounds)."""
    unary = np.packbits(np.ones(n, np.uint8), bitorder="little").tobytes()

    def topk_all(values: bytes, b: int) -> bytes:  # one tensor, every element "kept"
        head = struct.pack("<IBI", 1, 1, n) + struct.pack("<BIBI", 1, n, b, len(unary))
        return head + unary + bytes((n * b + 7) // 8) + values

    tiny = struct.pack("<I", 65536) + (b"\x00\x00\x00" + bytes(4)) * 65536
    rows = 1000
    cols = n // rows
    rank = min(256, (rows * cols) // (rows + cols) - 1)
    lowrank = (
        struct.pack("<IBII", 1, 2, rows, cols) + struct.pack("<BIIH", 3, rows, cols, rank)
        + b"\x00" + np.full(rows * rank, 1e-3, "<f4").tobytes()
        + b"\x00" + np.full(cols * rank, 1e-3, "<f4").tobytes()
    )  # fmt: skip
    return {
        "65,536 scalar tensors in zstd": _frame(tiny, zstd=True),
        "topk k=n, float32 values": _frame(topk_all(b"\x00" + bytes(4 * n), 0)),
        "topk k=n, sign values, zstd": _frame(
            topk_all(b"\x03" + struct.pack("<f", 1.0) + bytes((n + 7) // 8), 3), zstd=True
        ),
        "randk k=n/2, float32 values": _frame(
            struct.pack("<IBI", 1, 1, n) + struct.pack("<BIQ", 2, n // 2, 12345) + b"\x00"
            + bytes(4 * (n // 2))
        ),
        "q:16 near float32 max (float64 path)": _frame(
            struct.pack("<IBI", 1, 1, n) + struct.pack("<BBBI", 0, 2, 16, 1 << 24)
            + struct.pack("<ff", -3e38, 3e38) + bytes(2 * n)
        ),
        "dense zeros, largest zstd body": _frame(
            struct.pack("<IBI", 1, 1, n) + b"\x00\x00" + bytes(4 * n), zstd=True
        ),
        f"lowrank rank {rank} ({rows}x{cols})": _frame(lowrank),
    }  # fmt: skip


def decode_cost_1m(seed: int, repeat: int) -> None:
    """Print decode peak memory (x the model's float32 size) and CPU, honest and hostile."""
    rng = np.random.default_rng(seed)
    update = [(0.01 * rng.standard_normal(s)).astype(np.float32) for s in SHAPES_1M]
    n = sum(a.size for a in update)
    model_bytes = 4 * n
    print(f"update: {n:,} float32 parameters in {len(update)} tensors ({model_bytes:,} bytes)")
    print("bounds: max_elements = parameters, max_tensors = tensors (12)")
    print()
    print("| payload | bytes | decode peak / model | CPU ms (best) | result |")
    print("|---|---:|---:|---:|---|")
    cases = {
        f"`{spec}`": parse(spec).encode(update, rng=np.random.default_rng(1))[0]
        for spec in DECODE_SPECS_1M
    }
    cases.update({f"hostile: {k}": v for k, v in hostile_payloads(n).items()})
    for name, payload in cases.items():

        def run(payload: bytes = payload) -> str:
            try:
                decode(payload, max_elements=n, max_tensors=len(update))
            except PayloadError as exc:
                return f"PayloadError: {str(exc)[:40]}"
            return "decoded"

        tracemalloc.start()
        result = run()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        cpu = float("inf")
        for _ in range(repeat):
            start = time.process_time()
            run()
            cpu = min(cpu, time.process_time() - start)
        print(
            f"| {name} | {len(payload):,} | {peak / model_bytes:.2f}x | {1e3 * cpu:.1f} "
            f"| {result} |"
        )
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}, "
          f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")  # fmt: skip


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def npy_bytes(update: list[np.ndarray]) -> bytes:
    """Concatenated ``np.save`` files of every tensor (the float32 .npy baseline)."""
    out = io.BytesIO()
    for a in update:
        np.save(out, a, allow_pickle=False)
    return out.getvalue()


def npy_load(blob: bytes, count: int) -> list[np.ndarray]:
    """Inverse of :func:`npy_bytes`."""
    buf = io.BytesIO(blob)
    return [np.load(buf, allow_pickle=False) for _ in range(count)]


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bytes-1m", action="store_true", help="only print payload sizes on the ~1M update"
    )
    parser.add_argument(
        "--decode-cost",
        action="store_true",
        help="only print decode peak memory and CPU on the ~1M update, honest and hostile",
    )
    args = parser.parse_args()
    if args.decode_cost:
        decode_cost_1m(args.seed, args.repeat)
        return
    if args.bytes_1m:
        bytes_table_1m(args.seed)
        return

    rng = np.random.default_rng(args.seed)
    update = [(0.01 * rng.standard_normal(s)).astype(np.float32) for s in mixed_shapes(args.params)]
    n = sum(a.size for a in update)
    fp32 = fp32_nbytes(update)
    mb = fp32 / 1e6
    npy = npy_bytes(update)

    flat = np.concatenate([a.ravel() for a in update])
    dst = np.empty_like(flat)

    def copy_once() -> None:
        # The floor is np.copy (allocate + copy 40 MB): every decoder that
        # returns a new array pays at least that.
        np.copy(flat)

    def measure(name: str, size: int, enc: Callable[[], object], dec: Callable[[], object]) -> Row:
        # Each repetition times copy, encode, decode back to back; the ratios
        # are medians of per-repetition ratios, so load from other processes
        # on a shared machine hits the codec and its floor alike.  MB/s use the
        # best repetition.
        te, td, re_, rd = [], [], [], []
        for _ in range(args.repeat):
            c = best_time(copy_once, 2)
            e = best_time(enc, 1)
            d = best_time(dec, 1)
            te.append(e)
            td.append(d)
            re_.append(e / c)
            rd.append(d / c)
        return Row(name, size, min(te), min(td), statistics.median(re_), statistics.median(rd))

    rows: list[Row] = []
    rows.append(
        measure(
            "float32 .npy (baseline)",
            len(npy),
            lambda: npy_bytes(update),
            lambda: npy_load(npy, len(update)),
        )
    )
    half = [a.astype(np.float16) for a in update]
    rows.append(
        measure(
            "fp16 astype (baseline)",
            sum(h.nbytes for h in half),
            lambda: [a.astype(np.float16).tobytes() for a in update],
            lambda: [h.astype(np.float32) for h in half],
        )
    )
    raw = b"".join(a.tobytes() for a in update)
    zipped = zlib.compress(raw)
    rows.append(
        measure(
            "zlib:6 of float32 (baseline)",
            len(zipped),
            lambda: zlib.compress(raw),
            lambda: zlib.decompress(zipped),
        )
    )
    for spec in SPECS:
        pipe = parse(spec)
        payload, state = pipe.encode(update, CodecState.empty(), rng=rng)  # warm up, fill EF
        rows.append(
            measure(
                spec,
                len(payload),
                lambda p=pipe, s=state: p.encode(update, s, rng=rng),
                lambda p=payload: decode(p, max_elements=n),
            )
        )
    t_copy = best_time(copy_once, max(args.repeat, 5))

    print(f"update: {n:,} float32 parameters in {len(update)} tensors ({mb:.1f} MB)")
    t_copyto = best_time(lambda: np.copyto(dst, flat), max(args.repeat, 5))
    print(
        f"memory copy of the same {mb:.1f} MB: np.copy {1e3 * t_copy:.2f} ms "
        f"({mb / t_copy:,.0f} MB/s); np.copyto into a warm buffer {1e3 * t_copyto:.2f} ms. "
        "Ratios: median over repetitions of (codec time / np.copy time) timed back to back."
    )
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}, "
        f"load average at the end of the run: {load}"
    )
    print()
    print(
        "| spec | bytes | bits/param | ratio vs .npy | encode MB/s | decode MB/s "
        "| encode / copy | decode / copy | (enc+dec) / copy |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| `{row.name}` | {row.size:,} | {8 * row.size / n:.3f} | {len(npy) / row.size:.1f}x "
            f"| {mb / row.enc:,.0f} | {mb / row.dec:,.0f} | {row.enc_ratio:.1f}x "
            f"| {row.dec_ratio:.1f}x | {row.enc_ratio + row.dec_ratio:.1f}x |"
        )


if __name__ == "__main__":
    main()
