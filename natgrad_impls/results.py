"""Result files (DESIGN 7, 8): long-format tables, `.csv` or `.parquet` by extension, written
atomically (a temporary file beside the target, then a rename), so that a killed run never leaves a
file that looks complete and a pipeline resumes by recomputing only what is missing.

    results.check_path("runs/wine.parquet")        # ValueError naming `out` unless .csv/.parquet
    results.check_writable("runs/wine.parquet")    # and unless its folder takes a file
    results.write(frame, "runs/wine.parquet")
    frame = results.read("runs/wine.parquet")

In CSV files missing values (hyperparameters an optimizer does not have, metrics that were not
measured) are empty fields, never zeros.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where a table is read: pandas costs every `natgrad` command 0.5 s, --help included
    import pandas as pd

FORMATS = (".csv", ".parquet")


def check_path(path, field: str = "out") -> Path:
    """`path` as a Path, or a ValueError naming `field` and the allowed extensions."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"{field}: {str(path)!r} must end in one of {', '.join(FORMATS)}")
    if path.exists() and path.is_dir():
        raise ValueError(f"{field}: {str(path)!r} is a folder, not a file ending in one of {', '.join(FORMATS)}")
    return path


def check_writable(path, field: str = "out") -> Path:
    """`check_path`, and a file written in its folder and removed, so that a long run learns before
    it starts, not after, that its result could not be saved (a ValueError naming `field` and why).
    Folders it had to make for the test are removed again (`write` makes them): a run that fails
    later, offline say, leaves nothing behind."""
    path = check_path(path, field)
    check_folder(path.parent, field, written=path)
    return path


def check_folder(folder, field: str, written=None) -> None:
    """That files can be written in `folder` (`check_writable`'s test; a ValueError naming `field`,
    and `written`, the file to be written there, where given), making no folder that stays."""
    folder = Path(folder)
    shown = Path(written) if written else folder
    what = f"cannot write {str(written)!r}" if written else f"cannot write in {str(folder)!r}"
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{field}: {what} ({str(folder)!r} is a file, not a folder)")
    made = [f for f in [folder, *folder.parents] if not f.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=f".{shown.name}.", suffix=".part")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"{field}: {what} ({error.strerror or error})") from None
    finally:
        for f in made:  # innermost first
            try:
                f.rmdir()
            except OSError:
                pass  # never made, or another process put something there meanwhile


def write(frame: pd.DataFrame, path) -> Path:
    """Write `frame` to `path` (format by extension) through a temporary file and a rename."""
    path = check_path(path)
    if path.suffix.lower() == ".csv":
        return atomic(path, lambda temp: frame.to_csv(temp, index=False))
    return atomic(path, lambda temp: frame.to_parquet(temp, index=False))


def write_text(text: str, path) -> Path:
    """Write `text` to `path` atomically (captions, JSON settings)."""
    return atomic(Path(path), lambda temp: Path(temp).write_text(text))


# What `atomic` and the data cache's downloads leave: readable by all (a shared results or cache
# folder on a cluster), writable by the owner.
SHARED_FILE_MODE = 0o644


def atomic(path: Path, write) -> Path:
    """Call `write(temp)` on a hidden temporary file `.NAME.*.part` beside `path`, then rename it to
    `path`: a reader (or a resumed pipeline) sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(handle)
    try:
        write(temp)
        with open(temp, "rb") as handle:  # on disk before the rename: after a crash, whole or absent
            os.fsync(handle.fileno())
        os.chmod(temp, SHARED_FILE_MODE)  # mkstemp makes owner-only files; results are for sharing
        os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)
    return path


# A result file is written in seconds: a temporary of `atomic` this old was abandoned.
STALE_WRITE_AGE_S = 3600


def remove_stale_temporaries(folder, older_than_s: float, recursive: bool = False, name: str | None = None) -> None:
    """Remove the hidden `.NAME.*.part` temporaries (of `atomic`, or of a download) in `folder`, and
    in its subfolders, hidden ones too, when `recursive`, that are older than `older_than_s`; only
    those of the file `name` where given. A process killed hard (SIGKILL, a lost node) leaves its
    temporary behind, but a younger one may be another process's, still writing."""
    import glob
    import time

    pattern = f".{glob.escape(name)}.*.part" if name else ".*.part"
    for part in Path(folder).glob(f"**/{pattern}" if recursive else pattern):
        try:
            if part.is_file() and time.time() - part.stat().st_mtime > older_than_s:
                part.unlink()
        except OSError:
            pass  # renamed into place or removed by that other process meanwhile


def read(path) -> pd.DataFrame:
    import pandas as pd

    path = check_path(path, "path")
    return pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)


class Stopped(SystemExit):
    """A job stopped by SIGTERM: exits with 128 + the signal's number, as the shell reports it."""


@contextlib.contextmanager
def _descriptors_to(log):
    """File descriptors 1 and 2 onto `log` within the block: what torch, XLA and the C libraries
    write (warnings, an abort's message) bypasses Python's sys.stdout and sys.stderr."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        yield
    finally:
        log.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


@contextlib.contextmanager
def job_log(path):
    """A pipeline job's body with its stdout and stderr in the log file `path`, and the traceback
    of an error too (written before the file closes, then raised again): else the log Snakemake
    points to is empty and the traceback lands on its console, or a cluster's job output. SIGTERM
    (Snakemake stopping its jobs, a cluster's time limit) unwinds like an error, so that a result
    being written removes its temporary file and the log says why the job ended."""
    import signal
    import threading

    def stop(signum, frame):
        raise Stopped(128 + signum)

    with open(path, "w", buffering=1) as log, _descriptors_to(log), contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        main = threading.current_thread() is threading.main_thread()  # only it may set a handler
        previous = signal.signal(signal.SIGTERM, stop) if main else None
        try:
            yield log
        except Stopped as stopped:
            print(f"stopped by SIGTERM (exit status {stopped.code})", file=log)
            raise
        except BaseException:
            traceback.print_exc(file=log)
            raise
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)

