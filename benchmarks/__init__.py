"""Benchmarks of ``ewc_reg``.

* ``python -m benchmarks.split_mnist`` / ``python -m benchmarks.split_cifar10``: the continual
  learning benchmarks of van de Ven (2025), protocol in :mod:`benchmarks.protocol`, data in
  :mod:`benchmarks.data`, networks in :mod:`benchmarks.models`;
* ``python -m benchmarks.report``: paper-style tables and figures from their ``runs.jsonl``.

See ``benchmarks/README.md``.
"""
