"""Where an artifact is written: output checks, the staging folder, and a final placement that loses no data.

Rules (README "Safety"): edgepack never removes a path it did not create. ``-o`` may not be, or contain, the
model folder, the current directory, home or ``/``. ``--force`` replaces only a folder holding an edgepack
manifest (and nothing it does not list) or an empty folder. The artifact is built in a hidden sibling
``.NAME.partial-*`` folder marked as ours, and moved into place under an exclusive lock with a rename that
never replaces a folder that appeared meanwhile (``renameat2(RENAME_NOREPLACE)`` where the kernel has it).
Partial folders of dead exports to the same ``-o`` are removed on the next run; SIGINT, SIGTERM and SIGHUP
remove their own (see Termination for why the signal is recorded as well as raised).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from edgepack.errors import EdgepackError
from edgepack.runtime.runner import MANIFEST_NAME, artifact_files

log = logging.getLogger(__name__)

PARTIAL_MARKER = ".edgepack-partial"  # inside a staging folder: "pid hostname" of the export that owns it
MARKER_DRAFT = PARTIAL_MARKER + ".draft"  # the marker before its atomic rename
DRAFT_GRACE_S = 10.0  # a folder holding only a draft this old lost its export between mkdtemp and the rename
TERMINATING_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)  # SIGINT stays a KeyboardInterrupt; SIGKILL cannot be caught (the next run cleans up)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
# errno values that mean the user's disk or permissions, not a bug: reported as one line, exit 2.
DISK_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file size limit was reached",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


# ---------------------------------------------------------------------------------------------- checks


def protected_paths(model_dir: Path | None) -> dict[str, Path]:
    """Folders an ``-o`` may never be or contain, by the name the error message uses."""
    paths = {
        "the root folder": Path("/"),
        "your home folder": Path.home(),
        "the current directory": Path.cwd(),
    }
    if model_dir is not None:
        paths["the model folder"] = Path(model_dir)
    return {label: Path(os.path.realpath(p)) for label, p in paths.items()}


def check_output(out_dir: Path | str, model_dir: Path | None, force: bool) -> Path:
    """The absolute output path, or an EdgepackError naming why writing (or replacing) it is refused."""
    if not str(out_dir).strip():
        raise EdgepackError("-o is empty; pass the artifact folder to create, e.g. -o out/model")
    out = Path(os.path.abspath(os.path.expanduser(str(out_dir))))
    real = Path(os.path.realpath(out))
    for label, path in protected_paths(model_dir).items():
        if real == path or real in path.parents:
            verb = "is" if real == path else "contains"
            raise EdgepackError(
                f"-o {out_dir} {verb} {label} ({path}); pass a new folder for the artifact, e.g. -o out/model"
            )
    existing = next(p for p in [out, *out.parents] if p.exists() or p.is_symlink())
    if existing != out and not existing.is_dir():
        raise EdgepackError(f"cannot write to {out}: {existing} is a file, not a folder; pass another -o")
    if out.is_symlink():
        raise EdgepackError(
            f"-o {out} is a symbolic link; pass a real folder path (edgepack never replaces links)"
        )
    if out.exists() and not out.is_dir():
        raise EdgepackError(f"-o {out} is a file, not a folder; pass a folder path for the artifact")
    if out.is_dir() and not force:
        raise EdgepackError(
            f"output folder {out} already exists; pass --force to replace it (an edgepack artifact or an "
            "empty folder only) or choose another -o"
        )
    if out.is_dir():
        refuse_replacing(out)
    return out


def owned_files(folder: Path) -> list[str] | None:
    """The files of an edgepack artifact folder (its manifest's list + manifest.json), None if it is not one."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or "edgepack_version" not in manifest:
        return None
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(name, str) for name in files):
        return None
    return [*files, MANIFEST_NAME]


def refuse_replacing(folder: Path) -> None:
    """Raise unless ``folder`` is empty or an edgepack artifact holding nothing but what its manifest lists."""
    present = artifact_files(folder)
    if not present and not (folder / MANIFEST_NAME).exists():
        return
    owned = owned_files(folder)
    if owned is None:
        raise EdgepackError(
            f"{folder} is not an edgepack artifact (no edgepack manifest.json), so --force will not replace it; "
            "choose another -o, or empty the folder yourself"
        )
    extra = sorted(set(present) - set(owned))
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise EdgepackError(
            f"{folder} holds {shown}, not written by edgepack, so --force will not replace it; "
            "move those files out or choose another -o"
        )


def disk_error(exc: OSError, out: Path) -> EdgepackError | None:
    """One line for a full disk, a quota, a size limit or a permission problem while writing ``out``."""
    what = DISK_ERRORS.get(exc.errno or 0)
    if what is None:
        return None
    where = exc.filename or out
    return EdgepackError(
        f"cannot write to {where} ({what}); nothing was written: free space, fix permissions or pass another -o"
    )


# ---------------------------------------------------------------------------------------------- renames


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2) with ``flags``; False where libc or the file system lacks it, OSError on a real failure."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; FileExistsError if anything is at ``dst``, even an empty folder."""
    try:
        if _renameat2(src, dst, RENAME_NOREPLACE):
            return
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from e
        raise
    os.mkdir(dst)  # fallback: claim the name atomically, then rename onto our own empty folder
    try:
        os.rename(src, dst)
    except OSError as e:  # someone wrote into the claimed folder meanwhile: leave it to them
        with suppress(OSError):
            os.rmdir(dst)
        raise FileExistsError(errno.EEXIST, "exists", str(dst)) from e


def exchange(a: Path, b: Path) -> None:
    """Swap two folders atomically where the kernel can (RENAME_EXCHANGE), else with two renames."""
    if _renameat2(a, b, RENAME_EXCHANGE):
        return
    aside = b.with_name(f"{a.name}.swap")
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive flock on ``folder`` itself (serialises edgepack exports into one parent folder)."""
    try:
        import fcntl
    except ImportError:  # Windows: the no-replace rename alone protects the output
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def remove_owned(folder: Path, owned: list[str]) -> list[str]:
    """Delete the listed files of a replaced artifact and its then-empty folders; return what was kept.

    Only names found by walking the folder are candidates, so a manifest entry like ``../x`` deletes nothing.
    """
    for name in sorted(set(owned) & {*artifact_files(folder), MANIFEST_NAME}):
        path = folder / name
        if path.is_symlink() or path.is_file():
            path.unlink()
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        with suppress(OSError):
            sub.rmdir()
    kept = artifact_files(folder)
    if not kept and not (folder / MANIFEST_NAME).exists():
        folder.rmdir()
    return kept


def place(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished staging folder to ``out`` without ever replacing a folder edgepack may not replace."""
    with locked(out.parent):
        if not os.path.lexists(out):
            try:
                rename_noreplace(tmp, out)
                return
            except FileExistsError:
                pass
        if not force or out.is_symlink() or not out.is_dir():
            raise EdgepackError(
                f"{out} appeared while exporting (another program or export wrote it); nothing was replaced: "
                "choose another -o, or pass --force to replace an edgepack artifact"
            )
        refuse_replacing(out)  # re-check under the lock: the folder may have changed since the start
        owned = owned_files(out) or []
        exchange(tmp, out)  # out is the new artifact now, tmp the old one
        try:
            kept = remove_owned(tmp, owned)
        except OSError as e:
            log.warning("could not remove the replaced artifact's files in %s: %s", tmp, e)
            return
        if kept:
            log.warning(
                "%d files appeared in the replaced %s during the export; kept them in %s", len(kept), out, tmp
            )


# ---------------------------------------------------------------------------------------------- staging


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale(partial: Path) -> bool:
    """True for a staging folder of ``-o`` whose export is dead (marker pid gone), or an empty one."""
    if partial.is_symlink() or not partial.is_dir():
        return False
    marker = partial / PARTIAL_MARKER
    if not marker.is_file():  # empty, or killed before its marker was renamed into place
        entries = list(partial.iterdir())
        draft = partial / MARKER_DRAFT
        return not entries or (entries == [draft] and time.time() - draft.stat().st_mtime > DRAFT_GRACE_S)
    try:
        pid_text, host = marker.read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    return host == socket.gethostname() and pid != os.getpid() and not pid_alive(pid)


def clean_stale_partials(out: Path) -> None:
    """Remove staging folders that dead (killed) exports to the same ``-o`` left beside it."""
    if not out.parent.is_dir():
        return
    for partial in out.parent.iterdir():
        if partial.name.startswith(f".{out.name}.partial-") and stale(partial):
            log.info("removing %s, left by an export that was killed", partial)
            shutil.rmtree(partial, ignore_errors=True)


def make_parents(folder: Path) -> list[Path]:
    """mkdir -p ``folder``; return the folders created (deepest last) so a failure can remove them again."""
    missing = []
    for path in [folder, *folder.parents]:
        if path.exists() or path.is_symlink():
            break
        missing.append(path)
    folder.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def remove_created(created: list[Path]) -> None:
    for path in reversed(created):
        with suppress(OSError):
            path.rmdir()  # only while still empty


class Termination:
    """The terminating signal (SIGINT, SIGTERM, SIGHUP) an export received, kept apart from what its handler raises.

    Python runs a signal handler at whatever bytecode the main thread is on, and some callers swallow what it
    raises: a weakref or GC callback reports it as "Exception ignored" and carries on (seen in a loop of
    in-process exports, tests/test_bad_input.py reproduces it), as can a native extension that clears the error.
    The export then ran on to a complete artifact and exit 0 (CI, 2026-12-02). So the signal is also recorded here and checked between pipeline steps and
    before the artifact is placed. Once placing has begun (``closing``), a signal only is recorded: the
    placement and cleanup finish, and then the export exits 128 + signal with one line saying what is on disk.
    """

    signum: int | None = None
    closing = False
    outcome = "nothing was written"

    @classmethod
    def reset(cls) -> None:
        cls.signum, cls.closing, cls.outcome = None, False, "nothing was written"

    @classmethod
    def stop(cls) -> BaseException:
        """What a received signal raises: KeyboardInterrupt(what is on disk) for SIGINT, else SystemExit(128 + it)."""
        if cls.signum == signal.SIGINT:
            return KeyboardInterrupt(cls.outcome)
        return SystemExit(128 + cls.signum)

    @classmethod
    def check(cls) -> None:
        """Raise the signal's stop() if a terminating signal arrived, even if its handler's exception was lost."""
        if cls.signum is not None:
            raise cls.stop()


@contextmanager
def removed_on_sigterm() -> Iterator[None]:
    """SIGTERM/SIGHUP raise SystemExit(128 + signal), SIGINT KeyboardInterrupt, so the staging cleanup runs; old
    handlers come back after.

    On the way out a received signal is raised again, whatever became of the exception its handler raised:
    SIGTERM/SIGHUP print their one line here; SIGINT's KeyboardInterrupt carries what is on disk for the CLI's.
    """

    def on_signal(signum, frame):
        first = Termination.signum is None
        Termination.signum = Termination.signum or signum
        if first and not Termination.closing:
            raise Termination.stop()

    def unraisable(report) -> None:
        """A swallowed exit of ours is not reported: the one line comes on the way out."""
        if not (Termination.signum is not None and report.exc_type in (SystemExit, KeyboardInterrupt)):
            previous_hook(report)

    Termination.reset()
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    previous = {}
    try:
        for sig in TERMINATING_SIGNALS:
            previous[sig] = signal.signal(sig, on_signal)
    except ValueError:  # not the main thread: nothing to install
        pass
    try:
        yield
    finally:
        Termination.closing = True
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = previous_hook
        if Termination.signum is not None:
            if Termination.signum != signal.SIGINT:
                name = signal.Signals(Termination.signum).name
                print(f"edgepack: terminated ({name}); {Termination.outcome}", file=sys.stderr)
            raise Termination.stop()


@contextmanager
def staging_dir(out_dir: Path | str, force: bool, model_dir: Path | None = None) -> Iterator[Path]:
    """A marked temp folder beside ``out_dir``, moved into place on success and removed on any failure."""
    out = check_output(out_dir, model_dir, force)
    created: list[Path] = []
    tmp: Path | None = None
    placed = False
    with removed_on_sigterm():
        try:
            created = make_parents(out.parent)
            clean_stale_partials(out)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
            # Written aside and renamed: a marker is always complete, so a kill at any instant leaves either a
            # readable marker (cleaned by the next export once this pid is dead) or no marker (see stale()).
            (tmp / MARKER_DRAFT).write_text(f"{os.getpid()} {socket.gethostname()}\n")
            os.replace(tmp / MARKER_DRAFT, tmp / PARTIAL_MARKER)
            yield tmp
            Termination.check()  # a signal whose SystemExit was swallowed must not place the artifact
            Termination.closing = True  # from here a signal waits until the artifact is in place
            (tmp / PARTIAL_MARKER).unlink()
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the artifact gets the user's usual mode
            place(tmp, out, force)
            placed = True
            Termination.outcome = f"{out} was already complete"
        except OSError as e:
            error = disk_error(e, out)
            if error is None:
                raise
            raise error from e
        finally:
            Termination.closing = True  # a signal now must not cut the cleanup short
            if not placed:
                if tmp is not None and tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)  # ours: made by mkdtemp above, never swapped
                    Termination.outcome = "the partial artifact was removed"
                remove_created(created)
