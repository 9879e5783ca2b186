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
