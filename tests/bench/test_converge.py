"""``sophia bench converge``: the tuning procedure, the analysis, and the quick mode end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sophia.bench.converge import Setting, Sweep, analyse, build_spec, crossing, mean_curve
from sophia.cli import main
from sophia.lm.config import TrainError


def _evals(losses, step=10, tokens_per_step=100, seconds_per_step=0.5, hessian_every=None):
    out = []
    for i, loss in enumerate(losses):
        s = i * step
        out.append({"step": s, "val_loss": loss, "tokens": s * tokens_per_step, "elapsed": s * seconds_per_step,
                    "train_passes": s, "hessian_passes": s // hessian_every if hessian_every else 0})
    return out


def test_crossing_interpolates_between_evaluations():
    ev = _evals([4.0, 3.0, 2.0, 1.5])  # steps 0, 10, 20, 30
    c = crossing(ev, 2.5)  # halfway between steps 10 and 20
    assert c == {"steps": 15.0, "tokens": 1500.0, "elapsed": 7.5, "passes": 15.0}
    assert crossing(ev, 1.0) is None
    assert crossing(ev, 5.0)["steps"] == 0  # already there at the first evaluation
    ev_h = _evals([4.0, 3.0, 2.0], hessian_every=5)  # passes count the Hessian estimates
    assert crossing(ev_h, 2.0)["passes"] == 20 + 4


def test_mean_curve_averages_pointwise():
    a, b = _evals([4.0, 2.0]), _evals([3.0, 1.0], seconds_per_step=1.5)
    mc = mean_curve([{"evals": a}, {"evals": b}])
    assert [e["val_loss"] for e in mc] == [3.5, 1.5]
    assert mc[1]["elapsed"] == pytest.approx((5 + 15) / 2)


class FakeSweep(Sweep):
    """The real procedure with a made-up, deterministic final loss instead of training."""

    def __init__(self, spec, best_lr, best_rho=0.2):
        super().__init__(Path("unused"), spec, jobs=2, log=lambda m: None)
        self.best_lr, self.best_rho, self.executed = best_lr, best_rho, []

    def execute(self, s: Setting):
        self.executed.append(s)
        loss = 2.0 + math.log2(s.lr / self.best_lr) ** 2 / 10 + 0.01 * s.seed
        if s.rho is not None:
            loss += abs(math.log2(s.rho / self.best_rho)) / 100
        if s.lr >= 64 * self.best_lr:
            return {"final_val_loss": math.inf, "status": "diverged", "evals": []}
        return {"final_val_loss": loss, "status": "ok", "evals": _evals([5.0, loss])}


def _spec(optimizers, lrs, seeds=3, max_extend=2):
    spec = build_spec("tiny", optimizers, 20, seeds, lrs, [0.01, 0.05, 0.2], 5, 2, "data", 2, quick=True,
                      max_extend=max_extend)
    return spec


def test_lr_grid_grows_at_the_edge_then_rho_then_seeds():
    spec = _spec(["adamw", "sophiag"], {"adamw": [1e-3, 2e-3, 4e-3, 8e-3], "sophiag": [1e-3, 2e-3, 4e-3, 8e-3]})
    sweep = FakeSweep(spec, best_lr=3.2e-2)  # beyond the top of both grids
    sweep.plan()
    adamw = sorted(s.lr for s in sweep.executed if s.optimizer == "adamw" and s.seed == 0)
    assert adamw == pytest.approx([1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2])  # grown twice, then stopped
    rhos = sorted(s.rho for s in sweep.executed if s.optimizer == "sophiag" and s.seed == 0
                  and s.lr == pytest.approx(3.2e-2))
    assert rhos == [0.01, 0.05, 0.2]  # the default (0.05) from the lr grid plus the other two
    seeds = {(s.optimizer, round(s.lr, 12), s.rho, s.seed) for s in sweep.executed if s.seed > 0}
    # three fresh seeds at the chosen setting; seed 0 only chose it
    assert seeds == {("adamw", 0.032, None, k) for k in (1, 2, 3)} | {("sophiag", 0.032, 0.2, k) for k in (1, 2, 3)}
    assert len(sweep.executed) == len(set(sweep.executed))  # nothing ran twice
    best = sweep.best_settings()
    assert best["adamw"] == (pytest.approx(0.032), None) and best["sophiag"] == (pytest.approx(0.032), 0.2)


def test_no_growth_when_the_best_lr_is_inside_the_grid():
    spec = _spec(["lion"], {"lion": [1e-3, 2e-3, 4e-3, 8e-3]}, seeds=2)
    sweep = FakeSweep(spec, best_lr=2e-3)
    sweep.plan()
    assert sorted(s.lr for s in sweep.executed) == pytest.approx([1e-3, 2e-3, 2e-3, 2e-3, 4e-3, 8e-3])


def test_a_diverged_run_loses_and_the_analysis_reports_speedups():
    spec = _spec(["adamw", "sophiag"], {"adamw": [1e-3, 2e-3], "sophiag": [1e-3, 6.4e-2]}, seeds=2, max_extend=0)
    sweep = FakeSweep(spec, best_lr=1e-3)
    sweep.plan()
    assert sweep.results[Setting("sophiag", 6.4e-2, 0.05, 0)]["status"] == "diverged"
    # Replace the curves of the fresh seeds by ones with a known answer: AdamW reaches its mean final loss
    # (2.0) at step 20; SophiaG gets there at step 10 with seed 1 and 15 with seed 2.
    curves = {("adamw", 1): [4.0, 3.0, 2.0], ("adamw", 2): [4.0, 3.0, 2.0],
              ("sophiag", 1): [4.0, 2.0, 1.5], ("sophiag", 2): [4.0, 2.5, 1.5]}
    best = sweep.best_settings()
    assert best == {"adamw": (1e-3, None), "sophiag": (1e-3, 0.2)}
    for (opt, seed), losses in curves.items():
        r = sweep.results[Setting(opt, *best[opt], seed)]
        r["evals"] = _evals(losses, hessian_every=10 if opt == "sophiag" else None)
        r["final_val_loss"] = r["evals"][-1]["val_loss"]
    a = analyse(sweep)
    assert a["target"] == 2.0
    sg = a["optimizers"]["sophiag"]
    assert sg["final_mean"] == 1.5 and sg["vs_ref"]["diff"] == -0.5 and not sg["vs_ref"]["ranges_overlap"]
    assert sg["vs_ref"]["welch_t"] is None  # both spreads are 0: no t, rather than an infinite one
    assert sg["reached"] == 2
    # mean curve 4.0, 2.25, 1.5 reaches 2.0 a third of the way from step 10 to 20
    assert sg["to_target"]["steps"]["mean_curve"] == pytest.approx(10 + 10 / 3)
    assert sg["to_target"]["steps"]["speedup"] == pytest.approx(20 / (10 + 10 / 3))
    assert sg["to_target"]["steps"]["speedup_seeds_max"] == pytest.approx(2.0)
    assert sg["to_target"]["steps"]["speedup_seeds_min"] == pytest.approx(20 / 15)
    assert a["optimizers"]["adamw"]["to_target"]["steps"]["speedup"] == 1.0
    assert any(g["status"] == "diverged" and math.isinf(g["final_val_loss"]) for g in sg["grid"])


def test_quick_sweep_writes_everything_and_never_redoes_a_run(tmp_path, capsys):
    out = tmp_path / "cv"
    assert main(["bench", "converge", "--quick", "--out-dir", str(out)]) == 0
    first = capsys.readouterr()
    result = json.loads((out / "results.json").read_text())
    assert set(result["analysis"]["optimizers"]) == {"adamw", "sophiag"}
    for png in ("loss_vs_steps.png", "loss_vs_time.png", "loss_vs_lr.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert f"Command: `sophia bench converge --quick --out-dir {out}`" in report
    assert "| AdamW |" in report and "| SophiaG |" in report and "Machine:" in report
    # the final attention diagnostics of every fresh seed, per optimizer, in the results and the report
    for d in result["analysis"]["optimizers"].values():
        assert len(d["attention"]["max_logit"]) == 2 and all(v >= 0 for v in d["attention"]["max_logit"])
    assert "Attention at the end of training" in report
    runs = sorted(p.name for p in (out / "runs").iterdir())
    # AdamW: 2 lrs + 2 fresh seeds; SophiaG: 2 lrs + the other rho + 2 fresh seeds
    assert len(runs) == 9 and first.err.count("done ") == 9
    stamp = {r: (out / "runs" / r / "result.json").stat().st_mtime_ns for r in runs}
    assert main(["bench", "converge", "--quick", "--out-dir", str(out)]) == 0
    again = capsys.readouterr()
    assert "run " not in again.err  # every run was already finished
    assert {r: (out / "runs" / r / "result.json").stat().st_mtime_ns for r in runs} == stamp
    assert json.loads((out / "results.json").read_text())["analysis"] == result["analysis"]
    # Passing the finished sweep again, even with other resumable options, leaves its report as it was:
    # the command line that made it, and the same bytes in every file.
    files = ["report.md", "results.json", *result["plots"]]
    before = {f: ((out / f).read_bytes(), (out / f).stat().st_mtime_ns) for f in files}
    assert main(["bench", "converge", "--quick", "--jobs", "1", "--out-dir", str(out)]) == 0
    kept = capsys.readouterr()
    assert "nothing new since its report" in kept.err and "run " not in kept.err
    assert {f: ((out / f).read_bytes(), (out / f).stat().st_mtime_ns) for f in files} == before
    assert f"Command: `sophia bench converge --quick --out-dir {out}`" in kept.out
    # A missing plot is drawn again (and with it the whole report, under the new command line).
    (out / "loss_vs_lr.png").unlink()
    assert main(["bench", "converge", "--quick", "--jobs", "1", "--out-dir", str(out)]) == 0
    capsys.readouterr()
    assert (out / "loss_vs_lr.png").read_bytes()[:4] == b"\x89PNG"
    assert "--jobs 1" in (out / "report.md").read_text()
    # Other settings in the same folder are refused rather than mixed in.
    assert main(["bench", "converge", "--quick", "--optimizers", "adamw,lion", "--out-dir", str(out)]) == 1
    assert "other settings" in capsys.readouterr().err
    # More optimizers may join (each one's tuning is its own): only the new one's runs are done.
    assert main(["bench", "converge", "--quick", "--optimizers", "adamw,sophiag,lion", "--out-dir", str(out)]) == 0
    started = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run ")]
    assert len(started) == 4 and all(line.startswith("run lion-") for line in started)  # 2 lrs, 2 fresh seeds
    assert {r: (out / "runs" / r / "result.json").stat().st_mtime_ns for r in runs} == stamp
    extended = json.loads((out / "results.json").read_text())["analysis"]["optimizers"]
    assert set(extended) == {"adamw", "sophiag", "lion"}
    assert extended["adamw"] == result["analysis"]["optimizers"]["adamw"]
    assert json.loads((out / "sweep.json").read_text())["optimizers"] == ["adamw", "sophiag", "lion"]


def test_bad_lr_grid_is_refused(tmp_path, capsys):
    assert main(["bench", "converge", "--lrs", "adamw", "--out-dir", str(tmp_path)]) == 1
    assert "OPT=LR" in capsys.readouterr().err
    assert main(["bench", "converge", "--optimizers", "adam", "--out-dir", str(tmp_path)]) == 1
    assert "unknown optimizer" in capsys.readouterr().err


def test_a_diverged_seed_makes_the_mean_infinite_not_an_error():
    spec = _spec(["adamw", "sophiag"], {"adamw": [1e-3, 2e-3], "sophiag": [1e-3, 2e-3]}, seeds=2, max_extend=0)
    sweep = FakeSweep(spec, best_lr=1e-3)
    sweep.plan()
    best = sweep.best_settings()
    # a diverged seed keeps the evaluations it made before diverging: shorter than the others
    r = sweep.results[Setting("sophiag", *best["sophiag"], 1)]
    r.update(final_val_loss=math.inf, status="diverged", evals=r["evals"][:1])
    a = analyse(sweep)
    sg = a["optimizers"]["sophiag"]
    assert math.isinf(sg["final_mean"]) and "vs_ref" not in sg and sg["diverged_seeds"] == 1
    assert sg["reached"] == 0 and all(t["mean_curve"] is None for t in sg["to_target"].values())
    from sophia.bench.converge import report

    text = report({"spec": sweep.spec, "analysis": a, "command": "x",
                   "machine": {"cpu": "c", "cores": 2, "torch": "t"}})
    assert "| SophiaG |" in text and "diverged" in text


def test_duplicate_grid_values_are_run_once():
    spec = _spec(["adamw", "sophiag"], {"adamw": [1e-3, 0.001, 2e-3], "sophiag": [1e-3, 2e-3]}, seeds=1)
    assert spec["lrs"]["adamw"] == [1e-3, 2e-3]
    spec = build_spec("tiny", ["sophiag"], 20, 1, None, [0.05, 0.05, 0.2], 5, 2, "data", 2, quick=True)
    assert spec["rhos"] == [0.05, 0.2]


def test_the_other_way_round_where_adamw_reaches_a_slower_optimizers_loss():
    spec = _spec(["adamw", "sophiag"], {"adamw": [1e-3, 2e-3], "sophiag": [1e-3, 2e-3]}, seeds=2, max_extend=0)
    sweep = FakeSweep(spec, best_lr=1e-3)
    sweep.plan()
    best = sweep.best_settings()
    curves = {("adamw", 1): [4.0, 3.0, 2.0], ("adamw", 2): [4.0, 3.0, 2.0],
              ("sophiag", 1): [4.0, 3.5, 3.0], ("sophiag", 2): [4.0, 3.5, 3.0]}
    for (opt, seed), losses in curves.items():
        r = sweep.results[Setting(opt, *best[opt], seed)]
        r["evals"] = _evals(losses, hessian_every=10 if opt == "sophiag" else None)
        r["final_val_loss"] = losses[-1]
    sg = analyse(sweep)["optimizers"]["sophiag"]
    assert sg["reached"] == 0
    other = sg["reference_to_this_loss"]
    assert other["steps"]["reference"] == 10 and other["steps"]["ratio"] == 0.5  # AdamW: 10 of SophiaG's 20
    assert other["passes"]["ratio"] == pytest.approx(10 / (20 + 2))  # SophiaG's passes include 2 estimates


def test_qk_norm_reaches_every_run_of_the_sweep(tmp_path):
    from sophia.bench.converge import Setting, Sweep, build_spec

    spec = build_spec("tiny", ["adamw", "sophiag"], 10, 1, None, [0.05], 5, 1, "data", 1, True, qk_norm=True)
    sweep = Sweep(tmp_path, spec, 1)
    for s in (Setting("adamw", 1e-3, None, 0), Setting("sophiag", 1e-3, 0.05, 1)):
        cmd = sweep.command(s, resume=False)
        assert "--qk-norm" in cmd
    plain = Sweep(tmp_path, build_spec("tiny", ["adamw"], 10, 1, None, [0.05], 5, 1, "data", 1, True), 1)
    assert "--qk-norm" not in plain.command(Setting("adamw", 1e-3, None, 0), resume=False)


def test_muon_sweeps_its_muon_lr_with_the_adamw_part_at_the_presets_lr():
    from sophia.lm.config import resolve_config

    spec = _spec(["adamw", "muon"], {"adamw": [4e-3, 8e-3], "muon": [0.01, 0.02]})
    adamw_part = resolve_config("tiny", "muon").lr
    assert spec["adamw_part_lr"] == {"muon": adamw_part}
    cmd = Sweep(Path("unused"), spec, jobs=1).command(Setting("muon", 0.02, None, 1), resume=False)

    def flag(name):
        return cmd[cmd.index(name) + 1]

    assert float(flag("--muon-lr")) == 0.02
    assert (float(flag("--lr")), float(flag("--min-lr"))) == (adamw_part, adamw_part / 10)
    adam = Sweep(Path("unused"), spec, jobs=1).command(Setting("adamw", 4e-3, None, 1), resume=False)
    assert "--muon-lr" not in adam and float(adam[adam.index("--lr") + 1]) == 4e-3
    assert "adamw_part_lr" not in _spec(["adamw"], {"adamw": [4e-3, 8e-3]})  # older sweeps continue unchanged


def test_a_sweep_may_grow_by_optimizers_but_not_change_the_old_ones():
    from sophia.bench.converge import spec_conflicts

    saved = _spec(["adamw", "sophiag"], {"adamw": [4e-3, 8e-3], "sophiag": [5e-4, 1e-3]})
    grown = _spec(["adamw", "sophiag", "muon"], {"adamw": [4e-3, 8e-3], "sophiag": [5e-4, 1e-3], "muon": [0.02, 0.04]})
    assert spec_conflicts(saved, grown) == []
    assert spec_conflicts(saved, _spec(["adamw", "sophiag"], {"adamw": [4e-3, 1.6e-2], "sophiag": [5e-4, 1e-3]})) \
        == ["lrs"]
    assert "optimizers" in spec_conflicts(saved, _spec(["adamw"], {"adamw": [4e-3, 8e-3]}))
    assert "optimizers" in spec_conflicts(grown, saved)  # dropping one is not continuing


def test_cuda_sweeps_hand_each_run_a_gpu_in_turn_and_record_the_device(tmp_path):
    """Without GPUs: the command trains on the sweep's device, a CUDA sweep's runs get one visible GPU each
    (jobs beyond the GPUs share them, a finished run's GPU goes to the next), and the device is part of the
    sweep, so a CPU sweep is not continued on a GPU; a CPU sweep's spec is as it was before devices existed."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from sophia.bench.converge import spec_conflicts

    cpu = _spec(["adamw"], {"adamw": [4e-3, 8e-3]})
    assert "device" not in cpu  # older CPU sweeps continue unchanged
    cmd = Sweep(tmp_path, cpu, jobs=1).command(Setting("adamw", 4e-3, None, 0), resume=False)
    assert cmd[cmd.index("--device") + 1] == "cpu"
    resumed = Sweep(tmp_path, cpu, jobs=1).command(Setting("adamw", 4e-3, None, 0), resume=True)
    assert resumed[resumed.index("--device") + 1] == "cpu"
    cuda = {**cpu, "device": "cuda"}
    assert spec_conflicts(cpu, cuda) == ["device"]
    sweep = Sweep(tmp_path, cuda, jobs=3, gpus=["4", "6"])
    cmd = sweep.command(Setting("adamw", 4e-3, None, 0), resume=False)
    assert cmd[cmd.index("--device") + 1] == "cuda"
    # each run's own process (a stand-in for `sophia train` that reports the GPU it sees and holds it for a
    # moment) sees only the GPU it was handed: three at once over two GPUs give 4, 6 and 4 again; then, with
    # two jobs, five runs through a two-worker pool reuse the GPUs that finished runs gave back
    probe = "import os, time; print('GPU', os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(0.5)"

    def run_all(sweep, settings, workers):
        sweep.command = lambda s, resume: [sys.executable, "-c", probe]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(sweep.execute, settings))
        return [(sweep.run_dir(s) / "log.txt").read_text().split()[1] for s in settings]

    three = [Setting("adamw", lr, None, 0) for lr in (1e-3, 2e-3, 4e-3)]
    assert sorted(run_all(sweep, three, 3)) == ["4", "4", "6"]
    two = Sweep(tmp_path / "two", cuda, jobs=2, gpus=["4", "6"])
    five = [Setting("adamw", lr, None, 1) for lr in (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)]
    assert sorted(set(run_all(two, five, 2))) == ["4", "6"]
    for sw, n in ((sweep, 3), (two, 2)):  # every slot handed back, none twice
        assert sorted(sw._slots.get(timeout=1) for _ in range(n)) == (["4", "4", "6"] if n == 3 else ["4", "6"])
        assert sw._slots.empty()


def test_other_presets_start_from_their_own_lr_and_cuda_is_refused_without_a_gpu(tmp_path, capsys):
    from sophia.bench.converge import build_spec
    from sophia.lm.config import resolve_config

    spec = build_spec("small", ["adamw", "sophiag"], 10, 1, None, [0.05], 5, 1, "data", 1, False)
    for opt in ("adamw", "sophiag"):
        lr = resolve_config("small", opt).lr
        assert spec["lrs"][opt] == pytest.approx([lr / 2, lr, 2 * lr])
    tiny = build_spec("tiny", ["adamw"], 10, 1, None, [0.05], 5, 1, "data", 1, False)
    assert tiny["lrs"]["adamw"] == [2e-3, 4e-3, 8e-3, 1.6e-2]
    if not torch.cuda.is_available():
        assert main(["bench", "converge", "--out-dir", str(tmp_path / "c"), "--quick", "--device", "cuda"]) == 1
        assert "no CUDA device" in capsys.readouterr().err
        assert not (tmp_path / "c").exists()  # refused before anything was written


def test_a_quick_gpu_sweep_does_not_compile_its_runs(tmp_path):
    """--quick is a smoke test of seconds: on a GPU its 20-step runs skip torch.compile, which would cost more than
    the run; a full GPU sweep keeps the harness's default (compiled), and CPU runs are unchanged."""
    quick_gpu = build_spec("tiny", ["adamw"], 20, 1, None, [0.05], 5, 1, "data", 1, True, device="cuda")
    full_gpu = build_spec("tiny", ["adamw"], 20, 1, None, [0.05], 5, 1, "data", 1, False, device="cuda")
    quick_cpu = build_spec("tiny", ["adamw"], 20, 1, None, [0.05], 5, 1, "data", 1, True)
    cmd = Sweep(tmp_path / "q", quick_gpu, jobs=1).command(Setting("adamw", 4e-3, None, 0), resume=False)
    assert "--no-compile" in cmd and "--compile" not in cmd
    for spec in (full_gpu, quick_cpu):
        cmd = Sweep(tmp_path / "f", spec, jobs=1).command(Setting("adamw", 4e-3, None, 0), resume=False)
        assert not any(c.endswith("compile") for c in cmd)


def test_muon_ns_dtype_reaches_only_muons_runs_and_is_part_of_the_sweep(tmp_path):
    from sophia.bench.converge import report, spec_conflicts
    from sophia.lm.config import TrainError

    plain = _spec(["adamw", "muon"], {"adamw": [4e-3, 8e-3], "muon": [0.01, 0.02]})
    assert "muon_ns_dtype" not in plain  # torch's bfloat16: older sweeps continue unchanged
    f32 = build_spec("tiny", ["adamw", "muon"], 20, 3, {"adamw": [4e-3, 8e-3], "muon": [0.01, 0.02]},
                     [0.01, 0.05, 0.2], 5, 2, "data", 2, quick=True, muon_ns_dtype="float32")
    assert f32["muon_ns_dtype"] == "float32"
    sweep = Sweep(tmp_path, f32, jobs=1)
    muon = sweep.command(Setting("muon", 0.02, None, 1), resume=False)
    assert muon[muon.index("--muon-ns-dtype") + 1] == "float32"
    assert "--muon-ns-dtype" not in sweep.command(Setting("adamw", 4e-3, None, 1), resume=False)
    assert "--muon-ns-dtype" not in Sweep(tmp_path, plain, jobs=1).command(Setting("muon", 0.02, None, 1), False)
    assert spec_conflicts(plain, f32) == ["muon_ns_dtype"] and spec_conflicts(f32, plain) == ["muon_ns_dtype"]
    assert "muon_ns_dtype" not in build_spec("tiny", ["adamw"], 20, 3, {"adamw": [4e-3, 8e-3]}, [0.05], 5, 2,
                                             "data", 2, quick=True, muon_ns_dtype="float32")
    with pytest.raises(TrainError, match="--muon-ns-dtype must be bfloat16 or float32"):
        build_spec("tiny", ["muon"], 20, 3, None, [0.05], 5, 2, "data", 2, quick=True, muon_ns_dtype="fp8")
    machine = {"cpu": "c", "cores": 2, "torch": "t"}
    for spec, said in ((f32, True), (plain, False)):
        fake = FakeSweep(spec, best_lr=1e-2)
        fake.plan()
        text = report({"spec": spec, "analysis": analyse(fake), "command": "x", "machine": machine})
        assert ("Muon's Newton-Schulz iteration in float32" in text) == said
    assert "Sophia also a rho grid (0.01, 0.05, 0.2) at its best lr" in text  # the last one drawn: plain's
    # a sweep given one rho (as the small sweep was) says that rho was fixed, not "a rho grid (0.05)"
    one = build_spec("tiny", ["adamw", "sophiag"], 20, 3, {"adamw": [4e-3, 8e-3], "sophiag": [5e-4, 1e-3]},
                     [0.05], 5, 2, "data", 2, quick=True)
    fake = FakeSweep(one, best_lr=1e-3)
    fake.plan()
    text = report({"spec": one, "analysis": analyse(fake), "command": "x", "machine": machine})
    assert "Sophia's rho fixed at 0.05;" in text and "rho grid" not in text


def test_tokens_per_step_reach_every_run_and_are_part_of_the_sweep(tmp_path):
    from sophia.bench.converge import spec_conflicts

    plain = build_spec("tiny", ["adamw", "sophiag"], 300, 3, None, [0.05], 25, 10, "data", 2, False)
    big = build_spec("tiny", ["adamw", "sophiag"], 300, 3, None, [0.05], 25, 10, "data", 2, False,
                     batch_size=512, grad_accum=2)
    assert plain["tokens_per_step"] == 32 * 128 and "batch_size" not in plain["model"]  # older specs unchanged
    assert big["tokens_per_step"] == 512 * 128 * 2
    cmd = Sweep(tmp_path, big, jobs=1).command(Setting("sophiag", 1e-3, 0.05, 1), resume=False)
    assert cmd[cmd.index("--batch-size") + 1] == "512" and cmd[cmd.index("--grad-accum") + 1] == "2"
    assert "--batch-size" not in Sweep(tmp_path, plain, jobs=1).command(Setting("adamw", 4e-3, None, 0), False)
    assert spec_conflicts(plain, big) == ["model", "tokens_per_step"]
    with pytest.raises(TrainError, match="--batch-size must be >= 1"):
        build_spec("tiny", ["adamw"], 10, 1, None, [0.05], 5, 1, "data", 1, False, batch_size=0)
