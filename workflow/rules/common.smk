# Shared by the rules: the names (DESIGN 3, 6), the devices, the tuning grid and the targets.
import collections
import functools
import glob
import os
import sys

from natgrad_impls.names import Device, Framework, Likelihood, Optimizer
from natgrad_impls.tasks import TASKS

RESULTS = "results"
ENVIRONMENT = "../../environment.yml"  # every rule: one pinned environment (relative to the rule files)
LOGS = f"{RESULTS}/logs"


wildcard_constraints:
    task="|".join(TASKS),
    optimizer="|".join(o.value for o in Optimizer),
    framework="|".join(f.value for f in Framework),
    device="|".join(d.value for d in Device),


def remove_stale_temporaries():
    """Result files are written as hidden `.NAME.*.part` files and renamed into place; a job killed
    hard (SIGKILL, a lost node) leaves its temporary behind. Never read as a result, it is removed
    when the workflow starts again, once it is an hour old: Snakemake locks only the outputs a run
    makes, so another run on other targets may be writing a younger one right now."""
    from natgrad_impls.results import STALE_WRITE_AGE_S, remove_stale_temporaries

    remove_stale_temporaries(RESULTS, STALE_WRITE_AGE_S, recursive=True)  # in the jobs' .*.runs/ too


def jax_allocates_on_demand():
    """jax takes 75% of a GPU's memory when its GPU client starts, in every process that imports it
    on a machine with a GPU, a cpu job's too: beside one another, jobs would starve the cuda job of
    the memory it needs. On demand instead (a setting of the environment wins); no effect without a
    GPU."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def finds_its_own_tools(search="PATH"):
    """Shell jobs (`natgrad grid`) find the console scripts installed beside the Python that runs
    Snakemake, not whatever an unactivated shell has first on its PATH (`.venv/bin/snakemake` run
    directly: "natgrad: command not found"). Under `--sdm conda` a job's environment puts its own
    bin/ first still. (PATH is not a setting of the workflow: no `envvars` for the linter.)"""
    own, folders = os.path.dirname(sys.executable), os.environ.get(search, "")
    if folders.split(os.pathsep)[0] != own:
        os.environ[search] = os.pathsep.join([own, folders]) if folders else own


def share_jax_compilations(directory=".cache/jax"):
    """One persistent jax compilation cache for every job (a setting of the environment wins). A jax
    run compiles its step, batching and evaluation programs, most of its time in a tuning or
    training job on the CPU (mnist1d-mlp kfac: 5 s of compiling for 0.5 s of 400 steps); the runs
    of one job share them in memory (natgrad_impls.jax.optimizers), and a program another job
    already compiled, such as the best setting's in train after tune, is read back instead of
    compiled. A size limit turns on jax's file lock, so that parallel jobs never read an entry
    while it is being written."""
    defaults = {
        "JAX_COMPILATION_CACHE_DIR": os.path.abspath(directory),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "JAX_COMPILATION_CACHE_MAX_SIZE": str(4 * 2**30),
    }
    for name, value in defaults.items():
        os.environ.setdefault(name, value)


# The package's modules that only draw: no computed result depends on them (`computed_by`).
DRAWING_MODULES = ("figures/__init__.py", "figures/cost.py", "figures/networks.py", "figures/paper.py",
                   "figures/style.py")


def computed_by():
    """What the computing rules' results are computed by (runner.code_version, short), a param of
    each: Snakemake reruns a job when its rule or script changes, not the library the script
    imports, so a fix to natgrad_impls would have left the report's numbers as they were. The
    drawing modules are left out: editing a figure redraws the figures (`drawn_by`), nothing else."""
    from natgrad_impls.runner import code_version

    return code_version(leave_out=DRAWING_MODULES)[:16]


def drawn_by():
    """`computed_by` for the figure and table rules: the whole package."""
    from natgrad_impls.runner import code_version

    return code_version()[:16]


def fields(section: dict, *names):
    """The fields `names` of a config section, a job's param where it reads those alone: the whole
    section would rerun it for a change it never reads (every tuning job for new rerun seeds)."""
    return {name: section[name] for name in names}


def network_protocol():
    """What a tune or train job reads of `networks` (train.py)."""
    return fields(config["networks"], "dtype", "steps", "eval_every")


@functools.cache
def devices_for(framework):
    """numpy: cpu. torch and jax: the configured list, or with `devices: auto` cpu, plus cuda where
    that framework sees a GPU (jax needs its CUDA plugin, `make setup GPU=cuda12`)."""
    if framework == "numpy":
        return ("cpu",)
    if config["devices"] != "auto":
        return tuple(config["devices"])
    return ("cpu", "cuda") if sees_gpu(framework) else ("cpu",)


@functools.cache
def sees_gpu(framework):
    import subprocess
    import sys

    import torch

    if not torch.cuda.is_available():
        return False  # no GPU at all: nothing to ask jax
    if framework == "torch":
        return True
    # jax is asked in a child process: in this one it would start its GPU client, which takes most
    # of the GPU's memory for as long as the workflow runs, away from the jobs
    ask = "import jax; print(jax.default_backend())"
    done = subprocess.run([sys.executable, "-c", ask], capture_output=True, text=True,
                          env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    if done.stdout.strip() != "gpu":
        print("devices: auto: torch sees a GPU but jax does not (its CUDA plugin is missing: `make setup "
              "GPU=cuda12`); jax runs on cpu only", file=sys.stderr)
        return False
    return True


def data_inputs(wildcards):
    """The data job of a download task (fetch and verify first); nothing for offline tasks."""
    return [] if TASKS[wildcards.task].offline else [f"{RESULTS}/data/{wildcards.task}.csv"]


def gpu_resources(wildcards):
    return 1 if wildcards.device == "cuda" else 0


def checkpoints_beside(wildcards, output):
    """A job's hidden folder of finished pieces (runner.run_many's runs, grid.run_grid's optimizers),
    kept until its table (its first output) is written, beside that table: results/grid/wine/.numpy-cpu.runs/."""
    from pathlib import Path

    table = Path(output[0])
    return str(table.with_name(f".{table.stem}.runs"))


def single_threaded(threads):
    """`export ...;` that keeps a shell job's torch, BLAS and XLA to `threads` cores (parallel jobs
    on a small machine must not oversubscribe it)."""
    from natgrad_impls.runner import thread_environment

    return "export " + " ".join(f"{k}='{v}'" for k, v in thread_environment(threads).items()) + ";"


def hyperparameter_options(values):
    """{name: value} as command-line options, e.g. --kfac-update-period 10."""
    return " ".join(f"--{name.replace('_', '-')} {value}" for name, value in values.items())


def fixed_hyperparameters(section, optimizer):
    return dict(config[section].get("hyperparameters", {}).get(optimizer, {}))


# -- the network tuning grid: lr (and damping for ef, ngd, kfac) per optimizer ----------------------
def tuning_runs(optimizer):
    """The settings of `optimizer`'s tuning grid, with its fixed hyperparameters, as dicts."""
    fixed = fixed_hyperparameters("networks", optimizer)
    lrs = config["networks"]["lrs"].get(optimizer, [])
    if not takes_damping(optimizer):
        return [{**fixed, "lr": lr} for lr in lrs]
    return [{**fixed, "lr": lr, "damping": damping} for lr in lrs for damping in tuning_dampings(optimizer)]


def takes_damping(optimizer):
    from natgrad_impls.runner import accepted

    return "damping" in accepted(optimizer)


def tuning_dampings(optimizer):
    """networks.dampings for `optimizer`: one list for every optimizer that takes a damping, or one
    list per optimizer (EF's best damping lies far from K-FAC's); None where the mapping has none."""
    dampings = config["networks"]["dampings"]
    return dampings.get(optimizer) if isinstance(dampings, dict) else dampings


def check_tuning_grids():
    """Every optimizer has an lr grid where networks run (one left out of networks.lrs would be left
    out of the networks without a word), and every one that takes a damping a damping grid."""
    if not config["networks"]["tasks"]:
        return
    missing = [o for o in config["optimizers"] if not config["networks"]["lrs"].get(o)]
    if missing:
        raise ValueError(f"config networks.lrs has no list for {', '.join(missing)}: give each optimizer of "
                         "`optimizers` its tuning lrs")
    missing = [o for o in config["optimizers"] if takes_damping(o) and not tuning_dampings(o)]
    if missing:
        raise ValueError(f"config networks.dampings has no list for {', '.join(missing)}: give each optimizer that "
                         "takes a damping its list, or one list for all of them")


def check_rerun_seeds_are_fresh():
    """A setting picked on a seed and scored on it again is scored in its own favour: the reruns
    (networks.seeds) must not repeat a tuning seed. (A JSON schema cannot relate two fields.)"""
    n = config["networks"]
    shared = sorted(set(n["tuning_seeds"]) & set(n["seeds"]))
    if shared:
        raise ValueError(f"config networks.seeds repeats networks.tuning_seeds {shared}: rerun the best setting on "
                         "seeds it was not tuned on")


check_rerun_seeds_are_fresh()


def check_devices_are_listed_for_other_machines():
    """`devices: auto` asks the machine Snakemake runs on for a GPU; under a cluster executor every
    job parses the workflow again on its own node, and a CPU node's plan (no cuda jobs) differs from
    the one submitted from a GPU node, or the other way round. (At `onstart`: the executor is not
    known while the workflow is parsed.)"""
    if config["devices"] == "auto" and not workflow.local_exec:
        raise ValueError("config devices: auto asks this machine for a GPU, but the jobs run on other nodes: "
                         "list the devices, e.g. --config 'devices=[cpu,cuda]' (config/gpu.yaml does)")


def check_reference_folder():
    """A misspelled `reference` would leave the report's reference section out without a word. A
    warning, not an error: a copy of the workflow run elsewhere may have no committed runs to show."""
    folder = config["reference"]
    if folder and not os.path.isdir(folder):
        print(f"config reference: {folder!r} is not a folder here, so the report shows no reference runs (the "
              "committed runs shown beside this one, results/reference by default; empty for none)", file=sys.stderr)


check_reference_folder()


def check_grid_hyperparameters_agree():
    """One `natgrad grid` gives a hyperparameter one value, to every optimizer of the grid that has
    it (fisher and samples: ngd and kfac), so convex.hyperparameters must give those optimizers the
    same value, or ngd's would silently become kfac's (or the reverse)."""
    from natgrad_impls.runner import accepted

    given = config["convex"].get("hyperparameters", {})
    for name in sorted({name for values in given.values() for name in values}):
        takers = [o for o in config["optimizers"] if name in accepted(o)]
        values = {o: given.get(o, {}).get(name, "its default") for o in takers}
        if len({repr(v) for v in values.values()}) > 1:
            said = ", ".join(f"{v!r} for {o}" if v != "its default" else f"{v} for {o}" for o, v in values.items())
            raise ValueError(f"config convex.hyperparameters: {name} is {said}; one natgrad grid gives every "
                             f"optimizer that has {name} the same value: set it alike for {', '.join(takers)}")


def check_fixed_hyperparameters():
    """Each optimizer's fixed hyperparameters (convex. and networks.hyperparameters) as its runs will
    check them, before any job: a name it does not have (sgd: {b1: ..}) or a value it refuses
    (momentum 1) would otherwise fail a job later, or, in one `natgrad grid` for every optimizer,
    reach another optimizer that has the name."""
    from natgrad_impls.runner import accepted, make_hyperparameters

    for section in ("convex", "networks"):
        for optimizer, values in config[section].get("hyperparameters", {}).items():
            placeholders = {name: 1.0 for name in ("lr", "damping") if name in accepted(optimizer)}
            try:
                make_hyperparameters(optimizer, {**placeholders, **values})
            except ValueError as error:
                raise ValueError(f"config {section}.hyperparameters.{optimizer}: {error}") from None


def check_grid_bounds():
    """convex.lrs and .dampings as `natgrad grid` will read them (both ends finite and > 0 in
    float64: "-400:0:3" matches the schema's pattern but starts at 0; a grid small enough to hold),
    before any job."""
    from natgrad_impls.grid import check_bounds

    c = config["convex"]
    try:
        check_bounds([Optimizer(o) for o in config["optimizers"]], c["lrs"], c["dampings"], c["steps"])
    except ValueError as error:
        raise ValueError(f"config convex.{error}") from None


check_fixed_hyperparameters()
check_grid_bounds()
check_grid_hyperparameters_agree()
check_tuning_grids()


def network_runs(stage="train"):
    """The runs of every network task, optimizer, framework and device: the reruns of the best
    settings (stage train) or the tuning grids (stage tune)."""
    n = config["networks"]
    return [f"{RESULTS}/{stage}/{task}/{optimizer}/{framework}-{device}.parquet"
            for task in n["tasks"] for optimizer in config["optimizers"] for framework in n["frameworks"]
            for device in devices_for(framework)]


def grid_files():
    c = config["convex"]
    return [f"{RESULTS}/grid/{task}/{framework}-{device}.parquet"
            for task in c["tasks"] for framework in c["frameworks"] for device in devices_for(framework)]


def cost_files():
    t = config["timing"]
    return [f"{RESULTS}/cost/{task}/{framework}-{device}.csv"
            for task in t["tasks"] for framework in t["frameworks"] for device in devices_for(framework)]


def scaling_files():
    s = config["timing"]["scaling"]
    if not s["settings"]:
        return []
    return [f"{RESULTS}/scaling/{framework}-{device}.csv" for framework in s["frameworks"]
            for device in devices_for(framework)]


def logit_clip_files():
    """The numpy grids of the convex Bernoulli tasks with the paper code's clipped logits (the default
    grid) and with the exact likelihood, where convex.compare_logit_clip asks for the comparison and
    convex.frameworks has numpy (a config without it runs no numpy grid)."""
    c = config["convex"]
    if not c["compare_logit_clip"] or "numpy" not in c["frameworks"]:
        return []
    tasks = [t for t in c["tasks"] if TASKS[t].problem.likelihood == Likelihood.BERNOULLI]
    return [f"{RESULTS}/grid/{task}/numpy-cpu{suffix}.parquet" for task in tasks for suffix in ("", "-logit_clip-none")]


def reference_files(pattern):
    """Committed tables of earlier runs (config `reference`; none where it is empty), shown beside this run's."""
    return sorted(glob.glob(os.path.join(config["reference"], pattern))) if config["reference"] else []


# -- per stage ------------------------------------------------------------------------------------
def grid_options(wildcards):
    c = config["convex"]
    fixed = {}
    for optimizer in config["optimizers"]:
        fixed.update(fixed_hyperparameters("convex", optimizer))
    return (f"--lrs={c['lrs']} --dampings={c['dampings']} --steps {c['steps']} --repeats {c['repeats']} "
            + hyperparameter_options(fixed))


def toy_inputs(wildcards):
    """The starting-point figure reuses the numpy wine grid where the config has one."""
    wine = f"{RESULTS}/grid/wine/numpy-cpu.parquet"
    if wildcards.toy == "starting_point" and wine in grid_files():
        return [wine]
    return []


MAIN_CONVEX_TASKS = ("breastcancer", "wine")  # figure 3 of the paper; the appendix figure has all


def numpy_grids(tasks):
    return [f"{RESULTS}/grid/{task}/numpy-cpu.parquet" for task in tasks]


def cos_files(tasks):
    """The EF/NGD cosine along each task's best EF run, where the grid has EF runs."""
    return [f"{RESULTS}/grid/{task}/cos.parquet" for task in tasks] if "ef" in config["optimizers"] else []


# The report's sections, in reading order (the report sorts them by name): every task at a glance,
# the paper's figures, the networks, cost, the committed reference runs, then the appendix and the
# environment.
SECTION = {"summary": "0. At a glance", "kunstner": "1. Kunstner et al. (2019)", "networks": "2. Networks",
           "cost": "3. Cost", "reference": "4. Reference runs", "appendix": "5. Appendix",
           "environment": "6. Environment"}


def figures():
    """{figure: (report section, inputs)} for this configuration, in reading order."""
    c, n, t = config["convex"], config["networks"], config["timing"]
    toys, out = config["toys"], {}
    if "vecfield" in toys:
        out["fig1-vecfield"] = (SECTION["kunstner"], [f"{RESULTS}/toys/vecfield.parquet"])
    if "misspec" in toys:
        out["fig2-misspecification"] = (SECTION["kunstner"], [f"{RESULTS}/toys/misspec.parquet"])
        out["appendix-misspecification-linear"] = (SECTION["appendix"], [f"{RESULTS}/toys/misspec.parquet"])
    if "numpy" in c["frameworks"] and c["tasks"]:
        main = [task for task in c["tasks"] if task in MAIN_CONVEX_TASKS] or c["tasks"][:2]
        out["fig3-optimisation"] = (SECTION["kunstner"], numpy_grids(main) + cos_files(main))
        if set(c["tasks"]) - set(main):
            out["appendix-optimisation-all-tasks"] = (SECTION["appendix"],
                                                      numpy_grids(c["tasks"]) + cos_files(c["tasks"]))
    if "starting_point" in toys:
        out["appendix-starting-point"] = (SECTION["appendix"], [f"{RESULTS}/toys/starting_point.parquet"])
    if logit_clip_files():
        out["appendix-logit-clip"] = (SECTION["appendix"], logit_clip_files())
    if n["tasks"] and config["optimizers"]:
        for name in ("networks-loss", "networks-accuracy"):
            out[name] = (SECTION["networks"], network_runs())
        if set(n.get("cos_ef_ngd", [])) & set(config["optimizers"]):
            out["networks-cosine"] = (SECTION["networks"], network_runs())
    if cost_files() and t["settings"]:
        out["cost-steps"] = (SECTION["cost"], cost_files())
        out["cost-devices"] = (SECTION["cost"], cost_files())
    if scaling_files():
        out["cost-scaling"] = (SECTION["cost"], scaling_files())
    if reference_files("*.csv"):
        out["reference-cost"] = (SECTION["reference"], reference_files("*.csv"))
        out["reference-devices"] = (SECTION["reference"], reference_files("*.csv"))
    return out


def tables():
    """{table: (report section, {name: input files})}, each beside the figures it goes with: best
    hyperparameters of the grids and of the tuned networks (with their tuning grids, for where the
    chosen setting lies in them), the logit-clip comparison, the environment; first, the summary of
    the best-hyperparameters tables, with the step costs of the tasks timed."""
    out = {}
    if grid_files():
        out["best-convex"] = (SECTION["kunstner"], {"runs": grid_files()})
    if config["networks"]["tasks"] and config["optimizers"]:
        out["best-networks"] = (SECTION["networks"], {"runs": network_runs(), "tuning": network_runs("tune")})
    best = [f"{RESULTS}/tables/{name}.csv" for name in ("best-convex", "best-networks") if name in out]
    if best:
        cost = cost_files() if config["timing"]["settings"] else []
        out = {"summary": (SECTION["summary"], {"best": best, "cost": cost}), **out}
    if logit_clip_files():
        out["logit-clip"] = (SECTION["appendix"], {"runs": logit_clip_files()})
    out["environment"] = (SECTION["environment"], {})
    return out


def report_labels():
    """{figure or table: its report label}: its number within its section in reading order (figures
    first, then tables), by which the report sorts a section, and its name."""
    labels, counts = {}, collections.Counter()
    for name, (section, _) in [*figures().items(), *tables().items()]:
        counts[section] += 1
        labels[name] = {"item": f"{counts[section]}. {name}"}
    return labels
