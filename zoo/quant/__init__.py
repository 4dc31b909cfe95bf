"""Quantization-aware training and integer inference.

* :func:`quantize_` (``task.quantize(**quant_config)`` on the zoo's tasks) swaps ``nn.Linear``/``nn.Conv2d``/
  ``nn.Embedding`` layers for fake-quantized ones, with per-layer bit widths from module-name patterns
  (:mod:`zoo.quant.qat`, :mod:`zoo.quant.fake_quant`), and with ``attention_bit`` the attention product too
  (:mod:`zoo.quant.attention`);
* :class:`zoo.callbacks.QATScheduleCallback` steps the bit widths during training (e.g. 8 -> 6 -> 4);
* :func:`convert_` turns the trained model into integer layers (int8 GEMMs, 4-bit weights packed),
  :func:`save_converted` / :func:`load_converted` store it as a plain state dict, and ``python -m zoo convert`` does
  both from a checkpoint (:mod:`zoo.quant.convert`).

See ``docs/qat.md``.
"""

from zoo.quant.attention import QATScaledDotProduct, QuantizedScaledDotProduct
from zoo.quant.conv import QuantizedConv1d, QuantizedConv2d, fuse_convolutions_
from zoo.quant.convert import (
    QuantizedEmbedding,
    QuantizedLinear,
    calibrate,
    convert_,
    converted_layers,
    fuse_feedforward_,
    int8_mm,
    load_converted,
    pack_int4,
    save_converted,
    state_dict_bytes,
    unpack_int4,
)
from zoo.quant.fake_quant import FakeQuantizer, fake_quantize, qparams_from_range, quant_range
from zoo.quant.qat import (
    DEFAULT_OVERRIDES,
    QATConv1d,
    QATConv2d,
    QATEmbedding,
    QATLinear,
    calibrating,
    enable_fake_quant,
    freeze_observers,
    is_quantizer_state,
    qat_layers,
    quantize_,
    restore_qat_layers,
    set_schedule_bits,
    weight_quant_error,
)

__all__ = [
    "DEFAULT_OVERRIDES",
    "FakeQuantizer",
    "QATConv1d",
    "QATConv2d",
    "QATEmbedding",
    "QATLinear",
    "QATScaledDotProduct",
    "QuantizedConv1d",
    "QuantizedConv2d",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "QuantizedScaledDotProduct",
    "calibrate",
    "calibrating",
    "convert_",
    "converted_layers",
    "fuse_convolutions_",
    "fuse_feedforward_",
    "fake_quantize",
    "enable_fake_quant",
    "freeze_observers",
    "is_quantizer_state",
    "int8_mm",
    "load_converted",
    "pack_int4",
    "qat_layers",
    "qparams_from_range",
    "quant_range",
    "quantize_",
    "restore_qat_layers",
    "save_converted",
    "set_schedule_bits",
    "state_dict_bytes",
    "unpack_int4",
    "weight_quant_error",
]
