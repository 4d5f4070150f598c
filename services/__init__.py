"""cairn's services: each an independent FastStream app on the JetStream event log."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cairn")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"
