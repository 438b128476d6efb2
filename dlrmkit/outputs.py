"""Output files: checked before any work, written under a temporary name and then renamed.

Permission bits cannot tell whether a file can be created (root passes every `os.access`
check, and /proc or a read-only mount refuse writes anyway), so `output_problem` tries it:
it creates a temporary file in the folder and removes it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

_PARTIAL: set = set()  # temporary files and folders of the outputs being written now


class OutputError(ValueError):
    """An output file that cannot be written; the message is one line naming it."""


def output_problem(path: str) -> str | None:
    """Why a file cannot be written at `path`, or None when it can (tried in its folder: missing folders are
    created for the try and removed after it, so that a run stopped before writing leaves none behind)."""
    if not path:
        return "empty file name"
    if os.path.isdir(path):
        return "is a directory"
    if path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)) or os.path.basename(path) in (".", ".."):
        return "is a directory name"  # a folder's name, existing or not
    if os.path.exists(path) and not os.path.isfile(path):
        return "is not a regular file (a device, pipe or socket would be replaced by the output)"
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.exists(directory) and not os.path.isdir(directory):
        return f"{directory} is not a folder"
    created = []  # the missing folders, deepest first
    folder = directory
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        created.append(folder)
        folder = os.path.dirname(folder)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        return f"cannot create folder {directory} ({e.strerror or e})"
    try:
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-check", dir=directory)
        except OSError as e:
            return f"cannot create a file in {directory} ({e.strerror or e})"
        os.close(fd)
        os.remove(probe)
        return None
    finally:
        for folder in created:
            with contextlib.suppress(OSError):  # not empty: another process writes there now
                os.rmdir(folder)


def check_output(what: str, path: str, example: str | None = None):
    """Raises OutputError("<what> <path>: ...") when a file cannot be written at `path`; `example`:
    a file name to suggest when `path` is a directory."""
    problem = output_problem(path)
    if problem is None:
        return
    if problem in ("is a directory", "is a directory name") and example:
        problem += f"; give a file name (e.g. {os.path.join(path, example)})"
    raise OutputError(f"{what} {path}: {problem}")


@contextlib.contextmanager
def partial_output(path: str):
    """While the body runs, `path` (a temporary file or folder of an output being written) is one that
    `remove_partial_outputs` removes."""
    _PARTIAL.add(path)
    try:
        yield path
    finally:
        _PARTIAL.discard(path)


def remove_partial_outputs() -> None:
    """Removes the temporary files and folders of the outputs being written: for a process about to die by a
    signal without unwinding (a half-written checkpoint can be hundreds of MB)."""
    for path in list(_PARTIAL):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)


def write_atomically(what: str, path: str, write):
    """write(tmp_path), then rename to `path`: never a half-written file under its name; a failure is
    an OutputError naming `what` and `path` (the temporary file removed)."""
    problem = output_problem(path)
    if problem is not None:  # checked again: the path may have changed since the run started
        raise OutputError(f"{what} {path}: {problem}")
    target = os.path.realpath(path)  # through a symbolic link to its target, not over the link
    directory = os.path.dirname(target)
    tmp = os.path.join(directory, f".{os.path.basename(target)}.tmp{os.getpid()}")
    with partial_output(tmp):
        try:
            os.makedirs(directory, exist_ok=True)
            write(tmp)
            if os.path.exists(target):  # a replaced file keeps its permissions
                os.chmod(tmp, os.stat(target).st_mode & 0o7777)
            os.replace(tmp, target)
        except (OSError, RuntimeError) as e:  # torch.save reports a file it cannot open as a RuntimeError
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            reason = e.strerror if isinstance(e, OSError) and e.strerror else text
            if isinstance(e, RuntimeError) and "unexpected pos" in text:  # torch.save's short write
                free = shutil.disk_usage(directory).free if os.path.isdir(directory) else 0
                reason = (f"the write stopped short: no space left on the device ({free:,} bytes free) or a file "
                          "size limit (ulimit -f)")
            raise OutputError(f"{what} {path}: cannot write ({reason})") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def save_figure(what: str, path: str, figure) -> None:
    """A matplotlib figure as a PNG at `path`, written atomically (`write_atomically`), and closed
    whatever happens; OutputError naming `what` and `path` when it cannot be written."""
    import matplotlib.pyplot as plt

    try:
        write_atomically(what, path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(figure)
