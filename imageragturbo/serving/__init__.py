"""Serving: render the Triton model repository (``repository``), make the export and index it
needs (``assets``), start a real tritonserver (``server``), and the ``serve``, ``demo`` and
``bench serve`` commands (``cli``, ``demo``, ``bench``).

Nothing is imported here, so ``imageragturbo --help`` stays fast; import the submodules.
"""
