"""crestcore.apps: the applications floor, on top of everything else.

``crestcore.apps.cli``         the ``crest`` command line (``crest demo``, ``crest info``, ``crest bench``)
``crestcore.apps.demo``        the selection demo (``crest demo --selection``)
``crestcore.apps.train_demo``  the training recipe shared by the demos and the benchmarks, and the
                               training demo (``crest demo``)
``crestcore.apps.keras_demo``  the training demo through Keras 3 (``crest demo --framework keras``)
``crestcore.apps.datasets``    the Fashion-MNIST reader (gzipped IDX files)

These modules may import everything below them (``crestcore``, ``crestcore.backends``,
``crestcore.adapters``); nothing below imports them (``tests/test_layering.py`` checks it). Importing
this package imports nothing, and the modules import torch, keras, tqdm and matplotlib only inside the
functions that use them.
"""
