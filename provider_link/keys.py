"""A provider's identity: its Ed25519 signing key and X25519 encryption key, in a key file.

The coordinator binds an explicit provider id to the first signing key that proves
it, so a provider that comes back with new keys is refused under its old id. The
keys are therefore made once and kept in a file (JSON, mode 0600, in a directory of
mode 0700): a missing or unreadable file is an error to report, never a reason to
make a new identity quietly (:func:`load_keys`); making one is explicit
(:func:`create_keys`). A simulated fleet keeps one file per provider in a key
directory (:func:`keys_in_directory`), made on first use.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import os
import stat
from pathlib import Path

import attrs
import nacl.exceptions
import nacl.public
import nacl.signing

FORMAT = 1
APP_DIR = "trio-inference-coordinator"


class KeyFileError(Exception):
    """A key file that cannot be used; the message says which and why, in one line."""


@attrs.frozen
class ProviderKeys:
    signing: nacl.signing.SigningKey
    encryption: nacl.public.PrivateKey

    @classmethod
    def generate(cls) -> ProviderKeys:
        return cls(nacl.signing.SigningKey.generate(), nacl.public.PrivateKey.generate())

    @property
    def public_key(self) -> str:
        """The X25519 public key, base64, as registered."""
        return _b64(bytes(self.encryption.public_key))

    @property
    def signing_public_key(self) -> str:
        """The Ed25519 verify key, base64, as registered."""
        return _b64(bytes(self.signing.verify_key))

    def dump(self) -> bytes:
        return json.dumps({"format": FORMAT, "signing_key": _b64(bytes(self.signing)),
                           "encryption_key": _b64(bytes(self.encryption))}).encode() + b"\n"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def default_key_file(name: str = "provider-agent.json") -> Path:
    """``$XDG_CONFIG_HOME/trio-inference-coordinator/<name>`` (``~/.config`` by default)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / APP_DIR / name


def default_key_directory() -> Path:
    """Where a simulated fleet keeps its providers' keys: ``$XDG_STATE_HOME/…/sim-keys``."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state")
    return Path(base) / APP_DIR / "sim-keys"


def load_keys(path: Path | str) -> ProviderKeys:
    """The keys in ``path``; :class:`KeyFileError` if it is missing, unreadable, open to
    others, or not a key file."""
    path = Path(path)
    try:
        info = path.stat()
        raw = path.read_bytes()[:4096]
    except FileNotFoundError:
        raise KeyFileError(f"no key file at {path} (make one with `provider-agent init "
                           f"--keys {path}`; a new key is a new identity)") from None
    except OSError as exc:
        raise KeyFileError(f"key file {path}: {exc.strerror or exc}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"key file {path} is open to other users (mode "
                           f"{stat.S_IMODE(info.st_mode):o}); chmod 600 {path}")
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a key file of this format")
        signing = base64.b64decode(data["signing_key"], validate=True)
        encryption = base64.b64decode(data["encryption_key"], validate=True)
        return ProviderKeys(nacl.signing.SigningKey(signing), nacl.public.PrivateKey(encryption))
    except (ValueError, KeyError, TypeError, binascii.Error,
            nacl.exceptions.CryptoError) as exc:
        raise KeyFileError(f"key file {path} is not a provider key file ({exc})") from None


def create_keys(path: Path | str) -> ProviderKeys:
    """Make new keys and write them to ``path``, which must not exist yet (mode 0600)."""
    path = Path(path)
    keys = ProviderKeys.generate()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} exists already: it is an identity; remove it only "
                           "to give this provider up") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(keys.dump())
            file.flush()
            os.fsync(file.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise KeyFileError(f"cannot write key file {path}: {exc.strerror or exc}") from None
    return keys


def keys_in_directory(directory: Path | str, provider_id: str) -> ProviderKeys:
    """The keys of ``provider_id`` in a fleet's key directory, made on first use."""
    path = Path(directory) / f"{_file_name(provider_id)}.json"
    try:
        return load_keys(path)
    except KeyFileError:
        if path.exists():
            raise
    try:
        return create_keys(path)
    except KeyFileError as exc:
        if path.exists():  # made by another process meanwhile: it is the identity
            return load_keys(path)
        raise exc from None


def _file_name(provider_id: str) -> str:
    """A provider id as a file name (ids are short and header-safe; '/' is not allowed)."""
    if not provider_id or provider_id in (".", "..") or "/" in provider_id or "\0" in provider_id:
        raise KeyFileError(f"{provider_id!r} cannot name a key file")
    return provider_id


def lock_directory(directory: Path | str) -> int:
    """Hold an exclusive lock on a key directory for this process's life; its descriptor.

    Two fleets using one key directory would each prove the same keys and supersede
    each other in a loop; the second is told at once instead.
    """
    import fcntl

    path = Path(directory)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise KeyFileError(f"key directory {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise KeyFileError(f"key directory {path} is in use by another fleet (give this "
                               "one its own with --keys)") from None
        raise KeyFileError(f"key directory {path}: {exc.strerror or exc}") from None
    return fd
