"""The console of every command: which log lines show, and how a refusal ends a command.

Libraries' INFO lines (JAX, Orbax, TFDS, TensorFlow, clu) show only with `--verbosity=1`
(`quiet_library_logs`); the echo of abandoned checkpoint reads and writes and of failed
asynchronous log writes is dropped, since the failure itself is reported once; a `UserError`
ends a command with one line that says what to change (`exit_on_user_error`); an OS-level
failure is told by its cause (`os_error_cause`, `error_summary`).
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import logging as pylogging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator

from absl import logging as absl_logging

from ddpm_jax.core.errors import UserError

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _EchoOfLogWriteFilter(pylogging.Filter):
    """Drops clu's traceback of a failed asynchronous TensorBoard write: the write's error
    reaches the run, which stops with one line naming the cause."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return not (record.pathname.endswith(os.path.join("clu", "asynclib.py"))
                    and record.getMessage().startswith("Error in producer thread"))


class _LibraryInfoFilter(pylogging.Filter):
    """Passes every record of ddpm_jax, and other code's only from WARNING up."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or record.pathname.startswith(_PACKAGE_DIR)


def quiet_library_logs(verbosity: int = 0) -> None:
    """Shows libraries' INFO lines only at `verbosity` >= 1 (absl's --verbosity): JAX's
    backend probing, Orbax's per-file lines, TFDS's, clu's metric echo and parameter table,
    TensorFlow's C++ start-up lines. Orbax's error tracebacks are always dropped: a failed
    save is reported once, with its cause."""
    hide_orbax_info()
    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, _EchoOfLogWriteFilter) for f in handler.filters):
        handler.addFilter(_EchoOfLogWriteFilter())
    if verbosity >= 1:
        return
    if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
        handler.addFilter(_LibraryInfoFilter())
    global _quiet
    _quiet = True


_quiet = False  # set by quiet_library_logs


def tensorflow_installed() -> bool:
    """Whether TensorFlow (the `tfds` extra) can be imported, without importing it."""
    if "tensorflow" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except ImportError:  # an import hook that refuses it
        return False


def import_tensorflow() -> None:
    """Imports TensorFlow where a part needs it (TFDS, to build a data set). In a quieted
    command, the C++ start-up lines it prints straight to stderr (oneDNN, CPU features),
    which TF_CPP_MIN_LOG_LEVEL no longer reaches, are hidden; if the import fails, what it
    printed is shown with the error."""
    if "tensorflow" in sys.modules:
        return
    if not _quiet:
        import tensorflow  # noqa: F401

        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# Orbax's warnings that a read-only manager (the readers' own choice) is read-only
_READ_ONLY_NOTICES = ("read_only=True", "directory is read only")


class _DropOrbaxInfo(pylogging.Filter):
    """Drops Orbax's INFO lines, its notices that a read-only manager is read-only, and the
    tracebacks of its errors (a failed save is reported once, by `save_failed`, with its
    cause); its other warnings and error lines stay."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname:
            return True
        record.exc_info, record.exc_text = None, None
        if any(notice in record.getMessage() for notice in _READ_ONLY_NOTICES):
            return False
        return record.levelno >= pylogging.WARNING


def hide_orbax_info() -> None:
    """Hides Orbax's INFO lines (it logs every file it writes), its errors' tracebacks and
    the echo of abandoned reads and writes from a command's output; its warnings and error
    lines still show."""
    absl_logging.get_absl_handler().addFilter(_DropOrbaxInfo())
    quiet_abandoned_io()
    # the coroutines of a failed save, collected at exit after the failure was reported
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                            category=RuntimeWarning)


class _DropAbandonedCheckpointIo(pylogging.Filter):
    """Drops asyncio's reports of the tasks of a failed save (they name Orbax) and of the
    futures of a failed read nobody awaited (their error is TensorStore's); other asyncio
    errors still show."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        message = record.getMessage()
        error = str(record.exc_info[1]) if record.exc_info else ""
        return not ("orbax" in message
                    or ("never retrieved" in message and "tensorstore_spec" in message + error))


def quiet_abandoned_io() -> None:
    """Silences the echo of a failed restore or save: when one array of a checkpoint fails,
    the reads or writes still in flight are abandoned and each prints an 'Event loop is
    closed' traceback, 'Exception ignored in' a coroutine, or asyncio's 'Future exception
    was never retrieved' with TensorStore's error. The failure itself is reported once."""
    if getattr(sys.unraisablehook, "_ddpm_jax_quiet", False):
        return
    pylogging.getLogger("asyncio").addFilter(_DropAbandonedCheckpointIo())

    def echo_of_failed_read(error: BaseException | None, obj: object = None) -> bool:
        return (isinstance(error, RuntimeError) and "Event loop is closed" in str(error)) or (
            "read_array" in getattr(obj, "__qualname__", "") + repr(obj))

    def unraisable(info, previous=sys.unraisablehook):
        if not echo_of_failed_read(info.exc_value, info.object):
            previous(info)

    def excepthook(kind, value, traceback, previous=sys.excepthook):
        if not echo_of_failed_read(value):
            previous(kind, value, traceback)

    unraisable._ddpm_jax_quiet = True
    sys.unraisablehook, sys.excepthook = unraisable, excepthook


_OS_ERROR_CAUSES = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                    errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                    errno.EROFS: "the file system is read-only", errno.EFBIG: "a file is too large"}


def os_error_cause(error: BaseException) -> str:
    """The OS-level reason in `error` or the errors it came from, as a person reads it
    ("error" when there is none). TensorStore and TensorFlow report it in their messages."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _OS_ERROR_CAUSES:
            where = f" ({error.filename})" if error.filename else ""
            return f"{_OS_ERROR_CAUSES[error.errno]}{where}"
        code = re.search(r"os_error_code='(\d+)'|\[Errno (\d+)\]", str(error))
        number = code and int(code.group(1) or code.group(2))
        if number in _OS_ERROR_CAUSES:
            return _OS_ERROR_CAUSES[number]
        for errno_value, cause in _OS_ERROR_CAUSES.items():
            if os.strerror(errno_value) in str(error):  # TensorFlow's file errors
                return cause
        error = error.__cause__ or error.__context__
    return "error"


def error_summary(error: BaseException) -> str:
    """`Type: first line of the message`, for one-line reports of long library errors."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0].strip()[:300] if lines else ''}"


@contextlib.contextmanager
def exit_on_user_error(command: str = "ddpm_jax") -> Iterator[None]:
    """Ends the command with `COMMAND: MESSAGE` (exit status 1, no traceback) when the body
    raises a `UserError`: input the user can change, and the message says what."""
    try:
        yield
    except UserError as error:
        sys.exit(f"{command}: {error}")
