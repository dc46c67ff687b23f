"""The tuning search of ``sophia bench converge`` (pure: finished results in, settings out) and the runner that
drives it from a sweep's folder. Every expected setting below is written out by hand from the procedure: the lr
grid at seed 0, one more lr beyond an edge while the best sits there (at most ``max_extend`` times), Sophia's
other rhos at the best lr, then the chosen setting at the fresh seeds."""

from __future__ import annotations

import dataclasses
import json
import math
import sys

from sophia.bench.converge import Setting, Sweep, TuningSearch

ADAMW = TuningSearch("adamw", lrs=(4e-3, 2e-3, 8e-3), rho=None, rhos=(0.01, 0.05, 0.2), seeds=3, max_extend=2)
SOPHIA = TuningSearch("sophiag", lrs=(5e-4, 1e-3, 2e-3), rho=0.05, rhos=(0.01, 0.05, 0.2), seeds=2, max_extend=2)


def names(settings) -> list[str]:
    return [s.name for s in settings]


def scored(losses: dict[str, float]) -> dict[Setting, float]:
    """Final losses given by run-folder name, as the search takes them (keyed by Setting)."""

    def setting(name: str) -> Setting:
        opt, rest = name.split("-lr", 1)
        parts = rest.split("-")
        rho = next((float(p[3:]) for p in parts if p.startswith("rho")), None)
        return Setting(opt, float(parts[0]), rho, int(parts[-1][1:]))

    out = {setting(n): loss for n, loss in losses.items()}
    assert names(out) == list(losses)  # the parse round-trips: the names are the folders' names
    return out


def test_the_first_proposals_are_the_lr_grid_at_seed_0_in_increasing_order():
    assert names(ADAMW.next_settings({})) == ["adamw-lr0.002-s0", "adamw-lr0.004-s0", "adamw-lr0.008-s0"]
    p = ADAMW.progress({})
    assert (p.phase, p.chosen, p.lrs) == ("lr", None, (0.002, 0.004, 0.008))
    # Sophia's grid runs at its default rho
    assert names(SOPHIA.next_settings({})) == ["sophiag-lr0.0005-rho0.05-s0", "sophiag-lr0.001-rho0.05-s0",
                                               "sophiag-lr0.002-rho0.05-s0"]


def test_from_spec_reads_the_sweeps_settings_for_one_optimizer():
    spec = {"optimizers": ["adamw", "sophiah"], "lrs": {"adamw": [1e-3, 2e-3], "sophiah": [5e-4]},
            "rhos": [0.01, 0.2], "default_rho": {"sophiah": 0.04}, "seeds": 4, "max_extend": 1}
    assert TuningSearch.from_spec(spec, "adamw") == TuningSearch("adamw", (1e-3, 2e-3), None, (0.01, 0.2), 4, 1)
    assert TuningSearch.from_spec(spec, "sophiah") == TuningSearch("sophiah", (5e-4,), 0.04, (0.01, 0.2), 4, 1)


def test_the_best_lr_at_the_top_edge_grows_the_grid_until_the_limit():
    losses = {"adamw-lr0.002-s0": 3.0, "adamw-lr0.004-s0": 2.9, "adamw-lr0.008-s0": 2.8}
    assert names(ADAMW.next_settings(scored(losses))) == ["adamw-lr0.016-s0"]
    losses["adamw-lr0.016-s0"] = 2.7
    assert names(ADAMW.next_settings(scored(losses))) == ["adamw-lr0.032-s0"]
    losses["adamw-lr0.032-s0"] = 2.6  # the edge again, but grown twice already (max_extend=2): tuning stops
    p = ADAMW.progress(scored(losses))
    assert p.phase == "seeds" and p.chosen == (0.032, None)
    assert p.lrs == (0.002, 0.004, 0.008, 0.016, 0.032)
    assert names(p.pending) == ["adamw-lr0.032-s1", "adamw-lr0.032-s2", "adamw-lr0.032-s3"]


def test_the_best_lr_at_the_bottom_edge_grows_downward_and_stops_once_inside():
    losses = {"adamw-lr0.002-s0": 2.8, "adamw-lr0.004-s0": 2.9, "adamw-lr0.008-s0": 3.0}
    assert names(ADAMW.next_settings(scored(losses))) == ["adamw-lr0.001-s0"]
    losses["adamw-lr0.001-s0"] = 2.85  # worse: 0.002 is now inside the grown grid
    p = ADAMW.progress(scored(losses))
    assert p.phase == "seeds" and p.chosen == (0.002, None) and p.lrs == (0.001, 0.002, 0.004, 0.008)
    assert names(p.pending) == ["adamw-lr0.002-s1", "adamw-lr0.002-s2", "adamw-lr0.002-s3"]


def test_no_growth_without_extensions_left_or_with_a_one_point_grid():
    losses = {"adamw-lr0.002-s0": 3.0, "adamw-lr0.004-s0": 2.9, "adamw-lr0.008-s0": 2.8}
    fixed = dataclasses.replace(ADAMW, max_extend=0)
    assert names(fixed.next_settings(scored(losses))) == ["adamw-lr0.008-s1", "adamw-lr0.008-s2", "adamw-lr0.008-s3"]
    one = TuningSearch("adamw", lrs=(4e-3,), rho=None, rhos=(), seeds=1, max_extend=2)
    assert names(one.next_settings(scored({"adamw-lr0.004-s0": 3.0}))) == ["adamw-lr0.004-s1"]


def test_a_diverged_run_never_wins_and_an_all_diverged_grid_grows_downward():
    losses = {"adamw-lr0.002-s0": 3.0, "adamw-lr0.004-s0": 2.9, "adamw-lr0.008-s0": math.inf}
    assert ADAMW.progress(scored(losses)).chosen == (0.004, None)  # the top diverged: the best is inside
    everything = {name: math.inf for name in losses}  # a tie at infinity goes to the lowest lr, an edge
    assert names(ADAMW.next_settings(scored(everything))) == ["adamw-lr0.001-s0"]


SOPHIA_LR_DONE = {"sophiag-lr0.0005-rho0.05-s0": 3.0, "sophiag-lr0.001-rho0.05-s0": 2.9,
                  "sophiag-lr0.002-rho0.05-s0": 2.95}


def test_sophia_tries_the_other_rhos_at_its_best_lr_then_keeps_the_best_rho():
    p = SOPHIA.progress(scored(SOPHIA_LR_DONE))
    assert p.phase == "rho" and p.chosen is None
    assert names(p.pending) == ["sophiag-lr0.001-rho0.01-s0", "sophiag-lr0.001-rho0.2-s0"]
    better = {**SOPHIA_LR_DONE, "sophiag-lr0.001-rho0.01-s0": 2.92, "sophiag-lr0.001-rho0.2-s0": 2.8}
    p = SOPHIA.progress(scored(better))
    assert p.phase == "seeds" and p.chosen == (0.001, 0.2)
    assert names(p.pending) == ["sophiag-lr0.001-rho0.2-s1", "sophiag-lr0.001-rho0.2-s2"]
    tie = {**SOPHIA_LR_DONE, "sophiag-lr0.001-rho0.01-s0": 2.9, "sophiag-lr0.001-rho0.2-s0": 3.1}
    assert SOPHIA.progress(scored(tie)).chosen == (0.001, 0.05)  # a tie keeps the default
    # a grid without the default runs all of its rhos; a grid of the default alone runs none
    apart = dataclasses.replace(SOPHIA, rhos=(0.01, 0.2))
    assert names(apart.next_settings(scored(SOPHIA_LR_DONE))) == ["sophiag-lr0.001-rho0.01-s0",
                                                                  "sophiag-lr0.001-rho0.2-s0"]
    alone = dataclasses.replace(SOPHIA, rhos=(0.05,))
    assert names(alone.next_settings(scored(SOPHIA_LR_DONE))) == ["sophiag-lr0.001-rho0.05-s1",
                                                                  "sophiag-lr0.001-rho0.05-s2"]


def test_after_the_fresh_seeds_the_tuning_is_done():
    finished = {**SOPHIA_LR_DONE, "sophiag-lr0.001-rho0.01-s0": 2.92, "sophiag-lr0.001-rho0.2-s0": 2.8,
                "sophiag-lr0.001-rho0.2-s1": 2.81, "sophiag-lr0.001-rho0.2-s2": 2.79}
    p = SOPHIA.progress(scored(finished))
    assert (p.phase, p.pending, p.chosen) == ("done", (), (0.001, 0.2))
    assert SOPHIA.next_settings(scored(finished)) == []


# One whole tuning of SophiaG, batch by batch: the grid; its top edge won, so 0.004; 0.002 stays the best, so
# the other rhos there; rho 0.01 wins, so the fresh seeds at (0.002, 0.01).
LOSSES = {"sophiag-lr0.0005-rho0.05-s0": 3.0, "sophiag-lr0.001-rho0.05-s0": 2.9, "sophiag-lr0.002-rho0.05-s0": 2.8,
          "sophiag-lr0.004-rho0.05-s0": 2.85,
          "sophiag-lr0.002-rho0.01-s0": 2.7, "sophiag-lr0.002-rho0.2-s0": 2.75,
          "sophiag-lr0.002-rho0.01-s1": 2.72, "sophiag-lr0.002-rho0.01-s2": 2.71}
BATCHES = [["sophiag-lr0.0005-rho0.05-s0", "sophiag-lr0.001-rho0.05-s0", "sophiag-lr0.002-rho0.05-s0"],
           ["sophiag-lr0.004-rho0.05-s0"],
           ["sophiag-lr0.002-rho0.01-s0", "sophiag-lr0.002-rho0.2-s0"],
           ["sophiag-lr0.002-rho0.01-s1", "sophiag-lr0.002-rho0.01-s2"]]


def test_a_whole_tuning_asks_for_the_batches_in_order():
    all_scores = scored(LOSSES)
    finished: dict[Setting, float] = {}
    asked = []
    while batch := SOPHIA.next_settings(finished):
        asked.append(names(batch))
        finished.update({s: all_scores[s] for s in batch})
    assert asked == BATCHES
    assert SOPHIA.progress(finished).chosen == (0.002, 0.01)


def test_resuming_from_any_partly_finished_set_asks_for_the_rest():
    order = [name for batch in BATCHES for name in batch]
    for k in range(len(order) + 1):
        finished = scored({n: LOSSES[n] for n in order[:k]})
        # the rest of the batch the k-th run belongs to (the whole next batch at a boundary)
        expected, seen = [], 0
        for batch in BATCHES:
            if seen + len(batch) > k:
                expected = batch[k - seen:]
                break
            seen += len(batch)
        assert names(SOPHIA.next_settings(finished)) == expected, k
    # runs of a batch that finished out of order, and other optimizers' runs, change nothing
    middle = scored({"sophiag-lr0.001-rho0.05-s0": 2.9, "adamw-lr0.002-s0": 1.0, "sophiah-lr0.0005-rho0.05-s0": 1.0})
    assert names(SOPHIA.next_settings(middle)) == ["sophiag-lr0.0005-rho0.05-s0", "sophiag-lr0.002-rho0.05-s0"]


# A stand-in for `sophia train`: writes metrics.jsonl with evaluations at steps 0 and 10 ending at the loss given,
# or, given "inf", one evaluation then a divergence, and exits 1 as train does then.
STAND_IN = """
import json, pathlib, sys
d, loss = pathlib.Path(sys.argv[1]), float(sys.argv[2])
def ev(step, val):
    return json.dumps({"event": "eval", "step": step, "val_loss": val, "tokens": step * 100, "elapsed": step / 10,
                       "train_passes": step, "hessian_passes": 0}) + "\\n"
if loss == float("inf"):
    (d / "metrics.jsonl").write_text(ev(0, 5.0) + json.dumps({"event": "diverged", "step": 5}) + "\\n")
    sys.exit(1)
(d / "metrics.jsonl").write_text(ev(0, 5.0) + ev(10, loss))
"""


def test_a_sweep_continues_from_its_folder_running_only_what_the_search_still_needs(tmp_path):
    spec = {"optimizers": ["adamw"], "lrs": {"adamw": [2e-3, 4e-3, 8e-3]}, "rhos": [], "default_rho": {},
            "seeds": 2, "max_extend": 2, "data_root": "data"}
    losses = {"adamw-lr0.002-s0": 2.9, "adamw-lr0.004-s0": 3.0, "adamw-lr0.008-s0": 3.1, "adamw-lr0.001-s0": 2.85,
              "adamw-lr0.0005-s0": math.inf, "adamw-lr0.001-s1": 2.8, "adamw-lr0.001-s2": 2.83}
    for name in ("adamw-lr0.002-s0", "adamw-lr0.004-s0"):  # finished before the interruption
        (tmp_path / "runs" / name).mkdir(parents=True)
        s = next(iter(scored({name: 0.0})))
        result = {"optimizer": "adamw", "lr": s.lr, "rho": None, "seed": 0, "status": "ok",
                  "final_val_loss": losses[name], "evals": []}
        (tmp_path / "runs" / name / "result.json").write_text(json.dumps(result) + "\n")
    log: list[str] = []
    sweep = Sweep(tmp_path, spec, jobs=1, log=log.append)
    sweep.command = lambda s, resume: [sys.executable, "-c", STAND_IN, str(sweep.run_dir(s)), repr(losses[s.name])]
    sweep.plan()
    # 0.008 completes the grid; 0.002 is the bottom edge: 0.001; the edge again: 0.0005, which diverges; then
    # the seeds at 0.001
    assert [m.split()[1] for m in log if m.startswith("run ")] == [
        "adamw-lr0.008-s0", "adamw-lr0.001-s0", "adamw-lr0.0005-s0", "adamw-lr0.001-s1", "adamw-lr0.001-s2"]
    assert sweep.best_settings() == {"adamw": (0.001, None)}
    # result.json: one line, as the sweeps on disk have it; nothing else left beside it
    run = tmp_path / "runs" / "adamw-lr0.001-s0"
    assert (run / "result.json").read_text() == (
        '{"optimizer": "adamw", "lr": 0.001, "rho": null, "seed": 0, "status": "ok", "final_val_loss": 2.85, '
        '"evals": [{"step": 0, "val_loss": 5.0, "tokens": 0, "elapsed": 0.0, "train_passes": 0, '
        '"hessian_passes": 0}, {"step": 10, "val_loss": 2.85, "tokens": 1000, "elapsed": 1.0, "train_passes": 10, '
        '"hessian_passes": 0}]}\n')
    assert sorted(p.name for p in run.iterdir()) == ["log.txt", "metrics.jsonl", "result.json"]
    diverged = json.loads((tmp_path / "runs" / "adamw-lr0.0005-s0" / "result.json").read_text())
    assert diverged["status"] == "diverged" and diverged["final_val_loss"] == math.inf
    # run again: everything is on disk, nothing runs
    again: list[str] = []
    Sweep(tmp_path, spec, jobs=1, log=again.append).plan()
    assert again == []
