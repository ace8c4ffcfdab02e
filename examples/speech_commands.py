"""Train a small Transformer on command words spoken by espeak-ng, build it for three devices, compare.

The data is made here: ten command words (the Speech Commands set: yes, no, up, down, left, right, on,
off, stop, go) synthesised by espeak-ng (`apt-get install espeak-ng`) in several English accents and
voice variants, at random speeds and pitches, placed at a random offset in a one-second window and mixed
with white or pink noise at several signal-to-noise ratios. Features are 80-bin log-mel spectrograms,
100 frames of 10 ms (computed here with numpy: STFT, HTK mel filterbank). Voice variants are split:
the held-out set speaks with voices the model never heard. The model is a 3-layer pre-LN Transformer
encoder over the frames, mean-pooled into ten logits; quality is accuracy on the held-out voices.

    .venv/bin/python examples/speech_commands.py [--out DIR] [--profiles rpi4b,rpi5,jetson-orin-nano]
                                                 [--epochs 20] [--quick]
"""

from __future__ import annotations

import argparse
import io
import math
import shutil
import subprocess
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np

WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan")
TRAIN_VARIANTS = ("m1", "m2", "m3", "m6", "f1", "f3", "f5")
TEST_VARIANTS = ("m4", "f2")  # voices the model never hears while training
SNR_DB: tuple[Optional[float], ...] = (None, 20.0, 10.0, 5.0)  # None: clean
RATE = 16000
N_FFT, HOP, N_MELS, FRAMES = 400, 160, 80, 100


# ---- audio -----------------------------------------------------------------------------------------


class EspeakMissing(RuntimeError):
    """espeak-ng is not installed; the message says how to install it."""


def speak(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """`word` spoken by espeak-ng, as float32 samples at 16 kHz, leading and trailing silence trimmed."""
    from scipy.signal import resample_poly

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise EspeakMissing(
            "espeak-ng is not installed: `sudo apt-get install espeak-ng` (or scripts/ensure-system-deps.sh)"
        )
    wav = subprocess.run(
        [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
        check=True,
        capture_output=True,
        timeout=30,
    ).stdout
    with wave.open(io.BytesIO(wav)) as w:
        rate = w.getframerate()
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
    audio = resample_poly(samples, RATE, rate).astype(np.float32)
    loud = np.nonzero(np.abs(audio) > 0.02 * np.abs(audio).max())[0]
    return audio[loud[0] : loud[-1] + 1] if len(loud) else audio


def synthesise(
    accents: tuple[str, ...], variants: tuple[str, ...], takes: int, seed: int
) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """Every word × accent × variant, `takes` times at random speed (120–200 wpm) and pitch (25–75)."""
    rng = np.random.default_rng(seed)
    jobs = []
    for word_index in range(len(WORDS)):
        for accent in accents:
            for variant in variants:
                for _ in range(takes):
                    jobs.append(
                        (
                            word_index,
                            f"{accent}+{variant}",
                            int(rng.integers(120, 201)),
                            int(rng.integers(25, 76)),
                        )
                    )
    with ThreadPoolExecutor(max_workers=4) as pool:  # espeak-ng runs as a process: threads suffice
        audio = list(pool.map(lambda j: speak(WORDS[j[0]], j[1], j[2], j[3]), jobs))
    return audio, np.array([j[0] for j in jobs], dtype=np.int64), [j[1] for j in jobs]


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Noise with a 1/f power spectrum (white noise shaped in the frequency domain), unit RMS."""
    spectrum = np.fft.rfft(rng.normal(size=n))
    spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))
    noise = np.fft.irfft(spectrum, n)
    return noise / (noise.std() + 1e-12)


def place(audio: np.ndarray, snr_db: Optional[float], rng: np.random.Generator) -> np.ndarray:
    """The word at a random offset in one second (cropped when longer), plus noise at `snr_db`."""
    clip = np.zeros(RATE, dtype=np.float32)
    if len(audio) > RATE:
        start = int(rng.integers(0, len(audio) - RATE + 1))
        audio = audio[start : start + RATE]
    offset = int(rng.integers(0, RATE - len(audio) + 1))
    clip[offset : offset + len(audio)] = audio * rng.uniform(0.3, 1.0)
    if snr_db is not None:
        noise = pink_noise(RATE, rng) if rng.random() < 0.5 else rng.normal(size=RATE)
        signal_rms = np.sqrt(np.mean(audio**2)) * np.abs(clip).max() / max(np.abs(audio).max(), 1e-9)
        clip = clip + noise.astype(np.float32) * signal_rms / (10 ** (snr_db / 20))
    return clip


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, rate: int = RATE) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters evenly spaced on the HTK mel scale, 20 Hz – rate/2."""

    def to_mel(hz: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    def to_hz(mel: np.ndarray) -> np.ndarray:
        return 700.0 * (10 ** (mel / 2595.0) - 1.0)

    edges = to_hz(np.linspace(to_mel(np.array(20.0)), to_mel(np.array(rate / 2)), n_mels + 2))
    bins = np.linspace(0, rate / 2, n_fft // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - lower) / (centre - lower)
    falling = (upper - bins[None]) / (upper - centre)
    return np.clip(np.minimum(rising, falling), 0, None).astype(np.float32)


MEL = mel_filterbank()
WINDOW = np.hanning(N_FFT + 1)[:-1].astype(np.float32)


def log_mel(clips: np.ndarray) -> np.ndarray:
    """(n, 100, 80) log-mel frames of one-second clips (n, 16000): 25 ms Hann windows every 10 ms.

    Whole batches at once: one matrix product per batch instead of one per clip (a small product
    per clip is slow when BLAS threads wait for a busy machine).
    """
    padded = np.pad(clips, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")
    starts = np.arange(FRAMES) * HOP
    frames = padded[:, starts[:, None] + np.arange(N_FFT)[None]] * WINDOW
    power = (np.abs(np.fft.rfft(frames, axis=-1)) ** 2).astype(np.float32)
    mel = power.reshape(-1, power.shape[-1]) @ MEL.T
    return np.log(mel + 1e-6).reshape(len(clips), FRAMES, N_MELS).astype(np.float32)


def features(
    audio: list[np.ndarray], labels: np.ndarray, copies: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each clip placed `copies` times, cycling through the noise levels: (x, y, snr index per row)."""
    rng = np.random.default_rng(seed)
    clips, ys, snrs = [], [], []
    for i, (a, y) in enumerate(zip(audio, labels)):
        for k in range(copies):
            level = (i + k) % len(SNR_DB)
            clips.append(place(a, SNR_DB[level], rng))
            ys.append(y)
            snrs.append(level)
    x = np.concatenate([log_mel(np.stack(clips[i : i + 256])) for i in range(0, len(clips), 256)])
    return x, np.array(ys, dtype=np.int64), np.array(snrs)


# ---- model -----------------------------------------------------------------------------------------


def make_transformer(mean: np.ndarray, std: np.ndarray, d: int = 96, layers: int = 3, heads: int = 4) -> Any:
    """Log-mel (N, 100, 80) → per-bin normalisation → 2× frame subsampling → Transformer → 10 logits."""
    import torch
    from torch import nn

    class Block(nn.Module):
        """Pre-LN encoder block written out (MatMul, Softmax, LayerNorm): a plain graph for every exporter."""

        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            self.drop = nn.Dropout(0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, t, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads), dim=-1)
            x = x + self.drop(self.proj((attn @ v).transpose(1, 2).reshape(n, t, d)))
            return x + self.drop(self.ffn(self.norm2(x)))

    class KeywordTransformer(nn.Module):
        """Input `log_mel` (N, 100, 80); output logits (N, 10)."""

        mean: torch.Tensor  # (80,) per-bin statistics of the training rows
        std: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.from_numpy(mean.astype(np.float32)))
            self.register_buffer("std", torch.from_numpy(std.astype(np.float32)))
            self.subsample = nn.Sequential(nn.Conv1d(N_MELS, d, 3, stride=2, padding=1), nn.GELU())
            self.position = nn.Parameter(torch.zeros(1, FRAMES // 2, d))
            self.blocks = nn.Sequential(*[Block() for _ in range(layers)])
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, len(WORDS))
            nn.init.normal_(self.position, std=0.02)

        def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
            x = (log_mel - self.mean) / self.std
            x = self.subsample(x.transpose(1, 2)).transpose(1, 2) + self.position
            return self.head(self.norm(self.blocks(x).mean(dim=1)))

    return KeywordTransformer()


def spec_augment(x: Any, rng: np.random.Generator) -> Any:
    """SpecAugment-lite: one random band of up to 10 mel bins and one of up to 15 frames set to the mean."""
    x = x.clone()
    for row in range(len(x)):
        f0, f = int(rng.integers(0, N_MELS - 10)), int(rng.integers(0, 11))
        t0, t = int(rng.integers(0, FRAMES - 15)), int(rng.integers(0, 16))
        x[row, :, f0 : f0 + f] = x[row].mean()
        x[row, t0 : t0 + t, :] = x[row].mean()
    return x


def train(model: Any, x: np.ndarray, y: np.ndarray, epochs: int, batch: int = 64, log: Any = print) -> None:
    """AdamW, one-cycle schedule, label smoothing and SpecAugment-lite."""
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    steps = epochs * math.ceil(len(x) / batch)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.02)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.15)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        total, correct, start = 0.0, 0, time.perf_counter()
        for first in range(0, len(x), batch):
            idx = order[first : first + batch]
            xb = spec_augment(torch.from_numpy(x[idx]), rng)
            logits = model(xb)
            loss = loss_fn(logits, torch.from_numpy(y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1).numpy() == y[idx]).sum())
        log(
            f"epoch {epoch + 1}/{epochs}: loss {total / len(x):.3f}, train accuracy {correct / len(x):.3f} "
            f"({time.perf_counter() - start:.1f} s)"
        )
    model.eval()


# ---- main ------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    """Command-line options: output folder, profiles, data and training size, --quick for a smoke run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for bundles and results.json")
    parser.add_argument(
        "--profiles", default=None, help="comma-separated (default: rpi4b,rpi5,jetson-orin-nano)"
    )
    parser.add_argument("--takes", type=int, default=1, help="renditions per word, accent and training voice")
    parser.add_argument("--copies", type=int, default=6, help="noisy placements of each training clip")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--max-accuracy-drop", type=float, default=0.01, help="the build's quality budget")
    parser.add_argument("--quick", action="store_true", help="a small run (≤ 60 s) to check the pipeline")
    return parser.parse_args()


def main() -> int:
    """Synthesise, featurise, train, export, build for each profile, compare; 0 when the table was written."""
    import _common
    import torch

    from edgefleet.sdk.build.plan import PlanOptions

    args = parse_args()
    con = _common.console()
    _common.torch_threads()
    profiles = _common.profiles_arg(args.profiles or _common.DEFAULT_PROFILES)
    accents: tuple[str, ...] = ACCENTS
    train_variants: tuple[str, ...] = TRAIN_VARIANTS
    test_variants: tuple[str, ...] = TEST_VARIANTS
    if args.quick:
        args.takes, args.copies, args.epochs, args.layers = 1, 1, 2, 1
        accents, train_variants, test_variants = ACCENTS[:3], TRAIN_VARIANTS[:2], TEST_VARIANTS[:1]
    out = _common.out_dir(args.out, "speech")

    start = time.perf_counter()
    try:
        train_audio, train_words, _ = synthesise(accents, train_variants, args.takes, seed=1)
        test_audio, test_words, _ = synthesise(accents, test_variants, args.takes, seed=2)
    except EspeakMissing as exc:
        con.print(f"[red]{exc}[/]")
        return 2
    x_train, y_train, _ = features(train_audio, train_words, args.copies, seed=3)
    x_test, y_test, snr_test = features(test_audio, test_words, len(SNR_DB), seed=4)
    con.print(
        f"espeak-ng: {len(train_audio)} training clips ({len(accents)} accents × voices {', '.join(train_variants)}) "
        f"→ {len(x_train)} noisy log-mel rows; held-out voices {', '.join(test_variants)}: {len(x_test)} rows "
        f"at SNR clean/20/10/5 dB ({time.perf_counter() - start:.0f} s)"
    )
    mean, std = x_train.mean(axis=(0, 1)), x_train.std(axis=(0, 1)) + 1e-3
    model = make_transformer(mean, std, layers=args.layers)
    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    train(model, x_train, y_train, args.epochs, log=lambda m: con.log(m, highlight=False))
    train_s = time.perf_counter() - start
    with torch.no_grad():
        torch_acc = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    con.print(
        f"Transformer ({params:,} parameters) trained in {train_s:.0f} s: held-out accuracy {torch_acc:.4f}"
    )

    fp32 = _common.export_onnx(
        model, (torch.from_numpy(x_test[:2]),), out / "keywords_fp32.onnx", ["log_mel"], ["logits"]
    )

    def quality(path: Path) -> float:
        logits = _common.run_outputs(path, {"log_mel": x_test})[0]
        return float((logits.argmax(1) == y_test).mean())

    per_snr = {
        ("clean" if s is None else f"{s:g} dB"): float(
            (model(torch.from_numpy(x_test[snr_test == i])).argmax(1).numpy() == y_test[snr_test == i]).mean()
        )
        for i, s in enumerate(SNR_DB)
    }
    con.print(f"torch accuracy by noise level: {per_snr}")
    calib_rows = np.random.default_rng(5).permutation(len(x_train))[: 256 if not args.quick else 32]
    plan = PlanOptions(prune_levels=(), only=("onnx-int8-dynamic",) if args.quick else _common.CANDIDATES)
    _common.compare(
        example="speech-commands",
        model=model,
        fp32_onnx=fp32,
        calib={"log_mel": x_train[calib_rows], "y": y_train[calib_rows]},
        eval_data={"log_mel": x_test, "y": y_test},
        quality=quality,
        metric="accuracy",
        profiles=profiles,
        out=out,
        plan=plan,
        max_accuracy_drop=args.max_accuracy_drop,
        latency_feed={"log_mel": x_test[:1]},
        con=con,
        extra={
            "train_rows": len(x_train),
            "test_rows": len(x_test),
            "train_voices": list(train_variants),
            "test_voices": list(test_variants),
            "epochs": args.epochs,
            "parameters": params,
            "train_seconds": round(train_s, 1),
            "torch_accuracy": torch_acc,
            "torch_accuracy_by_snr": per_snr,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
