"""Training machinery shared by the classifier and the U-Net stages.

- :mod:`.data`: slice datasets read from a store's memory map, the (seed, epoch) sampler,
  batch loaders, fold parts as store indices;
- :mod:`.fabric`: Lightning Fabric from the device options, run start, gathering across
  ranks, RNG state that loads with ``weights_only=True``;
- :mod:`.loop`: ONE epoch loop with resume from ``last.pt``, best-epoch selection by a
  monitored score, per-epoch rows and ``metrics.csv``; a stage supplies a :class:`.loop.Task`;
- :mod:`.records`: ``metrics.csv`` and the training figures.
"""
