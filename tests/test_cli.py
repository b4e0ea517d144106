"""The real `dsc` command, run in a subprocess as users run it."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, dsc_cmd
import models  # noqa: F401  (puts examples/ on sys.path)

SHARED = ROOT.parent / "shared" / "ds_configs"
GPT = str(ROOT / "examples" / "gpt.py")
PLAN = str(ROOT / "examples" / "plan.json")


def dsc(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*dsc_cmd(), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


_JSON: dict = {}  # `dsc compile --format json` output per argument list: several tests read the same one


def compile_json(*args: str) -> dict:
    """The report of `dsc compile GPT --config PLAN *args --format json`, run once per argument list."""
    if args not in _JSON:
        out = dsc("compile", GPT, "--config", PLAN, *args, "--format", "json")
        assert out.returncode == 0, out.stderr
        _JSON[args] = (json.loads(out.stdout), out.stderr)
    return _JSON[args]


def test_help_lists_every_command():
    out = dsc("--help")
    assert out.returncode == 0
    for cmd in ("compile", "validate", "schema", "inspect", "run", "report"):
        assert cmd in out.stdout


def test_compile_json_has_the_contracted_shape():
    report, stderr = compile_json("--world-size", "4")
    assert {"plan", "passes", "ranks", "sources"} <= report.keys()
    assert [r["rank"] for r in report["ranks"]] == [0, 1, 2, 3]
    for r in report["ranks"]:
        assert {"params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes"} <= r["memory"].keys()
        assert r["comm_bytes_per_step"] > 0
    assert report["plan"]["parallel"]["data_parallel_size"] == 4
    assert [p["name"] for p in report["passes"]] == ["annotate_shapes", "relax_dtype_asserts", "plan_zero_buckets",
                                                      "estimate_costs"]
    assert "compiling rank 4/4" in stderr  # progress on stderr, data on stdout


def test_compile_zero2_shards_grads_and_states_by_world_size():
    """ZeRO-2 bytes per rank: params 4Ψ, grads 4Ψ/N, Adam states 8Ψ/N (+ padding and step counters)."""
    reports = {}
    for n in (1, 2, 4):
        reports[n] = compile_json("--world-size", str(n))[0]["ranks"][0]["memory"]
    psi = reports[1]["params_bytes"] // 4
    for n in (2, 4):
        m = reports[n]
        assert m["params_bytes"] >= 4 * psi
        assert 4 * psi // n <= m["grads_bytes"] < 4 * psi // n + 4 * n
        assert 8 * psi // n <= m["optimizer_bytes"] < 8 * psi // n + 8 * n + 64


def test_compile_text_and_artifact_folder(tmp_path):
    out = dsc("compile", GPT, "--config", PLAN, "--world-size", "2", "--out", str(tmp_path / "art"))
    assert out.returncode == 0, out.stderr
    assert "per-rank memory and communication" in out.stdout
    assert "zero.stage" in out.stdout and "<- plan" in out.stdout
    art = tmp_path / "art"
    assert {p.name for p in art.iterdir()} >= {"plan.json", "report.json", "rank0.py", "rank1.py"}
    assert "dsc::reduce_scatter" in (art / "rank1.py").read_text()
    shown = dsc("inspect", str(art))
    assert shown.returncode == 0 and "per-rank memory" in shown.stdout
    graph = dsc("inspect", str(art), "--rank", "1")
    assert graph.returncode == 0 and "def forward" in graph.stdout
    missing = dsc("inspect", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "dsc compile" in missing.stderr


def test_compile_accepts_a_deepspeed_config():
    out = dsc("compile", GPT, "--config", str(ROOT / "examples" / "ds_config.json"), "-n", "2", "--format", "json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["plan"]["zero"]["stage"] == 1
    assert report["sources"]["zero.stage"].startswith("deepspeed:zero_optimization.stage")


def test_compile_rejects_a_bad_plan_with_the_key(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero": {"stag": 1}}))
    out = dsc("compile", GPT, "--config", str(bad))
    assert out.returncode == 1
    assert "zero.stag" in out.stderr and "stage" in out.stderr


def test_validate_exit_codes(tmp_path):
    good = dsc("validate", PLAN, "--world-size", "2")
    assert good.returncode == 0 and "valid" in good.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero": {"stage": 7}, "optimiser": {}}))
    out = dsc("validate", str(bad))
    assert out.returncode == 1
    assert "zero.stage" in out.stdout and "optimiser" in out.stdout and "optimizer" in out.stdout


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/ds_configs is not beside this checkout")
def test_validate_real_deepspeed_configs_warn_or_fail_by_key():
    legacy = dsc("validate", str(SHARED / "ds_tests_megatron_gpt2_bs8_zero2_cpu_offload_legacy.json"))
    assert legacy.returncode == 0
    assert "zero_optimization.cpu_offload" in legacy.stdout
    strict = dsc("validate", "--strict", str(SHARED / "ds_tests_megatron_gpt2_bs8_zero2_cpu_offload_legacy.json"))
    assert strict.returncode == 1
    onebit = dsc("validate", str(SHARED / "dse_bing_bert_onebitadam_fp16.json"))
    assert onebit.returncode == 1 and "optimizer.type" in onebit.stdout


def test_schema_is_json_schema():
    out = dsc("schema")
    assert out.returncode == 0
    schema = json.loads(out.stdout)
    assert schema["type"] == "object" and "zero" in schema["properties"]
    assert schema["additionalProperties"] is False


def test_report_prints_environment():
    out = dsc("report")
    assert out.returncode == 0 and "torch" in out.stdout and "gloo" in out.stdout


def test_run_passes_arguments_and_exit_code(tmp_path):
    script = tmp_path / "s.py"
    # one write per line: two ranks share the pipe, and print() may split a line in two writes
    script.write_text("import os, sys\nsys.stdout.write(f\"rank {os.environ['RANK']} {sys.argv[1:]}\\n\")\n"
                      "sys.exit(3 if sys.argv[1] == 'fail' else 0)\n")
    ok = dsc("run", "--nproc", "2", str(script), "hello", "--flag", "--start")  # --start: not torchrun's
    assert ok.returncode == 0, ok.stderr
    assert "rank 0 ['hello', '--flag', '--start']" in ok.stdout and "rank 1" in ok.stdout
    bad = dsc("run", "--nproc", "1", str(script), "fail")
    assert bad.returncode == 3  # the script's own exit code


def test_run_keeps_freed_memory_unless_told_or_set(tmp_path):
    """`dsc run` gives its ranks glibc settings that keep freed memory for reuse (MALLOC_KEEP), but
    not over the user's own values, nor with --keep-freed-memory off."""
    from dsc.runtime.launch import MALLOC_KEEP

    script = tmp_path / "env.py"
    script.write_text("import os\nprint(os.environ.get('MALLOC_MMAP_THRESHOLD_'), os.environ.get('MALLOC_TRIM_THRESHOLD_'))\n")
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_KEEP}
    cases = [([], env, f"{MALLOC_KEEP['MALLOC_MMAP_THRESHOLD_']} {MALLOC_KEEP['MALLOC_TRIM_THRESHOLD_']}"),
             (["--keep-freed-memory", "off"], env, "None None"),
             ([], {**env, "MALLOC_TRIM_THRESHOLD_": "0"}, f"{MALLOC_KEEP['MALLOC_MMAP_THRESHOLD_']} 0")]
    for flags, environ, want in cases:
        out = subprocess.run([*dsc_cmd(), "run", "--nproc", "1", *flags, str(script)], capture_output=True,
                             text=True, env=environ, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == want, (flags, out.stdout)


def test_keep_freed_memory_in_process():
    """The in-process form (mallopt), for training without `dsc run`: glibc accepts both settings
    (in a child process: the setting lasts for the process)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt")
    code = "import sys; from dsc.runtime.launch import keep_freed_memory; sys.exit(0 if keep_freed_memory() else 1)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_python_dash_m_dsc_works():
    out = subprocess.run([sys.executable, "-m", "dsc", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "compile" in out.stdout


def test_compiled_report_is_the_cli_json_for_the_same_rank():
    """`compiled.report()` and `dsc compile --format json` serialize to the same object."""
    import dsc as dsc_pkg
    from gpt import build_model, example_inputs

    cli = copy.deepcopy(compile_json("--world-size", "1")[0])
    compiled = dsc_pkg.compile(build_model(), PLAN, example_inputs=example_inputs())
    api = json.loads(json.dumps(compiled.report()))
    for report in (cli, api):  # wall-clock fields differ between two runs
        report["capture"].pop("seconds")
        for p in report["passes"]:
            p.pop("seconds")
    assert api == cli


def test_compile_with_fusion_writes_kernel_sources_and_inspect_lists_them(tmp_path):
    plan = tmp_path / "fused.json"
    plan.write_text(json.dumps({**json.loads(open(PLAN).read()), "fusion": {"enabled": True}}))
    out = dsc("compile", GPT, "--config", str(plan), "--world-size", "2", "--out", str(tmp_path / "art"))
    assert out.returncode == 0, out.stderr
    assert "generated kernels (rank 0):" in out.stdout
    report = json.loads((tmp_path / "art" / "report.json").read_text())
    kernels = (tmp_path / "art" / "kernels")
    for k in report["kernels"]:
        assert (kernels / f"{k['name']}.c").read_text().startswith(f"/* {k['name']}")
        if k["backward"] == "generated":
            assert f"{k['name']}_bwd(" in (kernels / f"{k['name']}_bwd.c").read_text()
    # every group has a backward kernel (the norms, the residual add + LayerNorm too, GELU, the
    # dropout + residual add) or passes its gradients through (an add after a dropout of p = 0)
    words = {"generated": "backward kernel", "pass-through": "backward passes gradients through"}
    assert "generated" in {k["backward"] for k in report["kernels"]} <= set(words)
    shown = dsc("inspect", str(tmp_path / "art"), "--kernels")
    assert shown.returncode == 0
    for k in report["kernels"]:
        line = next(ln for ln in shown.stdout.splitlines() if ln.startswith(k["name"]))
        assert words[k["backward"]] in line, line
