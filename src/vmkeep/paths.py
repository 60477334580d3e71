"""Where vmkeep's files are: the config file, the data dir, the catalog, the daemon's socket.

Kept free of pydantic and SQLAlchemy: the CLI finds a running daemon's socket through ``peek``
without loading the typed config (``config.load_config``, which uses these same rules).
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from pathlib import Path
from typing import Any, NamedTuple

from vmkeep.errors import ConfigError

SOCKET = "vmkeep.sock"  # the daemon's local socket, in the data dir
SOCKET_PATH_MAX = 108  # bytes in sockaddr_un.sun_path, the final NUL included
DEFAULT_LIBVIRT_URI = "qemu:///system"


PRIVATE_UMASK = 0o077  # vmkeep's files hold every guest's disks: no one else reads them


def private_umask() -> None:
    """Files and folders vmkeep creates are its user's alone (0600 / 0700): set by the CLI's
    ``main`` and the daemon's ``serve``. What QEMU must reach is opened to QEMU's group alone
    (``hypervisor/reach.py``), never to every user."""
    os.umask(PRIVATE_UMASK)


def within(path: Path, root: Path) -> bool:
    """Whether ``path`` is ``root`` or below it (both already resolved by the caller)."""
    return path == root or root in path.parents


def is_root() -> bool:
    return os.geteuid() == 0


def default_data_dir() -> Path:
    if is_root():
        return Path("/var/lib/vmkeep")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "vmkeep"


def default_config_path() -> Path:
    if is_root():
        return Path("/etc/vmkeep/config.toml")
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "vmkeep" / "config.toml"


def absolute(path: str | Path) -> Path:
    """A data dir as vmkeep uses it: ``~`` expanded, absolute."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def catalog_url(url: str, data_dir: Path) -> str:
    """``[catalog] url``, or (empty) the SQLite file in the data dir."""
    return url or f"sqlite:///{data_dir / 'catalog.db'}"


def daemon_key(catalog: str, libvirt_uri: str) -> str:
    """What a daemon answers for: its catalog and libvirt connection, named without showing the
    catalog's URL (which may hold a password)."""
    return hashlib.sha256(f"{catalog}\n{libvirt_uri}".encode()).hexdigest()[:32]


def read_file(path: str | Path | None, environ: dict[str, str]) -> tuple[Path, dict[str, Any]]:
    """The config file (``--config``, ``$VMKEEP_CONFIG``, the default) and its TOML (empty when
    the default file does not exist). Errors name the file and the fix."""
    explicit = path or environ.get("VMKEEP_CONFIG")
    file = Path(explicit) if explicit else default_config_path()
    if not file.exists():
        if explicit:
            raise ConfigError(str(file), "file does not exist")
        return file, {}
    try:
        return file, tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(str(file), f"not valid TOML ({err})") from err
    except UnicodeDecodeError as err:
        raise ConfigError(
            str(file), f"not UTF-8 text (byte {err.start}); save it as UTF-8"
        ) from err
    except OSError as err:
        raise ConfigError(str(file), f"cannot read ({err.strerror})") from err


class Where(NamedTuple):
    data_dir: Path
    catalog_url: str
    libvirt_uri: str

    @property
    def socket(self) -> Path:
        return self.data_dir / SOCKET

    @property
    def key(self) -> str:
        return daemon_key(self.catalog_url, self.libvirt_uri)


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name)
    return value if isinstance(value, dict) else {}


def peek(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Where:
    """Data dir, catalog and libvirt URI from the config file and the environment, as
    ``load_config`` resolves them (``VMKEEP_DATA_DIR``, ``VMKEEP_CATALOG_URL`` and
    ``VMKEEP_LIBVIRT_URI`` win over the file), without validating the rest of the config."""
    env = os.environ if environ is None else environ
    _file, data = read_file(path, dict(env))
    data_dir = env.get("VMKEEP_DATA_DIR", data.get("data_dir"))
    url = env.get("VMKEEP_CATALOG_URL", _section(data, "catalog").get("url", ""))
    uri = env.get("VMKEEP_LIBVIRT_URI", _section(data, "libvirt").get("uri", DEFAULT_LIBVIRT_URI))
    base = absolute(data_dir) if isinstance(data_dir, str) else default_data_dir()
    return Where(base, catalog_url(url if isinstance(url, str) else "", base), str(uri))
