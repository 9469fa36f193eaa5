"""The board inventory: board ids, where each one listens, and (optionally) CURVE public keys.

Sources, first found wins:
  1. `--peers FILE`: a JSON inventory (format below);
  2. `--peers host:port,host:port,...`: board k listens at the k-th address;
  3. `boards.json` next to the bundle's manifest.json;
  4. localhost defaults: board k listens on 127.0.0.1:(5550 + k), so `robustpart serve B --device K`
     for K = 0..N-1 plus `robustpart run B` work on one machine with no configuration.

    {"boards": [{"id": 0, "address": "10.0.0.10:5550", "public_key": "<40-char Z85, optional>"}, ...],
     "clients": [{"name": "laptop", "public_key": "<Z85>"}]}        # optional: authorised clients

With public keys the mesh uses CURVE: every board is a CURVE server and accepts only the boards and
clients listed here; each process brings its own secret key file (`robustpart keys` makes them).
"""
from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import MeshError

INVENTORY_FILE = "boards.json"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_BASE_PORT = 5550


@dataclass(frozen=True)
class BoardAddress:
    id: int
    host: str
    port: int
    public_key: bytes | None = None

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class Inventory:
    boards: list[BoardAddress]
    clients: dict[str, bytes] = field(default_factory=dict)
    source: str = "localhost defaults"

    @property
    def curve(self) -> bool:
        return any(b.public_key for b in self.boards)

    def board(self, board: int) -> BoardAddress:
        return self.boards[board]

    def authorised_keys(self) -> set[bytes]:
        return {b.public_key for b in self.boards if b.public_key} | set(self.clients.values())

    def bind_endpoint(self, board: int) -> str:
        """Where board `board` listens by default: its own address if loopback, else every interface
        (a board's LAN address may be assigned by DHCP or NAT)."""
        entry = self.boards[board]
        try:
            loopback = ipaddress.ip_address(entry.host).is_loopback
        except ValueError:
            loopback = entry.host == "localhost"
        return entry.endpoint if loopback else f"tcp://0.0.0.0:{entry.port}"

    def to_json(self) -> dict:
        data = {"boards": [{"id": b.id, "address": b.address,
                            **({"public_key": b.public_key.decode()} if b.public_key else {})} for b in self.boards]}
        if self.clients:
            data["clients"] = [{"name": n, "public_key": k.decode()} for n, k in self.clients.items()]
        return data

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path


def localhost_inventory(boards: int, base_port: int = DEFAULT_BASE_PORT, host: str = DEFAULT_HOST) -> Inventory:
    return Inventory([BoardAddress(k, host, base_port + k) for k in range(boards)])


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:             # a name too long for the file system, say
        return False


def _parse_address(text: str, where: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise MeshError(f"{where}: address {text!r} is not host:port (e.g. 10.0.0.10:5550)")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 < number < 65536:
        raise MeshError(f"{where}: port {port!r} in {text!r} is not a port number (1..65535)")
    return host.strip("[]"), number


def _parse_key(value, where: str) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) != 40:
        raise MeshError(f"{where}: public_key must be a 40-character Z85 string (see `robustpart keys`)")
    return value.encode()


def _from_json(path: Path) -> Inventory:
    try:
        data = json.loads(path.read_text())
        entries = data["boards"]
    except (OSError, ValueError) as exc:
        raise MeshError(f"cannot read board inventory {path}: {exc}") from exc
    except (KeyError, TypeError):
        raise MeshError(f"board inventory {path} needs a \"boards\" list of {{id, address}}") from None
    boards = []
    if not isinstance(entries, list):
        raise MeshError(f"board inventory {path} needs a \"boards\" list of {{id, address}}")
    for i, entry in enumerate(entries):
        where = f"{path}: boards[{i}]"
        if not isinstance(entry, dict) or "id" not in entry or "address" not in entry:
            raise MeshError(f"{where} needs \"id\" and \"address\" (host:port)")
        host, port = _parse_address(str(entry["address"]), where)
        try:
            board = int(entry["id"])
        except (TypeError, ValueError):
            raise MeshError(f"{where}: \"id\" must be an integer board id, got {entry['id']!r}") from None
        boards.append(BoardAddress(board, host, port, _parse_key(entry.get("public_key"), where)))
    clients = {}
    clients_list = data.get("clients", [])
    if not isinstance(clients_list, list):
        raise MeshError(f"board inventory {path}: \"clients\" must be a list of {{name, public_key}}")
    for i, entry in enumerate(clients_list):
        where = f"{path}: clients[{i}]"
        if not isinstance(entry, dict) or "public_key" not in entry:
            raise MeshError(f"{where} needs a \"public_key\"")
        clients[str(entry.get("name", f"client{i}"))] = _parse_key(entry["public_key"], where)
    boards.sort(key=lambda b: b.id)
    _refuse_shared_addresses(boards, str(path))
    return Inventory(boards, clients, str(path))


def _refuse_shared_addresses(boards: list[BoardAddress], where: str) -> None:
    seen: dict[str, int] = {}
    for b in boards:
        if b.address in seen and seen[b.address] != b.id:
            raise MeshError(f"{where}: boards {seen[b.address]} and {b.id} both listen at {b.address}; give "
                                  f"every board its own host:port")
        seen[b.address] = b.id


def is_address_list(text: str) -> bool:
    """`--peers` text that is a host:port list rather than a file name: it has a comma, or it is one host:port.
    Such text is never looked up as a file (a list of 20 boards is longer than a file name may be)."""
    text = text.strip()
    return "," in text or _ADDRESS.fullmatch(text) is not None


_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s/\\:,\[\]]+|[0-9A-Fa-f:]+)?:\d+")


def parse_address_list(text: str, where: str = "--peers") -> list[BoardAddress]:
    """Board k at the k-th address of `host:port,host:port,...`; the same address twice is refused."""
    addresses = [a.strip() for a in str(text).split(",")]
    if not all(addresses):
        raise MeshError(f"{where}: {text!r} has an empty entry; give host:port,host:port,... (no empty "
                              f"items)")
    boards = [BoardAddress(k, *_parse_address(a, where)) for k, a in enumerate(addresses)]
    _refuse_shared_addresses(boards, where)
    return boards


def load_inventory(peers: str | Path | None, bundle: Path | str | None, boards: int) -> Inventory:
    """The inventory for a bundle of `boards` boards; refuses one that does not list boards 0..N-1."""
    if peers is not None and not isinstance(peers, Path) and is_address_list(str(peers)):
        inventory = Inventory(parse_address_list(str(peers)), source="--peers")
    elif peers is not None:
        path = Path(peers)
        if _is_file(path):
            inventory = _from_json(path)
        elif path.is_dir():
            raise MeshError(f"--peers {peers} is a directory; give its boards.json, or host:port,...")
        else:
            raise MeshError(f"--peers {str(peers)[:80]!r} is neither an inventory file that exists nor "
                                  f"host:port,host:port,... (e.g. 10.0.0.10:5550,10.0.0.11:5550)")
    elif bundle is not None and (Path(bundle) / INVENTORY_FILE).is_file():
        inventory = _from_json(Path(bundle) / INVENTORY_FILE)
    else:
        inventory = localhost_inventory(boards)
    ids = [b.id for b in inventory.boards]
    if ids != list(range(boards)):
        raise MeshError(f"board inventory ({inventory.source}) lists boards {ids} but the bundle has "
                              f"{boards} boards: list each of 0..{boards - 1} once")
    keyed = [b.public_key is not None for b in inventory.boards]
    if any(keyed) and not all(keyed):
        raise MeshError(f"board inventory ({inventory.source}) has public keys for some boards only: "
                              f"give every board a key (CURVE) or none")
    return inventory
