"""User-facing errors. Each message is one actionable line; the CLI prints it and exits non-zero."""


class FogflError(Exception):
    """Base for errors a user (or a peer on the network) can cause."""

    exit_code = 2


class ConfigError(FogflError):
    """The configuration is invalid: unknown key, bad value, missing file."""


class DataError(FogflError):
    """A dataset cannot be found or read."""


class ModelError(FogflError):
    """A model file or payload is unusable (corrupt ONNX, wrong shapes, unknown architecture)."""


class ConnectError(FogflError):
    """A broker or server cannot be reached, or a port cannot be bound."""


class StorageError(FogflError):
    """A node cannot write its durable state (disk full, read-only, permissions)."""
