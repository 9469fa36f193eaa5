"""CURVE keys for the mesh: make them, load a process's own, and refuse peers whose key is not listed.

`make_keys(DIR, boards)` writes one certificate pair per board and per client (zmq.auth format:
NAME.key holds the public key, NAME.key_secret both) and DIR/boards.json, an inventory listing every
public key. Copy boards.json and boardK.key_secret to board K; clients get client.key_secret.
"""
from __future__ import annotations

import logging
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from ...errors import MeshError
from .peers import BoardAddress, Inventory, localhost_inventory

log = logging.getLogger(__name__)


def make_keys(out: Path | str, boards: int, clients: tuple[str, ...] = ("client",),
              inventory: Inventory | None = None) -> Path:
    """Certificates for `boards` boards and the named clients in `out`; returns the inventory written."""
    if not zmq.has("curve"):
        raise MeshError("this libzmq has no CURVE support; install pyzmq wheels (they bundle libsodium)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = inventory or localhost_inventory(boards)
    listed = []
    for entry in base.boards:
        public, _ = _create(out, f"board{entry.id}")
        listed.append(BoardAddress(entry.id, entry.host, entry.port, public))
    keyed = Inventory(listed, {name: _create(out, name)[0] for name in clients}, str(out))
    return keyed.save(out / "boards.json")


def _create(out: Path, name: str) -> tuple[bytes, bytes]:
    _, secret_file = zmq.auth.create_certificates(str(out), name)
    Path(secret_file).chmod(0o600)
    return zmq.auth.load_certificate(secret_file)


def load_secret_key(path: Path | str | None, who: str) -> tuple[bytes, bytes]:
    """(public, secret) from a .key_secret file; the mesh needs one when the inventory has keys."""
    if path is None:
        raise MeshError(f"the board inventory has CURVE keys, so {who} needs its secret key: pass "
                              f"--key FILE.key_secret (made by `robustpart keys`)")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise MeshError(f"cannot read secret key {path}: {exc}") from exc
    if not secret:
        raise MeshError(f"{path} holds a public key only; give the .key_secret file")
    return public, secret


class _Allowed:
    """zmq.auth credentials provider: accept exactly the listed public keys (Z85)."""

    def __init__(self, keys: set[bytes]):
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:      # pyzmq passes the key Z85-encoded
        allowed = key in self.keys
        if not allowed:
            log.warning("refused a connection with an unlisted CURVE key %s", key.decode())
        return allowed


def start_authenticator(context: zmq.Context, inventory: Inventory) -> ThreadAuthenticator:
    """A ZAP handler accepting only the inventory's boards and clients; start it before binding."""
    auth = ThreadAuthenticator(context, log=logging.getLogger("robustpart.mesh.auth"))
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=_Allowed(inventory.authorised_keys()))
    return auth
