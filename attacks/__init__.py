"""Attack module: taps on the fog->cloud update traffic, reconstruction attacks behind one
interface, malicious-server parameter manipulation (MKOR), and leakage scoring.

Sees fog and cloud only through captures (``protos.capture``)."""
