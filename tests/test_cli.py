"""The `natgrad` command line (DESIGN 7): tasks, run and grid end to end (a few through the
installed console script, the rest in-process through `main(argv)`), and bad input: a non-zero
exit, one line naming the field and the allowed values, and no file written."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from natgrad_impls import cli, results
from natgrad_impls.tasks import TASKS


def _natgrad(*args, cwd=None):
    """The console script when installed, else the module (same entry point)."""
    exe = shutil.which("natgrad", path=os.path.dirname(sys.executable)) or shutil.which("natgrad")
    command = [exe] if exe else [sys.executable, "-m", "natgrad_impls.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_tasks_lists_every_task_and_says_which_are_offline():
    done = _natgrad("tasks")
    assert done.returncode == 0, done.stderr
    table, footnote = done.stdout.split("\n\n")
    header, *lines = table.splitlines()
    assert header.split()[:6] == ["task", "N", "inputs", "classes", "params", "offline"]
    listed = {line.split()[0]: line.split() for line in lines}
    assert listed["wine"][2] == "14" and "column of ones" in footnote  # 13 features and the bias's 1
    assert list(listed) == list(TASKS)
    for name, fields in listed.items():
        assert fields[1] == str(TASKS[name].n_train)
        assert fields[5] == ("yes" if TASKS[name].offline else "download"), name


def test_run_end_to_end(tmp_path):
    out = tmp_path / "runs" / "breastcancer-ngd.parquet"  # the folder is created
    done = _natgrad("run", "--task", "breastcancer", "--optimizer", "ngd", "--framework", "torch", "--lr", "1",
                    "--damping", "1e-4", "--steps", "5", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no progress bar when stderr is not a terminal
    frame = results.read(out)
    assert frame["step"].tolist() == list(range(6)) and not frame["diverged"].any()
    assert (frame[["task", "optimizer", "framework", "device", "dtype"]].iloc[0].tolist()
            == ["breastcancer", "ngd", "torch", "cpu", "float64"])
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left behind


def test_grid_end_to_end(tmp_path):
    out = tmp_path / "grid.csv"
    done = _natgrad("grid", "--task", "wine", "--optimizers", "sgd,ngd,ef", "--lrs=-4:0:5", "--dampings=-4:0:3",
                    "--steps", "10", "--out", str(out))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for optimizer in ("sgd", "ngd", "ef"):
        line = next(line for line in lines if line.startswith(optimizer))
        assert "best lr=" in line and "chaotic" in line.lower() and re.search(r"\[[\d.e+-]+ s\]$", line), line
    assert "35 runs x 10 steps" in done.stdout  # 5 sgd + 15 ngd + 15 ef
    frame = results.read(out)
    assert set(frame["optimizer"]) == {"sgd", "ngd", "ef"}
    first = out.read_text().splitlines()[1].split(",")
    header = out.read_text().splitlines()[0].split(",")
    assert dict(zip(header, first))["damping"] == ""  # sgd: no damping, an empty field


@pytest.mark.parametrize("optimizer,extra", [("sgd", ["--lr", "1e-6", "--momentum", "0.9"]),
                                             ("adam", ["--lr", "1e-3", "--b1", "0.8"]),
                                             ("kfac", ["--lr", "0.1", "--damping", "1e-2", "--kfac-update-period", "3",
                                                       "--fisher", "exact"])])
def test_run_in_process_with_hyperparameters(tmp_path, optimizer, extra, capsys):
    out = tmp_path / "run.csv"
    assert cli.main(["run", "--task", "wine", "--optimizer", optimizer, "--framework", "numpy", *extra, "--steps", "3",
                     "--out", str(out)]) == 0
    frame = results.read(out)
    values = dict(zip(extra[::2], extra[1::2]))
    column = {"--momentum": "momentum", "--b1": "b1", "--kfac-update-period": "kfac_update_period"}
    for option, name in column.items():
        if option in values:
            assert np.all(frame[name] == float(values[option]))
    assert "wrote 4 rows" in capsys.readouterr().out


@pytest.mark.parametrize("batch", [None, 10])
def test_run_says_the_objective_it_ends_at(tmp_path, batch, capsys):
    """A mini-batch run's last `loss` is one batch's (1e-8 on breastcancer, where the full-train loss
    is 1.8): the summary says the last full-train loss it evaluated; a full-batch run's `loss` is it."""
    out = tmp_path / "run.csv"
    size = ["--batch-size", str(batch)] if batch else []
    assert cli.main(["run", "--task", "breastcancer", "--optimizer", "sgd", "--framework", "numpy", "--lr", "0.1",
                     *size, "--steps", "20", "--eval-every", "10", "--out", str(out)]) == 0
    frame, said = results.read(out), capsys.readouterr().out
    name = "train_loss" if batch else "loss"
    value = frame.dropna(subset=[name])[name].iloc[-1]
    assert f"final {name} {value:.6g} at step 20," in said
    if batch:
        assert f"{frame['loss'].iloc[-1]:.6g} at" not in said


BAD = {
    "unknown task": (["run", "--task", "mnist9", "--optimizer", "sgd", "--framework", "torch", "--lr", "0.1"],
                     "task: 'mnist9' is not one of wine, breastcancer"),
    "unknown optimizer": (["run", "--task", "wine", "--optimizer", "lbfgs", "--framework", "numpy", "--lr", "0.1"],
                          "optimizer: 'lbfgs' is not one of sgd, adam, ef, ngd, kfac"),
    "negative lr": (["run", "--task", "wine", "--optimizer", "sgd", "--framework", "numpy", "--lr", "-0.1"],
                    "lr: -0.1 must be a finite number >= 0"),
    "an option abbreviated": (["grid", "--task", "breastcancer", "--damping", "0.1"],
                              "unrecognized arguments: --damping 0.1"),  # not --dampings
    "a variant of a task that has none": (["run", "--task", "wine", "--optimizer", "sgd", "--framework", "numpy",
                                           "--lr", "0.1", "--variant", "linear-correct"],
                                          "variant: wine has no variants (misspec has: logistic-correct,"),
    "a damping float64 reads as 0": (["run", "--task", "wine", "--optimizer", "ef", "--framework", "numpy",
                                      "--lr", "0.1", "--damping", "1e-400"],
                                     "--damping: 1e-400 is below float64's smallest number"),
    "a number that is none": (["run", "--task", "wine", "--optimizer", "sgd", "--framework", "numpy", "--lr", "0.1",
                               "--momentum", "high"], "--momentum: invalid number value: 'high'"),
    "numpy on a network": (["run", "--task", "digits-mlp", "--optimizer", "sgd", "--framework", "numpy", "--lr", "0.1"],
                           "framework: 'numpy' is not available for task 'digits-mlp' (one of torch, jax)"),
    "cuda without a gpu": (["run", "--task", "wine", "--optimizer", "sgd", "--framework", "torch", "--device", "cuda",
                            "--lr", "0.1"], "device: 'cuda' is not available here for torch (one of cpu)"),
    "unknown framework": (["run", "--task", "wine", "--optimizer", "sgd", "--framework", "tf", "--lr", "0.1"],
                          "framework: 'tf' is not one of numpy, torch, jax"),
    "damping for sgd": (["run", "--task", "wine", "--optimizer", "sgd", "--framework", "numpy", "--lr", "0.1",
                         "--damping", "1"], "damping: not a hyperparameter of sgd (one of lr, momentum)"),
    "missing lr": (["run", "--task", "wine", "--optimizer", "ngd", "--framework", "numpy", "--damping", "1"],
                   "lr: required by ngd (its hyperparameters: lr, damping, fisher, samples)"),  # (the seed: --seed)
    "bad fisher": (["run", "--task", "wine", "--optimizer", "ngd", "--framework", "numpy", "--lr", "1", "--damping", "1",
                    "--fisher", "exakt"], "fisher: 'exakt' is not one of exact, mc"),
    "grid: unknown optimizer": (["grid", "--task", "wine", "--optimizers", "sgd,newton"],
                                "optimizers: 'newton' is not one of sgd, adam, ef, ngd, kfac"),
    "grid: a network": (["grid", "--task", "digits-mlp"], "task: 'digits-mlp' is not a full-batch convex task (one of"),
    "grid: bad lrs": (["grid", "--task", "wine", "--lrs=-20:10"], "lrs: '-20:10' must be START:STOP:NUM"),
    # argparse reads a value after a space that starts with '-' as an option; its message alone does not say so
    "grid: lrs after a space": (["grid", "--task", "wine", "--lrs", "-3:0:3"],
                                "argument --lrs: expected one argument (write --lrs=START:STOP:NUM"),
    "grid: dampings after a space": (["grid", "--task", "wine", "--dampings", "-3:0:3"],
                                     "(write --dampings=START:STOP:NUM"),
    "grid: numpy in float32": (["grid", "--task", "wine", "--dtype", "float32"],
                               "dtype: 'float32' is not available for numpy (one of float64)"),
    "grid: cuda without a gpu": (["grid", "--task", "wine", "--framework", "jax", "--device", "cuda"],
                                 "device: 'cuda' is not available here for jax (one of cpu)"),
    "missing option": (["run", "--task", "wine", "--framework", "numpy"], "the following arguments are required: --optimizer"),
    "unknown logit clip": (["run", "--task", "breastcancer", "--optimizer", "sgd", "--framework", "numpy",
                            "--lr", "0.1", "--logit-clip", "clipped"], "logit_clip: 'clipped' is not one of paper, none"),
    "clip off bernoulli": (["run", "--task", "wine", "--optimizer", "sgd", "--framework", "numpy", "--lr", "0.1",
                            "--logit-clip", "paper"],
                           "logit_clip: 'paper' clips a bernoulli likelihood; task 'wine' is gaussian (one of none)"),
    "grid: clip off bernoulli": (["grid", "--task", "wine", "--logit-clip", "paper"],
                                 "logit_clip: 'paper' clips a bernoulli likelihood"),
    "negative seed": (["run", "--task", "wine", "--optimizer", "sgd", "--framework", "numpy", "--lr", "0.1",
                       "--seed", "-1"], "seed: -1 must be an integer >= 0"),
    "grid: negative seed": (["grid", "--task", "wine", "--optimizers", "sgd", "--seed", "-1"],
                            "seed: -1 must be an integer >= 0"),
    # would silently have run full batch, and recorded no batch size
    "batch larger than the data": (["run", "--task", "digits-mlp", "--optimizer", "sgd", "--framework", "torch",
                                    "--lr", "0.1", "--batch-size", "5000"],
                                   "batch_size: 5000 is more than digits-mlp's 1437 training examples"),
    # runner.run checks these too, but only after the output folder is made
    "no evaluations": (["run", "--task", "digits-mlp", "--optimizer", "sgd", "--framework", "torch", "--lr", "0.1",
                        "--eval-every", "0"], "eval_every: 0 must be an integer >= 1"),
    "negative steps": (["run", "--task", "wine", "--optimizer", "sgd", "--framework", "numpy", "--lr", "0.1",
                        "--steps", "-1"], "steps: -1 must be an integer >= 0"),
    "empty batches": (["run", "--task", "digits-mlp", "--optimizer", "sgd", "--framework", "torch", "--lr", "0.1",
                       "--batch-size", "0"], "batch_size: 0 must be an integer >= 1"),
    # would have formed and solved a singular 9610 x 9610 matrix (29 s, 1.9 GB) to diverge at step 0
    "undamped network": (["run", "--task", "digits-mlp", "--optimizer", "ngd", "--framework", "torch", "--lr", "0.1",
                          "--damping", "0"], "damping: 0 leaves digits-mlp's curvature singular; use a damping > 0"),
    # a float32 batch too wide for a damping that small (its direction is lost to round-off)
    "float32 wide batch": (["run", "--task", "digits-mlp", "--optimizer", "ngd", "--framework", "torch", "--lr",
                            "0.1", "--damping", "1e-6", "--dtype", "float32", "--batch-size", "600"],
                           "damping: 1e-06 is below 0.0001, where float32 loses the direction of a wide batch: "
                           "batch_size 600 gives the exact curvature 5400 columns"),
    "float32 wide cosine": (["run", "--task", "digits-mlp", "--optimizer", "ef", "--framework", "jax", "--lr", "0.1",
                             "--damping", "1e-6", "--dtype", "float32", "--batch-size", "600", "--cos-ef-ngd"],
                            "damping: 1e-06 is below 0.0001, where float32 loses the direction of a wide batch: "
                            "batch_size 600 gives the exact curvature"),
    # the cosine is measured with the run's damping: refused before the run, not a traceback from it
    "cosine without damping": (["run", "--task", "wine", "--optimizer", "sgd", "--framework", "numpy", "--lr", "0.1",
                                "--cos-ef-ngd"], "cos_ef_ngd: needs the run's damping; sgd has none"),
}


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_gd_on_breastcancer_diverges_at_step_1_only_without_the_logit_clip(tmp_path, framework):
    """DESIGN 4: with the paper code's clip, full-batch GD at lr 0.1 oscillates (every example's
    clipped loss is at most 18.42, below 100 x log 2); with the exact likelihood it diverges at step 1."""
    frames = {}
    for clip in ("paper", "none"):
        out = tmp_path / f"{clip}.csv"
        assert cli.main(["run", "--task", "breastcancer", "--optimizer", "sgd", "--framework", framework, "--lr", "0.1",
                         "--steps", "10", "--logit-clip", clip, "--no-progress", "--out", str(out)]) == 0
        frames[clip] = results.read(out)
        assert (frames[clip]["logit_clip"] == clip).all()
    paper, exact = frames["paper"], frames["none"]
    assert not paper["diverged"].any() and len(paper) == 11
    assert paper["loss"].iloc[1:].between(1, 18.5).all() and paper["loss"].iloc[1:].diff().abs().iloc[1:].min() > 1
    assert exact["diverged"].all() and exact["step"].tolist() == [0, 1] and exact["loss"].iloc[1] > 100 * np.log(2)
    np.testing.assert_allclose(paper["loss"].iloc[0], exact["loss"].iloc[0], rtol=1e-15)  # the same start


def test_the_logit_clip_defaults_to_the_task_and_is_recorded_only_on_bernoulli_tasks(tmp_path):
    out = tmp_path / "grid.csv"
    assert cli.main(["grid", "--task", "breastcancer", "--optimizers", "sgd", "--lrs=-6:-5:2", "--steps", "2",
                     "--repeats", "1", "--no-progress", "--out", str(out)]) == 0
    assert (results.read(out)["logit_clip"] == "paper").all()
    assert cli.main(["grid", "--task", "wine", "--optimizers", "sgd", "--lrs=-6:-5:2", "--steps", "2", "--repeats", "0",
                     "--logit-clip", "none", "--no-progress", "--out", str(out)]) == 0
    assert "logit_clip" not in results.read(out).columns  # gaussian: nothing to clip, no column


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("extension", [".csv", ".parquet"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case, extension):
    argv, message = BAD[case]
    if "cuda" in case:
        pytest.importorskip("torch")
        from natgrad_impls.runner import available_devices
        from natgrad_impls.names import Device, Framework

        if Device.CUDA in available_devices(Framework(argv[argv.index("--framework") + 1])):
            pytest.skip("a GPU is visible here")
    out = tmp_path / f"out{extension}"
    status = cli.main([*argv, "--out", str(out)])
    captured = capsys.readouterr()
    assert status == cli.EXIT_BAD_INPUT
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert message in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_bad_output_name_is_refused_before_any_work(tmp_path, capsys):
    status = cli.main(["run", "--task", "wine", "--optimizer", "sgd", "--framework", "numpy", "--lr", "0.1",
                       "--out", str(tmp_path / "run.txt")])
    assert status == cli.EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip() == f"natgrad: out: {str(tmp_path / 'run.txt')!r} must end in one of .csv, .parquet"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["run", "grid"])
def test_an_unwritable_output_is_refused_before_any_work(tmp_path, capsys, monkeypatch, command):
    """A file where the output's folder should be: one line naming `out` before anything runs."""
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "x.csv"
    work = lambda *args, **kwargs: pytest.fail("the run started")  # noqa: E731
    monkeypatch.setattr("natgrad_impls.runner.run", work)
    monkeypatch.setattr("natgrad_impls.grid.run_grid", work)
    args = ["--task", "wine", "--framework", "numpy", "--out", str(out)]
    args += ["--optimizer", "sgd", "--lr", "0.1"] if command == "run" else ["--optimizers", "sgd", "--steps", "2"]
    assert cli.main([command, *args]) == cli.EXIT_BAD_INPUT
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"natgrad: out: cannot write {str(out)!r} (")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_unwritable_checkpoints_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """--checkpoints naming a file, or a folder that cannot be made: one line naming `checkpoints`
    before the grid runs (it wrote its first checkpoint after the first optimizer's grid before)."""
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr("natgrad_impls.grid.run_grid", lambda *a, **k: pytest.fail("the grid started"))
    args = ["grid", "--task", "wine", "--optimizers", "sgd", "--out", str(tmp_path / "grid.csv"), "--checkpoints"]
    for folder, why in ((tmp_path / "afile", f"{str(tmp_path / 'afile')!r} is a file, not a folder"),
                        (tmp_path / "afile" / "below", "Not a directory")):
        assert cli.main([*args, str(folder)]) == cli.EXIT_BAD_INPUT
        (line,) = capsys.readouterr().err.splitlines()
        assert line == f"natgrad: checkpoints: cannot write in {str(folder)!r} ({why})"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_no_command_names_the_commands(capsys):
    assert cli.main([]) == cli.EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip() == "natgrad: the following arguments are required: {tasks,run,grid}"


def test_a_refused_command_makes_no_output_folder(tmp_path):
    out = tmp_path / "new" / "x.csv"
    assert cli.main(["run", "--task", "wine", "--optimizer", "sgd", "--framework", "numpy", "--lr", "-1",
                     "--out", str(out)]) == cli.EXIT_BAD_INPUT
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_fails_after_the_checks_leaves_no_output_folder(tmp_path, capsys, monkeypatch):
    """The output's folder is tried for writing before the run, then removed again: data that
    cannot be downloaded (offline) leaves nothing behind."""
    from natgrad_impls.data import DataUnavailable

    def offline(*args, **kwargs):
        raise DataUnavailable("yacht: could not download (offline)")

    monkeypatch.setattr("natgrad_impls.runner.run", offline)
    out = tmp_path / "new" / "sub" / "x.csv"
    with pytest.raises(SystemExit) as stopped:
        cli.main(["run", "--task", "wine", "--optimizer", "sgd", "--framework", "numpy", "--lr", "0.1",
                  "--out", str(out)])
    assert stopped.value.code == cli.EXIT_UNAVAILABLE and "could not download" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_result_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    """The disk fills during the run: one line naming `out`, exit 1, no traceback."""
    def full(frame, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results, "write", full)
    out = tmp_path / "x.csv"
    with pytest.raises(SystemExit) as stopped:
        cli.main(["run", "--task", "wine", "--optimizer", "sgd", "--framework", "numpy", "--lr", "0.1", "--steps", "2",
                  "--out", str(out)])
    assert stopped.value.code == cli.EXIT_NOT_WRITTEN
    assert capsys.readouterr().err.splitlines() == [f"natgrad: out: cannot write {str(out)!r} (No space left on device)"]


def test_a_run_removes_the_stale_temporaries_a_killed_run_left_beside_its_output(tmp_path):
    """A run killed hard while renaming its result into place leaves `.NAME.*.part` behind; the next
    run that writes NAME removes it once stale, but keeps a young one (another run may be writing)
    and the temporaries of other files."""
    out = tmp_path / "run.csv"
    stale = time.time() - results.STALE_WRITE_AGE_S - 60
    left = {".run.csv.killed.part": stale, ".run.csv.writing.part": time.time(), ".other.csv.killed.part": stale}
    for name, mtime in left.items():
        (tmp_path / name).write_text("partial")
        os.utime(tmp_path / name, (mtime, mtime))
    assert cli.main(["run", "--task", "wine", "--optimizer", "sgd", "--framework", "numpy", "--lr", "0.1",
                     "--steps", "1", "--no-progress", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.csv.killed.part", ".run.csv.writing.part", "run.csv"]


def test_bad_input_through_the_console_script(tmp_path):
    done = _natgrad("run", "--task", "wine", "--optimizer", "sgd", "--framework", "numpy", "--lr", "-1",
                    "--out", str(tmp_path / "x.csv"))
    assert done.returncode == cli.EXIT_BAD_INPUT == 2  # the documented status, argparse's for usage errors
    assert done.stderr.splitlines() == ["natgrad: lr: -1.0 must be a finite number >= 0"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [["--help"], ["run", "--task", "wine", "--optimizer", "sgd", "--framework", "numpy",
                                              "--lr", "-1", "--out", "x.csv"],
                                  ["run", "--task", "digits-mlp", "--optimizer", "sgd", "--framework", "torch",
                                   "--lr", "0.1", "--out", "x.txt"]])
def test_help_and_bad_input_answer_before_the_heavy_imports(argv):
    """pandas (0.5 s), torch and jax are imported where a run needs them, so that --help and a
    refused command answer at once."""
    probe = (f"import sys\nfrom natgrad_impls import cli\ntry:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('pandas', 'torch', 'jax') if m in sys.modules), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stderr.splitlines()[-1] == "[]", done.stderr


def test_run_reads_hyperparameters_from_json_and_options_win(tmp_path, capsys):
    settings = tmp_path / "best.json"
    settings.write_text('{"lr": 0.5, "damping": 0.01, "fisher": "mc"}')
    out = tmp_path / "run.csv"
    status = cli.main(["run", "--task", "breastcancer", "--optimizer", "ngd", "--framework", "numpy", "--steps", "3",
                       "--hyperparameters", str(settings), "--damping", "0.1", "--out", str(out)])
    assert status == 0, capsys.readouterr().err
    frame = results.read(out)
    assert frame["lr"].unique().tolist() == [0.5] and frame["damping"].unique().tolist() == [0.1]
    assert frame["fisher"].unique().tolist() == ["mc"]


@pytest.mark.parametrize("text,message", [
    ('{"lr": 0.5, "dampin": 0.01}', "hyperparameters: 'dampin' in"),
    ("lr: 0.5", "hyperparameters: cannot read"),
    ("[0.5]", "must hold a JSON object"),
    ('{"lr": true, "damping": 1}', "lr: True must be a finite number >= 0"),  # not lr 1: a bool is a mistake
    ('{"lr": 0.5, "damping": 1e-400}', "1e-400 is below float64's smallest number"),  # not damping 0
    ('{"lr": 1, "damping": 1, "fisher": "mc", "samples": true}', "samples: True must be an integer >= 1"),
])
def test_bad_hyperparameters_file_is_one_line_and_writes_nothing(tmp_path, capsys, text, message):
    settings = tmp_path / "settings" / "best.json"
    settings.parent.mkdir()
    settings.write_text(text)
    out = tmp_path / "run.csv"
    status = cli.main(["run", "--task", "wine", "--optimizer", "ngd", "--framework", "numpy",
                       "--hyperparameters", str(settings), "--out", str(out)])
    lines = capsys.readouterr().err.splitlines()
    assert status == cli.EXIT_BAD_INPUT and len(lines) == 1 and message in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize("optimizer,options", [
    ("sgd", {"--lr": "0.001", "--momentum": "0.5"}),
    ("adam", {"--lr": "0.001", "--b1": "0.8", "--b2": "0.99", "--eps": "1e-06"}),
    ("ngd", {"--lr": "0.1", "--damping": "0.01", "--fisher": "mc", "--samples": "3"}),
    ("kfac", {"--lr": "0.1", "--damping": "0.01", "--kfac-update-period": "3", "--kfac-ema": "0.9", "--fisher": "mc",
              "--samples": "2"}),
])
def test_every_hyperparameter_option_sets_its_own_column(tmp_path, optimizer, options):
    """Each option sets the hyperparameter it names (DESIGN 3), every one given a value that no other
    has and that is not its default, so that an option read into another's field, or parsed as the
    wrong type, shows."""
    out = tmp_path / "run.csv"
    argv = [item for pair in options.items() for item in pair]
    assert cli.main(["run", "--task", "wine", "--optimizer", optimizer, "--framework", "numpy", *argv, "--steps", "1",
                     "--no-progress", "--out", str(out)]) == 0
    frame = results.read(out)
    for option, value in options.items():
        name = option[2:].replace("-", "_")
        assert frame[name].tolist() == [value if name == "fisher" else float(value)] * 2, name


def test_run_options_reach_the_run(tmp_path):
    """--dtype, --seed, --batch-size, --eval-every and --cos-ef-ngd are the run's, not runner.run's
    defaults: the table says float32, seed 3 and batches of 64, is evaluated at steps 0, 2 and 3
    (not at 0 and the last only, as the default 200 would), and has a cosine on every row."""
    out = tmp_path / "run.parquet"
    assert cli.main(["run", "--task", "digits-mlp", "--optimizer", "ef", "--framework", "torch", "--lr", "0.01",
                     "--damping", "0.1", "--dtype", "float32", "--seed", "3", "--batch-size", "64", "--eval-every", "2",
                     "--steps", "3", "--cos-ef-ngd", "--no-progress", "--out", str(out)]) == 0
    frame = results.read(out)
    assert frame[["dtype", "seed", "batch_size"]].drop_duplicates().values.tolist() == [["float32", 3, 64]]
    assert frame.loc[frame["train_loss"].notna(), "step"].tolist() == [0, 2, 3]
    assert frame["cos_ef_ngd"].notna().all()


def test_a_run_of_zero_steps_measures_the_start(tmp_path):
    """--steps 0 is a run of one row, theta0 measured (what a cosine or a loss at the start needs), not
    bad input: only negative steps are."""
    out = tmp_path / "run.csv"
    assert cli.main(["run", "--task", "wine", "--optimizer", "sgd", "--framework", "numpy", "--lr", "0.1",
                     "--steps", "0", "--no-progress", "--out", str(out)]) == 0
    assert results.read(out)["step"].tolist() == [0]


def test_the_progress_bar_is_drawn_when_stderr_is_a_terminal_unless_no_progress(tmp_path, monkeypatch):
    """The bar goes to stderr, so stderr being a terminal decides (a job's stdout may be a log file
    while its stderr is a terminal), and --no-progress turns it off there."""

    class Stream(io.StringIO):
        def __init__(self, terminal):
            super().__init__()
            self.terminal = terminal

        def isatty(self):
            return self.terminal

    drawn = {}
    for flag in ([], ["--no-progress"]):
        monkeypatch.setattr(sys, "stdout", Stream(False))
        monkeypatch.setattr(sys, "stderr", Stream(True))
        assert cli.main(["run", "--task", "wine", "--optimizer", "sgd", "--framework", "numpy", "--lr", "1e-6",
                         "--steps", "3", *flag, "--out", str(tmp_path / "run.csv")]) == 0
        drawn[bool(flag)] = sys.stderr.getvalue()
    assert "wine sgd numpy" in drawn[False] and drawn[True] == ""


_RUN_UNTIL_KILLED = """
import sys, time
from natgrad_impls import cli, runner

def running(*args, **kwargs):
    print("running", flush=True)
    time.sleep(120)

runner.run = running
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_stops_a_run_with_status_143_and_leaves_nothing(tmp_path):
    """`kill` (a pipeline stopping its jobs) unwinds `natgrad run`: exit status 128 + 15, as a shell
    reports a job stopped by SIGTERM, not death by the signal, nothing left in the output folder, and
    one line that says so."""
    import signal

    out = tmp_path / "new" / "run.csv"
    process = subprocess.Popen([sys.executable, "-c", _RUN_UNTIL_KILLED, "run", "--task", "wine", "--optimizer", "sgd",
                                "--framework", "numpy", "--lr", "0.1", "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "running\n", process.stderr.read()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        stderr = process.communicate()[1]
    assert process.returncode == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    assert stderr.splitlines()[-1] == "natgrad: stopped; nothing was written"


def _help_options(argv, monkeypatch, capsys) -> dict[str, str]:
    """`natgrad ... --help`'s options section: {option: its line(s), whitespace collapsed}."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    return {chunk.split()[0]: chunk for chunk in re.split(r" (?=--[a-z])", " " + text) if chunk.startswith("--")}


REQUIRED = {"sgd": {"--lr": "0.1"}, "adam": {}, "ef": {"--lr": "0.1", "--damping": "0.01"},
            "ngd": {"--lr": "0.1", "--damping": "0.01"}, "kfac": {"--lr": "0.1", "--damping": "0.01"}}


@pytest.mark.parametrize("option", ["--lr", "--damping", "--momentum", "--b1", "--b2", "--eps", "--fisher", "--samples",
                                    "--kfac-update-period", "--kfac-ema"])
def test_run_help_states_what_a_run_does_without_each_hyperparameter(tmp_path, monkeypatch, capsys, option):
    """`natgrad run --help` lists, per hyperparameter, the optimizers that take it with its default there
    or "required": each default is what a run without the option records, each "required" a refusal
    naming the field, and every optimizer it leaves out refuses the option."""
    line = _help_options(["run", "--help"], monkeypatch, capsys)[option]
    takers = re.fullmatch(r".*\[(.*)\]", line).group(1)
    name, listed = option[2:].replace("-", "_"), set()
    for group in takers.split("; "):
        optimizers, default = group.split(": ")
        for optimizer in optimizers.split(", "):
            listed.add(optimizer)
            given = [item for pair in REQUIRED[optimizer].items() if pair[0] != option for item in pair]
            given += ["--fisher", "mc"] if name == "samples" else []  # an exact Fisher draws none: no column
            out = tmp_path / f"{optimizer}.csv"
            status = cli.main(["run", "--task", "wine", "--optimizer", optimizer, "--framework", "numpy", *given,
                               "--steps", "1", "--no-progress", "--out", str(out)])
            if default == "required":
                assert status == cli.EXIT_BAD_INPUT and f"{name}: required by {optimizer}" in capsys.readouterr().err
            else:
                assert status == 0, capsys.readouterr().err
                value = results.read(out)[name].iloc[0]
                assert (value == default if name == "fisher" else value == float(default)), (optimizer, value, default)
    for optimizer in set(REQUIRED) - listed:
        status = cli.main(["run", "--task", "wine", "--optimizer", optimizer, "--framework", "numpy",
                           *[item for pair in REQUIRED[optimizer].items() for item in pair], option, "1",
                           "--steps", "1", "--no-progress", "--out", str(tmp_path / "refused.csv")])
        assert status == cli.EXIT_BAD_INPUT and f"{name}: not a hyperparameter of {optimizer}" in capsys.readouterr().err
    assert listed


def test_both_commands_seed_0_as_the_python_api_does():
    """(The grid's default bounds: test_grid's test_paper_grid_is_the_default.)"""
    import inspect

    from natgrad_impls import grid, runner

    parser = cli._parser()
    grid_args = parser.parse_args(["grid", "--task", "wine", "--out", "grid.csv"])
    run_args = parser.parse_args(["run", "--task", "wine", "--optimizer", "sgd", "--framework", "numpy",
                                  "--out", "run.csv"])
    assert grid_args.seed == run_args.seed == 0
    assert all(inspect.signature(f).parameters["seed"].default == 0 for f in (grid.run_grid, runner.run))


def test_a_zero_is_a_number_in_any_notation_and_an_underflow_is_not():
    """`number` refuses what float64 rounds to 0, judged by the digits before the exponent: 0e-5 is a
    0 written out, and 1e-400 a typo."""
    assert cli.number("0e-5") == cli.number("0.0E+3") == cli.number("-0") == 0
    assert cli.number("5e-324") > 0
    for underflow in ("1e-400", "0.5e-330", "-2E-999"):
        with pytest.raises(cli.argparse.ArgumentTypeError, match="below float64's smallest number"):
            cli.number(underflow)


def test_help_names_the_variants_the_seed_and_the_evaluation_default(monkeypatch, capsys):
    """What a newcomer needs from --help without reading the code: misspec's variants, what --seed
    seeds, and --eval-every's default as the runner has it."""
    from natgrad_impls import runner
    from natgrad_impls.tasks import get_task

    run = _help_options(["run", "--help"], monkeypatch, capsys)
    grid = _help_options(["grid", "--help"], monkeypatch, capsys)
    for variant in get_task("misspec").variants:
        assert variant in run["--variant"] and variant in grid["--variant"]
    assert "mini-batch order" in run["--seed"] and "chaos check" in grid["--seed"] and "misspec" in grid["--seed"]
    assert f"default {runner.DEFAULT_EVAL_EVERY})" in run["--eval-every"]
    assert "[ngd: exact; kfac: mc]" in grid["--fisher"]


def test_every_list_of_hyperparameter_names_holds_the_same_names():
    """The hyperparameters are named in several places that serve different readers: the dataclasses
    (validation), ARGUMENTS (docstrings), the result columns' order, the command line's options and
    the config schema's fixed ones. A name added to one and not the others would be refused, dropped
    from the results or undocumented."""
    import dataclasses
    from pathlib import Path

    import yaml

    from natgrad_impls import hyperparameters
    from natgrad_impls.runner import HYPERPARAMETER_ORDER

    fields = {f.name for c in hyperparameters.HYPERPARAMETERS.values() for f in dataclasses.fields(c)} - {"seed"}
    schema = yaml.safe_load((Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    fixed = set(schema["$defs"]["hyperparameters"]["additionalProperties"]["properties"])
    assert set(HYPERPARAMETER_ORDER) == fields
    assert set(hyperparameters.ARGUMENTS) - {"problem", "seed"} == fields
    assert {"lr", "damping", *(name for _, name, _ in cli.EXTRA_HYPERPARAMETERS)} == fields
    assert fixed | {"lr", "damping"} == fields  # lr and damping are the tuning grid's, not fixed ones
    assert HYPERPARAMETER_ORDER[:2] == ("lr", "damping")
