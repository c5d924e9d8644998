"""The harness's SSH key: ed25519, generated once into ``<cache>/ssh/id_ed25519``
(mode 0600, directory 0700) and baked into the guest's authorized keys."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from harness.images.cache import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, ImageCache


@dataclass(frozen=True)
class SSHKey:
    private: Path
    public: Path

    def public_line(self) -> str:
        return self.public.read_text().strip()


def ensure_ssh_key(cache: ImageCache) -> SSHKey:
    """Return the key pair, creating it atomically on first use."""
    d = cache.path("ssh")
    d.parent.mkdir(parents=True, exist_ok=True)
    d.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
    os.chmod(d, PRIVATE_DIR_MODE)
    priv, pub = d / "id_ed25519", d / "id_ed25519.pub"
    with cache.lock("ssh", "id_ed25519"):
        if not (priv.is_file() and pub.is_file()):
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
            line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH)
            tmp = d / f".id_ed25519.{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, PRIVATE_FILE_MODE)
            os.fchmod(fd, PRIVATE_FILE_MODE)  # a leftover file of the same name keeps its mode otherwise
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
            pub.write_bytes(line + b" dma-harness\n")
            os.replace(tmp, priv)
    os.chmod(priv, PRIVATE_FILE_MODE)
    return SSHKey(priv, pub)
