"""The task registry: names, shapes, dtypes, the Kunstner conventions, seeding, and the download
tasks both offline (a clear DataUnavailable) and on small stand-in files with matching checksums."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import pickle
import struct
import subprocess
import sys
import tarfile
import urllib.request
import zipfile

import numpy as np
import pytest

from natgrad_impls import data, models
from natgrad_impls.data import DataUnavailable
from natgrad_impls.tasks import MISSPEC_VARIANTS, TASKS, get_task, misspec_sets

DESIGN_NAMES = [
    "wine", "breastcancer", "a1a", "energy", "powerplant", "yacht", "vecfield", "misspec",
    "digits-mlp", "mnist1d-mlp", "mnist-mlp", "fashionmnist-cnn", "cifar10-cnn", "mnist-autoencoder",
]
KUNSTNER = ["wine", "breastcancer", "a1a", "energy", "powerplant", "yacht"]
OFFLINE = [name for name, task in TASKS.items() if task.offline]
DOWNLOAD = [name for name, task in TASKS.items() if not task.offline]


def test_registry_has_exactly_the_design_names():
    assert list(TASKS) == DESIGN_NAMES
    assert DOWNLOAD == ["a1a", "energy", "powerplant", "yacht", "mnist-mlp", "fashionmnist-cnn", "cifar10-cnn",
                        "mnist-autoencoder"]
    assert all(get_task(name) is TASKS[name] for name in TASKS)


def test_unknown_task_names_the_field_and_the_allowed_values():
    with pytest.raises(ValueError) as error:
        get_task("mnist")
    assert str(error.value) == f"task: 'mnist' is not one of {', '.join(DESIGN_NAMES)}"


def check_dataset(task, dataset):
    """Shapes and dtypes of DESIGN 6 / the tasks module docstring, for any task."""
    problem, (X, y) = task.problem, dataset.train
    assert X.dtype == np.float64 and X.flags.c_contiguous and np.isfinite(X).all()
    assert X.shape[1:] == problem.model.input_shape
    outputs = list(problem.model.output_shapes().values())[-1][0]
    if problem.likelihood == "categorical":
        assert y.shape == (len(X),) and y.dtype == np.int64
        assert 0 <= y.min() and y.max() < outputs
    else:
        assert y.shape == (len(X), outputs) and y.dtype == np.float64
    if problem.likelihood == "bernoulli":
        assert ((0 <= y) & (y <= 1)).all()
    if dataset.test is not None:
        assert dataset.test.X.shape[1:] == X.shape[1:] and dataset.test.y.shape[1:] == y.shape[1:]
        assert dataset.test.y.dtype == y.dtype
    return X, y


@pytest.mark.parametrize("name", ["breastcancer", "digits-mlp"])
def test_load_gives_floating_arrays_in_the_dtype_asked_and_class_indices_as_int64(name):
    """float32 runs read their data in float32 (labels of a Bernoulli task are floats too); class
    indices stay int64 whatever the dtype."""
    for split in filter(None, TASKS[name].load(dtype=np.float32)):  # (breastcancer: no test split)
        assert split.X.dtype == np.float32
        assert split.y.dtype == (np.int64 if name == "digits-mlp" else np.float32)


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_tasks_load(name):
    task = TASKS[name]
    dataset = task.load(seed=0)
    X, _ = check_dataset(task, dataset)
    assert len(X) == task.n_train
    assert (dataset.test is None) == (name in KUNSTNER + ["vecfield", "misspec"])
    if task.batch_size is not None:
        assert task.batch_size < task.n_train


@pytest.mark.parametrize("labels, message", [([0, 3, 1], "labels from 0 to 3, not class indices 0 to 2"),
                                             ([0, -1, 2], "labels from -1 to 2")])
def test_a_categorical_task_with_labels_outside_its_classes_is_refused_at_load(labels, message):
    """A label of no class (a custom loader's 1-based labels, say): torch's step would stop at an
    index error and jax's give a NaN loss, or a wrong finite one; load names the split instead."""
    from natgrad_impls.tasks import Dataset, Split, Task

    problem = models.Problem(models.mlp((2, 4, 3), "tanh"), "categorical")
    good = Split(np.zeros((3, 2)), np.array([0, 1, 2]))
    bad = Split(np.zeros((3, 2)), np.array(labels))
    for train, test, split in ((bad, None, "train"), (good, bad, "test")):
        task = Task("three-classes", problem, True, "test", 3, None, 10, lambda seed: Dataset(train, test))
        with pytest.raises(ValueError, match=f"^three-classes {split}: {message}"):
            task.load()
    Task("three-classes", problem, True, "test", 3, None, 10, lambda seed: Dataset(good, good)).load()


@pytest.mark.parametrize("name", OFFLINE)
def test_same_seed_same_data(name):
    first, second = TASKS[name].load(seed=3), TASKS[name].load(seed=3)
    np.testing.assert_array_equal(first.train.X, second.train.X)
    np.testing.assert_array_equal(first.train.y, second.train.y)
    generated = name in ("vecfield", "misspec")
    assert generated != np.array_equal(first.train.X, TASKS[name].load(seed=4).train.X)


def test_kunstner_tasks_use_raw_features_with_ones_last():
    from sklearn.datasets import load_breast_cancer, load_wine

    for name, loader in [("wine", load_wine), ("breastcancer", load_breast_cancer)]:
        task = TASKS[name]
        (X, y), test = task.load()
        raw, labels = loader(return_X_y=True)
        np.testing.assert_array_equal(X[:, :-1], raw)  # no standardisation
        np.testing.assert_array_equal(X[:, -1], 1.0)
        np.testing.assert_array_equal(y[:, 0], labels)  # wine: the class label as a real number
        assert test is None and task.batch_size is None and task.steps == 100
    for name in KUNSTNER:
        task = TASKS[name]
        assert task.problem.model == models.linear(task.problem.model.input_shape[0], 1, bias=False)
        assert task.problem.l2 == 0.0


def test_logit_clipping_is_the_default_and_a_switch():
    for name in ["breastcancer", "a1a", "misspec"]:
        assert TASKS[name].problem.logit_clip == models.KUNSTNER_LOGIT_CLIP
        exact = TASKS[name].with_logit_clip("none")
        assert exact.problem.logit_clip is None and exact.name == name
        assert exact.with_logit_clip("paper") == TASKS[name]
    assert TASKS["wine"].problem.logit_clip is None and TASKS["mnist-autoencoder"].problem.logit_clip is None
    assert TASKS["mnist-autoencoder"].with_logit_clip("paper").problem.logit_clip == models.KUNSTNER_LOGIT_CLIP
    assert TASKS["wine"].with_logit_clip("none") == TASKS["wine"]
    with pytest.raises(ValueError, match="logit_clip: 'paper' clips a bernoulli likelihood; task 'wine'"):
        TASKS["wine"].with_logit_clip("paper")


def test_vecfield():
    task = TASKS["vecfield"]
    (X, y), _ = task.load(seed=0)
    assert X.shape == (1000, 2)
    np.testing.assert_array_equal(X[:, 0], 1.0)  # bias FIRST here
    assert (X[:, 1] > 0).all()  # lognormal
    assert task.problem.l2 == pytest.approx(1 / (0.1 * 1000))
    theta = np.linalg.lstsq(X, y[:, 0], rcond=None)[0]
    np.testing.assert_allclose(theta, [2.0, 2.0], atol=0.25)


def test_misspec_variants():
    sets = misspec_sets(seed=0)
    assert list(sets) == list(MISSPEC_VARIANTS) and len(sets) == 6
    assert TASKS["misspec"].variant == "logistic-correct"
    for variant, (task, dataset) in sets.items():
        assert task.name == "misspec" and task.variant == variant
        X, y = check_dataset(task, dataset)
        assert X.shape == (1000, 2)
        if variant.startswith("logistic"):
            assert task.problem.likelihood == "bernoulli" and task.problem.l2 == 0.0
            assert not (X == 1.0).all(axis=0).any()  # no bias column
            assert y.sum() == 500
        else:
            assert task.problem.likelihood == "gaussian"
            assert task.problem.l2 == pytest.approx(1 / (0.1 * 1000))
            np.testing.assert_array_equal(X[:, 1], 1.0)
    assert get_task("misspec", "linear-correct").variant == "linear-correct"
    with pytest.raises(ValueError, match="variant: 'nope' is not one of logistic-correct"):
        get_task("misspec", "nope")
    with pytest.raises(ValueError, match="variant"):
        get_task("wine", "linear-correct")
    for name in ("wine", "misspec"):  # `--variant ""` is a slip, not the default variant
        with pytest.raises(ValueError, match="^variant: "):
            get_task(name, "")


# The paper code's toy sets (Kunstner et al., libs/eftk/eftk/toydata.py), as it draws them after
# np.random.seed(0): the logistic ones as (mean, A) per class, x = mean + randn(N/2, 2) @ A.
PAPER_LOGISTIC = {
    "logistic-correct": (((1, 1), np.eye(2) * 2), ((-1, -1), np.eye(2) * 2)),  # wellspecified_logreg
    "logistic-misspecified-a": (((1.5, 1.5), np.eye(2) * 3), ((-1.5, -1.5), np.eye(2))),  # missnoise_logreg
    "logistic-misspecified-b": (((1, 1), np.array([[1, -0.6], [-0.6, 1]]) * 1.5),  # misspecified_logreg
                                ((-1, -1), np.array([[1, 0.6], [0.6, 1]]) * 1.5)),
}


def paper_toy(name: str, n: int = 1000):
    """(X, y) of the paper code's generator for `name` after np.random.seed(0) (legacy stream)."""
    rng = np.random.RandomState(0)
    if name == "vecfield":  # gradient_field_problem
        X = np.hstack([np.ones((n, 1)), rng.lognormal(0, 0.75, (n, 1))])
        return X, X @ np.array([[2], [2]]) + rng.randn(n, 1)
    if name.startswith("linear"):  # correct_, missspecified_noise_, missspecified_model_linearRegression2
        X = np.concatenate([rng.randn(n, 1), np.ones((n, 1))], axis=1)
        y = X @ np.array([[1], [1]])
        if name == "linear-misspecified-b":
            return X, y + 0.5 * X[:, 0].reshape((-1, 1)) ** 2 + rng.randn(n, 1)
        return X, y + (2 if name == "linear-misspecified-a" else 1) * rng.randn(n, 1)
    X = np.vstack([np.array(mean) + rng.randn(n // 2, 2) @ a for mean, a in PAPER_LOGISTIC[name]])
    return X, np.vstack([np.zeros((n // 2, 1)), np.ones((n // 2, 1))])


@pytest.mark.parametrize("name", ["vecfield", *MISSPEC_VARIANTS])
def test_toys_are_the_paper_codes_data(name):
    """DESIGN 6 and the tasks docstring: seed 0 gives the toy data of Kunstner et al.'s code. The
    registry's shapes and the least-squares fit alone let a wrong lognormal spread, noise scale,
    class covariance, label order or misspecification term through (or its terms added in another
    order: 1 ulp)."""
    task = get_task("vecfield") if name == "vecfield" else get_task("misspec", name)
    (X, y), _ = task.load(seed=0)
    theirs_X, theirs_y = paper_toy(name)
    np.testing.assert_array_equal(X, theirs_X)
    np.testing.assert_array_equal(y, theirs_y)


def test_a_variant_keeps_the_logit_clip_chosen_before():
    """with_logit_clip then with_variant: the exact likelihood stays exact on another logistic variant,
    and the paper's clip stays the default."""
    exact = get_task("misspec", "logistic-correct").with_logit_clip("none")
    assert exact.with_variant("logistic-misspecified-a").problem.logit_clip is None
    clipped = get_task("misspec", "logistic-correct").with_variant("logistic-misspecified-b").problem.logit_clip
    assert clipped == models.KUNSTNER_LOGIT_CLIP
    assert exact.with_variant("linear-correct").problem.logit_clip is None  # gaussian: nothing to clip


def test_fashionmnist_cnn_is_deepobs_2c2d():
    """DeepOBS fmnist_2c2d: 5x5 'same' convolutions of 32 and 64 channels, each followed by a 2x2
    max-pool (28 -> 14 -> 7), then dense 1024 and 10. The model is only built offline (its data is a
    download), so its shapes and size are checked here, from the architecture alone."""
    model = TASKS["fashionmnist-cnn"].problem.model
    assert list(model.output_shapes().values()) == [(32, 28, 28), (64, 14, 14), (1024,), (10,)]
    assert model.num_params() == (5 * 5 * 1 * 32 + 32) + (5 * 5 * 32 * 64 + 64) + (7 * 7 * 64 * 1024 + 1024) + (
        1024 * 10 + 10)


def test_networks():
    assert TASKS["digits-mlp"].problem.model.input_shape == (64,)
    assert TASKS["mnist1d-mlp"].problem.model == models.mlp((40, 100, 100, 10), "relu")
    for name in ["digits-mlp", "mnist1d-mlp", "mnist-mlp", "fashionmnist-cnn", "cifar10-cnn"]:
        assert TASKS[name].classes == 10 and TASKS[name].batch_size == 128
    assert TASKS["breastcancer"].classes == 2 and TASKS["wine"].classes is None
    assert TASKS["mnist-autoencoder"].classes is None  # 784 Bernoulli pixels are no classes
    cifar = TASKS["cifar10-cnn"].problem.model
    assert cifar.input_shape == (3, 32, 32)
    assert [s for s in cifar.output_shapes().values()][:3] == [(64, 28, 28), (96, 12, 12), (128, 6, 6)]
    assert TASKS["mnist-autoencoder"].problem.model.param_shapes()["dense13.weight"] == (784, 1000)


def test_mnist1d_generator_leaves_global_random_state_alone():
    """make_dataset seeds NumPy's and Python's global generators; generating the data (which the
    task does once per mnist1d version, then reads it from the data cache) must not."""
    import random

    from natgrad_impls import tasks

    np.random.seed(123), random.seed(123)
    expected = np.random.rand(), random.random()
    np.random.seed(123), random.seed(123)
    tasks._make_mnist1d()
    assert (np.random.rand(), random.random()) == expected


# offline data sets kept in the data cache (tasks._packaged): task -> the function that makes them,
# and the shapes of X (train, test)
PACKAGED = {"wine": ("_scikit_learn_set", [(178, 14)]), "breastcancer": ("_scikit_learn_set", [(569, 31)]),
            "digits-mlp": ("_make_digits", [(1437, 64), (360, 64)]),
            "mnist1d-mlp": ("_make_mnist1d", [(4000, 40), (1000, 40)])}


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_sets_are_read_back_from_the_data_cache_as_made(name, tmp_path, monkeypatch):
    from natgrad_impls import tasks

    monkeypatch.setenv("NATGRAD_DATA", str(tmp_path))
    made = TASKS[name].load()
    (stored,) = (tmp_path / "generated").glob("*.npz")
    maker, shapes = PACKAGED[name]
    real = data.generated  # a changed maker names another file: make the stored one the only way
    monkeypatch.setattr(data, "generated", lambda key, make: real(key, lambda: pytest.fail("made again, not read")))
    read = TASKS[name].load()
    assert stored.stat().st_size > 0
    assert [split.X.shape for split in (read.train, read.test) if split is not None] == shapes
    for a, b in zip(made.train + (made.test or ()), read.train + (read.test or ())):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


def test_a_changed_recipe_is_made_again_not_read_from_an_older_file(tmp_path, monkeypatch):
    """The cache key has a digest of the making code, so an edit to it shows (in users' caches and
    in the tests) instead of an older file being read back under the same package version."""
    from natgrad_impls import tasks

    monkeypatch.setenv("NATGRAD_DATA", str(tmp_path))
    before = TASKS["digits-mlp"].load()
    made = tasks._make_digits

    def _make_digits():  # the same name, another recipe
        return {key: value * 2 if key.startswith("x") else value for key, value in made().items()}

    monkeypatch.setattr(tasks, "_make_digits", _make_digits)
    np.testing.assert_array_equal(TASKS["digits-mlp"].load().train.X, 2 * before.train.X)
    assert len(list((tmp_path / "generated").glob("*.npz"))) == 2
    # one function, other arguments (wine's and breastcancer's recipes): another recipe too
    wine, cancer = (functools.partial(tasks._scikit_learn_set, name) for name in ("load_wine", "load_breast_cancer"))
    assert tasks._recipe(wine) != tasks._recipe(cancer)


def test_digits_are_scikit_learns_scaled_to_the_unit_interval(tmp_path, monkeypatch):
    """Every digit once, in train or test, as scikit-learn's 8x8 images over 16, with its label."""
    from sklearn.datasets import load_digits

    monkeypatch.setenv("NATGRAD_DATA", str(tmp_path))
    (X, y), (X_test, y_test) = TASKS["digits-mlp"].load()
    ours = np.column_stack([np.concatenate([X, X_test]), np.concatenate([y, y_test])])
    images, labels = load_digits(return_X_y=True)
    theirs = np.column_stack([images / 16.0, labels])
    np.testing.assert_array_equal(np.unique(ours, axis=0), np.unique(theirs, axis=0))
    assert len(ours) == len(theirs)


def test_digits_split_is_stratified_and_fixed():
    """The same split for every seed: scikit-learn's stratified 80/20 split drawn with random_state 0,
    the one every digits result was computed on."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    (X, y), (X_test, y_test) = TASKS["digits-mlp"].load(seed=5)
    assert 0 <= X.min() and X.max() <= 1
    np.testing.assert_allclose(np.bincount(y) / len(y), np.bincount(y_test) / len(y_test), atol=0.01)
    np.testing.assert_array_equal(y_test, TASKS["digits-mlp"].load(seed=0).test.y)
    images, labels = load_digits(return_X_y=True)
    _, images_test, _, labels_test = train_test_split(images, labels, test_size=0.2, random_state=0, stratify=labels)
    np.testing.assert_array_equal(X_test, images_test / 16.0)
    np.testing.assert_array_equal(y_test, labels_test)


def test_a_warm_data_cache_spares_jobs_the_scikit_learn_import(tmp_path, monkeypatch):
    monkeypatch.setenv("NATGRAD_DATA", str(tmp_path))
    code = ("import sys; from natgrad_impls.tasks import get_task; "
            "[get_task(n).load() for n in ('wine', 'breastcancer', 'digits-mlp')]; print('sklearn' in sys.modules)")
    run = lambda: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout  # noqa: E731
    assert run().strip() == "True"  # made: imported
    assert run().strip() == "False"  # read back


# -- download tasks ---------------------------------------------------------------------------------

@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty cache, a mirror that does not exist, and urlopen limited to file:// URLs, so that
    nothing here can reach the network; unpinned files allowed, so that a1a also tries to download."""
    monkeypatch.setenv("NATGRAD_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("NATGRAD_DATA_MIRROR", (tmp_path / "no-mirror").as_uri())
    monkeypatch.setenv("NATGRAD_ALLOW_UNPINNED", "1")
    real = urllib.request.urlopen

    def local_only(url, *args, **kwargs):
        assert str(url).startswith("file:"), f"a test tried to reach {url}"
        return real(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", local_only)
    return tmp_path / "cache"


@pytest.mark.parametrize("name", DOWNLOAD)
def test_download_tasks_fail_offline_with_a_clear_error(name, offline):
    with pytest.raises(DataUnavailable) as error:
        TASKS[name].load()
    message = str(error.value)
    # names the missing file and the exact path to put it at by hand
    assert any(str(offline / r.filename) in message for r in data.RESOURCES.values()), message


def test_an_unpinned_a1a_must_have_a1as_examples(offline):
    """a1a has no pinned sha256 yet, so its shape is all that tells another file from it."""
    path = data.cache_path(data.RESOURCES["a1a"])
    path.parent.mkdir(parents=True, exist_ok=True)
    for rows in (3, 1605):
        path.write_bytes(b"".join(b"%+d 3:1 119:1\n" % (1 - 2 * (i % 2)) for i in range(rows)))
        if rows == 3:
            with pytest.raises(DataUnavailable, match=r"^a1a: .*/a1a has 3 examples where LIBSVM's a1a has 1605"):
                TASKS["a1a"].load()
        else:
            assert TASKS["a1a"].load().train.X.shape == (1605, 124)  # with the ones column


def test_a1a_is_refused_while_unpinned(offline, monkeypatch):
    monkeypatch.delenv("NATGRAD_ALLOW_UNPINNED")
    with pytest.raises(DataUnavailable, match="libsvm/a1a.*NATGRAD_ALLOW_UNPINNED"):
        TASKS["a1a"].load()


def column_letters(j: int) -> str:
    """The letters of the 0-based column j: A to Z, then AA, AB, ..."""
    letters = ""
    while j >= 0:
        j, rest = divmod(j, 26)
        letters, j = chr(ord("A") + rest) + letters, j - 1
    return letters


def write_xlsx(rows, target="worksheets/sheet1.xml") -> bytes:
    """A minimal one-sheet .xlsx: header strings shared, numbers inline, gaps allowed (None: the cell
    is left out of the XML, as spreadsheet programs do, so only its neighbours' `r=` tell its column).
    `target`: the sheet's path as workbook.xml.rels gives it (relative to xl/, or from the root)."""
    strings, xml_rows = [], []
    for i, row in enumerate(rows, start=1):
        cells = []
        for j, value in enumerate(row):
            ref = f"{column_letters(j)}{i}"
            if isinstance(value, str):
                strings.append(value)
                cells.append(f'<c r="{ref}" t="s"><v>{len(strings) - 1}</v></c>')
            elif value is not None:
                cells.append(f'<c r="{ref}"><v>{float(value)!r}</v></c>')
        xml_rows.append(f'<row r="{i}">{"".join(cells)}</row>')
    main = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    rel = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        sheet = '<sheet name="Sheet1" sheetId="1" r:id="rId1"/>'
        archive.writestr("xl/workbook.xml", f'<workbook {main} xmlns:r="{rel}"><sheets>{sheet}</sheets></workbook>')
        archive.writestr(
            "xl/_rels/workbook.xml.rels",
            '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            f'<Relationship Id="rId1" Type="{rel}/worksheet" Target="{target}"/></Relationships>',
        )
        cells = "".join(xml_rows)
        archive.writestr("xl/worksheets/sheet1.xml", f"<worksheet {main}><sheetData>{cells}</sheetData></worksheet>")
        items = "".join(f"<si><t>{s}</t></si>" for s in strings)
        archive.writestr("xl/sharedStrings.xml", f"<sst {main}>{items}</sst>")
    return buffer.getvalue()


def write_idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def random_cifar(n: int, rng) -> dict[str, tuple[np.ndarray, list[int]]]:
    return {name: (rng.integers(0, 256, (n, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, 10, n)])
            for name in CIFAR_BATCHES}


def write_cifar(batches: dict[str, tuple[np.ndarray, list[int]]]) -> bytes:
    """The python tarball: per batch a pickle of (n, 3072) uint8 rows (each the 1024 red values, then
    the 1024 green, then the 1024 blue, each plane row by row) and a list of labels."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, (images, labels) in batches.items():
            content = pickle.dumps({b"data": images, b"labels": labels})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


# the regression tables' stand-ins: (rows, columns), and which columns are the features and the target
TABLES = {"energy": ((5, 10), slice(0, 8), 8), "powerplant": ((6, 5), slice(0, 4), 4),
          "yacht": ((4, 7), slice(0, 6), 6)}


def stand_in_tables(rng) -> dict[str, np.ndarray]:
    return {name: rng.uniform(1, 9, shape).round(3) for name, (shape, _, _) in TABLES.items()}


def stand_in_files(rng, tables) -> dict[str, bytes]:
    """Small files in each download format, keyed by resource; `tables`: the regression sets'."""
    energy = [[f"X{i}" for i in range(1, 9)] + ["Y1", "Y2"], *tables["energy"].tolist(), [None] * 10,
              [None] * 11 + [1.0]]
    plant = io.BytesIO()
    with zipfile.ZipFile(plant, "w") as archive:
        sheet = [["AT", "V", "AP", "RH", "PE"], *tables["powerplant"].tolist()]
        archive.writestr("CCPP/Folds5x2_pp.xlsx", write_xlsx(sheet))
    files = {
        "a1a": b"-1 3:1 11:1 14:1 \n+1 5:1 7:1 119:1 \n-1 1:1 \n",
        "energy": write_xlsx(energy),
        "powerplant": plant.getvalue(),
        "yacht": "\n".join("  ".join(f"{v:g}" for v in row) for row in tables["yacht"]).encode() + b"\n\n",
        "cifar10": write_cifar(random_cifar(2, rng)),
    }
    for prefix in ["mnist", "fashion-mnist"]:
        for part, n in [("train", 5), ("test", 3)]:
            files[f"{prefix}/{part}-images"] = write_idx(rng.integers(0, 256, (n, 28, 28)))
            files[f"{prefix}/{part}-labels"] = write_idx(rng.integers(0, 10, (n,)))
    return files


EXPECTED_N = {"a1a": 3, "energy": 5, "powerplant": 6, "yacht": 4, "cifar10-cnn": 10,
              "mnist-mlp": 5, "fashionmnist-cnn": 5, "mnist-autoencoder": 5}


def place(monkeypatch, files: dict[str, bytes]) -> None:
    """Stand-in files in the cache, keyed by resource, pinned by their own checksums (so that a
    download task reads them as it would the real ones, with NATGRAD_ALLOW_UNPINNED unset)."""
    monkeypatch.delenv("NATGRAD_ALLOW_UNPINNED", raising=False)
    for key, content in files.items():
        resource = dataclasses.replace(data.RESOURCES[key], sha256=hashlib.sha256(content).hexdigest())
        monkeypatch.setitem(data.RESOURCES, key, resource)
        path = data.cache_path(resource)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def test_download_tasks_parse_their_files(offline, monkeypatch):
    """Stand-in files with the real formats, placed in the cache under pinned checksums."""
    rng = np.random.default_rng(0)
    tables = stand_in_tables(rng)
    place(monkeypatch, stand_in_files(rng, tables))
    for name in DOWNLOAD:
        task = TASKS[name]
        dataset = task.load()
        X, y = check_dataset(task, dataset)
        assert len(X) == EXPECTED_N[name], name
        if name in KUNSTNER:
            np.testing.assert_array_equal(X[:, -1], 1.0)
            assert dataset.test is None
        else:
            assert dataset.test is not None and 0 <= X.min() and X.max() <= 1  # pixels in [0, 1]
    for name, (_, features, target) in TABLES.items():  # energy: Y1, the heating load, not Y2
        (X, y), _ = TASKS[name].load()
        np.testing.assert_array_equal(X[:, :-1], tables[name][:, features], err_msg=name)
        np.testing.assert_array_equal(y[:, 0], tables[name][:, target], err_msg=name)
    (X, y), _ = TASKS["a1a"].load()
    np.testing.assert_array_equal(y[:, 0], [0, 1, 0])
    assert X[1, 118] == 1 and X[2, 0] == 1  # 1-based LIBSVM indices
    (X, y), test = TASKS["mnist-autoencoder"].load()
    np.testing.assert_array_equal(X, y)
    np.testing.assert_array_equal(test.X, test.y)  # each split its own target
    assert test.X.shape == (3, 784) and not np.array_equal(test.X, X[:3])


def test_idx_images_and_labels_are_read_as_written(offline, monkeypatch):
    """MNIST and Fashion-MNIST: each image row by row (IDX data is in C order) over 255, the labels as written."""
    rng = np.random.default_rng(1)
    written = {}
    for prefix in ["mnist", "fashion-mnist"]:
        for part, n in [("train", 3), ("test", 2)]:
            written[f"{prefix}/{part}-images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            written[f"{prefix}/{part}-labels"] = rng.integers(0, 10, n, dtype=np.uint8)
    place(monkeypatch, {key: write_idx(array) for key, array in written.items()})
    for name, prefix, shape in [("mnist-mlp", "mnist", (784,)), ("fashionmnist-cnn", "fashion-mnist", (1, 28, 28))]:
        dataset = TASKS[name].load()
        for part, (X, y) in [("train", dataset.train), ("test", dataset.test)]:
            images, labels = written[f"{prefix}/{part}-images"], written[f"{prefix}/{part}-labels"]
            np.testing.assert_array_equal(X, images.reshape(len(images), *shape) / 255, err_msg=f"{name} {part}")
            np.testing.assert_array_equal(y, labels, err_msg=f"{name} {part}")


def test_cifar10_images_are_channel_planes_and_batches_in_order(offline, monkeypatch):
    """A CIFAR-10 row is the red plane, then the green, then the blue (not pixel by pixel), and the
    training set is data_batch_1 to data_batch_5 in that order."""
    rows, columns = np.mgrid[0:32, 0:32]
    # red: the row, green: the column, blue: full
    known = np.stack([rows * 8, columns * 8, np.full((32, 32), 255)]).astype(np.uint8)
    labels = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [7, 3]]
    images = random_cifar(2, np.random.default_rng(2))
    batches = {name: (images[name][0], labels[i]) for i, name in enumerate(CIFAR_BATCHES)}
    batches["data_batch_1"][0][0] = np.concatenate([known[0].ravel(), known[1].ravel(), known[2].ravel()])
    place(monkeypatch, {"cifar10": write_cifar(batches)})
    (X, y), (X_test, y_test) = TASKS["cifar10-cnn"].load()
    np.testing.assert_array_equal(X[0, 0], rows * 8 / 255)
    np.testing.assert_array_equal(X[0, 1], columns * 8 / 255)
    np.testing.assert_array_equal(X[0, 2], 1.0)
    np.testing.assert_array_equal(y, np.arange(10))
    np.testing.assert_array_equal(y_test, [7, 3])
    train = np.concatenate([batches[name][0] for name in CIFAR_BATCHES[:5]])
    np.testing.assert_array_equal(X, train.reshape(10, 3, 32, 32) / 255)
    np.testing.assert_array_equal(X_test, batches["test_batch"][0].reshape(2, 3, 32, 32) / 255)


def test_read_xlsx_places_cells_by_their_references():
    """Spreadsheet programs leave empty cells out of the XML, so a cell's column is its `r=`
    reference (C1, AB4), not its position among the cells of its row."""
    rows = [["a", None, "c"], [None, 2.0, 3.0], [1.0, None, None, 4.0], [None] * 27 + [5.0]]
    content = write_xlsx(rows)
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        sheet = archive.read("xl/worksheets/sheet1.xml").decode()
    assert '<c r="B1"' not in sheet and '<c r="AB4"' in sheet  # the gaps really are left out
    assert data.read_xlsx(io.BytesIO(content)) == rows


def test_read_xlsx_follows_a_sheet_target_given_from_the_archive_root():
    """Some writers (openpyxl among them) give the sheet as /xl/worksheets/sheet1.xml, not relative to xl/."""
    rows = [["AT", "PE"], [1.5, 2.0]]
    assert data.read_xlsx(io.BytesIO(write_xlsx(rows, target="/xl/worksheets/sheet1.xml"))) == rows


def test_numeric_rows_keeps_the_rows_of_numbers_only():
    """The header, blank rows, short rows and a row with a missing value (which would be a NaN) are
    dropped; cells after the first `columns` do not count."""
    rows = [["X1", "X2", "Y"], [1.0, 2.0, 3.0, "note"], [4.0, None, 6.0], [None] * 3, [7.0, 8.0, 9.0], [1.0, 2.0]]
    table = data.numeric_rows(rows, 3)
    np.testing.assert_array_equal(table, [[1, 2, 3], [7, 8, 9]])
    assert table.dtype == np.float64
