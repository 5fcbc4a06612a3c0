"""Quantization through qwix: int8 PTQ (weights + calibrated activations), group-wise int4
weight-only, QAT (fake quant, straight-through gradients), int8 embedding tables and compact
checkpoints.

How qwix quantizes an NNX model
-------------------------------
``qwix.quantize_model(model, provider, *sample_inputs)`` clones the model, swaps its class for
a subclass whose ``__call__`` runs with ``jax.lax.dot_general``, ``jax.numpy.einsum`` and
``jax.lax.conv_general_dilated`` intercepted (their ``__code__`` is patched, so every alias
and stored reference is caught -- ``nnx.Conv``'s ``self.conv_general_dilated`` included) and
calls it once. An intercepted op asks the rules (first match wins) by *module path*
(``'blocks/0/attn/q'``: ``nnx.iter_modules`` path joined by ``/``; the module is the nearest
frame whose ``self`` is an ``nnx.Module``). An operand that is one of the module's own
``nnx.Param`` s is a weight, anything else an activation.

So in our models: ``Dense`` (``lax.dot_general``) and ``nnx.Conv`` are quantized;
``Embed.attend`` (``jnp.einsum``) would be too, but the default rules leave embeddings,
positions and norms float, and never touch attention's activation x activation einsums.

qwix intercepts one method per NNX model, ``__call__``: cached decoding works because
``GPT.decode``/``VLM.decode`` go through ``__call__(..., cache=...)`` (``generate`` runs on a
quantized model).

Modules
-------
``rules``    qtypes, the modules quantized, int4 group tiles, the QT version of a rule
``build``    a quantized model without qwix's eager call (abstract trace, then one jitted
             ``qwix.quantize_params``)
``ptq``      ``ptq_int8`` (with calibration), ``int4_weight_only``, ``quantized_forward_error``
``qat``      ``qat_model``, ``convert_qat_to_int8``
``tables``   int8 token / position tables (``quantize_embeddings``), no qwix
``storage``  bytes in memory / on disk, int4 packing, save / load, no qwix
"""
from gptjax.compress.quantize.rules import (QTYPES, check_qtype, conv_modules, default_rules,
                                            group_tiles, matmul_modules, qt_rule)
from gptjax.compress.quantize.storage import (bytes_on_disk, load_quantized, pack_int4,
                                              save_pytree, save_quantized, state_bytes,
                                              unpack_int4)
from gptjax.compress.quantize.tables import (Int8Embed, Int8Lookup, Int8Table,
                                             quantize_embeddings)
from gptjax.compress.quantize.build import dummy_batch
from gptjax.compress.quantize.ptq import (int4_weight_only, jit_forward, ptq_int8,
                                          quantized_forward_error)
from gptjax.compress.quantize.qat import convert_qat_to_int8, qat_model

__all__ = [
    "QTYPES", "check_qtype", "conv_modules", "default_rules", "group_tiles", "matmul_modules",
    "qt_rule", "bytes_on_disk", "load_quantized", "pack_int4", "save_pytree", "save_quantized",
    "state_bytes", "unpack_int4", "Int8Embed", "Int8Lookup", "Int8Table",
    "quantize_embeddings", "dummy_batch", "int4_weight_only", "jit_forward", "ptq_int8",
    "quantized_forward_error", "convert_qat_to_int8", "qat_model",
]
