"""Every bench script runs (issue 12, item 11), each once with minimal sizes: on the `tiny` random model of
bench/random_model.py (2-layer encoder and decoder of width 64; random weights) or on the espeak-trained test model.

Timings at these sizes mean nothing and are not checked: what is checked is that each script finishes, prints its
table, and loads OpenBLAS before MLX (a script that imports MLX first is measured with MLX's slow reference BLAS).
bench/nemo_baseline.py needs NeMo and torch, which are never this project's dependencies: it runs in NeMo's own
interpreter ($NEMO_PYTHON, default a `nemo-venv` beside the checkout: ../nemo-venv/bin/python) and is skipped where
that does not exist.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import ESPEAK_NEMO, REPO

BENCH = REPO / "bench"
NEMO_PYTHON = Path(os.environ.get("NEMO_PYTHON") or REPO.parent / "nemo-venv" / "bin" / "python")
# What each script is run with here (bench/synth.py is a module; bench/serve_capped.py is the server run.py starts).
SMOKE_ARGS = {
    "random_model.py": ["tiny", "--out", "{tiny}"],
    "random_salm.py": ["tiny-salm", "--out", "{tiny}-salm"],
    "run.py": [
        "--model",
        "tiny",
        "--model-dir",
        "{tiny}",
        "--repeats",
        "1",
        "--single-seconds",
        "2",
        "5",
        "--concurrency",
        "1",
        "2",
        "--clips-per-client",
        "2",
        "--long-seconds",
        "12",
    ],  # fmt: skip
    "fairness.py": ["--model", "tiny", "--model-dir", "{tiny}", "--shares", "0.5", "--long-seconds", "12"],
    "encoder_ops.py": ["--model", "tiny", "--model-dir", "{tiny}", "--repeats", "1"],
    "decoder_step.py": ["--dims", "tiny", "--steps", "2", "--batches", "1", "2", "--gemv-pairs", "1", "--matmuls"],
    "streaming_step.py": ["--model", "{tiny}", "--streams", "1", "2", "--steps", "1", "--left", "1"],
    "stages.py": ["--model", "tiny", "--model-dir", "{tiny}", "--seconds", "2", "--repeats", "1", "--no-nemo"],
    "engine_split.py": [
        "--model",
        "tiny",
        "--model-dir",
        "{tiny}",
        "--seconds",
        "2",
        "--concurrency",
        "1",
        "3",
        "--clips-per-client",
        "2",
    ],  # fmt: skip
    "nemo_stages.py": ["--model", "tiny", "--tokenizers", "{tiny}", "--seconds", "2", "--repeats", "1"],
    "quantize_eval.py": ["--repeats", "1", "--clips", "2"],
    "dtype_eval.py": ["--variants", "float32,float16", "--only", "v2_ctc,espeak-en"],
    "convert_memory.py": [str(ESPEAK_NEMO), "--out", "{tiny}-converted"],
    "nemo_baseline.py": ["--model", "tiny", "--tokenizers", "{tiny}", "--repeats", "1", "--seconds", "2"],
    "nemo_salm.py": [
        "--model-dir",
        "{tiny}-salm",
        "--repeats",
        "1",
        "--seconds",
        "2",
        "--concurrency",
        "2",
        "--clips-per-client",
        "1",
    ],  # fmt: skip
    # writes a 6.4 GB canary-1b-v2-size .nemo with NeMo (run by hand, for the converter's peak memory): only its
    # arguments are checked here
    "make_big_v2_nemo.py": ["--help"],
    "wyoming_latency.py": ["--models", "espeak", "--repeats", "2", "--cache-dir", "{tiny}-cache"],
    "keywords.py": ["--clips", "10", "--keywords", "3", "--alphas", "1"],
    "idle_unload.py": ["--models", "espeak", "--repeats", "1", "--cache-dir", "{tiny}-cache"],
    "language_id.py": ["--repeats", "1", "--skip-heldout", "--dims", "tiny", "--cache-dir", "{tiny}-cache"],
    "soak.py": ["--requests", "12", "--concurrency", "2", "--long-seconds", "6", "--pool", "3", "--seed", "3"],
    "lifecycle.py": ["--bursts", "1", "--files", "1", "--seconds", "8", "--settle", "0.5", "--signal-after", "0.5"],
    "router_throughput.py": ["--requests", "4", "--concurrency", "2", "--rounds", "1"],
    "idle_release.py": ["{tiny}", "--seconds", "2", "--repeats", "1", "--idle", "0.3", "--release-after", "0.1"],
    "vad_eval.py": ["--clips", "1"],
    "realtime_latency.py": ["--streams", "1", "--utterances", "1", "--files", "1"],
    "vad_cut_eval.py": ["--recordings", "1", "--prefix-ms", "100"],
    "live_detect_seconds.py": [],
    "live_detect_latency.py": ["--runs", "1", "--clips", "de_00.wav"],
}
NOT_SCRIPTS = {"synth.py", "serve_capped.py", "machine_info.py", "wer.py", "serving.py"}
NEEDS_NEMO = {"nemo_baseline.py", "make_big_v2_nemo.py", "nemo_stages.py", "nemo_salm.py"}


def _bench(script: str, tiny: Path | None = None, python: str = sys.executable) -> str:
    args = [a.format(tiny=tiny) for a in SMOKE_ARGS[script]]
    with tempfile.TemporaryDirectory() as home:  # whatever a script or NeMo (~/.lhotse) writes to ~ stays here
        env = {**os.environ, "HOME": home}
        cmd = [python, str(BENCH / script), *args]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OpenBLAS preload skipped" not in proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "tiny"
    assert "0.6M parameters" in _bench("random_model.py", out)
    return out


def test_every_bench_script_has_a_smoke_run():
    scripts = {p.name for p in BENCH.glob("*.py")} - NOT_SCRIPTS
    assert scripts == set(SMOKE_ARGS)


def test_run_measures_the_server_end_to_end(tiny):
    out = _bench("run.py", tiny)
    assert "| 2 s |" in out and "| 5 s |" in out and "| concurrency 2 | 4 |" in out
    assert "one at a time during a 12 s file" in out and "Peak memory: server peak RSS" in out
    assert re.search(r"^Throughput at concurrency 2 / concurrency 1: [\d.]+x \(median; each repetition's runs back "
                     r"to back: [\d.]+\)\.$", out, flags=re.M), out  # fmt: skip


def test_run_measures_a_canary_qwen_shaped_model(tiny):
    assert "M parameters" in _bench("random_salm.py", tiny)
    args = ["--model", "tiny-salm", "--model-dir", f"{tiny}-salm", "--repeats", "1", "--single-seconds", "2",
            "--concurrency", "2", "--clips-per-client", "2", "--long-seconds", "12"]  # fmt: skip
    env = {**os.environ, "CANARY_WYOMING_PORT": "0"}  # HTTP only: nothing else to listen on
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| 2 s |" in proc.stdout and "| concurrency 2 | 4 |" in proc.stdout


def test_fairness_measures_both_sides_of_the_share(tiny):
    out = _bench("fairness.py", tiny)
    assert "during a 12 s file" in out and re.search(r"^\| 0\.5 \| \d+ \|", out, flags=re.M)


def test_encoder_ops_times_the_ops_and_the_encoder(tiny):
    out = _bench("encoder_ops.py", tiny)
    assert "| SiLU, 0.77 M values" in out and "| 1 x 30 s |" in out and "| depthwise conv1d k=9" in out
    assert re.search(r"^\| feed-forward in \(64 -> 256\) \| 378 \| [\d.]+ \|", out, flags=re.M)
    assert "position projections every call" in out


def test_streaming_step_times_chunk_steps(tiny):
    out = _bench("streaming_step.py", tiny)
    assert re.search(r"^  2 streams: +[\d.]+ ms per step", out, flags=re.M)


def test_decoder_step_times_batched_steps():
    out = _bench("decoder_step.py")
    assert re.search(r"\| nn\.Linear \| 2 \| [\d.]+ \| [\d.]+ \| \d+ \|", out)
    # the limit table: bytes per step, ops and host reads per step for both paths (counts, not times)
    cpu_row = r"^\| cpu \| 1 \| [\d.]+ \(.*\) \| [\d.]+ \| [\d.]+ \| [\d.]+x \| \d+ \| 2 \|$"
    assert re.search(cpu_row, out, flags=re.M), out
    assert re.search(r"^\| gpu \| 2 \| .* \| \d+ \| 2 \|$", out, flags=re.M), out
    # sgemm only vs sgemv forwarding, interleaved (or a line saying the forwarder is not built)
    gemv_row = r"^\| nn\.Linear \| 1 \| [\d.]+ \| [\d.]+ \| [\d.]+x \|$"
    assert re.search(gemv_row, out, flags=re.M) or "no sgemv forwarding" in out, out
    # the step's products: float32 nn.Linear, packed (nan without AVX-512), MLX's 8-bit, the 8-bit CPU kernel (or
    # why that is not there)
    products_row = r"^\| 2 \| [\d.]+ \| ([\d.]+|nan) \| [\d.]+ \| [\d.]+ \|$"
    assert re.search(products_row, out, flags=re.M) or "8-bit kernel not" in out, out
    # the same float32 products through sgemm and each few-row kernel build the CPU runs (or why there is none)
    header = r"products: sgemm \(ms\) \| few-row kernel, generic \(ms\).*\n.*\n"
    isa_table = re.search(header + r"\| 2 \| [\d.]+ \| [\d.]+", out)
    assert isa_table or "no few-row kernel" in out, out


def test_stages_breaks_one_request_into_its_stages(tiny):
    out = _bench("stages.py", tiny)
    for stage in ("upload decode", "features", "encoder", "prompt + prefill", "decoder steps", "total"):
        assert re.search(rf"^\| {re.escape(stage)} \| \d+ \|", out, flags=re.M), out


def test_engine_split_splits_the_batchers_time_under_concurrency(tiny):
    out = _bench("engine_split.py", tiny)
    row = r"^\| 1 \| 2 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| -?[\d.]+ \| \d+ \| [\d.]+ \|$"
    assert re.search(row, out, flags=re.M), out
    assert re.search(r"^\| 3 \| 6 \|", out, flags=re.M) and "The encoder alone at concurrency 3" in out, out


def test_nemo_stages_runs_in_nemos_interpreter(tiny):
    _require_nemo("nemo_stages.py")
    out = _bench("nemo_stages.py", tiny, python=str(NEMO_PYTHON))
    stages = json.loads(out.strip().splitlines()[-1])
    assert stages["tokens"] == 8 and stages["steps"] == 7 and stages["encoder"] > 0, out


def test_quantize_eval_reports_the_quantized_share_of_the_cpu_layouts_linears():
    if not ESPEAK_NEMO.is_file():
        pytest.skip(f"the espeak-trained test model is not at {ESPEAK_NEMO}")
    out = _bench("quantize_eval.py")
    rows = {line.split(" | ")[0]: line for line in out.splitlines() if line.startswith(("| 8-bit", "| float32"))}
    assert "| 0% |" in rows["| float32"] and "| 60% |" in rows["| 8-bit affine, group 64"], out  # the README's table
    assert "| 35% |" in rows["| float32, decoder quantized to 8 bits at load (decoder_bits = 8)"], out  # decoder only


def test_dtype_eval_compares_dtypes_with_nemo_on_the_fixtures():
    out = _bench("dtype_eval.py")
    assert re.search(r"^\| float32 \| 6/6 \| - \| 100\.0% \|", out, flags=re.M), out
    assert re.search(r"^\| float16 \| \d/6 \|", out, flags=re.M) and "| v2_ctc | 6/6 |" in out
    if ESPEAK_NEMO.is_file():
        assert re.search(r"^\| float32 \|.* 9\.6% \(9\.6%\) \| 12/12 \|", out, flags=re.M), out


def _require_nemo(script: str) -> None:
    if not NEMO_PYTHON.exists():
        pytest.skip(f"bench/{script} needs NeMo and torch: no NeMo interpreter at {NEMO_PYTHON}")


def test_convert_memory_measures_a_conversion(tiny):
    if not ESPEAK_NEMO.is_file():
        pytest.skip(f"the espeak-trained test model is not at {ESPEAK_NEMO}")
    out = _bench("convert_memory.py", tiny)
    assert re.search(r"^\| 0\.02 GB \| float32 \| \d+ s \| [\d.]+ GB \|", out, flags=re.M), out
    assert not Path(f"{tiny}-converted").exists()


def test_nemo_baseline_runs_in_nemos_interpreter(tiny):
    _require_nemo("nemo_baseline.py")
    out = _bench("nemo_baseline.py", tiny, python=str(NEMO_PYTHON))
    assert '"rtfx"' in out and '"seconds": 2.0' in out


def test_nemo_salm_runs_in_nemos_interpreter(tiny):
    _require_nemo("nemo_salm.py")
    assert "M parameters" in _bench("random_salm.py", tiny)  # {tiny}-salm: its dims, its tokenizer
    out = _bench("nemo_salm.py", tiny, python=str(NEMO_PYTHON))  # NeMo logs to stdout too: the JSON is last
    res = json.loads(out[out.rindex('{\n  "torch"') :])
    assert [r["seconds"] for r in res["single"]] == [2.0] and res["single"][0]["tokens"] == 8  # forced: 4 / s
    assert [(r["concurrency"], r["requests"]) for r in res["concurrency"]] == [(2, 2)]


def test_run_puts_nemos_batched_concurrency_beside_ours():
    """The table bench/run.py prints for canary-qwen with NeMo's side (no NeMo needed: results made up)."""
    sys.path.insert(0, str(BENCH))
    try:
        import run  # bench/run.py
    finally:
        sys.path.remove(str(BENCH))
    single = {"seconds": 5.0, "latency_s": 2.0, "rtfx": 2.5, "tokens_per_s": 10.0}
    conc = {"concurrency": 4, "requests": 4, "throughput": 4.0, "p50_s": 5.0, "p95_s": 5.0}
    ours = {"single": [single], "concurrency": [conc], "peak_rss_bytes": 2**30}
    nemo = {"single": [{**single, "latency_s": 4.0, "rtfx": 1.25}], "concurrency": [{**conc, "throughput": 2.0}],
            "peak_rss_bytes": 2**31}  # fmt: skip
    res = {"model": "canary-qwen-2.5b", "machine": "m", "commit": "c", "date": "d", "ours": {"float32": ours},
           "nemo": nemo}  # fmt: skip
    out = run.table(res, "float32")
    assert "| 5 s | 2.00 s | 2.5x | 10 | 4.00 s | 1.2x | 10 | 2.00x |" in out
    assert "| concurrency 4 | 4 | 4.0 | 5.00 s | 5.00 s | 2.00 | 5.00 s | 5.00 s | 2.00x |" in out
    assert "NeMo process peak RSS 2048 MiB" in out and "during" not in out  # no long-file run: nothing about it
    assert any("vs NeMo" in line for line in run.targets(res, "float32"))


def test_the_big_v2_nemo_maker_starts_in_nemos_interpreter():
    _require_nemo("make_big_v2_nemo.py")
    assert "--need-gb" in _bench("make_big_v2_nemo.py", python=str(NEMO_PYTHON))


def test_wyoming_latency_compares_wyoming_with_http_on_the_espeak_model(tiny):
    if not ESPEAK_NEMO.is_file():
        pytest.skip(f"the espeak-trained test model is not at {ESPEAK_NEMO}")
    out = _bench("wyoming_latency.py", tiny)
    assert re.search(r"^\| espeak-tiny-en \(toy\), [\d.]+ s clip \|.*\| yes \|$", out, flags=re.M), out


def test_idle_unload_measures_memory_before_and_after(tiny):
    if not ESPEAK_NEMO.is_file():
        pytest.skip(f"the espeak-trained test model is not at {ESPEAK_NEMO}")
    assert re.search(r"^\| espeak \| \d+ \| \d+ \| \d+ \|", _bench("idle_unload.py", tiny), flags=re.M)


def test_language_id_reports_accuracy_and_its_cost(tiny):
    if not ESPEAK_NEMO.is_file():
        pytest.skip(f"the espeak-trained test model is not at {ESPEAK_NEMO}")
    out = _bench("language_id.py", tiny)
    assert "12 shipped clips" in out and re.search(r"^\| tiny \(random weights\) \| 1 x 3 s \|", out, flags=re.M)


def test_soak_checks_every_answer_against_the_request_alone_and_every_attack_as_designed():
    if not (ESPEAK_NEMO.parent / "espeak-tiny-multi.nemo").is_file():
        pytest.skip("the espeak-trained multilingual test model is not available")
    out = _bench("soak.py")
    assert "| wrong answers (200 differing from the same request alone) | 0 |" in out, out
    assert "| lost requests (sent whole, no HTTP answer) | 0 |" in out, out
    designed = re.findall(r"^\| (.+): as designed / not \| (\d+) / (\d+) \|$", out, flags=re.M)
    assert len(designed) >= 10 and all(int(ok) and not int(bad) for _, ok, bad in designed), out
    assert re.search(
        r"^\| spool files held by the stalled uploads \(per round, max\) / after .* \| [1-9]\d* / 0 \|$",
        out,
        flags=re.M,
    ), out


def test_router_throughput_compares_one_instance_with_two_behind_haproxy():
    from router_process import haproxy_binary

    if not ESPEAK_NEMO.is_file() or haproxy_binary() is None:
        pytest.skip("needs the espeak-trained test model and haproxy (test_router.py insists on haproxy)")
    out = _bench("router_throughput.py")
    assert "| one instance (direct) |" in out and "| two instances behind HAProxy |" in out, out


def test_lifecycle_measures_idle_memory_and_a_sigterm():
    if not ESPEAK_NEMO.is_file():
        pytest.skip(f"the espeak-trained test model is not at {ESPEAK_NEMO}")
    out = _bench("lifecycle.py")
    assert re.search(r"^\| RSS 0\.5 s after burst 1 \(1 x 8 s, \d+ s, 200\) \| \d+ MiB \|", out, flags=re.M), out
    assert re.search(r"^\| SIGTERM: exit after .*\| [\d.]+ s \|", out, flags=re.M), out


def test_idle_release_times_requests_after_an_idle_pause(tiny):
    out = _bench("idle_release.py", tiny)
    assert re.search(r"^\| released after 0\.1 s idle \| [\d.]+ s \| [\d.]+ s \|", out, flags=re.M), out


def test_vad_eval_compares_the_energy_rule_with_silero():
    if not shutil.which("espeak-ng"):
        pytest.skip("bench/vad_eval.py speaks its test sentences with espeak-ng, which is not installed")
    out = _bench("vad_eval.py")
    assert re.search(r"^\| energy rule \(chunking\.py\) \| [\d.]+ \|", out, flags=re.M), out
    assert re.search(r"^\| silero v6 numpy, pipeline/vad\.py \(p>0\.5\) \| [\d.]+ \| [\d.]+ \|", out, flags=re.M), out


def test_realtime_latency_streams_paced_audio_through_the_sdk():
    if not ESPEAK_NEMO.is_file():
        pytest.skip(f"the espeak-trained test model is not at {ESPEAK_NEMO}")
    out = _bench("realtime_latency.py")
    assert re.search(r"^\| 1 \| 1 \| \d+ / \d+ \| \d+ / \d+ \| \d+ / \d+ \(\d+\) \| (yes|no) \|", out, flags=re.M), out


def test_the_readme_and_benchmarks_bench_commands_use_only_flags_the_scripts_accept():
    docs = (REPO / "README.md").read_text() + (REPO / "BENCHMARKS.md").read_text()
    commands = re.findall(r"^(?:\S*python) bench/(\w+\.py)([^#\n]*)", docs, flags=re.M)
    assert len(commands) >= 4
    helps: dict[str, str] = {}
    for script, args in commands:
        if script in NEEDS_NEMO:
            continue  # needs NeMo's interpreter to print its help
        if script not in helps:
            proc = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr
            helps[script] = proc.stdout
        for flag in re.findall(r"(?<!\S)--[\w-]+", args):
            assert flag in helps[script], f"README/BENCHMARKS: bench/{script} {args.strip()}: {flag} is not an option"


def test_keywords_measures_recall_wer_and_cost_on_the_espeak_model():
    import shutil

    if not ESPEAK_NEMO.is_file() or shutil.which("espeak-ng") is None:
        pytest.skip("needs the espeak-trained test model and espeak-ng")
    out = _bench("keywords.py")
    assert "| no keywords |" not in out and "| none |" in out and "| 1 |" in out
    assert "| 1000 |" in out and "| beam 1 + keywords |" in out


def test_vad_cut_eval_compares_the_energy_rule_with_vad_cuts():
    if not (REPO.parent / "shared" / "models" / "espeak-tiny-en.nemo").exists():
        pytest.skip("bench/vad_cut_eval.py needs the espeak test model in ../shared/models")
    out = _bench("vad_cut_eval.py")
    assert re.search(r"^\| clean \| energy rule \| [\d.]+ \| \d+ \|", out, flags=re.M), out
    assert re.search(r"^\| white noise 10 dB SNR \| VAD, prefix 100 ms \| [\d.]+ \| \d+ \|", out, flags=re.M), out


def test_live_detect_seconds_tables_accuracy_per_seconds_held():
    out = _bench("live_detect_seconds.py")
    assert re.search(r"^\| 1\.5 \| 12 \|", out, flags=re.M)  # the default detects every clip


def test_live_detect_latency_times_streams_with_and_without_a_language():
    out = _bench("live_detect_latency.py")
    assert "| de_00.wav | de |" in out and "| de_00.wav | detected |" in out
