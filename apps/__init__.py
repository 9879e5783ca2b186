"""crestcore.apps: the applications floor, on top of everything else.

``crestcore.apps.cli``         the ``crest`` command line (``crest demo``, ``crest info``, ``crest bench``)
``crestcore.apps.demo``        the selection demo (``crest demo --selection``)
``crestcore.apps.train_demo``  the training recipe shared by the demos and the benchmarks, and the
                               training demo (``crest demo``)
``crestcore.apps.keras_demo``  the training demo through Keras 3 (``crest demo --framework keras``)
``crestcore.apps.datasets``    the Fashion-MNIST reader (gzipped IDX files)

:func:`require` checks, before an application does any work, that the modules it needs are installed, and
names what to install (:class:`MissingExtra`) when one is not.

These modules may import everything below them (``crestcore``, ``crestcore.backends``,
``crestcore.adapters``); nothing below imports them (``tests/test_layering.py`` checks it). Importing
this package imports nothing, and the modules import torch, keras, tqdm and matplotlib only inside the
functions that use them.
"""


class MissingExtra(ModuleNotFoundError):
    """An application's module is not installed; the message names what to install."""


def require(what: str, install: str, *modules: str) -> None:
    """Raise :class:`MissingExtra` naming ``install`` when a module of ``modules`` is not installed: checked
    before any work (review 108: the training demo trained every method, then failed on matplotlib and saved
    nothing), without importing them.

    >>> require("the demo", "pip install nothing", "json")
    >>> require("the demo", "pip install 'crestcore[demo]'", "json", "no_such_module_here")
    Traceback (most recent call last):
        ...
    crestcore.apps.MissingExtra: the demo needs no_such_module_here, which is not installed: pip install 'crestcore[demo]'
    """
    from importlib.util import find_spec

    missing = [name for name in modules if find_spec(name) is None]
    if missing:
        raise MissingExtra(f"{what} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                           f"installed: {install}", name=missing[0])
