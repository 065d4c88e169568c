"""Benchmarks and the results page; the core never imports this package.

* :mod:`fragjobs.bench.speed`: each technique vs the full model and training-free peers
  (``python -m fragjobs.bench``), tabled and plotted by :mod:`fragjobs.bench.speed_report`;
* :mod:`fragjobs.bench.memory`: the memory one method holds, in a fresh process
  (``python -m fragjobs.bench.memory``);
* :mod:`fragjobs.bench.farm`: the chain in-process vs through the farm, and dispatch latency
  (``python -m fragjobs.bench.farm``), with fragment loads from local, S3 and the warm cache
  in :mod:`fragjobs.bench.fragment_loads`;
* :mod:`fragjobs.bench.results`: the results page (``fragjobs results``);
* :mod:`fragjobs.bench.loading` and :mod:`fragjobs.bench.timing`: what these share.
"""
