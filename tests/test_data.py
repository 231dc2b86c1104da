"""natgrad_impls.data.fetch on small files served from tmp_path by file:// URLs (no network), and
the parsers of the LIBSVM and IDX formats on hand-made files."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import re
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from natgrad_impls import data
from natgrad_impls.data import ChecksumMismatch, DataUnavailable, Resource, fetch


UNPATCHED_URLOPEN = urllib.request.urlopen


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache folder as NATGRAD_DATA, and urlopen limited to file:// URLs."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("NATGRAD_DATA", str(folder))
    monkeypatch.delenv("NATGRAD_DATA_MIRROR", raising=False)
    monkeypatch.delenv("NATGRAD_ALLOW_UNPINNED", raising=False)
    real = urllib.request.urlopen

    def local_only(url, *args, **kwargs):
        assert str(url).startswith("file:"), f"a test tried to reach {url}"
        return real(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", local_only)
    return folder


def served(tmp_path, content: bytes, name="remote.bin") -> tuple[str, str]:
    """A file:// URL serving `content`, and its sha256."""
    path = tmp_path / "server" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path.as_uri(), hashlib.sha256(content).hexdigest()


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def opened_urls(monkeypatch) -> list[str]:
    """The URLs that urlopen is asked for from now on (still only file:// ones, as `cache` allows)."""
    opened, real = [], urllib.request.urlopen

    def record(url, *args, **kwargs):
        opened.append(url)
        return real(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", record)
    return opened


def test_download_checks_and_caches(cache, tmp_path):
    url, sha = served(tmp_path, b"some bytes\n")
    path = fetch(Resource("thing", url, sha, "sub/thing.bin"))
    assert path == cache / "sub" / "thing.bin"
    assert path.read_bytes() == b"some bytes\n"
    assert files_in(cache) == [path]  # no temporary file left behind
    assert path.stat().st_mode & 0o777 == 0o644  # a cache shared on a cluster: readable by its other users


def test_a_cached_file_that_cannot_be_read_is_one_line_naming_it(cache, tmp_path, monkeypatch):
    """A shared cache holding a file this user may not read: a DataUnavailable naming the file (the
    command line's one line), not a PermissionError's traceback."""
    url, sha = served(tmp_path, b"some bytes\n")
    path = fetch(Resource("thing", url, sha, "thing.bin"))

    def denied(file):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(data, "sha256sum", denied)
    with pytest.raises(DataUnavailable, match=re.escape(f"cannot read the cached {path} (Permission denied)")):
        fetch(Resource("thing", url, sha, "thing.bin"))


def test_mismatch_is_refused_and_nothing_kept(cache, tmp_path):
    url, sha = served(tmp_path, b"tampered")
    wrong = "0" * 64
    with pytest.raises(DataUnavailable) as error:  # so the CLI prints it as one line, no traceback
        fetch(Resource("thing", url, wrong, "thing.bin"))
    assert isinstance(error.value, ChecksumMismatch)
    message = str(error.value)
    assert "thing.bin" in message and wrong in message and sha in message and url in message
    assert str(cache / "thing.bin") in message  # where to put it by hand
    assert "\n" not in message
    assert files_in(cache) == []


def test_a_mismatching_url_is_discarded_and_the_next_tried(cache, tmp_path, monkeypatch):
    bad, _ = served(tmp_path, b"tampered", name="bad.bin")
    good, sha = served(tmp_path, b"right", name="good.bin")
    resource = Resource("thing", bad, sha, "thing.bin", mirrors=(good,))
    opened = opened_urls(monkeypatch)
    assert fetch(resource).read_bytes() == b"right"
    assert opened == [bad, good]  # the pinned URL first, then its mirrors in order
    assert files_in(cache) == [cache / "thing.bin"]


def test_a_mismatch_in_the_cli_is_one_line_and_exit_status_1(cache, tmp_path, monkeypatch, capsys):
    from natgrad_impls import cli

    served(tmp_path, b"garbage\n", name="uci/yacht_hydrodynamics.data")
    monkeypatch.setenv("NATGRAD_DATA_MIRROR", (tmp_path / "server").as_uri())
    out = tmp_path / "o.csv"
    with pytest.raises(SystemExit) as exit:
        cli.main(["run", "--task", "yacht", "--optimizer", "sgd", "--framework", "numpy", "--lr", "0.1",
                  "--steps", "1", "--out", str(out)])
    assert exit.value.code == cli.EXIT_UNAVAILABLE == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert hashlib.sha256(b"garbage\n").hexdigest() in err and data.RESOURCES["yacht"].sha256 in err
    assert "yacht_hydrodynamics.data" in err and "Traceback" not in err
    assert not out.exists() and files_in(cache) == []


def test_cached_file_is_used_without_download(cache, tmp_path, monkeypatch):
    url, sha = served(tmp_path, b"payload")
    resource = Resource("thing", url, sha, "thing.bin")
    first = fetch(resource)

    def no_download(*args, **kwargs):
        raise AssertionError("fetch downloaded a file that was already cached")

    monkeypatch.setattr(urllib.request, "urlopen", no_download)
    assert fetch(resource) == first


def test_a_file_of_several_blocks_is_kept_and_recognised_whole(cache, tmp_path, monkeypatch):
    """Downloads and checksums go by blocks of 1 MiB (CIFAR-10 is 170 MB): every block is written, and
    a cached copy is recognised by the sha256 of all of it, so it is not downloaded again."""
    content = np.random.default_rng(0).bytes(5 * 2**19 + 3)
    url, sha = served(tmp_path, content)
    resource = Resource("big", url, sha, "big.bin")
    path = fetch(resource)
    assert path.read_bytes() == content
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: pytest.fail("downloaded again"))
    assert fetch(resource) == path


def test_wrong_cached_file_is_replaced(cache, tmp_path):
    url, sha = served(tmp_path, b"right")
    resource = Resource("thing", url, sha, "thing.bin")
    (cache / "thing.bin").parent.mkdir(parents=True)
    (cache / "thing.bin").write_bytes(b"wrong")
    assert fetch(resource).read_bytes() == b"right"


def test_a_wrong_cached_file_is_never_used_offline(cache, tmp_path):
    """Offline, a cached file with another sha256 is an error that names its checksum, not data."""
    url = (tmp_path / "nowhere" / "thing.bin").as_uri()
    resource = Resource("thing", url, hashlib.sha256(b"right").hexdigest(), "thing.bin")
    (cache / "thing.bin").parent.mkdir(parents=True)
    (cache / "thing.bin").write_bytes(b"wrong")
    with pytest.raises(DataUnavailable, match=f"the file there has sha256 {hashlib.sha256(b'wrong').hexdigest()}"):
        fetch(resource)


def test_a_wrong_cached_file_is_named_when_the_urls_serve_wrong_files_too(cache, tmp_path):
    url, served_sha = served(tmp_path, b"tampered")
    resource = Resource("thing", url, hashlib.sha256(b"right").hexdigest(), "thing.bin")
    cache.mkdir()
    (cache / "thing.bin").write_bytes(b"wrong")
    with pytest.raises(ChecksumMismatch) as error:
        fetch(resource)
    assert served_sha in str(error.value) and hashlib.sha256(b"wrong").hexdigest() in str(error.value)


def test_offline_error_names_file_url_and_cache_path(cache, tmp_path):
    url = (tmp_path / "nowhere" / "a1a").as_uri()
    resource = Resource("a1a", url, "f" * 64, "libsvm/a1a")
    with pytest.raises(DataUnavailable) as error:
        fetch(resource)
    message = str(error.value)
    assert "libsvm/a1a" in message and url in message
    assert os.strerror(errno.ENOENT) in message  # why the URL failed
    assert str(cache / "libsvm" / "a1a") in message  # where to put it by hand
    assert "f" * 64 in message  # and the checksum it must have
    assert "libsvm/a1a" in message.split("NATGRAD_DATA")[-1]  # a folder that holds libsvm/a1a, not a1a
    assert isinstance(error.value, RuntimeError) and not isinstance(error.value, ChecksumMismatch)
    assert files_in(cache) == []


def test_unpinned_files_need_an_explicit_opt_in(cache, tmp_path, monkeypatch):
    url, sha = served(tmp_path, b"unpinned")
    resource = Resource("thing", url, None, "thing.bin")
    for value in [None, "0", "", "no"]:  # only NATGRAD_ALLOW_UNPINNED=1 opts in
        if value is not None:
            monkeypatch.setenv("NATGRAD_ALLOW_UNPINNED", value)
        with pytest.raises(DataUnavailable, match="NATGRAD_ALLOW_UNPINNED") as error:
            fetch(resource)
        assert str(cache / "thing.bin") in str(error.value), value  # where the file would be kept
    assert files_in(cache) == []
    monkeypatch.setenv("NATGRAD_DATA_MIRROR", "file:///the/mirror")
    with pytest.raises(DataUnavailable) as error:
        fetch(resource)
    assert "downloaded from file:///the/mirror/thing.bin" in str(error.value)  # not the pinned URL
    monkeypatch.delenv("NATGRAD_DATA_MIRROR")
    monkeypatch.setenv("NATGRAD_ALLOW_UNPINNED", "1")
    assert fetch(resource).read_bytes() == b"unpinned"


def test_an_unpinned_download_prints_its_checksum_on_one_line(cache, tmp_path, monkeypatch, capfd):
    url, sha = served(tmp_path, b"unpinned")
    resource = Resource("thing", url, None, "thing.bin")
    monkeypatch.setenv("NATGRAD_ALLOW_UNPINNED", "1")
    fetch(resource)
    # printed, not warned: a warning filter or a second call in the same process would hide it
    assert capfd.readouterr().err == f"thing: unpinned download, sha256 {sha}; pin it in natgrad_impls/data.py RESOURCES\n"
    fetch(resource)  # the cached copy is used, and its checksum printed again
    err = capfd.readouterr().err
    assert len(err.splitlines()) == 1 and f"sha256 {sha}" in err and str(cache / "thing.bin") in err


def test_mirror_replaces_the_pinned_url(cache, tmp_path, monkeypatch):
    url, sha = served(tmp_path, b"mirrored", name="sub/thing.bin")
    monkeypatch.setenv("NATGRAD_DATA_MIRROR", (tmp_path / "server").as_uri())
    resource = Resource("thing", "https://example.invalid/thing.bin", sha, "sub/thing.bin")
    assert fetch(resource).read_bytes() == b"mirrored"


def test_a_mirror_is_the_only_url_tried(cache, tmp_path, monkeypatch):
    """`<base URL>/<filename>` with one slash, whatever the base ends with, and only that: neither the
    pinned URL nor its fallbacks, even when the mirror lacks the file."""
    url, sha = served(tmp_path, b"mirrored", name="sub/thing.bin")
    monkeypatch.setenv("NATGRAD_DATA_MIRROR", (tmp_path / "server").as_uri() + "/")
    pinned, fallbacks = "https://example.invalid/thing.bin", ("https://example.invalid/fallback/thing.bin",)
    opened = opened_urls(monkeypatch)
    assert fetch(Resource("thing", pinned, sha, "sub/thing.bin", mirrors=fallbacks)).read_bytes() == b"mirrored"
    assert opened == [url]
    opened.clear()
    with pytest.raises(DataUnavailable) as error:
        fetch(Resource("other", pinned, sha, "sub/other.bin", mirrors=fallbacks))
    assert opened == [(tmp_path / "server" / "sub" / "other.bin").as_uri()]
    assert "example.invalid" not in str(error.value)


def test_second_url_is_tried_when_the_first_fails(cache, tmp_path):
    url, sha = served(tmp_path, b"second")
    resource = Resource("thing", (tmp_path / "missing").as_uri(), sha, "thing.bin", mirrors=(url,))
    assert fetch(resource).read_bytes() == b"second"


@pytest.fixture
def http_server(monkeypatch):
    """`http_server(pieces, announced)`: the URL of a local HTTP server that announces `announced` bytes,
    then writes each (pause in s, bytes) of `pieces` and closes. urlopen may reach it too (`cache` allows
    file:// URLs only)."""
    import http.server
    import threading

    servers, local = [], urllib.request.urlopen

    def start(pieces: list[tuple[float, bytes]], announced: int) -> str:
        class Serves(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(announced))
                self.end_headers()
                for pause, piece in pieces:
                    time.sleep(pause)
                    self.wfile.write(piece)
                    self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Serves)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/thing.bin"

    def local_or_served(url, *args, **kwargs):
        served_here = any(url.startswith(f"http://127.0.0.1:{server.server_port}/") for server in servers)
        return (UNPATCHED_URLOPEN if served_here else local)(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", local_or_served)
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("pinned", [True, False])
def test_a_transfer_cut_short_is_a_failed_url_and_the_next_is_tried(cache, tmp_path, monkeypatch, http_server, pinned):
    """A server that closes before its Content-Length (urllib's reads then end as if the file were
    whole, no IncompleteRead) is a URL that failed, with the reason said: the next URL is tried, and
    with none left it is a DataUnavailable and nothing is kept. Unpinned, no checksum would catch the
    cut file: it would be cached, its sha256 printed to pin, and used."""
    good, sha = served(tmp_path, b"whole file")
    cutting = http_server([(0, b"x" * 300)], announced=1000)
    if not pinned:
        monkeypatch.setenv("NATGRAD_ALLOW_UNPINNED", "1")
    pin = sha if pinned else None
    assert fetch(Resource("thing", cutting, pin, "thing.bin", mirrors=(good,))).read_bytes() == b"whole file"
    with pytest.raises(DataUnavailable, match=re.escape("cut short after 300 of 1000 bytes")) as failed:
        fetch(Resource("other", cutting, pin, "other.bin"))
    assert not isinstance(failed.value, ChecksumMismatch)  # not "a wrong file": a transfer that broke off
    one_short = http_server([(0, b"x" * 999)], announced=1000)
    with pytest.raises(DataUnavailable, match=re.escape("cut short after 999 of 1000 bytes")):
        fetch(Resource("other", one_short, pin, "other.bin"))
    assert files_in(cache) == [cache / "thing.bin"]


def test_a_server_that_trickles_bytes_is_a_failed_url(cache, tmp_path, monkeypatch, http_server):
    """Each byte within the socket's timeout, but the file never done: below the low-speed limit for a
    whole window, the URL fails (and the next is tried) instead of holding the job. A transfer above the
    limit, over several windows, is whole."""
    monkeypatch.setattr(data, "LOW_SPEED_WINDOW_S", 0.3)
    monkeypatch.setattr(data, "LOW_SPEED_BYTES_PER_S", 1000)
    steady = b"".join(bytes([i]) * 100 for i in range(12))  # 1200 bytes at 2000 bytes/s: 0.6 s, two windows
    fast_enough = http_server([(0.05, steady[i:i + 100]) for i in range(0, 1200, 100)], announced=1200)
    pin = hashlib.sha256(steady).hexdigest()
    assert fetch(Resource("steady", fast_enough, pin, "steady.bin")).read_bytes() == steady

    good, sha = served(tmp_path, b"whole file")
    trickling = http_server([(0.02, b"x")] * 10_000, announced=10_000)  # 50 bytes/s: 200 s to the end
    started = time.monotonic()
    assert fetch(Resource("thing", trickling, sha, "thing.bin", mirrors=(good,))).read_bytes() == b"whole file"
    with pytest.raises(DataUnavailable, match=r"slower than 1000 bytes/s for 0\.3\d* s, after \d+ bytes"):
        fetch(Resource("other", trickling, sha, "other.bin"))
    # a fast start does not buy the rest of the transfer: each window is judged on its own bytes
    bursting = http_server([(0, b"x" * 5000)] + [(0.02, b"x")] * 10_000, announced=15_000)
    with pytest.raises(DataUnavailable, match=r"slower than 1000 bytes/s for 0\.3\d* s, after \d+ bytes"):
        fetch(Resource("other", bursting, sha, "other.bin"))
    assert time.monotonic() - started < 30
    assert files_in(cache) == [cache / "steady.bin", cache / "thing.bin"]


def test_a_url_that_never_answers_cannot_hang_the_job(cache, tmp_path, monkeypatch):
    """Without a timeout, urlopen waits forever on a server that takes the connection and says nothing:
    the job would hang instead of failing (and being retried)."""
    url, sha = served(tmp_path, b"some bytes\n")
    timeouts, real = [], urllib.request.urlopen

    def spy(url, *args, **kwargs):
        timeouts.append(kwargs.get("timeout", args[1] if len(args) > 1 else None))
        return real(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", spy)
    fetch(Resource("thing", url, sha, "thing.bin"))
    assert len(timeouts) == 1 and isinstance(timeouts[0], (int, float)) and 0 < timeouts[0] <= 600, timeouts


def test_default_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("NATGRAD_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.cache_dir() == tmp_path / ".cache" / "natgrad"
    monkeypatch.setenv("NATGRAD_DATA", "~/data")  # as a profile or a .env file sets it: no shell expands the ~
    assert data.cache_dir() == tmp_path / "data"


def test_pinned_resources_are_well_formed():
    filenames = [r.filename for r in data.RESOURCES.values()]
    assert len(set(filenames)) == len(filenames)  # MNIST and Fashion-MNIST must not collide
    for key, resource in data.RESOURCES.items():
        assert resource.name == key
        assert re.fullmatch(r"https?://\S+", resource.url)
        assert resource.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", resource.sha256)
    unpinned = {k for k, r in data.RESOURCES.items() if r.sha256 is None}
    assert unpinned <= {"a1a"}  # no published checksum found: pin on the first online run
    mnist = [r for k, r in data.RESOURCES.items() if k.startswith("mnist/")]
    assert len(mnist) == 4 and all(r.mirrors for r in mnist)  # MNIST's own site refuses downloads: two hosts


# -- generated data sets kept in the cache ----------------------------------------------------------

def maker(calls: list, scale=1.0):
    def make():
        calls.append(1)
        return {"x": np.arange(12, dtype=np.float64).reshape(3, 4) * scale, "y": np.array([2, 0, 1], np.int64)}

    return make


def test_generated_arrays_are_made_once_then_read_back(cache):
    calls = []
    first = data.generated("toy-1", maker(calls))
    second = data.generated("toy-1", maker(calls))
    assert calls == [1], "the second call made the arrays again"
    for key in first:
        np.testing.assert_array_equal(second[key], first[key])
        assert second[key].dtype == first[key].dtype
    assert [p.name for p in (cache / "generated").iterdir()] == ["toy-1.npz"], "a partial file was left"
    assert (cache / "generated" / "toy-1.npz").stat().st_mode & 0o777 == 0o644  # as downloads: shared


@pytest.mark.parametrize("damage", ["truncated", "other arrays", "no checksum", "reshaped", "retyped"])
def test_a_damaged_generated_file_is_made_again(cache, damage):
    """Reshaped or retyped arrays of the same bytes are damage too: the checksum covers shape and dtype."""
    calls = []
    data.generated("toy-1", maker(calls))
    path = cache / "generated" / "toy-1.npz"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        with np.load(path) as stored:
            kept = {k: stored[k] for k in stored.files}
        kept["x"] = {"reshaped": kept["x"].reshape(4, 3), "retyped": kept["x"].view(np.int64)}.get(
            damage, kept["x"] + 1)  # the stored checksum no longer matches
        if damage == "no checksum":
            del kept["sha256"]
        np.savez(path, **kept)
    again = data.generated("toy-1", maker(calls))
    assert calls == [1, 1]
    np.testing.assert_array_equal(again["x"], np.arange(12.0).reshape(3, 4))
    assert data.generated("toy-1", maker(calls)) and calls == [1, 1], "the remade file was not kept"


def test_generating_removes_the_stale_temporary_files_of_killed_jobs(cache):
    folder = cache / "generated"
    folder.mkdir(parents=True)
    now = time.time()
    for name, age in {".toy-1.npz.killed.part": 2 * data.STALE_PART_AGE_S,  # a killed job's: removed
                      ".toy-1.npz.running.part": 60}.items():  # maybe another job writing now: kept
        (folder / name).write_bytes(b"partial")
        os.utime(folder / name, (now - age, now - age))
    data.generated("toy-1", maker([]))
    assert files_in(folder) == [folder / ".toy-1.npz.running.part", folder / "toy-1.npz"]


def test_an_unwritable_cache_only_costs_the_time_to_make_again(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("NATGRAD_DATA", str(tmp_path / "a-file" / "cache"))
    calls = []
    with pytest.warns(UserWarning, match="could not keep"):
        arrays = data.generated("toy-1", maker(calls))
    assert calls == [1] and arrays["y"].tolist() == [2, 0, 1]


def test_a_failed_write_of_generated_arrays_leaves_no_partial_file(cache, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.warns(UserWarning, match="could not keep"):
        assert data.generated("toy-1", maker([]))["y"].tolist() == [2, 0, 1]
    assert list((cache / "generated").iterdir()) == []


# -- an unusable cache folder, and the temporary files of killed downloads ------------------------

def assert_unusable_cache_message(message: str, folder: Path) -> None:
    assert str(folder) in message and "not usable" in message
    assert "set NATGRAD_DATA to a writable folder" in message and "\n" not in message
    assert "Offline?" not in message and "by hand" not in message  # not a network failure


def test_a_regular_file_as_cache_folder_is_one_line_in_the_cli(cache, tmp_path, monkeypatch, capsys):
    from natgrad_impls import cli

    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("not a folder")
    monkeypatch.setenv("NATGRAD_DATA", str(not_a_folder))
    monkeypatch.setenv("NATGRAD_DATA_MIRROR", (tmp_path / "server").as_uri())
    with pytest.raises(SystemExit) as exit:
        cli.main(["run", "--task", "yacht", "--optimizer", "sgd", "--framework", "numpy", "--lr", "0.1",
                  "--steps", "1", "--out", str(tmp_path / "o.csv")])
    assert exit.value.code == cli.EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert_unusable_cache_message(err.strip(), not_a_folder)


@pytest.mark.parametrize("failing", ["mkdir", "mkstemp"])
def test_an_unusable_cache_folder_is_not_reported_as_offline(cache, tmp_path, monkeypatch, failing):
    url, sha = served(tmp_path, b"some bytes\n")

    def refuse(*args, **kwargs):
        if failing == "mkdir":  # as under /proc
            raise FileNotFoundError(2, "No such file or directory")
        raise PermissionError(13, "Permission denied")  # a read-only folder (tests may run as root)

    if failing == "mkdir":
        monkeypatch.setattr(Path, "mkdir", refuse)
    else:
        monkeypatch.setattr(data.tempfile, "mkstemp", refuse)
    with pytest.raises(DataUnavailable) as error:
        fetch(Resource("thing", url, sha, "sub/thing.bin", mirrors=(url,)))
    assert not isinstance(error.value, ChecksumMismatch)
    assert_unusable_cache_message(str(error.value), cache / "sub")  # the folder that cannot be written
    assert ("Permission denied" if failing == "mkstemp" else "No such file") in str(error.value)


# A file size limit stands in for a cache folder that fills up during a download (a full disk, a
# quota), in a subprocess so that the limit stays there; the file is 3 MiB, the limit 1 MiB.
FILLS_UP = r"""
import hashlib, os, resource, signal, sys, urllib.request
from pathlib import Path
from natgrad_impls import data

served, cache = Path(sys.argv[1]), Path(sys.argv[2])
opened, real = [], urllib.request.urlopen
urllib.request.urlopen = lambda url, *args, **kwargs: opened.append(url) or real(url, *args, **kwargs)
urls = [(served / name).as_uri() for name in ("first.bin", "second.bin")]
sha = hashlib.sha256((served / "first.bin").read_bytes()).hexdigest()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    data.fetch(data.Resource("big", urls[0], sha, "big.bin", mirrors=(urls[1],)))
except data.DataUnavailable as error:
    print(len(opened), type(error).__name__, error)
"""


def test_a_cache_folder_that_fills_up_during_a_download_is_not_reported_as_offline(cache, tmp_path):
    """Writing, not only creating, the temporary file can fail on the cache folder's account: that is
    no reason to download the file again from the next URL into the same folder."""
    content = os.urandom(3 << 20)
    for name in ("first.bin", "second.bin"):
        served(tmp_path, content, name=name)
    done = subprocess.run([sys.executable, "-c", FILLS_UP, str(tmp_path / "server"), str(cache)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    opened, kind, message = done.stdout.strip().split(" ", 2)
    assert (opened, kind) == ("1", "DataUnavailable")  # the second URL would fill the same folder
    assert_unusable_cache_message(message, cache)
    assert os.strerror(errno.EFBIG) in message  # the system's reason
    assert files_in(cache) == []


def test_a_cache_folder_that_cannot_take_the_renamed_file_is_not_reported_as_offline(cache, tmp_path, monkeypatch):
    url, sha = served(tmp_path, b"some bytes\n")
    opened = opened_urls(monkeypatch)

    def quota(*args, **kwargs):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(data.os, "replace", quota)
    with pytest.raises(DataUnavailable) as error:
        fetch(Resource("thing", url, sha, "sub/thing.bin", mirrors=(url,)))
    assert len(opened) == 1 and not isinstance(error.value, ChecksumMismatch)
    assert_unusable_cache_message(str(error.value), cache / "sub")
    assert os.strerror(errno.EDQUOT) in str(error.value)
    assert files_in(cache) == []


def test_a_download_removes_stale_temporary_files_only(cache, tmp_path):
    url, sha = served(tmp_path, b"some bytes\n")
    folder = cache / "sub"
    folder.mkdir(parents=True)
    now = time.time()
    ages = {
        ".thing.bin.killed.part": data.STALE_PART_AGE_S + 60,  # a killed download: removed
        ".other.bin.killed.part": 2 * data.STALE_PART_AGE_S,  # any download's: removed
        ".thing.bin.running.part": data.STALE_PART_AGE_S - 60,  # maybe downloading now: kept
        "notes.part": 2 * data.STALE_PART_AGE_S,  # not a temporary file of ours: kept
    }
    for name, age in ages.items():
        (folder / name).write_bytes(b"partial")
        os.utime(folder / name, (now - age, now - age))
    (cache / ".top.bin.killed.part").write_bytes(b"partial")  # another folder: not this download's
    os.utime(cache / ".top.bin.killed.part", (now - 2 * data.STALE_PART_AGE_S,) * 2)
    path = fetch(Resource("thing", url, sha, "sub/thing.bin"))
    assert files_in(cache) == sorted(
        [path, folder / ".thing.bin.running.part", folder / "notes.part", cache / ".top.bin.killed.part"]
    )


def test_the_temporary_file_of_a_killed_download_is_removed_once_stale(cache, tmp_path, monkeypatch):
    """A download writes to a temporary file beside the file (a rename is atomic only within one file
    system), hidden and named so that, left behind by a killed download, a later one removes it when stale."""
    url, sha = served(tmp_path, b"some bytes\n")
    during, real = [], urllib.request.urlopen

    class Killed(io.BytesIO):  # a first block, then the download dies
        def read1(self, size=-1):
            if self.tell():
                during.extend(files_in(cache))
                raise ConnectionResetError("killed")
            return super().read1(4)

    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: Killed(b"some bytes\n"))
    resource = Resource("thing", url, sha, "sub/thing.bin")
    with pytest.raises(DataUnavailable):
        fetch(resource)
    (temporary,) = during
    assert temporary.parent == cache / "sub"
    temporary.write_bytes(b"some")  # as a killed process leaves it (this one was removed on the error)
    old = time.time() - data.STALE_PART_AGE_S - 60
    os.utime(temporary, (old, old))
    monkeypatch.setattr(urllib.request, "urlopen", real)
    path = fetch(resource)
    assert files_in(cache) == [path]


# -- parsers ---------------------------------------------------------------------------------------

def test_read_libsvm_indices_are_one_based(tmp_path):
    """LIBSVM feature i is column i - 1: index 1 lands in the first column, n_features in the last."""
    path = tmp_path / "set"
    path.write_text("+1 1:0.5 3:-2 7:4\n-1 7:1\n+1 2:3\n")
    X, y = data.read_libsvm(path, n_features=7)
    np.testing.assert_array_equal(X, [[0.5, 0, -2, 0, 0, 0, 4], [0, 0, 0, 0, 0, 0, 1], [0, 3, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(y, [1, -1, 1])
    assert X.dtype == y.dtype == np.float64


@pytest.mark.parametrize("line", ["+1 0:1 3:2", "+1 1:1 8:2"])
def test_read_libsvm_refuses_indices_outside_1_to_n_features(tmp_path, line):
    """A `0:` would make scikit-learn's default guess 0-based indices and silently shift every column;
    LIBSVM files are 1-based, so it is an error that names the file, like an index above n_features."""
    path = tmp_path / "set"
    path.write_text(f"-1 2:1\n{line}\n")
    with pytest.raises(ValueError, match=re.escape(str(path))) as error:
        data.read_libsvm(path, n_features=7)
    assert "features 1 to 7" in str(error.value)


def idx_bytes(array: np.ndarray, type_code: int) -> bytes:
    """An IDX file: 2 zero bytes, the type code, the number of dimensions, the dimensions as
    big-endian int32, then the data, big-endian, in C order."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("header", [b"\x01\x00\x08\x01", b"\x00\x01\x08\x01", b"\x00\x00\x07\x01"])
def test_read_idx_refuses_a_file_without_the_formats_zero_bytes_and_type_code(tmp_path, header):
    (tmp_path / "bad").write_bytes(header + struct.pack(">i", 3) + bytes(3))
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "bad")


def test_read_idx_keeps_the_shape_order_and_type(tmp_path):
    """A non-square array shows a transposed or Fortran-order read (the last index is the fastest);
    every type code of the format, signed or not, big-endian; gzipped or not."""
    arrays = {
        "bytes": (np.arange(24, dtype=np.uint8).reshape(2, 3, 4), 0x08),
        "signed.gz": (np.array([-128, -1, 0, 127], np.int8), 0x09),
        "shorts": (np.array([[-300, 2], [1, 32767]], np.int16), 0x0B),
        "ints.gz": (np.array([[-5, 70000], [1, 2], [3, -(2**31)]], np.int32), 0x0C),
        "floats": (np.array([1.5, -2.25, 3e38], np.float32), 0x0D),
        "doubles.gz": (np.array([[0.1], [-1e300]]), 0x0E),
    }
    for name, (array, code) in arrays.items():
        content = idx_bytes(array, code)
        (tmp_path / name).write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
        read = data.read_idx(tmp_path / name)
        assert read.shape == array.shape, name
        assert (read.dtype.kind, read.dtype.itemsize) == (array.dtype.kind, array.dtype.itemsize), name
        np.testing.assert_array_equal(read, array, err_msg=name)
