"""Errors raised while decoding what came over the wire. Each carries a one-line message."""


class WireError(ValueError):
    """A message from the network (or a file in a wire format) is malformed or fails a check."""


class ChecksumError(WireError):
    """A payload's sha256 does not match the one sent with it."""
