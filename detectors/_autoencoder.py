"""A small dense Keras autoencoder for standardised feature vectors.

TensorFlow is imported inside these functions only, so the detectors package imports and the
control-limit methods run without it.
"""

from pathlib import Path

import numpy as np

TENSORFLOW_MISSING = (
    "the equipment detector's autoencoder needs TensorFlow, which is not installed: "
    "run pip install 'anomaly-exporter[tensorflow]', or set method: limits"
)


def import_keras():
    """Import and return Keras from TensorFlow; raises ImportError with the install command."""
    try:
        import tensorflow as tf
    except ImportError as error:
        raise ImportError(TENSORFLOW_MISSING) from error
    return tf.keras


def build_autoencoder(n_inputs: int, seed: int):
    """Build a dense autoencoder ``n -> n/2 -> n/4 -> n/2 -> n`` with at least 8 and 2 units."""
    keras = import_keras()
    keras.utils.set_random_seed(seed)
    hidden = max(8, n_inputs // 2)
    code = max(2, n_inputs // 4)
    model = keras.Sequential(
        [
            keras.Input(shape=(n_inputs,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(code, activation="relu"),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(n_inputs, activation="linear"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3), loss="mse")
    return model


def train_autoencoder(inputs: np.ndarray, *, epochs: int, batch_size: int, seed: int):
    """Train a new autoencoder on ``inputs`` (samples, features), stopping when validation loss stalls.

    The last 10 % of the samples (in time order) are the validation set, and the weights of
    the best validation epoch are kept.
    """
    keras = import_keras()
    model = build_autoencoder(inputs.shape[1], seed)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=10, restore_best_weights=True)
    model.fit(
        inputs,
        inputs,
        epochs=epochs,
        batch_size=batch_size,
        validation_split=0.1,
        shuffle=True,
        callbacks=[stop],
        verbose=0,
    )
    return model


def reconstruct(model, inputs: np.ndarray) -> np.ndarray:
    """Return the model's reconstruction of ``inputs`` as float64."""
    if inputs.shape[0] == 0:
        return np.empty_like(inputs, dtype=np.float64)
    output = model.predict(inputs.astype(np.float32), batch_size=4096, verbose=0)
    return np.asarray(output, dtype=np.float64)


def save_model(model, path: str | Path) -> None:
    """Save the model in Keras' own ``.keras`` format; the path must end with ``.keras``."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"invalid model path {str(path)!r}: expected a file name ending with .keras")
    model.save(path)


def load_model(path: str | Path):
    """Load a model saved by save_model, with Keras' safe mode on (no Python lambdas run)."""
    keras = import_keras()
    return keras.models.load_model(Path(path), compile=False, safe_mode=True)
