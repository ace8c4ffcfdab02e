"""Bundle bench: what signing, packing, unpacking and verifying a bundle costs, measured side by side in one run.

For a model file of each size: create+sign, pack, unpack, verify_bundle_dir (signature + streamed
sha256 of every file), next to plain hashlib.sha256 of the same bytes (the floor), and the cost of
one Ed25519 verification with PyNaCl (device) beside `cryptography` (host). Prints a table and writes
`bench/results/bundle_verify.json`.

    python bench/bundle_verify.py [--sizes-mb 1,16,64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any, Callable

import numpy as np
from rich.console import Console
from rich.table import Table

from edgefleet.agent.core.trust import TrustStore
from edgefleet.agent.core.verify import verify_bundle_dir
from edgefleet.sdk.trust.bundle import create_bundle, pack, unpack
from edgefleet.sdk.trust.keys import init_keys, load_private_key, sign

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn: Callable[[], Any], repeats: int, reset: Callable[[], None] | None = None) -> float:
    """Median wall time of `fn` in seconds over `repeats` runs, `reset` run untimed before each."""
    times = []
    for _ in range(repeats):
        if reset is not None:
            reset()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def bench_size(work: Path, size_mb: int, key: Any, trust: TrustStore, repeats: int) -> dict[str, Any]:
    """Time every bundle step for one model size."""
    model = work / f"model-{size_mb}.onnx"
    with model.open("wb") as fh:
        for _ in range(size_mb):
            fh.write(os.urandom(1024 * 1024))
    np.savez(work / "eval.npz", x=np.zeros((256, 64), np.float32), y=np.zeros(256, np.int64))
    fields = {
        "name": "bench",
        "version": 1,
        "target": {"profile": "rpi4b"},
        "model": {"format": "onnx", "runtime": "onnxruntime"},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 64]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 10]}],
        "eval": {"kind": "labels", "metric": "accuracy"},
        "health": {"min_accuracy": 0.5},
    }
    out, tar, back = work / "bundle", work / "bundle.tar", work / "back"

    def make() -> None:
        create_bundle(
            out, model_path=model, eval_npz_path=work / "eval.npz", manifest_fields=fields, private_key=key
        )

    def clear_back() -> None:
        shutil.rmtree(back, ignore_errors=True)

    row: dict[str, Any] = {"model_mb": size_mb}
    row["create_sign_s"] = timed(make, repeats)
    row["pack_s"] = timed(lambda: pack(out, tar), repeats)
    row["unpack_s"] = timed(lambda: unpack(tar, back), repeats, reset=clear_back)
    limit = (size_mb + 1) * 1024 * 1024
    row["verify_s"] = timed(
        lambda: verify_bundle_dir(
            back, trust, profile="rpi4b", device_id=None, ledger=None, max_model_bytes=limit
        ),
        repeats,
    )

    def plain_hash() -> None:
        digest = hashlib.sha256()
        with model.open("rb") as fh:
            for block in iter(lambda: fh.read(1024 * 1024), b""):
                digest.update(block)

    row["sha256_only_s"] = timed(plain_hash, repeats)
    row["verify_mb_per_s"] = size_mb / row["verify_s"]
    row["verify_over_sha256"] = row["verify_s"] / row["sha256_only_s"]
    model.unlink()
    for path in (out, back):
        shutil.rmtree(path, ignore_errors=True)
    tar.unlink()
    return row


def bench_signature(key: Any, count: int) -> dict[str, float]:
    """Microseconds per Ed25519 verification of a 2 KiB manifest: PyNaCl beside cryptography."""
    from nacl.signing import VerifyKey

    from edgefleet.sdk.trust.keys import public_raw

    data = os.urandom(2048)
    sig = key.sign(data)
    nacl_key = VerifyKey(public_raw(key))
    host_key = key.public_key()
    start = time.perf_counter()
    for _ in range(count):
        nacl_key.verify(data, sig)
    nacl_us = (time.perf_counter() - start) / count * 1e6
    start = time.perf_counter()
    for _ in range(count):
        host_key.verify(sig, data)
    crypto_us = (time.perf_counter() - start) / count * 1e6
    start = time.perf_counter()
    for _ in range(count):
        sign(data, key)
    sign_us = (time.perf_counter() - start) / count * 1e6
    return {"nacl_verify_us": nacl_us, "cryptography_verify_us": crypto_us, "cryptography_sign_us": sign_us}


def main() -> None:
    """Run the bench, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="1,16,64")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    # a log file or pipe gets the full table instead of folded columns
    console = Console() if sys.stdout.isatty() else Console(width=150)
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        work = Path(tmp)
        pair = init_keys(work / "keys")
        key = load_private_key(pair.private_path)
        trust = TrustStore.from_public_keys([pair.public_path])
        rows = [bench_size(work, size, key, trust, args.repeats) for size in sizes]
        sig = bench_signature(key, 2000)
    table = Table(title="bundle steps (median seconds)")
    for col in (
        "model MB",
        "create+sign",
        "pack",
        "unpack",
        "verify",
        "sha256 only",
        "verify MB/s",
        "verify/sha256",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["model_mb"]),
            f"{r['create_sign_s']:.3f}",
            f"{r['pack_s']:.3f}",
            f"{r['unpack_s']:.3f}",
            f"{r['verify_s']:.3f}",
            f"{r['sha256_only_s']:.3f}",
            f"{r['verify_mb_per_s']:.0f}",
            f"{r['verify_over_sha256']:.2f}",
        )
    console.print(table)
    console.print(
        f"Ed25519 on a 2 KiB manifest: verify {sig['nacl_verify_us']:.1f} µs (PyNaCl, device) vs "
        f"{sig['cryptography_verify_us']:.1f} µs (cryptography, host); sign {sig['cryptography_sign_us']:.1f} µs"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "repeats": args.repeats,
        "sizes": rows,
        "signature": sig,
    }
    (RESULTS / "bundle_verify.json").write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {RESULTS / 'bundle_verify.json'}")


if __name__ == "__main__":
    main()
