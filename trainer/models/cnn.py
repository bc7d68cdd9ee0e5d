"""A small convolutional network of keras.layers.Conv2D blocks for image inputs."""

from __future__ import annotations

from trainer.common.errors import UserError


def cnn(
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    filters: list[int] = (32, 64),
    kernel_size: int = 3,
    dense_units: int = 128,
    activation: str = "relu",
    batch_norm: bool = True,
    dropout: float = 0.25,
    name: str = "cnn",
):
    """Conv2D blocks, one per entry of ``filters``, then a Dense layer and a linear ``head``.

    Block ``i`` is ``conv_i`` (``filters[i]`` filters of ``kernel_size``, same padding),
    ``bn_i`` (batch normalization, momentum 0.9, with ``batch_norm``), ``act_i``
    (``activation``) and ``pool_i`` (2x2 max pooling, same padding, so a 1-pixel map
    stays one pixel).
    The maps are flattened into ``dense`` (``dense_units``; 0 leaves it out), with
    ``dropout`` before it and before the head. ``input_shape`` is ``(height, width,
    channels)`` and comes from the data set, as ``num_outputs`` does.
    """
    import keras

    if len(input_shape) != 3:
        raise UserError(
            f"model=cnn needs images (height, width, channels) but the data gives examples of "
            f"shape {tuple(input_shape)}; set data.images=true (digits) or use data=images"
        )
    layers = [keras.Input(shape=tuple(input_shape))]
    for i, width in enumerate(filters):
        # Batch normalization's shift makes the convolution's bias redundant.
        layers.append(keras.layers.Conv2D(int(width), int(kernel_size), padding="same",
                                          use_bias=not batch_norm, name=f"conv_{i}"))
        if batch_norm:
            # Momentum 0.9, not Keras' 0.99: the moving statistics validation uses settle in
            # tens of steps, so short runs on small folders validate on real statistics.
            layers.append(keras.layers.BatchNormalization(momentum=0.9, name=f"bn_{i}"))
        layers.append(keras.layers.Activation(activation, name=f"act_{i}"))
        layers.append(keras.layers.MaxPooling2D(2, padding="same", name=f"pool_{i}"))
    layers.append(keras.layers.Flatten(name="flatten"))
    if dense_units:
        if dropout > 0:
            layers.append(keras.layers.Dropout(dropout, name="dropout_features"))
        layers.append(keras.layers.Dense(int(dense_units), activation=activation, name="dense"))
    if dropout > 0:
        layers.append(keras.layers.Dropout(dropout, name="dropout_head"))
    layers.append(keras.layers.Dense(int(num_outputs), name="head"))
    return keras.Sequential(layers, name=name)
