"""resolve_outputs reads a softmax last layer in the three ways _last_is_softmax documents: a nested
model's last layer, a Softmax layer, an activation named softmax, a keras.ops.softmax operation."""
import os
import warnings

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")

from crestcore.adapters.keras import resolve_outputs  # noqa: E402


def _custom_loss(y, p):  # not a Keras cross-entropy: only the last layer can tell
    return keras.ops.mean(p)


@pytest.mark.parametrize("case", ["nested", "softmax-layer", "named-softmax", "ops-softmax", "nested-ops-softmax"])
def test_a_softmax_last_layer_means_probabilities(case):
    if case in ("ops-softmax", "nested-ops-softmax"):  # keras.ops.softmax in a functional graph: an operation,
        inp = keras.Input((4,))                         # not a layer (review 66: read as "no softmax")
        model = keras.Model(inp, keras.ops.cast(keras.ops.softmax(keras.layers.Dense(3)(inp)), "float32"))
        if case == "nested-ops-softmax":
            model = keras.Sequential([keras.Input((4,)), model])
    elif case == "nested":
        inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
        model = keras.Sequential([keras.Input((4,)), inner])
    elif case == "softmax-layer":
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Softmax()])
    else:
        def softmax(x):  # a user's own softmax function, as activation=
            return keras.ops.softmax(x)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation=softmax)])
    model.compile(optimizer="sgd", loss=_custom_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_outputs(model, None) == "probabilities"
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.warns(UserWarning, match="last layer is a softmax"):
        assert resolve_outputs(model, None) == "logits"


class _Subclassed(keras.Model):
    """A subclassed classifier: its last layer cannot be read from model.layers."""

    def __init__(self, softmax):
        super().__init__()
        self.h = keras.layers.Dense(8, activation="relu")
        self.o = keras.layers.Dense(3)
        self.softmax = softmax

    def call(self, x, training=None):
        z = self.o(self.h(x))
        return keras.ops.softmax(z) if self.softmax else z


@pytest.mark.parametrize("softmax", [True, False])
def test_a_subclassed_models_outputs_are_checked_against_its_loss(softmax):
    """Review 131: a subclassed model's softmax outputs under from_logits=True, or its logits under a loss that
    takes probabilities, trained with no warning (a functional model's last layer is read; CREST then read
    logits as probabilities, clipping every negative one). At fit's start the outputs of a forward on a few
    examples are compared with the loss; matching ones, and an outputs= option, are not warned about."""
    import numpy as np

    from crestcore import CrestConfig
    from crestcore.adapters.keras import CrestCallback

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype("float32")
    y = np.arange(60) % 3
    wrong = keras.losses.SparseCategoricalCrossentropy(from_logits=softmax)
    right = keras.losses.SparseCategoricalCrossentropy(from_logits=not softmax)

    def fit(loss, **kw):
        keras.utils.set_random_seed(0)
        model = _Subclassed(softmax)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
        crest = CrestCallback(x, y, config=CrestConfig(m=12), budget=0.5, seed=0, **kw)
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            model.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)
        return [str(w.message) for w in got if "probabilities" in str(w.message) and "loss" in str(w.message)]

    said = fit(wrong)
    assert len(said) == 1, said
    assert ("look like probabilities" if softmax else "are no probabilities") in said[0]
    assert fit(right) == []
    assert fit(wrong, outputs="probabilities" if softmax else "logits") == []


def test_a_model_of_two_outputs_is_told_to_give_crest_the_one_it_trains():
    """Review 131: a two-output model compiled with loss=[ce, None] (Keras trains the first output) was refused
    as "compiled with 2 losses"; the refusal names the outputs and the one-output model to build."""
    from crestcore.adapters.keras import loss_facts

    inp = keras.Input((4,))
    h = keras.layers.Dense(8)(inp)
    model = keras.Model(inp, [keras.layers.Dense(3)(h), keras.layers.Dense(2)(h)])
    model.compile(optimizer="sgd", loss=[keras.losses.SparseCategoricalCrossentropy(from_logits=True), None])
    with pytest.raises(ValueError, match=r"the model has 2 outputs \(compiled with 1 loss\(es\) for them\).*"
                                         r"keras\.Model\(model\.inputs, model\.outputs\[0\]\)"):
        loss_facts(model)


@pytest.mark.parametrize("softmax", [True, False])
def test_a_lambda_last_layer_is_judged_by_its_outputs(softmax):
    """Review 156: a functional model ending in Lambda(lambda t: keras.ops.softmax(t / T)) (ported code, a
    temperature) was told its last layer is no softmax, a warning the docs call almost always a bug. A Lambda or a
    layer of the user's own cannot be read, so its outputs decide, as a subclassed model's do: quiet when they are
    probabilities, warned about when they are not; and where the loss cannot tell either, the refusal says why."""
    import numpy as np

    from crestcore import CrestConfig
    from crestcore.adapters.keras import CrestCallback

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype("float32")
    y = np.arange(60) % 3
    inp = keras.Input((4,))
    z = keras.layers.Dense(3)(keras.layers.Dense(8, activation="relu")(inp))
    out = keras.layers.Lambda(lambda t: keras.ops.softmax(t / 2.0) if softmax else t * 2.0)(z)
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    crest = CrestCallback(x, y, config=CrestConfig(m=12), budget=0.5, seed=0)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        model.fit(crest.dataset, epochs=1, callbacks=[crest], verbose=0)
    said = [str(w.message) for w in got if "probabilities" in str(w.message) and "loss" in str(w.message)]
    assert said == ([] if softmax else [said[0]]) and (softmax or "are no probabilities" in said[0]), said
    model.compile(optimizer="sgd", loss=_custom_loss)
    with pytest.raises(ValueError, match="its last layer, a Lambda or a layer of your own, runs code that cannot be "
                                         "read"):
        resolve_outputs(model, None)


def test_a_softmax_layer_or_activation_of_a_users_own_subclass_is_a_softmax():
    """Review 158: after a last layer of the user's own was left to the outputs probe, a keras.layers.Softmax
    subclass, or a Dense subclass with activation="softmax", under a loss whose from_logits cannot be read, was
    refused as undecidable (the probe needs from_logits); they are softmaxes, as before."""

    class MySoftmax(keras.layers.Softmax):
        pass

    class MyDense(keras.layers.Dense):
        pass

    inp = keras.Input((4,))
    for model in (keras.Model(inp, MySoftmax()(keras.layers.Dense(3)(inp))),
                  keras.Sequential([keras.Input((4,)), MyDense(3, activation="softmax")])):
        model.compile(optimizer="sgd", loss=_custom_loss)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert resolve_outputs(model, None) == "probabilities"
