"""Sophia inside other people's training loops.

* :mod:`sophia.integrations.transformers`: ``SophiaTrainer``, a Hugging Face ``Trainer``
  (extra ``sophia-lab[hf]``);
* :mod:`sophia.integrations.lightning`: ``SophiaCallback`` for a ``lightning.Trainer``
  (extra ``sophia-lab[lightning]``).

Neither library is imported until its submodule is.
"""
