"""The Snakemake pipeline (DESIGN 2, 8): lint, dry runs of every configuration, the config schema,
and the smoke configuration end to end in a copy of the repository, killed half-way and resumed.

Everything runs in a temporary copy, so that the repository's own results/ is never touched.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from natgrad_impls import timing
from rst_check import rst_problems

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # snakemake and natgrad of this environment
SKIP = {".git", ".venv", ".snakemake", ".pytest_cache", "__pycache__", "html", "env"}
SMOKE_TIMEOUT_S = 900


def copy_repository(target: Path) -> Path:
    """The working tree without environments, caches or results (results/reference is kept)."""

    def ignore(folder, names):
        skipped = {n for n in names if n in SKIP or n.endswith(".egg-info")}
        if Path(folder) == REPO / "results":
            skipped |= {n for n in names if n not in ("reference", "README.md")}
        if Path(folder) == REPO / "benchmarks":
            skipped |= {"results"}
        return skipped

    shutil.copytree(REPO, target, ignore=ignore)
    return target


def unactivated() -> dict:
    """The environment of a shell that has not activated ours: no folder with a `natgrad` on its PATH
    (the workflow's shell jobs must find the one beside the Python that runs Snakemake)."""
    folders = os.environ.get("PATH", "").split(os.pathsep)
    return {**os.environ, "PATH": os.pathsep.join(f for f in folders if f and not (Path(f) / "natgrad").exists())}


def snakemake(cwd: Path, *args, timeout=300, check=False) -> subprocess.CompletedProcess:
    env = unactivated()
    done = subprocess.run([str(BIN / "snakemake"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def result_files(root: Path) -> set[Path]:
    results = root / "results"
    return {p for p in results.rglob("*")
            if p.is_file() and p.name != "README.md" and not {"reference", "logs"} & set(p.relative_to(results).parts)
            and not any(part.startswith(".") for part in p.relative_to(results).parts)}  # a job's own checkpoints


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    return copy_repository(tmp_path_factory.mktemp("pipeline") / "natgrad-bench")


def test_lint_is_clean(repo_copy):
    done = snakemake(repo_copy, "--lint", "--workflow-profile", "none")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Congratulations, your workflow is in a good condition" in done.stdout + done.stderr


def test_slurm_profile_sends_cuda_jobs_to_the_gpu_partition_with_no_limit_on_them(tmp_path):
    """As the workflow profile it replaces profiles/default, whose gpu=1 would allow one GPU job at
    a time on the whole cluster; cuda jobs ask for a GPU on the GPU partition, the others for none."""
    profile = (REPO / "profiles/slurm/config.yaml").read_text()
    assert not re.search(r"^\s*-?\s*gpu\s*[=:]", profile, re.MULTILINE), "a limit on gpu for the whole cluster"
    # without report-after-run: Snakemake 9 would build the report after the dry run, from no results
    dry = tmp_path / "slurm-dry"
    dry.mkdir()
    (dry / "config.yaml").write_text(re.sub(r"(?m)^report(-after-run)?:.*$", "", profile))
    copy = copy_repository(tmp_path / "natgrad-bench")
    done = snakemake(copy, "-n", "--workflow-profile", str(dry), "--configfile", "config/gpu.yaml", check=True)
    output = done.stdout + done.stderr
    assert "profiles/default" not in output
    asks = re.findall(r"slurm_partition=(\w+),.*?\bgpu=(\d+)", output)
    assert len(asks) > 20 and set(asks) == {("gpu", "1"), ("cpu", "0")}
    # the jobs that time take their node alone, as they take every core on one machine
    exclusive = set(re.findall(r"^rule (\w+):\n(?:    .*\n)*?    resources: .*slurm_extra=--exclusive", output, re.M))
    assert exclusive == {"train", "cost", "scaling"}, exclusive


def test_the_slurm_profile_parses_and_refuses_devices_auto_before_any_job(tmp_path):
    """A run (not a dry run) under the SLURM profile: without `cores` the rules that take every core
    (`threads: workflow.cores`) stopped the workflow before it parsed; with `devices: auto`, which
    each node would decide for itself, it stops before any job with the field and the remedy."""
    profile = tmp_path / "slurm"
    profile.mkdir()
    (profile / "config.yaml").write_text((REPO / "profiles/slurm/config.yaml").read_text())
    copy = copy_repository(tmp_path / "natgrad-bench")
    done = snakemake(copy, "--workflow-profile", str(profile), timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "requires a total number of cores" not in output
    assert "config devices: auto asks this machine for a GPU, but the jobs run on other nodes" in output, output[-2000:]
    assert not result_files(copy), "a job ran before the devices were checked"


@pytest.mark.parametrize("overlay", [None, "config/smoke.yaml", "config/paper.yaml", "config/gpu.yaml"])
def test_dry_run_builds_the_dag(repo_copy, overlay):
    args = ["-n", "--workflow-profile", "none"] + (["--configfile", overlay] if overlay else [])
    done = snakemake(repo_copy, *args, check=True)
    jobs = int(re.search(r"^total\s+(\d+)", done.stdout, re.MULTILINE).group(1))
    assert jobs > 20
    for rule in ("grid", "grid_logit_clip_none", "tune", "train", "cost", "figure_fig3_optimisation", "table_summary",
                 "figure_appendix_logit_clip", "table_logit_clip", "table_environment"):
        assert re.search(rf"^{rule}\s+\d+", done.stdout, re.MULTILINE), f"{overlay}: no {rule} job"
    assert not result_files(repo_copy)


SCHEMA = "Error validating config file"  # (the Snakefile's one line, Snakemake's words first)
BAD_CONFIGS = {  # overlay, what the output must say (regexes), the field it must name
    "unknown task": ("convex:\n  tasks: [wine, iris]\n", [SCHEMA, r"'iris' is not one of"], "convex"),
    "negative lr": ("networks:\n  lrs: {sgd: [0.1, -0.01]}\n",
                    [SCHEMA, r"-0.01 is less than or equal to the minimum of 0"], "lrs"),
    "misspelled key": ("netwroks:\n  tasks: [digits-mlp]\n", [SCHEMA, r"'netwroks' was unexpected"], "netwroks"),
    "unknown optimizer": ("optimizers: [sgd, lbfgs]\n", [SCHEMA, r"'lbfgs' is not one of"], "optimizers"),
    "a logit clip switch that is no boolean": ("convex:\n  compare_logit_clip: 'yes'\n",
                                              [SCHEMA, r"'yes' is not of type 'boolean'"], "compare_logit_clip"),
    # two fields, beyond a schema: common.smk's check
    "a tuning seed rerun": ("networks:\n  tuning_seeds: [0, 3]\n",
                            [r"networks.seeds repeats networks.tuning_seeds \[3\]"], "tuning_seeds"),
    "a grid hyperparameter that differs between optimizers": (
        "convex:\n  hyperparameters: {ngd: {fisher: mc, samples: 4}, kfac: {fisher: mc}}\n",
        [r"samples is 4 for ngd, its default for kfac; one natgrad grid gives every optimizer that has samples the "
         r"same value: set it alike for ngd, kfac"], "convex.hyperparameters"),
    # ngd's Fisher is exact by default: it would draw no labels, and samples would be dropped
    "samples for an exact Fisher": (
        "convex:\n  hyperparameters: {ngd: {samples: 4}}\n",
        [r"config convex.hyperparameters.ngd: samples: 4 must be 1 with fisher exact"], "convex.hyperparameters"),
    # in one natgrad grid, ngd's momentum would have become sgd's
    "a hyperparameter the optimizer does not have": (
        "convex:\n  hyperparameters: {ngd: {momentum: 0.9}}\n",
        [r"config convex.hyperparameters.ngd: momentum: not a hyperparameter of ngd"], "momentum"),
    "a value the optimizer refuses": ("networks:\n  hyperparameters: {sgd: {momentum: 1}}\n",
                                      [SCHEMA, r"1 is greater than or equal to the maximum of 1"], "momentum"),
    "log10 bounds that are no numbers": ("convex:\n  lrs: '1.2.3:10:5'\n",
                                         [SCHEMA, r"'1.2.3:10:5' is not log10 START:STOP:NUM, e.g."], "lrs"),
    "a misspelled top-level key": ("optimisers: [sgd]\n",
                                   [SCHEMA + r": config: .*'optimisers' was unexpected\); it takes optimizers,"],
                                   "optimisers"),
    "an infinite lr in a tuning grid": ("networks:\n  lrs: {sgd: [0.1, .inf]}\n",
                                       [r"config\['networks'\]\['lrs'\]\['sgd'\]\[1\]: inf is not a finite number"],
                                       "lrs"),
    "a NaN damping": ("networks:\n  dampings: {kfac: [.nan]}\n",
                      [r"config\['networks'\]\['dampings'\]\['kfac'\]\[0\]: nan is not a finite number"], "dampings"),
    "unquoted log10 bounds": ("convex:\n  dampings: -10:10:41\n",
                              [SCHEMA + r": config\['convex'\]\['dampings'\]: YAML read the unquoted value as the "
                                        r"number -36641; quote it \(log10 START:STOP:NUM"], "dampings"),
    "a convex grid too large to hold": ("convex:\n  lrs: '-3:0:1000000'\n",
                                        [r"config convex.lrs: sgd's grid would record 101,000,000 rows"], "lrs"),
    "log10 bounds beyond float64": ("convex:\n  dampings: '-400:0:3'\n",
                                    [r"config convex.dampings: 0.0 \(10\*\*-400\) must be a finite number > 0"],
                                    "dampings"),
}


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_bad_config_stops_before_any_job(repo_copy, tmp_path, name):
    text, messages, field = BAD_CONFIGS[name]
    overlay = tmp_path / "bad.yaml"
    overlay.write_text(text)
    # A real run, not a dry one; the check takes seconds, so a broken one fails on the timeout instead of
    # running the whole pipeline.
    done = snakemake(repo_copy, "--cores", "1", "--configfile", str(overlay), timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    for message in messages:
        assert re.search(message, output), output[-2000:]
    assert field in output
    assert "$defs" not in output and len(output.splitlines()) < 30, output  # the field, not the whole schema
    assert not result_files(repo_copy), "a job ran before the config was checked"


def test_a_reference_folder_that_is_not_there_is_said_and_an_empty_one_shows_none(repo_copy, tmp_path):
    """A misspelled `reference` is named on stderr (the report would otherwise lack its reference
    section without a word); the run goes on, as a copy of the workflow with no committed runs must."""
    overlay = tmp_path / "reference.yaml"
    for value, said in (("results/referenc", True), ("''", False), ("results/reference", False)):
        overlay.write_text(f"reference: {value}\n")
        done = snakemake(repo_copy, "-n", "--workflow-profile", "none", "--configfile", str(overlay))
        assert done.returncode == 0, done.stderr[-2000:]
        assert ("config reference: 'results/referenc' is not a folder here" in done.stderr) == said, value
        assert ("reference_cost" in done.stdout) == (value == "results/reference"), value


@pytest.mark.parametrize("grid, optimizer", [("dampings", "kfac"), ("lrs", "adam")])
def test_an_optimizer_without_a_tuning_grid_stops_before_any_job(tmp_path, grid, optimizer):
    """networks.lrs and .dampings per optimizer, edited in config.yaml itself (an overlay cannot take
    a key out): an optimizer with no lr grid (it would be left out of the networks without a word),
    or one that takes a damping with no damping grid, is named before any job."""
    import yaml

    root = copy_repository(tmp_path / "natgrad-bench")
    config = yaml.safe_load((root / "config" / "config.yaml").read_text())
    del config["networks"][grid][optimizer]
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    done = snakemake(root, "--cores", "1", timeout=60)
    assert done.returncode != 0
    assert f"config networks.{grid} has no list for {optimizer}" in done.stdout + done.stderr, done.stderr[-2000:]
    assert not result_files(root), "a job ran before the config was checked"


def test_a_download_that_fails_once_is_retried(tmp_path):
    """The data rule's `retries`: a mirror that answers 503 to the first request (a network hiccup)
    costs one retry, not the run. a1a is the one unpinned file, so a file the test writes with a1a's
    1605 examples may stand in for it (NATGRAD_ALLOW_UNPINNED=1)."""
    import http.server

    served = tmp_path / "mirror"
    (served / "libsvm").mkdir(parents=True)
    (served / "libsvm" / "a1a").write_text("".join(f"{(-1) ** i:+d} 3:1 {5 + i % 100}:1 123:1\n" for i in range(1605)))
    requests = []

    class FailsFirst(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            if len(requests) == 1:
                self.send_error(503, "busy")
            else:
                super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FailsFirst)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = copy_repository(tmp_path / "natgrad-bench")
    env = {**unactivated(), "NATGRAD_DATA": str(tmp_path / "cache"),
           "NATGRAD_DATA_MIRROR": f"http://127.0.0.1:{server.server_port}", "NATGRAD_ALLOW_UNPINNED": "1"}
    try:
        done = subprocess.run([str(BIN / "snakemake"), "--cores", "1", "--workflow-profile", "none",
                               "results/data/a1a.csv"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert requests == ["/libsvm/a1a", "/libsvm/a1a"]  # refused, then served
    assert "HTTP Error 503" in done.stderr and "Trying to restart job" in done.stderr  # the first attempt's failure
    loaded = pd.read_csv(root / "results/data/a1a.csv")
    assert loaded["examples"].sum() == 1605


SCHEMA_FIELDS = {  # overlay, the field the schema's error must point at (as jsonschema writes its path)
    "a device that is none": ("devices: [cpu, gpu]\n", "['devices'][1]", "'gpu' is not one of ['cpu', 'cuda']"),
    "devices neither auto nor a list": ("devices: cuda\n", "['devices']", "'auto' was expected"),
    "a misspelled nested key": ("networks:\n  eval_evry: 10\n", "['networks']"),  # nested objects are closed too
    "numpy on networks": ("networks:\n  frameworks: [numpy]\n", "['networks']['frameworks'][0]"),
    "no tuning seed": ("networks:\n  tuning_seeds: []\n", "['networks']['tuning_seeds']"),
    "a negative damping": ("networks:\n  dampings: [0.1, -0.01]\n", "['networks']['dampings'][1]"),
    "a negative damping of one optimizer": ("networks:\n  dampings: {ef: [0.1, -0.01]}\n",
                                            "['networks']['dampings']['ef'][1]"),
    "a damping grid for sgd": ("networks:\n  dampings: {sgd: [0.1]}\n", "['networks']['dampings']"),
    "grids of no step": ("convex:\n  steps: 0\n", "['convex']['steps']"),
    "a median of fewer than 3 samples": ("timing:\n  repeats: 2\n", "['timing']['repeats']"),
    "one width: no slope": ("timing:\n  scaling: {widths: [64]}\n", "['timing']['scaling']['widths']"),
}


@pytest.mark.parametrize("name", SCHEMA_FIELDS)
def test_schema_names_the_bad_field(name):
    """workflow/schemas/config.schema.yaml on config/config.yaml with a bad overlay (as the Snakefile's
    validate sees it): refused, and the error names the field."""
    import yaml
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import update_config, validate

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    validate(copy.deepcopy(config), str(REPO / "workflow/schemas/config.schema.yaml"))  # the default is valid
    text, field, *message = SCHEMA_FIELDS[name]
    update_config(config, yaml.safe_load(text))
    with pytest.raises(WorkflowError) as error:
        validate(config, str(REPO / "workflow/schemas/config.schema.yaml"))
    assert f"On instance{field}:" in str(error.value), str(error.value)[-800:]
    assert all(m in str(error.value) for m in message), str(error.value)[:800]  # and what is wrong with it


def test_the_schemas_names_are_the_librarys():
    """The schema lists the optimizers (and those with a damping), frameworks, devices, dtypes, tasks
    and timed settings by name (an enum names the allowed values in its error); each list is the
    library's, in its order, so that a name added there is taken here and one dropped there is
    refused before any job."""
    import yaml

    from natgrad_impls import names, timing
    from natgrad_impls.runner import accepted, is_convex
    from natgrad_impls.tasks import TASKS

    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    enums = {k: v.get("enum") for k, v in schema["$defs"].items()}
    assert enums["optimizer"] == [o.value for o in names.Optimizer]
    networks = schema["properties"]["networks"]["properties"]  # per-optimizer dampings and cosines: the damped ones
    damped = [o.value for o in names.Optimizer if "damping" in accepted(o)]
    assert networks["dampings"]["else"]["propertyNames"]["enum"] == damped
    assert networks["cos_ef_ngd"]["items"]["enum"] == damped
    assert enums["framework"] == [f.value for f in names.Framework]
    assert enums["device"] == [d.value for d in names.Device]
    assert sorted(enums["dtype"]) == sorted(d.value for d in names.DType)
    toys = ("vecfield", "misspec")  # (the toys' own section, config toys:, takes the figures by name)
    assert enums["convex_task"] == [t for t, task in TASKS.items() if is_convex(task) and t not in toys]
    assert enums["network_task"] == [t for t, task in TASKS.items() if not is_convex(task)]
    assert enums["timing_setting"] == list(timing.SETTINGS)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "ngd", "kfac"])
def test_the_schema_takes_the_fixed_hyperparameters_the_optimizers_take(optimizer):
    """The schema's `hyperparameters` ranges are hyperparameters.py's: a value at or past each end is
    refused by both or by neither, so that the pipeline neither stops on a setting a run takes nor
    starts jobs that will fail on one."""
    import yaml
    from jsonschema import Draft202012Validator

    from natgrad_impls.runner import accepted, make_hyperparameters

    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    fixed = schema["$defs"]["hyperparameters"]["additionalProperties"]["properties"]
    required = {name: 0.1 for name in ("lr", "damping") if name in accepted(optimizer)}
    for name in set(accepted(optimizer)) & set(fixed):
        for value in (-1, 0, 0.5, 1, 2, 1.5, "exact", "mc", True):
            in_schema = Draft202012Validator(fixed[name]).is_valid(value)
            drawn = {"fisher": "mc"} if name == "samples" else {}  # (samples > 1 only where labels are drawn)
            try:
                make_hyperparameters(optimizer, {**required, **drawn, name: value})
                taken = True
            except ValueError:
                taken = False
            assert in_schema == taken, f"{optimizer} {name}={value!r}: schema {in_schema}, optimizer {taken}"


def wait_for(condition, timeout, process):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.5)
    return False


def interrupt(process, log: list[str], tries: int = 5, patience_s: float = 10) -> None:
    """Ctrl-C to `process`'s group, pressed again while Snakemake has not heard it: Snakemake
    9.27's log handler swallows a KeyboardInterrupt that lands while it writes a line
    (snakemake/logging.py, `emit`), so a SIGINT sent when no job is running and the scheduler is
    logging (as just after a job finished, when the test's condition is met) would be lost and the
    run go on to its end. Heard: the process ends, or logs that it terminates."""
    for _ in range(tries):
        os.killpg(process.pid, signal.SIGINT)
        deadline = time.monotonic() + patience_s
        while process.poll() is None and time.monotonic() < deadline:
            if any("Terminating processes on user request" in line for line in list(log)):
                return
            time.sleep(0.2)
        if process.poll() is not None:
            return


def test_interrupt_presses_again_when_the_first_ctrl_c_is_lost():
    """`interrupt` against a process that swallows its first SIGINT, as Snakemake's log handler may."""
    script = ("import signal, sys, time\nheard = []\n"
              "def on_int(*_):\n    heard.append(1)\n    if len(heard) == 2:\n"
              "        print('Terminating processes on user request', flush=True)\n        sys.exit(1)\n"
              "signal.signal(signal.SIGINT, on_int)\nprint('ready', flush=True)\ntime.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    log = [process.stdout.readline()]
    reader = threading.Thread(target=lambda: log.extend(process.stdout), daemon=True)
    reader.start()
    try:
        interrupt(process, log, patience_s=1)
        assert process.wait(timeout=30) == 1
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(timeout=10)
    assert log == ["ready\n", "Terminating processes on user request\n"]


def finished_outputs(log: str, root: Path) -> set[Path]:
    """The outputs of the jobs that Snakemake's log reports finished ("Finished jobid: N"), from each
    job's block ("output: a, b" ... "jobid: N")."""
    outputs = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", log):
        listed, jobid = re.search(r"^\s+output: (.+)$", block, re.M), re.search(r"^\s+jobid: (\d+)$", block, re.M)
        if listed and jobid:
            outputs[jobid.group(1)] = {root / p.strip() for p in listed.group(1).split(",")}
    done = re.findall(r"^Finished jobid: (\d+)", log, re.M)
    return set().union(*(outputs.get(j, set()) for j in done))


def test_smoke_killed_and_resumed_writes_the_report(tmp_path):
    """Start the smoke pipeline, interrupt it as Ctrl-C does (SIGINT to its process group: Snakemake
    and the jobs it runs) once some jobs have finished; check that no partial result is left; run it
    again: it finishes, keeps every result of a job finished before the interrupt, and writes a report
    that names every figure. Not SIGTERM to Snakemake alone (`kill`): Snakemake 9.27's handler for it
    takes the scheduler's lock, a plain Lock, so a SIGTERM that lands while the scheduler holds it
    (picking jobs) hangs the process for good. CI saw it once: the output stopped at "Select jobs to
    execute...". SIGINT raises KeyboardInterrupt there instead, which leaves the lock."""
    root = copy_repository(tmp_path / "natgrad-bench")
    env = unactivated()  # (its grid jobs run `natgrad` all the same)
    command = [str(BIN / "snakemake"), "--cores", "2", "--configfile", "config/smoke.yaml"]
    # SIGINT at its default in Snakemake: a test run started in the background by a shell without job
    # control (`make test &` in a script) inherits it ignored, and every Ctrl-C would go unheard
    first = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log: list[str] = []  # read as it comes: a full pipe would stall Snakemake
    reader = threading.Thread(target=lambda: log.extend(first.stdout), daemon=True)
    reader.start()
    finished = lambda: len(list((root / "results").glob("tune/**/*.parquet"))) >= 2  # noqa: E731
    try:
        assert wait_for(finished, SMOKE_TIMEOUT_S, first), "the smoke pipeline ended before it could be killed"
        interrupt(first, log)
        first.wait(timeout=120)
        reader.join(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode != 0, "the pipeline finished before the kill:\n" + "".join(log)[-6000:]

    survivors = {path: path.stat().st_mtime_ns for path in result_files(root)}
    assert survivors and not (root / "results" / "report.html").exists()
    assert not [p for p in (root / "results").rglob("*.part")], "a partial file was left behind"
    for path in survivors:  # every file left is a whole result
        if path.suffix == ".parquet":
            assert len(pd.read_parquet(path)) > 0, path
    kept = {path: mtime for path, mtime in survivors.items() if path in finished_outputs("".join(log), root)}
    assert kept, "no job had finished before the interrupt"

    # what a SIGKILLed job left two hours ago goes; what another run is writing now stays
    abandoned, busy = root / "results" / "tune" / ".x.parquet.a1.part", root / "results" / "toys" / ".y.parquet.b2.part"
    for part in (abandoned, busy):
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_text("partial")
    os.utime(abandoned, (time.time() - 7200, time.time() - 7200))

    second = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for path, mtime in kept.items():  # a job cut short runs again; a finished one's results stay
        assert path.stat().st_mtime_ns == mtime, f"{path} was recomputed"
    assert [p for p in (root / "results").rglob("*.part")] == [busy]

    report = root / "results" / "report.html"
    assert report.exists()
    html = report.read_text(errors="replace")
    figures = sorted(p.stem for p in (root / "results" / "figures").glob("*.png"))
    assert len(figures) >= 12, figures
    for name in figures:
        assert f"{name}.png" in html, f"the report does not name {name}"
        assert (root / "results" / "figures" / f"{name}.pdf").stat().st_size > 0
        caption = (root / "results" / "figures" / f"{name}.rst").read_text()
        assert caption.strip() and rst_problems(caption) == [], name  # this run's notes render too
    assert "appendix-logit-clip" in figures
    for table in ("summary", "environment", "best-convex", "best-networks", "logit-clip"):
        assert f"{table}.html" in html  # shown in the report; the data beside it
        assert len(pd.read_csv(root / "results" / "tables" / f"{table}.csv")) > 0
    # the sections, numbered in reading order (the report sorts them by name), tables beside their
    # figures; each item numbered in its section
    sections = set(re.findall(r'"(\d\. [^"]+)": \{', html))
    assert {"0. At a glance", "1. Kunstner et al. (2019)", "2. Networks", "3. Cost", "5. Appendix",
            "6. Environment"} <= sections
    assert "6. Tables" not in sections
    for item in ("1. summary", "1. fig1-vecfield", "4. best-convex", "1. networks-loss", "4. best-networks",
                 "1. environment"):
        assert f'"item": "{item}"' in html, item
    assert list((root / "results" / "logs").rglob("*.log")), "no job logs"
    costs = list((root / "results").glob("cost/*/*.csv")) + list((root / "results").glob("scaling/*.csv"))
    assert costs and all(set(pd.read_csv(p)["machine"]) == {timing.cpu_model()} for p in costs)  # which node timed it
