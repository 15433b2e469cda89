"""A1111 WebUI prompts for diffusers, and negative prompts built from layers, in three modules:

- ``lorapipe.prompts.syntax``: A1111 prompt syntax (``<lora:>`` tags, ``(x:1.2)`` emphasis,
  ``BREAK``) parsed into weighted segments and LoRA tags;
- ``lorapipe.prompts.encoding``: the parsed prompt through CLIP as WebUI does it: 75-token
  chunks, per-token weights, long prompts concatenated instead of truncated, on each text
  encoder of the model's family (SDXL: both, plus the pooled embedding);
- ``lorapipe.prompts.negatives``: negative prompts stacked from layers and presets
  (``data/negative_prompts.yaml``) and checked by small named rules, each reporting a ``Lint``.

Import names from the module that owns them.
"""
