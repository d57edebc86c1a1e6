"""Models leave and enter the trainer as Hugging Face ``transformers`` checkpoints.

- :mod:`~moe_trainer.hub.architectures`: which ``transformers`` architecture a model of ours
  is (Mixtral, Qwen2-MoE, Llama), its ``config.json``, and back: the settings a checkpoint needs.
- :mod:`~moe_trainer.hub.weights`: the one table between our parameter names and theirs, read
  both ways (export and import use the same links, so a round trip is exact by construction).
- :mod:`~moe_trainer.hub.safetensors_io`: ``*.safetensors`` files, written whole or sharded, read one
  tensor at a time.
- :mod:`~moe_trainer.hub.export` (``moe-export``), :mod:`~moe_trainer.hub.init_from`
  (``train.init_from``, ``moe-import``), :mod:`~moe_trainer.hub.generate` (``moe-generate``).

Nothing here imports ``transformers``: the files are the format, and the tests read them back
with ``transformers`` itself.
"""
