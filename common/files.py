"""Writing one file so that a crash never leaves half of it under its name, nor a fixed temporary name that two
writers could share: a unique temporary file in the same folder, flushed to disk, then renamed over the name."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_prefix(path: Path) -> str:
    """`.<name>.tmp-`: the prefix of `write_atomic`'s temporary files for `path` (what a killed writer leaves)."""
    return f".{Path(path).name}.tmp-"


def write_atomic(path: Path, data: bytes | Path) -> None:
    """`data` (bytes, or a file whose bytes are copied) in `path`, written whole or not at all. `os.replace` renames
    over the name itself: an existing symbolic link there is replaced, never followed (callers that must keep a
    link check first). The file gets the permissions a new file gets (umask), as any output does."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path))
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, (bytes, bytearray)):
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
