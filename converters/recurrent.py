"""Recurrent Keras layers made convertible to TFLite builtins.

TFLite has a fused kernel for a whole LSTM sequence (UNIDIRECTIONAL_SEQUENCE_LSTM),
and the TFLite converter emits it for a function annotated the way Keras 2's LSTM
annotated its own: ``api_implements`` starting with ``lstm_``, plus ``time_major``
and ``go_backwards`` attributes, taking (inputs, init_h, init_c, kernel,
recurrent_kernel, bias) and returning five outputs (last output, full sequence,
final h, final c, runtime). The converter replaces the function's body with the
fused op, provided only the first two outputs are used, and it needs a static
batch. Keras 3 layers no longer carry that annotation, so an LSTM layer that the
fused kernel computes exactly is swapped for ``FusedLSTM``, which calls such a
function with the layer's own weights.

TFLite has no GRU (or SimpleRNN) fusion: its builtin operators have no GRU at all.
Those layers, and LSTMs the fused kernel cannot compute (other activations,
returned states, masks, initial states, stateful layers), are unrolled over a
static sequence length into FULLY_CONNECTED / LOGISTIC / TANH / MUL / ADD, or,
with a dynamic length, kept as a loop that a fixed batch lowers to a builtin WHILE.
"""

from __future__ import annotations

__all__ = [
    "FUSED_LSTM_OPERATOR",
    "RECURRENT_LAYERS",
    "RecurrentPlan",
    "lstm_fusion_refusal",
    "plan_recurrent",
    "recurrent_layers",
    "with_fixed_batch",
]

import uuid
from dataclasses import dataclass, field
from typing import Any

from .sources import import_tensorflow

RECURRENT_LAYERS = ("LSTM", "GRU", "SimpleRNN", "Bidirectional", "RNN", "ConvLSTM1D", "ConvLSTM2D")
FUSED_LSTM_OPERATOR = "UNIDIRECTIONAL_SEQUENCE_LSTM"
RECURRENT_MODES = ("fused", "unrolled")


def recurrent_layers(model: Any) -> list[str]:
    """Names of the recurrent layers in a Keras model (searched through nested models)."""
    found = []
    for layer in getattr(model, "layers", None) or []:
        if type(layer).__name__ in RECURRENT_LAYERS:
            found.append(layer.name)
        found += recurrent_layers(layer) if hasattr(layer, "layers") else []
    return found


def lstm_fusion_refusal(kind: str, config: dict[str, Any], masking_in_model: bool, quantize: str = "none") -> str | None:
    """Why TFLite's fused sequence-LSTM kernel cannot compute this layer exactly,
    or None when it can (pure: a layer's class name and Keras config).

    The fused kernel has sigmoid gates and a tanh cell, starts from zero state,
    ignores masks and returns the sequence (the last step is sliced from it).
    Full-integer int8 is refused: its state tensors would take their int8 scales
    from the zero initial state (about 1e-8), which wipes out the recurrence."""
    if kind == "Bidirectional":
        inner = config.get("layer") or {}
        if inner.get("class_name") != "LSTM":
            return f"Bidirectional({inner.get('class_name')}) has no fused TFLite kernel"
        if config.get("merge_mode") not in ("concat", "sum", "mul", "ave"):
            return f"merge_mode {config.get('merge_mode')!r} (two outputs)"
        return lstm_fusion_refusal("LSTM", inner.get("config") or {}, masking_in_model, quantize)
    if kind != "LSTM":
        return f"{kind} has no fused TFLite kernel"
    if quantize == "int8":
        return "int8: the fused kernel's state would be quantized with the zero initial state's scale"
    if config.get("activation") != "tanh" or config.get("recurrent_activation") != "sigmoid":
        return (f"activation {config.get('activation')!r} / recurrent activation {config.get('recurrent_activation')!r} "
                "(the fused kernel computes tanh / sigmoid)")
    if config.get("return_state"):
        return "return_state=True (the fused kernel's final states are not outputs)"
    if config.get("stateful"):
        return "stateful=True (state carried between calls)"
    if masking_in_model:
        return "the model masks its sequences (the fused kernel ignores masks)"
    return None


@dataclass
class RecurrentPlan:
    """What was done to a model's recurrent layers, and the notes that say so."""

    model: Any
    fused: list[str] = field(default_factory=list)
    """LSTM layers now calling the annotated function (one fused op each expected)."""
    notes: list[str] = field(default_factory=list)
    fixed_batch: int | None = None


def _masks_sequences(model: Any) -> bool:
    """Whether any layer of the model (nested ones too) makes a mask."""
    for layer in getattr(model, "layers", None) or []:
        if type(layer).__name__ == "Masking" or getattr(layer, "mask_zero", False):
            return True
        if hasattr(layer, "layers") and _masks_sequences(layer):
            return True
    return False


def _annotated_lstm(go_backwards: bool) -> Any:
    """The function TFLite's converter replaces by its fused LSTM kernel. Its body
    (what TensorFlow runs, and what TFLite keeps if it does not fuse) is Keras'
    LSTM over a zero state, batch-major."""
    tf = import_tensorflow()

    def standard_lstm(inputs: Any, init_h: Any, init_c: Any, kernel: Any, recurrent_kernel: Any, bias: Any) -> Any:
        sequence = tf.transpose(tf.reverse(inputs, [1]) if go_backwards else inputs, [1, 0, 2])

        def step(carry: Any, x: Any) -> Any:
            h, c = carry
            z = tf.matmul(x, kernel) + tf.matmul(h, recurrent_kernel) + bias
            i, f, g, o = tf.split(z, 4, axis=1)  # Keras' gate order
            c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
            return tf.sigmoid(o) * tf.tanh(c), c

        hs, cs = tf.scan(step, sequence, initializer=(init_h, init_c))
        outputs = tf.transpose(hs, [1, 0, 2])
        return outputs[:, -1], outputs, hs[-1], cs[-1], tf.constant(0.0)

    return tf.function(standard_lstm, autograph=False, experimental_attributes={
        "api_implements": f"lstm_{uuid.uuid4()}",  # the converter fuses names starting with lstm_
        "api_preferred_device": "CPU",
        "time_major": False,
        "go_backwards": go_backwards,
    })


def _fused_lstm_class() -> Any:
    tf = import_tensorflow()

    class FusedLSTM(tf.keras.layers.Layer):  # type: ignore[name-defined]  # TensorFlow is imported lazily
        """A Keras LSTM layer's inference as one annotated function call (same weights)."""

        def __init__(self, source: Any) -> None:
            super().__init__(name=source.name, dtype=source.dtype_policy)
            self.units = int(source.units)
            self.return_sequences = bool(source.return_sequences)
            self._function = _annotated_lstm(bool(source.go_backwards))
            cell = source.cell
            kernel = cell.kernel.numpy()
            recurrent = cell.recurrent_kernel.numpy()
            bias = cell.bias.numpy() if cell.use_bias else tf.zeros([4 * self.units]).numpy()
            self._weights = []
            for name, value in (("kernel", kernel), ("recurrent_kernel", recurrent), ("bias", bias)):
                weight = self.add_weight(shape=value.shape, initializer="zeros", name=name, trainable=False)
                weight.assign(value)
                self._weights.append(weight)

        def call(self, sequences: Any, mask: Any = None, initial_state: Any = None) -> Any:
            if mask is not None or initial_state is not None:
                raise ValueError("masked or initial-state LSTM: not fusable")
            # The fused kernel keeps its state in variable tensors and writes the
            # final state back into them: constant zeros would carry one call's
            # state into the next. Zeros computed from the input are rewritten by
            # their own operators before every call. Each state must be a tensor
            # of its own (the converter refuses a non-constant state shared by two
            # operands), so each is the zeroed input times a slice of this layer's
            # kernel: distinct for h and c, and from one layer to the next.
            kernel, recurrent, bias = (tf.convert_to_tensor(w) for w in self._weights)
            units = self.units
            h0 = tf.matmul(sequences[:, 0, :] * 0.0, kernel[:, :units])
            c0 = tf.matmul(sequences[:, -1, :] * 0.0, kernel[:, units : 2 * units])
            last, outputs, _, _, _ = self._function(sequences, h0, c0, kernel, recurrent, bias)
            return outputs if self.return_sequences else last

        def compute_output_shape(self, input_shape: Any) -> Any:
            if self.return_sequences:
                return (input_shape[0], input_shape[1], self.units)
            return (input_shape[0], self.units)

    class FusedBidirectional(tf.keras.layers.Layer):  # type: ignore[name-defined]  # imported lazily
        """A Keras Bidirectional(LSTM) as two fused LSTMs (the backward one reads
        the sequence reversed; its sequence output is flipped back, as Keras does)."""

        def __init__(self, source: Any) -> None:
            super().__init__(name=source.name, dtype=source.dtype_policy)
            self.merge_mode = source.merge_mode
            self.return_sequences = bool(source.return_sequences)
            self.forward = FusedLSTM(source.forward_layer)
            self.backward = FusedLSTM(source.backward_layer)

        def call(self, sequences: Any, mask: Any = None, initial_state: Any = None) -> Any:
            forward = self.forward(sequences, mask=mask, initial_state=initial_state)
            backward = self.backward(sequences, mask=mask, initial_state=initial_state)
            if self.return_sequences:
                backward = tf.reverse(backward, [1])
            if self.merge_mode == "concat":
                return tf.concat([forward, backward], axis=-1)
            if self.merge_mode == "sum":
                return forward + backward
            if self.merge_mode == "mul":
                return forward * backward
            return (forward + backward) / 2

        def compute_output_shape(self, input_shape: Any) -> Any:
            units = self.forward.units + (self.backward.units if self.merge_mode == "concat" else 0)
            if self.return_sequences:
                return (input_shape[0], input_shape[1], units)
            return (input_shape[0], units)

    return {"LSTM": FusedLSTM, "Bidirectional": FusedBidirectional}


def with_fixed_batch(model: Any, batch: int) -> Any:
    """The Keras model rebuilt with inputs of a static batch size (same weights):
    the fused LSTM kernel needs one, and TensorFlow's tensor-list ops behind a
    rolled loop with a dynamic batch have no TFLite builtin (a static batch lowers
    them to a builtin WHILE loop)."""
    tf = import_tensorflow()
    inputs = [tf.keras.Input(batch_shape=(batch, *t.shape[1:]), dtype=t.dtype, name=_input_name(t)) for t in model.inputs]
    outputs = model(inputs if len(inputs) > 1 else inputs[0], training=False)
    return tf.keras.Model(inputs, outputs, name=model.name)


def _input_name(tensor: Any) -> str:
    return str(getattr(tensor, "name", "input")).split(":")[0]


def _rebuilt(model: Any, fuse: bool, unroll: bool, quantize: str) -> tuple[Any, list[str], dict[str, str]]:
    """A clone of the model with fusable LSTMs swapped for FusedLSTM (``fuse``) and
    the other recurrent layers unrolled (``unroll``); (model, fused names, refusals)."""
    tf = import_tensorflow()
    fused_classes = _fused_lstm_class() if fuse else None
    masking = _masks_sequences(model)
    fused: list[str] = []
    refused: dict[str, str] = {}

    def clone(layer: Any) -> Any:
        kind = type(layer).__name__
        config = layer.get_config()
        if kind in RECURRENT_LAYERS and fused_classes is not None:
            reason = lstm_fusion_refusal(kind, config, masking, quantize)
            if reason is None:
                fused.append(layer.name)
                return fused_classes[kind](layer)
            refused[layer.name] = reason
        if unroll and kind in ("LSTM", "GRU", "SimpleRNN"):
            config["unroll"] = True
        elif unroll and kind == "Bidirectional":
            for key in ("layer", "backward_layer"):
                inner = config.get(key)
                if isinstance(inner, dict) and isinstance(inner.get("config"), dict):
                    inner["config"]["unroll"] = True
        else:
            return layer  # shared as it is: the clone keeps its weights
        return layer.__class__.from_config(config)

    copy = tf.keras.models.clone_model(model, clone_function=clone, recursive=True)
    if unroll:  # layers made from their config start from fresh weights
        by_name = _layers_by_name(model)
        for name, layer in _layers_by_name(copy).items():
            if type(layer).__name__ in RECURRENT_LAYERS and name in by_name and layer is not by_name[name]:
                layer.set_weights(by_name[name].get_weights())
    return copy, fused, refused


def _layers_by_name(model: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for layer in getattr(model, "layers", None) or []:
        found[layer.name] = layer
        if hasattr(layer, "layers"):
            found.update(_layers_by_name(layer))
    return found


def plan_recurrent(model: Any, fixed_batch: int | None, mode: str = "fused", quantize: str = "none") -> RecurrentPlan:
    """The model to convert and the notes that say how its recurrent layers go to TFLite.

    ``fused``: LSTMs the fused kernel computes exactly become UNIDIRECTIONAL_SEQUENCE_LSTM
    (the batch is then fixed: 1 unless ``fixed_batch`` says otherwise); other
    recurrent layers are unrolled over a static sequence length. ``unrolled``:
    every recurrent layer is unrolled (the fallback; keeps a dynamic batch). A
    rolled loop left with a dynamic sequence length gets a fixed batch (1 unless
    ``fixed_batch`` says otherwise) so that TFLite lowers it to a builtin WHILE.
    """
    if mode not in RECURRENT_MODES:
        raise ValueError(f"recurrent mode {mode!r} not in {RECURRENT_MODES}")
    layers = recurrent_layers(model)
    plan = RecurrentPlan(model=model, fixed_batch=fixed_batch)
    if not layers:
        if fixed_batch is not None:
            plan.model = with_fixed_batch(model, fixed_batch)
            plan.notes.append(f"converted with a fixed batch of {fixed_batch} (--fixed-batch)")
        return plan
    static_length = all(len(t.shape) >= 3 and t.shape[1] is not None for t in model.inputs)
    try:
        plan.model, plan.fused, refused = _rebuilt(model, fuse=mode == "fused", unroll=static_length,
                                                        quantize=quantize)
    except Exception as exc:  # noqa: BLE001 - a custom layer that cannot be cloned: convert the loops as they are
        plan.notes.append(f"recurrent layer(s) {', '.join(layers)} could not be rebuilt ({exc.__class__.__name__}); kept as loops")
        plan.model, refused, static_length = model, {}, False
    batch_needed = any(t.shape[0] is None for t in model.inputs)
    rolled = [name for name in layers if name not in plan.fused]
    if plan.fused:
        plan.notes.append(
            f"LSTM layer(s) {', '.join(plan.fused)}: TFLite's fused {FUSED_LSTM_OPERATOR} kernel"
        )
    if rolled and static_length:
        why = "; ".join(f"{name}: {reason}" for name, reason in refused.items())
        plan.notes.append(
            f"recurrent layer(s) {', '.join(rolled)}: unrolled over the sequence length into builtin operators"
            + (f" ({why})" if why else " (TFLite has no fused kernel for them)")
        )
    if (plan.fused or (rolled and not static_length)) and batch_needed and fixed_batch is None:
        plan.fixed_batch = 1
        why = "the fused LSTM kernel needs a static batch" if plan.fused else (
            "a builtin WHILE loop; a dynamic batch leaves tensor-list ops TFLite builtins lack")
        plan.notes.append(f"converted with a fixed batch of 1 ({why}; --fixed-batch N to choose)")
    if plan.fixed_batch is not None:
        plan.model = with_fixed_batch(plan.model, plan.fixed_batch)
    return plan
