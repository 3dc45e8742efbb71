"""Writing an export into a folder that may hold a person's files (ComfyUI's models/loras, the project itself).

The export adds its files beside what is there. A file of the same name is replaced only when it is this project's
earlier export of the same checkpoint (the folder's export.json lists it, with the sha256 the file still has, and
names the same source LoRA), when its bytes are already what would be written, or with `overwrite=true`; anything
else is refused before a byte is written. A folder is never renamed or removed, a symbolic link never written
through nor replaced, and each file is written whole (common/files.py), export.json last. A sweep's own
`champion/` folder (`own=True`) holds one export, the latest: a new one replaces the files there and removes those
the previous export listed and this one does not write."""
from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from common.files import write_atomic
from common.lorafile import EXPORT_RECORD, LORA_FILE, sha256_file

Content = bytes | Path  # a file's bytes, or a file whose bytes are copied


class ExportError(UserError):
    """The export cannot be written where it was asked to go; the message names the path and the fix."""


@dataclass(frozen=True)
class Earlier:
    """What the export.json already in a folder says an earlier export of this project wrote there."""

    files: dict[str, str]  # name -> sha256 as written
    lora_sha256: str | None  # the checkpoint's LoRA it was exported from
    source: str

    @classmethod
    def read(cls, folder: Path) -> Earlier | None:
        path = folder / EXPORT_RECORD
        try:
            rec = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
        except (OSError, ValueError):
            return None
        if not isinstance(rec, dict) or not isinstance(rec.get("files"), dict) or "source" not in rec:
            return None
        files = {str(k): str(v) for k, v in rec["files"].items()}
        # an export.json written before lora_sha256 was recorded: its diffusers copy is the checkpoint's own bytes
        return cls(files, rec.get("lora_sha256") or files.get(LORA_FILE), str(rec["source"]))


def write_export(out: Path, contents: dict[str, Content], lora_sha256: str, overwrite: bool = False,
                 own: bool = False) -> None:
    """Write `contents` ({file name: content}, export.json among them) into the folder `out`, made if missing.
    Raises ExportError, before writing anything, for a file it may not replace or a folder it cannot write."""
    ready(out)
    earlier = Earlier.read(out)
    new = {name: sha256_of(data) for name, data in contents.items()}
    refused = [why for name in contents if (why := conflict(out / name, new[name], earlier, lora_sha256,
                                                           overwrite or own))]
    if refused:
        raise ExportError(refusal(out, refused))
    try:
        for name, data in contents.items():
            if name != EXPORT_RECORD:
                write_atomic(out / name, data)
        if own and earlier is not None:
            remove_stale(out, earlier, set(contents))
        if EXPORT_RECORD in contents:  # last: until it is written, the files are recognised by the earlier record
            write_atomic(out / EXPORT_RECORD, contents[EXPORT_RECORD])
    except OSError as exc:
        raise ExportError(cannot_write(Path(exc.filename or out), exc) + " (the files written before are whole; "
                          "the same command writes the rest once that is fixed)") from None


def ready(out: Path) -> None:
    """`out` is a folder this process can write in (made, parents too, if missing); else ExportError with the fix."""
    if os.path.lexists(out) and not out.is_dir():
        what = "a symbolic link to nothing" if out.is_symlink() else "a file"
        raise ExportError(f"out={out} is {what}, not a folder: give the folder to write the export into, "
                          "out=<folder>")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(cannot_write(Path(exc.filename or out), exc)) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ExportError(cannot_write(out, PermissionError(errno.EACCES, os.strerror(errno.EACCES))))


def cannot_write(path: Path, exc: OSError) -> str:
    fix = {errno.EACCES: f"make it writable (chmod u+w {path}) or choose a folder you can write in: out=<folder>",
           errno.EPERM: f"make it writable (chmod u+w {path}) or choose a folder you can write in: out=<folder>",
           errno.EROFS: "it is on a read-only file system: choose another folder, out=<folder>",
           errno.ENOSPC: "the disk is full: free some space, or choose a folder on another disk: out=<folder>",
           }.get(exc.errno, "choose another folder: out=<folder>")
    return f"cannot write the export in {path}: {exc.strerror or exc}; {fix}"


def conflict(path: Path, new_sha: str, earlier: Earlier | None, lora_sha256: str, overwrite: bool) -> str | None:
    """Why the entry at `path` may not be replaced by a file of sha256 `new_sha`; None if it may (or is absent)."""
    if not os.path.lexists(path):
        return None
    if path.is_symlink():
        return f"{path.name} (a symbolic link: never written through or replaced)"
    if not path.is_file():
        return f"{path.name} (a {'folder' if path.is_dir() else 'special file'}: never replaced)"
    if overwrite:
        return None
    sha = sha256_file(path)
    if sha == new_sha:  # already these bytes: writing them again loses nothing
        return None
    ours = earlier is not None and (path.name == EXPORT_RECORD or earlier.files.get(path.name) == sha)
    if ours and earlier.lora_sha256 == lora_sha256:
        return None
    if ours:
        return f"{path.name} (the export of another checkpoint, from {earlier.source})"
    return f"{path.name} (not written by this project's export, or changed since)"


def refusal(out: Path, refused: list[str]) -> str:
    fixable = [r for r in refused if "never" not in r]
    fix = "Export into another folder (out=<new folder>)"
    if fixable:
        fix += ", or pass overwrite=true to replace " + ("them" if len(fixable) > 1 else "it")
    if len(fixable) < len(refused):
        fix += " (a symbolic link or folder of the same name is never replaced: move it away first)"
    return (f"{out} already holds what this export would replace: {'; '.join(refused)}. Nothing was written. "
            f"{fix}.")


def remove_stale(out: Path, earlier: Earlier, keep: set[str]) -> None:
    """Files the previous export of an own folder listed, still as it wrote them, that this export does not write."""
    for name, sha in earlier.files.items():
        path = out / name
        if (name in keep or name != Path(name).name or name in ("", ".", "..") or path.is_symlink()
                or not path.is_file()):
            continue
        if sha256_file(path) == sha:
            path.unlink()


def sha256_of(data: Content) -> str:
    return hashlib.sha256(data).hexdigest() if isinstance(data, (bytes, bytearray)) else sha256_file(data)
