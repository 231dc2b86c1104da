"""Download-and-verify for the download tasks (DESIGN 6), and parsers for their file formats.

Every file is pinned by URL and sha256 and lives in the cache folder `$NATGRAD_DATA` (default
`~/.cache/natgrad`) under `Resource.filename`. `fetch` returns the cached file when its checksum
matches, and otherwise downloads it to a temporary file in the same folder, checks it, and renames
it into place, so that a killed or corrupted download never leaves a file that looks complete
(the temporary files of killed downloads are removed once they are stale, see STALE_PART_AGE_S).
A cache folder that cannot be made or written is a `DataUnavailable` that says so.
A URL that serves a file with the wrong sha256, or fewer bytes than it announced, is skipped like
one that is down (the file is discarded), and so is one slower than LOW_SPEED_BYTES_PER_S over a
whole LOW_SPEED_WINDOW_S (a server that trickles bytes would otherwise hold a job for hours). When
no URL gives the file, `fetch` raises `DataUnavailable` (`ChecksumMismatch` if a URL served a
wrong file) saying where to put the file by hand. Downloads are readable by every user of a shared
cache (results.SHARED_FILE_MODE). An unpinned file (`sha256=None`, only LIBSVM a1a) needs
NATGRAD_ALLOW_UNPINNED=1, and then its sha256 is printed to pin. `generated` keeps offline data sets
that are slow to generate in the same folder.

`NATGRAD_DATA_MIRROR=<base URL>` replaces the pinned URLs by `<base URL>/<filename>` (a local mirror,
or a `file://` folder; the tests use it so that they can never reach the network).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import hashlib
import http.client
import os
import pickle
import posixpath
import re
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
import warnings
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from natgrad_impls import results


class DataUnavailable(RuntimeError):
    """A download task's file is neither in the cache nor downloadable (offline, moved, unpinned)."""


class ChecksumMismatch(DataUnavailable):
    """A downloaded file does not have its pinned sha256 (nothing was kept). A DataUnavailable, so
    that the command line reports it as one line, like any other file it cannot get."""


@dataclasses.dataclass(frozen=True)
class Resource:
    """One pinned file. `filename` is a path relative to the cache folder (MNIST and Fashion-MNIST
    share file names, so each data set has its own subfolder). `sha256=None` means "not pinned yet":
    fetch refuses it unless NATGRAD_ALLOW_UNPINNED=1, and then prints the checksum to pin."""

    name: str
    url: str
    sha256: str | None
    filename: str
    mirrors: tuple[str, ...] = ()  # tried in order after `url`


def cache_dir() -> Path:
    return Path(os.environ.get("NATGRAD_DATA") or Path.home() / ".cache" / "natgrad").expanduser()


def cache_path(resource: Resource) -> Path:
    return cache_dir() / resource.filename


def sha256sum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def generated(name: str, make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Arrays that are slow to make (offline data sets: generated, or behind a slow import), made
    once and kept in the cache folder as `generated/<name>.npz` with the sha256 of their contents.
    `name` must say everything the arrays depend on (e.g. the generating package's version), and
    change with the keys `make` returns: a stored file is returned as it is. A file that is missing,
    unreadable or fails its checksum is made again; it is written like a download (a temporary file
    renamed into place), so parallel jobs and killed ones never leave a partial file. An unwritable
    cache folder only costs the time to make the arrays again next time."""
    path = cache_dir() / "generated" / f"{name}.npz"
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in stored.files if key != "sha256"}
            if str(stored["sha256"]) == _arrays_sha256(arrays):
                return arrays
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        pass  # missing or damaged: make it again
    arrays = make()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        results.remove_stale_temporaries(path.parent, STALE_PART_AGE_S)  # those of killed jobs
        with _replacing(path) as out:
            np.savez(out, sha256=np.str_(_arrays_sha256(arrays)), **arrays)
    except OSError as error:
        warnings.warn(f"{name}: could not keep the generated arrays in {path} ({error})")
    return arrays


def _arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def _urls(resource: Resource) -> list[str]:
    mirror = os.environ.get("NATGRAD_DATA_MIRROR")
    if mirror:
        return [mirror.rstrip("/") + "/" + urllib.parse.quote(resource.filename)]
    return [resource.url, *resource.mirrors]


def _by_hand(resource: Resource, path: Path) -> str:
    pin = f" (sha256 {resource.sha256})" if resource.sha256 else ""
    return (
        f"Download it by hand and save it as {path}{pin}, "
        f"or set NATGRAD_DATA to a folder that holds {resource.filename}"
    )


def fetch(resource: Resource) -> Path:
    """The verified local copy of `resource`, downloaded into the cache folder if needed."""
    path = cache_path(resource)
    allow_unpinned = os.environ.get("NATGRAD_ALLOW_UNPINNED") == "1"
    if resource.sha256 is None and not allow_unpinned:
        raise DataUnavailable(
            f"{resource.name}: {resource.filename} has no pinned sha256 yet; set NATGRAD_ALLOW_UNPINNED=1 to use "
            f"{path} (downloaded from {_urls(resource)[0]} if absent) and pin the checksum that is printed"
        )
    stale = None
    if path.is_file():
        actual = _cached_sha256(resource, path)
        if resource.sha256 is None:
            _print_unpinned(resource, f"using unpinned {path}", actual)
            return path
        if actual == resource.sha256:
            return path
        stale = actual  # a wrong file in the cache is replaced, never used

    _in_cache(resource, path.parent, path.parent.mkdir, parents=True, exist_ok=True)
    results.remove_stale_temporaries(path.parent, STALE_PART_AGE_S)  # those of killed downloads (`_replacing`)
    failures, mismatched = [], False
    for url in _urls(resource):
        try:
            return _download(resource, url, path)
        except ChecksumMismatch as error:  # a changed file or a bad mirror: discarded, try the next URL
            mismatched = True
            failures.append(f"{url} ({error})")
        except DataUnavailable:  # the cache folder, not the URL: no other URL would help
            raise
        except (OSError, http.client.HTTPException, ValueError) as error:  # offline, 404, cut short, a bad URL
            failures.append(f"{url} ({' '.join(str(error).split())})")
    found = f"; the file there has sha256 {stale}" if stale else ""
    if mismatched:
        raise ChecksumMismatch(
            f"{resource.name}: no URL gave {resource.filename} with sha256 {resource.sha256}: "
            f"{', '.join(failures)}{found}; nothing was kept. {_by_hand(resource, path)}"
        )
    raise DataUnavailable(
        f"{resource.name}: could not download {resource.filename} from {', '.join(failures)}{found}. "
        f"Offline? {_by_hand(resource, path)}"
    )


def _download(resource: Resource, url: str, path: Path) -> Path:
    """Stream `url` into a temporary file beside `path`, check the sha256, rename it atomically. An
    OSError of the cache folder (it cannot take the file: a full disk, a quota) is a DataUnavailable
    that says so, not the URL's failure, so no other URL is tried."""
    in_cache = functools.partial(_in_cache, resource, path.parent)
    with contextlib.ExitStack() as cache:
        out = in_cache(cache.enter_context, _replacing(path))  # before the URL is opened: nothing is fetched
        with urllib.request.urlopen(url, timeout=60) as response:
            digest, received = hashlib.sha256(), 0
            for block in _blocks(response):
                digest.update(block)
                received += len(block)
                in_cache(out.write, block)
            _check_whole(response, received)
        actual = digest.hexdigest()
        if resource.sha256 is not None and actual != resource.sha256:
            raise ChecksumMismatch(f"got sha256 {actual}")  # raised inside: the temporary file is removed
        in_cache(cache.close)  # flush, close and rename, where a full disk shows too
    if resource.sha256 is None:
        _print_unpinned(resource, "unpinned download", actual)
    return path


# curl's --speed-limit and --speed-time: the socket timeout bounds one read, not a transfer, and a
# server that sends a byte every minute would keep a job waiting for the rest of the file forever.
LOW_SPEED_BYTES_PER_S = 1024
LOW_SPEED_WINDOW_S = 60.0


def _blocks(response):
    """The response's bytes as they arrive (read1: one receive each, so that a slow transfer is seen
    between its bytes), with a TimeoutError when a window of LOW_SPEED_WINDOW_S brings fewer than
    LOW_SPEED_BYTES_PER_S per second."""
    window_start, window_received, received = time.monotonic(), 0, 0
    for block in iter(lambda: response.read1(1 << 20), b""):
        yield block
        window_received += len(block)
        received += len(block)
        elapsed = time.monotonic() - window_start
        if elapsed >= LOW_SPEED_WINDOW_S:
            if window_received < LOW_SPEED_BYTES_PER_S * elapsed:
                raise TimeoutError(f"slower than {LOW_SPEED_BYTES_PER_S} bytes/s for {elapsed:.3g} s, "
                                   f"after {received} bytes")
            window_start, window_received = time.monotonic(), 0


def _check_whole(response, received: int) -> None:
    """A ConnectionError when fewer bytes came than the response's Content-Length announced: a
    server that closes early ends urllib's reads as if the file were whole, and an unpinned file has
    no checksum to catch it."""
    announced = response.headers.get("Content-Length")
    if announced and announced.strip().isdigit() and received < int(announced):
        raise ConnectionError(f"the transfer was cut short after {received} of {int(announced)} bytes")


def _cached_sha256(resource: Resource, path: Path) -> str:
    """The sha256 of the cached `path`, or a DataUnavailable naming it when it cannot be read (a
    shared cache written by another user without read permission for this one)."""
    try:
        return sha256sum(path)
    except OSError as error:
        raise DataUnavailable(
            f"{resource.name}: cannot read the cached {path} ({error.strerror or error}); make it readable, "
            f"or set NATGRAD_DATA to a folder of your own"
        ) from error


def _in_cache(resource: Resource, folder: Path, operation, *args, **kwargs):
    """`operation(*args, **kwargs)` on the cache folder `folder`. Its OSError (a regular file,
    read-only, /proc, a full disk) is the folder's, not a download failure: a DataUnavailable with no
    "Offline?" and no advice to save the file by hand in that same folder."""
    try:
        return operation(*args, **kwargs)
    except OSError as error:
        raise DataUnavailable(
            f"{resource.name}: the cache folder {cache_dir()} is not usable: cannot write in {folder} "
            f"({error.strerror or error}); set NATGRAD_DATA to a writable folder"
        ) from error


# A killed download leaves its temporary file behind (CIFAR-10: 170 MB each time). One this old is
# stale: a younger one may be another process downloading right now (it writes, so its mtime moves).
STALE_PART_AGE_S = 24 * 3600


def _print_unpinned(resource: Resource, what: str, actual: str) -> None:
    """Printed, not warned: a warning shows once per process and a filter can hide it, and this
    line is how the first online user learns the checksum to pin."""
    print(f"{resource.name}: {what}, sha256 {actual}; pin it in natgrad_impls/data.py RESOURCES",
          file=sys.stderr, flush=True)


@contextlib.contextmanager
def _replacing(path: Path):
    """A binary file beside `path` that replaces it when the block ends without an error and is
    removed otherwise, so a failed or killed write never leaves a file that looks complete."""
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out:
            yield out
        os.chmod(temp, results.SHARED_FILE_MODE)  # mkstemp's files are the owner's alone
        os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)


# -- pinned files ----------------------------------------------------------------------------------
# Sources of the checksums (none could be recomputed here, there is no internet):
# - MNIST: tensorflow-datasets url_checksums/mnist.txt (for the identical files on the CVDF mirror,
#   listed as a second URL; torchvision's md5s for the ossci mirror are those of the original files).
# - Fashion-MNIST: tensorflow-datasets url_checksums/fashion_mnist.txt, for exactly these URLs.
# - CIFAR-10: tensorflow-datasets url_checksums/cifar10.csv and torchvision's prototype datasets.
# - UCI energy, CCPP, yacht: published by several independent projects (same values in each).
# - LIBSVM a1a: no published checksum was found; to be pinned on the first online run.
_LIBSVM = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/"
_UCI = "https://archive.ics.uci.edu/ml/machine-learning-databases/"
_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_MNIST_CVDF = "https://storage.googleapis.com/cvdf-datasets/mnist/"
_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

_IDX = {
    "train-images": "train-images-idx3-ubyte.gz",
    "train-labels": "train-labels-idx1-ubyte.gz",
    "test-images": "t10k-images-idx3-ubyte.gz",
    "test-labels": "t10k-labels-idx1-ubyte.gz",
}
_MNIST_SHA256 = {
    "train-images": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "test-images": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "test-labels": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
_FASHION_SHA256 = {
    "train-images": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "test-images": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "test-labels": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}

RESOURCES: dict[str, Resource] = {
    "a1a": Resource("a1a", _LIBSVM + "a1a", None, "libsvm/a1a"),
    "energy": Resource(
        "energy", _UCI + "00242/ENB2012_data.xlsx",
        "0089fcffc1415e41e2ff63730cca5280efe54fc43d722dfde1b0aaa808e35dc4", "uci/ENB2012_data.xlsx",
    ),
    "powerplant": Resource(
        "powerplant", _UCI + "00294/CCPP.zip",
        "cc7b2a4977c0a44e8221c91d9a7e5746b3c68186cff7e5c61c70af6432b98c7a", "uci/CCPP.zip",
    ),
    "yacht": Resource(
        "yacht", _UCI + "00243/yacht_hydrodynamics.data",
        "00dfecc0fc01ddd4c90b558a3ac11b246df8ebcfea130724223475a9a67f0ea1", "uci/yacht_hydrodynamics.data",
    ),
    **{
        f"mnist/{key}": Resource(
            f"mnist/{key}", _MNIST + file, _MNIST_SHA256[key], f"mnist/{file}", mirrors=(_MNIST_CVDF + file,)
        )
        for key, file in _IDX.items()
    },
    **{
        f"fashion-mnist/{key}": Resource(
            f"fashion-mnist/{key}", _FASHION + file, _FASHION_SHA256[key], f"fashion-mnist/{file}"
        )
        for key, file in _IDX.items()
    },
    "cifar10": Resource(
        "cifar10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce", "cifar10/cifar-10-python.tar.gz",
    ),
}


# -- parsers ---------------------------------------------------------------------------------------

def read_libsvm(path: Path, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense float64 features (N, n_features) and labels (N,) of a LIBSVM text file. n_features is
    given because the file only implies the largest index it happens to contain.

    Indices are 1-based, as LIBSVM documents: feature i is column i - 1. Said explicitly, because
    scikit-learn's default (zero_based="auto") guesses 0-based from a single `0:` in the file and
    would then shift every column by one; here a `0:` index (or one above n_features) is a
    ValueError that names the file."""
    from sklearn.datasets import load_svmlight_file

    try:
        X, y = load_svmlight_file(str(path), n_features=n_features, dtype=np.float64, zero_based=False)
    except ValueError as error:
        raise ValueError(f"{path}: not a LIBSVM file with features 1 to {n_features}: {error}") from error
    return X.toarray(), y.astype(np.float64)


_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST format), gzipped or not: 2 zero bytes, a type code, the number of
    dimensions, the dimensions as big-endian int32, then the data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as stream:
        raw = stream.read()
    if raw[:2] != b"\x00\x00" or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file")
    ndim = raw[3]
    shape = tuple(np.frombuffer(raw, ">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, _IDX_TYPES[raw[2]], offset=4 + 4 * ndim)
    return data.reshape(shape)


def read_table(path: Path) -> np.ndarray:
    """A whitespace-separated numeric text table (UCI yacht); repeated blanks and blank lines are fine."""
    return np.loadtxt(path, dtype=np.float64, ndmin=2)


_XLSX = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
_RELS = "{http://schemas.openxmlformats.org/package/2006/relationships}"
_DOC_RELS = "{http://schemas.openxmlformats.org/officeDocument/2006/relationships}"


def _column(reference: str) -> int:
    letters = re.match(r"[A-Z]+", reference).group()
    index = 0
    for letter in letters:
        index = index * 26 + ord(letter) - ord("A") + 1
    return index - 1


def read_xlsx(source, sheet: int = 0) -> list[list]:
    """The cells of one worksheet of an .xlsx file (path or file object) as rows of float | str | None.

    A small reader on zipfile + ElementTree, because pandas needs openpyxl for .xlsx and the
    pinned environment does not have it; the UCI sheets are plain tables of numbers and a header.
    """
    with zipfile.ZipFile(source) as archive:
        names = set(archive.namelist())
        strings = []
        if "xl/sharedStrings.xml" in names:
            root = ET.fromstring(archive.read("xl/sharedStrings.xml"))
            strings = ["".join(t.text or "" for t in item.iter(f"{_XLSX}t")) for item in root.iter(f"{_XLSX}si")]
        workbook = ET.fromstring(archive.read("xl/workbook.xml"))
        rel_id = list(workbook.iter(f"{_XLSX}sheet"))[sheet].get(f"{_DOC_RELS}id")
        rels = ET.fromstring(archive.read("xl/_rels/workbook.xml.rels"))
        target = next(r.get("Target") for r in rels.iter(f"{_RELS}Relationship") if r.get("Id") == rel_id)
        target = target.lstrip("/") if target.startswith("/") else posixpath.normpath(posixpath.join("xl", target))
        root = ET.fromstring(archive.read(target))
    rows = []
    for row in root.iter(f"{_XLSX}row"):
        cells = {}
        for position, cell in enumerate(row.iter(f"{_XLSX}c")):
            column = _column(cell.get("r")) if cell.get("r") else position
            kind, value = cell.get("t"), cell.find(f"{_XLSX}v")
            if kind == "inlineStr":
                cells[column] = "".join(t.text or "" for t in cell.iter(f"{_XLSX}t"))
            elif value is None or value.text is None:
                continue
            elif kind == "s":
                cells[column] = strings[int(value.text)]
            elif kind in ("str", "e", "b"):
                cells[column] = value.text
            else:
                cells[column] = float(value.text)
        if cells:
            rows.append([cells.get(i) for i in range(max(cells) + 1)])
    return rows


def numeric_rows(rows: list[list], columns: int) -> np.ndarray:
    """The rows whose first `columns` cells are all numbers (drops the header and blank padding rows
    that some copies of the UCI sheets carry), as a float64 (N, columns) array."""
    keep = [row[:columns] for row in rows if len(row) >= columns and all(isinstance(v, float) for v in row[:columns])]
    return np.array(keep, dtype=np.float64).reshape(-1, columns)


def read_zip_member(path: Path, member: str) -> bytes:
    with zipfile.ZipFile(path) as archive:
        return archive.read(member)


def read_cifar10(path: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train images (50000, 3, 32, 32) uint8, labels), (test images, labels) from the python tarball.
    The batches are pickles; they are only unpickled after `fetch` has verified the tarball's sha256."""

    def batch(archive, name):
        with archive.extractfile(f"cifar-10-batches-py/{name}") as stream:
            content = pickle.load(stream, encoding="bytes")
        return np.asarray(content[b"data"], np.uint8).reshape(-1, 3, 32, 32), np.asarray(content[b"labels"], np.int64)

    with tarfile.open(path, "r:gz") as archive:
        train = [batch(archive, f"data_batch_{i}") for i in range(1, 6)]
        test = batch(archive, "test_batch")
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])), test

