"""The torch stage's conversions in a forked child: a native crash or a hang there fails one candidate.

torch → ONNX checks parity by loading the exported graph in onnxruntime, torch → TFLite runs LiteRT's
converter, quantizer and interpreter: C++ code that can kill the process (SIGSEGV, SIGABRT) or never
return. The build therefore runs each conversion in a child forked from the build process (the torch
model is already in its memory, so nothing is pickled or saved twice) and waits for its answer with a
deadline, as the ONNX-stage worker does (isolate.py):

- the child dies by a signal → `crashed (signal 11)`; it exits on its own → `crashed (exit code N)`,
- no answer within the timeout → it is killed, `timed out after N s`,
- a Python exception → the exception's type and first line, as in-process.

Why fork and not a fresh interpreter: the model may be an `nn.Module` whose class lives in a script's
`__main__`, which a fresh interpreter cannot unpickle. Why one torch thread in the child: the CPU wheel's
OpenMP (libgomp) is not fork-safe — a child that starts a parallel region with the parent's thread count
hangs (measured: the first convolution never returned); with one thread it never enters a team. Pruning,
which trains, stays in the parent: it is torch-only (no graph loaded by a native runtime) and its result,
a torch model, is what the conversions read. Where fork is missing (not Linux) the conversions run in
the build's process, and report.json says so. XLA (JAX, under litert-torch) and TensorFlow are not
fork-safe at all: when either already runs in the build's process (a Python session that converted a
model before), the conversions run in-process and report.json lists them (`fork_hazard`).
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import sys
import time
from typing import Any, Callable, Optional, TypeVar

from edgefleet.sdk.build.errors import BuildError

T = TypeVar("T")
Progress = Optional[Callable[[str, float], None]]
_HEADER = struct.Struct(">Q")


class ConversionFailed(BuildError):
    """A conversion child crashed, hung or raised; `reason` is what report.json records."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def fork_hazard() -> Optional[str]:
    """Why forking this process now would hang the child, or None.

    XLA (JAX, which litert-torch lowers through) and TensorFlow keep thread pools that a forked child
    inherits without their threads: measured here, a TFLite conversion forked from a process that had
    already run one in-process hung in JAX's lowering for good. The build itself never starts them (its
    conversions run in children), but a Python session that converted a model before may have.
    """
    bridge = sys.modules.get("jax._src.xla_bridge")
    if bridge is not None and getattr(bridge, "_backends", None):
        return "JAX/XLA already runs in this process"
    if "tensorflow" in sys.modules:
        return "TensorFlow is loaded in this process"
    return None


def fork_available() -> bool:
    """Whether conversions can run in a forked child here (Linux; macOS' frameworks are not fork-safe)."""
    return hasattr(os, "fork") and sys.platform.startswith("linux")


class ForkedCalls:
    """Runs one conversion at a time in a forked child, with a deadline; `isolate=False` runs them here."""

    def __init__(self, timeout: float, progress: Progress = None, isolate: bool = True) -> None:
        if timeout <= 0:
            raise ValueError(f"conversion timeout must be positive, got {timeout}")
        self.timeout = timeout
        self.progress = progress
        self.mode = "fork" if isolate and fork_available() else "in-process"
        self.crashes = 0  # children that crashed or timed out
        self.unforked: list[str] = []  # why some conversions ran in this process after all

    def call(self, fn: Callable[[Progress], T], what: str) -> T:
        """`fn(progress)` in a child; its picklable result here, or ConversionFailed with the reason."""
        if self.mode != "fork":
            return fn(self.progress)
        hazard = fork_hazard()
        if hazard is not None:
            # A child would hang, not crash: convert here, unprotected, and say so in report.json.
            self.unforked.append(f"{what}: {hazard}")
            return fn(self.progress)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(read_fd)
            _child(fn, write_fd)
        os.close(write_fd)
        try:
            return self._wait(pid, read_fd, what)
        finally:
            os.close(read_fd)

    def _wait(self, pid: int, fd: int, what: str) -> Any:
        buffer = b""
        stage = what
        deadline = time.monotonic() + self.timeout
        while True:
            while len(buffer) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(buffer)
                if len(buffer) < _HEADER.size + size:
                    break
                message = pickle.loads(buffer[_HEADER.size : _HEADER.size + size])
                buffer = buffer[_HEADER.size + size :]
                kind = message[0]
                if kind == "progress":
                    stage = str(message[1])
                    if self.progress is not None:
                        self.progress(stage, float(message[2]))
                    continue
                _reap(pid)
                if kind == "done":
                    return message[1]
                raise ConversionFailed(str(message[1]))
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                _reap(pid)
                self.crashes += 1
                raise ConversionFailed(
                    f"timed out after {self.timeout:g} s (while {stage}); the conversion was stopped"
                )
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            if not poller.poll(max(1, int(left * 1000))):
                continue
            chunk = os.read(fd, 1 << 20)
            if chunk:
                buffer += chunk
                continue
            status = _reap(pid)  # the pipe closed without an answer: the child is gone
            self.crashes += 1
            if os.WIFSIGNALED(status):
                number = os.WTERMSIG(status)
                try:
                    name = signal.Signals(number).name
                except ValueError:
                    name = "unknown signal"
                raise ConversionFailed(
                    f"crashed (signal {number}): {name} while {stage}; the converter's messages are in the "
                    "build log"
                )
            raise ConversionFailed(
                f"crashed (exit code {os.WEXITSTATUS(status)}) while {stage}; see the build log"
            )


def _reap(pid: int) -> int:
    """Wait for the child; its raw wait status."""
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except InterruptedError:
            continue
        except ChildProcessError:
            return 0


def _fresh_streams() -> None:
    """New sys.stdout/sys.stderr objects on the same descriptors, for the child's prints.

    Only the forking thread lives on in the child: had another thread (a progress display refreshing
    the terminal) held a stream's internal lock at the fork, the converter's first print would wait on
    it forever. Fresh objects have fresh locks; logging's own locks are reset by the logging module.
    """
    import logging

    replaced: dict[int, Any] = {}  # id of the parent's stream object -> the child's fresh one
    for name, fd in (("stdout", 1), ("stderr", 2)):
        try:
            fresh = os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")
        except OSError:  # no such descriptor (a daemon): keep what there is
            continue
        replaced[id(getattr(sys, name))] = fresh
        setattr(sys, name, fresh)
    for handler in logging.root.handlers:
        if isinstance(handler, logging.StreamHandler) and id(handler.stream) in replaced:
            handler.setStream(replaced[id(handler.stream)])


def _child(fn: Callable[[Progress], Any], fd: int) -> None:
    """Run `fn` and send its result (or its failure) down `fd`; exit without the parent's teardown."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the parent decides
        _fresh_streams()
        try:
            import torch

            torch.set_num_threads(1)  # before any parallel region: libgomp is not fork-safe
        except ImportError:
            pass

        def send(obj: Any) -> None:
            payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            data = memoryview(_HEADER.pack(len(payload)) + payload)
            while data:
                data = data[os.write(fd, data) :]

        try:
            result = fn(lambda message, fraction: send(("progress", message, fraction)))
        except BaseException as exc:  # every failure is this conversion's, reported
            from edgefleet.sdk.build.isolate import failure_reason

            send(("error", failure_reason(exc)))
        else:
            try:
                send(("done", result))
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                send(("error", f"the conversion's result cannot be sent back to the build: {exc}"))
    except BaseException:  # the pipe or pickling failed: the parent sees an exit code
        code = 3
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # a closed stream: nothing to flush
            pass
        os._exit(code)  # never run the parent's atexit handlers or finalizers twice


__all__ = ["ConversionFailed", "ForkedCalls", "fork_available", "fork_hazard"]
