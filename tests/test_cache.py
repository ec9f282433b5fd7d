"""resolve_model: converted dirs, `.nemo` files converted once into the cache, Hugging Face repo ids offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from canary_server import convert
from canary_server.convert import ConversionError
from canary_server.convert.cache import resolve_model
from canary_server.convert.mapping import expected_shapes

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
ESPEAK = SHARED / "models" / "espeak-tiny-en.nemo"


@pytest.fixture
def espeak(tmp_path) -> Path:
    """A private copy, so its mtime and path are the test's own."""
    if not ESPEAK.is_file():
        pytest.skip(f"the espeak-trained tiny model is not at {ESPEAK} (shared/ must sit beside the checkout)")
    copy = tmp_path / "espeak-tiny-en.nemo"
    shutil.copyfile(ESPEAK, copy)
    return copy


def _assert_valid(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    weights = mx.load(str(model_dir / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected_shapes(config)


def test_a_converted_directory_resolves_to_itself(espeak, tmp_path):
    out = convert.convert_nemo(espeak, tmp_path / "converted")
    assert resolve_model(str(out), cache_dir=tmp_path / "cache") == out
    assert not (tmp_path / "cache").exists()


def test_a_nemo_is_converted_once_and_reused(espeak, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = resolve_model(str(espeak), cache_dir=cache)
    assert first.parent == cache and first.name.startswith("espeak-tiny-en-")
    _assert_valid(first)
    mtime = (first / "config.json").stat().st_mtime_ns

    def no_reconversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(convert, "convert_nemo", no_reconversion)
    assert resolve_model(str(espeak), cache_dir=cache) == first
    assert (first / "config.json").stat().st_mtime_ns == mtime


def test_the_cache_dir_defaults_to_canary_cache_dir(espeak, tmp_path, monkeypatch):
    monkeypatch.setenv("CANARY_CACHE_DIR", str(tmp_path / "envcache"))
    assert resolve_model(str(espeak)).parent == tmp_path / "envcache"


def test_another_dtype_or_a_changed_file_gets_its_own_cache_entry(espeak, tmp_path):
    cache = tmp_path / "cache"
    f32 = resolve_model(str(espeak), cache_dir=cache)
    f16 = resolve_model(str(espeak), cache_dir=cache, dtype="float16")
    assert f16 != f32
    assert json.loads((f16 / "config.json").read_text())["dtype"] == "float16"
    os.utime(espeak, ns=(1, 1))
    assert resolve_model(str(espeak), cache_dir=cache) not in (f32, f16)


def test_two_processes_resolving_at_once_both_get_one_valid_directory(espeak, tmp_path):
    cache = tmp_path / "cache"
    code = "import sys; from convert.cache import resolve_model; print(resolve_model(sys.argv[1], sys.argv[2]))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(espeak), str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    target = Path(paths.pop())
    _assert_valid(target)
    entries = sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))
    assert entries == [target.name]  # no partial or leftover staging dirs


def test_missing_paths_and_dirs_without_config_are_clear_errors(tmp_path):
    with pytest.raises(ConversionError, match="no such file or directory"):
        resolve_model(str(tmp_path / "absent.nemo"), cache_dir=tmp_path / "cache")
    with pytest.raises(ConversionError, match="no such file or directory"):
        resolve_model("./not/a/model/dir", cache_dir=tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="has no config.json"):
        resolve_model(str(tmp_path / "empty"), cache_dir=tmp_path / "cache")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ConversionError, match="not a .nemo file"):
        resolve_model(str(tmp_path / "weights.bin"), cache_dir=tmp_path / "cache")


# ---- Hugging Face repo ids, offline against a prepared hub cache -------------------------------------------


def _fake_hub_repo(hub: Path, repo_id: str, files: dict[str, Path | bytes]) -> Path:
    """The layout huggingface_hub keeps: models--org--name/{refs/main, snapshots/<rev>/...}."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copyfile(content, snapshot / name)
        else:
            (snapshot / name).write_bytes(content)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return hf_home / "hub"


def test_a_repo_id_resolves_offline_from_the_hub_cache_and_is_converted_once(espeak, tmp_path, offline_hub):
    _fake_hub_repo(offline_hub, "acme/canary-tiny", {"canary-tiny.nemo": espeak, "config.json": b"{}"})
    cache = tmp_path / "cache"
    first = resolve_model("acme/canary-tiny", cache_dir=cache)
    assert first.parent == cache and first.name.startswith("canary-tiny-")
    _assert_valid(first)
    mtime = (first / "config.json").stat().st_mtime_ns
    assert resolve_model("acme/canary-tiny", cache_dir=cache) == first
    assert (first / "config.json").stat().st_mtime_ns == mtime


def test_hf_hub_cache_takes_precedence_over_hf_home(espeak, tmp_path, offline_hub, monkeypatch):
    other = tmp_path / "elsewhere"
    _fake_hub_repo(other, "acme/canary-tiny", {"m.nemo": espeak})
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    assert resolve_model("acme/canary-tiny", cache_dir=tmp_path / "cache").name.startswith("m-")


def test_an_uncached_repo_offline_is_a_clear_error(tmp_path, offline_hub):
    with pytest.raises(ConversionError, match="acme/absent: not in .* HF_HUB_OFFLINE is set"):
        resolve_model("acme/absent", cache_dir=tmp_path / "cache")


def test_a_repo_without_a_nemo_file_is_a_clear_error(tmp_path, offline_hub):
    _fake_hub_repo(offline_hub, "acme/encoder-only", {"README.md": b"# hi", "config.json": b"{}"})
    with pytest.raises(ConversionError, match="expected exactly one .nemo file in the repo, found none"):
        resolve_model("acme/encoder-only", cache_dir=tmp_path / "cache")


def test_a_killed_conversion_leaves_no_loadable_dir_and_its_debris_is_cleared(espeak, tmp_path, monkeypatch):
    cache = tmp_path / "cache"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if interrupted while writing the weights

    monkeypatch.setattr(convert.write, "stream_weights", killed)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(str(espeak), cache_dir=cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()

    target = resolve_model(str(espeak), cache_dir=cache)
    debris = cache / f".{target.name}.partial-dead"  # what a SIGKILLed run would leave behind
    debris.mkdir()
    (debris / "model.safetensors").write_bytes(b"half")
    shutil.rmtree(target)
    assert resolve_model(str(espeak), cache_dir=cache) == target
    _assert_valid(target)
    assert not debris.exists()
