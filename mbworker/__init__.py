"""mbworker: the Worker pillar of a MadBase cluster, and the provisioner that stands up the rest.

Everything imports as ``mbworker.…``; nothing installs under a generic name. The product's folders stay at the top
of the repository, as the product knows them, and this package links them in: ``mbworker.worker`` is ``worker/``,
``mbworker.runtimes`` is ``runtimes/`` and so on (``mbworker/<name>`` is a relative symlink to ``../<name>``).
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("mbworker")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
