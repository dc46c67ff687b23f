"""The command line never drops, overrides or postpones what it is given: a setting is honoured or refused in one
line before any work (demo into an existing folder, the dry-run's plan, a prepared dataset's tokenizer, --quick,
the convergence grid, a data root that is a file, a missing extra of a core install)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sophia
from sophia.lm.checkpoint import list_checkpoints
from sophia.lm.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
         "--eval-batches", "2", "--warmup-steps", "2", "--no-progress"]


def _sophia(*args: str, timeout: float = 300, env: dict | None = None, python: str = sys.executable,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([python, "-m", "sophia", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a refused command (exit 1, no traceback)."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _text(path: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "and", "of", "the"]
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(800)))
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 1. demo into an existing folder ------------------------------------------------------------------------------


@pytest.fixture
def demo_dir(tmp_path):
    """A demo folder whose two runs exist (made small and fast with `sophia train`; the demo continues whatever
    runs its folder holds, with their saved settings)."""
    corpus = _text(tmp_path / "plays.txt")
    demo = tmp_path / "demo"
    for name in ("sophiag", "adamw"):
        proc = _sophia("train", "--optimizer", name, "--corpus", str(corpus), "--data-root", str(tmp_path / "data"),
                       "--out-dir", str(demo / name), "--max-steps", "2", "--eval-every", "2", *SMALL)
        assert proc.returncode == 0, proc.stderr
    return demo, corpus


def _table(stdout: str) -> str:
    """The demo's table of validation losses."""
    start = stdout.index("\nvalidation loss")
    return stdout[start:stdout.index("\nforward/backward passes:", start)]


def test_demo_refuses_a_setting_its_saved_runs_cannot_change_and_reuses_them_otherwise(demo_dir, tmp_path):
    demo, corpus = demo_dir
    other = _text(tmp_path / "other.txt", seed=1)
    before = _files(demo)
    line = _error_line(_sophia("demo", "--out-dir", str(demo), "--corpus", str(other)))
    # the setting, the saved value, the requested one, and what to do
    assert "--corpus" in line and str(corpus) in line and str(other) in line and "another --out-dir" in line, line
    line = _error_line(_sophia("demo", "--out-dir", str(demo), "--eval-batches", "5"))
    assert "--eval-batches was 2, not 5" in line and "another --out-dir" in line, line
    assert _files(demo) == before  # nothing trained, nothing written
    # given nothing (as `make demo` again), the demo reuses the runs with their own settings: the same table
    first = _sophia("demo", "--out-dir", str(demo))
    assert first.returncode == 0, first.stderr
    assert {k: v for k, v in _files(demo).items() if k != "curves.png"} == before
    again = _sophia("demo", "--out-dir", str(demo), "--corpus", str(corpus), "--eval-batches", "2")
    assert again.returncode == 0, again.stderr
    assert _table(again.stdout) == _table(first.stdout)
    assert re.search(r"^\s+2\s+\d", _table(first.stdout), re.M) and "plays.txt, byte tokens" in first.stdout


def test_demo_honours_settings_a_resume_may_change(demo_dir, tmp_path):
    demo, corpus = demo_dir
    data_root = tmp_path / "data2"  # another data root: the runs prepare the same corpus there
    proc = _sophia("demo", "--out-dir", str(demo), "--max-steps", "3", "--data-root", str(data_root))
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\s+3\s+\d", _table(proc.stdout), re.M), proc.stdout
    for name in ("sophiag", "adamw"):
        events = read_metrics(demo / name)
        assert max(e["step"] for e in events if e["event"] == "eval") == 3
        assert [e for e in events if e["event"] == "resume"][-1]["changes"]["max_steps"] == {"was": 2, "now": 3}
    assert any(data_root.iterdir())


def test_an_interrupted_demo_starts_its_missing_run_with_the_demos_settings(tmp_path):
    corpus = _text(tmp_path / "plays.txt")
    demo = tmp_path / "demo"
    proc = _sophia("train", "--optimizer", "sophiag", "--corpus", str(corpus), "--data-root", str(tmp_path / "data"),
                   "--out-dir", str(demo / "sophiag"), "--max-steps", "1", "--eval-every", "1", "--eval-batches", "1",
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    line = _error_line(_sophia("demo", "--out-dir", str(demo), "--corpus", str(_text(tmp_path / "b.txt", 1))))
    assert "--corpus" in line and not (demo / "adamw").exists()
    proc = _sophia("demo", "--out-dir", str(demo))
    assert proc.returncode == 0, proc.stderr
    start = [e for e in read_metrics(demo / "adamw") if e["event"] == "start"][0]["config"]
    assert (start["corpus"], start["max_steps"], start["eval_batches"]) == (str(corpus.resolve()), 1, 1)


# -- 2. the dry-run plans only what the run accepts ---------------------------------------------------------------


def test_dry_run_refuses_what_the_run_refuses(tmp_path):
    plan = _error_line(_sophia("train", "--dry-run", "--world-size", "3", "--grad-accum", "4"))
    assert "--grad-accum (4)" in plan and "(3)" in plan
    # the run on 3 ranks refuses it with the same words, before any work
    run = _error_line(_sophia("train", "--grad-accum", "4", "--out-dir", str(tmp_path / "run"),
                              env={"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}))
    assert run == plan and not (tmp_path / "run").exists()
    assert "--world-size must be a positive integer, got 0" in _error_line(
        _sophia("train", "--dry-run", "--world-size", "0"))
    assert "--compile does not support" in _error_line(
        _sophia("train", "--dry-run", "--optimizer", "adahessian", "--compile"))
    # what preparing the data refuses first (before it reads a byte) the plan refuses too
    assert "unknown tokenizer 'bytes'" in _error_line(_sophia("train", "--dry-run", "--tokenizer", "bytes"))
    assert "unknown corpus" in _error_line(_sophia("train", "--dry-run", "--corpus", str(tmp_path / "nope.txt")))
    # --world-size plans; it does not silently leave a run on one rank
    corpus = _text(tmp_path / "plays.txt")
    line = _error_line(_sophia("train", "--world-size", "2", "--corpus", str(corpus), "--data-root",
                               str(tmp_path / "data"), "--out-dir", str(tmp_path / "run"), "--max-steps", "1", *SMALL))
    assert "--world-size goes with --dry-run" in line and not (tmp_path / "run").exists()
    proc = _sophia("train", "--dry-run", "--json", "--world-size", "4", "--grad-accum", "8")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert (plan["world_size"], plan["micro_batches_per_rank"]) == (4, 2)


# -- 3. a prepared dataset folder and --tokenizer -----------------------------------------------------------------


def test_a_prepared_folder_is_trained_and_recorded_with_its_own_tokenizer(tmp_path):
    corpus = _text(tmp_path / "plays.txt")
    proc = _sophia("data", "prepare", str(corpus), "--tokenizer", "bpe:300", "--data-root", str(tmp_path / "data"))
    assert proc.returncode == 0, proc.stderr
    folder = Path(proc.stdout.strip().splitlines()[-1])
    vocab = json.loads((folder / "meta.json").read_text())["vocab_size"]
    line = _error_line(_sophia("train", "--corpus", str(folder), "--tokenizer", "byte", "--out-dir",
                               str(tmp_path / "run"), "--max-steps", "2", *SMALL))
    assert "--tokenizer byte" in line and "bpe:300" in line and str(folder) in line
    assert not (tmp_path / "run").exists()
    line = _error_line(_sophia("data", "prepare", str(folder), "--tokenizer", "gpt2"))
    assert "--tokenizer gpt2" in line and "bpe:300" in line
    proc = _sophia("train", "--dry-run", "--json", "--corpus", str(folder), *SMALL)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["vocab_size"] == vocab  # the folder's, not a guess from a spec
    for given in ([], ["--tokenizer", "BPE:300"]):  # the same tokenizer, spelt otherwise, is no conflict
        run = tmp_path / f"run{len(given)}"
        proc = _sophia("train", "--optimizer", "adamw", "--corpus", str(folder), *given, "--out-dir", str(run),
                       "--max-steps", "2", *SMALL)
        assert proc.returncode == 0, proc.stderr
        start = [e for e in read_metrics(run) if e["event"] == "start"][0]
        import torch

        saved = torch.load(list_checkpoints(run)[0], weights_only=True)
        assert start["config"]["tokenizer"] == saved["config"]["tokenizer"] == "bpe:300"


# -- 4. data prepare into a data root that is a file --------------------------------------------------------------


@pytest.mark.parametrize("under", [False, True], ids=["is-a-file", "under-a-file"])
def test_data_prepare_with_a_file_as_data_root_is_one_line(tmp_path, under):
    corpus = _text(tmp_path / "plays.txt")
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    root = blocker / "data" if under else blocker
    line = _error_line(_sophia("data", "prepare", str(corpus), "--data-root", str(root)))
    assert f"--data-root {root}" in line and f"{blocker} is a file" in line
    assert blocker.read_text() == "x"


# -- 5. BPE training on very long lines ---------------------------------------------------------------------------


def test_bpe_on_a_very_long_line_prepares_in_seconds(tmp_path):
    # One 300,000-character word: the trainer's time grows with its square (about 2 minutes here before the fix,
    # a 3 MB line hours); cut into pieces, seconds. The timeout is generous for a loaded machine.
    text = tmp_path / "long.txt"
    text.write_text("a" * 300_000 + "\n" + _text(tmp_path / "plays.txt").read_text())
    proc = _sophia("data", "prepare", str(text), "--tokenizer", "bpe:300", "--data-root", str(tmp_path / "data"),
                   timeout=90)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((Path(proc.stdout.strip().splitlines()[-1]) / "meta.json").read_text())
    assert meta["tokenizer"] == "bpe:300" and meta["source_bytes"] == len(text.read_bytes())


# -- 6. --quick gives defaults; explicit options win --------------------------------------------------------------


def test_bench_overhead_quick_keeps_explicit_steps(tmp_path):
    proc = _sophia("bench", "overhead", "--quick", "--steps", "10", "--out-dir", str(tmp_path / "ov"))
    assert proc.returncode == 0, proc.stderr
    (tiny,) = json.loads((tmp_path / "ov" / "results.json").read_text())["presets"]
    assert tiny["preset"] == "tiny" and tiny["steps"] == 10 and tiny["parameters"] < 100_000  # the quick model


def test_converge_quick_keeps_an_explicit_count_and_checks_it_at_once(tmp_path):
    # --quick used to replace --steps with its 20 and run the whole sweep: now the given value stands, and is refused
    line = _error_line(_sophia("bench", "converge", "--quick", "--steps", "0", "--out-dir", str(tmp_path / "cv"),
                               timeout=120))
    assert "--steps" in line and not (tmp_path / "cv").exists()


@pytest.mark.slow
def test_bench_step_quick_keeps_explicit_rounds(tmp_path):
    proc = _sophia("bench", "step", "--quick", "--rounds", "2", "--no-compiled", "--out-dir", str(tmp_path / "st"),
                   timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "st" / "results.json").read_text())
    assert (result["preset"], result["rounds"]) == ("quick", 2)


@pytest.mark.slow
def test_bench_converge_quick_keeps_explicit_counts(tmp_path):
    out = tmp_path / "cv"
    proc = _sophia("bench", "converge", "--quick", "--optimizers", "adamw", "--steps", "4", "--seeds", "1",
                   "--eval-every", "2", "--eval-batches", "1", "--out-dir", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr
    spec = json.loads((out / "sweep.json").read_text())
    assert (spec["steps"], spec["seeds"], spec["eval_every"], spec["eval_batches"]) == (4, 1, 2, 1)
    assert spec["lrs"] == {"adamw": [4e-3, 8e-3]} and spec["model"]["n_layer"] == 1  # --quick's, not given


# -- 7. the convergence grid is checked whole before anything is written ------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["--rhos", "-1"], "--rhos -1"),
    (["--rhos", "0.05,nan"], "--rhos nan"),
    (["--lrs", "adamw=0,0.004"], "--lrs adamw=0"),
    (["--lrs", "sophiag=0.001,-0.002"], "--lrs sophiag=-0.002"),
    (["--lrs", "lion=0.001,0.002"], "--lrs gives a grid for lion"),
    (["--lrs", "adamw="], "--lrs takes OPT=LR"),
], ids=["rho-negative", "rho-nan", "lr-zero", "lr-negative", "lr-for-no-optimizer", "lr-empty"])
def test_a_bad_grid_value_is_refused_before_any_run_or_sweep_file(tmp_path, args, message):
    out = tmp_path / "sweep"
    line = _error_line(_sophia("bench", "converge", "--quick", *args, "--out-dir", str(out), timeout=120))
    assert message in line, line
    assert not out.exists()  # no sweep.json to refuse the corrected rerun, no runs


def test_converge_out_dir_or_data_root_that_is_a_file_is_one_line(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    line = _error_line(_sophia("bench", "converge", "--quick", "--out-dir", str(blocker / "sweep")))
    assert "--out-dir" in line and "is a file" in line
    line = _error_line(_sophia("bench", "converge", "--quick", "--data-root", str(blocker), "--out-dir",
                               str(tmp_path / "sweep")))
    assert "--data-root" in line and not (tmp_path / "sweep").exists()


# -- 8. a core install (torch only) names the missing extra before any work ---------------------------------------


def _import_name(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
    return name.lower().replace("-", "_")


def test_the_extras_table_follows_pyproject():
    from sophia.cli import EXTRAS, missing_extra

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def modules(extra: str) -> set[str]:
        out = set()
        for req in extras[extra]:
            if req.startswith("sophia-lab["):  # an extra of an extra
                for inner in req[len("sophia-lab["):-1].split(","):
                    out |= modules(inner)
            else:
                out.add(_import_name(req))
        return out

    for command, (extra, needed) in EXTRAS.items():
        # every module the table checks is installed by the extra it names, and the extra brings nothing else
        # a command imports (datasets: only the openwebtext corpus, which says so itself)
        assert set(needed) == modules(extra) - {"datasets"}, command
    assert set(EXTRAS) == {"train", "sample", "data", "compare", "demo", "bench"}
    assert missing_extra("train") is None  # this environment has them all


def _core_venv(root: Path) -> Path:
    """A real environment with torch (and its own requirements) and nothing else: a venv whose site-packages
    links the installed distributions torch needs, and this checkout's source."""
    from packaging.requirements import Requirement

    venv = root / "core-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python*/site-packages"))
    seen, todo = set(), ["torch"]
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        dist = importlib.metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
        for requirement in map(Requirement, dist.requires or []):
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    (site / "sophia-src.pth").write_text(f"{Path(sophia.__file__).resolve().parents[1]}\n")
    return venv / "bin" / "python"


@pytest.fixture(scope="module")
def core_python(tmp_path_factory):
    python = _core_venv(tmp_path_factory.mktemp("core"))
    probe = subprocess.run([str(python), "-c", "import importlib.util as u, torch, sophia; print([m for m in "
                            "('numpy', 'matplotlib', 'tqdm', 'tokenizers', 'sophia_opt') if u.find_spec(m)])"],
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", probe.stderr  # torch only, really
    return str(python)


def _commands(tmp: Path) -> dict[str, tuple[list[str], str, Path]]:
    corpus = _text(tmp / "plays.txt")
    return {
        "train": (["train", "--corpus", str(corpus), "--out-dir", str(tmp / "run"), "--data-root",
                   str(tmp / "data")], "lm", tmp / "run"),
        "train-dry-run": (["train", "--dry-run"], "lm", tmp / "none"),
        "sample": (["sample", "--out-dir", str(tmp / "run")], "lm", tmp / "run"),
        "data": (["data", "prepare", str(corpus), "--data-root", str(tmp / "data")], "lm", tmp / "data"),
        "demo": (["demo", "--out-dir", str(tmp / "demo")], "lm", tmp / "demo"),
        "bench-toy": (["bench", "toy", "--quick", "--out-dir", str(tmp / "toy")], "bench", tmp / "toy"),
        "bench-converge": (["bench", "converge", "--quick", "--out-dir", str(tmp / "cv")], "bench", tmp / "cv"),
    }


@pytest.mark.parametrize("command", ["train", "train-dry-run", "sample", "data", "demo", "bench-toy",
                                     "bench-converge"])
def test_a_core_install_names_the_extra_before_any_work(core_python, tmp_path, command):
    args, extra, output = _commands(tmp_path)[command]
    line = _error_line(_sophia(*args, python=core_python, timeout=300))
    assert f"pip install 'sophia-lab[{extra}]'" in line and "numpy" in line, line
    assert not output.exists()  # nothing computed or created first


def test_a_core_install_runs_bench_step_without_the_optional_rows(core_python, tmp_path):
    # `bench step` needs torch only: on a bare GPU machine it must run, leaving out the rows of missing packages
    out = tmp_path / "step"
    proc = _sophia("bench", "step", "--quick", "--out-dir", str(out), python=core_python, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    names = [r["variant"] for r in data["rows"]]
    assert "AdamW fused" in names and any(n.startswith("SophiaG") for n in names)
    assert not any("sophia-opt" in n or "pytorch-optimizer" in n for n in names), names


@pytest.mark.slow
def test_a_core_install_from_pip_names_the_extra(tmp_path):
    """The real thing: `pip install sophia-lab` (torch only) into a fresh venv, then the installed `sophia`."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(REPO), "torch==2.13.0"],
                         capture_output=True, text=True, timeout=1800)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.util as u; "
                            "print(u.find_spec('numpy'), u.find_spec('matplotlib'))"], capture_output=True, text=True)
    assert probe.stdout.strip() == "None None", probe.stdout + probe.stderr
    for args, extra, output in _commands(tmp_path).values():
        proc = subprocess.run([str(venv / "bin" / "sophia"), *args], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        line = _error_line(proc)
        assert f"pip install 'sophia-lab[{extra}]'" in line, line
        assert not output.exists()


@pytest.mark.parametrize("module,extra", [("lightning", "lightning"), ("transformers", "hf")])
def test_a_core_install_names_an_integrations_extra_on_import(core_python, module, extra):
    proc = subprocess.run([core_python, "-c", f"import sophia.integrations.{module}"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and f"pip install 'sophia-lab[{extra}]'" in last, last
    assert "pytorch_lightning" not in last
