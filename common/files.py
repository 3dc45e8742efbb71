"""Writing one file so that a crash never leaves half of it under its name, nor a fixed temporary name that two
writers could share: a unique temporary file in the same folder, flushed to disk, then renamed over the name."""
from __future__ import annotations

import glob
import os
import shutil
import tempfile
from pathlib import Path


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix(path: Path) -> str:
    """`.<name>.<pid>.`: the temporary files of `write_atomic` for `path`; the pid tells a dead writer's apart."""
    return f".{Path(path).name}.{os.getpid()}."


def _writer_alive(tmp: Path) -> bool:
    """Whether the process that made this temporary file (its pid is in the name) still runs, this one aside."""
    try:
        pid = int(tmp.name.rsplit(".", 3)[-3])
        os.kill(pid, 0)
        return pid != os.getpid()
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True


def remove_leftovers(path: Path) -> None:
    """The temporary files a writer of `path` killed before its rename left (plain files only, never a link)."""
    path = Path(path)
    for left in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if left.is_file() and not left.is_symlink() and not _writer_alive(left):
            left.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes | str | Path) -> None:
    """`data` (bytes, text, or a file whose bytes are copied) in `path`, written whole or not at all. `os.replace`
    renames over the name itself: an existing symbolic link there is replaced, never followed (callers that must
    keep a link check first). The file gets the permissions a new file gets (umask), as any output does; what a
    killed earlier writer of `path` left is removed first."""
    path = Path(path)
    remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, str):
                f.write(data.encode())
            elif isinstance(data, (bytes, bytearray)):
                f.write(data)
            else:
                with open(data, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 20)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """The folder's entries (a rename) on disk too; a file system that cannot sync a folder is left as it is."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
