"""The shared kernel: run config schema, datasets and partitioners (numpy only, importable on
the edge), and model definitions (``kernel.models``, needs torch; import it explicitly)."""
