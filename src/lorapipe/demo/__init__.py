"""The demo of ``make run``, apart from the library.

- ``world``: the procedural image world, where every scene has a ground truth;
- ``world_model`` and ``world_tagger``: train the world's base model and tagger (committed
  under ``assets/``);
- ``inputs``: the demo's inputs (a raw image folder of the world, the committed assets);
- ``claims``: what the run must show, measured on its outputs, and the report section that
  shows it;
- ``tiny_model``: the random-weight SD 1.x builder used by tests, benchmarks, the world model
  and ``lorapipe tiny-model``.

The demo may import production modules; production modules never import it.
"""
