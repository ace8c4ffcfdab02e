"""The bundle manifest (schema `edgefleet.manifest/1`): frozen dataclasses, strict parsing, canonical bytes.

The manifest is the one document a device trusts about a model, so parsing is strict: every field is
type-checked and a failure names the field. Python 3.9-compatible because the agent runs on devices.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Dict, List, Mapping, Optional, Tuple

from edgefleet.agent.core.errors import VerifyError
from edgefleet.agent.core.quality import (
    ACCURACY,
    ALL_METRIC_NAMES,
    ALL_METRICS,
    TASKS,
    canonical_metric,
    metrics_for_kind,
)

SCHEMA = "edgefleet.manifest/1"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "signature.json"
REPORT_FILE = "report.json"
# A manifest lists a handful of files; 1 MiB bounds what a hostile sender can make the device parse.
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_FILES = 64

FORMATS = ("onnx", "tflite")
RUNTIMES = ("onnxruntime", "tflite")
EVAL_KINDS = ("labels", "reference")
# The vocabulary's names (agent/core/quality.py) and, for old manifests, the names they replaced.
EVAL_METRICS = (*ALL_METRIC_NAMES, "cosine", "top1_agreement")
DTYPES = (
    "float32",
    "float16",
    "float64",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "bool",
)
# Names end up in file paths (ledger, slots), so only a conservative character set is allowed.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PATH_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_RESERVED_FILES = (MANIFEST_FILE, SIGNATURE_FILE)


def canonical_bytes(obj: Any) -> bytes:
    """The one byte form of a JSON document that signatures cover: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def format_time(moment: datetime) -> str:
    """Render an aware datetime as ISO-8601 UTC with a `Z` suffix, seconds precision."""
    if moment.tzinfo is None:
        raise ValueError("format_time needs a timezone-aware datetime; use datetime.now(timezone.utc)")
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str, field_name: str = "time") -> datetime:
    """Parse an ISO-8601 timestamp that carries a timezone; raise manifest-invalid naming the field."""
    if not isinstance(text, str):
        raise _invalid(field_name, "must be an ISO-8601 string such as 2026-01-31T12:00:00Z")
    # datetime.fromisoformat accepts a trailing Z only from Python 3.11; devices may run 3.9.
    candidate = text[:-1] + "+00:00" if text.endswith("Z") else text
    try:
        moment = datetime.fromisoformat(candidate)
    except ValueError:
        raise _invalid(
            field_name, f"{text!r} is not an ISO-8601 timestamp such as 2026-01-31T12:00:00Z"
        ) from None
    if moment.tzinfo is None:
        raise _invalid(field_name, f"{text!r} has no timezone; write it in UTC with a trailing Z")
    return moment.astimezone(timezone.utc)


def _invalid(field_name: str, problem: str) -> VerifyError:
    return VerifyError("manifest-invalid", f"manifest field `{field_name}` {problem}")


def _req(obj: Mapping[str, Any], key: str, prefix: str) -> Any:
    if key not in obj:
        raise _invalid(prefix + key, "is missing")
    return obj[key]


def _str(value: Any, name: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value):
        raise _invalid(name, "must be a non-empty string")
    return value


def _opt_str(value: Any, name: str) -> Optional[str]:
    return None if value is None else _str(value, name)


def _int(value: Any, name: str, minimum: int = 0) -> int:
    # bool is an int subclass in Python; `true` must not pass for a version or a size.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(name, f"must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise _invalid(name, f"must be >= {minimum}, got {value}")
    return value


def _opt_int(value: Any, name: str, minimum: int = 0) -> Optional[int]:
    return None if value is None else _int(value, name, minimum)


def _num(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(name, f"must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise _invalid(name, "must be a finite number")
    return float(value)


def _opt_num(value: Any, name: str) -> Optional[float]:
    return None if value is None else _num(value, name)


def _choice(value: Any, name: str, allowed: Tuple[str, ...]) -> str:
    if value not in allowed:
        raise _invalid(name, f"must be one of {', '.join(allowed)}; got {value!r}")
    return str(value)


def _dict(value: Any, name: str) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(name, "must be a JSON object")
    return value


def _list(value: Any, name: str) -> List[Any]:
    if not isinstance(value, list):
        raise _invalid(name, "must be a JSON array")
    return value


def check_relpath(relpath: str, name: str = "files") -> str:
    """Accept only plain relative POSIX paths made of safe parts: no `..`, no absolute path, no backslash."""
    if not isinstance(relpath, str) or not relpath:
        raise _invalid(name, "has an empty file name")
    parts = relpath.split("/")
    if relpath.startswith("/") or any(not _PATH_PART_RE.match(p) or p in (".", "..") for p in parts):
        raise _invalid(
            name,
            f"has an unsafe file name {relpath!r}: use relative names of letters, digits, `.`, `_`, `-`",
        )
    return relpath


@dataclass(frozen=True)
class Target:
    """Which devices may install the bundle: one profile and, optionally, a list of device ids."""

    profile: str
    device_ids: Tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, obj: Any) -> Target:
        """Parse and validate the `target` object."""
        obj = _dict(obj, "target")
        ids = obj.get("device_ids") or []
        return cls(
            profile=_str(_req(obj, "profile", "target."), "target.profile"),
            device_ids=tuple(_str(d, "target.device_ids[]") for d in _list(ids, "target.device_ids")),
        )

    def to_dict(self) -> Dict[str, Any]:
        """JSON form."""
        return {"profile": self.profile, "device_ids": list(self.device_ids)}


@dataclass(frozen=True)
class ModelSpec:
    """The model file and what it needs to run: format, runtime, minimum version, opset, providers."""

    file: str
    format: str
    runtime: str
    min_runtime_version: Optional[str] = None
    opset: Optional[int] = None
    execution_providers: Tuple[str, ...] = ()
    batch_size: Optional[int] = None

    @classmethod
    def from_dict(cls, obj: Any) -> ModelSpec:
        """Parse and validate the `model` object."""
        obj = _dict(obj, "model")
        providers = obj.get("execution_providers") or []
        return cls(
            file=check_relpath(_str(_req(obj, "file", "model."), "model.file"), "model.file"),
            format=_choice(_req(obj, "format", "model."), "model.format", FORMATS),
            runtime=_choice(_req(obj, "runtime", "model."), "model.runtime", RUNTIMES),
            min_runtime_version=_opt_str(obj.get("min_runtime_version"), "model.min_runtime_version"),
            opset=_opt_int(obj.get("opset"), "model.opset", 1),
            execution_providers=tuple(
                _str(p, "model.execution_providers[]") for p in _list(providers, "model.execution_providers")
            ),
            batch_size=_opt_int(obj.get("batch_size"), "model.batch_size", 1),
        )

    def to_dict(self) -> Dict[str, Any]:
        """JSON form."""
        return {
            "file": self.file,
            "format": self.format,
            "runtime": self.runtime,
            "min_runtime_version": self.min_runtime_version,
            "opset": self.opset,
            "execution_providers": list(self.execution_providers),
            "batch_size": self.batch_size,
        }


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, dtype, shape (None = dynamic dimension) and preprocessing notes."""

    name: str
    dtype: str
    shape: Optional[Tuple[Optional[int], ...]] = None
    preprocessing: str = ""

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> TensorSpec:
        """Parse and validate one entry of `inputs` or `outputs`."""
        obj = _dict(obj, where)
        raw_shape = obj.get("shape")
        shape: Optional[Tuple[Optional[int], ...]] = None
        if raw_shape is not None:
            shape = tuple(_opt_int(d, f"{where}.shape[]", 0) for d in _list(raw_shape, f"{where}.shape"))
        return cls(
            name=_str(_req(obj, "name", where + "."), f"{where}.name"),
            dtype=_choice(_req(obj, "dtype", where + "."), f"{where}.dtype", DTYPES),
            shape=shape,
            preprocessing=_str(obj.get("preprocessing", ""), f"{where}.preprocessing", allow_empty=True),
        )

    def to_dict(self) -> Dict[str, Any]:
        """JSON form."""
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": None if self.shape is None else list(self.shape),
            "preprocessing": self.preprocessing,
        }


@dataclass(frozen=True)
class FileEntry:
    """Declared size and sha256 of one bundle file; the device reads no more than `size` bytes of it."""

    size: int
    sha256: str

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> FileEntry:
        """Parse and validate one entry of `files`."""
        obj = _dict(obj, where)
        digest = _str(_req(obj, "sha256", where + "."), f"{where}.sha256")
        if not _SHA256_RE.match(digest):
            raise _invalid(f"{where}.sha256", "must be 64 lowercase hex digits")
        return cls(size=_int(_req(obj, "size", where + "."), f"{where}.size", 0), sha256=digest)

    def to_dict(self) -> Dict[str, Any]:
        """JSON form."""
        return {"size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class EvalSpec:
    """The eval file shipped with the model and how the health check scores it (docs/quality.md)."""

    file: str
    kind: str
    metric: str
    # The build's task (classification, detection, ctc, embedding); None in manifests before tasks.
    task: Optional[str] = None

    @classmethod
    def from_dict(cls, obj: Any) -> EvalSpec:
        """Parse the `eval` object: labels go with accuracy, reference outputs with agreement or fidelity,
        the task metrics (map50, token_error_rate, embedding_cosine) with either.

        Old names (`cosine`, `top1_agreement`) parse into the vocabulary's (`fidelity`, `agreement`).
        """
        obj = _dict(obj, "eval")
        kind = _choice(_req(obj, "kind", "eval."), "eval.kind", EVAL_KINDS)
        metric = _choice(_req(obj, "metric", "eval."), "eval.metric", EVAL_METRICS)
        metric = canonical_metric(metric)
        if metric not in metrics_for_kind(kind):
            raise _invalid(
                "eval.metric",
                "must be `accuracy` for kind `labels` and `agreement` or `fidelity` for kind `reference` "
                "(map50, token_error_rate and embedding_cosine go with either)",
            )
        task: Optional[str] = None
        if obj.get("task") is not None:
            task = _choice(obj.get("task"), "eval.task", TASKS)
            if ALL_METRICS[metric].task != task:
                raise _invalid(
                    "eval.task", f"is {task!r}, but metric {metric!r} scores {ALL_METRICS[metric].task!r}"
                )
        return cls(
            file=check_relpath(_str(_req(obj, "file", "eval."), "eval.file"), "eval.file"),
            kind=kind,
            metric=metric,
            task=task,
        )

    def to_dict(self) -> Dict[str, Any]:
        """JSON form (`task` only when the manifest names one, so older manifests keep their bytes)."""
        out: Dict[str, Any] = {"file": self.file, "kind": self.kind, "metric": self.metric}
        if self.task is not None:
            out["task"] = self.task
        return out


@dataclass(frozen=True)
class HealthPolicy:
    """What the device checks before switching to a new model; failing any item rolls back.

    `min_quality` is the floor on `metric` (None: the eval's metric), set by the build as the reference
    model's value less `--max-accuracy-drop`. Old manifests' `min_accuracy` / `min_fidelity` still parse.
    """

    metric: Optional[str] = None
    min_quality: Optional[float] = None
    max_p95_ms: Optional[float] = None
    warmup_runs: int = 3
    timeout_s: float = 60.0

    @property
    def min_accuracy(self) -> Optional[float]:
        """The floor when it is on accuracy (the old field's meaning), else None."""
        return self.min_quality if self.metric == ACCURACY else None

    @property
    def min_fidelity(self) -> Optional[float]:
        """The floor when it is on a reference metric (agreement or fidelity; the old field's meaning)."""
        return self.min_quality if self.metric in ("agreement", "fidelity") else None

    @classmethod
    def from_dict(cls, obj: Any, eval_kind: Optional[str] = None) -> HealthPolicy:
        """Parse and validate the `health` object; `eval_kind` picks between old min_accuracy/min_fidelity."""
        obj = _dict(obj, "health")
        metric: Optional[str] = None
        if obj.get("metric") is not None:
            metric = _choice(obj.get("metric"), "health.metric", EVAL_METRICS)
            metric = canonical_metric(metric)
        floors = [
            (name, _opt_num(obj.get(name), f"health.{name}"))
            for name in ("min_quality", "min_accuracy", "min_fidelity")
        ]
        for name, value in floors:
            if value is not None and not 0.0 <= value <= 1.0:
                raise _invalid(f"health.{name}", f"must be between 0 and 1, got {value}")
        given = {name: value for name, value in floors if value is not None}
        min_quality = given.get("min_quality")
        if min_quality is None and given:
            # An old manifest: min_accuracy guarded a labels eval, min_fidelity a reference eval, and an
            # agent ignored the one that did not fit the eval's kind.
            if eval_kind is None:
                name = next(iter(given))
            else:
                name = "min_accuracy" if eval_kind == "labels" else "min_fidelity"
            min_quality = given.get(name)
            if metric is None and name == "min_accuracy" and min_quality is not None:
                metric = ACCURACY
        policy = cls(
            metric=metric,
            min_quality=min_quality,
            max_p95_ms=_opt_num(obj.get("max_p95_ms"), "health.max_p95_ms"),
            warmup_runs=_int(obj.get("warmup_runs", 3), "health.warmup_runs", 0),
            timeout_s=_num(obj.get("timeout_s", 60.0), "health.timeout_s"),
        )
        if policy.max_p95_ms is not None and policy.max_p95_ms <= 0:
            raise _invalid("health.max_p95_ms", "must be positive")
        if policy.timeout_s <= 0:
            raise _invalid("health.timeout_s", "must be positive")
        return policy

    def for_eval(self, eval_spec: EvalSpec) -> HealthPolicy:
        """This policy with its metric resolved against the eval (None → the eval's metric), checked to fit."""
        metric = self.metric or eval_spec.metric
        if metric not in metrics_for_kind(eval_spec.kind):
            raise _invalid(
                "health.metric",
                f"is {metric!r}, which an eval of kind {eval_spec.kind!r} cannot score; use one of "
                f"{', '.join(metrics_for_kind(eval_spec.kind))}",
            )
        return replace(self, metric=metric)

    def to_dict(self) -> Dict[str, Any]:
        """JSON form."""
        return {
            "metric": self.metric,
            "min_quality": self.min_quality,
            "max_p95_ms": self.max_p95_ms,
            "warmup_runs": self.warmup_runs,
            "timeout_s": self.timeout_s,
        }


_KNOWN_KEYS = (
    "schema",
    "name",
    "version",
    "created",
    "expires",
    "target",
    "model",
    "inputs",
    "outputs",
    "files",
    "eval",
    "compression",
    "metrics",
    "health",
)


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest. Build one with `from_bytes` (bounded) or `from_dict`."""

    name: str
    version: int
    created: str
    expires: str
    target: Target
    model: ModelSpec
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    files: Dict[str, FileEntry]
    eval: EvalSpec
    health: HealthPolicy
    compression: Tuple[Dict[str, Any], ...] = ()
    metrics: Dict[str, Any] = field(default_factory=dict)
    # Fields a newer host added that this agent does not know; kept so to_dict round-trips.
    extra: Dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA

    @property
    def created_at(self) -> datetime:
        """`created` as an aware UTC datetime."""
        return parse_time(self.created, "created")

    @property
    def expires_at(self) -> datetime:
        """`expires` as an aware UTC datetime."""
        return parse_time(self.expires, "expires")

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse manifest bytes (at most 1 MiB) and validate every field."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise VerifyError(
                "manifest-too-large",
                f"the manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit; "
                "a real manifest is a few KiB, so this one is corrupt or hostile",
            )
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise VerifyError("manifest-invalid", f"the manifest is not UTF-8 JSON: {exc}") from None
        except RecursionError:
            # Deeply nested arrays exhaust the parser's stack; no real manifest nests more than 4 levels.
            raise VerifyError("manifest-invalid", "the manifest nests too deeply to be a manifest") from None
        return cls.from_dict(obj)

    @classmethod
    def from_dict(cls, obj: Any) -> Manifest:
        """Validate a decoded manifest; raises VerifyError('manifest-invalid') naming the bad field."""
        if not isinstance(obj, dict):
            raise VerifyError("manifest-invalid", "the manifest must be a JSON object")
        schema = obj.get("schema")
        if schema != SCHEMA:
            raise VerifyError(
                "schema-unsupported",
                f"manifest schema {schema!r} is not supported by this agent (it reads {SCHEMA!r}); "
                "upgrade the agent or build the bundle with a matching edgefleet version",
            )
        name = _str(_req(obj, "name", ""), "name")
        if not NAME_RE.match(name):
            raise _invalid("name", f"{name!r} must be letters, digits, `.`, `_`, `-` (at most 128)")
        created = _str(_req(obj, "created", ""), "created")
        expires = _str(_req(obj, "expires", ""), "expires")
        if parse_time(expires, "expires") <= parse_time(created, "created"):
            raise _invalid("expires", "must be later than `created`")
        files_obj = _dict(_req(obj, "files", ""), "files")
        if len(files_obj) > MAX_FILES:
            raise _invalid("files", f"lists {len(files_obj)} files, more than the {MAX_FILES} allowed")
        files: Dict[str, FileEntry] = {}
        for relpath, entry in files_obj.items():
            check_relpath(relpath, "files")
            if relpath in _RESERVED_FILES:
                raise _invalid("files", f"must not list {relpath}: it is covered by the signature itself")
            files[relpath] = FileEntry.from_dict(entry, f"files.{relpath}")
        model = ModelSpec.from_dict(_req(obj, "model", ""))
        eval_spec = EvalSpec.from_dict(_req(obj, "eval", ""))
        for where, relpath in (("model.file", model.file), ("eval.file", eval_spec.file)):
            if relpath not in files:
                raise _invalid(where, f"names {relpath!r}, which `files` does not list")
        compression = _list(obj.get("compression", []), "compression")
        for i, step in enumerate(compression):
            _dict(step, f"compression[{i}]")
        return cls(
            schema=SCHEMA,
            name=name,
            version=_int(_req(obj, "version", ""), "version", 1),
            created=created,
            expires=expires,
            target=Target.from_dict(_req(obj, "target", "")),
            model=model,
            inputs=tuple(
                TensorSpec.from_dict(t, f"inputs[{i}]")
                for i, t in enumerate(_list(_req(obj, "inputs", ""), "inputs"))
            ),
            outputs=tuple(
                TensorSpec.from_dict(t, f"outputs[{i}]")
                for i, t in enumerate(_list(_req(obj, "outputs", ""), "outputs"))
            ),
            files=files,
            eval=eval_spec,
            health=HealthPolicy.from_dict(_req(obj, "health", ""), eval_spec.kind).for_eval(eval_spec),
            compression=tuple(compression),
            metrics=_dict(obj.get("metrics", {}), "metrics"),
            extra={k: v for k, v in obj.items() if k not in _KNOWN_KEYS},
        )

    def to_dict(self) -> Dict[str, Any]:
        """JSON form; `canonical_bytes(m.to_dict())` is what the host signs."""
        out: Dict[str, Any] = dict(self.extra)
        out.update(
            {
                "schema": self.schema,
                "name": self.name,
                "version": self.version,
                "created": self.created,
                "expires": self.expires,
                "target": self.target.to_dict(),
                "model": self.model.to_dict(),
                "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs],
                "files": {k: v.to_dict() for k, v in sorted(self.files.items())},
                "eval": self.eval.to_dict(),
                "health": self.health.to_dict(),
                "compression": list(self.compression),
                "metrics": self.metrics,
            }
        )
        return out

    def canonical(self) -> bytes:
        """The canonical bytes of this manifest."""
        return canonical_bytes(self.to_dict())
