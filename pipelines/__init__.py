"""Input pipelines of cimfast: two views of one crop, from the demo images or
an image folder. Import as ``cimfast.pipelines``. This package knows nothing
of the trainer.

- ``views``: crop/flip parameters and the two views, counter-based (seed, epoch, index)
- ``sampler``: cimfast's epoch order (seeded permutation, rank slices, resume)
- ``datasets``: the torch path (torchvision.io / PIL decoding)
- ``dali``: the DALI path (GPU or CPU decoding) giving the same batches
- ``validate``: finds unusable files, writes a clean list (``python -m cimfast.pipelines.validate ROOT``)
- ``synthetic``: batches made on the device for compute-only benchmarks
- ``demo``: the built-in demo photographs
"""
