"""A multilayer perceptron of keras.layers.Dense layers."""

from __future__ import annotations


def mlp(
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    hidden_units: list[int] = (128, 64),
    activation: str = "relu",
    dropout: float = 0.0,
    name: str = "mlp",
):
    """Dense layers ``hidden_units`` then a linear output layer named ``head``.

    ``input_shape`` and ``num_outputs`` come from the data set; the run passes
    them to every model builder, so a user's own builder takes them too.
    """
    import keras

    layers = [keras.Input(shape=tuple(input_shape))]
    if len(input_shape) > 1:
        layers.append(keras.layers.Flatten(name="flatten"))
    for i, units in enumerate(hidden_units):
        layers.append(keras.layers.Dense(int(units), activation=activation, name=f"dense_{i}"))
        if dropout > 0:
            layers.append(keras.layers.Dropout(dropout, name=f"dropout_{i}"))
    layers.append(keras.layers.Dense(int(num_outputs), name="head"))
    return keras.Sequential(layers, name=name)
