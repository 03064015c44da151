"""Data: datasets, the embedded synthetic dataset, augmentation and batching.

Kept import-light on purpose; import the submodules you need:
``m2f.data.catalog`` (``get_dataset``, ``register_dataset``), ``m2f.data.datasets`` (loaders),
``m2f.data.metadata`` (``DatasetMetadata``), ``m2f.data.synth`` (``write_synth``, ``ensure_synth``),
``m2f.data.transforms`` (LSJ, semantic resize+crop, test resize), ``m2f.data.collate``
(``collate``, ``TrainingSampler``, ``build_loader``).
"""
