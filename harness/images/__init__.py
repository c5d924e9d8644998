"""Guest images: the kernel and root filesystem, built from Debian packages by the
project's recipes in ``images/`` and cached by content hash.

- :mod:`harness.images.cache`   where the cache lives, keyed directories, locking
- :mod:`harness.images.steps`   running a build step with a log file and progress
- :mod:`harness.images.kernel`  linux-source-6.12 + defconfig + fragment -> bzImage
- :mod:`harness.images.rootfs`  mmdebstrap bookworm -> newc initramfs (+ overlay)
- :mod:`harness.images.sshkey`  the harness's ed25519 key
"""

from harness.images.cache import ImageCache, recipes_dir

__all__ = ["ImageCache", "recipes_dir"]
