"""`robustpart pack BUNDLE --device K`: what board K needs of a bundle, and nothing else.

A pack holds the manifest, board K's shards, the shards of every board it backs up (it loads them when it
takes that board over: runtime/takeover.py), the head, the adapters and the compensation data where the
bundle has them, the inventory (boards.json), the technique choices (techniques.json) where the bundle has
them and, if given, the board's CURVE secret key; and PACK.json,
the SHA-256 of every file in it. Written as a directory (atomically, as a bundle is: bundle.write_atomically)
or, for a name ending in .tar.gz, an archive (a temporary file renamed into place); `unpack` extracts an
archive (refusing anything but plain files inside the folder) and checks every file against PACK.json
before the folder is put in place.
"""
from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from pathlib import Path

from ..bundle import write_atomically
from ..errors import BundleError
from .files import sha256_file, write_file_atomically
from .manifest import MANIFEST, bundle_files, load_manifest
from .techniques import TECHNIQUES_FILE

PACK_INDEX = "PACK.json"
INVENTORY = "boards.json"


def board_files(manifest, device: int) -> list[str]:
    """The bundle files board `device` reads: its own and the boards' it backs up, the shared data."""
    boards = [device] + [d for d, holders in enumerate(manifest.backup_lists()) if device in holders]
    return [MANIFEST] + [name for name, _ in bundle_files(manifest, boards)]


def pack_board(bundle: Path | str, device: int, out: Path | str, peers: Path | str | None = None,
               key: Path | str | None = None) -> Path:
    """Write board `device`'s pack of `bundle` to `out` (a directory, or a .tar.gz archive)."""
    bundle, out = Path(bundle), Path(out)
    manifest = load_manifest(bundle, boards=[device])        # checks the board's own files' hashes
    sources = {name: bundle / name for name in board_files(manifest, device)}
    inventory = Path(peers) if peers is not None else bundle / INVENTORY
    if inventory.is_file():
        sources[INVENTORY] = inventory
    if (bundle / TECHNIQUES_FILE).is_file():                 # the technique chosen per failure set
        sources[TECHNIQUES_FILE] = bundle / TECHNIQUES_FILE
    if key is not None:
        sources[f"board{device}.key_secret"] = Path(key)

    def fill(folder: Path) -> None:
        index = {}
        for name, source in sources.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
            index[name] = sha256_file(folder / name)
        (folder / PACK_INDEX).write_text(json.dumps({"board": device, "boards": manifest.boards, "files": index},
                                                    indent=1))

    if not out.name.endswith(".tar.gz"):
        return write_atomically(out, fill)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as staging:
        fill(Path(staging))

        def archive(tmp: Path) -> None:
            with tarfile.open(tmp, "w:gz") as tar:
                for name in sorted(p.relative_to(staging).as_posix() for p in Path(staging).rglob("*")
                                   if p.is_file()):
                    tar.add(Path(staging) / name, arcname=name)

        return write_file_atomically(out, archive)


def check_pack(folder: Path | str) -> dict:
    """PACK.json of `folder`, every file it lists present with its SHA-256; returns the index."""
    folder = Path(folder)
    try:
        index = json.loads((folder / PACK_INDEX).read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{folder / PACK_INDEX} is missing or unreadable ({exc}); pack the board again") from exc
    for name, digest in index["files"].items():
        path = folder / name
        if not path.is_file():
            raise BundleError(f"pack file {path} is missing; pack the board again")
        if sha256_file(path) != digest:
            raise BundleError(f"pack file {path} does not match its SHA-256 in {PACK_INDEX} (corrupted in "
                              f"transfer?); copy the pack again")
    return index


def unpack(archive: Path | str, out: Path | str) -> Path:
    """Extract a .tar.gz pack to `out`, checked, then put in place (an earlier pack there is replaced)."""
    archive = Path(archive)

    def extract(folder: Path) -> None:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = tar.getmembers()
                for m in members:                            # plain files and folders inside it, nothing else
                    if not (m.isfile() or m.isdir()) or Path(m.name).is_absolute() or ".." in Path(m.name).parts:
                        raise BundleError(f"{archive}: member {m.name!r} is not a file inside the pack; "
                                          f"pack the board again")
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}   # Python >= 3.11.4
                tar.extractall(folder, members, **safe)
        except (tarfile.TarError, OSError) as exc:
            raise BundleError(f"{archive} is not a readable pack ({exc}); pack the board again") from exc
        check_pack(folder)

    return write_atomically(Path(out), extract)
