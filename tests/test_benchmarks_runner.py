"""The benchmarks' runner (``benchmarks/_runner.py``) on CPU, and every benchmark script importable with its CLI.

Nothing here measures anything: trivial arms on tiny tensors check the driver (rows, ratios, skipped and failed
arms), the CPU timer, the ``{meta, rows}`` schema, the plot and the input builder.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _runner  # noqa: E402
import _workers  # noqa: E402

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (perf_counter) path")
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_"))


def _case(shape: dict) -> _runner.Case:
    gen = torch.Generator().manual_seed(1234)
    a = torch.randn(shape["n"], 7, generator=gen, requires_grad=True)
    b = torch.randn(7, 5, generator=gen)

    def base():
        (a @ b).sum().backward()

    def twice():
        base()
        base()

    def boom():
        raise RuntimeError("broken peer")

    arms = {"base": base, "twice": twice, "missing_peer": "peer_x not installed", "boom": boom}
    return _runner.Case(arms, grads=[a], floor_ms=0.5, fields={"n_valid": shape["n"]})


@CPU_ONLY
def test_driver_rows_ratios_and_skips():
    shapes = [{"shape": "3x7", "n": 3}, {"shape": "11x7", "n": 11}]
    ratios = {"x_floor": ("floor_valid", "time"), "vs_base": ("base", "time")}
    rows = _runner.run(shapes, _case, ratios=ratios, skip=lambda s, arm: "too large" if arm == "twice" and
                       s["n"] > 5 else None)
    assert [(r["shape"], r["method"]) for r in rows] == [
        (s, m) for s in ("3x7", "11x7") for m in ("floor_valid", "base", "twice", "missing_peer", "boom")]
    by = {(r["shape"], r["method"]): r for r in rows}
    for shape in ("3x7", "11x7"):
        floor, base = by[shape, "floor_valid"], by[shape, "base"]
        assert floor["ms"] == 0.5 and floor["x_floor"] == 1.0 and floor["n_valid"] == int(shape.split("x")[0])
        assert isinstance(base["ms"], float) and base["ms"] > 0
        assert base["x_floor"] == pytest.approx(base["ms"] / 0.5) and base["vs_base"] == 1.0
        assert base["extra_gib"] is None and base["peak_gib"] is None  # no CUDA: no memory figure
        assert by[shape, "missing_peer"]["ms"] == "skipped: peer_x not installed"
        assert by[shape, "missing_peer"]["x_floor"] is None
        assert by[shape, "boom"]["ms"].startswith("failed: RuntimeError: broken peer")
    twice = by["3x7", "twice"]
    assert twice["vs_base"] == pytest.approx(twice["ms"] / by["3x7", "base"]["ms"])
    assert by["11x7", "twice"]["ms"] == "skipped: too large"


@CPU_ONLY
def test_measure_cpu_median_and_grad_reset():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1234), requires_grad=True)
    calls = []

    def fn():
        assert x.grad is None  # reset between runs
        calls.append(1)
        (x * x).sum().backward()

    ms = _runner.measure(fn, grads=[x])
    assert isinstance(ms, float) and ms > 0
    assert len(calls) == 1 + _runner.CPU_RUNS and x.grad is None
    assert _runner.measure(fn, cuda_graph=True) is None
    assert _runner.peak_memory(fn, grads=[x]) == (None, None)


def test_add_ratios_by_named_key():
    rows = [{"algo": "orpo", "impl": "trl", "tokens_per_s": 100.0, "peak_gib": 8.0},
            {"algo": "orpo", "impl": "liger", "tokens_per_s": 150.0, "peak_gib": 2.0},
            {"algo": "kto", "impl": "liger", "tokens_per_s": 90.0, "peak_gib": 3.0}]
    _runner.add_ratios(rows, keys=["algo"], method="impl",
                       ratios={"thr": ("trl", "tokens_per_s"), "mem": ("trl", "peak_gib")})
    assert (rows[1]["thr"], rows[1]["mem"]) == (1.5, 0.25)
    assert rows[0]["thr"] == 1.0 and rows[2]["thr"] is None  # no baseline of that algo in the run


def test_token_inputs_masked_and_paired():
    x = _runner.token_inputs(4, 37, 16, 1003, dtype=torch.float32, device="cpu", reference=True, seed=3)
    assert x.hidden.shape == (4, 37, 16) and x.weight.shape == (1003, 16) and x.target.shape == (4, 37)
    assert x.hidden.requires_grad and x.weight.requires_grad and not x.ref_hidden.requires_grad
    assert (x.target[:, :9] == _runner.IGNORE).all() and (x.target[:, 9:] >= 0).all()
    assert x.n_valid == 4 * 28 and x.labels.tolist() == [True, False, True, False]
    hidden, target = x.flat()
    assert hidden.shape == (148, 16) and target.shape == (148,)
    again = _runner.token_inputs(4, 37, 16, 1003, dtype=torch.float32, device="cpu", seed=3)
    assert torch.equal(again.target, x.target) and again.ref_hidden is None


def test_schema_meta_rows_and_old_files(tmp_path):
    rows = [{"shape": "3x7", "method": "base", "ms": 1.25}]
    path = _runner.save("unit", rows, _runner.run_meta(vocab=1003), results_dir=tmp_path)
    data = json.loads(path.read_text())
    assert set(data) == {"meta", "rows"} and data["rows"] == rows
    meta = data["meta"]
    for key in ("gpu", "torch", "triton", "transformers", "versions", "date", "command"):
        assert key in meta
    assert meta["torch"] == torch.__version__ and meta["vocab"] == 1003
    assert {"liger-kernel", "cut-cross-entropy", "trl"} <= set(meta["versions"])
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"config": {"pairs": 8}, "results": rows}))
    assert _runner.load_rows(old) == ({"pairs": 8}, rows)
    assert _runner.load_rows(path) == (meta, rows)


def test_plot_written(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"shape": s, "method": m, "x_floor": v, "ratio": v / 2} for s in ("a", "b")
            for m, v in (("ours", 1.2), ("peer", 2.0))] + [{"shape": "b", "method": "naive", "x_floor": "OOM"}]
    path = _runner.plot(tmp_path / "unit.png", rows, group=["shape"], values=[("x_floor", "x floor"),
                        ("ratio", "ratio")], annotate={"x_floor": "ratio"}, title="unit")
    assert path == tmp_path / "unit.png" and path.stat().st_size > 1000


def test_print_table(capsys):
    _runner.print_table([{"method": "ours", "ms": 1.23456, "x": None}], ["method", "ms", "x"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["method", "ms", "x"] and out[1].split() == ["ours", "1.235", "-"]


def test_run_worker_result_and_failure(tmp_path):
    script = tmp_path / "w.py"
    script.write_text("import json, sys\nargs = sys.argv[1:]\nout = args[args.index('--worker-out') + 1]\n"
                      "if '--fail' in args:\n    sys.exit('worker broke')\n"
                      "json.dump({'ok': args[args.index('--n') + 1]}, open(out, 'w'))\n")
    data, failure, wall = _workers.run_worker(script, ["--n", "7"], tmp_path / "a.json", timeout=60)
    assert data == {"ok": "7"} and failure is None and wall > 0
    data, failure, _ = _workers.run_worker(script, ["--fail"], tmp_path / "b.json", timeout=60)
    assert data is None and "worker broke" in failure
    assert _workers.is_oom("torch.OutOfMemoryError: CUDA out of memory") and not _workers.is_oom(failure)


@pytest.mark.parametrize("name", ["llama-3.2-1b", "qwen2-0.5b", "qwen2-1.5b", "gemma-2b"])
def test_model_shapes(name):
    import _models

    config = _models.model_config(name, smoke=True, pad_token_id=0)
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)
    assert config.vocab_size == _models.SHAPES[name]["vocab_size"] and config.pad_token_id == 0
    full = _models.model_config(name)
    assert full.hidden_size == _models.SHAPES[name]["hidden_size"]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["bench_preference_losses", "bench_linear_logprobs"])
def test_setups_run_every_arm_on_cpu(script, monkeypatch):
    """The GPU scripts' setup + arms at tiny sizes on CPU (torch paths): no arm fails, peers missing are skipped."""
    monkeypatch.setattr(_runner, "CPU_RUNS", 1)
    module = importlib.import_module(script)
    if script == "bench_preference_losses":
        shapes = [{"loss": loss, "shape": "2x16 H=32", "rows": 2, "seq": 16, "hidden": 32} for loss in module.LOSSES]
        setup, ratios = module.make_setup(list(module.PEERS), 10**6, vocab=1003, dtype=torch.float32), None
        floor = "floor_valid"
    else:
        shapes = [{"op": op, "shape": "2x16 H=32", "rows": 2, "seq": 16, "hidden": 32} for op in module.OPS]
        setup, floor = module.make_setup([1], vocab=1003, dtype=torch.float32), module.FLOOR
        ratios = {"x_floor": (floor, "time")}
    rows = _runner.run(shapes, setup, ratios=ratios, memory=False)
    assert not [r for r in rows if str(r["ms"]).startswith("failed")]
    measured = [r for r in rows if isinstance(r["ms"], float) and r["method"] != floor]
    assert {r["method"] for r in measured} >= {"liger_align", "naive_torch"}
    key = "loss" if "loss" in shapes[0] else "op"
    floors = {r[key]: r["ms"] for r in rows if r["method"] == floor}
    assert all(r["x_floor"] == pytest.approx(r["ms"] / floors[r[key]]) for r in measured)
    assert all(r["ms"].startswith("skipped: ") for r in rows if isinstance(r["ms"], str))


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_importable_with_cli(name, monkeypatch, capsys):
    module = importlib.import_module(name)
    assert callable(module.main)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.gpu
def test_cuda_timer_graph_and_memory():
    """On CUDA: do_bench and CUDA-graph medians, and the extra memory of a known 64 MiB temporary."""
    gen = torch.Generator(device="cuda").manual_seed(1234)
    a = torch.randn(512, 512, device="cuda", generator=gen, requires_grad=True)

    def step():
        (a @ a).sum().backward()

    def temp():
        return torch.empty(16 * 2**20, device="cuda").fill_(1.0).sum()  # 64 MiB float32, freed inside

    ms = _runner.measure(step, grads=[a])
    graph = _runner.measure(lambda: (a.detach() @ a.detach()).sum(), cuda_graph=True)
    assert isinstance(ms, float) and ms > 0 and isinstance(graph, float) and graph > 0 and a.grad is None
    extra, peak = _runner.peak_memory(temp)
    assert extra == pytest.approx(64 / 1024, rel=0.05) and peak >= extra
    extra, _ = _runner.peak_memory(step, grads=[a])  # the gradient it leaves is not "extra"
    # a @ a and the two backward products' temporaries (1 MiB each) are; a 1 MiB gradient counted twice is not.
    # (measured on an H200: 2.0004 MiB, the allocator's rounding above 2 MiB)
    assert extra < 3 * 512 * 512 * 4 / 2**30 and a.grad is None
    rows = _runner.run([{"shape": "512"}], lambda _: _runner.Case({"ours": step}, grads=[a], floor_ms=ms),
                       cuda_graph=True)
    assert rows[1]["x_floor"] is not None and rows[1]["extra_gib"] is not None
