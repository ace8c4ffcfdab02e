"""Device profiles: the built-ins, the host probe and its cache, bad profile files, `edgefleet profiles`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefleet.device_profiles import (
    PRECISIONS,
    RUNTIMES,
    Profile,
    ProfileError,
    builtin_names,
    load_profile,
)
from edgefleet.device_profiles import host as host_mod
from edgefleet.sdk.cli import app

NAMES = [
    "rpi-zero-2w",
    "rpi3b",
    "rpi4b",
    "rpi5",
    "jetson-nano",
    "jetson-orin-nano",
    "jetson-agx-orin",
    "x86-64",
    "arm64",
    "host",
]
STATIC = [n for n in NAMES if n != "host"]
# Figures whose public source `show` must print for every built-in profile.
SOURCED = (
    "cpu_model",
    "cores",
    "clock_ghz",
    "isa",
    "sustained_gflops",
    "int8_speedup",
    "ram_mb",
    "mem_bandwidth_gbs",
    "python",
    "os",
)
RPI4B = (Path(load_profile("rpi4b").path)).read_text(encoding="utf-8")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_CACHE_DIR", str(tmp_path / "cache"))


def test_builtin_names_are_the_ten_from_the_design() -> None:
    assert builtin_names() == NAMES


@pytest.mark.parametrize("name", STATIC)
def test_each_builtin_profile_loads_with_sources(name: str) -> None:
    # act
    profile = load_profile(name)
    # assert
    assert isinstance(profile, Profile)
    assert profile.name == name
    assert profile.threads == profile.cores or 0 < profile.threads <= profile.cores
    assert set(profile.precisions) <= set(PRECISIONS) and "fp32" in profile.precisions
    assert set(profile.runtimes) <= set(RUNTIMES)
    assert profile.onnx_providers()[-1] == "CPUExecutionProvider"
    assert set(profile.runtime_names()) <= {"onnxruntime", "tflite"}
    missing = [f for f in SOURCED if not profile.sources.get(f)]
    assert missing == [], f"{name} lacks sources for {missing}"
    assert profile.sustained_gflops > 0 and profile.mem_bandwidth_gbs > 0
    if profile.gpu is not None:
        assert profile.sources.get("gpu")
    # The Nano's GPU is out of the agent's reach: JetPack 4.6's CUDA 10.2 is too old for onnxruntime 1.16.
    if profile.gpu is not None and name != "jetson-nano":
        assert profile.onnx_providers()[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def test_profiles_are_frozen() -> None:
    profile = load_profile("rpi4b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(profile, "cores", 8)  # noqa: B010 - assigning through the dataclass must fail


def test_pi_profiles_prefer_tflite_and_jetsons_tensorrt() -> None:
    assert load_profile("rpi4b").runtimes[0] == "tflite-xnnpack"
    assert load_profile("rpi4b").runtime_names() == ["tflite", "onnxruntime"]
    assert load_profile("jetson-orin-nano").onnx_providers() == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]


def test_precision_throughput_follows_the_device() -> None:
    pi4, pi5 = load_profile("rpi4b"), load_profile("rpi5")
    # the Pi 4 has no fp16 arithmetic: fp16 runs at the fp32 rate
    assert pi4.cpu_throughput_gflops("fp16") == pi4.cpu_throughput_gflops("fp32")
    assert pi5.cpu_throughput_gflops("fp16") == pytest.approx(pi5.sustained_gflops * pi5.fp16_speedup)
    assert pi4.cpu_throughput_gflops("fp32", threads=1) == pytest.approx(pi4.sustained_gflops / 4)


def test_user_profile_file_loads_by_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(RPI4B.replace('name = "rpi4b"', 'name = "my-board"'), encoding="utf-8")
    profile = load_profile(str(path))
    assert profile.name == "my-board"
    assert profile.path == str(path)


def test_host_profile_is_measured_then_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # act: first load probes and writes the cache
    first = load_profile("host")
    cache = tmp_path / "cache" / "host-profile.json"
    # assert
    assert cache.is_file()
    assert first.sustained_gflops > 0 and first.mem_bandwidth_gbs > 0
    assert "measured" in first.sources["sustained_gflops"]
    assert first.cores >= 1 and first.ram_mb > 0

    def no_probe(seconds: float = 1.0) -> dict[str, object]:
        raise AssertionError("the cached probe should have been used")

    monkeypatch.setattr(host_mod, "probe", no_probe)
    second = load_profile("host")
    assert second.sustained_gflops == first.sustained_gflops


def test_corrupt_host_cache_is_measured_again(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "host-profile.json"
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json", encoding="utf-8")
    profile = load_profile("host")
    assert profile.sustained_gflops > 0
    assert json.loads(cache.read_text(encoding="utf-8"))["measured"]["gflops"] == profile.sustained_gflops


def test_unknown_name_lists_the_builtins() -> None:
    with pytest.raises(ProfileError) as err:
        load_profile("nosuch")
    for name in NAMES:
        assert name in str(err.value)


def _bad(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ProfileError) as err:
        load_profile(str(path))
    message = str(err.value)
    assert str(path) in message
    return message


def test_missing_field_names_file_field_and_type(tmp_path: Path) -> None:
    message = _bad(tmp_path, RPI4B.replace("cores = 4\n", ""))
    assert "'cpu.cores'" in message and "missing" in message and "positive integer" in message


def test_wrong_type_names_file_field_and_type(tmp_path: Path) -> None:
    message = _bad(tmp_path, RPI4B.replace("cores = 4\n", 'cores = "four"\n'))
    assert "'cpu.cores'" in message and "positive integer" in message and "'four'" in message


def test_unknown_runtime_names_allowed_runtimes(tmp_path: Path) -> None:
    text = RPI4B.replace(
        'runtimes = ["tflite-xnnpack", "onnxruntime-cpu"]', 'runtimes = ["tflite-xnnpack", "openvino"]'
    )
    message = _bad(tmp_path, text)
    assert "'software.runtimes'" in message and "'openvino'" in message
    for runtime in RUNTIMES:
        assert runtime in message


def test_unknown_precision_names_allowed_precisions(tmp_path: Path) -> None:
    message = _bad(tmp_path, RPI4B.replace('precisions = ["fp32", "int8"]', 'precisions = ["fp32", "int4"]'))
    assert "'software.precisions'" in message and "'int4'" in message
    assert "fp32, fp16, int8" in message


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    message = _bad(tmp_path, RPI4B.replace("cores = 4\n", "cores = = 4\n"))
    assert "TOML syntax error" in message and "line" in message


def test_gpu_runtime_without_gpu_is_rejected(tmp_path: Path) -> None:
    text = RPI4B.replace(
        'runtimes = ["tflite-xnnpack", "onnxruntime-cpu"]', 'runtimes = ["onnxruntime-cuda"]'
    )
    message = _bad(tmp_path, text)
    assert "'software.runtimes'" in message and "[gpu]" in message


def test_unknown_key_is_rejected_with_allowed_keys(tmp_path: Path) -> None:
    message = _bad(tmp_path, RPI4B.replace("cores = 4\n", "cores = 4\ncorez = 4\n"))
    assert "'cpu.corez'" in message and "clock_ghz" in message


def test_missing_file_is_a_profile_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no such profile file"):
        load_profile(str(tmp_path / "absent.toml"))


runner = CliRunner()


def test_cli_list_json_lists_the_ten_names() -> None:
    result = runner.invoke(app, ["profiles", "list", "--json"])
    assert result.exit_code == 0, result.output
    assert [row["name"] for row in json.loads(result.stdout)] == NAMES


def test_cli_list_table_shows_every_profile() -> None:
    result = runner.invoke(app, ["profiles", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in NAMES:
        assert name in result.stdout


def test_cli_show_rpi4b_json_has_every_field_and_sources() -> None:
    result = runner.invoke(app, ["profiles", "show", "rpi4b", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    fields = {f.name for f in dataclasses.fields(Profile)}
    assert set(doc) == fields
    assert doc["cores"] == 4 and doc["runtimes"][0] == "tflite-xnnpack"
    assert "Raspberry Pi 4" in doc["sources"]["cpu_model"]


def test_cli_show_rpi4b_table_prints_sources() -> None:
    result = runner.invoke(app, ["profiles", "show", "rpi4b"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "sustained_gflops" in result.stdout and "product brief" in result.stdout


def test_cli_show_nosuch_lists_names_and_exits_2() -> None:
    result = runner.invoke(app, ["profiles", "show", "nosuch"], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert "unknown device profile 'nosuch'" in result.output
    assert "jetson-orin-nano" in result.output
    assert "Traceback" not in result.output


def test_cli_show_bad_file_exits_2_with_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(RPI4B.replace("cores = 4\n", 'cores = "four"\n'), encoding="utf-8")
    result = runner.invoke(app, ["profiles", "show", str(path)], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert "cpu.cores" in result.output
