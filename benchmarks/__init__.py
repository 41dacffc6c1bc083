"""Benchmarks of ``reparam.fold``: run ``python -m benchmarks.run --out docs/benchmarks.md``.

``common`` builds the models and measures; ``probe`` is the subprocess that measures peak memory
of one configuration; ``run`` runs every section; ``report`` judges the goals and writes the
markdown.
"""

import os

# OpenMP threads that spin at barriers while the machine is shared with other jobs made two-thread
# forward passes up to 20x slower and erratic here; sleeping threads keep runs comparable. This
# must be set before torch is imported (the package is imported before its modules).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
