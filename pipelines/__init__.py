"""Input pipelines of cimfast: two views of one crop, from the demo images or
an image folder. Import as ``cimfast.pipelines``. This package knows nothing
of the trainer."""
