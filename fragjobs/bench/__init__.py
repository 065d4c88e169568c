"""Benchmarks and the results page; the core never imports this package.

* :mod:`fragjobs.bench.speed`: each technique vs the full model and training-free peers
  (``python -m fragjobs.bench``), tabled and plotted by :mod:`fragjobs.bench.speed_report`;
  the method names in :mod:`fragjobs.bench.methods`, the peers (DeepCache, ToMe, diffusers'
  cache hooks fitted to a UNet or a transformer by :mod:`fragjobs.bench.diffusers_cache`) in
  :mod:`fragjobs.bench.peers`, the denoiser they fit to in :mod:`fragjobs.bench.denoisers`,
  the dominance lines in :mod:`fragjobs.bench.dominance`, the memory checks that skip a step
  which does not fit beside a large model in :mod:`fragjobs.bench.headroom`;
* :mod:`fragjobs.bench.memory`: the memory one method holds, in a fresh process
  (``python -m fragjobs.bench.memory``);
* :mod:`fragjobs.bench.farm`: the chain in-process vs through the farm, and dispatch latency
  (``python -m fragjobs.bench.farm``), with fragment loads from local, S3 and the warm cache
  in :mod:`fragjobs.bench.fragment_loads`;
* :mod:`fragjobs.bench.results`: the results page (``fragjobs results``), with the caching
  schedule ablation of :mod:`fragjobs.bench.schedule_ablation` / ``schedule_report``;
* :mod:`fragjobs.bench.loading` and :mod:`fragjobs.bench.timing`: what these share.
"""
